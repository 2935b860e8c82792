"""Parity of `models.beats.BEATs` with the original BEATs (TDC's vendored copy) through
`shared/fixtures/beats_tiny`, and `convert/beats_keys.py`.

The fixture holds the original module's weights (released-checkpoint key names), a waveform,
its normalised fbank and every intermediate array; see fixtures/README.md section 7.
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from convert import beats_keys
from longvid_jax.input import fbank as fbank_lib
from longvid_jax.models import audio, beats

TOL = 1e-4
CFG = beats.make_config("tiny")


@pytest.fixture(scope="module")
def fixture(fixtures_dir):
    folder = fixtures_dir / "beats_tiny"
    return (load_file(folder / "weights.safetensors"), dict(np.load(folder / "io.npz")))


@pytest.fixture(scope="module")
def params(fixture):
    return beats_keys.beats_to_params(fixture[0], CFG)


@functools.cache
def _apply(cfg, hidden=False):
    return jax.jit(lambda p, x, valid=None: beats.BEATs(cfg).apply(
        {"params": p}, x, valid, return_hidden_states=hidden))


@pytest.fixture(scope="module")
def run(params, fixture):
    return _apply(CFG, hidden=True)(params, fixture[1]["fbank"])


def _err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - b)))


def test_every_intermediate_matches_fixture(run, fixture):
    io = fixture[1]
    out, aux = run
    assert out.shape == (1, 96, 32)
    assert _err(jnp.transpose(aux["patch_embedding_out"], (0, 3, 1, 2)),
                io["patch_embedding_out"]) < TOL
    for name in ("patch_layer_norm_out", "post_extract_proj_out", "relative_position_bias"):
        assert _err(aux[name], io[name]) < TOL, name
    assert aux["layer_outputs"].shape == (2, 1, 96, 32)
    assert _err(aux["layer_outputs"][0], io["encoder_layer0_out"]) < TOL
    np.testing.assert_array_equal(aux["layer_outputs"][-1], out)  # post-LN: the last layer
    assert _err(out, io["features"]) < TOL
    assert _err(aux["lprobs"], io["lprobs"]) < TOL
    assert _err(beats.mean_pool(out), io["features_mean_pooled"]) < TOL


def test_waveform_to_features_with_our_fbank(params, fixture):
    """Preprocessing and model together: our fbank (kaldi-native-fbank) into our BEATs."""
    io = fixture[1]
    out, aux = _apply(CFG, hidden=True)(params, fbank_lib.beats_fbank(io["waveform"]))
    assert _err(out, io["features"]) < TOL
    assert _err(aux["lprobs"], io["lprobs"]) < TOL


def test_padded_batch_matches_clips_alone(params, fixture):
    """`valid` from `token_valid`: a padded clip gives the features it gives alone."""
    full = fixture[1]["fbank"][0]  # 198 frames -> 12 x 8 tokens
    short = np.random.default_rng(0).normal(size=(150, 128)).astype(np.float32)  # 9 x 8
    batch = np.stack([full, np.pad(short, ((0, 48), (0, 0)), constant_values=3.0)])
    valid = beats.token_valid(np.array([198, 150]), 198, CFG)
    assert valid.shape == (2, 96) and valid[1].sum() == CFG.num_tokens(150) == 72
    fn = _apply(CFG)
    out, aux = fn(params, batch, jnp.asarray(valid))
    alone, alone_aux = fn(params, short[None])
    assert "layer_outputs" not in aux  # only with return_hidden_states
    ref = fixture[1]
    assert _err(out[0], ref["features"][0]) < TOL
    assert _err(aux["lprobs"][0], ref["lprobs"][0]) < TOL
    assert _err(out[1, :72], alone[0]) < TOL
    assert _err(aux["lprobs"][1], alone_aux["lprobs"][0]) < TOL
    all_valid, _ = fn(params, batch, jnp.ones((2, 96), bool))
    assert _err(all_valid[0], ref["features"][0]) < TOL


def test_relative_position_buckets():
    b = beats.relative_position_buckets(6, 6, 16, 32)
    assert b.dtype == np.int32 and b.shape == (6, 6)
    np.testing.assert_array_equal(np.diag(b), 0)
    np.testing.assert_array_equal(b[0, :4], [0, 9, 10, 11])  # keys after the query: 8 + d
    np.testing.assert_array_equal(b[3, :3], [3, 2, 1])  # before it: d
    big = beats.relative_position_buckets(496, 496, 320, 800)  # iter3, 10 s
    assert big.min() == 0 and big.max() < 320
    assert big[0, 79] == 160 + 79 and big[79, 0] == 79  # 80 exact distances per side


def test_round_trip_is_bitwise(fixture):
    state = fixture[0]
    prefix = "model.audio_encoder.beats."
    back = beats_keys.params_to_beats(beats_keys.beats_to_params(state, CFG), CFG)
    assert sorted(back) == sorted(state)
    for k, v in state.items():
        assert back[k].dtype == v.dtype and back[k].tobytes() == v.tobytes(), k
    # TDC's parametrization names, under a prefix.
    tdc = {prefix + k.replace("weight_g", "parametrizations.weight.original0")
           .replace("weight_v", "parametrizations.weight.original1"): v for k, v in state.items()}
    params = beats_keys.beats_to_params(tdc, CFG, prefix=prefix)
    again = beats_keys.params_to_beats(params, CFG, prefix=prefix, parametrized=True)
    assert sorted(again) == sorted(tdc)
    assert all(again[k].tobytes() == v.tobytes() for k, v in tdc.items())


def test_other_flags_run_and_round_trip():
    """Pre-LN, no relative bias, no gate, patch bias, E == D, no predictor: no fixture covers
    these flags, so only shapes, the key table and the round trip are checked."""
    cfg = beats.make_config("tiny", layer_norm_first=True, deep_norm=False,
                            relative_position_embedding=False, gru_rel_pos=False, conv_bias=True,
                            patch_dim=32, num_classes=0)
    fb = jnp.asarray(np.random.default_rng(2).normal(size=(1, 40, 128)), jnp.float32)
    shapes = jax.eval_shape(lambda: beats.BEATs(cfg).init(jax.random.key(1), fb))
    rng = np.random.default_rng(3)
    params = jax.tree.map(lambda s: (0.2 * rng.normal(size=s.shape)).astype(s.dtype),
                          nn.meta.unbox(shapes)["params"])
    out, aux = _apply(cfg)(params, fb)
    assert out.shape == (1, 16, 32) and sorted(aux) == ["patch_embedding_out",
                                                       "patch_layer_norm_out"]
    state = beats_keys.params_to_beats(params, cfg)
    assert "patch_embedding.bias" in state and "post_extract_proj.weight" not in state
    assert not any("relative_attention_bias" in k or "grep" in k for k in state)
    back = beats_keys.beats_to_params(state, cfg)
    assert jax.tree.all(jax.tree.map(lambda a, b: np.asarray(a).tobytes() == b.tobytes(),
                                     params, back))


def test_param_tree_matches_model_init(params):
    shapes = jax.eval_shape(lambda: beats.BEATs(CFG).init(jax.random.key(0),
                                                          jnp.zeros((1, 64, 128))))
    want = jax.tree.map(lambda a: (a.shape, a.dtype), nn.meta.unbox(shapes)["params"])
    assert jax.tree.map(lambda a: (a.shape, a.dtype), params) == want


@pytest.mark.parametrize("variant", ["iter3_as2m", "iter3_as20k"])
def test_released_variants_key_table_matches_init(variant):
    """Full-size trees by `eval_shape`: every table row has the parameter's shape, and back."""
    cfg = beats.make_config(variant)
    shapes = jax.eval_shape(lambda: beats.BEATs(cfg).init(jax.random.key(0),
                                                          jnp.zeros((1, 998, 128))))
    flat = {tuple(k.key for k in path): leaf.shape for path, leaf in
            jax.tree_util.tree_leaves_with_path(nn.meta.unbox(shapes)["params"])}
    table = {r.path: ((cfg.depth,) if r.layered else ()) + r.shape
             for r in beats_keys.rules(cfg)}
    assert flat == table
    assert (("predictor", "kernel") in flat) == bool(cfg.num_classes)
    assert cfg.num_tokens(998) == 496  # TDC's 10 s window: ~50 tokens per second
    # 12 layers: 11 per-layer copies of the shared table come on top (not counted here).
    assert 89e6 < sum(int(np.prod(s)) for s in flat.values()) < 91e6


