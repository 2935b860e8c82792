"""Strict key table: HF `Qwen2ForCausalLM` / `LlamaForCausalLM` state dicts <-> Decoder params.

HF tensors use the torch layout (a `Linear` weight is `[out, in]`); our weights keep their axes
(`longvid_jax/models/decoder.py`). Every tensor is matched by exactly one regex of `_RULES`,
shape-checked against the config, and reshaped; unmapped, missing or duplicate keys and shape
mismatches raise ValueError naming the key. The only keys accepted without a target are the
derived RoPE buffers `*.rotary_emb.inv_freq` of old Llama checkpoints (recomputed from the
config).

`hf_to_params` takes a dict or any iterable of `(name, array)` pairs, so a caller can stream a
sharded safetensors checkpoint tensor by tensor; `convert_hf_tensor` converts one tensor.
The params tree returned is the unscanned layout (`layers_{i}`); use
`longvid_jax.models.decoder.stack_layer_params` for `scan_layers=True`.
"""

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from longvid_jax.models.decoder import (
    DecoderConfig,
    make_config,
    unstack_layer_params,
)

Shape = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class _Rule:
    """One HF key pattern and its tensor transform.

    Attributes:
      pattern: full-match regex over the HF key; group 1 (if any) is the layer index.
      path: target path template in the params tree; `{layer}` is the layer index.
      hf_shape: config -> expected HF shape.
      to_ours: HF array -> our array (given the config).
      to_hf: our array -> HF array (given the config).
      enabled: config -> whether the key exists for this config.
    """

    pattern: str
    path: str
    hf_shape: Callable[[DecoderConfig], Shape]
    to_ours: Callable[[np.ndarray, DecoderConfig], np.ndarray]
    to_hf: Callable[[np.ndarray, DecoderConfig], np.ndarray]
    enabled: Callable[[DecoderConfig], bool] = lambda cfg: True

    def shape(self, cfg: DecoderConfig) -> Shape:
        """Our shape: `to_ours` applied to a zero-stride dummy of the HF shape."""
        dummy = np.lib.stride_tricks.as_strided(np.zeros((), np.int8), self.hf_shape(cfg),
                                                (0,) * len(self.hf_shape(cfg)))
        return self.to_ours(dummy, cfg).shape


def _identity(x, cfg):
    return x


def _transpose(x, cfg):
    return x.T


def _in_proj(heads: Callable[[DecoderConfig], int]) -> tuple[Callable, Callable, Callable]:
    """q/k/v: HF [heads*H, D] <-> ours (D, heads, H)."""
    return (lambda c: (heads(c) * c.head_dim, c.hidden_size),
            lambda x, c: x.T.reshape(c.hidden_size, heads(c), c.head_dim),
            lambda y, c: y.reshape(c.hidden_size, heads(c) * c.head_dim).T)


def _in_bias(heads: Callable[[DecoderConfig], int]) -> tuple[Callable, Callable, Callable]:
    """q/k/v bias: HF [heads*H] <-> ours (heads, H)."""
    return (lambda c: (heads(c) * c.head_dim,),
            lambda x, c: x.reshape(heads(c), c.head_dim),
            lambda y, c: y.reshape(heads(c) * c.head_dim))


def _n(c):
    return c.num_heads


def _k(c):
    return c.num_kv_heads


