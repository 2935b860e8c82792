"""TPO DPO + SFT loss against the tpo_dpo_loss fixture (TPO's vendored TRL DPOTrainer)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longvid_jax import dpo

ATOL = 1e-5  # float32, torch vs XLA (observed <= 1e-6)


@pytest.fixture(scope="module")
def case(fixtures_dir):
    d = fixtures_dir / "metrics" / "tpo_dpo_loss"
    io = dict(np.load(d / "io.npz"))
    return (json.loads((d / "input.json").read_text()),
            json.loads((d / "expected.json").read_text()), io)


def _close(a, b, atol=ATOL):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=0,
                               atol=atol)


def test_concatenate_pairs(case):
    _, _, io = case
    chosen = {k: io[f"chosen_{k}"] for k in ("input_ids", "labels", "attention_mask")}
    rejected = {k: io[f"rejected_{k}"] for k in ("input_ids", "labels", "attention_mask")}
    out = dpo.concatenate_pairs(chosen, rejected)
    for k in chosen:
        np.testing.assert_array_equal(np.asarray(out[k]), io[f"concatenated_{k}"])


def test_log_probs_and_sft(case):
    _, _, io = case
    labels = jnp.asarray(io["new_labels"])
    for who in ("policy", "reference"):
        per_token, mask = dpo.token_logps(jnp.asarray(io[f"{who}_logits"]), labels)
        assert per_token.dtype == jnp.float32 and per_token.shape == (6, 12)
        np.testing.assert_array_equal(np.asarray(mask), io["loss_mask"].astype(bool))
        _close(per_token, io[f"{who}_per_token_logps"])
        seq = dpo.sequence_logps(jnp.asarray(io[f"{who}_logits"]), labels)
        _close(seq[:3], io[f"{who}_chosen_logps"])
        _close(seq[3:], io[f"{who}_rejected_logps"])
    nll, count = dpo.sft_nll(jnp.asarray(io["policy_logits"][:3]), labels[:3])
    assert int(count) == int(io["chosen_token_count"])
    _close(nll, io["chosen_token_nll_sum"], atol=1e-4)
    _close(nll / count, io["sft_loss_unscaled"])


@pytest.mark.parametrize("setting", ["s1", "s2"])
def test_tpo_loss_matches_fixture(case, setting):
    inp, exp, io = case
    cfg = dpo.make_config(**inp["settings"][setting])
    loss_fn = jax.jit(lambda p, r, y: dpo.tpo_loss_from_logits(p, r, y, cfg))
    total, aux = loss_fn(io["policy_logits"], io["reference_logits"], io["new_labels"])
    _close(total, io[f"{setting}_losses_total"])
    _close(aux["dpo_losses"], io[f"{setting}_dpo_losses_per_example_unscaled"])
    _close(aux["chosen_rewards"], io[f"{setting}_chosen_rewards"])
    _close(aux["rejected_rewards"], io[f"{setting}_rejected_rewards"])
    want = exp["metrics"][setting]["metrics"]
    assert list(want) == list(dpo.METRIC_NAMES)
    assert set(aux["metrics"]) == set(want)  # jit returns dicts with sorted keys
    for k, v in want.items():
        assert aux["metrics"][k].dtype == jnp.float32 and aux["metrics"][k].shape == ()
        _close(aux["metrics"][k], v)
    # Pair 2 is a tie (identical chosen and rejected): strict ">" counts it 0.
    assert float(aux["metrics"]["rewards/accuracies"]) == np.float32(1 / 3)
    # tpo_loss on the pieces (eager: TPO's key order) gives the same, with the eval prefix.
    total2, metrics2 = dpo.tpo_loss(aux["policy_chosen_logps"], aux["policy_rejected_logps"],
                                    aux["reference_chosen_logps"],
                                    aux["reference_rejected_logps"],
                                    aux["sft_nll_sum"] / aux["sft_token_count"], cfg,
                                    metric_prefix="eval_")
    assert list(metrics2) == [f"eval_{k}" for k in dpo.METRIC_NAMES]
    _close(total2, total, atol=1e-6)


def test_gradients_flow_to_policy_only(case):
    _, _, io = case
    labels = jnp.asarray(io["new_labels"])

    def loss(p, r):
        return dpo.tpo_loss_from_logits(p, r, labels)[0]

    grad_fn = jax.jit(jax.grad(loss, argnums=(0, 1)))
    g_policy, g_ref = grad_fn(jnp.asarray(io["policy_logits"]), jnp.asarray(io["reference_logits"]))
    assert np.all(np.isfinite(g_policy)) and np.abs(g_policy).max() > 0
    assert np.abs(g_ref).max() == 0
    # No gradient reaches positions without a target (prompt, image, padding).
    no_target = ~io["loss_mask"].astype(bool)
    assert np.abs(np.asarray(g_policy)[:, :-1][no_target]).max() == 0


def test_other_loss_types_and_config():
    rng = np.random.default_rng(0)
    pc, pr, rc, rr = (jnp.asarray(rng.normal(-10, 3, 4), jnp.float32) for _ in range(4))
    beta = 0.3
    z = np.asarray((pc - pr) - (rc - rr), np.float64)
    hinge, _, _ = dpo.dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="hinge")
    _close(hinge, np.maximum(0, 1 - beta * z))
    ipo, _, _ = dpo.dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="ipo")
    _close(ipo, (z - 1 / (2 * beta)) ** 2, atol=1e-3)
    smooth, _, _ = dpo.dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=0.2)
    _close(smooth, 0.8 * np.logaddexp(0, -beta * z) + 0.2 * np.logaddexp(0, beta * z))
    free, _, _ = dpo.dpo_loss(pc, pr, rc, rr, beta=beta, reference_free=True)
    _close(free, np.logaddexp(0, -beta * np.asarray(pc - pr, np.float64)))
    kto, _, _ = dpo.dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="kto_pair")
    assert kto.shape == (8,)
    assert dpo.make_config("trl").gamma == 0.1 and dpo.make_config("tpo").gamma == 1.0
    assert dpo.from_dict({"variant": "tpo", "beta": 0.5}).beta == 0.5
    with pytest.raises(ValueError, match="unknown TPOLossConfig fields"):
        dpo.make_config(alpha=1.0)
    with pytest.raises(ValueError, match="loss_type"):
        dpo.make_config(loss_type="orpo")
    with pytest.raises(ValueError, match="loss_type"):
        dpo.dpo_loss(pc, pr, rc, rr, loss_type="orpo")
    with pytest.raises(ValueError, match="2B rows"):
        dpo.tpo_loss_from_logits(jnp.zeros((3, 4, 5)), jnp.zeros((3, 4, 5)),
                                 jnp.zeros((3, 4), jnp.int32))
