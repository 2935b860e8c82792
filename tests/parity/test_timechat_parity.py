"""Parity of TimeChat's frame / video Q-Formers with the original module outputs.

References: fixtures `timechat_frame_qformer` and `timechat_video_qformer` (RenShuhuai-Andy/
TimeChat `TimeChat.encode_videoQformer_visual`, one run), and torch `F.interpolate(nearest)` for
the frame position table resize TimeChat applies on load.
"""

import json

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from convert import timechat_keys
from longvid_jax.models import qformer, timechat

TOL = 1e-4


def _err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


@pytest.fixture(scope="module")
def fx(fixtures_dir):
    out = {}
    for name in ("timechat_frame_qformer", "timechat_video_qformer"):
        d = fixtures_dir / name
        out[name] = (load_file(str(d / "weights.safetensors")), dict(np.load(d / "io.npz")),
                     json.loads((d / "config.json").read_text()))
    cfg = timechat.make_timechat_config("tiny")
    weights = {**out["timechat_frame_qformer"][0], **out["timechat_video_qformer"][0]}
    params = timechat_keys.to_params(weights, cfg)
    return cfg, out, weights, params


def test_fixture_configs_match_tiny_variants(fx):
    cfg, out, _, _ = fx
    meta_f = out["timechat_frame_qformer"][2]
    meta_v = out["timechat_video_qformer"][2]
    fq, vq, v = cfg.frame_qformer, cfg.video.qformer, cfg.video
    bert = meta_f["bert_config"]
    for q in (fq, vq):
        assert (q.width, q.num_heads, q.mlp_dim, q.max_positions, q.ln_eps, q.act) == (
            bert["hidden_size"], bert["num_attention_heads"], bert["intermediate_size"],
            bert["max_position_embeddings"], bert["layer_norm_eps"], bert["hidden_act"])
    assert fq.depth == bert["num_hidden_layers"]
    assert fq.vocab_size == meta_f["overrides"]["vocab_size_after_resize"] == 50  # + [DEC]
    assert len(meta_f["tokenizer"]["vocab"]) == 50
    assert fq.cross_attention_freq == meta_f["overrides"]["cross_attention_freq"]
    assert fq.encoder_width == meta_f["overrides"]["encoder_width"]
    assert fq.num_queries == meta_f["num_query_token"]
    ov = meta_v["overrides"]
    assert (vq.depth, vq.cross_attention_freq, vq.encoder_width, vq.vocab_size) == (
        ov["num_hidden_layers"], ov["cross_attention_freq"], ov["encoder_width"], 0)
    assert vq.num_queries == meta_v["num_video_query_token"]
    assert (v.max_frame_pos, v.window, v.stride, v.llm_width) == (
        meta_v["max_frame_pos"], meta_v["window_size"], meta_v["stride"],
        meta_v["llama_hidden_size"])
    assert timechat.num_video_tokens(meta_v["num_frames"], v) == meta_v["num_output_tokens"]
    # The release sizes.
    full = timechat.make_timechat_config("timechat_7b")
    assert (full.frame_qformer.vocab_size, full.frame_qformer.num_queries,
            full.frame_qformer.encoder_width, full.video.max_frame_pos, full.video.window,
            full.video.llm_width) == (30523, 32, 1408, 96, 32, 4096)
    assert timechat.num_video_tokens(96, full.video) == 96


def test_frame_qformer_parity(fx):
    cfg, out, _, params = fx
    io = out["timechat_frame_qformer"][1]
    np.testing.assert_array_equal(io["qformer_attention_mask"][:, 4:],
                                  io["timestamp_attention_mask"])
    assert not io["timestamp_attention_mask"].all()  # frames 0-5 have one padded token
    model = qformer.QFormer(cfg.frame_qformer)
    got, _ = jax.jit(lambda p, x, ids, m: model.apply({"params": p}, x, text_ids=ids,
                                                      text_mask=m))(
        params["frame_qformer"], io["image_embeds"], io["timestamp_input_ids"].astype(np.int32),
        io["timestamp_attention_mask"].astype(bool))
    assert got.shape == io["last_hidden_state"].shape == (10, 17, 32)
    assert _err(got, io["last_hidden_state"]) <= TOL
    np.testing.assert_array_equal(np.asarray(params["frame_qformer"]["query_tokens"]),
                                  io["query_embeds"][0])


