"""Caption-similarity scorers (pycocoevalcap) and LongVALE segment captioning.

Thin wrappers over pycocoevalcap 1.2, called the way the originals call them:

  * `ptb_tokenize`: the Stanford PTB tokenizer (`stanford-corenlp-3.4.1.jar`, lower-cased,
    punctuation tokens removed), as `pycocoevalcap.tokenizer.ptbtokenizer.PTBTokenizer`.
  * `meteor`: METEOR 1.5 (`meteor-1.5.jar -l en -norm`); the score is the jar's aggregate over
    all segments (not the mean of the segment scores), plus the per-segment scores.
  * `cider`: coco-caption's CIDEr (n-grams 1..4, Gaussian length penalty sigma 6, document
    frequencies from the references passed in the same call); `bleu` (BLEU-1..4, closest
    reference length); `rouge_l` (ROUGE-L, beta 1.2).

TimeChat and MMDuet ship their own copies of these scorers (`metrics/dvc/metrics/*.py`); they
compute the same numbers as pycocoevalcap 1.2 (same jars, same formulas), except that they iterate
segment ids in sorted string order, which `dense_captioning` reproduces where it matters.

METEOR and the PTB tokenizer run in Java: they need `java` on PATH (`JavaNotFoundError` otherwise).
Starting METEOR takes seconds (it loads its paraphrase table), so one METEOR process is shared by
the whole Python process (`meteor_scorer`, closed by `close_meteor` or at exit).

LongVALE segment captioning follows ttgeng233/LongVALE @ 2eb88ce:
  * `longvalellm/eval/eval.py`: the nested `convert(duration, x)` and `questions['seg_captioning']`
    (`longvale_time_token`, `longvale_seg_caption_query`);
  * `longvalellm/eval/metric.py` `seg_captioning_metrics` (`evaluate_longvale_segment_caption`).
Fixture: `shared/fixtures/metrics/longvale_segment_caption` (README section 11).

compat="corrected" (the default) changes one thing (README section 11, "Pairing is by position"):
the original pairs the i-th seg_captioning log with the i-th (video, sentence) of the annotation
file (restricted to logged videos, in file order) and never compares ids, so logs written in
another order are scored against the wrong references, and a different count fails an assert.
Corrected: each log is scored against `annotation[video_id]['sentences'][info['sentence_id']]`.
On the fixture (logs in annotation order) both modes give identical numbers.
"""

import atexit
import contextlib
import io
import shutil
import threading
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from longvid_jax.metrics.common import check_compat

JAVA_INSTALL_HINT = (
    "METEOR and the PTB tokenizer of pycocoevalcap run in Java, but no `java` executable was "
    "found on PATH. Install a Java runtime (Java 8 or newer), e.g. `apt-get install default-jre` "
    "(Debian/Ubuntu), `conda install -c conda-forge openjdk`, or `brew install openjdk`, and make "
    "sure `java -version` works in this shell."
)

# LongVALE eval.py: questions['seg_captioning'][0].
LONGVALE_SEG_CAPTION_TEMPLATE = (
    "Can you describe what occurred from <start> to <end> in the video? "
    "Please give the event description directly."
)


class JavaNotFoundError(RuntimeError):
    """Raised when a Java-based scorer (METEOR, PTB tokenizer) is needed but `java` is missing."""


def require_java() -> str:
    """Returns the path of the `java` executable.

    Raises:
        JavaNotFoundError: when `java` is not on PATH (the message says how to install it).
    """
    path = shutil.which("java")
    if path is None:
        raise JavaNotFoundError(JAVA_INSTALL_HINT)
    return path


# ------------------------------------------------------------------------------------------------
# PTB tokenizer
# ------------------------------------------------------------------------------------------------


