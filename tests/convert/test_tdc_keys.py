"""Tests for convert/tdc_keys.py on a tiny TDC release written in the original layout.

The release folder holds `config.json` (Qwen2 + cambrian fields), two safetensors shards with
`model.safetensors.index.json`, the TDC key names (made by the existing key tables'
`params_to_hf`, plus the tensors TDC saves and we do not build: the BERT MLM head, the
`position_ids` buffer, `query_tokens`); the towers sit in their own checkpoints (a full
SiglipModel-style folder, a DINOv2 folder, a BEATs `.pt` with `cfg` / `model`), and a PEFT LoRA
folder (`adapter_config.json`, `adapter_model.safetensors`, `non_lora_trainables.bin`).
"""

import json
import os
import re
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from convert import (
    beats_keys,
    decoder_keys,
    dinov2_keys,
    qformer_keys,
    sva_keys,
    tdc_keys,
    vit_keys,
)
from convert.checkpoint_io import flatten_tree, nest_tree, open_state
from longvid_jax.models import decoder, dinov2, lora, sva, vit
from longvid_jax.models.qformer import make_tdc_config
from tests.helpers import ScopedLM

LLM = decoder.make_config("tiny", hidden_size=48, head_dim=12)
SVA = sva.make_config("tiny", tower_widths=(32, 32))
COMP = make_tdc_config("tiny", audio_width=32)
SIGLIP = vit.make_config("tiny", post_ln=False)
DINO = dinov2.make_config("tiny")
BEATS_CFG = {"input_patch_size": 16, "embed_dim": 16, "conv_bias": False, "encoder_layers": 2,
             "encoder_embed_dim": 32, "encoder_ffn_embed_dim": 64, "encoder_attention_heads": 4,
             "activation_fn": "gelu", "layer_norm_first": False, "deep_norm": True,
             "dropout": 0.0, "conv_pos": 8, "conv_pos_groups": 4,
             "relative_position_embedding": True, "num_buckets": 16, "max_distance": 32,
             "gru_rel_pos": True, "finetuned_model": True, "predictor_class": 5}
BEATS = beats_keys.config_from_beats(BEATS_CFG)
OVERRIDES = {"qformer": {"num_heads": 4}}
HF_CONFIG = {
    "model_type": "cambrian_qwen", "architectures": ["CambrianQwenForCausalLM"],
    "vocab_size": LLM.vocab_size, "hidden_size": 48, "num_hidden_layers": LLM.num_layers,
    "num_attention_heads": LLM.num_heads, "num_key_value_heads": LLM.num_kv_heads,
    "head_dim": 12, "intermediate_size": LLM.mlp_dim, "rope_theta": 1e6, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False, "hidden_act": "silu", "use_sliding_window": False,
    "torch_dtype": "float32",
    # cambrian fields (tdc/cambrian_arch.py)
    "mm_projector_type": "sva", "vision_hidden_size": SVA.width, "num_query_group": 1,
    "query_num_list": [9], "connector_only": True, "connector_depth": SVA.depth,
    "image_token_len": 9, "mm_vision_tower_aux_token_len_list": [36, 36],
    "mm_vision_tower_aux_list": ["siglip/siglip-so400m-patch14-384",
                                 "facebook/dinov2-giant-res378"],
    "context_token_num": 4, "text_input": True, "audio_input": True, "query_type": "Avg_pool",
    "add_static": True, "tokenizer_model_max_length": 8192,
}
# Adapted tensors: LLM projections of both kinds (heads_in / heads_out / plain), Q-Former
# self- and cross-attention, the compressor projections, and the unused MLM decoder (ignored).
LORA_TARGETS = ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.o_proj.weight",
                "model.layers.0.mlp.down_proj.weight",
                "model.Qformer.bert.encoder.layer.0.attention.self.query.weight",
                "model.Qformer.bert.encoder.layer.0.crossattention.self.key.weight",
                "model.vision_proj.weight", "model.query_proj.weight",
                "model.Qformer.cls.predictions.decoder.weight")
RANK, ALPHA = 2, 3.0
NON_LORA = {"base_model.model.model.frame_seg": (48,),
            "base_model.model.model.Qformer.bert.encoder.layer.0.attention.self.query."
            "base_layer.weight": (32, 32)}


def _rand(rng, shape):
    return (0.5 * rng.standard_normal(shape)).astype(np.float32)


def _tree_from_rules(rules, num_layers, rng):
    return nest_tree({r.path: _rand(rng, ((num_layers,) if r.layered else ()) + tuple(r.shape))
                      for r in rules})


def _decoder_run(m, tokens, positions):
    hidden, _ = m(m.embed(tokens), positions)
    return m.logits(hidden)


