"""Every benchmark also runs at tiny sizes on CPU (a smoke test; no timing is asserted)."""

import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_attention_benchmark_smoke():
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    env.pop("XLA_FLAGS", None)
    out = subprocess.run([sys.executable, "benchmarks/attention.py", "--smoke",
                          "--impls=cudnn,pallas_gpu,xla"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [ln for ln in out.stdout.splitlines() if " T=64: " in ln]
    assert [ln.split()[0] for ln in lines] == ["pallas_gpu", "xla"], out.stdout
    for ln in lines:  # gradients agree with the float32 reference
        assert float(ln.rsplit(": ", 1)[1].rstrip(")")) < 1e-4, ln


def test_llm_train_step_benchmark_smoke():
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    env.pop("XLA_FLAGS", None)
    out = subprocess.run([sys.executable, "benchmarks/llm_train_step.py", "--smoke"], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ours:" in out.stdout and "torch:" in out.stdout and "ratio" in out.stdout
