"""Grain transforms: decode one annotation record into model inputs; skip bad ones and batch.

`DecodeExample` runs inside the workers (one map step per record; files are opened there).
`SkipAndBatchIterDataset` runs in the main process after `mp_prefetch`: it drops records that
failed, counts them in `num_skipped`, logs a warning naming file and error, and pads text to a
length bucket.

Letters: B batch, F frames (max_frames), S image side, C mel bins, T tokens, Lq Q-Former text.
"""

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np
from absl import logging

from longvid_jax.input import audio, chat, decode, fbank
from longvid_jax.input import tokenizer as tokenizer_lib
from longvid_jax.input.sources import AnnotationError

ERROR_KEY = "_failed"  # marks a record that failed; never reaches the model
AUDIO_WINDOW = 100  # mel columns per frame window: 1 s at a 10 ms hop (Whisper: 160 at 16 kHz)


def truncate_text(ids: np.ndarray, mask: np.ndarray, max_len: int, what: str):
    """Cuts a tokenized example to `max_len` tokens at the end, keeping the video whole.

    Returns:
        (input_ids int32[<=max_len], loss_mask bool[<=max_len]).

    Raises:
        ValueError: the video placeholders end beyond `max_len` (the record is bad).
    """
    if ids.shape[0] <= max_len:
        return ids, mask
    placeholders = np.flatnonzero(ids == chat.VIDEO_TOKEN_INDEX)
    if placeholders.size and placeholders[-1] >= max_len:
        raise ValueError(
            f"{what}: its {placeholders.size} video placeholders end at token "
            f"{placeholders[-1] + 1}, beyond the largest length bucket {max_len}"
        )
    logging.warning("%s: %d tokens truncated to the largest bucket, %d", what, ids.shape[0],
                    max_len)
    return ids[:max_len], mask[:max_len]