def ptb_tokenize(captions: Mapping[Hashable, Sequence[str]]) -> dict[Hashable, list[str]]:
    """Tokenizes captions with pycocoevalcap's `PTBTokenizer` (one Java run for all of them).

    Each caption is lower-cased and split into PTB tokens; punctuation tokens ('', ', ``, `, .,
    ?, !, ,, :, -, --, ..., ;, -LRB- ...) are dropped and the rest joined with single spaces.
    Newlines inside a caption become spaces. Lines are tokenized independently, so one call over
    many captions equals many calls over one caption each. (pycocoevalcap writes its temporary
    input file next to the jar, so its package folder must be writable.)

    Args:
        captions: id -> list of caption strings.

    Returns:
        id -> list of tokenized strings (same ids and list lengths, in the input order).

    Raises:
        JavaNotFoundError: when `java` is missing.
    """
    if not captions or not any(len(v) for v in captions.values()):
        return {k: [] for k in captions}
    require_java()
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    wrapped = {k: [{"caption": str(c)} for c in v] for k, v in captions.items()}
    out = PTBTokenizer().tokenize(wrapped)
    return {k: list(out.get(k, [])) for k in captions}


def tokenize_texts(texts: Iterable[str]) -> dict[str, str]:
    """Tokenizes a collection of strings once each (see `ptb_tokenize`).

    Args:
        texts: strings (duplicates allowed).

    Returns:
        text -> tokenized text, for every distinct input string.
    """
    unique = list(dict.fromkeys(texts))
    out = ptb_tokenize({i: [t] for i, t in enumerate(unique)})
    return {t: out[i][0] for i, t in enumerate(unique)}


# ------------------------------------------------------------------------------------------------
# Scorers
# ------------------------------------------------------------------------------------------------

_METEOR = None
_METEOR_LOCK = threading.Lock()


def meteor_scorer():
    """Returns the process-wide pycocoevalcap `Meteor` (started on first use, restarted if dead).

    Raises:
        JavaNotFoundError: when `java` is missing.
    """
    global _METEOR
    with _METEOR_LOCK:
        if _METEOR is None or _METEOR.meteor_p.poll() is not None:
            require_java()
            from pycocoevalcap.meteor.meteor import Meteor

            _METEOR = Meteor()
        return _METEOR


def close_meteor() -> None:
    """Stops the shared METEOR process, if one is running."""
    global _METEOR
    with _METEOR_LOCK:
        scorer, _METEOR = _METEOR, None
    if scorer is not None:
        with scorer.lock:
            with contextlib.suppress(Exception):
                scorer.meteor_p.stdin.close()
            scorer.meteor_p.kill()
            scorer.meteor_p.wait()


atexit.register(close_meteor)


def _as_lists(gts: Mapping, res: Mapping) -> tuple[dict, dict]:
    """Checks the ids and copies both sides into the `{id: [str]}` dicts the scorers take."""
    if set(gts) != set(res):
        raise ValueError("gts and res must have the same ids")
    if not gts:
        raise ValueError("no segments to score")
    return {k: list(v) for k, v in gts.items()}, {k: list(res[k]) for k in gts}


def meteor(
    gts: Mapping[Hashable, Sequence[str]], res: Mapping[Hashable, Sequence[str]]
) -> tuple[float, list[float]]:
    """METEOR 1.5 as pycocoevalcap's `Meteor.compute_score(gts, res)`.

    Args:
        gts: id -> reference strings (tokenized), at least one each.
        res: id -> [hypothesis string] (tokenized), exactly one each; same ids as `gts`.

    Returns:
        (aggregate METEOR over all segments as the jar computes it, per-segment scores in the
        iteration order of `gts`). Both in [0, 1].

    Raises:
        ValueError: on mismatched or empty ids. JavaNotFoundError: without `java`.
    """
    gts, res = _as_lists(gts, res)
    scorer = meteor_scorer()
    score, scores = scorer.compute_score(gts, res)
    return float(score), [float(s) for s in scores]


def cider(
    gts: Mapping[Hashable, Sequence[str]], res: Mapping[Hashable, Sequence[str]]
) -> tuple[float, np.ndarray]:
    """CIDEr (n=4, sigma=6) as pycocoevalcap's `Cider.compute_score(gts, res)`.

    The inverse document frequencies come from the references of this call only, and the corpus
    size is the number of ids.

    Args:
        gts: id -> reference strings (tokenized).
        res: id -> [hypothesis string] (tokenized); same ids as `gts`.

    Returns:
        (mean score, float64[num_ids] per-id scores in the iteration order of `gts`); scores are
        x10 as in coco-caption (not x100).

    Raises:
        ValueError: on mismatched or empty ids.
    """
    gts, res = _as_lists(gts, res)
    from pycocoevalcap.cider.cider import Cider

    score, scores = Cider().compute_score(gts, res)
    return float(score), np.asarray(scores, dtype=np.float64)


