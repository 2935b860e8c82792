"""Vision tower throughput: SigLIP-so400m frames/s at 384 px, ours vs `transformers` (issue 4,
benchmark 4).

    python benchmarks/vision_tower.py [--batch=64] [--impls=cudnn,xla] [--steps=10]
        [--skip_torch] [--no_xla_defaults] [--smoke]

The frozen tower of TDC encodes every sampled frame: forward only, bf16 weights and compute, all
27 layers and the post-LayerNorm, no pooling head. Ours: `longvid_jax.models.vit.ViT` under
`jax.jit`, with the attention implementation(s) given. PyTorch: `SiglipVisionModel` (bf16, SDPA
attention, `vision_use_head=False`) under `torch.inference_mode()`. Both get the same random
frames [batch, 384, 384, 3] (ours channels-last, PyTorch channels-first) and random weights; time
is the median of `--steps` calls after a warm-up, frames/s = batch / time. `--smoke` runs a tiny
tower on CPU (CI).
"""

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from longvid_jax import xla_flags
from longvid_jax.models import vit


def tower_flops_per_frame(cfg: vit.ViTConfig) -> float:
    """Forward FLOPs of one frame: 2 x matmul parameters x tokens, plus attention."""
    p = (cfg.image_size // cfg.patch_size) ** 2
    d, m = cfg.width, cfg.mlp_dim
    per_layer = 2 * p * (4 * d * d + 2 * d * m) + 4 * p * p * d
    patch = 2 * p * cfg.patch_size**2 * cfg.num_channels * d
    return cfg.num_layers_run * per_layer + patch


def ours(cfg, frames: np.ndarray, steps: int, profile_dir=None) -> tuple[float, np.ndarray]:
    model = vit.ViT(cfg)
    x = jnp.asarray(frames, cfg.dtype)
    params = jax.jit(lambda k: model.init(k, x[:1])["params"])(jax.random.key(0))
    params = jax.tree.map(lambda a: a.astype(cfg.param_dtype), params)
    fwd = jax.jit(lambda p, im: model.apply({"params": p}, im)[0])
    out = fwd(params, x)
    jax.block_until_ready(out)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        out = fwd(params, x)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t)
    if profile_dir:  # a trace of 3 calls (Perfetto JSON + XPlane) for kernel-level breakdowns
        with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
            for _ in range(3):
                out = fwd(params, x)
            jax.block_until_ready(out)
    return statistics.median(times), np.asarray(out[0, :2, :4], np.float32)


def torch_hf(cfg, frames: np.ndarray, steps: int) -> float:
    import torch
    import transformers

    hf_cfg = transformers.SiglipVisionConfig(
        hidden_size=cfg.width, intermediate_size=cfg.mlp_dim, num_hidden_layers=cfg.depth,
        num_attention_heads=cfg.num_heads, image_size=cfg.image_size,
        patch_size=cfg.patch_size, hidden_act=cfg.act, layer_norm_eps=cfg.ln_eps,
        vision_use_head=False, attn_implementation="sdpa")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = transformers.SiglipVisionModel(hf_cfg).to(device=device, dtype=torch.bfloat16).eval()
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous().to(device, torch.bfloat16)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    with torch.inference_mode():
        model(pixel_values=x)
        sync()
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            model(pixel_values=x)
            sync()
            times.append(time.perf_counter() - t)
    del model, x
    if device == "cuda":
        torch.cuda.empty_cache()
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--impls", default="cudnn,xla")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--skip_torch", action="store_true")
    p.add_argument("--profile_dir", default=None, help="write a trace of 3 of our calls here")
    p.add_argument("--no_xla_defaults", action="store_true",
                   help="leave XLA_FLAGS as given (default: add longvid_jax.xla_flags.DEFAULTS, "
                        "as the library's entry points do)")
    p.add_argument("--smoke", action="store_true")
    a = p.parse_args()
    if not a.no_xla_defaults:
        xla_flags.apply_defaults()  # before the first JAX computation
    if a.smoke:
        base = vit.make_config("tiny")
        batch, steps = 4, 1
    else:
        base = vit.make_config("so400m_14_384", dtype="bfloat16", param_dtype="bfloat16")
        batch, steps = a.batch, a.steps
    frames = np.random.default_rng(0).standard_normal(
        (batch, base.image_size, base.image_size, base.num_channels)).astype(np.float32)
    flops = tower_flops_per_frame(base)
    kind = jax.devices()[0].device_kind
    print(f"device: {kind}; jax {jax.__version__}; {'tiny' if a.smoke else 'so400m_14_384'} "
          f"{base.image_size} px, batch {batch}, {flops / 1e9:.1f} GFLOP per frame; "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    dt_t = None
    if not a.skip_torch:
        dt_t = torch_hf(base, frames, steps)
        print(f"torch: {dt_t * 1e3:.1f} ms, {batch / dt_t:,.0f} frames/s, "
              f"{flops * batch / dt_t / 1e12:.0f} TFLOP/s (SiglipVisionModel, bf16, SDPA)")
    for impl in a.impls.split(","):
        if impl == "cudnn" and jax.default_backend() != "gpu":
            continue  # cuDNN attention exists only on NVIDIA GPUs
        cfg = vit.make_config(**{**base.__dict__, "attention_impl": impl})
        dt, _ = ours(cfg, frames, steps, a.profile_dir)
        ratio = f", {dt_t / dt:.2f}x torch" if dt_t else ""
        print(f"ours {impl}: {dt * 1e3:.1f} ms, {batch / dt:,.0f} frames/s, "
              f"{flops * batch / dt / 1e12:.0f} TFLOP/s{ratio}")


if __name__ == "__main__":
    main()
