"""Strict key tables: LAVIS / TDC / transformers Q-Former state dicts <-> longvid_jax params.

Families:
  - `lavis`: LAVIS `BertLMHeadModel` (`Qformer.bert.*`; TDC `tdc/Qformer.py`, TimeChat). The
    unused MLM head `Qformer.cls.*` and the `embeddings.position_ids` buffer are declared ignored.
  - `tdc`: TDC's compressor inside `CambrianQwen/LlamaForCausalLM` (`model.Qformer.bert.*`,
    `model.query_proj`, `model.vision_proj`, `model.frame_seg`, `model.audio_proj`,
    `model.query_tokens`; the last is ignored when the Q-Former has no learned queries, i.e. the
    released Avg_pool path).
  - `blip2`: `transformers` `Blip2QFormerModel` (`layernorm`, `encoder.layer.*`, no text).
  - `instructblip`: `transformers` `InstructBlipQFormerModel` (`embeddings.*` + layers).

Every rule pairs a source-key template with a param-path template (placeholders `{i}` = layer,
`{p}` = query|key|value) and a layout transform; both directions use the same table. Every
tensor's shape is checked against the param tree of the model (`jax.eval_shape` of its init).
Unmapped, missing or duplicate keys and shape mismatches raise ValueError naming the key.

The `transformers` entry points follow the import/export CLI contract: `config_from_hf(d)` reads
a Blip2QFormerConfig / InstructBlipQFormerConfig dict or a full Blip2Config / InstructBlipConfig
(with `qformer_config`); `hf_to_params(state, cfg)` / `params_to_hf(params, cfg)` infer the
flavor from the config (no vocabulary = blip2) and map `query_tokens` when the config has learned
queries. State dicts may be mappings or streams of (key, tensor) pairs.

Usage:
  params = tdc_to_params(state_dict, tdc_config)            # {'qformer': ..., 'query_proj': ...}
  state_dict = params_to_tdc(params, tdc_config)
  cfg = config_from_hf(blip2_config_dict)                    # num_queries = num_query_tokens
  params = hf_to_params(sd, cfg, prefix="qformer.")          # + sd["query_tokens"]
"""

import dataclasses
import functools
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from longvid_jax.models.qformer import (
    QFormer,
    QFormerConfig,
    TDCCompressor,
    TDCCompressorConfig,
    make_config,
)

_PLACEHOLDERS = {"i": r"\d+", "p": r"query|key|value", "any": r".+"}


@dataclasses.dataclass(frozen=True)
class Rule:
    """One key-table entry.

    Attributes:
      source: source key template, e.g. `encoder.layer.{i}.attention.self.{p}.weight`.
      target: param path template ('/'-joined), e.g. `layer_{i}/self_attn/{p}/kernel`; None =
        the key is declared ignored on import (and not produced on export).
      transform: layout transform name (see `_TRANSFORMS`).
    """

    source: str
    target: str | None
    transform: str = "copy"


@functools.lru_cache(maxsize=None)
def compile_template(template: str) -> re.Pattern:
    """Regex (cached) of a `Rule` template: `{i}` a layer index, `{p}` query|key|value,
    `{any}` anything; the rest literal. Named groups carry the holes."""
    out, pos = [], 0
    for m in re.finditer(r"\{(\w+)\}", template):
        out.append(re.escape(template[pos:m.start()]))
        out.append(f"(?P<{m.group(1)}>{_PLACEHOLDERS[m.group(1)]})")
        pos = m.end()
    out.append(re.escape(template[pos:]))
    return re.compile("".join(out))


# Each transform: (source shape from target shape, to_ours(x, target_shape), to_source(y)).
def _heads_in_src(t):  # ours [Din, N, H] <- torch Linear.weight [N*H, Din]
    return (t[1] * t[2], t[0])


