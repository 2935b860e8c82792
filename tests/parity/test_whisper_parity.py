"""Parity of `models.audio.WhisperEncoder` with `transformers` `WhisperEncoder`, and
`convert/whisper_keys.py`.

A tiny random Whisper encoder (every weight randomised, position table included, float32, eager
attention) is converted with `whisper_keys.hf_to_params` and compared on random log-mel input of
the full `2 * max_source_positions` frames (all HF accepts), and on short inputs against HF's own
sub-modules run by hand (conv1, conv2, the first A_out positions, layers, layer_norm).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import WhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperEncoder as HFWhisperEncoder

from convert import whisper_keys
from longvid_jax.models import audio

TOL = 1e-4
HF_KW = dict(num_mel_bins=16, d_model=32, encoder_layers=2, encoder_attention_heads=4,
             encoder_ffn_dim=64, max_source_positions=64)
CFG = audio.make_config("tiny")


def _hf_config() -> WhisperConfig:
    config = WhisperConfig(**HF_KW)
    config._attn_implementation = "eager"
    return config


@pytest.fixture(scope="module")
def hf_model() -> HFWhisperEncoder:
    model = HFWhisperEncoder(_hf_config()).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif p.ndim >= 2 and "embed_positions" not in name:
                p.copy_(noise / np.sqrt(np.prod(p.shape[1:])))
            else:
                p.copy_(0.5 * noise if "embed_positions" in name else 0.1 * noise)
    return model


@pytest.fixture(scope="module")
def state(hf_model) -> dict[str, np.ndarray]:
    return {k: v.numpy().copy() for k, v in hf_model.state_dict().items()}


def _mel(length: int, batch: int = 2, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(batch, 16, length)).astype(np.float32)


def _ours(params, mel, **kw):
    fn = jax.jit(lambda p, x: audio.WhisperEncoder(CFG).apply({"params": p}, x, **kw))
    return fn(params, jnp.asarray(mel))


def _err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - b.numpy())))


def test_full_window_matches_hf(hf_model, state):
    params = whisper_keys.hf_to_params(state, CFG)
    mel = _mel(128)
    last_layer = []
    hook = hf_model.layers[-1].register_forward_hook(lambda m, i, o: last_layer.append(o))
    try:
        with torch.no_grad():
            ref = hf_model(torch.from_numpy(mel), output_hidden_states=True)
    finally:
        hook.remove()
    out, aux = _ours(params, mel, return_hidden_states=True)
    assert out.shape == (2, 64, 32)
    assert _err(out, ref.last_hidden_state) < TOL
    assert _err(aux["encoder_output"], last_layer[0]) < TOL
    # HF's Whisper hidden_states: embeddings, layers 0 .. L-2, then the *post-LN* output in
    # place of the last layer's; ours keeps the last layer's raw output there.
    assert aux["hidden_states"].shape[0] == len(ref.hidden_states) == 3
    for i, h in enumerate(ref.hidden_states[:-1]):
        assert _err(aux["hidden_states"][i], h) < TOL, i
    assert _err(aux["hidden_states"][-1], last_layer[0]) < TOL


@pytest.mark.parametrize("length", [100, 101])
def test_short_input_matches_hf_submodules(hf_model, state, length):
    """A_in < 2 * max_positions: HF's modules by hand with the first A_out positions."""
    params = whisper_keys.hf_to_params(state, CFG)
    mel = _mel(length, seed=length)
    with torch.no_grad():
        x = F.gelu(hf_model.conv1(torch.from_numpy(mel)))
        x = F.gelu(hf_model.conv2(x)).permute(0, 2, 1)
        x = x + hf_model.embed_positions.weight[: x.shape[1]]
        for layer in hf_model.layers:
            x = layer(x, None)
        ref = hf_model.layer_norm(x)
    out, _ = _ours(params, mel)
    assert out.shape == (2, (length + 1) // 2, 32)
    assert _err(out, ref) < TOL


def test_sinusoids_match_hf_init():
    """`audio.sinusoids` (our `pos_embedding` init) = HF's `embed_positions` after post_init."""
    fresh = HFWhisperEncoder(_hf_config())
    ref = fresh.embed_positions.weight.detach().numpy()
    assert np.max(np.abs(audio.sinusoids(64, 32) - ref)) < 1e-6


def test_param_tree_matches_model_init(state):
    params = whisper_keys.hf_to_params(state, CFG)
    shapes = jax.eval_shape(lambda: audio.WhisperEncoder(CFG).init(jax.random.key(0),
                                                                   jnp.zeros((1, 16, 128))))
    want = jax.tree.map(lambda a: a.shape, nn.meta.unbox(shapes)["params"])
    assert jax.tree.map(lambda a: a.shape, params) == want


def test_round_trip_is_bitwise_with_prefix(state):
    prefix = "model.encoder."
    full = {prefix + k: v for k, v in state.items()}
    full["model.decoder.embed_tokens.weight"] = np.ones((5, 32), np.float32)
    params = whisper_keys.hf_to_params(full, CFG, prefix=prefix, ignore=("model.decoder.",))
    back = whisper_keys.params_to_hf(params, CFG, prefix=prefix)
    want = {k: v for k, v in full.items() if k.startswith(prefix)}
    assert sorted(back) == sorted(want)
    for k, v in want.items():
        assert back[k].dtype == v.dtype and back[k].tobytes() == v.tobytes(), k


def test_converter_is_strict(state):
    with pytest.raises(ValueError, match=r"unmapped key 'layers\.0\.self_attn\.k_proj\.bias'"):
        whisper_keys.hf_to_params({**state, "layers.0.self_attn.k_proj.bias": np.zeros(32)}, CFG)
    missing = {k: v for k, v in state.items() if k != "layers.1.fc2.weight"}
    with pytest.raises(ValueError, match=r"missing key 'layers\.1\.fc2\.weight'"):
        whisper_keys.hf_to_params(missing, CFG)
    with pytest.raises(ValueError, match=r"unmapped key 'decoder\.x'"):
        whisper_keys.hf_to_params({**state, "decoder.x": np.zeros(1)}, CFG)
    bad = {**state, "conv1.weight": np.zeros((32, 80, 3), np.float32)}
    with pytest.raises(ValueError, match=r"conv1\.weight.*\(32, 80, 3\).*\(32, 16, 3\)"):
        whisper_keys.hf_to_params(bad, CFG)
    with pytest.raises(ValueError, match=r"duplicate key 'layer_norm\.bias'"):
        whisper_keys.hf_to_params(list(state.items()) + [("layer_norm.bias", state[
            "layer_norm.bias"])], CFG)
    with pytest.raises(ValueError, match=r"unmapped key 'layers\.2\."):
        whisper_keys.hf_to_params({**state, "layers.2.fc1.bias": np.zeros(64)}, CFG)


def test_large_v3_param_count_matches_hf_meta_model():
    hf_cfg = WhisperConfig(num_mel_bins=128, d_model=1280, encoder_layers=32,
                           encoder_attention_heads=20, encoder_ffn_dim=5120,
                           max_source_positions=1500)
    with torch.device("meta"):
        model = HFWhisperEncoder(hf_cfg)
    total = sum(p.numel() for p in model.parameters())
    cfg = audio.make_config("large_v3")
    shapes = jax.eval_shape(lambda: audio.WhisperEncoder(cfg).init(
        jax.random.key(0), jnp.zeros((1, 128, 3000))))
    assert sum(int(np.prod(a.shape)) for a in jax.tree.leaves(nn.meta.unbox(shapes))) == total
    for k, v in model.state_dict().items():
        (rule,) = [r for r in whisper_keys.rules(cfg) if r.regex.fullmatch(k)]
        assert rule.hf_shape == tuple(v.shape), k
