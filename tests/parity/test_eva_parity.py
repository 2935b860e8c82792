"""Parity of `models.eva.EvaViT` with the `timechat_eva_vit` fixture, and `convert/eva_keys.py`.

The fixture (../shared/fixtures/README.md section 6) holds TimeChat's `eva_vit.py`
`VisionTransformer` (tiny sizes, `create_eva_vit_g`'s arguments) and `ln_vision` with random
weights, a random video and the original's `vit_out` and `ln_vision_out`.
"""

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import torch.nn.functional as F

from convert import eva_keys
from longvid_jax.models import eva

TOL = 1e-4


@pytest.fixture(scope="module")
def fixture(fixtures_dir):
    folder = fixtures_dir / "timechat_eva_vit"
    weights = safetensors.numpy.load_file(str(folder / "weights.safetensors"))
    with np.load(folder / "io.npz") as io:
        arrays = {k: io[k] for k in io.files}
    with open(folder / "config.json") as f:
        config = json.load(f)
    return weights, arrays, config


def _ours(cfg, params, images, **kw):
    fn = jax.jit(lambda p, x: eva.EvaViT(cfg).apply({"params": p}, x, **kw))
    return fn(params, jnp.asarray(images))


def _err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def test_tiny_variant_is_the_fixture_config(fixture):
    _, _, config = fixture
    vit, cfg = config["vit"], eva.make_config("tiny")
    assert (cfg.image_size, cfg.patch_size, cfg.width, cfg.depth, cfg.num_heads, cfg.mlp_dim,
            cfg.ln_eps, cfg.ln_vision_eps) == (
        vit["img_size"], vit["patch_size"], vit["embed_dim"], vit["depth"], vit["num_heads"],
        vit["mlp_hidden"], vit["norm_layer_eps"], config["ln_vision_eps"])
    assert int(vit["embed_dim"] * vit["mlp_ratio"]) == vit["mlp_hidden"]
    g = eva.make_config("g_14_224")
    assert (g.width, g.depth, g.num_heads, g.head_dim, g.mlp_dim) == (1408, 39, 16, 88, 6144)


def test_vit_and_ln_vision_outputs(fixture):
    weights, io, _ = fixture
    cfg = eva.make_config("tiny")
    params = eva_keys.hf_to_params(weights, cfg)
    # The video [1, 3, T, H, W] is `(b t) c h w` frames; ours are channels-last.
    frames = io["video"][0].transpose(1, 2, 3, 0)
    np.testing.assert_array_equal(frames, io["images"].transpose(0, 2, 3, 1))
    out, aux = _ours(cfg, params, frames, return_hidden_states=True)
    assert out.shape == io["ln_vision_out"].shape == (10, 5, 32)
    assert _err(aux["encoder_output"], io["vit_out"]) < TOL
    assert _err(out, io["ln_vision_out"]) < TOL
    assert aux["hidden_states"].shape == (3, 10, 5, 32)
    np.testing.assert_array_equal(aux["hidden_states"][-1], aux["encoder_output"])
    # Without ln_vision / without the class token.
    bare = dataclasses.replace(cfg, ln_vision=False, keep_cls=False)
    out, _ = _ours(bare, eva_keys.hf_to_params(weights, bare, ignore=("ln_vision.",)), frames)
    assert _err(out, io["vit_out"][:, 1:]) < TOL


def test_other_resolution_equals_lavis_interpolate_pos_embed(fixture):
    """Running at 42 px (3x3 grid) = LAVIS `interpolate_pos_embed` on the checkpoint (bicubic,
    by size) then a 42 px model."""
    weights, _, _ = fixture
    cfg = eva.make_config("tiny")
    params = eva_keys.hf_to_params(weights, cfg)
    pos = torch.from_numpy(weights["visual_encoder.pos_embed"])
    grid = pos[:, 1:].reshape(1, 2, 2, 32).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(3, 3), mode="bicubic", align_corners=False)
    resized = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)
    big = dataclasses.replace(cfg, image_size=42)
    big_params = eva_keys.hf_to_params(
        {**weights, "visual_encoder.pos_embed": resized.numpy()}, big)
    images = np.random.default_rng(0).normal(size=(2, 42, 42, 3)).astype(np.float32)
    a, _ = _ours(cfg, params, images)
    b, _ = _ours(big, big_params, images)
    assert a.shape == (2, 10, 32)
    assert _err(a, b) < 1e-5


