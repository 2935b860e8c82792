"""Tests of `longvid_jax/models/vit.py` and the families on it (clip, dinov2, eva) on their own
(HF parity: tests/parity/test_{vit,dinov2,clip,eva}_parity.py)."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as PS

from longvid_jax.models import ACT_BATCH, EMBED, HEADS, LAYERS, MLP, clip, dinov2, eva, vit

TINY = vit.make_config("tiny")


def _random_params(cfg: vit.ViTConfig, seed: int = 0) -> dict:
    """Random params of the right tree and shapes, without compiling the (slow) random init."""
    shapes = jax.eval_shape(lambda: vit.ViT(cfg).init(jax.random.key(0),
                                                      jnp.zeros((1, 32, 32, 3))))["params"]
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(0.2 * rng.normal(size=s.shape), s.dtype),
                        nn.meta.unbox(shapes))


def _images(shape, seed=1):
    return jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, shape), jnp.float32)


@functools.cache
def _jitted(cfg, return_hidden_states=False):
    return jax.jit(lambda p, x: vit.ViT(cfg).apply({"params": p}, x,
                                                   return_hidden_states=return_hidden_states))


def _apply(cfg, params, images, **kw):
    return _jitted(cfg, **kw)(params, images)


@pytest.fixture(scope="module")
def params():
    return _random_params(TINY)


def test_non_square_shapes_and_aux(params):
    out, aux = _apply(TINY, params, _images((2, 32, 48, 3)), return_hidden_states=True)
    assert out.shape == (2, 4 * 6, 32) and out.dtype == jnp.float32
    assert aux["encoder_output"].shape == (2, 24, 32)
    assert aux["hidden_states"].shape == (3, 2, 24, 32)
    np.testing.assert_array_equal(aux["hidden_states"][-1], aux["encoder_output"])
    assert np.all(np.isfinite(out))
    assert not np.allclose(out, aux["encoder_output"])  # post-LN applied


def test_incomplete_patches_are_dropped(params):
    """A 36x44 image has the 4x5 grid of its top-left 32x40 pixels (conv VALID rule)."""
    images = _images((1, 36, 44, 3))
    a, _ = _apply(TINY, params, images)
    b, _ = _apply(TINY, params, images[:, :32, :40])
    np.testing.assert_array_equal(a, b)


def test_resize_matrix_identity_and_rows_sum_to_one():
    for method in ("bicubic", "bilinear"):
        np.testing.assert_allclose(vit.resize_matrix(5, 5, method), np.eye(5), atol=1e-12)
        np.testing.assert_allclose(vit.resize_matrix(27, 24, method).sum(1), 1.0, atol=1e-12)
    with pytest.raises(ValueError, match="unknown interpolation"):
        vit.resize_matrix(3, 4, "nearest")


def test_bf16_compute_runs(params):
    cfg = dataclasses.replace(TINY, dtype="bfloat16")
    images = _images((2, 32, 40, 3))
    out, _ = _apply(cfg, params, images)
    ref, _ = _apply(TINY, params, images)
    assert out.dtype == jnp.bfloat16
    assert np.all(np.isfinite(np.asarray(out, np.float32)))
    assert np.max(np.abs(np.asarray(out, np.float32) - np.asarray(ref))) < 0.1


def test_remat_same_output_and_gradient(params):
    cfg = dataclasses.replace(TINY, remat=True)
    images = _images((2, 32, 40, 3))
    np.testing.assert_allclose(_apply(cfg, params, images)[0], _apply(TINY, params, images)[0],
                               atol=1e-6)
    grads = jax.jit(jax.grad(
        lambda p: jnp.sum(vit.ViT(cfg).apply({"params": p}, images)[0] ** 2)))(params)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    assert float(jnp.abs(grads["encoder"]["layers"]["q"]["kernel"]).max()) > 0


def test_drop_last_layers_builds_fewer_layers():
    cfg = dataclasses.replace(TINY, depth=3, drop_last_layers=1, post_ln=False)
    shapes = nn.meta.unbox(jax.eval_shape(
        lambda: vit.ViT(cfg).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))["params"])
    assert shapes["encoder"]["layers"]["fc1"]["kernel"].shape == (2, 32, 64)
    assert "post_ln" not in shapes


def test_logical_axes_and_sharded_run(params):
    """Every weight has logical names (LAYERS first when stacked); a 2x2 mesh run matches."""
    variables = jax.eval_shape(lambda: vit.ViT(TINY).init(jax.random.key(0),
                                                          jnp.zeros((1, 32, 32, 3))))
    specs = nn.get_partition_spec(variables)["params"]
    assert specs["encoder"]["layers"]["q"]["kernel"] == PS(LAYERS, EMBED, HEADS, "head_dim")
    assert specs["patch_embed"]["kernel"] == PS(None, None, "conv", EMBED)
    rules = ((ACT_BATCH, "data"), (HEADS, "model"), (MLP, "model"))
    mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "model"))
    images = _images((4, 32, 32, 3))
    with nn.logical_axis_rules(rules):
        shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
    sharded = jax.device_put(params, shardings)
    x = jax.device_put(images, NamedSharding(mesh, PS("data")))

    def run(p, x):
        with nn.logical_axis_rules(rules):
            return vit.ViT(TINY).apply({"params": p}, x)[0]

    with jax.set_mesh(mesh):
        out = jax.jit(run)(sharded, x)
    ref, _ = _apply(TINY, params, images)
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_so400m_eval_shape_without_allocating():
    cfg = vit.make_config("so400m_14_384")
    assert (cfg.grid, cfg.num_patches, cfg.head_dim) == (27, 729, 72)
    images = jax.ShapeDtypeStruct((2, 384, 384, 3), jnp.float32)
    model = vit.ViT(cfg)
    variables = jax.eval_shape(model.init, jax.random.key(0), images)
    n = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(nn.meta.unbox(variables)))
    d, m, p = 1152, 4304, 14
    layer = 4 * (d * d + d) + 4 * d + 2 * d * m + m + d
    expected = p * p * 3 * d + d + 729 * d + 27 * layer + 2 * d
    assert n == expected == 412_987_248  # HF SiglipVisionModel 428.2M minus the 15.2M head
    out, aux = jax.eval_shape(lambda v, x: model.apply(v, x, return_hidden_states=True),
                              variables, images)
    assert out.shape == (2, 729, 1152)
    assert aux["hidden_states"].shape == (28, 2, 729, 1152)
    # LLaVA-OV: 26 layers, no post-LN.
    cfg26 = dataclasses.replace(cfg, drop_last_layers=1, post_ln=False)
    v26 = jax.eval_shape(vit.ViT(cfg26).init, jax.random.key(0), images)
    assert sum(int(np.prod(a.shape)) for a in jax.tree.leaves(nn.meta.unbox(v26))) == (
        expected - layer - 2 * d)


def test_config_validation():
    assert vit.make_config("tiny", post_ln=False).post_ln is False
    assert vit.from_dict({"variant": "tiny", "depth": 3}).depth == 3
    with pytest.raises(ValueError, match="unknown ViTConfig fields"):
        vit.make_config("tiny", widht=3)
    with pytest.raises(ValueError, match="unknown variant"):
        vit.make_config("huge")
    with pytest.raises(ValueError, match="missing fields"):
        vit.make_config(image_size=32)
    with pytest.raises(ValueError, match="divisible"):
        vit.make_config("tiny", num_heads=5)
    with pytest.raises(ValueError, match="drop_last_layers"):
        vit.make_config("tiny", drop_last_layers=2)
    with pytest.raises(ValueError, match="unknown activation"):
        vit.make_config("tiny", act="swish2")


def test_bad_inputs_raise(params):
    with pytest.raises(ValueError, match="channels"):
        _apply(TINY, params, _images((1, 32, 32, 1)))
    with pytest.raises(ValueError, match="smaller than one"):
        _apply(TINY, params, _images((1, 4, 32, 3)))


# --------------------------------------------------------------------------------------------
# Shared block options and the CLS-token families (HF parity: tests/parity/test_{dinov2,clip,
# eva}_parity.py).


def _shapes(model, hw=(32, 32)):
    return nn.meta.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0),
                                                           jnp.zeros((1, *hw, 3)))))["params"]


def test_block_options_params_and_logical_axes():
    block = vit.EncoderBlock(width=32, num_heads=4, mlp_dim=24, act="gelu", ln_eps=1e-6,
                             qkv_bias=False, layer_scale=True, ffn="swiglu")
    variables = jax.eval_shape(block.init, jax.random.key(0), jnp.zeros((1, 5, 32)))
    params = nn.meta.unbox(variables)["params"]
    assert sorted(params) == ["down", "gate", "k", "ln1", "ln2", "ls1", "ls2", "o", "q", "up", "v"]
    assert all("bias" not in params[n] for n in "qkv")
    assert params["gate"]["kernel"].shape == params["up"]["kernel"].shape == (32, 24)
    specs = nn.get_partition_spec(variables)["params"]
    assert specs["ls1"] == PS("norm") and specs["gate"]["kernel"] == PS(EMBED, MLP)
    bad = vit.EncoderBlock(width=32, num_heads=4, mlp_dim=24, act="gelu", ln_eps=1e-6,
                           ffn="geglu")
    with pytest.raises(ValueError, match="unknown ffn"):
        jax.eval_shape(bad.init, jax.random.key(0), jnp.zeros((1, 5, 32)))


def test_family_param_trees():
    d = _shapes(dinov2.Dinov2(dinov2.make_config("tiny")))
    assert d["pos_embedding"].shape == (17, 32) and d["cls_token"].shape == (32,)
    assert d["mask_token"].shape == (32,) and d["encoder"]["layers"]["ls2"].shape == (2, 32)
    assert d["encoder"]["layers"]["gate"]["kernel"].shape == (2, 32, 88)
    c = _shapes(clip.ClipVision(clip.make_config("tiny")))
    assert "bias" not in c["patch_embed"] and c["projection"]["kernel"].shape == (32, 16)
    assert sorted(c) == ["cls_token", "encoder", "patch_embed", "pos_embedding", "post_ln",
                         "pre_ln", "projection"]
    e = _shapes(eva.EvaViT(eva.make_config("tiny")), (28, 28))
    assert "bias" not in e["encoder"]["layers"]["k"] and "bias" in e["encoder"]["layers"]["q"]
    assert e["encoder"]["layers"]["fc1"]["kernel"].shape == (2, 32, 139)
    assert sorted(e) == ["cls_token", "encoder", "ln_vision", "patch_embed", "pos_embedding"]


def test_dinov2_sharded_bf16_remat_and_mask():
    """A 2x2 mesh run equals the unsharded one; bf16 compute (with remat) runs; mask errors."""
    cfg = dinov2.make_config("tiny")
    params = jax.tree.map(
        lambda s: jnp.asarray(0.2 * np.random.default_rng(0).normal(size=s.shape), s.dtype),
        _shapes(dinov2.Dinov2(cfg)))
    images = _images((4, 40, 24, 3))
    ref, aux = jax.jit(lambda p, x: dinov2.Dinov2(cfg).apply({"params": p}, x))(params, images)
    assert ref.shape == (4, 15, 32) and aux["cls"].shape == (4, 32)

    variables = jax.eval_shape(lambda: dinov2.Dinov2(cfg).init(jax.random.key(0), images))
    specs = nn.get_partition_spec(variables)["params"]
    rules = ((ACT_BATCH, "data"), (HEADS, "model"), (MLP, "model"))
    mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "model"))
    with nn.logical_axis_rules(rules):
        shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)

    def run(p, x):
        with nn.logical_axis_rules(rules):
            return dinov2.Dinov2(cfg).apply({"params": p}, x)[0]

    with jax.set_mesh(mesh):
        out = jax.jit(run)(jax.device_put(params, shardings),
                           jax.device_put(images, NamedSharding(mesh, PS("data"))))
    np.testing.assert_allclose(out, ref, atol=1e-5)

    bf16 = dataclasses.replace(cfg, dtype="bfloat16", remat=True)
    out, _ = jax.jit(lambda p, x: dinov2.Dinov2(bf16).apply({"params": p}, x))(params, images)
    assert out.dtype == jnp.bfloat16
    assert np.max(np.abs(np.asarray(out, np.float32) - np.asarray(ref))) < 0.1

    with pytest.raises(ValueError, match="does not match the patches"):
        dinov2.Dinov2(cfg).apply({"params": params}, images, mask=jnp.zeros((4, 3), bool))
    nomask = dataclasses.replace(cfg, use_mask_token=False)
    with pytest.raises(ValueError, match="use_mask_token"):
        dinov2.Dinov2(nomask).apply({"params": params}, images, mask=jnp.zeros((4, 15), bool))


def test_family_config_validation():
    assert dinov2.make_config("giant_14").mlp_dim == 4096
    assert dinov2.dinov2_mlp_dim(1024, 4, False) == 4096
    assert eva.make_config("g_14_224").mlp_dim == 6144
    assert clip.from_dict({"variant": "l14_336"}).grid == 24
    assert eva.from_dict({"variant": "tiny", "keep_cls": False}).keep_cls is False
    with pytest.raises(ValueError, match="unknown ffn"):
        dinov2.make_config("tiny", ffn="geglu")
    with pytest.raises(ValueError, match="unknown Dinov2Config fields"):
        dinov2.make_config("tiny", post_layernorm=True)
    with pytest.raises(ValueError, match="divisible"):
        eva.make_config("tiny", num_heads=5)
    with pytest.raises(ValueError, match="drop_last_layers"):
        clip.make_config("tiny", post_ln=False, projection_dim=None, drop_last_layers=2)
    with pytest.raises(ValueError, match="unknown activation"):
        clip.make_config("tiny", act="swish2")
