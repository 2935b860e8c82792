"""BEATs: released checkpoint state dicts <-> `longvid_jax.models.beats.BEATs` params.

Key names are those of the released BEATs checkpoints (`torch.load(path)["model"]`, e.g.
`BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt`) and of LongVALE's module, which uses the old
`nn.utils.weight_norm` (`weight_g` / `weight_v`). TDC's module uses the parametrization API,
`encoder.pos_conv.0.parametrizations.weight.original0` / `original1`; import accepts both
spellings, export writes `weight_g` / `weight_v` unless `parametrized=True`.

  checkpoint key [shape]                          ours (shape; L stacked first)        transform
  patch_embedding.weight [E,1,p,p]                patch_embed/kernel (p,p,1,E)         patch
  patch_embedding.bias [E] (conv_bias only)       patch_embed/bias (E)                 copy
  layer_norm.{weight,bias} [E]                    patch_ln/{scale,bias}                copy
  post_extract_proj.weight [D,E] (E != D only)    post_extract_proj/kernel (E,D)       linear
  post_extract_proj.bias [D]                      post_extract_proj/bias (D)           copy
  encoder.pos_conv.0.weight_g [1,1,K]             encoder/pos_conv/g (K)               beats_wn_g
  encoder.pos_conv.0.weight_v [D,D/G,K]           encoder/pos_conv/v (K,D/G,D)         conv1d
  encoder.pos_conv.0.bias [D]                     encoder/pos_conv/bias (D)            copy
  encoder.layer_norm.{weight,bias} [D]            encoder/ln/{scale,bias}              copy
  encoder.layers.0.self_attn.relative_attention_bias.weight [buckets,N]
                                                  encoder/rel_pos_embedding            copy
  encoder.layers.{i}. + (our leaves under encoder/layers/):
    self_attn.{q,k,v}_proj.weight [N*H,D]         {q,k,v}/kernel (L,D,N,H)             heads_in
    self_attn.{q,k,v}_proj.bias [N*H]             {q,k,v}/bias (L,N,H)                 heads_bias
    self_attn.out_proj.{weight,bias}              o/kernel (L,N,H,D), o/bias (L,D)     heads_out
    self_attn.grep_linear.weight [8,H]            grep_linear/kernel (L,H,8)           linear
    self_attn.grep_linear.bias [8]                grep_linear/bias (L,8)               copy
    self_attn.grep_a [1,N,1,1]                    grep_a (L,N)                         beats_head
    self_attn_layer_norm.{weight,bias} [D]        ln1/{scale,bias} (L,D)               copy
    fc{1,2}.{weight,bias}                         fc{1,2}/{kernel,bias}                linear
    final_layer_norm.{weight,bias} [D]            ln2/{scale,bias} (L,D)               copy
  predictor.{weight,bias} [V,D], [V] (num_classes only)  predictor/{kernel,bias}       linear

The relative position table is one module shared by all layers, so a PyTorch state dict lists it
under every layer (`encoder.layers.{i}.self_attn.relative_attention_bias.weight`, L copies;
`shared/fixtures/beats_tiny` has 2). Import reads layer 0's; each other layer's copy may be
present or not, and when present must equal layer 0's bit for bit (else ValueError: such a
checkpoint would not be BEATs). Export writes all L copies, as `state_dict()` does, so the
original module loads the result with `strict=True`.

Strict in the same way as `vit_keys.py` (unmapped, missing, duplicate keys and shape mismatches
raise ValueError naming the key); arrays keep their dtype.
"""

import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from convert.vit_keys import (
    TRANSFORMS,
    Rule,
    _items,
    _to_numpy,
    block_rules,
    params_to_state,
    state_to_params,
)
from longvid_jax.models.beats import BEATsConfig, make_config

# Reshapes between a checkpoint's broadcast shape and our vector (registered in the shared
# transform table; the names are BEATs-specific).
TRANSFORMS.update({
    # weight_g of weight norm over dim 2: [1, 1, K] <-> (K,).
    "beats_wn_g": (lambda w, s: w.reshape(s), lambda w, s: w.reshape(s),
                   lambda s: (1, 1, s[0])),
    # a per-head scalar: [1, N, 1, 1] <-> (N,).
    "beats_head": (lambda w, s: w.reshape(s), lambda w, s: w.reshape(s),
                   lambda s: (1, s[0], 1, 1)),
})

_NAMES = {"ln1": "self_attn_layer_norm", "ln2": "final_layer_norm", "q": "self_attn.q_proj",
          "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.out_proj",
          "fc1": "fc1", "fc2": "fc2"}
_REL_KEY = "encoder.layers.{}.self_attn.relative_attention_bias.weight"
_WN_NEW = {"encoder.pos_conv.0.parametrizations.weight.original0": "encoder.pos_conv.0.weight_g",
           "encoder.pos_conv.0.parametrizations.weight.original1": "encoder.pos_conv.0.weight_v"}


