"""Highlight detection: TimeChat saliency parsing, HL-mAP and HIT@1 at min score 2/3/4.

Follows RenShuhuai-Andy/TimeChat @ c60b332:
* ``utils/format_vhd.py::parse_highlights`` / ``format_vhd_output`` (through
  ``evaluate.py::format_vhd``): model text -> (time, saliency) pairs -> one score per 2-s clip.
* ``metrics/vhd/eval_vhd.py::eval_submission`` (``match_number=False``) -> ``eval_highlight`` ->
  ``compute_hl_ap`` / ``compute_hl_hit1`` / ``mk_gt_scores``, and ``metrics/vhd/utils.py::get_ap``
  (sklearn ``precision_recall_curve``).
yellow-binary-tree/MMDuet @ 33be138 ``test/qvh/eval.py`` and ``test/qvh/utils.py`` are the same
highlight code; ``mmduet_relevance.py`` reuses ``evaluate_highlights`` from here.

``compat="original"`` reproduces the fixtures (../shared/fixtures/metrics/README.md, section 2)
exactly; the default ``compat="corrected"`` fixes the documented parser and HIT@1 bugs. The AP
definition itself (interpolated precision averaged over the recall steps; AP 0 when a worker marks
no clip positive, 1 when all are positive) is the original's in both modes. Pure Python / NumPy.
"""

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from sklearn.metrics import precision_recall_curve

from longvid_jax.metrics.common import check_compat, clock_to_seconds

# (name, minimum worker score for a positive clip), as eval_vhd.py::eval_highlight.
HL_THRESHOLDS = (("Fair", 2), ("Good", 3), ("VeryGood", 4))
CLIP_SECONDS = 2

_NUMBER = r"\d*\.\d+|\d+"
_CLOCK_OR_NUMBER = r"\d{1,2}:\d{2}(?::\d{2})?|\d*\.\d+|\d+"


def _parse_class1(text: str, compat: str) -> tuple[list, list]:
    timestamps: list = []
    scores: list = []
    paras = [p for p in text.split("\n") if "second" in p or "score" in p]
    for para in paras:
        if compat == "original":
            num = re.search(r"There are (\d+) highlight moments", para)
            if num:
                num_highlights = int(num.group(1))
                para = para.replace(f"There are {num_highlights} highlight moments", "")
            else:
                num_highlights = 100
        else:
            num = re.search(r"there (?:are|is) (\d+) highlight moments?", para, flags=re.IGNORECASE)
            if num:
                num_highlights = int(num.group(1))
                para = para[: num.start()] + para[num.end() :]
            else:
                num_highlights = None
        pieces = para.split("score")
        time_part = pieces[0]
        if compat == "original":
            score_part = pieces[1] if len(pieces) > 1 else para
            time_numbers = re.findall(r"[-+]?\d*\.\d+|\d+", time_part)
            score_numbers = re.findall(r"\b\d\.\d\b", score_part)
        else:
            score_part = pieces[1] if len(pieces) > 1 else ""
            time_numbers = re.findall(_CLOCK_OR_NUMBER, time_part)
            score_numbers = re.findall(_NUMBER, score_part)
        if num_highlights is None:
            timestamps.extend(clock_to_seconds(t) for t in time_numbers)
            scores.extend(float(s) for s in score_numbers)
        elif num_highlights:
            timestamps.extend(
                float(t) if compat == "original" else clock_to_seconds(t)
                for t in time_numbers[: min(num_highlights, len(time_numbers))]
            )
            scores.extend(
                float(s) for s in score_numbers[: min(num_highlights, len(score_numbers))]
            )
    return timestamps, scores


