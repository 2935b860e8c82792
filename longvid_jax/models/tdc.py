"""TDC as released: SigLIP + DINOv2 towers, the SVA connector, the temporal compressor, the LLM.

Follows Hoar012/TDC-Video @ fb8333e, `tdc/cambrian_arch.py` (`encode_images`,
`prepare_inputs_labels_for_multimodal`, `adapt_segment`) and `tdc/vision_sampler.py`; the facts
are in `shared/reference/ORIGINALS.md` section 1. Per video of F frames (sampled at 1 fps):

  frames --expand2square--> SigLIP-so400m (384 px, all 27 layers, 27x27 tokens)
                          + DINOv2-giant  (378 px, class token dropped, 27x27 tokens)
         --bilinear to 24x24 each--> SVA connector (144 queries, 3 layers, mm_projector)
         --unpad_image + image_newline per row--> rows * (cols + 1) tokens per frame
            (156 for a square frame; with the original's (H, W) swap a 16:9 frame keeps 12 x 6)
  DINOv2 features --consecutive cosine similarity--> scene segments (`scene_split`, host)
  --TDC compressor: per chunk of 8 frames a static frame (all its tokens + its audio tokens),
    the others 16 Q-Former tokens each, `frame_seg` after every frame--> video tokens
  spliced at the `<image>` placeholder of the prompt --> the LLM.

At inference the scene split runs on the host between `encode_frames` and `compress` (its
segmentation sets the token layout, which the prompt must know):
`longvid_jax.models.scene_split.scene_layout`. A training step (`forward_batch`) splits in-graph
(`scene_split.segment_starts`) into a prompt that reserves the largest possible number of video
slots, and drops the slots left unused (`video_llm.drop_unused_video_slots`).
Parameter tree: `siglip`, `dinov2`, `connector`, `compressor`, `llm` (and `beats` with audio),
the names `convert/tdc_keys.py` imports the release into.

Letters: B videos, F frames, G final grid side, D LLM width, E_i tower widths.
"""

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from longvid_jax.models import beats as beats_lib
from longvid_jax.models import connectors, decoder, dinov2, qformer, scene_split, sva, vit

TOWER_GRID = 24  # both towers' grids are interpolated to 24 x 24 before the connector
AUDIO_TOKENS_PER_FRAME = 50  # BEATs tokens attached to each static frame (pooled per second)
INFERENCE_MAX_LENGTH = 16  # tokens the original keeps free for generation (`max_visual_len`)
# Tower preprocessing (each processor's mean / std; `expand2square` fills with the mean).
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)
DINO_MEAN, DINO_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class TDCConfig:
    """The parts of a TDC model.

    Attributes:
      siglip: SigLIP tower (`vit.ViTConfig`; TDC uses the last layer's output before the
        post-LN).
      dinov2: DINOv2 tower (`dinov2.Dinov2Config`, class token dropped).
      connector: `sva.SVAConfig`; its `tower_grids` are the interpolated grids and its
        `swap_image_size_hw` the original's (H, W) quirk (True for the released weights).
      compressor: `qformer.TDCCompressorConfig` (`audio_width` 0 without audio), or None: the
        stage-1 model (LongVU_*_img config: single images, no compressor, which TDC creates
        only in stage 2), whose video tokens are each frame's connector tokens in order.
      llm: `decoder.DecoderConfig`.
      beats: `beats.BEATsConfig` of the audio tower, or None without audio.
      tower_grid: side both towers' token grids are resized to (bilinear, as the original's
        `F.interpolate`).
      max_num_segments: scene boundaries per video (`adapt_segment`; TDC stages 2 / 3: 24).
      max_context: the LLM's training length (`tokenizer_model_max_length`, 8192): video
        tokens beyond `max_context - 16 - text tokens` are trimmed per chunk
        (`overflow_keep`) and sequences are cut to it.
    """

    siglip: vit.ViTConfig
    dinov2: dinov2.Dinov2Config
    connector: sva.SVAConfig
    compressor: qformer.TDCCompressorConfig | None
    llm: decoder.DecoderConfig
    beats: beats_lib.BEATsConfig | None = None
    tower_grid: int = TOWER_GRID
    max_num_segments: int = 24
    max_context: int = scene_split.MAX_CONTEXT

    def __post_init__(self):
        widths = (self.siglip.width, self.dinov2.width)
        if tuple(self.connector.tower_widths) != widths:
            raise ValueError(f"connector.tower_widths {self.connector.tower_widths} != the "
                             f"towers' widths {widths}")
        if tuple(self.connector.tower_grids) != (self.tower_grid,) * 2:
            raise ValueError(f"connector.tower_grids {self.connector.tower_grids} != "
                             f"({self.tower_grid}, {self.tower_grid})")
        if self.dinov2.keep_cls:
            raise ValueError("TDC drops DINOv2's class token: dinov2.keep_cls must be False")
        widths = [("connector.llm_width", self.connector.llm_width)]
        if self.compressor is not None:
            widths.append(("compressor.llm_width", self.compressor.llm_width))
        for name, width in widths:
            if width != self.llm.hidden_size:
                raise ValueError(f"{name} {width} != llm.hidden_size {self.llm.hidden_size}")
        if self.compressor is None:
            if self.beats is not None:
                raise ValueError("audio needs the compressor: beats must be None without one")
            return
        if (self.beats is None) != (self.compressor.audio_width == 0):
            raise ValueError("give a beats config exactly when compressor.audio_width > 0")
        if self.beats is not None and self.beats.width != self.compressor.audio_width:
            raise ValueError(f"compressor.audio_width {self.compressor.audio_width} != "
                             f"beats.width {self.beats.width}")

    @property
    def final_grid(self) -> int:
        """G, side of the connector's output grid."""
        return self.connector.final_grid or self.connector.query_grid

    @property
    def frame_slots(self) -> int:
        """G * (G + 1): token slots per frame after `image_newline` (valid ones are a prefix)."""
        return self.final_grid * (self.final_grid + 1)


