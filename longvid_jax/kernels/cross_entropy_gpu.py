"""Pallas (Triton) kernels for the softmax passes of the chunked LM loss on GPU.

`losses.chunked_lm_loss` computes, per chunk of tokens, logits [R, V] (V ~ 152K for Qwen2) and
from them the log-sum-exp of every row and the gradient d logits = (softmax - onehot) * weight.
These passes are memory-bound: inside the training step XLA spent ~3.5 ms of an H200 on them per
8192-token chunk of bf16 logits (a max reduction, a sum-of-exp reduction and the elementwise
gradient; BENCHMARKS.md), where one read for the log-sum-exp and one read and write for the
gradient take ~2 ms at the memory's bandwidth. Here:

  `logsumexp(logits)`            one pass: a running max and rescaled sum per row (the online
                                 softmax of Milakov & Gimelshein 2018, "Online normalizer
                                 calculation for softmax", Algorithm 3) -> float32 [R].
  `softmax_grad(logits, lse, targets, weights)`
                                 one read and one write: (exp(x - lse) - [col == target]) *
                                 weight, in the logits' dtype.

Each program streams `block_rows` rows in tiles of `block_cols` columns with masked loads, so V
need not be a power of two or a multiple of the tile. `interpret=True` runs them anywhere (CI on
CPU); `logsumexp_ref` / `softmax_grad_ref` are the pure-JAX references they are tested against.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jaxtyping import Array, Float, Int

_NEG_INF = float("-inf")


def logsumexp_ref(logits: Float[Array, "R V"]) -> Float[Array, " R"]:
    """float32 log-sum-exp of each row (reference)."""
    return jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)


def softmax_grad_ref(logits: Float[Array, "R V"], lse: Float[Array, " R"],
                     targets: Int[Array, " R"], weights: Float[Array, " R"], dtype=None
                     ) -> Float[Array, "R V"]:
    """(softmax(logits) - onehot(targets)) * weights[:, None], computed in float32 and returned
    in `dtype` (default: the logits' dtype) (reference)."""
    p = jnp.exp(logits.astype(jnp.float32) - lse[:, None])
    onehot = jnp.arange(logits.shape[1])[None, :] == targets[:, None]
    return ((p - onehot) * weights[:, None]).astype(dtype or logits.dtype)


def _params(num_warps):
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=1)


def _tile(row0, col0, block_rows, block_cols, n_cols):
    """Column indices [bc], the in-bounds mask and the ref index of one [block_rows, block_cols]
    tile."""
    cols = col0 + lax.broadcasted_iota(jnp.int32, (block_cols,), 0)
    mask = jnp.broadcast_to((cols < n_cols)[None, :], (block_rows, block_cols))
    return cols, mask, (pl.ds(row0, block_rows), pl.ds(col0, block_cols))


def _lse_kernel(x_ref, lse_ref, *, block_rows, block_cols, n_cols):
    row0 = pl.program_id(0) * block_rows

    def body(j, carry):
        m, s = carry
        col0 = pl.multiple_of(j * block_cols, block_cols)
        _, mask, idx = _tile(row0, col0, block_rows, block_cols, n_cols)
        x = plgpu.load(x_ref.at[idx], mask=mask, other=_NEG_INF).astype(jnp.float32)
        m_new = jnp.maximum(m, jnp.max(x, axis=1))
        s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(x - m_new[:, None]), axis=1)
        return m_new, s

    init = (jnp.full((block_rows,), _NEG_INF, jnp.float32), jnp.zeros((block_rows,), jnp.float32))
    m, s = lax.fori_loop(0, pl.cdiv(n_cols, block_cols), body, init)
    lse_ref[pl.ds(row0, block_rows)] = m + jnp.log(s)