_TRANSFORMS: dict[str, tuple[Callable, Callable, Callable]] = {
    "copy": (lambda t: tuple(t), lambda x, t: x, lambda y: y),
    "linear": (lambda t: (t[1], t[0]), lambda x, t: x.T, lambda y: y.T),
    "heads_in": (_heads_in_src, lambda x, t: x.T.reshape(t),
                 lambda y: y.reshape(y.shape[0], -1).T),
    "heads_bias": (lambda t: (t[0] * t[1],), lambda x, t: x.reshape(t), lambda y: y.reshape(-1)),
    # ours [N, H, Dout] <- torch Linear.weight [Dout, N*H]
    "heads_out": (lambda t: (t[2], t[0] * t[1]), lambda x, t: x.T.reshape(t),
                  lambda y: y.reshape(-1, y.shape[-1]).T),
    "unsqueeze0": (lambda t: (1, *t), lambda x, t: x[0], lambda y: y[None]),
}


def _layer_rules(attn_self: str, attn_cross: str, qkv_infix: str) -> list[Rule]:
    rules = []
    for src, ours in ((attn_self, "self_attn"), (attn_cross, "cross_attn")):
        pre = f"encoder.layer.{{i}}.{src}"
        dst = f"layer_{{i}}/{ours}"
        rules += [
            Rule(f"{pre}.{qkv_infix}.{{p}}.weight", f"{dst}/{{p}}/kernel", "heads_in"),
            Rule(f"{pre}.{qkv_infix}.{{p}}.bias", f"{dst}/{{p}}/bias", "heads_bias"),
            Rule(f"{pre}.output.dense.weight", f"{dst}/out/kernel", "heads_out"),
            Rule(f"{pre}.output.dense.bias", f"{dst}/out/bias"),
            Rule(f"{pre}.output.LayerNorm.weight", f"{dst}/norm/scale"),
            Rule(f"{pre}.output.LayerNorm.bias", f"{dst}/norm/bias"),
        ]
    for inter, out, ours in (("intermediate_query", "output_query", "query_mlp"),
                             ("intermediate", "output", "text_mlp")):
        pre, dst = "encoder.layer.{i}", f"layer_{{i}}/{ours}"
        rules += [
            Rule(f"{pre}.{inter}.dense.weight", f"{dst}/wi/kernel", "linear"),
            Rule(f"{pre}.{inter}.dense.bias", f"{dst}/wi/bias"),
            Rule(f"{pre}.{out}.dense.weight", f"{dst}/wo/kernel", "linear"),
            Rule(f"{pre}.{out}.dense.bias", f"{dst}/wo/bias"),
            Rule(f"{pre}.{out}.LayerNorm.weight", f"{dst}/norm/scale"),
            Rule(f"{pre}.{out}.LayerNorm.bias", f"{dst}/norm/bias"),
        ]
    return rules


def _prefixed(prefix: str, rules: list[Rule], target_prefix: str = "") -> list[Rule]:
    return [Rule(prefix + r.source, None if r.target is None else target_prefix + r.target,
                 r.transform) for r in rules]


# LAVIS BertModel (`BertLMHeadModel.bert`), keys relative to `bert.`.
LAVIS_BERT_RULES: list[Rule] = [
    Rule("embeddings.word_embeddings.weight", "word_embeddings"),
    Rule("embeddings.position_embeddings.weight", "position_embeddings"),
    Rule("embeddings.LayerNorm.weight", "embed_norm/scale"),
    Rule("embeddings.LayerNorm.bias", "embed_norm/bias"),
    Rule("embeddings.position_ids", None),  # buffer arange(max_positions)
    *_layer_rules("attention", "crossattention", "self"),
]

BLIP2_RULES: list[Rule] = [
    Rule("layernorm.weight", "embed_norm/scale"),
    Rule("layernorm.bias", "embed_norm/bias"),
    *_layer_rules("attention", "crossattention", "attention"),
]

INSTRUCTBLIP_RULES: list[Rule] = [
    Rule("embeddings.word_embeddings.weight", "word_embeddings"),
    Rule("embeddings.position_embeddings.weight", "position_embeddings"),
    Rule("embeddings.layernorm.weight", "embed_norm/scale"),
    Rule("embeddings.layernorm.bias", "embed_norm/bias"),
    Rule("embeddings.position_ids", None),
    *_layer_rules("attention", "crossattention", "attention"),
]


