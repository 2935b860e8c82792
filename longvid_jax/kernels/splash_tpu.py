"""Thin wrapper over the Pallas TPU splash attention kernel (causal, segment ids, GQA).

Uses `jax.experimental.pallas.ops.tpu.splash_attention` (the sparse flash attention kernel of
JAX; block-sparse masks skip fully masked tiles). This module converts the project layout
q [B, T, N, H] / k, v [B, S, K, H] to the kernel's per-example [N, T, H] / [K, S, H], builds
the static mask (causal or full, one per query head), scales q (the kernel does not scale) and
`vmap`s over the batch. Segment ids for packed sequences go to the kernel's `SegmentIds`.
GQA uses the kernel's MHA path, which accepts N % K == 0 kv heads.

The kernel is written for TPUs; `interpret=True` runs it in the Pallas interpreter on any
backend (CI runs it on CPU, with TPU-sized tiles of 128).
"""

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as _sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as _sm
from jaxtyping import Array, Float, Int

from longvid_jax.models.attention import masked_attention_ref


def make_splash_mask(num_heads: int, q_len: int, kv_len: int, *, causal: bool):
    """The kernel's static mask: a `MultiHeadMask` of `num_heads` causal or full masks.

    Causal follows `make_attention_mask` (query t sees keys s <= t, both from 0).
    """
    one = _sm.CausalMask((q_len, kv_len)) if causal else _sm.FullMask((q_len, kv_len))
    return _sm.MultiHeadMask([one] * num_heads)


def default_block_sizes(q_len: int, kv_len: int, block: int = 512) -> "_sk.BlockSizes":
    """Equal forward / backward tiles of min(block, length) (TPU wants multiples of 128)."""
    bq, bkv = min(block, q_len), min(block, kv_len)
    return _sk.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq,
                          block_kv_dkv=bkv, block_kv_dkv_compute=bkv, block_q_dq=bq,
                          block_kv_dq=bkv)


def splash_attention(
    q: Float[Array, "B T N H"],
    k: Float[Array, "B S K H"],
    v: Float[Array, "B S K H"],
    *,
    causal: bool = False,
    q_segment_ids: Int[Array, "B T"] | None = None,
    kv_segment_ids: Int[Array, "B S"] | None = None,
    scale: float | None = None,
    block_sizes: "_sk.BlockSizes | None" = None,
    interpret: bool = False,
) -> Float[Array, "B T N H"]:
    """Splash attention on TPU (differentiable: the library kernel has its own VJP).

    Args:
      q: [B, T, N, H] queries; k, v: [B, S, K, H], N % K == 0.
      causal: query t sees keys s <= t.
      q_segment_ids, kv_segment_ids: int32[B, T] / int32[B, S], both or neither. Every query
        row must keep at least one visible key (true for causal self-attention with packing).
      scale: logit scale, default H**-0.5 (applied to q before the kernel).
      block_sizes: kernel tiles, default `default_block_sizes(T, S)`; T and S must be multiples.
      interpret: run in the Pallas interpreter (any backend; slow, for tests).

    Returns:
      [B, T, N, H] in q's dtype.

    Raises:
      ValueError: on N % K != 0, lengths not multiples of the tiles, or half-given segment ids.
    """
    _b, t, n, h = q.shape
    s_len, kh = k.shape[1], k.shape[2]
    if n % kh:
        raise ValueError(f"query heads {n} not a multiple of kv heads {kh}")
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("q_segment_ids and kv_segment_ids must be given together")
    block_sizes = block_sizes or default_block_sizes(t, s_len)
    if t % block_sizes.block_q or s_len % block_sizes.block_kv:
        raise ValueError(f"lengths T={t}, S={s_len} not multiples of tiles "
                         f"{block_sizes.block_q}, {block_sizes.block_kv}; pad the sequence")
    scale = h**-0.5 if scale is None else float(scale)
    kernel = _sk.make_splash_mha(make_splash_mask(n, t, s_len, causal=causal),
                                 block_sizes=block_sizes, head_shards=1, q_seq_shards=1,
                                 interpret=interpret)
    qs = (q * jnp.asarray(scale, q.dtype)).transpose(0, 2, 1, 3)  # [B, N, T, H]
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, S, H]
    if q_segment_ids is None:
        out = jax.vmap(kernel)(qs, kt, vt)
    else:
        seg = _sk.SegmentIds(q=q_segment_ids.astype(jnp.int32),
                             kv=kv_segment_ids.astype(jnp.int32))
        out = jax.vmap(lambda a, b_, c, d: kernel(a, b_, c, segment_ids=d))(qs, kt, vt, seg)
    return out.transpose(0, 2, 1, 3).astype(q.dtype)


# The pure-JAX reference this kernel is tested against.
splash_attention_ref = masked_attention_ref
