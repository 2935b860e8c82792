"""Vision transformers: shared ViT parts and the SigLIP tower.

This file holds what every ViT family shares: the config helper `config_from_variant`, PyTorch
`F.interpolate` resampling for position embeddings (`resize_matrix`, `interpolate_grid`), the
patch embedding and class-token helpers (`patch_embed`, `cls_and_positions`) and the pre-LN
encoder block and stack (`EncoderBlock`, `EncoderStack`: biases, LayerScale and SwiGLU as
flags). The families built on them live beside it: `clip.py` (CLIP vision), `dinov2.py`
(DINOv2), `eva.py` (EVA ViT-g); `audio.py` reuses the stack for Whisper.

The SigLIP tower (`ViT`) follows `transformers` `SiglipVisionModel`
(models/siglip/modeling_siglip.py): a patch embedding (a stride-p convolution), learned
position embeddings, pre-LN encoder blocks (LayerNorm, multi-head attention with q/k/v/o
biases, residual, LayerNorm, MLP fc1-act-fc2, residual) and a final `post_layernorm`. The
attention-pooling `head` is not built (no system here uses it).

Which output a system reads is config:

  reader                          HF equivalent                               config
  SigLIP itself                   last_hidden_state (post-LN)                 post_ln=True
  TDC                             hidden_states[-1]: 27 layers, no post-LN    post_ln=False
  LLaVA-OV / LLaVA-Video / MMDuet 26 layers (last deleted), no post-LN        post_ln=False,
                                                                              drop_last_layers=1

`depth` is always the checkpoint's depth (27 for so400m); `drop_last_layers` layers at the end
are neither built nor run (their checkpoint keys must be ignored explicitly in
`convert/vit_keys.py`). Layers are stacked along a leading `L` axis by `nn.scan`.

Local einsum letters (besides the alphabet of `longvid_jax.models`): `y`, `x` are the rows and
columns of one patch (kernel taps), `h`, `w` the rows and columns of the patch grid, `i`, `j`
rows and columns of the stored position-embedding grid.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from longvid_jax.models import ACT_BTD, CONV, EMBED, HEAD_DIM, HEADS, LAYERS, MLP, NORM
from longvid_jax.models.attention import dot_product_attention
from longvid_jax.models.layers import Einsum, EinsumWeights, LayerNorm, activation
from longvid_jax.variants import config_from_variant  # noqa: F401 (re-exported)

Dtype = Any


# --------------------------------------------------------------------------------------------
# Config.


class TowerConfig:
    """Checks and derived sizes shared by the ViT-family configs (SigLIP, DINOv2, CLIP, EVA).

    Subclasses are frozen dataclasses with the fields `image_size`, `patch_size`, `width`,
    `depth`, `num_heads`, `drop_last_layers`, `pos_interp` and `act`; their `__post_init__`
    calls `check_tower()` and adds their own checks.
    """

    def check_tower(self) -> None:
        """Raises ValueError for sizes or options that cannot build a tower."""
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} not divisible by num_heads {self.num_heads}")
        if not 0 <= self.drop_last_layers < self.depth:
            raise ValueError(f"drop_last_layers {self.drop_last_layers} must be in [0, depth)")
        if self.pos_interp not in ("bicubic", "bilinear"):
            raise ValueError(f"unknown pos_interp {self.pos_interp!r}")
        activation(self.act)  # raises ValueError if unknown

    @property
    def grid(self) -> int:
        """Patches per side of the stored position grid (`image_size // patch_size`)."""
        return self.image_size // self.patch_size

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def num_layers_run(self) -> int:
        """Layers built and run: `depth - drop_last_layers`."""
        return self.depth - self.drop_last_layers


@dataclasses.dataclass(frozen=True)
class ViTConfig(TowerConfig):
    """Sizes and options of a SigLIP-style ViT.

    Attributes:
      image_size: side of the square training resolution in pixels (SigLIP so400m: 384). The
        position-embedding grid is `image_size // patch_size` per side.
      patch_size: patch side in pixels (14).
      width: model width D (1152).
      depth: number of layers in the checkpoint (27), including any dropped ones.
      num_heads: attention heads N (16); head dim H = width // num_heads.
      mlp_dim: MLP hidden size M (4304).
      act: MLP activation, a `transformers` name (`gelu_pytorch_tanh` for SigLIP).
      ln_eps: LayerNorm epsilon (1e-6).
      num_channels: input channels C (3).
      post_ln: apply the final LayerNorm (`post_layernorm`); False reads the last layer's raw
        output, like `hidden_states[-1]`.
      drop_last_layers: layers at the end that are not built nor run (LLaVA-OV style: 1).
      pos_interp: how position embeddings are resized when the input's patch grid differs from
        the config's: `"bicubic"` (as `SiglipVisionModel(interpolate_pos_encoding=True)`) or
        `"bilinear"`; see `interpolate_grid`.
      attention_impl: `dot_product_attention` backend (`"xla"` or `"cudnn"`).
      remat: rematerialise each layer in the backward pass (memory for compute, training only).
      dtype: compute dtype.
      param_dtype: storage dtype of the weights.
    """

    image_size: int
    patch_size: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    act: str = "gelu_pytorch_tanh"
    ln_eps: float = 1e-6
    num_channels: int = 3
    post_ln: bool = True
    drop_last_layers: int = 0
    pos_interp: str = "bicubic"
    attention_impl: str = "xla"
    remat: bool = False
    dtype: Dtype = "float32"
    param_dtype: Dtype = "float32"

    def __post_init__(self):
        self.check_tower()

    @property
    def num_patches(self) -> int:
        """Rows of the position-embedding table, `grid**2` (729)."""
        return self.grid**2


VARIANTS: dict[str, dict[str, Any]] = {
    # google/siglip-so400m-patch14-384 (vision tower).
    "so400m_14_384": dict(image_size=384, patch_size=14, width=1152, depth=27, num_heads=16,
                          mlp_dim=4304),
    "tiny": dict(image_size=32, patch_size=8, width=32, depth=2, num_heads=4, mlp_dim=64),
}


def make_config(variant: str | None = None, **overrides) -> ViTConfig:
    """Builds a `ViTConfig` from a named variant plus field overrides.

    Raises:
      ValueError: for an unknown variant or field, or an inconsistent config.
    """
    return config_from_variant(ViTConfig, VARIANTS, variant, overrides)


def from_dict(d: dict[str, Any]) -> ViTConfig:
    """`make_config(**d)`; `d` may hold a `variant` key."""
    return make_config(**dict(d))


# --------------------------------------------------------------------------------------------
# Position-embedding resizing (PyTorch `F.interpolate` semantics, align_corners=False).


def _cubic_weights(t: float, a: float = -0.75) -> list[float]:
    """PyTorch's 4 cubic-convolution taps for offsets -1, 0, 1, 2 around the floor index."""

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return [far(t + 1), near(t), near(1 - t), far(2 - t)]


