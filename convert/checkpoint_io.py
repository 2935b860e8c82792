"""Streaming checkpoint I/O: HF / PyTorch state dicts in, orbax trees out, and back.

Readers (`open_state`) hold at most one tensor at a time: a `StateReader` is a read-only
`Mapping[str, np.ndarray]` over the tensors of

  - `model.safetensors`, or shards listed in `model.safetensors.index.json` (safetensors'
    `safe_open`; the file is re-opened every `remap_bytes` so that the memory-mapped pages it
    has touched are given back: RSS stays near one tensor, not one shard);
  - `pytorch_model.bin`, shards listed in `pytorch_model.bin.index.json`, or any `.bin`/`.pth`/
    `.pt` state dict (`torch.load(mmap=True, weights_only=True)`, re-loaded in the same way;
    a LAVIS-style `{"model": state_dict, ...}` wrapper is unwrapped).

Tensors come back as NumPy arrays with their stored dtype (bfloat16 as `ml_dtypes.bfloat16`,
never upcast). `StateReader.items()` streams file by file in storage order; `keys()`,
`shape()`, `dtype()` read only headers (safetensors) or the pickle (torch).

Writers:
  - `OrbaxTreeWriter` writes a params tree leaf by leaf into one orbax PyTree checkpoint,
    flushing every `group_bytes` with orbax's partial save (`orbax.checkpoint.experimental.v1
    .partial`, orbax >= 0.12) so that only one group is in memory; `load_tree` reads it back
    whole or in parts (orbax's `partial_restore`).
  - `SafetensorsShardWriter` writes HF safetensors shards as tensors arrive, named as
    `transformers` names them (`model.safetensors`, or `model-00001-of-00003.safetensors` + a
    `model.safetensors.index.json` weight map).

Errors name the file and key: a shard named in an index but absent, a key the index and the
shard disagree on, a duplicate key, a non-tensor entry.
"""

import collections
import dataclasses
import gc
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import ml_dtypes
import numpy as np

log = logging.getLogger(__name__)

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_SINGLE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
_TORCH_SUFFIXES = (".bin", ".pth", ".pt")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt", ".h5", ".msgpack", ".gguf",
                   ".onnx")