def _check_video(aux, tokens, mask, io, batch=0):
    assert _err(aux["frame_hidden_state"][batch], io["frame_hidden_state"][0]) <= TOL
    for w in range(3):
        ref = io[f"window{w}_encoder_hidden_states"][0]
        n = ref.shape[0]
        assert _err(aux["window_states"][batch, w, :n], ref) <= TOL
        assert bool(aux["window_mask"][batch, w, :n].all())
        assert not bool(aux["window_mask"][batch, w, n:].any())
        assert _err(aux["video_hidden"][batch, w], io[f"window{w}_video_hidden"][0]) <= TOL
        assert _err(aux["llama_proj_out"][batch, w], io[f"window{w}_llama_proj_out"][0]) <= TOL
    assert _err(tokens[batch], io["inputs_llama"][0]) <= TOL
    np.testing.assert_array_equal(np.asarray(mask[batch]), io["atts_llama"][0].astype(bool))


def test_video_qformer_parity(fx):
    cfg, out, _, params = fx
    io = out["timechat_video_qformer"][1]
    np.testing.assert_array_equal(io["frame_position_ids"], np.arange(10))
    model = timechat.TimeChatVideoQFormer(cfg.video)
    tokens, mask, aux = jax.jit(lambda p, x: model.apply({"params": p}, x))(
        params["video_qformer"], io["q_hidden_state"][None])
    assert tokens.shape == io["inputs_llama"].shape == (1, 12, 48)
    assert aux["window_states"].shape == (1, 3, 68, 32)  # last window padded from 34 to 68
    _check_video(aux, tokens, mask, io)


def test_connector_end_to_end_and_frame_mask(fx):
    """ViT tokens -> inputs_llama for video 0 (the fixture); video 1 has 6 valid of 10 frames:
    ceil(6/4) = 2 valid windows, and its padded frames (here random) change nothing."""
    cfg, out, _, params = fx
    iof = out["timechat_frame_qformer"][1]
    iov = out["timechat_video_qformer"][1]
    rng = np.random.default_rng(1)
    x = np.stack([iof["image_embeds"], rng.normal(size=iof["image_embeds"].shape)]).astype(
        np.float32)
    ids = np.stack([iof["timestamp_input_ids"]] * 2).astype(np.int32)
    tmask = np.stack([iof["timestamp_attention_mask"]] * 2).astype(bool)
    fmask = np.ones((2, 10), bool)
    fmask[1, 6:] = False
    model = timechat.TimeChatConnector(cfg)
    run = jax.jit(lambda p, *a: model.apply({"params": p}, *a))
    tokens, mask, aux = run(params, x, ids, tmask, fmask)
    assert _err(aux["frame_qformer_out"][0], iof["last_hidden_state"]) <= TOL
    _check_video(aux, tokens, mask, iov, batch=0)
    np.testing.assert_array_equal(np.asarray(mask[1]), np.arange(12) < 8)
    assert float(np.abs(np.asarray(tokens[1, 8:])).max()) == 0.0
    # Window 1 of video 1 holds frames 4, 5 and two masked ones.
    np.testing.assert_array_equal(np.asarray(aux["window_mask"][1, 1]), np.arange(68) < 34)
    x2 = x.copy()
    x2[1, 6:] = rng.normal(size=x2[1, 6:].shape)
    ids2 = ids.copy()
    ids2[1, 6:] = rng.integers(5, 49, size=ids2[1, 6:].shape)
    tokens2, _, _ = run(params, x2, ids2, tmask, fmask)
    assert _err(tokens2[1, :8], tokens[1, :8]) <= 1e-6
    assert _err(tokens2[0], tokens[0]) == 0.0


def test_window_layouts():
    base = timechat.make_video_config("tiny")
    assert timechat.window_layout(10, base) == (3, 4, 4)
    assert timechat.window_layout(8, base) == (2, 4, 4)
    whole = timechat.make_video_config("tiny", window=0)
    assert timechat.window_layout(10, whole) == (1, 10, 10)
    overlap = timechat.make_video_config("tiny", window=6, stride=4)
    assert timechat.window_layout(10, overlap) == (3, 6, 4)
    assert timechat.num_video_tokens(10, overlap) == 12
    with pytest.raises(ValueError, match="vocab_size"):
        timechat.make_video_config("tiny", qformer=dict(variant="tiny", vocab_size=49))
    with pytest.raises(ValueError, match="unknown TimeChatVideoQFormerConfig fields"):
        timechat.make_video_config("tiny", windows=3)
    with pytest.raises(ValueError, match="encoder_width"):
        timechat.make_timechat_config("tiny", video=dict(variant="tiny", llm_width=8,
                                                         qformer=dict(variant="tiny",
                                                                      vocab_size=0,
                                                                      encoder_width=16)))


