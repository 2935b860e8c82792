"""The composite video LLM: vision tower + audio encoder + TDC compressor + decoder LLM.

Data flow for one batch (TDC, `tdc/cambrian_arch.py` `prepare_inputs_labels_for_multimodal`):

    frames [B, F, S, S, 3] --ViT--> [B, F, P, E] --pool--> [B, F, P', E] --mlp2x_gelu--> [B, F, P', D]
    audio_mel [B, F, C, 100] --Whisper encoder--> [B, F, 50, Ea] --avg pool--> [B, F, A, Ea]
    --TDC compressor (static frame + K Q-Former tokens per other frame, audio_proj)-->
        video tokens [B, Nmax, D] + validity mask
    input_ids [B, T] with VIDEO_TOKEN_INDEX placeholders --embed, splice--> [B, T, D] --LLM-->

The pipeline writes exactly `num_video_tokens(config, num_frames)` placeholders per example, and
the i-th placeholder receives the i-th valid video token (chunk order). Placeholders are never
loss targets (`losses.next_token_targets`).
"""

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from longvid_jax.models import ACT_BTD, audio, connectors, decoder, qformer, vit

VIDEO_TOKEN_INDEX = -200  # the originals' IMAGE_TOKEN_INDEX; see longvid_jax.input.chat
MEL_FRAMES_PER_SECOND = 100  # 16 kHz audio, hop 160


@dataclasses.dataclass(frozen=True)
class VideoLLMConfig:
    """Configuration of the whole model; sub-configs own their defaults.

    Attributes:
      llm, vision, audio, compressor: sub-configs (`audio=None` trains without audio).
      vision_pool: output token grid (rows, cols) per frame after the projector-side pooling, or
        None to keep the ViT's full grid (TDC reaches 12x12=144 through its SVA connector; plain
        pooling stands in for it here).
      audio_tokens_per_second: A, tokens per second after average-pooling the encoder's 50/s.
    """

    llm: decoder.DecoderConfig
    vision: vit.ViTConfig
    audio: audio.WhisperEncoderConfig | None
    compressor: qformer.TDCCompressorConfig
    vision_pool: tuple[int, int] | None = None
    audio_tokens_per_second: int = 50

    @property
    def vision_grid(self) -> tuple[int, int]:
        g = self.vision.image_size // self.vision.patch_size
        return (g, g)

    @property
    def tokens_per_frame(self) -> int:
        rows, cols = self.vision_pool or self.vision_grid
        return rows * cols

    @property
    def audio_tokens_per_frame(self) -> int:
        return self.audio_tokens_per_second if self.audio is not None else 0


