"""Decoder-only LLM: the Qwen2 and Llama families as one module, their differences as config fields.

Follows `transformers` `Qwen2ForCausalLM` (models/qwen2/modeling_qwen2.py) and `LlamaForCausalLM`
(models/llama/modeling_llama.py): pre-norm blocks of grouped-query self-attention with
rotate-half RoPE and a SwiGLU MLP, RMSNorm, optional q/k/v biases (Qwen2), optional tied
embeddings (Qwen2-0.5B, Llama-3.2) and the llama3 RoPE frequency scaling (Llama 3.1+,
`_compute_llama3_parameters` in transformers' modeling_rope_utils.py).

Parameter tree (unscanned; `scan_layers=True` replaces `layers_{i}` by one `layers` subtree whose
leaves carry a leading L axis, see `stack_layer_params`):

  embed_tokens/embedding                     (V, D)
  layers_{i}/input_layernorm/scale           (D,)
  layers_{i}/self_attn/q_proj/kernel, bias   (D, N, H), (N, H)   bias only with qkv_bias
  layers_{i}/self_attn/k_proj/kernel, bias   (D, K, H), (K, H)
  layers_{i}/self_attn/v_proj/kernel, bias   (D, K, H), (K, H)
  layers_{i}/self_attn/o_proj/kernel         (N, H, D)
  layers_{i}/post_attention_layernorm/scale  (D,)
  layers_{i}/mlp/{gate_proj,up_proj}/kernel  (D, M)
  layers_{i}/mlp/down_proj/kernel            (M, D)
  norm/scale                                 (D,)
  lm_head/kernel                             (D, V)              absent with tie_embeddings

Module names follow the HF ones so LoRA targets and freezing regexes carry over.
`convert/decoder_keys.py` maps HF state dicts to this tree and back.
"""

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from longvid_jax.kernels import decode_gpu, dispatch
from longvid_jax.models import (
    ACT_BATCH,
    ACT_BTD,
    ACT_HEADS,
    ACT_KV_HEADS,
    ACT_LEN,
    ACT_VOCAB,
    EMBED,
    HEAD_DIM,
    HEADS,
    KV_HEADS,
    LAYERS,
    MLP,
    VOCAB,
    lora,
)
from longvid_jax.models import attention as attention_lib
from longvid_jax.models.layers import Einsum, EinsumWeights, RMSNorm, activation, fan_in_init
from longvid_jax.variants import config_from_variant

_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor",
                "original_max_position_embeddings")
_REMAT_POLICIES = ("none", "full", "dots", "dots_attention")


def dots_and_attention_saveable(prim, *args, **params) -> bool:
    """Remat policy: save projection matmuls (as `dots_with_no_batch_dims_saveable`) and the
    forward outputs of the flash-attention kernels (output and log-sum-exp of cuDNN's
    `dot_product_attention_fwd`, or of our Pallas kernels), so the backward pass recomputes
    only elementwise work (norms, RoPE, SwiGLU), never attention."""
    if prim.name.startswith("dot_product_attention_fwd") or prim.name == "pallas_call":
        return True
    return jax.checkpoint_policies.dots_with_no_batch_dims_saveable(prim, *args, **params)
_ATTENTION_IMPLS = dispatch.IMPLEMENTATIONS
_DECODE_ATTENTION_IMPLS = ("auto", "xla", "pallas_gpu")


def _one_axis(axes) -> str | None:
    """A single mesh axis name from a `PartitionSpec` entry (None, a name or a 1-tuple)."""
    if axes is None or isinstance(axes, str):
        return axes
    if len(axes) == 1:
        return axes[0]
    raise ValueError(f"the sequence axis is sharded over several mesh axes {axes}; ring "
                     "attention runs over one")


