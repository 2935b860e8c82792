"""Dense video captioning: event parsers, merge rules, SODA_c, P/R/F1 and caption scores.

Sources (facts only, no code copied):
  * TimeChat: RenShuhuai-Andy/TimeChat @ c60b332: `evaluate.py` `format_dvc`,
    `utils/format_dvc.py` (`format_dvc_output`, `extract_time_from_para`, `extract_time_part`),
    `metrics/dvc/eval_dvc.py` (`eval_with_files`, `evaluate_para`, `evaluate_dense_captions`,
    `evaluate_single_dense_captions`, `match_captions`, `evaluate_detections`,
    `evaluate_caption_scores`, `sodac`, `chased_dp_assignment`, `iou`) with the repo's copies of the
    coco-caption scorers. Fixture `timechat_dvc` (README section 3).
  * MMDuet: yellow-binary-tree/MMDuet @ 33be138: `test/evaluate.py` `--func dense_captioning`
    with `is_online_model=1` (the reply merge and the gold conversion), then `test/dvc/eval_dvc.py`
    (identical to TimeChat's but for jar paths). Fixture `mmduet_youcook2_merge` (section 6).
  * LongVALE: ttgeng233/LongVALE @ 2eb88ce: `longvalellm/eval/metric.py` (`captioning_metrics`,
    `merge_similar_sentences`), `longvalellm/eval/dvc_eval/eval_soda.py` + `SODA/soda.py` +
    `SODA/dataset.py` + `SODA/utils.py`, `longvalellm/eval/dvc_eval/eval_dvc.py` (`ANETcaptions`,
    `eval_dvc`), with the pycocoevalcap 1.2 scorers. Fixture `longvale_dense_caption` (section 10).

The caption scorers (PTB tokenizer, METEOR, CIDEr, BLEU, ROUGE-L) are pycocoevalcap's, called
through `longvid_jax.metrics.captioning` (one PTB-tokenizer run per evaluation, one shared METEOR
process). Two sources of run-to-run variation in the originals are made deterministic without
changing any number beyond 1e-15:
  * Predictions that overlap no ground truth are paired with a random 10-20 letter string (so they
    score 0). The results do not depend on the string (it is one token that matches nothing); a
    private `random.Random(0)` draws them here.
  * LongVALE averages over videos in Python `set` order (PYTHONHASHSEED-dependent at 1e-16); here
    videos are taken in annotation order.

compat="corrected" (the default) fixes these documented bugs; compat="original" keeps them:
  TimeChat (`parse_timechat_dvc`, `evaluate_timechat_dvc`):
  * Misaligned captions (README section 3, "Caption extraction"): the original replaces every
    "a - b" by a newline, splits on newlines, drops pieces of <= 5 characters and truncates
    timestamps and captions to the shorter list, so leading text ("Here are the steps:") becomes
    caption 0 and shifts every caption by one (V53XmPeyjIU), and a step with an empty description
    shifts the later ones (mZwK0TBI1iY); `str.replace` also hits a time string inside another
    one ("0 - 10" inside "90 - 100") and cuts that caption. Corrected: each caption is the text
    that follows its own timestamp (up to the next one; an empty description gives an empty
    caption), leading text is ignored, and "seconds" is removed only right after the timestamp.
  * Fallback parsing (section 3, "Fallback"): only the first parsable line is used (loop guard
    `if len(timestamps) == 0`), and for "From 0:30 to 1:00, ..." the caption is the whole line
    (JT1HjYMGRhk, ysK3QbU6w0o). Corrected: every line is parsed and the caption is the text after
    the time expression.
  * Paragraph misalignment (section 3, "Missing videos"): a GT video absent from the predictions
    is skipped in `predicted_paras` but not in `gt_paras`, so `zip` pairs paragraphs of different
    videos from there on and drops the last GT paragraph (Bv0yQm9d7kE). Corrected: the missing
    video gets an empty predicted paragraph at its own position.
  * SODA_c_1 filler (section 3, "Split id"): per-video `SODA_c_1`/`SODA_c_2` are filled with -1
    when absent, so the printout has "SODA_c_1 -100.0". Corrected: only the evaluated split's
    `SODA_c_<id>` is reported.
  * SODA column order (eval_dvc.py `sodac` with the repo's `meteor.py`, not in the README): the
    repo's METEOR returns per-segment scores in *sorted string* order of the ids ('0', '1', '10',
    '2', ...) while the IoU matrix is in numeric order, so with 11 or more predictions per video
    the METEOR scores are multiplied with the IoUs of other predictions. Corrected: aligned.
    (No fixture video has 11 predictions, so the fixtures do not show it.)
  MMDuet (`merge_streamed_replies`, `evaluate_mmduet_youcook2`):
  * Dropped first reply (section 6): the merge starts with `start = end = None` and only emits a
    caption when `start` is set, so the first distinct reply is always lost. Corrected: the first
    caption spans from 0 s (video start) to the last time of its run; every other caption keeps
    the original span rule [last time of the previous run, last time of its own run].
  * The eval_dvc fixes above (SODA_c_1 filler, SODA column order) apply as well.
  LongVALE (`longvale_positions_to_seconds`, `evaluate_longvale_dense_caption`):
  * Past-the-end spans (section 10, "Conversion"): the parser accepts any number of digits, so
    "From 90 to 105" becomes [0.90 d, 1.06 d], ending after the video (Cc3Vv6Xx9Zz). Corrected:
    positions are clamped to the 00-99 range of the format before conversion.

Not changed in either mode (documented behaviour that is not a bug): the IoU with `union = min(hull,
len1 + len2)` and `+ 1e-8`; detection P/R with IoU > tIoU but caption pairing with IoU >= tIoU (as
densevid_eval); per-video CIDEr/METEOR averaged over tIoU and videos; SODA_c's swapped METEOR
(hypothesis = GT caption); the "." appended to TimeChat/MMDuet GT captions ("serve.." tokenizes
like "serve."); reversed spans (TimeChat's IoU sorts each span, LongVALE's gives them IoU 0);
LongVALE's merge rule; MMDuet's empty replies and replies after the video end.

Span IoU: the densevid IoU is private here (`_densevid_iou`), as it differs from the plain
temporal IoU of `grounding.py` (union = min(hull, len1+len2), 1e-8 in the denominator).
"""

import dataclasses
import difflib
import random
import re
import string
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from longvid_jax.metrics import captioning as cap
from longvid_jax.metrics.common import check_compat

