"""Annotation sources: LLaVA-format JSON / JSONL files as Grain random-access data sources.

A record is `{"video": path, "conversations": [{"from": "human", "value": "<video>\\n..."},
{"from": "gpt", "value": "..."}, ...]}` (TDC, LongVALE, TimeChat-style instruction data), or
LLaVA's single-image record with `"image": path` instead (LLaVA-OneVision, TDC stage 1; the
image path is then also the item's `video`, which `decode.load_video` reads as one frame), plus
optional keys (`id`, ...) that are kept as they are. An optional `"audio": path` names a separate
sound file (TDC's stage-3 records, whose audio the original loads from that key alone); a
record whose `audio` is empty / "None" / "none" / "nan" (the original's no-audio values) has
none, and the item's `audio` is then None. Without the key the video's own track is used.
"""

import json
import os
from collections.abc import Mapping
from typing import Any

from absl import logging

from longvid_jax.input import chat


class AnnotationError(ValueError):
    """A malformed annotation file or record; the message names the file and the record index."""

    def __init__(self, path, problem: str, index: int | None = None):
        self.path = os.fspath(path)
        self.index = index
        self.problem = problem
        where = self.path if index is None else f"{self.path}: record {index}"
        super().__init__(f"{where}: {problem}")

    def __reduce__(self):  # picklable across worker processes
        return type(self), (self.path, self.problem, self.index)


# Values of a record's "audio" key that mean "no audio" (TDC's train.py `_has_audio`).
_NO_AUDIO = ("", "None", "none", "nan")


def _visual_key(raw: Mapping[str, Any]) -> str:
    return "video" if "video" in raw else "image"


def _check_record(raw: Any) -> None:
    """Raises ValueError naming the problem if `raw` is not a valid LLaVA video record."""
    if not isinstance(raw, Mapping):
        raise ValueError(f"record is a {type(raw).__name__}, not an object")
    if ("video" in raw) == ("image" in raw):
        raise ValueError("needs exactly one of 'video' and 'image'" if "video" in raw
                         else "missing 'video' (or 'image')")
    key = _visual_key(raw)
    if not isinstance(raw[key], str) or not raw[key]:
        raise ValueError(f"'{key}' must be a non-empty string, got {raw[key]!r}")
    if "conversations" not in raw:
        raise ValueError("missing 'conversations'")
    chat.validate_conversation(raw["conversations"])


class JsonAnnotationSource:
    """A `.json` (a list) or `.jsonl` (one object per line) annotation file as a data source.

    Satisfies Grain's `RandomAccessDataSource` protocol (`__len__`, `__getitem__`). Structure is
    validated when the file is loaded (video files are not opened). Relative video paths
    resolve against `video_root` (default: the annotation file's folder).

    Each item is a dict: the record's own keys, with `video` made absolute, plus `_index` (int,
    the record's position in the file) and `_source` (the annotation path). With
    `skip_bad_records=True`, a malformed record becomes `{"_index", "_source", "_error": message}`
    instead of raising, so that the pipeline skips and counts it.

    Raises:
        AnnotationError: unreadable file, invalid JSON (.json), not a list, or (unless
            `skip_bad_records`) a malformed record; the message names the file and the record index.
    """

    def __init__(self, path, *, video_root=None, skip_bad_records: bool = False):
        self.path = os.path.abspath(os.fspath(path))
        self.video_root = os.path.abspath(
            os.fspath(video_root) if video_root is not None else os.path.dirname(self.path)
        )
        try:
            with open(self.path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise AnnotationError(self.path, f"cannot read the file ({e})") from e
        raw_records: list[Any] = []
        errors: dict[int, str] = {}
        if self.path.endswith((".jsonl", ".ndjson")):
            lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
            for i, (line_no, line) in enumerate(lines):
                try:
                    raw_records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raw_records.append(None)
                    errors[i] = f"invalid JSON on line {line_no} ({e.msg}, column {e.colno})"
        else:
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise AnnotationError(
                    self.path, f"invalid JSON ({e.msg} at line {e.lineno}, column {e.colno})"
                ) from e
            if not isinstance(data, list):
                raise AnnotationError(
                    self.path, f"a .json annotation file must hold a list, got "
                    f"{type(data).__name__}"
                )
            raw_records = data
        self._items: list[dict[str, Any]] = []
        for i, raw in enumerate(raw_records):
            problem = errors.get(i)
            if problem is None:
                try:
                    _check_record(raw)
                except ValueError as e:
                    problem = str(e)
            if problem is not None:
                if not skip_bad_records:
                    raise AnnotationError(self.path, problem, i)
                self._items.append({"_index": i, "_source": self.path, "_error": problem})
                continue
            item = dict(raw)
            item["video"] = os.path.join(self.video_root,
                                         os.path.expanduser(raw[_visual_key(raw)]))
            if "audio" in raw:
                sound = raw["audio"]
                item["audio"] = (None if not isinstance(sound, str) or sound in _NO_AUDIO
                                 else os.path.join(self.video_root, os.path.expanduser(sound)))
            item["_index"] = i
            item["_source"] = self.path
            self._items.append(item)
        self.num_malformed = sum("_error" in it for it in self._items)
        if self.num_malformed:
            first = next(it for it in self._items if "_error" in it)
            logging.warning(
                "%s: %d of %d records are malformed and will be skipped; first: record %d: %s",
                self.path, self.num_malformed, len(self._items), first["_index"], first["_error"],
            )
            if self.num_malformed == len(self._items):
                raise AnnotationError(self.path, f"all {len(self._items)} records are malformed; "
                                      f"first: record {first['_index']}: {first['_error']}")

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return dict(self._items[index])

    def __repr__(self) -> str:
        return f"JsonAnnotationSource({self.path!r}, {len(self)} records)"