def resize_matrix(n_in: int, n_out: int, method: str) -> np.ndarray:
    """The 1-D resampling matrix `float64[n_out, n_in]` of PyTorch `F.interpolate`.

    Follows `upsample_bicubic2d` / `upsample_bilinear2d` with `align_corners=False` and no
    antialiasing: output index `o` samples the source at `(o + 0.5) * n_in / n_out - 0.5`;
    bicubic uses Keys' kernel with a = -0.75 and clamps the 4 taps to the border; bilinear
    clamps the source coordinate at 0 and the upper tap at `n_in - 1`.

    Raises:
      ValueError: for an unknown method.
    """
    m = np.zeros((n_out, n_in), np.float64)
    scale = n_in / n_out
    for o in range(n_out):
        src = scale * (o + 0.5) - 0.5
        if method == "bicubic":
            i0 = int(np.floor(src))
            for off, wgt in zip(range(-1, 3), _cubic_weights(src - i0)):
                m[o, min(max(i0 + off, 0), n_in - 1)] += wgt
        elif method == "bilinear":
            src = max(src, 0.0)
            i0 = int(src)
            i1 = i0 + (1 if i0 < n_in - 1 else 0)
            lam = src - i0
            m[o, i0] += 1.0 - lam
            m[o, i1] += lam
        else:
            raise ValueError(f"unknown interpolation method {method!r}")
    return m


