"""CLIP vision tower (LongVA's CLIP-L/14-336 and LongVALE's CLIP-L/14).

Follows `transformers` `CLIPVisionModel` and `CLIPVisionModelWithProjection`
(models/clip/modeling_clip.py; Radford et al. 2021, "Learning Transferable Visual Models From
Natural Language Supervision", section 2.4): a patch convolution without bias, a class
embedding, learned position embeddings, `pre_layrnorm`, pre-LN blocks (`vit.EncoderBlock`,
quick_gelu for the OpenAI weights), then `post_layernorm` on the class token only (the pooled
output) and, with a projection, `visual_projection` (no bias) giving `image_embeds`.

Which output a system reads is config:

  reader    HF equivalent                                   config
  LongVA    hidden_states[-2][:, 1:] (penultimate layer,    drop_last_layers=1, post_ln=False,
            patch tokens; LLaVA `mm_vision_select_layer=-2`)  projection_dim=None
  LongVALE  image_embeds (CLIPVisionModelWithProjection)    "l14_224" (projection_dim=768):
                                                              aux["image_embeds"]

Position embeddings are resized (bicubic, in float32) when the input's grid differs from the
config's, as HF `interpolate_pos_encoding=True` (HF raises without that flag).

Local einsum letter (besides the alphabet of `longvid_jax.models`): `j` is the width of the
joint image-text embedding space (`projection_dim`).
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from longvid_jax.models import EMBED
from longvid_jax.models.layers import Einsum, LayerNorm
from longvid_jax.models.vit import (
    EncoderStack,
    TowerConfig,
    cls_and_positions,
    config_from_variant,
    patch_embed,
)

Dtype = Any


@dataclasses.dataclass(frozen=True)
class ClipVisionConfig(TowerConfig):
    """Sizes and options of a CLIP vision tower.

    Attributes:
      image_size: side of the position-embedding grid in pixels (336 or 224).
      patch_size: patch side p in pixels (14).
      width: model width D (ViT-L 1024).
      depth: layers in the checkpoint (24), including dropped ones.
      num_heads: attention heads N (16).
      mlp_dim: MLP hidden size M (4096).
      act: MLP activation (`hidden_act`: "quick_gelu" for OpenAI CLIP).
      ln_eps: LayerNorm epsilon (1e-5).
      num_channels: input channels C (3).
      post_ln: build `post_layernorm` and return the pooled (post-LN class token) output. It is
        the last layer's, so it requires `drop_last_layers == 0`.
      projection_dim: width of `visual_projection` (`image_embeds`, ViT-L/14: 768); None for
        none (`CLIPVisionModel`). Requires `post_ln`.
      keep_cls: keep the class token in the output tokens (LongVA drops it).
      drop_last_layers: layers at the end that are not built nor run (LongVA: 1).
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
    act: str = "quick_gelu"
    ln_eps: float = 1e-5
    num_channels: int = 3
    post_ln: bool = True
    projection_dim: int | None = None
    keep_cls: bool = False
    drop_last_layers: int = 0
    pos_interp: str = "bicubic"
    attention_impl: str = "xla"
    remat: bool = False
    dtype: Dtype = "float32"
    param_dtype: Dtype = "float32"

    def __post_init__(self):
        self.check_tower()
        if self.post_ln and self.drop_last_layers:
            raise ValueError("post_ln (the pooled output) belongs to the last layer; set "
                             "post_ln=False (and projection_dim=None) with drop_last_layers")
        if self.projection_dim is not None and not self.post_ln:
            raise ValueError("projection_dim needs post_ln: image_embeds project the pooled "
                             "output")


_L14 = dict(patch_size=14, width=1024, depth=24, num_heads=16, mlp_dim=4096, projection_dim=768)

VARIANTS: dict[str, dict[str, Any]] = {
    # openai/clip-vit-large-patch14-336 (LongVA) and openai/clip-vit-large-patch14 (LongVALE).
    "l14_336": dict(image_size=336, **_L14),
    "l14_224": dict(image_size=224, **_L14),
    "tiny": dict(image_size=32, patch_size=8, width=32, depth=2, num_heads=4, mlp_dim=64,
                 projection_dim=16),
}


