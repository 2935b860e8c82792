"""Temporal grounding: span parsers, temporal IoU, R@1 at IoU 0.3/0.5/0.7 and mIoU.

Two benchmark scorers, each exact against its original evaluation script in
``compat="original"`` mode and fixing the documented bugs in the default ``compat="corrected"``
mode (see ../shared/fixtures/metrics/README.md, sections 1 and 9):

* TimeChat (RenShuhuai-Andy/TimeChat @ c60b332): ``evaluate.py::format_tvg`` ->
  ``utils/format_tvg.py::format_tvg_output/extract_time`` (text -> seconds) ->
  ``metrics/tvg/eval_tvg.py::__main__, iou`` (R@1 at IoU 0.3/0.5/0.7).
* LongVALE (ttgeng233/LongVALE @ 2eb88ce): ``longvalellm/eval/eval.py::iou`` (text -> two-digit
  00-99 positions, IoU rounded to 2 decimals at inference time) and
  ``longvalellm/eval/metric.py::grounding_metrics`` (mIoU, R1@0.3/0.5/0.7).

Spans are ``[start, end]`` pairs of Python floats, in seconds unless stated otherwise (LongVALE
positions are fractions of the video duration in [0, 1]). Pure Python / NumPy; no JAX.
"""

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from longvid_jax.metrics.common import check_compat, clock_to_seconds

R1_THRESHOLDS = (0.3, 0.5, 0.7)
# Corrected LongVALE IoUs keep this many decimals: enough to strip float noise, far below any
# meaningful difference (the original rounds to 2, which moves 0.6996 over the 0.7 threshold).
_NOISE_DECIMALS = 10

# The example span in TimeChat's grounding prompt; extract_time tries to strip it from the answer.
TIMECHAT_PROMPT_EXAMPLE = "A specific example is : 20.8 - 30.0 seconds".lower()
# LongVALE's grounding question (longvalellm/eval/eval.py `questions['grounding'][0]`, typo kept).
LONGVALE_GROUNDING_QUESTION = (
    "At which time interval can we find {} taking place in the video? "
    "Give the timestamps in the fromat: From xx to xx."
)

_TC_KEYWORDS = ("starts", "ends", "happens in", "start time", "end time", "start", "end", "happen")
# A clock time (HH:MM:SS or MM:SS, optional fraction) or a plain number ("4." included).
_TIME_TOKEN = r"\d{1,2}:\d{2}(?::\d{2})?(?:\.\d+)?|\d+(?:\.\d*)?"
_TC_PAIR = re.compile(rf"({_TIME_TOKEN})\s*(?:-|–|\bto\b|\band\b)\s*({_TIME_TOKEN})")
_TC_START = re.compile(rf"\b(?:start(?:s|ing)?|begin(?:s|ning)?)\b[^\d]*?({_TIME_TOKEN})")
_TC_END = re.compile(rf"\b(?:end(?:s|ing)?|finish(?:es)?)\b[^\d]*?({_TIME_TOKEN})")


def sequential_sum(values: Iterable[float]) -> float:
    """Left-to-right float sum, ``0 + v0 + v1 + ...``.

    Python 3.12 made the builtin ``sum`` compensated; the originals ran on Python 3.11, so this
    keeps their exact rounding on any Python version.
    """
    total = 0
    for v in values:
        total = total + v
    return total


def temporal_iou(span_a: Sequence[float], span_b: Sequence[float]) -> float:
    """IoU of two 1-D intervals, ``max(min(ends) - max(starts), 0) / (max(ends) - min(starts))``.

    This is the formula of TimeChat ``metrics/tvg/eval_tvg.py::iou`` and LongVALE
    ``longvalellm/eval/eval.py::iou`` (the denominator is the hull, which equals the union whenever
    the intersection is non-empty). Spans are not clipped to the video. A zero-length span scores 0
    against any other span.

    Args:
        span_a: ``[start, end]`` (float, any unit; end >= start expected, not enforced).
        span_b: ``[start, end]`` in the same unit.

    Returns:
        IoU as a Python float in [0, 1]; 0.0 where the hull has zero length (where the originals
        would raise ZeroDivisionError).
    """
    inter = max(min(span_a[1], span_b[1]) - max(span_a[0], span_b[0]), 0)
    hull = max(span_a[1], span_b[1]) - min(span_a[0], span_b[0])
    if hull == 0:
        return 0.0
    return inter / hull