def context_parallel_kwargs() -> dict:
    """Mesh arguments of `dispatch.attention` for context parallelism, from the context.

    The mesh is the one set by `jax.set_mesh` (the trainer's), and the mesh axes come from the
    logical rules in scope (`nn.logical_axis_rules`): the axis `ACT_LEN` maps to carries the
    ring, `ACT_BATCH` / `ACT_HEADS` give the batch and head axes. So model code never names a
    mesh axis, and a config with `("act_len", "context")` and a `context` mesh axis of size > 1
    runs ring attention. Without a mesh (or rules) this returns `{}`.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return {}
    batch, length, heads, _ = nn.logical_to_mesh_axes((ACT_BATCH, ACT_LEN, ACT_HEADS, None))
    axis = _one_axis(length)
    if axis is None:
        return {}
    return {"mesh": mesh, "axis": axis, "batch_axes": batch, "head_axes": heads}


def _fusable(*logical: str) -> bool:
    """Whether projections may be fused into one matmul here: no LoRA context is active (an
    adapter's dropout acts on each layer's input) and none of the `logical` weight axes that the
    fusion concatenates is split over mesh devices (concatenating shards would reshard)."""
    if lora.current()[0] is not None:
        return False
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return True
    for axes in nn.logical_to_mesh_axes(logical):
        for name in (axes,) if isinstance(axes, str) else (axes or ()):
            if mesh.shape[name] > 1:
                return False
    return True


def _canonical_rope_scaling(value: Any) -> tuple | None:
    """Normalises llama3 RoPE scaling to `(("factor", f), ("low_freq_factor", l), ...)` items.

    Accepts None, a mapping (HF `rope_scaling` / `rope_parameters`, optionally with
    `rope_type="llama3"`), a tuple of `(name, value)` items, or a tuple of the four numbers in
    `_LLAMA3_KEYS` order.

    Raises:
      ValueError: for another rope type, missing or unknown keys, or a malformed value.
    """
    if value is None:
        return None
    if isinstance(value, Mapping):
        items = dict(value)
    elif (isinstance(value, (tuple, list)) and value
          and all(isinstance(v, (tuple, list)) and len(v) == 2 for v in value)):
        items = dict(value)
    elif isinstance(value, (tuple, list)) and len(value) == len(_LLAMA3_KEYS):
        items = dict(zip(_LLAMA3_KEYS, value))
    else:
        raise ValueError(f"rope_scaling must be None, a mapping or llama3 items, got {value!r}")
    rope_type = items.pop("rope_type", items.pop("type", "llama3"))
    items.pop("rope_theta", None)  # HF `rope_parameters` also carries the base
    if rope_type != "llama3":
        raise ValueError(f"unsupported rope scaling type {rope_type!r}; only 'llama3' is")
    if set(items) != set(_LLAMA3_KEYS):
        raise ValueError(f"llama3 rope_scaling needs exactly {_LLAMA3_KEYS}, got {sorted(items)}")
    return (("factor", float(items["factor"])),
            ("low_freq_factor", float(items["low_freq_factor"])),
            ("high_freq_factor", float(items["high_freq_factor"])),
            ("original_max_position_embeddings",
             int(items["original_max_position_embeddings"])))


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Sizes and switches of a Qwen2 / Llama decoder (see `VARIANTS` for the named sizes).

    Attributes:
      vocab_size: V.
      hidden_size: D.
      num_layers: L.
      num_heads: N query heads.
      num_kv_heads: K key / value heads (N % K == 0; K == N is plain multi-head attention).
      head_dim: H (even).
      mlp_dim: M, SwiGLU hidden width (HF `intermediate_size`).
      rope_theta: RoPE base (Qwen2 1e6, Llama-3.2 5e5, Llama-2 1e4).
      rope_scaling: llama3 frequency scaling as hashable items
        `(("factor", 32.0), ("low_freq_factor", 1.0), ("high_freq_factor", 4.0),
        ("original_max_position_embeddings", 8192))`; a dict or the four bare numbers are
        normalised to that form. None = plain RoPE.
      rms_eps: RMSNorm epsilon (Qwen2 1e-6, Llama 1e-5).
      qkv_bias: biases on the q / k / v projections (Qwen2).
      tie_embeddings: logits use the token embedding instead of a separate `lm_head`.
      dtype: compute dtype (name or jnp dtype); norms, RoPE, softmax and logits stay float32.
      param_dtype: storage dtype of the weights.
      scan_layers: run the layers with `nn.scan` (parameters stacked on a leading L axis).
      remat_policy: "none", "full" (save nothing per layer), "dots" (save the projection
        matmuls, `jax.checkpoint_policies.dots_with_no_batch_dims_saveable`, recompute the rest,
        attention included) or "dots_attention" (also save the flash-attention outputs:
        `dots_and_attention_saveable`).
      attention_impl: `kernels.dispatch.attention` implementation: "xla", "cudnn" (no
        segment ids), "pallas_gpu", "splash", "ring" (over the mesh axis that the logical
        rules give `act_len`; see `context_parallel_kwargs`), or "auto" (ring when that axis
        has several devices, else chosen from the platform).
      max_score_bytes: the XLA path refuses to build float32 scores [B, N, T, T] above this.
      packed_sequences: rows may hold several sequences (segment ids 1, 2, ...), which needs a
        segment-id kernel (Pallas on GPU). False promises one sequence per row with segment
        ids marking only right padding, so cuDNN serves padded batches through sequence
        lengths (the trainer's pipeline pads, it never packs).
      fused_projections: compute q / k / v with one matmul against their concatenated weights
        (one larger kernel instead of two skinny key / value ones; one input gradient) when a
        call has at least D tokens (decode steps keep three matmuls: concatenating the weights
        would add their size to each step's memory traffic). The parameters are the same
        either way. Skipped automatically inside a LoRA context or when the head weight axes
        are split over devices. (Fusing gate / up the same way was
        measured slower on an H200: the split's backward materialises a [T, 2M] concatenation
        of their gradients.)
      decode_attention_impl: attention of a decode step over the KV cache: "xla"
        (`cached_attention`), "pallas_gpu" (`kernels.decode_gpu`: one split-K kernel per layer
        reading the cache in place) or "auto" (the Pallas kernel on GPU where it takes the
        shapes, else XLA).
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    rope_theta: float = 1e6
    rope_scaling: tuple | None = None
    rms_eps: float = 1e-6
    qkv_bias: bool = False
    tie_embeddings: bool = False
    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = False
    remat_policy: str = "none"
    attention_impl: str = "xla"
    max_score_bytes: int = dispatch.DEFAULT_MAX_SCORE_BYTES
    packed_sequences: bool = True
    fused_projections: bool = True
    decode_attention_impl: str = "auto"

    def __post_init__(self):
        object.__setattr__(self, "rope_scaling", _canonical_rope_scaling(self.rope_scaling))
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "mlp_dim"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads "
                             f"{self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.remat_policy not in _REMAT_POLICIES:
            raise ValueError(f"remat_policy {self.remat_policy!r} not in {_REMAT_POLICIES}")
        if self.attention_impl not in _ATTENTION_IMPLS:
            raise ValueError(f"attention_impl {self.attention_impl!r} not in {_ATTENTION_IMPLS}")
        if self.decode_attention_impl not in _DECODE_ATTENTION_IMPLS:
            raise ValueError(f"decode_attention_impl {self.decode_attention_impl!r} not in "
                             f"{_DECODE_ATTENTION_IMPLS}")
        for name in ("dtype", "param_dtype"):
            try:
                jnp.dtype(getattr(self, name))
            except TypeError:
                raise ValueError(f"{name} {getattr(self, name)!r} is not a dtype") from None

    @property
    def compute_dtype(self) -> jnp.dtype:
        """`dtype` as a jnp dtype."""
        return jnp.dtype(self.dtype)

    @property
    def weight_dtype(self) -> jnp.dtype:
        """`param_dtype` as a jnp dtype."""
        return jnp.dtype(self.param_dtype)


VARIANTS: dict[str, dict[str, Any]] = {
    # Qwen/Qwen2-7B(-Instruct): TDC-7B, LongVA, LLaVA-Video, LLaVA-OV (MMDuet), TPO.
    "qwen2_7b": dict(vocab_size=152064, hidden_size=3584, num_layers=28, num_heads=28,
                     num_kv_heads=4, head_dim=128, mlp_dim=18944, rope_theta=1e6, rms_eps=1e-6,
                     qkv_bias=True, tie_embeddings=False),
    # Qwen/Qwen2-0.5B(-Instruct).
    "qwen2_0_5b": dict(vocab_size=151936, hidden_size=896, num_layers=24, num_heads=14,
                       num_kv_heads=2, head_dim=64, mlp_dim=4864, rope_theta=1e6, rms_eps=1e-6,
                       qkv_bias=True, tie_embeddings=True),
    # meta-llama/Llama-3.2-3B-Instruct: TDC-3B.
    "llama3_2_3b": dict(vocab_size=128256, hidden_size=3072, num_layers=28, num_heads=24,
                        num_kv_heads=8, head_dim=128, mlp_dim=8192, rope_theta=5e5,
                        rope_scaling=(32.0, 1.0, 4.0, 8192), rms_eps=1e-5, qkv_bias=False,
                        tie_embeddings=True),
    # meta-llama/Llama-2-7b-chat-hf (TimeChat) and lmsys/vicuna-7b-v1.5 (LongVALE).
    "llama2_7b": dict(vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32,
                      num_kv_heads=32, head_dim=128, mlp_dim=11008, rope_theta=1e4,
                      rms_eps=1e-5, qkv_bias=False, tie_embeddings=False),
    # Tests and `runlocal` configs: Qwen2-like (q/k/v bias, GQA).
    "tiny": dict(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                 head_dim=16, mlp_dim=128, qkv_bias=True),
}


def make_config(variant: str | None = None, **overrides: Any) -> DecoderConfig:
    """Builds a `DecoderConfig` from a named variant plus field overrides.

    Args:
      variant: a key of `VARIANTS`, or None to give every required field in `overrides`.
      **overrides: `DecoderConfig` fields.

    Raises:
      ValueError: for an unknown variant or field, a missing required field or an invalid value.
    """
    return config_from_variant(DecoderConfig, VARIANTS, variant, overrides)


def from_dict(d: Mapping[str, Any]) -> DecoderConfig:
    """`make_config` from a dict / ConfigDict that may hold a `variant` key."""
    d = dict(d)
    return make_config(d.pop("variant", None), **d)


# ----------------------------------------------------------------------------------------------
# RoPE (rotate-half convention, as transformers; HF q/k weights need no permutation).


def rope_inv_freq(head_dim: int, theta: float, scaling: tuple | None = None) -> np.ndarray:
    """Inverse RoPE frequencies `float32[H // 2]`, optionally with llama3 scaling.

    Computed in float32 NumPy in the order of operations of transformers
    (`compute_default_rope_parameters`, `_compute_llama3_parameters`), so the frequencies
    match HF's `inv_freq` buffers to within one float32 ulp.

    Args:
      head_dim: H.
      theta: RoPE base.
      scaling: llama3 items (see `DecoderConfig.rope_scaling`) or None.
    """
    exps = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    # The power rounded once from float64 (torch's float32 pow is within 1 ulp of it).
    powers = (np.float64(theta) ** exps.astype(np.float64)).astype(np.float32)
    inv = (np.float32(1.0) / powers).astype(np.float32)
    scaling = _canonical_rope_scaling(scaling)
    if scaling is None:
        return inv
    s = dict(scaling)
    factor = np.float32(s["factor"])
    low, high = np.float32(s["low_freq_factor"]), np.float32(s["high_freq_factor"])
    orig = np.float32(s["original_max_position_embeddings"])
    low_freq_wavelen, high_freq_wavelen = orig / low, orig / high
    wavelen = np.float32(2 * math.pi) / inv
    inv_scaled = np.where(wavelen > low_freq_wavelen, inv / factor, inv)
    smooth = (orig / wavelen - low) / (high - low)
    smoothed = (np.float32(1) - smooth) * inv_scaled / factor + smooth * inv_scaled
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(medium, smoothed, inv_scaled).astype(np.float32)


def rope_cos_sin(positions: Int[Array, "B T"], inv_freq: np.ndarray | jax.Array
                 ) -> tuple[Float[Array, "B T H"], Float[Array, "B T H"]]:
    """cos / sin tables `float32[B, T, H]` for integer positions (frequencies repeated twice)."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: Float[Array, "B T N H"], cos: Float[Array, "B T H"],
               sin: Float[Array, "B T H"]) -> Float[Array, "B T N H"]:
    """Rotate-half RoPE `x * cos + rotate_half(x) * sin`, in float32, returned in x's dtype."""
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    out = x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)


