"""BERT-style Q-Former (BLIP-2 / InstructBLIP / LAVIS) and the TDC temporal context compressor.

`QFormer` follows LAVIS `BertLMHeadModel.bert` (TDC `tdc/Qformer.py`, TimeChat's Q-Formers) with
`is_decoder=False`, which is what `transformers` `InstructBlipQFormerModel` (queries + text) and
`Blip2QFormerModel` (queries only) compute:

  embeddings  x = LN(cat[queries, word(text) + position(0..T-1)])    (queries get no position)
  layer i     h = LN(SelfAttn(x, keys: queries always valid, text by text_mask) + x)  (SelfOutput)
              hq = h[:, :Q];  if i % cross_attention_freq == 0:  hq = LN(CrossAttn(hq, enc) + hq)
              x = cat[LN(FFN_query(hq) + hq), LN(FFN_text(h[:, Q:]) + h[:, Q:])]
  masks       additive (1 - mask) * -10000 on the logits, exactly as the original.

`TDCCompressor` is TDC's per-chunk context compression (`CambrianMetaForCausalLM.
prepare_inputs_labels_for_multimodal`, `tdc/cambrian_arch.py` L1606-1692), vectorised over frames
and chunks: the first frame of every chunk is kept whole (static), every other frame becomes K
L2-normalised Q-Former tokens queried by the avg-pooled static frame, and every frame block ends
with the learned `frame_seg` separator.

TimeChat's frame Q-Former is `QFormer` itself (variant `timechat_frame`, the timestamp sentence
as text, the whole last hidden state used); its sliding video Q-Former, which wraps `QFormer`
(variant `timechat_video`), is in `longvid_jax/models/timechat.py`.

Parameter tree of `QFormer` (LAVIS key in brackets, see `convert/qformer_keys.py`):
  query_tokens [Q, D]                       (query_tokens [1, Q, D])
  word_embeddings [V, D], position_embeddings [max_positions, D]   (embeddings.*_embeddings)
  embed_norm {scale, bias}                  (embeddings.LayerNorm)
  layer_{i}/self_attn/{query, key, value} {kernel [D, N, H], bias [N, H]},
           /out {kernel [N, H, D], bias [D]}, /norm     (attention.self.*, attention.output.*)
  layer_{i}/cross_attn/...  key/value kernels [E, N, H]   (crossattention.*)
  layer_{i}/query_mlp/{wi [D, M], wo [M, D], norm}        (intermediate_query, output_query)
  layer_{i}/text_mlp/...                                   (intermediate, output)
"""

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from longvid_jax.models import ACT_BTD, EMBED, HEAD_DIM, HEADS, MLP, VOCAB
from longvid_jax.models.attention import dot_product_attention
from longvid_jax.models.connectors import LinearProjector
from longvid_jax.models.layers import Dtype, Einsum, LayerNorm, activation

# The value BERT adds to the logits of masked keys (`(1.0 - mask) * -10000.0`).
_MASK_VALUE = -10000.0


def _check_fields(cls, d: Mapping[str, Any]) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {unknown}; known: {sorted(known)}")


# ----------------------------------------------------------------------------------------------
# Q-Former
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class QFormerConfig:
    """Sizes of a BERT-style Q-Former (defaults: bert-base-uncased, BLIP-2 / LAVIS).

    Attributes:
      width: D, hidden size.
      depth: number of layers.
      num_heads: N (head dim H = D / N).
      mlp_dim: M, FFN hidden size (for both the query and the text FFN).
      encoder_width: E, width of the cross-attention keys / values (EVA ViT-g 1408; TDC: the
        LLM width).
      cross_attention_freq: layers with `i % freq == 0` cross-attend (LAVIS / HF
        `cross_attention_frequency`).
      num_queries: learned query tokens; 0 when queries are always supplied (TDC Avg_pool).
      vocab_size: V of the text embeddings; 0 = no text input (no word / position embeddings
        and no text FFN, as Blip2QFormerModel and TimeChat's video Q-Former).
      max_positions: rows of the text position table.
      ln_eps: LayerNorm epsilon.
      act: FFN activation (`gelu` = exact erf GELU).
      dtype: compute dtype; param_dtype: storage dtype.
    """

    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    encoder_width: int = 1408
    cross_attention_freq: int = 2
    num_queries: int = 32
    vocab_size: int = 30522
    max_positions: int = 512
    ln_eps: float = 1e-12
    act: str = "gelu"
    dtype: Dtype = "float32"
    param_dtype: Dtype = "float32"

    def __post_init__(self):
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} not divisible by num_heads {self.num_heads}")
        if self.cross_attention_freq < 1:
            raise ValueError(f"cross_attention_freq must be >= 1, got {self.cross_attention_freq}")

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "QFormerConfig":
        """Builds a config from a dict that may name a `variant`; see `make_config`."""
        return make_config(**dict(d))