def _grad_kernel(x_ref, lse_ref, t_ref, w_ref, g_ref, *, block_rows, block_cols, n_cols):
    row0 = pl.program_id(0) * block_rows
    rows = pl.ds(row0, block_rows)
    lse, t, w = lse_ref[rows], t_ref[rows], w_ref[rows]

    def body(j, carry):
        col0 = pl.multiple_of(j * block_cols, block_cols)
        cols, mask, idx = _tile(row0, col0, block_rows, block_cols, n_cols)
        x = plgpu.load(x_ref.at[idx], mask=mask, other=0.0).astype(jnp.float32)
        p = jnp.exp(x - lse[:, None])
        g = (p - jnp.where(cols[None, :] == t[:, None], 1.0, 0.0)) * w[:, None]
        plgpu.store(g_ref.at[idx], g.astype(g_ref.dtype), mask=mask)
        return carry

    lax.fori_loop(0, pl.cdiv(n_cols, block_cols), body, 0)


def _row_call(kernel, name, out_shape, logits, *rest, block_rows, block_cols, num_warps,
              interpret):
    """Runs `kernel` over row blocks of logits [R, V] (one program per `block_rows` rows)."""
    if logits.ndim != 2 or logits.shape[0] % block_rows:
        raise ValueError(f"logits must be [R, V] with R a multiple of block_rows={block_rows}, "
                         f"got shape {logits.shape}")
    kernel = functools.partial(kernel, block_rows=block_rows, block_cols=block_cols,
                               n_cols=logits.shape[1])
    return pl.pallas_call(
        kernel, grid=(logits.shape[0] // block_rows,), out_shape=out_shape,
        interpret=interpret, compiler_params=_params(num_warps), name=name,
    )(logits, *rest)


@functools.partial(jax.jit, static_argnames=("block_rows", "block_cols", "num_warps",
                                             "interpret"))
def logsumexp(logits: Float[Array, "R V"], *, block_rows: int = 1, block_cols: int = 4096,
              num_warps: int = 4, interpret: bool = False) -> Float[Array, " R"]:
    """float32 log-sum-exp of each row of `logits` (bf16 / fp16 / f32) in one pass.

    Args:
      logits: [R, V]; R a multiple of `block_rows` (powers of two, as Triton wants for tiles);
        any V.
      block_rows, block_cols, num_warps: the tile each program streams and its warps. The
        defaults were the fastest of 28 settings on an H200 for [8192, 151936] bf16 logits:
        0.73 ms (3.4 TB/s) against 1.45 ms for XLA's `jax.nn.logsumexp`.
      interpret: run in the Pallas interpreter (any backend).

    Raises:
      ValueError: logits not 2-D or R not a multiple of block_rows.
    """
    return _row_call(_lse_kernel, "ce_logsumexp",
                     jax.ShapeDtypeStruct(logits.shape[:1], jnp.float32), logits,
                     block_rows=block_rows, block_cols=block_cols, num_warps=num_warps,
                     interpret=interpret)


@functools.partial(jax.jit, static_argnames=("block_rows", "block_cols", "num_warps",
                                             "interpret"))
def softmax_grad(logits: Float[Array, "R V"], lse: Float[Array, " R"],
                 targets: Int[Array, " R"], weights: Float[Array, " R"], *,
                 block_rows: int = 1, block_cols: int = 4096, num_warps: int = 4,
                 interpret: bool = False) -> Float[Array, "R V"]:
    """d loss / d logits of weighted softmax cross-entropy: (softmax - onehot) * weight.

    Args:
      logits: [R, V] (bf16 / fp16 / f32); R a multiple of `block_rows`.
      lse: float32 [R] log-sum-exp of each row (`logsumexp`).
      targets: int32 [R] target column of each row.
      weights: float32 [R] loss weight of each row (0 for padding).
      block_rows, block_cols, num_warps, interpret: as `logsumexp` (on the same H200 and
        logits: 1.29 ms, 3.9 TB/s, against 1.50 ms for XLA's fusion of `softmax_grad_ref`).

    Returns:
      [R, V] in the logits' dtype (computed in float32).

    Raises:
      ValueError: logits not 2-D or R not a multiple of block_rows.
    """
    return _row_call(_grad_kernel, "ce_softmax_grad",
                     jax.ShapeDtypeStruct(logits.shape, logits.dtype), logits,
                     lse.astype(jnp.float32), targets.astype(jnp.int32),
                     weights.astype(jnp.float32), block_rows=block_rows,
                     block_cols=block_cols, num_warps=num_warps, interpret=interpret)
