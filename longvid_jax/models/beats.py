"""BEATs audio encoder (TDC's and LongVALE's audio tower).

Chen et al. 2022, "BEATs: Audio Pre-Training with Acoustic Tokenizers" (arXiv 2212.09058),
section 2; code: microsoft/unilm `beats/` (BEATs.py, backbone.py), vendored by TDC
(`tdc/audio_models/beats/`) and LongVALE (`longvalellm/model/beats/`), both proven here against
`shared/fixtures/beats_tiny`. The input is BEATs' normalised Kaldi fbank
(`longvid_jax.input.fbank.beats_fbank`, 100 frames per second, 128 mel bins):

  1. Patch embedding: a 16x16 stride-16 convolution over (frames, mel bins), no bias; patches
     flattened time-major (token = t * (C // 16) + f), then LayerNorm(E) and `post_extract_proj`
     E -> D (only when E != D).
  2. Encoder (wav2vec 2.0 style): `pos_conv`, a grouped 1-D convolution over tokens with weight
     norm (`w = g * v / |v|`, the norm per kernel tap over the other two axes), same padding
     (the extra step of an even kernel dropped), GELU, added to x; LayerNorm (post-LN models).
  3. Post-LN layers with DeepNorm (Wang et al. 2022): `x = LN(alpha * x + f(x))`, alpha =
     (2 * layers)^(1/4). Attention adds a T5-style bucketed relative position bias, computed
     once (layer 0 owns the one embedding table) and, in every layer, scaled per query by a
     GRU-like gate of that layer (`gru_rel_pos`, from WavLM). FFN fc1 -> GELU in float32 -> fc2.
  4. Optionally (fine-tuned checkpoints) `predictor` D -> classes, averaged over tokens and
     passed through a sigmoid: AudioSet tag probabilities `lprobs`.

Attention keeps the original's fp16 guard: q is scaled by `head_dim^-0.5 / 32`, the logits
have their row maximum subtracted and are multiplied by 32 again; the gate sees `q * 32 /
scale`. Softmax ignores the shift, so this equals plain attention with scale `head_dim^-0.5`
up to rounding. It is written out here (not `attention.dot_product_attention`) because the gate
needs the queries and the bias per query.

Not modelled (inference-only features; both systems keep BEATs frozen): dropouts, layer drop,
`layer_wise_gradient_decay_ratio` (a gradient scaling between layers) and the `glu` FFN.

Padding: `valid` marks real tokens. As in the original, padded tokens are zeroed before
`pos_conv` and masked as keys, so a valid prefix gives the same features as the clip alone.
TDC and LongVALE encode one clip at a time, without padding.

Local einsum letters (besides the alphabet of `longvid_jax.models`): `y`, `x` rows (frames) and
columns (mel bins) of one patch, `u` a kernel tap, `k` the 8 outputs of the gate projection.
E is the patch-embedding width (512), D the encoder width (768); V the predictor's classes.
"""

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float

from longvid_jax.models import ACT_BTD, CONV, EMBED, HEAD_DIM, HEADS, LAYERS, MLP, NORM, VOCAB
from longvid_jax.models.attention import make_attention_mask
from longvid_jax.models.layers import Einsum, LayerNorm, activation
from longvid_jax.variants import config_from_variant

Dtype = Any

_LOGIT_ALPHA = 32.0  # the original's fp16 guard on the attention logits
_NEG_INF = -0.7 * float(np.finfo(np.float32).max)


