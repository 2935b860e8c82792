"""EVA ViT-g (LAVIS / TimeChat key names) <-> `longvid_jax.models.eva.EvaViT` params.

There is no `transformers` class; the keys are those of TimeChat `eva_vit.py`
`VisionTransformer` and `Blip2Base.ln_vision`. In the TimeChat module / `timechat_7b.pth` /
the `timechat_eva_vit` fixture they are `visual_encoder.*` and `ln_vision.*` (the defaults of
`prefix` and `ln_vision_prefix`); in LAVIS `eva_vit_g.pth` the ViT keys have no prefix
(`prefix=""`) and there is no `ln_vision` (use `cfg.ln_vision=False`, or chain the two sources'
(key, tensor) pairs).

  key (after prefix) [shape]                 ours (shape; L stacked first)   transform
  cls_token [1,1,D]                          cls_token (D)                   lead2
  pos_embed [1,1+G*G,D]                      pos_embedding (1+G*G,D)         lead1
  patch_embed.proj.weight [D,C,p,p]          patch_embed/kernel (p,p,C,D)    patch
  patch_embed.proj.bias [D]                  patch_embed/bias (D)            copy
  blocks.{i}. + (our leaves under encoder/layers/):
    norm{1,2}.{weight,bias} [D]              ln{1,2}/{scale,bias} (L,D)      copy
    attn.qkv.weight [3*N*H,D]                {q,k,v}/kernel (L,D,N,H)        heads_in of chunk 0,1,2
    attn.q_bias, attn.v_bias [N*H]           {q,v}/bias (L,N,H)              heads_bias
    (k has no bias: the original adds zeros)
    attn.proj.weight [D,N*H], .bias [D]      o/kernel (L,N,H,D), o/bias      heads_out, copy
    mlp.fc{1,2}.{weight,bias}                fc{1,2}/{kernel,bias}           linear, copy
  ln_vision.{weight,bias} [D] (ln_vision_prefix)  ln_vision/{scale,bias} (D) copy

Strict as `vit_keys.py`: unmapped, missing or duplicate keys and shape mismatches raise
ValueError naming the key. The original loads `eva_vit_g.pth` with `strict=False` into 39
blocks (BLIP-2 drops EVA-CLIP's last layer); whatever that file holds beyond the table (e.g. a
40th block) must be passed in `ignore` here. Arrays keep their dtype (the released weights are
fp16 for Linear / Conv layers).
"""

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from convert.vit_keys import Rule, block_rules, params_to_state, state_to_params
from longvid_jax.models.eva import EvaConfig

DEFAULT_PREFIX = "visual_encoder."
DEFAULT_LN_VISION_PREFIX = "ln_vision."

_NAMES = {"ln1": "norm1", "ln2": "norm2", "q": ("attn.qkv", (0, 3)), "k": ("attn.qkv", (1, 3)),
          "v": ("attn.qkv", (2, 3)), "q.bias": "attn.q_bias", "v.bias": "attn.v_bias",
          "o": "attn.proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}


def rules(cfg: EvaConfig, prefix: str = DEFAULT_PREFIX,
          ln_vision_prefix: str = DEFAULT_LN_VISION_PREFIX) -> list[Rule]:
    """The EVA key table for `cfg`, full keys (both prefixes applied)."""
    d, p, c, g = cfg.width, cfg.patch_size, cfg.num_channels, cfg.grid
    table = [
        Rule("cls_token", ("cls_token",), "lead2", (d,)),
        Rule("pos_embed", ("pos_embedding",), "lead1", (1 + g * g, d)),
        Rule("patch_embed.proj.weight", ("patch_embed", "kernel"), "patch", (p, p, c, d)),
        Rule("patch_embed.proj.bias", ("patch_embed", "bias"), "copy", (d,)),
    ]
    table += block_rules(hf_layer="blocks.{}.", names=_NAMES, width=d, num_heads=cfg.num_heads,
                         mlp_dim=cfg.mlp_dim, k_bias=False)
    table = [Rule(prefix + r.hf, r.path, r.transform, r.shape, r.part) for r in table]
    if cfg.ln_vision:
        table += [Rule(ln_vision_prefix + "weight", ("ln_vision", "scale"), "copy", (d,)),
                  Rule(ln_vision_prefix + "bias", ("ln_vision", "bias"), "copy", (d,))]
    return table


def hf_to_params(state: Mapping[str, Any] | Iterable[tuple[str, Any]], cfg: EvaConfig, *,
                 prefix: str = DEFAULT_PREFIX, ln_vision_prefix: str = DEFAULT_LN_VISION_PREFIX,
                 ignore: tuple[str, ...] = ()) -> dict:
    """LAVIS / TimeChat EVA state dict -> `EvaViT(cfg)` params (numpy, source dtypes).

    Args:
      state: key -> tensor (numpy / torch / jax), or (key, tensor) pairs.
      cfg: the tower's config: `cfg.num_layers_run` blocks, `ln_vision` iff `cfg.ln_vision`.
      prefix: key prefix of the ViT (`"visual_encoder."`; `""` for `eva_vit_g.pth`).
      ln_vision_prefix: key prefix of `ln_vision` (`"ln_vision."`).
      ignore: full-key prefixes to skip explicitly (each must match some key), e.g. the
        Q-Former and LLM keys of a full TimeChat checkpoint.

    Raises:
      ValueError: see `convert.vit_keys.state_to_params`.
    """
    return state_to_params(state, rules(cfg, prefix, ln_vision_prefix), prefix="",
                           ignore=tuple(ignore), num_layers=cfg.num_layers_run)


def params_to_hf(params: Mapping[str, Any], cfg: EvaConfig, *, prefix: str = DEFAULT_PREFIX,
                 ln_vision_prefix: str = DEFAULT_LN_VISION_PREFIX) -> dict[str, np.ndarray]:
    """`EvaViT(cfg)` params -> LAVIS / TimeChat keys (numpy); the inverse of `hf_to_params`.

    `attn.qkv.weight` is rebuilt as `concat(q, k, v)` along axis 0.

    Raises:
      ValueError: see `convert.vit_keys.params_to_state`.
    """
    return params_to_state(params, rules(cfg, prefix, ln_vision_prefix), prefix="",
                           num_layers=cfg.num_layers_run)
