"""`kernels/decode_gpu.py`: split-K decode attention (interpret mode on CPU) against the XLA
`decoder.cached_attention`, and its lowering for CUDA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longvid_jax.kernels import decode_gpu
from longvid_jax.models.decoder import cached_attention


def _inputs(seed, b, t, n, kh, h, s, layers=None):
    rng = np.random.default_rng(seed)

    def f(*shape):
        return jnp.asarray(rng.normal(size=shape), jnp.float32)

    cache_shape = (b, s, kh, h) if layers is None else (layers, b, s, kh, h)
    return f(b, t, n, h), f(b, t, kh, h), f(b, t, kh, h), f(*cache_shape), f(*cache_shape)


@pytest.mark.parametrize("t,heads,lengths,layer", [
    (1, (14, 2), (100, 192, 0), 2),  # one decode step, GQA 7, stacked cache, an empty row
    (1, (4, 4), (1, 64, 191), None),  # MHA, one-layer cache, a block boundary
    (3, (6, 2), (37, 128, 150), 0),  # three new tokens at once (causal among themselves)
])
def test_matches_xla_cached_attention(t, heads, lengths, layer):
    n, kh = heads
    layers = None if layer is None else 3
    q, k, v, kc, vc = _inputs(t, 3, t, n, kh, 32, 192, layers)
    lengths = jnp.asarray(lengths, jnp.int32)
    ref = cached_attention(q, k, v, kc, vc, lengths, layer=layer)
    for target in (1, 12, 64):  # one split per (row, head) up to one block per program
        out = decode_gpu.decode_attention(q, k, v, kc, vc, lengths, layer=layer,
                                          target_programs=target, interpret=True)
        assert float(jnp.abs(out - ref).max()) < 1e-5, target


def test_segment_ids_among_new_tokens():
    q, k, v, kc, vc = _inputs(5, 2, 4, 4, 2, 16, 128)
    lengths = jnp.asarray([50, 3], jnp.int32)
    seg = jnp.asarray([[1, 1, 2, 2], [1, 0, 0, 1]], jnp.int32)
    ref = cached_attention(q, k, v, kc, vc, lengths, seg)
    out = decode_gpu.decode_attention(q, k, v, kc, vc, lengths, segment_ids=seg, interpret=True)
    assert float(jnp.abs(out - ref).max()) < 1e-5


def test_errors():
    q, k, v, kc, vc = _inputs(0, 1, 1, 4, 2, 16, 96)
    lengths = jnp.asarray([10], jnp.int32)
    with pytest.raises(ValueError, match="divisible by block_k"):
        decode_gpu.decode_attention(q, k, v, kc, vc, lengths, interpret=True)
    with pytest.raises(ValueError, match="needs `layer`"):
        decode_gpu.decode_attention(q, k, v, kc, vc, lengths, layer=0, interpret=True)
    with pytest.raises(ValueError, match="bad shapes"):
        decode_gpu.decode_attention(q, k, v, kc, vc[:, :64], lengths, block_k=32,
                                    interpret=True)


def test_lowers_to_triton_for_cuda():
    """Qwen2-7B decode shapes (28 / 4 heads, head dim 128, stacked 28-layer bf16 cache) lower
    for CUDA on a CPU-only host (Pallas -> Triton IR): one kernel reading layer 5 in place."""
    q = jax.ShapeDtypeStruct((1, 1, 28, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 1, 4, 128), jnp.bfloat16)
    cache = jax.ShapeDtypeStruct((28, 1, 8448, 4, 128), jnp.bfloat16)
    lengths = jax.ShapeDtypeStruct((1,), jnp.int32)

    def f(q, k, v, kc, vc, lengths):
        return decode_gpu.decode_attention(q, k, v, kc, vc, lengths, layer=5)

    lowered = jax.jit(f).trace(q, kv, kv, cache, cache, lengths).lower(
        lowering_platforms=("cuda",))
    assert lowered.as_text().count("__gpu$xla.gpu.triton") == 1