_SAFE_DTYPES = {"BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16",
                "I32": "int32", "U32": "uint32", "I64": "int64", "U64": "uint64",
                "F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}
DEFAULT_REMAP_BYTES = 512 << 20


class CheckpointFormatError(ValueError):
    """A checkpoint folder or file is missing, malformed or inconsistent (names file / key)."""


def np_dtype(name: Any) -> np.dtype:
    """NumPy dtype from a name (`"bfloat16"` gives `ml_dtypes.bfloat16`)."""
    if isinstance(name, str) and name == "bfloat16":
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def is_float_dtype(dtype: Any) -> bool:
    """Whether `dtype` is a floating type (bfloat16 included)."""
    dt = np_dtype(dtype)
    return dt == np.dtype(ml_dtypes.bfloat16) or np.issubdtype(dt, np.floating)


def torch_to_numpy(t: Any) -> np.ndarray:
    """A torch tensor as a NumPy array that owns its data, bits unchanged (bf16 kept)."""
    import torch  # noqa: PLC0415 (only for torch checkpoints)

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
    return t.numpy().copy()


# ----------------------------------------------------------------------------------------------
# Finding the weight files.


def find_weight_files(src: str) -> tuple[list[str], dict[str, str] | None]:
    """The weight files of an HF folder (or one state-dict file) and its key -> file index.

    Looks, in order, for `model.safetensors.index.json`, `model.safetensors`,
    `pytorch_model.bin.index.json`, `pytorch_model.bin`, then a single `*.safetensors`, then a
    single `*.bin` / `*.pth` / `*.pt` file.

    Args:
      src: an HF checkpoint folder, or a path to one `.safetensors` / `.bin` / `.pth` / `.pt`.

    Returns:
      (absolute file paths in index order, key -> absolute file path or None without index).

    Raises:
      CheckpointFormatError: no weights, several candidate files, an unreadable index, or a
        shard the index names that does not exist (naming it and one of its keys).
    """
    src = os.path.abspath(src)
    if os.path.isfile(src):
        if not src.endswith((".safetensors",) + _TORCH_SUFFIXES):
            raise CheckpointFormatError(f"{src}: not a .safetensors / .bin / .pth / .pt file")
        return [src], None
    if not os.path.isdir(src):
        raise CheckpointFormatError(f"{src}: no such checkpoint folder or file")
    for index_name in (SAFE_INDEX, BIN_INDEX):
        index_path = os.path.join(src, index_name)
        if os.path.exists(index_path):
            return _read_index(index_path)
    for single in (SAFE_SINGLE, BIN_SINGLE):
        if os.path.exists(os.path.join(src, single)):
            return [os.path.join(src, single)], None
    names = sorted(os.listdir(src))
    for suffixes in ((".safetensors",), _TORCH_SUFFIXES):
        found = [n for n in names if n.endswith(suffixes)
                 and os.path.isfile(os.path.join(src, n))]
        if len(found) == 1:
            return [os.path.join(src, found[0])], None
        if len(found) > 1:
            raise CheckpointFormatError(
                f"{src}: several weight files {found} and no {SAFE_INDEX} / {BIN_INDEX}; "
                "pass one file or add an index")
    raise CheckpointFormatError(f"{src}: no weights ({SAFE_INDEX}, {SAFE_SINGLE}, {BIN_INDEX}, "
                                f"{BIN_SINGLE}, *.safetensors, *.bin, *.pth or *.pt)")


def _read_index(index_path: str) -> tuple[list[str], dict[str, str]]:
    try:
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointFormatError(f"{index_path}: unreadable index ({e})") from e
    folder = os.path.dirname(index_path)
    index, files = {}, []
    for key, name in weight_map.items():
        path = os.path.join(folder, name)
        if path not in files:
            if not os.path.isfile(path):
                raise CheckpointFormatError(
                    f"{index_path}: shard file {name!r} (holding {key!r}) does not exist")
            files.append(path)
        index[key] = path
    if not files:
        raise CheckpointFormatError(f"{index_path}: empty weight_map")
    return files, index


# ----------------------------------------------------------------------------------------------
# Per-file readers.


class _SafetensorsFile:
    """Headers and tensors of one safetensors file (opened per access, see `StateReader`)."""

    def __init__(self, path: str):
        from safetensors import safe_open  # noqa: PLC0415

        self._safe_open = safe_open
        self.path = path
        self._meta: dict[str, tuple[tuple[int, ...], str]] = {}
        with safe_open(path, framework="numpy") as f:
            for key in f.keys():
                s = f.get_slice(key)
                dtype = s.get_dtype()
                if dtype not in _SAFE_DTYPES:
                    raise CheckpointFormatError(f"{path}: tensor {key!r} has unsupported dtype "
                                                f"{dtype}")
                self._meta[key] = (tuple(s.get_shape()), _SAFE_DTYPES[dtype])
        self._order = self._storage_order()

    def _storage_order(self) -> list[str]:
        """Keys by data offset (the order the bytes lie in; the header is sorted by name)."""
        with open(self.path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        offsets = {k: v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}
        return sorted(self._meta, key=lambda k: (offsets.get(k, 0), k))

    def keys(self) -> list[str]:
        return list(self._order)

    def meta(self, key: str) -> tuple[tuple[int, ...], str]:
        return self._meta[key]

    def nbytes(self, key: str) -> int:
        shape, dtype = self._meta[key]
        return int(np.prod(shape, dtype=np.int64)) * np_dtype(dtype).itemsize

    def read(self, keys: list[str], remap_bytes: int) -> Iterator[tuple[str, np.ndarray]]:
        """Yields (key, array) for `keys`, re-opening the file every `remap_bytes`.

        The generator keeps no reference to a yielded array (the consumer may free it)."""
        pos = 0
        while pos < len(keys):
            touched = 0
            with self._safe_open(self.path, framework="numpy") as f:
                while pos < len(keys) and (touched == 0 or touched < remap_bytes):
                    key = keys[pos]
                    touched += self.nbytes(key)
                    pos += 1
                    yield key, f.get_tensor(key)


class _TorchFile:
    """Keys and tensors of one torch state-dict file (`torch.load` with mmap)."""

    def __init__(self, path: str):
        self.path = path
        state = self._load()
        self._meta = {}
        for key, t in state.items():
            self._meta[key] = (tuple(t.shape), str(t.dtype).removeprefix("torch."))
        self._order = list(state)
        del state

    def _load(self) -> dict[str, Any]:
        import torch  # noqa: PLC0415

        try:
            obj = torch.load(self.path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise CheckpointFormatError(f"{self.path}: cannot load ({e})") from e
            log.warning("%s: legacy (non-zip) torch format, loading without mmap (the whole "
                        "file is read into memory)", self.path)
            obj = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 (torch raises many types; name the file)
            raise CheckpointFormatError(f"{self.path}: cannot load ({type(e).__name__}: "
                                        f"{e})") from e
        return _unwrap_state_dict(obj, self.path)

    def keys(self) -> list[str]:
        return list(self._order)

    def meta(self, key: str) -> tuple[tuple[int, ...], str]:
        return self._meta[key]

    def nbytes(self, key: str) -> int:
        shape, dtype = self._meta[key]
        return int(np.prod(shape, dtype=np.int64)) * np_dtype(dtype).itemsize

    def read(self, keys: list[str], remap_bytes: int) -> Iterator[tuple[str, np.ndarray]]:
        """As `_SafetensorsFile.read` (the file is re-loaded every `remap_bytes`)."""
        pos = 0
        while pos < len(keys):
            touched = 0
            state = self._load()
            while pos < len(keys) and (touched == 0 or touched < remap_bytes):
                key = keys[pos]
                touched += self.nbytes(key)
                pos += 1
                yield key, torch_to_numpy(state[key])
            del state
            gc.collect()  # drop the mapped storages now


def _unwrap_state_dict(obj: Any, path: str) -> dict[str, Any]:
    """The flat key -> tensor dict of a loaded torch file (unwrapping `{"model": ...}`)."""
    import torch  # noqa: PLC0415

    if not isinstance(obj, Mapping):
        raise CheckpointFormatError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj)
    for wrapper in ("model", "state_dict", "module"):
        inner = obj.get(wrapper)
        if isinstance(inner, Mapping) and inner and all(
                isinstance(v, torch.Tensor) for v in inner.values()):
            log.info("%s: using the state dict under %r (ignoring %s)", path, wrapper,
                     sorted(k for k in obj if k != wrapper))
            return dict(inner)
    bad = sorted(str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor))
    raise CheckpointFormatError(f"{path}: not a state dict of tensors (non-tensor entries "
                                f"{bad[:8]})")


# ----------------------------------------------------------------------------------------------
# The reader.


class StateReader(Mapping):
    """Read-only, tensor-by-tensor view of a checkpoint's state dict.

    `items()` streams file by file (each tensor read when reached, dropped by the reader as
    soon as it is yielded); `reader[key]` reads one tensor. Arrays are NumPy, in the stored
    dtype (bfloat16 via `ml_dtypes`), in the HF / torch layout.

    Args:
      files: weight files (safetensors or torch), e.g. from `find_weight_files`.
      index: key -> file (from an index json), checked against the files' own keys; None when
        there is no index.
      remap_bytes: re-open a file after this many bytes were read from it (bounds the
        memory-mapped pages counted in RSS).
      on_read: called with (key, array) as each tensor is read (instrumentation / progress).

    Raises:
      CheckpointFormatError: a key in two files, or a shard whose keys differ from the index.
    """

    def __init__(self, files: list[str], index: dict[str, str] | None = None, *,
                 remap_bytes: int = DEFAULT_REMAP_BYTES,
                 on_read: Callable[[str, np.ndarray], None] | None = None):
        self.files = list(files)
        self.remap_bytes = remap_bytes
        self.on_read = on_read
        self._readers = {p: (_SafetensorsFile(p) if p.endswith(".safetensors") else _TorchFile(p))
                         for p in self.files}
        self._where: dict[str, str] = {}
        for path, reader in self._readers.items():
            for key in reader.keys():
                if key in self._where:
                    raise CheckpointFormatError(f"duplicate key {key!r} in {path} and "
                                                f"{self._where[key]}")
                self._where[key] = path
        if index is not None:
            for key, path in index.items():
                if self._where.get(key) != path:
                    raise CheckpointFormatError(
                        f"index names {key!r} in {os.path.basename(path)} but "
                        + (f"it is in {os.path.basename(self._where[key])}" if key in self._where
                           else "no file holds it"))
            extra = sorted(set(self._where) - set(index))
            if extra:
                raise CheckpointFormatError(
                    f"key {extra[0]!r} in {os.path.basename(self._where[extra[0]])} is not in "
                    f"the index ({len(extra)} such keys)")

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._where:
            raise KeyError(key)
        (_, array), = self._readers[self._where[key]].read([key], self.remap_bytes)
        if self.on_read is not None:
            self.on_read(key, array)
        return array

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, key: object) -> bool:
        return key in self._where

    def items(self) -> Iterator[tuple[str, np.ndarray]]:  # type: ignore[override]
        """Streams (key, array), file by file, in each file's storage order. No reference to
        a yielded array is kept: once the consumer drops it, it is freed."""
        for path in self.files:
            reader = self._readers[path]
            pairs = reader.read(reader.keys(), self.remap_bytes)
            for _ in range(len(reader.keys())):
                held = [next(pairs)]
                if self.on_read is not None:
                    self.on_read(*held[0])
                yield held.pop()

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of `key` without reading it."""
        return self._readers[self._where[key]].meta(key)[0]

    def dtype(self, key: str) -> str:
        """dtype name of `key` (`"bfloat16"`, `"float32"`, `"int64"`, ...) without reading it."""
        return self._readers[self._where[key]].meta(key)[1]

    def nbytes(self, key: str) -> int:
        """Bytes of `key` without reading it."""
        return int(np.prod(self.shape(key), dtype=np.int64)) * np_dtype(self.dtype(key)).itemsize

    def dtype_counts(self) -> collections.Counter:
        """Number of tensors per dtype name."""
        return collections.Counter(self.dtype(k) for k in self._where)


def open_state(src: str, **kwargs: Any) -> StateReader:
    """`StateReader` over the weights of an HF folder or one state-dict file.

    Args:
      src: see `find_weight_files`.
      **kwargs: `StateReader` options (`remap_bytes`, `on_read`).

    Raises:
      CheckpointFormatError: see `find_weight_files` and `StateReader`.
    """
    files, index = find_weight_files(src)
    return StateReader(files, index, **kwargs)


# ----------------------------------------------------------------------------------------------
# Orbax trees.


def nest_tree(flat: Mapping[tuple[str, ...], Any]) -> dict:
    """Nested dicts from {path tuple: leaf} (the inverse of `flatten_tree`)."""
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = value
    return tree


def flatten_tree(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple, Any]:
    """Nested dict -> {path tuple: leaf} (depth first, insertion order)."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(flatten_tree(v, prefix + (str(k),)))
        else:
            out[prefix + (str(k),)] = v
    return out


