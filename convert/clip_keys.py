"""CLIP vision: HF `CLIPVisionModel` / `CLIPVisionModelWithProjection` state dict <->
`longvid_jax.models.clip.ClipVision` params.

Key prefixes. `prefix` is the vision transformer's: `""` for `CLIPVisionModel` as
`save_pretrained` writes it (transformers 5), `"vision_model."` for
`CLIPVisionModelWithProjection` and for the full `CLIPModel` checkpoints (`openai/clip-vit-*`),
`"model.vision_tower.vision_tower.vision_model."` in LLaVA / LongVA checkpoints. Its default
follows `cfg.projection_dim`: `"vision_model."` with a projection, `""` without. The projection
is the separate key `projection_key` (`"visual_projection.weight"`). From a full `CLIPModel`
checkpoint the text tower must be ignored explicitly: `ignore=CLIP_TEXT_KEYS` (plus
`"visual_projection."` when the config has no projection).

  HF key (after prefix) [HF shape]           ours (shape; L stacked first)   transform
  embeddings.class_embedding [D]             cls_token (D)                   copy
  embeddings.patch_embedding.weight [D,C,p,p] patch_embed/kernel (p,p,C,D)   patch
  embeddings.position_embedding.weight [1+G*G,D] pos_embedding (1+G*G,D)     copy
  pre_layrnorm.{weight,bias} [D]             pre_ln/{scale,bias} (D)         copy
  encoder.layers.{i}. + (our leaves under encoder/layers/; as SigLIP, see vit_keys.py):
    layer_norm{1,2}, self_attn.{q,k,v,out}_proj, mlp.fc{1,2}
  post_layernorm.{weight,bias} [D]           post_ln/{scale,bias} (D)        copy
  visual_projection.weight [j,D] (no prefix) projection/kernel (D,j)         linear

Strict as `vit_keys.py` (unmapped, missing, duplicate keys and shape mismatches raise
ValueError naming the key); with `drop_last_layers` the dropped layers and `post_layernorm`
must be ignored explicitly (LongVA: `ignore=(P + "encoder.layers.23.", P + "post_layernorm.")`).
Arrays keep their dtype.
"""

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from convert.vit_keys import Rule, block_rules, params_to_state, state_to_params, vision_config_dict
from longvid_jax.models import clip
from longvid_jax.models.clip import ClipVisionConfig

_NAMES = {"ln1": "layer_norm1", "ln2": "layer_norm2", "q": "self_attn.q_proj",
          "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.out_proj",
          "fc1": "mlp.fc1", "fc2": "mlp.fc2"}

PROJECTION_KEY = "visual_projection.weight"
# The text tower of a full `CLIPModel` checkpoint.
CLIP_TEXT_KEYS = ("text_model.", "text_projection.", "logit_scale")

# `transformers` `CLIPVisionConfig` / `CLIPConfig` defaults (for keys a config.json leaves out).
CLIP_VISION_DEFAULTS: dict[str, Any] = dict(
    hidden_size=768, intermediate_size=3072, projection_dim=512, num_hidden_layers=12,
    num_attention_heads=12, num_channels=3, image_size=224, patch_size=32,
    hidden_act="quick_gelu", layer_norm_eps=1e-5)
CLIP_PROJECTION_DIM = 512


def default_prefix(cfg: ClipVisionConfig) -> str:
    """`"vision_model."` with a projection (`CLIPVisionModelWithProjection`), else `""`."""
    return "vision_model." if cfg.projection_dim is not None else ""


def rules(cfg: ClipVisionConfig, prefix: str | None = None,
          projection_key: str = PROJECTION_KEY) -> list[Rule]:
    """The CLIP vision key table for `cfg`, full keys (`prefix` applied; see the docstring)."""
    prefix = default_prefix(cfg) if prefix is None else prefix
    d, p, c, g = cfg.width, cfg.patch_size, cfg.num_channels, cfg.grid
    table = [
        Rule("embeddings.class_embedding", ("cls_token",), "copy", (d,)),
        Rule("embeddings.patch_embedding.weight", ("patch_embed", "kernel"), "patch",
             (p, p, c, d)),
        Rule("embeddings.position_embedding.weight", ("pos_embedding",), "copy",
             (1 + g * g, d)),
        Rule("pre_layrnorm.weight", ("pre_ln", "scale"), "copy", (d,)),
        Rule("pre_layrnorm.bias", ("pre_ln", "bias"), "copy", (d,)),
    ]
    table += block_rules(hf_layer="encoder.layers.{}.", names=_NAMES, width=d,
                         num_heads=cfg.num_heads, mlp_dim=cfg.mlp_dim, k_bias=True)
    if cfg.post_ln:
        table += [Rule("post_layernorm.weight", ("post_ln", "scale"), "copy", (d,)),
                  Rule("post_layernorm.bias", ("post_ln", "bias"), "copy", (d,))]
    table = [Rule(prefix + r.hf, r.path, r.transform, r.shape, r.part) for r in table]
    if cfg.projection_dim is not None:
        table.append(Rule(projection_key, ("projection", "kernel"), "linear",
                          (d, cfg.projection_dim)))
    return table


