"""Open-ended short-answer QA: Music-AVQA as TDC evaluates it, with an accuracy scorer.

TDC's `eval/eval_musicQA.py` (Hoar012/TDC-Video @ fb8333e) fills the question template (each
`<Name>` placeholder, in order, by the record's `templ_values`), appends " Answer with a single
word or phrase.", decodes greedily (16 tokens), strips the stop string and the word "Answer",
and writes `{idx, prompt, pred, correct_answer, type, video_name, ...}` records. It computes no
score. Music-AVQA itself (Li et al. 2022, "Learning to Answer Questions in Dynamic Audio-Visual
Scenarios") scores a 42-way answer classifier by exact accuracy per question type; a free-text
answer is therefore scored here by exact match after normalisation (`normalize_answer`:
lower case, no punctuation or articles, number words as digits, so "Two." matches "2"), per
type (`Audio/Counting`, ..., `Audio-Visual/Temporal`), per modality and overall. With no
original scorer there is no `compat="original"` behaviour to reproduce: both modes are equal.
"""

import ast
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from longvid_jax.metrics.common import check_compat

SUFFIX = " Answer with a single word or phrase."

_NUMBERS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen twenty".split())}
_ARTICLES = {"a", "an", "the"}


def music_avqa_question(record: Mapping[str, Any]) -> str:
    """The prompt TDC asks: the template filled by `templ_values`, plus `SUFFIX`.

    Raises:
      ValueError: when the template's placeholders and `templ_values` differ in number.
    """
    question = record["question_content"]
    names = re.findall(r"<(.*?)>", question)
    values = record["templ_values"]
    values = ast.literal_eval(values) if isinstance(values, str) else list(values)
    if len(values) != len(names):
        raise ValueError(f"question {record.get('question_id')}: {len(names)} placeholders "
                         f"but {len(values)} templ_values")
    for name, value in zip(names, values):
        question = question.replace(f"<{name}>", value, 1)
    return question + SUFFIX


def normalize_answer(text: str) -> str:
    """Lower case, punctuation and articles removed, number words 0-20 as digits."""
    words = re.sub(r"[^\w\s]", " ", str(text).lower()).split()
    return " ".join(_NUMBERS.get(w, w) for w in words if w not in _ARTICLES)


def question_type(value: Any) -> str:
    """`'["Audio-Visual", "Counting"]'` (the dataset stores a string) -> "Audio-Visual/Counting"."""
    parts = ast.literal_eval(value) if isinstance(value, str) and value.startswith("[") else value
    return "/".join(parts) if isinstance(parts, (list, tuple)) else str(parts)


def evaluate_music_avqa(predictions: Sequence[Mapping[str, Any]],
                        ground_truth: Sequence[Mapping[str, Any]] | None = None, *,
                        compat: str = "corrected") -> dict[str, Any]:
    """Exact-match accuracy (x100) of short answers, overall, per modality and per type.

    Args:
      predictions: TDC's output records `{idx, pred, correct_answer, type, ...}`. With
        `ground_truth`, only `idx` (the question id) and `pred` are read.
      ground_truth: Music-AVQA annotation records (`avqa-test.json`: `question_id`, `type`,
        `anser` (sic, the dataset's spelling; `answer` also accepted)); questions without a
        prediction count as wrong.
      compat: "original" or "corrected" (identical here: the original computes no score).

    Returns:
      {"scores": {"accuracy", "<modality>", "<modality>/<type>", "n_questions"},
       "per_item": {question_id: {pred, answer, type, correct}}}.

    Raises:
      ValueError: unknown compat, or a prediction without `idx` when ground truth is given.
    """
    check_compat(compat)
    if ground_truth is None:
        items = [(p.get("idx"), p.get("pred", ""), p["correct_answer"], p["type"])
                 for p in predictions]
    else:
        preds = {}
        for p in predictions:
            if "idx" not in p:
                raise ValueError(f"prediction without 'idx' (question id): {dict(p)}")
            preds[p["idx"]] = p.get("pred", "")
        items = [(g["question_id"], preds.get(g["question_id"]),
                  g.get("anser", g.get("answer")), g["type"]) for g in ground_truth]
    per_item: dict[Any, dict[str, Any]] = {}
    groups: dict[str, list[bool]] = defaultdict(list)
    for qid, pred, answer, qtype in items:
        kind = question_type(qtype)
        correct = pred is not None and normalize_answer(pred) == normalize_answer(answer)
        per_item[qid] = {"pred": pred, "answer": answer, "type": kind, "correct": correct}
        groups["accuracy"].append(correct)
        groups[kind.split("/")[0]].append(correct)
        if "/" in kind:
            groups[kind].append(correct)
    scores: dict[str, float] = {name: 100.0 * sum(v) / len(v) for name, v in groups.items()}
    scores["n_questions"] = len(items)
    return {"scores": scores, "per_item": per_item}
