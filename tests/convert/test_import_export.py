"""End-to-end tests of `convert.import_hf` / `convert.export_hf` for every family.

For each family a tiny random `transformers` model (every parameter randomised, float32, eager
attention) is saved with `save_pretrained` in small shards (so the index is exercised),
imported, run by our module against the HF forward (logits for the decoders, the last hidden
state for the towers; max abs error <= 1e-4), exported, re-loaded with `from_pretrained` (same
outputs) and compared key by key with the original safetensors (bitwise). Further tests: dtype
choice, `.bin` / sharded `.bin` / wrapped `.pth` inputs, tensor-by-tensor memory, config.json
built from our config, family detection, and error messages.
"""

import copy
import dataclasses
import functools
import json
import os
import shutil
import tracemalloc
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import save_file

from convert import checkpoint_io as cio
from convert import decoder_keys, export_hf, families, import_hf
from longvid_jax.models import audio, clip, decoder, dinov2, qformer, vit

TOL = 1e-4
SHARD = "16KB"


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random: norms and LayerScale 1 + N(0, .2^2), embeddings / positions /
    class and mask tokens N(0, .5^2) (decoder token embeddings N(0, 1), 0.25 when tied),
    matrices N(0, 1 / fan_in), other vectors N(0, .1^2)."""
    g = torch.Generator().manual_seed(seed)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            z = torch.randn(p.shape, generator=g)
            low = name.lower()
            if ("norm" in low and name.endswith("weight")) or "lambda1" in name:
                p.copy_(1.0 + 0.2 * z)
            elif "embed_tokens" in name:
                p.copy_(z * (0.25 if tied else 1.0))
            elif any(s in low for s in ("position", "class_embedding", "cls_token",
                                        "mask_token", "probe", "word_embeddings")):
                p.copy_(0.5 * z)
            elif p.ndim >= 2:
                p.copy_(z / np.sqrt(np.prod(p.shape[1:])))
            else:
                p.copy_(0.1 * z)
    model.eval()


def _eager(config):
    config._attn_implementation = "eager"
    return config


def _t(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x))


# ----------------------------------------------------------------------------------------------
# Per-family specs: the HF model, inputs, and both forwards as {name: float32 array}.


@dataclasses.dataclass(frozen=True)
class _Spec:
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[np.random.Generator], dict[str, np.ndarray]]
    hf: Callable[[torch.nn.Module, dict], dict[str, np.ndarray]]
    ours: Callable[[Any, dict, dict], dict[str, jax.Array]]  # jit-able
    keep_ignored: bool = False  # store the ignored keys too (bitwise round trip of all keys)
    family: str | None = None  # the family detected (default: the spec's name)


def _decoder_hf(model, x):
    with torch.no_grad():
        return {"logits": model(input_ids=_t(x["tokens"]).long()).logits.numpy()}


def _decoder_ours(cfg, params, x):
    def run(m, tokens, positions):
        hidden, _ = m(m.embed(tokens), positions)
        return m.logits(hidden)

    tokens = x["tokens"]
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    return {"logits": decoder.Decoder(cfg).apply({"params": params}, tokens, positions,
                                                 method=run)}


def _tokens(rng):
    return {"tokens": rng.integers(0, 128, size=(2, 9)).astype(np.int32)}


def _images(rng):
    return {"images": rng.normal(size=(2, 16, 16, 3)).astype(np.float32)}


def _pixels(x):
    return _t(x["images"].transpose(0, 3, 1, 2))


def _qwen2():
    return transformers.Qwen2ForCausalLM(_eager(transformers.Qwen2Config(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6, rms_norm_eps=1e-6,
        tie_word_embeddings=False, max_position_embeddings=64)))


def _llama():  # Llama-3.2 style: GQA 3:1, tied embeddings, llama3 rope scaling that bites
    return transformers.LlamaForCausalLM(_eager(transformers.LlamaConfig(
        vocab_size=128, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, rms_norm_eps=1e-5,
        tie_word_embeddings=True, max_position_embeddings=64,
        rope_parameters=dict(rope_type="llama3", rope_theta=5e5, factor=8.0,
                             low_freq_factor=1.0, high_freq_factor=4.0,
                             original_max_position_embeddings=16))))


def _siglip():  # with the pooling head (ignored on import, kept verbatim with keep_ignored)
    return transformers.SiglipVisionModel(_eager(transformers.SiglipVisionConfig(
        image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64)))


def _siglip_hf(model, x):
    with torch.no_grad():
        return {"last_hidden_state": model(pixel_values=_pixels(x)).last_hidden_state.numpy()}


def _siglip_ours(cfg, params, x):
    out, _ = vit.ViT(cfg).apply({"params": params}, x["images"])
    return {"last_hidden_state": out}


def _dinov2():  # giant's SwiGLU FFN and LayerScale
    return transformers.Dinov2Model(_eager(transformers.Dinov2Config(
        image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        mlp_ratio=4, use_swiglu_ffn=True)))


def _dinov2_hf(model, x):
    with torch.no_grad():
        return {"last_hidden_state": model(pixel_values=_pixels(x)).last_hidden_state.numpy()}


def _dinov2_ours(cfg, params, x):
    tokens, aux = dinov2.Dinov2(cfg).apply({"params": params}, x["images"])
    if not cfg.keep_cls:
        tokens = jnp.concatenate([aux["cls"][:, None], tokens], axis=1)
    return {"last_hidden_state": tokens}


def _clip():
    return transformers.CLIPVisionModelWithProjection(_eager(transformers.CLIPVisionConfig(
        image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, projection_dim=16, hidden_act="quick_gelu")))


def _clip_hf(model, x):
    with torch.no_grad():
        out = model(pixel_values=_pixels(x))
    return {"last_hidden_state": out.last_hidden_state.numpy(),
            "image_embeds": out.image_embeds.numpy()}


def _clip_ours(cfg, params, x):
    _, aux = clip.ClipVision(cfg).apply({"params": params}, x["images"])
    return {"last_hidden_state": aux["encoder_output"], "image_embeds": aux["image_embeds"]}


def _whisper():  # WhisperModel: the decoder is ignored on import (kept with keep_ignored)
    return transformers.WhisperModel(_eager(transformers.WhisperConfig(
        num_mel_bins=16, d_model=32, encoder_layers=2, decoder_layers=1,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
        decoder_ffn_dim=64, max_source_positions=16, max_target_positions=16, vocab_size=64,
        pad_token_id=1, bos_token_id=2, eos_token_id=3, decoder_start_token_id=2)))


def _mel(rng):
    return {"mel": rng.normal(size=(2, 16, 32)).astype(np.float32)}


def _whisper_hf(model, x):
    with torch.no_grad():
        return {"last_hidden_state": model.encoder(_t(x["mel"])).last_hidden_state.numpy()}


def _whisper_ours(cfg, params, x):
    out, _ = audio.WhisperEncoder(cfg).apply({"params": params}, x["mel"])
    return {"last_hidden_state": out}


_QF = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
           encoder_hidden_size=24)


def _blip2():
    return transformers.Blip2QFormerModel(_eager(transformers.Blip2QFormerConfig(
        cross_attention_frequency=1, **_QF)))


def _instructblip():
    return transformers.InstructBlipQFormerModel(_eager(transformers.InstructBlipQFormerConfig(
        vocab_size=49, max_position_embeddings=32, cross_attention_frequency=2, **_QF)))


def _qformer_inputs(rng):
    return {"queries": rng.normal(size=(2, 4, 32)).astype(np.float32),
            "enc": rng.normal(size=(2, 6, 24)).astype(np.float32),
            "ids": rng.integers(1, 49, size=(2, 5)).astype(np.int32)}


def _qformer_hf(model, x):
    kw = {}
    if isinstance(model, transformers.InstructBlipQFormerModel):
        kw = dict(input_ids=_t(x["ids"]).long(),
                  attention_mask=torch.ones(2, 4 + x["ids"].shape[1], dtype=torch.long))
    with torch.no_grad():
        out = model(query_embeds=_t(x["queries"]), encoder_hidden_states=_t(x["enc"]), **kw)
    return {"last_hidden_state": out.last_hidden_state.numpy()}


def _qformer_ours(cfg, params, x):
    kw = {"text_ids": x["ids"]} if cfg.vocab_size else {}
    out, _ = qformer.QFormer(cfg).apply({"params": params}, x["enc"],
                                        query_embeds=x["queries"], **kw)
    return {"last_hidden_state": out}


# Multi-part checkpoints: the tower / Q-Former is converted, the rest ignored (kept verbatim).


def _siglip_full():
    return transformers.SiglipModel(_eager(transformers.SiglipConfig(
        vision_config=dict(image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=4, intermediate_size=64),
        text_config=dict(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=32,
                         max_position_embeddings=16))))


def _siglip_full_hf(model, x):
    with torch.no_grad():
        out = model.vision_model(pixel_values=_pixels(x))
    return {"last_hidden_state": out.last_hidden_state.numpy()}


def _clip_full():
    return transformers.CLIPModel(_eager(transformers.CLIPConfig(
        vision_config=dict(image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=4, intermediate_size=64,
                           hidden_act="quick_gelu"),
        text_config=dict(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=32,
                         max_position_embeddings=16),
        projection_dim=16)))


def _clip_full_hf(model, x):
    with torch.no_grad():
        out = model.vision_model(pixel_values=_pixels(x))
        embeds = model.visual_projection(out.pooler_output)
    return {"last_hidden_state": out.last_hidden_state.numpy(), "image_embeds": embeds.numpy()}


def _blip2_full():  # Blip2Model: vision tower and OPT language model ignored
    return transformers.Blip2Model(_eager(transformers.Blip2Config(
        vision_config=dict(image_size=16, patch_size=8, hidden_size=24, num_hidden_layers=1,
                           num_attention_heads=2, intermediate_size=48),
        qformer_config=dict(cross_attention_frequency=2, **{**_QF, "encoder_hidden_size": 24}),
        text_config=dict(model_type="opt", vocab_size=64, hidden_size=16, num_hidden_layers=1,
                         num_attention_heads=2, ffn_dim=32, word_embed_proj_dim=16,
                         max_position_embeddings=32, pad_token_id=1, bos_token_id=2,
                         eos_token_id=2),
        num_query_tokens=4)))


def _blip2_full_hf(model, x):
    queries = model.query_tokens.expand(x["enc"].shape[0], -1, -1)
    with torch.no_grad():
        out = model.qformer(query_embeds=queries, encoder_hidden_states=_t(x["enc"]))
    return {"last_hidden_state": out.last_hidden_state.numpy()}


def _blip2_full_ours(cfg, params, x):  # the learned query tokens
    out, _ = qformer.QFormer(cfg).apply({"params": params}, x["enc"])
    return {"last_hidden_state": out}


SPECS: dict[str, _Spec] = {
    "qwen2": _Spec(_qwen2, _tokens, _decoder_hf, _decoder_ours),
    "llama": _Spec(_llama, _tokens, _decoder_hf, _decoder_ours),
    "siglip": _Spec(_siglip, _images, _siglip_hf, _siglip_ours, keep_ignored=True),
    "dinov2": _Spec(_dinov2, _images, _dinov2_hf, _dinov2_ours),
    "clip": _Spec(_clip, _images, _clip_hf, _clip_ours),
    "whisper": _Spec(_whisper, _mel, _whisper_hf, _whisper_ours, keep_ignored=True),
    "blip2": _Spec(_blip2, _qformer_inputs, _qformer_hf, _qformer_ours),
    "instructblip": _Spec(_instructblip, _qformer_inputs, _qformer_hf, _qformer_ours),
    "siglip_full": _Spec(_siglip_full, _images, _siglip_full_hf, _siglip_ours,
                         keep_ignored=True, family="siglip"),
    "clip_full": _Spec(_clip_full, _images, _clip_full_hf, _clip_ours, keep_ignored=True,
                       family="clip"),
    "blip2_full": _Spec(_blip2_full, _qformer_inputs, _blip2_full_hf, _blip2_full_ours,
                        keep_ignored=True, family="blip2"),
}


@dataclasses.dataclass
class _Run:
    model: torch.nn.Module
    hf_dir: str
    orbax_dir: str
    export_dir: str
    params: dict
    cfg: Any
    meta: dict


_RUNS: dict[str, _Run] = {}


@pytest.fixture(scope="module")
def run(request, tmp_path_factory) -> Callable[[str], _Run]:
    """family -> the saved model, imported and exported once per module."""

    def get(name: str) -> _Run:
        if name not in _RUNS:
            spec = SPECS[name]
            folder = tmp_path_factory.mktemp(name)
            torch.manual_seed(0)
            model = spec.build()
            _randomise(model, seed=sorted(SPECS).index(name))
            hf_dir, ox, back = (str(folder / d) for d in ("hf", "orbax", "export"))
            model.save_pretrained(hf_dir, max_shard_size=SHARD)
            assert os.path.exists(os.path.join(hf_dir, cio.SAFE_INDEX)), "not sharded"
            for side in ("tokenizer_config.json", "chat_template.jinja"):  # copied unchanged
                with open(os.path.join(hf_dir, side), "w") as f:
                    f.write(f"{name} {side}\n")
            import_hf.import_checkpoint(hf_dir, ox, keep_ignored=spec.keep_ignored)
            params, cfg, meta = import_hf.load_converted(ox)
            export_hf.export_checkpoint(ox, back, max_shard_size=SHARD)
            _RUNS[name] = _Run(model, hf_dir, ox, back, params, cfg, meta)
        return _RUNS[name]

    yield get
    _RUNS.clear()


def _max_err(got: dict, want: dict) -> dict[str, float]:
    assert got.keys() == want.keys()
    out = {}
    for k in want:
        assert got[k].shape == want[k].shape, k
        out[k] = float(np.max(np.abs(got[k].astype(np.float32) - want[k])))
    return out


@pytest.mark.parametrize("name", sorted(SPECS))
def test_import_matches_hf_forward(run, name):
    r = run(name)
    spec = SPECS[name]
    assert r.meta["family"] == (spec.family or name)
    x = spec.inputs(np.random.default_rng(1))
    ours = jax.jit(functools.partial(spec.ours, r.cfg))(r.params, x)
    errors = _max_err({k: np.asarray(v) for k, v in ours.items()}, spec.hf(r.model, x))
    assert max(errors.values()) <= TOL, errors


@pytest.mark.parametrize("name", sorted(SPECS))
def test_export_loads_with_from_pretrained(run, name):
    r = run(name)
    spec = SPECS[name]
    cls = getattr(transformers, r.meta["layout"]["hf_class"])
    assert isinstance(r.model, cls)
    reloaded = cls.from_pretrained(r.export_dir, attn_implementation="eager").eval()
    x = spec.inputs(np.random.default_rng(2))
    errors = _max_err(spec.hf(reloaded, x), spec.hf(r.model, x))
    assert max(errors.values()) == 0.0, errors
    side = [n for n in os.listdir(r.hf_dir) if not cio.is_weight_file(n)]
    assert {"config.json", "tokenizer_config.json", "chat_template.jinja"} <= set(side)
    for name_ in side:  # config, tokenizer, chat template ... copied unchanged
        with open(os.path.join(r.hf_dir, name_), "rb") as a, \
                open(os.path.join(r.export_dir, name_), "rb") as b:
            assert a.read() == b.read(), name_


@pytest.mark.parametrize("name", sorted(SPECS))
def test_round_trip_is_bitwise(run, name):
    r = run(name)
    original, exported = cio.open_state(r.hf_dir), cio.open_state(r.export_dir)
    assert len(exported.files) > 1  # sharded again, with an index
    assert sorted(exported) == sorted(original)
    for key in original:
        a, b = original[key], exported[key]
        assert a.dtype == b.dtype and a.shape == b.shape, key
        np.testing.assert_array_equal(a.reshape(-1).view(np.uint8), b.reshape(-1).view(np.uint8),
                                      err_msg=key)


def test_ignored_keys_dropped_unless_kept(run, tmp_path):
    """Without --keep-ignored the round trip gives back exactly the mapped keys."""
    r = run("whisper")
    assert r.meta["layout"]["ignored"] == ["decoder."]
    import_hf.import_checkpoint(r.hf_dir, str(tmp_path / "ox"))
    export_hf.export_checkpoint(str(tmp_path / "ox"), str(tmp_path / "hf"))
    original, exported = cio.open_state(r.hf_dir), cio.open_state(str(tmp_path / "hf"))
    assert sorted(exported) == sorted(k for k in original if not k.startswith("decoder."))
    assert not os.path.exists(tmp_path / "ox" / "extra")


# ----------------------------------------------------------------------------------------------
# dtypes, input formats, memory.


def _leaves(tree) -> dict[tuple, np.ndarray]:
    return cio.flatten_tree(tree)


def test_dtype_choice_on_import_and_export(run, tmp_path):
    """bf16 source: keep stores the bf16 bits, float32 upcasts exactly; f32 source: bfloat16
    rounds as NumPy does; export --dtype converts and updates config.json's dtype."""
    r = run("qwen2")
    bf16_dir = str(tmp_path / "hf_bf16")
    copy.deepcopy(r.model).to(torch.bfloat16).save_pretrained(bf16_dir, max_shard_size=SHARD)
    want = _leaves(decoder_keys.hf_to_params(cio.open_state(bf16_dir), r.cfg))
    assert {v.dtype for v in want.values()} == {np.dtype(ml_dtypes.bfloat16)}

    assert import_hf.main([f"--src={bf16_dir}", f"--out={tmp_path / 'keep'}",
                           "--dtype=keep"]) == 0
    keep, _, meta = import_hf.load_converted(str(tmp_path / "keep"))
    assert meta["dtype"]["stored"] == {"bfloat16": len(want)}
    import_hf.import_checkpoint(bf16_dir, str(tmp_path / "f32"), dtype="float32")
    f32, _, _ = import_hf.load_converted(str(tmp_path / "f32"))
    for path, w in want.items():
        np.testing.assert_array_equal(_leaves(keep)[path].view(np.uint16), w.view(np.uint16))
        assert _leaves(f32)[path].dtype == np.float32
        np.testing.assert_array_equal(_leaves(f32)[path], w.astype(np.float32))

    import_hf.import_checkpoint(r.hf_dir, str(tmp_path / "to_bf16"), dtype="bfloat16")
    to_bf16, _, _ = import_hf.load_converted(str(tmp_path / "to_bf16"))
    for path, w in _leaves(r.params).items():
        np.testing.assert_array_equal(_leaves(to_bf16)[path].view(np.uint16),
                                      w.astype(ml_dtypes.bfloat16).view(np.uint16))

    assert export_hf.main([f"--src={tmp_path / 'keep'}", f"--out={tmp_path / 'back'}"]) == 0
    original = cio.open_state(bf16_dir)
    back = cio.open_state(str(tmp_path / "back"))
    assert len(back.files) == 1  # default 5GB shards: one file, no index
    for key in original:
        assert back[key].dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(back[key].view(np.uint16), original[key].view(np.uint16))
    export_hf.export_checkpoint(str(tmp_path / "keep"), str(tmp_path / "back32"),
                                dtype="float32")
    with open(tmp_path / "back32" / "config.json") as f:
        assert json.load(f)["dtype"] == "float32"
    assert {cio.open_state(str(tmp_path / "back32")).dtype(k) for k in original} == {"float32"}


