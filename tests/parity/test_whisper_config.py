"""`convert.whisper_keys.config_from_hf`: a transformers `WhisperConfig` dict -> our config."""

import pytest
from transformers import WhisperConfig

from convert import whisper_keys
from longvid_jax.models import audio


def test_config_from_tiny_whisper_config():
    hf = WhisperConfig(num_mel_bins=16, d_model=32, encoder_layers=2, encoder_attention_heads=4,
                       encoder_ffn_dim=64, max_source_positions=64).to_dict()
    assert whisper_keys.config_from_hf(hf) == audio.make_config("tiny")
    cfg = whisper_keys.config_from_hf(hf, dtype="bfloat16", remat=True)
    assert cfg.dtype == "bfloat16" and cfg.remat and cfg.width == 32


def test_config_from_default_and_large_v3_sizes():
    cfg = whisper_keys.config_from_hf(WhisperConfig().to_dict())  # whisper-tiny sizes
    assert (cfg.num_mel_bins, cfg.width, cfg.depth, cfg.num_heads, cfg.mlp_dim,
            cfg.max_positions, cfg.act) == (80, 384, 4, 6, 1536, 1500, "gelu")
    large = WhisperConfig(num_mel_bins=128, d_model=1280, encoder_layers=32,
                          encoder_attention_heads=20, encoder_ffn_dim=5120).to_dict()
    assert whisper_keys.config_from_hf(large) == audio.make_config("large_v3")


def test_config_from_hf_errors():
    hf = WhisperConfig().to_dict()
    with pytest.raises(ValueError, match="model_type"):
        whisper_keys.config_from_hf({**hf, "model_type": "bert"})
    with pytest.raises(ValueError, match="lacks.*encoder_ffn_dim"):
        whisper_keys.config_from_hf({k: v for k, v in hf.items() if k != "encoder_ffn_dim"})
    with pytest.raises(ValueError, match="unknown activation"):
        whisper_keys.config_from_hf({**hf, "activation_function": "swishy"})
    with pytest.raises(ValueError, match="unknown WhisperEncoderConfig fields"):
        whisper_keys.config_from_hf(hf, nonsense=1)
