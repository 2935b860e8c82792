"""Connectors: LinearProjector / MLPProjector against torch, pool_tokens_2d against torch."""

import jax
import numpy as np
import pytest
import torch

from longvid_jax.models import connectors


def _err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def _grid(b, h, w, d, seed=0):
    return np.random.default_rng(seed).normal(size=(b, h * w, d)).astype(np.float32)


def _torch_grid(x, h, w):
    b, _, d = x.shape
    return torch.from_numpy(x).view(b, h, w, d).permute(0, 3, 1, 2)


def _from_torch_grid(t):
    b, d, h, w = t.shape
    return t.permute(0, 2, 3, 1).reshape(b, h * w, d).numpy()


def test_average_pool_divisible():
    x = _grid(2, 6, 4, 5)
    out = connectors.pool_tokens_2d(x, (6, 4), (3, 2), "average")
    assert out.shape == (2, 6, 5)
    want = x.reshape(2, 3, 2, 2, 2, 5).mean(axis=(2, 4)).reshape(2, 6, 5)
    np.testing.assert_allclose(np.asarray(out), want, atol=1e-6)
    # Token 0 of the output averages rows 0-1, columns 0-1 of the row-major grid.
    np.testing.assert_allclose(np.asarray(out[:, 0]), x[:, [0, 1, 4, 5]].mean(1), atol=1e-6)
    torch_out = torch.nn.functional.avg_pool2d(_torch_grid(x, 6, 4), 2)
    assert _err(out, _from_torch_grid(torch_out)) <= 1e-6
    mx = connectors.pool_tokens_2d(x, (6, 4), (3, 2), "max")
    assert _err(mx, _from_torch_grid(torch.nn.functional.max_pool2d(_torch_grid(x, 6, 4), 2))) == 0


@pytest.mark.parametrize("grid,out_grid", [((27, 27), (24, 24)), ((7, 5), (4, 3)),
                                           ((4, 4), (6, 5))])
def test_bilinear_matches_torch_interpolate(grid, out_grid):
    x = _grid(2, *grid, 3, seed=1)
    want = torch.nn.functional.interpolate(_torch_grid(x, *grid), size=out_grid,
                                           mode="bilinear", align_corners=False)
    got = connectors.pool_tokens_2d(x, grid, out_grid, "bilinear")
    assert got.shape == (2, out_grid[0] * out_grid[1], 3)
    assert _err(got, _from_torch_grid(want)) <= 1e-5
    if grid[0] % out_grid[0] or grid[1] % out_grid[1]:
        # Non-divisible `average` falls back to the same bilinear rule.
        assert _err(connectors.pool_tokens_2d(x, grid, out_grid, "average"), got) == 0.0


def test_pool_errors_and_dtype():
    x = _grid(1, 4, 4, 2)
    with pytest.raises(ValueError, match="grid"):
        connectors.pool_tokens_2d(x, (4, 5), (2, 2))
    with pytest.raises(ValueError, match="divisible"):
        connectors.pool_tokens_2d(x, (4, 4), (3, 3), "max")
    with pytest.raises(ValueError, match="mode"):
        connectors.pool_tokens_2d(x, (4, 4), (2, 2), "median")
    assert connectors.pool_tokens_2d(x.astype(np.float16), (4, 4), (2, 2)).dtype == np.float16


def test_mlp_projector_matches_torch_sequential():
    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Linear(12, 20), torch.nn.GELU(), torch.nn.Linear(20, 20))
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    params = {"linear_0": {"kernel": sd["0.weight"].T, "bias": sd["0.bias"]},
              "linear_2": {"kernel": sd["2.weight"].T, "bias": sd["2.bias"]}}
    x = np.random.default_rng(0).normal(size=(2, 3, 12)).astype(np.float32)
    model = connectors.MLPProjector(12, 20)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x))["params"]
    assert shapes["linear_0"]["kernel"].names == (None, "mlp")
    assert shapes["linear_2"]["kernel"].names == ("mlp", "embed")
    got = model.apply({"params": params}, x)
    with torch.no_grad():
        want = ref(torch.from_numpy(x)).numpy()
    assert got.shape == (2, 3, 20)
    assert _err(got, want) <= 1e-5


def test_linear_projector():
    x = np.random.default_rng(2).normal(size=(4, 6)).astype(np.float32)
    model = connectors.LinearProjector(6, 5)
    params = model.init(jax.random.key(0), x)
    kernel = np.asarray(params["params"]["kernel"].value)
    bias = np.random.default_rng(3).normal(size=5).astype(np.float32)
    got = model.apply({"params": {"kernel": kernel, "bias": bias}}, x)
    np.testing.assert_allclose(np.asarray(got), x @ kernel + bias, atol=1e-5)
    with pytest.raises(ValueError, match="in_width"):
        model.apply(params, np.ones((2, 7), np.float32))


# ---------------------------------------------------------------------------------------------
# SVA connector (longvid_jax.models.sva): padding rules, key masks, layout, shapes
# ---------------------------------------------------------------------------------------------


