"""SigLIP vision tower: HF `SiglipVisionModel` state dict <-> `longvid_jax.models.vit.ViT` params.

Also holds the strict key-table machinery (`Rule`, `TRANSFORMS`, `state_to_params`,
`params_to_state`, `block_rules`) that `whisper_keys.py`, `clip_keys.py`, `dinov2_keys.py` and
`eva_keys.py` reuse, and `config_from_hf` for SigLIP vision configs.

HF keys (after `prefix`, default `"vision_model."` as in the `google/siglip-*` safetensors and
`SiglipModel`; `""` for a bare `SiglipVisionModel.state_dict()` of transformers >= 5; LLaVA
checkpoints use e.g. `"model.vision_tower.vision_tower.vision_model."`):

  HF key [HF shape]                          ours (shape; L stacked first)   transform
  embeddings.patch_embedding.weight [D,C,p,p] patch_embed/kernel (p,p,C,D)    patch
  embeddings.patch_embedding.bias [D]         patch_embed/bias (D)            copy
  embeddings.position_embedding.weight [P,D]  pos_embedding (P,D)             copy
  encoder.layers.{i}. + (L = layers, our leaves under encoder/layers/):
    layer_norm{1,2}.{weight,bias} [D]         ln{1,2}/{scale,bias} (L,D)      copy
    self_attn.{q,k,v}_proj.weight [N*H,D]     {q,k,v}/kernel (L,D,N,H)        heads_in
    self_attn.{q,k,v}_proj.bias [N*H]         {q,k,v}/bias (L,N,H)            heads_bias
    self_attn.out_proj.weight [D,N*H]         o/kernel (L,N,H,D)              heads_out
    self_attn.out_proj.bias [D]               o/bias (L,D)                    copy
    mlp.fc{1,2}.weight [out,in]               fc{1,2}/kernel (L,in,out)       linear
    mlp.fc{1,2}.bias [out]                    fc{1,2}/bias (L,out)            copy
  post_layernorm.{weight,bias} [D]            post_ln/{scale,bias} (D)        copy

Strictness: every key must map (or start with one of the `ignore` prefixes, each of which must
match something), every table entry must be present, no entry twice, every tensor's shape is
checked; violations raise ValueError naming the key. Nothing is dropped silently: the pooling
`head.*` of SigLIP, the layers past `depth - drop_last_layers` and `post_layernorm` when
`post_ln=False` must be ignored explicitly, e.g. for LLaVA-OV from a SigLIP checkpoint:
`ignore=("vision_model.head.", "vision_model.encoder.layers.26.", "vision_model.post_layernorm.")`.

Arrays keep their dtype (conversion is lossless); cast afterwards if needed.
"""

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from longvid_jax.models import vit
from longvid_jax.models.vit import ViTConfig

# --------------------------------------------------------------------------------------------
# Generic strict key-table machinery.


def _heads_in_hf(s):  # (D, N, H) -> [N*H, D]
    return (s[1] * s[2], s[0])


def _heads_out_hf(s):  # (N, H, D) -> [D, N*H]
    return (s[2], s[0] * s[1])


# name -> (hf -> ours given our shape, ours -> hf given hf shape, our shape -> hf shape)
TRANSFORMS: dict[str, tuple[Callable, Callable, Callable]] = {
    "copy": (lambda w, s: w, lambda w, s: w, lambda s: tuple(s)),
    "linear": (lambda w, s: w.T, lambda w, s: w.T, lambda s: tuple(s[::-1])),
    "heads_in": (lambda w, s: w.T.reshape(s), lambda w, s: w.reshape(s[1], s[0]).T,
                 _heads_in_hf),
    "heads_bias": (lambda w, s: w.reshape(s), lambda w, s: w.reshape(s),
                   lambda s: (s[0] * s[1],)),
    "heads_out": (lambda w, s: w.T.reshape(s), lambda w, s: w.reshape(s[1], s[0]).T,
                  _heads_out_hf),
    # Conv2d [D, C, y, x] <-> (y, x, C, D).
    "patch": (lambda w, s: w.transpose(2, 3, 1, 0), lambda w, s: w.transpose(3, 2, 0, 1),
              lambda s: (s[3], s[2], s[0], s[1])),
    # Conv1d [D, C, u] <-> (u, C, D).
    "conv1d": (lambda w, s: w.transpose(2, 1, 0), lambda w, s: w.transpose(2, 1, 0),
               lambda s: (s[2], s[1], s[0])),
    # HF keeps one / two leading unit axes: [1, *s] <-> s (e.g. DINOv2 `position_embeddings`
    # [1, 1+P, D]) and [1, 1, *s] <-> s (`cls_token` [1, 1, D]).
    "lead1": (lambda w, s: w.reshape(s), lambda w, s: w.reshape(s), lambda s: (1, *s)),
    "lead2": (lambda w, s: w.reshape(s), lambda w, s: w.reshape(s), lambda s: (1, 1, *s)),
}