def _state_torch(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_bin_sharded_bin_and_wrapped_pth(run, tmp_path):
    """`.bin` (with the tied lm_head that torch state dicts hold), a sharded `.bin` with its
    index, and a LAVIS-style `{"model": ...}` `.pth` given with --weights / --config give the
    same params as the safetensors import."""
    r = run("llama")
    state = _state_torch(r.model)
    assert "lm_head.weight" in state  # tied, but in the torch state dict
    single = tmp_path / "bin"
    single.mkdir()
    shutil.copy(os.path.join(r.hf_dir, "config.json"), single)
    torch.save(state, single / cio.BIN_SINGLE)
    sharded = tmp_path / "bin_sharded"
    sharded.mkdir()
    shutil.copy(os.path.join(r.hf_dir, "config.json"), sharded)
    keys, weight_map = list(state), {}
    for i in range(2):
        name = f"pytorch_model-{i + 1:05d}-of-00002.bin"
        torch.save({k: state[k] for k in keys[i::2]}, sharded / name)
        weight_map.update({k: name for k in keys[i::2]})
    (sharded / cio.BIN_INDEX).write_text(json.dumps({"weight_map": weight_map}))
    pth = tmp_path / "checkpoint.pth"
    torch.save({"model": state, "epoch": 1}, pth)

    want = _leaves(r.params)
    for i, kw in enumerate([dict(src=str(single)), dict(src=str(sharded)),
                            dict(src=str(pth), config=os.path.join(r.hf_dir, "config.json"))]):
        out = str(tmp_path / f"out{i}")
        import_hf.import_checkpoint(out=out, **kw)
        got = _leaves(import_hf.load_converted(out)[0])
        assert got.keys() == want.keys()
        for path in want:
            np.testing.assert_array_equal(got[path], want[path])


def _synthetic_qwen2(folder, rng) -> int:
    """A ~28 MB float32 Qwen2 checkpoint in 4 shards; returns its bytes."""
    cfg = dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=2048,
               hidden_size=256, intermediate_size=1024, num_hidden_layers=6,
               num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
               rope_theta=1e6, tie_word_embeddings=False, hidden_act="silu")
    dcfg = decoder_keys.config_from_hf(cfg)
    os.makedirs(folder)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    shapes = {}
    for key in decoder_keys.hf_keys(dcfg):
        rule_shape = {"embed_tokens": (2048, 256), "lm_head": (2048, 256), "q_proj.weight":
                      (256, 256), "k_proj.weight": (128, 256), "v_proj.weight": (128, 256),
                      "o_proj.weight": (256, 256), "q_proj.bias": (256,), "k_proj.bias": (128,),
                      "v_proj.bias": (128,), "gate_proj": (1024, 256), "up_proj": (1024, 256),
                      "down_proj": (256, 1024), "norm": (256,)}
        shapes[key] = next(s for part, s in rule_shape.items() if part in key)
    keys, total, weight_map = list(shapes), 0, {}
    for i in range(4):
        name = f"model-{i + 1:05d}-of-00004.safetensors"
        part = {k: rng.normal(size=shapes[k]).astype(np.float32) for k in keys[i::4]}
        total += sum(v.nbytes for v in part.values())
        save_file(part, os.path.join(folder, name))
        weight_map.update({k: name for k in part})
    with open(os.path.join(folder, cio.SAFE_INDEX), "w") as f:
        json.dump({"weight_map": weight_map}, f)
    return total