def _parse_class2(text: str, compat: str) -> tuple[list, list]:
    timestamps: list = []
    scores: list = []
    cands = [d for d in re.split(r"\n+", text) if "second" in d or "score" in d or ":" in d]
    for line in cands:
        if compat == "original":
            found = re.findall(r"\b\d\.\d\b", line)
            if found:
                scores.append(float(found[-1]))
            times = re.findall(r"\b((\d{1,2}:\d{2}:\d{2}))\b|\b(\d+\.\d+\b|\b\d+)\b", line)
            kept = []
            for t in times:
                # findall returns 3-tuples: `':' in t` tests tuple membership (never true), and
                # the number group is '' for a clock time, so HH:MM:SS times are dropped.
                t = t[-1]
                if t != "" and float(t) > 10.0:
                    kept.append(t)
            if kept:
                timestamps.append(float(kept[-1]))
        else:
            line = re.sub(r"^\s*highlight\s*\d+\s*[:.)-]?", "", line, flags=re.IGNORECASE)
            before, sep, after = line.partition("score")
            times = re.findall(_CLOCK_OR_NUMBER, before)
            found = re.findall(_NUMBER, after) if sep else []
            if times and found:
                timestamps.append(clock_to_seconds(times[-1]))
                scores.append(float(found[-1]))
    return timestamps, scores


def parse_timechat_highlights(text: str, *, compat: str = "corrected") -> dict[str, list]:
    """Parses a TimeChat highlight answer into timestamps (seconds) and saliency scores.

    Follows ``utils/format_vhd.py::parse_highlights``: with fewer than 3 "second" and fewer than 3
    "score" in the text (class 1), lines holding either word give their numbers before "score" as
    times and after it as scores, limited by "There are N highlight moments"; otherwise (class 2)
    each line gives one time and one score. With more than one time, scores are padded with 0.0 or
    truncated to the number of times.

    ``compat="corrected"`` fixes the bugs of the fixtures README, section 2:
      * "Every 'th' in the text is replaced by a space" ("the" -> " e"): only an ordinal suffix
        after a digit ("10th") is dropped.
      * "This includes the '1' of 'There is 1 highlight moment' (qid 77 gives times [1, 46])": the
        singular phrase is read as the count and removed too.
      * "Scores: only ``\\b\\d\\.\\d\\b`` tokens after 'score'. '3.75' and '10.0' are ignored",
        shifting the following scores (qid 8810): every number after "score" is a score.
      * Class 2: "The score ... is appended even when the line has no usable time", "Times <= 10
        and HH:MM:SS are dropped", "times and scores become misaligned (qid 905)": a leading
        "Highlight N:" label is dropped, then each line gives the last time (HH:MM:SS and MM:SS
        read as times) before "score" paired with the last number after it; lines lacking
        either are skipped.
      * "With a single timestamp, zip truncates" (the highlight list stays empty, counted as a
        parse failure): a single time is paired like several.

    Args:
        text: the model's raw answer.
        compat: "original" or "corrected".

    Returns:
        ``{"highlights": [{"timestamp", "saliency_score"}], "timestamps": [float],
        "scores": [float]}``.

    Raises:
        ValueError: on an unknown ``compat``.
    """
    check_compat(compat)
    if compat == "original":
        text = text.replace("th", " ")
    else:
        text = re.sub(r"(\d)(?:st|nd|rd|th)\b", r"\1", text)
    second_num, score_num = text.count("second"), text.count("score")
    if second_num == 0 or score_num == 0:
        return {"highlights": [], "timestamps": [], "scores": []}
    if second_num < 3 and score_num < 3:
        timestamps, scores = _parse_class1(text, compat)
    else:
        timestamps, scores = _parse_class2(text, compat)
    timestamps = [float(t) for t in timestamps]
    scores = [float(s) for s in scores]
    highlights = []
    if len(timestamps) > (1 if compat == "original" else 0):
        if len(scores) < len(timestamps):
            scores.extend([0.0] * (len(timestamps) - len(scores)))
        else:
            scores = scores[: len(timestamps)]
        highlights = [{"timestamp": t, "saliency_score": s} for t, s in zip(timestamps, scores)]
    return {"highlights": highlights, "timestamps": timestamps, "scores": scores}


