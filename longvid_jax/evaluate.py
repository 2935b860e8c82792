"""Scores a model's predictions on a benchmark, as the original systems' evaluation scripts do.

    python -m longvid_jax.evaluate --benchmark=timechat_tvg \\
        --predictions=results/tvg.json --ground_truth=data/charades/test.caption_coco_format.json \\
        [--compat=corrected|original] [--output=scores.json] [--plot=plots/ --max_plots=50]

Or runs a trained checkpoint on a benchmark first (model-running mode, `--data` given):

    python -m longvid_jax.evaluate --config=configs/tdc.py:stage=2,size=full,llm=qwen2_7b,bert_vocab=/bert/vocab.txt \\
        --checkpoint=/ckpt/tdc_stage2 --benchmark=mlvu|music_avqa|videomme --data=/data/MLVU \\
        [--limit=N] [--output=scores.json] [--predictions_out=predictions.json] [--compat=...]

It loads the model once (`infer.Predictor`), reads the benchmark's release layout
(`longvid_jax.eval_data`: prompts, answers and generation lengths as the originals), answers every
item greedily with a progress bar, writes the predictions in the format the scoring mode reads
(`--predictions_out`, default `<output stem>.predictions.json` or
`<benchmark>.predictions.json`), scores them with `score(...)` and writes the scores JSON with a
`per_task` breakdown `{task: {"accuracy", "n"}}` and a `run` record (checkpoint, data, items,
seconds). `--limit=N` answers N items taken in turn from each task. Music-AVQA is scored by
normalised exact match (`metrics/open_ended.py`): TDC's eval_musicQA.py only saves predictions,
and exact accuracy per question type is how Music-AVQA itself scores answers.

Benchmarks, the files each reads and their headline scores are in `longvid_jax.metrics.BENCHMARKS`
(`python -m longvid_jax.evaluate --help` lists the names). Extra inputs: `--annotations`
(TimeChat VHD: the coco-format file with the video durations), `--judge_scores` (MMDuet MAGQA:
recorded judge outputs; the judge is pluggable and nothing calls a network), and
`--param=key=value` for any keyword of the benchmark's `evaluate_<name>` function (e.g.
`--param=world_size=8` for MLVU as an 8-GPU torchrun counts it).

`--compat=original` reproduces the original scripts' numbers, bugs included; the default
`corrected` fixes the documented bugs (see each metric module's docstring).

Writes a JSON `{"benchmark", "compat", "scores", "per_item", "details", "params", "files"}`
(default `<predictions>.<benchmark>.scores.json`; NaN where an original computes one, as Python's
json module writes it) and prints a table of the headline scores. `--plot=DIR` draws one PNG per
video/query (up to `--max_plots`): predicted vs ground-truth segments on a time axis in seconds.

The scoring step is the function `score(...)`, so a run that first produces predictions can call
it afterwards; the model-running step is `run_benchmark(...)`. Importing this module only defines
its scoring flags; the model-running flags are defined when it runs as a program (the trainer
defines its own `--config`, and both modules may be imported in one process).
"""

import inspect
import io
import json
import math
import pathlib
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from absl import app, flags, logging
from tqdm import tqdm

from longvid_jax import eval_data, metrics, xla_flags
from longvid_jax.metrics import captioning
from longvid_jax.metrics.common import COMPAT_MODES, InputFileError, check_compat