_L = r"model\.layers\.(\d+)\."
# In the order of a transformers state dict (embedding, per layer, final norm, head).
_RULES: tuple[_Rule, ...] = (
    _Rule(r"model\.embed_tokens\.weight", "embed_tokens/embedding",
          lambda c: (c.vocab_size, c.hidden_size), _identity, _identity),
    _Rule(_L + r"self_attn\.q_proj\.weight", "layers_{layer}/self_attn/q_proj/kernel",
          *_in_proj(_n)),
    _Rule(_L + r"self_attn\.q_proj\.bias", "layers_{layer}/self_attn/q_proj/bias",
          *_in_bias(_n), enabled=lambda c: c.qkv_bias),
    _Rule(_L + r"self_attn\.k_proj\.weight", "layers_{layer}/self_attn/k_proj/kernel",
          *_in_proj(_k)),
    _Rule(_L + r"self_attn\.k_proj\.bias", "layers_{layer}/self_attn/k_proj/bias",
          *_in_bias(_k), enabled=lambda c: c.qkv_bias),
    _Rule(_L + r"self_attn\.v_proj\.weight", "layers_{layer}/self_attn/v_proj/kernel",
          *_in_proj(_k)),
    _Rule(_L + r"self_attn\.v_proj\.bias", "layers_{layer}/self_attn/v_proj/bias",
          *_in_bias(_k), enabled=lambda c: c.qkv_bias),
    _Rule(_L + r"self_attn\.o_proj\.weight", "layers_{layer}/self_attn/o_proj/kernel",
          lambda c: (c.hidden_size, c.num_heads * c.head_dim),
          lambda x, c: x.T.reshape(c.num_heads, c.head_dim, c.hidden_size),
          lambda y, c: y.reshape(c.num_heads * c.head_dim, c.hidden_size).T),
    _Rule(_L + r"mlp\.gate_proj\.weight", "layers_{layer}/mlp/gate_proj/kernel",
          lambda c: (c.mlp_dim, c.hidden_size), _transpose, _transpose),
    _Rule(_L + r"mlp\.up_proj\.weight", "layers_{layer}/mlp/up_proj/kernel",
          lambda c: (c.mlp_dim, c.hidden_size), _transpose, _transpose),
    _Rule(_L + r"mlp\.down_proj\.weight", "layers_{layer}/mlp/down_proj/kernel",
          lambda c: (c.hidden_size, c.mlp_dim), _transpose, _transpose),
    _Rule(_L + r"input_layernorm\.weight", "layers_{layer}/input_layernorm/scale",
          lambda c: (c.hidden_size,), _identity, _identity),
    _Rule(_L + r"post_attention_layernorm\.weight",
          "layers_{layer}/post_attention_layernorm/scale",
          lambda c: (c.hidden_size,), _identity, _identity),
    _Rule(r"model\.norm\.weight", "norm/scale", lambda c: (c.hidden_size,), _identity,
          _identity),
    _Rule(r"lm_head\.weight", "lm_head/kernel", lambda c: (c.vocab_size, c.hidden_size),
          _transpose, _transpose),  # with tie_embeddings: checked against the embedding
)
_IGNORED = (re.compile(_L + r"self_attn\.rotary_emb\.inv_freq"),)
_COMPILED = tuple((re.compile(r.pattern), r) for r in _RULES)
_LM_HEAD = "lm_head.weight"
_EMBED = "model.embed_tokens.weight"


def _layer_of(match: re.Match, key: str, cfg: DecoderConfig) -> int | None:
    if not match.groups():
        return None
    layer = int(match.group(1))
    if layer >= cfg.num_layers:
        raise ValueError(f"{key}: layer {layer} out of range for num_layers={cfg.num_layers}")
    return layer


def _match(key: str, cfg: DecoderConfig) -> tuple[_Rule, int | None] | None:
    """The rule for `key`, or None for an ignored key. Raises ValueError if unmapped."""
    for regex in _IGNORED:
        if regex.fullmatch(key):
            return None
    for regex, rule in _COMPILED:
        m = regex.fullmatch(key)
        if m is None:
            continue
        if not rule.enabled(cfg):
            raise ValueError(f"unexpected key {key!r} for this config (qkv_bias={cfg.qkv_bias})")
        return rule, _layer_of(m, key, cfg)
    raise ValueError(f"unmapped HF key {key!r}")


def hf_keys(cfg: DecoderConfig, *, include_tied_lm_head: bool = False) -> list[str]:
    """Every HF key a checkpoint of `cfg` holds, in transformers' state-dict order.

    `lm_head.weight` of a tied config only with `include_tied_lm_head`.
    """
    rules = [r for r in _RULES if r.enabled(cfg) and not (
        r.pattern == r"lm_head\.weight" and cfg.tie_embeddings and not include_tied_lm_head)]
    per_layer = [r.pattern[len(_L):].replace("\\.", ".") for r in rules
                 if r.pattern.startswith(_L)]
    keys, layers_done = [], False
    for r in rules:
        if not r.pattern.startswith(_L):
            keys.append(r.pattern.replace("\\.", "."))
        elif not layers_done:  # all layers at the first per-layer rule, layer-major
            keys.extend(f"model.layers.{i}.{name}" for i in range(cfg.num_layers)
                        for name in per_layer)
            layers_done = True
    return keys


