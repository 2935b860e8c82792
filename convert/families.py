"""Registry of the checkpoint families `convert.import_hf` / `convert.export_hf` handle.

Each family names its key module (`convert/<family>_keys.py`), which provides the contract

    config_from_hf(hf_config: dict) -> our module config (frozen dataclass)
    hf_to_params(state, cfg, **layout.kwargs) -> nested dict of NumPy arrays
    params_to_hf(params, cfg, **layout.kwargs) -> dict[HF key, np.ndarray]

and how a checkpoint's keys sit (`Layout`): the key-module arguments (key prefix, Q-Former
flavour, query-token key), read off the key names, and the key prefixes that are declared
ignored (dropped before conversion, or kept verbatim with `--keep-ignored`). Every other key
goes to the key module, which rejects unmapped, missing or duplicate keys and wrong shapes.

  family       model_type (config.json)                 HF class (export loads with)
  qwen2        qwen2                                     Qwen2ForCausalLM
  llama        llama                                     LlamaForCausalLM
  siglip       siglip_vision_model, siglip (vision tower) SiglipVisionModel
  dinov2       dinov2                                    Dinov2Model
  clip         clip_vision_model, clip (vision tower)    CLIPVisionModel(WithProjection)
  whisper      whisper (encoder; decoder ignored)        WhisperModel / ...ForConditionalGeneration
  blip2        blip_2_qformer, blip-2 (Q-Former)         Blip2QFormerModel / Blip2Model
  instructblip instructblip_qformer, instructblip        InstructBlipQFormerModel / ...

The decoder families also convert tensor by tensor (`tensor_converter`, built on
`decoder_keys.convert_hf_tensor` and `decoder_keys.hf_keys`), so a 7B checkpoint is written to
orbax in groups without ever holding the whole tree; the other families are at most ~1B
parameters and go through `hf_to_params` whole.
"""

