"""Tests of `longvid_jax/models/lora.py` and the LoRA path of `layers.Einsum`."""

import dataclasses
import functools
import importlib.util
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from longvid_jax import optim, train
from longvid_jax.models import decoder, lora, video_llm
from longvid_jax.models.layers import Einsum, EinsumWeights
from tests.helpers import ScopedLM

B, T = 2, 6
LLM_TARGETS = "llm/.*/(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


_LM = ScopedLM


def _lm(scan: bool) -> _LM:
    # Unfused projections outside LoRA too (a LoRA context always runs them unfused), so the
    # plain and adapted models do the same matmuls and can be compared bitwise.
    return _LM(decoder.make_config("tiny", vocab_size=64, scan_layers=scan,
                                   attention_impl="xla", fused_projections=False))


def _tokens(seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, 64, (B, T)), jnp.int32)


def _init(model, cfg, *args):
    """Params of `model` with the adapters of `cfg` (jitted: eager init is slow)."""

    @jax.jit
    def init(rng):
        with lora.lora_context(cfg):
            return nn.unbox(model.init(rng, *args))["params"]

    return init(jax.random.key(0))


def _random_params(model, cfg, *args, seed=0):
    """Params like `init` under `cfg` (B zeros), drawn with NumPy from `eval_shape` (no compile):
    matrices N(0, 1/fan_in), norm scales 1 + 0.1 N, biases and embeddings 0.1 N / N."""

    def shapes(rng):
        with lora.lora_context(cfg):
            return nn.unbox(model.init(rng, *args))["params"]

    rng = np.random.default_rng(seed)

    def draw(path, x):
        name = optim.path_str(path)
        noise = rng.standard_normal(x.shape).astype(np.float32)
        if name.endswith("lora_b"):
            return np.zeros(x.shape, np.float32)
        if name.endswith("lora_a"):
            fan_in = np.prod(x.shape[-2 if "o_proj" not in name else -3:-1])
            return rng.uniform(-1, 1, x.shape).astype(np.float32) / np.sqrt(fan_in)
        if "scale" in name:
            return 1 + 0.1 * noise
        if "bias" in name:
            return 0.1 * noise
        if "embedding" in name:
            return noise
        lead = 1 if "/layers/" in name else 0  # stacked under nn.scan
        fan_in = x.shape[lead] * (x.shape[lead + 1] if "o_proj" in name else 1)
        return noise / np.sqrt(fan_in)

    return jax.tree_util.tree_map_with_path(lambda p, x: draw(p, x).astype(np.float32),
                                            jax.eval_shape(shapes, jax.random.key(0)))


def _strip(params):
    """The tree without adapters (what a model without LoRA holds)."""
    if isinstance(params, dict):
        return {k: _strip(v) for k, v in params.items() if k not in ("lora_a", "lora_b")}
    return params


def _module_paths(params, leaf="lora_a") -> set[str]:
    out = set()
    for path, _ in jax.tree_util.tree_leaves_with_path(params):
        p = optim.path_str(path)
        if p.endswith("/" + leaf):
            out.add(p[: -len(leaf) - 1])
    return out


@pytest.mark.parametrize("eqn, fan_in, want", [
    ("BTD,DNH->BTNH", (0,), ("BTD,Dr->BTr", "BTr,rNH->BTNH")),
    ("BTNH,NHD->BTD", (0, 1), ("BTNH,NHr->BTr", "BTr,rD->BTD")),
    ("...E,ED->...D", (0,), ("...E,Er->...r", "...r,rD->...D")),
    ("BrD,DM->BrM", (0,), ("BrD,Da->Bra", "Bra,aM->BrM")),  # r taken: the next free letter
])
def test_lora_equations(eqn, fan_in, want):
    assert lora.lora_equations(eqn, fan_in) == want


@pytest.mark.parametrize("eqn, fan_in", [
    ("BTD,DM->BTM", (1,)),  # fan-in not leading
    ("BTD,DM->BTDM", (0,)),  # fan-in letter not contracted
    ("BTM,BM->BT", (0,)),  # kernel letter B is not output-only
    ("BTD->BT", (0,)),
])
def test_lora_equations_reject(eqn, fan_in):
    with pytest.raises(ValueError):
        lora.lora_equations(eqn, fan_in)


