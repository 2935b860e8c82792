"""Benchmark metrics of the five original systems, exact against their evaluation scripts.

Modules (each docstring names the original repo @ commit and files it follows):

* `grounding`: temporal grounding. TimeChat's seconds parser and R@1 at IoU 0.3/0.5/0.7
  (Charades-STA); LongVALE's two-digit 00-99 positions, mIoU and R1@m.
* `highlight`: highlight detection. TimeChat's saliency parser, HL-mAP and HIT@1 at min score
  2/3/4 (QVHighlights).
* `mmduet_relevance`: MMDuet's relevance-score post-processing: smoothing, min-max
  normalisation and the threshold sweep for grounding; per-2-s clip scores for highlights.
* `captioning`: the pycocoevalcap scorers (PTB tokenizer, METEOR, CIDEr, BLEU, ROUGE-L) and
  LongVALE segment captioning.
* `dense_captioning`: dense video captioning. Event parsers, the merge rules (MMDuet's streamed
  replies, LongVALE's near-identical sentences), SODA_c, P/R/F1 over tIoU 0.3/0.5/0.7/0.9,
  CIDEr/METEOR per video (TimeChat, MMDuet YouCook2, LongVALE).
* `mmduet_streaming`: MMDuet's streaming reply rule and the MAGQA in-span score with a pluggable
  judge (`RecordedJudge` replays recorded outputs; nothing calls a network).
* `multiple_choice`: MLVU as TDC scores it, and Video-MME: letter parsing, mean-of-task accuracy.
* `common`: `check_compat`, `clock_to_seconds`, and the file readers of the loaders below.
(`longvid_jax.dpo` holds the TPO loss terms and their logged metrics.)

compat: every parser or metric whose original has a documented bug takes `compat="corrected"`
(default: the bug fixed) or `compat="original"` (reproduces the original's numbers, to 1e-9 or
the printed precision, on `../shared/fixtures/metrics`); anything else raises ValueError. Each
corrected behaviour is described in its function's docstring, quoting the bug.

Java: METEOR and the PTB tokenizer (captioning, dense captioning, SODA_c) run pycocoevalcap's
jars, so they need a `java` executable on PATH (`apt-get install default-jre`, or conda
`openjdk`); without it they raise `captioning.JavaNotFoundError` saying so.

`BENCHMARKS` maps a benchmark name to a `Benchmark`: its `evaluate_<name>` function and a loader
that reads the predictions and ground-truth files from disk in the originals' formats (as in the
fixtures' input.json). `python -m longvid_jax.evaluate --benchmark=NAME` uses it.
"""

import dataclasses
import inspect
import pathlib
import types
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from longvid_jax.metrics import (
    captioning,
    common,
    dense_captioning,
    grounding,
    highlight,
    mmduet_relevance,
    mmduet_streaming,
    multiple_choice,
    open_ended,
)
from longvid_jax.metrics.common import InputFileError, read_json, read_records, require_keys

Path = pathlib.Path

# TDC eval/eval_mlvu.py `data_list`: the MLVU task files under <data_path>/json/.
MLVU_TASK_FILES = {
    "count": "4_count.json",
    "ego": "3_ego.json",
    "needle": "2_needle.json",
    "order": "5_order.json",
    "plotQA": "1_plotQA.json",
    "anomaly_reco": "6_anomaly_reco.json",
    "topic_reasoning": "7_topic_reasoning.json",
}


class LoadedInputs(NamedTuple):
    """What a benchmark loader read: the evaluate function's first two arguments and any keyword
    arguments that come from the files (e.g. the TimeChat DVC split, the MAGQA judge)."""

    predictions: Any
    ground_truth: Any
    params: dict[str, Any]