def _orbax_version() -> str:
    import orbax.checkpoint as ocp  # noqa: PLC0415

    return getattr(ocp, "__version__", "?")


def _partial_api():
    try:
        from orbax.checkpoint.experimental.v1 import partial  # noqa: PLC0415
    except ImportError:
        return None
    return partial


_STATE_DIR = "state"  # the PyTree folder inside an orbax v1 checkpoint
_COLLECT_BYTES = 64 << 20  # after writing a group this large, collect the cycles holding it


class OrbaxTreeWriter:
    """Writes a nested tree of NumPy arrays into one orbax checkpoint, a group at a time.

    `add(path, array)` buffers a leaf; groups of at most `group_bytes` (or one larger leaf) are
    written with orbax's partial save and freed, so memory holds one group (plus orbax's copy
    of it while it writes). `close()` finalises the checkpoint at `directory`; its PyTree lies
    in `directory/state` (orbax v1 layout), readable with `load_tree` or
    `orbax.checkpoint.PyTreeCheckpointer().restore(directory + "/state")`. Without orbax's
    partial-save API (orbax < 0.12) the whole tree is buffered and saved once.

    Args:
      directory: output folder; must not exist (a stale `<directory>.partial_save` from an
        interrupted run is removed).
      group_bytes: bytes per written group.
      compress: zstd-compress the arrays (orbax's default; ~20% smaller for bf16 weights, 50%
        for bf16 upcast to float32, but several times slower to write and read).

    Raises:
      FileExistsError: `directory` exists.
      ValueError: a leaf path given twice, or `close()` with no leaves.
    """

    def __init__(self, directory: str, *, group_bytes: int = 1 << 30, compress: bool = False):
        self.directory = os.path.abspath(directory)
        if os.path.exists(self.directory):
            raise FileExistsError(f"{self.directory} exists")
        self.group_bytes = group_bytes
        self.compress = compress
        self._partial = _partial_api()
        if self._partial is not None:
            stale = self.directory + ".partial_save"
            if os.path.exists(stale):
                log.warning("removing %s left by an interrupted conversion", stale)
                shutil.rmtree(stale)
        else:
            log.warning("orbax partial save unavailable: the whole tree is held in memory")
        self._buffer: dict[tuple[str, ...], np.ndarray] = {}
        self._buffered = 0
        self._paths: set[tuple[str, ...]] = set()
        self.num_groups = 0
        self.nbytes = 0

    def reserve(self, nbytes: int) -> None:
        """Writes the buffer now if a leaf of `nbytes` would overfill it (call before making a
        big leaf, so that the buffer and the new leaf's temporaries are not held together)."""
        if self._partial is not None and self._buffer and (
                self._buffered + nbytes > self.group_bytes):
            self.flush()

    def add(self, path: tuple[str, ...], array: np.ndarray) -> None:
        """Buffers one leaf; writes the buffer first if the leaf would overfill it."""
        path = tuple(path)
        if path in self._paths:
            raise ValueError(f"leaf {'/'.join(path)} written twice")
        self._paths.add(path)
        self.reserve(array.nbytes)
        self._buffer[path] = array
        self._buffered += array.nbytes
        self.nbytes += array.nbytes
        if self._partial is not None and self._buffered >= self.group_bytes:
            self.flush()

    def _context(self):
        from orbax.checkpoint.experimental import v1  # noqa: PLC0415

        ctx = v1.Context()
        try:
            ctx.array.saving.use_compression = self.compress
            # The arrays are not touched until the (synchronous) save returns: no copy needed.
            ctx.memory.deepcopy_host_arrays = False
        except (AttributeError, dataclasses.FrozenInstanceError):  # other orbax: its defaults
            log.warning("orbax %s: cannot set compression / copy options", _orbax_version())
        return ctx

    def flush(self) -> None:
        """Writes the buffered leaves (partial save) and frees them."""
        if not self._buffer or self._partial is None:
            return
        tree, nbytes = nest_tree(self._buffer), self._buffered
        self._buffer, self._buffered = {}, 0
        with self._context():
            self._partial.save(self.directory, tree)
        del tree
        if nbytes >= _COLLECT_BYTES:
            gc.collect()  # orbax keeps the arrays in reference cycles until collected
        self.num_groups += 1

    def close(self) -> None:
        """Writes what is left and finalises the checkpoint."""
        if not self._paths:
            raise ValueError(f"{self.directory}: no leaves to write")
        if self._partial is None:
            import orbax.checkpoint as ocp  # noqa: PLC0415

            ocp.PyTreeCheckpointer().save(os.path.join(self.directory, _STATE_DIR),
                                          nest_tree(self._buffer))
            self._buffer = {}
            self.num_groups = 1
            return
        self.flush()
        with self._context():
            self._partial.finalize(self.directory)