def test_config_validation_and_off_states():
    assert lora.from_dict(None) is None
    assert lora.from_dict({"rank": 0, "targets": ".*"}) is None
    assert lora.from_dict({"rank": 4, "targets": ""}) is None
    cfg = lora.from_dict(ml_collections.ConfigDict({"variant": "tdc"}))
    assert (cfg.rank, cfg.alpha, cfg.dropout, cfg.scale) == (128, 256.0, 0.05, 2.0)
    for bad in ({"rank": -1}, {"dropout": 1.0}, {"init": "zeros"}, {"targets": "("},
                {"rnak": 4}):
        with pytest.raises(ValueError):
            lora.make_config(**bad)


_CFG = lora.make_config(rank=3, alpha=6.0, targets=LLM_TARGETS, init="kaiming_uniform")


@functools.cache
def _lm_setup(scan: bool):
    """(model, params with fresh adapters, jitted plain apply, jitted adapted apply)."""
    model = _lm(scan)
    params = _random_params(model, _CFG, _tokens())
    plain = jax.jit(lambda p, t: model.apply({"params": p}, t))

    @jax.jit
    def adapted(p, t):
        with lora.lora_context(_CFG):
            return model.apply({"params": p}, t)

    return model, params, plain, adapted


def _train_adapters(model, cfg, params, tokens, steps=3):
    """A few Adam steps towards random next tokens with only the adapters trainable."""
    opt_cfg = ml_collections.ConfigDict({
        "lr": 3e-2, "warmup_ratio": 0.0, "min_lr_ratio": 0.0, "weight_decay": 0.0, "b1": 0.9,
        "b2": 0.999, "eps": 1e-8, "grad_clip_norm": 1.0, "frozen": ("(?!.*/lora_[ab]$).*",)})
    tx, _ = optim.make_optimizer(opt_cfg, params, total_steps=10)
    targets = _tokens(1)

    @jax.jit
    def step(p, s):
        def loss(p):
            with lora.lora_context(cfg):
                logits = model.apply({"params": p}, tokens)
            return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
        u, s = tx.update(jax.grad(loss)(p), s, p)
        return optax.apply_updates(p, u), s

    state = tx.init(params)
    for _ in range(steps):
        params, state = step(params, state)
    return params


@pytest.mark.parametrize("scan", [False, True])
def test_fresh_adapter_is_identity_then_merge_matches(scan):
    """A fresh adapter changes nothing (bitwise); after LoRA-only training (frozen params never
    move) or with random stacked B, the merged params without LoRA give the adapter model's
    outputs."""
    model, params, plain_fn, adapted = _lm_setup(scan)
    cfg, tokens = _CFG, _tokens()
    base = _strip(params)
    assert _module_paths(params) == {
        f"llm/{layer}/{blk}/{name}"
        for layer in (["layers"] if scan else ["layers_0", "layers_1"])
        for blk, names in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                           ("mlp", ("gate_proj", "up_proj", "down_proj")))
        for name in names}
    q = params["llm"]["layers" if scan else "layers_0"]["self_attn"]["q_proj"]
    lead = (2,) if scan else ()
    assert q["lora_a"].shape == lead + (64, 3) and q["lora_b"].shape == lead + (3, 4, 16)
    assert not np.any(np.asarray(q["lora_b"]))

    plain = plain_fn(base, tokens)
    np.testing.assert_array_equal(np.asarray(adapted(params, tokens)), np.asarray(plain))

    if scan:  # stacked adapters: random B (the training loop is the same as unscanned)
        rng = np.random.default_rng(1)
        trained = jax.tree_util.tree_map_with_path(
            lambda path, x: (0.1 * rng.standard_normal(x.shape).astype(np.float32)
                             if optim.path_str(path).endswith("lora_b") else x), params)
    else:
        trained = _train_adapters(model, cfg, params, tokens)
        jax.tree.map(np.testing.assert_array_equal, _strip(trained), base)
        assert lora.lora_param_count(trained) == (
            2 * 3 * (64 + 4 * 16 + 2 * (64 + 2 * 16) + 64 + 4 * 16 + 3 * (64 + 128)))
    q = trained["llm"]["layers" if scan else "layers_0"]["self_attn"]["q_proj"]
    assert np.abs(np.asarray(q["lora_b"])).max() > 1e-3

    merged = lora.merge_lora(trained, cfg)
    assert jax.tree.structure(merged) == jax.tree.structure(base)
    assert lora.lora_param_count(merged) == 0
    got = plain_fn(merged, tokens)
    want = adapted(trained, tokens)
    assert np.abs(np.asarray(want) - np.asarray(plain)).max() > 1e-3  # the adapters matter
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)


