"""`kernels/ring.py`: ring attention on the 4 fake CPU devices against its reference."""

import functools

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from longvid_jax.kernels import cudnn_tiles
from longvid_jax.kernels.ring import ring_attention, ring_attention_ref, zigzag_permutation
from tests.kernels._util import max_err, qkv, value_and_grads


@pytest.fixture(scope="module")
def mesh():
    return Mesh(np.asarray(jax.devices()[:4]).reshape(1, 4), ("data", "context"))


def test_zigzag_permutation():
    perm = zigzag_permutation(16, 2)  # chunks of 4: shard 0 gets chunks 0, 3; shard 1: 1, 2
    np.testing.assert_array_equal(perm, [0, 1, 2, 3, 12, 13, 14, 15, 4, 5, 6, 7, 8, 9, 10, 11])
    assert sorted(zigzag_permutation(24, 3)) == list(range(24))
    with pytest.raises(ValueError):
        zigzag_permutation(20, 4)


@pytest.mark.parametrize("causal,packed,load_balance", [
    (True, False, True),
    (True, True, True),
    (True, True, False),
    (False, True, True),
])
def test_forward_backward_match_reference(mesh, causal, packed, load_balance):
    q, k, v, seg, d_out = qkv(0, 2, 64, 4, 2, 16)
    segs = {"q_segment_ids": seg, "kv_segment_ids": seg} if packed else {}
    f = functools.partial(ring_attention, mesh=mesh, axis="context", causal=causal,
                          load_balance=load_balance, batch_axes="data", **segs)
    ref = functools.partial(ring_attention_ref, causal=causal, **segs)
    out, grads = jax.jit(lambda *a: value_and_grads(f, *a))(q, k, v, d_out)
    ref_out, ref_grads = value_and_grads(ref, q, k, v, d_out)
    assert max_err(out, ref_out) < 1e-5
    for name, g, rg in zip("qkv", grads, ref_grads):
        assert max_err(g, rg) < 1e-5, name


def test_prepermuted_inputs(mesh):
    q, k, v, _, _ = qkv(2, 1, 32, 2, 2, 16)
    perm = zigzag_permutation(32, 4)
    out = ring_attention(q[:, perm], k[:, perm], v[:, perm], mesh=mesh, causal=True,
                         reorder=False)
    assert max_err(out, ring_attention_ref(q, k, v, causal=True)[:, perm]) < 1e-5


def test_errors(mesh):
    q, k, v, _, _ = qkv(3, 1, 36, 2, 2, 16)
    with pytest.raises(ValueError, match="not divisible"):
        ring_attention(q, k, v, mesh=mesh, causal=True)
    with pytest.raises(ValueError, match="self-attention"):
        ring_attention(q, k[:, :32], v[:, :32], mesh=mesh)


def test_batch_and_context_sharded():
    """2 x 2 mesh: B over "data", T over a 2-device ring, heads over nothing."""
    mesh = Mesh(np.asarray(jax.devices()[:4]).reshape(2, 2), ("data", "context"))
    q, k, v, seg, d_out = qkv(4, 2, 32, 2, 1, 16)
    segs = {"q_segment_ids": seg, "kv_segment_ids": seg}
    f = functools.partial(ring_attention, mesh=mesh, causal=True, batch_axes="data", **segs)
    out, grads = jax.jit(lambda *a: value_and_grads(f, *a))(q, k, v, d_out)
    ref_out, ref_grads = value_and_grads(
        functools.partial(ring_attention_ref, causal=True, **segs), q, k, v, d_out)
    assert max_err(out, ref_out) < 1e-5
    for name, g, rg in zip("qkv", grads, ref_grads):
        assert max_err(g, rg) < 1e-5, name


@pytest.mark.parametrize("causal,packed,load_balance", [
    (True, False, True),
    (True, True, True),
    (True, False, False),
    (False, True, True),
])
def test_pallas_inner_kernel_matches_reference(mesh, causal, packed, load_balance):
    """Each ring step through the Pallas flash kernel (interpret mode): blockwise tiles,
    (out, lse) merges and the kernel's backward with the final lse give the exact result."""
    q, k, v, seg, d_out = qkv(3, 1, 64, 4, 2, 16)
    segs = {"q_segment_ids": seg, "kv_segment_ids": seg} if packed else {}
    f = functools.partial(ring_attention, mesh=mesh, axis="context", causal=causal,
                          load_balance=load_balance, inner="pallas_gpu", interpret=True, **segs)
    ref = functools.partial(ring_attention_ref, causal=causal, **segs)
    out, grads = jax.jit(lambda *a: value_and_grads(f, *a))(q, k, v, d_out)
    ref_out, ref_grads = value_and_grads(ref, q, k, v, d_out)
    assert max_err(out, ref_out) < 1e-5
    for g, r in zip(grads, ref_grads):
        assert max_err(g, r) < 1e-4


def test_cudnn_tile_contract_matches_attention_and_its_vjp():
    """`cudnn_tiles`' pure-JAX contract (what the cuDNN calls must return, checked on a GPU by
    `cudnn_tiles.check_against_reference`) is attention and its VJP: the forward equals the
    reference and the backward, given the tile's own (out, lse), equals autodiff."""
    q, k, v, _, d_out = qkv(5, 2, 32, 4, 2, 16)
    for causal in (False, True):
        out, lse = cudnn_tiles.reference_forward(q, k, v, causal=causal, scale=0.25)
        ref = functools.partial(ring_attention_ref, causal=causal, scale=0.25)
        ref_out, ref_grads = value_and_grads(ref, q, k, v, d_out)
        assert max_err(out, ref_out) < 1e-5
        assert lse.shape == (2, 4, 32)
        grads = cudnn_tiles.reference_backward(q, k, v, out, lse, d_out, causal=causal,
                                               scale=0.25)
        for g, r in zip(grads, ref_grads):
            assert max_err(g, r) < 1e-4


@pytest.mark.parametrize("load_balance", [True, False])
def test_cudnn_inner_ring_matches_reference(mesh, monkeypatch, load_balance):
    """The ring's "cudnn" inner path (tile calls, merges, final-statistics backward), with the
    cuDNN calls replaced by their pure-JAX contract so it runs on CPU."""
    monkeypatch.setattr(cudnn_tiles, "tile_forward", cudnn_tiles.reference_forward)
    monkeypatch.setattr(cudnn_tiles, "tile_backward", cudnn_tiles.reference_backward)
    q, k, v, seg, d_out = qkv(6, 1, 64, 4, 2, 16)
    f = functools.partial(ring_attention, mesh=mesh, causal=True, load_balance=load_balance,
                          inner="cudnn")
    out, grads = jax.jit(lambda *a: value_and_grads(f, *a))(q, k, v, d_out)
    ref_out, ref_grads = value_and_grads(
        functools.partial(ring_attention_ref, causal=True), q, k, v, d_out)
    assert max_err(out, ref_out) < 1e-5
    for g, r in zip(grads, ref_grads):
        assert max_err(g, r) < 1e-4
    with pytest.raises(ValueError, match="no segment ids"):
        ring_attention(q, k, v, mesh=mesh, causal=True, inner="cudnn", q_segment_ids=seg,
                       kv_segment_ids=seg)