import dataclasses
import importlib
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where a family's tensors sit in one checkpoint.

    Attributes:
      kwargs: keyword arguments of the key module's `hf_to_params` / `params_to_hf` (e.g.
        `prefix`, `flavor`, `query_tokens_key`); JSON-serialisable (kept in
        `longvid_config.json` so the export writes the same names).
      ignored: key prefixes dropped on import (each matches at least one key of the
        checkpoint): other towers, heads and decoders that our module does not build.
      hf_class: the `transformers` class an exported folder loads with: the checkpoint's own
        architecture. From a multi-part checkpoint (SiglipModel, CLIPModel, WhisperModel,
        Blip2Model ...) the export holds the converted part under its original names, plus
        the ignored parts when imported with `--keep-ignored` (then it is complete).
      config_kwargs: keyword arguments of the key module's `config_from_hf` that only the
        keys tell (CLIP: `with_projection`).
    """

    kwargs: dict[str, Any]
    ignored: tuple[str, ...]
    hf_class: str
    config_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"kwargs": dict(self.kwargs), "ignored": list(self.ignored),
                "hf_class": self.hf_class, "config_kwargs": dict(self.config_kwargs)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Layout":
        return cls(dict(d["kwargs"]), tuple(d["ignored"]), d["hf_class"],
                   dict(d.get("config_kwargs", {})))

    def is_ignored(self, key: str) -> bool:
        return key.startswith(self.ignored)


LayoutFn = Callable[[Mapping[str, Any], Sequence[str]], Layout]


@dataclasses.dataclass(frozen=True)
class Family:
    """One checkpoint family.

    Attributes:
      name: registry name (`--family`).
      keys_module: the key-table module, e.g. `convert.decoder_keys`.
      model_types: config.json `model_type`s detected as this family.
      architectures: config.json `architectures` entries detected as this family.
      layout_fn: (config.json dict, checkpoint keys) -> `Layout`.
      config_to_hf_fn: (our config, HF class name) -> config.json dict, for exports without a
        kept original config; None if not implemented.
      streaming: tensor-by-tensor conversion is available (`tensor_converter`).
    """

    name: str
    keys_module: str
    model_types: tuple[str, ...]
    architectures: tuple[str, ...]
    layout_fn: LayoutFn
    config_to_hf_fn: Callable[[Any, str], dict[str, Any]] | None = None
    streaming: bool = False

    @property
    def module(self):
        """The key module (imported on first use)."""
        try:
            return importlib.import_module(self.keys_module)
        except ImportError as e:
            raise ImportError(f"family {self.name!r} needs {self.keys_module}, which cannot be "
                              f"imported ({e})") from e

    def _contract(self, name: str) -> Callable:
        fn = getattr(self.module, name, None)
        if fn is None:
            raise NotImplementedError(f"{self.keys_module} has no {name}() yet (family "
                                      f"{self.name!r})")
        return fn

    def config_from_hf(self, hf_config: Mapping[str, Any], layout: Layout | None = None) -> Any:
        """Our module config from a config.json dict (and what the checkpoint's keys tell)."""
        kwargs = {} if layout is None else layout.config_kwargs
        return self._contract("config_from_hf")(dict(hf_config), **kwargs)

    def layout(self, hf_config: Mapping[str, Any], keys: Sequence[str]) -> Layout:
        """The `Layout` of a checkpoint with these keys."""
        return self.layout_fn(hf_config, list(keys))

    def hf_to_params(self, state: Any, cfg: Any, layout: Layout) -> dict:
        """`hf_to_params` of the key module with the layout's arguments."""
        return self._contract("hf_to_params")(state, cfg, **layout.kwargs)

    def params_to_hf(self, params: Mapping[str, Any], cfg: Any,
                     layout: Layout) -> dict[str, np.ndarray]:
        """`params_to_hf` of the key module with the layout's arguments."""
        return self._contract("params_to_hf")(params, cfg, **layout.kwargs)

    def tensor_converter(self, cfg: Any, keys: Sequence[str]) -> "DecoderStream | None":
        """A per-tensor converter (decoders), or None: convert with `hf_to_params` whole."""
        if not self.streaming:
            return None
        return DecoderStream(self.module, cfg, keys)

    def config_to_hf(self, cfg: Any, hf_class: str) -> dict[str, Any]:
        """A config.json dict for `cfg` (exports without a kept original config).

        Raises:
          NotImplementedError: for families without a builder (keep the original config).
        """
        if self.config_to_hf_fn is None:
            raise NotImplementedError(
                f"building config.json for family {self.name!r} is not implemented; keep the "
                "original config.json beside the checkpoint (import_hf does)")
        return self.config_to_hf_fn(cfg, hf_class)


# ----------------------------------------------------------------------------------------------
# Tensor-by-tensor conversion (decoders).


class DecoderStream:
    """Strict per-tensor conversion of a Qwen2 / Llama state dict (same result as
    `decoder_keys.hf_to_params`, without holding the tree).

    `convert(key, array)` returns the `(path, array)` leaves to write for one tensor (none for
    the derived `rotary_emb.inv_freq` buffers and a tied `lm_head.weight`); `finish()` raises
    for missing keys. A tied `lm_head.weight` is checked against the embedding as
    `hf_to_params` does (whichever comes first is held until the other arrives).

    Args:
      keys_module: `convert.decoder_keys`.
      cfg: the `DecoderConfig`.
      keys: every key of the checkpoint (to know whether a tied head will come).

    Raises (ValueError, naming the key): unmapped, duplicate or missing keys, shape mismatches,
      a tied head that differs from the embedding.
    """

    _LM_HEAD, _EMBED = "lm_head.weight", "model.embed_tokens.weight"

    def __init__(self, keys_module: Any, cfg: Any, keys: Sequence[str]):
        self._keys = keys_module
        self.cfg = cfg
        self._seen: set[str] = set()
        self._check_head = bool(cfg.tie_embeddings) and self._LM_HEAD in set(keys)
        self._held: dict[str, np.ndarray] = {}  # tied head / embedding awaiting the other

    def convert(self, key: str, array: np.ndarray) -> list[tuple[tuple[str, ...], np.ndarray]]:
        if key in self._seen:
            raise ValueError(f"duplicate key {key!r}")
        self._seen.add(key)
        if self.cfg.tie_embeddings and key == self._LM_HEAD:
            expected = (self.cfg.vocab_size, self.cfg.hidden_size)
            if tuple(array.shape) != expected:
                raise ValueError(f"{key}: shape {tuple(array.shape)} != expected {expected}")
            self._hold(self._LM_HEAD, array)
            return []
        out = self._keys.convert_hf_tensor(key, array, self.cfg)
        if out is None:
            return []
        if self._check_head and key == self._EMBED:
            self._hold(self._EMBED, out[1])
        return [out]

    def _hold(self, key: str, array: np.ndarray) -> None:
        self._held[key] = array
        if len(self._held) == 2:
            if not np.array_equal(self._held[self._LM_HEAD], self._held[self._EMBED]):
                raise ValueError(f"{self._LM_HEAD} differs from {self._EMBED} but "
                                 "tie_embeddings=True")
            self._held.clear()

    def finish(self) -> None:
        """Raises ValueError for keys the config needs that did not come."""
        missing = [k for k in self._keys.hf_keys(self.cfg) if k not in self._seen]
        if missing:
            raise ValueError(f"missing HF key(s) {missing[:8]}"
                             f"{' ...' if len(missing) > 8 else ''} ({len(missing)} in all)")
        self._held.clear()


# ----------------------------------------------------------------------------------------------
# Layouts.


def _prefix_of(keys: Sequence[str], suffix: str, family: str) -> str:
    """The unique prefix `p` with `p + suffix` among the keys."""
    prefixes = sorted({k[:-len(suffix)] for k in keys if k.endswith(suffix)})
    if len(prefixes) != 1:
        raise ValueError(f"cannot locate the {family} tensors: "
                         + (f"no key ends with {suffix!r}" if not prefixes
                            else f"several keys end with {suffix!r}: prefixes {prefixes}"))
    return prefixes[0]


def _present(keys: Sequence[str], prefixes: Sequence[str]) -> tuple[str, ...]:
    """The prefixes that start at least one key (so every ignored prefix is used)."""
    return tuple(p for p in prefixes if any(k.startswith(p) for k in keys))


def _architecture(hf_config: Mapping[str, Any], default: str) -> str:
    archs = hf_config.get("architectures") or []
    return archs[0] if archs else default


def _decoder_layout(default_class: str) -> LayoutFn:
    def layout(hf_config, keys):
        return Layout({}, (), _architecture(hf_config, default_class))
    return layout


def _siglip_layout(hf_config, keys):
    prefix = _prefix_of(keys, "embeddings.patch_embedding.weight", "SigLIP vision")
    ignored = _present(keys, (prefix + "head.", "text_model.", "logit_scale", "logit_bias"))
    return Layout({"prefix": prefix}, ignored, _architecture(hf_config, "SiglipVisionModel"))


def _dinov2_layout(hf_config, keys):
    prefix = _prefix_of(keys, "embeddings.patch_embeddings.projection.weight", "DINOv2")
    ignored = _present(keys, ("classifier.",))  # Dinov2ForImageClassification's head
    return Layout({"prefix": prefix}, ignored, _architecture(hf_config, "Dinov2Model"))


def _clip_layout(hf_config, keys):
    prefix = _prefix_of(keys, "embeddings.class_embedding", "CLIP vision")
    ignored = _present(keys, ("text_model.", "text_projection.", "logit_scale"))
    projected = "visual_projection.weight" in keys
    default = "CLIPVisionModelWithProjection" if projected else "CLIPVisionModel"
    return Layout({"prefix": prefix}, ignored, _architecture(hf_config, default),
                  {"with_projection": projected})


def _whisper_layout(hf_config, keys):
    prefix = _prefix_of(keys, "conv1.weight", "Whisper encoder")
    decoder = re.sub(r"encoder\.$", "decoder.", prefix) if prefix.endswith("encoder.") else None
    ignored = _present(keys, ((decoder,) if decoder else ()) + ("proj_out.",))
    return Layout({"prefix": prefix}, ignored, _architecture(hf_config, "WhisperModel"))


def _qformer_layout(flavor: str, standalone_class: str) -> LayoutFn:
    def layout(hf_config, keys):
        full = any(k.startswith("qformer.") for k in keys)
        prefix = "qformer." if full else ""
        kwargs = {"flavor": flavor, "prefix": prefix,
                  "query_tokens_key": "query_tokens" if "query_tokens" in keys else None}
        ignored = (_present(keys, ("vision_model.", "language_projection.", "language_model."))
                   if full else ())
        return Layout(kwargs, ignored, _architecture(hf_config, standalone_class))
    return layout


# ----------------------------------------------------------------------------------------------
# config.json from our config (decoders).


def _decoder_config_to_hf(cfg: Any, hf_class: str) -> dict[str, Any]:
    """config.json of a Qwen2 / Llama `DecoderConfig` (via the transformers config class)."""
    import transformers  # noqa: PLC0415

    qwen = hf_class.startswith("Qwen2")
    if qwen and not cfg.qkv_bias:
        raise ValueError("a Qwen2 config needs qkv_bias=True")
    if not qwen and cfg.qkv_bias:
        raise ValueError("a Llama config cannot express qkv_bias=True without o_proj bias")
    v5 = int(transformers.__version__.split(".")[0]) >= 5
    fields = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                  intermediate_size=cfg.mlp_dim, num_hidden_layers=cfg.num_layers,
                  num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
                  rms_norm_eps=cfg.rms_eps, tie_word_embeddings=cfg.tie_embeddings,
                  hidden_act="silu", architectures=[hf_class])
    if cfg.head_dim != cfg.hidden_size // cfg.num_heads:
        if qwen:
            raise ValueError(f"Qwen2 configs derive head_dim = hidden/heads; got {cfg.head_dim}")
        fields["head_dim"] = cfg.head_dim
    rope: dict[str, Any] = {"rope_type": "default"}
    if cfg.rope_scaling is not None:
        rope = {"rope_type": "llama3", **dict(cfg.rope_scaling)}
        if qwen:
            raise ValueError("Qwen2 configs with llama3 rope scaling are not supported")
    if v5:
        fields["rope_parameters"] = {**rope, "rope_theta": cfg.rope_theta}
    else:
        fields["rope_theta"] = cfg.rope_theta
        fields["rope_scaling"] = None if cfg.rope_scaling is None else rope
    cls = transformers.Qwen2Config if qwen else transformers.LlamaConfig
    return cls(**fields).to_dict()


