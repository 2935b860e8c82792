"""Peak memory of `convert.import_hf` / `export_hf` on a synthetic Qwen2-7B-shaped checkpoint.

    python benchmarks/convert_memory.py [--workdir=/tmp/convert_memory] [--dtypes=keep,float32]
        [--export] [--layers=28] [--keep-files]

Writes a Qwen2-7B-shaped HF folder (config.json + bf16 safetensors in ~4 GB shards with a
`model.safetensors.index.json`, as the released Qwen/Qwen2-7B: 7.6e9 parameters, 15.2 GB of
random normal weights) and runs `python -m convert.import_hf` on it as a subprocess once per
`--dtype`, reporting the child's wall time and peak RSS (`ru_maxrss` from `wait4`; also the peak
of its anonymous memory, `RssAnon`, sampled from /proc every 0.2 s: file pages mapped from
the checkpoint count in RSS but are reclaimable). `--export` also measures
`python -m convert.export_hf` of the `keep` import. Everything written is deleted at the end
unless `--keep-files`. Needs ~45 GB of disk (source, one import, one export at a time).

Not part of the test suite; run by hand (minutes on a laptop; the disk is the bottleneck).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import ml_dtypes
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

QWEN2_7B = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=152064,
                hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=131072,
                rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=False, hidden_act="silu",
                use_sliding_window=False, torch_dtype="bfloat16")


def _tensors(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(HF key, shape) of a Qwen2ForCausalLM, in transformers' order."""
    d, m, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    h = d // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * h
    out = [("model.embed_tokens.weight", (v, d))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [(p + "self_attn.q_proj.weight", (d, d)), (p + "self_attn.q_proj.bias", (d,)),
                (p + "self_attn.k_proj.weight", (kv, d)), (p + "self_attn.k_proj.bias", (kv,)),
                (p + "self_attn.v_proj.weight", (kv, d)), (p + "self_attn.v_proj.bias", (kv,)),
                (p + "self_attn.o_proj.weight", (d, d)), (p + "mlp.gate_proj.weight", (m, d)),
                (p + "mlp.up_proj.weight", (m, d)), (p + "mlp.down_proj.weight", (d, m)),
                (p + "input_layernorm.weight", (d,)),
                (p + "post_attention_layernorm.weight", (d,))]
    return out + [("model.norm.weight", (d,)), ("lm_head.weight", (v, d))]


def write_checkpoint(folder: str, cfg: dict, shard_bytes: int = 4 * 10**9) -> int:
    """Writes the synthetic bf16 checkpoint; returns its bytes."""
    from safetensors.numpy import save_file  # noqa: PLC0415

    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    rng = np.random.default_rng(0)
    specs = _tensors(cfg)
    shards, current, size = [], [], 0
    for key, shape in specs:
        nbytes = 2 * int(np.prod(shape))
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((key, shape))
        size += nbytes
    shards.append(current)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for key, shape in shard:
            a = np.empty(shape, ml_dtypes.bfloat16)
            flat = a.reshape(-1)
            for s in range(0, flat.size, 1 << 24):  # 16M values at a time
                n = min(1 << 24, flat.size - s)
                flat[s:s + n] = (0.02 * rng.standard_normal(n, np.float32)).astype(
                    ml_dtypes.bfloat16)
            tensors[key] = a
            weight_map[key] = name
            total += a.nbytes
        save_file(tensors, os.path.join(folder, name), metadata={"format": "pt"})
        del tensors
        print(f"  wrote {name}", flush=True)
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return total


def _rss_anon_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def measure(cmd: list[str]) -> dict:
    """Runs `cmd`; returns wall time, peak RSS (wait4) and sampled peak RssAnon."""
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    peak_anon = [0]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak_anon[0] = max(peak_anon[0], _rss_anon_kb(proc.pid))
            time.sleep(0.2)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    _, status, usage = os.wait4(proc.pid, 0)
    done.set()
    thread.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}")
    return {"wall_s": round(time.time() - t0, 1),
            "peak_rss_gb": round(usage.ru_maxrss * 1024 / 1e9, 2),
            "peak_rss_anon_gb": round(peak_anon[0] * 1024 / 1e9, 2)}


def _du(path: str) -> float:
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return round(total / 1e9, 2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="/tmp/convert_memory")
    p.add_argument("--dtypes", default="keep,float32")
    p.add_argument("--layers", type=int, default=28, help="fewer for a quick run")
    p.add_argument("--export", action="store_true", help="also measure export_hf (keep)")
    p.add_argument("--keep-files", action="store_true")
    args = p.parse_args()

    cfg = dict(QWEN2_7B, num_hidden_layers=args.layers)
    src = os.path.join(args.workdir, "hf")
    results = []
    try:
        if not os.path.exists(os.path.join(src, "model.safetensors.index.json")):
            print(f"writing the synthetic checkpoint to {src}", flush=True)
            t0 = time.time()
            nbytes = write_checkpoint(src, cfg)
            print(f"  {nbytes / 1e9:.2f} GB in {time.time() - t0:.0f} s", flush=True)
        for dtype in args.dtypes.split(","):
            out = os.path.join(args.workdir, f"orbax_{dtype}")
            shutil.rmtree(out, ignore_errors=True)
            print(f"import --dtype={dtype}", flush=True)
            r = measure([sys.executable, "-m", "convert.import_hf", f"--src={src}",
                         f"--out={out}", f"--dtype={dtype}"])
            r.update(step="import", dtype=dtype, output_gb=_du(out))
            print(json.dumps(r), flush=True)
            results.append(r)
            if args.export and dtype == "keep":
                hf_out = os.path.join(args.workdir, "hf_export")
                shutil.rmtree(hf_out, ignore_errors=True)
                print("export --dtype=keep", flush=True)
                r = measure([sys.executable, "-m", "convert.export_hf", f"--src={out}",
                             f"--out={hf_out}"])
                r.update(step="export", dtype="keep", output_gb=_du(hf_out))
                print(json.dumps(r), flush=True)
                results.append(r)
                if not args.keep_files:
                    shutil.rmtree(hf_out)
            if not args.keep_files:
                shutil.rmtree(out)
    finally:
        if not args.keep_files:
            shutil.rmtree(args.workdir, ignore_errors=True)
    params = sum(int(np.prod(s)) for _, s in _tensors(cfg))
    print(f"\nQwen2-7B-shaped ({params / 1e9:.2f}e9 parameters, bf16 source {2 * params / 1e9:.1f}"
          " GB)")
    print("| step | dtype | wall s | peak RSS GB | peak RssAnon GB | output GB |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['step']} | {r['dtype']} | {r['wall_s']} | {r['peak_rss_gb']} | "
              f"{r['peak_rss_anon_gb']} | {r['output_gb']} |")


if __name__ == "__main__":
    main()
