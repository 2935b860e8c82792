"""Pallas cross-entropy kernels against their pure-JAX references (interpret mode on CPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longvid_jax import losses
from longvid_jax.kernels import cross_entropy_gpu as ce


def _inputs(seed, rows, vocab, dtype):
    keys = jax.random.split(jax.random.key(seed), 3)
    logits = (jax.random.normal(keys[0], (rows, vocab)) * 6).astype(dtype)
    targets = jax.random.randint(keys[1], (rows,), 0, vocab)
    weights = jax.random.uniform(keys[2], (rows,)) * (jnp.arange(rows) % 5 != 0)
    return logits, targets, weights


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_kernels_match_references_with_a_ragged_last_tile(dtype):
    logits, targets, weights = _inputs(0, 16, 1000, dtype)  # 1000 = 3 x 256 + 232
    lse = ce.logsumexp(logits, block_rows=4, block_cols=256, interpret=True)
    np.testing.assert_allclose(lse, ce.logsumexp_ref(logits), rtol=1e-6, atol=1e-5)
    grad = ce.softmax_grad(logits, lse, targets, weights, block_cols=256, interpret=True)
    ref = ce.softmax_grad_ref(logits, lse, targets, weights)
    assert grad.dtype == logits.dtype and grad.shape == logits.shape
    np.testing.assert_allclose(np.asarray(grad, np.float32), np.asarray(ref, np.float32),
                               atol=1e-6)
    # Each weighted row sums to zero (softmax sums to one, minus the one-hot).
    np.testing.assert_allclose(np.asarray(grad, np.float32).sum(1), 0.0, atol=2e-2)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="multiple of block_rows"):
        ce.logsumexp(jnp.zeros((6, 10)), block_rows=4, interpret=True)


def test_chunked_loss_with_the_kernels_equals_the_xla_passes():
    keys = jax.random.split(jax.random.key(4), 4)
    hidden = jax.random.normal(keys[0], (2, 12, 16), jnp.bfloat16)
    head = jax.random.normal(keys[1], (16, 300)) * 0.4
    targets = jax.random.randint(keys[2], (2, 12), 0, 300)
    weights = (jax.random.uniform(keys[3], (2, 12)) > 0.3).astype(jnp.float32)

    def loss(h, w, impl):
        return 2.0 * losses.chunked_lm_loss(h, w, targets, weights, chunk_size=8,
                                            dtype=jnp.bfloat16, logits_dtype=jnp.bfloat16,
                                            impl=impl)[0]

    v_x, g_x = jax.value_and_grad(loss, argnums=(0, 1))(hidden, head, "xla")
    v_p, g_p = jax.value_and_grad(loss, argnums=(0, 1))(hidden, head, "pallas_interpret")
    np.testing.assert_allclose(v_p, v_x, rtol=1e-5)
    for a, b in zip(g_p, g_x):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.abs(a - b).max() <= 1e-2 * np.abs(b).max()
    np.testing.assert_allclose(loss(hidden, head, "pallas_interpret"), v_x, rtol=1e-5)
    with pytest.raises(ValueError, match="unknown loss impl"):
        loss(hidden, head, "triton")


def test_auto_keeps_xla_on_cpu_and_kernels_lower_for_cuda():
    assert losses._resolve_impl("auto", 8192) == "xla"
    logits, targets, weights = _inputs(1, 8, 3000, jnp.bfloat16)

    def f(x):
        return ce.softmax_grad(x, ce.logsumexp(x), targets, weights)

    text = jax.jit(f).trace(logits).lower(lowering_platforms=("cuda",)).as_text()
    assert "ce_logsumexp" in text and "ce_softmax_grad" in text
