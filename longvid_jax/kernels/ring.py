"""Ring attention: one sequence split over a mesh axis, keys / values passed around a ring.

Follows Liu et al. 2023, "Ring Attention with Blockwise Transformers for Near-Infinite Context"
(each device keeps its query shard and, over D steps, sees every key / value shard arriving from
its neighbour through `lax.ppermute`, merging the partial softmaxes with the online-softmax rule
of FlashAttention), with the zig-zag layout of Llama 3 context parallelism (Llama Team 2024,
"The Llama 3 Herd of Models", section 3.3.2) for causal load balance: the sequence is cut into
2D chunks and device i holds chunks i and 2D-1-i, so every device does the same causal work.

Letters: B batch, T query tokens, S key / value tokens, N query heads, K kv heads, G = N // K,
H head dim, D (here) the number of devices on the ring axis.

Layout. `ring_attention` takes arrays in natural token order, reorders them to the zig-zag
layout (`zigzag_permutation`) and back (a gather along T; under `jit` with T sharded this costs
an all-to-all). A model that keeps its activations in zig-zag order can call
`ring_attention(..., load_balance=True, reorder=False)` with already permuted inputs and skip
both shuffles. Gradients come from a custom VJP rather than autodiff through the scan of
`ppermute`s (which would keep every step's kv shard): the forward saves only the local output
and its float32 log-sum-exp, and the backward runs a second ring in which dq stays on its
device while dk / dv accumulate as they travel with their kv shard, arriving home after D
steps (FlashAttention-2 backward, Algorithm 2, per tile). Memory per device is O(local shard).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float, Int

from longvid_jax.kernels import cudnn_tiles, flash_gpu
from longvid_jax.models.attention import masked_attention_ref

_NEG_INF = -0.7 * float(jnp.finfo(jnp.float32).max)

# Which part of a ring step is computed (see `_ring_step`). _DIAG is a device's own kv shard
# under the causal rule (masked by position on the XLA path, by local index in the Pallas one).
_FULL, _KV_FIRST_HALF, _Q_SECOND_HALF, _SKIP, _DIAG = 0, 1, 2, 3, 4


# The pure-JAX reference this kernel is tested against.
ring_attention_ref = masked_attention_ref


def zigzag_permutation(length: int, num_shards: int) -> np.ndarray:
    """Token order of the zig-zag layout: int[length], `x_zigzag = x[:, perm]`.

    The sequence is cut into 2 * num_shards chunks; shard i receives chunks i and
    2 * num_shards - 1 - i, so under the causal rule each shard has equal work.

    Raises:
      ValueError: if length is not a multiple of 2 * num_shards.
    """
    if length % (2 * num_shards):
        raise ValueError(f"length {length} not a multiple of 2 * {num_shards} shards")
    chunks = np.arange(length).reshape(2 * num_shards, -1)
    order = [c for i in range(num_shards) for c in (i, 2 * num_shards - 1 - i)]
    return chunks[order].reshape(-1)


def _logits(q, k, q_pos, k_pos, q_seg, k_seg, *, causal, scale):
    """Masked float32 logits [B, K, G, t, s] of q [B, t, K, G, H] against k [B, s, K, H]."""
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32) * scale
    mask = None
    if causal:
        mask = q_pos[:, :, None] >= k_pos[:, None, :]
    if q_seg is not None:
        same = q_seg[:, :, None] == k_seg[:, None, :]
        mask = same if mask is None else jnp.logical_and(mask, same)
    if mask is not None:
        logits = jnp.where(mask[:, None, None], logits, _NEG_INF)
    return logits


def _block_stats(q, k, v, q_pos, k_pos, q_seg, k_seg, *, causal, scale):
    """Unnormalised attention of one (query, key) tile, float32.

    q: [B, t, K, G, H]; k, v: [B, s, K, H]; positions / segment ids [B, t] and [B, s].
    Returns m, l: [B, K, G, t] (row max, row sum of exp(logit - m)) and acc: [B, t, K, G, H].
    """
    logits = _logits(q, k, q_pos, k_pos, q_seg, k_seg, causal=causal, scale=scale)
    m = jnp.max(logits, axis=-1)
    p = jnp.exp(logits - m[..., None])
    acc = jnp.einsum("BKGTS,BSKH->BTKGH", p.astype(v.dtype), v,
                     preferred_element_type=jnp.float32)
    return m, jnp.sum(p, axis=-1), acc


def _block_grads(q, k, v, d_out, lse, delta, q_pos, k_pos, q_seg, k_seg, *, causal, scale):
    """Gradients of one tile given the final log-sum-exp (FlashAttention-2, Algorithm 2).

    q, d_out: [B, t, K, G, H]; k, v: [B, s, K, H]; lse, delta: float32[B, K, G, t].
    Returns float32 dq [B, t, K, G, H], dk and dv [B, s, K, H].
    """
    logits = _logits(q, k, q_pos, k_pos, q_seg, k_seg, causal=causal, scale=scale)
    p = jnp.exp(logits - lse[..., None])
    f32 = jnp.float32
    dv = jnp.einsum("BKGTS,BTKGH->BSKH", p, d_out.astype(f32))
    dp = jnp.einsum("BTKGH,BSKH->BKGTS", d_out, v, preferred_element_type=f32)
    ds = p * (dp - delta[..., None])
    dq = jnp.einsum("BKGTS,BSKH->BTKGH", ds, k.astype(f32)) * scale
    dk = jnp.einsum("BKGTS,BTKGH->BSKH", ds, q.astype(f32)) * scale
    return dq, dk, dv


def _merge(a, b):
    """Online-softmax merge of two (m, l, acc) partials over disjoint key sets."""
    m_a, l_a, acc_a = a
    m_b, l_b, acc_b = b
    m = jnp.maximum(m_a, m_b)
    w_a, w_b = jnp.exp(m_a - m), jnp.exp(m_b - m)
    acc_w = lambda w: jnp.moveaxis(w, -1, 1)[..., None]  # [B, K, G, t] -> [B, t, K, G, 1]
    return m, l_a * w_a + l_b * w_b, acc_a * acc_w(w_a) + acc_b * acc_w(w_b)


def _zeros(x):
    """float32 zeros like x, built arithmetically so they keep x's varying mesh axes."""
    return x.astype(jnp.float32) * 0.0


