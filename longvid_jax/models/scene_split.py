"""TDC's scene split and chunk layout: which frames start a segment, a chunk, a static frame.

Follows Hoar012/TDC-Video @ fb8333e, `tdc/cambrian_arch.py`: `adapt_segment` (boundaries from the
cosine similarity of consecutive frames' DINOv2 features) and the split / chunking in
`prepare_inputs_labels_for_multimodal` (each segment cut into chunks of 8 frames whose first
frame is static: all its tokens are kept, the others are compressed by the Q-Former), and
`get_max_num_frames` (how many frames fit the 8192-token context).

`scene_layout` runs on the host (NumPy) between the vision towers and the compressor at
inference, where the segmentation decides the token layout before the LLM input is built.
`segment_starts` is the same split inside a jitted training step (a batch of videos already
subsampled to at most `MAX_FRAMES` frames, static shapes); the model then drops the video
slots the layout leaves unused (`video_llm.drop_unused_video_slots`). Letters: B videos,
N / F frames, P tokens per frame, D feature width.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float

# TDC's constants (`adapt_segment`, `prepare_inputs_labels_for_multimodal`).
MAX_FRAMES = 224  # frames kept before the similarity is computed (uniform subsampling above)
CHUNK_SIZE = 8
MAX_CONTEXT = 8192


@dataclasses.dataclass(frozen=True)
class SceneLayout:
    """Frames kept and their segment / chunk structure. Index arrays are int64 NumPy arrays.

    Attributes:
      selected_frame_indices: [M] indices into the input frames (M = min(N, MAX_FRAMES)).
      segment_boundaries: [S] sorted boundaries b (a new segment starts at kept frame b + 1).
      split_points: [S + 2] `[0, b_1 + 1, ..., b_S + 1, M]`; segment i is
        `split_points[i]:split_points[i + 1]` (may be empty, as in the original).
      segment_sizes: [S + 1] frames per segment.
      frame_segment_id, frame_chunk_id: [M] segment and (global) chunk of each kept frame.
      frame_is_static: [M] 1 on the first frame of every chunk.
      cos_similarities: [M - 1] float32 similarity of kept frame i and i + 1, or None when no
        similarity was needed (M <= max_num_segments + 1).
    """

    selected_frame_indices: np.ndarray
    segment_boundaries: np.ndarray
    split_points: np.ndarray
    segment_sizes: np.ndarray
    frame_segment_id: np.ndarray
    frame_chunk_id: np.ndarray
    frame_is_static: np.ndarray
    cos_similarities: np.ndarray | None


def consecutive_cosine(features: np.ndarray) -> np.ndarray:
    """float32 [N - 1] cosine similarity of frame i and i + 1, features [N, P, D] flattened per
    frame (`torch.nn.functional.cosine_similarity`, eps 1e-8 on each norm)."""
    x = np.asarray(features, np.float32).reshape(len(features), -1)
    norms = np.maximum(np.linalg.norm(x, axis=1), np.float32(1e-8))
    dots = np.einsum("nd,nd->n", x[:-1], x[1:])
    return (dots / (norms[:-1] * norms[1:])).astype(np.float32)


def scene_layout(features: np.ndarray, *, max_num_segments: int = 24,
                 max_frames: int = MAX_FRAMES, chunk_size: int = CHUNK_SIZE) -> SceneLayout:
    """Splits a video into scene segments and chunks as TDC does.

    The `max_num_segments` lowest-similarity transitions between consecutive kept frames become
    boundaries (TDC's `dino_threshold` is accepted there but never used; so here it does not
    exist). Videos longer than `max_frames` are first subsampled at `int(i * N / max_frames)`;
    videos of at most `max_num_segments + 1` frames make every frame its own segment.

    Args:
      features: [N, P, D] per-frame features (TDC: DINOv2 tokens, 576 x 1536), any float dtype.
      max_num_segments: boundaries kept (TDC stage 2/3: 24).
      max_frames: frames kept before segmentation (TDC: 224).
      chunk_size: frames per chunk (TDC: 8).

    Returns:
      A `SceneLayout`.

    Raises:
      ValueError: on an empty or non-3-D feature array, or non-positive sizes.
    """
    features = np.asarray(features)
    if features.ndim != 3 or len(features) == 0:
        raise ValueError(f"features must be [N, P, D] with N > 0, got shape {features.shape}")
    if min(max_num_segments, max_frames, chunk_size) <= 0:
        raise ValueError("max_num_segments, max_frames and chunk_size must be positive")
    n = len(features)
    selected = np.arange(n, dtype=np.int64)
    if n > max_frames:
        selected = np.asarray([int(i * n / max_frames) for i in range(max_frames)], np.int64)
    kept = features[selected]
    m = len(kept)
    cos = None
    if m <= max_num_segments + 1:
        boundaries = np.arange(m, dtype=np.int64)
    else:
        cos = consecutive_cosine(kept)
        boundaries = np.sort(np.argsort(cos, kind="stable")[:max_num_segments]).astype(np.int64)
    split_points = np.concatenate([[0], boundaries + 1, [m]]).astype(np.int64)
    sizes = np.diff(split_points)
    segment_id = np.empty(m, np.int64)
    chunk_id = np.empty(m, np.int64)
    static = np.zeros(m, np.int64)
    chunk = 0
    for seg, (start, stop) in enumerate(zip(split_points[:-1], split_points[1:])):
        for first in range(start, stop, chunk_size):
            last = min(first + chunk_size, stop)
            segment_id[first:last] = seg
            chunk_id[first:last] = chunk
            static[first] = 1
            chunk += 1
    return SceneLayout(selected, boundaries, split_points, sizes, segment_id, chunk_id, static,
                       cos)


def max_num_frames(text_len: int, *, with_audio: bool, max_frames: int = MAX_FRAMES,
                   max_context: int = MAX_CONTEXT) -> int:
    """Frames that fit the context next to `text_len` text tokens (TDC `get_max_num_frames`):
    `(max_context - text_len - 16) // 32` (38 with audio), capped at `max_frames`, at least 1.

    Raises:
      ValueError: if text_len is negative.
    """
    if text_len < 0:
        raise ValueError(f"text_len must be >= 0, got {text_len}")
    per_frame = 38 if with_audio else 32
    return max(1, min(max_frames, (max_context - text_len - 16) // per_frame))


def segment_starts(features: Float[Array, "B F P D"], frame_mask: Bool[Array, "B F"], *,
                   max_num_segments: int = 24) -> Bool[Array, "B F"]:
    """The frames that start a scene segment, in-graph: `scene_layout`'s boundaries for a batch.

    For each video (its valid frames a prefix, at most `MAX_FRAMES` of them: subsample before,
    as `scene_layout` does), the `max_num_segments` transitions between consecutive valid frames
    with the lowest cosine similarity of their flattened features (ties: the earlier one, as
    the stable argsort of the original) start a new segment at the later frame; videos of at
    most `max_num_segments + 1` frames make every frame its own segment. Frame 0 always starts
    one. Equals `scene_layout(...).split_points` read as starts (tested); the result feeds
    `TDCCompressor(segment_starts=...)`.

    Args:
      features: float[B, F, P, D] per-frame features (TDC: DINOv2 tokens on the 24x24 grid).
      frame_mask: bool[B, F] valid frames (a prefix of each row).
      max_num_segments: boundaries per video (TDC stage 2/3: 24).

    Returns:
      bool[B, F], False on invalid frames.

    Raises:
      ValueError: on a non-4-D feature array, a mask of another shape or
        max_num_segments < 1.
    """
    if features.ndim != 4 or frame_mask.shape != features.shape[:2]:
        raise ValueError(f"features must be [B, F, P, D] and frame_mask [B, F]; got "
                         f"{features.shape}, {frame_mask.shape}")
    if max_num_segments < 1:
        raise ValueError(f"max_num_segments must be >= 1, got {max_num_segments}")
    b, f = frame_mask.shape
    starts = jnp.zeros((b, f), bool).at[:, 0].set(True)
    if f == 1:
        return starts & frame_mask
    x = features.reshape(b, f, -1).astype(jnp.float32)
    norms = jnp.maximum(jnp.linalg.norm(x, axis=-1), 1e-8)
    cos = jnp.einsum("bfd,bfd->bf", x[:, :-1], x[:, 1:]) / (norms[:, :-1] * norms[:, 1:])
    valid = frame_mask[:, 1:] & frame_mask[:, :-1]  # transition i: frame i -> i + 1
    k = min(max_num_segments, f - 1)
    # Lowest similarities first; XLA's top_k puts the lower index first among equal values.
    _, idx = jax.lax.top_k(jnp.where(valid, -cos, -jnp.inf), k)
    chosen = jnp.take_along_axis(valid, idx, axis=1)
    rows = jnp.arange(b)[:, None]
    starts = starts.at[rows, idx + 1].max(chosen)
    return starts & frame_mask
