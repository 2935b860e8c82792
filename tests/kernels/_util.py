"""Random inputs shared by the kernel tests."""

import jax
import jax.numpy as jnp
import numpy as np


def qkv(seed, b, t, n, kh, h, dtype=jnp.float32):
    """Random q [B, T, N, H], k / v [B, T, K, H], packed segment ids int32[B, T] (1..3, sorted)
    and an output cotangent [B, T, N, H]."""
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(b, t, n, h)), dtype)
    k = jnp.asarray(rng.normal(size=(b, t, kh, h)), dtype)
    v = jnp.asarray(rng.normal(size=(b, t, kh, h)), dtype)
    seg = jnp.asarray(np.sort(rng.integers(1, 4, (b, t)), axis=1), jnp.int32)
    d_out = jnp.asarray(rng.normal(size=(b, t, n, h)), dtype)
    return q, k, v, seg, d_out


def value_and_grads(f, q, k, v, d_out):
    """f(q, k, v) and the gradients of <f(q, k, v), d_out> with respect to q, k, v."""
    out, vjp = jax.vjp(f, q, k, v)
    return out, vjp(d_out)


def max_err(a, b):
    return float(jnp.max(jnp.abs(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32))))