# ----------------------------------------------------------------------------------------------
# Modules.


class Embedder(nn.Module):
    """Token embedding `(V, D)`; also the tied output head.

    Follows `nn.Embedding` `embed_tokens` and, with tied weights, `lm_head` of HF.
    """

    config: DecoderConfig

    def setup(self):
        cfg = self.config
        self.embedding = self.param(
            "embedding", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                      (VOCAB, EMBED)),
            (cfg.vocab_size, cfg.hidden_size), cfg.weight_dtype)

    def __call__(self, tokens: Int[Array, "B T"]) -> Float[Array, "B T D"]:
        """Looks up `tokens` (ids in [0, V); others give NaN rows) -> [B, T, D] in dtype."""
        return jnp.take(self.embedding, tokens, axis=0).astype(self.config.compute_dtype)

    def attend(self, x: Float[Array, "B T D"]) -> Float[Array, "B T V"]:
        """Tied logits `x @ embedding.T`: operands in dtype, float32 accumulation and result."""
        dtype = self.config.compute_dtype
        return jnp.einsum("BTD,VD->BTV", x.astype(dtype), self.embedding.astype(dtype),
                          preferred_element_type=jnp.float32)


class LMHead(nn.Module):
    """Untied output head `kernel (D, V)`: operands in dtype, float32 logits."""

    config: DecoderConfig

    def setup(self):
        cfg = self.config
        self.kernel = self.param(
            "kernel", nn.with_logical_partitioning(fan_in_init((0,)), (EMBED, VOCAB)),
            (cfg.hidden_size, cfg.vocab_size), cfg.weight_dtype)

    def __call__(self, x: Float[Array, "B T D"]) -> Float[Array, "B T V"]:
        dtype = self.config.compute_dtype
        return jnp.einsum("BTD,DV->BTV", x.astype(dtype), self.kernel.astype(dtype),
                          preferred_element_type=jnp.float32)


