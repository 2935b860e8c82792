"""GPU kernel time by kernel name from a `jax.profiler.trace(..., create_perfetto_trace=True)`.

    python benchmarks/trace_summary.py PROFILE_DIR [--top=25] [--steps=1]

Reads the newest `perfetto_trace.json.gz` under PROFILE_DIR, keeps the complete events of the
GPU streams (processes named like "/device:GPU:0") and prints, per kernel name, the total
milliseconds divided by `--steps` (the steps traced), the call count and the share; then the
total and the span from the first kernel's start to the last one's end.
"""

import argparse
import collections
import glob
import gzip
import json
import os


def gpu_kernel_events(path: str) -> list[dict]:
    """Complete ("X") events of the trace's GPU device processes."""
    with gzip.open(path, "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    gpu_pids = {e["pid"] for e in events
                if e.get("ph") == "M" and e.get("name") == "process_name"
                and "GPU" in str(e.get("args", {}).get("name", ""))}
    return [e for e in events if e.get("ph") == "X" and e.get("pid") in gpu_pids
            and "dur" in e]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("profile_dir")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--steps", type=int, default=1)
    a = p.parse_args()
    files = glob.glob(os.path.join(a.profile_dir, "**", "perfetto_trace.json.gz"),
                      recursive=True)
    if not files:
        raise SystemExit(f"no perfetto_trace.json.gz under {a.profile_dir}")
    events = gpu_kernel_events(max(files, key=os.path.getmtime))
    if not events:
        raise SystemExit("no GPU kernel events in the trace")
    total = collections.Counter()
    count = collections.Counter()
    for e in events:
        total[e["name"]] += e["dur"]
        count[e["name"]] += 1
    all_us = sum(total.values())
    span = max(e["ts"] + e["dur"] for e in events) - min(e["ts"] for e in events)
    print(f"{'ms/step':>8} {'calls':>6} {'share':>6}  kernel")
    for name, us in total.most_common(a.top):
        print(f"{us / 1e3 / a.steps:8.3f} {count[name] // a.steps:6d} {us / all_us:6.1%}  "
              f"{name[:110]}")
    print(f"kernel time {all_us / 1e3 / a.steps:.3f} ms/step over {len(events) // a.steps} "
          f"kernels; span {span / 1e3 / a.steps:.3f} ms/step")


if __name__ == "__main__":
    main()