_BENCHMARK = flags.DEFINE_enum(
    "benchmark", None, list(metrics.BENCHMARKS), "Benchmark to score (required)."
)
_PREDICTIONS = flags.DEFINE_string(
    "predictions", None, "Predictions file, in the original system's format (required)."
)
_GROUND_TRUTH = flags.DEFINE_string(
    "ground_truth", None, "Ground-truth file (or MLVU data folder), in the original format."
)
_ANNOTATIONS = flags.DEFINE_string(
    "annotations", None, "timechat_vhd: coco-format annotation file giving video durations."
)
_JUDGE_SCORES = flags.DEFINE_string(
    "judge_scores",
    None,
    "mmduet_magqa: JSON list of recorded judge outputs {question, gold_answer, pred_answer, "
    "judge_text}.",
)
_COMPAT = flags.DEFINE_enum(
    "compat", "corrected", list(COMPAT_MODES), "original: the originals' numbers, bugs included."
)
_OUTPUT = flags.DEFINE_string(
    "output", None, "Scores JSON (default <predictions>.<benchmark>.scores.json)."
)
_PLOT = flags.DEFINE_string(
    "plot", None, "Folder for one PNG per video/query: predicted vs ground-truth segments."
)
_MAX_PLOTS = flags.DEFINE_integer("max_plots", 50, "Most PNGs --plot writes.", lower_bound=0)
_PARAM = flags.DEFINE_multi_string(
    "param",
    [],
    "key=value keyword of the benchmark's evaluate function (value read as JSON when it "
    "parses, else as a string), e.g. world_size=8, sample=true, split=test.",
)

# The extra-file flags, by the name the registry uses.
_EXTRA_FILE_FLAGS = {"annotations": _ANNOTATIONS, "judge_scores": _JUDGE_SCORES}


# ----------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------


def _json_key(key: Any) -> str:
    if isinstance(key, str):
        return key
    if isinstance(key, tuple):
        return "/".join(_json_key(k) for k in key)
    if isinstance(key, np.generic):
        key = key.item()
    return json.dumps(key)  # what json.dump writes for an int, float, bool or None key


