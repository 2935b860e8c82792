"""TimeChat's timestamp-aware frame Q-Former and sliding video Q-Former.

Source: RenShuhuai-Andy/TimeChat `timechat/models/timechat.py` (`TimeChat.__init__`,
`init_video_Qformer`, `encode_videoQformer_visual`, window_size > 0 branch) and
`timechat/processors/video_processor.py` (`interpolate_frame_pos_embed`).

  frame Q-Former   per frame: QFormer(32 learned queries + the frame's timestamp sentence
                   "This frame is sampled at {t} second." as text, cross-attending the ViT tokens)
                   -> the WHOLE last hidden state [Q + L, D] (queries and text, padding included)
  video Q-Former   x[f] += frame_position_embedding[f]            (f = frame index, not time)
                   windows w = 0 .. ceil(F / stride) - 1 cover frames [w * stride, w * stride +
                   window), flattened to (frames * (Q + L)) encoder tokens; a 2-layer Q-Former
                   (cross-attention in every layer, no text) with Qv learned queries reads each
                   window; `llama_proj` maps [Qv, D] -> [Qv, D_llm]; windows are concatenated.

The windows are computed in one batched call: every window is padded to `window` frames and its
missing frames are masked out of the cross-attention keys (BERT's additive -10000, which
underflows to an exact 0 weight), so a padded window equals the original's shorter one and all
shapes are static.

Parameter tree of `TimeChatVideoQFormer` (original key in brackets, see
`convert/timechat_keys.py`):
  frame_position_embedding [max_frame_pos, E]   (video_frame_position_embedding.weight)
  qformer/...                                   (video_Qformer.bert.*, video_query_tokens)
  llama_proj {kernel [D, D_llm], bias}          (llama_proj.weight / .bias)
`TimeChatConnector` holds `frame_qformer` (Qformer.bert.*, query_tokens) and `video_qformer`.
"""

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from longvid_jax.models import ACT_BTD, EMBED
from longvid_jax.models.connectors import LinearProjector
from longvid_jax.models.layers import Dtype
from longvid_jax.models.qformer import QFormer, QFormerConfig, make_config


def _check_fields(cls, d: Mapping[str, Any]) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {unknown}; known: {sorted(known)}")


def _qformer_config(q, defaults: Mapping[str, Any]) -> QFormerConfig:
    if isinstance(q, QFormerConfig):
        return q
    d = dict(q or {})
    for k, v in defaults.items():
        d.setdefault(k, v)
    return make_config(**d)


