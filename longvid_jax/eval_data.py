"""Benchmark loaders for model-running evaluation: MLVU, Video-MME and Music-AVQA.

Each loader reads a benchmark's release layout under one data folder and returns `EvalItem`s:
the absolute video path, the question prompt exactly as the original evaluation script builds it,
the ground-truth answer, the task / type the scorer groups by and the generation length.

  * MLVU (TDC `eval/eval_mlvu.py`, Hoar012/TDC-Video @ fb8333e, `EvalDataset`): the seven
    multiple-choice task files `DIR/json/<n>_<task>.json` (lists of `{video, duration, question,
    candidates, answer, question_type}`), videos under `DIR/video/<n>_<task>/<video>`; prompt
    `multiple_choice.mlvu_prompt` ("Question: ...\\nOptions:\\n(A) ...\\nRespond with only the
    letter (A, B, C or D) of the correct option."), greedy, 5 new tokens.
  * Video-MME (lmms-eval `lmms_eval/tasks/videomme/videomme.yaml` + `utils.py`, the
    `videomme` task with the default prompt kwargs, EvolvingLMMs-Lab/lmms-eval @ 75571cf):
    `DIR/videomme/test-00000-of-00001.parquet` (columns video_id, duration, domain, sub_category,
    url, videoID, question_id, task_type, question, options ["A. ...", ...], answer), videos
    `DIR/data/<videoID>.mp4` (or `.MP4` / `.mkv`, as lmms-eval looks); prompt `videomme_prompt`,
    greedy, 16 new tokens. The parquet is read with pandas or pyarrow; where neither is installed
    the same rows are read from `test-00000-of-00001.json` / `.jsonl` beside it (a list of row
    objects, e.g. written by `pandas.read_parquet(...).to_json(orient="records")`).
  * Music-AVQA (TDC `eval/eval_musicQA.py`): `DIR/avqa-test.json` (`{video_id, question_id,
    type '["Audio", "Counting"]', question_content with <Object>/<LIOC>... placeholders,
    templ_values '["..."]', anser}`), videos `DIR/videos/<video_id>.mp4`; prompt
    `open_ended.music_avqa_question` (the template filled in order, plus " Answer with a single
    word or phrase."), greedy, 16 new tokens.

Where the originals feed a blank frame for a missing video (MLVU, Music-AVQA) or exit (lmms-eval),
these loaders raise `InputFileError` naming the video (`check_videos=False` skips the check).
Pure Python; no JAX.
"""

import ast
import dataclasses
import json
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

from longvid_jax.metrics import MLVU_TASK_FILES, multiple_choice, open_ended
from longvid_jax.metrics.common import InputFileError, read_records, require_keys

# New tokens per answer, as each original generates.
MLVU_MAX_NEW_TOKENS = 5  # eval_mlvu.py
MUSIC_AVQA_MAX_NEW_TOKENS = 16  # eval_musicQA.py
VIDEOMME_MAX_NEW_TOKENS = 16  # lmms-eval videomme.yaml generation_kwargs

# lmms-eval videomme: utils.videomme_doc_to_text's instruction line and the yaml's default
# post_prompt (which starts with its own newline, so a blank line precedes it).
VIDEOMME_OPTION_PROMPT = (
    "Select the best answer to the following multiple-choice question based on the video and the "
    "subtitles. Respond with only the letter (A, B, C, or D) of the correct option."
)
VIDEOMME_POST_PROMPT = "\nAnswer with the option's letter from the given choices directly."
VIDEOMME_PARQUET = "videomme/test-00000-of-00001.parquet"
_VIDEOMME_VIDEO_EXTS = (".mp4", ".MP4", ".mkv")
_VIDEOMME_KEYS = ("duration", "domain", "sub_category", "videoID", "question_id", "task_type",
                  "question", "options", "answer")

MUSIC_AVQA_TEST_FILE = "avqa-test.json"
_MUSIC_AVQA_KEYS = ("video_id", "question_id", "type", "question_content", "templ_values",
                    "anser|answer")

BENCHMARK_NAMES = ("mlvu", "music_avqa", "videomme")


