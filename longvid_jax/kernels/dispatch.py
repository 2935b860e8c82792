"""One attention entry point that picks the implementation from the platform and the inputs.

  "splash"      TPU: Pallas splash attention (`splash_tpu.py`).
  "cudnn"       GPU: `jax.nn.dot_product_attention(implementation="cudnn")`, bf16 / fp16,
                causal or full, no segment ids.
  "pallas_gpu"  GPU: Pallas flash kernel (`flash_gpu.py`), for what cuDNN cannot do (segment
                ids of packed sequences, float32).
  "ring"        any platform: ring attention over mesh axis `axis` (`ring.py`), one sequence
                spread over the devices of that axis; each step through cuDNN on GPU (the
                Pallas flash kernel with segment ids or float32), through XLA elsewhere.
  "xla"         everywhere: the pure-JAX reference (`models.attention.masked_attention_ref`),
                which materialises float32 scores [B, N, T, S] and is refused above
                `max_score_bytes`.

Letters: B batch, T query tokens, S key / value tokens, N query heads, K kv heads, H head dim.
"""

from typing import Literal

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jaxtyping import Array, Float, Int

from longvid_jax.kernels import cudnn_tiles, flash_gpu, ring, splash_tpu
from longvid_jax.models.attention import masked_attention_ref

Implementation = Literal["auto", "xla", "cudnn", "pallas_gpu", "splash", "ring"]
IMPLEMENTATIONS = ("auto", "xla", "cudnn", "pallas_gpu", "splash", "ring")

# Largest float32 score tensor the XLA path may build (B * N * T * S * 4 bytes): 2 GiB.
DEFAULT_MAX_SCORE_BYTES = 2 * 1024**3

_GPU_BACKENDS = ("gpu", "cuda", "rocm")


def select_implementation(
    *,
    backend: str,
    dtype: jnp.dtype,
    has_segment_ids: bool,
    mesh: Mesh | None = None,
    axis: str = "context",
    padding_only: bool = False,
) -> str:
    """The implementation `attention(..., implementation="auto")` runs.

    Args:
      backend: `jax.default_backend()` ("cpu", "gpu" / "cuda" / "rocm", "tpu").
      dtype: the query dtype.
      has_segment_ids: packed sequences (segment ids) are given.
      mesh, axis: a mesh whose `axis` has more than one device selects "ring".
      padding_only: the segment ids only mark right padding (one sequence per row), which
        cuDNN takes as sequence lengths.

    Returns:
      One of "ring", "splash", "cudnn", "pallas_gpu", "xla".
    """
    if mesh is not None and mesh.shape.get(axis, 1) > 1:
        return "ring"
    if backend == "tpu":
        return "splash"
    if backend in _GPU_BACKENDS:
        half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        return "cudnn" if half and (padding_only or not has_segment_ids) else "pallas_gpu"
    return "xla"


def _dividing(axes, dim: int, mesh) -> str | tuple[str, ...] | None:
    """`axes` (a mesh axis name, a tuple of them or None) if their sizes divide `dim`, else
    None."""
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    size = 1
    for name in names:
        size *= mesh.shape[name]
    return axes if names and dim % size == 0 else None


def score_bytes(q_shape, kv_len: int) -> int:
    """Bytes of the float32 [B, N, T, S] scores the XLA path would materialise."""
    b, t, n, _ = q_shape
    return 4 * b * n * t * kv_len