def lavis_rules(prefix: str = "Qformer.", target_prefix: str = "", *,
                query_tokens_key: str | None = None, learned_queries: bool = False) -> list[Rule]:
    """Rules for a LAVIS `BertLMHeadModel` state dict under `prefix` (`cls.*` ignored).

    `query_tokens_key` names the [1, Q, D] query tokens (LAVIS keeps them beside the Q-Former,
    e.g. `query_tokens`); it is mapped when `learned_queries`, else declared ignored.
    """
    rules = _prefixed(prefix + "bert.", LAVIS_BERT_RULES, target_prefix)
    rules.append(Rule(prefix + "cls.{any}", None))
    if query_tokens_key is not None:
        rules.append(Rule(query_tokens_key,
                          target_prefix + "query_tokens" if learned_queries else None,
                          "unsqueeze0"))
    return rules


def tdc_rules(cfg: TDCCompressorConfig, prefix: str = "model.") -> list[Rule]:
    """Rules for the TDC compressor keys of a `CambrianQwen/LlamaForCausalLM` state dict."""
    rules = lavis_rules(prefix + "Qformer.", "qformer/", query_tokens_key=prefix + "query_tokens",
                        learned_queries=cfg.qformer.num_queries > 0)
    for name in ("query_proj", "vision_proj") + (("audio_proj",) if cfg.audio_width else ()):
        rules += [Rule(f"{prefix}{name}.weight", f"{name}/kernel", "linear"),
                  Rule(f"{prefix}{name}.bias", f"{name}/bias")]
    rules.append(Rule(prefix + "frame_seg", "frame_seg"))
    return rules


def hf_rules(flavor: str, prefix: str = "", *, query_tokens_key: str | None = None
             ) -> list[Rule]:
    """Rules for a `transformers` Blip2QFormerModel (`flavor='blip2'`) or
    InstructBlipQFormerModel (`'instructblip'`) state dict under `prefix`; `query_tokens_key`
    (e.g. `query_tokens` of Blip2Model / InstructBlipModel) maps to our learned queries."""
    if flavor not in ("blip2", "instructblip"):
        raise ValueError(f"unknown flavor {flavor!r}; use 'blip2' or 'instructblip'")
    rules = _prefixed(prefix, BLIP2_RULES if flavor == "blip2" else INSTRUCTBLIP_RULES)
    if query_tokens_key is not None:
        rules.append(Rule(query_tokens_key, "query_tokens", "unsqueeze0"))
    return rules



_TDC_OWNED = ("Qformer.", "query_proj.", "vision_proj.", "audio_proj.", "frame_seg",
              "query_tokens")


def tdc_owns(key: str, prefix: str = "model.") -> bool:
    """Whether a key of the full TDC checkpoint belongs to the compressor family (`tdc_rules`);
    a checkpoint router sends those keys to `tdc_to_params`. (`model.frame_seg` is also read by
    the SVA layout.)"""
    return any(key == prefix + o or (o.endswith(".") and key.startswith(prefix + o))
               for o in _TDC_OWNED)


# ----------------------------------------------------------------------------------------------
# Engine
# ----------------------------------------------------------------------------------------------


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        path = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, path + "/"))
        else:
            out[path] = v
    return out


def _unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, v in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor (bf16 has no numpy dtype)
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def _match(rules: list[Rule], key: str) -> tuple[Rule, dict[str, str]] | None:
    hits = []
    for r in rules:
        m = compile_template(r.source).fullmatch(key)
        if m:
            hits.append((r, m.groupdict()))
    if len(hits) > 1:
        raise ValueError(f"key {key!r} matches {len(hits)} rules: {[h[0].source for h in hits]}")
    return hits[0] if hits else None


