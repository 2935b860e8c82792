"""The faithful TDC composite (`longvid_jax/models/tdc.py`) on tiny sizes: each stage equals the
parts chained by hand, the unpad quirk sets the per-frame token count, and a video runs through
towers -> host scene split -> compressor -> LLM."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longvid_jax.models import connectors, scene_split, sva, tdc
from longvid_jax.models.video_llm import VIDEO_TOKEN_INDEX
from tests.helpers import random_params


@functools.cache
def _setup():
    cfg = tdc.make_config("tiny")
    model = tdc.TDCModel(cfg)
    shapes = jax.eval_shape(lambda k: tdc.init_params(model, k), jax.random.key(0))
    params = random_params(shapes, seed=1)
    return cfg, model, params


def _pixels(n, seed):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, 32, 32, 3)).astype(np.float32),
            rng.standard_normal((n, 32, 32, 3)).astype(np.float32))


def test_param_tree_and_config_checks():
    cfg, _, params = _setup()
    assert set(params) == {"siglip", "dinov2", "connector", "compressor", "llm", "beats"}
    assert cfg.frame_slots == 12 and cfg.final_grid == 3
    full = tdc.make_config("qwen2_7b")
    assert full.frame_slots == 156 and full.connector.tower_widths == (1152, 1536)
    with pytest.raises(ValueError, match="tower_widths"):
        tdc.make_config("tiny", siglip=dict(width=32))
    with pytest.raises(ValueError, match="beats"):
        tdc.make_config("tiny", beats=None)
    with pytest.raises(ValueError, match="unknown TDCConfig"):
        tdc.make_config("tiny", vision=None)


def test_encode_frames_equals_the_parts_chained():
    cfg, model, params = _setup()
    sig, dino = _pixels(3, seed=2)
    sizes = np.array([[32, 32]] * 3, np.int32)
    tokens, counts, aux = jax.jit(lambda p: model.apply(
        {"params": p}, sig, dino, sizes, method=tdc.TDCModel.encode_frames))(params)
    assert tokens.shape == (3, 12, 64) and np.all(np.asarray(counts) == 12)

    def by_hand(m):
        _, a = m.siglip(sig)
        s = connectors.pool_tokens_2d(a["encoder_output"], (4, 4), (6, 6), "bilinear")
        d = connectors.pool_tokens_2d(m.dinov2(dino)[0], (4, 4), (6, 6), "bilinear")
        t, grid, caux = m.connector([s, d], sizes)
        return sva.newline_layout(t, grid, caux["image_newline"])[0], s, d

    want, s, d = jax.jit(lambda p: model.apply({"params": p}, method=by_hand))(params)
    np.testing.assert_allclose(tokens, want, atol=1e-6, rtol=0)
    np.testing.assert_allclose(aux["dino_features"], d, atol=1e-6, rtol=0)
    np.testing.assert_allclose(aux["siglip_features"], s, atol=1e-6, rtol=0)


@pytest.mark.parametrize("swap", [True, False])
def test_unpad_quirk_sets_the_frame_token_count(swap):
    """A landscape frame (h 90, w 320 before expand2square): the original's (H, W) swap crops
    columns (3 rows x 1 column + newline = 6 tokens on the 3-grid); reading it right crops
    rows (1 row x 3 columns + newline = 4)."""
    cfg, model, params = _setup()
    model = tdc.TDCModel(dataclasses.replace(
        cfg, connector=dataclasses.replace(cfg.connector, swap_image_size_hw=swap)))
    sig, dino = _pixels(2, seed=3)
    sizes = np.array([[90, 320], [32, 32]], np.int32)
    tokens, counts, _ = jax.jit(lambda p: model.apply(
        {"params": p}, sig, dino, sizes, method=tdc.TDCModel.encode_frames))(params)
    assert np.asarray(counts).tolist() == ([6, 12] if swap else [4, 12])
    assert not np.asarray(tokens[0, counts[0]:]).any()


def test_video_through_scene_split_compressor_and_llm():
    cfg, model, params = _setup()
    f = 30  # > 25 frames: the scene split uses the DINOv2 similarities
    sig, dino = _pixels(f, seed=4)
    sizes = np.array([[90, 160]] * f, np.int32)
    tokens, counts, aux = jax.jit(lambda p: model.apply(
        {"params": p}, sig, dino, sizes, method=tdc.TDCModel.encode_frames))(params)
    layout = scene_split.scene_layout(np.asarray(aux["dino_features"]), max_num_segments=3)
    assert len(layout.selected_frame_indices) == f and len(layout.segment_boundaries) == 3
    starts = np.zeros((1, f), bool)
    starts[0, layout.split_points[:-1][layout.split_points[:-1] < f]] = True
    rng = np.random.default_rng(5)
    audio = rng.standard_normal((1, f, 5, 32)).astype(np.float32)
    ids = rng.integers(1, cfg.compressor.qformer.vocab_size, (1, 6)).astype(np.int32)
    count = int(counts[0])
    n_max = tdc.qformer.max_video_tokens(f, cfg.frame_slots, 5, cfg.compressor, 4)
    video, mask, caux = jax.jit(lambda p: model.apply(
        {"params": p}, tokens[None], counts[:1], np.ones((1, f), bool), segment_starts=starts,
        audio_tokens=audio, text_ids=ids, max_tokens=n_max,
        method=tdc.TDCModel.compress))(params)
    n = int(caux["num_tokens"][0])
    assert n == tdc.qformer.num_video_tokens(f, count, 5, cfg.compressor,
                                             segment_lengths=layout.segment_sizes.tolist())
    assert bool(mask[0, :n].all()) and not bool(mask[0, n:].any())
    prompt = np.concatenate([[3, 4], [VIDEO_TOKEN_INDEX] * n, [5, 6, 7]]).astype(np.int32)[None]
    pos = np.arange(prompt.shape[1], dtype=np.int32)[None]
    fbank = rng.standard_normal((2, 160, 128)).astype(np.float32)

    @jax.jit
    def run(p):
        def fwd(m):
            out = [m.logits(m(prompt, pos, None, v)[0]) for v in (video, video.at[0, 0].add(1.0))]
            return out, m.encode_audio(jnp.asarray(fbank))
        return model.apply({"params": p}, method=fwd)

    (logits, logits2), audio_tokens = run(params)
    assert logits.shape == (1, prompt.shape[1], cfg.llm.vocab_size)
    assert np.isfinite(np.asarray(logits)).all()
    # The video positions carry the compressed tokens (changing one moves the output there).
    assert np.abs(np.asarray(logits2[0, 2:]) - np.asarray(logits[0, 2:])).max() > 1e-4
    np.testing.assert_array_equal(np.asarray(logits2[0, :2]), np.asarray(logits[0, :2]))
    assert audio_tokens.shape[0] == 2 and audio_tokens.shape[-1] == 32


def _original_overflow(n, lens, static, max_visual):
    """TDC's rule as coded: chunks lose their last ceil(excess / chunks) tokens, then cut."""
    chunks, pos = [], 0
    for length, st in zip(lens, static):
        if st:
            chunks.append([])
        chunks[-1].extend(range(pos, pos + length))
        pos += length
    assert pos == n
    if n > max_visual:
        force = -(-(n - max_visual) // len(chunks))
        chunks = [ch[:-force] for ch in chunks]
    return np.array(sum(chunks, []), np.int64)[:max_visual]


def test_forward_batch_splits_in_graph_as_the_host_path():
    """`forward_batch` (in-graph scene split, reserved video slots compacted, overflow trimmed
    per chunk) gives the hidden states of the host path (`scene_layout`, the original's trim
    rule, exact placeholder count) for two videos of different lengths, with room for every
    video token (max_context 8192) and with 119 left (140), and gradients reach the
    compressor and LLM but not the towers."""
    cfg0, _, params = _setup()
    cfg0 = dataclasses.replace(cfg0, max_num_segments=3)
    f, valid = 30, (30, 20)
    rng = np.random.default_rng(7)
    sig = rng.standard_normal((2, f, 32, 32, 3)).astype(np.float32)
    dino = rng.standard_normal((2, f, 32, 32, 3)).astype(np.float32)
    audio = rng.standard_normal((2, f, 5, 32)).astype(np.float32)
    qids = rng.integers(1, cfg0.compressor.qformer.vocab_size, (2, 6)).astype(np.int32)
    sizes = np.array([[90, 160], [160, 90]], np.int32)
    n_max = tdc.qformer.max_video_tokens(f, cfg0.frame_slots, 5, cfg0.compressor, 3)
    head, tail = [3, 4], [5, 6, 7]
    t = len(head) + n_max + len(tail) + 4
    ids = np.zeros((2, t), np.int32)
    ids[:, :2], ids[:, 2:2 + n_max], ids[:, 2 + n_max:5 + n_max] = head, VIDEO_TOKEN_INDEX, tail
    seg = np.zeros((2, t), np.int32)
    seg[:, :5 + n_max] = 1
    loss_mask = np.zeros((2, t), bool)
    loss_mask[:, 3 + n_max:5 + n_max] = True
    batch = {"frames": sig, "dino_frames": dino,
             "frame_mask": np.arange(f)[None] < np.array(valid)[:, None], "image_sizes": sizes,
             "audio_tokens": audio, "qformer_text_ids": qids, "input_ids": ids,
             "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (2, t)),
             "segment_ids": seg, "loss_mask": loss_mask}

    # The host path of each row (independent of max_context): split, compress.
    host = []
    model0 = tdc.TDCModel(cfg0)
    for r in range(2):
        n_f = valid[r]
        tokens, counts, eaux = jax.jit(lambda p, *x: model0.apply(
            {"params": p}, *x, method=tdc.TDCModel.encode_frames))(
                params, sig[r, :n_f], dino[r, :n_f], np.repeat(sizes[r:r + 1], n_f, 0))
        layout = scene_split.scene_layout(np.asarray(eaux["dino_features"]), max_num_segments=3)
        starts = np.zeros((1, n_f), bool)
        starts[0, layout.split_points[:-1][layout.split_points[:-1] < n_f]] = True
        video, vmask, caux = jax.jit(lambda p, s, a, q: model0.apply(
            {"params": p}, tokens[None], counts[:1], np.ones((1, n_f), bool),
            segment_starts=s, audio_tokens=a, text_ids=q, max_tokens=n_max,
            method=tdc.TDCModel.compress))(params, starts, audio[r:r + 1, :n_f],
                                           qids[r:r + 1])
        host.append((starts, video, vmask, caux))

    for max_context in (8192, 140):
        model = tdc.TDCModel(dataclasses.replace(cfg0, max_context=max_context))
        hidden, aux = jax.jit(lambda p: model.apply({"params": p}, batch,
                                                    method=tdc.TDCModel.forward_batch))(params)
        for r, (starts, video, vmask, caux) in enumerate(host):
            np.testing.assert_array_equal(np.asarray(aux["segment_starts"][r, :valid[r]]),
                                          starts[0])
            kept = _original_overflow(int(vmask.sum()),
                                      np.asarray(caux["frame_token_lengths"][0]),
                                      np.asarray(caux["is_static"][0]), max_context - 16 - 5)
            n = len(kept)
            assert int(aux["num_video_tokens"][r]) == n
            assert (n < int(vmask.sum())) == (max_context < 8192)
            prompt = np.array([head + [VIDEO_TOKEN_INDEX] * n + tail], np.int32)
            length = prompt.shape[1]
            ref, _ = jax.jit(lambda p, v: model.apply({"params": p}, prompt,
                                                      np.arange(length)[None], None, v))(
                params, video[:, kept])
            compact = aux["batch"]
            np.testing.assert_array_equal(np.asarray(compact["input_ids"][r, :length]),
                                          prompt[0])
            np.testing.assert_array_equal(np.asarray(compact["positions"][r, :length]),
                                          np.arange(length))
            assert not bool(compact["segment_ids"][r, length:].any())
            assert np.asarray(compact["loss_mask"][r]).nonzero()[0].tolist() == [length - 2,
                                                                                length - 1]
            np.testing.assert_allclose(np.asarray(hidden[r, :length]), np.asarray(ref[0]),
                                       atol=2e-4, rtol=2e-4)
        assert int(aux["num_video_tokens"][0]) != int(aux["num_video_tokens"][1])

    def loss(p):  # with the trim (the last max_context)
        h, _ = model.apply({"params": p}, batch, method=tdc.TDCModel.forward_batch)
        return jnp.mean(h.astype(jnp.float32) ** 2)

    norms = jax.jit(lambda p: {k: sum(jnp.abs(x).sum() for x in jax.tree.leaves(v))
                               for k, v in jax.grad(loss)(p).items()})(params)
    assert norms["siglip"] == 0 and norms["dinov2"] == 0
    assert norms["compressor"] > 0 and norms["llm"] > 0 and norms["connector"] > 0
