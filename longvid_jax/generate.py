"""KV-cache text generation for the decoder LLM (greedy and sampling), streaming tokens.

    prompt (token ids, or input embeddings such as `VideoLLM`'s spliced video + text)
      --jitted prefill--> last-token logits + filled cache --sample--> token 1
      --jitted decode step (cache donated), once per token--> token 2, 3, ...

Prompts of a batch are RIGHT-padded: row b holds its `prompt_lengths[b]` tokens at positions
0..len-1 followed by padding, so the prefill's segment ids are 1 then 0 (the padding-only form
that every attention kernel, cuDNN included, takes) and each row's generated tokens go to the
cache slots right after its own prompt (`decoder.Decoder.__call__` with `cache=`).

Follows transformers' `GenerationMixin.generate` semantics for `do_sample=False` (greedy) and
for temperature / top-k / top-p sampling (`TemperatureLogitsWarper`, `TopKLogitsWarper`,
`TopPLogitsWarper`: top-k first, then top-p, keeping at least one token).
"""

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from longvid_jax.models import decoder

_NEG_INF = -1e30


@dataclasses.dataclass
class GenerationResult:
    """Output of `generate`.

    Attributes:
      tokens: int32[B, n] generated ids (n <= max_new_tokens); after a row's stop token (which
        is kept) the row holds `pad_id`.
      lengths: int[B], tokens of each row before its stop token (all of them when it never
        stopped).
      stopped: bool[B], the row produced a stop token.
      prefill_s: seconds of the prefill (compilation included on the first call), first token
        on the host.
      decode_s: seconds of the decode steps after the first token.
    """

    tokens: np.ndarray
    lengths: np.ndarray
    stopped: np.ndarray
    prefill_s: float
    decode_s: float

    def sequences(self) -> list[list[int]]:
        """Each row's generated ids without the stop token and padding."""
        return [self.tokens[b, : self.lengths[b]].tolist() for b in range(len(self.lengths))]

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens per second of the decode steps (tokens after the first, per row)."""
        steps = self.tokens.shape[1] - 1
        return steps / self.decode_s if self.decode_s > 0 and steps > 0 else float("nan")


def sample_logits(logits: jax.Array, rng: jax.Array | None, *, temperature: float = 0.0,
                  top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """Picks one token per row from float32[B, V] logits -> int32[B].

    temperature == 0 is greedy (argmax; `rng` unused). Otherwise the logits are divided by
    the temperature, restricted to the `top_k` largest (0 = all), then to the smallest set of
    highest-probability tokens whose probability reaches `top_p` (1.0 = all; the most likely
    token is always kept), and sampled with `jax.random.categorical`.

    Raises:
      ValueError: negative temperature or top_k, top_p outside (0, 1], or sampling without rng.
    """
    if temperature < 0 or top_k < 0 or not 0.0 < top_p <= 1.0:
        raise ValueError(f"need temperature >= 0, top_k >= 0 and 0 < top_p <= 1; got "
                         f"{temperature}, {top_k}, {top_p}")
    logits = logits.astype(jnp.float32)
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if rng is None:
        raise ValueError("sampling (temperature > 0) needs an rng key")
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, _NEG_INF, logits)
    if top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
        keep_sorted = before < top_p  # the first token always (before == 0)
        keep = jnp.zeros_like(keep_sorted).at[
            jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
        logits = jnp.where(keep, logits, _NEG_INF)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _model(config: decoder.DecoderConfig) -> decoder.Decoder:
    return decoder.Decoder(config)


def make_step_fns(config: decoder.DecoderConfig, *, temperature: float = 0.0, top_k: int = 0,
                  top_p: float = 1.0) -> tuple[Callable, Callable]:
    """Jitted `(prefill, decode_step)` for a decoder config and sampling setting.

    prefill(params, embeds [B, T, D], lengths int32[B], cache, rng) -> (tokens int32[B], cache):
      runs the right-padded prompt through the LLM into the empty `cache` (donated) and samples
      each row's first token from the logits at its last prompt position.
    decode_step(params, tokens int32[B], cache, rng) -> (tokens int32[B], cache): feeds each
      row's previous token at position `cache["lengths"]` and samples the next (cache donated).
    Only the selected rows' logits [B, V] are computed, never [B, T, V]. The functions are
    cached per (config, sampling setting), so repeated calls reuse their compilations.
    """
    return _step_fns(config, float(temperature), int(top_k), float(top_p))


@functools.lru_cache(maxsize=32)
def _step_fns(config: decoder.DecoderConfig, temperature: float, top_k: int,
              top_p: float) -> tuple[Callable, Callable]:
    model = _model(config)

    def prefill(params, embeds, lengths, cache, rng):
        t = embeds.shape[1]
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), embeds.shape[:2])
        segment_ids = (positions < lengths[:, None]).astype(jnp.int32)

        def fwd(m, e):
            hidden, aux = m(e, positions, segment_ids, cache=cache)
            last = jnp.take_along_axis(hidden, jnp.maximum(lengths - 1, 0)[:, None, None],
                                       axis=1)
            return m.logits(last)[:, 0], aux["cache"]

        logits, new_cache = model.apply({"params": params}, embeds, method=fwd)
        return sample_logits(logits, rng, temperature=temperature, top_k=top_k,
                             top_p=top_p), new_cache

    def decode_step(params, tokens, cache, rng):
        def fwd(m, tok):
            hidden, aux = m(m.embed(tok[:, None]), cache["lengths"][:, None], cache=cache)
            return m.logits(hidden)[:, 0], aux["cache"]

        logits, new_cache = model.apply({"params": params}, tokens, method=fwd)
        return sample_logits(logits, rng, temperature=temperature, top_k=top_k,
                             top_p=top_p), new_cache

    return (jax.jit(prefill, donate_argnums=3), jax.jit(decode_step, donate_argnums=2))


def embed_tokens(params: Any, config: decoder.DecoderConfig, ids: jax.Array) -> jax.Array:
    """Token ids int32[B, T] -> embeddings [B, T, D] (compute dtype) with the LLM's table."""
    return _model(config).apply({"params": params}, ids, method=lambda m, x: m.embed(x))


