"""LLM training step, ours vs `transformers` PyTorch, same GPU, same run (issue 4, benchmark 1).

    python benchmarks/llm_train_step.py [--variant=qwen2_0_5b] [--seq=8192] [--batch=1]
        [--attention=cudnn] [--remat=dots] [--loss_chunk=0] [--logits_dtype=float32]
        [--unfused_qkv] [--loss_impl=auto] [--steps=10] [--skip_torch] [--no_xla_defaults] [--smoke]

One full AdamW step on random tokens (next-token loss over every position) for a Qwen2-0.5B-shaped
model: ours (longvid_jax Decoder, bf16 compute, float32 master weights, nn.scan over layers,
remat policy, the chosen attention) and HF `Qwen2ForCausalLM` (bf16 weights, SDPA attention,
gradient checkpointing, fused AdamW). Reports tokens/s, MFU and their ratio.

MFU = model FLOPs / (time * peak): 6 * parameters per token (the tied embedding counted once, as
the LM head) plus causal attention 6 * layers * heads * head_dim * T per token; the peak is the
GPU's dense bf16 rate (H100 SXM 989 TFLOP/s, H200 the same). `--smoke` runs a tiny model on CPU.
XLA_FLAGS gets the trainer's defaults (`longvid_jax.xla_flags`: matmuls on cuBLAS) unless
`--no_xla_defaults`.
"""

import argparse
import functools
import os
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from longvid_jax import losses, xla_flags
from longvid_jax.models import decoder

PEAK_BF16 = {"H100": 989e12, "H200": 989e12}


def model_flops_per_token(cfg: decoder.DecoderConfig, n_params: int, seq: int) -> float:
    attn = 6 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq
    return 6 * n_params + attn


def cast_matrices(params, dtype):
    """Weights with two or more axes in `dtype` (cast once per step, before the layer scan);
    norm scales and biases stay float32. Gradients flow back to the float32 masters."""
    return jax.tree.map(lambda x: x.astype(dtype) if x.ndim >= 2 else x, params)


def ours(cfg, batch, seq, steps, loss_chunk=0, profile_dir=None, cast_params=False,
         context=1, logits_dtype="float32", loss_impl="auto"):
    """Median step time, parameter count and final loss of our training step.

    `context > 1` spreads each sequence over that many devices (mesh ("data", "context"),
    rules act_len -> context) and the decoder runs ring attention between them."""
    if context > 1:
        mesh = jax.make_mesh((1, context), ("data", "context"),
                             axis_types=(jax.sharding.AxisType.Auto,) * 2)
        rules = (("act_batch", "data"), ("act_len", "context"))
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            return _ours(cfg, batch, seq, steps, loss_chunk, profile_dir, cast_params, mesh,
                         logits_dtype, loss_impl)
    return _ours(cfg, batch, seq, steps, loss_chunk, profile_dir, cast_params, None,
                 logits_dtype, loss_impl)