DVC_TIOUS = (0.3, 0.5, 0.7, 0.9)
TIMECHAT_SPLIT_IDS = {"train": 1, "val": 2, "test": 3}

Event = dict[str, Any]  # {"timestamp": [start, end], "caption" | "sentence": str}


# ================================================================================================
# Span IoU and SODA's dynamic programme
# ================================================================================================


def _densevid_iou(a: Sequence[float], b: Sequence[float], *, sort_spans: bool) -> float:
    """densevid_eval IoU: intersection / (min(hull, len_a + len_b) + 1e-8).

    TimeChat's `iou` sorts each span first (`sort_spans=True`); LongVALE's (`ANETcaptions.iou`,
    `SODA/utils.iou`) does not, so a reversed span has IoU 0 there.
    """
    if sort_spans:
        s1, e1 = float(min(a[0], a[1])), float(max(a[0], a[1]))
        s2, e2 = float(min(b[0], b[1])), float(max(b[0], b[1]))
    else:
        s1, e1 = a[0], a[1]
        s2, e2 = b[0], b[1]
    inter = max(0, min(e1, e2) - max(s1, s2))
    union = min(max(e1, e2) - min(s1, s2), e1 - s1 + e2 - s2)
    return float(inter) / (union + 1e-8)


def chased_dp_assignment(scores: np.ndarray) -> float:
    """Best order-preserving one-to-one matching score (SODA, Fujita et al. 2020).

    dp[i, j] = max(dp[i-1, j], dp[i, j-1], dp[i-1, j-1] + scores[i, j]), as SODA's
    `chased_dp_assignment` (fujiso/SODA `soda.py`; also TimeChat eval_dvc.py), computed iteratively
    (the originals recurse, and LongVALE returns 0 on RecursionError for very large matrices).

    Args:
        scores: float64[num_gt, num_pred] non-negative pair scores (GT captions x predictions,
            both in time order).

    Returns:
        The maximum total score.
    """
    scores = np.asarray(scores, dtype=np.float64)
    g, p = scores.shape
    dp = np.zeros((g, p))
    for i in range(g):
        for j in range(p):
            up = dp[i - 1, j] if i > 0 else -1.0
            left = dp[i, j - 1] if j > 0 else -1.0
            diag = (dp[i - 1, j - 1] if i > 0 and j > 0 else 0.0) + scores[i, j]
            dp[i, j] = max(up, left, diag)
    return float(dp[g - 1, p - 1])


def soda_c_prf(
    iou: np.ndarray, meteor: np.ndarray, tiou: float = 0.0
) -> tuple[float, float, float]:
    """SODA_c of one video: precision, recall and F1 of the best IoU x METEOR assignment.

    Args:
        iou: float64[num_gt, num_pred] IoU of each (GT, prediction) pair.
        meteor: float64[num_gt, num_pred] METEOR of each pair (hypothesis = GT caption,
            reference = predicted caption, as in SODA).
        tiou: IoUs below this are set to 0 (SODA_c uses 0).

    Returns:
        (p, r, f) with p = best / num_pred, r = best / num_gt and f their harmonic mean (0 when
        both are 0).
    """
    iou = np.array(iou, dtype=np.float64, copy=True)
    iou[iou < tiou] = 0.0
    best = chased_dp_assignment(iou * np.asarray(meteor, dtype=np.float64))
    n_g, n_p = iou.shape
    p, r = best / n_p, best / n_g
    return p, r, (2 * p * r / (p + r) if p + r > 0 else 0)


def _random_string(rng: random.Random) -> str:
    """A random 10-20 letter string, the "garbage" reference of unmatched predictions."""
    n = rng.randint(10, 20)
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(n))


def _to_jsonable_span(span: Sequence[float]) -> list[float]:
    return [float(span[0]), float(span[1])]


# ================================================================================================
# TimeChat: text -> events
# ================================================================================================

_TC_SPAN = re.compile(r"(\d+\.*\d*)\s*-\s*(\d+\.*\d*)")
_TC_START = re.compile(
    r"(?:start(?:ing)? time: (\d+\.*\d*)(?:s| seconds)?)", re.DOTALL | re.IGNORECASE
)
_TC_END = re.compile(r"(?:end(?:ing)? time: (\d+\.*\d*)(?:s| seconds)?)", re.DOTALL | re.IGNORECASE)
_TC_DESCRIPTION = re.compile(r"description: (.*)")
_TC_BULLET = re.compile(r"\*\s*(.*)")
_TC_START_END_INLINE = re.compile(r"start time (\d+\.*\d*), end time (\d+\.*\d*)")
_TC_CLOCK = re.compile(r"\d+\.*\d*:\d+\.*\d*")
_TC_NUMBER = re.compile(r"\d+\.*\d*(?!\.)")
_TC_RADIUS = 20
_LEADING_SECONDS = re.compile(r"^\s*seconds?\b")


def _tc_clean(piece: str) -> str:
    return piece.strip().strip(", ").rstrip()


def _tc_first_caption(text: str) -> str:
    """Corrected mode: the caption in the text that follows a timestamp.

    The leading "seconds" is removed; the caption is the first line that has a letter (so list
    numbers such as "2." before the next timestamp are skipped); "" when there is none.
    """
    text = _LEADING_SECONDS.sub("", text, count=1)
    for line in text.split("\n"):
        line = _tc_clean(line)
        if any(ch.isalpha() for ch in line):
            return line
    return ""


def _tc_para_original(p: str) -> tuple[list[list[float]], list[str]]:
    """`extract_time_from_para` of TimeChat (p is lower-cased already)."""
    stamps, caps = [], []
    matches = list(_TC_SPAN.finditer(p))
    if matches:
        stamps = [[float(m[1]), float(m[2])] for m in matches]
        rest = p
        for m in matches:
            rest = rest.replace(m[0], "\n")
        caps = rest.replace("seconds", "").split("\n")
    if not stamps:
        ends, starts = _TC_END.findall(p), _TC_START.findall(p)
        if starts and ends:
            stamps = [[float(s), float(e)] for s, e in zip(starts, ends)]
            caps = _TC_DESCRIPTION.findall(p) or _TC_BULLET.findall(p)
    if not stamps and _TC_START_END_INLINE.search(p):
        raise NotImplementedError(
            "TimeChat's extract_time_from_para calls pdb.set_trace() on 'start time X, end time Y' "
            "text; compat='original' cannot reproduce that (use compat='corrected')"
        )
    caps = [_tc_clean(c) for c in caps if len(c) > 5]
    n = min(len(stamps), len(caps))
    return stamps[:n], caps[:n]


