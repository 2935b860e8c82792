"""SigLIP vision tower: HF `SiglipVisionModel` state dict <-> `longvid_jax.models.vit.ViT` params.

Also holds the strict key-table machinery (`Rule`, `state_to_params`, `params_to_state`) that
`whisper_keys.py` reuses.

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
    """

    hf: str
    path: tuple[str, ...]
    transform: str
    shape: tuple[int, ...]

    @property
    def layered(self) -> bool:
        return "{}" in self.hf

    @property
    def regex(self) -> re.Pattern:
        return re.compile(re.escape(self.hf).replace(r"\{\}", r"(\d+)"))

    @property
    def hf_shape(self) -> tuple[int, ...]:
        return TRANSFORMS[self.transform][2](self.shape)


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
        if len(matches) > 1:
            raise ValueError(f"key {key!r} matches several table rows")
        i, m = matches[0]
        rule = rules[i]
        layer = int(m.group(1)) if rule.layered else -1
        if layer >= num_layers:
            raise ValueError(f"unmapped key {key!r}: layer {layer} but only {num_layers} layers "
                             "are built; pass its prefix in `ignore` to drop it")
        if (i, layer) in found:
            raise ValueError(f"duplicate key {key!r}: {found[i, layer][0]!r} already maps to "
                             f"{'/'.join(rule.path)}" + (f" layer {layer}" if layer >= 0 else ""))
        w = _to_numpy(value)
        if tuple(w.shape) != rule.hf_shape:
            raise ValueError(f"key {key!r}: shape {tuple(w.shape)}, expected {rule.hf_shape}")
        found[i, layer] = (key, np.ascontiguousarray(TRANSFORMS[rule.transform][0](w, rule.shape)))
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

    flat = _flatten(nn.meta.unbox(params))
    paths = {r.path for r in rules}
    extra = sorted("/".join(p) for p in flat if p not in paths)
    if extra:
        raise ValueError(f"parameters not in the key table: {extra}")
    out: dict[str, np.ndarray] = {}
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
            out[prefix + rule.hf.format(layer)] = np.ascontiguousarray(to_hf(wl, rule.hf_shape))
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


def block_rules(*, hf_layer: str, names: Mapping[str, str], width: int, num_heads: int,
                mlp_dim: int, k_bias: bool, path: tuple[str, ...] = ("encoder", "layers")
                ) -> list[Rule]:
    """Table rows of one `vit.EncoderBlock` stacked under `path`.

    Args:
      hf_layer: HF key template of a layer, e.g. `"encoder.layers.{}."`.
      names: HF sub-module name for each of ours: `ln1, ln2, q, k, v, o, fc1, fc2`.
      k_bias: whether the k projection has a bias.
    """
    d, n, m = width, num_heads, mlp_dim
    h = d // n
    # (ours, HF leaf, our leaf, transform, our shape)
    rows = [
        ("ln1", "weight", "scale", "copy", (d,)),
        ("ln1", "bias", "bias", "copy", (d,)),
        ("q", "weight", "kernel", "heads_in", (d, n, h)),
        ("q", "bias", "bias", "heads_bias", (n, h)),
        ("k", "weight", "kernel", "heads_in", (d, n, h)),
        *([("k", "bias", "bias", "heads_bias", (n, h))] if k_bias else []),
        ("v", "weight", "kernel", "heads_in", (d, n, h)),
        ("v", "bias", "bias", "heads_bias", (n, h)),
        ("o", "weight", "kernel", "heads_out", (n, h, d)),
        ("o", "bias", "bias", "copy", (d,)),
        ("ln2", "weight", "scale", "copy", (d,)),
        ("ln2", "bias", "bias", "copy", (d,)),
        ("fc1", "weight", "kernel", "linear", (d, m)),
        ("fc1", "bias", "bias", "copy", (m,)),
        ("fc2", "weight", "kernel", "linear", (m, d)),
        ("fc2", "bias", "bias", "copy", (d,)),
    ]
    return [Rule(f"{hf_layer}{names[ours]}.{hf_leaf}", path + (ours, leaf), tf, shape)
            for ours, hf_leaf, leaf, tf, shape in rows]


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