def _llm_params(rng, cfg=LLM):
    tokens = jnp.zeros((1, 4), jnp.int32)
    shapes = jax.eval_shape(lambda: decoder.Decoder(cfg).init(
        jax.random.key(0), tokens, tokens, method=_decoder_run))
    shapes = nn.meta.unbox(shapes)["params"]
    return jax.tree.map(lambda s: _rand(rng, s.shape), shapes)


def _comp_params(rng):
    return nest_tree({tuple(p.split("/")): _rand(rng, s.shape)
                      for p, s in qformer_keys.tdc_param_shapes(COMP).items()})


def _extras(rng):
    """Tensors of TDC's state dict that no part converts (kept verbatim)."""
    q = COMP.qformer
    return {"model.Qformer.bert.embeddings.position_ids":
            np.arange(q.max_positions, dtype=np.int64)[None],
            "model.Qformer.cls.predictions.bias": _rand(rng, (q.vocab_size,)),
            "model.Qformer.cls.predictions.transform.dense.weight": _rand(rng, (32, 32)),
            "model.Qformer.cls.predictions.transform.dense.bias": _rand(rng, (32,)),
            "model.Qformer.cls.predictions.transform.LayerNorm.weight": _rand(rng, (32,)),
            "model.Qformer.cls.predictions.transform.LayerNorm.bias": _rand(rng, (32,)),
            "model.Qformer.cls.predictions.decoder.weight": _rand(rng, (q.vocab_size, 32)),
            "model.Qformer.cls.predictions.decoder.bias": _rand(rng, (q.vocab_size,)),
            "model.query_tokens": _rand(rng, (1, COMP.num_tokens, 32))}


def write_release(folder, state, hf_config=HF_CONFIG):
    """Writes `state` as a two-shard safetensors release with index and config.json."""
    os.makedirs(folder, exist_ok=True)
    keys = list(state)
    half = len(keys) // 2
    weight_map = {}
    for i, part in enumerate((keys[:half], keys[half:])):
        name = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: state[k] for k in part}, os.path.join(folder, name),
                  metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf_config, f)


def _write_towers(root, parts, rng):
    sig = os.path.join(root, "siglip-so400m")
    os.makedirs(sig)
    state = vit_keys.params_to_hf(parts["siglip"], SIGLIP)
    state.update({  # a full SiglipModel: post-LN, pooling head, text model, logit scale / bias
        "vision_model.post_layernorm.weight": _rand(rng, (32,)),
        "vision_model.post_layernorm.bias": _rand(rng, (32,)),
        "vision_model.head.probe": _rand(rng, (1, 1, 32)),
        "text_model.embeddings.token_embedding.weight": _rand(rng, (10, 32)),
        "logit_scale": _rand(rng, (1,)), "logit_bias": _rand(rng, (1,))})
    save_file(state, os.path.join(sig, "model.safetensors"), metadata={"format": "pt"})
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "image_size": 32, "patch_size": 8}
    with open(os.path.join(sig, "config.json"), "w") as f:
        json.dump({"model_type": "siglip", "vision_config": vision, "text_config": {}}, f)
    dino = os.path.join(root, "dinov2-giant")
    os.makedirs(dino)
    save_file(dinov2_keys.params_to_hf(parts["dinov2"], DINO),
              os.path.join(dino, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(dino, "config.json"), "w") as f:
        json.dump({"model_type": "dinov2", "hidden_size": 32, "num_hidden_layers": 2,
                   "num_attention_heads": 4, "mlp_ratio": 4, "use_swiglu_ffn": True,
                   "image_size": 32, "patch_size": 8}, f)
    beats = os.path.join(root, "BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt")
    torch.save({"cfg": BEATS_CFG, "model": {k: torch.from_numpy(v.copy()) for k, v in
                                            beats_keys.params_to_beats(parts["beats"],
                                                                       BEATS).items()}}, beats)
    return {"siglip": sig, "dinov2": dino, "beats": beats}


def _write_lora(folder, rng):
    os.makedirs(folder)
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": RANK,
                   "lora_alpha": ALPHA, "lora_dropout": 0.05, "bias": "none",
                   "target_modules": ["q_proj", "o_proj", "down_proj", "query", "key",
                                      "vision_proj", "query_proj", "decoder"]}, f)
    return folder


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """The tiny release: folders, the source part trees and TDC state, the LoRA tensors."""
    rng = np.random.default_rng(0)
    root = str(tmp_path_factory.mktemp("tdc"))
    parts = {"llm": _llm_params(rng), "connector": _tree_from_rules(sva_keys.rules(SVA), 0, rng),
             "compressor": _comp_params(rng),
             "siglip": _tree_from_rules(vit_keys.rules(SIGLIP), SIGLIP.num_layers_run, rng),
             "dinov2": _tree_from_rules(dinov2_keys.rules(DINO), DINO.num_layers_run, rng),
             "beats": _tree_from_rules(beats_keys.rules(BEATS), BEATS.depth, rng)}
    state = {**decoder_keys.params_to_hf(parts["llm"], LLM), **sva_keys.params_to_hf(
        parts["connector"], SVA), **qformer_keys.params_to_tdc(parts["compressor"], COMP),
        **_extras(rng)}
    tdc_dir = os.path.join(root, "TDC-Qwen2-7B")
    write_release(tdc_dir, state)
    towers = _write_towers(root, parts, rng)
    # LoRA folder.
    lora_dir = _write_lora(os.path.join(root, "lora"), rng)
    adapters, pairs = {}, {}
    for key in LORA_TARGETS:
        out, inp = state[key].shape
        a, b = _rand(rng, (RANK, inp)), _rand(rng, (out, RANK))
        stem = "base_model.model." + key[:-len(".weight")]
        adapters[stem + ".lora_A.weight"], adapters[stem + ".lora_B.weight"] = a, b
        pairs[key] = (a, b)
    save_file(adapters, os.path.join(lora_dir, "adapter_model.safetensors"),
              metadata={"format": "pt"})
    non_lora = {k: _rand(rng, s) for k, s in NON_LORA.items()}
    torch.save({k: torch.from_numpy(v) for k, v in non_lora.items()},
               os.path.join(lora_dir, "non_lora_trainables.bin"))
    return {"root": root, "tdc": tdc_dir, "towers": towers, "parts": parts, "state": state,
            "lora": lora_dir, "pairs": pairs,
            "non_lora": {k[len("base_model.model."):].replace(".base_layer", ""): v
                         for k, v in non_lora.items()}}