def test_decoder_import_memory_is_bounded(tmp_path):
    """Python-side peak memory (tracemalloc: NumPy and safetensors buffers) of a streamed
    decoder import stays near one write group plus a few tensors, far below the checkpoint."""
    total = _synthetic_qwen2(str(tmp_path / "hf"), np.random.default_rng(0))
    largest = 2048 * 256 * 4  # embedding / head: 2 MiB
    tracemalloc.start()
    try:
        import_hf.import_checkpoint(str(tmp_path / "hf"), str(tmp_path / "ox"), dtype="float32",
                                    group_bytes=4 << 20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total > 25e6
    assert largest <= peak < (4 << 20) + 4 * largest, (peak, total)
    meta = cio.tree_metadata(str(tmp_path / "ox" / "params"))
    assert len(meta) == 2 + 1 + 6 * 12


# ----------------------------------------------------------------------------------------------
# Config building, detection, errors.


@pytest.mark.parametrize("name", ["qwen2", "llama"])
def test_config_json_built_when_original_missing(run, tmp_path, name):
    r = run(name)
    ox = str(tmp_path / "ox")
    shutil.copytree(r.orbax_dir, ox)
    os.remove(os.path.join(ox, "config.json"))
    meta_path = os.path.join(ox, import_hf.LONGVID_CONFIG)
    meta = json.loads(open(meta_path).read())
    meta["hf_files"].remove("config.json")
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    export_hf.export_checkpoint(ox, str(tmp_path / "hf"))
    with open(tmp_path / "hf" / "config.json") as f:
        built = json.load(f)
    assert built["architectures"] == [r.meta["layout"]["hf_class"]]
    assert decoder_keys.config_from_hf(built) == r.cfg
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "hf"), attn_implementation="eager").eval()
    x = _tokens(np.random.default_rng(3))
    np.testing.assert_array_equal(_decoder_hf(reloaded, x)["logits"],
                                  _decoder_hf(r.model, x)["logits"])