def test_sva_frame_pads_match_the_original_float64_rule():
    from longvid_jax.models import sva

    rng = np.random.default_rng(4)
    sizes = np.concatenate([rng.integers(1, 2000, size=(400, 2)),
                            [[640, 360], [360, 640], [1920, 1080], [384, 384], [0, 5]]])
    for grid in (3, 6, 12, 24):
        for swap in (True, False):
            got = np.asarray(sva.frame_pads(sizes, grid, swap_image_size_hw=swap))
            ref = sva.frame_pads_reference(sizes, grid, swap_image_size_hw=swap)
            np.testing.assert_array_equal(got, ref, err_msg=f"grid {grid} swap {swap}")
    # TDC, 24 x 24 grid: a 640 x 360 frame stored as (H, W) = (360, 640) is read as width 360,
    # i.e. portrait, and loses columns: (24 - int(360 * 24 / 640)) // 2 = 5 each side.
    np.testing.assert_array_equal(sva.frame_pads_reference([[360, 640]], 24), [[0, 5]])
    np.testing.assert_array_equal(
        sva.frame_pads_reference([[360, 640]], 24, swap_image_size_hw=False), [[5, 0]])
    # The documented corner case: 98 * (3 / 147) = 1.9999999999999998 in float64.
    np.testing.assert_array_equal(sva.frame_pads_reference([[147, 98]], 3), [[1, 0]])
    np.testing.assert_array_equal(np.asarray(sva.frame_pads(np.array([[147, 98]]), 3)),
                                  [[0, 0]])


def test_sva_window_masks_and_valid_grid():
    from longvid_jax.models import sva

    pads = np.array([[0, 0], [1, 0], [2, 0], [0, 3]], np.int32)
    m = np.asarray(sva.window_masks(pads, 6, 3))  # windows of 2 x 2 on a 6 x 6 grid
    assert m.shape == (4, 9, 4)
    assert m[0].all()
    # One padded row top and bottom: the top windows lose their first row (kv 0, 1).
    np.testing.assert_array_equal(m[1, 0], [False, False, True, True])
    np.testing.assert_array_equal(m[1, 8], [True, True, False, False])
    np.testing.assert_array_equal(m[1, 4], [True] * 4)
    # Two padded rows: the top and bottom windows are fully masked and reset to all True.
    assert m[2].all()
    # Three padded columns of six: every window is masked, then reset.
    assert m[3].all()
    np.testing.assert_array_equal(np.asarray(sva.valid_grid(pads, 3)),
                                  [[3, 3], [1, 3], [3, 3], [3, 3]])  # 3 - 2*2 < 0: whole grid
    np.testing.assert_array_equal(np.asarray(sva.valid_grid(np.array([[6, 0]]), 12)),
                                  [[12, 12]])  # 12 - 12 = 0 rows: the original's fallback


def test_sva_newline_layout():
    from longvid_jax.models import sva

    g, d = 3, 2
    tokens = np.arange(2 * g * g * d, dtype=np.float32).reshape(2, g * g, d) + 1
    newline = np.array([-1.0, -2.0], np.float32)
    grid = np.array([[1, 3], [3, 1]], np.int32)
    out, mask = sva.newline_layout(tokens, grid, newline)
    assert out.shape == (2, g * (g + 1), d)
    np.testing.assert_array_equal(np.asarray(mask).sum(1), [4, 6])
    # Frame 0 keeps the middle row (tokens 3, 4, 5) then a newline.
    np.testing.assert_array_equal(np.asarray(out[0, :4]),
                                  np.concatenate([tokens[0, 3:6], newline[None]]))
    # Frame 1 keeps the middle column (tokens 1, 4, 7), each followed by a newline.
    want = np.stack([tokens[1, 1], newline, tokens[1, 4], newline, tokens[1, 7], newline])
    np.testing.assert_array_equal(np.asarray(out[1, :6]), want)
    assert float(np.abs(np.asarray(out[0, 4:])).max()) == 0.0
    with pytest.raises(ValueError, match="square"):
        sva.newline_layout(tokens[:, :8], grid, newline)


def test_sva_shapes_configs_and_logical_axes():
    from longvid_jax.models import sva

    # Stage-1 sizes (query grid = tower grid, no pos_embed) and a bilinear resize to a final
    # grid, as `image_token_len != query_num` would do.
    cfg = sva.make_config("tiny", query_grid=6, final_grid=4, depth=1, width=32, num_heads=4)
    assert cfg.window_sizes == (1, 1)
    feats = [jax.ShapeDtypeStruct((2, 36, 24), np.float32),
             jax.ShapeDtypeStruct((2, 36, 40), np.float32)]
    model = sva.SVAConnector(cfg)
    variables = jax.eval_shape(lambda f: model.init(jax.random.key(0), f), feats)
    layer = variables["params"]["vision_sampler"]["layer_0"]
    assert not any(k.startswith("pos_embed") for k in layer)
    assert layer["cross_attn"]["q"]["kernel"].names == ("embed", "heads", "head_dim")
    assert layer["cross_attn"]["o"]["kernel"].names == ("heads", "head_dim", "embed")
    (tokens, grid, aux) = jax.eval_shape(
        lambda v, f: model.apply(v, f, np.array([[10, 20], [20, 10]], np.int32)), variables,
        feats)
    assert tokens.shape == (2, 16, 48) and grid.shape == (2, 2)
    assert aux["sampler_out"].shape == (2, 36, 32)
    assert aux["rearranged_mask_1"].shape == (2, 36, 1)
    with pytest.raises(ValueError, match="multiple of query_grid"):
        sva.make_config("tiny", query_grid=4)
    with pytest.raises(ValueError, match="unknown SVAConfig fields"):
        sva.make_config("tiny", heads=4)
    with pytest.raises(ValueError, match="unknown SVA variant"):
        sva.make_config("huge")
    assert sva.SVAConfig.from_dict({"variant": "tiny", "tower_grids": [6, 6]}).tower_grids == (
        6, 6)
    with pytest.raises(ValueError, match="towers given"):
        jax.eval_shape(lambda v, f: model.apply(v, f[:1]), variables, feats)