def _ours(cfg, batch, seq, steps, loss_chunk, profile_dir, cast_params, mesh, logits_dtype,
          loss_impl):
    model = decoder.Decoder(cfg)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, seq + 1)), jnp.int32)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))

    def init(key):
        embeds = jnp.zeros((batch, 8, cfg.hidden_size), cfg.compute_dtype)
        pos = jnp.broadcast_to(jnp.arange(8, dtype=jnp.int32), (batch, 8))
        return model.init(key, embeds, pos)["params"]

    params = nn.unbox(jax.jit(init)(jax.random.key(0)))
    if mesh is not None:  # weights replicated, tokens split along the sequence
        params = jax.device_put(params, jax.sharding.NamedSharding(mesh, P()))
        inputs, targets, positions = (
            jax.device_put(x, jax.sharding.NamedSharding(mesh, P(None, "context")))
            for x in (inputs, targets, positions))
    tx = optax.adamw(1e-5)
    opt_state = tx.init(params)
    n_params = sum(x.size for x in jax.tree.leaves(params))

    weights = jnp.ones(targets.shape, jnp.float32)
    if mesh is not None:
        weights = jax.device_put(weights, targets.sharding)

    def loss_fn(p):
        if cast_params:
            p = cast_matrices(p, cfg.compute_dtype)
        if loss_chunk:
            def fwd(m):
                hidden, _ = m(m.embed(inputs), positions)
                return hidden, m.head_weight()
            hidden, head = model.apply({"params": p}, method=fwd)
            nll, count = losses.chunked_lm_loss(hidden, head, targets, weights,
                                                chunk_size=loss_chunk, dtype=cfg.compute_dtype,
                                                logits_dtype=logits_dtype, impl=loss_impl)
        else:
            def fwd(m):
                hidden, _ = m(m.embed(inputs), positions)
                return m.logits(hidden)
            nll, count = losses.lm_loss(model.apply({"params": p}, method=fwd), targets, weights)
        return nll / count

    @functools.partial(jax.jit, donate_argnums=(0, 1))  # as the trainer: state updated in place
    def step(p, s):
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    state = [params, opt_state, None]

    def run_step():
        state[0], state[1], state[2] = step(state[0], state[1])
        return state[2]

    timing = time_steps(run_step, jax.block_until_ready, steps)
    params, opt_state, loss = state
    if profile_dir:  # a trace of 3 steps (Perfetto JSON + XPlane) for kernel-level breakdowns
        with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
            for _ in range(3):
                params, opt_state, loss = step(params, opt_state)
            jax.block_until_ready(loss)
    return timing, n_params, float(loss)


def torch_hf(cfg, batch, seq, steps, checkpointing=True):
    # PyTorch's best allocator setting for large steps: without it batch 8 x 8K with gradient
    # checkpointing failed on an H200 with 37 GB reserved but unallocated (fragmentation).
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    import torch
    import transformers

    hf_cfg = transformers.Qwen2Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.mlp_dim,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, rope_theta=cfg.rope_theta,
        rms_norm_eps=cfg.rms_eps, tie_word_embeddings=cfg.tie_embeddings,
        max_position_embeddings=max(seq, 32768), attn_implementation="sdpa")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = transformers.Qwen2ForCausalLM(hf_cfg).to(device=device, dtype=torch.bfloat16)
    if checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device == "cuda")
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)

    def step():
        out = model(input_ids=tokens, labels=tokens)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss

    def sync(x):
        if device == "cuda":
            torch.cuda.synchronize()
        return x

    timing = time_steps(step, sync, steps)
    loss = step()
    loss = float(loss.detach())
    model = opt = tokens = None  # free the GPU memory before JAX runs
    if device == "cuda":
        torch.cuda.empty_cache()
    return timing, loss