def _neutral(q):
    """(m, l, acc) of an empty key set for queries q [B, t, K, G, H]."""
    zero = _zeros(q)
    row = jnp.moveaxis(zero[..., 0], 1, -1)  # [B, K, G, t]
    return row + _NEG_INF, row, zero


def _halves(x, axis):
    n = x.shape[axis] // 2
    return lax.slice_in_dim(x, 0, n, axis=axis), lax.slice_in_dim(x, n, 2 * n, axis=axis)


def _sl(x, half):
    """First (0) or second (1) half of a [B, L] row of ids, None passes through."""
    return None if x is None else _halves(x, 1)[half]


def _ring_step(kind, q, k, v, q_pos, k_pos, q_seg, k_seg, *, causal, scale):
    """Partial (m, l, acc) of the local queries against one arriving kv shard.

    `kind` picks the work: _FULL (all q x all kv), _KV_FIRST_HALF (all q x the first half of
    the kv shard), _Q_SECOND_HALF (second half of q x all kv), _SKIP (nothing). Under the
    zig-zag layout and the causal rule the parts left out are fully masked, so the result is
    exact; positions and segment ids still mask every computed tile.
    """
    f = functools.partial(_block_stats, causal=causal, scale=scale)

    def full(_):
        return f(q, k, v, q_pos, k_pos, q_seg, k_seg)

    def kv_first_half(_):
        return f(q, _halves(k, 1)[0], _halves(v, 1)[0], q_pos, _sl(k_pos, 0), q_seg,
                 _sl(k_seg, 0))

    def q_second_half(_):
        m, l, acc = f(_halves(q, 1)[1], k, v, _sl(q_pos, 1), k_pos, _sl(q_seg, 1), k_seg)
        n_m, n_l, n_acc = _neutral(_halves(q, 1)[0])
        return (jnp.concatenate([n_m, m], -1), jnp.concatenate([n_l, l], -1),
                jnp.concatenate([n_acc, acc], 1))

    def skip(_):
        return _neutral(q)

    return lax.switch(kind, [full, kv_first_half, q_second_half, skip, full], None)