def _tc_para_corrected(p: str) -> tuple[list[list[float]], list[str]]:
    """Corrected `extract_time_from_para`: every caption stays with its own timestamp."""
    matches = list(_TC_SPAN.finditer(p))
    if matches:
        stamps, caps = [], []
        for i, m in enumerate(matches):
            stop = matches[i + 1].start() if i + 1 < len(matches) else len(p)
            stamps.append([float(m[1]), float(m[2])])
            caps.append(_tc_first_caption(p[m.end() : stop]))
        return stamps, caps
    starts = list(_TC_START.finditer(p))
    if starts and _TC_END.search(p):
        stamps, caps = [], []
        for i, m in enumerate(starts):
            block = p[m.end() : starts[i + 1].start() if i + 1 < len(starts) else len(p)]
            end = _TC_END.search(block)
            if end is None:
                continue
            desc = _TC_DESCRIPTION.search(block) or _TC_BULLET.search(block)
            stamps.append([float(m[1]), float(end[1])])
            caps.append(_tc_clean(desc[1]) if desc else "")
        return stamps, caps
    inline = list(_TC_START_END_INLINE.finditer(p))
    stamps = [[float(m[1]), float(m[2])] for m in inline]
    caps = [
        _tc_first_caption(p[m.end() : inline[i + 1].start() if i + 1 < len(inline) else len(p)])
        for i, m in enumerate(inline)
    ]
    return stamps, caps


def _tc_radius_span(t: float) -> str:
    return (
        f"{t - _TC_RADIUS} - {t + _TC_RADIUS}" if t > _TC_RADIUS else f"{t} - {t + 2 * _TC_RADIUS}"
    )


def _tc_extract_time_part(time_part: str) -> list[str]:
    """`extract_time_part` of TimeChat: the "a - b" strings found in `time_part` (may raise)."""
    found = re.findall(r"\d+\.*\d*\s*-\s*\d+\.*\d*", time_part)
    if not found:
        if time_part.count(":") == 1:
            clock = _TC_CLOCK.findall(time_part)[0]
            t = int(clock.split(":")[0]) * 60 + int(clock.split(":")[1])
            found = [_tc_radius_span(t)]
        elif time_part.count(":") == 2:
            start, end = _TC_CLOCK.findall(time_part)
            s = int(start.split(":")[0]) * 60 + int(start.split(":")[1])
            e = int(end.split(":")[0]) * 60 + int(end.split(":")[1])
            found = [f"{s} - {e}"]
    if not found:
        found = _TC_NUMBER.findall(time_part)
        if len(found) == 1:
            found = [_tc_radius_span(float(found[0]))]
        elif len(found) == 2:
            found = [f"{found[0]} - {found[1]}"]
    return found


def _tc_fallback_line(line: str) -> tuple[list[float], str] | None:
    """One line of `format_dvc_output`'s second pass; None when it yields no event."""
    parts = [p.strip(",") for p in line.split("seconds")]
    try:
        found = _tc_extract_time_part(parts[0])
        if not found:
            return None
        time_part = found[0]
        start = round(float(time_part.split("-")[0].strip()), 2)
        end = round(float(time_part.split("-")[1].strip()), 2)
    except (ValueError, IndexError):  # the original's bare `except: continue`
        return None
    return [start, end], parts[-1].strip()


def _tc_fallback_caption(line: str) -> str:
    """Corrected fallback caption: the text after the time expression."""
    if "seconds" in line:
        return _tc_clean(line.split("seconds", 1)[1])
    last_end = 0
    for pattern in (r"\d+\.*\d*\s*-\s*\d+\.*\d*", _TC_CLOCK.pattern, _TC_NUMBER.pattern):
        found = list(re.finditer(pattern, line))
        if found:
            last_end = found[-1].end()
            break
    return _tc_clean(line[last_end:])


def parse_timechat_dvc(text: str, *, compat: str = "corrected") -> list[Event]:
    """Parses TimeChat dense-captioning output into events (`format_dvc_output`).

    The main format is "a - b seconds, caption" (any number of them, in one paragraph or one per
    line); also "Start time: X ... End time: Y ... Description: ..." blocks. When neither is found,
    each line (or "."-sentence) is searched for "a - b", "m:ss ... m:ss", "m:ss" or bare numbers;
    a single time t becomes [t - 20, t + 20] ([t, t + 40] when t <= 20). Reversed spans are kept.

    Args:
        text: the model's answer.
        compat: "corrected" (default) keeps each caption with its own timestamp and parses every
            fallback line; "original" reproduces TimeChat's caption shifting and first-line-only
            fallback (see the module docstring).

    Returns:
        [{"timestamp": [start, end] (seconds, float), "caption": str (lower-cased in the main
        formats, as the original)}] in text order.

    Raises:
        ValueError: bad `compat`. NotImplementedError: original mode on "start time X, end time Y"
            text, where TimeChat stops in `pdb.set_trace()`.
    """
    check_compat(compat)
    para = _tc_para_original if compat == "original" else _tc_para_corrected
    stamps, caps = para(text.lower())
    if not stamps:
        if "\n" in text:
            lines = [c for c in text.split("\n") if len(c) > 7]
        else:
            lines = [c + "." for c in text.split(".") if len(c) > 7]
        for line in lines:
            event = _tc_fallback_line(line)
            if event is None:
                continue
            span, caption = event
            stamps.append(span)
            caps.append(caption if compat == "original" else _tc_fallback_caption(line))
            if compat == "original":
                break  # the original's loop guard `if len(timestamps) == 0`
    return [{"timestamp": s, "caption": c} for s, c in zip(stamps, caps)]


def format_timechat_dvc(
    model_results: Sequence[Mapping[str, str]], *, compat: str = "corrected"
) -> dict[str, list[Event]]:
    """TimeChat `evaluate.py` `format_dvc`: `{vname: events}` for `[{vname, generated_cap}]`.

    A later result for the same `vname` replaces an earlier one, as in the original.

    Args:
        model_results: the inference output, `[{"vname": str, "generated_cap": str}]`.
        compat: passed to `parse_timechat_dvc`.

    Returns:
        {vname: [{"timestamp": [s, e], "caption": str}]} in input order.
    """
    return {
        r["vname"]: parse_timechat_dvc(r["generated_cap"], compat=compat) for r in model_results
    }