def time_steps(step, sync, steps: int) -> dict[str, float]:
    """Seconds per step of `step()` (returns something `sync` waits for) after one warm-up.

    "pipelined": `steps` steps dispatched back to back, one wait at the end, divided by
    `steps` -- the throughput of a training loop, which dispatches step n+1 while step n runs
    (both stacks queue GPU work asynchronously). "synced": the median of `steps` steps each
    waited for, which adds the host's dispatch latency to every step. With one step the two
    coincide and the step runs once."""
    sync(step())
    t = time.perf_counter()
    for _ in range(steps):
        out = step()
    sync(out)
    pipelined = (time.perf_counter() - t) / steps
    if steps == 1:
        return {"pipelined": pipelined, "synced": pipelined}
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        sync(step())
        times.append(time.perf_counter() - t)
    return {"pipelined": pipelined, "synced": statistics.median(times)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--variant", default="qwen2_0_5b")
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--attention", default="cudnn")
    p.add_argument("--remat", default="dots")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--loss_chunk", type=int, default=0, help="tokens per logits chunk; 0: all")
    p.add_argument("--skip_torch", action="store_true")
    p.add_argument("--torch_no_checkpointing", action="store_true",
                   help="PyTorch without gradient checkpointing (the issue's stack uses it)")
    p.add_argument("--profile_dir", default=None, help="write a trace of 3 of our steps here")
    p.add_argument("--cast_params", action="store_true",
                   help="cast weight matrices to bf16 once per step (not inside each layer)")
    p.add_argument("--no_scan", action="store_true", help="unrolled layers instead of nn.scan")
    p.add_argument("--unfused_qkv", action="store_true",
                   help="three q / k / v matmuls instead of one (DecoderConfig.fused_projections)")
    p.add_argument("--logits_dtype", default="float32",
                   help="dtype of the chunked loss's logits (bfloat16: as transformers in bf16)")
    p.add_argument("--no_xla_defaults", action="store_true",
                   help="leave XLA_FLAGS as given (default: add longvid_jax.xla_flags.DEFAULTS, "
                        "as the trainer does)")
    p.add_argument("--loss_impl", default="auto", choices=losses.LOSS_IMPLS,
                   help="softmax passes of the chunked loss (auto: Pallas kernels on one GPU)")
    p.add_argument("--smoke", action="store_true")
    a = p.parse_args()
    if not a.no_xla_defaults:
        xla_flags.apply_defaults()  # before the first JAX computation
    if a.smoke:
        cfg = decoder.make_config("tiny", scan_layers=True, remat_policy=a.remat)
        seq, steps = 64, 1
    else:
        cfg = decoder.make_config(a.variant, dtype="bfloat16", param_dtype="float32",
                                  scan_layers=not a.no_scan, remat_policy=a.remat,
                                  attention_impl=a.attention,
                                  fused_projections=not a.unfused_qkv)
        seq, steps = a.seq, a.steps
    kind = jax.devices()[0].device_kind
    peak = next((v for k, v in PEAK_BF16.items() if k in kind), None)
    print(f"device: {kind}; jax {jax.__version__}; {a.variant if not a.smoke else 'tiny'} "
          f"batch {a.batch} x {seq} tokens; ours: attention={cfg.attention_impl}, "
          f"remat={cfg.remat_policy}, scan={cfg.scan_layers}, loss_chunk={a.loss_chunk}, "
          f"cast_params={a.cast_params}, fused_qkv={cfg.fused_projections}, "
          f"logits_dtype={a.logits_dtype}, loss_impl={a.loss_impl}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    # PyTorch runs first and returns its cached memory before JAX allocates (both share the GPU).
    dt_t = None
    if not a.skip_torch:
        dt_t, loss_t = torch_hf(cfg, a.batch, seq, steps, not a.torch_no_checkpointing)
    timing, n_params, loss = ours(cfg, a.batch, seq, steps, 16 if a.smoke else a.loss_chunk,
                                  a.profile_dir, a.cast_params, logits_dtype=a.logits_dtype,
                                  loss_impl=a.loss_impl)
    tokens = a.batch * seq
    flops = model_flops_per_token(cfg, n_params, seq) * tokens

    def report(name, t, note):
        dt = t["pipelined"]
        mfu = f", MFU {flops / dt / peak:.1%}" if peak else ""
        print(f"{name}: {dt * 1e3:.1f} ms/step, {tokens / dt:,.0f} tokens/s{mfu} "
              f"(each step waited for: {t['synced'] * 1e3:.1f} ms; {note})")

    report("ours ", timing, f"{n_params / 1e6:.1f}M params, loss {loss:.3f}")
    if dt_t is not None:
        ckpt = "no checkpointing" if a.torch_no_checkpointing else "gradient checkpointing"
        report("torch", dt_t, f"HF Qwen2ForCausalLM, bf16, SDPA, {ckpt}; loss {loss_t:.3f}")
        print(f"ratio ours / torch tokens/s: {dt_t['pipelined'] / timing['pipelined']:.2f}x "
              f"(steps each waited for: {dt_t['synced'] / timing['synced']:.2f}x)")

if __name__ == "__main__":
    main()