VARIANTS: dict[str, dict[str, Any]] = {
    # BLIP-2 / InstructBLIP / LAVIS Q-Former on bert-base-uncased.
    "bert_base": {},
    # TDC compressor: queries supplied (avg-pooled), encoder_width = LLM width set by the caller.
    "tdc": dict(num_queries=0),
    # TimeChat (ORIGINALS.md, shared building blocks): frame Q-Former over EVA ViT-g, and the
    # 2-layer video Q-Former without text.
    # TimeChat resizes the frame Q-Former's vocabulary to the BERT tokenizer + `[DEC]` (30523).
    "timechat_frame": dict(num_queries=32, encoder_width=1408, cross_attention_freq=2,
                           vocab_size=30523),
    "timechat_video": dict(depth=2, num_queries=32, encoder_width=768, cross_attention_freq=1,
                           vocab_size=0),
    # Test size (the fixtures' tiny BERT).
    "tiny": dict(width=32, depth=4, num_heads=4, mlp_dim=64, vocab_size=49, max_positions=64),
}


def make_config(variant: str | None = None, **overrides) -> QFormerConfig:
    """Returns `QFormerConfig` of a named variant with field overrides.

    Raises:
      ValueError: for an unknown variant or field.
    """
    if variant is not None and variant not in VARIANTS:
        raise ValueError(f"unknown QFormer variant {variant!r}; known: {sorted(VARIANTS)}")
    _check_fields(QFormerConfig, overrides)
    return QFormerConfig(**{**(VARIANTS[variant] if variant else {}), **overrides})


class _Attention(nn.Module):
    """BertAttention: multi-head attention + BertSelfOutput (`LN(dense(attn) + x)`).

    Params: query [D, N, H], key / value [E, N, H] (E = D for self-attention), each with bias
    [N, H]; out [N, H, D] + bias [D]; norm.
    """

    config: QFormerConfig
    kv_width: int

    @nn.compact
    def __call__(self, x: jax.Array, kv: jax.Array, bias: jax.Array | None) -> jax.Array:
        cfg = self.config
        d, n, h = cfg.width, cfg.num_heads, cfg.head_dim
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        in_axes = (EMBED, HEADS, HEAD_DIM)
        q = Einsum((d, n, h), in_axes, (HEADS, HEAD_DIM), name="query", **kw)("BTD,DNH->BTNH", x)
        k = Einsum((self.kv_width, n, h), in_axes, (HEADS, HEAD_DIM), name="key",
                   **kw)("BSE,ENH->BSNH", kv)
        v = Einsum((self.kv_width, n, h), in_axes, (HEADS, HEAD_DIM), name="value",
                   **kw)("BSE,ENH->BSNH", kv)
        o = dot_product_attention(q, k, v, bias=bias)
        y = Einsum((n, h, d), (HEADS, HEAD_DIM, EMBED), (EMBED,), fan_in_axes=(0, 1), name="out",
                   **kw)("BTNH,NHD->BTD", o)
        return LayerNorm(cfg.ln_eps, param_dtype=kw["param_dtype"], name="norm")(y + x)


class _FeedForward(nn.Module):
    """BertIntermediate + BertOutput: `LN(wo(act(wi(x))) + x)`."""

    config: QFormerConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        h = Einsum((cfg.width, cfg.mlp_dim), (EMBED, MLP), (MLP,), name="wi",
                   **kw)("BTD,DM->BTM", x)
        h = activation(cfg.act)(h)
        y = Einsum((cfg.mlp_dim, cfg.width), (MLP, EMBED), (EMBED,), name="wo",
                   **kw)("BTM,MD->BTD", h)
        return LayerNorm(cfg.ln_eps, param_dtype=kw["param_dtype"], name="norm")(y + x)