@dataclasses.dataclass(frozen=True)
class EvalItem:
    """One question of a benchmark, ready for a model.

    Attributes:
      id: unique id: "<task>/<video>" (MLVU, "#k" appended for a video's k-th question),
        the question id (Video-MME, Music-AVQA).
      video: absolute path of the video file.
      prompt: the question text as the original gives it to the model (no video tag).
      answer: ground truth: the option letter (MLVU corrected mode: None when the answer is not a
        candidate; original mode "@"), the letter (Video-MME), the answer text (Music-AVQA).
      task: what the scorer groups by: MLVU task, Video-MME task_type, Music-AVQA
        "<modality>/<type>".
      max_new_tokens: tokens the original generates at most (greedy).
      record: the annotation record as read (the scorer's other fields come from it).
    """

    id: str
    video: str
    prompt: str
    answer: str | None
    task: str
    max_new_tokens: int
    record: Mapping[str, Any]


def _check_video(path: pathlib.Path, what: str, check: bool) -> str:
    if check and not path.is_file():
        raise InputFileError(f"{what}: video {path} not found")
    return str(path.resolve() if path.exists() else path.absolute())


def _check_dir(data_dir: str | pathlib.Path, benchmark: str) -> pathlib.Path:
    root = pathlib.Path(data_dir)
    if not root.is_dir():
        raise InputFileError(f"{benchmark} data folder {root}: no such folder")
    return root


# ----------------------------------------------------------------------------------------------
# MLVU
# ----------------------------------------------------------------------------------------------


def load_mlvu(data_dir: str | pathlib.Path, *, tasks: Sequence[str] | None = None,
              compat: str = "corrected", check_videos: bool = True) -> list[EvalItem]:
    """The MLVU multiple-choice items, in TDC's task order (`MLVU_TASKS`), as eval_mlvu.py reads.

    Args:
      data_dir: the MLVU folder (TDC's `--data_path`) holding `json/` and `video/`.
      tasks: task names to read (default all seven, `multiple_choice.MLVU_TASKS`).
      compat: passed to `mlvu_prompt` / `mlvu_answer_letter` ("original": the prompt always
        says "(A, B, C or D)" and the letter is that of the last equal candidate).
      check_videos: raise when a video file is missing.

    Returns:
      `EvalItem`s with `task` the MLVU task, `answer` the ground-truth letter, `max_new_tokens`
      5; `record` is the annotation item.

    Raises:
      InputFileError: missing data folder, task file or video; malformed task file or record
        (the message names the file and the problem).
      ValueError: unknown task name or compat.
    """
    root = _check_dir(data_dir, "MLVU")
    tasks = list(multiple_choice.MLVU_TASKS if tasks is None else tasks)
    unknown = [t for t in tasks if t not in MLVU_TASK_FILES]
    if unknown:
        raise ValueError(f"unknown MLVU tasks {unknown}; known: {list(MLVU_TASK_FILES)}")
    items: list[EvalItem] = []
    seen: set[str] = set()
    for task in tasks:
        name = MLVU_TASK_FILES[task]
        path = root / "json" / name
        records = read_records(path, f"MLVU {task} task",
                               keys=("video", "question", "candidates", "answer"))
        video_dir = root / "video" / pathlib.Path(name).stem
        for i, rec in enumerate(records):
            if not isinstance(rec["candidates"], list) or not rec["candidates"]:
                raise InputFileError(f"MLVU {task} task file {path}: record {i} has no candidate "
                                     "list")
            try:
                prompt = multiple_choice.mlvu_prompt(rec, compat=compat)
            except ValueError as e:
                raise InputFileError(f"MLVU {task} task file {path}: record {i}: {e}") from e
            item_id, k = f"{task}/{rec['video']}", 2
            while item_id in seen:
                item_id, k = f"{task}/{rec['video']}#{k}", k + 1
            seen.add(item_id)
            video = _check_video(video_dir / rec["video"], f"MLVU {task} task file {path} "
                                 f"record {i}", check_videos)
            items.append(EvalItem(
                id=item_id, video=video, prompt=prompt,
                answer=multiple_choice.mlvu_answer_letter(rec, compat=compat), task=task,
                max_new_tokens=MLVU_MAX_NEW_TOKENS, record=dict(rec)))
    return items


# ----------------------------------------------------------------------------------------------
# Video-MME
# ----------------------------------------------------------------------------------------------


