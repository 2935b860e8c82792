"""Decoding speed with a KV cache, ours vs `transformers` `generate`, same GPU, same run (issue 5).

    python benchmarks/decode.py [--variant=qwen2_7b] [--prefix=8192] [--new_tokens=128]
        [--decode_attention=auto|xla|pallas_gpu] [--scan] [--skip_torch] [--profile_dir=DIR]
        [--smoke]

A Qwen2-7B-shaped LLM with random bf16 weights at batch 1: an `--prefix`-token random prompt is
prefilled, then `--new_tokens` tokens are generated greedily.

  ours:  `generate.make_step_fns` (jitted prefill, then one jitted decode step per token with the
         cache donated). Timed twice: "device loop" feeds each step the previous step's token
         on the device with no host transfer until the end; "streamed" is `generate.generate`,
         which brings every token to the host as it comes (what the CLI does).
  torch: HF `Qwen2ForCausalLM` (bf16 weights, SDPA attention, DynamicCache) `generate` with
         `do_sample=False`, `min_new_tokens = max_new_tokens`; its prefill is timed by a
         `max_new_tokens=1` call and subtracted.

Decode tokens/s counts the tokens after the first (the first comes from the prefill). Reading
the bf16 weights once per token bounds the rate at bandwidth / weight bytes (H100 SXM 3.35 TB/s
/ 15.2 GB ~ 220 tokens/s). `--smoke` runs a tiny model on CPU.
"""

import argparse
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from longvid_jax import generate as gen
from longvid_jax.models import decoder


def ours(cfg, prefix, new_tokens, repeats=3, profile_dir=None):
    """(prefill seconds, device-loop decode tokens/s, streamed decode tokens/s, first tokens)."""
    model = decoder.Decoder(cfg)

    def init(key):
        embeds = jnp.zeros((1, 8, cfg.hidden_size), cfg.compute_dtype)
        pos = jnp.arange(8, dtype=jnp.int32)[None]
        return model.init(key, embeds, pos)["params"]

    params = nn.unbox(jax.jit(init)(jax.random.key(0)))
    n_params = sum(x.size for x in jax.tree.leaves(params))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (1, prefix)),
                      jnp.int32)
    embeds = gen.embed_tokens(params, cfg, ids)
    lengths = jnp.full((1,), prefix, jnp.int32)
    prefill, step = gen.make_step_fns(cfg)
    key = jax.random.key(0)
    max_len = prefix + new_tokens + 8

    def run_prefill():
        cache = decoder.init_cache(cfg, 1, max_len)
        jax.block_until_ready(cache)
        t = time.perf_counter()
        tok, cache = prefill(params, embeds, lengths, cache, key)
        jax.block_until_ready((tok, cache))
        return time.perf_counter() - t, tok, cache

    run_prefill()  # compile
    prefill_s = statistics.median(run_prefill()[0] for _ in range(repeats))

    # Device loop: no host transfer between steps.
    _, tok, cache = run_prefill()
    tok, cache = step(params, tok, cache, key)  # compile
    jax.block_until_ready(tok)
    rates = []
    for _ in range(repeats):
        _, tok, cache = run_prefill()
        out = [tok]
        t = time.perf_counter()
        for _ in range(new_tokens - 1):
            tok, cache = step(params, tok, cache, key)
            out.append(tok)
        jax.block_until_ready(tok)
        rates.append((new_tokens - 1) / (time.perf_counter() - t))
    first = np.asarray(jnp.concatenate(out))[:8].tolist()
    if profile_dir:  # a trace of 8 decode steps and the optimised HLO of one
        import os

        os.makedirs(profile_dir, exist_ok=True)
        with open(os.path.join(profile_dir, "decode_step_hlo.txt"), "w") as f:
            f.write(step.lower(params, tok, cache, key).compile().as_text())
        with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
            for _ in range(8):
                tok, cache = step(params, tok, cache, key)
            jax.block_until_ready(tok)

    # Streamed: every token brought to the host.
    res = gen.generate(params, cfg, prompt_embeds=embeds, max_new_tokens=new_tokens,
                       max_len=max_len)
    streamed = res.decode_tokens_per_s
    params = cache = None
    return prefill_s, statistics.median(rates), streamed, first, n_params


