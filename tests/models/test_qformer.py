"""QFormer / TDCCompressor: configs, token counts, batching over videos, segments, key tables."""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from convert import qformer_keys
from longvid_jax.models import qformer

TOL = 1e-4
P, A, EA = 15, 6, 768  # fixture sizes: tokens per frame, audio tokens per frame, audio width


def _err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


# ---------------------------------------------------------------------------------------------
# Configs and token counts
# ---------------------------------------------------------------------------------------------


def test_qformer_configs():
    base = qformer.make_config("bert_base")
    assert (base.width, base.depth, base.num_heads, base.mlp_dim, base.num_queries) == (
        768, 12, 12, 3072, 32)
    tiny = qformer.make_config("tiny", encoder_width=48)
    assert (tiny.width, tiny.depth, tiny.num_heads, tiny.mlp_dim, tiny.vocab_size,
            tiny.max_positions, tiny.encoder_width) == (32, 4, 4, 64, 49, 64, 48)
    assert qformer.make_config("tdc").num_queries == 0
    assert qformer.QFormerConfig.from_dict({"variant": "tiny", "depth": 2}).depth == 2
    with pytest.raises(ValueError, match="unknown QFormer variant"):
        qformer.make_config("huge")
    with pytest.raises(ValueError, match="hidden"):
        qformer.make_config(hidden=3)
    with pytest.raises(ValueError, match="divisible"):
        qformer.make_config(width=30, num_heads=4)


def test_tdc_configs():
    cfg = qformer.make_tdc_config("qwen2_7b")
    assert cfg.qformer.encoder_width == 3584 and cfg.qformer.num_queries == 0
    assert (cfg.num_tokens, cfg.chunk_size, cfg.qformer.width, cfg.qformer.depth) == (16, 8, 768,
                                                                                       12)
    learned = qformer.make_tdc_config("tiny", query_type="learned")
    assert learned.qformer.num_queries == 4
    bf16 = qformer.make_tdc_config("tiny", dtype="bfloat16")
    assert bf16.qformer.dtype == "bfloat16"
    with pytest.raises(ValueError, match="encoder_width"):
        qformer.make_tdc_config("tiny", qformer=qformer.make_config("tiny", encoder_width=8))
    with pytest.raises(ValueError, match="unknown TDCCompressorConfig fields"):
        qformer.make_tdc_config("tiny", k=3)
    with pytest.raises(ValueError, match="query_type"):
        qformer.make_tdc_config("tiny", query_type="random")


def test_num_video_tokens():
    cfg = qformer.make_tdc_config("tiny")  # K = 4, chunk 8
    assert qformer.num_video_tokens(4, P, 0, cfg) == 31  # fixture chunk_layout
    assert qformer.num_video_tokens(4, P, A, cfg) == 37  # audio_chunk_layout
    assert qformer.num_video_tokens(1, P, 0, cfg) == 16  # single_frame_chunk_layout
    assert qformer.num_video_tokens(11, P, 0, cfg) == 2 * 16 + 9 * 5
    assert qformer.num_video_tokens(17, P, 0, cfg) == 3 * 16 + 14 * 5
    assert qformer.num_video_tokens(12, P, 0, cfg, segment_lengths=[9, 3]) == 3 * 16 + 9 * 5
    with pytest.raises(ValueError, match="partition"):
        qformer.num_video_tokens(12, P, 0, cfg, segment_lengths=[9, 4])
    # The bound over segmentations is attained (brute force over all compositions).
    for f, n_seg in [(10, 1), (10, 3), (17, 2), (20, 4)]:
        best = 0
        for cuts in itertools.combinations(range(1, f), n_seg - 1):
            lengths = np.diff((0, *cuts, f)).tolist()
            best = max(best, qformer.num_video_tokens(f, P, A, cfg, segment_lengths=lengths))
        assert qformer.max_video_tokens(f, P, A, cfg, n_seg) == best


# ---------------------------------------------------------------------------------------------
# TDCCompressor over a batch of videos
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tdc(fixtures_dir):
    d = fixtures_dir / "tdc_qformer_compressor"
    cfg = qformer.make_tdc_config("tiny")
    params = qformer_keys.tdc_to_params(load_file(str(d / "weights.safetensors")), cfg)
    io = dict(np.load(d / "io.npz"))
    return cfg, params, io


