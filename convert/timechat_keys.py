"""TimeChat's Q-Formers: original keys (`timechat_7b.pth`) <-> `longvid_jax.models.timechat` params.

Keys as in the `TimeChat` module's state dict and in `timechat_7b.pth['model']` (no prefix):

  key [shape]                                    ours (under the TimeChatConnector)     transform
  Qformer.bert.*                                 frame_qformer/...  (the LAVIS table of
                                                 `convert.qformer_keys.lavis_rules`)
  query_tokens [1, Q, D]                         frame_qformer/query_tokens [Q, D]      unsqueeze0
  video_frame_position_embedding.weight [M, D]   video_qformer/frame_position_embedding copy
  video_Qformer.bert.*                           video_qformer/qformer/...  (LAVIS table)
  video_query_tokens [1, Qv, Dv]                 video_qformer/qformer/query_tokens     unsqueeze0
  llama_proj.weight [D_llm, Dv] / .bias          video_qformer/llama_proj/kernel, bias  linear/copy

The `*.bert.embeddings.position_ids` buffers are accepted and ignored on import and not written
on export (TimeChat loads its checkpoints with `strict=False`; the buffer is `arange`). The
frame Q-Former's MLM head `Qformer.cls.*` is ignored (TimeChat sets `cls = None`). The other
keys of `timechat_7b.pth` (LoRA of `llama_model.*`) and of the ViT checkpoint belong to other
tables: route keys with `timechat_owns` first.

TimeChat interpolates `video_frame_position_embedding` (nearest) when a checkpoint has a
different number of rows (Video-LLaMA's 32 -> 96); `resize_frame_positions=True` does the same
on import (`longvid_jax.models.timechat.interpolate_frame_positions`), otherwise the shape
mismatch is an error.

Strictness comes from `convert.qformer_keys.import_params` / `export_params` (unmapped, missing,
duplicate keys and shape mismatches raise ValueError naming the key).
"""

from collections.abc import Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from convert import qformer_keys
from convert.qformer_keys import Rule
from longvid_jax.models.timechat import (
    TimeChatConfig,
    TimeChatConnector,
    TimeChatVideoQFormer,
    TimeChatVideoQFormerConfig,
    interpolate_frame_positions,
)

_POS_KEY = "video_frame_position_embedding.weight"
_OWNED = ("Qformer.", "query_tokens", "video_frame_position_embedding.", "video_Qformer.",
          "video_query_tokens", "llama_proj.")


def timechat_owns(key: str) -> bool:
    """Whether a key of `timechat_7b.pth['model']` / the TimeChat state dict belongs here."""
    return any(key == o or (o.endswith(".") and key.startswith(o)) for o in _OWNED)


def frame_rules(target_prefix: str = "frame_qformer/") -> list[Rule]:
    """The frame Q-Former's keys (`Qformer.bert.*`, `query_tokens`)."""
    return qformer_keys.lavis_rules("Qformer.", target_prefix, query_tokens_key="query_tokens",
                                    learned_queries=True)


def video_rules(target_prefix: str = "video_qformer/") -> list[Rule]:
    """The video Q-Former's keys (frame positions, `video_Qformer.bert.*`, video queries,
    `llama_proj`)."""
    rules = qformer_keys.lavis_rules("video_Qformer.", target_prefix + "qformer/",
                                     query_tokens_key="video_query_tokens",
                                     learned_queries=True)
    return rules + [
        Rule(_POS_KEY, target_prefix + "frame_position_embedding"),
        Rule("llama_proj.weight", target_prefix + "llama_proj/kernel", "linear"),
        Rule("llama_proj.bias", target_prefix + "llama_proj/bias"),
    ]


def _flat_shapes(tree) -> dict[str, jax.ShapeDtypeStruct]:
    return qformer_keys._flatten(nn.meta.unbox(tree)["params"])