class _QFormerLayer(nn.Module):
    """One LAVIS `BertLayer` (is_decoder=False): self-attn, queries' cross-attn, split FFNs."""

    config: QFormerConfig
    has_cross_attention: bool

    @nn.compact
    def __call__(self, x, enc, self_bias, cross_bias, num_queries: int):
        cfg = self.config
        h = _Attention(cfg, cfg.width, name="self_attn")(x, x, self_bias)
        hq, ht = h[:, :num_queries], h[:, num_queries:]
        # Every sub-module runs even on an empty slice, so `init` creates the whole tree.
        if self.has_cross_attention:
            hq = _Attention(cfg, cfg.encoder_width, name="cross_attn")(hq, enc, cross_bias)
        hq = _FeedForward(cfg, name="query_mlp")(hq)
        if cfg.vocab_size > 0:
            ht = _FeedForward(cfg, name="text_mlp")(ht)
        return nn.with_logical_constraint(jnp.concatenate([hq, ht], axis=1), ACT_BTD)


def _additive_mask(mask: jax.Array) -> jax.Array:
    """bool/int[B, S] (1 = attend) -> float32[B, 1, 1, S] of 0 / -10000 (BERT's extended mask)."""
    return ((1.0 - mask.astype(jnp.float32)) * _MASK_VALUE)[:, None, None, :]


class QFormer(nn.Module):
    """BERT Q-Former: learned or supplied queries (+ optional text) cross-attending an encoder.

    Source: LAVIS `BertModel.forward` as called by `BertLMHeadModel.bert(...)` in TDC
    (`tdc/Qformer.py`) and TimeChat; equal to `transformers` `InstructBlipQFormerModel`
    (with text) and `Blip2QFormerModel` (`vocab_size=0`; its `layernorm` is our `embed_norm`).

    Attributes:
      config: `QFormerConfig`.
    """

    config: QFormerConfig

    @nn.compact
    def __call__(
        self,
        encoder_states: Float[Array, "B S E"],
        *,
        query_embeds: Float[Array, "B Q D"] | None = None,
        encoder_mask: Bool[Array, "B S"] | None = None,
        text_ids: Int[Array, "B T"] | None = None,
        text_mask: Bool[Array, "B T"] | None = None,
    ) -> tuple[Float[Array, "B QT D"], dict[str, jax.Array]]:
        """Runs the Q-Former.

        Args:
          encoder_states: float[B, S, E], keys / values of the cross-attention.
          query_embeds: float[B, Q, D] supplied queries; None uses the learned `query_tokens`
            (or no queries when `num_queries == 0`: text-only BERT, every position uses the text
            FFN and nothing cross-attends, as LAVIS with `query_length == 0`).
          encoder_mask: bool[B, S], False for padded encoder tokens; None = all valid.
          text_ids: int32[B, T] token ids (BERT vocab), positions 0..T-1.
          text_mask: bool[B, T], False for padded text; None = all valid. Queries are always
            valid keys.

        Returns:
          (hidden [B, Q + T, D] in `config.dtype` (queries first), aux) with aux
          `embedding_output` [B, Q + T, D] (after the embedding LayerNorm).

        Raises:
          ValueError: text given to a model without vocabulary, text longer than
            `max_positions`, wrong widths, or neither queries nor text.
        """
        cfg = self.config
        dtype, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        b = encoder_states.shape[0]
        if encoder_states.shape[-1] != cfg.encoder_width:
            raise ValueError(f"encoder width {encoder_states.shape[-1]} != {cfg.encoder_width}")
        emb_init = nn.initializers.normal(0.02)

        if cfg.num_queries > 0:
            query_tokens = self.param(
                "query_tokens", nn.with_logical_partitioning(emb_init, (None, EMBED)),
                (cfg.num_queries, cfg.width), pdt)
        if query_embeds is None:
            if cfg.num_queries > 0:
                queries = jnp.broadcast_to(query_tokens, (b, cfg.num_queries, cfg.width))
            else:
                queries = jnp.zeros((b, 0, cfg.width), dtype)
        else:
            if query_embeds.shape[-1] != cfg.width:
                raise ValueError(f"query width {query_embeds.shape[-1]} != {cfg.width}")
            queries = query_embeds
        num_q = queries.shape[1]

        parts = [queries.astype(dtype)]
        num_t = 0
        if cfg.vocab_size > 0:
            word = self.param("word_embeddings",
                              nn.with_logical_partitioning(emb_init, (VOCAB, EMBED)),
                              (cfg.vocab_size, cfg.width), pdt)
            pos = self.param("position_embeddings",
                             nn.with_logical_partitioning(emb_init, (None, EMBED)),
                             (cfg.max_positions, cfg.width), pdt)
        if text_ids is not None:
            if cfg.vocab_size == 0:
                raise ValueError("text_ids given to a Q-Former without text input (vocab_size 0)")
            num_t = text_ids.shape[1]
            if num_t > cfg.max_positions:
                raise ValueError(f"text length {num_t} > max_positions {cfg.max_positions}")
            text = jnp.take(word, text_ids, axis=0) + pos[None, :num_t]
            parts.append(text.astype(dtype))
        if num_q + num_t == 0:
            raise ValueError("the Q-Former needs queries (query_embeds / num_queries) or text")
        x = jnp.concatenate(parts, axis=1)
        x = LayerNorm(cfg.ln_eps, param_dtype=pdt, name="embed_norm")(x)
        x = nn.with_logical_constraint(x, ACT_BTD)
        aux = {"embedding_output": x}

        self_bias = None
        if text_mask is not None and num_t > 0:
            self_bias = _additive_mask(
                jnp.concatenate([jnp.ones((b, num_q), bool), text_mask.astype(bool)], axis=1))
        cross_bias = None if encoder_mask is None else _additive_mask(encoder_mask)
        for i in range(cfg.depth):
            x = _QFormerLayer(cfg, i % cfg.cross_attention_freq == 0, name=f"layer_{i}")(
                x, encoder_states, self_bias, cross_bias, num_q)
        return x, aux


