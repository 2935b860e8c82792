"""Losses: next-token LM loss with a loss mask."""

import functools

import jax
import jax.numpy as jnp

from longvid_jax.kernels import cross_entropy_gpu

LOSS_IMPLS = ("auto", "xla", "pallas", "pallas_interpret")


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
                    *, chunk_size: int, dtype=jnp.float32, logits_dtype=jnp.float32,
                    impl: str = "auto") -> tuple[jax.Array, jax.Array]:
    """`lm_loss(hidden @ head, ...)` without ever holding logits for more than `chunk_size` tokens.

    Tokens are cut into chunks. For each chunk the forward pass computes the logits
    [chunk_size, V], their log-sum-exp and target logit, and also, since the gradient of
    softmax cross-entropy is known there (dlogits = (softmax - onehot) * weight), the chunk's
    gradients d hidden = dlogits head^T and d head += hidden^T dlogits; the logits are then
    dropped. The backward pass only scales the stored gradients by the incoming cotangent. So
    memory is O(chunk_size * V) instead of O(B * T * V), and the head costs the same three
    matmuls as with full logits, with no recomputation (the fused linear cross-entropy of
    Liger-Kernel, Hsu et al. 2024, section 3.1). Without differentiation only the loss is
    computed.

    Args:
      hidden: [B, T, D] final hidden states.
      head: [D, V] output head (`Decoder.head_weight()`).
      targets: int32[B, T]; weights: float32[B, T] (`next_token_targets`), not differentiated.
      chunk_size: tokens per chunk (B * T is padded up to a multiple).
      dtype: matmul operand dtype (the model's compute dtype; d logits is cast to it, as in
        a model that returns logits in that dtype).
      logits_dtype: dtype the head matmul writes its logits in (it accumulates in float32
        either way); the log-softmax and its gradient are computed in float32 from them.
        float32 (default) is the most precise; bfloat16 halves the memory traffic of the
        softmax passes and is what `transformers` models do in bf16 (logits in the weights'
        dtype, upcast for the loss; MaxText's default `logits_dot_in_fp32=False` likewise).

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
    impl = _resolve_impl(impl, chunk_size)
    opts = (jnp.dtype(dtype), jnp.dtype(logits_dtype), impl)
    total = _fused_head_nll(h, head, t, w, opts)
    return total, weights.sum().astype(jnp.float32)


def _resolve_impl(impl: str, chunk_size: int) -> str:
    if impl not in LOSS_IMPLS:
        raise ValueError(f"unknown loss impl {impl!r}; expected one of {LOSS_IMPLS}")
    if impl == "auto":
        single_gpu = jax.default_backend() == "gpu" and jax.device_count() == 1
        impl = "pallas" if single_gpu and chunk_size % 8 == 0 else "xla"
    return impl


def _chunk_logits(h_c, head, opts):
    """Logits [c, V] of one chunk in the logits dtype opts[1] (the matmul accumulates in f32)."""
    dtype, logits_dtype, _ = opts
    return jnp.einsum("TD,DV->TV", h_c.astype(dtype), head.astype(dtype),
                      preferred_element_type=logits_dtype)


def _chunk_nll(logits, t_c, w_c, impl):
    """Summed weighted NLL of one chunk and its rows' float32 log-sum-exp."""
    if impl == "xla":
        logz = cross_entropy_gpu.logsumexp_ref(logits)
    else:
        logz = cross_entropy_gpu.logsumexp(logits, interpret=impl == "pallas_interpret")
    target_logit = jnp.take_along_axis(logits, t_c[:, None], axis=-1)[:, 0]
    return jnp.sum((logz - target_logit.astype(jnp.float32)) * w_c), logz


def _chunk_d_logits(logits, logz, t_c, w_c, opts):
    """(softmax - onehot) * weight of one chunk, in the matmul dtype opts[0]."""
    dtype, _, impl = opts
    if impl == "xla":
        return cross_entropy_gpu.softmax_grad_ref(logits, logz, t_c, w_c, dtype=dtype)
    return cross_entropy_gpu.softmax_grad(
        logits, logz, t_c, w_c, interpret=impl == "pallas_interpret").astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _fused_head_nll(h, head, t, w, opts):
    """Summed weighted NLL of chunked hidden h [C, c, D] through head [D, V] (loss only);
    opts = (matmul operand dtype, logits dtype, softmax impl)."""

    def body(total, xs):
        h_c, t_c, w_c = xs
        nll, _ = _chunk_nll(_chunk_logits(h_c, head, opts), t_c, w_c, opts[2])
        return total + nll, None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (h, t, w))
    return total


def _fused_head_nll_fwd(h, head, t, w, opts):
    dtype = opts[0]

    def body(carry, xs):
        total, d_head = carry
        h_c, t_c, w_c = xs
        logits = _chunk_logits(h_c, head, opts)
        nll, logz = _chunk_nll(logits, t_c, w_c, opts[2])
        d_logits = _chunk_d_logits(logits, logz, t_c, w_c, opts)
        d_h = jnp.einsum("TV,DV->TD", d_logits, head.astype(dtype),
                         preferred_element_type=jnp.float32).astype(h.dtype)
        d_head = d_head + jnp.einsum("TD,TV->DV", h_c.astype(dtype), d_logits,
                                     preferred_element_type=jnp.float32)
        return (total + nll, d_head), d_h

    init = (jnp.zeros((), jnp.float32), jnp.zeros(head.shape, jnp.float32))
    (total, d_head), d_h = jax.lax.scan(body, init, (h, t, w))
    return total, (d_h, d_head.astype(head.dtype), w)


def _fused_head_nll_bwd(opts, res, g):
    del opts
    d_h, d_head, w = res
    scale = lambda x: (g * x.astype(jnp.float32)).astype(x.dtype)  # noqa: E731
    return scale(d_h), scale(d_head), None, jnp.zeros_like(w)


_fused_head_nll.defvjp(_fused_head_nll_fwd, _fused_head_nll_bwd)