def torch_hf(cfg, prefix, new_tokens, repeats=3):
    """(prefill seconds, decode tokens/s, first tokens) of HF `generate`."""
    import torch
    import transformers

    hf_cfg = transformers.Qwen2Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.mlp_dim,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, rope_theta=cfg.rope_theta,
        rms_norm_eps=cfg.rms_eps, tie_word_embeddings=cfg.tie_embeddings,
        max_position_embeddings=max(prefix + new_tokens, 32768), attn_implementation="sdpa")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = transformers.Qwen2ForCausalLM(hf_cfg).eval()
    torch.set_default_dtype(old)
    ids = torch.from_numpy(
        np.random.default_rng(0).integers(0, cfg.vocab_size, (1, prefix))).to(device)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def timed(n):
        sync()
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                 min_new_tokens=n, do_sample=False, pad_token_id=0)
        sync()
        return time.perf_counter() - t, out

    timed(4)  # warm up
    prefill_s = statistics.median(timed(1)[0] for _ in range(repeats))
    totals = []
    for _ in range(repeats):
        dt, out = timed(new_tokens)
        totals.append(dt)
    total = statistics.median(totals)
    first = out[0, prefix:prefix + 8].tolist()
    model = ids = None
    if device == "cuda":
        torch.cuda.empty_cache()
    return prefill_s, (new_tokens - 1) / (total - prefill_s), total, first


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--variant", default="qwen2_7b")
    p.add_argument("--prefix", type=int, default=8192)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--attention", default="auto", help="prefill attention implementation")
    p.add_argument("--decode_attention", default="auto",
                   help="decode attention over the cache: auto, xla or pallas_gpu")
    p.add_argument("--scan", action="store_true",
                   help="layers under nn.scan (default unrolled: XLA then reads each layer's "
                        "weights in place; the scanned loop decodes ~2x slower on an H100)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip_torch", action="store_true")
    p.add_argument("--profile_dir", default=None, help="write a trace of 8 decode steps here")
    p.add_argument("--smoke", action="store_true")
    a = p.parse_args()
    if a.smoke:
        cfg = decoder.make_config("tiny", scan_layers=a.scan)
        prefix, new_tokens, repeats = 32, 8, 1
    else:
        cfg = decoder.make_config(a.variant, dtype="bfloat16", param_dtype="bfloat16",
                                  scan_layers=a.scan, attention_impl=a.attention,
                                  decode_attention_impl=a.decode_attention,
                                  packed_sequences=False)
        prefix, new_tokens, repeats = a.prefix, a.new_tokens, a.repeats
    kind = jax.devices()[0].device_kind
    print(f"device: {kind}; jax {jax.__version__}; {'tiny' if a.smoke else a.variant} "
          f"batch 1, prefix {prefix} tokens, {new_tokens} new tokens (greedy); ours: "
          f"scan={cfg.scan_layers}, prefill attention={cfg.attention_impl}, decode attention="
          f"{cfg.decode_attention_impl}, weights "
          f"{cfg.param_dtype}")
    # PyTorch runs first and returns its cached memory before JAX allocates (both share the GPU).
    hf = None
    if not a.skip_torch:
        hf = torch_hf(cfg, prefix, new_tokens, repeats)
    pre, loop_rate, streamed, first, n_params = ours(cfg, prefix, new_tokens, repeats,
                                                     a.profile_dir)
    weight_gb = n_params * jnp.dtype(cfg.param_dtype).itemsize / 1e9
    print(f"ours:  prefill {pre * 1e3:.1f} ms; decode {loop_rate:.1f} tokens/s (device loop), "
          f"{streamed:.1f} tokens/s (streamed to host); {n_params / 1e9:.2f}B params, "
          f"{weight_gb:.1f} GB weights; first tokens {first}")
    if hf is not None:
        pre_t, rate_t, total_t, first_t = hf
        print(f"torch: prefill {pre_t * 1e3:.1f} ms; decode {rate_t:.1f} tokens/s; generate "
              f"total {total_t:.2f} s = {new_tokens / total_t:.1f} tokens/s end to end (HF "
              f"Qwen2ForCausalLM.generate, SDPA, bf16 on GPU); first tokens {first_t}")
        print(f"ratio ours / torch decode tokens/s: {loop_rate / rate_t:.2f}x (device loop), "
              f"{streamed / rate_t:.2f}x (streamed)")


if __name__ == "__main__":
    main()
