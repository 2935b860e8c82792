"""Cambrian Spatial Vision Aggregator (SVA) connector, as used by TDC.

Source: Hoar012/TDC-Video `tdc/vision_sampler.py` (`VisionTokenSampler(layer_type='joint')`,
`VisionCrossAttentionLayer`, `MultiKVCrossAttention`, `MLP`) and the SVA path of
`tdc/cambrian_arch.py` (`CambrianMetaModel.__init__`, `rearrange_vision_tower_features_inference`,
`unmask_attention_mask`, `unpad_image`, `prepare_inputs_labels_for_multimodal` L998-1293), on the
non-XLA path with `input_mix_res=False`, no high-res branch and no `frame_pos` (the release).

Per frame, with towers i = 0 .. n-1 (SigLIP, DINOv2) on square grids g_i and a G x G query grid:

  a_i       = LN(Linear(GELU(Linear(tower_i))))                      (`mm_projector_aux_i`)
  context   = mean over tokens of a_0 (padding included)
  kv_i      = a_i regrouped into G*G local windows of r_i x r_i tokens (r_i = g_i / G), kv order
              r_row * r_i + r_col; padded rows / columns of a non-square frame are masked out of
              the keys, and a fully masked window is reset to all True
  x         = vision_query broadcast to the G*G positions
  per layer x = x + proj_out(LN(x_in + o(SDPA(LN+Linear q(x_in), per tower LN+Linear k/v of
              (kv_i + pos_embed_i)))))   with x_in = proj_in([x, proj_context(context)])
  tokens    = mm_projector(x)                                        (`mlp2x_gelu`) [G*G, D_llm]
  layout    = `unpad_image` crops the padded rows / columns of the G x G grid, then
              `image_newline` ends every row (`newline_layout`).

The `(H, W)` quirk: TDC's video pipeline stores `image_sizes` as (height, width), but
`unmask_attention_mask` and `unpad_image` unpack them as (width, height). With
`swap_image_size_hw=True` (required to reproduce released weights' behaviour) we read the pair as
the original does; with False it is read as the (height, width) it is. A landscape 16:9 video is
therefore treated as portrait by the original: its columns are cropped.

Fixed shapes: `SVAConnector` returns all G*G tokens of every frame plus each frame's valid grid
(rows, cols); `newline_layout` builds the newline-terminated sequence (rows * (cols + 1) valid
tokens, a prefix) in a buffer of G * (G + 1) tokens with a validity mask.

Parameter tree (original key under `model.` in brackets, see `convert/sva_keys.py`):
  aux_proj_{i}/{linear_0, linear_2}/{kernel, bias}, /norm   (mm_projector_aux_{i}.{0,2,3})
  vision_query [1, D]                                        (vision_query)
  vision_sampler/layer_{l}/proj_context/kernel [D, D], proj_in/kernel [2D, D],
      pos_embed_{i} [r_i^2, D] (only when r_i > 1), norm,
      proj_out/{linear_1, linear_2}/kernel [D, D],
      cross_attn/{q_norm, q [D, N, H], k_norm_{i}, k_{i}, v_norm_{i}, v_{i}, o [N, H, D]}
                                                      (vision_sampler_0.layers.{l}.*)
  mm_projector/{linear_0, linear_2}                          (mm_projector.{0,2})
  image_newline [D_llm]                                      (image_newline)
"""

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from longvid_jax.models import ACT_BTD, EMBED, HEAD_DIM, HEADS, MLP
from longvid_jax.models.attention import dot_product_attention
from longvid_jax.models.connectors import LinearProjector, MLPProjector, pool_tokens_2d
from longvid_jax.models.layers import Dtype, Einsum, LayerNorm, activation


