"""Pallas flash attention for GPUs: causal, packed sequences (segment ids) and GQA.

The kernel serves the cases cuDNN (`jax.nn.dot_product_attention`) cannot: packed sequences whose
tokens may only attend within their own segment, with or without the causal rule. It follows the
FlashAttention-2 algorithm (Dao 2023, "FlashAttention-2", Algorithms 1 and 2): the forward pass
keeps a running max / sum per query row (online softmax) and writes the log-sum-exp; the backward
pass recomputes the probabilities block by block, in one kernel for dq (grid over query blocks)
and one for dk / dv (grid over key blocks). Written for the Triton backend of Pallas, which it
selects explicitly with `pallas.triton.CompilerParams` (without them recent JAX lowers to Mosaic
GPU); `interpret=True` runs the same kernels on any backend (CI on CPU), and CI also lowers them
for CUDA on a CPU-only host. Triton wants power-of-two tiles and head dims (16..256).

Letters (see `longvid_jax/models/__init__.py`): B batch, T query tokens, S key / value tokens,
N query heads, K kv heads, G = N // K, H head dim.

Mask convention (same as `models.attention.make_attention_mask` with default positions): query t
may see key s when `t >= s` (causal, positions 0..T-1 and 0..S-1) and when
`q_segment_ids[t] == kv_segment_ids[s]`. A query row with no visible key is padding: its output
is an average over the key blocks the kernel visited and must be ignored downstream.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jaxtyping import Array, Float, Int

from longvid_jax.models.attention import masked_attention_ref

_NEG_INF = -0.7 * float(jnp.finfo(jnp.float32).max)
_DIMS_NT = (((1,), (1,)), ((), ()))  # [a, h] x [b, h] -> [a, b]
_DIMS_NN = (((1,), (0,)), ((), ()))  # [a, b] x [b, h] -> [a, h]
_DIMS_TN = (((0,), (0,)), ((), ()))  # [a, b] x [a, h] -> [b, h]


# The pure-JAX reference this kernel is tested against.
flash_attention_ref = masked_attention_ref


def _block_mask(q_pos, k_pos, q_seg, k_seg, causal, use_seg):
    """bool[bq, bk] visibility of one tile, or None when everything is visible."""
    mask = None
    if causal:
        mask = q_pos[:, None] >= k_pos[None, :]
    if use_seg:
        same = q_seg[:, None] == k_seg[None, :]
        mask = same if mask is None else jnp.logical_and(mask, same)
    return mask


def _num_kv_blocks(qi, *, causal, block_q, block_k, kv_len):
    """Key blocks query block `qi` visits: all, or under the causal rule up to the last block
    holding a key <= the block's last query."""
    n_kv = kv_len // block_k
    if causal:
        n_kv = jnp.minimum(n_kv, lax.div((qi + 1) * block_q + block_k - 1, block_k))
    return n_kv


def _kv_block_scores(j, q, q_pos, q_seg, k_ref, v_ref, kseg_ref, *, scale, causal, use_seg,
                     block_k):
    """Masked float32 scores [bq, bk] of the queries against key block `j`, with that block's
    keys and values [bk, H]."""
    start = pl.multiple_of(j * block_k, block_k)
    k = k_ref[pl.ds(start, block_k), :]
    v = v_ref[pl.ds(start, block_k), :]
    s = lax.dot_general(q, k, _DIMS_NT, preferred_element_type=jnp.float32) * scale
    k_pos = start + lax.broadcasted_iota(jnp.int32, (block_k,), 0)
    mask = _block_mask(q_pos, k_pos, q_seg, kseg_ref[pl.ds(start, block_k)], causal, use_seg)
    if mask is not None:
        s = jnp.where(mask, s, _NEG_INF)
    return s, k, v


def online_softmax_step(carry, s, v):
    """One key block of the online softmax (FlashAttention-2, Algorithm 1 lines 8-10).

    carry: (running max float32[bq], running sum float32[bq], unnormalised output
    float32[bq, H]); s: float32[bq, bk] masked scores of the block; v: [bk, H] its values.
    Returns the updated carry."""
    m, l, acc = carry
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    alpha = jnp.exp(m - m_new)
    p = jnp.exp(s - m_new[:, None])
    l = l * alpha + jnp.sum(p, axis=1)
    pv = lax.dot_general(p.astype(v.dtype), v, _DIMS_NN, preferred_element_type=jnp.float32)
    return m_new, l, acc * alpha[:, None] + pv


