"""MMDuet post-processing of per-frame relevance scores: grounding and highlight detection.

Follows yellow-binary-tree/MMDuet @ 33be138, ``test/evaluate.py`` with ``is_online_model=1``:
* ``--func grounding`` (Charades-STA, and QVHighlights through ``qvh_to_charades_format``):
  ``smooth_pred_list`` -> ``normalize_pred_list`` (min-max) -> threshold sweep
  ``np.arange(0.30, 0.71, 0.02)`` -> ``calculate_iou`` (frame-set IoU, ``is_time_in_span`` gold)
  -> mIoU and R@0.3/0.5/0.7 per (smoothing window, threshold), plus the per-video "best among all
  thresholds" line it prints.
* ``--func qvh_highlight``: smoothed (not normalised) scores summed per block of
  ``int(2 / frame_interval)`` frames, then ``test/qvh/eval.py::eval_submission``
  (``match_number=False``), i.e. ``highlight.evaluate_highlights``.

Prediction lines are those inference.py writes (one JSON object per line, already loaded):
``{"question_id", "video_duration", "debug_data": [{"video_time", "relevance_score": [p0, p1]}]}``.
evaluate.py reads ``video_time`` and ``relevance_score[1]``, while inference.py itself writes
``time`` and a float ``relevance_score``; both layouts are accepted (a frame without a score counts
0, as evaluate.py). ``compat="original"`` reproduces the fixtures
(../shared/fixtures/metrics/README.md, sections 4 and 5) exactly; the default "corrected" fixes the
documented bugs. Pure Python / NumPy.
"""

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from longvid_jax.metrics.common import check_compat
from longvid_jax.metrics.grounding import R1_THRESHOLDS, recall_at_iou
from longvid_jax.metrics.highlight import evaluate_highlights

WINDOW_SIZES = tuple(range(15))
CLIP_SECONDS = 2


def sweep_thresholds(*, compat: str = "corrected") -> list[float]:
    """The 21 min-max score thresholds 0.30, 0.32, ..., 0.70 of the grounding sweep.

    ``compat="original"`` returns ``np.arange(0.30, 0.71, 0.02)`` as evaluate.py builds it, whose
    values drift (0.36000000000000004, ..., 0.5000000000000002, ..., 0.7000000000000004): with the
    test ``p >= threshold`` "a normalised 0.5 fails the '0.5' threshold" (fixtures README,
    section 4). ``compat="corrected"`` returns the exact decimals (``np.round(..., 2)``).

    Returns:
        21 Python floats, increasing.

    Raises:
        ValueError: on an unknown ``compat``.
    """
    values = np.arange(0.30, 0.71, 0.02)
    if check_compat(compat) == "corrected":
        values = np.round(values, 2)
    return [float(v) for v in values]


def frames_from_debug_data(debug_data: Sequence[Mapping[str, Any]]) -> tuple[list, list]:
    """Frame times and relevance scores of one prediction line.

    Args:
        debug_data: ``[{"video_time" (or "time"): seconds, "relevance_score": [p0, p1] or p1}]``.

    Returns:
        ``(times, scores)``: two lists of length F; a frame without ``relevance_score`` scores 0.
    """
    times, scores = [], []
    for frame in debug_data:
        times.append(frame["video_time"] if "video_time" in frame else frame["time"])
        if "relevance_score" in frame:
            score = frame["relevance_score"]
            scores.append(score[1] if isinstance(score, (list, tuple)) else score)
        else:
            scores.append(0)
    return times, scores


def smooth_scores(scores: Sequence[float], window: int) -> list[float]:
    """Moving mean over ``[i - window, i + window]`` clipped to the video (``smooth_pred_list``).

    Args:
        scores: F per-frame scores.
        window: half-width in frames (0 = no smoothing).

    Returns:
        F Python floats.
    """
    x = np.asarray(scores, dtype=np.float64)
    n, width = len(x), 2 * window + 1
    out = np.empty(n)
    if n >= width:
        # Row-wise np.mean of the full windows: the same pairwise sums as one np.mean per window.
        out[window : n - window] = sliding_window_view(x, width).mean(axis=1)
        edges = [*range(window), *range(n - window, n)]
    else:
        edges = range(n)
    for i in edges:
        out[i] = np.mean(x[max(0, i - window) : min(n, i + window + 1)])
    return out.tolist()