@dataclasses.dataclass(frozen=True)
class SVAConfig:
    """Sizes of the SVA connector (defaults: TDC-7B, `connector_depth=3`, 144 queries).

    Attributes:
      tower_widths: E_i, output width of each vision tower (SigLIP-so400m 1152, DINOv2-g 1536).
      tower_grids: g_i, side of each tower's square token grid (`mm_vision_tower_aux_token_len_
        list` = g_i^2; TDC 24 x 24 after interpolation).
      query_grid: G, side of the query grid (`query_num_list[0]` = G^2); every g_i must be a
        multiple of G.
      width: D, `vision_hidden_size`.
      num_heads: N heads of the cross-attention (hard-coded 16 in the original).
      depth: layers (`connector_depth`).
      llm_width: D_llm, output width of `mm_projector` (Qwen2-7B 3584, Llama-3.2-3B 3072).
      final_grid: side of the output grid (`image_token_len` = side^2); None = `query_grid`.
        When different, the sampler output is resized bilinearly (torch `F.interpolate`,
        align_corners=False) before `mm_projector`, as the original's high-res branch.
      ln_eps: epsilon of every LayerNorm (torch default 1e-5).
      act: activation of the MLPs (`gelu` = exact).
      swap_image_size_hw: read `image_sizes` pairs as (width, height) like the original's
        `unmask_attention_mask` / `unpad_image` (True reproduces TDC; see the module docstring).
      dtype, param_dtype: compute / storage dtypes.
    """

    tower_widths: tuple[int, ...] = (1152, 1536)
    tower_grids: tuple[int, ...] = (24, 24)
    query_grid: int = 12
    width: int = 1024
    num_heads: int = 16
    depth: int = 3
    llm_width: int = 3584
    final_grid: int | None = None
    ln_eps: float = 1e-5
    act: str = "gelu"
    swap_image_size_hw: bool = True
    dtype: Dtype = "float32"
    param_dtype: Dtype = "float32"

    def __post_init__(self):
        object.__setattr__(self, "tower_widths", tuple(int(w) for w in self.tower_widths))
        object.__setattr__(self, "tower_grids", tuple(int(g) for g in self.tower_grids))
        if not self.tower_widths or len(self.tower_widths) != len(self.tower_grids):
            raise ValueError(f"tower_widths {self.tower_widths} and tower_grids "
                             f"{self.tower_grids} must be non-empty and of equal length")
        for g in self.tower_grids:
            if g % self.query_grid:
                raise ValueError(f"tower grid {g} is not a multiple of query_grid "
                                 f"{self.query_grid}")
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} not divisible by num_heads {self.num_heads}")
        if self.final_grid is None:
            object.__setattr__(self, "final_grid", self.query_grid)

    @property
    def window_sizes(self) -> tuple[int, ...]:
        """r_i = g_i / G, the side of each tower's local window (`cross_att_token_len_list`)."""
        return tuple(g // self.query_grid for g in self.tower_grids)

    @property
    def num_queries(self) -> int:
        return self.query_grid**2

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SVAConfig":
        """Builds a config from a dict that may name a `variant`; see `make_config`."""
        return make_config(**dict(d))


VARIANTS: dict[str, dict[str, Any]] = {
    "tdc_qwen2_7b": dict(llm_width=3584),
    "tdc_llama3_2_3b": dict(llm_width=3072),
    # The fixture tdc_sva_connector.
    "tiny": dict(tower_widths=(24, 40), tower_grids=(6, 6), query_grid=3, width=64,
                 num_heads=16, depth=2, llm_width=48),
}


def make_config(variant: str | None = None, **overrides) -> SVAConfig:
    """Returns `SVAConfig` of a named variant with field overrides.

    Raises:
      ValueError: for an unknown variant or field.
    """
    if variant is not None and variant not in VARIANTS:
        raise ValueError(f"unknown SVA variant {variant!r}; known: {sorted(VARIANTS)}")
    known = {f.name for f in dataclasses.fields(SVAConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown SVAConfig fields {unknown}; known: {sorted(known)}")
    return SVAConfig(**{**(VARIANTS[variant] if variant else {}), **overrides})


# ----------------------------------------------------------------------------------------------
# Padding of non-square frames (`unmask_attention_mask` / `unpad_image`)
# ----------------------------------------------------------------------------------------------


def frame_pads(image_sizes: Int[Array, "B 2"], grid: int, *,
               swap_image_size_hw: bool = True) -> Int[Array, "B 2"]:
    """Rows / columns the original treats as padding on a square `grid`, in-graph.

    `unmask_attention_mask` / `unpad_image`: with (w, h) the frame's size, if w / h > 1 the
    frame is landscape and `pad_rows = (grid - floor(h * grid / w)) // 2` rows are padding at the
    top and at the bottom; otherwise `pad_cols = (grid - floor(w * grid / h)) // 2` columns on
    each side. Computed with exact integer arithmetic. The original evaluates
    `int(h * (grid / w))` in float64, which for sizes where `h * grid / w` is an integer can give
    one less and so one more padded row (e.g. w x h = 147 x 98 on a 3-grid: 1.9999999999999998;
    53 such landscape sizes below 1000 px over the grids 3, 6, 12, 24); where that matters, pass
    the `pads` computed by `sva_pads` / `frame_pads_reference` on the host to `SVAConnector`.

    Args:
      image_sizes: int[B, 2], per frame (height, width), or (width, height) as the original
        reads it when `swap_image_size_hw` (see the module docstring). Non-positive sizes mean
        "no padding".
      grid: side of the square grid.
      swap_image_size_hw: read the pair as (width, height), as TDC does.

    Returns:
      int32[B, 2]: (pad_rows, pad_cols), at most one of them non-zero.
    """
    s = jnp.asarray(image_sizes).astype(jnp.int32)
    a, b = s[..., 0], s[..., 1]
    w, h = (a, b) if swap_image_size_hw else (b, a)
    ok = (w > 0) & (h > 0)
    w1, h1 = jnp.maximum(w, 1), jnp.maximum(h, 1)
    landscape = w > h
    pad_r = jnp.where(landscape, (grid - (h * grid) // w1) // 2, 0)
    pad_c = jnp.where(landscape, 0, (grid - (w * grid) // h1) // 2)
    pads = jnp.stack([pad_r, pad_c], axis=-1)
    return jnp.where(ok[..., None], jnp.maximum(pads, 0), 0).astype(jnp.int32)


def frame_pads_reference(image_sizes: np.ndarray, grid: int, *,
                         swap_image_size_hw: bool = True) -> np.ndarray:
    """`frame_pads` on the host, bit-for-bit the original's float64 arithmetic
    (`int(h * (grid / w))`). Returns int32[B, 2] (pad_rows, pad_cols)."""
    sizes = np.asarray(image_sizes).reshape(-1, 2)
    out = np.zeros((sizes.shape[0], 2), np.int32)
    for n, (a, b) in enumerate(sizes.tolist()):
        w, h = (a, b) if swap_image_size_hw else (b, a)
        if w <= 0 or h <= 0:
            continue
        if w / h > grid / grid:
            out[n, 0] = max((grid - int(h * (grid / w))) // 2, 0)
        else:
            out[n, 1] = max((grid - int(w * (grid / h))) // 2, 0)
    return out


def sva_pads(image_sizes: np.ndarray, cfg: SVAConfig) -> np.ndarray:
    """Host-side pads for `SVAConnector(pads=...)`: int32[B, n_towers + 1, 2], the
    `frame_pads_reference` of every tower grid, then of the final grid."""
    grids = (*cfg.tower_grids, cfg.final_grid)
    return np.stack([frame_pads_reference(image_sizes, g,
                                          swap_image_size_hw=cfg.swap_image_size_hw)
                     for g in grids], axis=1)


def valid_grid(pads: Int[Array, "B 2"], grid: int) -> Int[Array, "B 2"]:
    """(rows, cols) kept by `unpad_image` on a `grid` x `grid` grid: `grid - 2 * pad`, or the
    whole grid when that leaves nothing (the original's `try/except` fallback)."""
    rc = grid - 2 * pads
    empty = jnp.any(rc <= 0, axis=-1, keepdims=True)
    return jnp.where(empty, grid, rc).astype(jnp.int32)


def window_masks(pads: Int[Array, "B 2"], grid: int, query_grid: int) -> Bool[Array, "B Q S"]:
    """Key masks of the local windows (`rearrange_vision_tower_features_inference`).

    Valid = not a padded row / column of the `grid` x `grid` tower grid; regrouped into the
    `query_grid`^2 windows of r x r tokens (r = grid / query_grid, order r_row * r + r_col); a
    window with no valid key is reset to all True, as the original does.

    Returns:
      bool[B, query_grid^2, r^2].
    """
    r = grid // query_grid
    idx = jnp.arange(grid)
    pr, pc = pads[:, 0:1], pads[:, 1:2]
    rows = (idx >= pr) & (idx < grid - pr)  # [B, g]
    cols = (idx >= pc) & (idx < grid - pc)
    m = rows[:, :, None] & cols[:, None, :]  # [B, g, g]
    m = _windows(m[..., None], query_grid, r)[..., 0]
    return m | ~jnp.any(m, axis=-1, keepdims=True)


def _windows(x: jax.Array, query_grid: int, r: int) -> jax.Array:
    """[B, g, g, D] (or [B, g*g, D]) -> [B, G*G, r*r, D]: window (y, x) holds rows
    y*r .. y*r + r - 1 and columns x*r .. x*r + r - 1, row-major inside the window."""
    b, d = x.shape[0], x.shape[-1]
    x = x.reshape(b, query_grid, r, query_grid, r, d)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, query_grid * query_grid, r * r, d)


# ----------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------


class _AuxProjector(nn.Module):
    """`mm_projector_aux_i`: Linear(E -> D) - GELU - Linear(D -> D) - LayerNorm."""

    config: SVAConfig
    in_width: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        h = LinearProjector(self.in_width, cfg.width, kernel_axes=(None, MLP), name="linear_0",
                            **kw)(x)
        h = activation(cfg.act)(h)
        h = LinearProjector(cfg.width, cfg.width, kernel_axes=(MLP, EMBED), name="linear_2",
                            **kw)(h)
        return LayerNorm(cfg.ln_eps, param_dtype=kw["param_dtype"], name="norm")(h)


class _MultiKVCrossAttention(nn.Module):
    """`MultiKVCrossAttention`: one query per window attends the keys of all towers' windows.

    q = Linear(LN(x)); k_i, v_i = Linear(LN(kv_i)) per tower; SDPA over the concatenated keys
    with the boolean mask; o projection. No biases (`attention_bias=False`).
    """

    config: SVAConfig

    @nn.compact
    def __call__(self, x, kv_list, mask_list):
        cfg = self.config
        d, n = cfg.width, cfg.num_heads
        h = d // n
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        pdt = kw["param_dtype"]
        axes = (EMBED, HEADS, HEAD_DIM)
        b, q_len = x.shape[:2]
        xq = LayerNorm(cfg.ln_eps, param_dtype=pdt, name="q_norm")(x)
        q = Einsum((d, n, h), axes, name="q", **kw)("BQD,DNH->BQNH", xq)
        ks, vs = [], []
        for i, kv in enumerate(kv_list):
            for name, out in (("k", ks), ("v", vs)):
                y = LayerNorm(cfg.ln_eps, param_dtype=pdt, name=f"{name}_norm_{i}")(kv)
                out.append(Einsum((d, n, h), axes, name=f"{name}_{i}", **kw)(
                    "BQSD,DNH->BQSNH", y))
        k = jnp.concatenate(ks, axis=2)
        v = jnp.concatenate(vs, axis=2)
        mask = jnp.concatenate(mask_list, axis=2)
        s = k.shape[2]
        o = dot_product_attention(q.reshape(b * q_len, 1, n, h), k.reshape(b * q_len, s, n, h),
                                  v.reshape(b * q_len, s, n, h),
                                  mask=mask.reshape(b * q_len, 1, 1, s))
        o = o.reshape(b, q_len, n, h)
        return Einsum((n, h, d), (HEADS, HEAD_DIM, EMBED), fan_in_axes=(0, 1), name="o",
                      **kw)("BQNH,NHD->BQD", o)


class _SVALayer(nn.Module):
    """`VisionCrossAttentionLayer` (see the module docstring)."""

    config: SVAConfig

    @nn.compact
    def __call__(self, x, context, kv_list, mask_list):
        cfg = self.config
        d = cfg.width
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        pdt = kw["param_dtype"]
        residual = x
        ctx = Einsum((d, d), (None, EMBED), name="proj_context", **kw)("BE,ED->BD", context)
        ctx = jnp.broadcast_to(ctx[:, None], x.shape)
        x_in = Einsum((2 * d, d), (None, EMBED), name="proj_in", **kw)(
            "BQE,ED->BQD", jnp.concatenate([x, ctx], axis=-1))
        kvs = []
        for i, kv in enumerate(kv_list):
            s = kv.shape[2]
            if s > 1:  # `pos_embed_i` exists iff the window has more than one token
                pos = self.param(f"pos_embed_{i}", nn.with_logical_partitioning(
                    nn.initializers.normal(1.0), (None, EMBED)), (s, d), pdt)
                kv = kv + pos.astype(kv.dtype)
            kvs.append(kv)
        attn = _MultiKVCrossAttention(cfg, name="cross_attn")(x_in, kvs, mask_list)
        y = LayerNorm(cfg.ln_eps, param_dtype=pdt, name="norm")(x_in + attn)
        y = _ProjOut(cfg, name="proj_out")(y)
        return nn.with_logical_constraint(y + residual, ACT_BTD)


class _ProjOut(nn.Module):
    """`MLP(hidden, hidden, q_dim)`: Linear - GELU - Linear, no biases."""

    config: SVAConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        d = cfg.width
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        h = Einsum((d, d), (EMBED, MLP), name="linear_1", **kw)("BQD,DM->BQM", x)
        h = activation(cfg.act)(h)
        return Einsum((d, d), (MLP, EMBED), name="linear_2", **kw)("BQM,MD->BQD", h)


class _VisionTokenSampler(nn.Module):
    """`VisionTokenSampler(layer_type='joint')`: `depth` `VisionCrossAttentionLayer`s."""

    config: SVAConfig

    @nn.compact
    def __call__(self, x, context, kv_list, mask_list):
        for layer in range(self.config.depth):
            x = _SVALayer(self.config, name=f"layer_{layer}")(x, context, kv_list, mask_list)
        return x


class SVAConnector(nn.Module):
    """Cambrian SVA connector: tower features of a batch of frames -> G_f^2 LLM tokens each.

    Source: see the module docstring (`tdc/vision_sampler.py`, `tdc/cambrian_arch.py`).

    Attributes:
      config: `SVAConfig`.
    """

    config: SVAConfig

    @nn.compact
    def __call__(
        self,
        tower_features: Sequence[Float[Array, "B _ _"]],
        image_sizes: Int[Array, "B 2"] | None = None,
        *,
        pads: Int[Array, "B grids 2"] | None = None,
    ) -> tuple[Float[Array, "B T D"], Int[Array, "B 2"], dict[str, jax.Array]]:
        """Runs the aux projectors, the vision sampler and `mm_projector`.

        Args:
          tower_features: per tower i, float[B, g_i^2, E_i] row-major grid tokens (B frames).
          image_sizes: int[B, 2] per frame, (height, width) as TDC stores them (read per
            `config.swap_image_size_hw`); None with `pads` None = square frames (no padding).
          pads: int32[B, n_towers + 1, 2] (pad_rows, pad_cols) per tower grid then for the
            final grid, e.g. from `sva_pads` on the host (bit-exact with the original's float64
            arithmetic); overrides `image_sizes`.

        Returns:
          (tokens float[B, G_f^2, D_llm] in `config.dtype` (`mm_projector` output, every grid
          position), grid int32[B, 2] (rows, cols) kept by `unpad_image`, aux) with aux:
            aux_proj_{i} [B, g_i^2, D], global_context [B, D], rearranged_feat_{i}
            [B, G^2, r_i^2, D], rearranged_mask_{i} bool[B, G^2, r_i^2], sampler_out
            [B, G^2, D], image_newline [D_llm] (the parameter, for `newline_layout`).

        Raises:
          ValueError: on a wrong number of towers, widths or token counts.
        """
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        pdt = jnp.dtype(cfg.param_dtype)
        n_t = len(cfg.tower_widths)
        if len(tower_features) != n_t:
            raise ValueError(f"{len(tower_features)} towers given, config has {n_t}")
        b = tower_features[0].shape[0]
        for i, (x, e, g) in enumerate(zip(tower_features, cfg.tower_widths, cfg.tower_grids)):
            if x.shape[1:] != (g * g, e):
                raise ValueError(f"tower {i}: features {x.shape[1:]}, expected {(g * g, e)}")
        gq, gf, d = cfg.query_grid, cfg.final_grid, cfg.width
        if pads is None:
            if image_sizes is None:
                pads = jnp.zeros((b, n_t + 1, 2), jnp.int32)
            else:
                pads = jnp.stack([frame_pads(image_sizes, g,
                                             swap_image_size_hw=cfg.swap_image_size_hw)
                                  for g in (*cfg.tower_grids, gf)], axis=1)
        pads = jnp.asarray(pads).astype(jnp.int32)
        aux: dict[str, jax.Array] = {}

        kv_list, mask_list = [], []
        for i, (x, e, g) in enumerate(zip(tower_features, cfg.tower_widths, cfg.tower_grids)):
            a = _AuxProjector(cfg, e, name=f"aux_proj_{i}")(x.astype(dtype))
            aux[f"aux_proj_{i}"] = a
            if i == 0:
                ctx = jnp.mean(a.astype(jnp.float32), axis=1).astype(dtype)
            r = g // gq
            kv = _windows(a.reshape(b, g, g, d), gq, r)
            m = window_masks(pads[:, i], g, gq)
            aux[f"rearranged_feat_{i}"], aux[f"rearranged_mask_{i}"] = kv, m
            kv_list.append(kv)
            mask_list.append(m)
        aux["global_context"] = ctx

        vq = self.param("vision_query", nn.with_logical_partitioning(
            nn.initializers.normal(1.0), (None, EMBED)), (1, d), pdt)
        x = jnp.broadcast_to(vq[0].astype(dtype), (b, gq * gq, d))
        x = _VisionTokenSampler(cfg, name="vision_sampler")(x, ctx, kv_list, mask_list)
        aux["sampler_out"] = x
        if gf != gq:
            x = pool_tokens_2d(x, (gq, gq), (gf, gf), "bilinear")
        tokens = MLPProjector(d, cfg.llm_width, act=cfg.act, dtype=dtype, param_dtype=pdt,
                              name="mm_projector")(x)
        tokens = nn.with_logical_constraint(tokens.astype(dtype), ACT_BTD)
        newline = self.param("image_newline", nn.with_logical_partitioning(
            nn.initializers.normal(1.0 / math.sqrt(cfg.llm_width)), (EMBED,)),
            (cfg.llm_width,), pdt)
        aux["image_newline"] = newline
        return tokens, valid_grid(pads[:, n_t], gf), aux


def newline_layout(
    tokens: Float[Array, "B T D"],
    grid: Int[Array, "B 2"],
    newline: Float[Array, " D"],
) -> tuple[Float[Array, "B T2 D"], Bool[Array, "B T2"]]:
    """The per-frame token sequence of TDC: the kept grid, each row ended by `image_newline`.

    `unpad_image` keeps rows [r0, r0 + rows) and columns [c0, c0 + cols) of the G x G grid with
    r0 = (G - rows) // 2, c0 = (G - cols) // 2; row by row those tokens, then `newline`, are
    written to a buffer of G * (G + 1) slots. The first rows * (cols + 1) slots are valid.

    Args:
      tokens: float[B, G*G, D], `SVAConnector` tokens (row-major grid).
      grid: int32[B, 2], (rows, cols) from `SVAConnector`.
      newline: float[D], the `image_newline` parameter (`aux['image_newline']`).

    Returns:
      (out float[B, G * (G + 1), D] in tokens' dtype, zero past the valid prefix,
       mask bool[B, G * (G + 1)]).

    Raises:
      ValueError: if the token count is not a square.
    """
    b, t, d = tokens.shape
    g = math.isqrt(t)
    if g * g != t:
        raise ValueError(f"{t} tokens do not form a square grid")
    rows, cols = grid[:, 0:1], grid[:, 1:2]  # [B, 1]
    r0, c0 = (g - rows) // 2, (g - cols) // 2
    n = jnp.arange(g * (g + 1), dtype=jnp.int32)[None]
    row, col = n // (cols + 1), n % (cols + 1)
    mask = n < rows * (cols + 1)
    src = jnp.clip((r0 + row) * g + c0 + jnp.minimum(col, cols - 1), 0, t - 1)
    gathered = jnp.take_along_axis(tokens, src[..., None], axis=1)
    out = jnp.where((col == cols)[..., None], newline.astype(tokens.dtype), gathered)
    out = jnp.where(mask[..., None], out, 0).astype(tokens.dtype)
    return out, mask


def num_frame_tokens(grid: np.ndarray) -> np.ndarray:
    """Tokens of each frame in `newline_layout`: rows * (cols + 1) (host, int[B])."""
    grid = np.asarray(grid)
    return grid[..., 0] * (grid[..., 1] + 1)