VARIANTS: dict[str, dict[str, Any]] = {
    # Released TDC-Qwen2-7B (audio on) and TDC-Llama3.2-3B.
    # (DINOv2 keeps its 518-px position table and is run at 378 px, interpolating it.)
    "qwen2_7b": dict(siglip=dict(variant="so400m_14_384"), dinov2=dict(variant="giant_14"),
                     connector=dict(variant="tdc_qwen2_7b"),
                     compressor=dict(variant="qwen2_7b"), llm=dict(variant="qwen2_7b"),
                     beats=dict(variant="iter3_as2m")),
    "llama3_2_3b": dict(siglip=dict(variant="so400m_14_384"), dinov2=dict(variant="giant_14"),
                        connector=dict(variant="tdc_llama3_2_3b"),
                        compressor=dict(variant="llama3_2_3b"), llm=dict(variant="llama3_2_3b"),
                        beats=dict(variant="iter3_as2m")),
    # Tests: 32 px towers (4 x 4 tokens) resized to 6 x 6, a 3 x 3 query grid, tiny LLM.
    "tiny": dict(siglip=dict(variant="tiny", width=24),
                 dinov2=dict(variant="tiny", width=40, keep_cls=False),
                 connector=dict(variant="tiny", llm_width=64),
                 compressor=dict(llm_width=64, num_tokens=4, audio_width=32,
                                 qformer=dict(variant="tiny")),
                 llm=dict(variant="tiny"), beats=dict(variant="tiny"), tower_grid=6),
}


