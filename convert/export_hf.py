"""longvid_jax orbax checkpoint (made by `convert.import_hf`) -> Hugging Face checkpoint folder.

    python -m convert.export_hf --src=ORBAX_DIR --out=HF_DIR [--dtype=keep|bfloat16|float32]
        [--max-shard-size=5GB] [--overwrite]

Reads `ORBAX_DIR/longvid_config.json` (family, our module config, key layout), the params tree
(and the `extra/` tensors kept by `import_hf --keep-ignored`), converts with the family's
`params_to_hf` and writes safetensors as `transformers` does: `model.safetensors`, or shards
`model-00001-of-0000n.safetensors` with `model.safetensors.index.json` when over
`--max-shard-size`. `config.json` is the original kept by the import (its `dtype` /
`torch_dtype` updated if `--dtype` changes it), else one built from our config (decoder
families); the tokenizer / processor files kept by the import are copied. The folder loads with
`<HF class>.from_pretrained` (the class is in `longvid_config.json["layout"]["hf_class"]`).

Decoders are exported a few layers at a time (each group through `params_to_hf` with a
config of that many layers), so memory holds one group, not the model twice.
"""

import argparse
import dataclasses
import json
import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from convert import checkpoint_io as cio
from convert import families
from convert.import_hf import DTYPES, config_from_json, read_longvid_config

log = logging.getLogger(__name__)


def _check_float(array: np.ndarray, where: str) -> None:
    if not cio.is_float_dtype(array.dtype):
        raise ValueError(f"{where}: dtype {array.dtype} where a float parameter is expected")


def _whole(fam: families.Family, cfg: Any, layout: families.Layout,
           params_dir: str) -> Iterator[tuple[str, np.ndarray]]:
    params = cio.load_tree(params_dir)
    for path, leaf in cio.flatten_tree(params).items():
        _check_float(leaf, f"parameter {'/'.join(path)}")
    state = fam.params_to_hf(params, cfg, layout)
    del params
    for key in list(state):
        yield key, state.pop(key)  # no reference kept


_LAYER = re.compile(r"layers_(\d+)")
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.")


def _decoder_groups(fam: families.Family, cfg: Any, layout: families.Layout, params_dir: str,
                    group_layers: int) -> Iterator[tuple[str, np.ndarray]]:
    """HF tensors of an unscanned decoder, `group_layers` layers at a time, in transformers'
    order (embedding, layers, final norm, head)."""
    meta = cio.tree_metadata(params_dir)
    for path, (_, dtype) in meta.items():
        if not cio.is_float_dtype(dtype):
            raise ValueError(f"parameter {'/'.join(path)}: dtype {dtype} where a float "
                             "parameter is expected")
    shared = [p for p in meta if not _LAYER.fullmatch(p[0])]
    shared_params = cio.load_tree(params_dir, shared)
    n = cfg.num_layers
    for start in range(0, n, group_layers):
        stop = min(n, start + group_layers)
        paths = [p for p in meta if (m := _LAYER.fullmatch(p[0])) and start <= int(m[1]) < stop]
        group = cio.load_tree(params_dir, paths)
        sub = dict(shared_params)
        sub.update({f"layers_{i - start}": group.pop(f"layers_{i}") for i in range(start, stop)})
        state = fam.params_to_hf(sub, dataclasses.replace(cfg, num_layers=stop - start), layout)
        del sub, group
        for key in list(state):
            m = _HF_LAYER.match(key)
            if m:
                yield f"model.layers.{int(m[1]) + start}.{key[m.end():]}", state.pop(key)
            elif key.startswith("model.embed_tokens.") and start == 0:
                yield key, state.pop(key)
            elif not key.startswith("model.embed_tokens.") and stop == n:
                yield key, state.pop(key)  # final norm and head after the last layer
            else:
                del state[key]


