"""The Grain input pipeline: annotations -> decoded, tokenized, bucketed batches.

    source (JsonAnnotationSource) -> records i with i % process_count == process_index
      -> shuffle (per epoch, seeded) -> repeat(num_epochs) -> DecodeExample (in workers)
      -> [mp_prefetch(num_workers)] -> SkipAndBatchIterDataset (main process) -> batches

Batch (B = batch_size, F = max_frames, S = image_size, C = num_mel_bins, T = a length bucket,
Lq = qformer_text_len):
  frames float32[B, F, S, S, 3], frame_mask bool[B, F], timestamps float32[B, F],
  audio_mel float32[B, F, C, 100], audio_mask bool[B, F], input_ids int32[B, T] (video
  placeholders = chat.VIDEO_TOKEN_INDEX, padding = the tokenizer's pad id), loss_mask bool[B, T],
  segment_ids int32[B, T], positions int32[B, T], qformer_text_ids int32[B, Lq],
  qformer_text_mask bool[B, Lq], record_index int32[B] (-1 on padding rows), num_skipped int32[];
  with `tower_views`, also one float32[B, F, S_v, S_v, 3] array per view and image_sizes
  int32[B, 2]; with `beats_windows` W > 0 (TDC's audio), audio_fbank float32[B, W, Af, 128],
  audio_window_frames int32[B, W], audio_second_start / audio_second_count int32[B, 10 W],
  audio_frame_start / audio_frame_count int32[B, F], audio_present bool[B].

Workers (`num_workers > 0`) are Grain's mp_prefetch processes; absl flags must be parsed first
(the trainer runs under `absl.app.run`; elsewhere call `absl.flags.FLAGS(["prog"])`).
"""

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import grain
from absl import flags

from longvid_jax.input import decode
from longvid_jax.input import tokenizer as tokenizer_lib
from longvid_jax.input.sources import AnnotationError, JsonAnnotationSource
from longvid_jax.input.transforms import DecodeExample, SkipAndBatchIterDataset, pad_id