def interpolate_grid(x: Float[Array, "i j D"], size: tuple[int, int],
                     method: str = "bicubic") -> Float[Array, "h w D"]:
    """Resizes a channels-last grid `[i, j, D]` to `[h, w, D]` = `size`, as PyTorch would.

    Equals `F.interpolate(x.permute(2, 0, 1)[None], size, mode=method, align_corners=False)`
    (see `resize_matrix`); computed as two matmuls in float32 (or x's dtype if wider).
    """
    mh = jnp.asarray(resize_matrix(x.shape[0], size[0], method), jnp.float32)
    mw = jnp.asarray(resize_matrix(x.shape[1], size[1], method), jnp.float32)
    y = jnp.einsum("hi,wj,ijD->hwD", mh, mw, x.astype(jnp.float32))
    return y.astype(x.dtype)


# --------------------------------------------------------------------------------------------
# Shared pre-LN encoder block (SigLIP, CLIP, DINOv2, EVA, Whisper).


FFN_TYPES = ("mlp", "swiglu")


class EncoderBlock(nn.Module):
    """Pre-LN transformer encoder layer: x + ls1 * attn(ln1(x)); then x + ls2 * ffn(ln2(x)).

    Bidirectional multi-head attention (no mask). Matches `SiglipEncoderLayer`,
    `CLIPEncoderLayer`, `WhisperEncoderLayer` (k without bias), `Dinov2Layer` (LayerScale,
    optionally SwiGLU) and LAVIS EVA `Block` (k without bias, no LayerScale).

    Parameters: `ln1`, `ln2` (scale, bias [D]); `q`, `k`, `v` kernel (D, N, H), bias (N, H)
    when `qkv_bias` (k's also needs `k_bias`); `o` kernel (N, H, D), bias (D,); with
    `ffn="mlp"`: `fc1` kernel (D, M), bias (M,), `fc2` kernel (M, D), bias (D,); with
    `ffn="swiglu"`: `gate`, `up` kernel (D, M), bias (M,), `down` kernel (M, D), bias (D,);
    with `layer_scale`: `ls1`, `ls2` (D,) [NORM].

    Attributes:
      act: MLP activation name (`ffn="mlp"` only; SwiGLU always uses SiLU, as HF's
        `Dinov2SwiGLUFFN`).
      k_bias: the k projection has a bias (False: Whisper, EVA).
      qkv_bias: the q, k, v projections have biases (DINOv2 `qkv_bias`).
      layer_scale: multiply each branch's output by a learned vector (DINOv2 LayerScale).
      ffn: `"mlp"` (fc1-act-fc2) or `"swiglu"` (`down(silu(gate(x)) * up(x))`).
    """

    width: int
    num_heads: int
    mlp_dim: int
    act: str
    ln_eps: float
    k_bias: bool = True
    qkv_bias: bool = True
    layer_scale: bool = False
    ffn: str = "mlp"
    attention_impl: str = "xla"
    collect_output: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "B T D"]) -> tuple[Float[Array, "B T D"], dict]:
        """Runs the layer.

        Args:
          x: [B, T, D] in the compute dtype.

        Returns:
          ([B, T, D] in the compute dtype, aux); aux is `{"output": out}` when
          `collect_output` (so that `nn.scan` stacks the per-layer outputs), else `{}`.

        Raises:
          ValueError: for an unknown `ffn`.
        """
        d, n, m = self.width, self.num_heads, self.mlp_dim
        h = d // n
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = nn.with_logical_constraint(x, ACT_BTD)

        y = LayerNorm(eps=self.ln_eps, param_dtype=self.param_dtype, name="ln1")(x)
        q, k, v = self._qkv(y)
        o = Einsum((n, h, d), (HEADS, HEAD_DIM, EMBED), bias_axes=(EMBED,), fan_in_axes=(0, 1),
                   name="o", **kw)
        attn = dot_product_attention(q, k, v, implementation=self.attention_impl)
        x = x + self._scale("ls1", o("BTNH,NHD->BTD", attn))

        y = LayerNorm(eps=self.ln_eps, param_dtype=self.param_dtype, name="ln2")(x)
        if self.ffn == "mlp":
            y = Einsum((d, m), (EMBED, MLP), bias_axes=(MLP,), name="fc1", **kw)("BTD,DM->BTM", y)
            y = activation(self.act)(y)
            y = Einsum((m, d), (MLP, EMBED), bias_axes=(EMBED,), name="fc2", **kw)(
                "BTM,MD->BTD", y)
        elif self.ffn == "swiglu":
            gate = Einsum((d, m), (EMBED, MLP), bias_axes=(MLP,), name="gate", **kw)(
                "BTD,DM->BTM", y)
            up = Einsum((d, m), (EMBED, MLP), bias_axes=(MLP,), name="up", **kw)("BTD,DM->BTM", y)
            y = Einsum((m, d), (MLP, EMBED), bias_axes=(EMBED,), name="down", **kw)(
                "BTM,MD->BTD", jax.nn.silu(gate) * up)
        else:
            raise ValueError(f"unknown ffn {self.ffn!r}; known: {FFN_TYPES}")
        x = nn.with_logical_constraint(x + self._scale("ls2", y), ACT_BTD)
        return x, ({"output": x} if self.collect_output else {})

    def _qkv(self, y: Float[Array, "B T D"]) -> tuple[jax.Array, jax.Array, jax.Array]:
        """q, k, v [B, T, N, H] from one matmul against the concatenated (D, 3N, H) weights
        (fewer, larger kernels and one bias add); each keeps its own `q` / `k` / `v` params."""
        d, n = self.width, self.num_heads
        h = d // n
        dtype = jnp.dtype(self.dtype)
        bias = (HEADS, HEAD_DIM) if self.qkv_bias else None
        weights = [EinsumWeights((d, n, h), (EMBED, HEADS, HEAD_DIM),
                                 bias_axes=bias if (name != "k" or self.k_bias) else None,
                                 param_dtype=self.param_dtype, name=name)()
                   for name in ("q", "k", "v")]
        w = jnp.concatenate([wt.astype(dtype) for wt, _ in weights], axis=1)
        qkv = jnp.einsum("BTD,DNH->BTNH", y.astype(dtype), w)
        if self.qkv_bias:
            qkv = qkv + jnp.concatenate([jnp.zeros((n, h), dtype) if b is None else b.astype(dtype)
                                         for _, b in weights], axis=0)
        return qkv[:, :, :n], qkv[:, :, n:2 * n], qkv[:, :, 2 * n:]

    def _scale(self, name: str, y: jax.Array) -> jax.Array:
        """`y * <name>` (a learned [D] LayerScale vector) when `layer_scale`, else `y`."""
        if not self.layer_scale:
            return y
        gamma = self.param(name, nn.with_logical_partitioning(nn.initializers.ones, (NORM,)),
                           (self.width,), self.param_dtype)
        return y * gamma.astype(y.dtype)