@dataclasses.dataclass(frozen=True)
class BEATsConfig:
    """Sizes and options of a BEATs encoder (names of the original `BEATsConfig` in brackets).

    Attributes:
      width: encoder width D [encoder_embed_dim] (768).
      depth: layers [encoder_layers] (12).
      num_heads: attention heads N [encoder_attention_heads] (12); H = width // num_heads.
      mlp_dim: FFN hidden size M [encoder_ffn_embed_dim] (3072).
      patch_size: side of the square fbank patches [input_patch_size] (16).
      patch_dim: patch-embedding width E [embed_dim] (512); `post_extract_proj` maps E -> D
        and exists only when E != D.
      conv_bias: the patch embedding has a bias [conv_bias] (False in every release).
      num_mel_bins: C of the input fbank (128).
      act: FFN activation [activation_fn], a `layers.activation` name, computed in float32.
      layer_norm_first: pre-LN layers and the encoder's LayerNorm at the end [layer_norm_first]
        (False: post-LN, the encoder's LayerNorm after `pos_conv`).
      deep_norm: scale residuals by (2 * depth)^(1/4) [deep_norm]; needs post-LN.
      conv_pos: `pos_conv` kernel size [conv_pos] (128).
      conv_pos_groups: `pos_conv` groups [conv_pos_groups] (16).
      relative_position_embedding: add the bucketed relative position bias
        [relative_position_embedding].
      num_buckets: relative position buckets over both directions [num_buckets] (320).
      max_distance: distance mapped to the last bucket [max_distance] (800).
      gru_rel_pos: gate the bias per query and layer [gru_rel_pos].
      num_classes: predictor classes [predictor_class] of a fine-tuned model
        [finetuned_model=True] (AudioSet: 527); 0 = no predictor.
      ln_eps: LayerNorm epsilon (PyTorch default 1e-5).
      remat: rematerialise each layer in the backward pass.
      dtype: compute dtype.
      param_dtype: storage dtype of the weights.
    """

    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    patch_size: int = 16
    patch_dim: int = 512
    conv_bias: bool = False
    num_mel_bins: int = 128
    act: str = "gelu"
    layer_norm_first: bool = False
    deep_norm: bool = True
    conv_pos: int = 128
    conv_pos_groups: int = 16
    relative_position_embedding: bool = True
    num_buckets: int = 320
    max_distance: int = 800
    gru_rel_pos: bool = True
    num_classes: int = 0
    ln_eps: float = 1e-5
    remat: bool = False
    dtype: Dtype = "float32"
    param_dtype: Dtype = "float32"

    def __post_init__(self):
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} not divisible by num_heads {self.num_heads}")
        if self.width % self.conv_pos_groups:
            raise ValueError(f"width {self.width} not divisible by conv_pos_groups "
                             f"{self.conv_pos_groups}")
        if self.deep_norm and self.layer_norm_first:
            raise ValueError("deep_norm needs post-LN layers (layer_norm_first=False)")
        if self.num_mel_bins < self.patch_size:
            raise ValueError(f"num_mel_bins {self.num_mel_bins} < patch_size {self.patch_size}")
        if self.relative_position_embedding and (
                self.num_buckets < 4 or self.max_distance <= self.num_buckets // 4):
            raise ValueError(f"need num_buckets >= 4 and max_distance > num_buckets // 4, got "
                             f"{self.num_buckets}, {self.max_distance}")
        if self.gru_rel_pos and not self.relative_position_embedding:
            raise ValueError("gru_rel_pos gates the relative position bias: enable "
                             "relative_position_embedding")
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {self.num_classes}")
        activation(self.act)  # raises ValueError if unknown

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def deep_norm_alpha(self) -> float:
        """Residual scale: (2 * depth)^(1/4) with deep_norm, else 1."""
        return math.pow(2 * self.depth, 0.25) if self.deep_norm else 1.0

    @property
    def mel_patches(self) -> int:
        """Patches along the mel axis per time step (128 // 16 = 8)."""
        return self.num_mel_bins // self.patch_size

    def num_tokens(self, num_frames: int) -> int:
        """Tokens P for `num_frames` fbank frames: (frames // 16) * (mel bins // 16).

        10 s of audio (998 frames) -> 62 * 8 = 496 tokens, about 50 per second.
        """
        return (num_frames // self.patch_size) * self.mel_patches


_ITER3 = dict(width=768, depth=12, num_heads=12, mlp_dim=3072, patch_size=16, patch_dim=512,
              conv_pos=128, conv_pos_groups=16, num_buckets=320, max_distance=800,
              deep_norm=True, layer_norm_first=False, relative_position_embedding=True,
              gru_rel_pos=True)

VARIANTS: dict[str, dict[str, Any]] = {
    # BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt (TDC): AudioSet-2M tagging head.
    "iter3_as2m": dict(_ITER3, num_classes=527),
    # BEATs_iter3_plus_AS20K.pt (LongVALE): the self-supervised model, no predictor.
    "iter3_as20k": dict(_ITER3, num_classes=0),
    # shared/fixtures/beats_tiny.
    "tiny": dict(width=32, depth=2, num_heads=4, mlp_dim=64, patch_size=16, patch_dim=16,
                 conv_pos=8, conv_pos_groups=4, num_buckets=16, max_distance=32,
                 num_classes=5),
}


def make_config(variant: str | None = None, **overrides) -> BEATsConfig:
    """Builds a `BEATsConfig` from a named variant plus field overrides.

    Raises:
      ValueError: for an unknown variant or field, or an inconsistent config.
    """
    return config_from_variant(BEATsConfig, VARIANTS, variant, overrides)


def from_dict(d: dict[str, Any]) -> BEATsConfig:
    """`make_config(**d)`; `d` may hold a `variant` key."""
    return make_config(**dict(d))


# --------------------------------------------------------------------------------------------
# Relative positions.


def relative_position_buckets(q_len: int, k_len: int, num_buckets: int,
                              max_distance: int) -> np.ndarray:
    """Bidirectional T5 buckets of `key - query` offsets: int32[T, S] in [0, num_buckets).

    Half of the buckets per direction (keys after the query in the upper half); per direction
    the first quarter of `num_buckets` holds exact distances 0 .. m - 1 (m = num_buckets // 4),
    farther ones share log-spaced buckets up to `max_distance`, beyond which all go to the last.
    Evaluated in float32 as the original (`MultiheadAttention._relative_positions_bucket`).
    """
    half = num_buckets // 2
    exact = half // 2
    rel = np.arange(k_len, dtype=np.int64)[None, :] - np.arange(q_len, dtype=np.int64)[:, None]
    buckets = (rel > 0).astype(np.int64) * half
    dist = np.abs(rel)
    scaled = (np.log(np.maximum(dist, 1).astype(np.float32) / np.float32(exact))
              / np.float32(math.log(max_distance / exact)) * np.float32(half - exact))
    large = np.minimum(exact + scaled.astype(np.int64), half - 1)
    return (buckets + np.where(dist < exact, dist, large)).astype(np.int32)


# --------------------------------------------------------------------------------------------
# Layers.


class BEATsLayer(nn.Module):
    """One BEATs transformer layer (`backbone.TransformerSentenceEncoderLayer`).

    Parameters: `q`, `k`, `v` kernels (D, N, H), biases (N, H); `o` kernel (N, H, D), bias (D,);
    with `gru_rel_pos`, `grep_linear` kernel (H, 8), bias (8,) and `grep_a` (N,); `ln1`
    (`self_attn_layer_norm`), `ln2` (`final_layer_norm`); `fc1` (D, M), `fc2` (M, D) with biases.

    Attributes:
      config: the model's config.
      collect_output: also return the output as the per-layer value `nn.scan` stacks.
    """

    config: BEATsConfig
    collect_output: bool = False

    @nn.compact
    def __call__(self, x: Float[Array, "B T D"], bias: Float[Array, "N T S"] | None,
                 mask: Bool[Array, "B 1 T S"] | None
                 ) -> tuple[Float[Array, "B T D"], Float[Array, "B T D"] | None]:
        """Runs the layer.

        Args:
          x: [B, T, D] in the compute dtype.
          bias: the ungated relative position bias float32[N, T, S], or None.
          mask: bool[B, 1, T, S], True = attend, or None.

        Returns:
          (output [B, T, D], output again if `collect_output` else None).
        """
        cfg = self.config
        d, m = cfg.width, cfg.mlp_dim
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        kw = dict(dtype=dtype, param_dtype=pdtype)
        alpha = cfg.deep_norm_alpha
        ln1 = LayerNorm(eps=cfg.ln_eps, param_dtype=pdtype, name="ln1")
        ln2 = LayerNorm(eps=cfg.ln_eps, param_dtype=pdtype, name="ln2")
        x = nn.with_logical_constraint(x, ACT_BTD)

        y = ln1(x) if cfg.layer_norm_first else x
        x = alpha * x + self._attention(y, bias, mask, kw)
        if not cfg.layer_norm_first:
            x = ln1(x)

        y = ln2(x) if cfg.layer_norm_first else x
        y = Einsum((d, m), (EMBED, MLP), bias_axes=(MLP,), name="fc1", **kw)("BTD,DM->BTM", y)
        y = activation(cfg.act)(y.astype(jnp.float32)).astype(dtype)
        y = Einsum((m, d), (MLP, EMBED), bias_axes=(EMBED,), name="fc2", **kw)("BTM,MD->BTD", y)
        x = alpha * x + y
        if not cfg.layer_norm_first:
            x = ln2(x)
        x = nn.with_logical_constraint(x, ACT_BTD)
        return x, (x if self.collect_output else None)

    def _attention(self, y: Float[Array, "B T D"], bias: Float[Array, "N T S"] | None,
                   mask: Bool[Array, "B 1 T S"] | None, kw: dict) -> Float[Array, "B T D"]:
        """BEATs' `MultiheadAttention` (self-attention, q/k/v/out biases) with the gated bias."""
        cfg = self.config
        d, n, h = cfg.width, cfg.num_heads, cfg.head_dim
        axes = (EMBED, HEADS, HEAD_DIM)
        q = Einsum((d, n, h), axes, bias_axes=(HEADS, HEAD_DIM), name="q", **kw)("BTD,DNH->BTNH", y)
        k = Einsum((d, n, h), axes, bias_axes=(HEADS, HEAD_DIM), name="k", **kw)("BSD,DNH->BSNH", y)
        v = Einsum((d, n, h), axes, bias_axes=(HEADS, HEAD_DIM), name="v", **kw)("BSD,DNH->BSNH", y)
        scale = h**-0.5
        q = (q * scale) * (1.0 / _LOGIT_ALPHA)
        logits = jnp.einsum("BTNH,BSNH->BNTS", q, k, preferred_element_type=jnp.float32)
        logits = (logits - jnp.max(logits, axis=-1, keepdims=True)) * _LOGIT_ALPHA
        if mask is not None:
            logits = jnp.where(mask, logits, _NEG_INF)
        if bias is not None:
            bias = bias.astype(jnp.float32)[None]  # [1, N, T, S]
            if cfg.gru_rel_pos:
                gate = self._gate(q * _LOGIT_ALPHA / scale, kw)  # [B, T, N]
                bias = jnp.transpose(gate, (0, 2, 1))[..., None] * bias
            logits = logits + bias
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("BNTS,BSNH->BTNH", probs, v)
        o = Einsum((n, h, d), (HEADS, HEAD_DIM, EMBED), bias_axes=(EMBED,), fan_in_axes=(0, 1),
                   name="o", **kw)
        return o("BTNH,NHD->BTD", out)

    def _gate(self, q: Float[Array, "B T N H"], kw) -> Float[Array, "B T N"]:
        """`a * (b * grep_a - 1) + 2`, a and b sigmoids of sums of 4 outputs of `grep_linear`."""
        n, h = self.config.num_heads, self.config.head_dim
        g = Einsum((h, 8), (HEAD_DIM, None), bias_axes=(None,), name="grep_linear", **kw)(
            "BTNH,Hk->BTNk", q)
        g = jax.nn.sigmoid(g.astype(jnp.float32).reshape(g.shape[:-1] + (2, 4)).sum(-1))
        grep_a = self.param("grep_a", nn.with_logical_partitioning(nn.initializers.ones,
                                                                   (HEADS,)),
                            (n,), kw["param_dtype"])
        return g[..., 0] * (g[..., 1] * grep_a.astype(jnp.float32) - 1.0) + 2.0


class PosConv(nn.Module):
    """BEATs' convolutional position embedding (`TransformerEncoder.pos_conv`).

    `Conv1d(D, D, K, padding=K // 2, groups=G)` over tokens with weight norm over dim 2
    (`w = g * v / |v|`, |v| per kernel tap over the output and input channels), SamePad (drop
    the last step when K is even), GELU. The effective weight is computed at run time, so `g`
    and `v` stay parameters as in the checkpoints.

    Parameters: `g` (K,) [NORM]; `v` (K, D // G, D) [None, CONV, EMBED], the `lax.conv` "WIO"
    layout with output channels grouped contiguously; `bias` (D,).
    """

    kernel_size: int
    groups: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "B P D"]) -> Float[Array, "B P D"]:
        """Returns GELU(conv(x)) [B, P, D] (not yet added to x)."""
        _, p, d = x.shape
        k, groups = self.kernel_size, self.groups
        g = self.param("g", nn.with_logical_partitioning(nn.initializers.ones, (NORM,)), (k,),
                       self.param_dtype)
        v = self.param("v", nn.with_logical_partitioning(
            nn.initializers.normal(math.sqrt(4.0 / (k * d))), (None, CONV, EMBED)),
            (k, d // groups, d), self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (EMBED,)),
                          (d,), self.param_dtype)
        v32 = v.astype(jnp.float32)
        norm = jnp.sqrt(jnp.sum(jnp.square(v32), axis=(1, 2), keepdims=True))
        w = (g.astype(jnp.float32)[:, None, None] * v32 / norm).astype(self.dtype)
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype), w, window_strides=(1,), padding=[(k // 2, k // 2)],
            dimension_numbers=("NWC", "WIO", "NWC"), feature_group_count=groups)
        y = y[:, :p] + bias.astype(self.dtype)  # SamePad
        return jax.nn.gelu(y, approximate=False)


class BEATsEncoder(nn.Module):
    """`backbone.TransformerEncoder`: pos_conv, LayerNorm, relative position bias, the layers.

    Parameters: `pos_conv/*` (`PosConv`); `ln` (D); `rel_pos_embedding` (num_buckets, N)
    [None, HEADS] (the one table, layer 0's in the original); `layers/*` (`BEATsLayer`,
    stacked along a leading L axis by `nn.scan`).
    """

    config: BEATsConfig

    @nn.compact
    def __call__(self, x: Float[Array, "B P D"], valid: Bool[Array, "B P"] | None, *,
                 return_hidden_states: bool = False
                 ) -> tuple[Float[Array, "B P D"], dict[str, jax.Array]]:
        """Returns (features [B, P, D], aux): see `BEATs.__call__`."""
        cfg = self.config
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        b, p, _ = x.shape
        if valid is not None:
            x = jnp.where(valid[..., None], x, jnp.zeros((), x.dtype))
        x = x + PosConv(cfg.conv_pos, cfg.conv_pos_groups, dtype=dtype, param_dtype=pdtype,
                        name="pos_conv")(x)

        ln = LayerNorm(eps=cfg.ln_eps, param_dtype=pdtype, name="ln")
        if not cfg.layer_norm_first:
            x = ln(x)
        x = nn.with_logical_constraint(x, ACT_BTD)

        aux = {}
        bias = None
        if cfg.relative_position_embedding:
            table = self.param("rel_pos_embedding", nn.with_logical_partitioning(
                nn.initializers.normal(0.02), (None, HEADS)), (cfg.num_buckets, cfg.num_heads),
                pdtype)
            buckets = relative_position_buckets(p, p, cfg.num_buckets, cfg.max_distance)
            bias = jnp.transpose(table.astype(jnp.float32)[buckets], (2, 0, 1))  # [N, P, P]
            aux["relative_position_bias"] = bias
        mask = None if valid is None else make_attention_mask(batch=b, q_len=p, kv_len=p,
                                                              kv_valid=valid)

        layer = nn.remat(BEATsLayer, prevent_cse=False) if cfg.remat else BEATsLayer
        scanned = nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True},
                          in_axes=(nn.broadcast, nn.broadcast), length=cfg.depth,
                          metadata_params={nn.PARTITION_NAME: LAYERS})
        x, outs = scanned(config=cfg, collect_output=return_hidden_states, name="layers")(
            x, bias, mask)
        if return_hidden_states:
            aux["layer_outputs"] = outs
        if cfg.layer_norm_first:
            x = ln(x)
        return x, aux