def generate(params: Any, config: decoder.DecoderConfig, *,
             prompt_ids: np.ndarray | jax.Array | None = None,
             prompt_embeds: np.ndarray | jax.Array | None = None,
             prompt_lengths: Sequence[int] | np.ndarray | None = None,
             max_new_tokens: int = 256, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, stop_token_ids: Sequence[int] = (),
             rng: jax.Array | None = None, pad_id: int = 0,
             on_token: Callable[[np.ndarray, np.ndarray], None] | None = None,
             max_len: int | None = None) -> GenerationResult:
    """Generates up to `max_new_tokens` tokens per row with a KV cache, streaming them.

    Works for the plain decoder (`prompt_ids`) and for a multimodal model whose prompt is
    already embedded (`prompt_embeds`, e.g. `VideoLLM`'s spliced video + text embeddings): the
    decode steps embed tokens with the LLM's own table either way.

    Args:
      params: the decoder's parameters (e.g. `params["llm"]` of a `VideoLLM`).
      config: its `DecoderConfig`.
      prompt_ids: int[B, T] right-padded prompts, or
      prompt_embeds: [B, T, D] right-padded prompt embeddings (exactly one of the two).
      prompt_lengths: int[B] real tokens per row (default T for every row).
      max_new_tokens: tokens to generate per row (the first comes from the prefill).
      temperature, top_k, top_p: see `sample_logits` (temperature 0 = greedy).
      stop_token_ids: a row stops after producing one of these (kept in `tokens`); generation
        ends when every row has stopped.
      rng: PRNG key for sampling; step i uses `fold_in(rng, i)`, so a fixed key reproduces.
      pad_id: written after a row's stop token.
      on_token: called after each generated position with (tokens int32[B], active bool[B]),
        where active marks rows that had not stopped before this token.
      max_len: cache slots S (default T + max_new_tokens).

    Returns:
      A `GenerationResult`.

    Raises:
      ValueError: both or neither prompt given, bad shapes or lengths, max_new_tokens < 1, or a
        cache too short for the prompt plus the new tokens.
    """
    if (prompt_ids is None) == (prompt_embeds is None):
        raise ValueError("give exactly one of prompt_ids and prompt_embeds")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if prompt_embeds is None:
        ids = jnp.asarray(prompt_ids, jnp.int32)
        if ids.ndim != 2:
            raise ValueError(f"prompt_ids must be [B, T], got shape {ids.shape}")
        embeds = embed_tokens(params, config, ids)
    else:
        embeds = jnp.asarray(prompt_embeds)
        if embeds.ndim != 3 or embeds.shape[-1] != config.hidden_size:
            raise ValueError(f"prompt_embeds must be [B, T, {config.hidden_size}], got "
                             f"{embeds.shape}")
    b, t = embeds.shape[:2]
    lengths = (np.full((b,), t, np.int32) if prompt_lengths is None
               else np.asarray(prompt_lengths, np.int32))
    if lengths.shape != (b,) or lengths.min() < 1 or lengths.max() > t:
        raise ValueError(f"prompt_lengths must be {b} values in [1, {t}], got {lengths}")
    max_len = t + max_new_tokens if max_len is None else int(max_len)
    if int(lengths.max()) + max_new_tokens - 1 > max_len:
        raise ValueError(f"max_len {max_len} is too short for prompts of up to "
                         f"{int(lengths.max())} tokens plus {max_new_tokens - 1} cached new ones")
    if temperature > 0 and rng is None:
        raise ValueError("sampling (temperature > 0) needs an rng key")
    rng = jax.random.key(0) if rng is None else rng
    prefill, step = make_step_fns(config, temperature=float(temperature), top_k=int(top_k),
                                  top_p=float(top_p))
    stop = np.asarray(list(stop_token_ids), np.int64)

    def key(i):
        return jax.random.fold_in(rng, i) if temperature > 0 else rng

    t0 = time.perf_counter()
    cache = decoder.init_cache(config, b, max_len)
    pending, cache = prefill(params, embeds, jnp.asarray(lengths), cache, key(0))
    out = np.full((b, max_new_tokens), pad_id, np.int32)
    out_len = np.zeros((b,), np.int64)
    active = np.ones((b,), bool)
    stopped = np.zeros((b,), bool)
    n = 0
    prefill_s = t1 = None
    while True:
        # Dispatch step n + 1 before reading token n, so the device never waits for the host
        # (a row that just stopped costs one discarded step).
        nxt = None
        if n + 1 < max_new_tokens:
            nxt, cache = step(params, pending, cache, key(n + 1))
        host = np.asarray(jax.device_get(pending))
        if prefill_s is None:
            t1 = time.perf_counter()
            prefill_s = t1 - t0
        out[active, n] = host[active]
        out_len[active] += 1
        if on_token is not None:
            on_token(host.astype(np.int32), active.copy())
        hit = active & np.isin(host, stop)
        stopped |= hit
        active &= ~hit
        n += 1
        if nxt is None or not active.any():
            break
        pending = nxt
    decode_s = time.perf_counter() - t1
    lengths_out = np.where(stopped, out_len - 1, out_len)
    return GenerationResult(tokens=out[:, :n], lengths=lengths_out, stopped=stopped,
                            prefill_s=prefill_s, decode_s=decode_s)