def _ring_grad_step(kind, q, k, v, d_out, lse, delta, q_pos, k_pos, q_seg, k_seg, *, causal,
                    scale):
    """float32 (dq, dk, dv) of one ring step; same `kind`s as `_ring_step`."""
    g = functools.partial(_block_grads, causal=causal, scale=scale)

    def full(_):
        return g(q, k, v, d_out, lse, delta, q_pos, k_pos, q_seg, k_seg)

    def kv_first_half(_):
        dq, dk, dv = g(q, _halves(k, 1)[0], _halves(v, 1)[0], d_out, lse, delta, q_pos,
                       _sl(k_pos, 0), q_seg, _sl(k_seg, 0))
        return (dq, jnp.concatenate([dk, _zeros(dk)], 1), jnp.concatenate([dv, _zeros(dv)], 1))

    def q_second_half(_):
        dq, dk, dv = g(_halves(q, 1)[1], k, v, _halves(d_out, 1)[1], _halves(lse, 3)[1],
                       _halves(delta, 3)[1], _sl(q_pos, 1), k_pos, _sl(q_seg, 1), k_seg)
        return jnp.concatenate([_zeros(dq), dq], 1), dk, dv

    def skip(_):
        return _zeros(q), _zeros(k), _zeros(v)

    return lax.switch(kind, [full, kv_first_half, q_second_half, skip, full], None)


def _step_kinds(opts):
    """int32 kind of ring step r on this device, as a function of r."""
    axis, d, causal, _, load_balance = opts[:5]
    me = lax.axis_index(axis)

    def kind_of(r):
        src = (me - r) % d  # the shard that produced the kv held at step r
        if not causal:
            return jnp.int32(_FULL)
        if load_balance:
            return jnp.where(r == 0, _DIAG, jnp.where(src < me, _KV_FIRST_HALF, _Q_SECOND_HALF))
        return jnp.where(src == me, _DIAG, jnp.where(src < me, _FULL, _SKIP))

    return kind_of