# ----------------------------------------------------------------------------------------------
# The registry.


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("qwen2", "convert.decoder_keys", ("qwen2",), ("Qwen2ForCausalLM",),
           _decoder_layout("Qwen2ForCausalLM"), _decoder_config_to_hf, streaming=True),
    Family("llama", "convert.decoder_keys", ("llama",), ("LlamaForCausalLM",),
           _decoder_layout("LlamaForCausalLM"), _decoder_config_to_hf, streaming=True),
    Family("siglip", "convert.vit_keys", ("siglip_vision_model", "siglip"),
           ("SiglipVisionModel", "SiglipModel"), _siglip_layout),
    Family("dinov2", "convert.dinov2_keys", ("dinov2",), ("Dinov2Model",), _dinov2_layout),
    Family("clip", "convert.clip_keys", ("clip_vision_model", "clip"),
           ("CLIPVisionModel", "CLIPVisionModelWithProjection", "CLIPModel"), _clip_layout),
    Family("whisper", "convert.whisper_keys", ("whisper",),
           ("WhisperModel", "WhisperForConditionalGeneration", "WhisperForAudioClassification"),
           _whisper_layout),
    Family("blip2", "convert.qformer_keys", ("blip_2_qformer", "blip-2"),
           ("Blip2QFormerModel", "Blip2Model", "Blip2ForConditionalGeneration"),
           _qformer_layout("blip2", "Blip2QFormerModel")),
    Family("instructblip", "convert.qformer_keys", ("instructblip_qformer", "instructblip"),
           ("InstructBlipQFormerModel", "InstructBlipForConditionalGeneration"),
           _qformer_layout("instructblip", "InstructBlipQFormerModel")),
)}


def get(name: str) -> Family:
    """The family called `name`.

    Raises:
      ValueError: unknown name (listing the known ones).
    """
    if name not in FAMILIES:
        raise ValueError(f"unknown family {name!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[name]


def detect(hf_config: Mapping[str, Any]) -> Family:
    """The family of a config.json dict, by `model_type`, else by `architectures`.

    Raises:
      ValueError: neither matches a family (naming both and the known families).
    """
    model_type = hf_config.get("model_type")
    for fam in FAMILIES.values():
        if model_type in fam.model_types:
            return fam
    for arch in hf_config.get("architectures") or []:
        for fam in FAMILIES.values():
            if arch in fam.architectures:
                return fam
    raise ValueError(f"cannot detect the family of config.json (model_type={model_type!r}, "
                     f"architectures={hf_config.get('architectures')}); pass --family, one of "
                     f"{sorted(FAMILIES)}")