def test_detection_and_layouts():
    assert families.detect({"model_type": "qwen2"}).name == "qwen2"
    assert families.detect({"architectures": ["LlamaForCausalLM"]}).name == "llama"
    assert families.detect({"model_type": "siglip"}).name == "siglip"
    assert families.detect({"model_type": "clip_vision_model"}).name == "clip"
    assert families.detect({"model_type": "blip-2"}).name == "blip2"
    assert families.detect({"model_type": "instructblip_qformer"}).name == "instructblip"
    with pytest.raises(ValueError, match=r"cannot detect the family of config.json "
                                         r"\(model_type='bert'.*pass --family"):
        families.detect({"model_type": "bert", "architectures": ["BertModel"]})
    with pytest.raises(ValueError, match="unknown family 'gpt2'; known: "):
        families.get("gpt2")

    full_siglip = ["vision_model.embeddings.patch_embedding.weight", "vision_model.head.probe",
                   "text_model.embeddings.token_embedding.weight", "logit_scale", "logit_bias"]
    lay = families.get("siglip").layout({"model_type": "siglip"}, full_siglip)
    assert lay.kwargs == {"prefix": "vision_model."}
    assert lay.ignored == ("vision_model.head.", "text_model.", "logit_scale", "logit_bias")
    full_clip = ["vision_model.embeddings.class_embedding", "visual_projection.weight",
                 "text_model.x", "text_projection.weight", "logit_scale"]
    lay = families.get("clip").layout({"model_type": "clip", "architectures": ["CLIPModel"]},
                                      full_clip)
    assert lay.config_kwargs == {"with_projection": True}
    assert lay.hf_class == "CLIPModel"
    assert lay.ignored == ("text_model.", "text_projection.", "logit_scale")
    whisper_fcg = ["model.encoder.conv1.weight", "model.decoder.layers.0.fc1.weight",
                   "proj_out.weight"]
    lay = families.get("whisper").layout({"model_type": "whisper"}, whisper_fcg)
    assert lay.kwargs == {"prefix": "model.encoder."}
    assert lay.ignored == ("model.decoder.", "proj_out.")
    blip2 = ["qformer.layernorm.weight", "query_tokens", "vision_model.x", "language_model.y",
             "language_projection.weight"]
    lay = families.get("blip2").layout({"model_type": "blip-2"}, blip2)
    assert lay.kwargs == {"flavor": "blip2", "prefix": "qformer.",
                          "query_tokens_key": "query_tokens"}
    assert lay.ignored == ("vision_model.", "language_projection.", "language_model.")
    with pytest.raises(ValueError, match="cannot locate the SigLIP vision tensors: no key ends "
                                         "with 'embeddings.patch_embedding.weight'"):
        families.get("siglip").layout({}, ["foo.weight"])