def _inputs(io, f, seed):
    """Two videos of f frames, audio, and two instructions (the second shorter, padded)."""
    rng = np.random.default_rng(seed)
    frames = rng.normal(size=(2, f, P, 48)).astype(np.float32)
    audio = rng.normal(size=(2, f, A, EA)).astype(np.float32)
    ids = np.stack([io["text_input_ids"], io["text_input_ids"]]).astype(np.int32)
    text_mask = np.ones(ids.shape, bool)
    ids[1, 8:] = 0
    ids[1, 7] = 3  # [SEP]
    text_mask[1, 8:] = False
    return frames, audio, ids, text_mask


class _Reference:
    """The original loop body, chunk by chunk: pooled queries (torch adaptive_avg_pool1d),
    Q-Former on the chunk's other frames (padded to chunk_size - 1 for one jit), projections
    and L2 normalisation in numpy, then `[static; seg] + [K compressed; seg] * (n - 1)`."""

    def __init__(self, cfg, params):
        self.cfg, self.p = cfg, jax.tree.map(np.asarray, params)
        model = qformer.QFormer(cfg.qformer)
        self.qformer = jax.jit(lambda p, e, q, t: model.apply({"params": p}, e, query_embeds=q,
                                                              text_ids=t)[0])

    def _linear(self, name, x):
        return x @ self.p[name]["kernel"] + self.p[name]["bias"]

    def chunk(self, frames, audio, ids):
        k, n = self.cfg.num_tokens, frames.shape[0]
        seg = self.p["frame_seg"][None]
        kv = frames
        if audio is not None:
            kv = np.concatenate([frames, self._linear("audio_proj", audio)], axis=1)
        out = [kv[0], seg]
        if n > 1:
            pooled = torch.nn.functional.adaptive_avg_pool1d(
                torch.from_numpy(frames[0].T.copy())[None], k)[0].numpy().T
            queries = self._linear("query_proj", pooled)
            m = self.cfg.chunk_size - 1
            enc = np.zeros((m, *kv.shape[1:]), np.float32)
            enc[:n - 1] = kv[1:]
            h = np.asarray(self.qformer(self.p["qformer"], enc,
                                        np.broadcast_to(queries, (m, *queries.shape)),
                                        np.broadcast_to(ids, (m, len(ids)))))[:n - 1]
            v = self._linear("vision_proj", h[:, :k])
            v = v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)
            for i in range(n - 1):
                out += [v[i], seg]
        return np.concatenate(out)

    def video(self, frames, audio, ids, chunks):
        return np.concatenate([self.chunk(frames[s:e], None if audio is None else audio[s:e], ids)
                               for s, e in chunks])


@pytest.fixture(scope="module")
def reference(tdc):
    return _Reference(tdc[0], tdc[1])


def test_tdc_batch_of_videos_matches_per_chunk(tdc, reference):
    cfg, params, io = tdc
    f, valid = 17, (11, 17)
    frames, audio, ids, text_mask = _inputs(io, f, seed=0)
    frame_mask = np.arange(f)[None] < np.array(valid)[:, None]
    model = qformer.TDCCompressor(cfg)
    tokens, mask, aux = jax.jit(lambda p: model.apply(
        {"params": p}, frames, frame_mask, audio_tokens=audio, text_ids=ids,
        text_mask=text_mask))(params)
    n_max = qformer.num_video_tokens(f, P, A, cfg)
    assert tokens.shape == (2, n_max, 48) and mask.shape == (2, n_max)
    for b, nv in enumerate(valid):
        count = qformer.num_video_tokens(nv, P, A, cfg)
        assert int(mask[b].sum()) == count == int(aux["num_tokens"][b])
        assert bool(mask[b, :count].all())  # valid tokens are a prefix
        chunks = [(s, min(s + cfg.chunk_size, nv)) for s in range(0, nv, cfg.chunk_size)]
        t = int(text_mask[b].sum())
        want = reference.video(frames[b], audio[b], ids[b, :t], chunks)
        assert want.shape == (count, 48)
        assert _err(tokens[b, :count], want) <= TOL
        assert not np.asarray(tokens[b, count:]).any()
    assert aux["compressed"].shape == (2, f - 3, 4, 48)


