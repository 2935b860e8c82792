"""Device mesh from the config, and logical axis rules -> `NamedSharding`.

The config holds both (big_vision / MaxText habit):

    config.mesh = [("data", -1), ("fsdp", 1), ("tensor", 1), ("context", 1)]
    config.sharding_rules = [("act_batch", ("data", "fsdp")), ("embed", "fsdp"), ...]

A size of -1 takes the devices left over. Model code only names logical axes
(`longvid_jax.models`); this module is the one place that maps them to mesh axes.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor", "context")
BATCH_AXES = ("data", "fsdp")  # the mesh axes a global batch is split over


def make_mesh(mesh_cfg: Sequence[tuple[str, int]], devices: Sequence[Any] | None = None) -> Mesh:
    """Builds a `jax.sharding.Mesh` from `[(axis_name, size), ...]`.

    Args:
      mesh_cfg: axis names (from `MESH_AXES`) and sizes; at most one size may be -1, meaning
        "all remaining devices". One device is a valid mesh of all-1 sizes.
      devices: devices to use (default `jax.devices()`).

    Raises:
      ValueError: unknown or repeated axis names, several -1 sizes, or sizes that do not
        multiply to the device count.
    """
    devices = list(jax.devices() if devices is None else devices)
    names = [name for name, _ in mesh_cfg]
    sizes = [int(size) for _, size in mesh_cfg]
    for name in names:
        if name not in MESH_AXES:
            raise ValueError(f"unknown mesh axis {name!r}; known: {MESH_AXES}")
    if len(set(names)) != len(names):
        raise ValueError(f"mesh axis named twice in {names}")
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh size may be -1: {mesh_cfg}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if sizes.count(-1):
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not divide into mesh {mesh_cfg}")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(f"mesh {dict(zip(names, sizes))} needs {int(np.prod(sizes))} devices, "
                         f"have {len(devices)}")
    return Mesh(np.asarray(devices).reshape(sizes), tuple(names))


def check_rules(rules: Sequence[tuple[str, Any]], mesh: Mesh) -> tuple[tuple[str, Any], ...]:
    """Validates logical rules against the mesh and returns them as a tuple.

    Raises:
      ValueError: a rule names an axis the mesh lacks, or maps one logical name twice.
    """
    seen = set()
    out = []
    for logical, physical in rules:
        if logical in seen:
            raise ValueError(f"logical axis {logical!r} has two sharding rules")
        seen.add(logical)
        axes = (physical,) if isinstance(physical, str) else tuple(physical or ())
        for axis in axes:
            if axis not in mesh.axis_names:
                raise ValueError(f"rule {logical!r} -> {physical!r}: mesh has no axis {axis!r}")
        out.append((logical, physical if isinstance(physical, str) or physical is None
                    else tuple(physical)))
    return tuple(out)


def logical_to_spec(logical_axes: Sequence[str | None], rules) -> PartitionSpec:
    """Maps logical axis names to a `PartitionSpec`; unknown names are replicated.

    Raises:
      ValueError: one mesh axis would shard two dimensions of the same array.
    """
    table = dict(rules)
    spec, used = [], set()
    for name in logical_axes:
        physical = table.get(name) if name is not None else None
        axes = (physical,) if isinstance(physical, str) else tuple(physical or ())
        for a in axes:
            if a in used:
                raise ValueError(f"mesh axis {a!r} used twice in {logical_axes}")
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def tree_shardings(boxed_tree: Any, mesh: Mesh, rules) -> Any:
    """`NamedSharding`s for a tree of `nn.LogicallyPartitioned` (or plain) leaves.

    Plain leaves (no logical names) are replicated, and so is any dimension whose size the
    mesh axes do not divide (e.g. a 151646-token vocabulary over 4 tensor shards). Works on
    abstract trees from `jax.eval_shape`, so shardings are known before anything is allocated.
    """

    def one(leaf):
        if not isinstance(leaf, nn.LogicallyPartitioned):
            return NamedSharding(mesh, PartitionSpec())
        spec = logical_to_spec(leaf.names, rules)
        shape = leaf.value.shape
        fixed = []
        for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
            names = (axes,) if isinstance(axes, str) else tuple(axes or ())
            n = int(np.prod([mesh.shape[a] for a in names])) if names else 1
            fixed.append(axes if dim % n == 0 else None)  # uneven dims stay replicated
        return NamedSharding(mesh, PartitionSpec(*fixed))

    return jax.tree.map(one, boxed_tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Sharding of a global batch array: leading axis over the mesh's batch axes."""
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names and mesh.shape[a] > 1)
    lead = axes if len(axes) > 1 else (axes[0] if axes else None)
    return NamedSharding(mesh, PartitionSpec(lead, *([None] * (ndim - 1))))


def batch_size_divisor(mesh: Mesh) -> int:
    """The number of batch shards; the global batch size must be a multiple of it."""
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES if a in mesh.axis_names]))


def _keys(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def like_params_shardings(tree: Any, params: Any, param_shardings: Any, mesh: Mesh) -> Any:
    """Shardings for a tree whose leaves mirror parameters (optimizer moments, EMA, ...).

    A leaf whose key path ends with a parameter's path and has that parameter's shape gets the
    parameter's sharding; every other leaf (counters, scalars) is replicated. This works for any
    optax state, whatever its nesting (`multi_transform`, `MaskedNode`s, chains).
    """
    by_path = {}
    for (path, p), (_, s) in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                 jax.tree_util.tree_flatten_with_path(param_shardings)[0]):
        by_path[_keys(path)] = (tuple(p.shape), s)
    replicated = NamedSharding(mesh, PartitionSpec())

    def one(path, leaf):
        keys = _keys(path)
        for start in range(len(keys)):
            hit = by_path.get(keys[start:])
            if hit is not None and hit[0] == tuple(leaf.shape):
                return hit[1]
        return replicated

    return jax.tree_util.tree_map_with_path(one, tree)