class BEATs(nn.Module):
    """BEATs (`BEATs.extract_features`) on a normalised fbank.

    Parameters: `patch_embed` kernel (p, p, 1, E) [None, None, CONV, EMBED] (+ bias (E,) with
    `conv_bias`); `patch_ln` (E); `post_extract_proj` kernel (E, D), bias (D,) when E != D;
    `encoder/*` (`BEATsEncoder`); `predictor` kernel (D, V), bias (V,) when `num_classes`.
    """

    config: BEATsConfig

    @nn.compact
    def __call__(self, fbank: Float[Array, "B A C"], valid: Bool[Array, "B P"] | None = None, *,
                 return_hidden_states: bool = False
                 ) -> tuple[Float[Array, "B P D"], dict[str, jax.Array]]:
        """Encodes a normalised fbank into audio tokens (about 50 per second).

        Args:
          fbank: float[B, A, C], `input.fbank.beats_fbank` (100 frames per second, C =
            `config.num_mel_bins`). Frames beyond the last whole patch are dropped (198 frames
            -> 12 time patches), as the stride-16 convolution does.
          valid: bool[B, P], True for real tokens, or None (all real). See `token_valid`.
          return_hidden_states: also return every layer's output in aux.

        Returns:
          features: [B, P, D] in `config.dtype`, P = (A // 16) * (C // 16), time-major.
          aux: `patch_embedding_out` [B, A // 16, C // 16, E] (the conv output, channels last);
            `patch_layer_norm_out` [B, P, E]; `post_extract_proj_out` [B, P, D] (when E != D);
            `relative_position_bias` float32[N, P, P] (layer 0's, before gating, when
            `relative_position_embedding`); with `return_hidden_states`, `layer_outputs`
            [L, B, P, D] (the last is `features` for post-LN models); with a predictor, `lprobs`
            float32[B, V]: sigmoid of the mean over valid tokens of the class logits.

        Raises:
          ValueError: if C differs from `config.num_mel_bins`, A < patch size, or `valid` has
            another shape than [B, P].
        """
        cfg = self.config
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        b, a, c = fbank.shape
        ps, e, d = cfg.patch_size, cfg.patch_dim, cfg.width
        if c != cfg.num_mel_bins:
            raise ValueError(f"expected {cfg.num_mel_bins} mel bins, got fbank {fbank.shape}")
        ta, fa = a // ps, c // ps
        if ta == 0:
            raise ValueError(f"fbank {fbank.shape} shorter than one {ps}-frame patch")
        if valid is not None and valid.shape != (b, ta * fa):
            raise ValueError(f"valid {valid.shape} does not match ({b}, {ta * fa}) tokens")
        kw = dict(dtype=dtype, param_dtype=pdtype)

        x = fbank[:, :ta * ps, :fa * ps].astype(dtype)
        x = x.reshape(b, ta, ps, fa, ps).transpose(0, 1, 3, 2, 4).reshape(b, ta * fa, ps, ps, 1)
        x = Einsum((ps, ps, 1, e), (None, None, CONV, EMBED),
                   bias_axes=(EMBED,) if cfg.conv_bias else None, fan_in_axes=(0, 1, 2),
                   name="patch_embed", **kw)("BPyxC,yxCE->BPE", x)
        aux = {"patch_embedding_out": x.reshape(b, ta, fa, e)}
        x = LayerNorm(eps=cfg.ln_eps, param_dtype=pdtype, name="patch_ln")(x)
        aux["patch_layer_norm_out"] = x
        if e != d:
            x = Einsum((e, d), (None, EMBED), bias_axes=(EMBED,), name="post_extract_proj",
                       **kw)("BPE,ED->BPD", x)
            aux["post_extract_proj_out"] = x
        x = nn.with_logical_constraint(x, ACT_BTD)

        x, enc_aux = BEATsEncoder(cfg, name="encoder")(x, valid,
                                                       return_hidden_states=return_hidden_states)
        aux.update(enc_aux)
        if cfg.num_classes:
            logits = Einsum((d, cfg.num_classes), (EMBED, VOCAB), bias_axes=(VOCAB,),
                            name="predictor", **kw)("BPD,DV->BPV", x).astype(jnp.float32)
            aux["lprobs"] = jax.nn.sigmoid(mean_pool(logits, valid))
        return x, aux