# ================================================================================================
# MMDuet: streamed replies -> events
# ================================================================================================


def merge_streamed_replies(
    model_response_list: Sequence[Mapping[str, Any]], *, compat: str = "corrected"
) -> list[Event]:
    """MMDuet's merge of streamed replies into captioned spans (`test/evaluate.py`).

    User turns are skipped. A run of consecutive identical assistant replies is one caption; a
    caption spans from the last time of the previous run to the last time of its own run. Runs
    that are not adjacent (A B A) stay separate; an empty reply "" is a caption; times after the
    video end are kept.

    Args:
        model_response_list: `[{"time": seconds, "content": str, "role": "user" | "assistant"}]`.
        compat: "corrected" (default): the first run spans [0, last time of the run];
            "original": the first run is dropped (bug: `start_time` is None for it).

    Returns:
        [{"timestamp": [start, end] (seconds), "caption": str}].
    """
    check_compat(compat)
    runs: list[list[Any]] = []  # [content, last time]
    for turn in model_response_list:
        if turn["role"] == "user":
            continue
        if runs and turn["content"] == runs[-1][0]:
            runs[-1][1] = turn["time"]
        else:
            runs.append([turn["content"], turn["time"]])
    events = []
    for i, (content, end) in enumerate(runs):
        if i == 0:
            if compat == "original":
                continue
            start = 0.0
        else:
            start = runs[i - 1][1]
        events.append({"timestamp": [start, end], "caption": content})
    return events


def mmduet_youcook2_ground_truth(
    gold_json: Sequence[Mapping[str, Any]], keep_ids: set[str] | None = None
) -> list[dict[str, Any]]:
    """MMDuet's gold conversion to TimeChat's YouCook2 format (`test/evaluate.py`).

    ". " inside an answer becomes ", " and the answers are joined with ". " into `pure_cap`.

    Args:
        gold_json: `[{question_id, video, duration, answer: [{time: [s, e], content, role}]}]`.
        keep_ids: if given, only these `str(question_id)` are kept (the original drops gold items
            without a prediction).

    Returns:
        `[{"image_id": str(question_id), "segments": [[s, e]], "pure_cap": str}]`.
    """
    out = []
    for g in gold_json:
        qid = str(g["question_id"])
        if keep_ids is not None and qid not in keep_ids:
            continue
        answers = [turn["content"].replace(". ", ", ") for turn in g["answer"]]
        out.append(
            {
                "image_id": qid,
                "segments": [turn["time"] for turn in g["answer"]],
                "pure_cap": ". ".join(answers),
            }
        )
    return out


# ================================================================================================
# TimeChat / MMDuet eval_dvc.py
# ================================================================================================


@dataclasses.dataclass
class _Video:
    key: str
    gt_spans: list[list[float]]
    gt_captions: list[str]  # with the appended "."
    gt_paragraph: str
    pred_spans: list[list[float]] | None  # None: video missing from the prediction file
    pred_captions: list[str] | None


def _timechat_gt_videos(annotations: Sequence[Mapping[str, Any]]) -> list[_Video]:
    """GT side of `eval_with_files` (YouCook2 `pure_cap` or ActivityNet `caption`)."""
    videos = []
    for item in annotations:
        if "pure_cap" in item:
            caps = item["pure_cap"].split(". ")
        else:
            caps = [c.strip(" ") for c in item["caption"].split(".") if len(c) > 5]
        if len(caps) != len(item["segments"]):
            raise ValueError(
                f"{item['image_id']}: {len(item['segments'])} segments but {len(caps)} captions "
                "(the original asserts S == N)"
            )
        caps = [c + "." for c in caps]
        videos.append(
            _Video(
                key=item["image_id"].split("/")[-1],
                gt_spans=[list(s) for s in item["segments"]],
                gt_captions=caps,
                gt_paragraph=" ".join(caps),
                pred_spans=None,
                pred_captions=None,
            )
        )
    return videos


def _parse_sent(text: str) -> str:
    """eval_dvc.py `parse_sent`, joined: letters only, lower-cased."""
    return " ".join(re.sub("[^a-zA-Z]", " ", text).strip().lower().split())


def detection_precision_recall(
    pred_spans: Sequence[Sequence[float]],
    gt_spans: Sequence[Sequence[float]],
    tious: Sequence[float] = DVC_TIOUS,
    *,
    iou_fn: Callable[[Sequence[float], Sequence[float]], float] | None = None,
) -> tuple[list[float], list[float], np.ndarray]:
    """Event detection precision and recall of one video at each tIoU (densevid_eval).

    A prediction (GT event) is covered at tIoU t when its IoU with some GT event (prediction) is
    strictly greater than t. Precision = covered predictions / max(#predictions, 1); recall =
    covered GT / #GT.

    Args:
        pred_spans: [[start, end]] predicted spans (seconds), num_pred of them (may be empty).
        gt_spans: [[start, end]] GT spans (seconds), num_gt >= 1 of them.
        tious: the thresholds.
        iou_fn: IoU(pred, gt); default TimeChat's densevid IoU (spans sorted,
            union = min(hull, len_p + len_g), 1e-8 added to the denominator).

    Returns:
        (precision per tIoU, recall per tIoU, float64[num_gt, max(num_pred, 1)] IoU matrix).
    """
    iou_fn = iou_fn or (lambda p, g: _densevid_iou(p, g, sort_spans=True))
    iou_matrix = np.zeros((len(gt_spans), max(len(pred_spans), 1)))
    covered = {t: (set(), set()) for t in tious}
    for g, g_span in enumerate(gt_spans):
        for p, p_span in enumerate(pred_spans):
            iou = iou_fn(p_span, g_span)
            iou_matrix[g, p] = iou
            for t in tious:
                if iou > t:
                    covered[t][0].add(p)
                    covered[t][1].add(g)
    precision = [len(covered[t][0]) / max(float(len(pred_spans)), 1.0) for t in tious]
    recall = [len(covered[t][1]) / float(len(gt_spans)) for t in tious]
    return precision, recall, iou_matrix