def import_params(state_dict: Mapping[str, Any] | Iterable[tuple[str, Any]], rules: list[Rule],
                  expected: Mapping[str, jax.ShapeDtypeStruct]) -> dict[str, Any]:
    """Maps a torch-style state dict to a nested param dict with the rules (strict).

    Args:
      state_dict: key -> tensor (numpy, torch or jax), or an iterable of (key, tensor) pairs
        (e.g. streamed safetensors shards).
      rules: the key table.
      expected: flat '/'-path -> ShapeDtypeStruct of every param to fill.

    Returns:
      Nested dict of numpy arrays in the expected dtypes.

    Raises:
      ValueError: naming the key, for an unmapped key, a target that is not a param, two keys
        for one param, a shape mismatch, or a param no key filled.
    """
    flat: dict[str, np.ndarray] = {}
    origin: dict[str, str] = {}
    items = state_dict.items() if isinstance(state_dict, Mapping) else state_dict
    for key, value in items:
        hit = _match(rules, key)
        if hit is None:
            raise ValueError(f"unmapped key {key!r}")
        rule, groups = hit
        if rule.target is None:
            continue
        path = rule.target.format(**groups)
        if path not in expected:
            raise ValueError(f"key {key!r} maps to {path!r}, which is not a param of the model")
        if path in flat:
            raise ValueError(f"duplicate: {key!r} and {origin[path]!r} both map to {path!r}")
        src_shape, to_ours, _ = _TRANSFORMS[rule.transform]
        tshape = tuple(expected[path].shape)
        x = _to_numpy(value)
        if tuple(x.shape) != src_shape(tshape):
            raise ValueError(f"key {key!r}: shape {tuple(x.shape)}, expected {src_shape(tshape)} "
                             f"for {path!r} {tshape}")
        flat[path] = np.asarray(to_ours(x, tshape), dtype=expected[path].dtype)
        origin[path] = key
    missing = sorted(set(expected) - set(flat))
    if missing:
        raise ValueError(f"params not filled by any key: {missing}")
    return _unflatten(flat)


def export_params(params: Mapping[str, Any], rules: list[Rule],
                  expected: Mapping[str, jax.ShapeDtypeStruct]) -> dict[str, np.ndarray]:
    """Inverse of `import_params`: nested params -> state dict of numpy arrays (strict).

    Raises:
      ValueError: naming the param, for a param no rule produces, a shape mismatch, two params
        mapped to one key, or a missing param.
    """
    params = nn.meta.unbox(params)
    flat = _flatten(params)
    missing = sorted(set(expected) - set(flat))
    if missing:
        raise ValueError(f"params missing: {missing}")
    out: dict[str, np.ndarray] = {}
    targets = [r for r in rules if r.target is not None]
    for path, value in flat.items():
        if path not in expected:
            raise ValueError(f"param {path!r} is not a param of the model")
        y = np.asarray(jax.device_get(value))
        if tuple(y.shape) != tuple(expected[path].shape):
            raise ValueError(f"param {path!r}: shape {y.shape}, expected {expected[path].shape}")
        hits = [(r, m.groupdict()) for r in targets
                if (m := compile_template(r.target).fullmatch(path))]
        if len(hits) != 1:
            raise ValueError(f"param {path!r} matches {len(hits)} rules")
        rule, groups = hits[0]
        key = rule.source.format(**groups)
        if key in out:
            raise ValueError(f"duplicate key {key!r} from {path!r}")
        out[key] = np.ascontiguousarray(_TRANSFORMS[rule.transform][2](y))
    return out


# ----------------------------------------------------------------------------------------------
# Param shapes and the public entry points
# ----------------------------------------------------------------------------------------------


def qformer_param_shapes(cfg: QFormerConfig) -> dict[str, jax.ShapeDtypeStruct]:
    """Flat '/'-path -> ShapeDtypeStruct of `QFormer(cfg)` params (no compute)."""
    enc = jnp.zeros((1, 1, cfg.encoder_width))
    kw = {}
    if cfg.num_queries == 0:
        kw["query_embeds"] = jnp.zeros((1, 1, cfg.width))
    if cfg.vocab_size > 0:
        kw["text_ids"] = jnp.zeros((1, 1), jnp.int32)
    shapes = jax.eval_shape(lambda: QFormer(cfg).init(jax.random.key(0), enc, **kw))
    return _flatten(nn.meta.unbox(shapes)["params"])