def videomme_prompt(row: Mapping[str, Any]) -> str:
    """The Video-MME prompt of lmms-eval's `videomme` task (default prompt kwargs).

    "<VIDEOMME_OPTION_PROMPT>\\n<question>\\n<options, one a line>\\n\\nAnswer with the option's
    letter from the given choices directly." (`utils.videomme_doc_to_text`, `videomme.yaml`).

    Args:
      row: a Video-MME row with `question` and `options` (["A. ...", "B. ...", ...]).
    """
    options = "\n".join(str(o) for o in row["options"])
    return f"{VIDEOMME_OPTION_PROMPT}\n{row['question']}\n{options}\n{VIDEOMME_POST_PROMPT}"


def _read_parquet(path: pathlib.Path) -> list[dict[str, Any]] | None:
    """Rows of a parquet file with pandas or pyarrow; None when neither is installed."""
    try:
        import pandas as pd  # pylint: disable=import-outside-toplevel
    except ImportError:
        pd = None
    try:
        if pd is not None:
            rows = pd.read_parquet(path).to_dict(orient="records")
        else:
            try:
                import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
            except ImportError:
                return None
            rows = pq.read_table(path).to_pylist()
    except Exception as e:
        raise InputFileError(f"Video-MME file {path}: cannot be read as parquet ({e})") from e
    # Parquet list columns come back as NumPy arrays (pandas); make them plain lists.
    return [{k: (v.tolist() if hasattr(v, "tolist") and not isinstance(v, str) else v)
             for k, v in r.items()} for r in rows]


def read_videomme_rows(data_dir: str | pathlib.Path) -> tuple[list[dict[str, Any]], pathlib.Path]:
    """The Video-MME test rows and the file they came from.

    Reads `DIR/videomme/test-00000-of-00001.parquet` with pandas or pyarrow; where neither is
    installed (or the parquet is absent), `test-00000-of-00001.json` / `.jsonl` beside it.

    Raises:
      InputFileError: no readable file (the message names what was looked for), or rows
        without the fields the prompt and scorer need.
    """
    root = _check_dir(data_dir, "Video-MME")
    parquet = root / VIDEOMME_PARQUET
    rows = None
    if parquet.is_file():
        rows, source = _read_parquet(parquet), parquet
    if rows is None:
        for suffix in (".json", ".jsonl"):
            alt = parquet.with_suffix(suffix)
            if alt.is_file():
                rows, source = read_records(alt, "Video-MME"), alt
                break
    if rows is None:
        why = ("pandas / pyarrow are not installed to read it" if parquet.is_file()
               else "no such file")
        raise InputFileError(f"Video-MME file {parquet}: {why}; give the parquet (with pandas or "
                             "pyarrow installed) or the same rows as "
                             f"{parquet.with_suffix('.json').name} / .jsonl beside it")
    require_keys(rows, _VIDEOMME_KEYS, source, "Video-MME")
    return rows, source


def _videomme_video(root: pathlib.Path, video_id: str, what: str, check: bool) -> str:
    for ext in _VIDEOMME_VIDEO_EXTS:
        if (root / "data" / (video_id + ext)).is_file():
            return str((root / "data" / (video_id + ext)).resolve())
    return _check_video(root / "data" / (video_id + ".mp4"), what, check)


def load_videomme(data_dir: str | pathlib.Path, *, check_videos: bool = True) -> list[EvalItem]:
    """The Video-MME multiple-choice items, in file order, as lmms-eval's `videomme` task.

    Args:
      data_dir: the folder holding `videomme/test-00000-of-00001.parquet` and `data/`.
      check_videos: raise when a video file is missing.

    Returns:
      `EvalItem`s with `id` the question id, `task` the task_type, `answer` the letter,
      `max_new_tokens` 16; `record` is the row (options as a list).

    Raises:
      InputFileError: see `read_videomme_rows`; a row whose options are not a list, or a
        missing video (names the file).
    """
    root = pathlib.Path(data_dir)
    rows, source = read_videomme_rows(root)
    items = []
    for i, row in enumerate(rows):
        options = row["options"]
        if isinstance(options, str):  # a JSON export may keep the list as its text
            try:
                options = ast.literal_eval(options)
            except (ValueError, SyntaxError):
                pass
        if not isinstance(options, (list, tuple)) or not options:
            raise InputFileError(f"Video-MME file {source}: row {i} ({row['question_id']}): "
                                 f"options must be a list, got {row['options']!r}")
        row = {**row, "options": list(options)}
        video = _videomme_video(root, str(row["videoID"]),
                                f"Video-MME file {source} row {i}", check_videos)
        items.append(EvalItem(
            id=str(row["question_id"]), video=video, prompt=videomme_prompt(row),
            answer=str(row["answer"]), task=str(row["task_type"]),
            max_new_tokens=VIDEOMME_MAX_NEW_TOKENS, record=row))
    return items