# load(predictions_path, ground_truth_path, extra_files): extra files the benchmark does not
# declare never reach it (evaluate.score rejects them).
Loader = Callable[[Path, Path | None, Mapping[str, Path]], LoadedInputs]


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """One benchmark the evaluate CLI can score.

    Attributes:
        name: registry key (`--benchmark=`).
        evaluate: `evaluate_<name>(predictions, ground_truth, *, compat, **params) -> {"scores",
            "per_item", ...}` from one of the metric modules.
        load: `load(predictions_path, ground_truth_path, extra_files) -> LoadedInputs`; raises
            `InputFileError` naming the file for a missing, unreadable or malformed file.
        description: the benchmark and the files it reads, one paragraph.
        headline: score keys printed in the CLI table, in order; "*" matches any run of
            characters other than "/" (so "duration/*" is "duration/short" but not
            "duration/short/task/OCR Problems").
        params: default keyword arguments of `evaluate` (overridable).
        extra_files: names of the extra input files the loader reads (e.g. "annotations").
        needs_ground_truth: False where the predictions file holds the answers (Video-MME).
    """

    name: str
    evaluate: Callable[..., dict[str, Any]]
    load: Loader
    description: str
    headline: tuple[str, ...]
    params: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    extra_files: tuple[str, ...] = ()
    needs_ground_truth: bool = True

    def __post_init__(self):
        object.__setattr__(self, "params", types.MappingProxyType(dict(self.params)))
        accepted = inspect.signature(self.evaluate).parameters
        unknown = sorted(set(self.params) - set(accepted))
        if unknown:
            raise ValueError(f"benchmark {self.name}: {unknown} are not parameters of evaluate")


# ----------------------------------------------------------------------------------------------
# Loaders
# ----------------------------------------------------------------------------------------------


def _annotation_list(doc: Any, path: Path, what: str, keys: tuple[str, ...]) -> list[dict]:
    """A coco-format file's `annotations` list (or a bare list), with `keys` on every entry."""
    anns = doc.get("annotations") if isinstance(doc, Mapping) else doc
    if not isinstance(anns, list):
        raise InputFileError(
            f"{what} file {path}: expected the coco format {{\"annotations\": [...]}}"
        )
    require_keys(anns, keys, path, what)
    return anns


def _coco_file(path: Path, what: str, keys: tuple[str, ...]) -> dict[str, Any]:
    doc = read_json(path, what)
    return {"annotations": _annotation_list(doc, path, what, keys)}


def _longvale_annotation(path: Path) -> dict[str, Any]:
    """LongVALE's annotation file `{video_id: {duration, timestamps, sentences}}`."""
    doc = read_json(path, "ground-truth")
    if not isinstance(doc, Mapping):
        raise InputFileError(
            f"ground-truth file {path}: expected {{video_id: {{duration, timestamps, "
            f"sentences}}}}, got a JSON {type(doc).__name__}"
        )
    for vid, entry in doc.items():
        if not isinstance(entry, Mapping) or not {"duration", "timestamps", "sentences"} <= set(
            entry
        ):
            raise InputFileError(
                f"ground-truth file {path}: video {vid!r} lacks duration/timestamps/sentences"
            )
    return dict(doc)


def _load_timechat_tvg(pred: Path, gt: Path, extra: Mapping[str, Path]) -> LoadedInputs:
    preds = read_records(pred, "predictions", keys=("vname", "generated_cap", "query", "id"))
    return LoadedInputs(preds, _coco_file(gt, "ground-truth", ("id", "timestamp")), {})


def _load_timechat_vhd(pred: Path, gt: Path, extra: Mapping[str, Path]) -> LoadedInputs:
    preds = read_records(pred, "predictions", keys=("vname", "generated_cap", "query", "id"))
    keys = ("qid", "duration", "relevant_clip_ids", "saliency_scores")
    params = {}
    if "annotations" in extra:
        params["annotations"] = _coco_file(
            extra["annotations"], "annotations", ("image_id", "duration")
        )
    return LoadedInputs(preds, read_records(gt, "ground-truth", keys=keys), params)


def _load_timechat_dvc(pred: Path, gt: Path, extra: Mapping[str, Path]) -> LoadedInputs:
    preds = read_records(pred, "predictions", keys=("vname", "generated_cap"))
    gt_doc = _coco_file(gt, "ground-truth", ("image_id", "segments", "pure_cap|caption"))
    # eval_dvc.py reads the split from the GT file name (train 1, val 2, test 3).
    split = gt.name.split(".")[0]
    params = {"split": split} if split in dense_captioning.TIMECHAT_SPLIT_IDS else {}
    return LoadedInputs(preds, gt_doc, params)


