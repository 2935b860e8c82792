"""Parity of `models/decoder.py` + `convert/decoder_keys.py` with transformers PyTorch classes.

Tiny random `Qwen2ForCausalLM` (qkv bias, rope theta 1e6, untied head) and `LlamaForCausalLM`
(Llama-2 style MHA; Llama-3.2 style GQA + tied embeddings + llama3 rope scaling), float32, every
parameter randomised (norm weights 1 + 0.1 N(0, 1)). Their state dicts go through
`hf_to_params`; logits and every per-layer hidden state must agree to 1e-4.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from convert import decoder_keys
from longvid_jax.models import decoder

TOL = 1e-4
SEQ = 24
BATCH = 3  # one shape for every forward of a family, so the jit compiles are shared


@dataclasses.dataclass
class _Case:
    hf_model: torch.nn.Module
    cfg: decoder.DecoderConfig
    state: dict[str, np.ndarray]
    params: dict


def _hf_config(name: str):
    common = dict(num_hidden_layers=2, max_position_embeddings=256, attn_implementation="eager")
    if name == "qwen2":
        return Qwen2ForCausalLM, Qwen2Config(
            vocab_size=1000, hidden_size=64, intermediate_size=128, num_attention_heads=4,
            num_key_value_heads=2, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False,
            **common)
    if name == "llama2":  # MHA, untied, theta 1e4, FFN/hidden ratio of Llama-2-7B.
        return LlamaForCausalLM, LlamaConfig(
            vocab_size=1000, hidden_size=64, intermediate_size=172, num_attention_heads=4,
            num_key_value_heads=4, rope_theta=1e4, rms_norm_eps=1e-5, tie_word_embeddings=False,
            **common)
    if name == "llama3_2":  # GQA 3:1, tied, llama3 scaling (short original length so it bites).
        return LlamaForCausalLM, LlamaConfig(
            vocab_size=1000, hidden_size=96, intermediate_size=256, num_attention_heads=6,
            num_key_value_heads=2, rms_norm_eps=1e-5, tie_word_embeddings=True,
            rope_parameters=dict(rope_type="llama3", rope_theta=5e5, factor=32.0,
                                 low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=64),
            **common)
    raise ValueError(name)


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Sets every parameter to random values.

    Norm weights 1 + 0.1 N(0, 1), biases 0.1 N, matrices N / sqrt(fan_in), embeddings N
    (0.25 N when tied, so the logits stay O(1)).
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * noise)
            elif p.ndim == 1:
                p.copy_(0.1 * noise)
            elif "embed_tokens" in name:  # tied: also the head, keep logits O(1)
                p.copy_(noise * (0.25 if model.config.tie_word_embeddings else 1.0))
            else:
                p.copy_(noise / p.shape[1] ** 0.5)


_CASES: dict[str, _Case] = {}


def _case(name: str) -> _Case:
    if name not in _CASES:
        cls, hf_cfg = _hf_config(name)
        torch.manual_seed(0)
        model = cls(hf_cfg).eval()
        _randomise(model, seed=len(_CASES) + 1)
        cfg = decoder_keys.config_from_hf(hf_cfg.to_dict())
        state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
        _CASES[name] = _Case(model, cfg, state, decoder_keys.hf_to_params(state, cfg))
    return _CASES[name]


@functools.cache
def _jitted_forward(cfg):
    model = decoder.Decoder(cfg)

    def run(m, tokens, positions, segment_ids):
        hidden, aux = m(m.embed(tokens), positions, segment_ids, return_hidden_states=True)
        return m.logits(hidden), aux["hidden_states"]

    return jax.jit(lambda p, *a: model.apply({"params": p}, *a, method=run))


def _jax_forward(cfg, params, tokens, positions, segment_ids=None):
    """(float32[B, T, V] logits, list of L + 1 hidden states) from our Decoder."""
    logits, hidden = _jitted_forward(cfg)(
        params, jnp.asarray(tokens), jnp.asarray(positions),
        None if segment_ids is None else jnp.asarray(segment_ids))
    return np.asarray(logits), [np.asarray(h) for h in hidden]


def _hf_forward(model, tokens, positions=None, attention_mask=None):
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(tokens).long(),
                    position_ids=None if positions is None else torch.from_numpy(positions).long(),
                    attention_mask=(None if attention_mask is None
                                    else torch.from_numpy(attention_mask).long()),
                    output_hidden_states=True)
    return out.logits.numpy(), [h.numpy() for h in out.hidden_states]


FAMILIES = ["qwen2", "llama2", "llama3_2"]


def test_config_from_hf_reads_each_family():
    assert _case("qwen2").cfg == decoder.make_config(
        vocab_size=1000, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
        mlp_dim=128, rope_theta=1e6, rms_eps=1e-6, qkv_bias=True, tie_embeddings=False)
    assert _case("llama2").cfg == decoder.make_config(
        vocab_size=1000, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=16,
        mlp_dim=172, rope_theta=1e4, rms_eps=1e-5, qkv_bias=False, tie_embeddings=False)
    assert _case("llama3_2").cfg == decoder.make_config(
        vocab_size=1000, hidden_size=96, num_layers=2, num_heads=6, num_kv_heads=2, head_dim=16,
        mlp_dim=256, rope_theta=5e5, rope_scaling=(32.0, 1.0, 4.0, 64), rms_eps=1e-5,
        qkv_bias=False, tie_embeddings=True)


def test_config_from_hf_json_4x_style_and_rejections():
    # A transformers 4.x config.json (Llama-3.2-3B-Instruct's fields).
    cfg = decoder_keys.config_from_hf({
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 3072,
        "intermediate_size": 8192, "num_hidden_layers": 28, "num_attention_heads": 24,
        "num_key_value_heads": 8, "head_dim": 128, "hidden_act": "silu", "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0, "tie_word_embeddings": True, "attention_bias": False,
        "mlp_bias": False, "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0,
                                            "low_freq_factor": 1.0,
                                            "original_max_position_embeddings": 8192,
                                            "rope_type": "llama3"}}, dtype="bfloat16")
    assert cfg == decoder.make_config("llama3_2_3b", dtype="bfloat16")
    qwen = decoder_keys.config_from_hf({
        "model_type": "qwen2", "vocab_size": 152064, "hidden_size": 3584,
        "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
        "num_key_value_heads": 4, "hidden_act": "silu", "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "rope_scaling": None, "tie_word_embeddings": False,
        "use_sliding_window": False, "sliding_window": 131072, "max_window_layers": 28})
    assert qwen == decoder.make_config("qwen2_7b")
    base = _case("qwen2").hf_model.config.to_dict()
    for bad in ({"model_type": "mistral"}, {"hidden_act": "gelu"}, {"use_sliding_window": True},
                {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}):
        with pytest.raises(ValueError):
            decoder_keys.config_from_hf({**base, **bad})
    with pytest.raises(ValueError, match="bias"):
        decoder_keys.config_from_hf({**_case("llama2").hf_model.config.to_dict(),
                                     "attention_bias": True})
    with pytest.raises(ValueError, match="unknown"):
        decoder_keys.config_from_hf(base, not_a_field=1)


def test_rope_inv_freq_matches_hf_buffers():
    for name in FAMILIES:
        case = _case(name)
        hf = case.hf_model.model.rotary_emb.inv_freq.numpy()
        ours = decoder.rope_inv_freq(case.cfg.head_dim, case.cfg.rope_theta,
                                     case.cfg.rope_scaling)
        np.testing.assert_allclose(ours, hf, rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", FAMILIES)
def test_logits_and_hidden_states_match_hf(name):
    case = _case(name)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, case.cfg.vocab_size, (BATCH, SEQ)).astype(np.int32)
    positions = np.broadcast_to(np.arange(SEQ, dtype=np.int32), tokens.shape)
    want_logits, want_hidden = _hf_forward(case.hf_model, tokens)
    logits, hidden = _jax_forward(case.cfg, case.params, tokens, positions)
    assert len(hidden) == len(want_hidden) == case.cfg.num_layers + 1
    for i, (h, w) in enumerate(zip(hidden, want_hidden)):
        assert np.abs(h - w).max() <= TOL, f"hidden state {i}: {np.abs(h - w).max()}"
    assert logits.dtype == np.float32
    assert np.abs(logits - want_logits).max() <= TOL
    assert np.abs(want_logits).std() > 0.1  # a non-trivial model


def test_large_positions_with_llama3_scaling_match_hf():
    case = _case("llama3_2")
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, case.cfg.vocab_size, (BATCH, SEQ)).astype(np.int32)
    # Past original_max_position_embeddings (64), a different offset per row.
    offsets = np.array([[64], [300], [5000]], np.int32)
    positions = np.arange(SEQ, dtype=np.int32) + offsets
    want_logits, _ = _hf_forward(case.hf_model, tokens, positions=positions)
    logits, _ = _jax_forward(case.cfg, case.params, tokens, positions)
    assert np.abs(logits - want_logits).max() <= TOL


@pytest.mark.parametrize("name", FAMILIES)
def test_right_padding_via_segment_ids_matches_hf_attention_mask(name):
    case = _case(name)
    rng = np.random.default_rng(2)
    lengths = np.array([SEQ, 17, 9])
    tokens = rng.integers(0, case.cfg.vocab_size, (BATCH, SEQ)).astype(np.int32)
    mask = (np.arange(SEQ)[None] < lengths[:, None]).astype(np.int32)
    tokens = np.where(mask == 1, tokens, 0).astype(np.int32)
    positions = np.broadcast_to(np.arange(SEQ, dtype=np.int32), tokens.shape)
    want_logits, want_hidden = _hf_forward(case.hf_model, tokens, attention_mask=mask)
    logits, hidden = _jax_forward(case.cfg, case.params, tokens, positions, segment_ids=mask)
    real = mask.astype(bool)
    for h, w in zip(hidden, want_hidden):
        assert np.abs(h[real] - w[real]).max() <= TOL
    assert np.abs(logits[real] - want_logits[real]).max() <= TOL
    assert np.isfinite(logits).all()


@pytest.mark.parametrize("name", FAMILIES)
def test_state_dict_round_trip_is_bitwise(name):
    case = _case(name)
    full = decoder_keys.params_to_hf(case.params, case.cfg, include_tied_lm_head=True)
    assert list(full) == list(case.state)
    for key, value in case.state.items():
        assert full[key].dtype == value.dtype and np.array_equal(full[key], value), key
    default = decoder_keys.params_to_hf(case.params, case.cfg)
    want = {k: v for k, v in case.state.items()
            if not (case.cfg.tie_embeddings and k == "lm_head.weight")}
    assert list(default) == list(want)
    # Without lm_head.weight (how safetensors stores tied models), and streamed as pairs.
    again = decoder_keys.hf_to_params(iter(want.items()), case.cfg)
    assert jax.tree.all(jax.tree.map(np.array_equal, again, case.params))


def test_scanned_params_export_like_unscanned():
    case = _case("qwen2")
    stacked = decoder.stack_layer_params(case.params, case.cfg.num_layers)
    out = decoder_keys.params_to_hf(stacked, case.cfg)
    assert all(np.array_equal(out[k], case.state[k]) for k in case.state)


def test_converter_is_strict():
    case = _case("qwen2")
    state = dict(case.state)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.extra\.weight"):
        decoder_keys.hf_to_params({**state, "model.layers.0.self_attn.extra.weight": 0}, case.cfg)
    with pytest.raises(ValueError, match=r"model\.layers\.2\.mlp\.up_proj\.weight"):
        decoder_keys.hf_to_params({**state, "model.layers.2.mlp.up_proj.weight":
                                   state["model.layers.1.mlp.up_proj.weight"]}, case.cfg)
    missing = {k: v for k, v in state.items() if k != "model.layers.1.self_attn.k_proj.bias"}
    with pytest.raises(ValueError, match=r"missing.*model\.layers\.1\.self_attn\.k_proj\.bias"):
        decoder_keys.hf_to_params(missing, case.cfg)
    bad = {**state, "model.norm.weight": np.ones(63, np.float32)}
    with pytest.raises(ValueError, match=r"model\.norm\.weight: shape"):
        decoder_keys.hf_to_params(bad, case.cfg)
    pairs = list(state.items()) + [("model.norm.weight", state["model.norm.weight"])]
    with pytest.raises(ValueError, match=r"duplicate key 'model\.norm\.weight'"):
        decoder_keys.hf_to_params(pairs, case.cfg)
    no_bias = dataclasses.replace(case.cfg, qkv_bias=False)
    with pytest.raises(ValueError, match=r"q_proj\.bias"):
        decoder_keys.hf_to_params(state, no_bias)
    # Old Llama checkpoints carry derived RoPE buffers: accepted and dropped.
    llama = _case("llama2")
    extra = {**llama.state, "model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(8)}
    assert jax.tree.all(jax.tree.map(np.array_equal,
                                     decoder_keys.hf_to_params(extra, llama.cfg), llama.params))
    tied = _case("llama3_2")
    wrong_head = {**tied.state, "lm_head.weight": tied.state["lm_head.weight"] + 1}
    with pytest.raises(ValueError, match="lm_head.weight differs"):
        decoder_keys.hf_to_params(wrong_head, tied.cfg)
    with pytest.raises(ValueError, match="no HF key"):
        decoder_keys.params_to_hf({**case.params, "extra": {"kernel": np.ones(3)}}, case.cfg)
    swapped = jax.tree.map(lambda x: x, case.params)  # same size, wrong axis order
    swapped["layers_0"]["self_attn"]["q_proj"]["kernel"] = np.zeros((64, 16, 4), np.float32)
    with pytest.raises(ValueError, match="layers_0/self_attn/q_proj/kernel: shape"):
        decoder_keys.params_to_hf(swapped, case.cfg)
