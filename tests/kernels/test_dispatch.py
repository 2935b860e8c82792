"""`kernels/dispatch.py`: implementation choice, the score-size guard and routing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from longvid_jax.kernels import dispatch
from longvid_jax.kernels.flash_gpu import flash_attention_ref
from tests.kernels._util import max_err, qkv


@pytest.mark.parametrize("backend,dtype,packed,want", [
    ("cpu", jnp.float32, True, "xla"),
    ("tpu", jnp.bfloat16, True, "splash"),
    ("gpu", jnp.bfloat16, False, "cudnn"),
    ("cuda", jnp.float16, False, "cudnn"),
    ("gpu", jnp.bfloat16, True, "pallas_gpu"),
    ("gpu", jnp.float32, False, "pallas_gpu"),
])
def test_select_implementation(backend, dtype, packed, want):
    got = dispatch.select_implementation(backend=backend, dtype=dtype, has_segment_ids=packed)
    assert got == want


def test_select_ring_when_context_axis_is_sharded():
    devices = np.asarray(jax.devices()[:4])
    ring_mesh = Mesh(devices.reshape(1, 4), ("data", "context"))
    flat_mesh = Mesh(devices.reshape(4, 1), ("data", "context"))
    kw = {"backend": "gpu", "dtype": jnp.bfloat16, "has_segment_ids": False}
    assert dispatch.select_implementation(mesh=ring_mesh, **kw) == "ring"
    assert dispatch.select_implementation(mesh=flat_mesh, **kw) == "cudnn"


def test_auto_on_cpu_is_xla_reference():
    q, k, v, seg, _ = qkv(0, 2, 32, 4, 2, 16)
    out = dispatch.attention(q, k, v, causal=True, segment_ids=seg)
    ref = flash_attention_ref(q, k, v, causal=True, q_segment_ids=seg, kv_segment_ids=seg)
    assert max_err(out, ref) < 1e-6


def test_refuses_large_score_matrix():
    q = jax.ShapeDtypeStruct((2, 4096, 8, 64), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, 4096, 2, 64), jnp.bfloat16)
    assert dispatch.score_bytes(q.shape, 4096) == 4 * 2 * 8 * 4096 * 4096
    with pytest.raises(ValueError, match="max_score_bytes"):
        jax.eval_shape(lambda q, k, v: dispatch.attention(q, k, v, implementation="xla",
                                                          max_score_bytes=2**29), q, kv, kv)
    out = jax.eval_shape(lambda q, k, v: dispatch.attention(q, k, v, implementation="xla",
                                                            max_score_bytes=2**30), q, kv, kv)
    assert out.shape == q.shape


@pytest.mark.parametrize("implementation", ["pallas_gpu", "ring"])
def test_routes_to_kernels(implementation):
    q, k, v, seg, _ = qkv(1, 1, 32, 2, 1, 16)
    mesh = Mesh(np.asarray(jax.devices()[:4]), ("context",))
    out = dispatch.attention(q, k, v, causal=True, segment_ids=seg, mesh=mesh,
                             implementation=implementation, interpret=True)
    ref = flash_attention_ref(q, k, v, causal=True, q_segment_ids=seg, kv_segment_ids=seg)
    assert max_err(out, ref) < 1e-5


def test_errors():
    q, k, v, seg, _ = qkv(2, 1, 16, 2, 2, 16)
    with pytest.raises(ValueError, match="unknown attention implementation"):
        dispatch.attention(q, k, v, implementation="flash")
    with pytest.raises(ValueError, match="no segment ids"):
        dispatch.attention(q, k, v, segment_ids=seg, implementation="cudnn")
    with pytest.raises(ValueError, match="needs a mesh"):
        dispatch.attention(q, k, v, implementation="ring")
    with pytest.raises(ValueError, match="without segment_ids"):
        dispatch.attention(q, k, v, kv_segment_ids=seg)


def test_right_padding_goes_to_cudnn_with_lengths():
    kw = {"backend": "gpu", "dtype": jnp.bfloat16, "has_segment_ids": True}
    assert dispatch.select_implementation(padding_only=True, **kw) == "cudnn"
    assert dispatch.select_implementation(padding_only=False, **kw) == "pallas_gpu"
    q, k, v, _, _ = qkv(2, 2, 32, 4, 2, 16)
    seg = jnp.asarray([[1] * 20 + [0] * 12, [1] * 32], jnp.int32)
    with pytest.raises(ValueError, match="padding_only"):
        dispatch.attention(q, k, v, causal=True, segment_ids=seg, implementation="cudnn")
    # The XLA path ignores the promise: same result as with segment ids.
    out = dispatch.attention(q, k, v, causal=True, segment_ids=seg, padding_only=True)
    ref = flash_attention_ref(q, k, v, causal=True, q_segment_ids=seg, kv_segment_ids=seg)
    assert max_err(out[0, :20], ref[0, :20]) < 1e-6 and max_err(out[1], ref[1]) < 1e-6
