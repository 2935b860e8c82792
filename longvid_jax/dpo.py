"""TPO's preference loss: DPO on summed response log-probs plus SFT on the chosen answer.

Follows ruili33/TPO @ 6c43c58, `longva/trl/trainer/dpo_trainer.py` (TPO's vendored TRL
0.7.11.dev0): `DPOTrainer.concatenated_inputs` (with `utils.pad_to_length`), `get_batch_logps`,
`dpo_loss`, `get_sft_loss` and `get_batch_loss_metrics`, whose logged metric names this module
keeps. Fixture: `shared/fixtures/metrics/tpo_dpo_loss` (README section 13). The original has no
documented bug, so nothing here takes a `compat` argument.

    loss = dpo_alpha * mean_b(-log sigmoid(beta * ((pi_c - pi_r) - (ref_c - ref_r))))
           + gamma * CE(policy logits of the chosen rows, their labels)

* pi / ref are per-sequence **sums** of the log-probs of the response tokens (labels shifted by
  one, positions labelled `label_pad_token_id` ignored); `loss_type="ipo"` averages instead.
* The SFT term is a token-weighted mean over every non-ignored chosen token of the batch
  (`nn.CrossEntropyLoss()` on the flattened chosen rows), not a mean of per-example means.
* Rewards are beta * (pi - ref), without gradient; `rewards/accuracies` counts chosen > rejected
  strictly, so a tie counts 0.

Letters: B preference pairs (the concatenated batch has 2B rows, chosen rows first), T tokens,
V vocabulary. Everything is float32.
"""

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from longvid_jax.variants import config_from_variant

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "kto_pair")
METRIC_NAMES = (
    "losses/dpo", "losses/sft", "losses/total", "rewards/chosen", "rewards/rejected",
    "rewards/accuracies", "rewards/margins", "logps/rejected", "logps/chosen",
    "ref_logps/rejected", "ref_logps/chosen",
)


@dataclasses.dataclass(frozen=True)
class TPOLossConfig:
    """Hyper-parameters of the TPO loss.

    Attributes:
      beta: DPO temperature.
      dpo_alpha: weight of the mean DPO loss.
      gamma: weight of the SFT loss.
      label_smoothing: conservative-DPO smoothing (sigmoid loss only).
      loss_type: one of LOSS_TYPES.
      reference_free: use a zero reference log-ratio.
      label_pad_token_id: label of positions that are not targets.
    """

    beta: float = 0.1
    dpo_alpha: float = 1.0
    gamma: float = 1.0
    label_smoothing: float = 0.0
    loss_type: str = "sigmoid"
    reference_free: bool = False
    label_pad_token_id: int = -100

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")


# "tpo": TPO's train_dpo.py TrainingArguments defaults (beta 0.1, dpo_alpha 1, gamma 1).
# "trl": the vendored DPOTrainer.__init__'s own defaults (gamma 0.1).
VARIANTS: dict[str, dict[str, Any]] = {"tpo": {}, "trl": {"gamma": 0.1}}


def make_config(variant: str | None = None, **overrides: Any) -> TPOLossConfig:
    """Builds a `TPOLossConfig` from a named variant plus field overrides.

    Raises:
      ValueError: an unknown variant, field or loss type.
    """
    return config_from_variant(TPOLossConfig, VARIANTS, variant, overrides)


def from_dict(d: Mapping[str, Any]) -> TPOLossConfig:
    """`make_config` from a dict / ConfigDict that may hold a `variant` key."""
    d = dict(d)
    return make_config(d.pop("variant", None), **d)


def _pad_right(x: Int[Array, "B T"], length: int, value: int) -> Int[Array, "B T2"]:
    return jnp.pad(x, ((0, 0), (0, length - x.shape[1])), constant_values=value)