def test_tdc_segments_match_per_segment_chunks(tdc, reference):
    cfg, params, io = tdc
    f, valid = 17, (17, 14)
    frames, audio, ids, text_mask = _inputs(io, f, seed=1)
    frame_mask = np.arange(f)[None] < np.array(valid)[:, None]
    starts = [(0, 3), (0, 9, 10)]
    segment_starts = np.zeros((2, f), bool)
    for b, st in enumerate(starts):
        segment_starts[b, list(st)] = True
    n_max = qformer.max_video_tokens(f, P, A, cfg, max_segments=3)
    model = qformer.TDCCompressor(cfg)
    tokens, mask, aux = jax.jit(lambda p: model.apply(
        {"params": p}, frames, frame_mask, audio_tokens=audio, text_ids=ids,
        text_mask=text_mask, segment_starts=segment_starts, max_tokens=n_max))(params)
    assert tokens.shape == (2, n_max, 48)
    for b, nv in enumerate(valid):
        bounds = [*starts[b], nv]
        chunks = [(s, min(s + cfg.chunk_size, e)) for s0, e in zip(bounds, bounds[1:])
                  for s in range(s0, e, cfg.chunk_size)]
        lengths = np.diff(bounds).tolist()
        count = qformer.num_video_tokens(nv, P, A, cfg, segment_lengths=lengths)
        assert int(mask[b].sum()) == count
        t = int(text_mask[b].sum())
        want = reference.video(frames[b], audio[b], ids[b, :t], chunks)
        assert _err(tokens[b, :count], want) <= TOL
        static = np.zeros(f, bool)
        static[[s for s, _ in chunks]] = True
        np.testing.assert_array_equal(np.asarray(aux["is_static"][b, :nv]), static[:nv])