def make_config(cfg: Mapping[str, Any]) -> VideoLLMConfig:
    """Builds a `VideoLLMConfig` from `config.model` (a ConfigDict or dict).

    Expected keys: `llm`, `vision`, `audio` (or None), `qformer`, `compressor` (dicts of the
    sub-config fields, each may name a `variant`), `vision_pool`, `audio_tokens_per_second`,
    and optionally `dtype` applied to every part.

    Raises:
      ValueError: unknown fields, or sizes that do not fit together.
    """
    cfg = dict(cfg)
    known = {"llm", "vision", "audio", "qformer", "compressor", "vision_pool",
             "audio_tokens_per_second", "dtype"}
    unknown = set(cfg) - known
    if unknown:
        raise ValueError(f"unknown config.model fields: {sorted(unknown)}")
    common = {"dtype": cfg["dtype"]} if cfg.get("dtype") else {}
    llm = decoder.make_config(**{**common, **dict(cfg["llm"])})
    vision = vit.make_config(**{**common, **dict(cfg["vision"])})
    aud = (audio.make_config(**{**common, **dict(cfg["audio"])})
           if cfg.get("audio") is not None else None)
    qf = qformer.make_config(**{**common, "encoder_width": llm.hidden_size, "num_queries": 0,
                                **dict(cfg["qformer"])})
    comp = qformer.TDCCompressorConfig(
        llm_width=llm.hidden_size, qformer=qf,
        audio_width=aud.width if aud is not None else 0, **dict(cfg.get("compressor") or {}))
    pool = cfg.get("vision_pool")
    a_per_s = int(cfg.get("audio_tokens_per_second", 50))
    if aud is not None and (MEL_FRAMES_PER_SECOND // 2) % a_per_s:
        raise ValueError(f"audio_tokens_per_second={a_per_s} must divide the encoder's "
                         f"{MEL_FRAMES_PER_SECOND // 2} tokens per second")
    return VideoLLMConfig(llm=llm, vision=vision, audio=aud, compressor=comp,
                          vision_pool=tuple(pool) if pool else None,
                          audio_tokens_per_second=a_per_s)


def num_video_tokens(config: VideoLLMConfig, num_frames: int) -> int:
    """Number of LLM positions a video of `num_frames` sampled frames occupies (exact)."""
    return qformer.num_video_tokens(num_frames, config.tokens_per_frame,
                                    config.audio_tokens_per_frame, config.compressor)


def splice_video_tokens(text_embeds: jax.Array, input_ids: jax.Array,
                        video_tokens: jax.Array) -> jax.Array:
    """Writes the valid video tokens, in order, at the placeholder positions.

    Args:
      text_embeds: [B, T, D] token embeddings (placeholders embedded as any id).
      input_ids: int32[B, T]; `VIDEO_TOKEN_INDEX` marks placeholders.
      video_tokens: [B, N, D]; the valid tokens of each row form a prefix, in order
        (`TDCCompressor` guarantees it), and their number equals the row's placeholder count
        (the pipeline guarantees it; the trainer checks on the host).

    Returns:
      [B, T, D] embeddings.
    """
    is_video = input_ids == VIDEO_TOKEN_INDEX
    slot = jnp.clip(jnp.cumsum(is_video, axis=1) - 1, 0, video_tokens.shape[1] - 1)
    gathered = jnp.take_along_axis(video_tokens, slot[..., None], axis=1)
    return jnp.where(is_video[..., None], gathered.astype(text_embeds.dtype), text_embeds)


def drop_unused_video_slots(batch: Mapping[str, jax.Array], num_video: jax.Array,
                            pad_id: int = 0) -> dict[str, jax.Array]:
    """Removes the video placeholders a row does not fill and closes the gap (in-graph).

    A TDC training batch reserves the largest possible number of video slots, because the
    tokens a video yields depend on its scene split, computed inside the step
    (`scene_split.segment_starts`). Row b keeps its first `num_video[b]` placeholders (the
    compressor's valid tokens, in order) and every other token; the kept tokens move to the
    front in their order (as the original builds the sequence before padding it), positions
    are renumbered without the dropped slots, and the freed tail becomes padding (segment 0,
    no loss, `pad_id`).

    Args:
      batch: `input_ids`, `positions`, `segment_ids` int32[B, T] and `loss_mask` bool[B, T]
        (other [B, T, ...] per-token fields are reordered the same way); `VIDEO_TOKEN_INDEX`
        marks placeholders.
      num_video: int32[B] valid video tokens per row (`TDCCompressor`'s mask sum), at most
        the row's placeholder count.
      pad_id: id written into the freed tail.

    Returns:
      The same fields, compacted.
    """
    ids = batch["input_ids"]
    t = ids.shape[1]
    is_video = ids == VIDEO_TOKEN_INDEX
    rank = jnp.cumsum(is_video, axis=1) - 1
    keep = ~is_video | (rank < num_video[:, None])
    order = jnp.argsort(~keep, axis=1, stable=True)  # kept tokens first, in order
    valid = jnp.arange(t)[None, :] < keep.sum(axis=1, keepdims=True)
    dropped_before = jnp.cumsum(~keep, axis=1) - (~keep)

    def take(x):
        idx = order.reshape(order.shape + (1,) * (x.ndim - 2))
        return jnp.take_along_axis(x, idx, axis=1)

    out = {k: take(v) for k, v in batch.items()
           if k not in ("positions",) and v.ndim >= 2 and v.shape[1] == t}
    out["positions"] = jnp.where(valid, take(batch["positions"] - dropped_before), 0)
    out["input_ids"] = jnp.where(valid, out["input_ids"], pad_id)
    out["segment_ids"] = jnp.where(valid, out["segment_ids"], 0)
    out["loss_mask"] = valid & out["loss_mask"]
    return out


class VideoLLM(nn.Module):
    """TDC-style audio-visual LLM (Hoar012/TDC-Video `CambrianQwenForCausalLM`, simplified to one
    vision tower with pooling in place of the SVA connector)."""

    config: VideoLLMConfig

    def setup(self):
        c = self.config
        self.vision_tower = vit.ViT(c.vision)
        self.projector = connectors.MLPProjector(
            in_width=c.vision.width, out_width=c.llm.hidden_size, dtype=c.llm.dtype,
            param_dtype=c.llm.param_dtype)
        self.audio_encoder = audio.WhisperEncoder(c.audio) if c.audio is not None else None
        self.compressor = qformer.TDCCompressor(c.compressor)
        self.llm = decoder.Decoder(c.llm)

    def encode_frames(self, frames: jax.Array) -> jax.Array:
        """float32[B, F, S, S, 3] normalised frames -> visual tokens [B, F, P', D]."""
        b, f = frames.shape[:2]
        tokens, _ = self.vision_tower(frames.reshape(b * f, *frames.shape[2:]))
        if self.config.vision_pool is not None:
            tokens = connectors.pool_tokens_2d(tokens, self.config.vision_grid,
                                               self.config.vision_pool)
        tokens = self.projector(tokens)
        return tokens.reshape(b, f, *tokens.shape[1:])

    def encode_audio(self, audio_mel: jax.Array) -> jax.Array:
        """float32[B, F, C, 100] per-second log-mel -> audio tokens [B, F, A, Ea]."""
        b, f, c, a_in = audio_mel.shape
        enc, _ = self.audio_encoder(audio_mel.reshape(b * f, c, a_in))  # [B*F, 50, Ea]
        per = enc.shape[1] // self.config.audio_tokens_per_second
        enc = enc[:, : per * self.config.audio_tokens_per_second]
        enc = enc.reshape(b * f, self.config.audio_tokens_per_second, per, enc.shape[-1])
        return enc.mean(axis=2).reshape(b, f, self.config.audio_tokens_per_second, -1)

    def encode_video(self, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        """Video tokens `[B, Nmax, D]` and their validity mask `bool[B, Nmax]` for a batch.

        Reads `frames`, `frame_mask`, and when present `audio_mel`, `qformer_text_ids`,
        `qformer_text_mask` (see `longvid_jax.input.pipeline`).
        """
        frame_tokens = self.encode_frames(batch["frames"])
        audio_tokens = None
        if self.audio_encoder is not None:
            audio_tokens = self.encode_audio(batch["audio_mel"])
        text_ids = batch.get("qformer_text_ids") if self.config.compressor.text_input else None
        text_mask = batch.get("qformer_text_mask") if text_ids is not None else None
        tokens, mask, _ = self.compressor(
            frame_tokens, batch["frame_mask"], audio_tokens=audio_tokens, text_ids=text_ids,
            text_mask=text_mask)
        return tokens, mask

    def __call__(self, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, dict]:
        """Final hidden states `[B, T, D]` of the LLM over the spliced sequence.

        Args:
          batch: `input_ids` int32[B, T], `positions` int32[B, T], `segment_ids` int32[B, T]
            and the video fields read by `encode_video`.

        Returns:
          (hidden [B, T, D], aux) with aux["video_tokens"] [B, Nmax, D].
        """
        ids = batch["input_ids"]
        text = self.llm.embed(jnp.where(ids == VIDEO_TOKEN_INDEX, 0, ids))
        video, video_mask = self.encode_video(batch)
        embeds = splice_video_tokens(text, ids, video)
        embeds = nn.with_logical_constraint(embeds, ACT_BTD)
        hidden, _ = self.llm(embeds, batch["positions"], batch["segment_ids"])
        return hidden, {"video_tokens": video, "video_mask": video_mask}

    def logits(self, hidden: jax.Array) -> jax.Array:
        """float32[B, T, V] next-token logits."""
        return self.llm.logits(hidden)