def concatenate_pairs(chosen: Mapping[str, Int[Array, "B Tc"]],
                      rejected: Mapping[str, Int[Array, "B Tr"]], *, padding_value: int = 0,
                      label_pad_token_id: int = -100) -> dict[str, Int[Array, "B2 T"]]:
    """Right-pads chosen and rejected rows to one length and stacks them (chosen first).

    `DPOTrainer.concatenated_inputs` (decoder-only): `input_ids` pad with `padding_value`,
    `labels` with `label_pad_token_id`, `attention_mask` with 0.

    Args:
      chosen: `{"input_ids", "labels", "attention_mask"}`, int[B, Tc] each.
      rejected: the same keys, int[B, Tr].
      padding_value: pad id of input_ids.
      label_pad_token_id: pad value of labels.

    Returns:
      The same keys, int[2B, max(Tc, Tr)].

    Raises:
      KeyError: a key missing from `rejected`.
    """
    length = max(chosen["input_ids"].shape[1], rejected["input_ids"].shape[1])
    out = {}
    for key, a in chosen.items():
        if "labels" in key:
            value = label_pad_token_id
        elif key.endswith("input_ids"):
            value = padding_value
        else:
            value = 0
        out[key] = jnp.concatenate(
            [_pad_right(jnp.asarray(a), length, value),
             _pad_right(jnp.asarray(rejected[key]), length, value)], axis=0)
    return out