def video_param_shapes(cfg: TimeChatVideoQFormerConfig) -> dict[str, jax.ShapeDtypeStruct]:
    """Flat '/'-path -> ShapeDtypeStruct of `TimeChatVideoQFormer(cfg)` params."""
    x = jnp.zeros((1, 1, 1, cfg.qformer.encoder_width))
    return _flat_shapes(jax.eval_shape(
        lambda: TimeChatVideoQFormer(cfg).init(jax.random.key(0), x)))


def param_shapes(cfg: TimeChatConfig) -> dict[str, jax.ShapeDtypeStruct]:
    """Flat '/'-path -> ShapeDtypeStruct of `TimeChatConnector(cfg)` params."""
    x = jnp.zeros((1, 1, 1, cfg.frame_qformer.encoder_width))
    ids = jnp.zeros((1, 1, 1), jnp.int32)
    return _flat_shapes(jax.eval_shape(
        lambda: TimeChatConnector(cfg).init(jax.random.key(0), x, ids, ids > 0)))


def _prepare(state, max_frame_pos: int, resize: bool) -> dict[str, Any]:
    items = state.items() if isinstance(state, Mapping) else state
    out: dict[str, Any] = {}
    for key, value in items:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        if resize and key == _POS_KEY and value.shape[0] != max_frame_pos:
            value = interpolate_frame_positions(qformer_keys._to_numpy(value), max_frame_pos)
        out[key] = value
    return out


def to_params(state: Mapping[str, Any] | Iterable[tuple[str, Any]], cfg: TimeChatConfig, *,
              resize_frame_positions: bool = False) -> dict[str, Any]:
    """TimeChat keys of both Q-Formers -> `TimeChatConnector(cfg)` params (numpy).

    Args:
      state: key -> tensor (numpy / torch / jax), or (key, tensor) pairs; only keys for which
        `timechat_owns` holds.
      cfg: `TimeChatConfig`.
      resize_frame_positions: interpolate a frame position table of another length to
        `cfg.video.max_frame_pos`, as TimeChat does on load.

    Raises:
      ValueError: naming the key, see `convert.qformer_keys.import_params`.
    """
    state = _prepare(state, cfg.video.max_frame_pos, resize_frame_positions)
    return qformer_keys.import_params(state, frame_rules() + video_rules(), param_shapes(cfg))


def params_to_original(params: Mapping[str, Any], cfg: TimeChatConfig) -> dict[str, np.ndarray]:
    """`TimeChatConnector(cfg)` params -> TimeChat keys (no `position_ids`, no `cls`)."""
    return qformer_keys.export_params(params, frame_rules() + video_rules(), param_shapes(cfg))


def video_to_params(state: Mapping[str, Any] | Iterable[tuple[str, Any]],
                    cfg: TimeChatVideoQFormerConfig, *,
                    resize_frame_positions: bool = False) -> dict[str, Any]:
    """Video Q-Former keys -> `TimeChatVideoQFormer(cfg)` params (see `to_params`)."""
    state = _prepare(state, cfg.max_frame_pos, resize_frame_positions)
    return qformer_keys.import_params(state, video_rules(""), video_param_shapes(cfg))


def params_to_video(params: Mapping[str, Any],
                    cfg: TimeChatVideoQFormerConfig) -> dict[str, np.ndarray]:
    """`TimeChatVideoQFormer(cfg)` params -> video Q-Former keys."""
    return qformer_keys.export_params(params, video_rules(""), video_param_shapes(cfg))


def frame_to_params(state: Mapping[str, Any] | Iterable[tuple[str, Any]],
                    cfg: qformer_keys.QFormerConfig) -> dict[str, Any]:
    """Frame Q-Former keys (`Qformer.bert.*`, `query_tokens`) -> `QFormer(cfg)` params."""
    return qformer_keys.import_params(_prepare(state, 0, False), frame_rules(""),
                                      qformer_keys.qformer_param_shapes(cfg))


def params_to_frame(params: Mapping[str, Any],
                    cfg: qformer_keys.QFormerConfig) -> dict[str, np.ndarray]:
    """`QFormer(cfg)` params -> frame Q-Former keys."""
    return qformer_keys.export_params(params, frame_rules(""),
                                      qformer_keys.qformer_param_shapes(cfg))