def _fused_einsum(x: jax.Array, eqn: str, axis: int,
                  specs: Mapping[str, tuple[tuple[int, ...], tuple, tuple | None]],
                  dtype: Any, param_dtype: Any) -> list[jax.Array]:
    """Several projections of `x` with one einsum against their weights concatenated on weight
    `axis` (the first output axis, the one whose size differs between them), split back in
    `specs` order.

    Each projection keeps its own parameters (`EinsumWeights` named by the `specs` key, with
    (shape, logical axes, bias axes or None); biases cover the weight axes from `axis` on).
    Call from a compact method. The einsum's output keeps x's leading axes, then the weight's
    axes from `axis` on."""
    weights = [EinsumWeights(shape, axes, bias_axes=b, param_dtype=param_dtype, name=name)()
               for name, (shape, axes, b) in specs.items()]
    w = jnp.concatenate([wt.astype(dtype) for wt, _ in weights], axis=axis)
    y = jnp.einsum(eqn, x.astype(dtype), w)
    if any(b is not None for _, b in weights):
        y = y + jnp.concatenate([jnp.zeros(wt.shape[axis:], dtype) if b is None
                                 else b.astype(dtype) for wt, b in weights], axis=0)
    out_axis = x.ndim - 1 + axis - 1
    sizes = np.cumsum([wt.shape[axis] for wt, _ in weights])[:-1]
    return jnp.split(y, sizes, axis=out_axis)


