"""Tests of `longvid_jax/models/decoder.py` on its own (HF parity: tests/parity)."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from longvid_jax.models import LAYERS, decoder, lora

B, T = 2, 12


def _inputs(cfg, seed=0, batch=B, length=T):
    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, length)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    return tokens, positions


def _random_params(cfg, seed=0):
    """Random params of `cfg` (norm scales 1 + 0.1 N, biases 0.1 N, matrices N / sqrt(fan_in)).

    Built from `jax.eval_shape` and NumPy, so no XLA compile is spent on init.
    """
    _, positions = _inputs(cfg)
    shapes = jax.eval_shape(decoder.Decoder(cfg).init, jax.random.key(0),
                            jnp.zeros((B, T, cfg.hidden_size)), positions)
    rng = np.random.default_rng(seed)

    def draw(path, x):
        name = jax.tree_util.keystr(path)
        noise = rng.standard_normal(x.shape).astype(np.float32)
        if "scale" in name:
            return 1 + 0.1 * noise
        if "bias" in name:
            return 0.1 * noise
        if "embedding" in name:
            return noise
        fan_in = x.shape[0] * (x.shape[1] if "o_proj" in name else 1)
        return noise / np.sqrt(fan_in)

    return jax.tree_util.tree_map_with_path(draw, nn.unbox(shapes["params"]))


@functools.cache
def _forward_fn(cfg):
    """Jitted (embeds, hidden, logits, hidden_states) of `cfg`; cached so tests share compiles."""
    model = decoder.Decoder(cfg)

    def run(m, tokens, positions, segment_ids):
        embeds = m.embed(tokens)
        hidden, aux = m(embeds, positions, segment_ids,
                        return_hidden_states=not cfg.scan_layers)
        return embeds, hidden, m.logits(hidden), aux.get("hidden_states")

    return jax.jit(lambda p, *a: model.apply({"params": p}, *a, method=run))


def _run(cfg, params, tokens, positions, segment_ids=None):
    """(hidden [B, T, D], logits float32[B, T, V]); segment_ids default to all ones."""
    if segment_ids is None:
        segment_ids = jnp.ones(tokens.shape, jnp.int32)
    _, hidden, logits, _ = _forward_fn(cfg)(params, tokens, positions, segment_ids)
    return hidden, logits


def _loss(cfg, params, tokens, positions):
    model = decoder.Decoder(cfg)

    def run(m):
        hidden, _ = m(m.embed(tokens), positions)
        logp = jax.nn.log_softmax(m.logits(hidden)[:, :-1])
        return -jnp.take_along_axis(logp, tokens[:, 1:, None], -1).mean()

    return model.apply({"params": params}, method=run)


@pytest.fixture(scope="module")
def tiny():
    cfg = decoder.make_config("tiny")
    return cfg, _random_params(cfg)


def test_param_tree_shapes_and_logical_axes():
    cfg = decoder.make_config("tiny", tie_embeddings=False)
    tokens, positions = _inputs(cfg)
    variables = jax.eval_shape(decoder.Decoder(cfg).init, jax.random.key(0),
                               jnp.zeros((B, T, cfg.hidden_size)), positions)
    shapes = jax.tree.map(lambda x: x.shape, nn.unbox(variables["params"]))
    d, n, k, h, m, v = 64, 4, 2, 16, 128, 512
    attn = shapes["layers_1"]["self_attn"]
    assert attn["q_proj"] == {"kernel": (d, n, h), "bias": (n, h)}
    assert attn["k_proj"] == attn["v_proj"] == {"kernel": (d, k, h), "bias": (k, h)}
    assert attn["o_proj"] == {"kernel": (n, h, d)}
    assert shapes["layers_1"]["mlp"] == {"gate_proj": {"kernel": (d, m)},
                                         "up_proj": {"kernel": (d, m)},
                                         "down_proj": {"kernel": (m, d)}}
    assert shapes["embed_tokens"] == {"embedding": (v, d)}
    assert shapes["lm_head"] == {"kernel": (d, v)}
    specs = nn.get_partition_spec(variables)["params"]
    assert tuple(specs["layers_0"]["self_attn"]["q_proj"]["kernel"]) == ("embed", "heads",
                                                                        "head_dim")
    assert tuple(specs["layers_0"]["self_attn"]["k_proj"]["kernel"]) == ("embed", "kv_heads",
                                                                        "head_dim")
    assert tuple(specs["layers_0"]["mlp"]["down_proj"]["kernel"]) == ("mlp", "embed")
    assert tuple(specs["embed_tokens"]["embedding"]) == ("vocab", "embed")
    assert tuple(specs["lm_head"]["kernel"]) == ("embed", "vocab")
    tied = jax.eval_shape(decoder.Decoder(dataclasses.replace(cfg, tie_embeddings=True)).init,
                          jax.random.key(0), jnp.zeros((B, T, cfg.hidden_size)), positions)
    assert "lm_head" not in tied["params"]


@pytest.mark.parametrize("variant,count,scan", [("qwen2_7b", 7_615_616_512, False),
                                                ("qwen2_7b", 7_615_616_512, True),
                                                ("qwen2_0_5b", 494_032_768, False),
                                                ("llama3_2_3b", 3_212_749_824, False),
                                                ("llama2_7b", 6_738_415_616, False)])
def test_eval_shape_of_full_size_variants(variant, count, scan):
    cfg = decoder.make_config(variant, scan_layers=scan, param_dtype="bfloat16")
    variables = jax.eval_shape(
        decoder.Decoder(cfg).init, jax.random.key(0),
        jax.ShapeDtypeStruct((1, 16, cfg.hidden_size), jnp.bfloat16),
        jax.ShapeDtypeStruct((1, 16), jnp.int32))
    leaves = jax.tree.leaves(nn.unbox(variables["params"]))
    assert sum(int(np.prod(x.shape)) for x in leaves) == count
    assert all(x.dtype == jnp.bfloat16 for x in leaves)
    if scan:
        spec = nn.get_partition_spec(variables)["params"]["layers"]["mlp"]["up_proj"]
        assert tuple(spec["kernel"]) == (LAYERS, "embed", "mlp")


def test_scan_layers_matches_unscanned(tiny):
    cfg, params = tiny
    tokens, positions = _inputs(cfg, seed=1)
    segment_ids = jnp.asarray(np.repeat([[1] * 7 + [2] * 5], B, axis=0), jnp.int32)
    want = _run(cfg, params, tokens, positions, segment_ids)
    scan_cfg = dataclasses.replace(cfg, scan_layers=True)
    stacked = decoder.stack_layer_params(params, cfg.num_layers)
    assert stacked["layers"]["self_attn"]["q_proj"]["kernel"].shape == (2, 64, 4, 16)
    got = _run(scan_cfg, stacked, tokens, positions, segment_ids)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=0)
    # The scanned init produces the same tree as stacking, and unstacking inverts it.
    scanned_init = jax.eval_shape(decoder.Decoder(scan_cfg).init, jax.random.key(0),
                                  jnp.zeros((B, T, cfg.hidden_size)), positions)
    assert (jax.tree.structure(nn.unbox(scanned_init["params"]))
            == jax.tree.structure(stacked))
    back = decoder.unstack_layer_params(stacked)
    assert jax.tree.all(jax.tree.map(np.array_equal, back, params))
    with pytest.raises(ValueError, match="scan_layers"):
        decoder.Decoder(scan_cfg).apply({"params": stacked}, jnp.zeros((B, T, 64)), positions,
                                        return_hidden_states=True)


def test_fused_projections_match_separate_ones(tiny):
    """q/k/v fused into one matmul: same parameters, same outputs and grads; skipped inside a
    LoRA context and where the head axes are split over devices."""
    cfg, params = tiny
    tokens, positions = _inputs(cfg, seed=9, length=40)  # B * T >= D: the fused path runs
    separate = dataclasses.replace(cfg, fused_projections=False)
    assert cfg.fused_projections
    for got, want in zip(_run(cfg, params, tokens, positions),
                         _run(separate, params, tokens, positions)):
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
    g_fused = jax.grad(functools.partial(_loss, cfg))(params, tokens, positions)
    g_sep = jax.grad(functools.partial(_loss, separate))(params, tokens, positions)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4),
                 g_fused, g_sep)

    assert decoder._fusable("heads", "mlp")
    with lora.lora_context(lora.make_config(rank=2, targets="q_proj")):
        assert not decoder._fusable("heads")
    mesh = jax.make_mesh((2, 2), ("data", "tensor"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)
    with jax.set_mesh(mesh), nn.logical_axis_rules((("heads", "tensor"), ("mlp", None))):
        assert not decoder._fusable("heads", "kv_heads")
        assert decoder._fusable("mlp")


def test_remat_policies_give_identical_loss_and_grads():
    cfg = decoder.make_config("tiny", num_layers=1)  # one layer: XLA CPU compiles are slow
    params = _random_params(cfg, seed=7)
    stacked = decoder.stack_layer_params(params, cfg.num_layers)
    tokens, positions = _inputs(cfg, seed=2)
    runs = {  # name: (config, params); one jit for all (XLA CPU compiles are the slow part)
        "none": (cfg, params),
        "full": (dataclasses.replace(cfg, remat_policy="full"), params),
        "dots_scan": (dataclasses.replace(cfg, remat_policy="dots", scan_layers=True), stacked),
    }

    @jax.jit
    def all_grads(params, stacked):
        trees = {"none": params, "full": params, "dots_scan": stacked}
        return {name: jax.value_and_grad(lambda p, c=c: _loss(c, p, tokens, positions))(
            trees[name]) for name, (c, _) in runs.items()}

    results = all_grads(params, stacked)
    for name, (c, p) in runs.items():  # remat really is in the graph
        jaxpr = str(jax.make_jaxpr(lambda p, c=c: _loss(c, p, tokens, positions))(p))
        assert ("checkpoint" in jaxpr or "remat" in jaxpr) == (name != "none"), name
    loss, grads = results["none"]
    assert np.isfinite(loss) and loss > 0
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
    results["dots_scan"] = (results["dots_scan"][0],
                            decoder.unstack_layer_params(results["dots_scan"][1]))
    for name in ("full", "dots_scan"):
        np.testing.assert_allclose(results[name][0], loss, rtol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5),
                     results[name][1], grads)


def test_bfloat16_compute_runs_and_tracks_float32(tiny):
    cfg, params = tiny
    tokens, positions = _inputs(cfg, seed=3)
    want_hidden, want_logits = _run(cfg, params, tokens, positions)
    bf16 = dataclasses.replace(cfg, dtype="bfloat16", param_dtype="bfloat16")
    hidden, logits = _run(bf16, jax.tree.map(lambda x: x.astype(jnp.bfloat16), params), tokens,
                          positions)
    assert hidden.dtype == jnp.bfloat16 and logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits)).all()
    err = np.abs(np.asarray(logits) - np.asarray(want_logits)).max()
    assert err < 0.05 * np.abs(np.asarray(want_logits)).max(), err


def test_packed_segments_match_each_sequence_alone(tiny):
    cfg, params = tiny
    tokens, _ = _inputs(cfg, seed=4)
    n, pad = 5, T - 10  # per row: two sequences of 5, then 2 padding tokens (segment 0)
    tokens = tokens.at[:, 2 * n:].set(0)
    positions = jnp.asarray(np.tile(np.r_[np.arange(n), np.arange(n), np.zeros(pad)], (B, 1)),
                            jnp.int32)
    segment_ids = jnp.asarray(np.tile(np.repeat([1, 2, 0], [n, n, pad]), (B, 1)), jnp.int32)
    packed_hidden, packed_logits = _run(cfg, params, tokens, positions, segment_ids)
    alone = tokens[:, :2 * n].reshape(2 * B, n)  # rows a, b, c, d each on its own
    alone_pos = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), alone.shape)
    alone_hidden, alone_logits = _run(cfg, params, alone, alone_pos)
    np.testing.assert_allclose(packed_hidden[:, :2 * n].reshape(2 * B, n, -1), alone_hidden,
                               atol=1e-5, rtol=0)
    np.testing.assert_allclose(packed_logits[:, :2 * n].reshape(2 * B, n, -1), alone_logits,
                               atol=1e-5, rtol=0)
    assert np.isfinite(np.asarray(packed_logits)).all()
    # Packing without the segment ids would mix the sequences.
    mixed, _ = _run(cfg, params, tokens, positions)
    assert np.abs(np.asarray(mixed[:, n:2 * n] - packed_hidden[:, n:2 * n])).max() > 1e-3


def test_hidden_states_aux_and_embed(tiny):
    cfg, params = tiny
    tokens, positions = _inputs(cfg, seed=5)
    embeds, hidden, _, states = _forward_fn(cfg)(params, tokens, positions,
                                                 jnp.ones(tokens.shape, jnp.int32))
    np.testing.assert_array_equal(embeds, params["embed_tokens"]["embedding"][tokens])
    assert len(states) == cfg.num_layers + 1
    np.testing.assert_array_equal(states[0], embeds)
    np.testing.assert_array_equal(states[-1], hidden)
    assert all(np.abs(np.asarray(a - b)).max() > 1e-2 for a, b in zip(states, states[1:]))
    model = decoder.Decoder(cfg)
    with pytest.raises(ValueError, match="embeds"):
        model.apply({"params": params}, embeds[..., :8], positions)
    with pytest.raises(ValueError, match="positions"):
        model.apply({"params": params}, embeds, positions[:, :4])


def test_logical_constraints_run_on_a_mesh(tiny):
    cfg, params = tiny
    tokens, positions = _inputs(cfg, seed=6)
    want_hidden, want_logits = _run(cfg, params, tokens, positions)
    mesh = jax.make_mesh((2, 2), ("data", "tensor"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)
    rules = (("act_batch", "data"), ("act_heads", "tensor"), ("act_kv_heads", "tensor"),
             ("heads", "tensor"), ("kv_heads", "tensor"), ("mlp", "tensor"),
             ("vocab", "tensor"), ("act_vocab", "tensor"))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        abstract = jax.eval_shape(decoder.Decoder(cfg).init, jax.random.key(0),
                                  jnp.zeros((B, T, cfg.hidden_size)), positions)
        shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, rules)
        sharded = jax.device_put(params, shardings["params"])
        assert sharded["layers_0"]["mlp"]["up_proj"]["kernel"].sharding.spec == P(None, "tensor")
        hidden, logits = _run(cfg, sharded, tokens, positions)
    assert logits.sharding.spec == P("data", None, "tensor")
    np.testing.assert_allclose(hidden, want_hidden, atol=1e-5, rtol=0)
    np.testing.assert_allclose(logits, want_logits, atol=1e-5, rtol=0)


def test_config_fields_variants_and_errors():
    cfg = decoder.make_config("llama3_2_3b")
    assert cfg.rope_scaling == (("factor", 32.0), ("low_freq_factor", 1.0),
                                ("high_freq_factor", 4.0),
                                ("original_max_position_embeddings", 8192))
    assert decoder.make_config("llama3_2_3b", rope_scaling=dict(cfg.rope_scaling)) == cfg
    assert hash(cfg) == hash(decoder.from_dict({"variant": "llama3_2_3b"}))
    q7 = decoder.make_config("qwen2_7b")
    assert (q7.hidden_size, q7.num_layers, q7.num_heads, q7.num_kv_heads, q7.mlp_dim,
            q7.vocab_size, q7.qkv_bias, q7.tie_embeddings) == (3584, 28, 28, 4, 18944, 152064,
                                                               True, False)
    assert set(decoder.VARIANTS) >= {"qwen2_7b", "qwen2_0_5b", "llama3_2_3b", "llama2_7b",
                                     "tiny"}
    with pytest.raises(ValueError, match="not_a_field"):
        decoder.make_config("tiny", not_a_field=1)
    with pytest.raises(ValueError, match="not_a_field"):
        decoder.from_dict({"variant": "tiny", "not_a_field": 1})
    with pytest.raises(ValueError, match="variant"):
        decoder.make_config("qwen3_moe")
    with pytest.raises(ValueError, match="missing fields"):
        decoder.make_config(hidden_size=8)
    with pytest.raises(ValueError, match="num_kv_heads"):
        decoder.make_config("tiny", num_kv_heads=3)
    with pytest.raises(ValueError, match="remat_policy"):
        decoder.make_config("tiny", remat_policy="everything")
    with pytest.raises(ValueError, match="rope"):
        decoder.make_config("tiny", rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(dataclasses.FrozenInstanceError):
        decoder.make_config("tiny").dtype = "bfloat16"


@pytest.mark.parametrize("impl", ["auto", "ring"])
def test_context_parallel_ring_attention_matches_single_device(tiny, impl):
    """`act_len` -> `context` (4 devices): the decoder runs ring attention over the mesh, loss
    and gradients equal the XLA path's. Packed segments cross shard boundaries."""
    cfg, params = tiny
    length = 16  # 2 x 4 zig-zag chunks
    tokens, _ = _inputs(cfg, seed=7, length=length)
    segment_ids = jnp.asarray([[1] * 9 + [2] * 7, [1] * 16], jnp.int32)
    positions = jnp.where(segment_ids == 1, jnp.arange(length), jnp.arange(length) - 9)

    def loss(c, p):
        model = decoder.Decoder(c)

        def run(m):
            hidden, _ = m(m.embed(tokens), positions, segment_ids)
            return jnp.mean(m.logits(hidden) ** 2)

        return model.apply({"params": p}, method=run)

    want, want_grads = jax.jit(jax.value_and_grad(functools.partial(loss, cfg)))(params)
    ring_cfg = dataclasses.replace(cfg, attention_impl=impl, scan_layers=True,
                                   remat_policy="full")
    stacked = decoder.stack_layer_params(params, cfg.num_layers)
    mesh = jax.make_mesh((1, 4), ("data", "context"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)
    rules = (("act_batch", "data"), ("act_len", "context"))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        assert decoder.context_parallel_kwargs()["axis"] == "context"
        hlo = jax.jit(jax.value_and_grad(functools.partial(loss, ring_cfg))).lower(
            stacked).as_text()
        got, got_grads = jax.jit(jax.value_and_grad(functools.partial(loss, ring_cfg)))(stacked)
    assert "collective_permute" in hlo or "collective-permute" in hlo  # the ring ran
    np.testing.assert_allclose(got, want, rtol=1e-5)
    want_stacked = decoder.stack_layer_params(want_grads, cfg.num_layers)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4),
                 got_grads, want_stacked)
    assert decoder.context_parallel_kwargs() == {}  # no mesh outside the context
