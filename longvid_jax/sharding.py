"""Device mesh from the config, and logical axis rules -> `NamedSharding`.

The config holds both (big_vision / MaxText habit):

    config.mesh = [("data", -1), ("fsdp", 1), ("tensor", 1), ("context", 1)]   # per slice / host
    config.dcn_mesh = [("data", -1)]                                            # across them
    config.sharding_rules = [("act_batch", ("data", "fsdp")), ("embed", "fsdp"), ...]

A size of -1 takes the devices left over. ICI sizes count devices within a granule (a TPU
slice, or a process on GPU / CPU), DCN sizes count granules. Model code only names logical axes
(`longvid_jax.models`); this module is the one place that maps them to mesh axes.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor", "context")
BATCH_AXES = ("data", "fsdp")  # the mesh axes a global batch is split over


def _resolve_sizes(cfg: Sequence[tuple[str, int]], total: int, what: str) -> list[int]:
    """Sizes of `cfg` with its (at most one) -1 filled so that they multiply to `total`."""
    sizes = [int(size) for _, size in cfg]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh size may be -1: {list(cfg)}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if sizes.count(-1):
        if total % known:
            raise ValueError(f"{total} {what} do not divide into mesh {list(cfg)}")
        sizes[sizes.index(-1)] = total // known
    if int(np.prod(sizes)) != total:
        names = [name for name, _ in cfg]
        raise ValueError(f"mesh {dict(zip(names, sizes))} needs {int(np.prod(sizes))} "
                         f"{what}, have {total}")
    return sizes


def granules(devices: Sequence[Any]) -> list[list[Any]]:
    """Devices grouped by the slow network between them: TPU slices (`slice_index`) when the
    devices have one, else processes (GPU hosts, CPU processes). Groups are sorted by key."""
    key = ((lambda d: d.slice_index) if all(hasattr(d, "slice_index") for d in devices)
           else (lambda d: d.process_index))
    groups: dict[int, list[Any]] = {}
    for d in devices:
        groups.setdefault(key(d), []).append(d)
    return [groups[k] for k in sorted(groups)]


def device_grid(mesh_cfg: Sequence[tuple[str, int]], devices: Sequence[Any],
                dcn_mesh_cfg: Sequence[tuple[str, int]] | None = None) -> np.ndarray:
    """The devices of a mesh: an array whose axis i has size ICI size i x DCN size i.

    A multi-slice TPU job or a multi-host GPU job has two networks: fast ICI / NVLink inside a
    granule (a TPU slice, else a process) and slow DCN between granules. Each mesh axis has an
    ICI size (devices within a granule) and a DCN size (granules); the axis spans their product
    (`mesh_utils.create_hybrid_device_mesh`), so e.g. `data` can run across slices while `fsdp`
    and `tensor` stay inside one. With a single granule this is `create_device_mesh` (which
    orders TPU devices by their physical topology).

    Args:
      mesh_cfg: ICI axis names (from `MESH_AXES`) and sizes per granule; at most one size may
        be -1, meaning "the remaining devices of a granule". One device is a valid mesh.
      devices: the devices to arrange.
      dcn_mesh_cfg: DCN sizes `[(axis_name, size), ...]` over granules, names among
        `mesh_cfg`'s; missing names have size 1; one size may be -1 ("the remaining
        granules"). Default: `data` takes every granule.

    Raises:
      ValueError: unknown or repeated axis names, several -1 sizes, sizes that do not multiply
        to the device (or granule) count, or granules of unequal size.
    """
    devices = list(devices)
    names = [name for name, _ in mesh_cfg]
    for name in names:
        if name not in MESH_AXES:
            raise ValueError(f"unknown mesh axis {name!r}; known: {MESH_AXES}")
    if len(set(names)) != len(names):
        raise ValueError(f"mesh axis named twice in {names}")
    dcn = dict(dcn_mesh_cfg if dcn_mesh_cfg is not None else [("data", -1)])
    for name in dcn:
        if name not in names:
            raise ValueError(f"DCN mesh axis {name!r} is not an axis of the mesh {names}")
    groups = granules(devices)
    if len({len(g) for g in groups}) != 1:
        raise ValueError(f"granules of unequal size: {[len(g) for g in groups]}")
    dcn_sizes = _resolve_sizes([(n, dcn.get(n, 1)) for n in names], len(groups), "granules (DCN)")
    ici_sizes = _resolve_sizes(mesh_cfg, len(groups[0]), "devices per granule (ICI)")
    if len(groups) == 1:
        try:
            grid = mesh_utils.create_device_mesh(ici_sizes, devices,
                                                 allow_split_physical_axes=True)
        except (ValueError, NotImplementedError, AssertionError):
            grid = np.asarray(devices).reshape(ici_sizes)  # e.g. a subset of a TPU slice
    else:
        grid = mesh_utils.create_hybrid_device_mesh(
            ici_sizes, dcn_sizes, devices, allow_split_physical_axes=True,
            process_is_granule=not all(hasattr(d, "slice_index") for d in devices))
    return grid


def make_mesh(mesh_cfg: Sequence[tuple[str, int]], devices: Sequence[Any] | None = None,
              dcn_mesh_cfg: Sequence[tuple[str, int]] | None = None) -> Mesh:
    """`jax.sharding.Mesh` over `device_grid(mesh_cfg, devices, dcn_mesh_cfg)` (see there)."""
    devices = list(jax.devices() if devices is None else devices)
    return Mesh(device_grid(mesh_cfg, devices, dcn_mesh_cfg), tuple(n for n, _ in mesh_cfg))


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
