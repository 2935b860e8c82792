import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from longvid_jax import sharding

RULES = (("act_batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "tensor"),
         ("vocab", "tensor"), ("norm", None))


def test_make_mesh_fills_minus_one():
    mesh = sharding.make_mesh([("data", -1), ("fsdp", 2)])
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2}


def test_one_device_is_a_mesh():
    mesh = sharding.make_mesh([("data", 1), ("fsdp", 1)], jax.devices()[:1])
    assert mesh.size == 1


@pytest.mark.parametrize("cfg, msg", [
    ([("data", 2), ("data", 2)], "twice"),
    ([("data", -1), ("fsdp", -1)], "at most one"),
    ([("data", 3)], "needs 3 devices per granule"),
    ([("batch", 4)], "unknown mesh axis"),
])
def test_make_mesh_errors(cfg, msg):
    with pytest.raises(ValueError, match=msg):
        sharding.make_mesh(cfg)


@dataclasses.dataclass(frozen=True)
class FakeDevice:
    """Stands in for a device of a 2-host GPU job (granule = process)."""
    id: int
    process_index: int
    platform: str = "gpu"
    device_kind: str = "fake"


def test_device_grid_hybrid_ici_dcn():
    devices = [FakeDevice(i, i // 4) for i in range(8)]  # 2 hosts x 4 GPUs
    ids = np.vectorize(lambda d: d.id)
    # Default DCN: `data` spans the hosts; fsdp stays inside each host.
    grid = sharding.device_grid([("data", -1), ("fsdp", 2)], devices)
    np.testing.assert_array_equal(ids(grid), [[0, 1], [2, 3], [4, 5], [6, 7]])
    # fsdp over both networks: 4 per host x 2 hosts.
    grid = sharding.device_grid([("data", 1), ("fsdp", -1)], devices, [("fsdp", 2)])
    np.testing.assert_array_equal(ids(grid), [list(range(8))])
    # tensor inside a host, data across hosts and the rest of each host.
    grid = sharding.device_grid([("data", -1), ("tensor", 2)], devices, [("data", 2)])
    assert grid.shape == (4, 2)
    assert all(len({d.process_index for d in row}) == 1 for row in grid)  # tensor never on DCN
    with pytest.raises(ValueError, match="granules"):
        sharding.device_grid([("data", -1)], devices, [("data", 3)])
    with pytest.raises(ValueError, match="not an axis of the mesh"):
        sharding.device_grid([("data", -1)], devices, [("fsdp", 2)])
    with pytest.raises(ValueError, match="unequal"):
        sharding.device_grid([("data", -1)], devices[:7])


def test_logical_to_spec_and_collision():
    assert sharding.logical_to_spec(("vocab", "embed"), RULES) == P("tensor", "fsdp")
    assert sharding.logical_to_spec(("act_batch", None), RULES) == P(("data", "fsdp"), None)
    with pytest.raises(ValueError, match="used twice"):
        sharding.logical_to_spec(("act_batch", "embed"), RULES)


def test_check_rules_rejects_unknown_axis_and_duplicates():
    mesh = sharding.make_mesh([("data", -1), ("fsdp", 1), ("tensor", 1)])
    sharding.check_rules(RULES, mesh)
    with pytest.raises(ValueError, match="no axis 'context'"):
        sharding.check_rules([("act_len", "context")], mesh)
    with pytest.raises(ValueError, match="two sharding rules"):
        sharding.check_rules([("embed", "fsdp"), ("embed", None)], mesh)


def test_tree_shardings_from_abstract_params():
    mesh = sharding.make_mesh([("data", 1), ("fsdp", 2), ("tensor", 2)])

    class M(nn.Module):
        @nn.compact
        def __call__(self, x):
            w = self.param("w", nn.with_logical_partitioning(nn.initializers.normal(),
                                                             ("embed", "mlp")), (8, 6))
            odd = self.param("odd", nn.with_logical_partitioning(nn.initializers.normal(),
                                                                 ("vocab", "embed")), (5, 8))
            return x @ w + odd.sum()

    boxed = jax.eval_shape(lambda: M().init(jax.random.key(0), jnp.ones((2, 8)))["params"])
    sh = sharding.tree_shardings(boxed, mesh, RULES)
    assert sh["w"].spec == P("fsdp", "tensor")
    assert sh["odd"].spec == P(None, "fsdp")  # 5 rows do not split over 2 tensor shards


def test_batch_sharding_splits_leading_axis():
    mesh = sharding.make_mesh([("data", 2), ("fsdp", 2)])
    x = jax.make_array_from_process_local_data(sharding.batch_sharding(mesh, 2),
                                               np.arange(16.0).reshape(8, 2))
    assert len(x.addressable_shards) == 4
    assert x.addressable_shards[0].data.shape == (2, 2)
    assert sharding.batch_size_divisor(mesh) == 4