class Attention(nn.Module):
    """Causal GQA self-attention with RoPE (HF `Qwen2Attention` / `LlamaAttention`)."""

    config: DecoderConfig

    @nn.compact
    def __call__(self, x: Float[Array, "B T D"], cos: Float[Array, "B T H"],
                 sin: Float[Array, "B T H"], segment_ids: Int[Array, "B T"] | None,
                 layer_cache: Mapping[str, Any] | None = None,
                 cache_lengths: Array | None = None):
        """Self-attention, optionally against a KV cache.

        Args:
          x: [B, T, D]; cos, sin: float32[B, T, H] RoPE tables of the tokens' positions.
          segment_ids: int32[B, T] or None (see `Decoder.__call__`).
          layer_cache: None (no cache: returns the output only), an empty dict (prefill:
            also returns this call's keys / values `{"k", "v"}` [B, T, K, H] in the compute
            dtype), or `{"k", "v"}` cached keys / values [B, S, K, H] (or the stacked
            [L, B, S, K, H] with a static `"layer"` index) (decode: T new tokens attend to the
            valid cached slots and causally to each other; returns the new tokens' keys /
            values, which the caller writes into the cache).
          cache_lengths: int32[B], the valid cached slots of each row (decode only).

        Returns:
          [B, T, D], or ([B, T, D], {"k", "v"} [B, T, K, H]) with a cache.
        """
        cfg = self.config
        d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        proj = dict(dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype)
        bias = (lambda heads: (heads, HEAD_DIM)) if cfg.qkv_bias else (lambda heads: None)
        specs = {"q_proj": ((d, n, h), (EMBED, HEADS, HEAD_DIM), bias(HEADS)),
                 "k_proj": ((d, k, h), (EMBED, KV_HEADS, HEAD_DIM), bias(KV_HEADS)),
                 "v_proj": ((d, k, h), (EMBED, KV_HEADS, HEAD_DIM), bias(KV_HEADS))}
        # Fusing concatenates the weights on every call: worth it only for many tokens
        # (training, prefill), not for decode steps, which are bound by reading the weights.
        many_tokens = x.shape[0] * x.shape[1] >= d
        if cfg.fused_projections and many_tokens and _fusable(HEADS, KV_HEADS):
            q, kk, v = _fused_einsum(x, "BTD,DNH->BTNH", 1, specs, cfg.compute_dtype,
                                     cfg.weight_dtype)
        else:
            q, kk, v = (Einsum(shape, axes, bias_axes=b, name=name, **proj)(
                "BTD,DNH->BTNH", x) for name, (shape, axes, b) in specs.items())
        q = nn.with_logical_constraint(apply_rope(q, cos, sin), (ACT_BATCH, ACT_LEN, ACT_HEADS,
                                                                 None))
        kk = nn.with_logical_constraint(apply_rope(kk, cos, sin), (ACT_BATCH, ACT_LEN,
                                                                   ACT_KV_HEADS, None))
        v = nn.with_logical_constraint(v, (ACT_BATCH, ACT_LEN, ACT_KV_HEADS, None))
        if layer_cache:  # decode against the cache (T is small)
            out = cached_attention(q, kk, v, layer_cache["k"], layer_cache["v"], cache_lengths,
                                   segment_ids, layer=layer_cache.get("layer"),
                                   implementation=cfg.decode_attention_impl)
        else:
            # Causal by index (as HF), restricted to equal segment ids (packing / padding).
            out = dispatch.attention(q, kk, v, causal=True, segment_ids=segment_ids,
                                     implementation=cfg.attention_impl,
                                     max_score_bytes=cfg.max_score_bytes,
                                     padding_only=not cfg.packed_sequences,
                                     **context_parallel_kwargs())
        out = nn.with_logical_constraint(out, (ACT_BATCH, ACT_LEN, ACT_HEADS, None))
        out = Einsum((n, h, d), (HEADS, HEAD_DIM, EMBED), fan_in_axes=(0, 1), name="o_proj",
                     **proj)("BTNH,NHD->BTD", out)
        if layer_cache is None:
            return out
        dtype = cfg.compute_dtype
        return out, {"k": kk.astype(dtype), "v": v.astype(dtype)}


class FeedForward(nn.Module):
    """SwiGLU MLP `down(silu(gate(x)) * up(x))` (HF `Qwen2MLP` / `LlamaMLP`)."""

    config: DecoderConfig

    @nn.compact
    def __call__(self, x: Float[Array, "B T D"]) -> Float[Array, "B T D"]:
        cfg = self.config
        d, m = cfg.hidden_size, cfg.mlp_dim
        proj = dict(dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype)
        gate = Einsum((d, m), (EMBED, MLP), name="gate_proj", **proj)("BTD,DM->BTM", x)
        up = Einsum((d, m), (EMBED, MLP), name="up_proj", **proj)("BTD,DM->BTM", x)
        hidden = activation("silu")(gate) * up
        return Einsum((m, d), (MLP, EMBED), name="down_proj", **proj)("BTM,MD->BTD", hidden)


class DecoderLayer(nn.Module):
    """Pre-norm block: `x + attn(norm(x))`, then `x + mlp(norm(x))` (HF `*DecoderLayer`).

    Returns `(x, None)` (or `(x, new keys / values)` with a cache, see `Attention`) so the same
    module runs under `nn.scan`.
    """

    config: DecoderConfig

    @nn.compact
    def __call__(self, x: Float[Array, "B T D"], cos: Float[Array, "B T H"],
                 sin: Float[Array, "B T H"], segment_ids: Int[Array, "B T"] | None,
                 layer_cache: Mapping[str, Any] | None = None,
                 cache_lengths: Array | None = None
                 ) -> tuple[Float[Array, "B T D"], Any]:
        cfg = self.config
        x = nn.with_logical_constraint(x, ACT_BTD)
        h = RMSNorm(cfg.rms_eps, param_dtype=cfg.weight_dtype, name="input_layernorm")(x)
        out = Attention(cfg, name="self_attn")(h, cos, sin, segment_ids, layer_cache,
                                               cache_lengths)
        kv = None
        if layer_cache is not None:
            out, kv = out
        x = x + out
        h = RMSNorm(cfg.rms_eps, param_dtype=cfg.weight_dtype, name="post_attention_layernorm")(x)
        x = x + FeedForward(cfg, name="mlp")(h)
        return nn.with_logical_constraint(x, ACT_BTD), kv


