"""EVA ViT-g/14 (TimeChat's image encoder, from BLIP-2 / LAVIS) followed by `ln_vision`.

Follows TimeChat `timechat/models/eva_vit.py` `VisionTransformer` as built by
`create_eva_vit_g` (a copy of LAVIS `lavis/models/eva_vit.py`), and `Blip2Base` `ln_vision`
(`timechat/models/blip2.py`, a LayerNorm computed in float32): a patch convolution with bias,
a class token, absolute position embeddings, pre-LN blocks (`vit.EncoderBlock` with
`k_bias=False`: the fused `qkv` Linear has no bias and `cat(q_bias, zeros, v_bias)` is added,
so k has none; exact GELU; LayerNorm eps 1e-6; MLP hidden `int(width * 4.3637)`, 6144 for
ViT-g), **no** final norm, then `ln_vision` (eps 1e-5). No relative position bias, no
LayerScale (`init_values=None`), no mean pooling.

TimeChat (ORIGINALS.md section 4) feeds all 257 tokens of a 224 px frame (class token included)
to the frame Q-Former: `make_config("g_14_224")` with `keep_cls=True`. The original asserts the
input is exactly `img_size`; here other sizes resize the position grid (bicubic by output size,
float32), which is what LAVIS `interpolate_pos_embed` does to the checkpoint when `img_size`
differs (e.g. BLIP-2 at 364 px). BLIP-2 (Li et al. 2023, section 3.3) removes the last layer of
EVA-CLIP ViT-g: `depth=39` is what LAVIS builds; see `convert/eva_keys.py` for the keys.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from longvid_jax.models.layers import LayerNorm
from longvid_jax.models.vit import (
    EncoderStack,
    TowerConfig,
    cls_and_positions,
    config_from_variant,
    patch_embed,
)

Dtype = Any

EVA_MLP_RATIO = 4.3637


@dataclasses.dataclass(frozen=True)
class EvaConfig(TowerConfig):
    """Sizes and options of an EVA ViT (+ `ln_vision`).

    Attributes:
      image_size: side of the position-embedding grid in pixels (224: 16 x 16).
      patch_size: patch side p in pixels (14).
      width: model width D (1408).
      depth: layers built by the original (39), including dropped ones.
      num_heads: attention heads N (16; head dim 88).
      mlp_dim: MLP hidden size M (`int(1408 * 4.3637)` = 6144).
      act: MLP activation ("gelu": `nn.GELU`, exact).
      ln_eps: block LayerNorm epsilon (1e-6).
      ln_vision: apply `ln_vision` after the ViT (BLIP-2 / TimeChat).
      ln_vision_eps: its epsilon (1e-5, `nn.LayerNorm` default).
      num_channels: input channels C (3).
      keep_cls: keep the class token in the output tokens (TimeChat keeps it).
      drop_last_layers: layers at the end that are not built nor run.
      pos_interp: `"bicubic"` (as LAVIS `interpolate_pos_embed`) or `"bilinear"`.
      attention_impl: `dot_product_attention` backend (`"xla"` or `"cudnn"`).
      remat: rematerialise each layer in the backward pass.
      dtype: compute dtype (the original runs fp16 weights).
      param_dtype: storage dtype of the weights.
    """

    image_size: int
    patch_size: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    act: str = "gelu"
    ln_eps: float = 1e-6
    ln_vision: bool = True
    ln_vision_eps: float = 1e-5
    num_channels: int = 3
    keep_cls: bool = True
    drop_last_layers: int = 0
    pos_interp: str = "bicubic"
    attention_impl: str = "xla"
    remat: bool = False
    dtype: Dtype = "float32"
    param_dtype: Dtype = "float32"

    def __post_init__(self):
        self.check_tower()


VARIANTS: dict[str, dict[str, Any]] = {
    # create_eva_vit_g(img_size=224): 1408 // 88 = 16 heads.
    "g_14_224": dict(image_size=224, patch_size=14, width=1408, depth=39, num_heads=16,
                     mlp_dim=int(1408 * EVA_MLP_RATIO)),
    # The sizes of the timechat_eva_vit fixture.
    "tiny": dict(image_size=28, patch_size=14, width=32, depth=2, num_heads=4,
                 mlp_dim=int(32 * EVA_MLP_RATIO)),
}


def make_config(variant: str | None = None, **overrides) -> EvaConfig:
    """Builds an `EvaConfig` from a named variant plus field overrides.

    Raises:
      ValueError: for an unknown variant or field, or an inconsistent config.
    """
    return config_from_variant(EvaConfig, VARIANTS, variant, overrides)


def from_dict(d: dict[str, Any]) -> EvaConfig:
    """`make_config(**d)`; `d` may hold a `variant` key."""
    return make_config(**dict(d))


class EvaViT(nn.Module):
    """EVA ViT-g and `ln_vision` (TimeChat `visual_encoder` + `ln_vision`).

    Parameters: `patch_embed` kernel (p, p, C, D), bias (D,); `cls_token` (D,);
    `pos_embedding` (1 + grid**2, D), row 0 the class token's; `encoder/layers/*` (see
    `vit.EncoderStack`; k without bias); `ln_vision` (scale, bias) when `config.ln_vision`.
    """

    config: EvaConfig

    @nn.compact
    def __call__(self, images: Float[Array, "B Hpx Wpx C"], *, return_hidden_states: bool = False
                 ) -> tuple[Float[Array, "B T D"], dict[str, jax.Array]]:
        """Encodes normalised frames.

        Args:
          images: float[B, Hpx, Wpx, C], channels-last, normalised with the CLIP mean / std
            (TimeChat's processor). The patch grid is (Hpx // p, Wpx // p).
          return_hidden_states: also return every layer's output in aux.

        Returns:
          tokens: [B, 1 + P, D] in `config.dtype`, class token first (P = gh * gw row-major;
            [B, P, D] without it unless `config.keep_cls`), after `ln_vision` if
            `config.ln_vision` (TimeChat's `ln_vision(visual_encoder(image))`).
          aux: `"encoder_output"`: [B, 1 + P, D] the ViT's output (the original
            `VisionTransformer.forward`); with `return_hidden_states`, `"hidden_states"`:
            [L + 1, B, 1 + P, D], embeddings at 0 and block i's output at i (the original
            `get_intermediate_layers` are entries 1..L).

        Raises:
          ValueError: for a wrong channel count or an image smaller than a patch.
        """
        cfg = self.config
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        x, size = patch_embed(images, patch_size=cfg.patch_size, width=cfg.width,
                              num_channels=cfg.num_channels, bias=True, dtype=dtype,
                              param_dtype=pdtype)
        x = cls_and_positions(self, x, size, grid=cfg.grid, method=cfg.pos_interp, dtype=dtype,
                              param_dtype=pdtype)
        x0 = x
        x, hidden = EncoderStack(
            num_layers=cfg.num_layers_run, width=cfg.width, num_heads=cfg.num_heads,
            mlp_dim=cfg.mlp_dim, act=cfg.act, ln_eps=cfg.ln_eps, k_bias=False,
            attention_impl=cfg.attention_impl, remat=cfg.remat, collect=return_hidden_states,
            dtype=dtype, param_dtype=pdtype, name="encoder")(x)
        aux = {"encoder_output": x}
        if return_hidden_states:
            aux["hidden_states"] = jnp.concatenate([x0[None], hidden], axis=0)
        if cfg.ln_vision:
            x = LayerNorm(eps=cfg.ln_vision_eps, param_dtype=pdtype, name="ln_vision")(x)
        return (x if cfg.keep_cls else x[:, 1:]), aux


Model = EvaViT
