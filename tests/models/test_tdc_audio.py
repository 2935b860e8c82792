"""TDC's per-frame audio (`models.tdc.tdc_frame_audio`, `TDCModel.frame_audio`, the host
ranges of `input.fbank`) against the original's loop, and rows without audio in the
compressor."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F

from longvid_jax.input import fbank
from longvid_jax.models import beats, tdc
from tests.helpers import random_params


def _original_frame_audio(window_tokens, sample_indices):
    """The BEATs branch of TDC's `prepare_inputs_labels_for_multimodal`, transcribed with torch:
    windows in order (window w covers seconds 10 w ..), each second's 50-token slice (a short
    one pooled up to 50 by `adaptive_avg_pool2d`), a kept second (1) closes the previous group
    and opens its own, a skipped one (0) joins it, each group pooled to 50; the missing frames'
    audio is padded with zeros. window_tokens: float[n_w, E] per window; returns [F, 50, E]."""
    e = window_tokens[0].shape[1]
    embeds, group = [], []
    for w, toks in enumerate(window_tokens):
        x = torch.from_numpy(np.array(toks, np.float32))[None]
        marks = list(sample_indices[10 * w:10 * w + 10])
        for idx, mark in enumerate(marks):
            token = x[:, idx * 50:(idx + 1) * 50, :]
            if token.shape[1] == 0:
                continue
            if token.shape[1] != 50:
                token = F.adaptive_avg_pool2d(token, (50, e))
            if mark == 1:
                if group:
                    embeds.append(F.adaptive_avg_pool2d(torch.cat(group, dim=1), (50, e)))
                    group = []
                group.append(token)
                if idx + 1 < len(marks) and marks[idx + 1] == 1:
                    embeds.append(token)
                    group = []
            else:
                group.append(token)
    if group:
        embeds.append(F.adaptive_avg_pool2d(torch.cat(group, dim=1), (50, e)))
    out = torch.cat(embeds).numpy()
    frames = int(np.sum(sample_indices))
    return np.concatenate([out, np.zeros((frames - len(out), 50, e), np.float32)])[:frames]


def _ranges(window_counts, per_window, seconds, kept, num_seconds):
    start, count = np.zeros((2, num_seconds), np.int32)
    st, ct = fbank.tdc_second_tokens(np.asarray(window_counts), per_window, seconds)
    start[:seconds], count[:seconds] = st, ct
    return (start, count) + fbank.tdc_frame_seconds(np.asarray(kept), count)


def test_frame_audio_equals_the_original_loop():
    """Two rows batched, random BEATs-like tokens (a large common offset, as real features
    have). Row 0: 23.5 s of audio (windows of 496, 496 and 168 tokens) under a 26 s video,
    kept seconds with consecutive kept ones, skips across a window boundary, a kept last second
    of a window (46 tokens, pooled up to 50) and frames past the audio (zeros). Row 1: one
    window under an 8 s video (the audio past the video is not used). Padding frames and
    windows."""
    rng = np.random.default_rng(11)
    e, per_window, windows, seconds_max, f_max = 6, 496, 3, 30, 12
    rows = [([496, 496, 168], 26, [0, 1, 4, 5, 9, 10, 13, 19, 21, 23, 25]),
            ([496], 8, [0, 3, 7])]
    tokens = np.zeros((2, windows * per_window, e), np.float32)
    valid = np.zeros((2, windows * per_window), bool)
    ranges = np.zeros((4, 2, seconds_max), np.int32)
    frame_ranges = np.zeros((2, 2, f_max), np.int32)
    want = np.zeros((2, f_max, 50, e), np.float32)
    offset = rng.standard_normal(e) * 40
    for b, (counts, seconds, kept) in enumerate(rows):
        per = [(rng.standard_normal((n, e)) * 3 + offset).astype(np.float32) for n in counts]
        for w, x in enumerate(per):
            tokens[b, w * per_window:w * per_window + len(x)] = x
            valid[b, w * per_window:w * per_window + len(x)] = True
        marks = np.zeros(seconds, np.int64)
        marks[kept] = 1
        want[b, :len(kept)] = _original_frame_audio(per, marks)
        st, ct, fs, fc = _ranges(counts, per_window, seconds, kept, seconds_max)
        ranges[0, b], ranges[1, b] = st, ct
        frame_ranges[0, b, :len(kept)], frame_ranges[1, b, :len(kept)] = fs, fc
    assert ranges[1, 0, 19] == 46 and ranges[1, 0, 23] == 18 and ranges[1, 0, 24] == 0
    assert frame_ranges[1, 0, 10] == 0  # second 25: past the audio
    got = jax.jit(tdc.tdc_frame_audio)(tokens, valid, ranges[0], ranges[1], frame_ranges[0],
                                       frame_ranges[1])
    assert got.shape == (2, f_max, 50, e)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-4)
    assert np.abs(want[0, :10]).mean() > 1.0


def test_second_and_frame_ranges():
    """Flat 50-token seconds in each window (the last second of a full window gets 46),
    seconds past the audio or past the windows get none; frames take their skipped seconds."""
    start, count = fbank.tdc_second_tokens(np.array([496, 120]), 496, 14)
    assert count.tolist() == [50] * 9 + [46] + [50, 50, 20, 0]
    assert start[:12].tolist() == list(range(0, 500, 50)) + [496, 546]
    assert fbank.tdc_second_tokens(np.array([496]), 496, 12)[1].tolist()[-2:] == [0, 0]
    fs, fc = fbank.tdc_frame_seconds(np.array([0, 2, 3, 11, 13]), count)
    assert fs.tolist() == [0, 100, 150, 550, 650] and fc.tolist() == [100, 50, 400, 100, 0]
    assert fbank.kept_frame_seconds(np.array([0.0, 2.002, 3.9, 11.0])).tolist() == [0, 2, 4, 11]
    # A 0.5 fps video: one decoded frame (time) serves two 1-fps candidates.
    assert fbank.kept_frame_seconds(np.array([0.0, 0.0, 2.0, 2.0, 4.0])).tolist() == [0, 1, 2,
                                                                                    3, 4]
    try:
        fbank.tdc_frame_seconds(np.array([0, 2, 2]), count)
    except ValueError as err:
        assert "increasing" in str(err)
    else:
        raise AssertionError("repeated frame seconds accepted")


def test_window_fbanks_pad_the_last_window_and_short_audio():
    """Windows of whole seconds (the original's `tdc_windows`), the shorter last one padded with
    zero rows; audio under 1 s padded with silence to 1 s; the waveform rounded to float16."""
    rng = np.random.default_rng(2)
    wave = rng.uniform(-0.5, 0.5, int(15.5 * 16000)).astype(np.float32)
    feats, frames = fbank.tdc_window_fbanks(wave)
    assert feats.shape == (2, 998, 128) and frames.tolist() == [998, 548]
    rounded = wave.astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(feats[1, :548], fbank.beats_fbank(rounded[160000:]))
    assert not feats[1, 548:].any()
    short, n = fbank.tdc_window_fbanks(wave[:8000])
    assert n.tolist() == [98]
    np.testing.assert_array_equal(short[0, :98], fbank.beats_fbank(
        np.pad(rounded[:8000], (0, 8000))))
    assert len(fbank.tdc_window_fbanks(wave, max_windows=1)[1]) == 1


@functools.cache
def _tiny():
    cfg = tdc.make_config("tiny")
    model = tdc.TDCModel(cfg)
    shapes = jax.eval_shape(lambda k: tdc.init_params(model, k), jax.random.key(0))
    return cfg, model, random_params(shapes, seed=3)


def test_model_frame_audio_encodes_each_window_as_alone():
    """`TDCModel.frame_audio` on padded windows = BEATs on each window's real rows alone, then
    the original's loop: the padding rows of the short last window are masked."""
    cfg, model, params = _tiny()
    rng = np.random.default_rng(4)
    rows_per_window = 998  # 10 s: 62 x 8 tokens
    frames = np.array([998, 548])
    feats = np.zeros((1, 2, rows_per_window, 128), np.float32)
    for w, n in enumerate(frames):
        feats[0, w, :n] = rng.standard_normal((n, 128))
    per_window = cfg.beats.num_tokens(rows_per_window)
    counts = [cfg.beats.num_tokens(n) for n in frames]
    kept, seconds = [0, 2, 3, 11], 12
    st, ct, fs, fc = _ranges(counts, per_window, seconds, kept, 20)
    got = jax.jit(lambda p, *a: model.apply({"params": p}, *a,
                                            method=tdc.TDCModel.frame_audio))(
        params, feats, frames[None].astype(np.int32), st[None], ct[None], fs[None], fc[None])
    alone = [np.asarray(jax.jit(lambda p, x: model.apply(
        {"params": p}, x, method=tdc.TDCModel.encode_audio))(params, feats[:, w, :n]))[0]
        for w, n in enumerate(frames)]
    marks = np.zeros(seconds, np.int64)
    marks[kept] = 1
    want = _original_frame_audio(alone, marks)
    np.testing.assert_allclose(np.asarray(got)[0], want, rtol=1e-4, atol=1e-4)
    valid = beats.token_valid(jnp.asarray(frames), rows_per_window, cfg.beats)
    assert isinstance(valid, jax.Array) and valid.sum(axis=1).tolist() == counts


def test_rows_without_audio_get_no_audio_tokens():
    """`audio_present` False: that row's static frames lose their audio tokens and its
    Q-Former sees the visual tokens only, as compressing it without audio does; the other
    row keeps its audio."""
    cfg, model, params = _tiny()
    rng = np.random.default_rng(6)
    f = 10
    tokens = jnp.asarray(rng.standard_normal((2, f, cfg.frame_slots, 64)), jnp.float32)
    counts = jnp.array([cfg.frame_slots, cfg.frame_slots - 3], jnp.int32)
    audio = jnp.asarray(rng.standard_normal((2, f, 5, 32)), jnp.float32)
    ids = jnp.asarray(rng.integers(1, cfg.compressor.qformer.vocab_size, (2, 6)), jnp.int32)
    n_max = tdc.qformer.max_video_tokens(f, cfg.frame_slots, 5, cfg.compressor, 1)
    mask = jnp.ones((2, f), bool)

    @functools.partial(jax.jit, static_argnums=(1,))
    def compress(p, with_audio, rows, present):
        return model.apply({"params": p}, tokens[rows], counts[rows], mask[rows],
                           audio_tokens=audio[rows] if with_audio else None,
                           text_ids=ids[rows], max_tokens=n_max, audio_present=present,
                           method=tdc.TDCModel.compress)

    both, both_mask, aux = compress(params, True, np.array([0, 1]), np.array([True, False]))
    for r, with_audio in ((0, True), (1, False)):
        one, one_mask, one_aux = compress(params, with_audio, np.array([r]), None)
        n = int(one_aux["num_tokens"][0])
        assert int(aux["num_tokens"][r]) == n
        np.testing.assert_array_equal(np.asarray(both_mask[r]), np.asarray(one_mask[0]))
        np.testing.assert_allclose(np.asarray(both[r, :n]), np.asarray(one[0, :n]),
                                   rtol=1e-5, atol=1e-5)
    assert int(aux["num_tokens"][0]) - int(aux["num_tokens"][1]) == 2 * 5 + 2 * 3  # 2 chunks
