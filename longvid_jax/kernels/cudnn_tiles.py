"""cuDNN flash attention as a tile of a larger attention: forward with its log-sum-exp, and
the backward of one tile given the *final* output and log-sum-exp of all tiles.

Ring attention (`ring.py`) splits one attention over key / value shards; each step computes a
partial output and its log-sum-exp, merged across steps by log-sum-exp weights, and the
backward of each step needs the merged output and log-sum-exp (FlashAttention-2, Dao 2023,
Algorithm 2: P = exp(S - lse), D = rowsum(dO * O)). `jax.nn.dot_product_attention` hides both
(its VJP recomputes from its own tile's statistics), so this module calls JAX's cuDNN fused
attention (`jax._src.cudnn.fused_attention_stablehlo`) at the level below: the forward with
`return_residual=True` (cuDNN's softmax statistics) and the backward primitive with the
statistics and output handed in. These are JAX internals; `supported()` says whether this
JAX has them, and `check_against_reference` (run on a GPU by `benchmarks/longest_sequence.py
--check_tiles`) compares both calls with the pure-JAX contract below.

Letters: B batch, T query tokens, S key / value tokens, N query heads, K kv heads (N % K == 0),
H head dim (<= 128 or 256 on Hopper, multiple of 8). bf16 / fp16 only; no segment ids.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float


def _fused():
    from jax._src.cudnn import fused_attention_stablehlo as fa
    return fa


def supported() -> bool:
    """Whether this JAX exposes the cuDNN calls used here (the platform is not checked)."""
    try:
        fa = _fused()
        return all(hasattr(fa, name) for name in (
            "dot_product_attention", "_dot_product_attention_bwd_p_wrapper", "MaskType",
            "AttentionLayout"))
    except ImportError:
        return False


def _mask(causal: bool):
    fa = _fused()
    return fa.MaskType.CAUSAL if causal else fa.MaskType.NO_MASK


def tile_forward(q: Float[Array, "B T N H"], k: Float[Array, "B S K H"],
                 v: Float[Array, "B S K H"], *, causal: bool, scale: float
                 ) -> tuple[Float[Array, "B T N H"], Float[Array, "B N T"]]:
    """Attention of one tile through cuDNN: (out [B, T, N, H] in q's dtype, float32 lse
    [B, N, T] = log sum_s exp(scale * q.k_s)). `causal`: query t sees keys s <= t (top-left
    aligned, T == S). Not differentiable (the ring's custom VJP calls `tile_backward`)."""
    out, lse = _fused().dot_product_attention(
        q, k, v, scale=scale, mask_type=_mask(causal), qkv_layout="BTNH", return_residual=True)
    return out, lse.astype(jnp.float32)


def tile_backward(q: Float[Array, "B T N H"], k: Float[Array, "B S K H"],
                  v: Float[Array, "B S K H"], out: Float[Array, "B T N H"],
                  lse: Float[Array, "B N T"], d_out: Float[Array, "B T N H"], *, causal: bool,
                  scale: float):
    """(dq, dk, dv) of one tile, in q's / k's / v's dtypes, given the final output `out`
    ([B, T, N, H], q's dtype), its float32 log-sum-exp `lse` [B, N, T] and the output
    cotangent `d_out`: the tile's share of the gradient of the whole attention."""
    fa = _fused()
    empty = jnp.zeros((0,), q.dtype)
    grads = fa._dot_product_attention_bwd_p_wrapper.bind(
        q, k, v, empty, empty, empty, empty, empty, empty, empty, lse, out.astype(q.dtype),
        d_out.astype(q.dtype), scale=scale, seed=42, dropout_rate=0.0,
        variadic_args=(False, False), mask_type=_mask(causal),
        layout=fa.AttentionLayout.BTNH.value, sliding_window_length=None)
    return tuple(grads[:3])


# --- The contract in pure JAX (float32 scores; tests and the GPU check) ----------------------
# Written with the XLA ring step's tile functions (`ring._block_stats` / `_block_grads`),
# imported when called: `ring` imports this module.


def _grouped(q, k):
    """q [B, T, N, H] as [B, T, K, G, H] and the positions that make the causal mask."""
    b, t, n, h = q.shape
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    k_pos = jnp.broadcast_to(jnp.arange(k.shape[1], dtype=jnp.int32), (b, k.shape[1]))
    return q.reshape(b, t, k.shape[2], n // k.shape[2], h), pos, k_pos


def reference_forward(q, k, v, *, causal, scale):
    """`tile_forward` in XLA: same shapes and dtypes."""
    from longvid_jax.kernels import ring

    b, t, n, h = q.shape
    qg, pos, k_pos = _grouped(q, k)
    m, l, acc = ring._block_stats(qg, k, v, pos, k_pos, None, None, causal=causal, scale=scale)
    out = acc / jnp.moveaxis(l, -1, 1)[..., None]
    return out.reshape(q.shape).astype(q.dtype), (m + jnp.log(l)).reshape(b, n, t)


def reference_backward(q, k, v, out, lse, d_out, *, causal, scale):
    """`tile_backward` in XLA (FlashAttention-2 Algorithm 2 for one tile)."""
    from longvid_jax.kernels import ring

    b, t, n, h = q.shape
    f32 = jnp.float32
    qg, pos, k_pos = _grouped(q, k)
    dog = d_out.reshape(qg.shape)
    delta = jnp.einsum("BTKGH,BTKGH->BKGT", out.reshape(qg.shape).astype(f32), dog.astype(f32))
    dq, dk, dv = ring._block_grads(qg, k, v, dog, lse.reshape(delta.shape), delta, pos, k_pos,
                                   None, None, causal=causal, scale=scale)
    return dq.reshape(q.shape).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


def check_against_reference(seed: int = 0, t: int = 512, n: int = 8, kh: int = 2,
                            h: int = 64) -> dict[str, float]:
    """Largest absolute difference of `tile_forward` / `tile_backward` from the reference on
    random bf16 inputs (both causal and full), as {name: error}; needs a GPU with cuDNN. The
    backward is checked with a *foreign* (out, lse): those of a tile twice as long, as a ring
    step sees them."""
    keys = jax.random.split(jax.random.key(seed), 5)
    bf = jnp.bfloat16
    q = jax.random.normal(keys[0], (1, t, n, h), bf)
    k2 = jax.random.normal(keys[1], (1, 2 * t, kh, h), bf)
    v2 = jax.random.normal(keys[2], (1, 2 * t, kh, h), bf)
    d_out = jax.random.normal(keys[3], (1, t, n, h), bf)
    scale = h**-0.5
    errs = {}
    for causal in (False, True):
        k, v = k2[:, :t], v2[:, :t]
        got = jax.jit(lambda *a: tile_forward(*a, causal=causal, scale=scale))(q, k, v)
        ref = reference_forward(q, k, v, causal=causal, scale=scale)
        errs[f"out causal={causal}"] = float(jnp.max(jnp.abs(
            got[0].astype(jnp.float32) - ref[0].astype(jnp.float32))))
        errs[f"lse causal={causal}"] = float(jnp.max(jnp.abs(got[1] - ref[1])))
        # Final statistics of q against all 2t keys (no mask): this tile covers the first t.
        out, lse = reference_forward(q, k2, v2, causal=False, scale=scale)
        got = jax.jit(lambda *a: tile_backward(*a, causal=causal, scale=scale))(
            q, k, v, out, lse, d_out)
        ref = reference_backward(q, k, v, out, lse, d_out, causal=causal, scale=scale)
        for name, g, r in zip(("dq", "dk", "dv"), got, ref):
            errs[f"{name} causal={causal}"] = float(jnp.max(jnp.abs(
                g.astype(jnp.float32) - r.astype(jnp.float32))))
    return errs
