"""The longest sequence one GPU trains, ours vs `transformers` (issue 4, benchmark 3).

    python benchmarks/longest_sequence.py [--variant=qwen2_0_5b]
        [--seqs=32768,65536,131072,262144,524288] [--stacks=ours,torch] [--remat=full]
        [--loss_chunk=4096] [--timeout=300] [--context=1] [--ring_inner=auto|pallas_gpu]
        [--check_tiles] [--smoke]

For each stack and each length (ascending), one child process runs a warm-up training step and
one timed step (AdamW, batch 1, next-token loss over every position) of the Qwen2-0.5B-shaped
model, and reports whether it fit, its peak device memory and its time; a stack stops at its
first failure. Ours: bf16 compute, float32 master weights, `nn.scan`, remat policy
`--remat`, cuDNN attention, the chunked (fused) cross-entropy of `losses.chunked_lm_loss`, and
XLA allowed 95% of the GPU memory. PyTorch: `Qwen2ForCausalLM` in bf16 with SDPA attention,
gradient checkpointing and fused AdamW (the step of `llm_train_step.py`). Children keep a failure
(out of memory) from poisoning the next attempt. `--context=N` spreads each of our sequences
over N GPUs (ring attention over a `context` mesh axis, cuDNN's flash attention in each ring
step, or the Pallas flash kernel with `--ring_inner=pallas_gpu`; peak memory is the largest
device's). `--check_tiles` first checks cuDNN's tile calls on this GPU. `--smoke` runs a tiny
model on CPU (CI).
"""

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def child(a) -> dict:
    """One attempt in this process: {"ok", "seconds", "peak_gb", "loss" | "error"}."""
    import jax

    sys.path.insert(0, HERE)
    import llm_train_step as bench  # noqa: E402  (same folder)

    from longvid_jax.models import decoder

    impl = "ring" if a.context > 1 else ("xla" if a.smoke else "cudnn")
    if a.ring_inner == "pallas_gpu":  # the dispatcher's fallback: hide cuDNN's tile calls
        from longvid_jax.kernels import cudnn_tiles
        cudnn_tiles.supported = lambda: False
    if a.smoke:
        cfg = decoder.make_config("tiny", scan_layers=True, remat_policy=a.remat,
                                  attention_impl=impl)
    else:
        cfg = decoder.make_config(a.variant, dtype="bfloat16", param_dtype="float32",
                                  scan_layers=True, remat_policy=a.remat,
                                  attention_impl=impl)
    try:
        if a.stack == "ours":
            timing, _, loss = bench.ours(cfg, 1, a.seq, 1, a.loss_chunk, context=a.context)
            dt = timing["synced"]
            peak = max((d.memory_stats() or {}).get("peak_bytes_in_use", 0)
                       for d in jax.devices()[:a.context])
        else:
            import torch
            timing, loss = bench.torch_hf(cfg, 1, a.seq, 1)
            dt = timing["synced"]
            peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    except Exception as e:  # out of memory (XlaRuntimeError / torch.OutOfMemoryError) or worse
        return {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
    return {"ok": True, "seconds": dt, "peak_gb": peak / 1e9, "loss": loss}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--variant", default="qwen2_0_5b")
    p.add_argument("--seqs", default="32768,65536,131072,262144,524288")
    p.add_argument("--stacks", default="ours,torch")
    p.add_argument("--remat", default="full")
    p.add_argument("--loss_chunk", type=int, default=4096)
    p.add_argument("--timeout", type=int, default=300, help="seconds per attempt")
    p.add_argument("--context", type=int, default=1,
                   help="ours: spread each sequence over this many devices (ring attention)")
    p.add_argument("--ring_inner", default="auto", choices=("auto", "pallas_gpu"),
                   help="ours with --context > 1: each ring step through cuDNN where it serves "
                        "(auto) or through the Pallas flash kernel")
    p.add_argument("--check_tiles", action="store_true",
                   help="first compare cuDNN's tile calls (kernels/cudnn_tiles.py) with their "
                        "pure-JAX contract on this GPU, and stop if they differ")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--stack", default="ours", help=argparse.SUPPRESS)
    p.add_argument("--seq", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print("RESULT " + json.dumps(child(a)), flush=True)
        return
    if a.check_tiles:
        from longvid_jax.kernels import cudnn_tiles
        errs = cudnn_tiles.check_against_reference()
        print("cuDNN tiles vs reference, max |difference|: " +
              ", ".join(f"{k} {v:.4f}" for k, v in errs.items()), flush=True)
        if max(errs.values()) > 0.1:  # bf16 inputs: ~1e-2 expected
            sys.exit("cuDNN tile calls disagree with their contract")
    seqs = [64, 128] if a.smoke else [int(s) for s in a.seqs.split(",")]
    env = dict(os.environ, XLA_PYTHON_CLIENT_MEM_FRACTION="0.95")
    if a.smoke and a.context > 1:  # CPU devices for the ring
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={a.context}"
    env.pop("XLA_PYTHON_CLIENT_PREALLOCATE", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.dirname(HERE),
                                                      env.get("PYTHONPATH")]))
    print(f"{a.variant if not a.smoke else 'tiny'}, batch 1, remat {a.remat}, "
          f"loss chunk {a.loss_chunk}, sequence over {a.context} device(s) (ours)")
    for stack in a.stacks.split(","):
        longest = None
        for seq in seqs:
            cmd = [sys.executable, __file__, "--child", f"--stack={stack}", f"--seq={seq}",
                   f"--context={a.context if stack == 'ours' else 1}",
                   f"--variant={a.variant}", f"--remat={a.remat}",
                   f"--ring_inner={a.ring_inner}",
                   f"--loss_chunk={16 if a.smoke else a.loss_chunk}"] + (
                       ["--smoke"] if a.smoke else [])
            t0 = time.perf_counter()
            try:
                out = subprocess.run(cmd, env=env, capture_output=True, text=True,
                                     timeout=a.timeout)
                lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
                res = (json.loads(lines[-1][7:]) if lines else
                       {"ok": False, "error": f"exit {out.returncode}: "
                        f"{out.stderr.strip().splitlines()[-1][:300] if out.stderr else ''}"})
            except subprocess.TimeoutExpired:
                res = {"ok": False, "error": f"timeout after {a.timeout} s"}
            wall = time.perf_counter() - t0
            if res["ok"]:
                longest = seq
                print(f"{stack} T={seq}: ok, step {res['seconds']:.2f} s "
                      f"({seq / res['seconds']:,.0f} tokens/s), peak {res['peak_gb']:.1f} GB, "
                      f"loss {res['loss']:.3f} (attempt {wall:.0f} s)", flush=True)
            else:
                print(f"{stack} T={seq}: FAILED {res['error']} (attempt {wall:.0f} s)",
                      flush=True)
                break
        print(f"{stack}: longest trained sequence {longest} tokens", flush=True)


if __name__ == "__main__":
    main()
