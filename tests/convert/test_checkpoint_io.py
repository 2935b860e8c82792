"""Tests of `convert/checkpoint_io.py`: tensor-by-tensor readers, orbax and safetensors writers.

Checkpoints are small random state dicts written to tmp_path in every supported layout
(single / sharded safetensors, single / sharded `.bin`, a LAVIS-style wrapped `.pth`).
"""

import gc
import json
import os
import weakref

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save_file

from convert import checkpoint_io as cio


def _state(seed: int = 0) -> dict[str, np.ndarray]:
    """Random tensors of mixed dtypes and shapes (float32, bfloat16, int64)."""
    rng = np.random.default_rng(seed)
    return {
        "a.weight": rng.normal(size=(6, 5)).astype(np.float32),
        "a.bias": rng.normal(size=(6,)).astype(np.float32),
        "b.weight": rng.normal(size=(4, 3, 2)).astype(ml_dtypes.bfloat16),
        "c.table": rng.normal(size=(16, 8)).astype(np.float32),
        "d.ids": np.arange(7, dtype=np.int64),
    }


def _torch(array: np.ndarray) -> torch.Tensor:
    if array.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(array.copy())


def _write_sharded(folder, state, kind: str, shards: int = 3) -> None:
    """`kind` in safetensors / bin: shards with an index, as transformers writes them."""
    os.makedirs(folder, exist_ok=True)
    keys = list(state)
    weight_map = {}
    for i in range(shards):
        ext = "safetensors" if kind == "safetensors" else "bin"
        stem = "model" if kind == "safetensors" else "pytorch_model"
        name = f"{stem}-{i + 1:05d}-of-{shards:05d}.{ext}"
        part = {k: state[k] for k in keys[i::shards]}
        if kind == "safetensors":
            save_file(part, os.path.join(folder, name), metadata={"format": "pt"})
        else:
            torch.save({k: _torch(v) for k, v in part.items()}, os.path.join(folder, name))
        weight_map.update({k: name for k in part})
    index = cio.SAFE_INDEX if kind == "safetensors" else cio.BIN_INDEX
    with open(os.path.join(folder, index), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def _assert_same(got: np.ndarray, want: np.ndarray, key: str) -> None:
    assert got.dtype == want.dtype, key
    assert got.shape == want.shape, key
    np.testing.assert_array_equal(got.reshape(-1).view(np.uint8), want.reshape(-1).view(np.uint8),
                                  err_msg=key)


@pytest.mark.parametrize("layout", ["single_safetensors", "sharded_safetensors", "single_bin",
                                    "sharded_bin", "wrapped_pth"])
def test_reader_layouts_bits_and_dtypes(tmp_path, layout):
    state = _state()
    folder = tmp_path / "ckpt"
    folder.mkdir()
    src = str(folder)
    if layout == "single_safetensors":
        save_file(state, str(folder / cio.SAFE_SINGLE))
    elif layout == "sharded_safetensors":
        _write_sharded(folder, state, "safetensors")
    elif layout == "single_bin":
        torch.save({k: _torch(v) for k, v in state.items()}, folder / cio.BIN_SINGLE)
    elif layout == "sharded_bin":
        _write_sharded(folder, state, "bin")
    else:  # LAVIS / TimeChat: {"model": state_dict, ...} in a .pth given as a file
        src = str(folder / "checkpoint_best.pth")
        torch.save({"model": {k: _torch(v) for k, v in state.items()}, "epoch": 3}, src)
    reader = cio.open_state(src)
    assert sorted(reader) == sorted(state) and len(reader) == len(state)
    for key in state:
        assert reader.shape(key) == state[key].shape
        assert cio.np_dtype(reader.dtype(key)) == state[key].dtype
        _assert_same(reader[key], state[key], key)
    streamed = dict(reader.items())
    assert sorted(streamed) == sorted(state)
    for key, value in streamed.items():
        _assert_same(value, state[key], key)
    assert reader.dtype_counts() == {"float32": 3, "bfloat16": 1, "int64": 1}


@pytest.mark.parametrize("kind", ["safetensors", "bin"])
@pytest.mark.parametrize("remap_bytes", [0, 1 << 20])
def test_reader_holds_one_tensor_at_a_time(tmp_path, kind, remap_bytes):
    """Each array the stream yields is dead once the consumer drops it: the reader keeps no
    reference (so one tensor is materialised at a time), whatever the re-open cadence."""
    state = _state(1)
    _write_sharded(tmp_path, state, kind)
    reads = []
    reader = cio.open_state(str(tmp_path), remap_bytes=remap_bytes,
                            on_read=lambda k, a: reads.append(k))
    refs: list[weakref.ref] = []
    for key, array in reader.items():
        gc.collect()
        assert all(r() is None for r in refs), f"an earlier tensor is alive when {key} arrives"
        _assert_same(array, state[key], key)
        refs.append(weakref.ref(array))
        del array
    assert sorted(reads) == sorted(state)


def test_reader_errors_name_file_and_key(tmp_path):
    state = _state()
    _write_sharded(tmp_path / "a", state, "safetensors")
    os.remove(tmp_path / "a" / "model-00002-of-00003.safetensors")
    with pytest.raises(cio.CheckpointFormatError,
                       match=r"shard file 'model-00002-of-00003.safetensors' \(holding 'a.bias'\) "
                             "does not exist"):
        cio.open_state(str(tmp_path / "a"))

    _write_sharded(tmp_path / "b", state, "safetensors")  # the index misplaces a key
    index_path = tmp_path / "b" / cio.SAFE_INDEX
    index = json.loads(index_path.read_text())
    index["weight_map"]["a.bias"] = "model-00001-of-00003.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(cio.CheckpointFormatError,
                       match="index names 'a.bias' in model-00001-of-00003.safetensors but it is "
                             "in model-00002-of-00003.safetensors"):
        cio.open_state(str(tmp_path / "b"))

    del index["weight_map"]["a.bias"]  # a shard holds a key the index does not list
    index_path.write_text(json.dumps(index))
    with pytest.raises(cio.CheckpointFormatError, match="key 'a.bias' in .* is not in the index"):
        cio.open_state(str(tmp_path / "b"))

    (tmp_path / "c").mkdir()
    save_file({"x": np.zeros(2, np.float32)}, str(tmp_path / "c" / "one.safetensors"))
    save_file({"y": np.zeros(2, np.float32)}, str(tmp_path / "c" / "two.safetensors"))
    with pytest.raises(cio.CheckpointFormatError, match="several weight files"):
        cio.open_state(str(tmp_path / "c"))
    (tmp_path / "d").mkdir()
    with pytest.raises(cio.CheckpointFormatError, match="no weights"):
        cio.open_state(str(tmp_path / "d"))
    torch.save({"model": {"w": torch.zeros(2)}, "optimizer": {"lr": 1}, "step": 3},
               tmp_path / "e.pth")  # two entries besides a tensor dict: "model" is used
    assert list(cio.open_state(str(tmp_path / "e.pth"))) == ["w"]
    torch.save({"w": torch.zeros(2), "step": 3}, tmp_path / "f.pth")
    with pytest.raises(cio.CheckpointFormatError, match=r"f.pth: not a state dict of tensors "
                                                         r"\(non-tensor entries \['step'\]\)"):
        cio.open_state(str(tmp_path / "f.pth"))