def recall_at_iou(
    ious: Sequence[float | None],
    thresholds: Sequence[float] = R1_THRESHOLDS,
    *,
    num: int | None = None,
    arithmetic: str = "fraction",
) -> dict[float, float]:
    """R@1 at each IoU threshold, in percent: share of queries with IoU >= threshold.

    Args:
        ious: one IoU per query (the top-1 prediction's); ``None`` marks a query without a
            prediction (a miss).
        thresholds: IoU thresholds (default 0.3, 0.5, 0.7). The test is ``iou >= threshold``.
        num: denominator (default ``len(ious)``).
        arithmetic: float evaluation order, which changes only the last bit:
            "fraction" computes ``count / num * 100`` (LongVALE metric.py, MMDuet np.mean);
            "count" computes ``count * 100 / num`` (TimeChat eval_tvg.py).

    Returns:
        ``{threshold: recall_percent}`` (Python floats).

    Raises:
        ValueError: on an unknown ``arithmetic`` or an empty denominator.
    """
    if arithmetic not in ("fraction", "count"):
        raise ValueError(f"arithmetic must be 'fraction' or 'count', got {arithmetic!r}")
    n = len(ious) if num is None else num
    if n == 0:
        raise ValueError("recall_at_iou needs at least one query")
    out = {}
    for thr in thresholds:
        count = sum(1 for u in ious if u is not None and u >= thr)
        out[thr] = count * 100 / n if arithmetic == "count" else count / n * 100
    return out


def mean_iou(ious: Sequence[float | None]) -> float:
    """Mean IoU in percent, ``sum(ious) / n * 100`` as LongVALE metric.py; ``None`` counts as 0.

    Raises:
        ValueError: if ``ious`` is empty.
    """
    if not ious:
        raise ValueError("mean_iou needs at least one query")
    return sequential_sum(0 if u is None else u for u in ious) / len(ious) * 100


# ----------------------------------------------------------------------------------------------
# TimeChat: seconds text -> span
# ----------------------------------------------------------------------------------------------