def paragraph_scores(
    pred_paragraphs: Sequence[str], gt_paragraphs: Sequence[Sequence[str]]
) -> dict[str, float]:
    """Paragraph-level CIDEr and METEOR (TimeChat/MMDuet eval_dvc.py `evaluate_para`).

    Paragraphs keep letters only (lower-cased) and are scored at corpus level; pairs are formed by
    position (`zip`, so the shorter list decides), ids in sorted string order as the repo's scorers.

    Args:
        pred_paragraphs: one predicted paragraph per video.
        gt_paragraphs: the reference paragraphs of each video.

    Returns:
        {"Para_CIDER", "Para_METEOR"}, unscaled.

    Raises:
        ValueError: no pair. JavaNotFoundError: without `java`.
    """
    pairs = list(zip(pred_paragraphs, gt_paragraphs))
    if not pairs:
        raise ValueError("no paragraph to score (in original mode: no video has a prediction)")
    ids = sorted(str(i) for i in range(len(pairs)))
    gts = {k: [_parse_sent(g) for g in pairs[int(k)][1]] for k in ids}
    res = {k: [_parse_sent(pairs[int(k)][0])] for k in ids}
    return {
        "Para_CIDER": float(np.nan_to_num(cap.cider(gts, res)[0])),
        "Para_METEOR": float(np.nan_to_num(cap.meteor(gts, res)[0])),
    }


def _timechat_caption_scores(
    v: _Video, tok: Mapping[str, str], rng: random.Random
) -> dict[str, float]:
    """`match_captions` + `evaluate_caption_scores` of one video: CIDEr and METEOR over tIoU."""
    pairs: dict[float, list[tuple[str, str, str]]] = {t: [] for t in DVC_TIOUS}
    isx = 0  # one id counter over (prediction, GT, tIoU), as match_captions
    for p_span, p_cap in zip(v.pred_spans or [], v.pred_captions or []):
        added = dict.fromkeys(DVC_TIOUS, False)
        for g_span, g_cap in zip(v.gt_spans, v.gt_captions):
            iou = _densevid_iou(p_span, g_span, sort_spans=True)
            for t in DVC_TIOUS:
                if iou >= t:
                    pairs[t].append((str(isx), tok[g_cap], tok[p_cap]))
                    isx += 1
                    added[t] = True
        for t in DVC_TIOUS:
            if not added[t]:
                pairs[t].append((str(isx), _random_string(rng), tok[p_cap]))
                isx += 1
    cider_t, meteor_t = [], []
    for t in DVC_TIOUS:
        if not pairs[t]:
            cider_t.append(0.0)
            meteor_t.append(0.0)
            continue
        ordered = sorted(pairs[t], key=lambda x: x[0])  # the repo's scorers sort the ids
        gts = {k: [g] for k, g, _ in ordered}
        res = {k: [p] for k, _, p in ordered}
        cider_t.append(np.nan_to_num(cap.cider(gts, res)[0]))
        meteor_t.append(np.nan_to_num(cap.meteor(gts, res)[0]))
    return {"CIDER": np.mean(cider_t), "METEOR": np.mean(meteor_t)}


def _timechat_soda(v: _Video, iou_matrix: np.ndarray, tok: Mapping[str, str], compat: str) -> float:
    """`sodac` of one video (tIoU 0, METEOR with hypothesis = GT caption)."""
    pred_caps = v.pred_captions or []
    if not pred_caps:
        return 0.0
    n_g, n_p = len(v.gt_captions), len(pred_caps)
    items = [(g, p) for g in range(n_g) for p in range(n_p)]
    _, flat = cap.meteor(
        {i: [tok[pred_caps[p]]] for i, (g, p) in enumerate(items)},
        {i: [tok[v.gt_captions[g]]] for i, (g, p) in enumerate(items)},
    )
    score_matrix = np.nan_to_num(np.array(flat).reshape(n_g, n_p))
    if compat == "original":
        # Bug: the repo's Meteor returns the scores in sorted string order of the ids
        # ('0', '1', '10', '2', ...), which differs from numeric order from 11 predictions on.
        score_matrix = score_matrix[:, [int(k) for k in sorted(str(i) for i in range(n_p))]]
    return float(np.mean([soda_c_prf(iou_matrix[:, :n_p], score_matrix)[2]]))


def _eval_dvc_timechat(
    videos: Sequence[_Video], split_id: int, compat: str
) -> tuple[dict[str, float], list[dict[str, Any]], dict[str, float], list[str | None]]:
    """`evaluate_para` + `evaluate_dense_captions` of TimeChat/MMDuet eval_dvc.py.

    Returns (paragraph scores, per-video metric dicts, means over videos, predicted paragraph
    scored against each video's GT paragraph).
    """
    rng = random.Random(0)
    tok = cap.tokenize_texts(
        [c for v in videos for c in v.gt_captions]
        + [c for v in videos for c in (v.pred_captions or [])]
    )
    if compat == "original":  # bug: videos without prediction are skipped, then zipped
        pred_paras = [". ".join(v.pred_captions) for v in videos if v.pred_captions is not None]
    else:
        pred_paras = [". ".join(v.pred_captions or []) for v in videos]
    paragraph = paragraph_scores(pred_paras, [[v.gt_paragraph] for v in videos])
    para_used = pred_paras[: len(videos)] + [None] * (len(videos) - len(pred_paras))

    per_video = []
    for v in videos:
        metrics: dict[str, Any] = _timechat_caption_scores(v, tok, rng)
        precision, recall, iou_matrix = detection_precision_recall(v.pred_spans or [], v.gt_spans)
        for j, t in enumerate(DVC_TIOUS):
            metrics[f"Precision@{t}"] = float(precision[j])
            metrics[f"Recall@{t}"] = float(recall[j])
        mean_p = sum(precision) / len(precision)
        mean_r = sum(recall) / len(recall)
        metrics["Precision_Mean"] = float(mean_p)
        metrics["Recall_Mean"] = float(mean_r)
        metrics["F1_Score"] = 2 * mean_r * mean_p / (mean_r + mean_p) if mean_r + mean_p > 0 else 0
        metrics[f"SODA_c_{split_id}"] = _timechat_soda(v, iou_matrix, tok, compat)
        metrics["n_preds"] = len(v.pred_captions or [])
        if compat == "original":  # bug: absent splits filled with -1 (printed as -100.0)
            metrics.setdefault("SODA_c_1", -1)
            metrics.setdefault("SODA_c_2", -1)
        per_video.append(metrics)

    means = {k: sum(m[k] for m in per_video) / len(per_video) for k in per_video[0]}
    return paragraph, per_video, means, para_used


