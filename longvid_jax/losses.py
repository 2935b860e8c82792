"""Losses: next-token LM loss with a loss mask."""

import jax
import jax.numpy as jnp


def next_token_targets(input_ids: jax.Array, loss_mask: jax.Array, segment_ids: jax.Array
                       ) -> tuple[jax.Array, jax.Array]:
    """Shifts tokens so position t predicts token t+1 of the same segment.

    Args:
      input_ids: int32[B, T].
      loss_mask: bool[B, T], True on tokens that are targets (assistant answers).
      segment_ids: int32[B, T], 0 on padding.

    Returns:
      (targets int32[B, T], weights float32[B, T]); the last position of every row and every
      position whose next token is in another segment has weight 0. Placeholder ids (< 0) are
      never targets.
    """
    targets = jnp.concatenate([input_ids[:, 1:], jnp.zeros_like(input_ids[:, :1])], axis=1)
    nxt_mask = jnp.concatenate([loss_mask[:, 1:], jnp.zeros_like(loss_mask[:, :1])], axis=1)
    nxt_seg = jnp.concatenate([segment_ids[:, 1:], jnp.zeros_like(segment_ids[:, :1])], axis=1)
    valid = nxt_mask & (nxt_seg == segment_ids) & (segment_ids > 0) & (targets >= 0)
    return jnp.maximum(targets, 0), valid.astype(jnp.float32)


def lm_loss(logits: jax.Array, targets: jax.Array, weights: jax.Array
            ) -> tuple[jax.Array, jax.Array]:
    """Summed token cross-entropy and the number of target tokens.

    Args:
      logits: float[B, T, V] (cast to float32).
      targets: int32[B, T].
      weights: float32[B, T], 0 where a position is not a target.

    Returns:
      (sum of weighted -log p(target), sum of weights), both float32 scalars; the mean loss is
      their ratio (computed by the caller so gradient accumulation and data parallelism average
      over tokens, not over batches).
    """
    logits = logits.astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = (logz - target_logit) * weights
    return nll.sum(), weights.sum()


def chunked_lm_loss(hidden: jax.Array, head: jax.Array, targets: jax.Array, weights: jax.Array,
                    *, chunk_size: int, dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
    """`lm_loss(hidden @ head, ...)` without ever holding logits for more than `chunk_size` tokens.

    Tokens are cut into chunks; each chunk's logits [chunk_size, V] are computed, reduced to
    log-sum-exp and target logit, and dropped; `jax.checkpoint` recomputes them in the backward
    pass, so memory is O(chunk_size * V) instead of O(B * T * V).

    Args:
      hidden: [B, T, D] final hidden states.
      head: [D, V] output head (`Decoder.head_weight()`).
      targets: int32[B, T]; weights: float32[B, T] (`next_token_targets`).
      chunk_size: tokens per chunk (B * T is padded up to a multiple).
      dtype: matmul operand dtype (the model's compute dtype); logits accumulate in float32.

    Returns:
      (sum of weighted -log p(target), sum of weights), float32 scalars, equal to `lm_loss` on
      the full logits up to float rounding.
    """
    d = hidden.shape[-1]
    n = hidden.shape[0] * hidden.shape[1]
    pad = (-n) % chunk_size
    h = jnp.pad(hidden.reshape(n, d), ((0, pad), (0, 0))).reshape(-1, chunk_size, d)
    t = jnp.pad(targets.reshape(n), (0, pad)).reshape(-1, chunk_size)
    w = jnp.pad(weights.reshape(n).astype(jnp.float32), (0, pad)).reshape(-1, chunk_size)

    @jax.checkpoint
    def chunk_nll(h_c, t_c, w_c):
        logits = jnp.einsum("TD,DV->TV", h_c.astype(dtype), head.astype(dtype),
                            preferred_element_type=jnp.float32)
        logz = jax.nn.logsumexp(logits, axis=-1)
        target_logit = jnp.take_along_axis(logits, t_c[:, None], axis=-1)[:, 0]
        return jnp.sum((logz - target_logit) * w_c)

    def body(total, xs):
        return total + chunk_nll(*xs), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (h, t, w))
    return total, weights.sum().astype(jnp.float32)
