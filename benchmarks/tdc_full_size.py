"""TDC-Qwen2-7B at full size on one GPU, random weights: each inference stage's time and memory.

    python benchmarks/tdc_full_size.py [--variant=qwen2_7b] [--frames=215] [--seconds=224]
        [--text=64] [--encode_chunk=16] [--smoke]

The stages of `longvid_jax.tdc_infer.TDCPredictor` after decoding, on random pixels, fbank and
text (nothing here is a released weight): the towers + SVA connector over `--frames` frames in
chunks, the host scene split on the DINOv2 features, BEATs over the `--seconds` of audio in 10 s
windows with each frame's audio pooled (`TDCModel.frame_audio`), the compressor with the
question in BERT ids, the overflow trim to the 8192-token context, and the LLM prefill of the
prompt with the video tokens spliced in. Each stage runs once to compile and once timed (the
encode time is one chunk's times the number of chunks; the frames of the other chunks are the
first chunk's features with noise added, so the scene split still sees distinct frames); the
peak device memory is reported. bf16 weights and compute. `--smoke` runs the tiny variant on CPU.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from longvid_jax.input import fbank
from longvid_jax.models import qformer, scene_split, tdc
from longvid_jax.models.video_llm import VIDEO_TOKEN_INDEX


def timed(fn, *args):
    """(result, seconds) of the second of two calls (the first compiles)."""
    jax.block_until_ready(fn(*args))
    t = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - t


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--variant", default="qwen2_7b")
    p.add_argument("--frames", type=int, default=215, help="kept frames (1 fps)")
    p.add_argument("--seconds", type=int, default=224, help="video and audio length")
    p.add_argument("--text", type=int, default=64, help="prompt text tokens")
    p.add_argument("--encode_chunk", type=int, default=16)
    p.add_argument("--smoke", action="store_true")
    a = p.parse_args()
    if a.smoke:
        a.variant, a.frames, a.seconds, a.text, a.encode_chunk = "tiny", 12, 23, 8, 4
    cfg = tdc.make_config(a.variant, dtype="bfloat16", param_dtype="bfloat16",
                          llm=dict(attention_impl="auto"))  # cuDNN flash attention on GPU
    model = tdc.TDCModel(cfg)
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind}; jax {jax.__version__}; TDC {a.variant}, {a.frames} "
          f"frames of a {a.seconds} s video, {a.text} text tokens")
    t = time.perf_counter()
    params = jax.block_until_ready(jax.jit(lambda k: tdc.init_params(model, k))(
        jax.random.key(0)))
    n_params = sum(x.size for x in jax.tree.leaves(params))
    print(f"init: {n_params / 1e6:,.1f}M parameters in {time.perf_counter() - t:.1f} s")
    rng = np.random.default_rng(0)
    times = {}

    # Towers + connector, a chunk of frames at a time (TDCPredictor's encode).
    s1, s2 = cfg.siglip.image_size, cfg.dinov2.patch_size * cfg.siglip.grid
    step = a.encode_chunk
    encode = jax.jit(lambda p, x, y: model.apply({"params": p}, x, y,
                                                 method=tdc.TDCModel.encode_frames))
    sig = jnp.asarray(rng.standard_normal((step, s1, s1, 3)), jnp.bfloat16)
    dino = jnp.asarray(rng.standard_normal((step, s2, s2, 3)), jnp.bfloat16)
    (tok, counts, aux), dt = timed(encode, params, sig, dino)
    chunks = -(-a.frames // step)
    times["encode"] = dt * chunks
    tokens = jnp.tile(tok, (chunks, 1, 1))[:a.frames][None]
    feats = np.tile(np.asarray(aux["dino_features"], np.float32), (chunks, 1, 1))[:a.frames]
    feats += rng.standard_normal(feats.shape).astype(np.float32)  # distinct frames

    t = time.perf_counter()
    layout = scene_split.scene_layout(feats)
    sel = layout.selected_frame_indices
    starts = np.zeros((1, len(sel)), bool)
    starts[0, layout.split_points[:-1][layout.split_points[:-1] < len(sel)]] = True
    tokens = tokens[:, sel]
    times["split"] = time.perf_counter() - t

    # Audio: the track's 10 s windows through BEATs, each frame's seconds pooled.
    windows = -(-a.seconds // 10)
    rows = fbank.num_fbank_frames(160000)
    fb = jnp.asarray(rng.standard_normal((1, windows, rows, 128)), jnp.float32)
    frames = np.full((1, windows), rows, np.int32)
    per_window = cfg.beats.num_tokens(rows)
    st, ct = fbank.tdc_second_tokens(frames[0] // cfg.beats.patch_size * cfg.beats.mel_patches,
                                     per_window, a.seconds)
    kept = (np.arange(len(sel)) * (a.seconds / len(sel))).astype(np.int64)
    fs, fc = fbank.tdc_frame_seconds(kept, ct)
    frame_audio = jax.jit(lambda p, *x: model.apply({"params": p}, *x,
                                                    method=tdc.TDCModel.frame_audio))
    audio, times["audio"] = timed(frame_audio, params, fb, frames, st[None], ct[None],
                                  fs[None], fc[None])

    # Compressor (the question in BERT ids), then the overflow trim to the context.
    ids = jnp.asarray(rng.integers(1, cfg.compressor.qformer.vocab_size, (1, 24)), jnp.int32)
    n_max = qformer.max_video_tokens(len(sel), cfg.frame_slots, audio.shape[2], cfg.compressor,
                                     max_segments=len(layout.segment_sizes))
    compress = jax.jit(lambda p, t, c, s, au, i: model.apply(
        {"params": p}, t, c, jnp.ones((1, len(sel)), bool), segment_starts=s, audio_tokens=au,
        text_ids=i, max_tokens=n_max, method=tdc.TDCModel.compress))
    (video, vmask, caux), times["compress"] = timed(compress, params, tokens, counts[:1],
                                                    starts, audio, ids)
    budget = cfg.max_context - tdc.INFERENCE_MAX_LENGTH - a.text
    keep = np.nonzero(np.asarray(tdc.overflow_keep(
        vmask, caux["token_frame"], caux["frame_token_lengths"], caux["is_static"],
        jnp.asarray([budget], jnp.int32)))[0])[0]
    video = video[:, keep]
    nv = len(keep)

    # LLM prefill of the prompt (text around the video tokens).
    head = a.text // 2
    prompt = np.asarray(rng.integers(1, cfg.llm.vocab_size, (1, a.text + nv)), np.int32)
    prompt[0, head:head + nv] = VIDEO_TOKEN_INDEX
    pos = np.arange(prompt.shape[1], dtype=np.int32)[None]
    prefill = jax.jit(lambda p, ids, v: model.apply(
        {"params": p}, method=lambda m: m.logits(m(ids, pos, None, v)[0][:, -1:])))
    logits, times["prefill"] = timed(prefill, params, prompt, video)
    assert np.isfinite(np.asarray(logits, np.float32)).all()

    stats = dev.memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    print(f"{len(sel)} frames, {len(layout.segment_sizes)} segments, "
          f"{int(caux['num_tokens'][0])} video tokens -> {nv} after the overflow trim; "
          f"prompt {prompt.shape[1]} tokens")
    print("seconds per stage: " + ", ".join(f"{k} {v:.3f}" for k, v in times.items())
          + f"; total {sum(times.values()):.3f}")
    if peak:
        print(f"peak device memory {peak / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
