"""Attention forward+backward TFLOP/s: the dispatcher's implementations side by side.

    python benchmarks/attention.py [--seq=8192,32768] [--impls=cudnn,pallas_gpu,xla] [--smoke]

An implementation "pallas_gpu@BQ/BK/WARPS/STAGES" runs our Pallas kernel with those tile sizes
and Triton parameters (tuning).

Causal GQA with 28 query / 4 kv heads, head dim 128, batch 1, bf16 (issue 4, benchmark 2). Each
implementation is checked against the float32 reference on a short sequence first, then timed:
median of `--iters` runs of a jitted `grad(sum(attention(q, k, v) * w))` after warm-up. FLOPs count
the causal half only: 4 * B * N * T^2 * H / 2 forward and 2.5x that for backward (FlashAttention-2's
convention). `--packed` adds segment ids (four packed sequences), which cuDNN does not take.
`--padded` gives one sequence per row followed by right padding (cuDNN serves it through
sequence lengths). `--smoke` runs tiny sizes on any backend (CPU included, Pallas in interpret
mode).
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from longvid_jax.kernels import dispatch, flash_gpu


def _inputs(seq, heads, kv_heads, head_dim, dtype, packed, padded=False):
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (1, seq, heads, head_dim), dtype)
    k = jax.random.normal(keys[1], (1, seq, kv_heads, head_dim), dtype)
    v = jax.random.normal(keys[2], (1, seq, kv_heads, head_dim), dtype)
    w = jax.random.normal(keys[3], (1, seq, heads, head_dim), dtype)
    seg = None
    if packed:
        seg = jnp.asarray(np.repeat(np.arange(1, 5), seq // 4)[None], jnp.int32)
    if padded:  # one sequence of 3/4 of the row, then right padding (no gradient from it)
        seg = jnp.asarray((np.arange(seq) < 3 * seq // 4)[None], jnp.int32)
        w = w * seg[..., None, None].astype(w.dtype)
    return q, k, v, w, seg


def _attention(impl, interpret, padding_only=False):
    """`dispatch.attention` for a name; "pallas_gpu@BQ/BK/WARPS/STAGES" calls our Pallas kernel
    with those tile sizes and Triton parameters (for tuning its defaults)."""
    if "@" in impl:
        bq, bk, warps, stages = (int(x) for x in impl.split("@")[1].split("/"))
        return lambda q, k, v, seg: flash_gpu.flash_attention(
            q, k, v, causal=True, q_segment_ids=seg, kv_segment_ids=seg, block_q=bq,
            block_k=bk, num_warps=warps, num_stages=stages, interpret=interpret)
    return lambda q, k, v, seg: dispatch.attention(
        q, k, v, causal=True, segment_ids=seg, implementation=impl, interpret=interpret,
        max_score_bytes=1 << 40, padding_only=padding_only)


def _loss_fn(impl, interpret, padding_only=False):
    attention = _attention(impl, interpret, padding_only)

    def loss(q, k, v, w, seg):
        out = attention(q, k, v, seg)
        return jnp.sum(out.astype(jnp.float32) * w.astype(jnp.float32))
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def check(impl, args, interpret, padding_only=False):
    """Max abs error of the gradients vs the float32 XLA reference."""
    q, k, v, w, seg = args
    ref = _loss_fn("xla", False)(*(x.astype(jnp.float32) for x in (q, k, v, w)), seg)
    got = _loss_fn(impl, interpret, padding_only)(q, k, v, w, seg)
    return max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b))) for a, b in zip(got, ref))


def time_it(fn, args, iters):
    out = fn(*args)
    jax.block_until_ready(out)
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seq", default="8192,32768")
    p.add_argument("--impls", default="cudnn,pallas_gpu,xla")
    p.add_argument("--heads", type=int, default=28)
    p.add_argument("--kv_heads", type=int, default=4)
    p.add_argument("--head_dim", type=int, default=128)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--packed", action="store_true")
    p.add_argument("--padded", action="store_true",
                   help="right padding as segment ids (cuDNN takes it as sequence lengths)")
    p.add_argument("--smoke", action="store_true")
    a = p.parse_args()
    interpret = a.smoke and jax.default_backend() == "cpu"
    seqs = [64] if a.smoke else [int(s) for s in a.seq.split(",")]
    heads, kv_heads, head_dim = (4, 2, 16) if a.smoke else (a.heads, a.kv_heads, a.head_dim)
    dtype = jnp.float32 if interpret else jnp.bfloat16
    print(f"device: {jax.devices()[0].device_kind}; jax {jax.__version__}; "
          f"heads {heads}/{kv_heads}, head dim {head_dim}, packed={a.packed}, "
          f"padded={a.padded}")
    for impl in a.impls.split(","):
        if impl == "cudnn" and (a.packed or interpret):
            continue
        small = _inputs(min(1024, seqs[0]), heads, kv_heads, head_dim, dtype, a.packed,
                        a.padded)
        try:
            err = check(impl, small, interpret, a.padded)
        except Exception as e:  # report and go on to the next implementation
            print(f"{impl}: check failed: {type(e).__name__}: {str(e)[:300]}")
            continue
        for seq in seqs:
            args = _inputs(seq, heads, kv_heads, head_dim, dtype, a.packed, a.padded)
            flops = 3.5 * 4 * seq * seq * heads * head_dim / 2
            try:
                dt = time_it(_loss_fn(impl, interpret, a.padded), args,
                             1 if a.smoke else a.iters)
            except Exception as e:
                print(f"{impl} T={seq}: failed: {type(e).__name__}: {str(e)[:300]}")
                continue
            print(f"{impl} T={seq}: {dt * 1e3:.2f} ms fwd+bwd, {flops / dt / 1e12:.1f} TFLOP/s "
                  f"(grad max err vs f32 ref at T={small[0].shape[1]}: {err:.3g})")


if __name__ == "__main__":
    main()
