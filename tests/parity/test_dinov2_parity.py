"""Parity of `models.dinov2.Dinov2` with `transformers` `Dinov2Model`, and `convert/dinov2_keys.py`.

Two tiny random Dinov2Models (MLP and SwiGLU FFN; every weight randomised: LayerNorms,
LayerScale vectors, class / mask tokens and position embeddings included; float32, eager
attention) are saved with `save_pretrained`, converted from the saved files and compared on
random images whose patch grid differs from the config's (position interpolation):
last_hidden_state, pooler_output, every hidden state and the class-token-dropped output TDC
reads; then masked patches, the round trips of both key layouts and an export that
`from_pretrained` loads.
"""

import dataclasses
import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
from transformers import Dinov2Config, Dinov2Model

from convert import dinov2_keys
from longvid_jax.models import dinov2

TOL = 1e-4
# image_size 32 / patch 8: a stored 4x4 grid, so every input below is resized.
HF_KW = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=3,
             num_attention_heads=4, mlp_ratio=4, layer_norm_eps=1e-6, hidden_act="gelu",
             qkv_bias=True, num_channels=3)
FFNS = ("mlp", "swiglu")


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random: matrices ~ N(0, 1/fan_in), norms and LayerScale ~ 1 + N(0, .2^2),
    class / mask tokens and positions ~ N(0, .5^2), other vectors ~ N(0, .1^2)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if ("norm" in name and name.endswith("weight")) or "lambda1" in name:
                p.copy_(1.0 + 0.2 * noise)
            elif "token" in name or "position" in name:
                p.copy_(0.5 * noise)
            elif p.ndim >= 2:
                p.copy_(noise / np.sqrt(np.prod(p.shape[1:])))
            else:
                p.copy_(0.1 * noise)


@dataclasses.dataclass
class _Case:
    hf_model: Dinov2Model
    saved: dict[str, np.ndarray]  # the safetensors written by save_pretrained
    cfg: dinov2.Dinov2Config


def _case(ffn: str, folder: str) -> _Case:
    config = Dinov2Config(**HF_KW, use_swiglu_ffn=ffn == "swiglu")
    config._attn_implementation = "eager"
    model = Dinov2Model(config).eval()
    _randomise(model, seed=FFNS.index(ffn))
    model.save_pretrained(folder)
    saved = safetensors.numpy.load_file(f"{folder}/model.safetensors")
    with open(f"{folder}/config.json") as f:
        cfg = dinov2_keys.config_from_hf(json.load(f))
    return _Case(model, saved, cfg)


@pytest.fixture(scope="module", params=FFNS)
def case(request, tmp_path_factory) -> _Case:
    return _case(request.param, str(tmp_path_factory.mktemp(f"dinov2_{request.param}")))


def _images(shape, seed=1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _hf(model, images, **kw):
    with torch.no_grad():
        return model(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)).contiguous(),
                     output_hidden_states=True, **kw)


@functools.cache
def _jitted(cfg, **kw):
    return jax.jit(lambda p, x, m: dinov2.Dinov2(cfg).apply({"params": p}, x, mask=m, **kw))


def _ours(cfg, params, images, mask=None, **kw):
    return _jitted(cfg, **kw)(params, jnp.asarray(images), mask)


def _err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def test_config_from_saved_config(case):
    swiglu = case.cfg.ffn == "swiglu"
    assert case.cfg.mlp_dim == (88 if swiglu else 128)  # HF: (int(128 * 2/3) + 7) // 8 * 8
    assert (case.cfg.grid, case.cfg.depth, case.cfg.use_mask_token) == (4, 3, True)
    if swiglu:
        assert case.saved["encoder.layer.0.mlp.weights_in.weight"].shape == (2 * 88, 32)