def minmax_normalize(scores: Sequence[float]) -> list[float]:
    """Min-max normalisation to [0, 1] (``normalize_pred_list``).

    Constant scores give 0/0: NaN for every frame (the original's numpy warning is silenced), so
    no frame passes any threshold.

    Args:
        scores: F floats.

    Returns:
        F Python floats (NaN when the scores are constant).
    """
    hi, lo = max(scores), min(scores)
    if hi == lo:
        return [float("nan")] * len(scores)
    return [(p - lo) / (hi - lo) for p in scores]


def gold_frame_mask(times: Sequence[float], spans: Iterable[Sequence[float]]) -> list[bool]:
    """Frames whose time lies in any gold span, boundaries included (``is_time_in_span``)."""
    spans = [list(s) for s in spans]
    return [any(s[0] <= t <= s[1] for s in spans) for t in times]


def keep_longest_run(mask: Sequence[bool]) -> list[bool]:
    """Keeps only the first longest run of True (``keep_longest_true_span``)."""
    best_len = best_start = cur_len = cur_start = 0
    for i, value in enumerate(mask):
        if value:
            if cur_len == 0:
                cur_start = i
            cur_len += 1
            if cur_len > best_len:
                best_len, best_start = cur_len, cur_start
        else:
            cur_len = 0
    out = [False] * len(mask)
    out[best_start : best_start + best_len] = [True] * best_len
    return out


def frame_iou(
    scores: Sequence[float],
    gold: Sequence[bool],
    threshold: float,
    *,
    largest_span: bool = False,
) -> float:
    """Frame-set IoU of ``scores >= threshold`` with the gold frames (``calculate_iou``).

    Args:
        scores: F normalised scores (NaN never passes).
        gold: F booleans.
        threshold: score threshold.
        largest_span: keep only the longest predicted run (``pred_get_largest_span``; evaluate.py
            leaves it False, so all frames at or above the threshold count).

    Returns:
        |pred & gold| / |pred | gold| as a Python float; 0.0 for an empty union.

    Raises:
        ValueError: if the lengths differ.
    """
    if len(scores) != len(gold):
        raise ValueError(f"{len(scores)} scores vs {len(gold)} gold frames")
    pred = [p >= threshold for p in scores]
    if largest_span:
        pred = keep_longest_run(pred)
    inter = sum(p and g for p, g in zip(pred, gold))
    union = sum(p or g for p, g in zip(pred, gold))
    return 0.0 if union == 0 else inter / union


def mask_to_spans(times: Sequence[float], mask: Sequence[bool]) -> list[list[float]]:
    """Runs of selected frames as ``[first_time, last_time]`` spans in seconds (for plotting)."""
    spans: list[list[float]] = []
    start = None
    for i, value in enumerate(mask):
        if value and start is None:
            start = i
        if not value and start is not None:
            spans.append([float(times[start]), float(times[i - 1])])
            start = None
    if start is not None:
        spans.append([float(times[start]), float(times[len(mask) - 1])])
    return spans


def qvh_to_charades_spans(
    answer: Mapping[str, Any], *, compat: str = "corrected"
) -> list[list[float]]:
    """Gold grounding spans of a QVHighlights answer: clips whose best worker score is 4.

    Follows ``test/evaluate.py::qvh_to_charades_format``. ``compat="original"`` keeps its bugs
    (fixtures README, section 5): "A clip whose maximum worker score is below 4, coming after a
    run, appends ``[clip*2, clip*2]``. This is a zero-length span at the current clip, not the
    run. Only the final run becomes ``[start*2, last*2+2]``. Gaps in relevant_clip_ids do not end
    a run." ``compat="corrected"`` returns every maximal run of consecutive clip ids with a best
    score of 4 as ``[start * 2, last * 2 + 2]`` seconds.

    Args:
        answer: ``{"relevant_clip_ids": [C_r], "saliency_scores": [C_r, 3]}``.
        compat: "original" or "corrected".

    Returns:
        ``[[start, end], ...]`` seconds (ints as in the original).

    Raises:
        ValueError: on an unknown ``compat``.
    """
    check_compat(compat)
    spans: list[list[float]] = []
    clip_ids = answer["relevant_clip_ids"]
    scores = [max(s) for s in answer["saliency_scores"]]
    if compat == "original":
        start = None
        clip_id = None
        for score, clip_id in zip(scores, clip_ids):
            if score < 4:
                if start is not None:
                    spans.append([clip_id * 2, clip_id * 2])
                    start = None
            elif start is None:
                start = clip_id
        if start is not None:
            spans.append([start * 2, clip_id * 2 + 2])
        return spans
    start = last = None
    for score, clip_id in zip(scores, clip_ids):
        if score >= 4 and start is not None and clip_id == last + 1:
            last = clip_id
            continue
        if start is not None:
            spans.append([start * 2, last * 2 + 2])
            start = None
        if score >= 4:
            start = last = clip_id
    if start is not None:
        spans.append([start * 2, last * 2 + 2])
    return spans


