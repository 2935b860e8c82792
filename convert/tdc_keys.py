"""TDC released checkpoints (TDC-Qwen2-7B, TDC-Llama3_2-3B) <-> the composite TDC params tree.

A TDC release (Hoar012/TDC-Video, `tdc/builder.py`) is a `CambrianQwenForCausalLM` /
`CambrianLlamaForCausalLM` folder: `config.json` (a Qwen2 / Llama config plus the cambrian
fields) and `model.safetensors` / `model-0000i-of-0000n.safetensors` + index, or the
`pytorch_model*.bin` that `utils/merge_lora_weights.py` writes. The vision towers and BEATs are
not in it (TDC keeps them in a plain list and reloads them): they come from their own
checkpoints, SigLIP and DINOv2 as HF folders, BEATs as the original `.pt` (`{"cfg", "model"}`).

Composite parameter tree (the names the TDC model uses):

  {"llm": Decoder params (unscanned `layers_{i}`, or stacked `layers` when the llm config has
          scan_layers), "connector": SVAConnector, "compressor": TDCCompressor,
   "siglip": ViT, "dinov2": Dinov2, "beats": BEATs}       (a tower is absent when not given)

Every key of the TDC checkpoint is claimed by exactly one part:

  llm         model.layers.*, model.embed_tokens.weight, model.norm.weight, lm_head.weight
              (`convert/decoder_keys.py`)
  connector   model.mm_projector.*, model.mm_projector_aux_*, model.vision_sampler_*,
              model.vision_query, model.image_newline (`sva_keys.sva_owns`)
  compressor  model.Qformer.*, model.query_proj.*, model.vision_proj.*, model.audio_proj.*,
              model.frame_seg, model.query_tokens (`qformer_keys.tdc_owns`)

Keys the tables declare ignored (the unused BERT MLM head `model.Qformer.cls.*`, the
`position_ids` buffer, `model.query_tokens` of the Avg_pool compressor, RoPE `inv_freq`
buffers) and keys under the caller's `ignore` prefixes are not converted but kept verbatim in
`configs["ignored"]`, so that `export_tdc` writes the original key set back. Any other key
raises ValueError naming the key and its file, as do missing / duplicate keys and wrong shapes.

Configs (`configs` dict): "llm" from the Qwen2 / Llama fields (`decoder_keys.config_from_hf`),
"connector" from the cambrian fields with the tower widths read off
`model.mm_projector_aux_{i}.0.weight` (`sva_keys.config_from_hf`), "compressor" from
`context_token_num`, `text_input`, `query_type` and the Q-Former tensor shapes (width, depth,
FFN, vocabulary, positions, cross-attention frequency, audio width). The Q-Former head count is
not in the checkpoint (TDC builds it from bert-base-uncased's config: 64-d heads); it is taken as
width // 64 unless given as `overrides={"qformer": {"num_heads": n}}`. Towers: from their
config.json (SigLIP with `post_ln=False`: TDC reads `hidden_states[-1]`) or the BEATs `cfg`.
Besides the part configs, `configs` holds "lora" (a `LoRAConfig` when adapters are kept, else
None), "ignored" ({key: array}) and "layout" (JSON-able: the LLM family, the original
config.json, whether a tied `lm_head.weight` was stored, the towers' original configs, the PEFT
adapter config).

LoRA (stage 3; LLaVA / PEFT layout, `tdc/builder.py` `load_pretrained_model`): a folder with
`adapter_config.json` (`r`, `lora_alpha`, `target_modules`, optional `use_rslora`),
`adapter_model.safetensors` / `.bin` (`base_model.model.<key stem>.lora_A.weight` [r, in] and
`lora_B.weight` [out, r]) and optionally `non_lora_trainables.bin` (fully trained tensors,
`base_model.model.<key>`, PEFT's `.base_layer` infix allowed) that replace the base tensors
before the adapters apply, as the original loads them. With `merge_lora=True` every adapter is
folded in, `W += (alpha / r) * B @ A` (float32, cast back to W's dtype; PEFT
`merge_and_unload`); otherwise the adapters of converted weights become our `lora_a`
(in_shape + (r,)) / `lora_b` ((r,) + out_shape) beside the kernel
(`longvid_jax/models/lora.py`), and `configs["lora"]` targets exactly the adapted modules.
Adapters on declared-ignored tensors (PEFT's `decoder` target hits the unused
`Qformer.cls.predictions.decoder`) are merged into the kept copy in both modes. An adapter on a
key the checkpoint lacks, or on a tensor that is not a linear weight, raises ValueError naming it.

`export_tdc` writes the inverse: `model.safetensors` + `config.json` (+ `adapter_config.json`
and `adapter_model.safetensors` for kept adapters) and `siglip/`, `dinov2/`, `beats/beats.pt`;
`import_tdc(out, siglip=out/siglip, ...)` (the default when those folders exist) gives the same
params bit for bit.

Command line (orbax output, laid out as `convert.import_hf` writes it):

    python -m convert.tdc_keys --tdc=DIR --siglip=DIR --dinov2=DIR [--beats=FILE.pt]
        [--lora=DIR [--merge-lora]] [--qformer-heads=N] [--dtype=keep|bfloat16|float32]
        --out=ORBAX_DIR [--overwrite]
"""

import argparse
import dataclasses
import json
import logging
import math
import os
import re
import shutil
import sys
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from convert import beats_keys, decoder_keys, dinov2_keys, qformer_keys, sva_keys, vit_keys
from convert import checkpoint_io as cio
from longvid_jax.models import decoder as decoder_lib
from longvid_jax.models import lora as lora_lib
from longvid_jax.models.dinov2 import dinov2_mlp_dim
from longvid_jax.models.qformer import TDCCompressorConfig, make_tdc_config

log = logging.getLogger(__name__)

PARTS = ("llm", "connector", "compressor", "siglip", "dinov2", "beats")
TOWERS = ("siglip", "dinov2", "beats")
LLM_FAMILIES = ("qwen2", "llama")
_MODEL_TYPES = {"cambrian_qwen": "qwen2", "cambrian_llama": "llama", "qwen2": "qwen2",
                "llama": "llama"}
_LLM_KEY = re.compile(r"model\.layers\.\d+\..+|model\.embed_tokens\.weight|model\.norm\.weight"
                      r"|lm_head\.weight")