def convert_hf_tensor(key: str, value: np.ndarray, cfg: DecoderConfig
                      ) -> tuple[tuple[str, ...], np.ndarray] | None:
    """Converts one HF tensor to `(path in our params tree, array)`.

    Args:
      key: HF state-dict name, e.g. `model.layers.3.self_attn.q_proj.weight`.
      value: the tensor as a NumPy array in torch layout (any dtype; kept).
      cfg: the decoder config.

    Returns:
      (path tuple, array), or None for an ignored derived buffer (`rotary_emb.inv_freq`).
      `lm_head.weight` of a tied config maps to `("lm_head", "kernel")`; `hf_to_params` checks it
      against the embedding and drops it.

    Raises:
      ValueError: unmapped key, layer out of range, or shape mismatch (naming the key).
    """
    found = _match(key, cfg)
    if found is None:
        return None
    rule, layer = found
    value = np.asarray(value)
    expected = tuple(rule.hf_shape(cfg))
    if value.shape != expected:
        raise ValueError(f"{key}: shape {value.shape} != expected {expected}")
    path = tuple(rule.path.format(layer=layer).split("/"))
    array = np.ascontiguousarray(rule.to_ours(value, cfg))
    assert array.shape == rule.shape(cfg), (key, array.shape)
    return path, array


def _set(tree: dict, path: tuple[str, ...], value: Any, key: str) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    if path[-1] in tree:
        raise ValueError(f"duplicate key {key!r} (target {'/'.join(path)} already set)")
    tree[path[-1]] = value


def hf_to_params(state: Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]],
                 cfg: DecoderConfig) -> dict[str, Any]:
    """HF state dict -> nested params dict (unscanned layout), dtypes kept.

    Args:
      state: name -> NumPy array (torch layout), or an iterable of (name, array) pairs.
      cfg: the decoder config (e.g. from `config_from_hf`).

    Returns:
      Nested dict of NumPy arrays matching `Decoder(cfg)` params with `scan_layers=False`.

    Raises:
      ValueError: unmapped, missing or duplicate keys, shape mismatches, or (tied configs) an
        `lm_head.weight` that differs from the embedding; each names the key.
    """
    items = state.items() if isinstance(state, Mapping) else state
    params: dict[str, Any] = {}
    seen: set[str] = set()
    tied_head = None
    for key, value in items:
        if key in seen:
            raise ValueError(f"duplicate key {key!r}")
        seen.add(key)
        if cfg.tie_embeddings and key == _LM_HEAD:  # checked against the embedding below
            tied_head = np.asarray(value)
            expected = (cfg.vocab_size, cfg.hidden_size)
            if tied_head.shape != expected:
                raise ValueError(f"{key}: shape {tied_head.shape} != expected {expected}")
            continue
        out = convert_hf_tensor(key, value, cfg)
        if out is not None:
            _set(params, *out, key)
    missing = [k for k in hf_keys(cfg) if k not in seen]
    if missing:
        raise ValueError(f"missing HF key(s) {missing[:8]}{' ...' if len(missing) > 8 else ''} "
                         f"({len(missing)} in all)")
    if tied_head is not None:
        emb = params["embed_tokens"]["embedding"]
        if not np.array_equal(tied_head, emb):
            raise ValueError(f"{_LM_HEAD} differs from {_EMBED} but tie_embeddings=True")
    return params


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def params_to_hf(params: Mapping[str, Any], cfg: DecoderConfig, *,
                 include_tied_lm_head: bool = False) -> dict[str, np.ndarray]:
    """Nested params dict -> HF state dict (torch layout NumPy arrays), dtypes kept.

    Args:
      params: `Decoder(cfg)` params (the `"params"` collection, plain arrays); a scanned
        tree (`layers` with a leading L axis) is unstacked first.
      cfg: the decoder config.
      include_tied_lm_head: with tie_embeddings, also emit `lm_head.weight` (a copy of the
        embedding, as torch `state_dict()` does); safetensors checkpoints omit it.

    Returns:
      dict HF name -> np.ndarray, in `hf_keys(cfg)` order.

    Raises:
      ValueError: a parameter with no HF key, a missing parameter, or a shape mismatch.
    """
    if "layers" in params:
        params = unstack_layer_params(params)
    flat = {"/".join(p): np.asarray(v) for p, v in _flatten(params).items()}
    out: dict[str, np.ndarray] = {}
    used: set[str] = set()
    for key in hf_keys(cfg, include_tied_lm_head=include_tied_lm_head):
        rule, layer = _match(key, cfg)
        path = rule.path.format(layer=layer)
        if cfg.tie_embeddings and key == _LM_HEAD:
            path = "embed_tokens/embedding"
        if path not in flat:
            raise ValueError(f"missing parameter {path!r} for HF key {key!r}")
        used.add(path)
        if cfg.tie_embeddings and key == _LM_HEAD:
            out[key] = np.array(flat[path])  # the tied embedding, (V, D) like HF's head
            continue
        if flat[path].shape != rule.shape(cfg):
            raise ValueError(f"{path}: shape {flat[path].shape} != expected {rule.shape(cfg)} "
                             f"(for {key})")
        out[key] = np.ascontiguousarray(rule.to_hf(flat[path], cfg))
    unused = sorted(set(flat) - used)
    if unused:
        raise ValueError(f"parameter(s) with no HF key: {unused}")
    return out