def export_checkpoint(src: str, out: str, *, dtype: str = "keep",
                      max_shard_size: int | str = "5GB", overwrite: bool = False,
                      group_layers: int = 2) -> list[str]:
    """Writes an HF folder from a converted checkpoint (see the module docstring).

    Args:
      src: folder written by `convert.import_hf` (`longvid_config.json`, `params/`).
      out: HF folder to write (must not exist unless `overwrite`).
      dtype: `keep` (as stored), `bfloat16`, `float16` or `float32`.
      max_shard_size: shard size limit (bytes or `5GB`-style string).
      overwrite: replace an existing `out`.
      group_layers: decoder layers converted per group.

    Returns:
      The file names written into `out`.

    Raises:
      FileExistsError / FileNotFoundError / ValueError: existing output, missing inputs, a
        non-float parameter, a key produced twice, or the key module's strictness errors.
    """
    t0 = time.time()
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {DTYPES}, got {dtype!r}")
    src, out = os.path.abspath(src), os.path.abspath(out)
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"{out} exists (pass --overwrite to replace it)")
    meta = read_longvid_config(src)
    fam = families.get(meta["family"])
    cfg = config_from_json(meta["config_class"], meta["config"])
    layout = families.Layout.from_json(meta["layout"])
    params_dir = os.path.join(src, meta["params"])
    target = None if dtype == "keep" else cio.np_dtype(dtype)

    work = out.rstrip("/") + ".exporting"
    if os.path.exists(work):
        shutil.rmtree(work)
    try:
        writer = cio.SafetensorsShardWriter(work, max_shard_size)
        dtypes: set[str] = set()

        def add(key: str, array: np.ndarray) -> None:
            if target is not None and cio.is_float_dtype(array.dtype):
                array = array.astype(target)
            dtypes.add(array.dtype.name)
            writer.add(key, array)

        unscanned = not any(p[0] == "layers" for p in cio.tree_metadata(params_dir))
        if fam.streaming and unscanned:
            tensors = _decoder_groups(fam, cfg, layout, params_dir, group_layers)
        else:
            tensors = _whole(fam, cfg, layout, params_dir)
        while (held := next(tensors, None)) is not None:
            add(*held)
            del held  # no reference to the previous tensor while the next one is made
        if meta.get("extra"):
            extra = cio.flatten_tree(cio.load_tree(os.path.join(src, meta["extra"])))
            for path in list(extra):
                add(".".join(path), extra.pop(path))
        names = writer.close()

        config = _hf_config(src, meta, fam, cfg, layout, dtypes)
        if config is None:  # the original, unchanged
            shutil.copy2(os.path.join(src, "config.json"), os.path.join(work, "config.json"))
        else:
            with open(os.path.join(work, "config.json"), "w") as f:
                json.dump(config, f, indent=2, sort_keys=True)
                f.write("\n")
        for name in meta.get("hf_files", []):
            if name != "config.json":
                shutil.copy2(os.path.join(src, name), os.path.join(work, name))
        if os.path.exists(out):
            shutil.rmtree(out)
        os.replace(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    log.info("wrote %s (%s, %.2f GB) in %.1f s", out, ", ".join(names), writer.total_size / 1e9,
             time.time() - t0)
    return sorted(os.listdir(out))


def _hf_config(src: str, meta: dict[str, Any], fam: families.Family, cfg: Any,
               layout: families.Layout, dtypes: set[str]) -> dict[str, Any] | None:
    """config.json: None for the kept original unchanged; the original with its `dtype` /
    `torch_dtype` set to the exported tensors' dtype if that differs; else one built from our
    config."""
    kept = "config.json" in meta.get("hf_files", [])
    if kept:
        with open(os.path.join(src, "config.json")) as f:
            config = json.load(f)
    else:
        config = fam.config_to_hf(cfg, layout.hf_class)
    changed = not kept
    floats = sorted(d for d in dtypes if cio.is_float_dtype(d))
    if len(floats) == 1:
        for k in [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]:
            if config.get(k) != floats[0]:
                log.info("config.json %s: %s -> %s (the exported tensors)", k, config.get(k),
                         floats[0])
                config[k] = floats[0]
                changed = True
    return config if changed else None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m convert.export_hf", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, help="folder written by convert.import_hf")
    p.add_argument("--out", required=True, help="HF folder to write")
    p.add_argument("--dtype", default="keep", choices=DTYPES)
    p.add_argument("--max-shard-size", default="5GB", help="e.g. 5GB, 500MB, 2GiB")
    p.add_argument("--group-layers", type=int, default=2, help="decoder layers per group")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    cio.setup_cli_logging()
    export_checkpoint(args.src, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size,
                      overwrite=args.overwrite, group_layers=args.group_layers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