_INV_FREQ = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
_LLM_LINEAR = re.compile(r"model\.layers\.(\d+)\.(self_attn|mlp)\."
                         r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.weight")
# Number of leading fan-in axes of our kernel per key-table transform (LoRA layout).
_FAN_IN = {"linear": 1, "heads_in": 1, "heads_out": 2}
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
NON_LORA = "non_lora_trainables.bin"
TDC_META = "longvid_tdc.json"
FORMAT_VERSION = 1


# ----------------------------------------------------------------------------------------------
# Routing.


def route(key: str) -> str | None:
    """The part that claims a TDC checkpoint key, or None for a declared-ignored buffer.

    Raises:
      ValueError: a key no part claims, or one claimed by several parts.
    """
    if _INV_FREQ.fullmatch(key):
        return None
    owners = [name for name, owns in (("llm", _LLM_KEY.fullmatch),
                                      ("connector", sva_keys.sva_owns),
                                      ("compressor", qformer_keys.tdc_owns)) if owns(key)]
    if len(owners) > 1:
        raise ValueError(f"key {key!r} is claimed by several parts {owners}")
    if not owners:
        raise ValueError(f"unclaimed key {key!r}: no TDC part (llm, connector, compressor) "
                         "owns it; pass its prefix in `ignore` to keep it unconverted")
    return owners[0]




def _compressor_rule(key: str, cfg: TDCCompressorConfig) -> qformer_keys.Rule | None:
    for rule in qformer_keys.tdc_rules(cfg):
        if qformer_keys.compile_template(rule.source).fullmatch(key):
            return rule
    return None


def _compressor_ignored(key: str, cfg: TDCCompressorConfig) -> bool:
    rule = _compressor_rule(key, cfg)
    return rule is not None and rule.target is None


# ----------------------------------------------------------------------------------------------
# Linear weights: key <-> (part, our kernel path, fan-in axes), for LoRA.


def _linear_target(key: str, part: str, configs: Mapping[str, Any]
                   ) -> tuple[tuple[str, ...], int] | None:
    """(our kernel path inside the part, number of fan-in axes) of a linear weight key."""
    if part == "llm":
        m = _LLM_LINEAR.fullmatch(key)
        if m:
            return (f"layers_{m.group(1)}", m.group(2), m.group(3), "kernel"), (
                2 if m.group(3) == "o_proj" else 1)
        if key == "lm_head.weight" and not configs["llm"].tie_embeddings:
            return ("lm_head", "kernel"), 1
        return None
    if part == "connector":
        for rule in sva_keys.rules(configs["connector"]):
            if sva_keys.DEFAULT_PREFIX + rule.hf == key and rule.transform in _FAN_IN:
                return rule.path, _FAN_IN[rule.transform]
        return None
    rule = _compressor_rule(key, configs["compressor"])
    if rule is None or rule.target is None or rule.transform not in _FAN_IN:
        return None
    groups = qformer_keys.compile_template(rule.source).fullmatch(key).groupdict()
    return tuple(rule.target.format(**groups).split("/")), _FAN_IN[rule.transform]


def _linear_keys(part: str, configs: Mapping[str, Any]) -> dict[tuple[str, ...], tuple[str, int]]:
    """{our kernel path: (TDC key, fan-in axes)} of every linear weight of a part."""
    out: dict[tuple[str, ...], tuple[str, int]] = {}
    if part == "llm":
        cfg = configs["llm"]
        for key in decoder_keys.hf_keys(cfg):
            found = _linear_target(key, "llm", configs)
            if found:
                out[found[0]] = (key, found[1])
    elif part == "connector":
        for rule in sva_keys.rules(configs["connector"]):
            if rule.transform in _FAN_IN:
                out[rule.path] = (sva_keys.DEFAULT_PREFIX + rule.hf, _FAN_IN[rule.transform])
    else:
        cfg = configs["compressor"]
        shapes = qformer_keys.tdc_param_shapes(cfg)
        for rule in qformer_keys.tdc_rules(cfg):
            if rule.target is None or rule.transform not in _FAN_IN:
                continue
            rx = qformer_keys.compile_template(rule.target)
            for path in shapes:
                m = rx.fullmatch(path)
                if m:
                    out[tuple(path.split("/"))] = (rule.source.format(**m.groupdict()),
                                                    _FAN_IN[rule.transform])
    return out


# ----------------------------------------------------------------------------------------------
# LoRA files.


@dataclasses.dataclass
class _Adapters:
    """PEFT adapters read from a folder: {target weight key: (A [r, in], B [out, r])}."""

    folder: str
    hf_config: dict[str, Any]
    rank: int
    scale: float
    pairs: dict[str, tuple[np.ndarray, np.ndarray]]
    files: dict[str, str]  # target key -> adapter file
    non_lora: dict[str, np.ndarray]
    non_lora_file: str | None


_ADAPTER_KEY = re.compile(r"(?:base_model\.model\.)?(?P<stem>.+)\.lora_(?P<ab>[AB])"
                          r"(?:\.(?P<name>[A-Za-z0-9_]+))?\.weight")


def read_adapters(folder: str) -> _Adapters:
    """Reads a LLaVA / PEFT LoRA folder (see the module docstring).

    Raises:
      FileNotFoundError: no adapter_config.json or adapter weights.
      ValueError: unsupported adapter options (`rank_pattern`, `alpha_pattern`, DoRA,
        `lora_bias`), a key that is not a lora_A / lora_B weight, an A without B, shapes that
        disagree with `r`; each names the key and file.
    """
    path = os.path.join(folder, ADAPTER_CONFIG)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder}: no {ADAPTER_CONFIG}")
    with open(path) as f:
        hf = json.load(f)
    if hf.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: peft_type {hf.get('peft_type')!r} is not LORA")
    for opt in ("rank_pattern", "alpha_pattern"):
        if hf.get(opt):
            raise ValueError(f"{path}: {opt} (per-module ranks / alphas) is not supported")
    if hf.get("use_dora") or hf.get("lora_bias"):
        raise ValueError(f"{path}: DoRA / lora_bias adapters are not supported")
    rank, alpha = int(hf["r"]), float(hf["lora_alpha"])
    scale = alpha / math.sqrt(rank) if hf.get("use_rslora") else alpha / rank
    weights = [os.path.join(folder, n) for n in ADAPTER_FILES
               if os.path.isfile(os.path.join(folder, n))]
    if not weights:
        raise FileNotFoundError(f"{folder}: none of {ADAPTER_FILES}")
    if len(weights) > 1:
        raise ValueError(f"{folder}: both {ADAPTER_FILES}; keep one")
    wfile = weights[0]
    halves: dict[str, dict[str, np.ndarray]] = {}
    for key, value in cio.StateReader([wfile]).items():
        m = _ADAPTER_KEY.fullmatch(key)
        if m is None or m.group("name") not in (None, "default"):
            raise ValueError(f"{wfile}: key {key!r} is not a LoRA lora_A / lora_B weight "
                             "(embedding adapters, biases and modules_to_save are not supported)")
        target = m.group("stem") + ".weight"
        ab = halves.setdefault(target, {})
        if m.group("ab") in ab:
            raise ValueError(f"{wfile}: duplicate key {key!r}")
        if value.ndim != 2:
            raise ValueError(f"{wfile}: key {key!r} has shape {value.shape}, not a matrix")
        ab[m.group("ab")] = value
    pairs = {}
    for target, ab in halves.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{wfile}: adapter of {target!r} has only lora_{''.join(ab)}")
        a, b = ab["A"], ab["B"]
        if a.shape[0] != rank or b.shape[1] != rank:
            raise ValueError(f"{wfile}: adapter of {target!r}: lora_A {a.shape}, lora_B "
                             f"{b.shape} do not have rank r={rank}")
        pairs[target] = (a, b)
    non_lora, non_lora_file = {}, None
    nl = os.path.join(folder, NON_LORA)
    if os.path.isfile(nl):
        non_lora_file = nl
        raw = dict(cio.StateReader([nl]).items())
        # tdc/builder.py: strip "base_model.", then "model." when keys start "model.model.".
        raw = {(k.removeprefix("base_model.")): v for k, v in raw.items()}
        if any(k.startswith("model.model.") for k in raw):
            raw = {(k.removeprefix("model.")): v for k, v in raw.items()}
        for k, v in raw.items():
            name = k.replace(".base_layer.", ".")  # PEFT >= 0.7 wrapping
            if "lora_" in name:
                raise ValueError(f"{nl}: key {k!r} is a LoRA weight")
            if name in non_lora:
                raise ValueError(f"{nl}: duplicate key {k!r} (as {name!r})")
            non_lora[name] = v
    return _Adapters(folder, hf, rank, scale, pairs, {t: wfile for t in pairs}, non_lora,
                     non_lora_file)