# ----------------------------------------------------------------------------------------------
# Video Q-Former
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TimeChatVideoQFormerConfig:
    """The sliding video Q-Former and `llama_proj` (`TimeChat.init_video_Qformer`).

    Attributes:
      llm_width: D_llm, output width of `llama_proj` (LLaMA-2-7B: 4096).
      max_frame_pos: rows of the frame position table (TimeChat 96; Video-LLaMA's 32 rows are
        interpolated on load, see `interpolate_frame_positions`). Videos may have at most this
        many frames.
      window: frames per window (`window_size`); 0 = one window over the whole video (the
        original's `window_size <= 0` branch).
      stride: frames between window starts (`stride`; TimeChat uses window = stride = 32).
      qformer: `QFormerConfig` of the video Q-Former, or a dict for `make_config` (may name a
        `variant`; default variant `timechat_video`: 2 layers, cross-attention every layer, 32
        queries, no text); `encoder_width` is the width E of the frame Q-Former's output.
        Dtypes default to this config's.
      dtype, param_dtype: compute / storage dtypes.
    """

    llm_width: int = 4096
    max_frame_pos: int = 96
    window: int = 32
    stride: int = 32
    qformer: QFormerConfig | Mapping[str, Any] | None = None
    dtype: Dtype = "float32"
    param_dtype: Dtype = "float32"

    def __post_init__(self):
        q = _qformer_config(self.qformer, dict(variant="timechat_video", dtype=self.dtype,
                                               param_dtype=self.param_dtype))
        object.__setattr__(self, "qformer", q)
        if q.vocab_size != 0:
            raise ValueError("the video Q-Former has no text input: qformer.vocab_size must be 0")
        if q.num_queries < 1:
            raise ValueError("the video Q-Former needs learned queries (qformer.num_queries)")
        if self.window < 0 or self.max_frame_pos < 1:
            raise ValueError("window must be >= 0 and max_frame_pos >= 1")
        if self.window > 0 and self.stride < 1:
            raise ValueError(f"stride must be >= 1 with windows, got {self.stride}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TimeChatVideoQFormerConfig":
        """Builds a config from a dict that may name a `variant`; see `make_video_config`."""
        return make_video_config(**dict(d))


VIDEO_VARIANTS: dict[str, dict[str, Any]] = {
    # TimeChat-7B (`stage2_finetune_time104k_valley72k.yaml`): 96 frames, windows of 32.
    "timechat_7b": dict(llm_width=4096, max_frame_pos=96, window=32, stride=32),
    # The fixture timechat_video_qformer: tiny BERT, 4 queries, 12 positions, windows of 4.
    "tiny": dict(llm_width=48, max_frame_pos=12, window=4, stride=4,
                 qformer=dict(variant="tiny", depth=2, cross_attention_freq=1, num_queries=4,
                              encoder_width=32, vocab_size=0)),
}


def make_video_config(variant: str | None = None, **overrides) -> TimeChatVideoQFormerConfig:
    """Returns `TimeChatVideoQFormerConfig` of a named variant with overrides.

    Raises:
      ValueError: for an unknown variant or field.
    """
    if variant is not None and variant not in VIDEO_VARIANTS:
        raise ValueError(f"unknown TimeChat video variant {variant!r}; known: "
                         f"{sorted(VIDEO_VARIANTS)}")
    _check_fields(TimeChatVideoQFormerConfig, overrides)
    return TimeChatVideoQFormerConfig(**{**(VIDEO_VARIANTS[variant] if variant else {}),
                                         **overrides})


def window_layout(num_frames: int, cfg: TimeChatVideoQFormerConfig) -> tuple[int, int, int]:
    """(number of windows W, frames per window, stride) for F frames: W = ceil(F / stride) as
    `range(0, F, stride)` in the original; `window == 0` gives one window of F frames."""
    if cfg.window <= 0:
        return 1, num_frames, max(num_frames, 1)
    return -(-num_frames // cfg.stride), cfg.window, cfg.stride


def num_video_tokens(num_frames: int, cfg: TimeChatVideoQFormerConfig) -> int:
    """Number of LLM tokens TimeChat emits for F valid frames: Qv * ceil(F / stride)."""
    return window_layout(num_frames, cfg)[0] * cfg.qformer.num_queries


def interpolate_frame_positions(table: np.ndarray, new_len: int) -> np.ndarray:
    """Nearest-neighbour resize of a frame position table [n, E] -> [new_len, E].

    TimeChat applies this on load when the checkpoint's `video_frame_position_embedding` has a
    different length (Video-LLaMA's 32 rows -> TimeChat's 96: row o copies row floor(o / 3)).
    It follows torch `F.interpolate(mode='nearest')` on [1, E, n]: output row o takes input row
    `min(floor(o * s), n - 1)` with `s = float32(n / new_len)`, computed in float32 as torch's
    CPU kernel does (identity when the lengths match).

    Args:
      table: [n, E] array (any float dtype; kept).
      new_len: rows of the result.

    Returns:
      [new_len, E] array, rows copied (bitwise) from `table`.
    """
    n = table.shape[0]
    if new_len == n:
        return np.array(table)
    scale = np.float32(n) / np.float32(new_len)
    src = np.floor(np.arange(new_len, dtype=np.float32) * scale).astype(np.int64)
    return np.asarray(table)[np.minimum(src, n - 1)]


class TimeChatVideoQFormer(nn.Module):
    """Frame position embedding + sliding-window video Q-Former + `llama_proj`.

    Source: `TimeChat.encode_videoQformer_visual` after the frame Q-Former
    (`timechat/models/timechat.py`), vectorised over windows (see the module docstring).

    Attributes:
      config: `TimeChatVideoQFormerConfig`.
    """

    config: TimeChatVideoQFormerConfig

    @nn.compact
    def __call__(
        self,
        frame_states: Float[Array, "B F S E"],
        frame_mask: Bool[Array, "B F"] | None = None,
    ) -> tuple[Float[Array, "B T D"], Bool[Array, "B T"], dict[str, jax.Array]]:
        """Maps per-frame Q-Former outputs to the LLM tokens of each video.

        Args:
          frame_states: float[B, F, S, E], the frame Q-Former's whole last hidden state per
            frame (S = Q + L tokens: queries and timestamp text).
          frame_mask: bool[B, F], False for padded frames; the valid frames must be a prefix of
            each video. None = all valid.

        Returns:
          (tokens float[B, T, D_llm], token_mask bool[B, T], aux) with T = W * Qv,
          W = ceil(F / stride); window w's Qv tokens are at [w * Qv, (w + 1) * Qv). A window
          is valid when its first frame is; tokens of invalid windows are zero. aux:
            frame_hidden_state [B, F, S, E] (after the position embedding),
            window_states [B, W, window * S, E], window_mask [B, W, window * S] (encoder keys
            of each window; padded frames False), video_hidden [B, W, Qv, Dv] (video Q-Former
            output), llama_proj_out [B, W, Qv, D_llm] (unmasked).

        Raises:
          ValueError: if F > max_frame_pos or the width is not `qformer.encoder_width`.
        """
        cfg = self.config
        qcfg = cfg.qformer
        dtype, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        b, f, s, e = frame_states.shape
        if e != qcfg.encoder_width:
            raise ValueError(f"frame state width {e} != qformer.encoder_width {qcfg.encoder_width}")
        if f > cfg.max_frame_pos:
            raise ValueError(f"{f} frames > max_frame_pos {cfg.max_frame_pos}")
        if frame_mask is None:
            frame_mask = jnp.ones((b, f), bool)
        frame_mask = frame_mask.astype(bool)

        pos = self.param("frame_position_embedding", nn.with_logical_partitioning(
            nn.initializers.normal(0.02), (None, EMBED)), (cfg.max_frame_pos, e), pdt)
        x = frame_states.astype(dtype) + pos[:f].astype(dtype)[None, :, None, :]

        n_win, win, stride = window_layout(f, cfg)
        # Frame index of slot j of window w; slots past the video are masked.
        idx = np.arange(n_win)[:, None] * stride + np.arange(win)[None, :]  # [W, window]
        inside = jnp.asarray(idx < f)
        idx_c = np.minimum(idx, f - 1)
        xw = x[:, idx_c]  # [B, W, window, S, E]
        valid = frame_mask[:, idx_c] & inside[None]  # [B, W, window]
        enc = xw.reshape(b * n_win, win * s, e)
        enc_mask = jnp.broadcast_to(valid[..., None], (b, n_win, win, s)).reshape(b * n_win,
                                                                                   win * s)
        h, _ = QFormer(qcfg, name="qformer")(enc, encoder_mask=enc_mask)  # [B*W, Qv, Dv]
        h = nn.with_logical_constraint(h, ACT_BTD)
        qv, dv = h.shape[1], h.shape[2]
        y = LinearProjector(dv, cfg.llm_width, dtype=dtype, param_dtype=pdt,
                            name="llama_proj")(h)
        y = y.reshape(b, n_win, qv, cfg.llm_width)
        win_valid = valid[:, :, 0]  # a window is valid when its first frame is
        token_mask = jnp.broadcast_to(win_valid[..., None], (b, n_win, qv)).reshape(b, n_win * qv)
        tokens = jnp.where(token_mask[..., None], y.reshape(b, n_win * qv, -1), 0).astype(dtype)
        tokens = nn.with_logical_constraint(tokens, ACT_BTD)
        aux = dict(frame_hidden_state=x, window_states=xw.reshape(b, n_win, win * s, e),
                   window_mask=enc_mask.reshape(b, n_win, win * s),
                   video_hidden=h.reshape(b, n_win, qv, dv), llama_proj_out=y)
        return tokens, token_mask, aux


# ----------------------------------------------------------------------------------------------
# Frame Q-Former + video Q-Former
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TimeChatConfig:
    """TimeChat's visual connector: frame Q-Former then video Q-Former.

    Attributes:
      frame_qformer: `QFormerConfig` or dict for `make_config` (default variant
        `timechat_frame`: 12 layers, cross-attention every 2, 32 queries, encoder 1408 (EVA
        ViT-g), BERT vocabulary + `[DEC]` = 30523 ids; text = the timestamp sentence).
      video: `TimeChatVideoQFormerConfig` or dict for `make_video_config` (default variant
        `timechat_7b`); its `qformer.encoder_width` must equal `frame_qformer.width`.
      dtype, param_dtype: compute / storage dtypes (defaults of both parts).
    """

    frame_qformer: QFormerConfig | Mapping[str, Any] | None = None
    video: TimeChatVideoQFormerConfig | Mapping[str, Any] | None = None
    dtype: Dtype = "float32"
    param_dtype: Dtype = "float32"

    def __post_init__(self):
        dt = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        fq = _qformer_config(self.frame_qformer, dict(variant="timechat_frame", **dt))
        object.__setattr__(self, "frame_qformer", fq)
        v = self.video
        if not isinstance(v, TimeChatVideoQFormerConfig):
            d = dict(v or {})
            d.setdefault("variant", "timechat_7b")
            for k, val in dt.items():
                d.setdefault(k, val)
            v = make_video_config(**d)
            object.__setattr__(self, "video", v)
        if fq.vocab_size == 0 or fq.num_queries == 0:
            raise ValueError("the frame Q-Former needs learned queries and a text vocabulary")
        if v.qformer.encoder_width != fq.width:
            raise ValueError(f"video.qformer.encoder_width {v.qformer.encoder_width} != "
                             f"frame_qformer.width {fq.width}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TimeChatConfig":
        """Builds a config from a dict that may name a `variant`; see `make_timechat_config`."""
        return make_timechat_config(**dict(d))


TIMECHAT_VARIANTS: dict[str, dict[str, Any]] = {
    "timechat_7b": dict(frame_qformer=dict(variant="timechat_frame"),
                        video=dict(variant="timechat_7b")),
    # The fixtures timechat_frame_qformer + timechat_video_qformer.
    "tiny": dict(frame_qformer=dict(variant="tiny", num_queries=4, encoder_width=32,
                                    vocab_size=50),
                 video=dict(variant="tiny")),
}


def make_timechat_config(variant: str | None = None, **overrides) -> TimeChatConfig:
    """Returns `TimeChatConfig` of a named variant with overrides (parts may be dicts).

    Raises:
      ValueError: for an unknown variant or field.
    """
    if variant is not None and variant not in TIMECHAT_VARIANTS:
        raise ValueError(f"unknown TimeChat variant {variant!r}; known: "
                         f"{sorted(TIMECHAT_VARIANTS)}")
    _check_fields(TimeChatConfig, overrides)
    return TimeChatConfig(**{**(TIMECHAT_VARIANTS[variant] if variant else {}), **overrides})


class TimeChatConnector(nn.Module):
    """TimeChat's frame Q-Former (with timestamp text) and sliding video Q-Former.

    Source: `TimeChat.encode_videoQformer_visual` (`timechat/models/timechat.py`) from the
    `ln_vision` output on; the frame Q-Former is `Qformer.bert(timestamp_ids, attention_mask=
    [query ones | timestamp mask], query_embeds=query_tokens, encoder_hidden_states=image_embeds)`
    with all image tokens valid.

    Attributes:
      config: `TimeChatConfig`.
    """

    config: TimeChatConfig

    @nn.compact
    def __call__(
        self,
        image_embeds: Float[Array, "B F P E"],
        timestamp_ids: Int[Array, "B F T"],
        timestamp_mask: Bool[Array, "B F T"],
        frame_mask: Bool[Array, "B F"] | None = None,
    ) -> tuple[Float[Array, "B Tv D"], Bool[Array, "B Tv"], dict[str, jax.Array]]:
        """Encodes ViT frame tokens into TimeChat's LLM tokens.

        Args:
          image_embeds: float[B, F, P, E] ViT tokens after `ln_vision`.
          timestamp_ids: int32[B, F, T] BERT ids of "This frame is sampled at {t} second."
            (padded to the longest, [CLS] ... [SEP]).
          timestamp_mask: bool/int[B, F, T], False / 0 on text padding.
          frame_mask: bool[B, F] valid frames (a prefix); None = all valid.

        Returns:
          (tokens float[B, Tv, D_llm], token_mask bool[B, Tv], aux): see
          `TimeChatVideoQFormer`; aux also holds `frame_qformer_out` [B, F, Q + T, D].
        """
        cfg = self.config
        b, f, p, e = image_embeds.shape
        ln = timestamp_ids.shape[-1]
        h, _ = QFormer(cfg.frame_qformer, name="frame_qformer")(
            image_embeds.reshape(b * f, p, e), text_ids=timestamp_ids.reshape(b * f, ln),
            text_mask=timestamp_mask.reshape(b * f, ln).astype(bool))
        h = h.reshape(b, f, h.shape[1], h.shape[2])
        tokens, token_mask, aux = TimeChatVideoQFormer(cfg.video, name="video_qformer")(
            h, frame_mask)
        aux["frame_qformer_out"] = h
        return tokens, token_mask, aux