@pytest.mark.parametrize("segments", [False, True])
def test_tdc_frame_token_counts_match_truncated_frames(tdc, reference, segments):
    """Videos whose frames have fewer valid tokens (TDC's aspect-dependent unpadded grids)
    compress exactly like the same frames cut to their valid tokens, row by row."""
    cfg, params, io = tdc
    f, valid, counts = 12, (12, 9), (P - 3, 5)
    frames, audio, ids, text_mask = _inputs(io, f, seed=2)
    frames[0, :, counts[0]:] = 7.0  # garbage in the invalid slots must not leak
    frames[1, :, counts[1]:] = -7.0
    frame_mask = np.arange(f)[None] < np.array(valid)[:, None]
    starts = [(0, 5), (0, 2)] if segments else [(0,), (0,)]
    segment_starts = np.zeros((2, f), bool)
    for b, st in enumerate(starts):
        segment_starts[b, list(st)] = True
    n_max = qformer.max_video_tokens(f, P, A, cfg, max_segments=2)
    model = qformer.TDCCompressor(cfg)
    tokens, mask, aux = jax.jit(lambda p: model.apply(
        {"params": p}, frames, frame_mask, audio_tokens=audio, text_ids=ids,
        text_mask=text_mask, segment_starts=segment_starts if segments else None,
        max_tokens=n_max, frame_token_counts=np.array(counts, np.int32)))(params)
    for b, nv in enumerate(valid):
        bounds = [*starts[b], nv]
        chunks = [(s, min(s + cfg.chunk_size, e)) for s0, e in zip(bounds, bounds[1:])
                  for s in range(s0, e, cfg.chunk_size)]
        count = qformer.num_video_tokens(nv, counts[b], A, cfg,
                                         segment_lengths=np.diff(bounds).tolist())
        assert int(mask[b].sum()) == count == int(aux["num_tokens"][b])
        t = int(text_mask[b].sum())
        want = reference.video(frames[b, :, :counts[b]], audio[b], ids[b, :t], chunks)
        assert want.shape == (count, 48)
        assert _err(tokens[b, :count], want) <= TOL
    np.testing.assert_allclose(  # the dynamic pool weights are torch's at every length
        qformer.adaptive_pool_weights(np.array([P, 5]), P, 4)[1, :, :5],
        qformer.adaptive_pool_matrix(5, 4), rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# QFormer behaviour
# ---------------------------------------------------------------------------------------------


def _small(**kw):
    return qformer.make_config("tiny", depth=2, encoder_width=12, **kw)


def _random_params(cfg, seed=0):
    """Random non-trivial params from the eval_shape tree (no init compile): kernels
    N(0,1)/sqrt(fan_in), tables 0.5 N(0,1), LN scales 1 + 0.1 N, biases 0.1 N."""
    rng = np.random.default_rng(seed)
    flat = {}
    for path, sd in qformer_keys.qformer_param_shapes(cfg).items():
        z = rng.normal(size=sd.shape).astype(np.float32)
        if path.endswith("scale"):
            z = 1.0 + 0.1 * z
        elif path.endswith("bias"):
            z = 0.1 * z
        elif path.endswith("kernel"):
            z = z * float(np.prod(sd.shape[:-1]) if "out" in path else sd.shape[0]) ** -0.5
        else:
            z = 0.5 * z
        flat[path] = z
    return qformer_keys._unflatten(flat)


def test_qformer_param_tree_and_learned_queries():
    cfg = _small(num_queries=3)
    rng = np.random.default_rng(0)
    enc = rng.normal(size=(2, 5, 12)).astype(np.float32)
    ids = rng.integers(1, 49, size=(2, 4)).astype(np.int32)
    model = qformer.QFormer(cfg)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), enc, text_ids=ids))["params"]
    params = _random_params(cfg)
    assert jax.tree.structure(nn.meta.unbox(shapes)) == jax.tree.structure(params)
    assert set(params) == {"query_tokens", "word_embeddings", "position_embeddings",
                           "embed_norm", "layer_0", "layer_1"}
    assert set(params["layer_0"]) == {"self_attn", "cross_attn", "query_mlp", "text_mlp"}
    assert set(params["layer_1"]) == {"self_attn", "query_mlp", "text_mlp"}
    assert params["layer_0"]["cross_attn"]["key"]["kernel"].shape == (12, 4, 8)
    assert params["layer_0"]["self_attn"]["out"]["kernel"].shape == (4, 8, 32)
    # Logical axis names on the weights.
    assert shapes["layer_0"]["self_attn"]["query"]["kernel"].names == ("embed", "heads",
                                                                       "head_dim")

    padded_ids = np.concatenate([ids, np.zeros((2, 3), np.int32)], 1)
    tm = np.concatenate([np.ones((2, 4), bool), np.zeros((2, 3), bool)], 1)

    @jax.jit  # one compile for the three calls
    def run(p):
        def f(**kw):
            return model.apply({"params": p}, enc, **kw)[0]
        supplied = jnp.broadcast_to(p["query_tokens"], (2, 3, 32))
        return (f(text_ids=ids), f(query_embeds=supplied, text_ids=ids),
                f(text_ids=padded_ids, text_mask=tm))

    learned, supplied, padded = run(params)
    assert learned.shape == (2, 3 + 4, 32)
    assert _err(learned, supplied) == 0.0
    # Masked text padding does not change the real positions.
    assert _err(padded[:, :7], learned) <= 1e-5


def test_qformer_errors_and_text_only():
    enc = jnp.ones((1, 2, 12))
    no_text_cfg = _small(vocab_size=0, num_queries=2)
    no_text = qformer.QFormer(no_text_cfg)
    p0 = {"params": _random_params(no_text_cfg)}
    assert "text_mlp" not in p0["params"]["layer_0"]
    with pytest.raises(ValueError, match="without text"):
        jax.eval_shape(lambda: no_text.apply(p0, enc, text_ids=jnp.ones((1, 3), jnp.int32)))
    text_cfg = _small(num_queries=0)
    text = qformer.QFormer(text_cfg)
    p = {"params": _random_params(text_cfg)}
    with pytest.raises(ValueError, match="max_positions"):
        jax.eval_shape(lambda: text.apply(p, enc, text_ids=jnp.ones((1, 65), jnp.int32)))
    with pytest.raises(ValueError, match="queries"):
        jax.eval_shape(lambda: text.apply(p, enc))
    out, _ = jax.jit(lambda: text.apply(p, enc, text_ids=jnp.ones((1, 3), jnp.int32)))()
    assert out.shape == (1, 3, 32)  # text-only BERT
    assert np.isfinite(np.asarray(out)).all()