def attention(
    q: Float[Array, "B T N H"],
    k: Float[Array, "B S K H"],
    v: Float[Array, "B S K H"],
    *,
    causal: bool = False,
    segment_ids: Int[Array, "B T"] | None = None,
    kv_segment_ids: Int[Array, "B S"] | None = None,
    scale: float | None = None,
    implementation: Implementation = "auto",
    max_score_bytes: int = DEFAULT_MAX_SCORE_BYTES,
    mesh: Mesh | None = None,
    axis: str = "context",
    batch_axes: str | tuple[str, ...] | None = None,
    head_axes: str | tuple[str, ...] | None = None,
    interpret: bool = False,
    padding_only: bool = False,
) -> Float[Array, "B T N H"]:
    """Attention softmax(q k^T * scale, masked) v through the chosen implementation.

    Mask: query t sees key s when `t >= s` (if causal; positions 0..T-1, 0..S-1) and, with
    packed sequences, when their segment ids are equal. Rows with no visible key are padding
    (undefined output).

    Args:
      q: [B, T, N, H] queries; k, v: [B, S, K, H], N % K == 0.
      causal: causal rule.
      segment_ids: int32[B, T] segment ids of the queries (packed sequences); also those of the
        keys unless `kv_segment_ids` (int32[B, S]) is given.
      scale: logit scale, default H**-0.5.
      implementation: "auto" (`select_implementation` on `jax.default_backend()`, the dtype,
        the segment ids and the mesh) or one name of the module docstring.
      max_score_bytes: the XLA path (and each ring step's local tile) refuses to build float32
        scores larger than this.
      mesh, axis: the device mesh (a `Mesh`, or the `AbstractMesh` of `jax.set_mesh`) and its
        axis for ring attention ("ring", or "auto" when that
        axis has more than one device). Inputs are global arrays, T sharded over `axis`.
      batch_axes, head_axes: mesh axes sharding B and N / K inside ring attention (leave None
        only when B / heads are replicated: shard_map would otherwise gather them).
      interpret: run Pallas kernels ("pallas_gpu", "splash") in the interpreter (tests).
      padding_only: promise that `segment_ids` are 1 (or any one id > 0) on each row's tokens
        followed by 0 on its right padding, never several packed sequences. cuDNN then serves
        the call with per-row sequence lengths (the count of ids > 0); rows past a length are
        padding (undefined output). Other implementations ignore it.

    Returns:
      [B, T, N, H] in q's dtype.

    Raises:
      ValueError: unknown implementation; scores above `max_score_bytes` on the XLA path;
        segment ids with "cudnn"; "ring" without a mesh; errors of the kernels (shapes,
        block divisibility).
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {implementation!r}, "
                         f"expected one of {IMPLEMENTATIONS}")
    if kv_segment_ids is None:
        kv_segment_ids = segment_ids
    elif segment_ids is None:
        raise ValueError("kv_segment_ids given without segment_ids")
    if implementation == "auto":
        implementation = select_implementation(
            backend=jax.default_backend(), dtype=q.dtype, has_segment_ids=segment_ids is not None,
            mesh=mesh, axis=axis, padding_only=padding_only)
    seg = {"q_segment_ids": segment_ids, "kv_segment_ids": kv_segment_ids}
    s_len = k.shape[1]

    if implementation == "xla":
        need = score_bytes(q.shape, s_len)
        if need > max_score_bytes:
            raise ValueError(
                f"XLA attention would materialise {need / 2**30:.2f} GiB of float32 scores "
                f"[B, N, T, S] = [{q.shape[0]}, {q.shape[2]}, {q.shape[1]}, {s_len}] > "
                f"max_score_bytes={max_score_bytes}; use a flash kernel (splash on TPU, "
                f"cudnn / pallas_gpu on GPU), ring attention over a mesh axis, or raise the limit")
        return masked_attention_ref(q, k, v, causal=causal, scale=scale, **seg)
    if implementation == "cudnn":
        lengths = {}
        if segment_ids is not None:
            if not padding_only:
                raise ValueError("cudnn attention takes no segment ids of packed sequences "
                                 "(only right padding, padding_only=True); use 'pallas_gpu'")
            # At least 1: an all-padding row (a batch's filler) attends to its first token
            # rather than to nothing, so it stays finite (its loss weight is 0; NaN * 0 is not).
            lengths = {name: jnp.maximum(jnp.sum(ids > 0, axis=1, dtype=jnp.int32), 1)
                       for name, ids in (("query_seq_lengths", segment_ids),
                                         ("key_value_seq_lengths", kv_segment_ids))}
        return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal,
                                            implementation="cudnn", **lengths)
    if implementation == "pallas_gpu":
        return flash_gpu.flash_attention(q, k, v, causal=causal, scale=scale,
                                         interpret=interpret, **seg)
    if implementation == "splash":
        return splash_tpu.splash_attention(q, k, v, causal=causal, scale=scale,
                                           interpret=interpret, **seg)
    # implementation == "ring"
    if mesh is None:
        raise ValueError("ring attention needs a mesh (and its axis)")
    d = mesh.shape[axis]
    # Batch / head axes that do not divide their dimension (e.g. a batch of 1 at init) are
    # replicated inside the ring instead.
    batch_axes = _dividing(batch_axes, q.shape[0], mesh)
    head_axes = _dividing(head_axes, min(q.shape[2], k.shape[2]), mesh)
    other = 1
    for names in (batch_axes, head_axes):
        for name in (names,) if isinstance(names, str) else names or ():
            other *= mesh.shape[name]
    # On GPU each ring step runs a flash kernel (memory O(shard)): cuDNN's where it serves
    # (bf16 / fp16, no segment ids, a JAX exposing its tile calls), else the Pallas one;
    # elsewhere the step's scores are materialised by XLA, within the XLA path's guard.
    inner = "xla"
    if jax.default_backend() in _GPU_BACKENDS:
        half = q.dtype in (jnp.bfloat16, jnp.float16)
        inner = ("cudnn" if half and segment_ids is None and cudnn_tiles.supported()
                 else "pallas_gpu")
    need = score_bytes(q.shape, s_len) // (d * d * other)
    if inner == "xla" and need > max_score_bytes:
        raise ValueError(f"ring attention step would materialise {need / 2**30:.2f} GiB of "
                         f"float32 scores per device > max_score_bytes={max_score_bytes}")
    return ring.ring_attention(q, k, v, mesh=mesh, axis=axis, causal=causal, scale=scale,
                               batch_axes=batch_axes, head_axes=head_axes, inner=inner, **seg)