__all__ = [
    "AnnotationError", "JsonAnnotationSource", "PipelineConfig", "make_dataset", "make_iterator",
]


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Input pipeline settings (`config.input` in the system configs).

    Attributes:
        annotations: LLaVA-format .json / .jsonl file.
        video_root: folder that relative video paths resolve against (None: the annotation
            file's folder).
        fps: frame sampling rate (frames / s).
        max_frames: F, the cap on frames per video; frames are padded to F.
        frame_subsample: how a video with more than F frames at `fps` is cut to F
            (`decode.sample_indices`): "linspace" (rounded `np.linspace`, LongVA / TPO) or
            "floor" (`int(i * n / F)`, TDC's `uniform_sample`).
        image_size: S; frames are resized (long side S) and padded to S x S with the mean.
        image_mean, image_std: per-channel normalisation of x / 255.
        num_mel_bins: C of the log-mel audio features (0: no audio decoding).
        sample_rate: audio rate in Hz.
        tokenizer: "qwen2" or a local Hugging Face tokenizer folder.
        template: a `chat.TEMPLATES` key.
        system: system message (None: the chat template's own default).
        length_buckets: ascending text lengths that batches are padded to; longer examples are
            truncated to the largest.
        qformer_text_len: Lq, tokens of the question for the Q-Former (0 = none).
        qformer_tokenizer: the Q-Former's own tokenizer: the path of a BERT `vocab.txt`
            (uncased WordPiece with [CLS] / [SEP], as TDC's bert-base-uncased), or None to
            give it the LLM tokenizer's ids.
        tower_views: extra vision tower inputs, each `(key, side, mean, std)`, for models with
            several towers (TDC: DINOv2 at 378 px beside SigLIP's `frames`). When given, every
            view, `frames` included, is made from the same aspect-preserving decode by
            `decode.tower_pixels` (`expand2square` with that tower's mean, bicubic resize),
            and `image_sizes` holds the decoded (height, width).
        beats_windows: W, TDC audio for BEATs (0: none): each record's track (its `"audio"`
            file, else the video's own track) as TDC's 10 s windows of BEATs fbank
            (`fbank.tdc_window_fbanks`, Af = 998 frames at 16 kHz), padded to W windows, with
            each second's tokens and each kept frame's seconds (`fbank.tdc_second_tokens`,
            `tdc_frame_seconds`; pooled in the model by `models.tdc.tdc_frame_audio`, as
            `tdc_infer` does). The original encodes the whole track; the configs use
            ceil(max_frames / fps / 10) windows: a longer track is cut after W windows, with a
            warning, and frames beyond it get fewer or no audio tokens (raise W for long
            videos). A record without audio (an `"audio"` of none, or no track) gets no audio
            tokens (`audio_present` False), as in the original; a corrupt audio stream fails
            the record (`decode.VideoDecodeError`). Needs 16 kHz and fps 1 (TDC pairs each
            1-fps frame with its second of audio).
        beats_patch: fbank frames per BEATs time step (the patch size, 16).
        max_frame_context: TDC's max-frame rule in training (0: off): a record keeps at most
            `(max_frame_context - text - 16) // 32` frames (38 with `beats_windows`), text =
            its conversation's tokens plus the one `<image>` token, subsampled uniformly as
            the original's `prepare_inputs_labels_for_multimodal` (TDC: 8192).
        batch_size: B, examples per batch (per process).
        num_workers: Grain worker processes (0: decode in the main process).
        prefetch_buffer: examples prefetched per process (threads) and per worker.
        read_threads: decoding threads per process (0: no thread prefetch).
        decode_threads: decord decoder threads per video (0: decord's choice).
        shuffle: shuffle records each epoch.
        seed: shuffle seed.
        num_epochs: passes over the data (None: repeat forever).
        max_consecutive_bad: stop with an error after this many failed records in a row.
    """

    annotations: str = ""
    video_root: str | None = None
    fps: float = 1.0
    max_frames: int = 16
    frame_subsample: str = "linspace"
    image_size: int = 32
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    num_mel_bins: int = 16
    sample_rate: int = 16000
    tokenizer: str = "qwen2"
    template: str = "chatml"
    system: str | None = None
    length_buckets: tuple[int, ...] = (256, 512, 1024)
    qformer_text_len: int = 32
    qformer_tokenizer: str | None = None
    tower_views: tuple = ()
    beats_windows: int = 0
    beats_patch: int = 16
    max_frame_context: int = 0
    batch_size: int = 2
    num_workers: int = 0
    prefetch_buffer: int = 2
    read_threads: int = 1
    decode_threads: int = 1
    shuffle: bool = True
    seed: int = 0
    num_epochs: int | None = None
    max_consecutive_bad: int = 100

    def __post_init__(self):
        for name in ("image_mean", "image_std", "length_buckets"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        views = []
        for view in self.tower_views:
            if len(view) != 4 or len(view[2]) != 3 or len(view[3]) != 3 or int(view[1]) < 1:
                raise ValueError(f"tower_views entries are (key, side, mean[3], std[3]); got "
                                 f"{view!r}")
            views.append((str(view[0]), int(view[1]), tuple(map(float, view[2])),
                          tuple(map(float, view[3]))))
        object.__setattr__(self, "tower_views", tuple(views))
        if not self.annotations:
            raise ValueError("PipelineConfig.annotations (the annotation file) is required")
        buckets = self.length_buckets
        if not buckets or any(b <= 0 for b in buckets) or list(buckets) != sorted(set(buckets)):
            raise ValueError(f"length_buckets must be positive and ascending, got {buckets}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError("image_mean and image_std need 3 values")
        if self.batch_size < 1 or self.max_frames < 1 or self.image_size < 1 or self.fps <= 0:
            raise ValueError("batch_size, max_frames, image_size and fps must be positive")
        if self.frame_subsample not in decode.SUBSAMPLE_RULES:
            raise ValueError(f"frame_subsample must be one of {decode.SUBSAMPLE_RULES}, got "
                             f"{self.frame_subsample!r}")
        if self.num_mel_bins < 0 or self.qformer_text_len < 0 or self.num_workers < 0:
            raise ValueError("num_mel_bins, qformer_text_len and num_workers must be >= 0")
        if self.beats_windows < 0 or self.beats_patch < 1 or self.max_frame_context < 0:
            raise ValueError("beats_windows and max_frame_context must be >= 0, beats_patch "
                             ">= 1")
        if self.beats_windows and (self.sample_rate != 16000 or self.fps != 1):
            raise ValueError(f"BEATs audio (beats_windows > 0) needs sample_rate 16000 and fps "
                             f"1, got {self.sample_rate} and {self.fps}")
        if self.sample_rate % 100:
            raise ValueError(f"sample_rate must be a multiple of 100 Hz, got {self.sample_rate}")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ValueError(f"num_epochs must be None or >= 1, got {self.num_epochs}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PipelineConfig":
        """From a dict or `ml_collections.ConfigDict`; unknown fields raise ValueError."""
        if hasattr(d, "to_dict"):
            d = d.to_dict()
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown PipelineConfig fields {unknown}; known: {sorted(known)}")
        return cls(**d)


def _as_config(cfg) -> PipelineConfig:
    return cfg if isinstance(cfg, PipelineConfig) else PipelineConfig.from_dict(cfg)


def make_dataset(
    cfg: PipelineConfig | Mapping[str, Any],
    *,
    num_video_tokens: Callable[[int], int],
    process_index: int = 0,
    process_count: int = 1,
) -> grain.IterDataset:
    """Builds the batched dataset for one process.

    Record i goes to process i % process_count (before shuffling, so each host reads its own
    slice); each epoch is shuffled with `cfg.seed` (deterministic, a new order per epoch).
    With a finite `num_epochs`, processes may see different batch counts when the records do
    not divide evenly or some fail.

    Args:
        cfg: `PipelineConfig` or a mapping / ConfigDict of its fields.
        num_video_tokens: picklable callable (module-level function or functools.partial):
            number of valid frames -> number of video placeholder tokens.
        process_index: this process (jax.process_index()).
        process_count: number of processes (jax.process_count()).

    Returns:
        A `grain.IterDataset` of batches (see the module docstring).

    Raises:
        AnnotationError: the annotation file is malformed (file-level problems, or every record
            malformed); malformed single records are skipped when iterating.
        ValueError: bad config, or no record for this process.
        RuntimeError: `num_workers > 0` while absl flags are not parsed.
    """
    cfg = _as_config(cfg)
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if cfg.num_workers > 0 and not flags.FLAGS.is_parsed():
        raise RuntimeError(
            "num_workers > 0 needs parsed absl flags (Grain's workers read them): run under "
            "absl.app.run or call absl.flags.FLAGS([sys.argv[0]]) first"
        )
    tok = tokenizer_lib.load_tokenizer(cfg.tokenizer)  # fail early; also gives the pad id
    source = JsonAnnotationSource(cfg.annotations, video_root=cfg.video_root, skip_bad_records=True)
    ds = grain.MapDataset.source(source)[process_index::process_count]
    if len(ds) == 0:
        raise ValueError(
            f"{cfg.annotations}: no records for process {process_index} of {process_count} "
            f"({len(source)} records)"
        )
    if cfg.shuffle:
        ds = ds.shuffle(seed=cfg.seed)
    ds = ds.repeat(cfg.num_epochs)
    ds = ds.map(DecodeExample(cfg=cfg, num_video_tokens=num_video_tokens))
    it = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=cfg.prefetch_buffer)
    )
    if cfg.num_workers > 0:
        it = it.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=cfg.num_workers, per_worker_buffer_size=max(1, cfg.prefetch_buffer)
            )
        )
    return SkipAndBatchIterDataset(
        it, batch_size=cfg.batch_size, buckets=cfg.length_buckets, pad=pad_id(tok),
        max_consecutive_bad=cfg.max_consecutive_bad,
    )


def make_iterator(
    cfg: PipelineConfig | Mapping[str, Any],
    *,
    num_video_tokens: Callable[[int], int],
    process_index: int = 0,
    process_count: int = 1,
    state: Mapping[str, Any] | None = None,
) -> grain.DatasetIterator:
    """An iterator over `make_dataset(...)`'s batches, optionally resumed from `state`.

    `it.get_state()` is a JSON-serialisable dict describing the position after the last batch
    returned; `it.set_state(s)` (or `state=s`) continues with the next batch. With workers, call
    `it.close()` when done.
    """
    it = make_dataset(
        cfg, num_video_tokens=num_video_tokens, process_index=process_index,
        process_count=process_count,
    ).__iter__()
    if state is not None:
        it.set_state(dict(state))
    return it