def _merge(w: np.ndarray, a: np.ndarray, b: np.ndarray, scale: float) -> np.ndarray:
    """W + scale * B @ A in float32, cast back to W's dtype (torch layout [out, in])."""
    delta = b.astype(np.float32) @ a.astype(np.float32)
    return (w.astype(np.float32) + np.float32(scale) * delta).astype(w.dtype)


def _lora_targets(paths: Iterable[tuple[str, ...]]) -> str:
    """A regex that fully matches exactly the adapted composite module paths (LLM layer
    indices optional, so that the scanned `llm/layers/...` paths match too)."""
    alts = []
    for path in sorted(paths):
        text = re.escape("/".join(path))
        if path[0] == "llm" and len(path) > 1 and path[1].startswith("layers_"):
            text = text.replace(re.escape(path[1]), f"layers(?:_{path[1][7:]})?", 1)
        alts.append(text)
    return "|".join(alts)


# ----------------------------------------------------------------------------------------------
# Configs.


def llm_family(hf_config: Mapping[str, Any], llm: str = "auto") -> str:
    """"qwen2" or "llama" from `llm` or the config's model_type / architectures.

    Raises:
      ValueError: an unknown family or model type.
    """
    if llm != "auto":
        if llm not in LLM_FAMILIES:
            raise ValueError(f"llm must be one of {LLM_FAMILIES} or 'auto', got {llm!r}")
        return llm
    mt = hf_config.get("model_type")
    if mt in _MODEL_TYPES:
        return _MODEL_TYPES[mt]
    for arch in hf_config.get("architectures") or ():
        if "Qwen" in arch:
            return "qwen2"
        if "Llama" in arch:
            return "llama"
    raise ValueError(f"cannot tell the LLM of model_type {mt!r} (expected cambrian_qwen / "
                     "cambrian_llama); pass llm='qwen2' or 'llama'")


def _compressor_config(hf: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]],
                       overrides: Mapping[str, Any], qformer_overrides: Mapping[str, Any]
                       ) -> TDCCompressorConfig:
    """The compressor config from the cambrian fields and the Q-Former tensor shapes."""
    pre = "model.Qformer.bert."
    q = f"{pre}encoder.layer.0.attention.self.query.weight"
    if q not in shapes:
        raise ValueError(f"missing key {q!r}: no Q-Former in the checkpoint")
    width = shapes[q][0]
    layers = {int(m.group(1)) for k in shapes
              if (m := re.match(re.escape(pre) + r"encoder\.layer\.(\d+)\.", k))}
    depth = max(layers) + 1
    cross = sorted({int(m.group(1)) for k in shapes
                    if (m := re.match(re.escape(pre) + r"encoder\.layer\.(\d+)\.crossattention",
                                      k))})
    freq = cross[1] - cross[0] if len(cross) > 1 else depth
    if not cross or cross != list(range(0, depth, freq)):
        raise ValueError(f"Q-Former cross-attention layers {cross} are not every n-th layer")
    word = f"{pre}embeddings.word_embeddings.weight"
    vocab = shapes[word][0] if word in shapes else 0
    pos = f"{pre}embeddings.position_embeddings.weight"
    qcfg = {"width": width, "depth": depth,
            "mlp_dim": shapes[f"{pre}encoder.layer.0.intermediate_query.dense.weight"][0],
            "cross_attention_freq": freq, "vocab_size": vocab,
            "max_positions": shapes[pos][0] if pos in shapes else 512}
    if "num_heads" not in qformer_overrides:
        if width % 64:
            raise ValueError(f"Q-Former width {width} is not a multiple of 64 (BERT head size): "
                             "pass overrides={'qformer': {'num_heads': N}}")
        qcfg["num_heads"] = width // 64
    qcfg.update(qformer_overrides)
    query_type = {"Avg_pool": "avg_pool", "learned": "learned"}.get(
        hf.get("query_type", "Avg_pool"))  # tdc/cambrian_arch.py L1633-1639
    if query_type is None:
        raise ValueError(f"query_type {hf['query_type']!r} is not 'Avg_pool' or 'learned'")
    audio = shapes.get("model.audio_proj.weight")
    kw = {"llm_width": hf["hidden_size"], "num_tokens": int(hf.get("context_token_num", 16)),
          "audio_width": audio[1] if audio else 0,
          "text_input": bool(hf.get("text_input", True)) and vocab > 0,
          "query_type": query_type, "qformer": {"variant": "tdc", **qcfg}}
    kw.update(overrides)
    return make_tdc_config(**kw)


