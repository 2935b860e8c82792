"""DINOv2: HF `Dinov2Model` state dict <-> `longvid_jax.models.dinov2.Dinov2` params.

Two HF layouts exist. `layout="saved"` (default) is the checkpoint layout: the released
`facebook/dinov2-*` safetensors and what `save_pretrained` writes (transformers 5 converts it
on load and back on save). `layout="module"` is the in-memory `Dinov2Model.state_dict()` of
transformers >= 5 (q/k/v/o_proj and separate gate / up projections). Keys follow `prefix`
(default `""`; e.g. `"dinov2."` inside `Dinov2ForImageClassification`, whose `classifier.*`
must then be ignored):

  HF key (saved layout) [HF shape]            ours (shape; L stacked first)  transform
  embeddings.cls_token [1,1,D]                cls_token (D)                  lead2
  embeddings.mask_token [1,D]                 mask_token (D)                 lead1
  embeddings.patch_embeddings.projection.weight [D,C,p,p]
                                              patch_embed/kernel (p,p,C,D)   patch
  embeddings.patch_embeddings.projection.bias patch_embed/bias (D)           copy
  embeddings.position_embeddings [1,1+G*G,D]  pos_embedding (1+G*G,D)        lead1
  encoder.layer.{i}. + (our leaves under encoder/layers/):
    norm{1,2}.{weight,bias} [D]               ln{1,2}/{scale,bias} (L,D)     copy
    attention.attention.{query,key,value}.weight [N*H,D]
                                              {q,k,v}/kernel (L,D,N,H)       heads_in
    attention.attention.{query,key,value}.bias {q,k,v}/bias (L,N,H)          heads_bias
    attention.output.dense.weight [D,N*H]     o/kernel (L,N,H,D)             heads_out
    attention.output.dense.bias [D]           o/bias (L,D)                   copy
    layer_scale{1,2}.lambda1 [D]              ls{1,2} (L,D)                  copy
    MLP:    mlp.fc{1,2}.{weight,bias}         fc{1,2}/{kernel,bias}          linear, copy
    SwiGLU: mlp.weights_in.weight [2M,D]      gate/kernel, up/kernel (L,D,M) linear of chunk 0, 1
            mlp.weights_in.bias [2M]          gate/bias, up/bias (L,M)       chunk 0, 1
            mlp.weights_out.{weight,bias}     down/{kernel,bias}             linear, copy
  layernorm.{weight,bias} [D]                 post_ln/{scale,bias} (D)       copy

Module layout: `attention.{q,k,v,o}_proj.*` for the attention and `mlp.{gate,up,down}_proj.*`
for SwiGLU (`gate_proj` = the first half of `weights_in`, as HF's `Chunk(dim=0)`).

Strict as `vit_keys.py`: unmapped, missing or duplicate keys and shape mismatches raise
ValueError naming the key; `mask_token` is kept (with `use_mask_token`), `layernorm.*` must be
ignored explicitly when `post_ln=False`. Arrays keep their dtype.
"""

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from convert.vit_keys import Rule, block_rules, params_to_state, state_to_params, vision_config_dict
from longvid_jax.models import dinov2
from longvid_jax.models.dinov2 import Dinov2Config

_ATTN = {"ln1": "norm1", "ln2": "norm2", "fc1": "mlp.fc1", "fc2": "mlp.fc2",
         "ls1": "layer_scale1", "ls2": "layer_scale2"}
NAMES: dict[str, dict[str, Any]] = {
    "saved": {**_ATTN, "q": "attention.attention.query", "k": "attention.attention.key",
              "v": "attention.attention.value", "o": "attention.output.dense",
              "gate": ("mlp.weights_in", (0, 2)), "up": ("mlp.weights_in", (1, 2)),
              "down": "mlp.weights_out"},
    "module": {**_ATTN, "q": "attention.q_proj", "k": "attention.k_proj",
               "v": "attention.v_proj", "o": "attention.o_proj", "gate": "mlp.gate_proj",
               "up": "mlp.up_proj", "down": "mlp.down_proj"},
}

# `transformers` `Dinov2Config` defaults (for keys a config.json leaves out).
DINOV2_DEFAULTS: dict[str, Any] = dict(
    hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4,
    hidden_act="gelu", layer_norm_eps=1e-6, image_size=224, patch_size=14, num_channels=3,
    qkv_bias=True, use_swiglu_ffn=False, use_mask_token=True)