def _import(rel, tdc_dir=None, **kw):
    kw = {**rel["towers"], **kw}
    return tdc_keys.import_tdc(tdc_dir or rel["tdc"], overrides=OVERRIDES, **kw)


def _assert_trees_equal(got, want, what=""):
    fg, fw = flatten_tree(got), flatten_tree(want)
    assert sorted(fg) == sorted(fw), (what, sorted(set(fg) ^ set(fw))[:8])
    for path, w in fw.items():
        g = np.asarray(fg[path])
        assert g.dtype == w.dtype and g.shape == w.shape, (what, path, g.dtype, g.shape)
        assert g.tobytes() == np.asarray(w).tobytes(), (what, path)


def _read_state(folder):
    state = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors") and name.startswith("model"):
            state.update(load_file(os.path.join(folder, name)))
    return state


def test_import_gives_the_source_params_and_configs(release):
    params, configs = _import(release)
    for part in tdc_keys.PARTS:
        _assert_trees_equal(params[part], release["parts"][part], part)
    assert configs["llm"] == LLM
    assert configs["connector"] == SVA
    assert configs["compressor"] == COMP
    assert configs["siglip"] == SIGLIP
    assert configs["dinov2"] == dataclass_replace(DINO)
    assert configs["beats"] == BEATS
    assert configs["lora"] is None
    assert sorted(configs["ignored"]) == sorted(_extras(np.random.default_rng(0)))
    assert configs["layout"]["llm_family"] == "qwen2"


def dataclass_replace(cfg, **kw):
    import dataclasses

    return dataclasses.replace(cfg, **kw)


def test_export_import_roundtrip_bitwise(release, tmp_path):
    params, configs = _import(release)
    out = str(tmp_path / "export")
    tdc_keys.export_tdc(params, configs, out)
    exported = _read_state(out)
    assert sorted(exported) == sorted(release["state"])
    for key, want in release["state"].items():
        assert exported[key].dtype == want.dtype and exported[key].tobytes() == want.tobytes(), key
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f) == HF_CONFIG
    again, configs2 = tdc_keys.import_tdc(out, overrides=OVERRIDES)  # towers from out/<tower>
    for part in tdc_keys.PARTS:
        _assert_trees_equal(again[part], params[part], part)
        assert configs2[part] == configs[part]


def _broken(release, tmp_path, how):
    state = dict(release["state"])
    if how == "missing":
        key = "model.layers.1.mlp.up_proj.weight"
        del state[key]
    elif how == "extra":
        key = "model.mm_projector_aux_0.4.weight"
        state[key] = np.ones((3,), np.float32)
    elif how == "shape":
        key = "model.Qformer.bert.encoder.layer.2.attention.self.value.weight"
        state[key] = np.ones((32, 31), np.float32)
    elif how == "unclaimed":
        key = "model.audio_encoder.beats.patch_embedding.weight"
        state[key] = np.ones((2,), np.float32)
    folder = str(tmp_path / how)
    write_release(folder, state)
    return folder, key