def test_adapter_params_need_a_context():
    model, params, _, _ = _lm_setup(False)
    with pytest.raises(ValueError, match="no lora_context targets"):
        model.apply({"params": params}, _tokens())
    with pytest.raises(ValueError, match="rank > 0"):
        lora.merge_lora(params, {"rank": 0})
    broken = _strip(params)
    broken["llm"]["layers_0"]["mlp"]["up_proj"]["lora_a"] = jnp.ones((64, 3))
    with pytest.raises(ValueError, match="up_proj"):
        lora.merge_lora(broken, _CFG)


class _Pair(nn.Module):
    """One Einsum and one EinsumWeights (applied by hand) on the same input."""

    @nn.compact
    def __call__(self, x):
        y = Einsum((8, 2, 4), ("embed", "heads", "head_dim"), bias_axes=("heads", "head_dim"),
                   name="proj")("BTD,DNH->BTNH", x)
        w, b = EinsumWeights((8, 2, 4), ("embed", "heads", "head_dim"),
                             bias_axes=("heads", "head_dim"), name="fused")()
        return y, jnp.einsum("BTD,DNH->BTNH", x, w) + b


def test_dropout_only_with_rng_and_not_deterministic():
    x = jax.random.normal(jax.random.key(1), (B, T, 8))
    cfg = lora.make_config(rank=4, alpha=4.0, dropout=0.5, targets="proj", init="gaussian")
    model = _Pair()
    params = _init(model, cfg, x)
    assert set(params["proj"]) == {"kernel", "bias", "lora_a", "lora_b"}
    assert set(params["fused"]) == {"kernel", "bias"}  # not targeted
    assert params["proj"]["lora_a"].std() < 0.5  # gaussian: N(0, 1/r)
    assert not np.any(np.asarray(params["proj"]["lora_b"]))
    params["proj"]["lora_b"] = jax.random.normal(jax.random.key(2), (4, 2, 4))

    @functools.partial(jax.jit, static_argnums=0)
    def run_jit(deterministic, rng):
        with lora.lora_context(cfg, deterministic=deterministic):
            return model.apply({"params": params}, x,
                               rngs=None if rng is None else {"dropout": rng})[0]

    def run(deterministic, rng):
        return np.asarray(run_jit(deterministic, rng))

    ref = run(True, None)
    k1, k2 = jax.random.key(10), jax.random.key(11)
    np.testing.assert_array_equal(run(True, k1), ref)  # deterministic: rng ignored
    d1, d1b, d2 = run(False, k1), run(False, k1), run(False, k2)
    np.testing.assert_array_equal(d1, d1b)
    assert np.abs(np.asarray(d1 - ref)).max() > 1e-3
    assert np.abs(np.asarray(d1 - d2)).max() > 1e-3
    with pytest.raises(ValueError, match="'dropout' rng"):
        run(False, None)

    # The dropped LoRA term equals the one computed by hand with a mask of kept inputs.
    base = jnp.einsum("BTD,DNH->BTNH", x, params["proj"]["kernel"]) + params["proj"]["bias"]
    lora_term = (d1 - base) / cfg.scale  # = (x * mask / keep) @ A @ B
    a, b = params["proj"]["lora_a"], params["proj"]["lora_b"]
    full = jnp.einsum("BTD,Dr,rNH->BTNH", x, a, b)
    assert np.abs(np.asarray(lora_term - full)).max() > 1e-3  # some inputs were dropped