# --------------------------------------------------------------------------------------------
# Helpers.


def mean_pool(features: Float[Array, "B P D"], valid: Bool[Array, "B P"] | None = None
              ) -> Float[Array, "B D"]:
    """Mean over the (valid) tokens: LongVALE's one vector per 5.12 s chunk
    (`features.mean(dim=1)`), and how the predictor averages its logits.

    Returns:
      [B, D] in the input dtype; a row without valid tokens gives 0.
    """
    if valid is None:
        return jnp.mean(features, axis=1)
    w = valid.astype(features.dtype)[..., None]
    return jnp.sum(features * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1)


def token_valid(num_frames: np.ndarray | jax.Array, max_frames: int, config: BEATsConfig
                ) -> np.ndarray | jax.Array:
    """Valid-token mask of a batch of fbanks padded at the end to `max_frames` frames.

    A token is valid when its 16-frame time patch lies inside the clip's own frames, so the
    valid tokens are those the clip alone would give (`config.num_tokens(num_frames[b])`).
    The original derives its mask differently (it splits the waveform padding mask evenly over
    tokens, as if tokens were frequency-major); TDC and LongVALE never pad, so it never acts.

    Args:
      num_frames: int[B], real fbank frames per clip (NumPy on the host, or a JAX array
        in-graph; the result is of the same kind).
      max_frames: A of the padded batch.

    Returns:
      bool[B, P], P = `config.num_tokens(max_frames)`.
    """
    xp = jnp if isinstance(num_frames, jax.Array) else np
    ps = config.patch_size
    t = xp.arange(max_frames // ps)
    real = t[None, :] < (xp.asarray(num_frames)[:, None] // ps)  # [B, A // ps]
    return xp.repeat(real, config.mel_patches, axis=1)
