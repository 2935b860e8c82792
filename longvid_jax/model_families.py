"""What the trainer needs to know about a model family, behind one small interface.

`config.model.name` picks the family (default "video_llm"):

  video_llm  `models.video_llm.VideoLLM`: one vision tower with pooling, Whisper audio, the
             TDC compressor; a video's token count depends on its frame count only, so the
             pipeline writes exactly that many placeholders.
  tdc        `models.tdc.TDCModel`, TDC as released: SigLIP + DINOv2, the SVA connector, the
             scene split (in-graph), the compressor with BERT WordPiece text, with a BEATs
             config the audio (the pipeline's 10 s fbank windows through the frozen BEATs,
             pooled per frame in-graph). The split is decided inside the step, so the
             pipeline reserves the most tokens any split can give
             (`qformer.max_video_tokens`) and the model drops the unused slots.

Each family gives: the module and its config, a zero batch with the pipeline's shapes (for
`init` / `eval_shape`), `init`, `forward` (batch -> final hidden states and the prompt fields
the loss reads targets from), the picklable placeholder count for the pipeline, the host-side
placeholder check, and the vocabulary sizes the tokenizers must fit.
"""

import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from longvid_jax.input import fbank
from longvid_jax.models import tdc, video_llm


def _prompt(batch: int, text_len: int) -> dict[str, np.ndarray]:
    return {"input_ids": np.zeros((batch, text_len), np.int32),
            "loss_mask": np.zeros((batch, text_len), bool),
            "segment_ids": np.ones((batch, text_len), np.int32),
            "positions": np.broadcast_to(np.arange(text_len, dtype=np.int32), (batch, text_len))}


def _qformer_text(batch: int, input_cfg) -> dict[str, np.ndarray]:
    return {"qformer_text_ids": np.zeros((batch, input_cfg.qformer_text_len), np.int32),
            "qformer_text_mask": np.ones((batch, input_cfg.qformer_text_len), bool)}


class ModelFamily:
    """What both families share; subclasses set `name`, `config`, `module`,
    `num_video_tokens` and `_qformer_vocab_field` (where the Q-Former's word table size lives
    in `config.model`)."""

    name: str
    _qformer_vocab_field: str

    @property
    def llm(self):
        return self.config.llm

    def check_placeholders(self, batch: Mapping[str, np.ndarray]) -> None:
        """Raises ValueError unless every row has `num_video_tokens(frames)` placeholders (a
        pipeline bug otherwise: the splice would misplace tokens)."""
        have = (batch["input_ids"] == video_llm.VIDEO_TOKEN_INDEX).sum(axis=1)
        frames = batch["frame_mask"].sum(axis=1)
        want = np.array([self.num_video_tokens(int(f)) for f in frames])
        if not np.array_equal(have, want):
            raise ValueError(f"video placeholders per row {have.tolist()} != video tokens "
                             f"{want.tolist()} for {frames.tolist()} frames")

    def vocab_tables(self) -> dict[str, tuple[int, bool]]:
        """{config name: (embedding rows, read with the Q-Former tokenizer?)}."""
        tables = {"model.llm.vocab_size": (self.config.llm.vocab_size, False)}
        if self.config.compressor is not None and self.config.compressor.text_input:
            tables[self._qformer_vocab_field] = (self.config.compressor.qformer.vocab_size,
                                                 True)
        return tables


class VideoLLMFamily(ModelFamily):
    """`VideoLLM` (see the module docstring)."""

    name = "video_llm"
    _qformer_vocab_field = "model.qformer.vocab_size"

    def __init__(self, model_cfg: Mapping[str, Any] | video_llm.VideoLLMConfig):
        self.config = (model_cfg if isinstance(model_cfg, video_llm.VideoLLMConfig)
                       else video_llm.make_config(model_cfg))
        self.module = video_llm.VideoLLM(self.config)

    def example_batch(self, input_cfg, *, batch: int = 1, text_len: int = 8
                      ) -> dict[str, np.ndarray]:
        """A zero batch with the shapes the pipeline produces."""
        f, s = input_cfg.max_frames, input_cfg.image_size
        return {
            "frames": np.zeros((batch, f, s, s, 3), np.float32),
            "frame_mask": np.ones((batch, f), bool),
            "timestamps": np.zeros((batch, f), np.float32),
            "audio_mel": np.zeros((batch, f, input_cfg.num_mel_bins,
                                   video_llm.MEL_FRAMES_PER_SECOND), np.float32),
            "audio_mask": np.ones((batch, f), bool),
            **_prompt(batch, text_len), **_qformer_text(batch, input_cfg)}

    def init(self, rng: jax.Array, batch: Mapping[str, Any]) -> dict:
        """Boxed variables (`nn.Partitioned` leaves carry the logical axes)."""
        return self.module.init(rng, batch)

    @staticmethod
    def forward(module: nn.Module, batch: Mapping[str, jax.Array]):
        """(hidden [B, T, D], the prompt fields targets come from: the batch itself)."""
        hidden, _ = module(batch)
        return hidden, batch

    @property
    def num_video_tokens(self):
        """Picklable: valid frames -> placeholders (exact)."""
        return functools.partial(video_llm.num_video_tokens, self.config)



