"""Whisper encoder: HF `WhisperEncoder` state dict <-> `longvid_jax.models.audio.WhisperEncoder`.

HF keys (after `prefix`: `""` for a bare `WhisperEncoder`, `"encoder."` inside `WhisperModel`,
`"model.encoder."` inside `WhisperForConditionalGeneration`; the decoder's keys must then be
ignored explicitly, e.g. `ignore=("model.decoder.", "proj_out.")`):

  HF key [HF shape]                          ours (shape; L stacked first)   transform
  conv1.weight [D,C,3]                       conv1/kernel (3,C,D)            conv1d
  conv1.bias [D]                             conv1/bias (D)                  copy
  conv2.weight [D,D,3]                       conv2/kernel (3,D,D)            conv1d
  conv2.bias [D]                             conv2/bias (D)                  copy
  embed_positions.weight [max_positions,D]   pos_embedding (max_positions,D) copy
  layers.{i}. + (our leaves under encoder/layers/):
    self_attn_layer_norm.{weight,bias} [D]   ln1/{scale,bias} (L,D)          copy
    final_layer_norm.{weight,bias} [D]       ln2/{scale,bias} (L,D)          copy
    self_attn.{q,k,v}_proj.weight [N*H,D]    {q,k,v}/kernel (L,D,N,H)        heads_in
    self_attn.{q,v}_proj.bias [N*H]          {q,v}/bias (L,N,H)              heads_bias
    (no self_attn.k_proj.bias: a key of that name is an error)
    self_attn.out_proj.{weight,bias}         o/kernel (L,N,H,D), o/bias      heads_out, copy
    fc{1,2}.{weight,bias}                    fc{1,2}/{kernel,bias}           linear, copy
  layer_norm.{weight,bias} [D]               ln_post/{scale,bias} (D)        copy

Strict in the same way as `vit_keys.py` (unmapped, missing, duplicate keys and shape mismatches
raise ValueError naming the key); arrays keep their dtype.

`config_from_hf` reads the encoder's sizes from a transformers `WhisperConfig` dict.
"""

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from convert.vit_keys import Rule, block_rules, params_to_state, state_to_params
from longvid_jax.models.audio import WhisperEncoderConfig, make_config

_WHISPER_NAMES = {"ln1": "self_attn_layer_norm", "ln2": "final_layer_norm",
                  "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                  "o": "self_attn.out_proj", "fc1": "fc1", "fc2": "fc2"}


def rules(cfg: WhisperEncoderConfig) -> list[Rule]:
    """The Whisper encoder key table for `cfg`."""
    d, c = cfg.width, cfg.num_mel_bins
    table = [
        Rule("conv1.weight", ("conv1", "kernel"), "conv1d", (3, c, d)),
        Rule("conv1.bias", ("conv1", "bias"), "copy", (d,)),
        Rule("conv2.weight", ("conv2", "kernel"), "conv1d", (3, d, d)),
        Rule("conv2.bias", ("conv2", "bias"), "copy", (d,)),
        Rule("embed_positions.weight", ("pos_embedding",), "copy", (cfg.max_positions, d)),
    ]
    table += block_rules(hf_layer="layers.{}.", names=_WHISPER_NAMES, width=d,
                         num_heads=cfg.num_heads, mlp_dim=cfg.mlp_dim, k_bias=False)
    table += [Rule("layer_norm.weight", ("ln_post", "scale"), "copy", (d,)),
              Rule("layer_norm.bias", ("ln_post", "bias"), "copy", (d,))]
    return table


def hf_to_params(state: Mapping[str, Any] | Iterable[tuple[str, Any]],
                 cfg: WhisperEncoderConfig, *, prefix: str = "",
                 ignore: tuple[str, ...] = ()) -> dict:
    """HF Whisper encoder state dict -> `WhisperEncoder(cfg)` params (numpy, source dtypes).

    Args:
      state: key -> tensor (numpy / torch / jax), or (key, tensor) pairs.
      cfg: the encoder's config.
      prefix: key prefix of the encoder (see the module docstring).
      ignore: full-key prefixes to skip explicitly (each must match some key).

    Raises:
      ValueError: see `convert.vit_keys.state_to_params`.
    """
    return state_to_params(state, rules(cfg), prefix=prefix, ignore=tuple(ignore),
                           num_layers=cfg.depth)


def params_to_hf(params: Mapping[str, Any], cfg: WhisperEncoderConfig, *,
                 prefix: str = "") -> dict[str, np.ndarray]:
    """`WhisperEncoder(cfg)` params -> HF Whisper encoder keys (numpy); inverse of
    `hf_to_params`.

    Raises:
      ValueError: see `convert.vit_keys.params_to_state`.
    """
    return params_to_state(params, rules(cfg), prefix=prefix, num_layers=cfg.depth)


def config_from_hf(hf_config: Mapping[str, Any], **overrides: Any) -> WhisperEncoderConfig:
    """`WhisperEncoderConfig` from a transformers `WhisperConfig` dict (config.json or
    `WhisperConfig().to_dict()`); only the encoder's fields are read.

    Fields: `num_mel_bins` -> num_mel_bins, `d_model` -> width, `encoder_layers` -> depth,
    `encoder_attention_heads` -> num_heads, `encoder_ffn_dim` -> mlp_dim,
    `max_source_positions` -> max_positions, `activation_function` -> act. The LayerNorm eps
    is PyTorch's default 1e-5 (HF's Whisper has no field for it); `scale_embedding` is ignored
    because HF's encoder never applies its `embed_scale`.

    Args:
      hf_config: the parsed config.json (model_type "whisper").
      **overrides: further `WhisperEncoderConfig` fields (dtype, remat, attention_impl, ...).

    Raises:
      ValueError: another model_type, a missing field, an unknown activation or override.
    """
    c = dict(hf_config)
    if c.get("model_type") != "whisper":
        raise ValueError(f"unsupported model_type {c.get('model_type')!r}; expected 'whisper'")
    names = {"num_mel_bins": "num_mel_bins", "d_model": "width", "encoder_layers": "depth",
             "encoder_attention_heads": "num_heads", "encoder_ffn_dim": "mlp_dim",
             "max_source_positions": "max_positions", "activation_function": "act"}
    missing = sorted(k for k in names if k not in c)
    if missing:
        raise ValueError(f"WhisperConfig dict lacks {missing}")
    fields = {ours: c[hf] for hf, ours in names.items()}
    fields.update(overrides)
    return make_config(**fields)