# ----------------------------------------------------------------------------------------------
# TDC compressor
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TDCCompressorConfig:
    """TDC temporal context compressor (`CambrianMetaModel.initialize_compressor`).

    Attributes:
      llm_width: D, hidden size of the LLM (visual tokens arrive projected to D).
      num_tokens: K compressed tokens per non-static frame (`context_token_num`).
      chunk_size: frames per chunk; the first frame of a chunk is static (kept whole).
      audio_width: width of the raw audio tokens before `audio_proj` (BEATs 768); 0 = no audio.
      text_input: feed the instruction to the Q-Former (`text_input` / `add_text`).
      query_type: `avg_pool` (adaptive-average-pooled static frame, the released setting) or
        `learned` (the Q-Former's `query_tokens`; needs `qformer.num_queries == num_tokens`).
      qformer: `QFormerConfig`, a dict for `make_config` (may name a `variant`), or None for
        variant `tdc`; `encoder_width` defaults to `llm_width`, `num_queries` to 0 (avg_pool)
        or `num_tokens` (learned), dtypes to this config's.
      dtype, param_dtype: compute / storage dtypes of the projections.
    """

    llm_width: int
    num_tokens: int = 16
    chunk_size: int = 8
    audio_width: int = 768
    text_input: bool = True
    query_type: str = "avg_pool"
    qformer: QFormerConfig | Mapping[str, Any] | None = None
    dtype: Dtype = "float32"
    param_dtype: Dtype = "float32"

    def __post_init__(self):
        if self.query_type not in ("avg_pool", "learned"):
            raise ValueError(f"query_type must be 'avg_pool' or 'learned', got {self.query_type!r}")
        if self.num_tokens < 1 or self.chunk_size < 1:
            raise ValueError("num_tokens and chunk_size must be >= 1")
        q = self.qformer
        if not isinstance(q, QFormerConfig):
            d = dict(q or {})
            d.setdefault("variant", "tdc")
            d.setdefault("encoder_width", self.llm_width)
            d.setdefault("num_queries", self.num_tokens if self.query_type == "learned" else 0)
            d.setdefault("dtype", self.dtype)
            d.setdefault("param_dtype", self.param_dtype)
            q = make_config(**d)
            object.__setattr__(self, "qformer", q)
        if q.encoder_width != self.llm_width:
            raise ValueError(f"qformer.encoder_width {q.encoder_width} != llm_width "
                             f"{self.llm_width}")
        if self.query_type == "learned" and q.num_queries != self.num_tokens:
            raise ValueError(f"learned queries need qformer.num_queries == {self.num_tokens}")
        if self.text_input and q.vocab_size == 0:
            raise ValueError("text_input needs a Q-Former with a vocabulary")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TDCCompressorConfig":
        """Builds a config from a dict that may name a `variant`; see `make_tdc_config`."""
        return make_tdc_config(**dict(d))