def _fwd_kernel(q_ref, k_ref, v_ref, qseg_ref, kseg_ref, o_ref, lse_ref, *, scale, causal,
                use_seg, block_q, block_k, kv_len):
    qi = pl.program_id(2)
    q = q_ref[...]  # [bq, H]
    q_pos = qi * block_q + lax.broadcasted_iota(jnp.int32, (block_q,), 0)
    q_seg = qseg_ref[...]
    n_kv = _num_kv_blocks(qi, causal=causal, block_q=block_q, block_k=block_k, kv_len=kv_len)

    def body(j, carry):
        s, _, v = _kv_block_scores(j, q, q_pos, q_seg, k_ref, v_ref, kseg_ref, scale=scale,
                                   causal=causal, use_seg=use_seg, block_k=block_k)
        return online_softmax_step(carry, s, v)

    init = (jnp.full((block_q,), _NEG_INF, jnp.float32), jnp.zeros((block_q,), jnp.float32),
            jnp.zeros(q.shape, jnp.float32))
    m, l, acc = lax.fori_loop(0, n_kv, body, init)
    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(l)


def _dq_kernel(q_ref, k_ref, v_ref, qseg_ref, kseg_ref, do_ref, lse_ref, delta_ref, dq_ref, *,
               scale, causal, use_seg, block_q, block_k, kv_len):
    qi = pl.program_id(2)
    q = q_ref[...]
    do = do_ref[...]
    lse = lse_ref[...]
    delta = delta_ref[...]
    q_pos = qi * block_q + lax.broadcasted_iota(jnp.int32, (block_q,), 0)
    q_seg = qseg_ref[...]
    n_kv = _num_kv_blocks(qi, causal=causal, block_q=block_q, block_k=block_k, kv_len=kv_len)

    def body(j, dq):
        s, k, v = _kv_block_scores(j, q, q_pos, q_seg, k_ref, v_ref, kseg_ref, scale=scale,
                                   causal=causal, use_seg=use_seg, block_k=block_k)
        p = jnp.exp(s - lse[:, None])
        dp = lax.dot_general(do, v, _DIMS_NT, preferred_element_type=jnp.float32)
        ds = p * (dp - delta[:, None])
        return dq + lax.dot_general(ds.astype(k.dtype), k, _DIMS_NN,
                                    preferred_element_type=jnp.float32)

    dq = lax.fori_loop(0, n_kv, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, qseg_ref, kseg_ref, do_ref, lse_ref, delta_ref, dk_ref,
                dv_ref, *, scale, causal, use_seg, block_q, block_k, q_len):
    kj = pl.program_id(2)
    k = k_ref[...]  # [bk, H]
    v = v_ref[...]
    k_pos = kj * block_k + lax.broadcasted_iota(jnp.int32, (block_k,), 0)
    k_seg = kseg_ref[...]
    first = lax.div(kj * block_k, block_q) if causal else 0  # first query block seeing a key

    def body(i, carry):
        dk, dv = carry
        start = pl.multiple_of(i * block_q, block_q)
        q = q_ref[pl.ds(start, block_q), :]
        do = do_ref[pl.ds(start, block_q), :]
        lse = lse_ref[pl.ds(start, block_q)]
        delta = delta_ref[pl.ds(start, block_q)]
        s = lax.dot_general(q, k, _DIMS_NT, preferred_element_type=jnp.float32) * scale
        q_pos = start + lax.broadcasted_iota(jnp.int32, (block_q,), 0)
        mask = _block_mask(q_pos, k_pos, qseg_ref[pl.ds(start, block_q)], k_seg, causal,
                           use_seg)
        if mask is not None:
            s = jnp.where(mask, s, _NEG_INF)
        p = jnp.exp(s - lse[:, None])  # [bq, bk]
        dv = dv + lax.dot_general(p.astype(do.dtype), do, _DIMS_TN,
                                  preferred_element_type=jnp.float32)
        dp = lax.dot_general(do, v, _DIMS_NT, preferred_element_type=jnp.float32)
        ds = p * (dp - delta[:, None])
        dk = dk + lax.dot_general(ds.astype(q.dtype), q, _DIMS_TN,
                                  preferred_element_type=jnp.float32)
        return dk, dv

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(first, q_len // block_q, body, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _compiler_params(num_warps, num_stages):
    """Triton compiler parameters. Passing them selects the Triton backend of Pallas on GPU
    (since JAX 0.8 the default without parameters is Mosaic GPU, which this kernel does not
    target); the interpreter ignores them."""
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _flash_fwd(q, k, v, q_seg, kv_seg, opts):
    scale, causal, use_seg, block_q, block_k, interpret, warps, stages = opts
    b, t, n, h = q.shape
    s_len, kh = k.shape[1], k.shape[2]
    g = n // kh
    sq = pl.squeezed
    kernel = functools.partial(_fwd_kernel, scale=scale, causal=causal, use_seg=use_seg,
                               block_q=block_q, block_k=block_k, kv_len=s_len)
    out, lse = pl.pallas_call(
        kernel,
        grid=(b, n, t // block_q),
        in_specs=[
            pl.BlockSpec((sq, block_q, sq, h), lambda bi, ni, qi: (bi, qi, ni, 0)),
            pl.BlockSpec((sq, s_len, sq, h), lambda bi, ni, qi: (bi, 0, ni // g, 0)),
            pl.BlockSpec((sq, s_len, sq, h), lambda bi, ni, qi: (bi, 0, ni // g, 0)),
            pl.BlockSpec((sq, block_q), lambda bi, ni, qi: (bi, qi)),
            pl.BlockSpec((sq, s_len), lambda bi, ni, qi: (bi, 0)),
        ],
        out_specs=[
            pl.BlockSpec((sq, block_q, sq, h), lambda bi, ni, qi: (bi, qi, ni, 0)),
            pl.BlockSpec((sq, sq, block_q), lambda bi, ni, qi: (bi, ni, qi)),
        ],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((b, n, t), jnp.float32)],
        interpret=interpret,
        compiler_params=_compiler_params(warps, stages),
        name="flash_fwd",
    )(q, k, v, q_seg, kv_seg)
    return out, lse


def _flash_bwd(q, k, v, q_seg, kv_seg, out, lse, d_out, opts):
    scale, causal, use_seg, block_q, block_k, interpret, warps, stages = opts
    b, t, n, h = q.shape
    s_len, kh = k.shape[1], k.shape[2]
    g = n // kh
    sq = pl.squeezed
    # delta[b, n, t] = sum_h out * d_out (FlashAttention-2, Algorithm 2 line 4).
    delta = jnp.einsum("BTNH,BTNH->BNT", out.astype(jnp.float32), d_out.astype(jnp.float32))
    common = {"scale": scale, "causal": causal, "use_seg": use_seg, "block_q": block_q,
                  "block_k": block_k}
    params = _compiler_params(warps, stages)

    q_blk = pl.BlockSpec((sq, block_q, sq, h), lambda bi, ni, qi: (bi, qi, ni, 0))
    kv_all = pl.BlockSpec((sq, s_len, sq, h), lambda bi, ni, qi: (bi, 0, ni // g, 0))
    row_blk = pl.BlockSpec((sq, sq, block_q), lambda bi, ni, qi: (bi, ni, qi))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, kv_len=s_len, **common),
        grid=(b, n, t // block_q),
        in_specs=[q_blk, kv_all, kv_all,
                  pl.BlockSpec((sq, block_q), lambda bi, ni, qi: (bi, qi)),
                  pl.BlockSpec((sq, s_len), lambda bi, ni, qi: (bi, 0)),
                  q_blk, row_blk, row_blk],
        out_specs=q_blk,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        interpret=interpret, compiler_params=params, name="flash_bwd_dq",
    )(q, k, v, q_seg, kv_seg, d_out, lse, delta)

    q_all = pl.BlockSpec((sq, t, sq, h), lambda bi, ni, kj: (bi, 0, ni, 0))
    kv_blk = pl.BlockSpec((sq, block_k, sq, h), lambda bi, ni, kj: (bi, kj, ni // g, 0))
    row_all = pl.BlockSpec((sq, sq, t), lambda bi, ni, kj: (bi, ni, 0))
    dkv_out = pl.BlockSpec((sq, block_k, sq, h), lambda bi, ni, kj: (bi, kj, ni, 0))
    # One dk / dv per query head, float32; the G heads sharing a kv head are summed below.
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, q_len=t, **common),
        grid=(b, n, s_len // block_k),
        in_specs=[q_all, kv_blk, kv_blk,
                  pl.BlockSpec((sq, t), lambda bi, ni, kj: (bi, 0)),
                  pl.BlockSpec((sq, block_k), lambda bi, ni, kj: (bi, kj)),
                  q_all, row_all, row_all],
        out_specs=[dkv_out, dkv_out],
        out_shape=[jax.ShapeDtypeStruct((b, s_len, n, h), jnp.float32)] * 2,
        interpret=interpret, compiler_params=params, name="flash_bwd_dkv",
    )(q, k, v, q_seg, kv_seg, d_out, lse, delta)
    dk = dk.reshape(b, s_len, kh, g, h).sum(axis=3).astype(k.dtype)
    dv = dv.reshape(b, s_len, kh, g, h).sum(axis=3).astype(v.dtype)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, q_seg, kv_seg, opts):
    return _flash_fwd(q, k, v, q_seg, kv_seg, opts)[0]


def _flash_vjp_fwd(q, k, v, q_seg, kv_seg, opts):
    out, lse = _flash_fwd(q, k, v, q_seg, kv_seg, opts)
    return out, (q, k, v, q_seg, kv_seg, out, lse)


def _flash_vjp_bwd(opts, res, d_out):
    q, k, v, q_seg, kv_seg, out, lse = res
    dq, dk, dv = _flash_bwd(q, k, v, q_seg, kv_seg, out, lse, d_out, opts)
    return dq, dk, dv, None, None


_flash.defvjp(_flash_vjp_fwd, _flash_vjp_bwd)


def flash_attention(
    q: Float[Array, "B T N H"],
    k: Float[Array, "B S K H"],
    v: Float[Array, "B S K H"],
    *,
    causal: bool = False,
    q_segment_ids: Int[Array, "B T"] | None = None,
    kv_segment_ids: Int[Array, "B S"] | None = None,
    scale: float | None = None,
    block_q: int = 64,
    block_k: int = 64,
    num_warps: int | None = 4,
    num_stages: int | None = 2,
    interpret: bool = False,
) -> Float[Array, "B T N H"]:
    """Flash attention (Pallas, Triton backend) with causal / segment masks and GQA.

    Differentiable (custom VJP: forward saves the float32 log-sum-exp [B, N, T]; backward runs
    a dq kernel and a dk / dv kernel). Memory is O(B T N H): no [T, S] score matrix is stored.
    Causal runs skip key blocks (forward, dq) and query blocks (dk / dv) above the diagonal.

    Args:
      q: [B, T, N, H] queries (bf16 / fp16 on GPU; float32 works, e.g. in interpret mode).
      k, v: [B, S, K, H] keys / values, N % K == 0.
      causal: query t sees keys s <= t (positions 0..T-1 and 0..S-1).
      q_segment_ids, kv_segment_ids: int32[B, T] / int32[B, S] for packed sequences, given
        together or not at all.
      scale: logit scale, default H**-0.5.
      block_q, block_k: tile sizes (clipped to T / S); T and S must be multiples of them.
      num_warps, num_stages: Triton compiler parameters (GPU only; None = Pallas defaults).
        The defaults (64 x 64 tiles, 4 warps, 2 stages) were the fastest of a sweep on an
        H200 at head dim 128 (BENCHMARKS.md): 326 TFLOP/s packed at 32K tokens, against 284
        with Pallas's default 3 stages.
      interpret: run the kernels in the Pallas interpreter (any backend; slow, for tests).

    Returns:
      [B, T, N, H] in q's dtype.

    Raises:
      ValueError: on mismatched shapes, N % K != 0, lengths not divisible by the blocks, or
        only one of the two segment id arrays.
    """
    b, t, n, h = q.shape
    if k.shape != v.shape or k.ndim != 4 or k.shape[0] != b or k.shape[3] != h:
        raise ValueError(f"bad shapes q {q.shape}, k {k.shape}, v {v.shape}")
    s_len, kh = k.shape[1], k.shape[2]
    if n % kh:
        raise ValueError(f"query heads {n} not a multiple of kv heads {kh}")
    block_q, block_k = min(block_q, t), min(block_k, s_len)
    if t % block_q or s_len % block_k:
        raise ValueError(f"lengths T={t}, S={s_len} must be multiples of block_q={block_q}, "
                         f"block_k={block_k}; pad the sequence")
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("q_segment_ids and kv_segment_ids must be given together")
    use_seg = q_segment_ids is not None
    if use_seg:
        q_seg = q_segment_ids.astype(jnp.int32)
        kv_seg = kv_segment_ids.astype(jnp.int32)
        if q_seg.shape != (b, t) or kv_seg.shape != (b, s_len):
            raise ValueError(f"segment ids {q_seg.shape}, {kv_seg.shape} != {(b, t)}, "
                             f"{(b, s_len)}")
    else:
        q_seg = jnp.zeros((b, t), jnp.int32)
        kv_seg = jnp.zeros((b, s_len), jnp.int32)
    scale = h**-0.5 if scale is None else float(scale)
    opts = (scale, bool(causal), use_seg, block_q, block_k, bool(interpret), num_warps,
            num_stages)
    return _flash(q, k, v, q_seg, kv_seg, opts)
