"""XLA flags that entry points set before JAX starts its backend, unless the user set them.

`--xla_gpu_enable_triton_gemm=false` sends every matmul to cuBLAS instead of XLA's Triton GEMM
fusions (cuBLAS fuses bias and tanh-GELU epilogues itself). On an H200 (BENCHMARKS.md) the
Qwen2-0.5B training step of `benchmarks/llm_train_step.py` ran 0.5-2.3% faster with it and the
SigLIP-so400m tower of `benchmarks/vision_tower.py` 4% faster (98.3 -> 94.6 ms per 64 frames);
MaxText's GPU recipes set it too. `train`, `infer`, `tdc_infer` and `evaluate` apply these defaults. The
flags belong to XLA's shared debug options, so CPU and TPU backends accept and ignore them.
"""

import os

DEFAULTS: dict[str, str] = {"--xla_gpu_enable_triton_gemm": "false"}


def apply_defaults(env: dict[str, str] | None = None) -> str:
    """Adds each flag of `DEFAULTS` that `XLA_FLAGS` does not already name; returns the result.

    Must run before the first JAX computation (XLA reads `XLA_FLAGS` once, when the backend
    starts). A value the user gave for a flag is kept, whatever it is.

    Args:
      env: the environment to update (default `os.environ`).
    """
    env = os.environ if env is None else env
    current = env.get("XLA_FLAGS", "")
    named = {item.split("=", 1)[0] for item in current.split()}
    extra = [f"{name}={value}" for name, value in DEFAULTS.items() if name not in named]
    if extra:
        env["XLA_FLAGS"] = " ".join([current, *extra]).strip()
    return env.get("XLA_FLAGS", "")