TDC_VARIANTS: dict[str, dict[str, Any]] = {
    "qwen2_7b": dict(llm_width=3584),  # TDC-7B (Qwen2-7B)
    "llama3_2_3b": dict(llm_width=3072),  # TDC-3B (Llama-3.2-3B)
    # The fixture tdc_qformer_compressor: H = 48, K = 4, tiny BERT.
    "tiny": dict(llm_width=48, num_tokens=4, qformer=dict(variant="tiny")),
}


def make_tdc_config(variant: str | None = None, **overrides) -> TDCCompressorConfig:
    """Returns `TDCCompressorConfig` of a named variant with overrides (`qformer` may be a dict).

    Raises:
      ValueError: for an unknown variant or field.
    """
    if variant is not None and variant not in TDC_VARIANTS:
        raise ValueError(f"unknown TDC variant {variant!r}; known: {sorted(TDC_VARIANTS)}")
    _check_fields(TDCCompressorConfig, overrides)
    return TDCCompressorConfig(**{**(TDC_VARIANTS[variant] if variant else {}), **overrides})


def _static_count(frames: Sequence[int], chunk_size: int) -> int:
    return sum(-(-n // chunk_size) for n in frames)


def num_video_tokens(num_frames: int, tokens_per_frame: int, audio_tokens_per_frame: int,
                     cfg: TDCCompressorConfig, *,
                     segment_lengths: Sequence[int] | None = None) -> int:
    """Exact number of tokens `TDCCompressor` emits for `num_frames` valid frames (pure Python).

    Each segment (the whole video by default) is cut into chunks of `chunk_size`; a chunk's
    static frame gives P + A + 1 tokens (visual, audio, frame_seg) and each other frame K + 1.

    Args:
      num_frames: F valid frames.
      tokens_per_frame: P visual tokens per frame.
      audio_tokens_per_frame: A audio tokens per frame (0 without audio).
      cfg: the compressor config.
      segment_lengths: frames per scene segment (summing to F); None = one segment.

    Raises:
      ValueError: if segment_lengths do not sum to num_frames.
    """
    lengths = [num_frames] if segment_lengths is None else list(segment_lengths)
    if sum(lengths) != num_frames or min(lengths, default=0) < 0:
        raise ValueError(f"segment lengths {lengths} do not partition {num_frames} frames")
    n_static = _static_count(lengths, cfg.chunk_size)
    return (n_static * (tokens_per_frame + audio_tokens_per_frame + 1)
            + (num_frames - n_static) * (cfg.num_tokens + 1))


def max_video_tokens(num_frames: int, tokens_per_frame: int, audio_tokens_per_frame: int,
                     cfg: TDCCompressorConfig, max_segments: int) -> int:
    """Upper bound of `num_video_tokens` over all splits into at most `max_segments` segments.

    With n segments there are at most `min(F, floor((F + n (c - 1)) / c))` static frames
    (`ceil(l / c) <= (l + c - 1) / c` summed over segments). Use it as `max_tokens` of
    `TDCCompressor` when `segment_starts` is given.
    """
    f, c = num_frames, cfg.chunk_size
    if f == 0:
        return 0
    lo = -(-f // c)
    hi = min(f, (f + max(max_segments, 1) * (c - 1)) // c)
    per_static = tokens_per_frame + audio_tokens_per_frame + 1
    per_other = cfg.num_tokens + 1
    return max(n * per_static + (f - n) * per_other for n in (lo, hi))


def adaptive_pool_matrix(in_len: int, out_len: int) -> np.ndarray:
    """Weights float32[out, in] of torch `adaptive_avg_pool1d`: row i averages inputs
    `[floor(i * in / out), ceil((i + 1) * in / out))` (windows overlap when out does not divide
    in)."""
    m = np.zeros((out_len, in_len), np.float32)
    for i in range(out_len):
        start = (i * in_len) // out_len
        end = -(-((i + 1) * in_len) // out_len)
        m[i, start:end] = 1.0 / (end - start)
    return m


def adaptive_pool_weights(lengths: Int[Array, " B"], in_len: int, out_len: int
                          ) -> Float[Array, "B Q P"]:
    """`adaptive_pool_matrix(lengths[b], out_len)` per row, zero-padded to `in_len` columns.

    For inputs whose valid length varies per row (traced), e.g. frames whose token count
    depends on the video's aspect ratio: float32[B, out_len, in_len]."""
    lengths = jnp.asarray(lengths, jnp.int32)[:, None, None]
    i = jnp.arange(out_len, dtype=jnp.int32)[None, :, None]
    col = jnp.arange(in_len, dtype=jnp.int32)[None, None, :]
    start = (i * lengths) // out_len
    end = -(-((i + 1) * lengths) // out_len)
    inside = (col >= start) & (col < end)
    return jnp.where(inside, 1.0 / jnp.maximum(end - start, 1), 0.0).astype(jnp.float32)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """`torch.nn.functional.normalize(x, dim=-1)`: x / max(||x||_2, eps), in float32."""
    x32 = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True))
    return (x32 / jnp.maximum(norm, eps)).astype(x.dtype)


class TDCCompressor(nn.Module):
    """TDC temporal dynamic context compressor over a batch of videos.

    Source: `tdc/cambrian_arch.py` `prepare_inputs_labels_for_multimodal` L1541-1692
    (`query_type='Avg_pool'`, `keep_static`, `add_sep`; `text_input` per config). Per chunk:
      - static frame (first of the chunk): its P visual tokens, then its A projected audio tokens
        (`audio_proj`), then `frame_seg`;
      - every other valid frame: queries = adaptive_avg_pool1d of the static frame's VISUAL tokens
        (P -> K, torch windows) -> `query_proj` (D -> Dq); Q-Former with the instruction as text,
        cross-attending that frame's P visual + A audio tokens (all attended, as the original);
        `vision_proj(h[:, :K])` (Dq -> D), L2-normalised; then `frame_seg`.
    The blocks of all frames are written in frame order into a fixed-size buffer: valid tokens
    form a prefix of length `aux['num_tokens']`, the rest is zero and masked.

    Params: `qformer` (QFormer), `query_proj`, `vision_proj`, `audio_proj` (LinearProjector,
    absent when `audio_width == 0`), `frame_seg` [D].

    Attributes:
      config: `TDCCompressorConfig`.
    """

    config: TDCCompressorConfig

    @nn.compact
    def __call__(
        self,
        frame_tokens: Float[Array, "B F P D"],
        frame_mask: Bool[Array, "B F"],
        *,
        audio_tokens: Float[Array, "B F A Ea"] | None = None,
        text_ids: Int[Array, "B T"] | None = None,
        text_mask: Bool[Array, "B T"] | None = None,
        segment_starts: Bool[Array, "B F"] | None = None,
        max_tokens: int | None = None,
        frame_token_counts: Int[Array, " B"] | None = None,
        audio_present: Bool[Array, " B"] | None = None,
    ) -> tuple[Float[Array, "B N D"], Bool[Array, "B N"], dict[str, jax.Array]]:
        """Compresses the frames of each video into its TDC token sequence.

        Args:
          frame_tokens: float[B, F, P, D] per-frame visual tokens, already at the LLM width.
          frame_mask: bool[B, F]; the valid frames must be a prefix of each video.
          audio_tokens: float[B, F, A, Ea] raw per-frame audio tokens (BEATs), or None.
          text_ids: int32[B, T] BERT ids of the instruction (required when `text_input`,
            ignored otherwise); the same text is used for every frame of a video.
          text_mask: bool[B, T], False on text padding; None = all valid.
          segment_starts: bool[B, F], True on frames that start a scene segment (frame 0 always
            does); chunks of `chunk_size` are cut within each segment. None = one segment, so
            chunks start at multiples of `chunk_size` (the Q-Former then runs only on the
            non-static frames; with segments it runs on all frames).
          max_tokens: N, static size of the output; default `num_video_tokens(F, P, A)`, which
            is exact without segments. With segments pass `max_video_tokens(...)`; tokens past
            N are dropped (`aux['num_tokens']` still counts them).
          frame_token_counts: int32[B], valid visual tokens per frame of each video, a prefix
            of the P slots (TDC's unpadded grid with `image_newline`s, whose size depends on
            the video's aspect ratio: `sva.num_frame_tokens`). Static frames then give
            count + A + 1 tokens, the query pooling averages the valid tokens only
            (`adaptive_avg_pool1d` over that length) and the Q-Former attends to the valid
            visual tokens and the audio. None = all P valid.
          audio_present: bool[B], False for a video without audio: its static frames get no
            audio tokens (count + 1) and its Q-Former attends to the visual tokens only, as
            the original treats a sample whose audio is None; the audio_tokens of that row are
            ignored. None = every row has audio (when audio_tokens are given).

        Returns:
          (tokens float[B, N, D] in `config.dtype`, token_mask bool[B, N], aux) with aux:
            pooled_queries [B, Fc, K, D], query_embeds [B, Fc, K, Dq],
            qformer_last_hidden_state [B, Fc, K + T, Dq], vision_proj_out and compressed
            [B, Fc, K, D] for the Fc Q-Former frames (`compressed_frames`, int32[Fc] or
            [B, F], their frame indices), audio_proj_out [B, F, A, D] with audio,
            is_static bool[B, F], num_tokens int32[B] (untruncated count), token_frame
            int32[B, N] (the frame each output token belongs to), frame_token_lengths
            int32[B, F] (tokens of each frame, 0 for invalid frames).

        Raises:
          ValueError: on width mismatches, audio without `audio_width`, or missing text.
        """
        cfg = self.config
        qcfg = cfg.qformer
        dtype, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        b, f, p, d = frame_tokens.shape
        k, c = cfg.num_tokens, cfg.chunk_size
        if d != cfg.llm_width:
            raise ValueError(f"frame token width {d} != llm_width {cfg.llm_width}")
        if cfg.text_input and text_ids is None:
            raise ValueError("text_input is set: pass the instruction as text_ids")
        proj_kw = dict(dtype=dtype, param_dtype=pdt)
        aux: dict[str, jax.Array] = {}

        frame_seg = self.param("frame_seg", nn.with_logical_partitioning(
            nn.initializers.normal(1.0), (None,)), (d,), pdt).astype(dtype)
        x = frame_tokens.astype(dtype)
        kv = x
        if audio_tokens is not None:
            if cfg.audio_width == 0:
                raise ValueError("audio_tokens given but audio_width is 0")
            a = LinearProjector(cfg.audio_width, d, name="audio_proj", **proj_kw)(audio_tokens)
            aux["audio_proj_out"] = a
            kv = jnp.concatenate([x, a], axis=2)
        elif cfg.audio_width > 0 and self.is_initializing():
            LinearProjector(cfg.audio_width, d, name="audio_proj", **proj_kw)(
                jnp.zeros((1, cfg.audio_width), dtype))
        s = kv.shape[2]  # P (+ A) tokens per frame

        a_tok = s - p
        if audio_present is None or a_tok == 0:
            a_valid = jnp.full((b,), a_tok, jnp.int32)
        else:
            a_valid = jnp.where(jnp.asarray(audio_present, bool).reshape(b), a_tok, 0)
        if frame_token_counts is None:
            pool = jnp.asarray(adaptive_pool_matrix(p, k))
            counts = jnp.full((b,), p, jnp.int32)
        else:
            counts = jnp.asarray(frame_token_counts, jnp.int32).reshape(b)
            pool = adaptive_pool_weights(counts, p, k)  # [B, K, P]
        kv_mask = None
        if frame_token_counts is not None or (audio_present is not None and a_tok):
            kv_mask = jnp.concatenate([jnp.arange(p)[None] < counts[:, None],
                                       jnp.arange(a_tok)[None] < a_valid[:, None]],
                                      axis=1)  # [B, S]
        pool_eq = "BFPD,QP->BFQD" if pool.ndim == 2 else "BFPD,BQP->BFQD"
        frame_idx = np.arange(f)
        if segment_starts is None:
            # Static layout: chunks start at multiples of c; only non-static frames are queried.
            static_np = frame_idx % c == 0
            comp_frames = frame_idx[~static_np]
            comp_index = np.maximum(np.cumsum(~static_np) - 1, 0)
            is_static = jnp.broadcast_to(jnp.asarray(static_np), (b, f))
            comp_of = jnp.broadcast_to(jnp.asarray(comp_index, jnp.int32), (b, f))
            pooled = jnp.einsum(pool_eq, x[:, ::c].astype(jnp.float32), pool)
            pooled = pooled[:, comp_frames // c]
            kv_comp = kv[:, comp_frames]
            aux["compressed_frames"] = jnp.asarray(comp_frames, jnp.int32)
        else:
            fi = jnp.arange(f, dtype=jnp.int32)[None, :]
            seg = jnp.logical_or(segment_starts.astype(bool), fi == 0)
            seg_start = jax.lax.cummax(jnp.where(seg, fi, 0), axis=1)
            is_static = (fi - seg_start) % c == 0
            static_of = jax.lax.cummax(jnp.where(is_static, fi, 0), axis=1)
            comp_of = jnp.broadcast_to(fi, (b, f))
            pooled = jnp.einsum(pool_eq, x.astype(jnp.float32), pool)
            pooled = jnp.take_along_axis(pooled, static_of[:, :, None, None], axis=1)
            kv_comp = kv
            aux["compressed_frames"] = comp_of
        pooled = pooled.astype(dtype)
        fc = kv_comp.shape[1]

        query_embeds = LinearProjector(d, qcfg.width, name="query_proj", **proj_kw)(pooled)
        t_ids = t_mask = None
        if cfg.text_input:
            t = text_ids.shape[1]
            t_ids = jnp.broadcast_to(text_ids[:, None], (b, fc, t)).reshape(b * fc, t)
            if text_mask is not None:
                t_mask = jnp.broadcast_to(text_mask[:, None], (b, fc, t)).reshape(b * fc, t)
        if kv_mask is not None:
            kv_mask = jnp.broadcast_to(kv_mask[:, None], (b, fc, s)).reshape(b * fc, s)
        h, _ = QFormer(qcfg, name="qformer")(
            kv_comp.reshape(b * fc, s, d), encoder_mask=kv_mask,
            query_embeds=(query_embeds.reshape(b * fc, k, qcfg.width)
                          if cfg.query_type == "avg_pool" else None),
            text_ids=t_ids, text_mask=t_mask)
        vis = LinearProjector(qcfg.width, d, name="vision_proj", **proj_kw)(h[:, :k])
        comp = l2_normalize(vis).reshape(b, fc, k, d)
        aux.update(pooled_queries=pooled, query_embeds=query_embeds,
                   qformer_last_hidden_state=h.reshape(b, fc, *h.shape[1:]),
                   vision_proj_out=vis.reshape(b, fc, k, d), compressed=comp,
                   is_static=is_static)

        # Layout: frame f owns `len_f` consecutive slots (S + 1 static, K + 1 other, 0 invalid);
        # output slot n is gathered from the frame whose slot range contains it.
        n_out = (num_video_tokens(f, p, a_tok, cfg) if max_tokens is None else max_tokens)
        s_valid = (counts + a_valid)[:, None]  # [B, 1] valid static tokens (visual + audio)
        lens = jnp.where(frame_mask, jnp.where(is_static, s_valid + 1, k + 1), 0).astype(jnp.int32)
        ends = jnp.cumsum(lens, axis=1)
        total = ends[:, -1]
        n = jnp.arange(n_out, dtype=jnp.int32)
        owner = jax.vmap(lambda e: jnp.searchsorted(e, n, side="right"))(ends)
        owner = jnp.minimum(owner, f - 1).astype(jnp.int32)  # [B, N]
        j = n[None] - jnp.take_along_axis(ends - lens, owner, axis=1)
        st = jnp.take_along_axis(is_static, owner, axis=1)
        is_sep = jnp.where(st, j == s_valid, j == k)
        slot = jnp.where(j < counts[:, None], j, p + (j - counts[:, None]))  # skip invalid slots
        src = owner * s + jnp.clip(slot, 0, s - 1)
        g_static = jnp.take_along_axis(kv.reshape(b, f * s, d), src[..., None], axis=1)
        if fc > 0:
            src = jnp.take_along_axis(comp_of, owner, axis=1) * k + jnp.clip(j, 0, k - 1)
            g_comp = jnp.take_along_axis(comp.reshape(b, fc * k, d), src[..., None], axis=1)
        else:
            g_comp = jnp.zeros_like(g_static)
        token_mask = n[None] < total[:, None]
        out = jnp.where(is_sep[..., None], frame_seg, jnp.where(st[..., None], g_static, g_comp))
        out = jnp.where(token_mask[..., None], out, 0).astype(dtype)
        out = nn.with_logical_constraint(out, ACT_BTD)
        aux.update(num_tokens=total, token_frame=owner, frame_token_lengths=lens)
        return out, token_mask, aux
