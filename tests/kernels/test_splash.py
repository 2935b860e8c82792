"""`kernels/splash_tpu.py`: the TPU splash kernel in Pallas interpret mode on CPU.

The library kernel's interpreter works on CPU (jax 0.10), so forward and backward are checked
against the reference at TPU tile sizes (128); the mask construction is checked on its own.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longvid_jax.kernels.splash_tpu import make_splash_mask, splash_attention, splash_attention_ref
from tests.kernels._util import max_err, qkv, value_and_grads


def test_make_splash_mask():
    causal = make_splash_mask(3, 8, 8, causal=True)
    assert causal.shape == (3, 8, 8)
    np.testing.assert_array_equal(causal[1, :, :], np.tril(np.ones((8, 8), bool)))
    full = make_splash_mask(2, 4, 8, causal=False)
    assert full.shape == (2, 4, 8) and full[0, :, :].all()


@pytest.mark.parametrize("causal,packed", [(True, True), (False, False)])
def test_forward_backward_match_reference(causal, packed):
    q, k, v, seg, d_out = qkv(0, 1, 256, 4, 2, 128)  # GQA, two 128-token tiles
    segs = {"q_segment_ids": seg, "kv_segment_ids": seg} if packed else {}
    f = functools.partial(splash_attention, causal=causal, interpret=True, **segs)
    ref = functools.partial(splash_attention_ref, causal=causal, **segs)
    out, grads = jax.jit(lambda *a: value_and_grads(f, *a))(q, k, v, d_out)
    ref_out, ref_grads = value_and_grads(ref, q, k, v, d_out)
    assert max_err(out, ref_out) < 1e-4
    for name, g, rg in zip("qkv", grads, ref_grads):
        assert max_err(g, rg) < 1e-4, name


def test_lowers_for_tpu():
    """Forward and backward lower to Mosaic TPU kernels on a CPU-only host."""
    q = jax.ShapeDtypeStruct((1, 256, 4, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 256, 2, 128), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((1, 256), jnp.int32)

    def grads(q, k, v, seg):
        f = lambda *a: splash_attention(*a, causal=True, q_segment_ids=seg, kv_segment_ids=seg)
        return jax.grad(lambda *a: jnp.sum(f(*a).astype(jnp.float32) ** 2), (0, 1, 2))(q, k, v)

    text = jax.jit(grads).trace(q, kv, kv, seg).lower(lowering_platforms=("tpu",)).as_text()
    assert "tpu_custom_call" in text
