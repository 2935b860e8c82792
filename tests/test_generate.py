"""KV-cache generation: cache vs full-forward logits, greedy parity with transformers, sampling."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from convert import decoder_keys
from longvid_jax import generate as gen
from longvid_jax.models import decoder


def _hf_qwen2(seed: int = 0):
    cfg = Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6,
                      rms_norm_eps=1e-6, tie_word_embeddings=False, max_position_embeddings=256,
                      attn_implementation="eager")
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * noise)
            elif p.ndim == 1:
                p.copy_(0.1 * noise)
            elif "embed_tokens" in name:
                p.copy_(noise)
            else:
                p.copy_(noise / p.shape[1] ** 0.5)
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    jcfg = decoder_keys.config_from_hf(cfg.to_dict())
    return model, jcfg, decoder_keys.hf_to_params(state, jcfg)


@pytest.fixture(scope="module")
def qwen():
    return _hf_qwen2()


def _full_logits(cfg, params, ids):
    model = decoder.Decoder(cfg)
    t = ids.shape[1]
    pos = jnp.broadcast_to(jnp.arange(t), ids.shape)

    def run(m, x):
        h, _ = m(m.embed(x), pos)
        return m.logits(h)

    return np.asarray(model.apply({"params": params}, jnp.asarray(ids), method=run))


@pytest.mark.parametrize("scan,decode_attention", [(False, "xla"), (True, "xla"),
                                                   (False, "pallas_gpu"), (True, "pallas_gpu")])
def test_cache_logits_equal_full_forward(qwen, scan, decode_attention):
    _, cfg, params = qwen
    cfg = dataclasses.replace(cfg, decode_attention_impl=decode_attention)
    if scan:
        cfg = dataclasses.replace(cfg, scan_layers=True)
        params = decoder.stack_layer_params(params, cfg.num_layers)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size, (2, 12)).astype(np.int32)
    lengths = np.array([9, 6], np.int32)  # right padded; then 3 decode steps per row
    full = [_full_logits(cfg, params, ids[b:b + 1, : lengths[b] + 3])[0] for b in range(2)]

    model = decoder.Decoder(cfg)
    t0 = 9
    prompt = ids[:, :t0].copy()
    prompt[1, 6:] = 7  # padding content must not matter
    pos = jnp.broadcast_to(jnp.arange(t0), (2, t0))
    seg = jnp.asarray((np.arange(t0)[None] < lengths[:, None]).astype(np.int32))

    def step(m, x, positions, segment_ids, cache):
        h, aux = m(m.embed(x), positions, segment_ids, cache=cache)
        return m.logits(h), aux["cache"]

    apply = jax.jit(lambda p, *a: model.apply({"params": p}, *a, method=step))
    cache = decoder.init_cache(cfg, 2, 16)
    logits, cache = apply(params, jnp.asarray(prompt), pos, seg, cache)
    np.testing.assert_array_equal(np.asarray(cache["lengths"]), lengths)
    for b in range(2):
        np.testing.assert_allclose(np.asarray(logits)[b, : lengths[b]], full[b][: lengths[b]],
                                   atol=1e-4, rtol=1e-4)
    for i in range(3):
        tok = ids[np.arange(2), lengths + i][:, None]
        logits, cache = apply(params, jnp.asarray(tok), cache["lengths"][:, None], None, cache)
        for b in range(2):
            np.testing.assert_allclose(np.asarray(logits)[b, 0], full[b][lengths[b] + i],
                                       atol=1e-4, rtol=1e-4)
    np.testing.assert_array_equal(np.asarray(cache["lengths"]), lengths + 3)


def test_greedy_matches_transformers_generate(qwen):
    hf, cfg, params = qwen
    rng = np.random.default_rng(1)
    ids = rng.integers(0, cfg.vocab_size, (2, 10)).astype(np.int32)
    lengths = np.array([10, 7])
    n = 12
    want = []
    for b in range(2):
        with torch.no_grad():
            out = hf.generate(torch.from_numpy(ids[b:b + 1, : lengths[b]]).long(),
                              max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              pad_token_id=0)
        want.append(out[0, lengths[b]:].numpy())
    streamed = []
    res = gen.generate(params, cfg, prompt_ids=ids, prompt_lengths=lengths, max_new_tokens=n,
                       on_token=lambda t, a: streamed.append(t.copy()))
    np.testing.assert_array_equal(res.tokens, np.stack(want))
    np.testing.assert_array_equal(np.stack(streamed, axis=1), res.tokens)
    assert res.lengths.tolist() == [n, n] and not res.stopped.any()


def test_stop_tokens_and_embeds_prompt(qwen):
    _, cfg, params = qwen
    ids = np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 8)).astype(np.int32)
    free = gen.generate(params, cfg, prompt_ids=ids, max_new_tokens=10)
    stop = int(free.tokens[0, 3])
    first = int(np.flatnonzero(free.tokens[0] == stop)[0])
    embeds = gen.embed_tokens(params, cfg, jnp.asarray(ids))
    res = gen.generate(params, cfg, prompt_embeds=embeds, max_new_tokens=10,
                       stop_token_ids=[stop], pad_id=-1)
    assert res.stopped[0] and res.lengths[0] == first
    np.testing.assert_array_equal(res.tokens[0, : first + 1], free.tokens[0, : first + 1])
    assert (res.tokens[0, first + 1:] == -1).all()
    row1 = free.tokens[1]
    hits = np.flatnonzero(row1 == stop)
    assert res.lengths[1] == (hits[0] if hits.size else 10)
    assert res.sequences()[0] == free.tokens[0, :first].tolist()


def test_sampling_reproducible_and_filters():
    logits = jnp.asarray(np.random.default_rng(3).normal(size=(4, 50)).astype(np.float32) * 3)
    key = jax.random.key(5)
    a = gen.sample_logits(logits, key, temperature=1.0, top_k=5)
    b = gen.sample_logits(logits, key, temperature=1.0, top_k=5)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    top5 = np.argsort(-np.asarray(logits), axis=-1)[:, :5]
    keys = jax.random.split(jax.random.key(0), 64)
    draws = np.stack([np.asarray(gen.sample_logits(logits, k, temperature=1.0, top_k=5))
                      for k in keys[:16]])
    assert all(np.isin(draws[:, r], top5[r]).all() for r in range(4))
    # top_p: only the smallest set reaching p (the top token when it alone holds > p).
    probs = np.asarray(jax.nn.softmax(logits, axis=-1))
    srt = np.sort(probs, axis=-1)[:, ::-1]
    p = 0.5
    allowed = [np.argsort(-probs[r])[: int(np.searchsorted(np.cumsum(srt[r]), p) + 1)]
               for r in range(4)]
    draws = np.stack([np.asarray(gen.sample_logits(logits, k, temperature=1.0, top_p=p))
                      for k in keys[16:48]])
    assert all(np.isin(draws[:, r], allowed[r]).all() for r in range(4))
    assert len({tuple(d) for d in draws}) > 1  # it does sample
    np.testing.assert_array_equal(np.asarray(gen.sample_logits(logits, None)),
                                  np.argmax(np.asarray(logits), -1))
    with pytest.raises(ValueError, match="rng"):
        gen.sample_logits(logits, None, temperature=0.7)


def test_generate_sampling_reproducible(qwen):
    _, cfg, params = qwen
    ids = np.random.default_rng(4).integers(0, cfg.vocab_size, (1, 6)).astype(np.int32)
    kw = {"prompt_ids": ids, "max_new_tokens": 6, "temperature": 1.0, "top_k": 20, "top_p": 0.9}
    a = gen.generate(params, cfg, rng=jax.random.key(1), **kw)
    b = gen.generate(params, cfg, rng=jax.random.key(1), **kw)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    with pytest.raises(ValueError, match="exactly one"):
        gen.generate(params, cfg, max_new_tokens=2)
    with pytest.raises(ValueError, match="max_len"):
        gen.generate(params, cfg, prompt_ids=ids, max_new_tokens=4, max_len=7)