@dataclasses.dataclass(frozen=True)
class Rule:
    """One row of a key table.

    Attributes:
      hf: HF key after the prefix; `{}` stands for the layer index in per-layer rules.
      path: our parameter path (per-layer rules: the path of the stacked parameter, whose
        leading axis is the layer).
      transform: a key of `TRANSFORMS`.
      shape: our shape (per layer for per-layer rules).
      part: `(index, count)` for a fused HF tensor: the HF tensor is `count` equal chunks
        along its axis 0 and this row maps chunk `index` (e.g. EVA's `attn.qkv.weight`
        [3*N*H, D] -> q, k, v; DINOv2's SwiGLU `mlp.weights_in` -> gate, up). The rows of
        one fused key must give every index once and agree on the HF shape. `None`: the
        whole tensor.
    """

    hf: str
    path: tuple[str, ...]
    transform: str
    shape: tuple[int, ...]
    part: tuple[int, int] | None = None

    @property
    def layered(self) -> bool:
        return "{}" in self.hf

    @property
    def regex(self) -> re.Pattern:
        return re.compile(re.escape(self.hf).replace(r"\{\}", r"(\d+)"))

    @property
    def part_shape(self) -> tuple[int, ...]:
        """HF shape of the chunk this row maps (the whole tensor's without `part`)."""
        return tuple(TRANSFORMS[self.transform][2](self.shape))

    @property
    def hf_shape(self) -> tuple[int, ...]:
        """HF shape of the whole tensor."""
        s = self.part_shape
        return s if self.part is None else (s[0] * self.part[1], *s[1:])


def check_table(rules: list[Rule]) -> None:
    """Checks a key table: unique HF keys and our paths, fused parts complete and consistent.

    Raises:
      ValueError: naming the offending key or path.
    """
    paths = [r.path for r in rules]
    dup = sorted({"/".join(p) for p in paths if paths.count(p) > 1})
    if dup:
        raise ValueError(f"key table maps several rows to {dup}")
    groups: dict[str, list[Rule]] = {}
    for r in rules:
        groups.setdefault(r.hf, []).append(r)
    for hf, rows in groups.items():
        if len(rows) == 1 and rows[0].part is None:
            continue
        if any(r.part is None for r in rows):
            raise ValueError(f"key table: {hf!r} appears in several rows")
        count = rows[0].part[1]
        if sorted(r.part for r in rows) != [(i, count) for i in range(count)]:
            raise ValueError(f"key table: parts of {hf!r} are {[r.part for r in rows]}")
        if len({r.hf_shape for r in rows}) != 1:
            raise ValueError(f"key table: parts of {hf!r} disagree on the shape")


def _to_numpy(v: Any) -> np.ndarray:
    """numpy view of a numpy / jax / torch array, bfloat16 included, without changing bits."""
    if type(v).__module__.startswith("torch"):
        v = v.detach().cpu()
        if str(v.dtype) == "torch.bfloat16":
            import ml_dtypes  # noqa: PLC0415 (a jax dependency)
            import torch  # noqa: PLC0415 (only reached with torch tensors)

            return v.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return v.numpy()
    return np.asarray(v)