def to_jsonable(obj: Any) -> Any:
    """Converts a metric result into what `json.dump` writes and `json.load` reads back.

    Mapping keys become strings (as `json.dump` writes them), tuples lists, NumPy arrays and
    scalars Python lists and numbers. Floats are kept, NaN included.

    Raises:
        TypeError: for a value JSON cannot hold (e.g. a function).
    """
    if isinstance(obj, Mapping):
        return {_json_key(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    raise TypeError(f"cannot write a {type(obj).__name__} to JSON")


def _is_plain(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    return value is None or isinstance(value, (str, int, float, bool))


def parse_params(items: Sequence[str]) -> dict[str, Any]:
    """Parses `--param` values "key=value"; the value is JSON when it parses, else a string.

    Raises:
        ValueError: an item without "=".
    """
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--param needs key=value, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def score(
    benchmark: str,
    predictions_path: str | pathlib.Path,
    ground_truth_path: str | pathlib.Path | None = None,
    *,
    compat: str = "corrected",
    extra_files: Mapping[str, str | pathlib.Path | None] | None = None,
    params: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Reads a benchmark's files and scores them with its `evaluate_<name>` function.

    Args:
        benchmark: a name in `metrics.BENCHMARKS`.
        predictions_path: the predictions file, in the original system's format.
        ground_truth_path: the ground-truth file (the MLVU data folder for mlvu); may be None
            only where the benchmark does not need one (videomme).
        compat: "corrected" (default) or "original".
        extra_files: extra inputs by name, e.g. {"annotations": path} (timechat_vhd) or
            {"judge_scores": path} (mmduet_magqa); None values are ignored.
        params: keyword arguments for the evaluate function, over the benchmark's defaults.

    Returns:
        A JSON-ready dict: {"benchmark", "compat", "scores", "per_item" (the evaluate function's,
        keys as strings), "details" (its other outputs, e.g. the MMDuet threshold sweep),
        "params" (the plain-valued keyword arguments used), "files" (absolute input paths)}.

    Raises:
        ValueError: unknown benchmark, compat or parameter; an extra file the benchmark does not
            read; a missing required file argument; MAGQA without judge scores.
        InputFileError: a file is missing, unreadable or malformed, or the files do not fit
            together (the message names the files and the problem).
        captioning.JavaNotFoundError: a Java-based scorer is needed and `java` is missing.
    """
    bench = metrics.get_benchmark(benchmark)
    check_compat(compat)
    extra = {k: pathlib.Path(v) for k, v in (extra_files or {}).items() if v is not None}
    unknown = sorted(set(extra) - set(bench.extra_files))
    if unknown:
        reads = ", ".join(bench.extra_files) or "none"
        raise ValueError(f"benchmark {benchmark} reads no {unknown} file (extra files: {reads})")
    if ground_truth_path is None and bench.needs_ground_truth:
        raise ValueError(f"benchmark {benchmark} needs a ground-truth file (--ground_truth)")
    accepted = set(inspect.signature(bench.evaluate).parameters) - {
        "predictions", "ground_truth", "compat"
    }
    bad = sorted(set(params or {}) - accepted)
    if bad:
        raise ValueError(f"{bad} are not parameters of {benchmark} (known: {sorted(accepted)})")
    pred = pathlib.Path(predictions_path)
    gt = None if ground_truth_path is None else pathlib.Path(ground_truth_path)

    loaded = bench.load(pred, gt, extra)
    kwargs = {**bench.params, **loaded.params, **(params or {})}

    files = {"predictions": str(pred.resolve()), "ground_truth": gt and str(gt.resolve())}
    files.update({k: str(v.resolve()) for k, v in extra.items()})
    try:
        result = bench.evaluate(loaded.predictions, loaded.ground_truth, compat=compat, **kwargs)
    except (KeyError, ValueError) as e:
        named = ", ".join(f"{k} file {v}" for k, v in files.items() if v)
        raise InputFileError(
            f"{benchmark}: the inputs do not fit together ({named}): {type(e).__name__}: {e}"
        ) from e
    return to_jsonable(
        {
            "benchmark": benchmark,
            "compat": compat,
            "scores": result["scores"],
            "per_item": result["per_item"],
            "details": {k: v for k, v in result.items() if k not in ("scores", "per_item")},
            "params": {k: v for k, v in kwargs.items() if _is_plain(v)},
            "files": files,
        }
    )


# ----------------------------------------------------------------------------------------------
# Table
# ----------------------------------------------------------------------------------------------


def _pattern(pattern: str) -> re.Pattern:
    return re.compile("[^/]*".join(re.escape(p) for p in pattern.split("*")))


def headline_scores(scores: Mapping[str, Any], patterns: Sequence[str]) -> list[tuple[str, Any]]:
    """The (key, value) rows of the table: keys matching each pattern in turn, each key once.

    "*" in a pattern matches any run of characters but "/". A pattern without "*" whose key is
    absent gives a row with value None.
    """
    rows, seen = [], set()
    for pattern in patterns:
        if "*" not in pattern and pattern not in scores:
            rows.append((pattern, None))
            continue
        regex = _pattern(pattern)
        for key, value in scores.items():
            if key not in seen and regex.fullmatch(key):
                seen.add(key)
                rows.append((key, value))
    return rows


def _format_value(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def format_table(result: Mapping[str, Any]) -> str:
    """Plain-text table of the headline scores of a `score` result (aligned columns)."""
    bench = metrics.get_benchmark(result["benchmark"])
    rows = headline_scores(result["scores"], bench.headline)
    header = (
        f"{result['benchmark']} (compat={result['compat']}, {len(result['per_item'])} items)"
    )
    if not rows:
        return header + "\n  (no headline scores)"
    width = max(len("metric"), *(len(k) for k, _ in rows))
    values = [_format_value(v) for _, v in rows]
    vwidth = max(len("value"), *(len(v) for v in values))
    lines = [header, f"  {'metric':<{width}}  {'value':>{vwidth}}"]
    lines.append(f"  {'-' * width}  {'-' * vwidth}")
    lines += [f"  {k:<{width}}  {v:>{vwidth}}" for (k, _), v in zip(rows, values)]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------

# Rows of a plot, top to bottom: (per-item key, label).
_SPAN_ROWS = (
    ("gt_spans", "ground truth"),
    ("grounding_gt_spans", "grounding GT"),
    ("pred_spans", "prediction"),
)


def _spans(value: Any) -> list[tuple[float, float]]:
    out = []
    for span in value or []:
        if isinstance(span, Sequence) and len(span) == 2 and all(
            isinstance(t, (int, float)) for t in span
        ):
            out.append((min(span), max(span)))
    return out


def _points(item: Mapping[str, Any]) -> list[tuple[float, float | None]]:
    """Predicted time points: `pred_points` [[t, score]] (TimeChat VHD) or MAGQA reply times."""
    if "pred_points" in item:
        return [(float(p[0]), float(p[1])) for p in item["pred_points"]]
    return [(float(t), None) for t in item.get("reply_times", []) if t >= 0]


def _has_time(item: Any) -> bool:
    return isinstance(item, Mapping) and (
        any(k in item for k in ("pred_spans", "pred_points", "reply_times"))
        and any(k in item for k, _ in _SPAN_ROWS)
    )


def _file_name(key: str, used: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", key).strip("._") or "item"
    name, k = base, 2
    while name in used:
        name, k = f"{base}_{k}", k + 1
    used.add(name)
    return name + ".png"


def _plot_item(path: pathlib.Path, title: str, item: Mapping[str, Any]) -> None:
    from matplotlib.figure import Figure  # Agg canvas; no pyplot, no global backend change

    rows = [(label, _spans(item[key])) for key, label in _SPAN_ROWS if key in item]
    points = _points(item)
    if points and not any(label == "prediction" for label, _ in rows):
        rows.append(("prediction", []))
    ends = [e for _, spans in rows for _, e in spans] + [t for t, _ in points]
    duration = item.get("duration")
    xmax = max([duration or 0.0, *ends, 1.0]) * 1.03

    fig = Figure(figsize=(10, 1.0 + 0.6 * len(rows)), dpi=100)
    ax = fig.add_subplot()
    for y, (label, spans) in enumerate(reversed(rows)):
        color = "tab:blue" if label == "prediction" else "tab:green"
        bars = [(s, e - s) for s, e in spans if e > s]
        if bars:
            ax.broken_barh(bars, (y - 0.3, 0.6), facecolors=color, alpha=0.7)
        for s, e in spans:
            if e <= s:  # a zero-length span: a tick at its time
                ax.plot([s, s], [y - 0.3, y + 0.3], color=color, linewidth=2)
        if label == "prediction" and points:
            # Scored points (saliency) as stems whose height is the score over the largest one;
            # unscored points (reply times) as markers.
            top = max((v for _, v in points if v is not None), default=0) or 1.0
            for t, value in points:
                if value is None:
                    ax.plot([t], [y], marker="v", color="tab:red")
                else:
                    h = 0.6 * max(value, 0) / top
                    ax.plot([t, t], [y - 0.3, y - 0.3 + h], color="tab:red", linewidth=1.5)
                    ax.plot([t], [y - 0.3 + h], marker="o", markersize=3, color="tab:red")
    if duration:
        ax.axvline(duration, color="gray", linestyle="--", linewidth=1)
    labels = [label for label, _ in reversed(rows)]
    if any(v is not None for _, v in points):
        labels = [f"{x} (saliency)" if x == "prediction" else x for x in labels]
    ax.set_yticks(range(len(rows)), labels)
    ax.set_ylim(-0.6, len(rows) - 0.4)
    ax.set_xlim(0, xmax)
    ax.set_xlabel("time (s)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)


def write_plots(
    result: Mapping[str, Any], out_dir: str | pathlib.Path, *, max_plots: int = 50
) -> list[pathlib.Path]:
    """Writes one PNG per video/query: predicted vs ground-truth segments, seconds on x.

    Items are taken in `per_item` order, up to `max_plots`. Benchmarks whose items carry no
    time spans (e.g. mlvu) write nothing and log a note.

    Args:
        result: a `score` result.
        out_dir: the folder (created if needed).
        max_plots: most files written.

    Returns:
        The paths written.
    """
    items = [(k, v) for k, v in result["per_item"].items() if _has_time(v)]
    if not items:
        logging.info("%s: its items carry no time spans, so --plot writes nothing",
                     result["benchmark"])
        return []
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    paths = []
    for key, item in items[:max_plots]:
        title = f"{result['benchmark']}  {key}"
        video = item.get("vid") or item.get("video_id")
        if video and video not in key:
            title += f"  {video}"
        iou = item.get("iou")
        if isinstance(iou, (int, float)):
            title += f"  (IoU {iou:.3f})"
        path = out / _file_name(key, used)
        _plot_item(path, title, item)
        paths.append(path)
    if len(items) > max_plots:
        logging.info("--plot: wrote %d of %d items (--max_plots)", max_plots, len(items))
    return paths


# ----------------------------------------------------------------------------------------------
# Model-running mode
# ----------------------------------------------------------------------------------------------

# Benchmarks with a model-running loader (longvid_jax.eval_data).
RUNNABLE_BENCHMARKS = ("mlvu", "music_avqa", "videomme")
_MLVU_STOP_STR = "<|im_end|>"  # TDC conv_qwen.sep


def _music_avqa_pred(decoded: str) -> str:
    """TDC eval_musicQA.py's post-processing of the decoded answer."""
    pred = decoded.strip()
    if pred.endswith(_MLVU_STOP_STR):
        pred = pred[: -len(_MLVU_STOP_STR)].strip()
    return pred.replace("Answer", "")


def build_predictions(benchmark: str, items: Sequence[Any], answers: Sequence[str]) -> Any:
    """The predictions file content the scoring mode reads, from items and decoded answers.

    Args:
        benchmark: "mlvu", "music_avqa" or "videomme".
        items: `eval_data.EvalItem`s.
        answers: the decoded model text per item ("" where the video could not be read).

    Returns:
        mlvu: `[{task_type, video_name, decoded, question, prompt, answer, video}]` (TDC's
        outputs with the raw text); music_avqa: TDC eval_musicQA.py's records `[{idx, prompt,
        pred, correct_answer, type, video_name, decoded}]`; videomme: eval_your_results.py's
        results `[{video_id, duration_category, video_category, video_subcategory, url, videoID,
        questions: [{question_id, task_type, question, options, answer, response}]}]`.

    Raises:
        ValueError: an unknown benchmark or lengths that differ.
    """
    if len(items) != len(answers):
        raise ValueError(f"{len(items)} items but {len(answers)} answers")
    if benchmark == "mlvu":
        return [{"task_type": it.task, "video_name": it.record["video"], "decoded": a,
                 "question": it.record["question"], "prompt": it.prompt, "answer": it.answer,
                 "video": it.video} for it, a in zip(items, answers)]
    if benchmark == "music_avqa":
        return [{"idx": it.record["question_id"], "prompt": it.prompt, "pred": _music_avqa_pred(a),
                 "correct_answer": it.answer, "type": it.record["type"],
                 "video_name": f"{it.record['video_id']}.mp4", "decoded": a}
                for it, a in zip(items, answers)]
    if benchmark == "videomme":
        videos: dict[str, dict[str, Any]] = {}
        for it, a in zip(items, answers):
            r = it.record
            key = str(r.get("video_id", r["videoID"]))
            video = videos.setdefault(key, {
                "video_id": key, "duration_category": r["duration"], "video_category": r["domain"],
                "video_subcategory": r["sub_category"], "url": r.get("url"),
                "videoID": r["videoID"], "questions": []})
            video["questions"].append({
                "question_id": r["question_id"], "task_type": r["task_type"],
                "question": r["question"], "options": list(r["options"]), "answer": r["answer"],
                "response": a})
        return list(videos.values())
    raise ValueError(f"no model-running mode for benchmark {benchmark!r}; known: "
                     f"{', '.join(RUNNABLE_BENCHMARKS)}")


def per_task_scores(benchmark: str, result: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """`{task: {"accuracy": x100, "n": items}}` from a `score` result, tasks in score order.

    Tasks: MLVU tasks; Video-MME task types; Music-AVQA "<modality>/<type>".
    """
    counts: dict[str, int] = {}
    for item in result["per_item"].values():
        task = item.get("task_type") if benchmark != "music_avqa" else item.get("type")
        counts[task] = counts.get(task, 0) + (item.get("n_evaluations", 1) or 0)
    scores = result["scores"]
    key = {"mlvu": "{}", "videomme": "task/{}", "music_avqa": "{}"}[benchmark]
    ordered = [k for k in scores if k in counts] if benchmark == "mlvu" else []
    ordered += [t for t in counts if t not in ordered]
    return {t: {"accuracy": scores.get(key.format(t)), "n": counts[t]} for t in ordered}


def run_benchmark(
    config: Any,
    checkpoint: str | None,
    benchmark: str,
    data_dir: str | pathlib.Path,
    *,
    limit: int | None = None,
    output: str | pathlib.Path | None = None,
    predictions_out: str | pathlib.Path | None = None,
    compat: str = "corrected",
    params: Any = None,
    predictor: Any = None,
    check_videos: bool = True,
    log: Any = None,
) -> dict[str, Any]:
    """Answers a benchmark with a checkpoint, writes predictions and scores (model-running mode).

    Every item is answered greedily (temperature 0) with its benchmark's `max_new_tokens`, the
    video read as `infer.prepare_example` reads it. A video that cannot be decoded gets an empty
    answer (counted wrong; the error is kept in the predictions file under "error").

    Args:
        config: the training config (ConfigDict) the checkpoint was trained with.
        checkpoint: workdir, checkpoints folder or step folder (see `infer`); may be None when
            `params` or `predictor` is given.
        benchmark: "mlvu", "music_avqa" or "videomme".
        data_dir: the benchmark's data folder in its release layout (`eval_data`).
        limit: answer at most this many items, taken in turn from each task (None: all).
        output: the scores JSON (default `<predictions_out>.<benchmark>.scores.json`).
        predictions_out: the predictions file (default `<output stem>.predictions.json` beside
            `output`, else `<benchmark>.predictions.json` in the working folder).
        compat: "corrected" or "original": the MLVU prompt / letters and every scorer.
        params: parameters to use instead of reading `checkpoint` (tests).
        predictor: an `infer.Predictor` to reuse (its model answers; `config`, `checkpoint` and
            `params` are then unused).
        check_videos: fail before loading the model when a video file is missing.
        log: stream for per-item stage times (default: discarded; the progress bar goes to
            stderr).

    Returns:
        The `score` result plus "per_task" (`per_task_scores`) and "run" {checkpoint, data,
        items, limit, seconds, answer_seconds, errors}, as written to `output`.

    Raises:
        ValueError: unknown benchmark or compat; `InputFileError` (a ValueError) for a missing
            or malformed benchmark file or video.
        infer.InferenceError: an unreadable checkpoint.
    """
    if benchmark not in RUNNABLE_BENCHMARKS:
        raise ValueError(f"no model-running mode for benchmark {benchmark!r}; known: "
                         f"{', '.join(RUNNABLE_BENCHMARKS)}")
    check_compat(compat)
    kw: dict[str, Any] = {"check_videos": check_videos}
    if benchmark == "mlvu":
        kw["compat"] = compat
    items = eval_data.take(eval_data.load(benchmark, data_dir, **kw), limit)
    if not items:
        raise InputFileError(f"{benchmark} data folder {data_dir}: no items to evaluate")
    if predictions_out is None:
        predictions_out = (pathlib.Path(output).with_name(pathlib.Path(output).stem
                                                          + ".predictions.json")
                           if output is not None else pathlib.Path(f"{benchmark}.predictions.json"))
    predictions_out = pathlib.Path(predictions_out)
    output = pathlib.Path(output or f"{predictions_out}.{benchmark}.scores.json")

    t0 = time.perf_counter()
    if predictor is None:
        from longvid_jax import infer  # pylint: disable=import-outside-toplevel

        predictor = infer.make_predictor(config, checkpoint, params=params,
                                         log=log if log is not None else io.StringIO())
    from longvid_jax.input import decode  # pylint: disable=import-outside-toplevel

    answers, errors = [], {}
    t1 = time.perf_counter()
    for item in tqdm(items, desc=f"{benchmark}", unit="item", dynamic_ncols=True):
        try:
            out = predictor.answer(item.video, item.prompt, max_new_tokens=item.max_new_tokens,
                                   temperature=0.0)
            answers.append(out["answer"])
        except decode.VideoDecodeError as e:
            logging.warning("%s: %s (answered with empty text)", item.id, e)
            answers.append("")
            errors[item.id] = str(e)
        if isinstance(predictor.log, io.StringIO):  # keep the discarded log from growing
            predictor.log.seek(0)
            predictor.log.truncate()
    answer_s = time.perf_counter() - t1

    preds = build_predictions(benchmark, items, answers)
    if errors:
        flat = preds if benchmark != "videomme" else [q for v in preds for q in v["questions"]]
        ids = [it.id for it in items]
        for rec, item_id in zip(flat, ids):
            if item_id in errors:
                rec["error"] = errors[item_id]
    write_json(preds, predictions_out)

    ground_truth: pathlib.Path | None = None
    if benchmark == "mlvu":
        # The items answered, as {task: [items]}, so a --limit subset scores on its own.
        subset: dict[str, list[Any]] = {}
        for item in items:
            subset.setdefault(item.task, []).append(dict(item.record))
        ground_truth = predictions_out.with_name(predictions_out.stem + ".ground_truth.json")
        write_json(subset, ground_truth)
    result = score(benchmark, predictions_out, ground_truth, compat=compat)
    result["per_task"] = per_task_scores(benchmark, result)
    result["run"] = {
        "checkpoint": None if checkpoint is None else str(pathlib.Path(checkpoint).resolve()),
        "data": str(pathlib.Path(data_dir).resolve()), "items": len(items), "limit": limit,
        "seconds": time.perf_counter() - t0, "answer_seconds": answer_s, "errors": errors,
    }
    result["files"]["data"] = str(pathlib.Path(data_dir).resolve())
    result["files"]["output"] = str(output.resolve())
    write_json(result, output)
    return result


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------


def write_json(result: Mapping[str, Any], path: str | pathlib.Path) -> None:
    """Writes a `score` result as JSON (NaN written as Python's json module does)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
        f.write("\n")


def _define_run_flags() -> None:
    """Defines the model-running flags (--config, --checkpoint, --data, --limit,
    --predictions_out) where not yet defined. Called when the CLI runs, not on import: the
    trainer defines its own --config, and both modules may be imported in one process."""
    from ml_collections import config_flags  # pylint: disable=import-outside-toplevel

    defined = flags.FLAGS
    if "config" not in defined:
        config_flags.DEFINE_config_file("config", None, "Model-running mode: the training config "
                                        "(get_config), as trained.", lock_config=True)
    if "checkpoint" not in defined:
        flags.DEFINE_string("checkpoint", None, "Model-running mode: training workdir, "
                            "checkpoints folder or step folder.")
    if "data" not in defined:
        flags.DEFINE_string("data", None, "Model-running mode: the benchmark's data folder "
                            "(release layout, see longvid_jax.eval_data).")
    if "limit" not in defined:
        flags.DEFINE_integer("limit", None, "Model-running mode: answer at most N items, taken "
                             "in turn from each task.")
    if "predictions_out" not in defined:
        flags.DEFINE_string("predictions_out", None, "Model-running mode: where the predictions "
                            "go (default <output stem>.predictions.json).")
    if "tdc_checkpoint" not in defined:
        flags.DEFINE_string("tdc_checkpoint", None, "Model-running mode with a converted TDC "
                            "release (`python -m convert.tdc_keys` output) instead of "
                            "--config / --checkpoint; answers through tdc_infer.TDCPredictor.")
    if "bert_vocab" not in defined:
        flags.DEFINE_string("bert_vocab", None, "With --tdc_checkpoint: bert-base-uncased "
                            "vocab.txt (the Q-Former's question ids).")
    if "tokenizer" not in defined:
        flags.DEFINE_string("tokenizer", "qwen2", "With --tdc_checkpoint: the LLM tokenizer "
                            "('qwen2' or a local HF folder).")


def tdc_predictor(checkpoint: str, tokenizer: str = "qwen2", bert_vocab: str | None = None):
    """A `tdc_infer.TDCPredictor` on a converted TDC release (`convert.tdc_keys` orbax folder),
    for `run_benchmark(..., predictor=...)`.

    Raises:
      ValueError: a missing tower, or no `bert_vocab` for a compressor that reads text.
    """

    from convert import tdc_keys  # pylint: disable=import-outside-toplevel
    from longvid_jax import tdc_infer  # pylint: disable=import-outside-toplevel
    from longvid_jax.input import tokenizer as tokenizer_lib  # pylint: disable=import-outside-toplevel

    params, configs = tdc_keys.load_orbax(checkpoint)
    bert = (tokenizer_lib.wordpiece_tokenizer(bert_vocab)
            if bert_vocab else None)
    return tdc_infer.TDCPredictor(params, configs, tokenizer_lib.load_tokenizer(tokenizer),
                                  bert_tokenizer=bert, log=io.StringIO())


def _flag(name: str) -> Any:
    return flags.FLAGS[name].value if name in flags.FLAGS else None


def _main_run() -> None:
    """The model-running mode of `main` (--data given)."""
    if _BENCHMARK.value not in RUNNABLE_BENCHMARKS:
        raise app.UsageError(f"--data (model-running mode) works with --benchmark="
                             f"{'|'.join(RUNNABLE_BENCHMARKS)}, got {_BENCHMARK.value}")
    predictor = None
    if _flag("tdc_checkpoint") is not None:
        predictor = tdc_predictor(_flag("tdc_checkpoint"), _flag("tokenizer"),
                                  _flag("bert_vocab"))
    elif _flag("config") is None:
        raise app.UsageError("--config is required with --data, e.g. --config=configs/tdc.py "
                             "(or --tdc_checkpoint for a converted TDC release)")
    elif _flag("checkpoint") is None:
        raise app.UsageError("--checkpoint is required with --data")
    if _PREDICTIONS.value is not None:
        raise app.UsageError("give --predictions (score a file) or --data (run the model), "
                             "not both")
    from longvid_jax import infer  # pylint: disable=import-outside-toplevel

    try:
        result = run_benchmark(
            _flag("config"), _flag("checkpoint") or _flag("tdc_checkpoint"), _BENCHMARK.value,
            _flag("data"), limit=_flag("limit"), output=_OUTPUT.value,
            predictions_out=_flag("predictions_out"), compat=_COMPAT.value,
            predictor=predictor)
    except (ValueError, infer.InferenceError) as e:  # InputFileError is a ValueError
        raise SystemExit(f"error: {e}") from e
    print(format_table(result))
    for task, row in result["per_task"].items():
        print(f"  {task}: {_format_value(row['accuracy'])} ({row['n']} items)")
    print(f"wrote {result['files']['predictions']} and {result['files']['output']}")


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if _BENCHMARK.value is None:
        raise app.UsageError(f"--benchmark is required, one of: {', '.join(metrics.BENCHMARKS)}")
    if _flag("data") is not None:
        xla_flags.apply_defaults()  # before the backend starts
        _main_run()
        return
    if _PREDICTIONS.value is None:
        raise app.UsageError("--predictions is required (or --data with --config and "
                             "--checkpoint to run a model)")
    try:
        result = score(
            _BENCHMARK.value,
            _PREDICTIONS.value,
            _GROUND_TRUTH.value,
            compat=_COMPAT.value,
            extra_files={name: holder.value for name, holder in _EXTRA_FILE_FLAGS.items()},
            params=parse_params(_PARAM.value),
        )
    except (ValueError, captioning.JavaNotFoundError) as e:  # InputFileError is a ValueError
        raise SystemExit(f"error: {e}") from e
    output = _OUTPUT.value or f"{_PREDICTIONS.value}.{_BENCHMARK.value}.scores.json"
    result["files"]["output"] = str(pathlib.Path(output).resolve())
    if _PLOT.value:
        paths = write_plots(result, _PLOT.value, max_plots=_MAX_PLOTS.value)
        result["files"]["plots"] = [str(p.resolve()) for p in paths]
    write_json(result, output)
    print(format_table(result))
    print(f"wrote {output}")


if __name__ == "__main__":
    _define_run_flags()
    app.run(main)