@dataclasses.dataclass(frozen=True)
class DecodeExample(grain.transforms.Map):
    """Record -> example: frames, audio features, tokens with loss mask, Q-Former text.

    Input: a `JsonAnnotationSource` item (`video`, `conversations`, `_index`, `_source`, or
    `_error`). Output (F = max_frames, the first `n` frames real):
      frames float32[F, S, S, 3]: (x / 255 - mean) / std, padding frames 0;
      frame_mask bool[F]; timestamps float32[F] (s, padding 0);
      audio_mel float32[F, C, 100]: `audio.per_second_features` (padding frames 0);
      audio_mask bool[F]: window has real audio (all False without an audio track);
      input_ids int32[T], loss_mask bool[T]: `chat.tokenize_conversation` with
        `num_video_tokens(n)` placeholders, truncated to max(length_buckets);
      qformer_text_ids int32[Lq], qformer_text_mask bool[Lq]: `chat.question_text` tokenized
        (by `cfg.qformer_tokenizer` when set, else the LLM tokenizer), truncated, padded;
        record_index int32[] (position in the file);
      with `cfg.tower_views`: one float32[F, S_v, S_v, 3] per view (padding frames 0) and
        image_sizes int32[2], the decoded frames' (height, width);
      with `cfg.beats_windows` W > 0: audio_fbank float32[W, Af, 128] (the track's 10 s BEATs
        fbank windows, then zeros), audio_window_frames int32[W], audio_second_start /
        audio_second_count int32[10 W], audio_frame_start / audio_frame_count int32[F] (0 on
        padding frames), audio_present bool, see `pipeline.PipelineConfig.beats_windows`.
    A record that fails (`VideoDecodeError`, `AnnotationError`, any ValueError while
    tokenizing) becomes `{ERROR_KEY: message, "video", "index"}` for the batcher to skip.

    Attributes:
        cfg: a `pipeline.PipelineConfig`.
        num_video_tokens: picklable callable, number of valid frames -> placeholders.
    """

    cfg: Any
    num_video_tokens: Callable[[int], int]

    def map(self, element: dict[str, Any]) -> dict[str, Any]:
        try:
            if "_error" in element:
                raise AnnotationError(element["_source"], element["_error"], element["_index"])
            return self._decode(element)
        except ValueError as e:  # VideoDecodeError, AnnotationError, tokenization problems
            return {
                ERROR_KEY: str(e),
                "video": str(element.get("video", "?")),
                "index": int(element.get("_index", -1)),
            }

    def _decode(self, record: dict[str, Any]) -> dict[str, np.ndarray]:
        cfg = self.cfg
        tok = tokenizer_lib.load_tokenizer(cfg.tokenizer)
        num_max, side = cfg.max_frames, cfg.image_size
        views = {}
        if cfg.tower_views:  # one aspect-preserving decode, each tower prepared from it
            largest = max([side] + [v[1] for v in cfg.tower_views])
            clip = decode.load_video(record["video"], fps=cfg.fps, max_frames=num_max,
                                     size=largest, pad_to_square=False,
                                     num_threads=cfg.decode_threads,
                                     subsample=cfg.frame_subsample)
            clip = self._max_frame_rule(record, clip, tok)
            n = clip.frames.shape[0]
            for key, v_side, v_mean, v_std in ((("frames", side, cfg.image_mean, cfg.image_std),)
                                               + cfg.tower_views):
                views[key] = np.zeros((num_max, v_side, v_side, 3), np.float32)
                views[key][:n] = decode.tower_pixels(clip.frames, v_side, v_mean, v_std)
            views["image_sizes"] = np.asarray(clip.frames.shape[1:3], np.int32)
            frames = views.pop("frames")
        else:
            clip = decode.load_video(
                record["video"], fps=cfg.fps, max_frames=num_max, size=side,
                pad_to_square=True, fill=tuple(int(m * 255) for m in cfg.image_mean),
                num_threads=cfg.decode_threads, subsample=cfg.frame_subsample,
            )
            clip = self._max_frame_rule(record, clip, tok)
            n = clip.frames.shape[0]
            mean = np.asarray(cfg.image_mean, np.float32)
            std = np.asarray(cfg.image_std, np.float32)
            frames = np.zeros((num_max, side, side, 3), np.float32)
            frames[:n] = (clip.frames.astype(np.float32) / 255.0 - mean) / std
        frame_mask = np.arange(num_max) < n
        timestamps = np.zeros((num_max,), np.float32)
        timestamps[:n] = clip.timestamps

        audio_mel = np.zeros((num_max, cfg.num_mel_bins, AUDIO_WINDOW), np.float32)
        audio_mask = np.zeros((num_max,), bool)
        sound = record.get("audio", record["video"])  # None: the record has no audio
        if cfg.num_mel_bins > 0:
            wave = (decode.load_audio(sound, sample_rate=cfg.sample_rate) if sound is not None
                    else None)
            mel, has_audio = audio.per_second_features(
                wave, clip.timestamps, clip.duration, num_mel_bins=cfg.num_mel_bins,
                sample_rate=cfg.sample_rate, n_fft=cfg.sample_rate // 40,  # 25 ms window
                hop_length=cfg.sample_rate // 100, frames_per_second=AUDIO_WINDOW,  # 10 ms hop
            )
            audio_mel[:n], audio_mask[:n] = mel, has_audio

        what = f"{record['video']} (record {record['_index']} of {record['_source']})"
        beats = self._beats_audio(sound, clip, what) if cfg.beats_windows else {}
        text = chat.tokenize_conversation(
            record["conversations"], tok, template=cfg.template, system=cfg.system,
            num_video_tokens=int(self.num_video_tokens(n)),
        )
        ids, mask = truncate_text(text["input_ids"], text["loss_mask"], max(cfg.length_buckets),
                                  what)
        q_len = cfg.qformer_text_len
        q_tok = (tokenizer_lib.wordpiece_tokenizer(cfg.qformer_tokenizer)
                 if cfg.qformer_tokenizer else tok)
        q_ids = np.full((q_len,), pad_id(q_tok), np.int32)
        q_mask = np.zeros((q_len,), bool)
        if q_len:
            question = chat.question_text(record["conversations"])
            if cfg.qformer_tokenizer:  # [CLS] question [SEP], as TDC's BERT tokenizer call
                q = q_tok(question, truncation=True, max_length=q_len)["input_ids"]
            else:
                q = tok.encode(question, add_special_tokens=False)[:q_len]
            q_ids[: len(q)], q_mask[: len(q)] = q, True
        return {
            "frames": frames, "frame_mask": frame_mask, "timestamps": timestamps,
            "audio_mel": audio_mel, "audio_mask": audio_mask,
            "input_ids": ids.astype(np.int32), "loss_mask": mask.astype(bool),
            "qformer_text_ids": q_ids, "qformer_text_mask": q_mask,
            "record_index": np.int32(record["_index"]), **views, **beats,
        }

    def _max_frame_rule(self, record: dict[str, Any], clip: decode.VideoClip, tok
                        ) -> decode.VideoClip:
        """TDC's `get_max_num_frames` in training (with `cfg.max_frame_context` > 0): the
        frames that fit the context beside the conversation's text
        (`scene_split.max_num_frames`, 38 tokens a frame with BEATs audio, 32 without; the
        text counts the `<image>` token once, as the original's does), kept by its uniform
        rule `frames[int(i * n / keep)]`."""
        if not self.cfg.max_frame_context:
            return clip
        from longvid_jax.models import scene_split  # imports JAX: only where the rule is on

        text = chat.tokenize_conversation(record["conversations"], tok,
                                          template=self.cfg.template, system=self.cfg.system,
                                          num_video_tokens=0)
        n = clip.frames.shape[0]
        keep = scene_split.max_num_frames(len(text["input_ids"]) + 1,
                                          with_audio=self.cfg.beats_windows > 0,
                                          max_frames=n, max_context=self.cfg.max_frame_context)
        if keep >= n:
            return clip
        idx = (np.arange(keep) * (n / keep)).astype(np.int64)
        return dataclasses.replace(clip, frames=clip.frames[idx], timestamps=clip.timestamps[idx])

    def _beats_audio(self, path: str | None, clip: decode.VideoClip, what: str
                     ) -> dict[str, np.ndarray]:
        """TDC's audio of one record (`path`: the record's sound file or video; None: it has
        none): BEATs fbank windows, each second's tokens and each kept frame's seconds
        (`fbank.tdc_window_fbanks`, `tdc_second_tokens`, `tdc_frame_seconds`). Without audio
        (no path, or a video without a track) `audio_present` is False and everything else
        zero: the model adds no audio tokens, as the original does for a sample whose audio
        is None."""
        cfg = self.cfg
        w_max, f_max = cfg.beats_windows, cfg.max_frames
        frames_per_window = fbank.num_fbank_frames(10 * cfg.sample_rate,
                                                   sample_rate=cfg.sample_rate)
        per_window = (frames_per_window // cfg.beats_patch) * (128 // cfg.beats_patch)
        out = {"audio_fbank": np.zeros((w_max, frames_per_window, 128), np.float32),
               "audio_window_frames": np.zeros((w_max,), np.int32),
               "audio_second_start": np.zeros((10 * w_max,), np.int32),
               "audio_second_count": np.zeros((10 * w_max,), np.int32),
               "audio_frame_start": np.zeros((f_max,), np.int32),
               "audio_frame_count": np.zeros((f_max,), np.int32),
               "audio_present": np.bool_(False)}
        wave = (decode.load_audio(path, sample_rate=cfg.sample_rate, mix="first")
                if path is not None else None)
        if wave is None:
            return out
        # Only the first W windows are kept: the fbank of the rest is never computed.
        feats, frames = fbank.tdc_window_fbanks(wave, sample_rate=cfg.sample_rate,
                                                max_windows=w_max)
        w = len(frames)
        if len(wave) > (10 * w + 1) * cfg.sample_rate:  # a cut beyond a sub-second tail
            logging.warning("%s: audio of %.1f s cut to its first %d s (input.beats_windows=%d)",
                            what, len(wave) / cfg.sample_rate, 10 * w, w)
        out["audio_fbank"][:w], out["audio_window_frames"][:w] = feats, frames
        # The video's 1-fps frames (the original's `sample_indices`) and the kept ones' indices.
        seconds = int(np.ceil(clip.duration * cfg.fps - 1e-6))
        tokens = (frames // cfg.beats_patch) * (128 // cfg.beats_patch)
        start, count = fbank.tdc_second_tokens(tokens, per_window, min(seconds, 10 * w_max))
        out["audio_second_start"][:len(start)], out["audio_second_count"][:len(count)] = (
            start, count)
        kept = fbank.kept_frame_seconds(clip.timestamps, cfg.fps)
        start, count = fbank.tdc_frame_seconds(kept, out["audio_second_count"])
        n = len(kept)
        out["audio_frame_start"][:n], out["audio_frame_count"][:n] = start, count
        out["audio_present"] = np.bool_(True)
        return out


def pad_id(tok) -> int:
    """The tokenizer's pad id, or 0 when it has none."""
    return int(tok.pad_token_id) if tok.pad_token_id is not None else 0


def bucket_length(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= length (buckets sorted ascending); the largest if none is."""
    for b in buckets:
        if b >= length:
            return b
    return buckets[-1]


def collate(examples: Sequence[dict[str, np.ndarray]], *, batch_size: int,
            buckets: Sequence[int], pad: int, num_skipped: int) -> dict[str, np.ndarray]:
    """Stacks examples into a batch; text padded to a length bucket.

    Adds segment_ids int32[B, T] (1 real, 0 padding), positions int32[B, T] (0.. on real
    tokens, 0 on padding) and num_skipped int32[]. Fewer examples than `batch_size` (the end
    of a finite dataset) are padded with empty rows: all masks False, segment_ids 0,
    record_index -1.
    """
    t = bucket_length(max(e["input_ids"].shape[0] for e in examples), buckets)
    rows = len(examples)
    batch = {}
    for key in examples[0]:
        if key in ("input_ids", "loss_mask"):
            continue
        stacked = np.stack([e[key] for e in examples])
        if rows < batch_size:
            fill = -1 if key == "record_index" else 0
            extra = np.full((batch_size - rows,) + stacked.shape[1:], fill, stacked.dtype)
            stacked = np.concatenate([stacked, extra])
        batch[key] = stacked
    input_ids = np.full((batch_size, t), pad, np.int32)
    loss_mask = np.zeros((batch_size, t), bool)
    segment_ids = np.zeros((batch_size, t), np.int32)
    positions = np.zeros((batch_size, t), np.int32)
    for i, e in enumerate(examples):
        n = e["input_ids"].shape[0]
        input_ids[i, :n] = e["input_ids"]
        loss_mask[i, :n] = e["loss_mask"]
        segment_ids[i, :n] = 1
        positions[i, :n] = np.arange(n)
    batch.update(input_ids=input_ids, loss_mask=loss_mask, segment_ids=segment_ids,
                 positions=positions, num_skipped=np.int32(num_skipped))
    return batch


class SkipAndBatchIterDataset(grain.IterDataset):
    """Drops failed records (counting them), batches the rest with bucketed text padding.

    Raises (when iterated) RuntimeError after `max_consecutive_bad` failed records in a row,
    so a dataset whose every video is broken stops instead of spinning.
    """

    def __init__(self, parent: grain.IterDataset, *, batch_size: int,
                 buckets: Sequence[int], pad: int, max_consecutive_bad: int):
        super().__init__(parent)
        self._kw = dict(batch_size=batch_size, buckets=tuple(buckets), pad=pad,
                        max_consecutive_bad=max_consecutive_bad)

    def __iter__(self) -> "_SkipAndBatchIterator":
        return _SkipAndBatchIterator(self._parent.__iter__(), **self._kw)

    def __str__(self) -> str:
        return f"SkipAndBatchIterDataset({self._kw})"


class _SkipAndBatchIterator(grain.DatasetIterator):
    """Consumes exactly the records of each batch, so its state is the parent's state."""

    def __init__(self, parent: grain.DatasetIterator, *, batch_size: int,
                 buckets: tuple[int, ...], pad: int, max_consecutive_bad: int):
        super().__init__(parent)
        self._batch_size = batch_size
        self._buckets = buckets
        self._pad = pad
        self._max_bad = max_consecutive_bad

    def __next__(self) -> dict[str, np.ndarray]:
        examples, skipped, bad_run = [], 0, 0
        while len(examples) < self._batch_size:
            try:
                element = next(self._parent)
            except StopIteration:
                if skipped:
                    logging.warning("%d bad records at the end of the data are in no batch",
                                    skipped)
                if not examples:
                    raise
                break
            if ERROR_KEY in element:
                skipped += 1
                bad_run += 1
                logging.warning("skipping record %d (%s): %s", element["index"],
                                element["video"], element[ERROR_KEY])
                if bad_run >= self._max_bad:
                    raise RuntimeError(
                        f"{bad_run} bad records in a row; last: record {element['index']} "
                        f"({element['video']}): {element[ERROR_KEY]}"
                    )
                continue
            bad_run = 0
            examples.append(element)
        return collate(examples, batch_size=self._batch_size, buckets=self._buckets,
                       pad=self._pad, num_skipped=skipped)

    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state)
