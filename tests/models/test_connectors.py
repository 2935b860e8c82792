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