def test_orbax_writer_groups_and_partial_load(tmp_path):
    rng = np.random.default_rng(2)
    leaves = {("enc", "layers_0", "kernel"): rng.normal(size=(64, 32)).astype(np.float32),
              ("enc", "layers_0", "bias"): rng.normal(size=(32,)).astype(ml_dtypes.bfloat16),
              ("enc", "layers_1", "kernel"): rng.normal(size=(64, 32)).astype(np.float32),
              ("head", "kernel"): rng.normal(size=(32, 10)).astype(np.float16)}
    writer = cio.OrbaxTreeWriter(str(tmp_path / "ck"), group_bytes=8192)
    for path, value in leaves.items():
        writer.add(path, value)
    with pytest.raises(ValueError, match="leaf head/kernel written twice"):
        writer.add(("head", "kernel"), leaves["head", "kernel"])
    writer.close()
    # [8 KiB kernel], [64 B bias: the next kernel would overflow it], [kernel], [head].
    assert writer.num_groups == 4
    assert cio.tree_metadata(str(tmp_path / "ck")) == {
        p: (v.shape, cio.np_dtype(v.dtype).name) for p, v in leaves.items()}
    whole = cio.flatten_tree(cio.load_tree(str(tmp_path / "ck")))
    assert whole.keys() == leaves.keys()
    for path, value in leaves.items():
        _assert_same(whole[path], value, "/".join(path))
    part = cio.load_tree(str(tmp_path / "ck"), [("enc", "layers_1", "kernel")])
    assert cio.flatten_tree(part).keys() == {("enc", "layers_1", "kernel")}
    with pytest.raises(cio.CheckpointFormatError, match="no leaf enc/layers_2/kernel"):
        cio.load_tree(str(tmp_path / "ck"), [("enc", "layers_2", "kernel")])
    with pytest.raises(FileExistsError):
        cio.OrbaxTreeWriter(str(tmp_path / "ck"))