def _dvc_result(
    videos: Sequence[_Video],
    paragraph: Mapping[str, float],
    per_video: Sequence[Mapping[str, Any]],
    means: Mapping[str, float],
    para_used: Sequence[str | None],
) -> dict[str, dict]:
    scores = {k: float(v) * 100 for k, v in paragraph.items()}
    for k, v in means.items():
        scores[k] = float(v) if k == "n_preds" else float(v) * 100
    per_item = {}
    for v, m, para in zip(videos, per_video, para_used):
        item: dict[str, Any] = {
            "pred_events": [
                {"timestamp": _to_jsonable_span(s), "caption": c}
                for s, c in zip(v.pred_spans or [], v.pred_captions or [])
            ],
            "pred_spans": [_to_jsonable_span(s) for s in v.pred_spans or []],
            "gt_spans": [_to_jsonable_span(s) for s in v.gt_spans],
            "gt_captions": list(v.gt_captions),
            "has_prediction": v.pred_spans is not None,
            "para_pred": para,
            "para_gt": v.gt_paragraph,
        }
        item.update({k: (x if k == "n_preds" else float(x)) for k, x in m.items()})
        per_item[v.key] = item
    return {"scores": scores, "per_item": per_item}


def _split_id(split: str) -> int:
    name = split.split("/")[-1].split(".")[0]
    if name not in TIMECHAT_SPLIT_IDS:
        raise ValueError(f"split must name one of {sorted(TIMECHAT_SPLIT_IDS)}, got {split!r}")
    return TIMECHAT_SPLIT_IDS[name]


def evaluate_timechat_dvc(
    predictions: Sequence[Mapping[str, str]],
    ground_truth: Mapping[str, Any],
    *,
    compat: str = "corrected",
    split: str = "val",
) -> dict[str, dict]:
    """TimeChat dense video captioning: `format_dvc` then `eval_dvc.eval_with_files`.

    Per GT video (videos missing from the predictions score 0 and count in the means):
    precision/recall at tIoU 0.3/0.5/0.7/0.9 (IoU > tIoU) and their means and F1; CIDEr and METEOR
    of the (GT, prediction) pairs with IoU >= tIoU (unmatched predictions paired with a string
    that matches nothing), computed per video and tIoU and averaged; SODA_c (tIoU 0). Paragraph
    CIDEr/METEOR compare the captions joined with ". " (letters only) to the GT paragraphs.

    Args:
        predictions: `[{"vname": str, "generated_cap": str}]` (TimeChat's inference output).
        ground_truth: the coco-format GT file, `{"annotations": [{image_id, duration,
            segments: [[s, e]] (seconds), pure_cap (YouCook2, captions split on ". ") | caption
            (ActivityNet, split on ".", pieces longer than 5 characters)}]}`.
        compat: "corrected" (default) or "original" (see the module docstring).
        split: the GT file's split, "train" | "val" | "test" or its file name
            ("val.caption_coco_format.json"); it names the `SODA_c_<1|2|3>` key.

    Returns:
        {"scores": {Para_CIDER, Para_METEOR, CIDER, METEOR, Precision@t, Recall@t (t in 0.3, 0.5,
        0.7, 0.9), Precision_Mean, Recall_Mean, F1_Score, SODA_c_<id>, n_preds[, SODA_c_1 ...
        -100 fillers in original mode]}: means over GT videos x100 as eval_with_files prints them
        (unrounded; n_preds not scaled), "per_item": {video key: {pred_events, pred_spans,
        gt_spans (seconds), gt_captions, has_prediction, para_pred (the predicted paragraph scored
        against this video's GT paragraph; None when zip dropped it), para_gt, and the per-video
        metrics unscaled (fractions, as evaluate_dense_captions returns them)}}}.

    Raises:
        ValueError: bad `compat` or `split`; GT segment and caption counts differ.
        JavaNotFoundError: without `java`.
    """
    check_compat(compat)
    split_id = _split_id(split)
    formatted = format_timechat_dvc(predictions, compat=compat)
    return _evaluate_formatted_dvc(formatted, ground_truth["annotations"], split_id, compat)


def _evaluate_formatted_dvc(
    formatted: Mapping[str, Sequence[Event]],
    annotations: Sequence[Mapping[str, Any]],
    split_id: int,
    compat: str,
) -> dict[str, dict]:
    videos = _timechat_gt_videos(annotations)
    if not videos:
        raise ValueError("no ground-truth videos")
    for v in videos:
        if v.key in formatted:
            v.pred_spans = [list(e["timestamp"]) for e in formatted[v.key]]
            v.pred_captions = [e["caption"] for e in formatted[v.key]]
    return _dvc_result(videos, *_eval_dvc_timechat(videos, split_id, compat))


def evaluate_mmduet_youcook2(
    predictions: Sequence[Mapping[str, Any]],
    ground_truth: Sequence[Mapping[str, Any]],
    *,
    compat: str = "corrected",
) -> dict[str, dict]:
    """MMDuet YouCook2 dense captioning (`test/evaluate.py --func dense_captioning`, online model).

    Streamed replies are merged into spans (`merge_streamed_replies`), gold answers converted
    (`mmduet_youcook2_ground_truth`, gold items without a prediction removed), then scored by
    eval_dvc.py exactly as `evaluate_timechat_dvc` (split "val", so the SODA key is `SODA_c_2`).

    Args:
        predictions: the inference output lines, `[{question_id, model_response_list: [{time,
            content, role}], video_duration}]`.
        ground_truth: the gold file, `[{question_id, video, duration, conversation, answer:
            [{time: [s, e], content, role}]}]`.
        compat: "corrected" (default) or "original" (see the module docstring).

    Returns:
        As `evaluate_timechat_dvc`, keyed by `str(question_id)`.

    Raises:
        ValueError: bad `compat`; no gold item has a prediction.
        JavaNotFoundError: without `java`.
    """
    check_compat(compat)
    formatted = {
        str(p["question_id"]): merge_streamed_replies(p["model_response_list"], compat=compat)
        for p in predictions
    }
    annotations = mmduet_youcook2_ground_truth(ground_truth, keep_ids=set(formatted))
    return _evaluate_formatted_dvc(formatted, annotations, TIMECHAT_SPLIT_IDS["val"], compat)


# ================================================================================================
# LongVALE
# ================================================================================================

_LV_EVENT = re.compile(r"From (\d+) to (\d+), (.+?)(?=\n|$)")