def tdc_param_shapes(cfg: TDCCompressorConfig) -> dict[str, jax.ShapeDtypeStruct]:
    """Flat '/'-path -> ShapeDtypeStruct of `TDCCompressor(cfg)` params (no compute)."""
    k, d = cfg.num_tokens, cfg.llm_width
    kw = {}
    if cfg.text_input:
        kw["text_ids"] = jnp.zeros((1, 1), jnp.int32)
    shapes = jax.eval_shape(lambda: TDCCompressor(cfg).init(
        jax.random.key(0), jnp.zeros((1, 2, k, d)), jnp.ones((1, 2), bool), **kw))
    return _flatten(nn.meta.unbox(shapes)["params"])


def tdc_to_params(state_dict: Mapping[str, Any], cfg: TDCCompressorConfig,
                  prefix: str = "model.") -> dict[str, Any]:
    """TDC compressor keys (`model.Qformer.bert.*`, projections, frame_seg) -> TDCCompressor
    params. `state_dict` must hold only these keys (route others elsewhere first)."""
    return import_params(state_dict, tdc_rules(cfg, prefix), tdc_param_shapes(cfg))


def params_to_tdc(params: Mapping[str, Any], cfg: TDCCompressorConfig,
                  prefix: str = "model.") -> dict[str, np.ndarray]:
    """TDCCompressor params -> TDC state-dict keys (without the unused `Qformer.cls.*` head,
    the `position_ids` buffer and, for Avg_pool, `query_tokens`)."""
    return export_params(params, tdc_rules(cfg, prefix), tdc_param_shapes(cfg))


def lavis_to_params(state_dict: Mapping[str, Any], cfg: QFormerConfig, prefix: str = "Qformer.",
                    query_tokens_key: str | None = None) -> dict[str, Any]:
    """LAVIS `BertLMHeadModel` keys under `prefix` (+ optional query tokens) -> QFormer params."""
    rules = lavis_rules(prefix, query_tokens_key=query_tokens_key,
                        learned_queries=cfg.num_queries > 0)
    return import_params(state_dict, rules, qformer_param_shapes(cfg))


def params_to_lavis(params: Mapping[str, Any], cfg: QFormerConfig, prefix: str = "Qformer.",
                    query_tokens_key: str | None = None) -> dict[str, np.ndarray]:
    """QFormer params -> LAVIS keys (no `cls.*` head, no `position_ids` buffer)."""
    rules = lavis_rules(prefix, query_tokens_key=query_tokens_key,
                        learned_queries=cfg.num_queries > 0)
    return export_params(params, rules, qformer_param_shapes(cfg))


_AUTO = "auto"


def _hf_args(cfg: QFormerConfig, flavor: str | None, query_tokens_key: str | None
             ) -> tuple[str, str | None]:
    if flavor is None:
        flavor = "blip2" if cfg.vocab_size == 0 else "instructblip"
    if query_tokens_key == _AUTO:
        query_tokens_key = "query_tokens" if cfg.num_queries > 0 else None
    return flavor, query_tokens_key


def hf_to_params(state_dict: Mapping[str, Any] | Iterable[tuple[str, Any]], cfg: QFormerConfig,
                 *, flavor: str | None = None, prefix: str = "",
                 query_tokens_key: str | None = _AUTO) -> dict[str, Any]:
    """`transformers` Blip2QFormerModel / InstructBlipQFormerModel state dict -> QFormer params.

    Args:
      state_dict: the Q-Former's keys under `prefix` (e.g. `qformer.` in Blip2Model), plus
        `query_tokens_key` when given; a mapping or (key, tensor) pairs.
      cfg: our config (`vocab_size=0` for blip2), e.g. from `config_from_hf`.
      flavor: `blip2` or `instructblip`; None = `blip2` when `cfg.vocab_size == 0`, else
        `instructblip`.
      prefix: key prefix of the Q-Former.
      query_tokens_key: key of the [1, Q, D] learned queries (Blip2Model / InstructBlipModel
        `query_tokens`); default: `query_tokens` when `cfg.num_queries > 0`, else none.

    Raises:
      ValueError: naming the key, see `import_params`.
    """
    flavor, query_tokens_key = _hf_args(cfg, flavor, query_tokens_key)
    return import_params(state_dict, hf_rules(flavor, prefix, query_tokens_key=query_tokens_key),
                         qformer_param_shapes(cfg))


