"""Pallas decode attention for GPUs: a few new tokens against a long KV cache (split-K).

One decode step of a batch-1 7B model reads ~8 MB of cached keys and values per layer; XLA's
attention over the cache (score einsum, masked softmax reductions, value einsum) costs several
kernels per layer. This kernel reads each layer's cache once, in one launch: the grid runs over
(batch row, kv head, split of the cache slots), each program keeps a running max / sum over its
split's key blocks (online softmax, as FlashAttention) for the G query heads that share the kv
head, and writes a partial output with its max and sum. `decode_attention` then merges the
splits with the new tokens' own causal block (log-sum-exp weighting, "flash-decoding",
Dao et al. 2023) in a few small XLA ops, so the cache is never concatenated with the new keys.

The cache may be one layer's [B, S, K, H] or the decoder's stacked [L, B, S, K, H] with a static
`layer` index: the kernel then reads that layer's slots in place (slicing first would copy them).
Triton backend of Pallas (`pallas.triton.CompilerParams`); `interpret=True` runs it anywhere
(CI on CPU). Letters as in `models/__init__.py`: B batch, T new tokens, N query heads, K kv
heads, G = N // K, H head dim, S cache slots, L layers.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jaxtyping import Array, Float, Int

from longvid_jax.kernels.flash_gpu import online_softmax_step

_NEG_INF = -0.7 * float(jnp.finfo(jnp.float32).max)
_DIMS_NT = (((1,), (1,)), ((), ()))  # [a, h] x [b, h] -> [a, b]


def _split_kernel(len_ref, q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, *, scale, block_k,
                  blocks_per_split, num_blocks):
    """One (row, kv head, split): online softmax of the [M, H] queries over the split's valid
    key blocks; writes the unnormalised output [M, H], running max [M] and sum [M]."""
    split = pl.program_id(2)
    length = len_ref[0]
    q = q_ref[...]
    first = split * blocks_per_split
    last = jnp.minimum(jnp.minimum(first + blocks_per_split, num_blocks),
                       lax.div(length + block_k - 1, block_k))

    def body(j, carry):
        start = pl.multiple_of(j * block_k, block_k)
        k = k_ref[pl.ds(start, block_k), :]
        v = v_ref[pl.ds(start, block_k), :]
        s = lax.dot_general(q, k, _DIMS_NT, preferred_element_type=jnp.float32) * scale
        pos = start + lax.broadcasted_iota(jnp.int32, (block_k,), 0)
        s = jnp.where((pos < length)[None, :], s, _NEG_INF)
        return online_softmax_step(carry, s, v)

    rows = q.shape[0]
    init = (jnp.full((rows,), _NEG_INF, jnp.float32), jnp.zeros((rows,), jnp.float32),
            jnp.zeros(q.shape, jnp.float32))
    m, l, acc = lax.fori_loop(first, last, body, init)
    o_ref[...] = acc
    m_ref[...] = m
    l_ref[...] = l


def _num_splits(batch, kv_heads, num_blocks, target_programs):
    """(blocks per split, splits): about `target_programs` programs in all, whole blocks each."""
    want = max(1, min(num_blocks, -(-target_programs // (batch * kv_heads))))
    per = -(-num_blocks // want)
    return per, -(-num_blocks // per)


def _cache_splits(q_rows, k_cache, v_cache, lengths, layer, *, scale, block_k, target_programs,
                  num_warps, num_stages, interpret):
    """Partial results over the cache: o float32[B, K, P, M, H], m / l float32[B, K, P, M]."""
    b, kh, rows, h = q_rows.shape
    s_len = k_cache.shape[-3]
    num_blocks = s_len // block_k
    per, splits = _num_splits(b, kh, num_blocks, target_programs)
    sq = pl.squeezed
    if layer is None:
        kv_spec = pl.BlockSpec((sq, s_len, sq, h), lambda bi, ki, si: (bi, 0, ki, 0))
    else:
        kv_spec = pl.BlockSpec((sq, sq, s_len, sq, h),
                               lambda bi, ki, si: (layer, bi, 0, ki, 0))
    kernel = functools.partial(_split_kernel, scale=scale, block_k=block_k,
                               blocks_per_split=per, num_blocks=num_blocks)
    row_spec = pl.BlockSpec((sq, sq, sq, rows), lambda bi, ki, si: (bi, ki, si, 0))
    return pl.pallas_call(
        kernel,
        grid=(b, kh, splits),
        in_specs=[pl.BlockSpec((1,), lambda bi, ki, si: (bi,)),
                  pl.BlockSpec((sq, sq, rows, h), lambda bi, ki, si: (bi, ki, 0, 0)),
                  kv_spec, kv_spec],
        out_specs=[pl.BlockSpec((sq, sq, sq, rows, h), lambda bi, ki, si: (bi, ki, si, 0, 0)),
                   row_spec, row_spec],
        out_shape=[jax.ShapeDtypeStruct((b, kh, splits, rows, h), jnp.float32),
                   jax.ShapeDtypeStruct((b, kh, splits, rows), jnp.float32),
                   jax.ShapeDtypeStruct((b, kh, splits, rows), jnp.float32)],
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        name="decode_attention_splits",
    )(lengths, q_rows, k_cache, v_cache)


def supported(t: int, num_heads: int, num_kv_heads: int, head_dim: int, cache_len: int,
              block_k: int = 64) -> bool:
    """Whether `decode_attention` takes these shapes (else use the XLA path)."""
    rows = t * num_heads // max(num_kv_heads, 1)
    return (num_heads % num_kv_heads == 0 and rows <= 64 and cache_len % block_k == 0
            and head_dim in (16, 32, 64, 128, 256))


def decode_attention(
    q: Float[Array, "B T N H"],
    k: Float[Array, "B T K H"],
    v: Float[Array, "B T K H"],
    k_cache: Float[Array, "*L B S K H"],
    v_cache: Float[Array, "*L B S K H"],
    lengths: Int[Array, " B"],
    *,
    layer: int | None = None,
    segment_ids: Int[Array, "B T"] | None = None,
    block_k: int = 64,
    target_programs: int = 256,
    num_warps: int = 4,
    num_stages: int = 2,
    interpret: bool = False,
) -> Float[Array, "B T N H"]:
    """Attention of T new tokens over their row's first `lengths[b]` cache slots and, causally,
    over each other; the same result as `models.decoder.cached_attention` (its XLA reference).

    Args:
      q: [B, T, N, H] queries (RoPE applied); k, v: [B, T, K, H] the new tokens' keys / values
        (not yet in the cache).
      k_cache, v_cache: [B, S, K, H], or [L, B, S, K, H] with `layer` the static index to read.
      lengths: int32[B] valid cache slots per row (slots 0..lengths[b]-1 are attended).
      layer: index into a stacked cache's leading axis (None for a one-layer cache).
      segment_ids: int32[B, T] or None; new tokens see each other only within equal ids.
      block_k: cache slots per kernel iteration; S must be a multiple of it.
      target_programs: about how many programs the grid should have (B * K * splits); the
        default fills an H100's 132 SMs about twice.
      num_warps, num_stages: Triton compiler parameters (GPU only).
      interpret: run the kernel in the Pallas interpreter (any backend; tests).

    Returns:
      [B, T, N, H] in q's dtype.

    Raises:
      ValueError: on mismatched shapes, N % K != 0, S not a multiple of block_k, or more than
        64 query rows per kv head (T * G; use the XLA path for long chunks).
    """
    b, t, n, h = q.shape
    kh = k.shape[2]
    stacked = k_cache.ndim == 5
    if (layer is not None) != stacked:
        raise ValueError(f"a stacked [L, B, S, K, H] cache needs `layer` (and only it); got "
                         f"cache {k_cache.shape}, layer {layer}")
    cache_shape = k_cache.shape[1:] if stacked else k_cache.shape
    if (k.shape != (b, t, kh, h) or v.shape != k.shape or v_cache.shape != k_cache.shape
            or cache_shape[0] != b or cache_shape[2:] != (kh, h) or lengths.shape != (b,)):
        raise ValueError(f"bad shapes q {q.shape}, k {k.shape}, v {v.shape}, k_cache "
                         f"{k_cache.shape}, v_cache {v_cache.shape}, lengths {lengths.shape}")
    if n % kh:
        raise ValueError(f"query heads {n} not a multiple of kv heads {kh}")
    s_len = cache_shape[1]
    if not supported(t, n, kh, h, s_len, block_k):
        raise ValueError(f"decode_attention takes T * G <= 64 query rows per kv head and a "
                         f"cache length divisible by block_k={block_k}; got T={t}, G={n // kh}, "
                         f"S={s_len}, H={h}")
    g = n // kh
    scale = h**-0.5
    rows = t * g
    m_rows = max(16, 1 << (rows - 1).bit_length())  # Triton's dot wants >= 16 rows
    # Queries grouped by kv head, rows ordered (t, g).
    qg = q.reshape(b, t, kh, g, h).transpose(0, 2, 1, 3, 4).reshape(b, kh, rows, h)
    q_rows = jnp.pad(qg, ((0, 0), (0, 0), (0, m_rows - rows), (0, 0))).astype(k_cache.dtype)
    o_s, m_s, l_s = _cache_splits(q_rows, k_cache, v_cache, lengths.astype(jnp.int32), layer,
                                  scale=scale, block_k=block_k,
                                  target_programs=target_programs, num_warps=num_warps,
                                  num_stages=num_stages, interpret=interpret)
    o_s, m_s, l_s = o_s[:, :, :, :rows], m_s[..., :rows], l_s[..., :rows]

    # The new tokens' own block: query (t, g) sees new token t' <= t (equal segment ids).
    s_new = jnp.einsum("BKRH,BSKH->BKRS", qg.astype(jnp.float32),
                       k.astype(jnp.float32)) * scale  # [B, K, T*G, T]
    t_idx = jnp.arange(rows) // g
    visible = t_idx[:, None] >= jnp.arange(t)[None, :]  # [T*G, T]
    visible = jnp.broadcast_to(visible, (b, rows, t))
    if segment_ids is not None:
        seg_q = jnp.repeat(segment_ids, g, axis=1)  # [B, T*G]
        visible = visible & (seg_q[:, :, None] == segment_ids[:, None, :])
    s_new = jnp.where(visible[:, None], s_new, _NEG_INF)
    m_new = s_new.max(axis=-1)  # [B, K, R]
    p_new = jnp.exp(s_new - m_new[..., None])
    top = jnp.maximum(m_s.max(axis=2), m_new)  # [B, K, R]
    w_s = jnp.exp(m_s - top[:, :, None])  # [B, K, P, R]
    w_new = jnp.exp(m_new - top)
    denom = (w_s * l_s).sum(axis=2) + w_new * p_new.sum(axis=-1)
    out = (jnp.einsum("BKPR,BKPRH->BKRH", w_s, o_s)
           + w_new[..., None] * jnp.einsum("BKRS,BSKH->BKRH", p_new, v.astype(jnp.float32)))
    out = out / jnp.maximum(denom, 1e-30)[..., None]
    return out.reshape(b, kh, t, g, h).transpose(0, 2, 1, 3, 4).reshape(b, t, n, h).astype(
        q.dtype)