def clip_saliency_from_frames(
    times: Sequence[float], scores: Sequence[float], *, compat: str = "corrected"
) -> tuple[list[float], int]:
    """Per-2-s-clip saliency: sums of blocks of ``two_sec_frames`` frames (qvh_highlight branch).

    ``frame_interval = times[1] - times[0]``; the block count is ``ceil(F / two_sec_frames)``
    (AP later pads or truncates to the GT clip count). ``compat="original"`` uses
    ``int(2 / frame_interval)``: "A frame interval above 2 s would give 0 and crash" (fixtures
    README, section 5), and a rounded interval just above 2/k s drops to k-1 frames.
    ``compat="corrected"`` uses ``round(2 / frame_interval)`` and raises a clear error for
    intervals above 2 s (no whole frame per clip).

    Args:
        times: F frame times in seconds (F >= 2).
        scores: F (smoothed) scores.
        compat: "original" or "corrected".

    Returns:
        ``(clip_scores, two_sec_frames)``; sums are left to right as Python ``sum``.

    Raises:
        ValueError: on an unknown ``compat``, fewer than 2 frames, or (corrected) an interval
            above 2 s or not positive.
        ZeroDivisionError / ValueError: in "original" mode where the original crashes.
    """
    check_compat(compat)
    if len(times) < 2:
        raise ValueError("need at least 2 frames to read the frame interval")
    interval = times[1] - times[0]
    if compat == "original":
        n = int(2 / interval)
    else:
        if not 0 < interval <= CLIP_SECONDS:
            raise ValueError(f"frame interval {interval} s: need 0 < interval <= 2 s")
        n = max(1, round(CLIP_SECONDS / interval))
    clips = []
    for i in range(0, len(scores), n):
        total = 0
        for s in scores[i : i + n]:
            total = total + s
        clips.append(float(total))
    return clips, n


def _summarise(ious: Sequence[float]) -> list[float]:
    # evaluate.py: np.mean(ious) * 100 and np.mean([e >= r for e in ious]) * 100.
    recalls = recall_at_iou(ious, R1_THRESHOLDS, arithmetic="fraction")
    return [float(np.mean(ious) * 100)] + [recalls[r] for r in R1_THRESHOLDS]


_SUMMARY_NAMES = ("mIoU", "R@0.3", "R@0.5", "R@0.7")


