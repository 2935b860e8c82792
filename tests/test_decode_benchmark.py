"""The decoding benchmark runs at tiny sizes on CPU (a smoke test; no timing is asserted)."""

import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_decode_benchmark_smoke():
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    env.pop("XLA_FLAGS", None)
    out = subprocess.run([sys.executable, "benchmarks/decode.py", "--smoke"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    for word in ("ours:", "torch:", "device loop", "streamed", "ratio"):
        assert word in out.stdout, out.stdout