def rules(cfg: Dinov2Config, layout: str = "saved") -> list[Rule]:
    """The DINOv2 key table for `cfg` in `layout` ("saved" or "module").

    Raises:
      ValueError: for an unknown layout.
    """
    if layout not in NAMES:
        raise ValueError(f"unknown layout {layout!r}; known: {sorted(NAMES)}")
    d, p, c, g = cfg.width, cfg.patch_size, cfg.num_channels, cfg.grid
    table = [
        Rule("embeddings.cls_token", ("cls_token",), "lead2", (d,)),
        *([Rule("embeddings.mask_token", ("mask_token",), "lead1", (d,))]
          if cfg.use_mask_token else []),
        Rule("embeddings.patch_embeddings.projection.weight", ("patch_embed", "kernel"), "patch",
             (p, p, c, d)),
        Rule("embeddings.patch_embeddings.projection.bias", ("patch_embed", "bias"), "copy",
             (d,)),
        Rule("embeddings.position_embeddings", ("pos_embedding",), "lead1", (1 + g * g, d)),
    ]
    table += block_rules(hf_layer="encoder.layer.{}.", names=NAMES[layout], width=d,
                         num_heads=cfg.num_heads, mlp_dim=cfg.mlp_dim, k_bias=True,
                         qkv_bias=cfg.qkv_bias, ffn=cfg.ffn, layer_scale=True)
    if cfg.post_ln:
        table += [Rule("layernorm.weight", ("post_ln", "scale"), "copy", (d,)),
                  Rule("layernorm.bias", ("post_ln", "bias"), "copy", (d,))]
    return table


def hf_to_params(state: Mapping[str, Any] | Iterable[tuple[str, Any]], cfg: Dinov2Config, *,
                 prefix: str = "", ignore: tuple[str, ...] = (), layout: str = "saved") -> dict:
    """HF DINOv2 state dict -> `Dinov2(cfg)` params (numpy, source dtypes).

    Args:
      state: key -> tensor (numpy / torch / jax), or (key, tensor) pairs.
      cfg: the tower's config; `cfg.num_layers_run` layers, `layernorm` iff `cfg.post_ln`.
      prefix: key prefix of the model (see the module docstring).
      ignore: full-key prefixes to skip explicitly (each must match some key).
      layout: `"saved"` (checkpoint files) or `"module"` (transformers 5 `state_dict()`).

    Raises:
      ValueError: see `convert.vit_keys.state_to_params`.
    """
    return state_to_params(state, rules(cfg, layout), prefix=prefix, ignore=tuple(ignore),
                           num_layers=cfg.num_layers_run)


def params_to_hf(params: Mapping[str, Any], cfg: Dinov2Config, *, prefix: str = "",
                 layout: str = "saved") -> dict[str, np.ndarray]:
    """`Dinov2(cfg)` params -> HF DINOv2 keys (numpy); the inverse of `hf_to_params`.

    The SwiGLU `weights_in` of the saved layout is rebuilt as `concat(gate, up)` along axis 0.

    Raises:
      ValueError: see `convert.vit_keys.params_to_state`.
    """
    return params_to_state(params, rules(cfg, layout), prefix=prefix,
                           num_layers=cfg.num_layers_run)


def config_from_hf(hf_config: Mapping[str, Any], **overrides: Any) -> Dinov2Config:
    """`Dinov2Config` from a `transformers` `Dinov2Config` dict (config.json).

    Missing fields take the HF defaults. `mlp_dim` follows HF's rule (`dinov2.dinov2_mlp_dim`).
    Training-only fields (`drop_path_rate`, dropouts, `layerscale_value`, an init value) and the
    backbone fields (`out_features`, `apply_layernorm`, ...) are not read.

    Args:
      hf_config: the config dict (`PretrainedConfig.to_dict()` or config.json).
      **overrides: further `Dinov2Config` fields (keep_cls, dtype, ...).

    Raises:
      ValueError: another model type (`dinov2_with_registers` included: register tokens are
        not modelled), a non-square image / patch size, or unknown overrides.
    """
    c, _ = vision_config_dict(hf_config, vision_type="dinov2", defaults=DINOV2_DEFAULTS)
    swiglu = bool(c["use_swiglu_ffn"])
    fields = dict(
        image_size=c["image_size"], patch_size=c["patch_size"], width=c["hidden_size"],
        depth=c["num_hidden_layers"], num_heads=c["num_attention_heads"],
        mlp_dim=dinov2.dinov2_mlp_dim(c["hidden_size"], c["mlp_ratio"], swiglu),
        ffn="swiglu" if swiglu else "mlp", act=c["hidden_act"], ln_eps=c["layer_norm_eps"],
        qkv_bias=bool(c["qkv_bias"]), num_channels=c["num_channels"],
        use_mask_token=bool(c["use_mask_token"]))
    return dinov2.make_config(**{**fields, **overrides})
