"""Scaled dot-product attention with GQA, causal / segment / padding masks and additive bias.

`dot_product_attention` is the one entry point the models call. Its `implementation` picks the
backend: `"xla"` (the pure-JAX reference below, which runs everywhere) or `"cudnn"`
(`jax.nn.dot_product_attention` flash attention on NVIDIA GPUs, causal / padding only).
"""

from typing import Literal

import jax
import jax.numpy as jnp

Implementation = Literal["xla", "cudnn"]

_NEG_INF = -0.7 * float(jnp.finfo(jnp.float32).max)


def make_attention_mask(
    *,
    batch: int,
    q_len: int,
    kv_len: int,
    causal: bool = False,
    q_positions: jax.Array | None = None,
    kv_positions: jax.Array | None = None,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    kv_valid: jax.Array | None = None,
) -> jax.Array | None:
    """Builds a boolean mask `bool[B, 1, T, S]` (True = attend), or None when nothing is masked.

    Args:
      causal: query at position p sees keys at positions <= p.
      q_positions, kv_positions: int32[B, T] / int32[B, S] absolute positions for the causal
        rule (default 0..T-1 and 0..S-1; a KV cache passes its own offsets).
      q_segment_ids, kv_segment_ids: int32[B, T] / int32[B, S]; tokens attend only within the
        same segment id (packed sequences). Segment id 0 is padding: it attends nothing but
        itself never corrupts a real token.
      kv_valid: bool[B, S], False for padded keys.
    """
    mask = None

    def _and(m, new):
        return new if m is None else jnp.logical_and(m, new)

    if causal:
        qp = q_positions if q_positions is not None else jnp.arange(q_len)[None, :]
        kp = kv_positions if kv_positions is not None else jnp.arange(kv_len)[None, :]
        mask = _and(mask, (qp[:, :, None] >= kp[:, None, :])[:, None])
    if q_segment_ids is not None or kv_segment_ids is not None:
        if q_segment_ids is None or kv_segment_ids is None:
            raise ValueError("q_segment_ids and kv_segment_ids must be given together")
        mask = _and(mask, (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])[:, None])
    if kv_valid is not None:
        mask = _and(mask, kv_valid[:, None, None, :])
    if mask is not None:
        mask = jnp.broadcast_to(mask, (batch, 1, q_len, kv_len))
    return mask


def dot_product_attention_ref(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: jax.Array | None = None,
    bias: jax.Array | None = None,
    scale: float | None = None,
) -> jax.Array:
    """Pure-JAX attention: softmax(q k^T * scale + bias, masked) v, logits in float32.

    Args:
      q: [B, T, N, H] queries.
      k, v: [B, S, K, H] keys / values; N must be a multiple of K (GQA, G = N // K).
      mask: bool, broadcastable to [B, N, T, S]; True = attend. A row with no True key gets a
        uniform average (it is padding and must be ignored downstream).
      bias: float, broadcastable to [B, N, T, S], added to the logits.
      scale: logit scale, default H**-0.5.

    Returns:
      [B, T, N, H] in q's dtype.
    """
    b, t, n, h = q.shape
    kh = k.shape[2]
    if n % kh:
        raise ValueError(f"query heads {n} not a multiple of kv heads {kh}")
    g = n // kh
    scale = h**-0.5 if scale is None else scale
    qg = q.reshape(b, t, kh, g, h)
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k, preferred_element_type=jnp.float32)
    logits = logits * scale
    s = k.shape[1]
    if bias is not None:
        bias = jnp.broadcast_to(bias, (b, n, t, s)).reshape(b, kh, g, t, s)
        logits = logits + bias.astype(jnp.float32)
    if mask is not None:
        mask = jnp.broadcast_to(mask, (b, n, t, s)).reshape(b, kh, g, t, s)
        logits = jnp.where(mask, logits, _NEG_INF)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v)
    return out.reshape(b, t, n, h)


def masked_attention_ref(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    scale: float | None = None,
) -> jax.Array:
    """The reference every attention kernel is tested against (materialises the scores).

    Args:
      q: [B, T, N, H] queries; k, v: [B, S, K, H], N % K == 0.
      causal: query t sees keys s <= t (positions 0..T-1, 0..S-1).
      q_segment_ids, kv_segment_ids: int32[B, T] / int32[B, S], given together or not at all.
      scale: logit scale, default H**-0.5.

    Returns:
      [B, T, N, H] in q's dtype.
    """
    mask = make_attention_mask(batch=q.shape[0], q_len=q.shape[1], kv_len=k.shape[1],
                               causal=causal, q_segment_ids=q_segment_ids,
                               kv_segment_ids=kv_segment_ids)
    return dot_product_attention_ref(q, k, v, mask=mask, scale=scale)


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: jax.Array | None = None,
    bias: jax.Array | None = None,
    scale: float | None = None,
    implementation: Implementation = "xla",
) -> jax.Array:
    """Attention dispatcher; same contract as `dot_product_attention_ref`.

    `implementation="cudnn"` calls `jax.nn.dot_product_attention(implementation="cudnn")`
    (bf16/fp16 on NVIDIA GPUs); otherwise the XLA reference runs.

    Raises:
      ValueError: for an unknown implementation.
    """
    if implementation == "xla":
        return dot_product_attention_ref(q, k, v, mask=mask, bias=bias, scale=scale)
    if implementation == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale,
                                            implementation="cudnn")
    raise ValueError(f"unknown attention implementation {implementation!r}")