def _float_dtype(dtypes: Iterable[str]) -> str | None:
    floats = {d for d in dtypes if cio.is_float_dtype(d)}
    return floats.pop() if len(floats) == 1 else None


def _with_dtype(over: Mapping[str, Any], dtype: str | None) -> dict[str, Any]:
    over = dict(over)
    if dtype is not None:
        over.setdefault("param_dtype", dtype)
    return over


# ----------------------------------------------------------------------------------------------
# Towers.


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    with open(path) as f:
        return json.load(f)


def _tower_prefix_and_ignore(keys: list[str], prefix: str, dropped: tuple[str, ...]
                             ) -> tuple[str, tuple[str, ...]]:
    """(key prefix of the vision model, ignore prefixes present among the keys)."""
    if not any(k.startswith(prefix) for k in keys):
        prefix = ""
    ignore = set()
    for k in keys:
        if prefix and not k.startswith(prefix):
            ignore.add(k.split(".")[0] + "." if "." in k else k)
        for d in dropped:
            if k.startswith(prefix + d):
                ignore.add(prefix + d)
    return prefix, tuple(sorted(ignore))


def import_siglip(folder: str, **overrides: Any) -> tuple[dict, Any, dict[str, Any]]:
    """SigLIP HF folder (SiglipModel or SiglipVisionModel) -> (ViT params, ViTConfig, layout).

    `post_ln=False` unless overridden (TDC reads `hidden_states[-1]`); the text model, the
    pooling head and the unused post-LN are ignored.

    Raises:
      FileNotFoundError / ValueError: see `vit_keys`.
    """
    hf = _read_json(os.path.join(folder, "config.json"))
    cfg = vit_keys.config_from_hf(hf, **{"post_ln": False, **overrides})
    reader = cio.open_state(folder)
    keys = list(reader)
    dropped = ("head.",) + (() if cfg.post_ln else ("post_layernorm.",))
    prefix, ignore = _tower_prefix_and_ignore(keys, vit_keys.DEFAULT_PREFIX, dropped)
    params = _named(lambda: vit_keys.hf_to_params(reader.items(), cfg, prefix=prefix,
                                                  ignore=ignore), reader, "siglip")
    return params, cfg, {"hf_config": hf, "prefix": prefix}


def import_dinov2(folder: str, **overrides: Any) -> tuple[dict, Any, dict[str, Any]]:
    """DINOv2 HF folder (saved layout) -> (Dinov2 params, Dinov2Config, layout).

    Raises:
      FileNotFoundError / ValueError: see `dinov2_keys`.
    """
    hf = _read_json(os.path.join(folder, "config.json"))
    cfg = dinov2_keys.config_from_hf(hf, **overrides)
    reader = cio.open_state(folder)
    keys = list(reader)
    prefix = "dinov2." if any(k.startswith("dinov2.") for k in keys) else ""
    ignore = {k.split(".")[0] + "." for k in keys if prefix and not k.startswith(prefix)}
    if not cfg.post_ln and any(k.startswith(prefix + "layernorm.") for k in keys):
        ignore.add(prefix + "layernorm.")
    ignore = tuple(sorted(ignore))
    params = _named(lambda: dinov2_keys.hf_to_params(reader.items(), cfg, prefix=prefix,
                                                     ignore=ignore), reader, "dinov2")
    return params, cfg, {"hf_config": hf, "prefix": prefix}


def import_beats(path: str, **overrides: Any) -> tuple[dict, Any, dict[str, Any]]:
    """Original BEATs `.pt` (`{"cfg": dict, "model": state_dict}`), or a folder holding one,
    -> (BEATs params, BEATsConfig, layout).

    Raises:
      FileNotFoundError / ValueError: see `beats_keys`.
    """
    import torch

    if os.path.isdir(path):
        found = sorted(n for n in os.listdir(path) if n.endswith(".pt"))
        if len(found) != 1:
            raise FileNotFoundError(f"{path}: expected one BEATs .pt file, found {found}")
        path = os.path.join(path, found[0])
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, Mapping) or "cfg" not in ckpt or "model" not in ckpt:
        raise ValueError(f"{path}: not a BEATs checkpoint (needs 'cfg' and 'model')")
    cfg = beats_keys.config_from_beats(ckpt["cfg"], **overrides)
    state = {k: cio.torch_to_numpy(v) for k, v in ckpt["model"].items()}
    parametrized = any("parametrizations" in k for k in state)
    try:
        params = beats_keys.beats_to_params(state, cfg)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
    return params, cfg, {"cfg": dict(ckpt["cfg"]), "parametrized": parametrized}


def key_files(reader: cio.StateReader) -> dict[str, str]:
    """{key: the file holding it} of a reader (headers only)."""
    return {k: f for f in reader.files for k in cio.StateReader([f])}


def _named(fn, reader: cio.StateReader, what: str, where: Mapping[str, str] | None = None):
    """Runs a key-table conversion; a ValueError gets the file of the key it names."""
    try:
        return fn()
    except ValueError as e:
        where = key_files(reader) if where is None else where
        named = [k for k in re.findall(r"'([^']+)'", str(e)) if k in where]
        files = (f"{named[0]!r} is in {where[named[0]]}" if named
                 else "files: " + ", ".join(reader.files))
        raise ValueError(f"{what}: {e} [{files}]") from e


# ----------------------------------------------------------------------------------------------
# Import.


