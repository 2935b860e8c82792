"""`kernels/flash_gpu.py`: Pallas flash attention (interpret mode on CPU) against its reference."""

import functools

import jax
import jax.numpy as jnp
import pytest

from longvid_jax.kernels.flash_gpu import flash_attention, flash_attention_ref
from tests.kernels._util import max_err, qkv, value_and_grads


@pytest.mark.parametrize("causal,packed,heads", [
    (True, False, (4, 2)),  # causal GQA
    (True, True, (4, 1)),  # causal, packed, MQA
    (False, True, (2, 2)),  # bidirectional packed, MHA
])
def test_forward_backward_match_reference(causal, packed, heads):
    n, kh = heads
    q, k, v, seg, d_out = qkv(0, 2, 64, n, kh, 16)
    segs = {"q_segment_ids": seg, "kv_segment_ids": seg} if packed else {}
    kernel = jax.jit(functools.partial(flash_attention, causal=causal, block_q=16, block_k=32,
                                       interpret=True, **segs))
    ref = functools.partial(flash_attention_ref, causal=causal, **segs)
    out, grads = jax.jit(lambda *a: value_and_grads(kernel, *a))(q, k, v, d_out)
    ref_out, ref_grads = value_and_grads(ref, q, k, v, d_out)
    assert max_err(out, ref_out) < 1e-5
    for name, g, rg in zip("qkv", grads, ref_grads):
        assert max_err(g, rg) < 1e-4, name


def test_errors():
    q, k, v, seg, _ = qkv(1, 1, 48, 3, 2, 16)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        flash_attention(q, k, v, interpret=True)
    q, k, v, seg, _ = qkv(1, 1, 48, 2, 2, 16)
    with pytest.raises(ValueError, match="multiples of block_q"):
        flash_attention(q, k, v, block_q=32, interpret=True)
    with pytest.raises(ValueError, match="together"):
        flash_attention(q, k, v, q_segment_ids=seg, block_q=16, block_k=16, interpret=True)


def test_lowers_to_triton_for_cuda():
    """Forward and backward lower for CUDA on a CPU-only host (Pallas -> Triton IR)."""
    q = jax.ShapeDtypeStruct((1, 128, 4, 64), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 128, 2, 64), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((1, 128), jnp.int32)

    def grads(q, k, v, seg):
        f = lambda *a: flash_attention(*a, causal=True, q_segment_ids=seg, kv_segment_ids=seg)
        return jax.grad(lambda *a: jnp.sum(f(*a).astype(jnp.float32) ** 2), (0, 1, 2))(q, k, v)

    text = jax.jit(grads).trace(q, kv, kv, seg).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 3  # forward, dq, dk / dv kernels