def timechat_clip_scores(
    timestamps: Sequence[float],
    scores: Sequence[float],
    duration: float,
    *,
    compat: str = "corrected",
) -> list[float]:
    """Maps (time, score) pairs to one score per 2-s clip, as ``format_vhd.py::format_vhd_output``.

    There are ``int(duration / 2)`` clips; a time t goes to clip ``max(0, int((t - 1) / 2))``
    (TimeChat answers with clip centres); times > duration are skipped; several scores in one clip
    are averaged; clips without a score get 0.0.

    ``compat="corrected"`` fixes "when t <= duration and int((t-1)/2) >= int(duration/2) (e.g.
    duration 61, t = 61), an IndexError stops the whole run" (fixtures README, section 2): such
    times lie past the last whole clip and are skipped.

    Args:
        timestamps: times in seconds.
        scores: saliency scores, zipped with ``timestamps`` (the shorter one wins).
        duration: video duration in seconds.
        compat: "original" or "corrected".

    Returns:
        ``int(duration / 2)`` Python floats.

    Raises:
        ValueError: on an unknown ``compat``.
        IndexError: in "original" mode, for a time in the partial last clip (as the original).
    """
    check_compat(compat)
    clip_num = int(duration / CLIP_SECONDS)
    total = np.zeros(clip_num)
    count = np.zeros(clip_num)
    for t, s in zip(timestamps, scores):
        if t > duration:
            continue
        clip = max(0, int((t - 1) / 2))
        if clip >= clip_num:
            if compat == "original":
                raise IndexError(
                    f"time {t} s maps to clip {clip} of a {duration} s video with {clip_num} clips"
                    " (format_vhd_output raises IndexError here)"
                )
            continue
        total[clip] += s
        count[clip] += 1
    return [0.0 if count[c] == 0 else float(total[c] / count[c]) for c in range(clip_num)]


def gt_saliency_matrix(record: Mapping[str, Any], clip_seconds: int = CLIP_SECONDS) -> np.ndarray:
    """Worker scores of every clip of a QVHighlights record, as ``eval_vhd.py::mk_gt_scores``.

    Args:
        record: ``{"duration", "relevant_clip_ids": [C_r], "saliency_scores": [C_r, 3]}``.
        clip_seconds: clip length (2 s).

    Returns:
        float64 ``[int(duration / clip_seconds), 3]``: scores 0-4, 0 for clips not listed.
    """
    matrix = np.zeros((int(record["duration"] / clip_seconds), 3))
    matrix[np.array(record["relevant_clip_ids"])] = np.array(record["saliency_scores"])
    return matrix