class Decoder(nn.Module):
    """Decoder-only causal LM (HF `Qwen2ForCausalLM` / `LlamaForCausalLM` by config).

    Three public methods: `embed` (tokens -> embeddings), `__call__` (embeddings -> final-norm
    hidden states) and `logits` (hidden -> float32 logits), so a multimodal model can splice
    visual embeddings between the first two. `init` through `__call__` creates every parameter
    (embedding and head included), e.g. `Decoder(cfg).init(rng, embeds, positions)`.
    """

    config: DecoderConfig

    def setup(self):
        cfg = self.config
        self.embed_tokens = Embedder(cfg)
        layer_cls = DecoderLayer
        if cfg.remat_policy != "none":
            policy = {"full": None,
                      "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
                      "dots_attention": dots_and_attention_saveable}[cfg.remat_policy]
            layer_cls = nn.remat(layer_cls, policy=policy, prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            self.layers = nn.scan(
                layer_cls, variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast),
                length=cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: LAYERS})(cfg)
        else:
            self.layers = [layer_cls(cfg) for _ in range(cfg.num_layers)]
        self.norm = RMSNorm(cfg.rms_eps, param_dtype=cfg.weight_dtype)
        if not cfg.tie_embeddings:
            self.lm_head = LMHead(cfg)

    def embed(self, tokens: Int[Array, "B T"]) -> Float[Array, "B T D"]:
        """Token embeddings.

        Args:
          tokens: int32[B, T] ids in [0, V) (ids outside give NaN rows: replace them).

        Returns:
          [B, T, D] in the compute dtype.
        """
        return nn.with_logical_constraint(self.embed_tokens(tokens), ACT_BTD)

    def __call__(self, embeds: Float[Array, "B T D"], positions: Int[Array, "B T"],
                 segment_ids: Int[Array, "B T"] | None = None, *,
                 return_hidden_states: bool = False,
                 cache: Mapping[str, Array] | None = None,
                 ) -> tuple[Float[Array, "B T D"], dict[str, Any]]:
        """Runs the layers and the final norm, optionally reading / writing a KV cache.

        Args:
          embeds: [B, T, D] input embeddings (cast to the compute dtype).
          positions: int32[B, T] RoPE positions (restart at 0 per packed segment).
          segment_ids: int32[B, T] or None. Attention is causal by index and stays within
            equal ids (packing); id 0 marks padding, whose outputs are meaningless.
          return_hidden_states: also return `aux["hidden_states"]`, a list of L + 1 arrays
            [B, T, D]: each layer's input, then the final (normed) output, like HF
            `output_hidden_states`. Not supported with `scan_layers`.
          cache: None, or a KV cache from `init_cache` (keys / values of right-padded rows,
            `lengths[b]` valid slots in row b). With T > 1 the call is a prefill of an EMPTY
            cache: attention runs through the usual dispatch path over these T tokens, their
            keys / values go to slots 0..T-1, and `lengths` becomes the count of
            `segment_ids > 0` per row (T without segment ids), so `segment_ids` may only mark
            right padding (1 then 0). With T == 1 the call is a decode step: each row's token
            attends to its `lengths[b]` cached slots and itself (XLA attention) and is written
            at slot `lengths[b]`, which then grows by one. The caller gives matching `positions`
            (0..T-1 at prefill, `lengths` at decode). Slots past S are silently dropped: the
            caller sizes the cache.

        Returns:
          (hidden [B, T, D] in the compute dtype after the final norm, aux dict); with a cache,
          `aux["cache"]` is the updated cache (donate the old one under jit).

        Raises:
          ValueError: on a width / shape mismatch, hidden states requested with scan_layers or
            a cache, or a cache of the wrong shape.
        """
        cfg = self.config
        if embeds.ndim != 3 or embeds.shape[-1] != cfg.hidden_size:
            raise ValueError(f"embeds must be [B, T, {cfg.hidden_size}], got {embeds.shape}")
        if positions.shape != embeds.shape[:2]:
            raise ValueError(f"positions {positions.shape} != embeds[:2] {embeds.shape[:2]}")
        if segment_ids is not None and segment_ids.shape != embeds.shape[:2]:
            raise ValueError(f"segment_ids {segment_ids.shape} != embeds[:2] {embeds.shape[:2]}")
        if return_hidden_states and cfg.scan_layers:
            raise ValueError("return_hidden_states is not supported with scan_layers=True")
        if cache is not None:
            if return_hidden_states:
                raise ValueError("return_hidden_states is not supported with a cache")
            _check_cache(cache, cfg, embeds.shape[0])
        x = nn.with_logical_constraint(embeds.astype(cfg.compute_dtype), ACT_BTD)
        cos, sin = rope_cos_sin(positions, rope_inv_freq(cfg.head_dim, cfg.rope_theta,
                                                         cfg.rope_scaling))
        decode = cache is not None and embeds.shape[1] == 1
        if cache is None:
            layer_caches, cache_lengths = None, None
        elif decode:
            layer_caches = {"k": cache["k"], "v": cache["v"]}
            cache_lengths = cache["lengths"]
        else:
            layer_caches, cache_lengths = {}, None
        hidden_states = []
        if cfg.scan_layers:  # the scan hands each layer its [B, S, K, H] slice
            x, new_kv = self.layers(x, cos, sin, segment_ids, layer_caches, cache_lengths)
        else:
            new_kvs = []
            for i, layer in enumerate(self.layers):
                if return_hidden_states:
                    hidden_states.append(x)
                # Decode reads layer i of the stacked cache in place (static index).
                layer_cache = (dict(layer_caches, layer=i) if layer_caches else layer_caches)
                x, kv = layer(x, cos, sin, segment_ids, layer_cache, cache_lengths)
                new_kvs.append(kv)
            new_kv = None if cache is None else jax.tree.map(lambda *a: jnp.stack(a), *new_kvs)
        x = nn.with_logical_constraint(self.norm(x), ACT_BTD)
        aux: dict[str, Any] = {}
        if return_hidden_states:
            aux["hidden_states"] = hidden_states + [x]
        if cache is not None:
            aux["cache"] = _write_cache(cache, new_kv, segment_ids, decode)
        if self.is_initializing():  # create the embedding and head parameters too
            self.embed(jnp.zeros((1, 1), jnp.int32))
            self.logits(x[:1, :1])
        return x, aux

    def logits(self, hidden: Float[Array, "B T D"]) -> Float[Array, "B T V"]:
        """float32[B, T, V] logits from `lm_head`, or the embedding when tied."""
        if self.config.tie_embeddings:
            out = self.embed_tokens.attend(hidden)
        else:
            out = self.lm_head(hidden)
        return nn.with_logical_constraint(out, (ACT_BATCH, ACT_LEN, ACT_VOCAB))

    def head_weight(self) -> Float[Array, "D V"]:
        """The output head as a `(D, V)` array (the embedding transposed when tied), for losses
        that compute logits a chunk of tokens at a time (`losses.chunked_lm_loss`)."""
        if self.config.tie_embeddings:
            return self.embed_tokens.embedding.T
        return self.lm_head.kernel


