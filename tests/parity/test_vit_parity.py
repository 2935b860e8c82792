"""Parity of `models.vit.ViT` with `transformers` `SiglipVisionModel`, and `convert/vit_keys.py`.

A tiny random SigLIP (every weight randomised, LayerNorms and position embeddings included,
float32, eager attention) is converted with `vit_keys.hf_to_params` and compared on random
images: post-LN output, per-layer hidden states, the TDC (no post-LN) and LLaVA-OV (last layer
dropped) variants, and position-embedding interpolation (`interpolate_pos_encoding=True`).
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import SiglipConfig, SiglipVisionConfig, SiglipVisionModel

from convert import vit_keys
from longvid_jax.models import vit

TOL = 1e-4
PREFIX = "vision_model."
HEAD = (PREFIX + "head.",)
# image_size 36 with patch 8: a 4x4 grid and 4 unused pixels, as so400m's 384 / 14.
HF_KW = dict(image_size=36, patch_size=8, hidden_size=32, num_hidden_layers=3,
             num_attention_heads=4, intermediate_size=64, layer_norm_eps=1e-6,
             hidden_act="gelu_pytorch_tanh", num_channels=3)
CFG = vit.make_config(image_size=36, patch_size=8, width=32, depth=3, num_heads=4, mlp_dim=64)


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random: matrices ~ N(0, 1/fan_in), vectors ~ N(0, 0.1), norms ~ 1 + N."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif p.ndim >= 2 and "position" not in name and "probe" not in name:
                p.copy_(noise / np.sqrt(np.prod(p.shape[1:])))
            else:
                p.copy_(0.5 * noise if "position" in name else 0.1 * noise)


@pytest.fixture(scope="module")
def hf_model() -> SiglipVisionModel:
    config = SiglipVisionConfig(**HF_KW)
    config._attn_implementation = "eager"
    model = SiglipVisionModel(config).eval()
    _randomise(model, 0)
    return model


@pytest.fixture(scope="module")
def state(hf_model) -> dict[str, np.ndarray]:
    """The model's weights under the checkpoint key names (`vision_model.` prefix)."""
    return {PREFIX + k: v.numpy().copy() for k, v in hf_model.state_dict().items()}


def _images(shape, seed=1) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


def _hf(model, images, **kw):
    with torch.no_grad():
        return model(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)).contiguous(),
                     output_hidden_states=True, **kw)


def _ours(cfg, params, images, **kw):
    fn = jax.jit(lambda p, x: vit.ViT(cfg).apply({"params": p}, x, **kw))
    return fn(params, jnp.asarray(images))


def _err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - b.numpy())))


def test_post_ln_output_and_hidden_states(hf_model, state):
    params = vit_keys.hf_to_params(state, CFG, ignore=HEAD)
    images = _images((2, 36, 36, 3))
    ref = _hf(hf_model, images)
    out, aux = _ours(CFG, params, images, return_hidden_states=True)
    assert out.shape == (2, 16, 32)
    assert _err(out, ref.last_hidden_state) < TOL
    assert _err(aux["encoder_output"], ref.hidden_states[-1]) < TOL
    assert aux["hidden_states"].shape[0] == len(ref.hidden_states) == 4
    for i, h in enumerate(ref.hidden_states):
        assert _err(aux["hidden_states"][i], h) < TOL, i


def test_tdc_variant_all_layers_no_post_ln(hf_model, state):
    """TDC: SigLIP `hidden_states[-1]` (all layers, before post-LN)."""
    cfg = dataclasses.replace(CFG, post_ln=False)
    params = vit_keys.hf_to_params(state, cfg, ignore=HEAD + (PREFIX + "post_layernorm.",))
    images = _images((2, 36, 36, 3), seed=2)
    out, _ = _ours(cfg, params, images)
    assert _err(out, _hf(hf_model, images).hidden_states[-1]) < TOL


def test_llava_ov_variant_drop_last_layer(hf_model, state):
    """LLaVA-OV / LLaVA-Video / MMDuet: last layer deleted, no post-LN = `hidden_states[-2]`."""
    cfg = dataclasses.replace(CFG, post_ln=False, drop_last_layers=1)
    ignore = HEAD + (PREFIX + "post_layernorm.", PREFIX + "encoder.layers.2.")
    params = vit_keys.hf_to_params(state, cfg, ignore=ignore)
    assert params["encoder"]["layers"]["q"]["kernel"].shape == (2, 32, 4, 8)
    images = _images((3, 36, 36, 3), seed=3)
    out, aux = _ours(cfg, params, images, return_hidden_states=True)
    ref = _hf(hf_model, images)
    assert _err(out, ref.hidden_states[-2]) < TOL
    assert aux["hidden_states"].shape[0] == 3