def _load_longvale(task_keys: tuple[str, ...]) -> Loader:
    def load(pred: Path, gt: Path, extra: Mapping[str, Path]) -> LoadedInputs:
        logs = read_records(pred, "predictions", keys=task_keys)
        return LoadedInputs(logs, _longvale_annotation(gt), {})

    return load


def _load_mmduet(pred_keys: tuple[str, ...], gt_keys: tuple[str, ...]) -> Loader:
    def load(pred: Path, gt: Path, extra: Mapping[str, Path]) -> LoadedInputs:
        preds = read_records(pred, "predictions", keys=pred_keys)
        return LoadedInputs(preds, read_records(gt, "ground-truth", keys=gt_keys), {})

    return load


def _load_mmduet_magqa(pred: Path, gt: Path, extra: Mapping[str, Path]) -> LoadedInputs:
    if "judge_scores" not in extra:
        raise ValueError(
            "mmduet_magqa needs judge scores: pass --judge_scores=FILE, a JSON list of recorded "
            "judge outputs {question, gold_answer, pred_answer, judge_text}. The LLM judge is "
            "pluggable (evaluate_mmduet_magqa(judge=callable), e.g. a local model); nothing here "
            "calls a network."
        )
    preds = read_records(pred, "predictions", keys=("question_id",))
    gold = read_records(gt, "ground-truth", keys=("question_id", "conversation", "answer"))
    table = read_records(
        extra["judge_scores"],
        "judge-scores",
        keys=("question", "gold_answer", "pred_answer", "judge_text"),
    )
    params: dict[str, Any] = {"judge": mmduet_streaming.RecordedJudge(table)}
    # Offline baselines (TimeChat / VTimeLLM answers) carry `model_response`, the streaming
    # model `model_response_list` (evaluate.py --is_online_model 0 / 1).
    if preds and not any("model_response_list" in p for p in preds):
        require_keys(preds, ("model_response", "video_duration"), pred, "predictions")
        params["is_online_model"] = False
    else:
        require_keys(preds, ("model_response_list",), pred, "predictions")
    return LoadedInputs(preds, gold, params)


def _load_mlvu(pred: Path, gt: Path, extra: Mapping[str, Path]) -> LoadedInputs:
    preds = read_records(pred, "predictions", keys=("task_type", "video_name", "decoded|pred"))
    # TDC's own outputs-*.json hold the parsed letter as "pred"; re-parsing a letter gives it.
    preds = [p if "decoded" in p else {**p, "decoded": p["pred"]} for p in preds]
    item_keys = ("video", "question", "candidates", "answer")
    if gt.is_dir():  # the MLVU data folder TDC's eval_mlvu.py reads (--data_path)
        tasks = {}
        for task, name in MLVU_TASK_FILES.items():
            path = gt / "json" / name if (gt / "json").is_dir() else gt / name
            tasks[task] = read_records(path, "ground-truth", keys=item_keys)
    else:
        doc = read_json(gt, "ground-truth")
        if not isinstance(doc, Mapping) or not all(isinstance(v, list) for v in doc.values()):
            raise InputFileError(
                f"ground-truth file {gt}: expected {{task: [MLVU items]}} or the MLVU folder"
            )
        tasks = dict(doc)
        for items in tasks.values():
            require_keys(items, item_keys, gt, "ground-truth")
    return LoadedInputs(preds, tasks, {})


def _load_music_avqa(pred: Path, gt: Path | None, extra: Mapping[str, Path]) -> LoadedInputs:
    if gt is None:
        doc = read_records(pred, "predictions", keys=("pred", "correct_answer", "type"))
        return LoadedInputs(doc, None, {})
    doc = read_records(pred, "predictions", keys=("idx", "pred"))
    truth = read_records(gt, "ground-truth", keys=("question_id", "type", "anser|answer"))
    return LoadedInputs(doc, truth, {})


def _load_videomme(pred: Path, gt: Path | None, extra: Mapping[str, Path]) -> LoadedInputs:
    doc = read_json(pred, "predictions")
    if isinstance(doc, list):
        require_keys(doc, ("duration_category", "questions"), pred, "predictions")
    elif not isinstance(doc, Mapping) or gt is None:
        raise InputFileError(
            f"predictions file {pred}: expected eval_your_results.py's results list, or "
            "{question_id: response} together with a ground-truth file"
        )
    if gt is None:
        return LoadedInputs(doc, None, {})
    truth = read_records(gt, "ground-truth", keys=("question_id|questions",))
    return LoadedInputs(doc, truth, {})


