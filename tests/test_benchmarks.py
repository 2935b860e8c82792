"""Every benchmark also runs at tiny sizes on CPU (a smoke test; no timing is asserted)."""

import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def _smoke(script: str, *args: str, timeout: int = 300) -> str:
    """Runs `benchmarks/<script> --smoke *args` on CPU (one device); returns its stdout."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    env.pop("XLA_FLAGS", None)
    out = subprocess.run([sys.executable, f"benchmarks/{script}", "--smoke", *args], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_attention_benchmark_smoke():
    stdout = _smoke("attention.py", "--impls=cudnn,pallas_gpu,xla")
    lines = [ln for ln in stdout.splitlines() if " T=64: " in ln]
    assert [ln.split()[0] for ln in lines] == ["pallas_gpu", "xla"], stdout
    for ln in lines:  # gradients agree with the float32 reference
        assert float(ln.rsplit(": ", 1)[1].rstrip(")")) < 1e-4, ln


def test_llm_train_step_benchmark_smoke():
    stdout = _smoke("llm_train_step.py", "--remat=dots_attention", "--cast_params")
    assert "ours:" in stdout and "torch:" in stdout and "ratio" in stdout


def test_vision_tower_benchmark_smoke():
    stdout = _smoke("vision_tower.py")
    assert "torch:" in stdout and "ours xla:" in stdout and "x torch" in stdout


def test_longest_sequence_benchmark_smoke():
    # Ours spreads each sequence over 2 CPU devices (ring attention); PyTorch runs on one.
    stdout = _smoke("longest_sequence.py", "--context=2", timeout=600)
    assert "ours: longest trained sequence 128 tokens" in stdout, stdout
    assert "torch: longest trained sequence 128 tokens" in stdout, stdout


def test_tdc_full_size_benchmark_smoke():
    stdout = _smoke("tdc_full_size.py")
    assert "seconds per stage: encode" in stdout and "prefill" in stdout, stdout
