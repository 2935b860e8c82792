"""Connectors between encoders and the LLM: linear / MLP projectors and 2-D token pooling.

- `LinearProjector`: one `nn.Linear` with bias (TDC `audio_proj` / `query_proj` / `vision_proj`,
  TimeChat `llama_proj`, LongVALE projectors).
- `MLPProjector`: LLaVA `mlp2x_gelu` (`Linear(E->D) - GELU - Linear(D->D)`, checkpoint keys
  `mm_projector.0` / `mm_projector.2`), used by TPO, MMDuet and TDC (after the SVA).
- `pool_tokens_2d`: reduce a row-major grid of patch tokens (LLaVA-Video / LongVA `get_2dPool`,
  MMDuet pooling stride).

The Cambrian SVA connector of TDC (multi-tower local cross-attention, then `MLPProjector`) is in
`longvid_jax/models/sva.py`; TimeChat's sliding video Q-Former with `llama_proj` in
`longvid_jax/models/timechat.py`.

Weights are stored as `kernel[E, D]` (input axis first), i.e. the transpose of torch's
`Linear.weight[D, E]`; `convert/` does the transposition.
"""

import math
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from longvid_jax.models import EMBED, MLP, lora
from longvid_jax.models.layers import Dtype, activation, fan_in_init


class LinearProjector(nn.Module):
    """A single linear layer with bias, `y = x @ kernel + bias` (torch `nn.Linear`).

    Params: `kernel` float[E, D] with logical axes `kernel_axes`, `bias` float[D].

    Attributes:
      in_width: E, width of the input.
      out_width: D, width of the output.
      kernel_axes: logical names of the kernel axes; by default the output width is `embed`
        (the width of the model the projector feeds) and the input axis is replicated.
      use_bias: learn a bias (all the originals do).
      dtype: compute dtype (`None` keeps the input's).
      param_dtype: storage dtype.
    """

    in_width: int
    out_width: int
    kernel_axes: tuple[str | None, str | None] = (None, EMBED)
    use_bias: bool = True
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "*B E"]) -> Float[Array, "*B D"]:
        """Projects the last axis.

        Args:
          x: float[..., E].

        Returns:
          float[..., D] in `dtype` (or x's dtype).

        Raises:
          ValueError: if the last axis of x is not `in_width`.
        """
        if x.shape[-1] != self.in_width:
            raise ValueError(f"{self.name}: input width {x.shape[-1]} != in_width {self.in_width}")
        dtype = jnp.dtype(self.dtype) if self.dtype is not None else x.dtype
        kernel = self.param("kernel", nn.with_logical_partitioning(fan_in_init((0,)),
                                                                   self.kernel_axes),
                            (self.in_width, self.out_width), jnp.dtype(self.param_dtype))
        y = jnp.einsum("...E,ED->...D", x.astype(dtype), kernel.astype(dtype))
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                                   (self.kernel_axes[1],)),
                              (self.out_width,), jnp.dtype(self.param_dtype))
            y = y + bias.astype(dtype)
        delta = lora.einsum_delta(self, "...E,ED->...D", x, shape=(self.in_width, self.out_width),
                                  axes=self.kernel_axes, fan_in_axes=(0,), dtype=dtype,
                                  param_dtype=jnp.dtype(self.param_dtype))
        return y if delta is None else y + delta


class MLPProjector(nn.Module):
    """LLaVA `mlp2x_gelu`: `Linear(E->D) - act - Linear(D->D)`.

    Source: LLaVA `llava/model/multimodal_projector/builder.py` (`mlp2x_gelu`, an
    `nn.Sequential` whose Linear layers are indices 0 and 2). Params: `linear_0` (kernel [E, D],
    axes (None, mlp)) and `linear_2` (kernel [D, D], axes (mlp, embed)), matching checkpoint keys
    `mm_projector.0.*` and `mm_projector.2.*`.

    Attributes:
      in_width: E.
      out_width: D (the LLM width).
      act: activation name (`gelu` = exact erf GELU, as torch `nn.GELU()`).
      dtype, param_dtype: compute / storage dtypes.
    """

    in_width: int
    out_width: int
    act: str = "gelu"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "*B E"]) -> Float[Array, "*B D"]:
        """Maps float[..., E] to float[..., D]."""
        h = LinearProjector(self.in_width, self.out_width, kernel_axes=(None, MLP),
                            dtype=self.dtype, param_dtype=self.param_dtype, name="linear_0")(x)
        h = activation(self.act)(h)
        return LinearProjector(self.out_width, self.out_width, kernel_axes=(MLP, EMBED),
                               dtype=self.dtype, param_dtype=self.param_dtype,
                               name="linear_2")(h)