def _ring_forward(q, k, v, q_pos, k_pos, q_seg, k_seg, opts):
    """Local forward under `shard_map`: out [B, t, N, H] and float32 lse [B, K, G, t]."""
    if opts[5] in _TILE_INNERS:
        return _tile_ring_forward(q, k, v, q_seg, k_seg, opts)
    axis, d, causal, scale = opts[:4]
    b, t, n, h = q.shape
    kh = k.shape[2]
    qg = q.reshape(b, t, kh, n // kh, h)
    perm = [(j, (j + 1) % d) for j in range(d)]
    kind_of = _step_kinds(opts)

    def body(carry, r):
        stats, kv = carry
        k_seg_r = kv[3] if len(kv) > 3 else None
        part = _ring_step(kind_of(r), qg, kv[0], kv[1], q_pos, kv[2], q_seg, k_seg_r,
                          causal=causal, scale=scale)
        kv = tuple(lax.ppermute(x, axis, perm) for x in kv)
        return (_merge(stats, part), kv), None

    kv = (k, v, k_pos) + ((k_seg,) if k_seg is not None else ())
    (stats, _), _ = lax.scan(body, (_neutral(qg), kv), jnp.arange(d))
    m, l, acc = stats
    out = acc / jnp.moveaxis(l, -1, 1)[..., None]
    return out.reshape(b, t, n, h).astype(q.dtype), m + jnp.log(l)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _ring_core(q, k, v, q_pos, k_pos, q_seg, k_seg, opts):
    return _ring_forward(q, k, v, q_pos, k_pos, q_seg, k_seg, opts)[0]


def _ring_core_fwd(q, k, v, q_pos, k_pos, q_seg, k_seg, opts):
    out, lse = _ring_forward(q, k, v, q_pos, k_pos, q_seg, k_seg, opts)
    return out, (q, k, v, q_pos, k_pos, q_seg, k_seg, out, lse)


def _ring_core_bwd(opts, res, d_out):
    """Second ring pass: dq stays, dk / dv travel with their kv shard and end at home."""
    q, k, v, q_pos, k_pos, q_seg, k_seg, out, lse = res
    if opts[5] in _TILE_INNERS:
        return _tile_ring_backward(q, k, v, q_seg, k_seg, out, lse, d_out, opts)
    axis, d, causal, scale = opts[:4]
    b, t, n, h = q.shape
    kh = k.shape[2]
    shape_g = (b, t, kh, n // kh, h)
    qg, dog = q.reshape(shape_g), d_out.reshape(shape_g)
    delta = jnp.einsum("BTKGH,BTKGH->BKGT", out.reshape(shape_g).astype(jnp.float32),
                       dog.astype(jnp.float32))
    perm = [(j, (j + 1) % d) for j in range(d)]
    kind_of = _step_kinds(opts)

    def body(carry, r):
        dq, kv, dk, dv = carry
        k_seg_r = kv[3] if len(kv) > 3 else None
        gq, gk, gv = _ring_grad_step(kind_of(r), qg, kv[0], kv[1], dog, lse, delta, q_pos,
                                     kv[2], q_seg, k_seg_r, causal=causal, scale=scale)
        moved = tuple(lax.ppermute(x, axis, perm) for x in (*kv, dk + gk, dv + gv))
        return (dq + gq, moved[:-2], moved[-2], moved[-1]), None

    kv = (k, v, k_pos) + ((k_seg,) if k_seg is not None else ())
    carry = (_zeros(qg), kv, _zeros(k), _zeros(v))
    (dq, _, dk, dv), _ = lax.scan(body, carry, jnp.arange(d))
    return (dq.reshape(q.shape).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype),
            None, None, None, None)


_ring_core.defvjp(_ring_core_fwd, _ring_core_bwd)


# ---------------------------------------------------------------------------------------------
# Ring steps through a flash kernel: the Pallas one (`flash_gpu.py`, "pallas_gpu") or cuDNN's
# (`cudnn_tiles.py`, "cudnn"). Each step's tile is computed blockwise on chip, so memory stays
# O(local shard) however long the shards are. Partials are (float32 out [B, t, N, H], lse
# [B, N, t]) merged with log-sum-exp weights; the backward step runs the kernel's backward with
# the final out and lse (FlashAttention-2, Algorithm 2), which is exact per tile.

_TILE_INNERS = ("pallas_gpu", "cudnn")


def _unroll(opts) -> bool:
    """Whether the ring's steps are unrolled rather than a loop. cuDNN's: XLA (jax 0.11.2)
    crashed compiling cuDNN attention inside a ring loop nested in the decoder's layer loop
    (`nn.scan`); unrolled, the D steps are straight-line code in the layer's body."""
    return opts[5] == "cudnn"


def _tile_call(q, k, v, q_seg, k_seg, causal, opts):
    """Forward of one tile: (float32 out [B, t, N, H], lse [B, N, t])."""
    if opts[5] == "cudnn":
        out, lse = cudnn_tiles.tile_forward(q, k, v, causal=causal, scale=opts[3])
    else:
        out, lse = flash_gpu._flash_fwd(q, k, v, q_seg, k_seg, _kernel_opts(q, k, causal, opts))
    return out.astype(jnp.float32), lse


def _kernel_opts(q, k, causal, opts):
    scale, interpret = opts[3], opts[6]
    use_seg = opts[7]
    block_q, block_k = min(64, q.shape[1]), min(64, k.shape[1])
    return (scale, causal, use_seg, block_q, block_k, interpret, 4, 2)


def _tile_neutral(q):
    """(out, lse) of an empty key set for queries q [B, t, N, H]."""
    zero = _zeros(q)
    return zero, jnp.moveaxis(zero[..., 0], 1, -1) + _NEG_INF


def _tile_merge(a, b):
    (o_a, l_a), (o_b, l_b) = a, b
    lse = jnp.logaddexp(l_a, l_b)
    weight = lambda l: jnp.moveaxis(jnp.exp(l - lse), -1, 1)[..., None]  # noqa: E731
    return o_a * weight(l_a) + o_b * weight(l_b), lse


def _tile_step(kind, q, k, v, q_seg, k_seg, opts):
    """Partial (out, lse) of local queries q [B, t, N, H] against one kv shard; `kind` as in
    `_ring_step`. Under the zig-zag layout the local index order is the position order within
    each of a shard's two chunks and across them, so _DIAG is the kernel's causal rule."""

    def full(_):
        return _tile_call(q, k, v, q_seg, k_seg, False, opts)

    def diag(_):
        return _tile_call(q, k, v, q_seg, k_seg, True, opts)

    def kv_first_half(_):
        return _tile_call(q, _halves(k, 1)[0], _halves(v, 1)[0], q_seg, _sl(k_seg, 0), False,
                           opts)

    def q_second_half(_):
        out, lse = _tile_call(_halves(q, 1)[1], k, v, _sl(q_seg, 1), k_seg, False, opts)
        n_out, n_lse = _tile_neutral(_halves(q, 1)[0])
        return jnp.concatenate([n_out, out], 1), jnp.concatenate([n_lse, lse], -1)

    def skip(_):
        return _tile_neutral(q)

    return lax.switch(kind, [full, kv_first_half, q_second_half, skip, diag], None)


def _tile_ring_forward(q, k, v, q_seg, k_seg, opts):
    axis, d = opts[:2]
    b, t, n, h = q.shape
    perm = [(j, (j + 1) % d) for j in range(d)]
    kind_of = _step_kinds(opts)

    def body(carry, r):
        stats, kv = carry
        part = _tile_step(kind_of(r), q, kv[0], kv[1], q_seg, kv[2], opts)
        kv = tuple(lax.ppermute(x, axis, perm) for x in kv)
        return (_tile_merge(stats, part), kv), None

    (stats, _), _ = lax.scan(body, (_tile_neutral(q), (k, v, k_seg)), jnp.arange(d),
                             unroll=_unroll(opts))
    out, lse = stats
    kh = k.shape[2]
    return out.astype(q.dtype), lse.reshape(b, kh, n // kh, t)


def _tile_grad_step(kind, q, k, v, q_seg, k_seg, out, lse, d_out, opts):
    """float32 (dq, dk, dv) of one ring step through the kernel's backward passes."""
    f32 = jnp.float32

    def grads(q_, k_, v_, qs, ks, out_, lse_, do_, causal):
        if opts[5] == "cudnn":
            dq, dk, dv = cudnn_tiles.tile_backward(q_, k_, v_, out_, lse_, do_, causal=causal,
                                                   scale=opts[3])
        else:
            dq, dk, dv = flash_gpu._flash_bwd(q_, k_, v_, qs, ks, out_, lse_, do_,
                                              _kernel_opts(q_, k_, causal, opts))
        return dq.astype(f32), dk.astype(f32), dv.astype(f32)

    def full(_):
        return grads(q, k, v, q_seg, k_seg, out, lse, d_out, False)

    def diag(_):
        return grads(q, k, v, q_seg, k_seg, out, lse, d_out, True)

    def kv_first_half(_):
        dq, dk, dv = grads(q, _halves(k, 1)[0], _halves(v, 1)[0], q_seg, _sl(k_seg, 0), out,
                           lse, d_out, False)
        return (dq, jnp.concatenate([dk, _zeros(dk)], 1), jnp.concatenate([dv, _zeros(dv)], 1))

    def q_second_half(_):
        dq, dk, dv = grads(_halves(q, 1)[1], k, v, _sl(q_seg, 1), k_seg, _halves(out, 1)[1],
                           _halves(lse, 2)[1], _halves(d_out, 1)[1], False)
        return jnp.concatenate([_zeros(dq), dq], 1), dk, dv

    def skip(_):
        return _zeros(q), _zeros(k), _zeros(v)

    return lax.switch(kind, [full, kv_first_half, q_second_half, skip, diag], None)


def _tile_ring_backward(q, k, v, q_seg, k_seg, out, lse, d_out, opts):
    axis, d = opts[:2]
    b, t, n, _ = q.shape
    lse = lse.reshape(b, n, t)
    perm = [(j, (j + 1) % d) for j in range(d)]
    kind_of = _step_kinds(opts)

    def body(carry, r):
        dq, kv, dk, dv = carry
        gq, gk, gv = _tile_grad_step(kind_of(r), q, kv[0], kv[1], q_seg, kv[2], out, lse,
                                      d_out, opts)
        moved = tuple(lax.ppermute(x, axis, perm) for x in (*kv, dk + gk, dv + gv))
        return (dq + gq, moved[:-2], moved[-2], moved[-1]), None

    carry = (_zeros(q), (k, v, k_seg), _zeros(k), _zeros(v))
    (dq, _, dk, dv), _ = lax.scan(body, carry, jnp.arange(d), unroll=_unroll(opts))
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype),
            None, None, None, None)