def test_full_size_shapes():
    cfg = qformer.make_tdc_config("qwen2_7b")
    shapes = qformer_keys.tdc_param_shapes(cfg)
    assert shapes["qformer/layer_0/cross_attn/key/kernel"].shape == (3584, 12, 64)
    assert shapes["qformer/word_embeddings"].shape == (30522, 768)
    assert shapes["query_proj/kernel"].shape == (3584, 768)
    assert shapes["audio_proj/kernel"].shape == (768, 3584)
    assert "qformer/layer_11/cross_attn/query/kernel" not in shapes
    assert "qformer/layer_10/cross_attn/query/kernel" in shapes
    # A bf16 TDC-7B compressor over 20 frames of 144 tokens + 50 audio tokens (trace only).
    cfg = qformer.make_tdc_config("qwen2_7b", dtype="bfloat16")
    model = qformer.TDCCompressor(cfg)
    args = (jax.ShapeDtypeStruct((1, 20, 144, 3584), jnp.bfloat16),
            jax.ShapeDtypeStruct((1, 20), jnp.bool_))
    kw = dict(audio_tokens=jax.ShapeDtypeStruct((1, 20, 50, 768), jnp.bfloat16),
              text_ids=jax.ShapeDtypeStruct((1, 30), jnp.int32))
    (tokens, mask, aux), variables = jax.eval_shape(
        lambda *a, **k: model.init_with_output(jax.random.key(0), *a, **k), *args, **kw)
    n = qformer.num_video_tokens(20, 144, 50, cfg)
    assert n == 3 * (144 + 50 + 1) + 17 * 17
    assert tokens.shape == (1, n, 3584) and tokens.dtype == jnp.bfloat16
    assert mask.shape == (1, n)
    assert aux["compressed"].shape == (1, 17, 16, 3584)
    assert variables["params"]["frame_seg"].value.dtype == jnp.float32


# ---------------------------------------------------------------------------------------------
# Key tables are strict
# ---------------------------------------------------------------------------------------------


def test_key_table_errors(tdc, fixtures_dir):
    cfg = tdc[0]
    weights = load_file(str(fixtures_dir / "tdc_qformer_compressor" / "weights.safetensors"))
    with pytest.raises(ValueError, match="unmapped key 'model.extra'"):
        qformer_keys.tdc_to_params({**weights, "model.extra": np.zeros(1)}, cfg)
    bad = dict(weights)
    del bad["model.Qformer.bert.encoder.layer.2.crossattention.self.key.weight"]
    with pytest.raises(ValueError, match=r"layer_2/cross_attn/key/kernel"):
        qformer_keys.tdc_to_params(bad, cfg)
    bad = {**weights, "model.vision_proj.weight": np.zeros((48, 33), np.float32)}
    with pytest.raises(ValueError, match="model.vision_proj.weight"):
        qformer_keys.tdc_to_params(bad, cfg)
    bad = {**weights,
           "model.Qformer.bert.encoder.layer.1.crossattention.self.key.weight": np.zeros(1)}
    with pytest.raises(ValueError, match="not a param"):
        qformer_keys.tdc_to_params(bad, cfg)
    rules = [qformer_keys.Rule("a", "x"), qformer_keys.Rule("b", "x")]
    expected = {"x": jax.ShapeDtypeStruct((2,), jnp.float32)}
    with pytest.raises(ValueError, match="duplicate"):
        qformer_keys.import_params({"a": np.ones(2), "b": np.ones(2)}, rules, expected)
    # The audio-free config does not accept audio_proj keys.
    no_audio = qformer.make_tdc_config("tiny", audio_width=0)
    with pytest.raises(ValueError, match="unmapped key 'model.audio_proj"):
        qformer_keys.tdc_to_params(weights, no_audio)