def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """Interpolation weights float32[out, in] of torch `F.interpolate(mode='bilinear')` on one axis.

    torch's rule with `align_corners=False` and no antialiasing: output index o samples the
    source coordinate `src = (o + 0.5) * in/out - 0.5`, clamped at 0; it mixes rows
    `i0 = floor(src)` and `i1 = min(i0 + 1, in - 1)` with weights `1 - (src - i0)` and
    `src - i0`. (Unlike `jax.image.resize`, which antialiases when downsampling.)
    """
    m = np.zeros((out_size, in_size), np.float64)
    scale = in_size / out_size
    for o in range(out_size):
        src = max((o + 0.5) * scale - 0.5, 0.0)
        i0 = min(int(math.floor(src)), in_size - 1)
        i1 = min(i0 + 1, in_size - 1)
        lam = src - i0
        m[o, i0] += 1.0 - lam
        m[o, i1] += lam
    return m.astype(np.float32)


def pool_tokens_2d(
    x: Float[Array, "B P D"],
    grid: tuple[int, int],
    out_grid: tuple[int, int],
    mode: Literal["average", "max", "bilinear"] = "average",
) -> Float[Array, "B P2 D"]:
    """Reduces a row-major grid of tokens (token p is at row p // w, column p % w).

    The rule (LLaVA-Video / LongVA `get_2dPool`, which calls torch `avg_pool2d`, `max_pool2d` or
    `F.interpolate(mode='bilinear')` on the `[B, D, h, w]` grid):
      - `average`: when `h % h2 == 0` and `w % w2 == 0`, exact average over non-overlapping
        `(h/h2) x (w/w2)` windows (torch `avg_pool2d(kernel=stride=h/h2)`); otherwise bilinear
        interpolation to `out_grid`, as LLaVA-Video does for non-divisible grids
        (`mm_spatial_pool_mode='bilinear'`, output `ceil(h/stride)`).
      - `max`: max over the same windows; the grid must divide.
      - `bilinear`: torch `F.interpolate(size=out_grid, mode='bilinear', align_corners=False)`
        without antialiasing, computed as two interpolation matrices (`bilinear_matrix`).
    Statistics are computed in float32 and cast back to x's dtype.

    Args:
      x: float[B, P, D] with P = h * w.
      grid: (h, w) of the input.
      out_grid: (h2, w2) of the output.
      mode: `average`, `max` or `bilinear`.

    Returns:
      float[B, h2 * w2, D], row-major.

    Raises:
      ValueError: if P != h * w, for an unknown mode, or for `max` with a grid that does not
        divide.
    """
    b, p, d = x.shape
    h, w = grid
    h2, w2 = out_grid
    if p != h * w:
        raise ValueError(f"{p} tokens do not form a {h}x{w} grid")
    if mode not in ("average", "max", "bilinear"):
        raise ValueError(f"unknown pooling mode {mode!r}")
    divisible = h % h2 == 0 and w % w2 == 0
    # Y, X: rows / columns of the input grid; U, W: rows / columns of the output grid.
    g = x.astype(jnp.float32).reshape(b, h, w, d)
    if mode in ("average", "max") and divisible:
        g = g.reshape(b, h2, h // h2, w2, w // w2, d)
        out = g.mean(axis=(2, 4)) if mode == "average" else g.max(axis=(2, 4))
    elif mode == "max":
        raise ValueError(f"max pooling needs a divisible grid, got {grid} -> {out_grid}")
    else:
        my = jnp.asarray(bilinear_matrix(h, h2))
        mx = jnp.asarray(bilinear_matrix(w, w2))
        out = jnp.einsum("BYXD,UY,WX->BUWD", g, my, mx, precision=jax.lax.Precision.HIGHEST)
    return out.reshape(b, h2 * w2, d).astype(x.dtype)
