"""Optimizer from the config: AdamW, warmup + cosine schedule, freezing by regex.

    config.optim = dict(lr=2e-5, warmup_ratio=0.03, min_lr_ratio=0.0, weight_decay=0.0,
                        b1=0.9, b2=0.999, eps=1e-8, grad_clip_norm=1.0,
                        frozen=("vision_tower/.*", "audio_encoder/.*"))

Frozen parameters (path regexes over "/"-joined parameter paths, matched in full) get no
optimizer state and no updates, like the originals' `requires_grad_(False)` on the towers
(TDC `tdc/train.py`: the vision towers are never trained).
"""

import re
from collections.abc import Sequence
from typing import Any

import jax
import optax


def path_str(path) -> str:
    """'/'-joined names of a `jax.tree_util` key path, e.g. 'llm/layers_0/attn/q/kernel'."""
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(k.name)
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        else:
            parts.append(str(k))
    return "/".join(parts)


def frozen_mask(params: Any, patterns: Sequence[str]) -> Any:
    """A tree of bools, True where the parameter path fully matches one of `patterns`."""
    compiled = [re.compile(p) for p in patterns]
    return jax.tree_util.tree_map_with_path(
        lambda path, _: any(c.fullmatch(path_str(path)) for c in compiled), params)


def make_schedule(cfg, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 over `warmup_ratio * total_steps`, then cosine to `min_lr_ratio * lr`.

    TDC trains with `--lr_scheduler_type cosine --warmup_ratio 0.03` (scripts/stage*/).
    """
    warmup = int(round(cfg.warmup_ratio * total_steps))
    if warmup >= total_steps:
        raise ValueError(f"warmup ({warmup} steps) must be shorter than training ({total_steps})")
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=warmup, decay_steps=total_steps,
        end_value=cfg.lr * cfg.min_lr_ratio)


def make_optimizer(cfg, params: Any, total_steps: int) -> tuple[optax.GradientTransformation,
                                                                 optax.Schedule]:
    """AdamW with gradient clipping on the trainable parameters, nothing on the frozen ones.

    Args:
      cfg: `config.optim` (fields above).
      params: the parameter tree (abstract is fine); only its structure and paths are used.
      total_steps: length of the schedule.

    Returns:
      (optimizer, schedule).

    Raises:
      ValueError: every parameter is frozen (nothing to train), or a bad schedule.
    """
    schedule = make_schedule(cfg, total_steps)
    frozen = frozen_mask(params, cfg.frozen)
    if all(jax.tree.leaves(frozen)):
        raise ValueError(f"every parameter matches optim.frozen={list(cfg.frozen)}")
    chain = []
    if cfg.grad_clip_norm:
        chain.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
    chain.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay))
    labels = jax.tree.map(lambda f: "frozen" if f else "train", frozen)
    tx = optax.multi_transform({"train": optax.chain(*chain), "frozen": optax.set_to_zero()},
                               labels)
    return tx, schedule
