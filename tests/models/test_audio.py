"""Tests of `longvid_jax/models/audio.py` alone (HF parity: tests/parity/test_whisper_parity.py)."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longvid_jax.models import EMBED, LAYERS, audio

TINY = audio.make_config("tiny")


def _shapes(cfg, length=128):
    return jax.eval_shape(lambda: audio.WhisperEncoder(cfg).init(
        jax.random.key(0), jnp.zeros((1, cfg.num_mel_bins, length))))


def _random_params(cfg, seed=0) -> dict:
    """Random params of the right tree and shapes, without compiling the (slow) random init."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(0.2 * rng.normal(size=s.shape), s.dtype),
                        nn.meta.unbox(_shapes(cfg))["params"])


@functools.cache
def _jitted(cfg):
    return jax.jit(lambda p, x: audio.WhisperEncoder(cfg).apply({"params": p}, x))


def _mel(batch, length, seed=1):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(batch, 16, length)), jnp.float32)


@pytest.fixture(scope="module")
def params():
    return _random_params(TINY)


@pytest.mark.parametrize("length,tokens", [(100, 50), (101, 51), (128, 64), (2, 1)])
def test_short_inputs(params, length, tokens):
    """100 mel frames (1 s) -> 50 tokens; any length up to 2 * max_positions."""
    out, aux = _jitted(TINY)(params, _mel(2, length))
    assert out.shape == (2, tokens, 32) and out.dtype == jnp.float32
    assert aux["encoder_output"].shape == (2, tokens, 32)
    assert np.all(np.isfinite(out))


def test_hidden_states(params):
    fn = jax.jit(lambda p, x: audio.WhisperEncoder(TINY).apply({"params": p}, x,
                                                               return_hidden_states=True))
    _, aux = fn(params, _mel(1, 100))
    assert aux["hidden_states"].shape == (3, 1, 50, 32)
    np.testing.assert_array_equal(aux["hidden_states"][-1], aux["encoder_output"])


def test_bad_inputs_raise(params):
    with pytest.raises(ValueError, match="max_positions=64"):
        _jitted(TINY)(params, _mel(1, 130))
    with pytest.raises(ValueError, match="mel bins"):
        _jitted(TINY)(params, jnp.zeros((1, 80, 100)))


def test_init_uses_sinusoids():
    table = audio.sinusoids(1500, 1280)
    assert table.shape == (1500, 1280) and table.dtype == np.float32
    np.testing.assert_array_equal(table[0], np.r_[np.zeros(640), np.ones(640)])
    init = jax.jit(lambda k: audio._sinusoid_init(k, (64, 32)))(jax.random.key(0))
    np.testing.assert_array_equal(init, audio.sinusoids(64, 32))
    spec = nn.get_partition_spec(_shapes(TINY))["params"]
    assert spec["pos_embedding"] == jax.sharding.PartitionSpec(None, EMBED)
    assert spec["encoder"]["layers"]["k"] == {"kernel": jax.sharding.PartitionSpec(
        LAYERS, EMBED, "heads", "head_dim")}  # no k bias


def test_bf16_compute_runs(params):
    cfg = dataclasses.replace(TINY, dtype="bfloat16")
    mel = _mel(2, 100)
    out, _ = _jitted(cfg)(params, mel)
    ref, _ = _jitted(TINY)(params, mel)
    assert out.dtype == jnp.bfloat16
    assert np.max(np.abs(np.asarray(out, np.float32) - np.asarray(ref))) < 0.15


@pytest.mark.parametrize("variant,mels", [("large_v3", 128), ("large_v2", 80)])
def test_large_eval_shape_without_allocating(variant, mels):
    cfg = audio.make_config(variant)
    mel = jax.ShapeDtypeStruct((1, mels, 3000), jnp.float32)
    model = audio.WhisperEncoder(cfg)
    variables = jax.eval_shape(model.init, jax.random.key(0), mel)
    n = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(nn.meta.unbox(variables)))
    d, m = 1280, 5120
    layer = 4 * d * d + 3 * d + 4 * d + 2 * d * m + m + d  # q, v, o biases; no k bias
    expected = 3 * mels * d + d + 3 * d * d + d + 1500 * d + 32 * layer + 2 * d
    assert n == expected
    if variant == "large_v3":
        assert n == 636_968_960  # HF WhisperEncoder large-v3 (checked on meta in the parity test)
    out, _ = jax.eval_shape(model.apply, variables, mel)
    assert out.shape == (1, 1500, 1280)


def test_config_validation():
    assert audio.from_dict({"variant": "tiny", "depth": 1}).depth == 1
    with pytest.raises(ValueError, match="unknown WhisperEncoderConfig fields"):
        audio.make_config("tiny", mels=3)
    with pytest.raises(ValueError, match="unknown variant"):
        audio.make_config("large_v9")
    with pytest.raises(ValueError, match="divisible"):
        audio.make_config("tiny", num_heads=3)