def _extract_time_original(paragraph: str) -> list[list[float]]:
    # Mirrors utils/format_tvg.py::extract_time step by step (including its dead ends).
    paragraph = paragraph.lower()
    paragraph.replace(TIMECHAT_PROMPT_EXAMPLE, "")  # result discarded, as in the original
    sentences = re.split(r"[!?\n]", paragraph)
    candidates = [s for s in sentences if any(k in s for k in _TC_KEYWORDS)]
    timestamps: list = []
    matches = re.findall(r"(\d+\.*\d*)\s*-\s*(\d+\.*\d*)", paragraph)
    if matches:
        timestamps = [[float(s), float(e)] for s, e in matches]
    if len(timestamps) == 0:
        times = []
        time_regex = re.compile(r"\b(\d+\.\d+\b|\b\d+)\b")
        for sentence in candidates:
            found = re.findall(time_regex, sentence)
            if found:
                times.append(float(found[0]))
        times = times[: len(times) // 2 * 2]
        timestamps = [(times[i], times[i + 1]) for i in range(0, len(times), 2)]
    # The original's third, HH:MM:SS fallback never adds a span: its regex has two groups, so
    # findall returns tuples, and `t.count(':')` of a tuple is 0 (fixtures README, section 1).
    results = [[s, e] if e > s else [e, s] for s, e in timestamps]
    return results[:1]


def _extract_time_corrected(paragraph: str) -> list[list[float]]:
    text = paragraph.lower().replace(TIMECHAT_PROMPT_EXAMPLE, "")
    pair = _TC_PAIR.search(text)
    if pair:
        start, end = clock_to_seconds(pair.group(1)), clock_to_seconds(pair.group(2))
    else:
        m_start, m_end = _TC_START.search(text), _TC_END.search(text)
        if m_start and m_end:
            start, end = clock_to_seconds(m_start.group(1)), clock_to_seconds(m_end.group(1))
        else:
            # The original's sentence fallback (first time of each keyword sentence, paired in
            # order), with clock times read as times.
            times = []
            for sentence in re.split(r"[!?\n]", text):
                if any(k in sentence for k in _TC_KEYWORDS):
                    found = re.search(_TIME_TOKEN, sentence)
                    if found:
                        times.append(clock_to_seconds(found.group(0)))
            if len(times) < 2:
                return []
            start, end = times[0], times[1]
    return [[start, end] if end > start else [end, start]]


def parse_timechat_span(text: str, *, compat: str = "corrected") -> list[list[float]]:
    """Parses a TimeChat grounding answer into at most one ``[start, end]`` span in seconds.

    Follows TimeChat ``utils/format_tvg.py::extract_time`` (called through ``format_tvg_output``):
    the first ``m - n`` pair anywhere in the lower-cased text wins; without one, sentences (split on
    ``[!?\\n]``) containing a start/end/happen keyword give their first number, paired in order;
    reversed pairs are swapped; only the first span is kept (``results[:1]``).

    ``compat="corrected"`` fixes the parser bugs listed in the fixtures README, section 1:
      * "``paragraph.replace(prompt, '')`` discards its result", so an echoed prompt example
        ("A specific example is : 20.8 - 30.0 seconds") was parsed as the answer: it is removed.
      * "'00:21 - 00:27' matches '21 - 00', giving [0, 21]": clock times (MM:SS, HH:MM:SS) are
        read as times everywhere.
      * "'starts at 00:00:21.\\nIt ends at 00:00:29.' becomes [0.0, 0.0]" (the HH:MM:SS fallback
        is never reached): fixed by the clock-time reading.
      * "'The start time ... is 6 seconds, and the end time is 12 seconds.' is one sentence, so it
        gives one number and no prediction": the number after a start keyword and the number after
        an end keyword form the span.
      * "'from 14.0 to 22.0' has no keyword, so it gives no prediction": "x to y" and "x and y"
        pairs count like "x - y".
    Kept as in the original (not bugs): a leading "-" is not a sign ("-3.0 - 13.0" -> [3, 13]),
    "4. - 9." -> [4, 9], reversed pairs swapped, first span only.

    Args:
        text: the model's raw answer.
        compat: "original" or "corrected".

    Returns:
        ``[]`` (parse failure) or ``[[start, end]]``, floats in seconds, start <= end.

    Raises:
        ValueError: on an unknown ``compat``.
    """
    if check_compat(compat) == "original":
        return _extract_time_original(text)
    return _extract_time_corrected(text)


def evaluate_timechat_tvg(
    predictions: Sequence[Mapping[str, Any]],
    ground_truth: Mapping[str, Any] | Sequence[Mapping[str, Any]],
    *,
    compat: str = "corrected",
    sample: bool = False,
    thresholds: Sequence[float] = R1_THRESHOLDS,
) -> dict[str, Any]:
    """Scores TimeChat temporal video grounding (Charades-STA), as ``metrics/tvg/eval_tvg.py``.

    Pipeline: ``evaluate.py::format_tvg`` parses every answer with ``parse_timechat_span``; then
    ``eval_tvg.py`` counts, per threshold, the queries whose first predicted span has IoU >=
    threshold with the GT span, x100 / number of GT queries. Queries without a parsed span are
    misses. With ``sample=True`` (the script's ``--sample``) only the predicted query ids are
    scored and the denominator is the number of predictions.

    ``compat`` only changes the parser (see ``parse_timechat_span``); the IoU and R@1 arithmetic is
    the original's in both modes. ``mIoU`` (misses count 0) is extra: eval_tvg.py prints none.

    Args:
        predictions: evaluate.py's result list, ``[{"vname", "generated_cap", "query", "id"}]``.
        ground_truth: the coco-format GT file contents ``{"annotations": [{"image_id",
            "timestamp": [s, e] seconds, "id", "duration", ...}]}`` or just its annotation list.
        compat: "original" or "corrected".
        sample: score only the predicted query ids (eval_tvg.py ``--sample``).
        thresholds: IoU thresholds for R@1.

    Returns:
        ``{"scores": {"R1@0.3", "R1@0.5", "R1@0.7", "mIoU" (percent), "n_queries",
        "n_parse_failed"}, "per_item": {query_id: {"vid", "query", "duration", "pred_spans",
        "gt_spans", "iou"}}}``; ``iou`` is None for a query without a parsed span.

    Raises:
        ValueError: on an unknown ``compat``; in "original" mode without ``sample`` when the
            prediction and GT counts differ (the script asserts); when a prediction has no GT.
    """
    check_compat(compat)
    annotations = ground_truth["annotations"] if isinstance(ground_truth, Mapping) else ground_truth
    gt = {int(a["id"]): a for a in annotations}

    parsed: dict[int, dict[str, Any]] = {}
    for item in predictions:
        qid = int(item["id"])
        parsed[qid] = {
            "vid": item["vname"],
            "query": item["query"],
            "pred_spans": parse_timechat_span(item["generated_cap"], compat=compat),
        }
    missing_gt = [q for q in parsed if q not in gt]
    if missing_gt:
        raise ValueError(f"predictions without ground truth: query ids {missing_gt[:10]}")
    qids = list(parsed) if sample else list(gt)
    if compat == "original" and not sample and len(parsed) != len(gt):
        raise ValueError(
            f"eval_tvg.py asserts equal counts: {len(parsed)} predictions vs {len(gt)} GT queries"
        )

    per_item: dict[int, dict[str, Any]] = {}
    ious: list[float | None] = []
    for qid in qids:
        ann = gt[qid]
        pred_spans = parsed[qid]["pred_spans"] if qid in parsed else []
        iou = temporal_iou(pred_spans[0], ann["timestamp"]) if pred_spans else None
        ious.append(iou)
        per_item[qid] = {
            "vid": parsed[qid]["vid"] if qid in parsed else ann.get("image_id"),
            "query": parsed[qid]["query"] if qid in parsed else ann.get("caption"),
            "duration": ann.get("duration"),
            "pred_spans": pred_spans,
            "gt_spans": [list(ann["timestamp"])],
            "iou": iou,
        }
    recalls = recall_at_iou(ious, thresholds, arithmetic="count")
    scores: dict[str, Any] = {f"R1@{thr}": value for thr, value in recalls.items()}
    scores["mIoU"] = mean_iou(ious)
    scores["n_queries"] = len(qids)
    scores["n_parse_failed"] = sum(1 for p in parsed.values() if not p["pred_spans"])
    return {"scores": scores, "per_item": per_item}


# ----------------------------------------------------------------------------------------------
# LongVALE: two-digit 00-99 positions -> span
# ----------------------------------------------------------------------------------------------


def parse_longvale_span(text: str, *, compat: str = "corrected") -> dict[str, Any] | None:
    """Parses a LongVALE grounding answer "From xx to xx" into positions in [0, 1].

    Follows ``longvalellm/eval/eval.py::iou``: ``re.search(r"(\\d{2}) (to|and) (\\d{2})")`` on the
    raw answer, first match anywhere, each number / 100. The end gets no +1 (unlike LongVALE dense
    captioning); positions are not clipped.

    ``compat="corrected"`` fixes (fixtures README, section 9):
      * "'From 6 to 30' does not match" and "'From 66 to 100' matches '66 to 10'": numbers of 1-3
        digits on word boundaries, any whitespace around "to"/"and".
      * "Reversed pairs are not swapped": they are swapped.

    Args:
        text: the model's raw answer.
        compat: "original" or "corrected".

    Returns:
        None when nothing matches, else ``{"matched": str, "positions": [start, end]}`` with the
        integers as written, and ``"span": [start / 100, end / 100]`` (fractions of the duration).

    Raises:
        ValueError: on an unknown ``compat``.
    """
    if check_compat(compat) == "original":
        m = re.search(r"(\d{2}) (to|and) (\d{2})", text)
    else:
        m = re.search(r"\b(\d{1,3})\s+(to|and)\s+(\d{1,3})\b", text)
    if not m:
        return None
    a, b = int(m.group(1)), int(m.group(3))
    span = [float(m.group(1)) / 100, float(m.group(3)) / 100]
    if compat == "corrected" and span[1] < span[0]:
        span = [span[1], span[0]]
        a, b = b, a
    return {"matched": m.group(0), "positions": [a, b], "span": span}


def longvale_iou(text: str, gt_span: Sequence[float], *, compat: str = "corrected") -> float | int:
    """LongVALE's per-query IoU of an answer against a normalised GT span.

    Follows ``longvalellm/eval/eval.py::iou``. ``compat="original"`` returns the integer 0 when the
    answer does not parse, and rounds the IoU to 2 decimals with Python ``round`` (half-even on the
    binary value) before it is logged and thresholded. ``compat="corrected"`` fixes "IoU rounded
    before thresholding" (fixtures README, section 9: 0.6996 -> 0.7 counted for R1@0.7, 0.2956 ->
    0.3): the IoU keeps 10 decimals, which only strips the binary noise of the ``/100``
    arithmetic (so "From 20 to 35" against [0.2, 0.5] gives exactly 0.5, not 0.4999999999999999),
    and the parser is ``parse_longvale_span``'s corrected one.

    Args:
        text: the model's raw answer.
        gt_span: ``(start / duration, end / duration)``.
        compat: "original" or "corrected".

    Returns:
        The IoU (float), or 0 (int in "original" mode, 0.0 otherwise) for an unparsable answer.

    Raises:
        ValueError: on an unknown ``compat``.
    """
    parsed = parse_longvale_span(text, compat=compat)
    if parsed is None:
        return 0 if compat == "original" else 0.0
    iou = temporal_iou(parsed["span"], gt_span)
    return round(iou, 2) if compat == "original" else round(iou, _NOISE_DECIMALS)


def longvale_question(sentence: str) -> str:
    """LongVALE's grounding question for a GT sentence (eval.py: strip, lower, drop a final ".")."""
    sentence = sentence.strip().lower().removesuffix(".")
    return LONGVALE_GROUNDING_QUESTION.format(sentence)


def evaluate_longvale_grounding(
    predictions: Sequence[Mapping[str, Any]],
    ground_truth: Mapping[str, Mapping[str, Any]],
    *,
    compat: str = "corrected",
    thresholds: Sequence[float] = R1_THRESHOLDS,
) -> dict[str, Any]:
    """Scores LongVALE temporal grounding as ``eval.py::iou`` + ``metric.py::grounding_metrics``.

    For every answer: GT span = ``timestamps[sentence_id] / duration``, IoU by ``longvale_iou``;
    then mIoU = mean IoU x100 and R1@m = share of IoU >= m x100, over all answers (unparsable ones
    count as 0). ``compat`` selects the parser and the rounding (see ``parse_longvale_span`` and
    ``longvale_iou``).

    Args:
        predictions: the answers, either ``[{"video_id", "sentence_id", "answer"}]`` or the log
            lines eval.py writes, ``[{"video_id", "task", "query_id", "answer", "info":
            {"sentence_id", ...}}]`` (only task "grounding", query_id 0 are used, as metric.py;
            the logged IoU is recomputed, not read).
        ground_truth: the annotation file contents ``{video_id: {"duration", "timestamps":
            [[s, e], ...] seconds, "sentences": [...]}}``.
        compat: "original" or "corrected".
        thresholds: IoU thresholds for R1.

    Returns:
        ``{"scores": {"mIoU", "R1@0.3", "R1@0.5", "R1@0.7"} (percent, unrounded), "per_item":
        {"<video_id>/<sentence_id>": {"video_id", "sentence_id", "query", "answer", "matched",
        "gt_normalised", "pred_spans", "gt_spans" (seconds), "duration", "iou"}}}``.

    Raises:
        ValueError: on an unknown ``compat`` or when there is no grounding answer.
        KeyError: when an answer's video is not in the annotation.
    """
    check_compat(compat)
    per_item: dict[str, dict[str, Any]] = {}
    ious = []
    for item in predictions:
        if "task" in item and item["task"] != "grounding":
            continue
        if item.get("query_id", 0) != 0:
            continue
        sentence_id = item["sentence_id"] if "sentence_id" in item else item["info"]["sentence_id"]
        video = ground_truth[item["video_id"]]
        duration = video["duration"]
        start, end = video["timestamps"][sentence_id]
        gt_norm = (start / duration, end / duration)
        parsed = parse_longvale_span(item["answer"], compat=compat)
        iou = longvale_iou(item["answer"], gt_norm, compat=compat)
        ious.append(iou)
        pred_spans = [] if parsed is None else [[p * duration for p in parsed["span"]]]
        per_item[f"{item['video_id']}/{sentence_id}"] = {
            "video_id": item["video_id"],
            "sentence_id": sentence_id,
            "query": longvale_question(video["sentences"][sentence_id]),
            "answer": item["answer"],
            "matched": None if parsed is None else parsed["matched"],
            "gt_normalised": list(gt_norm),
            "pred_spans": pred_spans,
            "gt_spans": [[start, end]],
            "duration": duration,
            "iou": iou,
        }
    if not ious:
        raise ValueError("no grounding answers to score")
    scores = {"mIoU": mean_iou(ious)}
    for thr, value in recall_at_iou(ious, thresholds, arithmetic="fraction").items():
        scores[f"R1@{thr}"] = value
    return {"scores": scores, "per_item": per_item}