def _items(state: Mapping[str, Any] | Iterable[tuple[str, Any]]):
    return state.items() if isinstance(state, Mapping) else state


def state_to_params(state: Mapping[str, Any] | Iterable[tuple[str, Any]], rules: list[Rule], *,
                    prefix: str, ignore: tuple[str, ...], num_layers: int) -> dict:
    """Converts an HF state dict with a key table, strictly.

    Args:
      state: HF key -> tensor (numpy, torch or jax), or an iterable of (key, tensor) pairs
        (e.g. chained safetensors shards, where a key may repeat).
      rules: the key table.
      prefix: prepended to every `Rule.hf`.
      ignore: full-key prefixes to skip; each must match at least one key.
      num_layers: per-layer rules expect layers 0 .. num_layers - 1.

    Returns:
      Nested dict of numpy arrays (our params tree, what `model.apply({"params": ...})` takes).

    Raises:
      ValueError: naming the key, for an unmapped, duplicate or missing key, a layer index
        beyond `num_layers`, a shape mismatch, or an unused ignore prefix.
    """
    check_table(rules)
    compiled = [(r, re.compile(re.escape(prefix) + r.regex.pattern)) for r in rules]
    found: dict[tuple[int, int], tuple[str, np.ndarray]] = {}
    used_ignore = set()
    for key, value in _items(state):
        hits = [p for p in ignore if key.startswith(p)]
        if hits:
            used_ignore.update(hits)
            continue
        matches = [(i, m) for i, (r, rx) in enumerate(compiled) if (m := rx.fullmatch(key))]
        if not matches:
            raise ValueError(f"unmapped key {key!r} (prefix {prefix!r}); pass a prefix of it "
                             "in `ignore` if it is not needed")
        if len({rules[i].hf for i, _ in matches}) > 1:
            raise ValueError(f"key {key!r} matches several table rows")
        w = None
        for i, m in matches:  # several rows only for the parts of a fused tensor
            rule = rules[i]
            layer = int(m.group(1)) if rule.layered else -1
            if layer >= num_layers:
                raise ValueError(f"unmapped key {key!r}: layer {layer} but only {num_layers} "
                                 "layers are built; pass its prefix in `ignore` to drop it")
            if (i, layer) in found:
                raise ValueError(f"duplicate key {key!r}: {found[i, layer][0]!r} already maps to "
                                 f"{'/'.join(rule.path)}"
                                 + (f" layer {layer}" if layer >= 0 else ""))
            if w is None:
                w = _to_numpy(value)
                if tuple(w.shape) != rule.hf_shape:
                    raise ValueError(f"key {key!r}: shape {tuple(w.shape)}, expected "
                                     f"{rule.hf_shape}")
            chunk = w if rule.part is None else np.split(w, rule.part[1], axis=0)[rule.part[0]]
            found[i, layer] = (key, np.ascontiguousarray(
                TRANSFORMS[rule.transform][0](chunk, rule.shape)))
    unused = [p for p in ignore if p not in used_ignore]
    if unused:
        raise ValueError(f"ignore prefixes {unused} match no key")

    params: dict = {}
    for i, rule in enumerate(rules):
        layers = range(num_layers) if rule.layered else [-1]
        for layer in layers:
            if (i, layer) not in found:
                raise ValueError(f"missing key {prefix + rule.hf.format(layer)!r}")
        if rule.layered:
            value = np.stack([found[i, layer][1] for layer in layers], axis=0)
        else:
            value = found[i, -1][1]
        _set(params, rule.path, value)
    return params