def test_converter_is_strict(fixture):
    state = fixture[0]
    rel = "encoder.layers.{}.self_attn.relative_attention_bias.weight"
    # The shared table's copy may be absent, but must equal layer 0's when present.
    without = {k: v for k, v in state.items() if k != rel.format(1)}
    assert beats_keys.beats_to_params(without, CFG)["encoder"]["rel_pos_embedding"].shape == (16, 4)
    changed = {**state, rel.format(1): state[rel.format(1)] + 1.0}
    with pytest.raises(ValueError, match=r"layers\.1\.self_attn\.relative_attention_bias.*"
                                         r"differs from layer 0"):
        beats_keys.beats_to_params(changed, CFG)
    with pytest.raises(ValueError, match=r"unmapped key 'encoder\.layers\.2\.self_attn\.rel"):
        beats_keys.beats_to_params({**state, rel.format(2): state[rel.format(0)]}, CFG)
    missing = {k: v for k, v in state.items() if k != "encoder.layers.1.fc2.weight"}
    with pytest.raises(ValueError, match=r"missing key 'encoder\.layers\.1\.fc2\.weight'"):
        beats_keys.beats_to_params(missing, CFG)
    bad = {**state, "encoder.pos_conv.0.weight_g": np.ones((1, 1, 7), np.float32)}
    with pytest.raises(ValueError, match=r"weight_g.*\(1, 1, 7\).*\(1, 1, 8\)"):
        beats_keys.beats_to_params(bad, CFG)
    tdc_name = "encoder.pos_conv.0.parametrizations.weight.original1"
    with pytest.raises(ValueError, match=r"duplicate key .*original1"):
        beats_keys.beats_to_params({**state, tdc_name: state["encoder.pos_conv.0.weight_v"]}, CFG)
    # A fine-tuned checkpoint into a model without predictor: only by explicit ignore.
    no_head = dataclasses.replace(CFG, num_classes=0)
    with pytest.raises(ValueError, match=r"unmapped key 'predictor\.bias'"):
        beats_keys.beats_to_params(state, no_head)
    params = beats_keys.beats_to_params(state, no_head, ignore=("predictor.",))
    assert "predictor" not in params