def _edit_checkpoint(src: str, dst: str, edit: Callable[[dict], None]) -> None:
    """Copies an HF folder as one model.safetensors after `edit(state)`."""
    os.makedirs(dst)
    shutil.copy(os.path.join(src, "config.json"), dst)
    state = dict(cio.open_state(src).items())
    edit(state)
    save_file(state, os.path.join(dst, cio.SAFE_SINGLE))


def test_errors_name_the_key_or_file(run, tmp_path):
    r = run("qwen2")
    out = str(tmp_path / "out")
    with pytest.raises(FileExistsError, match="exists"):
        import_hf.import_checkpoint(r.hf_dir, r.orbax_dir)

    def check(edit, match):
        src = str(tmp_path / f"src{len(os.listdir(tmp_path))}")
        _edit_checkpoint(r.hf_dir, src, edit)
        with pytest.raises(ValueError, match=match):
            import_hf.import_checkpoint(src, out)
        assert not os.path.exists(out)

    def as_int(s):
        s["model.norm.weight"] = np.arange(32, dtype=np.int64)

    check(as_int, r"key 'model.norm.weight': dtype int64 where a float parameter is expected")
    check(lambda s: s.update({"model.norm.weight": np.ones(31, np.float32)}),
          r"model.norm.weight: shape \(31,\) != expected \(32,\)")
    check(lambda s: s.update({"model.extra.weight": np.ones(3, np.float32)}),
          r"unmapped HF key 'model.extra.weight'")
    check(lambda s: s.pop("model.layers.1.mlp.up_proj.weight"),
          r"missing HF key\(s\) \['model.layers.1.mlp.up_proj.weight'\]")

    sharded = tmp_path / "missing_shard"
    shutil.copytree(r.hf_dir, sharded)
    index = json.loads((sharded / cio.SAFE_INDEX).read_text())
    key, shard = next(iter(index["weight_map"].items()))
    os.remove(sharded / shard)
    with pytest.raises(cio.CheckpointFormatError,
                       match=f"shard file '{shard}' \\(holding '{key}'\\) does not exist"):
        import_hf.import_checkpoint(str(sharded), out)

    bert = tmp_path / "bert"
    shutil.copytree(r.hf_dir, bert)
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="cannot detect the family"):
        import_hf.import_checkpoint(str(bert), out)
    with pytest.raises(ValueError, match="unsupported model_type 'bert'"):
        import_hf.import_checkpoint(str(bert), out, family="qwen2")
    with pytest.raises(SystemExit):
        import_hf.main([f"--src={r.hf_dir}", f"--out={out}", "--family=gpt2"])


def test_tied_head_must_match_embedding(run, tmp_path):
    r = run("llama")
    state = _state_torch(r.model)
    state["lm_head.weight"] = state["lm_head.weight"] + 1.0  # no longer the embedding
    folder = tmp_path / "bin"
    folder.mkdir()
    shutil.copy(os.path.join(r.hf_dir, "config.json"), folder)
    torch.save(state, folder / cio.BIN_SINGLE)
    with pytest.raises(ValueError, match="lm_head.weight differs from model.embed_tokens.weight"):
        import_hf.import_checkpoint(str(folder), str(tmp_path / "out"))
