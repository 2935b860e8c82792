"""LoRA adapters on `Einsum` layers, chosen by a regex over module paths (PEFT `LoraLayer`).

An adapted weight computes, as PEFT `peft/tuners/lora/layer.py` `Linear.forward`,

    y = W x + b + (alpha / r) * B(A(dropout(x)))

with A initialised like PEFT (`init_lora_weights=True`: kaiming-uniform with a = sqrt(5), i.e.
U(-1/sqrt(fan_in), 1/sqrt(fan_in)); or "gaussian": N(0, 1/r)) and B zeros, so a fresh adapter
changes nothing (bitwise: the added term is exactly 0).

How adapters are switched on. Model code carries no LoRA configuration: the caller enters a
context, as it does for `nn.logical_axis_rules`,

    with lora.lora_context(config.lora):                       # init / eval / inference
        params = model.init(rng, batch)["params"]
    with lora.lora_context(config.lora, deterministic=False):  # training: dropout on
        model.apply({"params": params}, batch, rngs={"dropout": key})

and every `Einsum` / `EinsumWeights` whose module path ('/'-joined names, e.g.
"llm/layers_3/self_attn/q_proj"; "llm/layers/..." under `nn.scan`) fully matches
`LoRAConfig.targets` declares `lora_a` and `lora_b` beside its `kernel`. The context is read
while tracing, so a jitted function keeps the adapters (and dropout switch) it was traced
with. Applying params that hold adapters outside a matching context raises (instead of
silently dropping the adapters); `merge_lora` folds them into the kernels for export.

Parameters of an adapted `Einsum` with kernel shape `in_shape + out_shape` (the contracted
`fan_in_axes` must lead the kernel, as they do in every layer of this package):

    lora_a  in_shape + (r,)    logical axes: the kernel's fan-in axes + ("lora_rank",)
    lora_b  (r,) + out_shape   logical axes: ("lora_rank",) + the kernel's other axes

Their einsum equations come from the layer's: for `"BTNH,NHD->BTD"` with fan_in_axes (0, 1),
A is `"BTNH,NHr->BTr"` and B is `"BTr,rD->BTD"`. The rank axis has the logical name
`LORA_RANK` ("lora_rank"), which no sharding rule maps, so it is replicated.

Dropout (PEFT `lora_dropout`, inverted scaling by 1 / (1 - p)) acts only under
`deterministic=False`, and then needs a 'dropout' rng (`apply(..., rngs={"dropout": key})`);
modules under `nn.scan` see that rng only if the scan lists "dropout" in `split_rngs`.
"""

import contextlib
import dataclasses
import functools
import math
import re
import string
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from longvid_jax.variants import config_from_variant

LORA_RANK = "lora_rank"  # logical name of the rank axis (replicated: no rule maps it)

# TDC stage 3 (Hoar012/TDC-Video `tdc/train.py`, `find_all_linear_names`): PEFT targets the
# linear layers whose name ends in q/k/v/o/gate/up/down_proj (LLM; its q_proj as
# "self_attn.q_proj"), query/key/value/dense/decoder (LAVIS BERT Q-Former) and
# vision_proj/query_proj. PEFT matches name suffixes, so the SVA connector's
# `cross_attn.o_proj` (a Linear; here `connector/vision_sampler/layer_i/cross_attn/o`) gets an
# adapter too, while its q_proj / k_proj_i / v_proj_i (LayerNorm + Linear sequences) do not.
# In this package the BERT `attention.output.dense` is `out`, `intermediate(_query).dense` is
# `wi`, `output(_query).dense` is `wo`; the BERT `cls.predictions.decoder` head is not built
# (TDC never uses it). The simplified `VideoLLM` has no SVA, so the connector term matches
# nothing there.
TDC_TARGETS = ("llm/.*/(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
               "|compressor/qformer/.*/(query|key|value|out|wi|wo)"
               "|compressor/(vision_proj|query_proj)"
               "|connector/vision_sampler/layer_[0-9]+/cross_attn/o")