@pytest.mark.parametrize("how", ["missing", "extra", "shape", "unclaimed"])
def test_bad_checkpoint_names_the_key(release, tmp_path, how):
    folder, key = _broken(release, tmp_path, how)
    with pytest.raises(ValueError, match=re.escape(key)) as err:
        tdc_keys.import_tdc(folder, overrides=OVERRIDES)
    if how != "missing":
        assert ".safetensors" in str(err.value)  # the file holding the key


def test_ignore_prefix_keeps_the_tensor(release, tmp_path):
    folder, key = _broken(release, tmp_path, "unclaimed")
    _, configs = tdc_keys.import_tdc(folder, overrides=OVERRIDES,
                                     ignore=("model.audio_encoder.",))
    assert key in configs["ignored"]


def _manual_merge(release):
    """The base state with the non-LoRA trainables, then W + alpha/r B @ A per adapter."""
    state = dict(release["state"])
    state.update(release["non_lora"])
    for key, (a, b) in release["pairs"].items():
        state[key] = (state[key] + np.float32(ALPHA / RANK) * (b @ a)).astype(np.float32)
    return state


def test_lora_merge_equals_manual_merge(release, tmp_path):
    params, configs = _import(release, lora=release["lora"], merge_lora=True)
    assert configs["lora"] is None
    state, adapters = tdc_keys.tdc_state(params, configs)
    assert not adapters
    want = _manual_merge(release)
    assert sorted(state) == sorted(want)
    for key in want:
        np.testing.assert_allclose(state[key], want[key], rtol=0, atol=1e-6, err_msg=key)
    for key in release["non_lora"]:
        assert not np.array_equal(want[key], release["state"][key])


def test_lora_kept_runs_like_merged(release):
    merged, _ = _import(release, lora=release["lora"], merge_lora=True)
    kept, configs = _import(release, lora=release["lora"], merge_lora=False)
    cfg = configs["lora"]
    assert cfg.rank == RANK and cfg.alpha == ALPHA and cfg.dropout == 0.05
    adapted = {"/".join(p[:-1]) for p in flatten_tree(kept) if p[-1] == "lora_a"}
    assert adapted == {"llm/layers_0/self_attn/q_proj", "llm/layers_1/self_attn/o_proj",
                       "llm/layers_0/mlp/down_proj", "compressor/qformer/layer_0/self_attn/query",
                       "compressor/qformer/layer_0/cross_attn/key", "compressor/vision_proj",
                       "compressor/query_proj"}
    assert all(cfg.targets_path(p.split("/")) for p in adapted)
    assert not cfg.targets_path(["llm", "layers_1", "self_attn", "q_proj"])
    assert cfg.targets_path(["llm", "layers", "self_attn", "q_proj"])  # scanned path
    # lora.merge_lora of the kept adapters gives the merged import.
    _assert_close(lora.merge_lora(kept, cfg), merged)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, LLM.vocab_size, (2, 7)))
    with lora.lora_context(cfg):
        got = ScopedLM(LLM).apply({"params": {"llm": kept["llm"]}}, tokens)
    want = ScopedLM(LLM).apply({"params": {"llm": merged["llm"]}}, tokens)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5)
    assert float(jnp.max(jnp.abs(want - ScopedLM(LLM).apply(
        {"params": {"llm": release["parts"]["llm"]}}, tokens)))) > 1e-2  # adapters matter


def _assert_close(got, want):
    fg, fw = flatten_tree(got), flatten_tree(want)
    assert sorted(fg) == sorted(fw)
    for path in fw:
        np.testing.assert_allclose(np.asarray(fg[path]), np.asarray(fw[path]), rtol=0,
                                   atol=1e-5, err_msg="/".join(path))


def test_lora_kept_roundtrip(release, tmp_path):
    kept, configs = _import(release, lora=release["lora"], merge_lora=False)
    out = str(tmp_path / "export")
    written = tdc_keys.export_tdc(kept, configs, out)
    assert "adapter_model.safetensors" in written
    again, configs2 = tdc_keys.import_tdc(out, overrides=OVERRIDES, merge_lora=False)
    for part in tdc_keys.PARTS:
        _assert_trees_equal(again[part], kept[part], part)
    assert configs2["lora"] == configs["lora"]
    # The ignored MLM decoder got its adapter merged; everything else is the base (+ non-LoRA).
    exported = _read_state(out)
    key = "model.Qformer.cls.predictions.decoder.weight"
    np.testing.assert_allclose(exported[key], _manual_merge(release)[key], rtol=0, atol=1e-6)