def parse_longvale_dense_caption(answer: Any) -> list[Event]:
    """LongVALE's dense-captioning parser (`captioning_metrics` in metric.py).

    Each "From xx to yy, event" (up to the end of its line; numbered lines "1. From ..." match
    too) gives an event with integer positions (00-99 relative to the video length, any number of
    digits accepted). A non-string answer gives no event (the original catches the error).

    Args:
        answer: the model's answer.

    Returns:
        [{"timestamp": [start, end] (int positions), "sentence": str (stripped)}].
    """
    if not isinstance(answer, str):
        return []
    return [
        {"timestamp": [int(m[1]), int(m[2])], "sentence": m[3].strip()}
        for m in _LV_EVENT.finditer(answer)
    ]


def merge_similar_sentences(events: Sequence[Event]) -> list[Event]:
    """LongVALE's merge of near-identical adjacent events (metric.py `merge_similar_sentences`).

    In text order, the next event merges into the current one when
    `difflib.SequenceMatcher(None, cur, next).ratio() > 0.98` and
    `-1 <= next.start - cur.end <= 1`; the merged event keeps the current sentence and spans
    [cur.start, next.end]. Chains merge (20-30, 31-50, 49-60 -> 20-60); duplicates with the same
    span (start - end << -1) or 5 positions apart do not.

    Args:
        events: [{"timestamp": [s, e] (positions), "sentence": str}].

    Returns:
        New list of merged events (input not modified).
    """
    if not events:
        return []
    merged = []
    cur_sent, cur_ts = events[0]["sentence"], list(events[0]["timestamp"])
    for ev in events[1:]:
        nxt_sent, nxt_ts = ev["sentence"], list(ev["timestamp"])
        similar = difflib.SequenceMatcher(None, cur_sent, nxt_sent).ratio() > 0.98
        if similar and -1 <= nxt_ts[0] - cur_ts[1] <= 1:
            cur_ts = [cur_ts[0], nxt_ts[1]]
        else:
            merged.append({"sentence": cur_sent, "timestamp": cur_ts})
            cur_sent, cur_ts = nxt_sent, nxt_ts
    merged.append({"sentence": cur_sent, "timestamp": cur_ts})
    return merged


def longvale_positions_to_seconds(
    events: Sequence[Event], duration: float, *, compat: str = "corrected"
) -> list[Event]:
    """LongVALE's conversion of positions to seconds: [s * d / 100, (e + 1) * d / 100].

    Args:
        events: [{"timestamp": [s, e] (int positions), "sentence": str}].
        duration: video length d in seconds.
        compat: "corrected" (default) clamps positions to 0..99 first, so no span ends after the
            video; "original" converts as is ("From 90 to 105" ends at 1.06 d, README section 10).

    Returns:
        New events with timestamps in seconds (reversed spans kept).
    """
    check_compat(compat)
    out = []
    for ev in events:
        s, e = ev["timestamp"]
        if compat == "corrected":
            s, e = min(max(s, 0), 99), min(max(e, 0), 99)
        out.append(
            {
                "sentence": ev["sentence"],
                "timestamp": [s * duration / 100, (e + 1) * duration / 100],
            }
        )
    return out


def _longvale_iou(pred: Sequence[float], gt: Sequence[float]) -> float:
    """`ANETcaptions.iou(pred, gt)`: spans not sorted; the lengths are added GT first."""
    return _densevid_iou(gt, pred, sort_spans=False)


def _remove_nonascii(text: str) -> str:
    return "".join(ch if ord(ch) < 128 else " " for ch in text)


_LV_LANG = ("METEOR", "CIDEr", "Rouge-L", "Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4")