def bleu(
    gts: Mapping[Hashable, Sequence[str]], res: Mapping[Hashable, Sequence[str]]
) -> tuple[list[float], list[list[float]]]:
    """Corpus BLEU-1..4 as pycocoevalcap's `Bleu(4).compute_score` (closest reference length).

    The original prints BleuScorer's debug lines (`{'testlen': ...}`, `ratio: ...`); they are not
    printed here (`verbose=0`), which does not change the numbers.

    Args:
        gts: id -> reference strings (tokenized).
        res: id -> [hypothesis string] (tokenized); same ids as `gts`.

    Returns:
        ([BLEU-1, BLEU-2, BLEU-3, BLEU-4], per-n lists of per-id sentence BLEU).

    Raises:
        ValueError: on mismatched or empty ids.
    """
    gts, res = _as_lists(gts, res)
    from pycocoevalcap.bleu.bleu import Bleu

    with contextlib.redirect_stdout(io.StringIO()):
        score, scores = Bleu(4).compute_score(gts, res, verbose=0)
    return [float(s) for s in score], [[float(x) for x in s] for s in scores]


def rouge_l(
    gts: Mapping[Hashable, Sequence[str]], res: Mapping[Hashable, Sequence[str]]
) -> tuple[float, np.ndarray]:
    """ROUGE-L (beta 1.2) as pycocoevalcap's `Rouge().compute_score`: the mean of per-id scores.

    Args:
        gts: id -> reference strings (tokenized).
        res: id -> [hypothesis string] (tokenized); same ids as `gts`.

    Returns:
        (mean, float64[num_ids] per-id scores).

    Raises:
        ValueError: on mismatched or empty ids.
    """
    gts, res = _as_lists(gts, res)
    from pycocoevalcap.rouge.rouge import Rouge

    score, scores = Rouge().compute_score(gts, res)
    return float(score), np.asarray(scores, dtype=np.float64)


# ------------------------------------------------------------------------------------------------
# LongVALE segment captioning
# ------------------------------------------------------------------------------------------------


def longvale_time_token(duration: float, t: float) -> str:
    """LongVALE's relative time token (eval.py `convert`): `str(min(round(t/duration*100), 99))`.

    Python's `round` (half to even), zero-padded to two digits.

    Args:
        duration: video length in seconds (> 0).
        t: time in seconds.

    Returns:
        The token, e.g. "07" or "99".
    """
    x = str(min(round(t / duration * 100), 99))
    return "0" + x if len(x) == 1 else x


def longvale_seg_caption_query(duration: float, start: float, end: float) -> dict[str, str]:
    """The segment-captioning question LongVALE's eval.py asks for a GT segment.

    Args:
        duration: video length in seconds.
        start: segment start in seconds.
        end: segment end in seconds.

    Returns:
        {"start": token, "end": token, "query": question text}.
    """
    s, e = longvale_time_token(duration, start), longvale_time_token(duration, end)
    query = LONGVALE_SEG_CAPTION_TEMPLATE.replace("<start>", s).replace("<end>", e)
    return {"start": s, "end": e, "query": query}


def _seg_caption_pairs(
    logs: Sequence[Mapping[str, Any]], annotation: Mapping[str, Any], compat: str
) -> list[tuple[str, int]]:
    """Returns, for each log, the (video_id, sentence_id) of the reference it is scored against."""
    if compat == "original":
        logged = {log["video_id"] for log in logs}
        refs = [
            (vid, sid)
            for vid, ann in annotation.items()
            if vid in logged
            for sid in range(len(ann["sentences"]))
        ]
        if len(refs) != len(logs):
            raise ValueError(
                f"{len(logs)} seg_captioning logs but {len(refs)} annotated sentences in the "
                "logged videos; the original pairs them by position and fails its "
                "`gts.keys() == res.keys()` assert here"
            )
        return refs
    refs, seen = [], set()
    for log in logs:
        vid, sid = log["video_id"], int(log["info"]["sentence_id"])
        if vid not in annotation:
            raise ValueError(f"seg_captioning log for unknown video {vid!r}")
        if not 0 <= sid < len(annotation[vid]["sentences"]):
            raise ValueError(f"video {vid!r} has no sentence {sid}")
        if (vid, sid) in seen:
            raise ValueError(f"duplicate seg_captioning log for video {vid!r} sentence {sid}")
        seen.add((vid, sid))
        refs.append((vid, sid))
    return refs