def token_logps(logits: Float[Array, "B T V"], labels: Int[Array, "B T"], *,
                label_pad_token_id: int = -100
                ) -> tuple[Float[Array, "B T1"], Bool[Array, "B T1"]]:
    """Log-prob of each next-token label (`get_batch_logps` before the sum), T1 = T - 1.

    Args:
      logits: float[B, T, V] (cast to float32); position t predicts labels[t + 1].
      labels: int[B, T], `label_pad_token_id` where there is no target.
      label_pad_token_id: ignored label value.

    Returns:
      (per-token log-probs float32[B, T-1], 0 where masked; loss mask bool[B, T-1]).

    Raises:
      ValueError: logits and labels disagree on [B, T].
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {logits.shape} and labels {labels.shape} disagree on [B, T]")
    labels = labels[:, 1:]
    logits = logits[:, :-1].astype(jnp.float32)
    mask = labels != label_pad_token_id
    safe = jnp.where(mask, labels, 0)
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), safe[..., None], axis=-1)
    return logp[..., 0] * mask, mask


def sequence_logps(logits: Float[Array, "B T V"], labels: Int[Array, "B T"], *,
                   average: bool = False, label_pad_token_id: int = -100) -> Float[Array, " B"]:
    """Summed (or, with `average`, mean) log-prob of each row's response tokens.

    `DPOTrainer.get_batch_logps`; TPO uses the sum (`average_log_prob` only for ipo).

    Args:
      logits: float[B, T, V].
      labels: int[B, T].
      average: divide by the number of target tokens.
      label_pad_token_id: ignored label value.

    Returns:
      float32[B].
    """
    per_token, mask = token_logps(logits, labels, label_pad_token_id=label_pad_token_id)
    total = per_token.sum(-1)
    return total / mask.sum(-1) if average else total


def sft_nll(logits: Float[Array, "B T V"], labels: Int[Array, "B T"], *,
            label_pad_token_id: int = -100) -> tuple[Float[Array, ""], Int[Array, ""]]:
    """Summed next-token NLL of all target tokens and their count (`get_sft_loss`).

    TPO's SFT loss is `nll_sum / count` over the chosen rows: `nn.CrossEntropyLoss()` (mean over
    non-ignored tokens) on shifted logits/labels.

    Args:
      logits: float[B, T, V] of the chosen rows.
      labels: int[B, T] of the chosen rows (the model's labels, placeholders expanded).
      label_pad_token_id: ignored label value (CrossEntropyLoss's ignore_index -100).

    Returns:
      (nll sum float32[], token count int32[]).
    """
    per_token, mask = token_logps(logits, labels, label_pad_token_id=label_pad_token_id)
    return -per_token.sum(), mask.sum()


def dpo_loss(policy_chosen_logps: Float[Array, " B"], policy_rejected_logps: Float[Array, " B"],
             reference_chosen_logps: Float[Array, " B"],
             reference_rejected_logps: Float[Array, " B"], *, beta: float = 0.1,
             label_smoothing: float = 0.0, loss_type: str = "sigmoid",
             reference_free: bool = False
             ) -> tuple[Float[Array, " B2"], Float[Array, " B"], Float[Array, " B"]]:
    """Per-pair preference losses and rewards (`DPOTrainer.dpo_loss`).

    Args:
      policy_chosen_logps, policy_rejected_logps: float32[B], summed log-probs of the policy.
      reference_chosen_logps, reference_rejected_logps: float32[B], of the reference model.
      beta: temperature.
      label_smoothing: sigmoid loss: weight of the flipped-label term.
      loss_type: "sigmoid" (TPO), "hinge", "ipo" or "kto_pair".
      reference_free: take the reference log-ratio as 0.

    Returns:
      (losses float32[B] ([2B] for kto_pair), chosen rewards float32[B], rejected rewards
      float32[B]); rewards are beta * (policy - reference) under `stop_gradient`.

    Raises:
      ValueError: unknown loss_type.
    """
    pi_logratios = policy_chosen_logps - policy_rejected_logps
    if reference_free:
        ref_logratios = jnp.zeros((), pi_logratios.dtype)
    else:
        ref_logratios = reference_chosen_logps - reference_rejected_logps
    logits = pi_logratios - ref_logratios
    if loss_type == "sigmoid":
        losses = (-jax.nn.log_sigmoid(beta * logits) * (1 - label_smoothing)
                  - jax.nn.log_sigmoid(-beta * logits) * label_smoothing)
    elif loss_type == "hinge":
        losses = jax.nn.relu(1 - beta * logits)
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    elif loss_type == "kto_pair":
        chosen_logratios = policy_chosen_logps - reference_chosen_logps
        rejected_logratios = policy_rejected_logps - reference_rejected_logps
        chosen_kl = jnp.maximum(chosen_logratios.mean(), 0)
        rejected_kl = jnp.maximum(rejected_logratios.mean(), 0)
        losses = jnp.concatenate([
            1 - jax.nn.sigmoid(beta * (chosen_logratios - rejected_kl)),
            1 - jax.nn.sigmoid(beta * (chosen_kl - rejected_logratios))])
    else:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    chosen_rewards = jax.lax.stop_gradient(beta * (policy_chosen_logps - reference_chosen_logps))
    rejected_rewards = jax.lax.stop_gradient(
        beta * (policy_rejected_logps - reference_rejected_logps))
    return losses, chosen_rewards, rejected_rewards


def tpo_loss(policy_chosen_logps: Float[Array, " B"], policy_rejected_logps: Float[Array, " B"],
             reference_chosen_logps: Float[Array, " B"],
             reference_rejected_logps: Float[Array, " B"], sft_loss: Float[Array, ""],
             config: TPOLossConfig = TPOLossConfig(), *, metric_prefix: str = ""
             ) -> tuple[Float[Array, ""], dict[str, Float[Array, ""]]]:
    """Total TPO loss and the metrics TPO logs (`DPOTrainer.get_batch_loss_metrics`).

    Args:
      policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
        reference_rejected_logps: float32[B] per-sequence log-probs (`sequence_logps`).
      sft_loss: float32[], the unscaled SFT loss (`nll_sum / count` from `sft_nll`).
      config: beta, dpo_alpha, gamma, loss type.
      metric_prefix: "" for training, "eval_" for evaluation (TPO's `train_eval`).

    Returns:
      (total float32[] = dpo_alpha * mean(dpo losses) + gamma * sft_loss, metrics), metrics a
      dict of float32[] named as TPO logs them (METRIC_NAMES, with the prefix): losses/dpo and
      losses/sft unscaled, losses/total, rewards/{chosen, rejected, accuracies, margins} (means
      over the batch), logps/{chosen, rejected} (policy) and ref_logps/{chosen, rejected}.
    """
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
        reference_rejected_logps, beta=config.beta, label_smoothing=config.label_smoothing,
        loss_type=config.loss_type, reference_free=config.reference_free)
    unscaled_dpo = losses.mean()
    total = unscaled_dpo * config.dpo_alpha + sft_loss * config.gamma
    sg = jax.lax.stop_gradient
    metrics = {
        "losses/dpo": unscaled_dpo,
        "losses/sft": sft_loss,
        "losses/total": total,
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).astype(jnp.float32).mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/rejected": sg(policy_rejected_logps).mean(),
        "logps/chosen": sg(policy_chosen_logps).mean(),
        "ref_logps/rejected": sg(reference_rejected_logps).mean(),
        "ref_logps/chosen": sg(reference_chosen_logps).mean(),
    }
    metrics = {f"{metric_prefix}{k}": sg(v) for k, v in metrics.items()}
    return total, metrics


def tpo_loss_from_logits(policy_logits: Float[Array, "B2 T V"],
                         reference_logits: Float[Array, "B2 T V"], labels: Int[Array, "B2 T"],
                         config: TPOLossConfig = TPOLossConfig(), *, metric_prefix: str = ""
                         ) -> tuple[Float[Array, ""], dict[str, Any]]:
    """TPO loss from the logits of one concatenated forward pass (chosen rows, then rejected).

    `DPOTrainer.concatenated_forward` + `get_batch_loss_metrics`: both models see the same 2B
    rows (B2 = 2B); `labels` are the labels aligned with the logits, i.e. with the visual
    placeholder already expanded into -100 positions (LLaVA's `new_labels`).

    Args:
      policy_logits: float[2B, T, V] of the trained model.
      reference_logits: float[2B, T, V] of the frozen reference (no gradient is taken).
      labels: int[2B, T].
      config: loss hyper-parameters.
      metric_prefix: see `tpo_loss`.

    Returns:
      (total loss float32[], aux) with aux = {"metrics": the logged dict, "dpo_losses":
      float32[B] unscaled, "chosen_rewards", "rejected_rewards": float32[B],
      "policy_chosen_logps", "policy_rejected_logps", "reference_chosen_logps",
      "reference_rejected_logps": float32[B], "sft_nll_sum": float32[], "sft_token_count":
      int32[]}.

    Raises:
      ValueError: an odd number of rows or mismatched shapes.
    """
    rows = labels.shape[0]
    if rows % 2 or policy_logits.shape[0] != rows or reference_logits.shape[0] != rows:
        raise ValueError(f"need 2B rows in logits and labels, got {policy_logits.shape[0]}, "
                         f"{reference_logits.shape[0]}, {rows}")
    b = rows // 2
    kw = dict(average=config.loss_type == "ipo", label_pad_token_id=config.label_pad_token_id)
    policy = sequence_logps(policy_logits, labels, **kw)
    reference = jax.lax.stop_gradient(sequence_logps(reference_logits, labels, **kw))
    nll_sum, count = sft_nll(policy_logits[:b], labels[:b],
                             label_pad_token_id=config.label_pad_token_id)
    sft = nll_sum / count
    total, metrics = tpo_loss(policy[:b], policy[b:], reference[:b], reference[b:], sft, config,
                              metric_prefix=metric_prefix)
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        policy[:b], policy[b:], reference[:b], reference[b:], beta=config.beta,
        label_smoothing=config.label_smoothing, loss_type=config.loss_type,
        reference_free=config.reference_free)
    aux = {
        "metrics": metrics, "dpo_losses": jax.lax.stop_gradient(losses),
        "chosen_rewards": chosen_rewards, "rejected_rewards": rejected_rewards,
        "policy_chosen_logps": jax.lax.stop_gradient(policy[:b]),
        "policy_rejected_logps": jax.lax.stop_gradient(policy[b:]),
        "reference_chosen_logps": reference[:b], "reference_rejected_logps": reference[b:],
        "sft_nll_sum": jax.lax.stop_gradient(nll_sum), "sft_token_count": count,
    }
    return total, aux
