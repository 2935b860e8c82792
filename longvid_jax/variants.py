"""Named sizes for config dataclasses: one rule for every `make_config(variant, **overrides)`.

Plain Python (no JAX import), so configs of metrics and losses use it too.
"""

import dataclasses
from collections.abc import Mapping
from typing import Any


def config_from_variant(cls: type, variants: Mapping[str, Mapping[str, Any]],
                        variant: str | None, overrides: Mapping[str, Any]):
    """Instantiates the config dataclass `cls` from `variants[variant]` updated by `overrides`.

    Raises:
      ValueError: for an unknown variant or field, or a required field given by neither.
    """
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {unknown}; known: {sorted(fields)}")
    kw: dict[str, Any] = {}
    if variant is not None:
        if variant not in variants:
            raise ValueError(f"unknown variant {variant!r} for {cls.__name__}; known: "
                             f"{sorted(variants)}")
        kw.update(variants[variant])
    kw.update(overrides)
    missing = sorted(f.name for f in dataclasses.fields(cls)
                     if f.name not in kw and f.default is dataclasses.MISSING
                     and f.default_factory is dataclasses.MISSING)
    if missing:
        raise ValueError(f"{cls.__name__}: missing fields {missing} (variant={variant!r}; give "
                         "a variant or values)")
    return cls(**kw)