def average_precision(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """AP of one worker's binary labels, as TimeChat ``metrics/vhd/utils.py::get_ap`` (defaults).

    sklearn ``precision_recall_curve``; precision made monotone (running max from the high-recall
    end); recall cast to float32; AP = mean precision at the points where recall changes. All-zero
    labels give 0, all-one labels give 1, whatever the scores.

    Args:
        y_true: float/int ``[C]`` in {0, 1}.
        y_score: float ``[C]`` (same length).

    Returns:
        AP as a Python float (the original returns int 0/1 in the degenerate cases).

    Raises:
        ValueError: on length mismatch or labels outside {0, 1}.
    """
    y_true = np.asarray(y_true)
    y_score = np.asarray(y_score)
    if len(y_true) != len(y_score):
        raise ValueError(f"{len(y_true)} labels vs {len(y_score)} scores")
    labels = set(y_true.tolist())
    if len(labels) == 1:
        return 0.0 if y_true[0] == 0 else 1.0
    if sorted(labels) != [0, 1]:
        raise ValueError(f"labels must be 0/1, got {sorted(labels)}")
    precision, recall, _ = precision_recall_curve(y_true, y_score)
    recall = recall.astype(np.float32)
    for i in range(1, len(precision)):
        precision[i] = max(precision[i - 1], precision[i])
    return float(np.mean(precision[np.where(np.diff(recall))]))


def fit_length(pred: Sequence[float], length: int) -> np.ndarray:
    """Truncates or zero-pads predicted clip scores to the GT clip count (compute_ap_from_tuple)."""
    pred = np.asarray(pred, dtype=np.float64)
    if len(pred) >= length:
        return pred[:length]
    out = np.zeros(length)
    out[: len(pred)] = pred
    return out


def hit_at_one(
    pred: Sequence[float], gt_binary: np.ndarray, *, compat: str = "corrected"
) -> tuple[int, float]:
    """HIT@1 of one query, as ``eval_vhd.py::compute_hl_hit1``.

    The top clip is ``np.argmax(pred)`` (the first on ties); the hit is the maximum over the 3
    workers of that clip's binary label (0 when the clip is past the GT clips).

    ``compat="corrected"`` fixes "A parse failure gives all-zero scores, which means clip 0"
    (fixtures README, section 2; qid 4432 scores a hit at min score 2 without any prediction): a
    prediction that ranks no clip above another (all scores equal, e.g. all zero) is a miss.

    Args:
        pred: predicted clip scores ``[C_p]``.
        gt_binary: float ``[C, 3]`` worker labels in {0, 1}.
        compat: "original" or "corrected".

    Returns:
        ``(top_clip_index, hit)`` with hit 0.0 or 1.0.

    Raises:
        ValueError: on an unknown ``compat``.
    """
    check_compat(compat)
    pred = np.asarray(pred, dtype=np.float64)
    top = int(np.argmax(pred))
    if compat == "corrected" and (len(pred) == 0 or np.all(pred == pred[0])):
        return top, 0.0
    if top < len(gt_binary):
        return top, float(np.max(gt_binary[top]))
    return top, 0.0


def _round_percent(value: float) -> float:
    # eval_vhd.py: float(f"{100 * v:.2f}")
    return float(f"{100 * value:.2f}")


def evaluate_highlights(
    pred_saliency: Mapping[Any, Sequence[float]],
    ground_truth: Sequence[Mapping[str, Any]],
    *,
    compat: str = "corrected",
) -> dict[str, Any]:
    """HL-mAP and HIT@1 at min score 2/3/4, as ``eval_vhd.py::eval_submission``/``eval_highlight``.

    Only qids present in both inputs are scored (``match_number=False``). Per query and worker,
    the labels are ``score >= min`` on ``gt_saliency_matrix`` and the predictions are
    ``fit_length``-ed to the GT clip count; HL-mAP = mean AP over (query, worker) x100; HIT@1 =
    mean over queries of ``hit_at_one`` x100; both rounded to 2 decimals as the script writes them.
    ``compat`` only changes HIT@1 (see ``hit_at_one``).

    Args:
        pred_saliency: ``{qid: clip scores}``, in submission order.
        ground_truth: QVHighlights records ``[{"qid", "duration", "relevant_clip_ids",
            "saliency_scores", "relevant_windows", ...}]``.
        compat: "original" or "corrected".

    Returns:
        ``{"scores": {"HL-min-<name>-mAP", "HL-min-<name>-Hit1"} (x100, 2 decimals; <name> in
        Fair/Good/VeryGood), "per_item": {qid: {"pred_saliency_scores", "gt_spans",
        "ap": {name: [3 floats]}, "argmax_clip": int, "hit": {name: float}}}}``.

    Raises:
        ValueError: on an unknown ``compat`` or when no qid is shared.
    """
    check_compat(compat)
    gt_by_qid = {r["qid"]: r for r in ground_truth}
    qids = [q for q in pred_saliency if q in gt_by_qid]
    if not qids:
        raise ValueError("no qid is shared by the predictions and the ground truth")
    gt_full = {q: gt_saliency_matrix(gt_by_qid[q]) for q in qids}
    per_item: dict[Any, dict[str, Any]] = {
        q: {
            "pred_saliency_scores": [float(x) for x in pred_saliency[q]],
            "gt_spans": [list(w) for w in gt_by_qid[q].get("relevant_windows", [])],
            "ap": {},
            "hit": {},
        }
        for q in qids
    }
    scores: dict[str, float] = {}
    for name, min_score in HL_THRESHOLDS:
        ap_scores = np.zeros((len(qids), 3))
        hit_scores = np.zeros(len(qids))
        for idx, q in enumerate(qids):
            binary = (gt_full[q] >= min_score).astype(float)
            pred = fit_length(pred_saliency[q], len(binary))
            for worker in range(3):
                same = [k for k in range(worker) if np.array_equal(binary[:, k], binary[:, worker])]
                ap_scores[idx, worker] = (
                    ap_scores[idx, same[0]] if same else average_precision(binary[:, worker], pred)
                )
            top, hit = hit_at_one(pred_saliency[q], binary, compat=compat)
            hit_scores[idx] = hit
            per_item[q]["ap"][name] = ap_scores[idx].tolist()
            per_item[q]["hit"][name] = hit
            per_item[q]["argmax_clip"] = top
        scores[f"HL-min-{name}-mAP"] = _round_percent(np.mean(ap_scores))
        scores[f"HL-min-{name}-Hit1"] = _round_percent(np.mean(hit_scores))
    return {"scores": scores, "per_item": per_item}


def evaluate_timechat_vhd(
    predictions: Sequence[Mapping[str, Any]],
    ground_truth: Sequence[Mapping[str, Any]],
    *,
    compat: str = "corrected",
    annotations: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Scores TimeChat video highlight detection (QVHighlights), text to HL-mAP / HIT@1.

    Pipeline of ``evaluate.py::format_vhd`` + ``eval_vhd.py`` (CLI): each answer is parsed by
    ``parse_timechat_highlights`` and mapped to clips by ``timechat_clip_scores`` with the duration
    of the coco annotation whose ``image_id`` equals the answer's ``vname``; then
    ``evaluate_highlights`` scores the qids shared with the GT jsonl.

    Args:
        predictions: evaluate.py's result list ``[{"vname", "generated_cap", "query", "id"}]``.
        ground_truth: the QVHighlights jsonl records (highlight_val_release.jsonl).
        compat: "original" or "corrected" (parser, clip mapping and HIT@1; see those functions).
        annotations: the coco-format annotation file contents ``{"annotations": [{"image_id",
            "duration", ...}]}`` (or its list) giving each video's duration, as the original. When
            None, the duration of the GT record with ``qid == id`` is used.

    Returns:
        ``evaluate_highlights``' dict; its scores also hold ``n_parse_failed`` (answers whose
        highlight list is empty, as format_vhd prints), and each per-item entry the parse
        (``timestamps``, ``scores``, ``highlights``), ``vid``, ``query``, ``duration`` and
        ``pred_points`` ([time, score] pairs for plotting).

    Raises:
        ValueError: on an unknown ``compat``.
        KeyError: when a video has no duration.
    """
    check_compat(compat)
    if annotations is None:
        by_qid = {r["qid"]: r for r in ground_truth}
        durations = {p["vname"]: by_qid[p["id"]]["duration"] for p in predictions}
    else:
        anns = annotations["annotations"] if isinstance(annotations, Mapping) else annotations
        durations = {a["image_id"]: a["duration"] for a in anns}
    pred_saliency: dict[Any, list[float]] = {}
    parses: dict[Any, dict[str, Any]] = {}
    n_failed = 0
    for item in predictions:
        parse = parse_timechat_highlights(item["generated_cap"], compat=compat)
        duration = durations[item["vname"]]
        clip_scores = timechat_clip_scores(
            parse["timestamps"], parse["scores"], duration, compat=compat
        )
        n_failed += len(parse["highlights"]) == 0
        pred_saliency[item["id"]] = clip_scores
        parses[item["id"]] = dict(parse, vid=item["vname"], query=item["query"], duration=duration)
    result = evaluate_highlights(pred_saliency, ground_truth, compat=compat)
    for qid, entry in result["per_item"].items():
        entry.update(parses[qid])
        entry["pred_points"] = [
            [t, s] for t, s in zip(parses[qid]["timestamps"], parses[qid]["scores"])
        ]
    result["scores"]["n_parse_failed"] = n_failed
    return result