@pytest.mark.parametrize("hw", [(36, 60), (20, 28)])
def test_position_interpolation_matches_interpolate_pos_encoding(hf_model, state, hw):
    """Other resolutions (larger, non-square, smaller): bicubic resize as HF."""
    params = vit_keys.hf_to_params(state, CFG, ignore=HEAD)
    images = _images((1, *hw, 3), seed=4)
    ref = _hf(hf_model, images, interpolate_pos_encoding=True)
    out, aux = _ours(CFG, params, images, return_hidden_states=True)
    assert out.shape == (1, (hw[0] // 8) * (hw[1] // 8), 32)
    assert _err(out, ref.last_hidden_state) < TOL
    assert _err(aux["hidden_states"][0], ref.hidden_states[0]) < TOL


@pytest.mark.parametrize("method", ["bicubic", "bilinear"])
@pytest.mark.parametrize("src,dst", [((4, 4), (6, 7)), ((27, 27), (24, 24)), ((5, 3), (2, 9))])
def test_interpolate_grid_matches_torch(method, src, dst):
    x = np.random.default_rng(5).normal(size=(*src, 6)).astype(np.float32)
    ref = F.interpolate(torch.from_numpy(x).permute(2, 0, 1)[None], size=dst, mode=method,
                        align_corners=False)[0].permute(1, 2, 0)
    out = vit.interpolate_grid(jnp.asarray(x), dst, method)
    assert _err(out, ref) < 1e-5


def test_param_tree_matches_model_init(state):
    params = vit_keys.hf_to_params(state, CFG, ignore=HEAD)
    shapes = jax.eval_shape(lambda: vit.ViT(CFG).init(jax.random.key(0),
                                                      jnp.zeros((1, 36, 36, 3))))
    want = jax.tree.map(lambda a: a.shape, nn.meta.unbox(shapes)["params"])
    got = jax.tree.map(lambda a: a.shape, params)
    assert got == want


@pytest.mark.parametrize("variant", ["full", "drop_last"])
def test_round_trip_is_bitwise(state, variant):
    if variant == "full":
        cfg, ignore = CFG, HEAD
    else:
        cfg = dataclasses.replace(CFG, post_ln=False, drop_last_layers=1)
        ignore = HEAD + (PREFIX + "post_layernorm.", PREFIX + "encoder.layers.2.")
    back = vit_keys.params_to_hf(vit_keys.hf_to_params(state, cfg, ignore=ignore), cfg)
    want = {k: v for k, v in state.items() if not k.startswith(ignore)}
    assert sorted(back) == sorted(want)
    for k, v in want.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
        assert back[k].tobytes() == v.tobytes(), k


def test_round_trip_torch_bfloat16(hf_model):
    sd = {k: v.to(torch.bfloat16) for k, v in hf_model.state_dict().items()}
    params = vit_keys.hf_to_params(sd, CFG, prefix="", ignore=("head.",))
    assert params["pos_embedding"].dtype == jnp.bfloat16
    back = vit_keys.params_to_hf(params, CFG, prefix="")
    for k, v in back.items():
        assert torch.equal(torch.from_numpy(v.view(np.int16)), sd[k].view(torch.int16)), k


def test_converter_is_strict(state):
    with pytest.raises(ValueError, match=r"vision_model\.head\.probe"):
        vit_keys.hf_to_params(state, CFG)  # the head must be ignored explicitly
    no_head = {k: v for k, v in state.items() if not k.startswith(HEAD)}
    missing = dict(no_head)
    del missing[PREFIX + "encoder.layers.1.self_attn.k_proj.bias"]
    with pytest.raises(ValueError, match=r"missing key 'vision_model\.encoder\.layers\.1\."
                                         r"self_attn\.k_proj\.bias'"):
        vit_keys.hf_to_params(missing, CFG)
    with pytest.raises(ValueError, match=r"unmapped key 'vision_model\.extra\.weight'"):
        vit_keys.hf_to_params({**no_head, PREFIX + "extra.weight": np.zeros(3)}, CFG)
    with pytest.raises(ValueError, match=r"layers\.2\..*only 2 layers"):
        vit_keys.hf_to_params(no_head, dataclasses.replace(CFG, drop_last_layers=1))
    with pytest.raises(ValueError, match=r"post_layernorm"):
        vit_keys.hf_to_params(no_head, dataclasses.replace(CFG, post_ln=False))
    bad = dict(no_head)
    bad[PREFIX + "encoder.layers.0.mlp.fc1.weight"] = np.zeros((64, 31), np.float32)
    with pytest.raises(ValueError, match=r"layers\.0\.mlp\.fc1\.weight.*\(64, 31\)"):
        vit_keys.hf_to_params(bad, CFG)
    key = PREFIX + "encoder.layers.0.mlp.fc1.bias"
    pairs = list(no_head.items()) + [(PREFIX + "encoder.layers.00.mlp.fc1.bias", no_head[key])]
    with pytest.raises(ValueError, match=r"duplicate key"):
        vit_keys.hf_to_params(pairs, CFG)
    with pytest.raises(ValueError, match=r"match no key"):
        vit_keys.hf_to_params(no_head, CFG, ignore=("vision_model.typo.",))
    params = vit_keys.hf_to_params(no_head, CFG)
    params["extra"] = {"kernel": np.zeros(2)}
    with pytest.raises(ValueError, match=r"extra/kernel"):
        vit_keys.params_to_hf(params, CFG)


def test_so400m_param_count_matches_hf_meta_model():
    """Our so400m parameter count = HF's (meta device, no allocation) minus the pooling head."""
    hf_cfg = SiglipVisionConfig(image_size=384, patch_size=14, hidden_size=1152,
                                num_hidden_layers=27, num_attention_heads=16,
                                intermediate_size=4304)
    with torch.device("meta"):
        model = SiglipVisionModel(hf_cfg)
    total = sum(p.numel() for p in model.parameters())
    head = sum(p.numel() for n, p in model.named_parameters() if n.startswith("head."))
    assert abs(total - 4.28e8) < 0.01e8
    cfg = vit.make_config("so400m_14_384")
    shapes = jax.eval_shape(lambda: vit.ViT(cfg).init(jax.random.key(0),
                                                      jnp.zeros((1, 384, 384, 3))))
    ours = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(nn.meta.unbox(shapes)))
    assert ours == total - head
    # The key table's HF shapes are those of the real model (meta tensors have shapes).
    table = vit_keys.rules(cfg)
    for k, v in model.state_dict().items():
        if not k.startswith("head."):
            (rule,) = [r for r in table if r.regex.fullmatch(k)]
            assert rule.hf_shape == tuple(v.shape), k


def test_config_from_hf_vision_and_full_siglip_configs(hf_model):
    assert vit_keys.config_from_hf(hf_model.config.to_dict()) == CFG
    full = SiglipConfig(vision_config=HF_KW).to_dict()
    assert full["model_type"] == "siglip"
    assert vit_keys.config_from_hf(full, post_ln=False) == dataclasses.replace(CFG, post_ln=False)
    # google/siglip-so400m-patch14-384's config.json lists only non-default vision fields.
    so400m = {"model_type": "siglip", "vision_config": {
        "hidden_size": 1152, "image_size": 384, "intermediate_size": 4304,
        "model_type": "siglip_vision_model", "num_attention_heads": 16,
        "num_hidden_layers": 27, "patch_size": 14}}
    assert vit_keys.config_from_hf(so400m) == vit.make_config("so400m_14_384")
    with pytest.raises(ValueError, match="unsupported model_type 'siglip2_vision_model'"):
        vit_keys.config_from_hf({**HF_KW, "model_type": "siglip2_vision_model"})
    with pytest.raises(ValueError, match="unsupported model_type 'clip'"):
        vit_keys.config_from_hf({"model_type": "clip", "vision_config": {}})
    with pytest.raises(ValueError, match="non-square"):
        vit_keys.config_from_hf({**HF_KW, "image_size": [36, 48]})
    with pytest.raises(ValueError, match="unknown ViTConfig fields"):
        vit_keys.config_from_hf(HF_KW, not_a_field=1)


def test_key_table_checks_fused_parts():
    """`Rule.part` rows of one key must cover every chunk once, with one HF shape."""
    q = vit_keys.Rule("qkv", ("q",), "linear", (4, 2), (0, 2))
    k = vit_keys.Rule("qkv", ("k",), "linear", (4, 2), (1, 2))
    assert q.hf_shape == (4, 4) and q.part_shape == (2, 4)
    vit_keys.check_table([q, k])
    with pytest.raises(ValueError, match=r"parts of 'qkv' are"):
        vit_keys.check_table([q])
    with pytest.raises(ValueError, match=r"disagree on the shape"):
        vit_keys.check_table([q, dataclasses.replace(k, shape=(4, 3))])
    with pytest.raises(ValueError, match=r"'qkv' appears in several rows"):
        vit_keys.check_table([q, dataclasses.replace(k, part=None)])
    with pytest.raises(ValueError, match=r"several rows to \['q'\]"):
        vit_keys.check_table([q, dataclasses.replace(k, path=("q",))])
    w = np.arange(16, dtype=np.float32).reshape(4, 4)
    params = vit_keys.state_to_params({"qkv": w}, [q, k], prefix="", ignore=(), num_layers=0)
    np.testing.assert_array_equal(params["k"], w[2:].T)
    back = vit_keys.params_to_state(params, [q, k], prefix="", num_layers=0)
    assert back["qkv"].tobytes() == w.tobytes()