class EncoderStack(nn.Module):
    """`num_layers` `EncoderBlock`s stacked by `nn.scan` under the name `layers`.

    Every parameter of the block gets a leading `L` axis (logical name `LAYERS`), e.g. the q
    kernel is `(L, D, N, H)`.

    Attributes:
      num_layers: L.
      collect: also return every layer's output.
      remat: rematerialise each layer in the backward pass.
      (the rest: as `EncoderBlock`.)
    """

    num_layers: int
    width: int
    num_heads: int
    mlp_dim: int
    act: str
    ln_eps: float
    k_bias: bool = True
    qkv_bias: bool = True
    layer_scale: bool = False
    ffn: str = "mlp"
    attention_impl: str = "xla"
    remat: bool = False
    collect: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "B T D"]
                 ) -> tuple[Float[Array, "B T D"], Float[Array, "L B T D"] | None]:
        """Returns (output [B, T, D], per-layer outputs [L, B, T, D] or None if not collect)."""
        block = nn.remat(EncoderBlock, prevent_cse=False) if self.remat else EncoderBlock
        scanned = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                          length=self.num_layers, metadata_params={nn.PARTITION_NAME: LAYERS})
        x, aux = scanned(width=self.width, num_heads=self.num_heads, mlp_dim=self.mlp_dim,
                         act=self.act, ln_eps=self.ln_eps, k_bias=self.k_bias,
                         qkv_bias=self.qkv_bias, layer_scale=self.layer_scale, ffn=self.ffn,
                         attention_impl=self.attention_impl, collect_output=self.collect,
                         dtype=self.dtype, param_dtype=self.param_dtype, name="layers")(x)
        return x, (aux["output"] if self.collect else None)