def ring_attention(
    q: Float[Array, "B T N H"],
    k: Float[Array, "B S K H"],
    v: Float[Array, "B S K H"],
    *,
    mesh: Mesh,
    axis: str = "context",
    causal: bool = False,
    q_segment_ids: Int[Array, "B T"] | None = None,
    kv_segment_ids: Int[Array, "B S"] | None = None,
    scale: float | None = None,
    load_balance: bool = True,
    reorder: bool = True,
    batch_axes: str | tuple[str, ...] | None = None,
    head_axes: str | tuple[str, ...] | None = None,
    inner: str = "xla",
    interpret: bool = False,
) -> Float[Array, "B T N H"]:
    """Attention with T and S sharded over mesh axis `axis` (ring of `lax.ppermute`s).

    Args:
      q: [B, T, N, H] queries; k, v: [B, S, K, H], N % K == 0, T == S (self-attention).
      mesh: the device mesh; `axis` names the ring axis (D devices, T % (2 D) == 0 when
        load-balanced, T % D == 0 otherwise).
      causal: query t sees keys s <= t (token positions in natural order).
      q_segment_ids, kv_segment_ids: int32[B, T] / int32[B, S] (packed sequences), both or
        neither.
      scale: logit scale, default H**-0.5.
      load_balance: zig-zag layout (equal causal work per device, half of each off-diagonal
        step skipped); False keeps contiguous shards and skips only the steps fully above the
        diagonal.
      reorder: permute inputs to the zig-zag layout and the output back. False means the
        inputs already are in zig-zag order (`x[:, zigzag_permutation(T, D)]`) and the output
        is returned in that order too.
      batch_axes, head_axes: mesh axes that shard B and N / K (None = replicated).
      inner: how each ring step's tile is computed: "xla" (einsums that materialise the
        step's float32 scores [B, N, T/D, S/D]; any platform, for short shards),
        "pallas_gpu" (the flash kernel of `flash_gpu.py`, blockwise on chip: memory O(shard),
        for long sequences on GPU; local shard halves must then be multiples of 64 tokens or
        shorter than 64) or "cudnn" (cuDNN's flash attention through `cudnn_tiles.py`: the
        fastest on GPU, bf16 / fp16 without segment ids).
      interpret: run the Pallas kernel in the interpreter (tests on CPU).

    Returns:
      [B, T, N, H] in q's dtype (natural order unless `reorder=False`).

    Raises:
      ValueError: on T != S, N % K != 0, indivisible lengths or half-given segment ids.
    """
    b, t, n, h = q.shape
    s_len, kh = k.shape[1], k.shape[2]
    if t != s_len or k.shape != v.shape:
        raise ValueError(f"ring attention needs self-attention shapes, got q {q.shape}, "
                         f"k {k.shape}, v {v.shape}")
    if n % kh:
        raise ValueError(f"query heads {n} not a multiple of kv heads {kh}")
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("q_segment_ids and kv_segment_ids must be given together")
    if inner not in ("xla", "pallas_gpu", "cudnn"):
        raise ValueError(f"inner must be 'xla', 'pallas_gpu' or 'cudnn', got {inner!r}")
    if inner == "cudnn" and q_segment_ids is not None:
        raise ValueError("inner='cudnn' takes no segment ids; use 'pallas_gpu' for packed "
                         "sequences")
    d = mesh.shape[axis]
    if t % (2 * d if load_balance else d):
        raise ValueError(f"length {t} not divisible for {d} shards (load_balance={load_balance})")
    scale = h**-0.5 if scale is None else float(scale)
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if load_balance:
        order = zigzag_permutation(t, d)
        pos = pos[:, order]
        if reorder:
            q, k, v = (x[:, order] for x in (q, k, v))
            if q_segment_ids is not None:
                q_segment_ids = q_segment_ids[:, order]
                kv_segment_ids = kv_segment_ids[:, order]

    x_spec = P(batch_axes, axis, head_axes, None)
    row_spec = P(batch_axes, axis)
    has_seg = q_segment_ids is not None
    opts = (axis, d, bool(causal), scale, bool(load_balance), inner, bool(interpret), has_seg)

    def body(q, k, v, pos, *seg):
        q_seg, k_seg = seg if has_seg else (None, None)
        if inner in _TILE_INNERS and not has_seg:  # the tile path passes ids; these mask nothing
            q_seg = k_seg = pos * 0
        return _ring_core(q, k, v, pos, pos, q_seg, k_seg, opts)

    in_specs = (x_spec, x_spec, x_spec, row_spec) + ((row_spec, row_spec) if has_seg else ())
    args = (q, k, v, pos) + ((q_segment_ids.astype(jnp.int32),
                              kv_segment_ids.astype(jnp.int32)) if has_seg else ())
    # pallas_call (and older JAX's cuDNN call) output types carry no varying-mesh-axis
    # annotation, so the flash inner kernels run without shard_map's vma type check (every
    # operand is sharded on `axis`).
    out = jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=x_spec,
                        check_vma=inner not in _TILE_INNERS)(*args)
    if load_balance and reorder:
        out = out[:, np.argsort(order)]
    return out
