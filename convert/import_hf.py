"""Hugging Face checkpoint folder -> longvid_jax orbax checkpoint.

    python -m convert.import_hf --src=HF_DIR --out=ORBAX_DIR [--family=NAME]
        [--dtype=keep|bfloat16|float32] [--weights=FILE_OR_DIR] [--config=config.json]
        [--keep-ignored] [--group-size=1GiB] [--compress] [--overwrite]

The family comes from `HF_DIR/config.json` (`model_type`, else `architectures`; see
`convert/families.py`) or `--family`. Weights are read tensor by tensor (`model.safetensors`,
a sharded `model.safetensors.index.json`, `pytorch_model.bin(.index.json)`, or one
`.bin`/`.pth`/`.pt` state dict), converted with the family's key table and written to orbax:

  ORBAX_DIR/
    params/               orbax checkpoint of our params tree (PyTree in params/state; read it
                          with `convert.checkpoint_io.load_tree` or `load_converted`)
    extra/                with --keep-ignored: the tensors of the ignored prefixes under their
                          HF names, so that `export_hf` gives back every original key
    longvid_config.json   family, our module config, the key layout, dtypes, source files
    config.json ...       the original config.json and every other non-weight file of HF_DIR
                          (tokenizer, chat template, processor, generation config), unchanged

Memory: the decoder families convert tensor by tensor and write orbax in groups of
`--group-size` bytes (orbax partial save), so RSS stays near one group plus one tensor whatever
the model size or `--dtype` (see benchmarks/convert_memory.py). The other families (<= ~1B
parameters) convert their tree whole and write it in groups.

`--dtype`: `keep` stores each tensor in its checkpoint dtype (bf16 bits stay bf16); `bfloat16` /
`float16` / `float32` cast every parameter. A non-float tensor where a parameter is expected
is an error naming the key. The output is written to `ORBAX_DIR.importing` and renamed when
complete.
"""

import argparse
import dataclasses
import importlib
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from convert import checkpoint_io as cio
from convert import families

log = logging.getLogger(__name__)

LONGVID_CONFIG = "longvid_config.json"
FORMAT_VERSION = 1
DTYPES = ("keep", "bfloat16", "float16", "float32")


# ----------------------------------------------------------------------------------------------
# Our module configs as JSON.


def config_to_json(cfg: Any) -> dict[str, Any]:
    """A frozen-dataclass config as a JSON-able dict (dtypes by name, tuples as lists)."""

    def enc(v):
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: enc(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (tuple, list)):
            return [enc(x) for x in v]
        if isinstance(v, Mapping):
            return {str(k): enc(x) for k, x in v.items()}
        if isinstance(v, (str, int, float, bool)) or v is None:
            return v
        if isinstance(v, np.generic):
            return v.item()
        try:
            return cio.np_dtype(v).name
        except TypeError:
            raise TypeError(f"config value {v!r} ({type(v).__name__}) is not JSON-able") from None

    return enc(cfg)


def config_from_json(class_path: str, d: Mapping[str, Any]) -> Any:
    """Inverse of `config_to_json`: `module.Class` path and dict -> the config dataclass."""
    module, _, name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module), name)

    def dec(v):
        return tuple(dec(x) for x in v) if isinstance(v, list) else v

    kwargs = {}
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    for k, v in d.items():
        if k not in types:
            raise ValueError(f"{class_path} has no field {k!r}")
        if isinstance(v, Mapping) and dataclasses.is_dataclass(types[k]):
            t = types[k]
            kwargs[k] = config_from_json(f"{t.__module__}.{t.__qualname__}", v)
        else:
            kwargs[k] = dec(v)
    return cls(**kwargs)


# ----------------------------------------------------------------------------------------------
# dtype policy.