class _NoStepMetadataWarning(logging.Filter):
    """Drops orbax's warning that a PyTree folder has no step metadata (it is one level up)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "_CHECKPOINT_METADATA" not in record.getMessage()


def _quiet_orbax(fn):
    def wrapped(*args, **kwargs):
        absl_logger, quiet = logging.getLogger("absl"), _NoStepMetadataWarning()
        absl_logger.addFilter(quiet)
        try:
            return fn(*args, **kwargs)
        finally:
            absl_logger.removeFilter(quiet)
    wrapped.__doc__, wrapped.__name__ = fn.__doc__, fn.__name__
    return wrapped


def _pytree_dir(directory: str) -> str:
    inner = os.path.join(directory, _STATE_DIR)
    if os.path.isdir(inner):
        return inner
    if os.path.exists(os.path.join(directory, "_METADATA")):
        return directory
    raise CheckpointFormatError(f"{directory}: not an orbax PyTree checkpoint")


@_quiet_orbax
def tree_metadata(directory: str) -> dict[tuple[str, ...], tuple[tuple[int, ...], str]]:
    """{leaf path: (shape, dtype name)} of an orbax PyTree checkpoint, without reading data."""
    import orbax.checkpoint as ocp  # noqa: PLC0415

    meta = ocp.PyTreeCheckpointer().metadata(_pytree_dir(directory))
    tree = getattr(getattr(meta, "item_metadata", meta), "tree", meta)
    return {p: (tuple(m.shape), np_dtype(m.dtype).name) for p, m in flatten_tree(tree).items()}


@_quiet_orbax
def load_tree(directory: str, paths: list[tuple[str, ...]] | None = None) -> dict:
    """Reads an orbax PyTree checkpoint (written by `OrbaxTreeWriter`) as NumPy arrays.

    Args:
      directory: the checkpoint folder (its `state/` PyTree, or a bare PyTree folder).
      paths: leaf paths to read (orbax partial restore); None reads every leaf.

    Returns:
      Nested dict of NumPy arrays (only `paths` when given).

    Raises:
      CheckpointFormatError: not a checkpoint, or a requested path it does not hold.
    """
    import orbax.checkpoint as ocp  # noqa: PLC0415

    pytree = _pytree_dir(directory)
    meta = tree_metadata(directory)
    wanted = list(meta) if paths is None else [tuple(p) for p in paths]
    missing = [p for p in wanted if p not in meta]
    if missing:
        raise CheckpointFormatError(f"{directory}: no leaf {'/'.join(missing[0])}")
    item = nest_tree({p: np.zeros((0,), np.int8) for p in wanted})
    restore_args = nest_tree({p: ocp.RestoreArgs(restore_type=np.ndarray) for p in wanted})
    out = ocp.PyTreeCheckpointer().restore(
        pytree, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                            partial_restore=paths is not None))
    return out


# ----------------------------------------------------------------------------------------------
# Safetensors shards.


def parse_size(size: int | str) -> int:
    """Bytes of `5GB` (10**9), `5GiB` (2**30), `200MB`, `10KB`, or an int, as transformers."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B)?\s*", str(size), re.IGNORECASE)
    if not m:
        raise ValueError(f"bad size {size!r}; e.g. 5GB, 500MB, 2GiB or a number of bytes")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10,
             "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(float(m.group(1)) * scale)