# ----------------------------------------------------------------------------------------------
# Music-AVQA
# ----------------------------------------------------------------------------------------------


def load_music_avqa(data_dir: str | pathlib.Path, test_file: str | pathlib.Path | None = None, *,
                    check_videos: bool = True) -> list[EvalItem]:
    """The Music-AVQA test questions, in file order, as TDC's eval_musicQA.py reads them.

    Args:
      data_dir: TDC's `--data_path`: the folder holding `videos/<video_id>.mp4`.
      test_file: TDC's `--test_file` (default `DIR/avqa-test.json`).
      check_videos: raise when a video file is missing.

    Returns:
      `EvalItem`s with `id` the question id (as a string), `task` "<modality>/<type>"
      (`open_ended.question_type`), `answer` the `anser` text, `max_new_tokens` 16.

    Raises:
      InputFileError: missing file or video, malformed file, or a record whose template
        placeholders and templ_values differ in number (names the file and record).
    """
    root = _check_dir(data_dir, "Music-AVQA")
    path = pathlib.Path(test_file) if test_file is not None else root / MUSIC_AVQA_TEST_FILE
    records = read_records(path, "Music-AVQA test", keys=_MUSIC_AVQA_KEYS)
    items = []
    for i, rec in enumerate(records):
        what = f"Music-AVQA test file {path} record {i} (question {rec['question_id']})"
        try:
            prompt = open_ended.music_avqa_question(rec)
            task = open_ended.question_type(rec["type"])
        except (ValueError, SyntaxError) as e:
            raise InputFileError(f"{what}: {e}") from e
        video = _check_video(root / "videos" / f"{rec['video_id']}.mp4", what, check_videos)
        items.append(EvalItem(
            id=str(rec["question_id"]), video=video, prompt=prompt,
            answer=str(rec.get("anser", rec.get("answer"))), task=task,
            max_new_tokens=MUSIC_AVQA_MAX_NEW_TOKENS, record=dict(rec)))
    return items


def load(benchmark: str, data_dir: str | pathlib.Path, **kwargs: Any) -> list[EvalItem]:
    """`load_mlvu` / `load_videomme` / `load_music_avqa` by benchmark name.

    Raises:
      ValueError: an unknown benchmark name.
    """
    loaders = {"mlvu": load_mlvu, "music_avqa": load_music_avqa, "videomme": load_videomme}
    if benchmark not in loaders:
        raise ValueError(f"no model-running loader for benchmark {benchmark!r}; known: "
                         f"{', '.join(BENCHMARK_NAMES)}")
    return loaders[benchmark](data_dir, **kwargs)


def take(items: Sequence[EvalItem], limit: int | None) -> list[EvalItem]:
    """At most `limit` items, taken in turn from each task (so every task is represented while
    there are enough), returned in their original order. None or <= 0: all items."""
    if limit is None or limit <= 0 or limit >= len(items):
        return list(items)
    by_task: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        by_task.setdefault(item.task, []).append(i)
    chosen: list[int] = []
    depth = 0
    while len(chosen) < limit:
        for indices in by_task.values():
            if depth < len(indices) and len(chosen) < limit:
                chosen.append(indices[depth])
        depth += 1
    return [items[i] for i in sorted(chosen)]


def write_json(obj: Any, path: str | pathlib.Path) -> pathlib.Path:
    """Writes `obj` as JSON (creating the folder); returns the path."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")
    return path


__all__ = [
    "EvalItem", "load", "load_mlvu", "load_music_avqa", "load_videomme", "read_videomme_rows",
    "take", "videomme_prompt", "write_json",
]