def _target_dtype(dtype: str, reader: cio.StateReader, layout: families.Layout) -> np.dtype | None:
    """The dtype to store parameters in, or None to keep what the key module returns."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {DTYPES}, got {dtype!r}")
    if dtype != "keep":
        return cio.np_dtype(dtype)
    floats = {reader.dtype(k) for k in reader if not layout.is_ignored(k)
              and cio.is_float_dtype(reader.dtype(k))}
    # One source float dtype: keep it exactly (also undoing a key module that upcasts).
    return cio.np_dtype(floats.pop()) if len(floats) == 1 else None


def _cast(array: np.ndarray, target: np.dtype | None, where: str) -> np.ndarray:
    if not cio.is_float_dtype(array.dtype):
        raise ValueError(f"{where}: dtype {array.dtype} where a float parameter is expected")
    if target is None or array.dtype == target:
        return array
    return array.astype(target)


# Integer buffers a state dict may hold beside the parameters (the key tables map or reject
# them); any other non-float tensor is a dtype error.
_BUFFERS = ("position_ids", "token_type_ids", "num_batches_tracked")


class _FilteredState(Mapping):
    """The reader's tensors minus the ignored prefixes, streamed (ignored ones go to `sink`).

    Raises ValueError for a non-float tensor that is not an integer buffer (`_BUFFERS`)."""

    def __init__(self, reader: cio.StateReader, layout: families.Layout,
                 sink: Callable[[str, np.ndarray], None] | None):
        self._reader, self._layout, self._sink = reader, layout, sink
        self._keys = [k for k in reader if not layout.is_ignored(k)]
        self.non_float: list[str] = []

    def __getitem__(self, key):
        if key not in self._reader or self._layout.is_ignored(key):
            raise KeyError(key)
        return self._reader[key]

    def __iter__(self):
        return iter(self._keys)

    def __len__(self):
        return len(self._keys)

    def items(self) -> Iterator[tuple[str, np.ndarray]]:  # type: ignore[override]
        """Streams the kept (key, array) pairs, holding no reference to a yielded array."""
        pairs = self._reader.items()
        for _ in range(len(self._reader)):
            held = [next(pairs)]
            key, dtype = held[0][0], held[0][1].dtype
            if self._layout.is_ignored(key):
                if self._sink is not None:
                    self._sink(*held.pop())
                continue
            if not cio.is_float_dtype(dtype):
                if not key.endswith(_BUFFERS):
                    raise ValueError(f"key {key!r}: dtype {dtype} where a float parameter is "
                                     "expected")
                self.non_float.append(key)  # a buffer the key table may declare ignored
            yield held.pop()


# ----------------------------------------------------------------------------------------------
# The conversion.


def read_hf_config(path: str) -> dict[str, Any]:
    """config.json as a dict (raises FileNotFoundError / ValueError naming the file)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no config.json (pass --config=FILE)")
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as e:
        raise ValueError(f"{path}: not JSON ({e})") from e


def import_checkpoint(src: str, out: str, *, family: str | None = None, dtype: str = "keep",
                      weights: str | None = None, config: str | None = None,
                      keep_ignored: bool = False, group_bytes: int = 1 << 30,
                      compress: bool = False, overwrite: bool = False,
                      on_read: Callable[[str, np.ndarray], None] | None = None
                      ) -> dict[str, Any]:
    """Converts an HF checkpoint to a longvid_jax orbax checkpoint (see the module docstring).

    Args:
      src: HF checkpoint folder (config.json + weights), or one state-dict file with `config`.
      out: output folder (must not exist unless `overwrite`).
      family: registry name; None detects it from config.json.
      dtype: `keep`, `bfloat16`, `float16` or `float32`.
      weights: weights to read instead of those in `src` (a file or folder).
      config: config.json to use instead of `src/config.json`.
      keep_ignored: also store the ignored-prefix tensors (in `out/extra`).
      group_bytes: bytes per orbax write group.
      compress: zstd-compress the orbax arrays (smaller, several times slower).
      overwrite: replace an existing `out`.
      on_read: called with (key, array) for each tensor read (instrumentation).

    Returns:
      The `longvid_config.json` dict written.

    Raises:
      FileExistsError: `out` exists and not `overwrite`.
      FileNotFoundError / CheckpointFormatError / ValueError: missing files, unknown family,
        unmapped / missing / duplicate keys, shape or dtype surprises (naming the key or file).
    """
    t0 = time.time()
    src = os.path.abspath(src)
    out = os.path.abspath(out)
    src_dir = src if os.path.isdir(src) else os.path.dirname(src)
    config_path = config or os.path.join(src_dir, "config.json")
    hf_config = read_hf_config(config_path)
    if os.path.exists(out):
        if not overwrite:
            raise FileExistsError(f"{out} exists (pass --overwrite to replace it)")
    reader = cio.open_state(weights or src, on_read=on_read)
    fam = families.get(family) if family else families.detect(hf_config)
    layout = fam.layout(hf_config, list(reader))
    cfg = fam.config_from_hf(hf_config, layout)
    target = _target_dtype(dtype, reader, layout)
    log.info("family %s (%s), %d tensors in %d file(s), dtype %s -> %s", fam.name,
             layout.hf_class, len(reader), len(reader.files), dict(reader.dtype_counts()),
             "kept" if target is None else target.name)

    work = out.rstrip("/") + ".importing"
    if os.path.exists(work):
        shutil.rmtree(work)
    os.makedirs(work)
    try:
        params = cio.OrbaxTreeWriter(os.path.join(work, "params"), group_bytes=group_bytes,
                                     compress=compress)
        extra = None
        if keep_ignored and layout.ignored:
            extra = cio.OrbaxTreeWriter(os.path.join(work, "extra"), group_bytes=group_bytes,
                                        compress=compress)
        sink = None if extra is None else (lambda k, a: extra.add(tuple(k.split(".")), a))
        state = _FilteredState(reader, layout, sink)
        stored = _convert(fam, cfg, layout, state, params, target)
        params.close()
        if extra is not None:
            extra.close()

        side_files = []
        if os.path.isdir(src):
            side_files = cio.copy_side_files(src_dir, work,
                                             skip=("config.json",) if config else ())
        if config is not None:  # the config.json used, not the one in src
            shutil.copy2(config, os.path.join(work, "config.json"))
            side_files.append("config.json")
        meta = {
            "format_version": FORMAT_VERSION,
            "family": fam.name,
            "config_class": f"{type(cfg).__module__}.{type(cfg).__qualname__}",
            "config": config_to_json(cfg),
            "layout": layout.to_json(),
            "dtype": {"requested": dtype, "stored": stored},
            "source": {"path": src, "weight_files": [os.path.basename(f) for f in reader.files],
                       "dtypes": dict(reader.dtype_counts())},
            "params": "params",
            "extra": "extra" if extra is not None else None,
            "hf_files": sorted(side_files),
        }
        with open(os.path.join(work, LONGVID_CONFIG), "w") as f:
            json.dump(meta, f, indent=2)
            f.write("\n")
        if os.path.exists(out):
            shutil.rmtree(out)
        os.replace(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)  # with orbax's partial-save folders
        raise
    log.info("wrote %s: %.2f GB in %d group(s), %.1f s", out, params.nbytes / 1e9,
             params.num_groups, time.time() - t0)
    return meta