# --------------------------------------------------------------------------------------------
# Embeddings shared by the towers.


def patch_embed(images: Float[Array, "B Hpx Wpx C"], *, patch_size: int, width: int,
                num_channels: int, bias: bool, dtype: Dtype, param_dtype: Dtype,
                name: str = "patch_embed") -> tuple[Float[Array, "B P D"], tuple[int, int]]:
    """The stride-p patch convolution as one einsum; call inside a compact module.

    Creates the `Einsum` `name` (kernel (p, p, C, D) [None, None, CONV, EMBED], bias (D,) if
    `bias`) in the calling module. Trailing rows / columns of pixels that do not fill a patch
    are dropped, as PyTorch's VALID convolution does.

    Args:
      images: float[B, Hpx, Wpx, C], channels-last; cast to `dtype`.

    Returns:
      (patch embeddings [B, P, D] in `dtype`, P = gh * gw row-major; the grid (gh, gw)).

    Raises:
      ValueError: if C differs from `num_channels` or an image is smaller than a patch.
    """
    b, hpx, wpx, c = images.shape
    p = patch_size
    if c != num_channels:
        raise ValueError(f"expected {num_channels} channels, got images {images.shape}")
    gh, gw = hpx // p, wpx // p
    if gh == 0 or gw == 0:
        raise ValueError(f"images {images.shape} smaller than one {p}x{p} patch")
    x = images[:, :gh * p, :gw * p].astype(dtype)
    x = x.reshape(b, gh, p, gw, p, c).transpose(0, 1, 3, 2, 4, 5)
    x = x.reshape(b, gh * gw, p, p, c)  # [B, P, y, x, C]
    x = Einsum((p, p, c, width), (None, None, CONV, EMBED),
               bias_axes=(EMBED,) if bias else None, fan_in_axes=(0, 1, 2), dtype=dtype,
               param_dtype=param_dtype, name=name)("BPyxC,yxCD->BPD", x)
    return x, (gh, gw)


def resize_positions(pos: Float[Array, "Pin D"], grid: int, size: tuple[int, int],
                     method: str) -> Float[Array, "P D"]:
    """A `grid x grid` row-major position table [grid**2, D] resized to `size` = (gh, gw).

    Returned unchanged when `size == (grid, grid)` (the resampling would be the identity);
    otherwise `interpolate_grid` (float32, PyTorch `F.interpolate(size=...)` semantics).
    """
    if tuple(size) == (grid, grid):
        return pos
    d = pos.shape[-1]
    return interpolate_grid(pos.reshape(grid, grid, d), size, method).reshape(-1, d)


def cls_and_positions(module: nn.Module, x: Float[Array, "B P D"], size: tuple[int, int], *,
                      grid: int, method: str, dtype: Dtype, param_dtype: Dtype
                      ) -> Float[Array, "B T D"]:
    """Prepends a class token and adds position embeddings whose row 0 is the class token's.

    Creates, in `module` (a compact module whose `__call__` is running), `cls_token` (D,)
    [EMBED] and `pos_embedding` (1 + grid**2, D) [None, EMBED]. The grid rows are resized to
    `size` with `resize_positions` (the HF `interpolate_pos_encoding` rule of CLIP and DINOv2:
    bicubic, `align_corners=False`, no antialiasing, by output size); the class row is kept.

    Args:
      x: patch embeddings [B, P, D], P = gh * gw.
      size: the patch grid (gh, gw).

    Returns:
      [B, T, D] in `dtype`, T = 1 + P: `[cls; x] + positions`.
    """
    b, _, d = x.shape
    cls = module.param("cls_token", nn.with_logical_partitioning(
        nn.initializers.normal(0.02), (EMBED,)), (d,), param_dtype)
    pos = module.param("pos_embedding", nn.with_logical_partitioning(
        nn.initializers.normal(0.02), (None, EMBED)), (1 + grid * grid, d), param_dtype)
    pos = jnp.concatenate([pos[:1], resize_positions(pos[1:], grid, size, method)], axis=0)
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(dtype), (b, 1, d)), x.astype(dtype)], 1)
    return nn.with_logical_constraint(x + pos.astype(dtype)[None], ACT_BTD)