def hf_to_params(state: Mapping[str, Any] | Iterable[tuple[str, Any]], cfg: ClipVisionConfig,
                 *, prefix: str | None = None, projection_key: str = PROJECTION_KEY,
                 ignore: tuple[str, ...] = ()) -> dict:
    """HF CLIP vision state dict -> `ClipVision(cfg)` params (numpy, source dtypes).

    Args:
      state: key -> tensor (numpy / torch / jax), or (key, tensor) pairs.
      cfg: the tower's config: `cfg.num_layers_run` layers, `post_layernorm` iff `cfg.post_ln`,
        the projection iff `cfg.projection_dim`.
      prefix: key prefix of the vision transformer; None for `default_prefix(cfg)`.
      projection_key: the full key of the projection weight.
      ignore: full-key prefixes to skip explicitly (each must match some key).

    Raises:
      ValueError: see `convert.vit_keys.state_to_params`.
    """
    return state_to_params(state, rules(cfg, prefix, projection_key), prefix="",
                           ignore=tuple(ignore), num_layers=cfg.num_layers_run)


def params_to_hf(params: Mapping[str, Any], cfg: ClipVisionConfig, *, prefix: str | None = None,
                 projection_key: str = PROJECTION_KEY) -> dict[str, np.ndarray]:
    """`ClipVision(cfg)` params -> HF CLIP vision keys (numpy); the inverse of `hf_to_params`.

    With the default prefix the keys are those `save_pretrained` writes for
    `CLIPVisionModelWithProjection` (projection) or `CLIPVisionModel` (none).

    Raises:
      ValueError: see `convert.vit_keys.params_to_state`.
    """
    return params_to_state(params, rules(cfg, prefix, projection_key), prefix="",
                           num_layers=cfg.num_layers_run)


def config_from_hf(hf_config: Mapping[str, Any], *, with_projection: bool | None = None,
                   **overrides: Any) -> ClipVisionConfig:
    """`ClipVisionConfig` from a `transformers` CLIP config dict (config.json).

    Accepts a `CLIPVisionConfig` dict (model_type `clip_vision_model`) or a full `CLIPConfig`
    dict (model_type `clip`) holding `"vision_config"`; missing fields take the HF defaults.

    Args:
      hf_config: the config dict (`PretrainedConfig.to_dict()` or config.json).
      with_projection: build `visual_projection`. None infers it: True for a full `CLIPConfig`
        (`CLIPModel` has one; its width is the top-level `projection_dim`) and for a vision
        config whose `architectures` name `CLIPVisionModelWithProjection` (width: its
        `projection_dim`); False otherwise.
      **overrides: further `ClipVisionConfig` fields. LongVA (penultimate layer, patch
        tokens): `with_projection=False, post_ln=False, drop_last_layers=1`.

    Raises:
      ValueError: another model type, a non-square image / patch size, or unknown or
        inconsistent overrides.
    """
    c, outer = vision_config_dict(hf_config, full_type="clip", vision_type="clip_vision_model",
                                  defaults=CLIP_VISION_DEFAULTS)
    full = "vision_config" in outer
    if with_projection is None:
        with_projection = full or "CLIPVisionModelWithProjection" in (
            outer.get("architectures") or ())
    if full:
        projection_dim = outer.get("projection_dim") or CLIP_PROJECTION_DIM
    else:
        projection_dim = c["projection_dim"]
    fields = dict(
        image_size=c["image_size"], patch_size=c["patch_size"], width=c["hidden_size"],
        depth=c["num_hidden_layers"], num_heads=c["num_attention_heads"],
        mlp_dim=c["intermediate_size"], act=c["hidden_act"], ln_eps=c["layer_norm_eps"],
        num_channels=c["num_channels"], projection_dim=projection_dim if with_projection else None)
    return clip.make_config(**{**fields, **overrides})
