"""Parity of QFormer / TDCCompressor with the original TDC module outputs and `transformers`.

References:
  - fixture `tdc_qformer_compressor` (TDC `tdc/Qformer.py` + `cambrian_arch.py` loop body);
  - `transformers` Blip2QFormerModel (cross_attention_frequency 1 and 2, no text) and
    InstructBlipQFormerModel (text ids + attention mask), tiny random configs.
"""

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from transformers import (
    Blip2QFormerConfig,
    Blip2QFormerModel,
    InstructBlipQFormerConfig,
    InstructBlipQFormerModel,
)

from convert import qformer_keys
from longvid_jax.models import qformer

TOL = 1e-4


def _err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


# ---------------------------------------------------------------------------------------------
# Fixture: the original TDC compressor
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tdc_fixture(fixtures_dir):
    d = fixtures_dir / "tdc_qformer_compressor"
    weights = load_file(str(d / "weights.safetensors"))
    io = dict(np.load(d / "io.npz"))
    cfg = qformer.make_tdc_config("tiny")
    params = qformer_keys.tdc_to_params(weights, cfg)
    return cfg, weights, io, params


def test_fixture_config_matches_tiny_variant(tdc_fixture, fixtures_dir):
    import json

    meta = json.loads((fixtures_dir / "tdc_qformer_compressor" / "config.json").read_text())
    cfg = tdc_fixture[0]
    bert = meta["bert_config"]
    q = cfg.qformer
    assert (q.width, q.depth, q.num_heads, q.mlp_dim, q.vocab_size, q.max_positions) == (
        bert["hidden_size"], bert["num_hidden_layers"], bert["num_attention_heads"],
        bert["intermediate_size"], bert["vocab_size"], bert["max_position_embeddings"])
    assert q.ln_eps == bert["layer_norm_eps"] and q.act == bert["hidden_act"]
    assert cfg.llm_width == meta["hidden_size_llm"] == q.encoder_width
    assert cfg.num_tokens == meta["context_token_num"]
    assert q.cross_attention_freq == meta["bert_config_overrides_by_init_Qformer"][
        "cross_attention_freq"]
    assert cfg.audio_width == meta["audio_dim"]


def _run_tdc(cfg, params, frames, ids, audio=None):
    model = qformer.TDCCompressor(cfg)
    f = frames.shape[0]
    return jax.jit(lambda p, x, a: model.apply(
        {"params": p}, x, np.ones((1, f), bool), text_ids=ids, audio_tokens=a))(
            params, frames[None], None if audio is None else audio[None])


@pytest.mark.parametrize("audio", [False, True], ids=["video", "audio"])
def test_tdc_fixture_chunk(tdc_fixture, audio):
    cfg, _, io, params = tdc_fixture
    frames = np.concatenate([io["static_frame_tokens"][None], io["other_frame_tokens"]])
    ids = io["text_input_ids"][None].astype(np.int32)
    tokens, mask, aux = _run_tdc(cfg, params, frames, ids,
                                 io["audio_tokens_raw"] if audio else None)
    pre = "audio_" if audio else ""
    for name in ("pooled_queries", "query_embeds", "qformer_last_hidden_state",
                 "vision_proj_out", "compressed"):
        assert _err(aux[name][0], io[pre + name]) <= TOL, name
    if audio:
        assert _err(aux["audio_proj_out"][0], io["audio_proj_out"]) <= TOL
    layout = io[pre + "chunk_layout"]
    assert tokens.shape == (1, layout.shape[0], layout.shape[1])
    assert bool(mask.all())
    assert _err(tokens[0], layout) <= TOL
    # Unit L2 norm per compressed token.
    np.testing.assert_allclose(np.linalg.norm(np.asarray(aux["compressed"]), axis=-1), 1.0,
                               atol=1e-5)


def test_tdc_fixture_single_frame_chunk(tdc_fixture):
    cfg, _, io, params = tdc_fixture
    ids = io["text_input_ids"][None].astype(np.int32)
    tokens, mask, _ = _run_tdc(cfg, params, io["static_frame_tokens"][None], ids)
    assert tokens.shape == (1,) + io["single_frame_chunk_layout"].shape
    assert bool(mask.all())
    assert _err(tokens[0], io["single_frame_chunk_layout"]) <= TOL


def test_tdc_fixture_keys_round_trip(tdc_fixture):
    cfg, weights, _, params = tdc_fixture
    back = qformer_keys.params_to_tdc(params, cfg)
    ignored = {k for k in weights if ".cls." in k or k.endswith("position_ids")
               or k == "model.query_tokens"}
    assert set(back) == set(weights) - ignored
    for k, v in back.items():
        np.testing.assert_array_equal(v, weights[k], err_msg=k)


# ---------------------------------------------------------------------------------------------
# transformers Blip2QFormerModel / InstructBlipQFormerModel
# ---------------------------------------------------------------------------------------------