def _convert(fam: families.Family, cfg: Any, layout: families.Layout, state: _FilteredState,
             writer: cio.OrbaxTreeWriter, target: np.dtype | None) -> dict[str, int]:
    """Converts `state` into `writer`: tensor by tensor when the family can, else its whole
    `hf_to_params` tree, leaf by leaf. Returns {stored dtype name: number of leaves}."""
    stored: dict[str, int] = {}

    def write_first(leaves: list[tuple[tuple[str, ...], np.ndarray]], where: str) -> None:
        """Casts and writes `leaves[0]`, holding no other reference to it (so that the uncast
        array is freed as soon as the cast copy exists, and the buffer is written first)."""
        path, leaf = leaves.pop(0)
        writer.reserve(leaf.size * (leaf.dtype.itemsize if target is None else target.itemsize))
        leaf = _cast(leaf, target, where)
        stored[leaf.dtype.name] = stored.get(leaf.dtype.name, 0) + 1
        writer.add(path, leaf)

    converter = fam.tensor_converter(cfg, list(state))
    if converter is not None:
        pairs = state.items()
        for _ in range(len(state)):
            key, array = next(pairs)
            leaves = converter.convert(key, array)
            del array  # free the source before the cast copy and the group write
            while leaves:
                write_first(leaves, f"key {key!r}")
        converter.finish()
    else:
        flat = list(cio.flatten_tree(fam.hf_to_params(state, cfg, layout)).items())
        while flat:
            path, leaf_dtype = flat[0][0], flat[0][1].dtype
            where = f"parameter {'/'.join(path)}"
            if state.non_float and not cio.is_float_dtype(leaf_dtype):
                where += f" (non-float source keys: {state.non_float[:8]})"
            write_first(flat, where)
    return stored


def load_converted(directory: str) -> tuple[dict, Any, dict[str, Any]]:
    """Reads a converted checkpoint whole: (params tree of NumPy arrays, our config, the
    `longvid_config.json` dict).

    Raises:
      FileNotFoundError: no `longvid_config.json` in `directory`.
    """
    meta = read_longvid_config(directory)
    cfg = config_from_json(meta["config_class"], meta["config"])
    return cio.load_tree(os.path.join(directory, meta["params"])), cfg, meta


def read_longvid_config(directory: str) -> dict[str, Any]:
    """The `longvid_config.json` dict of a converted checkpoint folder."""
    path = os.path.join(directory, LONGVID_CONFIG)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory}: no {LONGVID_CONFIG} (not made by "
                                "convert.import_hf)")
    with open(path) as f:
        meta = json.load(f)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {meta.get('format_version')} != "
                         f"{FORMAT_VERSION}")
    return meta


# ----------------------------------------------------------------------------------------------
# Command line.


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m convert.import_hf", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, help="HF checkpoint folder (or one state-dict file)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--family", choices=sorted(families.FAMILIES),
                   help="checkpoint family (default: detected from config.json)")
    p.add_argument("--dtype", default="keep", choices=DTYPES)
    p.add_argument("--weights", help="weights file / folder to read instead of those in --src")
    p.add_argument("--config", help="config.json to use instead of SRC/config.json")
    p.add_argument("--keep-ignored", action="store_true",
                   help="store the ignored tensors too (export gives every original key back)")
    p.add_argument("--group-size", default="1GiB",
                   help="bytes written per orbax group (memory bound), e.g. 512MiB")
    p.add_argument("--compress", action="store_true",
                   help="zstd-compress the orbax arrays (smaller, several times slower)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    cio.setup_cli_logging()
    import_checkpoint(args.src, args.out, family=args.family, dtype=args.dtype,
                      weights=args.weights, config=args.config, keep_ignored=args.keep_ignored,
                      group_bytes=cio.parse_size(args.group_size), compress=args.compress,
                      overwrite=args.overwrite)
    return 0


if __name__ == "__main__":
    sys.exit(main())