def test_outputs_and_hidden_states_with_interpolation(case):
    """A 40x56 input: 5x7 grid from the stored 4x4 (non-square, larger)."""
    params = dinov2_keys.hf_to_params(case.saved, case.cfg)
    images = _images((2, 40, 56, 3))
    ref = _hf(case.hf_model, images)
    out, aux = _ours(case.cfg, params, images, return_hidden_states=True)
    assert out.shape == (2, 35, 32)  # class token dropped, as TDC reads it
    assert _err(out, ref.last_hidden_state[:, 1:]) < TOL
    assert _err(aux["cls"], ref.pooler_output) < TOL
    assert aux["hidden_states"].shape[0] == len(ref.hidden_states) == 4
    for i, h in enumerate(ref.hidden_states):
        assert _err(aux["hidden_states"][i], h) < TOL, i
    assert _err(aux["encoder_output"], ref.hidden_states[-1]) < TOL


def test_keep_cls_and_smaller_grid(case):
    """keep_cls gives HF's whole last_hidden_state; a 3x3 grid (shrinking, no antialias)."""
    params = dinov2_keys.hf_to_params(case.saved, case.cfg)
    cfg = dataclasses.replace(case.cfg, keep_cls=True)
    images = _images((1, 24, 24, 3), seed=2)
    assert _err(_ours(cfg, params, images)[0], _hf(case.hf_model, images).last_hidden_state) < TOL


def test_mask_token_at_the_stored_grid(case):
    """HF `bool_masked_pos`, on the stored 4x4 grid (positions used as stored)."""
    params = dinov2_keys.hf_to_params(case.saved, case.cfg)
    images = _images((2, 32, 32, 3), seed=4)
    mask = np.random.default_rng(5).uniform(size=(2, 16)) < 0.5
    ref = _hf(case.hf_model, images, bool_masked_pos=torch.from_numpy(mask))
    out, aux = _ours(case.cfg, params, images, jnp.asarray(mask))
    assert _err(out, ref.last_hidden_state[:, 1:]) < TOL
    assert _err(aux["cls"], ref.pooler_output) < TOL
    unmasked, _ = _ours(case.cfg, params, images, jnp.zeros((2, 16), bool))
    assert _err(unmasked, _hf(case.hf_model, images).last_hidden_state[:, 1:]) < TOL


@pytest.mark.parametrize("layout", ["saved", "module"])
def test_round_trip_is_bitwise(case, layout):
    sd = case.saved if layout == "saved" else {
        k: v.numpy().copy() for k, v in case.hf_model.state_dict().items()}
    params = dinov2_keys.hf_to_params(sd, case.cfg, layout=layout)
    back = dinov2_keys.params_to_hf(params, case.cfg, layout=layout)
    assert sorted(back) == sorted(sd)
    for k, v in sd.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
        assert back[k].tobytes() == v.tobytes(), k
    if layout == "module":  # both layouts give the same parameters
        saved = dinov2_keys.hf_to_params(case.saved, case.cfg)
        jax.tree.map(np.testing.assert_array_equal, params, saved)


def test_export_loads_with_from_pretrained(case, tmp_path):
    params = dinov2_keys.hf_to_params(case.saved, case.cfg)
    safetensors.numpy.save_file(dinov2_keys.params_to_hf(params, case.cfg),
                                str(tmp_path / "model.safetensors"))
    case.hf_model.config.save_pretrained(tmp_path)
    loaded = Dinov2Model.from_pretrained(tmp_path)
    want = case.hf_model.state_dict()
    assert sorted(loaded.state_dict()) == sorted(want)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, want[k]), k


def test_round_trip_torch_bfloat16(case):
    sd = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in case.saved.items()}
    params = dinov2_keys.hf_to_params(sd, case.cfg)
    assert params["encoder"]["layers"]["ls1"].dtype == jnp.bfloat16
    back = dinov2_keys.params_to_hf(params, case.cfg)
    for k, v in back.items():
        assert torch.equal(torch.from_numpy(v.view(np.int16)), sd[k].view(torch.int16)), k