def params_to_state(params: Mapping[str, Any], rules: list[Rule], *, prefix: str,
                    num_layers: int) -> dict[str, np.ndarray]:
    """Inverse of `state_to_params`: our params tree -> HF key -> numpy array.

    `params` may hold flax `LogicallyPartitioned` boxes; they are unboxed.

    Raises:
      ValueError: for a parameter missing from or not in the table, or a shape mismatch.
    """
    import flax.linen as nn  # noqa: PLC0415

    check_table(rules)
    flat = _flatten(nn.meta.unbox(params))
    paths = {r.path for r in rules}
    extra = sorted("/".join(p) for p in flat if p not in paths)
    if extra:
        raise ValueError(f"parameters not in the key table: {extra}")
    out: dict[str, np.ndarray] = {}
    parts: dict[str, dict[int, np.ndarray]] = {}
    for rule in rules:
        if rule.path not in flat:
            raise ValueError(f"missing parameter {'/'.join(rule.path)}")
        w = _to_numpy(flat[rule.path])
        want = ((num_layers,) if rule.layered else ()) + tuple(rule.shape)
        if tuple(w.shape) != want:
            raise ValueError(f"parameter {'/'.join(rule.path)}: shape {tuple(w.shape)}, "
                             f"expected {want}")
        to_hf = TRANSFORMS[rule.transform][1]
        for layer in range(num_layers) if rule.layered else [-1]:
            wl = w[layer] if rule.layered else w
            key = prefix + rule.hf.format(layer)
            value = np.ascontiguousarray(to_hf(wl, rule.part_shape))
            if rule.part is None:
                out[key] = value
            else:
                parts.setdefault(key, {})[rule.part[0]] = value
    for key, chunks in parts.items():  # fused tensors: chunks in index order along axis 0
        dtypes = {c.dtype for c in chunks.values()}
        if len(dtypes) > 1:
            raise ValueError(f"key {key!r}: its parts have dtypes {sorted(map(str, dtypes))}")
        out[key] = np.concatenate([chunks[i] for i in range(len(chunks))], axis=0)
    return out


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def _flatten(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def block_rules(*, hf_layer: str, names: Mapping[str, str | tuple[str, tuple[int, int]]],
                width: int, num_heads: int, mlp_dim: int, k_bias: bool, qkv_bias: bool = True,
                ffn: str = "mlp", layer_scale: bool = False,
                path: tuple[str, ...] = ("encoder", "layers")) -> list[Rule]:
    """Table rows of one `vit.EncoderBlock` stacked under `path`.

    Args:
      hf_layer: HF key template of a layer, e.g. `"encoder.layers.{}."`.
      names: HF sub-module name for each of ours: `ln1, ln2, q, k, v, o`, then `fc1, fc2`
        (`ffn="mlp"`) or `gate, up, down` (`ffn="swiglu"`), and `ls1, ls2` with
        `layer_scale`. The HF key is `hf_layer + name + "." + leaf` (leaf `weight` / `bias`,
        `lambda1` for a layer scale). A value `(name, (index, count))` maps chunk `index` of a
        fused tensor (see `Rule.part`). An entry `"<ours>.<leaf>"` (e.g. `"q.bias"`) overrides
        the whole key suffix of that one tensor (EVA's `attn.q_bias`).
      k_bias: whether the k projection has a bias (only when `qkv_bias`).
      qkv_bias: whether the q, k, v projections have biases.
      ffn: `"mlp"` or `"swiglu"`, as `vit.EncoderBlock.ffn`.
      layer_scale: the block has LayerScale vectors `ls1`, `ls2`.

    Raises:
      ValueError: for an unknown `ffn` or a missing name.
    """
    d, n, m = width, num_heads, mlp_dim
    h = d // n
    # (ours, HF leaf, our leaf or None for a bare array, transform, our shape)
    rows = [
        ("ln1", "weight", "scale", "copy", (d,)),
        ("ln1", "bias", "bias", "copy", (d,)),
        ("q", "weight", "kernel", "heads_in", (d, n, h)),
        *([("q", "bias", "bias", "heads_bias", (n, h))] if qkv_bias else []),
        ("k", "weight", "kernel", "heads_in", (d, n, h)),
        *([("k", "bias", "bias", "heads_bias", (n, h))] if qkv_bias and k_bias else []),
        ("v", "weight", "kernel", "heads_in", (d, n, h)),
        *([("v", "bias", "bias", "heads_bias", (n, h))] if qkv_bias else []),
        ("o", "weight", "kernel", "heads_out", (n, h, d)),
        ("o", "bias", "bias", "copy", (d,)),
        ("ln2", "weight", "scale", "copy", (d,)),
        ("ln2", "bias", "bias", "copy", (d,)),
    ]
    if ffn == "mlp":
        rows += [("fc1", "weight", "kernel", "linear", (d, m)),
                 ("fc1", "bias", "bias", "copy", (m,)),
                 ("fc2", "weight", "kernel", "linear", (m, d)),
                 ("fc2", "bias", "bias", "copy", (d,))]
    elif ffn == "swiglu":
        rows += [(g, leaf, our, tf, shape) for g in ("gate", "up") for leaf, our, tf, shape in
                 (("weight", "kernel", "linear", (d, m)), ("bias", "bias", "copy", (m,)))]
        rows += [("down", "weight", "kernel", "linear", (m, d)),
                 ("down", "bias", "bias", "copy", (d,))]
    else:
        raise ValueError(f"unknown ffn {ffn!r}")
    if layer_scale:
        rows += [("ls1", "lambda1", None, "copy", (d,)), ("ls2", "lambda1", None, "copy", (d,))]

    table = []
    for ours, hf_leaf, leaf, tf, shape in rows:
        entry = names.get(f"{ours}.{hf_leaf}")
        if entry is None:
            if ours not in names:
                raise ValueError(f"block_rules: no HF name for {ours!r}")
            entry = names[ours]
            name, part = entry if isinstance(entry, tuple) else (entry, None)
            name = f"{name}.{hf_leaf}"
        else:
            name, part = entry if isinstance(entry, tuple) else (entry, None)
        our_path = path + ((ours,) if leaf is None else (ours, leaf))
        table.append(Rule(f"{hf_layer}{name}", our_path, tf, shape, part))
    return table


# --------------------------------------------------------------------------------------------
# SigLIP.

_SIGLIP_NAMES = {"ln1": "layer_norm1", "ln2": "layer_norm2", "q": "self_attn.q_proj",
                 "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.out_proj",
                 "fc1": "mlp.fc1", "fc2": "mlp.fc2"}

DEFAULT_PREFIX = "vision_model."


def rules(cfg: ViTConfig) -> list[Rule]:
    """The SigLIP key table for `cfg` (post-LN rows only when `cfg.post_ln`)."""
    d, p, c = cfg.width, cfg.patch_size, cfg.num_channels
    table = [
        Rule("embeddings.patch_embedding.weight", ("patch_embed", "kernel"), "patch", (p, p, c, d)),
        Rule("embeddings.patch_embedding.bias", ("patch_embed", "bias"), "copy", (d,)),
        Rule("embeddings.position_embedding.weight", ("pos_embedding",), "copy",
             (cfg.num_patches, d)),
    ]
    table += block_rules(hf_layer="encoder.layers.{}.", names=_SIGLIP_NAMES, width=d,
                         num_heads=cfg.num_heads, mlp_dim=cfg.mlp_dim, k_bias=True)
    if cfg.post_ln:
        table += [Rule("post_layernorm.weight", ("post_ln", "scale"), "copy", (d,)),
                  Rule("post_layernorm.bias", ("post_ln", "bias"), "copy", (d,))]
    return table


def hf_to_params(state: Mapping[str, Any] | Iterable[tuple[str, Any]], cfg: ViTConfig, *,
                 prefix: str = DEFAULT_PREFIX, ignore: tuple[str, ...] = ()) -> dict:
    """HF SigLIP vision state dict -> `ViT(cfg)` params (numpy, source dtypes).

    Args:
      state: key -> tensor (numpy / torch / jax), or (key, tensor) pairs.
      cfg: the tower's config; `cfg.num_layers_run` layers and post-LN iff `cfg.post_ln`.
      prefix: key prefix of the vision model (see the module docstring).
      ignore: full-key prefixes to skip explicitly (e.g. `("vision_model.head.",)`).

    Raises:
      ValueError: see `state_to_params`.
    """
    return state_to_params(state, rules(cfg), prefix=prefix, ignore=tuple(ignore),
                           num_layers=cfg.num_layers_run)


def params_to_hf(params: Mapping[str, Any], cfg: ViTConfig, *,
                 prefix: str = DEFAULT_PREFIX) -> dict[str, np.ndarray]:
    """`ViT(cfg)` params -> HF SigLIP vision keys (numpy); the inverse of `hf_to_params`.

    Only what we hold comes back: no `head.*`, no dropped layers, no `post_layernorm` when
    `cfg.post_ln=False`.

    Raises:
      ValueError: see `params_to_state`.
    """
    return params_to_state(params, rules(cfg), prefix=prefix, num_layers=cfg.num_layers_run)


# --------------------------------------------------------------------------------------------
# Config.

# `transformers` `SiglipVisionConfig` defaults (a config.json lists only what differs from them,
# e.g. google/siglip-so400m-patch14-384 gives no hidden_act nor layer_norm_eps).
SIGLIP_VISION_DEFAULTS: dict[str, Any] = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    num_channels=3, image_size=224, patch_size=16, hidden_act="gelu_pytorch_tanh",
    layer_norm_eps=1e-6)