def grounding_sweep(
    predictions: Sequence[Mapping[str, Any]],
    gold_spans: Mapping[Any, Sequence[Sequence[float]]],
    *,
    compat: str = "corrected",
    window_sizes: Sequence[int] = WINDOW_SIZES,
    largest_span: bool = False,
) -> dict[str, Any]:
    """The relevance-score grounding sweep of evaluate.py ``--func grounding``.

    For every smoothing window and threshold: per video, frame IoU of the normalised smoothed
    scores against the gold frames; then mIoU and R@0.3/0.5/0.7 x100 over videos. Per window, the
    "best among all thresholds" takes each video's best IoU over the thresholds (a per-video
    oracle the original only prints). ``compat`` picks the thresholds (``sweep_thresholds``).

    Args:
        predictions: prediction lines; those whose ``question_id`` has no gold are skipped
            (evaluate.py raises KeyError on them).
        gold_spans: ``{question_id: [[start, end], ...] seconds}``.
        compat: "original" or "corrected".
        window_sizes: smoothing half-widths in frames (evaluate.py: 0..14).
        largest_span: see ``frame_iou``.

    Returns:
        ``{"sweep": [{"smooth_window_size", "threshold", "scores": [mIoU, R@0.3, R@0.5, R@0.7]}]``
        (evaluate.py's output file), ``"best_among_thresholds": [{"smooth_window_size",
        "per_video": [...], "scores": [4 floats]}]``, ``"per_video": {qid: {"times", "raw_scores",
        "gold_mask", "iou": {window: [one IoU per threshold]}}}``, ``"thresholds"``,
        ``"question_ids"``}``.

    Raises:
        ValueError: on an unknown ``compat`` or when no prediction has gold.
    """
    thresholds = sweep_thresholds(compat=compat)
    preds = [p for p in predictions if p["question_id"] in gold_spans]
    if not preds:
        raise ValueError("no prediction has gold spans")
    per_video: dict[Any, dict[str, Any]] = {}
    for pred in preds:
        times, raw = frames_from_debug_data(pred["debug_data"])
        per_video[pred["question_id"]] = {
            "times": times,
            "raw_scores": raw,
            "gold_mask": gold_frame_mask(times, gold_spans[pred["question_id"]]),
            "iou": {},
        }
    sweep, best = [], []
    for w in window_sizes:
        ious_by_thr: list[list[float]] = [[] for _ in thresholds]
        for video in per_video.values():
            norm = minmax_normalize(smooth_scores(video["raw_scores"], w))
            row = [
                frame_iou(norm, video["gold_mask"], t, largest_span=largest_span)
                for t in thresholds
            ]
            video["iou"][w] = row
            for k, value in enumerate(row):
                ious_by_thr[k].append(value)
        for t, ious in zip(thresholds, ious_by_thr):
            sweep.append({"smooth_window_size": w, "threshold": t, "scores": _summarise(ious)})
        best_per_video = [max(v["iou"][w]) for v in per_video.values()]
        best.append(
            {
                "smooth_window_size": w,
                "per_video": best_per_video,
                "scores": _summarise(best_per_video),
            }
        )
    return {
        "sweep": sweep,
        "best_among_thresholds": best,
        "per_video": per_video,
        "thresholds": thresholds,
        "question_ids": list(per_video),
    }