def make_config(variant: str | None = None, **overrides) -> ClipVisionConfig:
    """Builds a `ClipVisionConfig` from a named variant plus field overrides.

    Raises:
      ValueError: for an unknown variant or field, or an inconsistent config.
    """
    return config_from_variant(ClipVisionConfig, VARIANTS, variant, overrides)


def from_dict(d: dict[str, Any]) -> ClipVisionConfig:
    """`make_config(**d)`; `d` may hold a `variant` key."""
    return make_config(**dict(d))


class ClipVision(nn.Module):
    """CLIP vision tower (`CLIPVisionModel`, or `CLIPVisionModelWithProjection` when
    `config.projection_dim`).

    Parameters: `patch_embed` kernel (p, p, C, D) (no bias); `cls_token` (D,) (HF
    `class_embedding`); `pos_embedding` (1 + grid**2, D), row 0 the class token's; `pre_ln`
    (scale, bias); `encoder/layers/*` (see `vit.EncoderStack`); `post_ln` when
    `config.post_ln`; `projection` kernel (D, j) [EMBED, None] when `config.projection_dim`.
    """

    config: ClipVisionConfig

    @nn.compact
    def __call__(self, images: Float[Array, "B Hpx Wpx C"], *, return_hidden_states: bool = False
                 ) -> tuple[Float[Array, "B T D"], dict[str, jax.Array]]:
        """Encodes normalised images.

        Args:
          images: float[B, Hpx, Wpx, C], channels-last, normalised with the CLIP mean / std.
            The patch grid is (Hpx // p, Wpx // p); leftover pixels are dropped.
          return_hidden_states: also return every layer's output in aux.

        Returns:
          tokens: [B, P, D] in `config.dtype`, the last run layer's output (HF
            `last_hidden_state` without its class token, or `hidden_states[-1 -
            drop_last_layers]`); [B, 1 + P, D] with the class token first when
            `config.keep_cls`.
          aux: `"encoder_output"`: [B, 1 + P, D] the same with the class token; with
            `config.post_ln`, `"pooled"`: [B, D] (HF `pooler_output`); with
            `config.projection_dim`, `"image_embeds"`: [B, j]; with `return_hidden_states`,
            `"hidden_states"`: [L + 1, B, 1 + P, D], the pre-LN'd embeddings at 0 and layer
            i's output at i (HF `hidden_states`).

        Raises:
          ValueError: for a wrong channel count or an image smaller than a patch.
        """
        cfg = self.config
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        d = cfg.width
        x, size = patch_embed(images, patch_size=cfg.patch_size, width=d,
                              num_channels=cfg.num_channels, bias=False, dtype=dtype,
                              param_dtype=pdtype)
        x = cls_and_positions(self, x, size, grid=cfg.grid, method=cfg.pos_interp, dtype=dtype,
                              param_dtype=pdtype)
        x = LayerNorm(eps=cfg.ln_eps, param_dtype=pdtype, name="pre_ln")(x)

        x0 = x
        x, hidden = EncoderStack(
            num_layers=cfg.num_layers_run, width=d, num_heads=cfg.num_heads, mlp_dim=cfg.mlp_dim,
            act=cfg.act, ln_eps=cfg.ln_eps, attention_impl=cfg.attention_impl, remat=cfg.remat,
            collect=return_hidden_states, dtype=dtype, param_dtype=pdtype, name="encoder")(x)
        aux = {"encoder_output": x}
        if return_hidden_states:
            aux["hidden_states"] = jnp.concatenate([x0[None], hidden], axis=0)
        if cfg.post_ln:
            pooled = LayerNorm(eps=cfg.ln_eps, param_dtype=pdtype, name="post_ln")(x[:, 0])
            aux["pooled"] = pooled
            if cfg.projection_dim is not None:
                aux["image_embeds"] = Einsum(
                    (d, cfg.projection_dim), (EMBED, None), dtype=dtype, param_dtype=pdtype,
                    name="projection")("BD,Dj->Bj", pooled)
        return (x if cfg.keep_cls else x[:, 1:]), aux


Model = ClipVision