def test_round_trip_is_bitwise(fixture):
    weights, _, _ = fixture
    cfg = eva.make_config("tiny")
    back = eva_keys.params_to_hf(eva_keys.hf_to_params(weights, cfg), cfg)
    assert sorted(back) == sorted(weights) and len(back) == 32
    for k, v in weights.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
        assert back[k].tobytes() == v.tobytes(), k


def test_eva_vit_g_pth_layout_and_fp16(fixture):
    """`eva_vit_g.pth`: ViT keys without prefix, no ln_vision, fp16 Linear / Conv weights."""
    weights, _, _ = fixture
    cfg = eva.make_config("tiny", ln_vision=False)
    pth = {k.removeprefix("visual_encoder."): (v.astype(np.float16) if k.endswith("weight")
                                               and "norm" not in k else v)
           for k, v in weights.items() if not k.startswith("ln_vision.")}
    params = eva_keys.hf_to_params(pth, cfg, prefix="")
    assert params["encoder"]["layers"]["q"]["kernel"].dtype == np.float16
    assert "ln_vision" not in params
    back = eva_keys.params_to_hf(params, cfg, prefix="")
    assert sorted(back) == sorted(pth)
    for k, v in pth.items():
        assert back[k].dtype == v.dtype and back[k].tobytes() == v.tobytes(), k


def test_param_tree_matches_model_init(fixture):
    weights, _, _ = fixture
    cfg = eva.make_config("tiny")
    shapes = jax.eval_shape(lambda: eva.EvaViT(cfg).init(jax.random.key(0),
                                                         jnp.zeros((1, 28, 28, 3))))
    want = jax.tree.map(lambda a: a.shape, nn.meta.unbox(shapes)["params"])
    assert jax.tree.map(lambda a: a.shape, eva_keys.hf_to_params(weights, cfg)) == want


def test_converter_is_strict(fixture):
    weights, _, _ = fixture
    cfg = eva.make_config("tiny")
    k_bias = "visual_encoder.blocks.0.attn.k_bias"
    with pytest.raises(ValueError, match=rf"unmapped key '{k_bias}'"):
        eva_keys.hf_to_params({**weights, k_bias: np.zeros(32)}, cfg)
    v_bias = "visual_encoder.blocks.1.attn.v_bias"
    with pytest.raises(ValueError, match=rf"missing key '{v_bias}'"):
        eva_keys.hf_to_params({k: v for k, v in weights.items() if k != v_bias}, cfg)
    extra = {**weights, "visual_encoder.blocks.2.norm1.weight": np.ones(32, np.float32)}
    with pytest.raises(ValueError, match=r"blocks\.2\..*only 2 layers"):
        eva_keys.hf_to_params(extra, cfg)  # e.g. eva_vit_g.pth's 40th block for 39 built
    assert "encoder" in eva_keys.hf_to_params(extra, cfg, ignore=("visual_encoder.blocks.2.",))
    bad = {**weights, "visual_encoder.blocks.0.attn.qkv.weight": np.zeros((64, 32))}
    with pytest.raises(ValueError, match=r"qkv\.weight.*\(64, 32\).*\(96, 32\)"):
        eva_keys.hf_to_params(bad, cfg)
    with pytest.raises(ValueError, match=r"unmapped key 'ln_vision\."):
        eva_keys.hf_to_params(weights, dataclasses.replace(cfg, ln_vision=False))


def test_g_14_224_param_count_without_allocating():
    cfg = eva.make_config("g_14_224")
    shapes = jax.eval_shape(lambda: eva.EvaViT(cfg).init(jax.random.key(0),
                                                         jnp.zeros((1, 224, 224, 3))))
    n = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(nn.meta.unbox(shapes)))
    d, m = 1408, 6144
    layer = 3 * d * d + 2 * d + d * d + d + 4 * d + 2 * d * m + m + d
    assert n == 14 * 14 * 3 * d + d + d + 257 * d + 39 * layer + 2 * d == 985_897_344
    out, _ = jax.eval_shape(lambda v, x: eva.EvaViT(cfg).apply(v, x), shapes,
                            jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32))
    assert out.shape == (2, 257, 1408)