class TDCFamily(ModelFamily):
    """`TDCModel` (see the module docstring). `config.model` holds `variant` (a
    `tdc.VARIANTS` key) and per-part overrides (`siglip`, `dinov2`, `connector`, `compressor`
    (None: the stage-1 model), `llm`, `beats`, `max_num_segments`, ...). The pipeline must
    give the DINOv2 view as `dino_frames` (`input.tower_views`) and, with `beats`, the audio
    (`input.beats_windows` > 0: `audio_fbank`, `audio_window_frames`, `audio_second_start`,
    `audio_second_count`, `audio_frame_start`, `audio_frame_count`, `audio_present`)."""

    name = "tdc"
    _qformer_vocab_field = "model.compressor.qformer.vocab_size"

    def __init__(self, model_cfg: Mapping[str, Any]):
        cfg = dict(model_cfg)
        variant = cfg.pop("variant", None)
        self.config = tdc.make_config(variant, **cfg)
        self.module = tdc.TDCModel(self.config)

    def example_batch(self, input_cfg, *, batch: int = 1, text_len: int = 8
                      ) -> dict[str, np.ndarray]:
        """A zero batch with the shapes the pipeline produces (SigLIP `frames`, DINOv2
        `dino_frames`, with `beats` the audio windows and their second / frame ranges).

        Raises:
          ValueError: the model has BEATs but the pipeline makes no audio
            (`input.beats_windows` 0), or the pipeline's patch size is not BEATs'.
        """
        c, f = self.config, input_cfg.max_frames
        s1, s2 = c.siglip.image_size, c.dinov2.patch_size * c.siglip.grid
        out = {"frames": np.zeros((batch, f, s1, s1, 3), np.float32),
               "dino_frames": np.zeros((batch, f, s2, s2, 3), np.float32),
               "frame_mask": np.ones((batch, f), bool),
               "image_sizes": np.full((batch, 2), s1, np.int32),
               **_prompt(batch, text_len), **_qformer_text(batch, input_cfg)}
        if c.beats is not None:
            w = input_cfg.beats_windows
            if w < 1 or input_cfg.beats_patch != c.beats.patch_size:
                raise ValueError(f"model.beats needs the pipeline's audio: input.beats_windows "
                                 f"> 0 (got {w}) and input.beats_patch == "
                                 f"{c.beats.patch_size} (got {input_cfg.beats_patch})")
            frames = fbank.num_fbank_frames(10 * input_cfg.sample_rate,
                                            sample_rate=input_cfg.sample_rate)
            out.update(audio_fbank=np.zeros((batch, w, frames, c.beats.num_mel_bins),
                                            np.float32),
                       audio_window_frames=np.full((batch, w), frames, np.int32),
                       audio_second_start=np.zeros((batch, 10 * w), np.int32),
                       audio_second_count=np.zeros((batch, 10 * w), np.int32),
                       audio_frame_start=np.zeros((batch, f), np.int32),
                       audio_frame_count=np.zeros((batch, f), np.int32),
                       audio_present=np.ones((batch,), bool))
        return out

    def init(self, rng: jax.Array, batch: Mapping[str, Any]) -> dict:
        """Boxed variables of every part used in training."""
        return self.module.init(rng, batch, method=tdc.TDCModel.forward_batch)

    @staticmethod
    def forward(module: nn.Module, batch: Mapping[str, jax.Array]):
        """(hidden [B, T, D] over the compacted prompt, its fields: targets come from these)."""
        hidden, aux = module.forward_batch(batch)
        return hidden, aux["batch"]

    @property
    def num_video_tokens(self):
        """Picklable: valid frames -> placeholders to reserve (`tdc.reserved_video_slots`)."""
        return functools.partial(tdc.reserved_video_slots, config=self.config)


FAMILIES = {f.name: f for f in (VideoLLMFamily, TDCFamily)}


def from_config(model_cfg: Mapping[str, Any]) -> VideoLLMFamily | TDCFamily:
    """The family `model_cfg["name"]` names (default "video_llm"), built from the rest.

    Raises:
      ValueError: an unknown name, or the family's own config errors.
    """
    cfg = dict(model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else model_cfg)
    name = cfg.pop("name", "video_llm")
    if name not in FAMILIES:
        raise ValueError(f"unknown model.name {name!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[name](cfg)