def test_overlapping_windows(fx):
    """window > stride against the original's loop over `frame_hidden_state[:, i:i + window]`
    (window = 0, one window over all frames, is the same code with W = 1)."""
    cfg, out, _, params = fx
    io = out["timechat_video_qformer"][1]
    q = qformer.QFormer(cfg.video.qformer)
    qp = {"params": params["video_qformer"]["qformer"]}
    fhs = io["frame_hidden_state"][0]  # [10, 17, 32]
    vcfg = timechat.make_video_config("tiny", window=6, stride=4)
    _, _, aux = jax.jit(timechat.TimeChatVideoQFormer(vcfg).apply)(
        {"params": params["video_qformer"]}, io["q_hidden_state"][None])
    assert aux["video_hidden"].shape == (1, 3, 4, 32)
    run = jax.jit(q.apply)
    for w, i in enumerate(range(0, 10, 4)):
        want, _ = run(qp, fhs[i:i + 6].reshape(1, -1, 32))
        assert _err(aux["video_hidden"][0, w], want[0]) <= TOL, w


def test_interpolate_frame_positions_matches_torch():
    rng = np.random.default_rng(2)
    for n, m in ((4, 12), (32, 96), (12, 5), (7, 7), (3, 6), (5, 13)):
        table = rng.normal(size=(n, 3)).astype(np.float32)
        want = torch.nn.functional.interpolate(
            torch.from_numpy(table)[None].transpose(1, 2), size=m, mode="nearest"
        ).transpose(1, 2)[0].numpy()
        got = timechat.interpolate_frame_positions(table, m)
        np.testing.assert_array_equal(got, want, err_msg=f"{n}->{m}")
    # 32 -> 96: row o copies row o // 3.
    t = np.arange(32, dtype=np.float32)[:, None]
    np.testing.assert_array_equal(timechat.interpolate_frame_positions(t, 96)[:, 0],
                                  np.arange(96) // 3)


def test_keys_round_trip_bitwise(fx):
    cfg, out, weights, params = fx
    back = timechat_keys.params_to_original(params, cfg)
    buffers = {k for k in weights if k.endswith("embeddings.position_ids")}
    assert len(buffers) == 2
    assert set(back) == set(weights) - buffers
    for k, v in back.items():
        assert v.dtype == weights[k].dtype, k
        np.testing.assert_array_equal(v, weights[k], err_msg=k)
    assert all(timechat_keys.timechat_owns(k) for k in weights)
    assert not timechat_keys.timechat_owns("llama_model.base_model.model.model.layers.0.x")
    assert not timechat_keys.timechat_owns("visual_encoder.cls_token")

    # The parts alone, and a stream of (key, tensor) pairs.
    wf, wv = out["timechat_frame_qformer"][0], out["timechat_video_qformer"][0]
    pf = timechat_keys.frame_to_params(iter(wf.items()), cfg.frame_qformer)
    pv = timechat_keys.video_to_params(wv, cfg.video)
    for part, w, exp in ((pf, wf, timechat_keys.params_to_frame(pf, cfg.frame_qformer)),
                         (pv, wv, timechat_keys.params_to_video(pv, cfg.video))):
        assert set(exp) == {k for k in w if not k.endswith("position_ids")}
        for k, v in exp.items():
            np.testing.assert_array_equal(v, w[k], err_msg=k)


def test_keys_strict(fx):
    cfg, _, weights, _ = fx
    w = dict(weights)
    w["llama_proj.extra"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match="llama_proj.extra"):
        timechat_keys.to_params(w, cfg)
    w = {k: v for k, v in weights.items() if k != "video_query_tokens"}
    with pytest.raises(ValueError, match="query_tokens"):
        timechat_keys.to_params(w, cfg)
    w = dict(weights)
    w["llama_proj.weight"] = w["llama_proj.weight"][:, :16]
    with pytest.raises(ValueError, match="llama_proj.weight"):
        timechat_keys.to_params(w, cfg)
    pairs = list(weights.items()) + [("query_tokens", weights["query_tokens"])]
    with pytest.raises(ValueError, match="duplicate"):
        timechat_keys.to_params(pairs, cfg)
    # A Video-LLaMA-sized position table (fewer rows) loads only with the resize TimeChat does.
    w = dict(weights)
    w["video_frame_position_embedding.weight"] = w["video_frame_position_embedding.weight"][:4]
    with pytest.raises(ValueError, match="video_frame_position_embedding"):
        timechat_keys.to_params(w, cfg)
    p = timechat_keys.to_params(w, cfg, resize_frame_positions=True)
    np.testing.assert_array_equal(p["video_qformer"]["frame_position_embedding"],
                                  w["video_frame_position_embedding.weight"][np.arange(12) // 3])