def params_to_hf(params: Mapping[str, Any], cfg: QFormerConfig, *, flavor: str | None = None,
                 prefix: str = "", query_tokens_key: str | None = _AUTO
                 ) -> dict[str, np.ndarray]:
    """QFormer params -> `transformers` state dict (loads with `strict=True`); arguments as in
    `hf_to_params`."""
    flavor, query_tokens_key = _hf_args(cfg, flavor, query_tokens_key)
    return export_params(params, hf_rules(flavor, prefix, query_tokens_key=query_tokens_key),
                         qformer_param_shapes(cfg))


# HF config field -> (our field, HF default: Blip2QFormerConfig / InstructBlipQFormerConfig).
_HF_FIELDS = {
    "hidden_size": ("width", 768),
    "num_hidden_layers": ("depth", 12),
    "num_attention_heads": ("num_heads", 12),
    "intermediate_size": ("mlp_dim", 3072),
    "encoder_hidden_size": ("encoder_width", 1408),
    "cross_attention_frequency": ("cross_attention_freq", 2),
    "max_position_embeddings": ("max_positions", 512),
    "layer_norm_eps": ("ln_eps", 1e-12),
    "hidden_act": ("act", "gelu"),
}
_BLIP2_TYPES = ("blip_2_qformer", "blip-2", "blip_2")
_INSTRUCTBLIP_TYPES = ("instructblip_qformer", "instructblip")


def config_from_hf(hf_config: Mapping[str, Any], **overrides) -> QFormerConfig:
    """`QFormerConfig` from a `transformers` config dict (`config.json` / `to_dict()`).

    Accepts a `Blip2QFormerConfig` (model_type `blip_2_qformer`: no text input, `vocab_size`
    0) or `InstructBlipQFormerConfig` (`instructblip_qformer`: text embeddings kept), or a full
    `Blip2Config` / `InstructBlipConfig` (`blip-2` / `instructblip`) holding `qformer_config`:
    then `num_queries` is its `num_query_tokens` (the learned `query_tokens` of Blip2Model /
    InstructBlipModel) and `encoder_width` its `vision_config.hidden_size` (as the HF config's
    post-init sets it). A bare Q-Former config gets `num_queries=0` (the HF Q-Former models
    take `query_embeds` as input). Missing fields take the HF defaults.

    Args:
      hf_config: the config dict.
      **overrides: fields of `QFormerConfig` to set afterwards (e.g. dtype).

    Raises:
      ValueError: for another model_type, or a Blip2 Q-Former with `use_qformer_text_input`
        (its text embeddings live outside Blip2QFormerModel; not supported).
    """
    d = dict(hf_config)
    model_type = d.get("model_type", "")
    num_queries = 0
    if "qformer_config" in d:
        q = dict(d["qformer_config"] or {})
        num_queries = int(d.get("num_query_tokens", 32))
        vision = d.get("vision_config") or {}
        if "hidden_size" in vision:
            q["encoder_hidden_size"] = vision["hidden_size"]
        q.setdefault("model_type", {"blip-2": "blip_2_qformer",
                                    "instructblip": "instructblip_qformer"}.get(model_type, ""))
        d = q
        model_type = d["model_type"]
    if model_type in _BLIP2_TYPES:
        if d.get("use_qformer_text_input", False):
            raise ValueError("Blip2 Q-Former with use_qformer_text_input is not supported")
        vocab = 0
    elif model_type in _INSTRUCTBLIP_TYPES:
        vocab = int(d.get("vocab_size", 30522))
    else:
        raise ValueError(f"not a Blip2 / InstructBlip (Q-Former) config: model_type "
                         f"{model_type!r}")
    kw = {ours: d.get(hf, default) for hf, (ours, default) in _HF_FIELDS.items()}
    kw.update(num_queries=num_queries, vocab_size=vocab)
    kw.update(overrides)
    return make_config(**kw)