def test_param_tree_matches_model_init(case):
    params = dinov2_keys.hf_to_params(case.saved, case.cfg)
    shapes = jax.eval_shape(lambda: dinov2.Dinov2(case.cfg).init(
        jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
    want = jax.tree.map(lambda a: a.shape, nn.meta.unbox(shapes)["params"])
    assert jax.tree.map(lambda a: a.shape, params) == want


def test_converter_is_strict(case):
    sd = case.saved
    missing = {k: v for k, v in sd.items() if k != "encoder.layer.2.layer_scale2.lambda1"}
    with pytest.raises(ValueError, match=r"missing key 'encoder\.layer\.2\.layer_scale2"):
        dinov2_keys.hf_to_params(missing, case.cfg)
    with pytest.raises(ValueError, match=r"unmapped key 'encoder\.layer\.0\.attention\.q_proj"):
        dinov2_keys.hf_to_params(case.hf_model.state_dict(), case.cfg)  # module layout
    with pytest.raises(ValueError, match=r"layernorm"):
        dinov2_keys.hf_to_params(sd, dataclasses.replace(case.cfg, post_ln=False))
    params = dinov2_keys.hf_to_params(sd, dataclasses.replace(case.cfg, post_ln=False),
                                      ignore=("layernorm.",))
    assert "post_ln" not in params
    with pytest.raises(ValueError, match=r"mask_token"):
        dinov2_keys.hf_to_params(sd, dataclasses.replace(case.cfg, use_mask_token=False))
    if case.cfg.ffn == "swiglu":
        bad = {**sd, "encoder.layer.1.mlp.weights_in.weight": np.zeros((88, 32), np.float32)}
        with pytest.raises(ValueError, match=r"weights_in\.weight.*\(88, 32\).*\(176, 32\)"):
            dinov2_keys.hf_to_params(bad, case.cfg)
    with pytest.raises(ValueError, match=r"unknown layout"):
        dinov2_keys.hf_to_params(sd, case.cfg, layout="hub")


def test_config_from_hf_giant_and_rejections():
    giant = {"model_type": "dinov2", "hidden_size": 1536, "image_size": 518, "mlp_ratio": 4,
             "num_attention_heads": 24, "num_hidden_layers": 40, "patch_size": 14,
             "use_swiglu_ffn": True, "layerscale_value": 1.0, "architectures": ["Dinov2Model"]}
    assert dinov2_keys.config_from_hf(giant) == dinov2.make_config("giant_14")
    assert dinov2_keys.config_from_hf(giant, dtype="bfloat16").dtype == "bfloat16"
    with pytest.raises(ValueError, match="dinov2_with_registers"):
        dinov2_keys.config_from_hf({**giant, "model_type": "dinov2_with_registers"})
    with pytest.raises(ValueError, match="unknown Dinov2Config fields"):
        dinov2_keys.config_from_hf(giant, not_a_field=1)


def test_giant_param_count_and_table_shapes_match_hf_meta_model():
    """Our giant count = HF's (meta device, no allocation); the module-layout table's HF shapes
    are those of the real model (meta tensors have shapes)."""
    cfg = dinov2.make_config("giant_14")
    with torch.device("meta"):
        model = Dinov2Model(Dinov2Config(hidden_size=1536, num_hidden_layers=40,
                                         num_attention_heads=24, image_size=518, patch_size=14,
                                         use_swiglu_ffn=True))
    total = sum(p.numel() for p in model.parameters())
    shapes = jax.eval_shape(lambda: dinov2.Dinov2(cfg).init(jax.random.key(0),
                                                            jnp.zeros((1, 378, 378, 3))))
    assert sum(int(np.prod(a.shape)) for a in jax.tree.leaves(nn.meta.unbox(shapes))) == total
    out, aux = jax.eval_shape(lambda v, x: dinov2.Dinov2(cfg).apply(v, x), shapes,
                              jax.ShapeDtypeStruct((2, 378, 378, 3), jnp.float32))
    assert out.shape == (2, 729, 1536) and aux["cls"].shape == (2, 1536)  # TDC at 378 px
    table = dinov2_keys.rules(cfg, layout="module")
    for k, v in model.state_dict().items():
        (rule,) = [r for r in table if r.regex.fullmatch(k)]
        assert rule.hf_shape == tuple(v.shape), k