# --------------------------------------------------------------------------------------------
# The tower.


class ViT(nn.Module):
    """SigLIP vision tower (`transformers` `SiglipVisionModel`, without the pooling head).

    Parameters: `patch_embed` kernel (p, p, C, D) [None, None, CONV, EMBED] (a logical name may
    occur only once per array, so the kernel taps are unnamed), bias (D,);
    `pos_embedding` (grid**2, D) [None, EMBED], row-major over the grid; `encoder/layers/*`
    (see `EncoderStack`); `post_ln` (scale, bias) when `config.post_ln`.
    """

    config: ViTConfig

    @nn.compact
    def __call__(self, images: Float[Array, "B Hpx Wpx C"], *, return_hidden_states: bool = False
                 ) -> tuple[Float[Array, "B P D"], dict[str, jax.Array]]:
        """Encodes normalised images into patch tokens.

        The patch grid is `(Hpx // p, Wpx // p)`; trailing rows / columns of pixels that do not
        fill a patch are dropped, as the stride-p convolution of HF does (384 px / 14 = 27
        patches, the last 6 pixels unused). When the grid differs from `config.grid` squared,
        the stored `grid x grid` position embeddings are resized to it with
        `interpolate_grid(method=config.pos_interp)` (bicubic = HF
        `interpolate_pos_encoding=True`); otherwise they are used as stored.

        Args:
          images: float[B, Hpx, Wpx, C], channels-last, already normalised (SigLIP:
            `(x / 255 - 0.5) / 0.5`). Cast to `config.dtype`.
          return_hidden_states: also return every layer's output in aux.

        Returns:
          tokens: [B, P, D] in `config.dtype`, P = (Hpx // p) * (Wpx // p) row-major; the
            post-LN output if `config.post_ln`, else the last run layer's output.
          aux: `"encoder_output"`: [B, P, D], the last run layer's output before post-LN;
            with `return_hidden_states`, `"hidden_states"`: [L + 1, B, P, D] with the
            embeddings at 0 and layer i's output at i (as HF `hidden_states`), L =
            `config.num_layers_run`.

        Raises:
          ValueError: if C differs from `config.num_channels` or an image is smaller than a
            patch.
        """
        cfg = self.config
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        d, g = cfg.width, cfg.grid
        x, size = patch_embed(images, patch_size=cfg.patch_size, width=d,
                              num_channels=cfg.num_channels, bias=True, dtype=dtype,
                              param_dtype=pdtype)
        pos = self.param("pos_embedding",
                         nn.with_logical_partitioning(nn.initializers.normal(d**-0.5),
                                                      (None, EMBED)),
                         (g * g, d), pdtype)
        pos = resize_positions(pos, g, size, cfg.pos_interp)
        x = nn.with_logical_constraint(x + pos.astype(dtype)[None], ACT_BTD)

        x0 = x
        x, hidden = EncoderStack(
            num_layers=cfg.num_layers_run, width=d, num_heads=cfg.num_heads,
            mlp_dim=cfg.mlp_dim, act=cfg.act, ln_eps=cfg.ln_eps, attention_impl=cfg.attention_impl,
            remat=cfg.remat, collect=return_hidden_states, dtype=dtype, param_dtype=pdtype,
            name="encoder")(x)
        aux = {"encoder_output": x}
        if return_hidden_states:
            aux["hidden_states"] = jnp.concatenate([x0[None], hidden], axis=0)
        if cfg.post_ln:
            x = LayerNorm(eps=cfg.ln_eps, param_dtype=pdtype, name="post_ln")(x)
        return x, aux
