"""The Grain pipeline end to end on real clips: skipping, batching, buckets, state, workers."""

import dataclasses
import functools
import json
import logging
import operator

import ml_collections
import numpy as np
import pytest

from longvid_jax.input import chat, decode, pipeline
from longvid_jax.input.transforms import DecodeExample
from tests.input.test_decode import remux_without_audio

# 4 placeholders per frame; a partial of a builtin pickles without importing this module.
video_tokens = functools.partial(operator.mul, 4)


CONVS = [
    [{"from": "human", "value": "<video>\nWhat happens?"},
     {"from": "gpt", "value": "A short scene."}],
    [{"from": "human", "value": "<video>\nAnything?"}, {"from": "gpt", "value": "Broken."}],
    [{"from": "human", "value": "<video>\nWhat is typed?"},
     {"from": "gpt", "value": "Hello world."},
     {"from": "human", "value": "Who speaks?"}, {"from": "gpt", "value": "A man at his desk."}],
    [{"from": "human", "value": "Describe the clip."}, {"from": "gpt", "value": "A quiet clip."}],
]


@pytest.fixture(scope="module")
def annotations(tmp_path_factory, media_dir):
    """3 good records and 1 broken video (record 1); record 3 has no audio track."""
    root = tmp_path_factory.mktemp("pipeline")
    data = (media_dir / "movie-hello.mp4").read_bytes()
    (root / "broken.mp4").write_bytes(data[: len(data) // 2])
    remux_without_audio(media_dir / "realshort.mp4", root / "silent.mp4")
    videos = [str(media_dir / "realshort.mp4"), "broken.mp4", str(media_dir / "movie-hello.mp4"),
              "silent.mp4"]
    path = root / "train.jsonl"
    path.write_text("".join(json.dumps({"video": v, "conversations": c}) + "\n"
                            for v, c in zip(videos, CONVS)))
    return path


def _cfg(annotations, **kw):
    base = dict(annotations=str(annotations), max_frames=4, image_size=32, num_mel_bins=8,
                length_buckets=(48, 64, 128), qformer_text_len=8, batch_size=2, shuffle=False,
                num_epochs=2)
    base.update(kw)
    return pipeline.PipelineConfig(**base)


def test_skips_bad_records_and_batches(annotations, qwen2, media_dir, caplog):
    cfg = _cfg(annotations)
    with caplog.at_level(logging.WARNING):
        batches = list(pipeline.make_iterator(cfg, num_video_tokens=video_tokens))
    assert [b["record_index"].tolist() for b in batches] == [[0, 2], [3, 0], [2, 3]]
    assert [int(b["num_skipped"]) for b in batches] == [1, 0, 1]  # one bad record per epoch
    assert "broken.mp4" in caplog.text and "truncated" in caplog.text

    b = batches[0]
    assert b["frames"].shape == (2, 4, 32, 32, 3) and b["frames"].dtype == np.float32
    assert b["frame_mask"].tolist() == [[True, True, False, False], [True] * 4]
    assert b["audio_mel"].shape == (2, 4, 8, 100) and b["audio_mask"].tolist() == b[
        "frame_mask"].tolist()
    clip = decode.load_video(media_dir / "realshort.mp4", max_frames=4, size=32,
                             fill=(127, 127, 127))
    np.testing.assert_allclose(b["frames"][0, :2], (clip.frames / 255.0 - 0.5) / 0.5, atol=1e-6)
    assert not b["frames"][0, 2:].any() and not b["audio_mel"][0, 2:].any()
    np.testing.assert_allclose(b["timestamps"][0], [0, clip.timestamps[1], 0, 0], atol=1e-6)
    np.testing.assert_allclose(b["timestamps"][1], [0, 3, 5, 8], atol=0.02)  # 9 s -> 4 frames

    for row, rec in enumerate([0, 2]):
        want = chat.tokenize_conversation(CONVS[rec], qwen2, num_video_tokens=video_tokens(
            b["frame_mask"][row].sum()))
        n = want["input_ids"].shape[0]
        np.testing.assert_array_equal(b["input_ids"][row, :n], want["input_ids"])
        np.testing.assert_array_equal(b["loss_mask"][row, :n], want["loss_mask"])
        assert (b["input_ids"][row, n:] == qwen2.pad_token_id).all()
        assert not b["loss_mask"][row, n:].any()
        assert b["segment_ids"][row].tolist() == [1] * n + [0] * (b["input_ids"].shape[1] - n)
        assert b["positions"][row, :n].tolist() == list(range(n))
        assert not b["positions"][row, n:].any()
        answers = [t["value"] + "<|im_end|>" for t in CONVS[rec] if t["from"] == "gpt"]
        assert qwen2.decode(b["input_ids"][row][b["loss_mask"][row]]) == "".join(answers)
        q = qwen2.encode(chat.question_text(CONVS[rec]))[:8]
        assert b["qformer_text_ids"][row, : len(q)].tolist() == q
        assert b["qformer_text_mask"][row].sum() == len(q)
    lengths = [int(x.sum()) for x in b["segment_ids"]]
    assert b["input_ids"].shape[1] == min(t for t in cfg.length_buckets if t >= max(lengths))

    silent = batches[1]  # record 3: no audio track -> silence features, audio_mask False
    assert silent["record_index"][0] == 3 and silent["frame_mask"][0].sum() == 2
    assert not silent["audio_mask"][0].any()
    assert (silent["audio_mel"][0, :2] == -1.5).all()


def test_state_restore_continues_at_next_batch(annotations):
    cfg = _cfg(annotations, shuffle=True, num_epochs=None, seed=3, num_mel_bins=0)
    it = pipeline.make_iterator(cfg, num_video_tokens=video_tokens)
    for _ in range(2):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # JSON-serialisable
    want = [next(it) for _ in range(2)]
    resumed = pipeline.make_iterator(cfg, num_video_tokens=video_tokens, state=state)
    for a, b in zip(want, [next(resumed) for _ in range(2)]):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_shuffle_per_epoch_and_process_shards(tmp_path, media_dir):
    conv = CONVS[0]
    path = tmp_path / "six.json"
    path.write_text(json.dumps([{"video": str(media_dir / "realshort.mp4"), "conversations": conv}
                                for _ in range(6)]))
    cfg = pipeline.PipelineConfig(annotations=str(path), max_frames=1, image_size=10,
                                  num_mel_bins=0, qformer_text_len=0, batch_size=1, seed=7,
                                  num_epochs=2, length_buckets=(64,))

    def order(**kw):
        it = pipeline.make_iterator(cfg, num_video_tokens=video_tokens, **kw)
        return [int(b["record_index"][0]) for b in it]

    seen = order()
    assert sorted(seen[:6]) == sorted(seen[6:]) == list(range(6))
    assert seen[:6] != seen[6:]  # a new order each epoch
    assert order() == seen  # deterministic
    shard0, shard1 = order(process_index=0, process_count=2), order(process_index=1,
                                                                    process_count=2)
    assert sorted(shard0[:3]) == [0, 2, 4] and sorted(shard1[:3]) == [1, 3, 5]


def test_truncation_keeps_video_whole(tmp_path, media_dir, qwen2, caplog):
    long_answer = " ".join(["word"] * 80)
    conv = [{"from": "human", "value": "<video>\nTalk."}, {"from": "gpt", "value": long_answer}]
    path = tmp_path / "long.json"
    record = {"video": str(media_dir / "realshort.mp4"), "conversations": conv}
    path.write_text(json.dumps([record]))
    cfg = pipeline.PipelineConfig(annotations=str(path), max_frames=2, image_size=16,
                                  num_mel_bins=0, batch_size=1, num_epochs=1, shuffle=False,
                                  length_buckets=(32, 48))
    with caplog.at_level(logging.WARNING):
        (batch,) = list(pipeline.make_iterator(cfg, num_video_tokens=video_tokens))
    assert batch["input_ids"].shape == (1, 48) and batch["segment_ids"].all()
    assert "truncated" in caplog.text
    full = chat.tokenize_conversation(conv, qwen2, num_video_tokens=8)
    np.testing.assert_array_equal(batch["input_ids"][0], full["input_ids"][:48])
    assert batch["loss_mask"][0].sum() == full["loss_mask"][:48].sum() > 0

    caplog.clear()
    with caplog.at_level(logging.WARNING):  # 2 frames x 30 placeholders cannot fit 48 tokens
        assert list(pipeline.make_iterator(cfg, num_video_tokens=lambda n: 30 * n)) == []
    assert "placeholders" in caplog.text and "realshort.mp4" in caplog.text


def test_workers_need_parsed_flags(annotations, absl_flags):
    absl_flags.unparse_flags()
    try:
        with pytest.raises(RuntimeError, match="absl flags"):
            pipeline.make_dataset(_cfg(annotations, num_workers=2), num_video_tokens=video_tokens)
    finally:
        absl_flags(["pytest"])


def test_two_workers(annotations, absl_flags):
    cfg = _cfg(annotations, num_workers=2, shuffle=True, num_epochs=None, num_mel_bins=0,
               prefetch_buffer=1)
    it = pipeline.make_iterator(cfg, num_video_tokens=video_tokens)
    try:
        batches = [next(it) for _ in range(2)]
        state = json.dumps(it.get_state())
        batches.append(next(it))
    finally:
        it.close()
    indices = np.concatenate([b["record_index"] for b in batches])
    assert set(indices.tolist()) <= {0, 2, 3} and len(set(indices.tolist())) == 3
    assert all(b["frames"].shape == (2, 4, 32, 32, 3) for b in batches)
    assert sum(int(b["num_skipped"]) for b in batches) >= 1
    resumed = pipeline.make_iterator(cfg, num_video_tokens=video_tokens, state=json.loads(state))
    try:
        again = next(resumed)
    finally:
        resumed.close()
    for k in again:
        np.testing.assert_array_equal(again[k], batches[2][k], err_msg=k)


def test_three_minute_video_example(media_dir, qwen2):
    cfg = pipeline.PipelineConfig(annotations="unused.json", max_frames=32, image_size=32,
                                  num_mel_bins=16, length_buckets=(512,))
    record = {"video": str(media_dir / "wannaworktogether.mp4"), "conversations": CONVS[0],
              "_index": 0, "_source": "inline"}
    example = DecodeExample(cfg=cfg, num_video_tokens=video_tokens).map(record)
    assert "_failed" not in example, example
    assert example["frames"].shape == (32, 32, 32, 3) and example["frame_mask"].all()
    ts = example["timestamps"]
    assert ts[0] == 0 and (np.diff(ts) > 4).all() and 179 < ts[-1] < 180.3
    assert example["audio_mel"].shape == (32, 16, 100) and example["audio_mask"].all()
    assert (example["input_ids"] == chat.VIDEO_TOKEN_INDEX).sum() == 128


def test_config_from_dict():
    cd = ml_collections.ConfigDict(
        dict(annotations="a.jsonl", batch_size=4, length_buckets=[8, 16])
    )
    cfg = pipeline.PipelineConfig.from_dict(cd)
    assert cfg.batch_size == 4 and cfg.length_buckets == (8, 16)
    with pytest.raises(ValueError, match="unknown PipelineConfig fields"):
        pipeline.PipelineConfig.from_dict({"annotations": "a", "batch": 2})
    with pytest.raises(ValueError, match="ascending"):
        pipeline.PipelineConfig(annotations="a", length_buckets=(16, 8))
    with pytest.raises(ValueError, match="process_index"):
        pipeline.make_dataset(cfg, num_video_tokens=video_tokens, process_index=2, process_count=2)


def test_tower_views_and_wordpiece_qformer_text(tmp_path, media_dir, qwen2):
    """TDC's inputs: a DINOv2 view beside SigLIP's frames, both from one aspect-preserving
    decode through `decode.tower_pixels` with their own means; the decoded size; the question
    in BERT WordPiece ids ([CLS] ... [SEP], lower-cased)."""
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "what", "is", "typed", "?"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    dino_mean, dino_std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    cfg = pipeline.PipelineConfig(
        annotations="unused.json", max_frames=4, image_size=32, num_mel_bins=0,
        length_buckets=(128,), qformer_text_len=8,
        qformer_tokenizer=str(tmp_path / "vocab.txt"),
        tower_views=[["dino_frames", 28, list(dino_mean), list(dino_std)]])
    record = {"video": str(media_dir / "movie-hello.mp4"), "conversations": CONVS[2],
              "_index": 0, "_source": "inline"}
    ex = DecodeExample(cfg=cfg, num_video_tokens=video_tokens).map(record)
    assert "_failed" not in ex, ex
    n = int(ex["frame_mask"].sum())
    clip = decode.load_video(record["video"], fps=1.0, max_frames=4, size=32,
                             pad_to_square=False)
    assert n == len(clip.frames) and ex["image_sizes"].tolist() == list(clip.frames.shape[1:3])
    assert clip.frames.shape[1] != clip.frames.shape[2]  # a non-square clip: padding matters
    np.testing.assert_allclose(ex["frames"][:n], decode.tower_pixels(clip.frames, 32, (0.5,) * 3,
                                                                     (0.5,) * 3), atol=1e-6)
    want = decode.tower_pixels(clip.frames, 28, dino_mean, dino_std)
    assert ex["dino_frames"].shape == (4, 28, 28, 3)
    np.testing.assert_allclose(ex["dino_frames"][:n], want, atol=1e-6)
    # The padding band has each tower's own mean: 0 after its normalisation.
    assert np.abs(ex["dino_frames"][0, 0, 14]).max() < 0.02
    assert np.abs(ex["frames"][0, 0, 16]).max() < 0.01
    assert ex["qformer_text_ids"].tolist() == [2, 5, 6, 7, 8, 3, 0, 0]
    assert ex["qformer_text_mask"].tolist() == [True] * 6 + [False] * 2
    with pytest.raises(ValueError, match="tower_views"):
        pipeline.PipelineConfig(annotations="a", tower_views=[("x", 8, (0.5,), (0.5,))])


def test_beats_audio_windows_seconds_and_frames(tmp_path, media_dir, qwen2, monkeypatch):
    """TDC's audio (`beats_windows` > 0): the track's 10 s BEATs fbank windows padded to W
    (`fbank.tdc_window_fbanks`: an 8.3 s track is one window of 830 real rows), each second's
    tokens (`tdc_second_tokens`), each kept frame's seconds (`tdc_frame_seconds`: 5 frames at
    0, 2, 4, 6 and 8 s of the 9 one-fps frames of an 8.3 s clip: each takes its skipped second,
    the last its own); a clip without a sound track, or a record whose "audio" is None, has
    no audio (`audio_present` False, all zero)."""
    from longvid_jax.input import fbank

    remux_without_audio(media_dir / "movie-hello.mp4", tmp_path / "silent.mp4")
    cfg = pipeline.PipelineConfig(annotations="unused.json", max_frames=5, image_size=32,
                                  num_mel_bins=0, length_buckets=(128,), beats_windows=2)
    decoder = DecodeExample(cfg=cfg, num_video_tokens=video_tokens)
    path = str(media_dir / "movie-hello.mp4")
    ex = decoder.map({"video": path, "conversations": CONVS[0], "_index": 0,
                      "_source": "inline"})
    assert "_failed" not in ex, ex
    clip = decode.load_video(path, fps=1.0, max_frames=5, size=32)
    want, frames = fbank.tdc_window_fbanks(decode.load_audio(path, mix="first"))
    assert want.shape == (1, 998, 128) and frames.tolist() == [830]
    assert ex["audio_fbank"].shape == (2, 998, 128)
    np.testing.assert_array_equal(ex["audio_fbank"][0], want[0])
    assert not ex["audio_fbank"][1].any() and not ex["audio_fbank"][0, 830:].any()
    assert ex["audio_window_frames"].tolist() == [830, 0] and ex["audio_present"]
    # 830 rows -> 51 time patches x 8 = 408 tokens: seconds 0-7 get 50, second 8 gets 8.
    assert ex["audio_second_count"].tolist() == [50] * 8 + [8] + [0] * 11
    assert ex["audio_second_start"][:9].tolist() == list(range(0, 450, 50))
    assert np.round(clip.timestamps).tolist() == [0, 2, 4, 6, 8]
    assert ex["audio_frame_start"].tolist() == [0, 100, 200, 300, 400]
    assert ex["audio_frame_count"].tolist() == [100, 100, 100, 100, 50]

    # A record's own "audio" file (TDC stage 3) replaces the video's track; "audio": None
    # (the original's no-audio values) and a video without a track give no audio.
    other = str(media_dir / "cockatoo.mp4")  # 14 s of another clip's sound: 2 windows
    ex = decoder.map({"video": path, "audio": other, "conversations": CONVS[0],
                      "_index": 0, "_source": "inline"})
    want, frames = fbank.tdc_window_fbanks(decode.load_audio(other, mix="first"))
    assert ex["audio_window_frames"].tolist() == frames.tolist() and frames[0] == 998
    np.testing.assert_array_equal(ex["audio_fbank"], want)
    assert ex["audio_second_count"][:9].tolist() == [50] * 9  # the video's 9 seconds only
    assert not ex["audio_second_count"][9:].any()
    for record in ({"video": path, "audio": None}, {"video": str(tmp_path / "silent.mp4")}):
        ex = decoder.map({**record, "conversations": CONVS[0], "_index": 0,
                          "_source": "inline"})
        assert "_failed" not in ex, ex
        assert not ex["audio_present"] and not ex["audio_fbank"].any()
        assert not ex["audio_frame_count"].any() and not ex["audio_window_frames"].any()
    # A track longer than the windows is cut: its first window as the whole track's.
    one = DecodeExample(cfg=dataclasses.replace(cfg, beats_windows=1),
                        num_video_tokens=video_tokens).map(
        {"video": other, "conversations": CONVS[0], "_index": 0, "_source": "inline"})
    assert one["audio_window_frames"].tolist() == [998]
    np.testing.assert_array_equal(one["audio_fbank"],
                                  fbank.tdc_window_fbanks(decode.load_audio(other, mix="first"))[0][:1])
    with pytest.raises(ValueError, match="fps"):
        dataclasses.replace(cfg, fps=2.0)

    def corrupt(path, **_):
        raise decode.VideoDecodeError(path, "corrupt audio stream (test)")

    monkeypatch.setattr(decode, "load_audio", corrupt)  # the record fails, naming the file
    ex = decoder.map({"video": str(media_dir / "movie-hello.mp4"), "conversations": CONVS[0],
                      "_index": 3, "_source": "inline"})
    assert "movie-hello.mp4: corrupt audio stream" in ex["_failed"] and ex["index"] == 3
    with pytest.raises(ValueError, match="16000"):
        pipeline.PipelineConfig(annotations="a", beats_windows=1, sample_rate=8000)


def test_max_frame_rule_keeps_what_fits_beside_the_text(media_dir, qwen2):
    """`max_frame_context` (TDC's `get_max_num_frames` in training): with room for 3 frames of
    32 tokens beside the conversation (+1 for `<image>`, +16 kept free), the 5 decoded frames
    of an 8.3 s clip become frames 0, 1, 3 (`int(i * 5 / 3)`: 0, 2 and 6 s), with 38 tokens a
    frame (BEATs audio) 2 fit."""
    record = {"video": str(media_dir / "movie-hello.mp4"), "conversations": CONVS[2],
              "_index": 0, "_source": "inline"}
    base = dict(annotations="unused.json", max_frames=5, image_size=32, num_mel_bins=0,
                length_buckets=(512,), qformer_text_len=0)
    text = len(chat.tokenize_conversation(CONVS[2], qwen2, template="chatml",
                                          num_video_tokens=0)["input_ids"]) + 1
    context = text + 16 + 3 * 32
    ex = DecodeExample(cfg=pipeline.PipelineConfig(**base, max_frame_context=context),
                       num_video_tokens=video_tokens).map(record)
    assert "_failed" not in ex, ex
    assert ex["frame_mask"].tolist() == [True] * 3 + [False] * 2
    assert np.round(ex["timestamps"][:3]).tolist() == [0, 2, 6]
    assert (ex["input_ids"] == chat.VIDEO_TOKEN_INDEX).sum() == video_tokens(3)
    full = DecodeExample(cfg=pipeline.PipelineConfig(**base), num_video_tokens=video_tokens)
    np.testing.assert_array_equal(ex["frames"][:3], full.map(record)["frames"][[0, 1, 3]])
    audio = DecodeExample(cfg=pipeline.PipelineConfig(**base, max_frame_context=context,
                                                      beats_windows=1),
                          num_video_tokens=video_tokens).map(record)
    assert audio["frame_mask"].sum() == (3 * 32) // 38 == 2
