"""DINOv2 vision tower (TDC's second vision encoder, DINOv2-giant at 378 px).

Follows `transformers` `Dinov2Model` (models/dinov2/modeling_dinov2.py; Oquab et al. 2023,
"DINOv2: Learning Robust Visual Features without Supervision", section 4): a patch
convolution, a class token, learned position embeddings for the `image_size` grid (518 px / 14
= 37 x 37 for the released models) resized to the input's grid, pre-LN blocks with LayerScale
(`vit.EncoderBlock(layer_scale=True)`) whose FFN is an MLP (small / base / large) or SwiGLU
(giant), and a final LayerNorm over all tokens.

Position resizing follows `Dinov2Embeddings.interpolate_pos_encoding` of transformers 4.46 (the
version TDC pins) and 5.x, which agree: skipped when the grid equals the stored one, otherwise
bicubic by output size (`F.interpolate(size=(h // p, w // p), mode="bicubic",
align_corners=False)`, no antialiasing even when shrinking 37 -> 27, no `scale_factor` and no
+0.1 offset, the rule of transformers < 4.44 and of the original DINOv2 hub code), computed in
float32 and cast back to the parameter dtype.

What TDC reads: `last_hidden_state[:, 1:]` at 378 px, i.e. the post-LN patch tokens, 27 x 27 =
729 per frame: `make_config("giant_14")` (post_ln=True, keep_cls=False) on [B, 378, 378, 3].
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from longvid_jax.models import EMBED
from longvid_jax.models.layers import LayerNorm
from longvid_jax.models.vit import (
    FFN_TYPES,
    EncoderStack,
    TowerConfig,
    cls_and_positions,
    config_from_variant,
    patch_embed,
)

Dtype = Any


def dinov2_mlp_dim(width: int, mlp_ratio: float, swiglu: bool) -> int:
    """HF's FFN hidden size: `int(width * mlp_ratio)` for the MLP; for SwiGLU two thirds of
    it, rounded up to a multiple of 8 (`Dinov2SwiGLUFFN`: giant 1536 * 4 -> 4096)."""
    hidden = int(width * mlp_ratio)
    return (int(hidden * 2 / 3) + 7) // 8 * 8 if swiglu else hidden


@dataclasses.dataclass(frozen=True)
class Dinov2Config(TowerConfig):
    """Sizes and options of a DINOv2 tower.

    Attributes:
      image_size: side of the position-embedding grid in pixels (518: a 37 x 37 grid).
      patch_size: patch side p in pixels (14).
      width: model width D (giant 1536).
      depth: layers in the checkpoint (giant 40), including dropped ones.
      num_heads: attention heads N (giant 24).
      mlp_dim: FFN hidden size M (see `dinov2_mlp_dim`; giant SwiGLU 4096).
      ffn: `"mlp"` (fc1-act-fc2) or `"swiglu"` (HF `use_swiglu_ffn`).
      act: MLP activation (`hidden_act`, "gelu"); SwiGLU always uses SiLU.
      ln_eps: LayerNorm epsilon (1e-6).
      qkv_bias: q, k, v projections have biases (HF `qkv_bias`, True).
      num_channels: input channels C (3).
      use_mask_token: hold HF's `mask_token` (D,) (HF `use_mask_token`, True in the releases);
        used only when `mask` is passed.
      post_ln: apply the final LayerNorm (HF `layernorm`), as `last_hidden_state`.
      keep_cls: keep the class token in the output tokens (TDC drops it).
      drop_last_layers: layers at the end that are not built nor run.
      pos_interp: `"bicubic"` (HF) or `"bilinear"`; see `vit.interpolate_grid`.
      attention_impl: `dot_product_attention` backend (`"xla"` or `"cudnn"`).
      remat: rematerialise each layer in the backward pass.
      dtype: compute dtype.
      param_dtype: storage dtype of the weights.
    """

    image_size: int
    patch_size: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    ffn: str = "mlp"
    act: str = "gelu"
    ln_eps: float = 1e-6
    qkv_bias: bool = True
    num_channels: int = 3
    use_mask_token: bool = True
    post_ln: bool = True
    keep_cls: bool = False
    drop_last_layers: int = 0
    pos_interp: str = "bicubic"
    attention_impl: str = "xla"
    remat: bool = False
    dtype: Dtype = "float32"
    param_dtype: Dtype = "float32"

    def __post_init__(self):
        self.check_tower()
        if self.ffn not in FFN_TYPES:
            raise ValueError(f"unknown ffn {self.ffn!r}; known: {FFN_TYPES}")


VARIANTS: dict[str, dict[str, Any]] = {
    # facebook/dinov2-giant.
    "giant_14": dict(image_size=518, patch_size=14, width=1536, depth=40, num_heads=24,
                     mlp_dim=dinov2_mlp_dim(1536, 4, True), ffn="swiglu"),
    # SwiGLU like giant: int(2/3 * 128) = 85 -> 88.
    "tiny": dict(image_size=32, patch_size=8, width=32, depth=2, num_heads=4,
                 mlp_dim=dinov2_mlp_dim(32, 4, True), ffn="swiglu"),
}


def make_config(variant: str | None = None, **overrides) -> Dinov2Config:
    """Builds a `Dinov2Config` from a named variant plus field overrides.

    Raises:
      ValueError: for an unknown variant or field, or an inconsistent config.
    """
    return config_from_variant(Dinov2Config, VARIANTS, variant, overrides)


def from_dict(d: dict[str, Any]) -> Dinov2Config:
    """`make_config(**d)`; `d` may hold a `variant` key."""
    return make_config(**dict(d))


class Dinov2(nn.Module):
    """DINOv2 tower (`transformers` `Dinov2Model`, without the backbone / classifier heads).

    Parameters: `patch_embed` kernel (p, p, C, D), bias (D,); `cls_token` (D,);
    `mask_token` (D,) when `config.use_mask_token`; `pos_embedding` (1 + grid**2, D), row 0
    the class token's; `encoder/layers/*` (see `vit.EncoderStack`: q/k/v/o, ln1/ln2, ls1/ls2,
    fc1/fc2 or gate/up/down); `post_ln` (scale, bias) when `config.post_ln`.
    """

    config: Dinov2Config

    @nn.compact
    def __call__(self, images: Float[Array, "B Hpx Wpx C"], *,
                 mask: Bool[Array, "B P"] | None = None, return_hidden_states: bool = False
                 ) -> tuple[Float[Array, "B T D"], dict[str, jax.Array]]:
        """Encodes normalised images.

        Args:
          images: float[B, Hpx, Wpx, C], channels-last, normalised (ImageNet mean / std).
            The patch grid is (Hpx // p, Wpx // p); leftover pixels are dropped.
          mask: optional bool[B, P]: patches replaced by `mask_token` before the class token
            and positions are added (HF `bool_masked_pos`).
          return_hidden_states: also return every layer's output in aux.

        Returns:
          tokens: [B, P, D] in `config.dtype` (P = gh * gw row-major; [B, 1 + P, D] with the
            class token first when `config.keep_cls`); post-LN if `config.post_ln`.
          aux: `"cls"`: [B, D] the class token of the output (post-LN: HF `pooler_output`);
            `"encoder_output"`: [B, 1 + P, D] the last run layer's output before the final
            LN; with `return_hidden_states`, `"hidden_states"`: [L + 1, B, 1 + P, D],
            embeddings at 0 and layer i's output at i (HF `hidden_states`).

        Raises:
          ValueError: for a wrong channel count, an image smaller than a patch, a mask of the
            wrong shape, or a mask without `config.use_mask_token`.
        """
        cfg = self.config
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        d = cfg.width
        x, size = patch_embed(images, patch_size=cfg.patch_size, width=d,
                              num_channels=cfg.num_channels, bias=True, dtype=dtype,
                              param_dtype=pdtype)
        if cfg.use_mask_token:
            mask_token = self.param("mask_token", nn.with_logical_partitioning(
                nn.initializers.zeros, (EMBED,)), (d,), pdtype)
        if mask is not None:
            if not cfg.use_mask_token:
                raise ValueError("mask given but config.use_mask_token is False")
            if mask.shape != x.shape[:2]:
                raise ValueError(f"mask {mask.shape} does not match the patches {x.shape[:2]}")
            x = jnp.where(mask[..., None], mask_token.astype(dtype), x)
        x = cls_and_positions(self, x, size, grid=cfg.grid, method=cfg.pos_interp, dtype=dtype,
                              param_dtype=pdtype)

        x0 = x
        x, hidden = EncoderStack(
            num_layers=cfg.num_layers_run, width=d, num_heads=cfg.num_heads, mlp_dim=cfg.mlp_dim,
            act=cfg.act, ln_eps=cfg.ln_eps, qkv_bias=cfg.qkv_bias, layer_scale=True,
            ffn=cfg.ffn, attention_impl=cfg.attention_impl, remat=cfg.remat,
            collect=return_hidden_states, dtype=dtype, param_dtype=pdtype, name="encoder")(x)
        aux = {"encoder_output": x}
        if return_hidden_states:
            aux["hidden_states"] = jnp.concatenate([x0[None], hidden], axis=0)
        if cfg.post_ln:
            x = LayerNorm(eps=cfg.ln_eps, param_dtype=pdtype, name="post_ln")(x)
        aux["cls"] = x[:, 0]
        return (x if cfg.keep_cls else x[:, 1:]), aux


Model = Dinov2