def config_from_hf(hf_config: Mapping[str, Any], **overrides: Any) -> DecoderConfig:
    """`DecoderConfig` from a transformers `config.json` dict (model_type qwen2 or llama).

    Reads `rope_theta` / `rope_scaling` (transformers 4.x) or `rope_parameters` (5.x); only the
    default and `llama3` rope types are supported.

    Args:
      hf_config: the parsed config.json (or `PretrainedConfig.to_dict()`).
      **overrides: further `DecoderConfig` fields (dtype, scan_layers, ...).

    Raises:
      ValueError: another model type, activation, rope type, sliding-window attention, Llama
        `attention_bias` / `mlp_bias` (o_proj / MLP biases are not modelled), or unknown
        overrides.
    """
    c = dict(hf_config)
    model_type = c.get("model_type")
    if model_type not in ("qwen2", "llama"):
        raise ValueError(f"unsupported model_type {model_type!r}; expected 'qwen2' or 'llama'")
    act = c.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"unsupported hidden_act {act!r}; only 'silu'")
    if model_type == "qwen2":
        if c.get("use_sliding_window", False):
            raise ValueError("Qwen2 sliding-window attention (use_sliding_window) not supported")
        qkv_bias = True
    else:
        if c.get("attention_bias", False) or c.get("mlp_bias", False):
            raise ValueError("Llama attention_bias / mlp_bias (o_proj and MLP biases) "
                             "not supported")
        qkv_bias = False
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    rope = dict(rope)
    theta = c.get("rope_theta", rope.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        scaling = None
    elif rope_type == "llama3":
        scaling = {k: rope[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                        "original_max_position_embeddings")}
    else:
        raise ValueError(f"unsupported rope type {rope_type!r}; only 'default' and 'llama3'")
    heads = c["num_attention_heads"]
    fields = dict(
        vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
        num_layers=c["num_hidden_layers"], num_heads=heads,
        num_kv_heads=c.get("num_key_value_heads") or heads,
        head_dim=c.get("head_dim") or c["hidden_size"] // heads,
        mlp_dim=c["intermediate_size"], rope_theta=float(theta), rope_scaling=scaling,
        rms_eps=float(c.get("rms_norm_eps", 1e-6)), qkv_bias=qkv_bias,
        tie_embeddings=bool(c.get("tie_word_embeddings", False)),
    )
    fields.update(overrides)
    return make_config(**fields)