def evaluate_longvale_segment_caption(
    predictions: Sequence[Mapping[str, Any]],
    ground_truth: Mapping[str, Mapping[str, Any]],
    *,
    compat: str = "corrected",
) -> dict[str, dict]:
    """LongVALE segment captioning: BLEU-4, METEOR, ROUGE-L and CIDEr over all segments.

    Follows `seg_captioning_metrics` of LongVALE `longvalellm/eval/metric.py`: answers and
    references are PTB-tokenized, then scored at corpus level (BLEU-4 with the closest reference
    length; METEOR is the jar's aggregate; CIDEr takes its IDF over all segments; "Rouge" is the
    mean per-segment ROUGE-L). An empty answer is accepted (it scores 0).

    Args:
        predictions: the eval log lines, `{video_id, task, query_id, answer, info: {sentence_id}}`;
            only `task == 'seg_captioning'` lines are used, in the given order.
        ground_truth: the annotation, `{video_id: {duration, timestamps: [[s, e]] (seconds),
            sentences: [str]}}`.
        compat: "corrected" (default) pairs each log with the annotation sentence its ids name;
            "original" pairs the i-th log with the i-th annotated sentence of the logged videos
            (bug: "Pairing is by position", fixture README section 11).

    Returns:
        {"scores": {"BLEU4", "METEOR", "Rouge", "CIDEr"} in percent (x100, as metric.py prints
        them, unrounded), "per_item": {"<video_id>_<sentence_id>" of the log: {video_id,
        sentence_id, prediction, reference, reference_id (the annotation sentence actually used),
        gt_span (seconds, of reference_id), BLEU4, METEOR, Rouge, CIDEr (per-segment, unscaled)}}}.

    Raises:
        ValueError: bad `compat`; in original mode a count mismatch (the original asserts); in
            corrected mode an unknown or duplicate (video_id, sentence_id).
        JavaNotFoundError: without `java`.
    """
    check_compat(compat)
    logs = [x for x in predictions if x["task"] == "seg_captioning"]
    if not logs:
        raise ValueError("no seg_captioning logs")
    refs = _seg_caption_pairs(logs, ground_truth, compat)
    answers = [str(log["answer"]) for log in logs]
    references = [ground_truth[vid]["sentences"][sid] for vid, sid in refs]
    tok = tokenize_texts(answers + references)
    gts = {i: [tok[r]] for i, r in enumerate(references)}
    res = {i: [tok[a]] for i, a in enumerate(answers)}

    bleu_all, bleu_each = bleu(gts, res)
    meteor_all, meteor_each = meteor(gts, res)
    rouge_all, rouge_each = rouge_l(gts, res)
    cider_all, cider_each = cider(gts, res)
    scores = {
        "BLEU4": bleu_all[3] * 100,
        "METEOR": meteor_all * 100,
        "Rouge": rouge_all * 100,
        "CIDEr": cider_all * 100,
    }
    per_item = {}
    for i, log in enumerate(logs):
        key = f"{log['video_id']}_{log['info']['sentence_id']}"
        while key in per_item:  # only possible in original mode (duplicate logs)
            key += "+"
        rvid, rsid = refs[i]
        per_item[key] = {
            "video_id": log["video_id"],
            "sentence_id": log["info"]["sentence_id"],
            "prediction": answers[i],
            "reference": references[i],
            "reference_id": f"{rvid}_{rsid}",
            "gt_span": [float(x) for x in ground_truth[rvid]["timestamps"][rsid]],
            "BLEU4": bleu_each[3][i],
            "METEOR": meteor_each[i],
            "Rouge": float(rouge_each[i]),
            "CIDEr": float(cider_each[i]),
        }
    return {"scores": scores, "per_item": per_item}