def test_config_from_beats_and_load_checkpoint(fixture, fixtures_dir, tmp_path):
    import json  # noqa: PLC0415

    import torch  # noqa: PLC0415

    original = json.loads((fixtures_dir / "beats_tiny" / "config.json").read_text())
    original = original["beats_config"]
    assert beats_keys.config_from_beats(original) == CFG
    no_head = beats_keys.config_from_beats({**original, "finetuned_model": False})
    assert no_head == beats.make_config("tiny", num_classes=0)
    with pytest.raises(ValueError, match="unknown BEATs config keys"):
        beats_keys.config_from_beats({**original, "use_flash": True})
    with pytest.raises(ValueError, match="glu"):
        beats_keys.config_from_beats({**original, "activation_fn": "glu"})
    path = tmp_path / "beats.pt"
    torch.save({"cfg": original, "model": {k: torch.from_numpy(v.copy())
                                           for k, v in fixture[0].items()}}, path)
    cfg, params = beats_keys.load_checkpoint(str(path), dtype="bfloat16")
    assert cfg == dataclasses.replace(CFG, dtype="bfloat16")
    ref = beats_keys.beats_to_params(fixture[0], CFG)
    assert jax.tree.all(jax.tree.map(np.array_equal, params, ref))


def test_bfloat16_compute_runs_close(params, fixture):
    cfg = dataclasses.replace(CFG, dtype="bfloat16")
    out, aux = _apply(cfg)(params, fixture[1]["fbank"])
    assert out.dtype == jnp.bfloat16 and aux["lprobs"].dtype == jnp.float32
    assert _err(out, fixture[1]["features"]) < 0.15


def test_reexported_from_audio():
    assert audio.BEATs is beats.BEATs and audio.BEATsConfig is beats.BEATsConfig
    assert audio.beats.make_config("iter3_as2m").num_classes == 527