_INITS = ("kaiming_uniform", "gaussian")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """LoRA hyper-parameters (PEFT `LoraConfig`).

    Attributes:
      rank: r, the adapter rank; 0 turns LoRA off.
      alpha: lora_alpha; the update is scaled by alpha / r.
      dropout: lora_dropout, the probability of zeroing an input element of A (training only).
      targets: regex fully matched against '/'-joined module paths ("" matches nothing).
      init: "kaiming_uniform" (PEFT's default) or "gaussian" (N(0, 1/r)) for A; B is zeros.
    The adapters take the compute / storage dtypes of the layer they adapt.
    """

    rank: int = 0
    alpha: float = 8.0
    dropout: float = 0.0
    targets: str = ""
    init: str = "kaiming_uniform"

    def __post_init__(self):
        if self.rank < 0:
            raise ValueError(f"LoRA rank must be >= 0, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if self.init not in _INITS:
            raise ValueError(f"LoRA init {self.init!r} not in {_INITS}")
        try:
            re.compile(self.targets)
        except re.error as e:
            raise ValueError(f"LoRA targets {self.targets!r} is not a regex: {e}") from e

    @property
    def enabled(self) -> bool:
        return self.rank > 0 and bool(self.targets)

    @property
    def scale(self) -> float:
        """alpha / r (PEFT `scaling`)."""
        if self.rank <= 0:
            raise ValueError("LoRA scale is undefined for rank 0")
        return self.alpha / self.rank

    def targets_path(self, path: Sequence[str]) -> bool:
        """Whether the module at `path` (tuple of names) gets an adapter."""
        return self.enabled and _compiled(self.targets).fullmatch("/".join(path)) is not None


VARIANTS: dict[str, dict[str, Any]] = {
    # TDC stage 3 (`tdc/train.py` TrainingArguments: lora_r 128, lora_alpha 256, dropout 0.05).
    "tdc": {"rank": 128, "alpha": 256.0, "dropout": 0.05, "targets": TDC_TARGETS},
    # The same targets at a rank small enough for CPU tests.
    "tdc_tiny": {"rank": 4, "alpha": 8.0, "dropout": 0.05, "targets": TDC_TARGETS},
}


def make_config(variant: str | None = None, **overrides: Any) -> LoRAConfig:
    """A `LoRAConfig` from a named variant plus field overrides.

    Raises:
      ValueError: an unknown variant or field, or an invalid value.
    """
    return config_from_variant(LoRAConfig, VARIANTS, variant, overrides)


def from_dict(d: Mapping[str, Any] | LoRAConfig | None) -> LoRAConfig | None:
    """`make_config` from a dict / ConfigDict (may hold `variant`); None and rank 0 give None.

    Raises:
      ValueError: as `make_config`.
    """
    if d is None:
        return None
    if isinstance(d, LoRAConfig):
        cfg = d
    else:
        d = dict(d.to_dict() if hasattr(d, "to_dict") else d)
        cfg = make_config(d.pop("variant", None), **d)
    return cfg if cfg.enabled else None


@functools.lru_cache(maxsize=64)
def _compiled(pattern: str) -> re.Pattern:
    return re.compile(pattern)


# ----------------------------------------------------------------------------------------------
# The context.


class _State(threading.local):
    def __init__(self):
        self.config: LoRAConfig | None = None
        self.deterministic: bool = True


_STATE = _State()


@contextlib.contextmanager
def lora_context(config: Mapping[str, Any] | LoRAConfig | None, *,
                 deterministic: bool = True) -> Iterator[LoRAConfig | None]:
    """Switches LoRA adapters on for the modules traced inside (see the module docstring).

    Args:
      config: a `LoRAConfig`, a dict / ConfigDict of its fields (`config.lora`), or None;
        None or rank 0 means no adapters.
      deterministic: False applies the LoRA dropout (needs a 'dropout' rng at `apply`).

    Yields:
      The resolved config (None when off). Contexts nest; the innermost one holds.
    """
    cfg = from_dict(config)
    prev = (_STATE.config, _STATE.deterministic)
    _STATE.config, _STATE.deterministic = cfg, deterministic
    try:
        yield cfg
    finally:
        _STATE.config, _STATE.deterministic = prev


def current() -> tuple[LoRAConfig | None, bool]:
    """(config or None, deterministic) of the innermost `lora_context`."""
    return _STATE.config, _STATE.deterministic


# ----------------------------------------------------------------------------------------------
# Adapters inside a module (called from `Einsum` / `EinsumWeights`).


def lora_equations(eqn: str, fan_in_axes: Sequence[int]) -> tuple[str, str]:
    """The einsum equations of A and B derived from a layer's `"x,w->y"` equation.

    Args:
      eqn: the layer's equation, e.g. "BTNH,NHD->BTD" ("..." allowed in x and y only).
      fan_in_axes: the kernel axes contracted with x; they must lead the kernel.

    Returns:
      (eqn_a, eqn_b), e.g. ("BTNH,NHr->BTr", "BTr,rD->BTD") with a letter r unused by `eqn`.

    Raises:
      ValueError: a malformed equation, fan-in axes that do not lead the kernel, a fan-in
        letter that is not contracted, or a kernel letter that is neither contracted nor output.
    """
    eqn = eqn.replace(" ", "")
    lhs, arrow, out = eqn.partition("->")
    operands = lhs.split(",")
    if not arrow or len(operands) != 2:
        raise ValueError(f"LoRA needs a two-operand equation 'x,w->y', got {eqn!r}")
    x_spec, w_spec = operands
    k = len(fan_in_axes)
    if tuple(fan_in_axes) != tuple(range(k)) or not 0 < k < len(w_spec):
        raise ValueError(f"LoRA needs leading fan-in axes of the kernel {w_spec!r}, got "
                         f"{tuple(fan_in_axes)}")
    if "." in w_spec:
        raise ValueError(f"LoRA: no ellipsis in the kernel spec of {eqn!r}")
    fan, rest = w_spec[:k], w_spec[k:]
    for c in fan:
        if c not in x_spec or c in out:
            raise ValueError(f"LoRA: fan-in letter {c!r} of {eqn!r} is not contracted")
    for c in rest:
        if c in x_spec or c not in out:
            raise ValueError(f"LoRA: kernel letter {c!r} of {eqn!r} is not an output-only axis")
    r = next(c for c in "r" + string.ascii_lowercase + string.ascii_uppercase if c not in eqn)
    mid = "".join(c for c in x_spec if c not in fan) + r
    return f"{x_spec},{fan}{r}->{mid}", f"{mid},{r}{rest}->{out}"


def _a_init(cfg: LoRAConfig, fan_in: int):
    if cfg.init == "gaussian":  # PEFT init_lora_weights="gaussian": normal_(std=1/r)
        return nn.initializers.normal(stddev=1.0 / cfg.rank)
    # nn.init.kaiming_uniform_(a=sqrt(5)) on an (r, fan_in) weight: bound 1 / sqrt(fan_in).
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _adapter_params(module: nn.Module, cfg: LoRAConfig, shape: Sequence[int],
                    axes: Sequence[str | None], fan_in_axes: Sequence[int],
                    param_dtype: Any) -> tuple[jax.Array, jax.Array]:
    k = len(fan_in_axes)
    if tuple(fan_in_axes) != tuple(range(k)) or not 0 < k < len(shape):
        raise ValueError(f"{'/'.join(module.path)}: LoRA needs leading fan-in axes of the "
                         f"kernel {tuple(shape)}, got {tuple(fan_in_axes)}")
    in_shape, out_shape = tuple(shape[:k]), tuple(shape[k:])
    a = module.param("lora_a", nn.with_logical_partitioning(
        _a_init(cfg, math.prod(in_shape)), tuple(axes[:k]) + (LORA_RANK,)),
        in_shape + (cfg.rank,), param_dtype)
    b = module.param("lora_b", nn.with_logical_partitioning(
        nn.initializers.zeros, (LORA_RANK,) + tuple(axes[k:])),
        (cfg.rank,) + out_shape, param_dtype)
    return a, b


def _active(module: nn.Module) -> LoRAConfig | None:
    """The config if `module` is adapted; raises if its params hold an unused adapter."""
    cfg, _ = current()
    if cfg is not None and cfg.targets_path(module.path):
        return cfg
    if module.has_variable("params", "lora_a") or module.has_variable("params", "lora_b"):
        raise ValueError(f"{'/'.join(module.path)}: the params hold a LoRA adapter but no "
                         "lora_context targets this module; enter lora.lora_context(config.lora) "
                         "or merge the adapters first (lora.merge_lora)")
    return None


def einsum_delta(module: nn.Module, eqn: str, x: jax.Array, *, shape: Sequence[int],
                 axes: Sequence[str | None], fan_in_axes: Sequence[int], dtype: Any,
                 param_dtype: Any) -> jax.Array | None:
    """The LoRA term `(alpha/r) * B(A(dropout(x)))` of an einsum layer, or None if not adapted.

    Declares `lora_a` / `lora_b` in `module`'s scope (call it from the module's compact method).

    Args:
      module: the layer (its path is matched against the active `LoRAConfig.targets`).
      eqn: the layer's equation, e.g. "BTD,DNH->BTNH".
      x: the layer's input.
      shape, axes, fan_in_axes: the layer's kernel shape, logical axes and contracted axes.
      dtype: compute dtype; param_dtype: storage dtype of the adapters.

    Returns:
      An array shaped like the layer's output in `dtype`, or None.

    Raises:
      ValueError: unsupported equation / fan-in layout; dropout active without a 'dropout'
        rng; params holding an adapter the context does not target.
    """
    cfg = _active(module)
    if cfg is None:
        return None
    eqn_a, eqn_b = lora_equations(eqn, fan_in_axes)
    a, b = _adapter_params(module, cfg, shape, axes, fan_in_axes, param_dtype)
    x = x.astype(dtype)
    _, deterministic = current()
    if cfg.dropout > 0 and not deterministic and not module.is_initializing():
        if not module.has_rng("dropout"):
            raise ValueError(f"{'/'.join(module.path)}: LoRA dropout needs a 'dropout' rng "
                             "(apply(..., rngs={'dropout': key})), or deterministic=True")
        keep = 1.0 - cfg.dropout
        mask = jax.random.bernoulli(module.make_rng("dropout"), keep, x.shape)
        x = jnp.where(mask, x / keep, jnp.zeros_like(x))
    h = jnp.einsum(eqn_a, x, a.astype(dtype))
    return jnp.einsum(eqn_b, h, b.astype(dtype)) * jnp.asarray(cfg.scale, dtype)


def kernel_delta(module: nn.Module, *, shape: Sequence[int], axes: Sequence[str | None],
                 fan_in_axes: Sequence[int], param_dtype: Any) -> jax.Array | None:
    """`(alpha/r) * A @ B` shaped like the kernel (float32), or None if not adapted.

    For layers that hand out their weights (`EinsumWeights`); no dropout is possible there.

    Raises:
      ValueError: as `einsum_delta`, or LoRA dropout active on such a layer.
    """
    cfg = _active(module)
    if cfg is None:
        return None
    a, b = _adapter_params(module, cfg, shape, axes, fan_in_axes, param_dtype)
    _, deterministic = current()
    if cfg.dropout > 0 and not deterministic and not module.is_initializing():
        raise ValueError(f"{'/'.join(module.path)}: LoRA dropout cannot act on a layer that "
                         "returns its weights (EinsumWeights); exclude it from the targets or "
                         "set dropout=0")
    return _delta(a, b, 0, cfg.scale)


# ----------------------------------------------------------------------------------------------
# Parameter trees.


def _delta(a: jax.Array, b: jax.Array, n_lead: int, scale: float) -> jax.Array:
    """scale * A @ B in float32, shaped lead + in_shape + out_shape."""
    lead, in_shape, out_shape = a.shape[:n_lead], a.shape[n_lead:-1], b.shape[n_lead + 1:]
    r = a.shape[-1]
    a2 = a.astype(jnp.float32).reshape(lead + (math.prod(in_shape), r))
    b2 = b.astype(jnp.float32).reshape(lead + (r, math.prod(out_shape)))
    d = jnp.matmul(a2, b2, precision=jax.lax.Precision.HIGHEST) * scale
    return d.reshape(lead + in_shape + out_shape)


def _merge_one(path: str, node: Mapping[str, Any], scale: float) -> jax.Array:
    if not {"kernel", "lora_a", "lora_b"} <= set(node):
        raise ValueError(f"{path}: needs kernel, lora_a and lora_b, has {sorted(node)}")
    w, a, b = node["kernel"], node["lora_a"], node["lora_b"]
    n_lead = a.ndim + b.ndim - 2 - w.ndim  # stacked (nn.scan) axes leading all three
    if (n_lead < 0 or a.shape[:n_lead] != b.shape[:n_lead] or a.shape[-1] != b.shape[n_lead]
            or tuple(w.shape) != tuple(a.shape[:-1]) + tuple(b.shape[n_lead + 1:])):
        raise ValueError(f"{path}: kernel {w.shape} does not match lora_a {a.shape} and "
                         f"lora_b {b.shape}")
    return (w.astype(jnp.float32) + _delta(a, b, n_lead, scale)).astype(w.dtype)


def merge_lora(params: Mapping[str, Any], config: Mapping[str, Any] | LoRAConfig
               ) -> dict[str, Any]:
    """Folds every adapter into its kernel, `W + (alpha/r) * A @ B`, and drops the adapters.

    The result has exactly the parameter tree of the model without LoRA, so it exports, loads
    and runs with no `lora_context` (PEFT `merge_and_unload`). The sum is taken in float32 and
    cast to each kernel's dtype; stacked (`nn.scan`) layers are merged per layer.

    Args:
      params: unboxed parameter tree (nested dicts) holding `lora_a` / `lora_b` leaves.
      config: the `LoRAConfig` (or `config.lora` dict) the adapters were trained with.

    Returns:
      A new tree (the input is not modified).

    Raises:
      ValueError: LoRA off in `config`, or an adapter without a kernel or of mismatched shape.
    """
    cfg = from_dict(config)
    if cfg is None:
        raise ValueError("merge_lora needs a LoRA config with rank > 0 and targets")

    def walk(node, path):
        if not isinstance(node, Mapping):
            return node
        if "lora_a" in node or "lora_b" in node:
            out = {k: walk(v, f"{path}/{k}") for k, v in node.items()
                   if k not in ("lora_a", "lora_b", "kernel")}
            out["kernel"] = _merge_one(path, node, cfg.scale)
            return out
        return {k: walk(v, f"{path}/{k}" if path else str(k)) for k, v in node.items()}

    return walk(params, "")


def lora_param_count(params: Any) -> int:
    """Number of adapter weights (`lora_a` and `lora_b` leaves) in a parameter tree."""
    total = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        last = path[-1]
        name = getattr(last, "key", getattr(last, "name", None))
        if name in ("lora_a", "lora_b"):
            total += math.prod(jnp.shape(leaf))
    return total