@pytest.mark.parametrize("target", ["model.layers.7.self_attn.q_proj.weight",
                                    "model.norm.weight"])
def test_lora_on_unknown_or_non_linear_key_is_refused(release, tmp_path, target):
    folder = str(tmp_path / "lora")
    shutil.copytree(release["lora"], folder)
    size = release["state"].get(target, np.zeros((48, 48))).shape
    a = np.ones((RANK, size[-1]), np.float32)
    b = np.ones((size[0] if len(size) > 1 else 48, RANK), np.float32)
    stem = "base_model.model." + target[:-len(".weight")]
    extra = load_file(os.path.join(folder, "adapter_model.safetensors"))
    extra.update({stem + ".lora_A.weight": a, stem + ".lora_B.weight": b})
    save_file(extra, os.path.join(folder, "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=re.escape(target)):
        _import(release, lora=folder, merge_lora=True)


def test_cli_writes_orbax(release, tmp_path):
    out = str(tmp_path / "orbax")
    t = release["towers"]
    assert tdc_keys.main([f"--tdc={release['tdc']}", f"--siglip={t['siglip']}",
                          f"--dinov2={t['dinov2']}", f"--beats={t['beats']}",
                          f"--lora={release['lora']}", "--qformer-heads=4",
                          f"--out={out}"]) == 0
    params, configs = tdc_keys.load_orbax(out)
    kept, want = _import(release, lora=release["lora"], merge_lora=False)
    for part in tdc_keys.PARTS:
        _assert_trees_equal(params[part], kept[part], part)
        assert configs[part] == want[part]
    assert configs["lora"] == want["lora"]
    assert sorted(configs["ignored"]) == sorted(want["ignored"])


def test_llama_release_in_bf16_torch_bin(release, tmp_path):
    """TDC-Llama3_2-3B layout: tied embeddings with `lm_head.weight` stored (torch
    `state_dict`, as merge_lora_weights.py saves), bf16 `pytorch_model.bin`, no towers."""
    cfg = decoder.make_config("tiny", hidden_size=48, head_dim=12, qkv_bias=False,
                              tie_embeddings=True, rope_theta=5e5, rms_eps=1e-5,
                              rope_scaling=(32.0, 1.0, 4.0, 8192))
    llm = _llm_params(np.random.default_rng(2), cfg)
    state = {**decoder_keys.params_to_hf(llm, cfg, include_tied_lm_head=True),
             **{k: v for k, v in release["state"].items() if tdc_keys.route(k) != "llm"}}
    hf = {k: v for k, v in HF_CONFIG.items() if k != "use_sliding_window"}
    hf.update(model_type="cambrian_llama", architectures=["CambrianLlamaForCausalLM"],
              tie_word_embeddings=True, rope_theta=5e5, rms_norm_eps=1e-5,
              rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    folder = tmp_path / "TDC-Llama3_2-3B"
    folder.mkdir()
    torch_state = {k: torch.from_numpy(v).to(torch.bfloat16) if v.dtype == np.float32
                   else torch.from_numpy(v) for k, v in state.items()}
    torch.save(torch_state, folder / "pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps(hf))
    params, configs = tdc_keys.import_tdc(str(folder), overrides=OVERRIDES)
    assert configs["layout"]["llm_family"] == "llama"
    assert configs["llm"] == dataclass_replace(cfg, param_dtype="bfloat16")
    assert configs["siglip"] is None and "siglip" not in params
    assert {str(v.dtype) for p in ("llm", "connector", "compressor")
            for v in flatten_tree(params[p]).values()} == {"bfloat16"}
    out = str(tmp_path / "export")
    tdc_keys.export_tdc(params, configs, out)
    exported = open_state(out)
    assert sorted(exported) == sorted(torch_state)
    for key, t in torch_state.items():
        want = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
        assert exported[key].tobytes() == want.numpy().tobytes(), key


def test_export_without_originals_builds_configs(release, tmp_path):
    """Params not read from files (no layout): the configs written describe them."""
    params, configs = _import(release)
    configs = {**configs, "layout": {}}
    out = str(tmp_path / "export")
    tdc_keys.export_tdc(params, configs, out)
    again, configs2 = tdc_keys.import_tdc(out, overrides=OVERRIDES)
    for part in tdc_keys.PARTS:
        _assert_trees_equal(again[part], params[part], part)
        assert configs2[part] == configs[part], part