def import_tdc(tdc_dir: str, *, siglip: str | None = None, dinov2: str | None = None,
               beats: str | None = None, llm: str = "auto", lora: str | None = None,
               merge_lora: bool = False, ignore: tuple[str, ...] = (),
               overrides: Mapping[str, Mapping[str, Any]] | None = None
               ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Reads a TDC release folder and its towers into the composite params tree.

    Args:
      tdc_dir: the release folder: config.json + safetensors (single / sharded with index) or
        pytorch_model*.bin.
      siglip, dinov2: HF folders of the towers; None uses `tdc_dir/siglip` / `tdc_dir/dinov2`
        when present (as `export_tdc` writes them), else the tower is left out.
      beats: the BEATs `.pt` (or a folder with one); None uses `tdc_dir/beats` when present.
      llm: "qwen2", "llama" or "auto" (from model_type `cambrian_qwen` / `cambrian_llama`).
      lora: a PEFT LoRA folder (adapter_config.json, adapter_model.*, optional
        non_lora_trainables.bin); None uses `tdc_dir` itself when it holds adapter_config.json.
      merge_lora: fold the adapters into the weights (True) or keep them as `lora_a` / `lora_b`
        (False, `configs["lora"]` set).
      ignore: key prefixes of the TDC checkpoint to keep unconverted (in `configs["ignored"]`),
        e.g. `("model.audio_encoder.",)`; each must match a key.
      overrides: per-part config field overrides, keys among PARTS and "qformer" (e.g.
        `{"llm": {"scan_layers": True}, "qformer": {"num_heads": 4}}`).

    Returns:
      (params, configs): the composite tree of NumPy arrays (dtypes as stored) and the configs
      dict described in the module docstring.

    Raises:
      FileNotFoundError: missing config.json / weights.
      ValueError: an unclaimed, missing or duplicate key, a wrong shape, an adapter on a key
        the checkpoint lacks or on a non-linear tensor, a tower width that disagrees with the
        connector; each names the key and its file.
    """
    overrides = {k: dict(v) for k, v in (overrides or {}).items()}
    unknown = sorted(set(overrides) - set(PARTS) - {"qformer"})
    if unknown:
        raise ValueError(f"unknown override parts {unknown}; known: {PARTS + ('qformer',)}")
    tdc_dir = os.path.abspath(tdc_dir)
    hf = _read_json(os.path.join(tdc_dir, "config.json"))
    family = llm_family(hf, llm)
    reader = cio.open_state(tdc_dir)
    where = key_files(reader)
    if lora is None and os.path.isfile(os.path.join(tdc_dir, ADAPTER_CONFIG)):
        lora = tdc_dir
    adapters = read_adapters(lora) if lora is not None else None

    # Route every key; collect the declared-ignored ones.
    ignore = tuple(ignore)
    used_ignore: set[str] = set()
    parts_of: dict[str, str | None] = {}
    for key in reader:
        hits = [p for p in ignore if key.startswith(p)]
        if hits:
            used_ignore.update(hits)
            parts_of[key] = None
            continue
        try:
            parts_of[key] = route(key)
        except ValueError as e:
            raise ValueError(f"{e} (in {where[key]})") from e
    unused = sorted(set(ignore) - used_ignore)
    if unused:
        raise ValueError(f"ignore prefixes {unused} match no key of {tdc_dir}")
    shapes = {k: reader.shape(k) for k in reader}
    dtypes = {p: _float_dtype(reader.dtype(k) for k, q in parts_of.items() if q == p)
              for p in ("llm", "connector", "compressor")}

    # Configs.
    llm_cfg = decoder_keys.config_from_hf(dict(hf, model_type=family),
                                          **_with_dtype(overrides.get("llm", {}), dtypes["llm"]))
    widths = []
    while f"model.mm_projector_aux_{len(widths)}.0.weight" in shapes:
        widths.append(shapes[f"model.mm_projector_aux_{len(widths)}.0.weight"][1])
    sva_cfg = sva_keys.config_from_hf(hf, tower_widths=tuple(widths),
                                      **_with_dtype(overrides.get("connector", {}),
                                                    dtypes["connector"]))
    comp_over = _with_dtype(overrides.get("compressor", {}), dtypes["compressor"])
    qf_over = dict(overrides.get("qformer", {}))
    if "param_dtype" in comp_over:
        qf_over.setdefault("param_dtype", comp_over["param_dtype"])
    comp_cfg = _compressor_config(hf, shapes, comp_over, qf_over)
    configs: dict[str, Any] = {"llm": llm_cfg, "connector": sva_cfg, "compressor": comp_cfg}
    for key, part in list(parts_of.items()):
        if part == "compressor" and _compressor_ignored(key, comp_cfg):
            parts_of[key] = None

    # Non-LoRA trainables override base tensors (tdc/builder.py order: base, these, LoRA).
    if adapters is not None:
        for key, value in adapters.non_lora.items():
            if key not in shapes:
                raise ValueError(f"{adapters.non_lora_file}: key {key!r} is not in the base "
                                 f"checkpoint {tdc_dir}")
            if tuple(value.shape) != tuple(shapes[key]):
                raise ValueError(f"{adapters.non_lora_file}: key {key!r} has shape "
                                 f"{tuple(value.shape)}, the base {tuple(shapes[key])}")
        for target, (a, b) in adapters.pairs.items():
            afile = adapters.files[target]
            if target not in shapes:
                raise ValueError(f"{afile}: LoRA adapter on {target!r}, which is not a key of "
                                 f"the checkpoint {tdc_dir}")
            if shapes[target] != (b.shape[0], a.shape[1]):
                raise ValueError(f"{afile}: LoRA adapter of {target!r}: B @ A is "
                                 f"{(b.shape[0], a.shape[1])}, the weight {shapes[target]}")
            part = parts_of[target]
            if part is not None and _linear_target(target, part, configs) is None:
                raise ValueError(f"{afile}: LoRA adapter on {target!r}, which is not a linear "
                                 "weight of a converted module")
    merge_into = set()
    if adapters is not None:
        merge_into = {t for t in adapters.pairs if merge_lora or parts_of[t] is None}

    # One pass over the files (each file is read once), then part by part, freeing the source
    # tensors as they are converted.
    buckets: dict[str | None, dict[str, np.ndarray]] = {
        p: {} for p in ("llm", "connector", "compressor", None)}
    for key, value in reader.items():
        if adapters is not None and key in adapters.non_lora:
            value = adapters.non_lora[key]
        if key in merge_into:
            a, b = adapters.pairs[key]
            value = _merge(value, a, b, adapters.scale)
        buckets[parts_of[key]][key] = value

    def stream(part):
        bucket = buckets[part]
        while bucket:
            key = next(iter(bucket))
            yield key, bucket.pop(key)

    params: dict[str, Any] = {}
    params["llm"] = _named(lambda: decoder_keys.hf_to_params(stream("llm"), llm_cfg), reader,
                           "llm", where)
    params["connector"] = _named(lambda: sva_keys.hf_to_params(stream("connector"), sva_cfg),
                                 reader, "connector", where)
    params["compressor"] = _named(lambda: qformer_keys.tdc_to_params(
        dict(stream("compressor")), comp_cfg), reader, "compressor", where)
    ignored = dict(stream(None))

    # Kept adapters.
    lora_cfg = None
    if adapters is not None and not merge_lora:
        adapted = []
        for target, (a, b) in adapters.pairs.items():
            part = parts_of[target]
            if part is None:
                continue
            path, fan_in = _linear_target(target, part, configs)
            node = params[part]
            for p in path[:-1]:
                node = node[p]
            shape = node[path[-1]].shape
            r = adapters.rank
            if math.prod(shape[:fan_in]) != a.shape[1]:
                raise ValueError(f"{adapters.files[target]}: adapter of {target!r} does not fit "
                                 f"kernel {'/'.join(path)} {shape}")
            node["lora_a"] = np.ascontiguousarray(a.T.reshape(shape[:fan_in] + (r,)))
            node["lora_b"] = np.ascontiguousarray(b.T.reshape((r,) + shape[fan_in:]))
            adapted.append((part,) + path[:-1])
        if adapted:
            hfc = adapters.hf_config
            alpha = adapters.scale * adapters.rank  # rsLoRA folded into alpha
            lora_cfg = lora_lib.make_config(rank=adapters.rank, alpha=alpha,
                                            dropout=float(hfc.get("lora_dropout", 0.0)),
                                            targets=_lora_targets(adapted))
    if llm_cfg.scan_layers:
        params["llm"] = decoder_lib.stack_layer_params(params["llm"], llm_cfg.num_layers)

    layout: dict[str, Any] = {
        "llm_family": family, "hf_config": hf,
        "lm_head_saved": bool(llm_cfg.tie_embeddings and "lm_head.weight" in shapes),
        "adapter_config": adapters.hf_config if adapters is not None and not merge_lora
        else None,
    }

    # Towers.
    tower_src = {"siglip": siglip, "dinov2": dinov2, "beats": beats}
    for name, fn in (("siglip", import_siglip), ("dinov2", import_dinov2),
                     ("beats", import_beats)):
        src = tower_src[name]
        if src is None and os.path.exists(os.path.join(tdc_dir, name)):
            src = os.path.join(tdc_dir, name)
        if src is None:
            configs[name] = None
            continue
        params[name], configs[name], layout[name] = fn(src, **overrides.get(name, {}))
    for i, name in enumerate(("siglip", "dinov2")):
        cfg = configs[name]
        if cfg is not None and i < len(sva_cfg.tower_widths) and (
                cfg.width != sva_cfg.tower_widths[i]):
            raise ValueError(f"{name} width {cfg.width} != the connector's tower width "
                             f"{sva_cfg.tower_widths[i]} (model.mm_projector_aux_{i}.0.weight)")
    if configs["beats"] is not None and comp_cfg.audio_width and (
            configs["beats"].width != comp_cfg.audio_width):
        raise ValueError(f"beats width {configs['beats'].width} != audio_proj input width "
                         f"{comp_cfg.audio_width} (model.audio_proj.weight)")
    configs.update(lora=lora_cfg, ignored=ignored, layout=layout)
    return params, configs


# ----------------------------------------------------------------------------------------------
# Export.


def _split_lora(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()
                ) -> tuple[dict[str, Any], dict[tuple[str, ...], tuple[Any, Any]]]:
    """(tree without lora leaves, {module path: (lora_a, lora_b)})."""
    base, adapters = {}, {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            sub, ad = _split_lora(v, prefix + (k,))
            base[k] = sub
            adapters.update(ad)
    if "lora_a" in tree or "lora_b" in tree:
        adapters[prefix] = (tree.get("lora_a"), tree.get("lora_b"))
    for k, v in tree.items():
        if not isinstance(v, Mapping) and k not in ("lora_a", "lora_b"):
            base[k] = v
    return base, adapters


def cambrian_config(configs: Mapping[str, Any]) -> dict[str, Any]:
    """A minimal cambrian config.json for params that were not imported (no original)."""
    c, s, q = configs["llm"], configs["connector"], configs["compressor"]
    family = "qwen2" if c.qkv_bias else "llama"
    hf = {"model_type": "cambrian_qwen" if family == "qwen2" else "cambrian_llama",
          "architectures": ["CambrianQwenForCausalLM" if family == "qwen2"
                            else "CambrianLlamaForCausalLM"],
          "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
          "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
          "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim,
          "intermediate_size": c.mlp_dim, "rope_theta": c.rope_theta,
          "rms_norm_eps": c.rms_eps, "tie_word_embeddings": c.tie_embeddings,
          "hidden_act": "silu", "mm_projector_type": "sva", "vision_hidden_size": s.width,
          "connector_depth": s.depth, "num_query_group": 1, "connector_only": True,
          "query_num_list": [s.query_grid ** 2], "image_token_len": s.final_grid ** 2,
          "mm_vision_tower_aux_token_len_list": [g * g for g in s.tower_grids],
          "context_token_num": q.num_tokens, "text_input": q.text_input,
          "audio_input": bool(q.audio_width),
          "query_type": "Avg_pool" if q.query_type == "avg_pool" else "learned"}
    if c.rope_scaling:
        hf["rope_scaling"] = {"rope_type": "llama3", **dict(c.rope_scaling)}
    return hf


def tdc_state(params: Mapping[str, Any], configs: Mapping[str, Any]
              ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(TDC checkpoint keys -> arrays, PEFT adapter keys -> arrays) of the composite params.

    Raises:
      ValueError: see the key tables; an adapter on a module with no linear TDC key.
    """
    layout = configs.get("layout") or {}
    state: dict[str, np.ndarray] = {}
    adapter_state: dict[str, np.ndarray] = {}
    for part in ("llm", "connector", "compressor"):
        tree = params[part]
        if part == "llm" and "layers" in tree:
            tree = decoder_lib.unstack_layer_params(tree)
        base, adapters = _split_lora(tree)
        if part == "llm":
            out = decoder_keys.params_to_hf(
                base, configs["llm"], include_tied_lm_head=layout.get("lm_head_saved", False))
        elif part == "connector":
            out = sva_keys.params_to_hf(base, configs["connector"])
        else:
            out = qformer_keys.params_to_tdc(base, configs["compressor"])
        state.update(out)
        if adapters:
            linear = _linear_keys(part, configs)
            for path, (a, b) in adapters.items():
                kpath = path + ("kernel",)
                if kpath not in linear or a is None or b is None:
                    raise ValueError(f"{part}/{'/'.join(path)}: adapter on a module with no "
                                     "linear TDC weight (or lora_a / lora_b missing)")
                key, _ = linear[kpath]
                a, b = np.asarray(a), np.asarray(b)
                r = a.shape[-1]
                stem = "base_model.model." + key[:-len(".weight")]
                adapter_state[stem + ".lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, r).T)
                adapter_state[stem + ".lora_B.weight"] = np.ascontiguousarray(b.reshape(r, -1).T)
    for key, value in (configs.get("ignored") or {}).items():
        if key in state:
            raise ValueError(f"ignored key {key!r} is also a converted key")
        state[key] = np.asarray(value)
    return state, adapter_state


def _write_safetensors(folder: str, state: Mapping[str, np.ndarray],
                       name: str = cio.SAFE_SINGLE) -> None:
    """Writes `state` as one safetensors file `folder/name` (via a scratch folder)."""
    scratch = os.path.join(folder, f".writing-{name}")
    writer = cio.SafetensorsShardWriter(scratch, max_shard_size=1 << 62)
    for key, value in state.items():
        writer.add(key, np.asarray(value))
    writer.close()
    os.replace(os.path.join(scratch, cio.SAFE_SINGLE), os.path.join(folder, name))
    os.rmdir(scratch)


def _write_json(path: str, d: Mapping[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(d, f, indent=2)
        f.write("\n")


def _siglip_config(cfg) -> dict[str, Any]:
    return {"model_type": "siglip_vision_model", "hidden_size": cfg.width,
            "intermediate_size": cfg.mlp_dim, "num_hidden_layers": cfg.depth,
            "num_attention_heads": cfg.num_heads, "num_channels": cfg.num_channels,
            "image_size": cfg.image_size, "patch_size": cfg.patch_size, "hidden_act": cfg.act,
            "layer_norm_eps": cfg.ln_eps}


def _dinov2_config(cfg) -> dict[str, Any]:
    swiglu = cfg.ffn == "swiglu"
    ratios = [r / 4 for r in range(1, 129) if dinov2_mlp_dim(cfg.width, r / 4, swiglu)
              == cfg.mlp_dim]
    if not ratios:
        raise ValueError(f"dinov2: no HF mlp_ratio gives mlp_dim {cfg.mlp_dim}")
    return {"model_type": "dinov2", "hidden_size": cfg.width, "num_hidden_layers": cfg.depth,
            "num_attention_heads": cfg.num_heads, "mlp_ratio": ratios[0],
            "use_swiglu_ffn": swiglu, "hidden_act": cfg.act, "layer_norm_eps": cfg.ln_eps,
            "image_size": cfg.image_size, "patch_size": cfg.patch_size,
            "num_channels": cfg.num_channels, "qkv_bias": cfg.qkv_bias,
            "use_mask_token": cfg.use_mask_token}


_BEATS_NAMES = {"width": "encoder_embed_dim", "depth": "encoder_layers",
                "num_heads": "encoder_attention_heads", "mlp_dim": "encoder_ffn_embed_dim",
                "patch_size": "input_patch_size", "patch_dim": "embed_dim", "act": "activation_fn",
                **{k: k for k in ("conv_bias", "layer_norm_first", "deep_norm", "conv_pos",
                                  "conv_pos_groups", "relative_position_embedding",
                                  "num_buckets", "max_distance", "gru_rel_pos")}}


def _beats_config(cfg) -> dict[str, Any]:
    out = {orig: getattr(cfg, ours) for ours, orig in _BEATS_NAMES.items()}
    out.update(finetuned_model=bool(cfg.num_classes), predictor_class=cfg.num_classes or 527)
    return out


def export_tdc(params: Mapping[str, Any], configs: Mapping[str, Any], out_dir: str, *,
               overwrite: bool = False) -> list[str]:
    """Writes the composite params back in the original layout.

    `out_dir/model.safetensors` (every TDC key, the kept ignored tensors included) and
    `config.json` (the imported original, else `cambrian_config`; likewise the towers'
    configs); with kept adapters also
    `adapter_config.json` + `adapter_model.safetensors` (PEFT names; the base holds the
    non-LoRA trainables). Towers: `siglip/` and `dinov2/` (config.json + model.safetensors,
    the vision model under `vision_model.`), `beats/beats.pt` (`{"cfg", "model"}`).

    Returns:
      The files written (relative to out_dir).

    Raises:
      FileExistsError: out_dir exists and not `overwrite`.
      ValueError: see `tdc_state` and the tower key tables.
    """
    import torch

    if os.path.exists(out_dir):
        if not overwrite:
            raise FileExistsError(f"{out_dir} exists")
        shutil.rmtree(out_dir)
    os.makedirs(out_dir)
    layout = configs.get("layout") or {}
    written = []
    state, adapter_state = tdc_state(params, configs)
    _write_safetensors(out_dir, state)
    _write_json(os.path.join(out_dir, "config.json"),
                layout.get("hf_config") or cambrian_config(configs))
    written += [cio.SAFE_SINGLE, "config.json"]
    if adapter_state:
        lcfg = configs.get("lora")
        if lcfg is None:
            raise ValueError("params hold LoRA adapters but configs['lora'] is None")
        adapter_cfg = layout.get("adapter_config") or {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "bias": "none",
            "r": lcfg.rank, "lora_alpha": lcfg.alpha, "lora_dropout": lcfg.dropout,
            "use_rslora": False,
            "target_modules": sorted({k.split(".")[-3] for k in adapter_state})}
        _write_json(os.path.join(out_dir, ADAPTER_CONFIG), adapter_cfg)
        _write_safetensors(out_dir, adapter_state, ADAPTER_FILES[0])
        written += [ADAPTER_CONFIG, ADAPTER_FILES[0]]
    if params.get("siglip") is not None:
        folder = os.path.join(out_dir, "siglip")
        cfg = configs["siglip"]
        hf = (layout.get("siglip") or {}).get("hf_config") or _siglip_config(cfg)
        _write_safetensors(folder, vit_keys.params_to_hf(params["siglip"], cfg))
        _write_json(os.path.join(folder, "config.json"), hf)
        written += ["siglip/" + cio.SAFE_SINGLE, "siglip/config.json"]
    if params.get("dinov2") is not None:
        folder = os.path.join(out_dir, "dinov2")
        hf = ((layout.get("dinov2") or {}).get("hf_config")
              or _dinov2_config(configs["dinov2"]))
        _write_safetensors(folder, dinov2_keys.params_to_hf(params["dinov2"], configs["dinov2"]))
        _write_json(os.path.join(folder, "config.json"), hf)
        written += ["dinov2/" + cio.SAFE_SINGLE, "dinov2/config.json"]
    if params.get("beats") is not None:
        bl = layout.get("beats") or {"cfg": _beats_config(configs["beats"])}
        folder = os.path.join(out_dir, "beats")
        os.makedirs(folder)
        state = beats_keys.params_to_beats(params["beats"], configs["beats"],
                                           parametrized=bl.get("parametrized", False))
        torch.save({"cfg": bl["cfg"],
                    "model": {k: _to_torch(v) for k, v in state.items()}},
                   os.path.join(folder, "beats.pt"))
        written.append("beats/beats.pt")
    return written


def _to_torch(x: np.ndarray):
    import ml_dtypes
    import torch

    x = np.ascontiguousarray(x)
    if x.dtype == np.dtype(ml_dtypes.bfloat16):
        return torch.from_numpy(x.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(x.copy())


# ----------------------------------------------------------------------------------------------
# Orbax (command line).


def save_orbax(params: Mapping[str, Any], configs: Mapping[str, Any], out: str, *,
               dtype: str = "keep", overwrite: bool = False, group_bytes: int = 1 << 30) -> dict:
    """Writes `import_tdc`'s result as an orbax checkpoint folder.

      out/params/        the composite tree (`checkpoint_io.load_tree`)
      out/extra/         the kept ignored tensors under their TDC names (dots -> tree levels)
      out/longvid_tdc.json  part configs (`import_hf.config_to_json`), LoRA config, layout

    Returns:
      The JSON metadata written.

    Raises:
      FileExistsError: `out` exists and not `overwrite`.
    """
    from convert import import_hf

    out = os.path.abspath(out)
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"{out} exists (pass --overwrite)")
    target = None if dtype == "keep" else cio.np_dtype(dtype)
    work = out + ".importing"
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    try:
        writer = cio.OrbaxTreeWriter(os.path.join(work, "params"), group_bytes=group_bytes)
        for path, leaf in cio.flatten_tree({k: v for k, v in params.items()
                                            if v is not None}).items():
            leaf = np.asarray(leaf)
            if target is not None and cio.is_float_dtype(leaf.dtype):
                leaf = leaf.astype(target)
            writer.add(path, leaf)
        writer.close()
        ignored = configs.get("ignored") or {}
        if ignored:
            extra = cio.OrbaxTreeWriter(os.path.join(work, "extra"), group_bytes=group_bytes)
            for key, value in ignored.items():
                extra.add(tuple(key.split(".")), np.asarray(value))
            extra.close()
        meta = {
            "format_version": FORMAT_VERSION, "family": "tdc",
            "configs": {p: None if configs.get(p) is None else {
                "class": f"{type(configs[p]).__module__}.{type(configs[p]).__qualname__}",
                "config": import_hf.config_to_json(configs[p])} for p in PARTS},
            "lora": None if configs.get("lora") is None
            else import_hf.config_to_json(configs["lora"]),
            "layout": configs.get("layout") or {},
            "ignored_keys": sorted(ignored),
            "dtype": dtype,
        }
        _write_json(os.path.join(work, TDC_META), meta)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return meta


def load_orbax(directory: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Inverse of `save_orbax`: (params, configs) as `import_tdc` returns them.

    Raises:
      FileNotFoundError: no longvid_tdc.json in `directory`.
    """
    from convert import import_hf

    meta = _read_json(os.path.join(directory, TDC_META))
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{directory}: format_version {meta.get('format_version')}")
    params = cio.load_tree(os.path.join(directory, "params"))
    configs: dict[str, Any] = {}
    for part in PARTS:
        entry = meta["configs"].get(part)
        configs[part] = None if entry is None else import_hf.config_from_json(
            entry["class"], entry["config"])
    configs["lora"] = None if meta["lora"] is None else lora_lib.make_config(**meta["lora"])
    configs["layout"] = meta["layout"]
    ignored = {}
    if meta["ignored_keys"]:
        flat = cio.flatten_tree(cio.load_tree(os.path.join(directory, "extra")))
        ignored = {".".join(p): v for p, v in flat.items()}
    configs["ignored"] = {k: ignored[k] for k in meta["ignored_keys"]}
    return params, configs


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m convert.tdc_keys", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tdc", required=True, help="TDC release folder")
    p.add_argument("--siglip", help="SigLIP HF folder")
    p.add_argument("--dinov2", help="DINOv2 HF folder")
    p.add_argument("--beats", help="BEATs .pt file")
    p.add_argument("--llm", default="auto", choices=("auto",) + LLM_FAMILIES)
    p.add_argument("--lora", help="PEFT LoRA folder (stage 3)")
    p.add_argument("--merge-lora", action="store_true",
                   help="fold the adapters into the weights (default: keep them)")
    p.add_argument("--qformer-heads", type=int, help="Q-Former heads (default width // 64)")
    p.add_argument("--ignore", action="append", default=[],
                   help="TDC key prefix to keep unconverted (repeatable)")
    p.add_argument("--dtype", default="keep", choices=("keep", "bfloat16", "float16", "float32"))
    p.add_argument("--out", required=True, help="output orbax folder")
    p.add_argument("--overwrite", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    cio.setup_cli_logging()
    overrides = {"qformer": {"num_heads": args.qformer_heads}} if args.qformer_heads else {}
    params, configs = import_tdc(args.tdc, siglip=args.siglip, dinov2=args.dinov2,
                                 beats=args.beats, llm=args.llm, lora=args.lora,
                                 merge_lora=args.merge_lora, ignore=tuple(args.ignore),
                                 overrides=overrides)
    save_orbax(params, configs, args.out, dtype=args.dtype, overwrite=args.overwrite)
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