def make_config(variant: str | None = None, **overrides: Any) -> TDCConfig:
    """Builds a `TDCConfig` from a named variant; each part may be overridden by a dict of its
    fields (merged into the variant's) or a ready config. `dtype` / `param_dtype` given here
    apply to every part.

    Raises:
      ValueError: unknown variant or field, or parts whose sizes do not fit together.
    """
    if variant is not None and variant not in VARIANTS:
        raise ValueError(f"unknown TDC variant {variant!r}; known: {sorted(VARIANTS)}")
    base = dict(VARIANTS[variant]) if variant else {}
    common = {k: overrides.pop(k) for k in ("dtype", "param_dtype") if k in overrides}
    fields = {f.name for f in dataclasses.fields(TDCConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown TDCConfig fields {unknown}; known: {sorted(fields)}")
    builders = {"siglip": lambda d: vit.make_config(**d),
                "dinov2": lambda d: dinov2.make_config(**d),
                "connector": lambda d: sva.make_config(**d),
                "compressor": lambda d: qformer.make_tdc_config(**d),
                "llm": lambda d: decoder.make_config(d.pop("variant", None), **d),
                "beats": lambda d: beats_lib.make_config(**d)}
    kw: dict[str, Any] = {}
    for name in fields:
        value = overrides.get(name, base.get(name))
        if name in builders and isinstance(value, Mapping):
            part = dict(base.get(name) or {})
            if name in overrides:
                part.update(value)
            value = builders[name]({**part, **common})
        if value is not None or (name == "compressor" and name in overrides):
            kw[name] = value  # compressor=None given: the stage-1 model
    missing = sorted({"siglip", "dinov2", "connector", "compressor", "llm"} - set(kw))
    if missing:
        raise ValueError(f"TDCConfig parts {missing} not given (variant={variant!r})")
    return TDCConfig(**kw)


def reserved_video_slots(num_frames: int, config: TDCConfig) -> int:
    """Video placeholders a training prompt reserves for `num_frames` valid frames: the most
    tokens any scene split can give (`qformer.max_video_tokens`), at most what the context can
    hold (`max_context - 16`); `forward_batch` drops the slots its split leaves unused. Without
    a compressor (stage 1) every frame's `frame_slots` (its unpadded count depends on the
    aspect ratio)."""
    if config.compressor is None:
        return min(num_frames * config.frame_slots, config.max_context - INFERENCE_MAX_LENGTH)
    audio = 0 if config.beats is None else AUDIO_TOKENS_PER_FRAME
    most = qformer.max_video_tokens(num_frames, config.frame_slots, audio, config.compressor,
                                    config.max_num_segments)
    return min(most, config.max_context - INFERENCE_MAX_LENGTH)


def overflow_keep(token_mask: Bool[Array, "B N"], token_frame: Int[Array, "B N"],
                  frame_lengths: Int[Array, "B F"], is_static: Bool[Array, "B F"],
                  max_visual_len: Int[Array, " B"]) -> Bool[Array, "B N"]:
    """Which compressor output tokens survive TDC's overflow rule (in-graph).

    As `prepare_inputs_labels_for_multimodal` (tdc/cambrian_arch.py): when a video's tokens
    exceed `max_visual_len` (= context - 16 - text tokens), every chunk (a static frame and the
    frames up to the next static one) loses its last `ceil(excess / chunks)` tokens, then the
    sequence is cut to `max_visual_len`.

    Args:
      token_mask, token_frame: the compressor's valid mask and `aux["token_frame"]`.
      frame_lengths, is_static: `aux["frame_token_lengths"]`, `aux["is_static"]`.
      max_visual_len: int32[B] video tokens that fit beside each row's text.

    Returns:
      bool[B, N], True on the kept tokens (their order is kept; compact them).
    """
    b, f = frame_lengths.shape
    starts = is_static & (frame_lengths > 0)
    chunk_of_frame = jnp.maximum(jnp.cumsum(starts, axis=1) - 1, 0)
    rows = jnp.arange(b)[:, None]
    chunk_len = jnp.zeros((b, f), jnp.int32).at[rows, chunk_of_frame].add(frame_lengths)
    chunk_start = jnp.cumsum(chunk_len, axis=1) - chunk_len
    tok_chunk = jnp.take_along_axis(chunk_of_frame, token_frame, axis=1)
    pos = (jnp.arange(token_frame.shape[1])[None, :]
           - jnp.take_along_axis(chunk_start, tok_chunk, axis=1))
    excess = frame_lengths.sum(axis=1) - max_visual_len
    chunks = jnp.maximum(starts.sum(axis=1), 1)
    force = jnp.where(excess > 0, -(-excess // chunks), 0)
    keep = token_mask & (pos < jnp.take_along_axis(chunk_len, tok_chunk, axis=1) - force[:, None])
    rank = jnp.cumsum(keep, axis=1) - 1
    return keep & (rank < max_visual_len[:, None])


def pool_frame_audio(tokens: Float[Array, "B A R E"], start: Int[Array, "B F"],
                     count: Int[Array, "B F"], *, step_mask: Bool[Array, "B A"] | None = None,
                     num_out: int = AUDIO_TOKENS_PER_FRAME) -> Float[Array, "B F Q E"]:
    """Ranges of tokens average-pooled to `num_out` each, in-graph (`tdc_frame_audio` runs it
    twice: per second, then per frame).

    Group f of row b owns the steps `[start, start + count)` (computed on the host); their
    `count * R` tokens (step-major, the R tokens of a step in order) are average-pooled to
    `num_out` (`adaptive_avg_pool1d`: output j averages tokens `[floor(j n / Q),
    ceil((j + 1) n / Q))` of the group's n); a group with count 0 gets zeros. Static shapes, no host loop: one
    cumulative sum over the row's flattened tokens, and each output is a difference of two of
    its entries divided by the bin's size. The tokens are centred first (minus their mean over
    `step_mask`'s steps; the mean is added back), which keeps the float32 prefix sums small:
    with BEATs features of a consistent sign they would otherwise grow with the track and
    lose precision in the differences.

    Args:
      tokens: float[B, A, R, E] tokens in A steps of R (R, a local letter: 1 for single
        tokens).
      start, count: int32[B, F] each group's steps (count 0: none; padding groups too).
      step_mask: bool[B, A] steps that hold data (for the centring only; None: all).
      num_out: Q, tokens per group (TDC: 50).

    Returns:
      float32[B, F, Q, E].
    """
    b, s, r, e = tokens.shape
    x = tokens.reshape(b, s * r, e).astype(jnp.float32)
    if step_mask is None:
        step_mask = jnp.ones((b, s), bool)
    w = jnp.repeat(step_mask, r, axis=1).astype(jnp.float32)[..., None]  # [B, A*R, 1]
    center = (x * w).sum(axis=1, keepdims=True) / jnp.maximum(w.sum(axis=1, keepdims=True), 1)
    prefix = jnp.concatenate([jnp.zeros((b, 1, e), jnp.float32),
                              jnp.cumsum(x - center, axis=1)], axis=1)  # [B, A*R + 1, E]
    n = (count * r)[..., None]  # [B, F, 1] tokens of each frame
    j = jnp.arange(num_out, dtype=jnp.int32)
    lo = (start * r)[..., None] + (j * n) // num_out  # [B, F, Q]
    hi = (start * r)[..., None] + -(-((j + 1) * n) // num_out)
    f = start.shape[1]

    def at(idx):
        return jnp.take_along_axis(prefix, idx.reshape(b, f * num_out, 1), axis=1)

    mean = (at(hi) - at(lo)) / jnp.maximum(hi - lo, 1).reshape(b, f * num_out, 1) + center
    return jnp.where(n[..., None] > 0, mean.reshape(b, f, num_out, e), 0.0)


def tdc_frame_audio(tokens: Float[Array, "B N E"], token_valid: Bool[Array, "B N"],
                    second_start: Int[Array, "B S"], second_count: Int[Array, "B S"],
                    frame_start: Int[Array, "B F"], frame_count: Int[Array, "B F"]
                    ) -> Float[Array, "B F Q E"]:
    """Each kept frame's 50 audio tokens from a track's BEATs tokens, as TDC computes them
    (`cambrian_arch.py`, `prepare_inputs_labels_for_multimodal`, the BEATs branch), in-graph.

    TDC slices each second's tokens out of its 10 s window (50 per second;
    `input.fbank.tdc_second_tokens`) and pools a slice of fewer than 50 up to 50
    (`adaptive_avg_pool2d` to (50, 768)); a kept frame's audio is the concatenation of its own
    second's 50 and those of the skipped seconds after it (`input.fbank.tdc_frame_seconds`),
    pooled to 50 the same way (one second: unchanged). Both stages are `pool_frame_audio`.

    Args:
      tokens: float[B, N, E] BEATs tokens of each row's windows, window after window (window w
        at `w * tokens_per_window`, time-major inside), padding anywhere `token_valid` is False.
      token_valid: bool[B, N] the real tokens (for the centring of the prefix sums only).
      second_start, second_count: int32[B, S] each second's tokens (`tdc_second_tokens`).
      frame_start, frame_count: int32[B, F] each frame's range over the per-second blocks
        (`tdc_frame_seconds`, in block tokens: 50 per second).

    Returns:
      float32[B, F, 50, E]; zeros for frames without audio.
    """
    b, n, e = tokens.shape
    per_second = pool_frame_audio(tokens[:, :, None], second_start, second_count,
                                  step_mask=token_valid)  # [B, S, 50, E]
    s = per_second.shape[1]
    blocks = per_second.reshape(b, s * AUDIO_TOKENS_PER_FRAME, 1, e)
    block_mask = jnp.repeat(second_count > 0, AUDIO_TOKENS_PER_FRAME, axis=1)
    return pool_frame_audio(blocks, frame_start, frame_count, step_mask=block_mask)


class TDCModel(nn.Module):
    """TDC (`CambrianQwenForCausalLM` / `CambrianLlamaForCausalLM` with the TDC compressor).

    Public methods (each under `apply(..., method=...)`): `encode_frames` (towers + connector,
    per frame), `compress` (scene-split frames -> video tokens), `__call__` (prompt with
    spliced video tokens -> final hidden states), `logits`.
    """

    config: TDCConfig

    def setup(self):
        c = self.config
        self.siglip = vit.ViT(c.siglip)
        self.dinov2 = dinov2.Dinov2(c.dinov2)
        self.connector = sva.SVAConnector(c.connector)
        if c.compressor is not None:
            self.compressor = qformer.TDCCompressor(c.compressor)
        self.llm = decoder.Decoder(c.llm)
        if c.beats is not None:
            self.beats = beats_lib.BEATs(c.beats)

    def _tower_tokens(self, tokens: jax.Array) -> jax.Array:
        """[N, g*g, E] square-grid tokens -> [N, tower_grid^2, E] (bilinear, as `interpolate`)."""
        g = int(round(tokens.shape[1] ** 0.5))
        if g * g != tokens.shape[1]:
            raise ValueError(f"tower tokens {tokens.shape[1]} do not form a square grid")
        t = self.config.tower_grid
        if g == t:
            return tokens
        return connectors.pool_tokens_2d(tokens, (g, g), (t, t), "bilinear")

    def encode_frames(self, siglip_pixels: Float[Array, "N S1 S1 3"],
                      dino_pixels: Float[Array, "N S2 S2 3"],
                      image_sizes: Int[Array, "N 2"] | None = None, *,
                      stop_tower_gradients: bool = False,
                      ) -> tuple[Float[Array, "N G1 D"], Int[Array, " N"], dict[str, jax.Array]]:
        """Per-frame LLM tokens of N frames (`encode_images` + SVA + unpad + `image_newline`).

        Args:
          siglip_pixels: float[N, S1, S1, 3] square frames normalised for SigLIP (384 px).
          dino_pixels: float[N, S2, S2, 3] the same frames normalised for DINOv2 (378 px).
          image_sizes: int32[N, 2] the frames' (height, width) in pixels before
            `expand2square`, as TDC stores them (read per `connector.swap_image_size_hw`);
            None = square frames.
          stop_tower_gradients: treat the towers' features as constants (frozen towers).

        Returns:
          (tokens [N, G * (G + 1), D] in the LLM dtype, valid prefix per frame then zeros;
           counts int32[N], rows * (cols + 1) valid tokens per frame; aux with
           `dino_features` [N, tower_grid^2, E_dino] (the scene split's input) and
           `siglip_features` [N, tower_grid^2, E_siglip]).
        """
        _, s_aux = self.siglip(siglip_pixels)
        siglip_feats = self._tower_tokens(s_aux["encoder_output"])  # pre post-LN, all layers
        dino_tokens, _ = self.dinov2(dino_pixels)
        dino_feats = self._tower_tokens(dino_tokens)
        if stop_tower_gradients:
            siglip_feats = jax.lax.stop_gradient(siglip_feats)
            dino_feats = jax.lax.stop_gradient(dino_feats)
        tokens, grid, c_aux = self.connector([siglip_feats, dino_feats], image_sizes)
        out, mask = sva.newline_layout(tokens, grid, c_aux["image_newline"])
        counts = jnp.sum(mask, axis=1).astype(jnp.int32)
        return out, counts, {"dino_features": dino_feats, "siglip_features": siglip_feats}

    def compress(self, frame_tokens: Float[Array, "B F G1 D"], frame_counts: Int[Array, " B"],
                 frame_mask: Bool[Array, "B F"], *,
                 segment_starts: Bool[Array, "B F"] | None = None,
                 audio_tokens: Float[Array, "B F A Ea"] | None = None,
                 text_ids: Int[Array, "B T"] | None = None,
                 text_mask: Bool[Array, "B T"] | None = None,
                 max_tokens: int | None = None,
                 audio_present: Bool[Array, " B"] | None = None,
                 ) -> tuple[Float[Array, "B N D"], Bool[Array, "B N"], dict[str, jax.Array]]:
        """Video tokens of B videos (`TDCCompressor` with each video's frame token count).

        Args:
          frame_tokens, frame_counts: `encode_frames` outputs regrouped per video (every frame
            of a video has the same count).
          frame_mask: bool[B, F] valid frames (a prefix).
          segment_starts: bool[B, F] from the host scene split (`scene_split.scene_layout`:
            True at `split_points[:-1]`), or None for one segment.
          audio_tokens: float[B, F, A, Ea] BEATs tokens per frame, or None.
          text_ids, text_mask: the instruction in BERT ids for the Q-Former.
          max_tokens: static output size (see `TDCCompressor`).
          audio_present: bool[B], False for videos without audio (no audio tokens), or None.

        Returns:
          (tokens [B, N, D], valid mask [B, N] (a prefix), aux of the compressor).
        """
        return self.compressor(frame_tokens, frame_mask, audio_tokens=audio_tokens,
                               text_ids=text_ids, text_mask=text_mask,
                               segment_starts=segment_starts, max_tokens=max_tokens,
                               frame_token_counts=frame_counts, audio_present=audio_present)

    def __call__(self, input_ids: Int[Array, "B T"], positions: Int[Array, "B T"],
                 segment_ids: Int[Array, "B T"] | None, video_tokens: Float[Array, "B N D"],
                 ) -> tuple[Float[Array, "B T D"], dict]:
        """Final LLM hidden states of prompts whose `VIDEO_TOKEN_INDEX` placeholders (as many
        per row as the row's valid video tokens) receive `video_tokens` in order."""
        from longvid_jax.models.video_llm import VIDEO_TOKEN_INDEX, splice_video_tokens

        text = self.llm.embed(jnp.where(input_ids == VIDEO_TOKEN_INDEX, 0, input_ids))
        embeds = splice_video_tokens(text, input_ids, video_tokens)
        return self.llm(embeds, positions, segment_ids)

    def logits(self, hidden: Float[Array, "B T D"]) -> Float[Array, "B T V"]:
        """float32 next-token logits."""
        return self.llm.logits(hidden)

    def forward_batch(self, batch: Mapping[str, jax.Array], *, max_tokens: int | None = None,
                      tower_gradients: bool = False,
                      ) -> tuple[Float[Array, "B T D"], dict[str, Any]]:
        """A training batch through the whole model, scene split included, in one graph.

        Args:
          batch: `frames` float[B, F, S1, S1, 3] (SigLIP), `dino_frames` float[B, F, S2, S2, 3]
            (the pipeline's `tower_views`),
            `frame_mask` bool[B, F] (a prefix; at most `scene_split.MAX_FRAMES` frames),
            optional `image_sizes` int32[B, 2] (each video's (height, width) before
            `expand2square`), audio as `audio_tokens` float[B, F, A, Ea] (BEATs tokens per
            frame) or as the pipeline's `audio_fbank` float[B, W, Af, C] (TDC's 10 s BEATs
            fbank windows), `audio_window_frames` int32[B, W], `audio_second_start` /
            `audio_second_count` int32[B, S], `audio_frame_start` / `audio_frame_count`
            int32[B, F] (run through the frozen BEATs and pooled per frame in-graph:
            `frame_audio`), with `audio_present` bool[B] (False: the row has no audio and
            gets no audio tokens, as in the original),
            `qformer_text_ids` / `qformer_text_mask` [B, Tq] (the instruction in BERT ids),
            and the prompt `input_ids`, `positions`, `segment_ids` int32[B, T], `loss_mask`
            bool[B, T], whose `VIDEO_TOKEN_INDEX` slots (one run per row) number at least
            the video's tokens under any split (`max_tokens`).
          max_tokens: static size of the compressor output; default
            `qformer.max_video_tokens(F, G * (G + 1), A, ..., max_num_segments)`.
          tower_gradients: let gradients flow into SigLIP / DINOv2 (TDC freezes them: by
            default their outputs are constants of the step, which skips their backward).

        Without a compressor (the stage-1 model) there is no split, audio or Q-Former text:
        the video tokens are each valid frame's connector tokens (rows with `image_newline`)
        in order, cut to what fits the context, and `segment_starts` is None.

        Returns:
          (hidden [B, T, D] over the compacted prompt, aux) with aux `batch` (the prompt
          fields after `drop_unused_video_slots`: compute targets from these),
          `num_video_tokens` int32[B], `segment_starts` bool[B, F].
        """
        from longvid_jax.models.video_llm import VIDEO_TOKEN_INDEX, drop_unused_video_slots

        c = self.config
        sig, dino = batch["frames"], batch["dino_frames"]
        b, f = sig.shape[:2]
        sizes = batch.get("image_sizes")
        if sizes is not None:
            sizes = jnp.repeat(sizes, f, axis=0)
        tokens, counts, aux = self.encode_frames(
            sig.reshape(b * f, *sig.shape[2:]), dino.reshape(b * f, *dino.shape[2:]), sizes,
            stop_tower_gradients=not tower_gradients)
        ids = batch["input_ids"]
        is_video = ids == VIDEO_TOKEN_INDEX
        text_len = ((batch["segment_ids"] > 0) & ~is_video).sum(axis=1)
        max_visual = (c.max_context - INFERENCE_MAX_LENGTH - text_len).astype(jnp.int32)
        if c.compressor is None:  # stage 1: each frame's valid tokens, in order
            slots = tokens.shape[1]
            valid = ((jnp.arange(slots)[None, None] < counts.reshape(b, f, 1))
                     & batch["frame_mask"][:, :, None]).reshape(b, f * slots)
            video, starts = tokens.reshape(b, f * slots, -1), None
            keep = valid & (jnp.cumsum(valid, axis=1) <= max_visual[:, None])
        else:
            video, keep, starts = self._compress_batch(batch, tokens, counts, aux, max_visual,
                                                       max_tokens)
        order = jnp.argsort(~keep, axis=1, stable=True)
        video = jnp.take_along_axis(video, order[..., None], axis=1)
        num_video = keep.sum(axis=1).astype(jnp.int32)
        prompt = drop_unused_video_slots(
            {k: batch[k] for k in ("input_ids", "positions", "segment_ids", "loss_mask")},
            num_video)
        if ids.shape[1] > c.max_context:  # compacted rows fit the context: cut the padding
            prompt = {k: v[:, :c.max_context] for k, v in prompt.items()}
        hidden, _ = self(prompt["input_ids"], prompt["positions"], prompt["segment_ids"],
                         video)
        return hidden, {"batch": prompt, "num_video_tokens": num_video,
                        "segment_starts": starts}

    def _compress_batch(self, batch, tokens, counts, aux, max_visual, max_tokens):
        """`forward_batch`'s scene split, audio and compressor: (video tokens [B, N, D], kept
        tokens bool[B, N] under the overflow rule, segment starts bool[B, F])."""
        c = self.config
        b, f = batch["frame_mask"].shape
        dino_feats = aux["dino_features"].reshape(b, f, *aux["dino_features"].shape[1:])
        starts = scene_split.segment_starts(dino_feats, batch["frame_mask"],
                                            max_num_segments=c.max_num_segments)
        audio = batch.get("audio_tokens")
        if audio is None and "audio_fbank" in batch:
            audio = self.frame_audio(batch["audio_fbank"], batch["audio_window_frames"],
                                     batch["audio_second_start"], batch["audio_second_count"],
                                     batch["audio_frame_start"], batch["audio_frame_count"])
        a = 0 if audio is None else audio.shape[2]
        if max_tokens is None:
            max_tokens = qformer.max_video_tokens(f, c.frame_slots, a, c.compressor,
                                                  c.max_num_segments)
        use_text = c.compressor.text_input
        video, vmask, caux = self.compress(
            tokens.reshape(b, f, *tokens.shape[1:]), counts.reshape(b, f)[:, 0],
            batch["frame_mask"], segment_starts=starts, audio_tokens=audio,
            text_ids=batch.get("qformer_text_ids") if use_text else None,
            text_mask=batch.get("qformer_text_mask") if use_text else None,
            max_tokens=max_tokens,
            audio_present=batch.get("audio_present") if audio is not None else None)
        keep = overflow_keep(vmask, caux["token_frame"], caux["frame_token_lengths"],
                             caux["is_static"], max_visual)
        return video, keep, starts

    def frame_audio(self, fbank: Float[Array, "B W Af C"], window_frames: Int[Array, "B W"],
                    second_start: Int[Array, "B S"], second_count: Int[Array, "B S"],
                    frame_start: Int[Array, "B F"], frame_count: Int[Array, "B F"],
                    ) -> Float[Array, "B F Q Ea"]:
        """Per-frame audio tokens: BEATs (frozen: its output is a constant of the step) over
        every 10 s window, each masked to its real fbank rows, then `tdc_frame_audio`. The
        training step and `tdc_infer.TDCPredictor` both run this.

        Args:
          fbank: float[B, W, Af, C] `input.fbank.tdc_window_fbanks` of each row's track
            (padding windows after it: any values).
          window_frames: int32[B, W] real fbank rows of each window (0: padding window).
          second_start, second_count: int32[B, S] `input.fbank.tdc_second_tokens` with
            `tokens_per_window = beats.num_tokens(Af)`.
          frame_start, frame_count: int32[B, F] `input.fbank.tdc_frame_seconds`.

        Returns:
          float32[B, F, 50, Ea].
        """
        b, w = fbank.shape[:2]
        valid = beats_lib.token_valid(window_frames.reshape(b * w), fbank.shape[2],
                                      self.config.beats)
        tokens = jax.lax.stop_gradient(
            self.encode_audio(fbank.reshape(b * w, *fbank.shape[2:]), valid))
        tokens = tokens.reshape(b, -1, tokens.shape[-1])
        return tdc_frame_audio(tokens, valid.reshape(b, -1), second_start, second_count,
                               frame_start, frame_count)

    def encode_audio(self, fbank: Float[Array, "W A C"], valid: Bool[Array, "W P"] | None = None
                     ) -> Float[Array, "W P Ea"]:
        """BEATs tokens of audio windows (TDC: 10 s windows of `input.fbank.beats_fbank`, about
        50 tokens per second); `valid` masks padded fbank rows (`beats.token_valid`); raises
        ValueError on a model without audio.

        Assigning them to frames is `tdc_frame_audio` (see `frame_audio`)."""
        if self.config.beats is None:
            raise ValueError("this TDC config has no audio tower (beats=None)")
        tokens, _ = self.beats(fbank, valid)
        return tokens


def init_params(model: TDCModel, rng: jax.Array, *, frames: int = 2, text_len: int = 8,
                audio_frames: int = 160) -> dict[str, Any]:
    """Parameters of every part of `model` (each public method traced once on small dummy
    inputs): the tree `siglip`, `dinov2`, `connector`, `compressor` (not in the stage-1
    model), `llm` (+ `beats`).

    Use under `jax.eval_shape` for shapes only, or `jax.jit` for random weights."""
    c = model.config
    s1, s2 = c.siglip.image_size, c.dinov2.patch_size * c.siglip.grid
    d = c.llm.hidden_size

    def run(m):
        tokens, counts, _ = m.encode_frames(jnp.zeros((frames, s1, s1, 3)),
                                            jnp.zeros((frames, s2, s2, 3)))
        audio = None
        if c.beats is not None:
            a = m.encode_audio(jnp.zeros((frames, audio_frames, c.beats.num_mel_bins)))
            audio = a[:, None].reshape(1, frames, a.shape[1], a.shape[2])
        if c.compressor is not None:
            ids = jnp.ones((1, text_len), jnp.int32) if c.compressor.text_input else None
            m.compress(tokens[None], counts[:1], jnp.ones((1, frames), bool),
                       audio_tokens=audio, text_ids=ids)
        pos = jnp.arange(4, dtype=jnp.int32)[None]
        hidden, _ = m(jnp.ones((1, 4), jnp.int32), pos, None, jnp.zeros((1, 1, d)))
        return m.logits(hidden)

    return nn.unbox(model.init(rng, method=run))["params"]