Model = Decoder


# ----------------------------------------------------------------------------------------------
# KV cache.


CACHE_ALIGN = 64  # cache slots are allocated in multiples of this (the decode kernel's tile)


def init_cache(config: DecoderConfig, batch: int, max_len: int) -> dict[str, jax.Array]:
    """An empty KV cache for `Decoder.__call__(..., cache=...)`.

    Layout (one stacked array per kind, for scanned and unscanned layers alike):
      k, v: [L, B, S, K, H] in the compute dtype, zeros; S = max_len rounded up to a multiple
        of `CACHE_ALIGN` (64), so the Pallas decode kernel tiles it (the extra slots are
        never valid);
      lengths: int32[B], the valid slots of each row (0).

    Raises:
      ValueError: for a non-positive batch or max_len.
    """
    if batch < 1 or max_len < 1:
        raise ValueError(f"batch and max_len must be positive, got {batch}, {max_len}")
    slots = -(-max_len // CACHE_ALIGN) * CACHE_ALIGN
    shape = (config.num_layers, batch, slots, config.num_kv_heads, config.head_dim)
    return {"k": jnp.zeros(shape, config.compute_dtype),
            "v": jnp.zeros(shape, config.compute_dtype),
            "lengths": jnp.zeros((batch,), jnp.int32)}


def _check_cache(cache: Mapping[str, Any], cfg: DecoderConfig, batch: int) -> None:
    if set(cache) != {"k", "v", "lengths"}:
        raise ValueError(f"cache must hold k, v and lengths, got {sorted(cache)}")
    want = (cfg.num_layers, batch, cfg.num_kv_heads, cfg.head_dim)
    for name in ("k", "v"):
        shape = cache[name].shape
        if len(shape) != 5 or (shape[0], shape[1], shape[3], shape[4]) != want:
            raise ValueError(f"cache[{name!r}] has shape {shape}; want [L, B, S, K, H] with "
                             f"(L, B, K, H) = {want}")
    if cache["lengths"].shape != (batch,):
        raise ValueError(f"cache['lengths'] has shape {cache['lengths'].shape}, want ({batch},)")


def _write_cache(cache: Mapping[str, jax.Array], new_kv: Mapping[str, jax.Array],
                 segment_ids: jax.Array | None, decode: bool) -> dict[str, jax.Array]:
    """Writes the new keys / values `[L, B, T, K, H]`: at slot `lengths[b]` of row b (decode,
    T == 1) or at slots 0..T-1 (prefill); returns the cache with updated lengths."""
    k, v, lengths = cache["k"], cache["v"], cache["lengths"]
    if decode:
        rows = jnp.arange(k.shape[1])
        k = k.at[:, rows, lengths].set(new_kv["k"][:, :, 0].astype(k.dtype), mode="drop")
        v = v.at[:, rows, lengths].set(new_kv["v"][:, :, 0].astype(v.dtype), mode="drop")
        return {"k": k, "v": v, "lengths": lengths + 1}
    t = new_kv["k"].shape[2]
    k = jax.lax.dynamic_update_slice(k, new_kv["k"].astype(k.dtype), (0, 0, 0, 0, 0))
    v = jax.lax.dynamic_update_slice(v, new_kv["v"].astype(v.dtype), (0, 0, 0, 0, 0))
    if segment_ids is None:
        lengths = jnp.full_like(lengths, t)
    else:
        lengths = (segment_ids > 0).sum(axis=1).astype(jnp.int32)
    return {"k": k, "v": v, "lengths": lengths}


def cached_attention(q: Float[Array, "B T N H"], k: Float[Array, "B T K H"],
                     v: Float[Array, "B T K H"], k_cache: Float[Array, "*L B S K H"],
                     v_cache: Float[Array, "*L B S K H"], lengths: Int[Array, " B"],
                     segment_ids: Int[Array, "B T"] | None = None, *, layer: int | None = None,
                     implementation: str = "xla") -> Float[Array, "B T N H"]:
    """Attention of T new tokens over the valid cached slots and, causally, over themselves.

    The cache is read in place (never concatenated with the new keys). The XLA path joins the
    scores against the cache and against the new tokens before one float32 softmax, as
    `attention.dot_product_attention_ref` computes them (masks from `make_attention_mask`); it
    is the reference of the Pallas path (`kernels.decode_gpu.decode_attention`).

    Args:
      q: [B, T, N, H] queries (RoPE applied); k, v: [B, T, K, H] the new tokens' keys / values.
      k_cache, v_cache: [B, S, K, H], or the stacked [L, B, S, K, H] with `layer` its static
        index.
      lengths: int32[B], slots 0..lengths[b]-1 of row b are attended.
      segment_ids: int32[B, T] or None; new tokens see each other only within equal ids.
      layer: see k_cache.
      implementation: "xla", "pallas_gpu" (run in the Pallas interpreter off GPU, for tests)
        or "auto" (Pallas on GPU where `decode_gpu.supported` takes the shapes, else XLA).

    Returns:
      [B, T, N, H] in q's dtype.
    """
    b, t, n, h = q.shape
    on_gpu = jax.default_backend() in ("gpu", "cuda")
    if implementation == "auto":
        ok = decode_gpu.supported(t, n, k.shape[2], h, k_cache.shape[-3])
        implementation = "pallas_gpu" if ok and on_gpu else "xla"
    if implementation == "pallas_gpu":  # interpreted off GPU (tests)
        return decode_gpu.decode_attention(q, k, v, k_cache, v_cache, lengths, layer=layer,
                                           segment_ids=segment_ids, interpret=not on_gpu)
    if layer is not None:
        k_cache, v_cache = k_cache[layer], v_cache[layer]
    cache_valid = jnp.arange(k_cache.shape[1], dtype=jnp.int32)[None, :] < lengths[:, None]
    kh, s = k.shape[2], k_cache.shape[1]
    g = n // kh
    qg = q.reshape(b, t, kh, g, h)
    scale = h**-0.5
    old = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k_cache.astype(q.dtype),
                     preferred_element_type=jnp.float32) * scale
    new = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k.astype(q.dtype),
                     preferred_element_type=jnp.float32) * scale
    old_mask = attention_lib.make_attention_mask(batch=b, q_len=t, kv_len=s,
                                                 kv_valid=cache_valid)
    new_mask = attention_lib.make_attention_mask(batch=b, q_len=t, kv_len=t, causal=True,
                                                 q_segment_ids=segment_ids,
                                                 kv_segment_ids=segment_ids)
    neg = -0.7 * float(jnp.finfo(jnp.float32).max)  # as attention.py
    old = jnp.where(old_mask[:, :, None], old, neg)  # [B, 1, 1, T, S] over [B, K, G, T, S]
    new = jnp.where(new_mask[:, :, None], new, neg)
    # One softmax over both parts without concatenating them (a concatenation of the scores
    # made XLA fuse the whole score computation into a slow concatenate kernel on GPU).
    top = jnp.maximum(old.max(axis=-1, keepdims=True), new.max(axis=-1, keepdims=True))
    p_old, p_new = jnp.exp(old - top), jnp.exp(new - top)
    denom = p_old.sum(axis=-1) + p_new.sum(axis=-1)  # [B, K, G, T]
    out = (jnp.einsum("BKGTS,BSKH->BTKGH", p_old.astype(v.dtype), v_cache.astype(v.dtype),
                      preferred_element_type=jnp.float32)
           + jnp.einsum("BKGTS,BSKH->BTKGH", p_new.astype(v.dtype), v,
                        preferred_element_type=jnp.float32))
    out = out / jnp.moveaxis(denom, 3, 1)[..., None]
    return out.reshape(b, t, n, h).astype(q.dtype)