# ----------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------

_DVC_HEADLINE = (
    "SODA_c_*", "CIDER", "METEOR", "F1_Score", "Precision_Mean", "Recall_Mean", "Para_CIDER",
    "Para_METEOR", "n_preds",
)
_SWEEP_HEADLINE = tuple(f"best_config/{k}" for k in ("window", "threshold", "mIoU", "R@0.3",
                                                      "R@0.5", "R@0.7"))

_ALL = (
    Benchmark(
        "timechat_tvg",
        grounding.evaluate_timechat_tvg,
        _load_timechat_tvg,
        "TimeChat temporal grounding (Charades-STA). Predictions: evaluate.py's results JSON "
        "[{vname, generated_cap, query, id}]; ground truth: coco format {annotations: [{id, "
        "image_id, timestamp: [s, e], duration}]}.",
        ("R1@0.3", "R1@0.5", "R1@0.7", "mIoU", "n_parse_failed"),
        {"sample": False},
    ),
    Benchmark(
        "timechat_vhd",
        highlight.evaluate_timechat_vhd,
        _load_timechat_vhd,
        "TimeChat highlight detection (QVHighlights). Predictions: [{vname, generated_cap, query, "
        "id}]; ground truth: highlight_val_release.jsonl; --annotations: the coco-format file "
        "whose durations set the clip count (default: the GT record's duration).",
        tuple(f"HL-min-{n}-{m}" for n, _ in highlight.HL_THRESHOLDS for m in ("mAP", "Hit1"))
        + ("n_parse_failed",),
        extra_files=("annotations",),
    ),
    Benchmark(
        "timechat_dvc",
        dense_captioning.evaluate_timechat_dvc,
        _load_timechat_dvc,
        "TimeChat dense video captioning (YouCook2 / ActivityNet). Predictions: [{vname, "
        "generated_cap}]; ground truth: coco format {annotations: [{image_id, segments, "
        "pure_cap | caption}]}, its file name giving the split (val.caption_coco_format.json). "
        "Java.",
        _DVC_HEADLINE,
    ),
    Benchmark(
        "longvale_grounding",
        grounding.evaluate_longvale_grounding,
        _load_longvale(("video_id", "answer")),
        "LongVALE grounding. Predictions: eval.py's log lines (JSON lines {video_id, task, "
        "query_id, answer, info: {sentence_id}}) or [{video_id, sentence_id, answer}]; ground "
        "truth: longvale-annotations-eval.json {video_id: {duration, timestamps, sentences}}.",
        ("mIoU", "R1@0.3", "R1@0.5", "R1@0.7"),
    ),
    Benchmark(
        "longvale_dense_caption",
        dense_captioning.evaluate_longvale_dense_caption,
        _load_longvale(("video_id", "task", "answer")),
        "LongVALE dense captioning. Predictions: eval.py's log lines (task 'captioning'); ground "
        "truth: the LongVALE annotation file. Java.",
        ("soda_c", "METEOR", "CIDEr", "F1", "avg_outputs"),
    ),
    Benchmark(
        "longvale_segment_caption",
        captioning.evaluate_longvale_segment_caption,
        _load_longvale(("video_id", "task", "answer", "info")),
        "LongVALE segment captioning. Predictions: eval.py's log lines (task 'seg_captioning', "
        "info.sentence_id); ground truth: the LongVALE annotation file. Java.",
        ("BLEU4", "METEOR", "Rouge", "CIDEr"),
    ),
    Benchmark(
        "mmduet_charades",
        mmduet_relevance.evaluate_mmduet_charades,
        _load_mmduet(("question_id", "debug_data"), ("question_id", "timestamps|answer")),
        "MMDuet grounding from relevance scores (Charades-STA). Predictions: inference.py's "
        "JSON lines {question_id, video_duration, debug_data: [{video_time, relevance_score}]}; "
        "ground truth: [{question_id, duration, timestamps}]. Table: the best (window, "
        "threshold) of the sweep, chosen on this set (all of it is in the JSON).",
        _SWEEP_HEADLINE,
        {"largest_span": False},
    ),
    Benchmark(
        "mmduet_qvh",
        mmduet_relevance.evaluate_mmduet_qvh,
        _load_mmduet(
            ("question_id", "debug_data"),
            ("qid", "duration", "relevant_clip_ids", "saliency_scores"),
        ),
        "MMDuet highlight detection and grounding on QVHighlights. Predictions: inference.py's "
        "JSON lines (as mmduet_charades); ground truth: highlight_val_release.jsonl. Table: "
        "window 0 highlights and the best grounding sweep point (every window is in the JSON).",
        ("hl/w0/HL-min-VeryGood-mAP", "hl/w0/HL-min-VeryGood-Hit1")
        + tuple(f"grounding/{k}" for k in _SWEEP_HEADLINE),
    ),
    Benchmark(
        "mmduet_youcook2",
        dense_captioning.evaluate_mmduet_youcook2,
        _load_mmduet(("question_id", "model_response_list"), ("question_id", "answer")),
        "MMDuet dense captioning (YouCook2) from streamed replies. Predictions: inference.py's "
        "JSON lines {question_id, model_response_list: [{time, content, role}]}; ground truth: "
        "[{question_id, duration, answer: [{time: [s, e], content}]}]. Java.",
        _DVC_HEADLINE,
    ),
    Benchmark(
        "mmduet_magqa",
        mmduet_streaming.evaluate_mmduet_magqa,
        _load_mmduet_magqa,
        "MMDuet MAGQA in-span score. Predictions: inference.py's JSON lines (online: "
        "model_response_list; offline baselines: model_response, video_duration); ground truth: "
        "[{question_id, conversation, answer: [{time, content}]}]; --judge_scores: recorded judge "
        "outputs [{question, gold_answer, pred_answer, judge_text}] (the judge is pluggable).",
        ("in_span_score", "num_turns", "num_turns_dedup"),
        {"reader": "last", "pad_with_one": True, "baseline_all_match": True},
        extra_files=("judge_scores",),
    ),
    Benchmark(
        "mlvu",
        multiple_choice.evaluate_mlvu,
        _load_mlvu,
        "MLVU multiple choice as TDC's eval_mlvu.py. Predictions: [{task_type, video_name, "
        "decoded}] (or TDC's outputs-*.json with 'pred'); ground truth: the MLVU folder "
        "(json/1_plotQA.json ...) or one JSON {task: [items]}.",
        ("Acc", "*"),
        {"world_size": 1},
    ),
    Benchmark(
        "videomme",
        multiple_choice.evaluate_videomme,
        _load_videomme,
        "Video-MME multiple choice as eval_your_results.py. Predictions: its results JSON "
        "[{video_id, duration_category, video_category, video_subcategory, questions: "
        "[{question_id, task_type, answer, response}]}]; ground truth optional.",
        ("overall", "duration/*"),
        needs_ground_truth=False,
    ),
)

_ALL += (
    Benchmark(
        "music_avqa",
        open_ended.evaluate_music_avqa,
        _load_music_avqa,
        "Music-AVQA short answers as TDC's eval_musicQA.py writes them ([{idx, pred, "
        "correct_answer, type}]), scored by normalised exact match (the original saves "
        "predictions only; see metrics/open_ended.py); ground truth (avqa-test.json) optional.",
        ("accuracy", "Audio", "Visual", "Audio-Visual", "n_questions"),
        needs_ground_truth=False,
    ),
)

BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in _ALL}


def get_benchmark(name: str) -> Benchmark:
    """The registered benchmark `name`.

    Raises:
        ValueError: for an unknown name (the message lists the known ones).
    """
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]


__all__ = [
    "BENCHMARKS",
    "Benchmark",
    "InputFileError",
    "LoadedInputs",
    "MLVU_TASK_FILES",
    "captioning",
    "common",
    "dense_captioning",
    "get_benchmark",
    "grounding",
    "highlight",
    "mmduet_relevance",
    "mmduet_streaming",
    "multiple_choice",
    "open_ended",
]
