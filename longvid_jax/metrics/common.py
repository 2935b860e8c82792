"""What the metric modules share: the compat switch, clock times, and reading input files.

* `check_compat`: every parser / metric with a documented bug in its original takes
  `compat="corrected"` (default: bug fixed) or `compat="original"` (the original's numbers).
* `clock_to_seconds`: "MM:SS" / "HH:MM:SS" / plain-number tokens found in model text, in seconds.
* `read_json`, `read_jsonl`, `read_records`: the benchmark loaders' file readers. Every problem
  with a file (missing, unreadable, malformed, not the expected layout) raises `InputFileError`
  with the file's path and the problem in the message.

Pure Python; no JAX.
"""

import json
import pathlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

COMPAT_MODES = ("original", "corrected")


class InputFileError(ValueError):
    """A benchmark input file is missing, unreadable, or not in the layout its benchmark reads."""


def check_compat(compat: str) -> str:
    """Validates a `compat` argument.

    Args:
        compat: "original" (reproduce the original scripts, bugs included) or "corrected"
            (the documented bugs fixed).

    Returns:
        `compat` unchanged.

    Raises:
        ValueError: for any other value.
    """
    if compat not in COMPAT_MODES:
        raise ValueError(f"compat must be one of {COMPAT_MODES}, got {compat!r}")
    return compat


def clock_to_seconds(token: str) -> float:
    """Seconds of a time token: "HH:MM:SS", "MM:SS" (optional fraction) or a plain number.

    Args:
        token: e.g. "00:01:05", "1:05.5", "65", "4.", ".5".

    Returns:
        The time in seconds (float).

    Raises:
        ValueError: when a part is not a number.
    """
    parts = [float(p) for p in token.split(":")]
    if len(parts) == 3:
        return parts[0] * 3600 + parts[1] * 60 + parts[2]
    if len(parts) == 2:
        return parts[0] * 60 + parts[1]
    return parts[0]


# ----------------------------------------------------------------------------------------------
# Input files
# ----------------------------------------------------------------------------------------------


def _read_text(path: str | pathlib.Path, what: str) -> str:
    path = pathlib.Path(path)
    if not path.exists():
        raise InputFileError(f"{what} file {path}: no such file")
    if path.is_dir():
        raise InputFileError(f"{what} file {path}: is a directory, expected a file")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputFileError(f"{what} file {path}: cannot be read ({e})") from e


def read_json(path: str | pathlib.Path, what: str = "input") -> Any:
    """Reads one JSON document.

    Args:
        path: the file.
        what: what the file is ("predictions", "ground-truth", ...), for error messages.

    Returns:
        The parsed document.

    Raises:
        InputFileError: the file is missing, unreadable, empty or not valid JSON (the message
            names the file, line and column).
    """
    text = _read_text(path, what)
    if not text.strip():
        raise InputFileError(f"{what} file {path}: is empty")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise InputFileError(
            f"{what} file {path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})"
        ) from e


def read_jsonl(path: str | pathlib.Path, what: str = "input") -> list[Any]:
    """Reads a JSON-lines file (one JSON value per non-blank line).

    Raises:
        InputFileError: the file is missing, unreadable, or a line is not valid JSON (the
            message names the file and the line).
    """
    out = []
    for lineno, line in enumerate(_read_text(path, what).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise InputFileError(
                f"{what} file {path}: line {lineno} is not valid JSON ({e.msg}, column {e.colno})"
            ) from e
    return out


def read_records(
    path: str | pathlib.Path, what: str = "input", *, keys: Iterable[str] = ()
) -> list[dict[str, Any]]:
    """Reads a list of JSON objects from a `.json` list or a JSON-lines file.

    A file whose name ends in ".jsonl" is read as JSON lines; any other as one JSON document,
    falling back to JSON lines when it holds several values (as MMDuet's "pred.json" files do).

    Args:
        path: the file.
        what: what the file is, for error messages.
        keys: fields every record must have.

    Returns:
        The records.

    Raises:
        InputFileError: unreadable or malformed file, a value that is not a list of objects, or
            a record without one of `keys` (the message names the file, record and field).
    """
    path = pathlib.Path(path)
    if path.suffix == ".jsonl":
        records = read_jsonl(path, what)
    else:
        text = _read_text(path, what)
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg != "Extra data":  # not several concatenated values: a real syntax error
                if not text.strip():
                    raise InputFileError(f"{what} file {path}: is empty") from e
                raise InputFileError(
                    f"{what} file {path}: not valid JSON ({e.msg} at line {e.lineno}, "
                    f"column {e.colno})"
                ) from e
            records = read_jsonl(path, what)
        if isinstance(records, dict) and len(text.strip().splitlines()) == 1:
            records = [records]  # JSON lines holding a single record
    if not isinstance(records, list):
        raise InputFileError(
            f"{what} file {path}: expected a JSON list (or JSON lines) of objects, "
            f"got a JSON {type(records).__name__}"
        )
    require_keys(records, keys, path, what)
    return records


def require_keys(
    records: Sequence[Any], keys: Iterable[str], path: str | pathlib.Path, what: str = "input"
) -> None:
    """Checks that every record is a JSON object holding `keys`.

    Args:
        records: the parsed records.
        keys: required field names; a name "a|b" is satisfied by either field.
        path: the file they came from (for the message).
        what: what the file is.

    Raises:
        InputFileError: naming the file, the record index and the missing field.
    """
    keys = tuple(keys)
    for i, rec in enumerate(records):
        if not isinstance(rec, Mapping):
            raise InputFileError(
                f"{what} file {path}: record {i} is a JSON {type(rec).__name__}, expected an "
                "object"
            )
        for key in keys:
            if not any(k in rec for k in key.split("|")):
                raise InputFileError(
                    f"{what} file {path}: record {i} has no field {key!r} "
                    f"(it has {sorted(rec)[:12]})"
                )