_TINY = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
             encoder_hidden_size=24, layer_norm_eps=1e-12, hidden_act="gelu",
             hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _randomise(module: torch.nn.Module, seed: int) -> None:
    """Fixture init scheme: Linear N(0,1)/sqrt(fan_in), biases 0.1 N, LN 1 + 0.1 N, tables 0.5 N."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            z = torch.randn(p.shape, generator=g)
            if "LayerNorm" in name or "layernorm" in name:
                p.copy_(1.0 + 0.1 * z if name.endswith("weight") else 0.1 * z)
            elif name.endswith("bias"):
                p.copy_(0.1 * z)
            elif "embeddings" in name:
                p.copy_(0.5 * z)
            else:
                p.copy_(z * p.shape[1] ** -0.5)
    module.eval()


def _state_dict(module: torch.nn.Module, prefix: str = "") -> dict[str, np.ndarray]:
    return {prefix + k: v.numpy() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("freq,learned", [(1, False), (2, True)],
                         ids=["freq1-supplied", "freq2-learned"])
def test_blip2_qformer_parity(freq, learned):
    tcfg = Blip2QFormerConfig(cross_attention_frequency=freq, **_TINY)
    tcfg._attn_implementation = "eager"
    ref = Blip2QFormerModel(tcfg)
    _randomise(ref, seed=10 + freq)
    rng = np.random.default_rng(freq)
    b, q, s = 2, 5, 7
    queries = rng.normal(size=(1 if learned else b, q, 32)).astype(np.float32)
    enc = rng.normal(size=(b, s, 24)).astype(np.float32)
    enc_mask = np.ones((b, s), bool)
    enc_mask[1, -3:] = False
    with torch.no_grad():
        want = ref(query_embeds=torch.from_numpy(np.broadcast_to(queries, (b, q, 32)).copy()),
                   encoder_hidden_states=torch.from_numpy(enc),
                   encoder_attention_mask=torch.from_numpy(enc_mask.astype(np.int64))
                   ).last_hidden_state.numpy()

    cfg = qformer.make_config("tiny", depth=3, encoder_width=24, vocab_size=0,
                              cross_attention_freq=freq, num_queries=q if learned else 0)
    sd = _state_dict(ref, "qformer.")
    qkey = None
    if learned:
        qkey = "query_tokens"
        sd[qkey] = queries
    params = qformer_keys.hf_to_params(sd, cfg, flavor="blip2", prefix="qformer.",
                                       query_tokens_key=qkey)
    model = qformer.QFormer(cfg)
    got, _ = jax.jit(lambda p, e, m, qe: model.apply({"params": p}, e, query_embeds=qe,
                                                     encoder_mask=m))(
        params, enc, enc_mask, None if learned else queries)
    assert got.shape == want.shape
    assert _err(got, want) <= TOL

    # Export back and load strictly into a fresh transformers model.
    back = qformer_keys.params_to_hf(params, cfg, flavor="blip2", prefix="qformer.",
                                     query_tokens_key=qkey)
    if learned:
        np.testing.assert_array_equal(back.pop(qkey), queries)
    fresh = Blip2QFormerModel(tcfg).eval()
    fresh.load_state_dict({k[len("qformer."):]: torch.from_numpy(v) for k, v in back.items()},
                          strict=True)
    for k, v in fresh.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), sd["qformer." + k], err_msg=k)


def test_instructblip_qformer_parity():
    tcfg = InstructBlipQFormerConfig(vocab_size=49, max_position_embeddings=64,
                                     cross_attention_frequency=2, **_TINY)
    tcfg._attn_implementation = "eager"
    ref = InstructBlipQFormerModel(tcfg)
    _randomise(ref, seed=7)
    rng = np.random.default_rng(3)
    b, q, t, s = 2, 4, 9, 6
    queries = rng.normal(size=(b, q, 32)).astype(np.float32)
    enc = rng.normal(size=(b, s, 24)).astype(np.float32)
    ids = rng.integers(1, 49, size=(b, t)).astype(np.int64)
    text_mask = np.ones((b, t), bool)
    text_mask[1, -3:] = False
    ids[1, -3:] = 0
    with torch.no_grad():
        want = ref(input_ids=torch.from_numpy(ids),
                   attention_mask=torch.from_numpy(
                       np.concatenate([np.ones((b, q)), text_mask], 1).astype(np.int64)),
                   query_embeds=torch.from_numpy(queries),
                   encoder_hidden_states=torch.from_numpy(enc)).last_hidden_state.numpy()

    cfg = qformer.make_config("tiny", depth=3, encoder_width=24, num_queries=0)
    sd = _state_dict(ref)
    params = qformer_keys.hf_to_params(sd, cfg, flavor="instructblip")
    model = qformer.QFormer(cfg)
    got, _ = jax.jit(lambda p: model.apply({"params": p}, enc, query_embeds=queries,
                                           text_ids=ids.astype(np.int32),
                                           text_mask=text_mask))(params)
    assert got.shape == want.shape == (b, q + t, 32)
    assert _err(got, want) <= TOL

    back = qformer_keys.params_to_hf(params, cfg, flavor="instructblip")
    fresh = InstructBlipQFormerModel(tcfg).eval()
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)
    for k, v in fresh.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), sd[k], err_msg=k)