def test_safetensors_shard_writer(tmp_path):
    state = _state(3)
    state["big"] = np.ones((40, 10), np.float32)  # 1600 B > max_shard_size: a shard of its own
    state["scalar"] = np.array(2.5, np.float32)  # 0-d (CLIP's logit_scale) stays 0-d
    writer = cio.SafetensorsShardWriter(str(tmp_path / "out"), max_shard_size=300)
    for key, value in state.items():
        writer.add(key, value)
    with pytest.raises(ValueError, match="'big' written twice"):
        writer.add("big", state["big"])
    names = writer.close()
    index = json.loads((tmp_path / "out" / cio.SAFE_INDEX).read_text())
    n = len(names) - 1
    assert names[:-1] == [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in state.values())
    assert sorted(index["weight_map"]) == sorted(state)
    for name in names[:-1]:  # each shard within the limit, or a single bigger tensor
        with safe_open(str(tmp_path / "out" / name), "np") as f:
            assert f.metadata() == {"format": "pt"}
            sizes = [f.get_tensor(k).nbytes for k in f.keys()]
        assert sum(sizes) <= 300 or len(sizes) == 1
    reader = cio.open_state(str(tmp_path / "out"))
    for key, value in state.items():
        _assert_same(reader[key], value, key)
    assert sorted(os.listdir(tmp_path / "out")) == sorted(names)  # no temporary files left

    one = cio.SafetensorsShardWriter(str(tmp_path / "one"))
    one.add("x", state["b.weight"])
    assert one.close() == [cio.SAFE_SINGLE]
    with safe_open(str(tmp_path / "one" / cio.SAFE_SINGLE), "pt") as f:
        assert f.get_tensor("x").dtype == torch.bfloat16


def test_parse_size_and_side_files(tmp_path):
    assert cio.parse_size("5GB") == 5 * 10**9
    assert cio.parse_size("2GiB") == 2 * 2**30
    assert cio.parse_size("20KB") == 20_000
    assert cio.parse_size(123) == 123
    with pytest.raises(ValueError, match="bad size"):
        cio.parse_size("5 parsecs")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "merges.txt",
                 "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "chat_template.jinja"):
        (tmp_path / name).write_text(name)
    (tmp_path / "dst").mkdir()
    copied = cio.copy_side_files(str(tmp_path), str(tmp_path / "dst"))
    assert copied == ["chat_template.jinja", "config.json", "merges.txt", "tokenizer.json",
                      "tokenizer_config.json"]
    assert (tmp_path / "dst" / "merges.txt").read_text() == "merges.txt"