def rules(cfg: BEATsConfig) -> list[Rule]:
    """The BEATs key table for `cfg` (layer 0's relative position table only)."""
    p, e, d, n = cfg.patch_size, cfg.patch_dim, cfg.width, cfg.num_heads
    h, k, g = cfg.head_dim, cfg.conv_pos, cfg.conv_pos_groups
    table = [Rule("patch_embedding.weight", ("patch_embed", "kernel"), "patch", (p, p, 1, e))]
    if cfg.conv_bias:
        table.append(Rule("patch_embedding.bias", ("patch_embed", "bias"), "copy", (e,)))
    table += [Rule("layer_norm.weight", ("patch_ln", "scale"), "copy", (e,)),
              Rule("layer_norm.bias", ("patch_ln", "bias"), "copy", (e,))]
    if e != d:
        table += [Rule("post_extract_proj.weight", ("post_extract_proj", "kernel"), "linear",
                       (e, d)),
                  Rule("post_extract_proj.bias", ("post_extract_proj", "bias"), "copy", (d,))]
    table += [
        Rule("encoder.pos_conv.0.weight_g", ("encoder", "pos_conv", "g"), "beats_wn_g", (k,)),
        Rule("encoder.pos_conv.0.weight_v", ("encoder", "pos_conv", "v"), "conv1d",
             (k, d // g, d)),
        Rule("encoder.pos_conv.0.bias", ("encoder", "pos_conv", "bias"), "copy", (d,)),
        Rule("encoder.layer_norm.weight", ("encoder", "ln", "scale"), "copy", (d,)),
        Rule("encoder.layer_norm.bias", ("encoder", "ln", "bias"), "copy", (d,)),
    ]
    if cfg.relative_position_embedding:
        table.append(Rule(_REL_KEY.format(0), ("encoder", "rel_pos_embedding"), "copy",
                          (cfg.num_buckets, n)))
    table += block_rules(hf_layer="encoder.layers.{}.", names=_NAMES, width=d, num_heads=n,
                         mlp_dim=cfg.mlp_dim, k_bias=True)
    if cfg.gru_rel_pos:
        layer, path = "encoder.layers.{}.self_attn.", ("encoder", "layers")
        table += [Rule(layer + "grep_linear.weight", path + ("grep_linear", "kernel"), "linear",
                       (h, 8)),
                  Rule(layer + "grep_linear.bias", path + ("grep_linear", "bias"), "copy", (8,)),
                  Rule(layer + "grep_a", path + ("grep_a",), "beats_head", (n,))]
    if cfg.num_classes:
        table += [Rule("predictor.weight", ("predictor", "kernel"), "linear",
                       (d, cfg.num_classes)),
                  Rule("predictor.bias", ("predictor", "bias"), "copy", (cfg.num_classes,))]
    return table


def beats_to_params(state: Mapping[str, Any] | Iterable[tuple[str, Any]], cfg: BEATsConfig, *,
                    prefix: str = "", ignore: tuple[str, ...] = ()) -> dict:
    """BEATs checkpoint state dict -> `BEATs(cfg)` params (numpy, source dtypes).

    Args:
      state: key -> tensor (numpy / torch / jax), or (key, tensor) pairs; e.g.
        `torch.load(path)["model"]` of a released checkpoint.
      cfg: the model's config (`config_from_beats(checkpoint["cfg"])`).
      prefix: key prefix of the BEATs module (`""` for released checkpoints; e.g.
        `"model.audio_encoder.beats."` inside a TDC model's state dict).
      ignore: full-key prefixes to skip explicitly (each must match some key), e.g.
        `("predictor.",)` to load a fine-tuned checkpoint into a config without predictor.

    Raises:
      ValueError: see `convert.vit_keys.state_to_params`; also for a layer's copy of the
        relative position table that differs from layer 0's, or is duplicated, or belongs to a
        layer beyond `cfg.depth`.
    """
    ignore = tuple(ignore)
    copy_rx = re.compile(re.escape(prefix) + re.escape(_REL_KEY).replace(r"\{\}", r"(\d+)"))
    aliases = {prefix + old: prefix + new for old, new in _WN_NEW.items()}
    copies: dict[int, tuple[str, np.ndarray]] = {}
    seen_alias: dict[str, str] = {}

    def stream():
        for key, value in _items(state):
            if any(key.startswith(p) for p in ignore):
                yield key, value
                continue
            m = copy_rx.fullmatch(key)
            if m and int(m.group(1)) > 0 and cfg.relative_position_embedding:
                layer = int(m.group(1))
                if layer >= cfg.depth:
                    raise ValueError(f"unmapped key {key!r}: layer {layer} but only {cfg.depth} "
                                     "layers are built")
                if layer in copies:
                    raise ValueError(f"duplicate key {key!r}")
                copies[layer] = (key, _to_numpy(value))
                continue
            if key in aliases or key in aliases.values():
                canonical = aliases.get(key, key)
                if canonical in seen_alias:
                    raise ValueError(f"duplicate key {key!r}: {seen_alias[canonical]!r} already "
                                     f"gives {canonical!r}")
                seen_alias[canonical] = key
                key = canonical
            yield key, value

    params = state_to_params(stream(), rules(cfg), prefix=prefix, ignore=ignore,
                             num_layers=cfg.depth)
    if copies:
        table = params["encoder"]["rel_pos_embedding"]
        for key, w in copies.values():
            if w.shape != table.shape or w.dtype != table.dtype or w.tobytes() != table.tobytes():
                raise ValueError(f"key {key!r} differs from layer 0's relative position table "
                                 f"{prefix + _REL_KEY.format(0)!r}; BEATs shares one table")
    return params


def params_to_beats(params: Mapping[str, Any], cfg: BEATsConfig, *, prefix: str = "",
                    parametrized: bool = False) -> dict[str, np.ndarray]:
    """`BEATs(cfg)` params -> checkpoint keys (numpy); inverse of `beats_to_params`.

    Args:
      params: our params tree (flax boxes are unboxed).
      cfg: the model's config.
      prefix: prepended to every key.
      parametrized: name the weight-norm tensors as TDC's module does
        (`parametrizations.weight.original0/1`) instead of `weight_g` / `weight_v`.

    Returns:
      Every key of the original module's `state_dict()`, the relative position table once per
      layer.

    Raises:
      ValueError: see `convert.vit_keys.params_to_state`.
    """
    out = params_to_state(params, rules(cfg), prefix=prefix, num_layers=cfg.depth)
    if cfg.relative_position_embedding:
        table = out[prefix + _REL_KEY.format(0)]
        for layer in range(1, cfg.depth):
            out[prefix + _REL_KEY.format(layer)] = table.copy()
    if parametrized:
        for new, old in {v: k for k, v in _WN_NEW.items()}.items():
            out[prefix + old] = out.pop(prefix + new)
    return out


# Fields of the original `BEATsConfig` that only matter for training the original (dropouts,
# layer drop, gradient scaling between layers): accepted and not modelled.
_TRAINING_ONLY = ("dropout", "attention_dropout", "activation_dropout", "encoder_layerdrop",
                  "dropout_input", "predictor_dropout", "layer_wise_gradient_decay_ratio")
_RENAMES = {"encoder_embed_dim": "width", "encoder_layers": "depth",
            "encoder_attention_heads": "num_heads", "encoder_ffn_embed_dim": "mlp_dim",
            "input_patch_size": "patch_size", "embed_dim": "patch_dim",
            "activation_fn": "act"}
_SAME = ("conv_bias", "layer_norm_first", "deep_norm", "conv_pos", "conv_pos_groups",
         "relative_position_embedding", "num_buckets", "max_distance", "gru_rel_pos")
# The original class's defaults, for keys a checkpoint's cfg leaves out.
_ORIGINAL_DEFAULTS = dict(input_patch_size=-1, embed_dim=512, conv_bias=False, encoder_layers=12,
                          encoder_embed_dim=768, encoder_ffn_embed_dim=3072,
                          encoder_attention_heads=12, activation_fn="gelu",
                          layer_norm_first=False, deep_norm=False, conv_pos=128,
                          conv_pos_groups=16, relative_position_embedding=False,
                          num_buckets=320, max_distance=1280, gru_rel_pos=False,
                          finetuned_model=False, predictor_class=527)


def config_from_beats(cfg: Mapping[str, Any], **overrides: Any) -> BEATsConfig:
    """`BEATsConfig` from an original BEATs config dict (a checkpoint's `"cfg"`).

    Keys missing from `cfg` take the original `BEATsConfig` class's defaults (note: they differ
    from the released models', e.g. `deep_norm=False`, `max_distance=1280`).

    Args:
      cfg: the original config dict.
      **overrides: further `BEATsConfig` fields (dtype, remat, ...).

    Raises:
      ValueError: for an unknown key, an unsupported activation (`glu`) or patch size, or an
        inconsistent config.
    """
    known = set(_ORIGINAL_DEFAULTS) | set(_TRAINING_ONLY)
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ValueError(f"unknown BEATs config keys {unknown}")
    c = {**_ORIGINAL_DEFAULTS, **dict(cfg)}
    if c["activation_fn"] == "glu":
        raise ValueError("activation_fn 'glu' (GLU_Linear FFN) is not supported")
    if c["input_patch_size"] <= 0:
        raise ValueError(f"input_patch_size must be positive, got {c['input_patch_size']}")
    fields = {ours: c[orig] for orig, ours in _RENAMES.items()}
    fields.update({k: c[k] for k in _SAME})
    fields["num_classes"] = int(c["predictor_class"]) if c["finetuned_model"] else 0
    fields.update(overrides)
    return make_config(**fields)


def load_checkpoint(path: str, **overrides: Any) -> tuple[BEATsConfig, dict]:
    """Reads a released BEATs `.pt` checkpoint (`{"cfg": dict, "model": state_dict}`).

    Needs torch (loaded with `weights_only=True`, so no code in the file runs).

    Returns:
      (`config_from_beats(ckpt["cfg"], **overrides)`, `beats_to_params(ckpt["model"], cfg)`).

    Raises:
      ValueError: see `config_from_beats` and `beats_to_params`.
    """
    import torch  # noqa: PLC0415 (optional dependency, only for .pt files)

    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    cfg = config_from_beats(ckpt["cfg"], **overrides)
    return cfg, beats_to_params(ckpt["model"], cfg)