def test_einsum_weights_fold_the_adapter():
    x = jax.random.normal(jax.random.key(1), (B, T, 8))
    model = _Pair()
    cfg = lora.make_config(rank=2, alpha=2.0, targets="proj|fused")
    params = _init(model, cfg, x)
    bound = 1 / np.sqrt(8)  # kaiming-uniform(a=sqrt(5)) of PEFT: U(-1/sqrt(fan_in), ...)
    a = np.asarray(params["proj"]["lora_a"])
    assert a.shape == (8, 2) and 0.3 * bound < np.abs(a).max() <= bound
    plain = model.apply({"params": _strip(params)}, x)
    for name in ("proj", "fused"):
        params[name]["lora_b"] = jax.random.normal(jax.random.key(3), (2, 2, 4))
    with lora.lora_context(cfg):
        y, y_fused = model.apply({"params": params}, x)
    merged = lora.merge_lora(params, cfg)
    y_m, y_fused_m = model.apply({"params": merged}, x)
    for got, want, before in ((y, y_m, plain[0]), (y_fused, y_fused_m, plain[1])):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)
        assert np.abs(np.asarray(got - before)).max() > 1e-3
    with (lora.lora_context(dataclasses.replace(cfg, dropout=0.1), deterministic=False),
          pytest.raises(ValueError, match="EinsumWeights")):
        model.apply({"params": params}, x, rngs={"dropout": jax.random.key(0)})


def test_tdc_targets_select_exactly_the_listed_modules():
    """The stage-3 regex on the demo composite: every LLM projection and every Q-Former
    query/key/value/out/wi/wo gets an adapter; towers, projector and heads get none."""
    path = pathlib.Path(__file__).resolve().parents[2] / "configs" / "tdc.py"
    spec = importlib.util.spec_from_file_location("tdc_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config("stage=3,model=simplified")
    model_cfg = video_llm.make_config(c.model)
    model = video_llm.VideoLLM(model_cfg)
    batch = train.example_batch(model_cfg, c.input)
    with lora.lora_context(c.lora):
        shapes = jax.eval_shape(lambda r: nn.unbox(model.init(r, batch))["params"],
                                jax.random.key(0))
    n_llm, n_qf = model_cfg.llm.num_layers, model_cfg.compressor.qformer.depth
    cross = model_cfg.compressor.qformer.cross_attention_freq
    want = {f"llm/layers_{i}/{blk}/{name}" for i in range(n_llm)
            for blk, names in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                               ("mlp", ("gate_proj", "up_proj", "down_proj")))
            for name in names}
    for i in range(n_qf):
        blocks = ["self_attn", "text_mlp", "query_mlp"] + (["cross_attn"] if i % cross == 0
                                                           else [])
        for blk in blocks:
            names = ("query", "key", "value", "out") if "attn" in blk else ("wi", "wo")
            want |= {f"compressor/qformer/layer_{i}/{blk}/{n}" for n in names}
    # query_proj / vision_proj (connectors.LinearProjector) are targets too; they get adapters
    # once that layer calls `lora.einsum_delta`, as `_Projector` below does.
    projectors = {"compressor/query_proj", "compressor/vision_proj"}
    got = _module_paths(shapes)
    assert got - projectors == want and len(got & projectors) in (0, 2)
    assert _module_paths(shapes, "lora_b") == got
    q = shapes["llm"]["layers_0"]["self_attn"]["q_proj"]
    assert q["lora_a"].shape[-1] == c.lora.rank == 4


class _Projector(nn.Module):
    """A layer with its own kernel that opts in through `lora.einsum_delta` (the hook a
    non-Einsum layer such as `connectors.LinearProjector` needs)."""

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.normal(1.0), (8, 6))
        y = jnp.einsum("...E,ED->...D", x, kernel)
        delta = lora.einsum_delta(self, "...E,ED->...D", x, shape=(8, 6), axes=(None, "embed"),
                                  fan_in_axes=(0,), dtype=x.dtype, param_dtype=jnp.float32)
        return y if delta is None else y + delta


def test_einsum_delta_hook_in_a_custom_layer():
    x = jax.random.normal(jax.random.key(1), (2, 3, 4, 8))
    cfg = lora.make_config(rank=2, alpha=3.0, targets="(.*/)?query_proj")

    class Outer(nn.Module):
        @nn.compact
        def __call__(self, x):
            return _Projector(name="query_proj")(x)

    outer = Outer()  # the root scope has no name: the path is ("query_proj",)
    with lora.lora_context(cfg):
        params = nn.unbox(jax.jit(outer.init)(jax.random.key(0), x))["params"]
    layer = params["query_proj"]
    assert layer["lora_a"].shape == (8, 2) and layer["lora_b"].shape == (2, 6)
    layer["lora_b"] = jnp.arange(12.0).reshape(2, 6) / 10
    with lora.lora_context(cfg):
        y = outer.apply({"params": params}, x)
    y_merged = outer.apply({"params": lora.merge_lora(params, cfg)}, x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_merged), atol=1e-5, rtol=0)
