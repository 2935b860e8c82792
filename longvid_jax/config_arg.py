"""`--config=configs/x.py:key=value,flag` argument parsing for `get_config(arg)` (big_vision)."""

from typing import Any

import ml_collections


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """Parses `"a=1,b=x,flag"` into a ConfigDict typed like `defaults`.

    A bare name sets a boolean default to True. Values are converted to the type of their
    default (bool accepts true/false/1/0).

    Raises:
      ValueError: a key that has no default, or a value that does not convert.
    """
    out = ml_collections.ConfigDict(defaults)
    if not arg:
        return out
    for item in arg.split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        if key not in defaults:
            raise ValueError(f"unknown config argument {key!r}; known: {sorted(defaults)}")
        default = defaults[key]
        if not sep:
            if not isinstance(default, bool):
                raise ValueError(f"config argument {key!r} needs a value ({key}=...)")
            out[key] = True
        elif isinstance(default, bool):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"config argument {key}={value!r} is not a boolean")
            out[key] = value.lower() in ("true", "1")
        else:
            try:
                out[key] = type(default)(value)
            except ValueError as e:
                raise ValueError(f"config argument {key}={value!r}: {e}") from e
    return out