def _longvale_eval_dvc(
    preds: Mapping[str, Sequence[Event]],
    gts: Mapping[str, Mapping[str, Any]],
    vids: Sequence[str],
    tok: Mapping[str, str],
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """LongVALE `eval_dvc` (ANETcaptions.evaluate): returns (scores, per-video scores)."""
    rng = random.Random(0)
    lang = {m: [] for m in _LV_LANG}  # per tIoU: mean over videos
    per_video: dict[str, dict[str, Any]] = {v: {m: [] for m in _LV_LANG} for v in vids}
    for tiou in DVC_TIOUS:
        per_tiou = {m: [] for m in _LV_LANG}
        for vid in vids:
            pairs = []
            for pred in preds[vid]:
                added = False
                for ci, ts in enumerate(gts[vid]["timestamps"]):
                    if _longvale_iou(pred["timestamp"], ts) >= tiou:
                        pairs.append(
                            (
                                tok[_remove_nonascii(pred["sentence"])],
                                tok[_remove_nonascii(gts[vid]["sentences"][ci])],
                            )
                        )
                        added = True
                if not added:
                    pairs.append((tok[_remove_nonascii(pred["sentence"])], _random_string(rng)))
            if not pairs:
                values = dict.fromkeys(_LV_LANG, 0)
            else:
                res = {i: [p] for i, (p, _) in enumerate(pairs)}
                ref = {i: [g] for i, (_, g) in enumerate(pairs)}
                b = cap.bleu(ref, res)[0]
                values = {
                    "METEOR": cap.meteor(ref, res)[0],
                    "CIDEr": cap.cider(ref, res)[0],
                    "Rouge-L": cap.rouge_l(ref, res)[0],
                    **{f"Bleu_{n + 1}": b[n] for n in range(4)},
                }
            for m in _LV_LANG:
                per_tiou[m].append(values[m])
                per_video[vid][m].append(values[m])
        bleu_mean = np.mean(
            [[per_tiou[f"Bleu_{n}"][i] for n in range(1, 5)] for i in range(len(vids))], axis=0
        )  # as the original: axis 0
        for m in _LV_LANG:
            if m.startswith("Bleu"):
                lang[m].append(bleu_mean[int(m[-1]) - 1])
            else:
                lang[m].append(np.mean(per_tiou[m]))
    scores = {m: float(np.array(lang[m]).mean()) for m in _LV_LANG}

    det = {"Recall": [], "Precision": [], "F1": []}
    per_video_pr = {
        vid: detection_precision_recall(
            [p["timestamp"] for p in preds[vid]], gts[vid]["timestamps"], iou_fn=_longvale_iou
        )[:2]
        for vid in vids
    }
    for i, _ in enumerate(DVC_TIOUS):
        precision = [per_video_pr[vid][0][i] for vid in vids]
        recall = [per_video_pr[vid][1][i] for vid in vids]
        p, r = sum(precision) / len(precision), sum(recall) / len(recall)
        det["Recall"].append(r)
        det["Precision"].append(p)
        det["F1"].append(2 * r * p / (r + p) if r + p else 0.0)
    for i, t in enumerate(DVC_TIOUS):
        for y in ("Recall", "Precision", "F1"):
            scores[f"{y}@{t}"] = float(det[y][i])
    for y in ("Recall", "Precision", "F1"):
        scores[y] = float(np.array(det[y]).mean())

    video_scores = {}
    for vid in vids:
        pv = per_video[vid]
        out = {m: float(np.mean(pv[m])) for m in _LV_LANG}
        for i, t in enumerate(DVC_TIOUS):
            out[f"Precision@{t}"] = per_video_pr[vid][0][i]
            out[f"Recall@{t}"] = per_video_pr[vid][1][i]
        video_scores[vid] = out
    return scores, video_scores


def _longvale_soda(
    preds: Mapping[str, Sequence[Event]],
    gts: Mapping[str, Mapping[str, Any]],
    vids: Sequence[str],
    tok: Mapping[str, str],
) -> tuple[float, float, dict[str, float]]:
    """LongVALE `eval_soda` (SODA c, METEOR): returns (soda_c, mean #predictions, per video f)."""
    f_all, n_pred, per_video = [], [], {}
    for vid in vids:
        pred = sorted(preds[vid], key=lambda x: x["timestamp"][0])
        gold = sorted(zip(gts[vid]["timestamps"], gts[vid]["sentences"]), key=lambda x: x[0][0])
        n_pred.append(len(pred))
        if not pred:
            f_all.append(0)
            per_video[vid] = 0.0
            continue
        iou = np.array(
            [[_densevid_iou(p["timestamp"], ts, sort_spans=False) for p in pred] for ts, _ in gold]
        )
        items = [(g, p) for g in range(len(gold)) for p in range(len(pred))]
        _, flat = cap.meteor(
            {i: [tok[_remove_nonascii(pred[p]["sentence"])]] for i, (g, p) in enumerate(items)},
            {i: [tok[_remove_nonascii(gold[g][1])]] for i, (g, p) in enumerate(items)},
        )
        f = soda_c_prf(iou, np.array(flat).reshape(len(gold), len(pred)))[2]
        f_all.append(f)
        per_video[vid] = float(f)
    return float(np.mean(f_all)), float(np.mean(n_pred)), per_video


def evaluate_longvale_dense_caption(
    predictions: Sequence[Mapping[str, Any]],
    ground_truth: Mapping[str, Mapping[str, Any]],
    *,
    compat: str = "corrected",
) -> dict[str, dict]:
    """LongVALE dense video captioning (`captioning_metrics` of metric.py).

    Each answer is parsed (`parse_longvale_dense_caption`), merged (`merge_similar_sentences`) and
    converted to seconds (`longvale_positions_to_seconds`); an unparsable answer is an empty
    prediction that scores 0 everywhere and counts in the means. Then `eval_soda` (SODA_c with
    METEOR, predictions and GT sorted by start) and `eval_dvc` (per-video METEOR, CIDEr, ROUGE-L,
    BLEU-1..4 of the pairs with IoU >= tIoU, unmatched predictions paired with a string that
    matches nothing, averaged over videos and tIoU 0.3/0.5/0.7/0.9; P/R with IoU > tIoU; F1 per
    tIoU, then averaged). Non-ASCII characters become spaces before tokenization.

    Args:
        predictions: the eval log lines, `{video_id, task, query_id, answer}`; only `task ==
            'captioning'` lines are used (a later line for a video replaces an earlier one).
        ground_truth: the annotation, `{video_id: {duration, timestamps: [[s, e]] (seconds),
            sentences: [str]}}`.
        compat: "corrected" (default) or "original" (see the module docstring).

    Returns:
        {"scores": {soda_c, METEOR, CIDEr (the three metric.py reports), Rouge-L, Bleu_1..4,
        Recall@t, Precision@t, F1@t, Recall, Precision, F1: all x100, unrounded; avg_outputs:
        mean number of predicted events per video}, "per_item": {video_id: {pred_events
        ({sentence, timestamp} in seconds, after merge), pred_spans, gt_spans, gt_captions,
        n_preds, soda_c, METEOR, CIDEr, Rouge-L, Bleu_1..4 (means over tIoU), Precision@t,
        Recall@t: unscaled}}}.

    Raises:
        ValueError: bad `compat`; a logged video is not in the annotation (KeyError in the
            original); no captioning log.
        JavaNotFoundError: without `java`.
    """
    check_compat(compat)
    logs = [x for x in predictions if x["task"] == "captioning"]
    if not logs:
        raise ValueError("no captioning logs")
    parsed = {log["video_id"]: parse_longvale_dense_caption(log["answer"]) for log in logs}
    unknown = [v for v in parsed if v not in ground_truth]
    if unknown:
        raise ValueError(f"videos not in the annotation: {unknown}")
    preds = {
        vid: longvale_positions_to_seconds(
            merge_similar_sentences(events), ground_truth[vid]["duration"], compat=compat
        )
        for vid, events in parsed.items()
    }
    gts = {k: v for k, v in ground_truth.items() if k in preds}
    vids = list(gts)  # the original: Python set order (PYTHONHASHSEED-dependent at 1e-16)
    tok = cap.tokenize_texts(
        [_remove_nonascii(e["sentence"]) for v in vids for e in preds[v]]
        + [_remove_nonascii(s) for v in vids for s in gts[v]["sentences"]]
    )
    soda_c, avg_outputs, soda_per_video = _longvale_soda(preds, gts, vids, tok)
    dvc, dvc_per_video = _longvale_eval_dvc(preds, gts, vids, tok)

    scores = {"soda_c": soda_c * 100, "METEOR": dvc["METEOR"] * 100, "CIDEr": dvc["CIDEr"] * 100}
    scores.update({k: v * 100 for k, v in dvc.items() if k not in scores})
    scores["avg_outputs"] = avg_outputs
    per_item = {}
    for vid in vids:
        per_item[vid] = {
            "pred_events": [
                {"sentence": e["sentence"], "timestamp": _to_jsonable_span(e["timestamp"])}
                for e in preds[vid]
            ],
            "pred_spans": [_to_jsonable_span(e["timestamp"]) for e in preds[vid]],
            "gt_spans": [_to_jsonable_span(t) for t in gts[vid]["timestamps"]],
            "gt_captions": list(gts[vid]["sentences"]),
            "n_preds": len(preds[vid]),
            "soda_c": soda_per_video[vid],
            **dvc_per_video[vid],
        }
    return {"scores": scores, "per_item": per_item}