# ----------------------------------------------------------------------------------------------
# Parameter layouts.


def stack_layer_params(params: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
    """Unscanned tree (`layers_0` ... `layers_{L-1}`) -> scanned tree (`layers`, leading L axis).

    Works on nested dicts of arrays (NumPy or JAX); other top-level entries are kept.

    Raises:
      ValueError: if a `layers_{i}` subtree is missing or the layer trees differ in structure.
    """
    params = dict(params)
    subtrees = []
    for i in range(num_layers):
        if f"layers_{i}" not in params:
            raise ValueError(f"missing layers_{i} in params (keys {sorted(params)})")
        subtrees.append(params.pop(f"layers_{i}"))
    extra = sorted(k for k in params if k.startswith("layers"))
    if extra:
        raise ValueError(f"unexpected layer entries {extra} for num_layers={num_layers}")
    structure = jax.tree.structure(subtrees[0])
    for i, tree in enumerate(subtrees):
        if jax.tree.structure(tree) != structure:
            raise ValueError(f"layers_{i} has a different structure from layers_0")

    def stack(*xs):
        return (np if all(isinstance(x, np.ndarray) for x in xs) else jnp).stack(xs)

    params["layers"] = jax.tree.map(stack, *subtrees)
    return params


def unstack_layer_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Scanned tree (`layers` with a leading L axis) -> unscanned (`layers_0` ...).

    Raises:
      ValueError: if there is no `layers` entry.
    """
    params = dict(params)
    if "layers" not in params:
        raise ValueError(f"no scanned 'layers' entry in params (keys {sorted(params)})")
    stacked = params.pop("layers")
    num_layers = jax.tree.leaves(stacked)[0].shape[0]
    for i in range(num_layers):
        params[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
    return params