def _sweep_scores(result: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    scores: dict[str, float] = {}
    for entry in result["sweep"]:
        key = f"{prefix}w{entry['smooth_window_size']}/t{entry['threshold']:.2f}"
        for name, value in zip(_SUMMARY_NAMES, entry["scores"]):
            scores[f"{key}/{name}"] = value
    for entry in result["best_among_thresholds"]:
        key = f"{prefix}w{entry['smooth_window_size']}/best_thr"
        for name, value in zip(_SUMMARY_NAMES, entry["scores"]):
            scores[f"{key}/{name}"] = value
    top = max(result["sweep"], key=lambda e: e["scores"][0])
    scores[f"{prefix}best_config/window"] = top["smooth_window_size"]
    scores[f"{prefix}best_config/threshold"] = top["threshold"]
    for name, value in zip(_SUMMARY_NAMES, top["scores"]):
        scores[f"{prefix}best_config/{name}"] = value
    return scores


def _grounding_per_item(
    result: Mapping[str, Any],
    gold_spans: Mapping[Any, Sequence[Sequence[float]]],
    durations: Mapping[Any, float],
) -> dict[Any, dict[str, Any]]:
    top = max(result["sweep"], key=lambda e: e["scores"][0])
    w, t = top["smooth_window_size"], top["threshold"]
    k = result["thresholds"].index(t)
    per_item = {}
    for qid, video in result["per_video"].items():
        norm = minmax_normalize(smooth_scores(video["raw_scores"], w))
        mask = [p >= t for p in norm]
        per_item[qid] = {
            "duration": durations.get(qid),
            "gt_spans": [list(s) for s in gold_spans[qid]],
            "pred_spans": mask_to_spans(video["times"], mask),
            "pred_config": {"smooth_window_size": w, "threshold": t},
            "iou": video["iou"][w][k],
            "iou_per_threshold": {win: list(row) for win, row in video["iou"].items()},
        }
    return per_item


def evaluate_mmduet_charades(
    predictions: Sequence[Mapping[str, Any]],
    ground_truth: Sequence[Mapping[str, Any]],
    *,
    compat: str = "corrected",
    window_sizes: Sequence[int] = WINDOW_SIZES,
    largest_span: bool = False,
) -> dict[str, Any]:
    """Scores MMDuet grounding from relevance scores, as evaluate.py ``--func grounding``.

    ``compat="corrected"`` fixes the drifting thresholds (see ``sweep_thresholds``); everything
    else (smoothing, min-max, frame IoU, all frames at or above the threshold, the per-video
    "best among all thresholds" oracle) is the original's in both modes.

    Args:
        predictions: prediction lines (see the module docstring).
        ground_truth: the gold json ``[{"question_id", "duration", "timestamps": [[s, e], ...]}]``
            (QVHighlights-format records with ``answer.saliency_scores`` are converted with
            ``qvh_to_charades_spans``, as evaluate.py does).
        compat: "original" or "corrected".
        window_sizes: smoothing half-widths (evaluate.py: 0..14).
        largest_span: see ``frame_iou``.

    Returns:
        ``{"scores": {"w<w>/t<thr>/<m>", "w<w>/best_thr/<m>", "best_config/..."}, "per_item":
        {question_id: {"duration", "gt_spans", "pred_spans", "pred_config", "iou",
        "iou_per_threshold"}}, "sweep": [...], "best_among_thresholds": [...], "thresholds":
        [...]}``; ``<m>`` in mIoU, R@0.3, R@0.5, R@0.7 (x100, unrounded), ``<thr>`` with 2
        decimals. ``best_config`` is the (window, threshold) of highest mIoU (chosen on the
        evaluated set; the original prints the whole sweep); ``pred_spans`` (runs of selected
        frame times, seconds) and ``iou`` are at that configuration, for plotting.

    Raises:
        ValueError: on an unknown ``compat`` or when no prediction has gold.
    """
    check_compat(compat)
    gold_spans, durations = {}, {}
    for g in ground_truth:
        if "answer" in g and "saliency_scores" in g["answer"]:
            gold_spans[g["question_id"]] = qvh_to_charades_spans(g["answer"], compat=compat)
        else:
            gold_spans[g["question_id"]] = g["timestamps"]
        durations[g["question_id"]] = g.get("duration")
    result = grounding_sweep(
        predictions,
        gold_spans,
        compat=compat,
        window_sizes=window_sizes,
        largest_span=largest_span,
    )
    return {
        "scores": _sweep_scores(result),
        "per_item": _grounding_per_item(result, gold_spans, durations),
        "sweep": result["sweep"],
        "best_among_thresholds": result["best_among_thresholds"],
        "thresholds": result["thresholds"],
    }


def evaluate_mmduet_qvh(
    predictions: Sequence[Mapping[str, Any]],
    ground_truth: Sequence[Mapping[str, Any]],
    *,
    compat: str = "corrected",
    grounding_gold: Sequence[Mapping[str, Any]] | None = None,
    window_sizes: Sequence[int] = WINDOW_SIZES,
) -> dict[str, Any]:
    """Scores MMDuet on QVHighlights: highlight detection, then grounding on the QVH gold.

    Highlights (evaluate.py ``--func qvh_highlight``): per window, per prediction line, scores are
    smoothed (not normalised) and summed per 2-s block (``clip_saliency_from_frames``); then
    ``highlight.evaluate_highlights`` scores the qids shared with the GT jsonl (predictions
    without gold and gold without predictions are dropped). Grounding (``--func grounding`` on
    the QVH-format gold): gold spans from ``qvh_to_charades_spans``, then ``grounding_sweep`` on
    the predictions that have gold.

    ``compat="corrected"`` fixes: the gold spans of ``qvh_to_charades_spans``; the thresholds of
    ``sweep_thresholds``; ``two_sec_frames`` of ``clip_saliency_from_frames``; HIT@1 of a
    constant prediction (``highlight.hit_at_one``).

    Args:
        predictions: prediction lines (see the module docstring).
        ground_truth: QVHighlights jsonl records ``[{"qid", "duration", "relevant_clip_ids",
            "saliency_scores", "relevant_windows", ...}]``.
        compat: "original" or "corrected".
        grounding_gold: MMDuet's QVH grounding gold ``[{"question_id", "duration", "answer":
            {"relevant_clip_ids", "saliency_scores", ...}}]``; by default built from
            ``ground_truth`` (same content).
        window_sizes: smoothing half-widths (evaluate.py: 0..14).

    Returns:
        ``{"scores": {"hl/w<w>/HL-min-<name>-<mAP|Hit1>", "grounding/..." (as
        ``evaluate_mmduet_charades``)}, "per_item": {qid: {"duration", "gt_spans" (QVH relevant
        windows), "grounding_gt_spans", "pred_spans", "pred_config", "iou", "iou_per_threshold",
        "frame_interval", "two_sec_frames", "pred_saliency_scores": {window: clip scores},
        "highlight": {window: highlight per-item entry}}}, "highlight_sweep":
        [{"smooth_window_size", "results": {"brief": scores}}], "grounding": {"sweep",
        "best_among_thresholds", "thresholds", "gold_spans"}}``.

    Raises:
        ValueError: on an unknown ``compat``.
    """
    check_compat(compat)
    frames = {p["question_id"]: frames_from_debug_data(p["debug_data"]) for p in predictions}
    scores: dict[str, Any] = {}
    per_item: dict[Any, dict[str, Any]] = {}
    gt_by_qid = {r["qid"]: r for r in ground_truth}
    for qid in frames:
        if qid in gt_by_qid:
            per_item[qid] = {
                "duration": gt_by_qid[qid]["duration"],
                "gt_spans": [list(w) for w in gt_by_qid[qid].get("relevant_windows", [])],
                "pred_saliency_scores": {},
                "highlight": {},
            }
    highlight_sweep = []
    for w in window_sizes:
        pred_saliency = {}
        for qid, (times, raw) in frames.items():
            clips, n = clip_saliency_from_frames(times, smooth_scores(raw, w), compat=compat)
            pred_saliency[qid] = clips
            if qid in per_item:
                per_item[qid]["frame_interval"] = times[1] - times[0]
                per_item[qid]["two_sec_frames"] = n
                per_item[qid]["pred_saliency_scores"][w] = clips
        hl = evaluate_highlights(pred_saliency, ground_truth, compat=compat)
        highlight_sweep.append({"smooth_window_size": w, "results": {"brief": hl["scores"]}})
        for name, value in hl["scores"].items():
            scores[f"hl/w{w}/{name}"] = value
        for qid, entry in hl["per_item"].items():
            per_item[qid]["highlight"][w] = {k: entry[k] for k in ("ap", "hit", "argmax_clip")}

    if grounding_gold is None:
        grounding_gold = [
            {
                "question_id": r["qid"],
                "duration": r["duration"],
                "answer": {
                    "relevant_clip_ids": r["relevant_clip_ids"],
                    "saliency_scores": r["saliency_scores"],
                    "relevant_windows": r.get("relevant_windows", []),
                },
            }
            for r in ground_truth
        ]
    gold_spans = {
        g["question_id"]: qvh_to_charades_spans(g["answer"], compat=compat) for g in grounding_gold
    }
    durations = {g["question_id"]: g.get("duration") for g in grounding_gold}
    grounding = grounding_sweep(predictions, gold_spans, compat=compat, window_sizes=window_sizes)
    scores.update(_sweep_scores(grounding, prefix="grounding/"))
    for qid, entry in _grounding_per_item(grounding, gold_spans, durations).items():
        target = per_item.setdefault(qid, {"duration": entry["duration"]})
        target["grounding_gt_spans"] = entry["gt_spans"]
        for key in ("pred_spans", "pred_config", "iou", "iou_per_threshold"):
            target[key] = entry[key]
    return {
        "scores": scores,
        "per_item": per_item,
        "highlight_sweep": highlight_sweep,
        "grounding": {
            "sweep": grounding["sweep"],
            "best_among_thresholds": grounding["best_among_thresholds"],
            "thresholds": grounding["thresholds"],
            "gold_spans": {q: gold_spans[q] for q in grounding["question_ids"]},
        },
    }