def test_lavis_and_ownership_helpers():
    cfg = _small(num_queries=3)
    params = _random_params(cfg, seed=4)
    sd = qformer_keys.params_to_lavis(params, cfg, query_tokens_key="query_tokens")
    assert sd["query_tokens"].shape == (1, 3, 32)
    assert sd["Qformer.bert.encoder.layer.0.crossattention.self.key.weight"].shape == (32, 12)
    sd["Qformer.bert.embeddings.position_ids"] = np.arange(64)[None]
    sd["Qformer.cls.predictions.bias"] = np.zeros(49, np.float32)
    back = qformer_keys.lavis_to_params(sd, cfg, query_tokens_key="query_tokens")
    jax.tree.map(np.testing.assert_array_equal, back, params)
    assert qformer_keys.tdc_owns("model.Qformer.bert.embeddings.LayerNorm.weight")
    assert qformer_keys.tdc_owns("model.frame_seg")
    assert not qformer_keys.tdc_owns("model.frame_segment")
    assert not qformer_keys.tdc_owns("model.mm_projector.0.weight")


# ---------------------------------------------------------------------------------------------
# config_from_hf and the HF import / export defaults
# ---------------------------------------------------------------------------------------------

_HF_Q = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
             encoder_hidden_size=24, cross_attention_frequency=1, max_position_embeddings=64,
             vocab_size=49)


def test_config_from_hf():
    from transformers import (
        Blip2Config,
        Blip2QFormerConfig,
        InstructBlipConfig,
        InstructBlipQFormerConfig,
    )

    def sizes(c):
        return (c.width, c.depth, c.num_heads, c.mlp_dim, c.encoder_width,
                c.cross_attention_freq, c.max_positions, c.vocab_size, c.num_queries)

    c = qformer_keys.config_from_hf(Blip2QFormerConfig(**_HF_Q).to_dict())
    assert sizes(c) == (32, 3, 4, 64, 24, 1, 64, 0, 0)  # no text, queries supplied
    c = qformer_keys.config_from_hf(InstructBlipQFormerConfig(**_HF_Q).to_dict(),
                                    dtype="bfloat16")
    assert sizes(c) == (32, 3, 4, 64, 24, 1, 64, 49, 0) and c.dtype == "bfloat16"
    full = Blip2Config(num_query_tokens=5, vision_config=dict(hidden_size=40),
                       qformer_config=_HF_Q).to_dict()
    assert sizes(qformer_keys.config_from_hf(full)) == (32, 3, 4, 64, 40, 1, 64, 0, 5)
    # InstructBLIP defaults are our bert_base variant (EVA ViT-g width, 32 learned queries).
    assert qformer_keys.config_from_hf(InstructBlipConfig().to_dict()) == qformer.make_config(
        "bert_base")
    with pytest.raises(ValueError, match="model_type"):
        qformer_keys.config_from_hf({"model_type": "bert", "hidden_size": 32})
    with pytest.raises(ValueError, match="use_qformer_text_input"):
        qformer_keys.config_from_hf(Blip2QFormerConfig(use_qformer_text_input=True).to_dict())


@pytest.mark.parametrize("flavor", ["blip2", "instructblip"])
def test_hf_keys_default_arguments_round_trip(flavor):
    """`hf_to_params(state, cfg)` as the import CLI calls it: flavor from the config, learned
    queries under `query_tokens`, state given as a stream of pairs; bitwise round trip."""
    from transformers import (
        Blip2Config,
        Blip2QFormerModel,
        InstructBlipConfig,
        InstructBlipQFormerModel,
    )

    full_cls, model_cls = ((Blip2Config, Blip2QFormerModel) if flavor == "blip2"
                           else (InstructBlipConfig, InstructBlipQFormerModel))
    full = full_cls(num_query_tokens=3, vision_config=dict(hidden_size=24),
                    qformer_config=_HF_Q)
    cfg = qformer_keys.config_from_hf(full.to_dict())
    torch.manual_seed(0)
    ref = model_cls(full.qformer_config)
    state = {"qformer." + k: v.numpy() for k, v in ref.state_dict().items()}
    state["query_tokens"] = np.random.default_rng(0).normal(size=(1, 3, 32)).astype(np.float32)
    params = qformer_keys.hf_to_params(iter(state.items()), cfg, prefix="qformer.")
    assert ("word_embeddings" in params) == (flavor == "instructblip")
    back = qformer_keys.params_to_hf(params, cfg, prefix="qformer.")
    assert set(back) == {k for k in state if not k.endswith("position_ids")}
    for k, v in back.items():
        np.testing.assert_array_equal(v, state[k], err_msg=k)