_NP_TO_SAFE = {v: k for k, v in _SAFE_DTYPES.items()}


class _ShardFile:
    """One safetensors file written tensor by tensor: the data goes to `<path>.data` as it
    comes; `close` writes the header, then copies the data after it (no tensor is kept)."""

    def __init__(self, path: str):
        self.path = path
        self._data = open(path + ".data", "wb")
        self.entries: dict[str, dict[str, Any]] = {}
        self.nbytes = 0

    def add(self, key: str, array: np.ndarray) -> None:
        name = np_dtype(array.dtype).name
        if name not in _NP_TO_SAFE:
            raise ValueError(f"tensor {key!r}: dtype {name} has no safetensors equivalent")
        array = np.asarray(array, order="C")  # (not ascontiguousarray: it makes 0-d 1-d)
        self._data.write(array.reshape(-1).view(np.uint8).data)
        self.entries[key] = {"dtype": _NP_TO_SAFE[name], "shape": list(array.shape),
                             "data_offsets": [self.nbytes, self.nbytes + array.nbytes]}
        self.nbytes += array.nbytes

    def close(self, final_path: str) -> None:
        self._data.close()
        header = json.dumps({"__metadata__": {"format": "pt"}, **self.entries},
                            separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # data starts 8-byte aligned
        with open(final_path + ".tmp", "wb") as out, open(self.path + ".data", "rb") as data:
            out.write(len(header).to_bytes(8, "little"))
            out.write(header)
            shutil.copyfileobj(data, out, 64 << 20)
        os.remove(self.path + ".data")
        os.replace(final_path + ".tmp", final_path)


class SafetensorsShardWriter:
    """Writes tensors into safetensors shards, `transformers`-style, one tensor at a time.

    A shard is closed once the next tensor would take it over `max_shard_size` (a tensor larger
    than that gets a shard of its own). Tensors go to disk as they arrive, so memory holds one
    tensor whatever the shard size. `close()` names the files
    `model-0000i-of-0000n.safetensors` with a `model.safetensors.index.json`
    (`{"metadata": {"total_size": bytes}, "weight_map": {key: file}}`), or `model.safetensors`
    when one shard suffices. Each file's metadata is `{"format": "pt"}`, as transformers writes.

    Args:
      directory: output folder (created).
      max_shard_size: bytes or a size string (`parse_size`).

    Raises:
      ValueError: a key given twice, a dtype safetensors cannot store, `close()` without
        tensors.
    """

    def __init__(self, directory: str, max_shard_size: int | str = "5GB"):
        self.directory = directory
        self.max_shard_size = parse_size(max_shard_size)
        os.makedirs(directory, exist_ok=True)
        self._shards: list[_ShardFile] = []
        self._keys: set[str] = set()
        self.total_size = 0

    def add(self, key: str, array: np.ndarray) -> None:
        if key in self._keys:
            raise ValueError(f"tensor {key!r} written twice")
        self._keys.add(key)
        if not self._shards or (self._shards[-1].entries
                                and self._shards[-1].nbytes + array.nbytes > self.max_shard_size):
            self._shards.append(_ShardFile(os.path.join(
                self.directory, f".shard-{len(self._shards):05d}.safetensors")))
        self._shards[-1].add(key, array)
        self.total_size += array.nbytes

    def close(self) -> list[str]:
        """Writes the headers, names the files and writes the index; returns the file names."""
        if not self._shards:
            raise ValueError("no tensors to write")
        n = len(self._shards)
        if n == 1:
            self._shards[0].close(os.path.join(self.directory, SAFE_SINGLE))
            return [SAFE_SINGLE]
        names, weight_map = [], {}
        for i, shard in enumerate(self._shards):
            name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            shard.close(os.path.join(self.directory, name))
            names.append(name)
            weight_map.update({k: name for k in shard.entries})
        index = {"metadata": {"total_size": self.total_size},
                 "weight_map": dict(sorted(weight_map.items()))}
        with open(os.path.join(self.directory, SAFE_INDEX), "w") as f:
            json.dump(index, f, indent=2)
            f.write("\n")
        return names + [SAFE_INDEX]


def is_weight_file(name: str) -> bool:
    """Whether a file name is weights or a weight index (not copied as a side file)."""
    return name.endswith(WEIGHT_SUFFIXES) or name.endswith(".index.json")


def copy_side_files(src: str, dst: str, *, skip: tuple[str, ...] = ()) -> list[str]:
    """Copies the non-weight top-level files of `src` (config, tokenizer, processor, chat
    template, generation config, README ...) into `dst`, unchanged; returns their names."""
    copied = []
    for name in sorted(os.listdir(src)):
        path = os.path.join(src, name)
        if os.path.isfile(path) and not is_weight_file(name) and name not in skip:
            shutil.copy2(path, os.path.join(dst, name))
            copied.append(name)
    return copied


def setup_cli_logging() -> None:
    """INFO logging for the conversion CLIs (`import_hf`, `export_hf`, `tdc_keys`), with absl's
    (orbax's) messages quietened to warnings."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