def vision_config_dict(hf_config: Mapping[str, Any], *, vision_type: str,
                       defaults: Mapping[str, Any], full_type: str | None = None
                       ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The vision part of an HF config dict, with the HF defaults filled in.

    Args:
      hf_config: a vision config dict (`model_type == vision_type`, or no model_type), or, if
        `full_type` is given, a full two-tower config dict (`model_type == full_type`) holding
        `"vision_config"`.
      vision_type, full_type: the accepted model types (e.g. `"clip_vision_model"`, `"clip"`).
      defaults: the vision config class's defaults, for keys the dict leaves out.

    Returns:
      (vision fields with defaults and square sizes as ints, the outer dict: the full config,
      or the vision one itself).

    Raises:
      ValueError: for another model type or a non-square image / patch size.
    """
    accepted = " or ".join(repr(t) for t in (full_type, vision_type) if t)
    outer = dict(hf_config)
    c = outer
    if full_type is not None and "vision_config" in outer:
        if outer.get("model_type", full_type) != full_type:
            raise ValueError(f"unsupported model_type {outer.get('model_type')!r}; expected "
                             f"{accepted}")
        c = dict(outer["vision_config"] or {})
    model_type = c.get("model_type", vision_type)
    if model_type != vision_type:
        raise ValueError(f"unsupported model_type {model_type!r}; expected {accepted}")
    c = {**defaults, **{k: v for k, v in c.items() if v is not None}}
    for key in ("image_size", "patch_size"):
        if isinstance(c[key], (list, tuple)):
            if len(set(c[key])) != 1:
                raise ValueError(f"non-square {key} {c[key]} not supported")
            c[key] = c[key][0]
    return c, outer


def config_from_hf(hf_config: Mapping[str, Any], **overrides: Any) -> ViTConfig:
    """`ViTConfig` from a `transformers` SigLIP config dict (the parsed config.json).

    Accepts a `SiglipVisionConfig` dict (model_type `siglip_vision_model`) or a full
    `SiglipConfig` dict (model_type `siglip`) holding `"vision_config"`; missing fields take the
    `SiglipVisionConfig` defaults. The pooling head (`vision_use_head`) is not modelled: its
    `head.*` keys must be ignored in `hf_to_params`.

    Args:
      hf_config: the config dict (`PretrainedConfig.to_dict()` or config.json).
      **overrides: further `ViTConfig` fields (post_ln, drop_last_layers, dtype, ...).

    Raises:
      ValueError: another model type (SigLIP2's `siglip2_vision_model` included), a
        non-square image / patch size, or unknown overrides.
    """
    c, _ = vision_config_dict(hf_config, full_type="siglip", vision_type="siglip_vision_model",
                              defaults=SIGLIP_VISION_DEFAULTS)
    fields = dict(image_size=c["image_size"], patch_size=c["patch_size"], width=c["hidden_size"],
                  depth=c["num_hidden_layers"], num_heads=c["num_attention_heads"],
                  mlp_dim=c["intermediate_size"], act=c["hidden_act"],
                  ln_eps=c["layer_norm_eps"], num_channels=c["num_channels"])
    return vit.make_config(**{**fields, **overrides})
