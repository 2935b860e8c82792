import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from longvid_jax import losses, optim
from longvid_jax.config_arg import parse_arg


def _optim_cfg(**kw):
    base = dict(lr=1e-2, warmup_ratio=0.1, min_lr_ratio=0.1, weight_decay=0.0, b1=0.9,
                b2=0.999, eps=1e-8, grad_clip_norm=1.0, frozen=("vision_tower/.*",))
    base.update(kw)
    return ml_collections.ConfigDict(base)


def test_schedule_warmup_then_cosine():
    sched = optim.make_schedule(_optim_cfg(), 100)
    assert float(sched(0)) == 0.0
    assert float(sched(10)) == pytest.approx(1e-2)
    assert float(sched(100)) == pytest.approx(1e-3)
    assert float(sched(55)) == pytest.approx(1e-3 + 0.5 * 9e-3, rel=1e-3)


def test_frozen_parameters_never_move_and_have_no_state():
    rng = np.random.default_rng(0)
    params = {"vision_tower": {"w": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)},
              "llm": {"w": jnp.asarray(rng.normal(size=(4, 2)), jnp.float32)}}
    tx, _ = optim.make_optimizer(_optim_cfg(), params, 100)
    state = tx.init(params)
    for _ in range(20):
        grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
        updates, state = tx.update(grads, state, params)
        params2 = jax.tree.map(lambda p, u: p + u, params, updates)
    np.testing.assert_array_equal(params2["vision_tower"]["w"], params["vision_tower"]["w"])
    assert not np.allclose(params2["llm"]["w"], params["llm"]["w"])
    n_state = sum(x.size for x in jax.tree.leaves(state))
    assert n_state < 3 * 8 + 10  # Adam moments for llm/w only (+ counters)


def test_everything_frozen_is_an_error():
    params = {"vision_tower": {"w": jnp.ones((2,))}}
    with pytest.raises(ValueError, match="every parameter"):
        optim.make_optimizer(_optim_cfg(), params, 10)


def test_next_token_targets_and_loss():
    ids = jnp.array([[5, -200, -200, 7, 8, 9, 0, 0]])
    mask = jnp.array([[0, 0, 0, 0, 1, 1, 0, 0]], bool)
    seg = jnp.array([[1, 1, 1, 1, 1, 1, 0, 0]])
    targets, w = losses.next_token_targets(ids, mask, seg)
    np.testing.assert_array_equal(w[0], [0, 0, 0, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(targets[0, 3:5], [8, 9])
    logits = jax.random.normal(jax.random.key(0), (1, 8, 11))
    nll, count = losses.lm_loss(logits, targets, w)
    logp = jax.nn.log_softmax(logits[0])
    assert float(count) == 2
    assert float(nll) == pytest.approx(-float(logp[3, 8] + logp[4, 9]), rel=1e-6)


def test_parse_arg():
    a = parse_arg("size=full,llm=llama3_2_3b,debug", size="demo", llm="qwen2_7b", debug=False,
                  steps=3)
    assert (a.size, a.llm, a.debug, a.steps) == ("full", "llama3_2_3b", True, 3)
    assert parse_arg("steps=7", steps=3).steps == 7
    with pytest.raises(ValueError, match="unknown config argument"):
        parse_arg("nope=1", size="demo")


def test_chunked_lm_loss_matches_full_logits_and_grads():
    keys = jax.random.split(jax.random.key(1), 4)
    hidden = jax.random.normal(keys[0], (2, 13, 16))
    head = jax.random.normal(keys[1], (16, 50)) * 0.3
    targets = jax.random.randint(keys[2], (2, 13), 0, 50)
    weights = (jax.random.uniform(keys[3], (2, 13)) > 0.3).astype(jnp.float32)

    def full(h, w):
        return losses.lm_loss(jnp.einsum("BTD,DV->BTV", h, w), targets, weights)[0]

    def chunked(h, w):
        return losses.chunked_lm_loss(h, w, targets, weights, chunk_size=8)[0]

    np.testing.assert_allclose(chunked(hidden, head), full(hidden, head), rtol=1e-6)
    g_full = jax.grad(full, argnums=(0, 1))(hidden, head)
    g_chunk = jax.grad(chunked, argnums=(0, 1))(hidden, head)
    for a, b in zip(g_chunk, g_full):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_chunked_lm_loss_bf16_logits_equal_a_bf16_logits_model():
    """logits_dtype=bfloat16 gives the loss and gradients of a model whose head writes bf16
    logits that the loss upcasts (as transformers in bf16), and stays close to float32."""
    keys = jax.random.split(jax.random.key(3), 4)
    hidden = jax.random.normal(keys[0], (2, 11, 16))
    head = jax.random.normal(keys[1], (16, 70)) * 0.5
    targets = jax.random.randint(keys[2], (2, 11), 0, 70)
    weights = (jax.random.uniform(keys[3], (2, 11)) > 0.2).astype(jnp.float32)

    def full(h, w):
        logits = jnp.einsum("BTD,DV->BTV", h, w, preferred_element_type=jnp.bfloat16)
        return losses.lm_loss(logits.astype(jnp.float32), targets, weights)[0]

    def chunked(h, w, dtype=jnp.bfloat16):
        return losses.chunked_lm_loss(h, w, targets, weights, chunk_size=5,
                                      logits_dtype=dtype)[0]

    np.testing.assert_allclose(chunked(hidden, head), full(hidden, head), rtol=1e-6)
    assert abs(chunked(hidden, head) - chunked(hidden, head, jnp.float32)) > 1e-6
    np.testing.assert_allclose(chunked(hidden, head), chunked(hidden, head, jnp.float32),
                               rtol=1e-2)
    g_full = jax.grad(full, argnums=(0, 1))(hidden, head)
    g_chunk = jax.grad(chunked, argnums=(0, 1))(hidden, head)
    for a, b in zip(g_chunk, g_full):  # the reference's backward rounds d hidden to bf16
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.abs(a - b).max() <= 0.01 * np.abs(b).max()


def test_chunked_lm_loss_cotangent_dtypes_and_bf16():
    keys = jax.random.split(jax.random.key(2), 4)
    hidden = jax.random.normal(keys[0], (1, 20, 16), jnp.bfloat16)
    head = jax.random.normal(keys[1], (16, 40)) * 0.3  # float32 master weights
    targets = jax.random.randint(keys[2], (1, 20), 0, 40)
    weights = (jax.random.uniform(keys[3], (1, 20)) > 0.5).astype(jnp.float32)

    def full(h, w):
        logits = jnp.einsum("BTD,DV->BTV", h.astype(jnp.float32), w)
        return 3.0 * losses.lm_loss(logits, targets, weights)[0]

    def chunked(h, w):  # a cotangent other than 1 reaches the stored gradients
        return 3.0 * losses.chunked_lm_loss(h, w, targets, weights, chunk_size=6,
                                            dtype=jnp.bfloat16)[0]

    (v_c, g_c), (v_f, g_f) = (jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(hidden, head)
                              for f in (chunked, full))
    assert g_c[0].dtype == jnp.bfloat16 and g_c[1].dtype == jnp.float32
    np.testing.assert_allclose(v_c, v_f, rtol=2e-2)
    for a, b in zip(g_c, g_f):  # bf16 operands: agree to bf16 precision
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.abs(a - b).max() <= 0.03 * np.abs(b).max()
    # Forward alone (no gradient) computes the same loss.
    np.testing.assert_allclose(jax.jit(chunked)(hidden, head), v_c, rtol=1e-6)
