"""Multiple-choice video QA scoring: MLVU as TDC scores it, and Video-MME.

Sources (facts only, no code copied):
  * MLVU: Hoar012/TDC-Video @ fb8333e, `eval/eval_mlvu.py`: `EvalDataset.qa_template` (prompt and
    ground-truth letter), the answer-parsing block of `train()` (from `if pred.endswith(stop_str):`
    to the `uuid` line) and the accuracy block (`correct = 0` ... `final_res["Acc"]`); the 8-GPU
    run shards with transformers `IterableDatasetShard(batch_size=1, num_processes=world_size)`.
    Fixture: `shared/fixtures/metrics/tdc_mlvu` (README section 12).
  * Video-MME: BradyFU/Video-MME @ 4e7566d, `evaluation/eval_your_results.py`
    (`extract_characters_regex`, `eval_your_results`), results in the format of
    `evaluation/output_test_template.json`. No fixture exists; tests use a hand-made sample.

Every function whose original has a documented bug takes `compat="corrected"` (default, fixed) or
`compat="original"` (bit-for-bit the original's numbers). The corrected behaviours are:

  MLVU (README section 12):
  * Parsing. The original removes "Answer", then takes the first capital A-D *anywhere*, so
    "Based on the video, C" -> B and "ANSWER: B" -> A, and maps text with no A-D ("", "c", "E",
    "Normal") to A. Corrected: `parse_choice_letter`, which looks for a letter standing alone (not
    inside a word), accepts every option letter the question has (E for five candidates), and
    returns None (counted wrong) when there is none.
  * Ground truth. The original takes the index of the *last* candidate equal to the answer and
    '@' when the answer is not a candidate. Corrected: a prediction is right when the candidate it
    names equals the answer text (so either duplicate counts); the reported letter is the first
    match, None when the answer is missing (the item counts as wrong in both modes).
  * Prompt. The original always says "(A, B, C or D)", even with five candidates. Corrected: the
    letters of the actual candidates.
  * World size. Under `torchrun --nproc_per_node=N` the original's `IterableDatasetShard` pads the
    last incomplete round with items of the first round, which are then counted twice. Corrected:
    each item is counted once whatever `world_size` is.

  Video-MME (`eval_your_results.py`):
  * `answer_prefixes` lacks two commas, so "The best option is", "The correct option is",
    "Best answer:" and "Best option:" are never removed ("Best answer: C" -> B), and the first
    capital A-D anywhere is taken ("Based on ..."). Corrected: the prefixes are removed and the
    letter is read by `parse_choice_letter`.
  * Questions whose answer cannot be parsed are left out of the denominator ("answered"), which
    inflates accuracy. Corrected: they count as wrong.
  * Categories with no question are printed as 0%. Corrected: left out.
"""

import re
from collections.abc import Mapping, Sequence
from typing import Any

from longvid_jax.metrics.common import check_compat

LETTERS = "ABCDEFGHIJ"

# MLVU: the task files TDC's EvalDataset reads, in its `data_list` order.
MLVU_TASKS = ("count", "ego", "needle", "order", "plotQA", "anomaly_reco", "topic_reasoning")
MLVU_STOP_STR = "<|im_end|>"  # conv_qwen.sep, the stop string of TDC's Qwen template
_MLVU_LETTER_RE = re.compile(r"[\(\ \[]*([A-D])[\)\.\ \]]*")

# Video-MME: the lists of eval_your_results.py.
VIDEOMME_DURATIONS = ("short", "medium", "long")
VIDEOMME_CATEGORIES = (
    "Knowledge", "Film & Television", "Sports Competition", "Artistic Performance",
    "Life Record", "Multilingual",
)
VIDEOMME_SUB_CATEGORIES = (
    "Humanity & History", "Literature & Art", "Biology & Medicine", "Finance & Commerce",
    "Astronomy", "Geography", "Law", "Life Tip", "Technology", "Animation", "Movie & TV Show",
    "Documentary", "News Report", "Esports", "Basketball", "Football", "Athletics",
    "Other Sports", "Stage Play", "Magic Show", "Variety Show", "Acrobatics", "Handicraft", "Food",
    "Fashion", "Daily Life", "Travel", "Pet & Animal", "Exercise", "Multilingual",
)
VIDEOMME_TASK_TYPES = (
    "Temporal Perception", "Spatial Perception", "Attribute Perception", "Action Recognition",
    "Object Recognition", "OCR Problems", "Counting Problem", "Temporal Reasoning",
    "Spatial Reasoning", "Action Reasoning", "Object Reasoning", "Information Synopsis",
)
# As written in eval_your_results.py: two missing commas join four prefixes into two strings
# that never occur in a response.
_VIDEOMME_PREFIXES_ORIGINAL = (
    "The best answer is", "The correct answer is", "The answer is", "The answer",
    "The best option isThe correct option is", "Best answer:Best option:",
)
_VIDEOMME_PREFIXES_CORRECTED = (
    "The best answer is", "The correct answer is", "The answer is", "The answer",
    "The best option is", "The correct option is", "Best answer:", "Best option:",
)


def _letter_span(num_options: int) -> str:
    if not 1 <= num_options <= len(LETTERS):
        raise ValueError(f"num_options must be in [1, {len(LETTERS)}], got {num_options}")
    return LETTERS[:num_options]


def parse_choice_letter(text: str, num_options: int = 4) -> str | None:
    """Reads the option letter a model answered, or None when it named none (corrected parser).

    In order, the first rule that matches decides:
      1. the whole answer, less spaces, brackets and punctuation, is one letter (either case):
         "C", " c.", "(B)";
      2. a letter in brackets: "The answer is (B).", "[C]";
      3. a letter closed by ")": "B) dog, girl, boy";
      4. a letter after "answer" / "option" (any case), optionally with "is" or ":": "ANSWER: B",
         "the answer is C";
      5. the first capital letter standing alone (not part of a word): "Based on the video, C".
    Only the letters of the options count ("E" with four options is no answer). A lower-case
    letter counts only under rule 1 ("a" is an article elsewhere).

    Args:
      text: the decoded model answer.
      num_options: number of options; letters A.. up to that many are valid.

    Returns:
      "A".."J", or None.

    Raises:
      ValueError: num_options outside [1, 10].
    """
    valid = _letter_span(num_options)
    cls = f"[{valid}]"
    bare = text.strip().strip(" \t\n()[]{}.,:;!?'\"*")
    if len(bare) == 1 and bare.upper() in valid:
        return bare.upper()
    patterns = (
        rf"[\(\[]\s*({cls})\s*[\)\]]",
        rf"(?<![A-Za-z0-9])({cls})\)",
        rf"(?i:answer|option)\s*(?:is\s*)?:?\s*[\(\[]?\s*({cls})(?![A-Za-z0-9])",
        rf"(?<![A-Za-z0-9'])({cls})(?![A-Za-z0-9'])",
    )
    for pattern in patterns:
        match = re.search(pattern, text)
        if match is not None:
            return match.group(1)
    return None


# ----------------------------------------------------------------------------------------------
# MLVU (TDC eval/eval_mlvu.py)
# ----------------------------------------------------------------------------------------------


def mlvu_prompt(item: Mapping[str, Any], *, compat: str = "corrected") -> str:
    """The MLVU question prompt as TDC's `EvalDataset.qa_template` builds it.

    "Question: {question}\\nOptions:\\n(A) {c0}\\n(B) {c1}...\\nRespond with only the letter
    (A, B, C or D) of the correct option." (every candidate is listed).

    Args:
      item: an MLVU annotation `{question, candidates, answer, ...}`.
      compat: "original" always writes "(A, B, C or D)"; "corrected" names the letters of the
        actual candidates ("(A, B, C, D or E)" for five; bug: README section 12, "All candidates
        are listed, including a fifth "(E)", while the prompt still says "(A, B, C or D)"").

    Returns:
      The prompt (no trailing newline).

    Raises:
      ValueError: unknown compat, or more candidates than letters.
    """
    check_compat(compat)
    candidates = list(item["candidates"])
    letters = _letter_span(max(len(candidates), 1))
    lines = [f"Question: {item['question']}", "Options:"]
    lines += [f"({letters[i]}) {c}" for i, c in enumerate(candidates)]
    if compat == "original" or len(candidates) <= 1:
        named = "A, B, C or D" if compat == "original" else letters
    else:
        named = ", ".join(letters[:-1]) + " or " + letters[-1]
    lines.append(f"Respond with only the letter ({named}) of the correct option.")
    return "\n".join(lines).rstrip()


def mlvu_answer_letter(item: Mapping[str, Any], *, compat: str = "corrected") -> str | None:
    """The ground-truth letter of an MLVU item.

    Args:
      item: an MLVU annotation `{candidates, answer, ...}`.
      compat: "original": the letter of the *last* candidate equal to the answer, "@" (the
        character before "A") when none is (eval_mlvu.py `qa_template`, `answer_idx = -1`);
        "corrected": the first equal candidate, None when none is.

    Returns:
      A letter, "@" (original) or None (corrected).
    """
    check_compat(compat)
    matches = [i for i, c in enumerate(item["candidates"]) if c == item["answer"]]
    if compat == "original":
        return chr(ord("A") + (matches[-1] if matches else -1))
    return LETTERS[matches[0]] if matches else None


def parse_mlvu_answer(decoded: str, *, num_options: int = 4, stop_str: str = MLVU_STOP_STR,
                      compat: str = "corrected") -> str | None:
    """Reads the answer letter from the decoded text of the model, as TDC's eval_mlvu.py does.

    The text is stripped and a trailing `stop_str` removed (then stripped again) in both modes.

    Args:
      decoded: `tokenizer.batch_decode(..., skip_special_tokens=True)[0]`.
      num_options: number of candidates (corrected mode only).
      stop_str: the conversation template's stop string ("<|im_end|>" for TDC's Qwen).
      compat: "original": delete "Answer" (case-sensitive) and take the first capital A-D found
        anywhere, "A" when there is none (README section 12: "Based on the video, C" -> B,
        "ANSWER: B" -> A, "" / "c" / "E" / "Normal" -> A); "corrected": `parse_choice_letter`.

    Returns:
      "A".."D" (original); a valid letter or None (corrected).
    """
    check_compat(compat)
    pred = decoded.strip()
    if stop_str and pred.endswith(stop_str):
        pred = pred[: -len(stop_str)].strip()
    if compat == "corrected":
        return parse_choice_letter(pred, num_options)
    pred = pred.replace("Answer", "")
    found = _MLVU_LETTER_RE.findall(pred)
    letter = found[0].strip().strip("()") if found else "A"
    # The original's `else` branch (letter C) is unreachable: the regex yields only A-D.
    return letter if letter in "ABCD" else "C"


def iterable_dataset_shard_indices(n: int, world_size: int) -> list[list[int]]:
    """The dataset indices each rank evaluates under transformers' `IterableDatasetShard`.

    `IterableDatasetShard(batch_size=1, num_processes=world_size, drop_last=False)`: rank r takes
    item r of each round of `world_size` items; the last incomplete round is completed with the
    items of the first round (repeated as needed), so those are evaluated twice.
    `chain(*all_gather_object(...))` then lists rank 0's outputs first.

    Args:
      n: number of items.
      world_size: number of processes.

    Returns:
      `world_size` lists of indices, one per rank.
    """
    rounds = [list(range(s, min(s + world_size, n))) for s in range(0, n, world_size)]
    if rounds and len(rounds[-1]) < world_size:
        first = list(rounds[0])
        while len(rounds[-1]) < world_size:
            rounds[-1] += first
        rounds[-1] = rounds[-1][:world_size]
    return [[r[rank] for r in rounds] for rank in range(world_size)]


def _mean_of_tasks(acc_dict: Mapping[str, list[int]]) -> dict[str, float]:
    final_res: dict[str, float] = {}
    total, count = 0.0, 0
    for task, (correct, n) in acc_dict.items():
        count += 1
        final_res[task] = correct / n * 100
        total += final_res[task]
    final_res["Acc"] = total / count if count else float("nan")
    return final_res


def evaluate_mlvu(predictions: Sequence[Mapping[str, Any]],
                  ground_truth: Mapping[str, Sequence[Mapping[str, Any]]], *,
                  compat: str = "corrected", world_size: int = 1,
                  stop_str: str = MLVU_STOP_STR) -> dict[str, Any]:
    """MLVU multiple-choice accuracy: per task and the unweighted mean of the tasks ("Acc").

    Follows TDC `eval/eval_mlvu.py` (`qa_template`, answer parsing, accuracy block).

    Args:
      predictions: one `{task_type, video_name, decoded}` per item (the decoded model text);
        matched to `ground_truth` by (task_type, video_name) in order, so a video with several
        questions takes its predictions in the order of its questions.
      ground_truth: `{task: [MLVU items {video, question, candidates, answer, ...}]}`, the task
        json files in TDC's order (`MLVU_TASKS`).
      compat: "original" or "corrected" (see the module docstring).
      world_size: processes of the original run (original mode: items of the padded last round
        are counted twice, as in an 8-GPU `torchrun`); ignored in corrected mode.
      stop_str: removed from the end of the decoded text.

    Returns:
      `{"scores": {task: accuracy x100, ..., "Acc": mean of the task accuracies},
        "per_item": {"task/video_name": {task_type, video_name, prompt, answer (GT letter),
        pred (letter or None), decoded, correct, n_evaluations}},
        "acc_dict": {task: [correct, total]}}`; tasks in the order the original first meets them.

    Raises:
      ValueError: unknown compat, world_size < 1, or predictions that do not match the items.
    """
    check_compat(compat)
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    queues: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for pred in predictions:
        queues.setdefault((pred["task_type"], pred["video_name"]), []).append(pred)

    records, per_item = [], {}
    for task, items in ground_truth.items():
        for item in items:
            key = (task, item["video"])
            if not queues.get(key):
                raise ValueError(f"no prediction for MLVU item {key}")
            decoded = queues[key].pop(0)["decoded"]
            n_opt = len(item["candidates"])
            pred = parse_mlvu_answer(decoded, num_options=max(n_opt, 1), stop_str=stop_str,
                                     compat=compat)
            answer = mlvu_answer_letter(item, compat=compat)
            if compat == "original":
                correct = pred == answer
            else:
                idx = LETTERS.find(pred) if pred is not None else -1
                correct = 0 <= idx < n_opt and item["candidates"][idx] == item["answer"]
            item_id = f"{task}/{item['video']}"
            k = 2
            while item_id in per_item:
                item_id, k = f"{task}/{item['video']}#{k}", k + 1
            per_item[item_id] = {
                "task_type": task, "video_name": item["video"],
                "prompt": mlvu_prompt(item, compat=compat), "answer": answer, "pred": pred,
                "decoded": decoded, "correct": bool(correct), "n_evaluations": 0,
            }
            records.append((item_id, task, bool(correct)))
    left = [k for k, q in queues.items() if q]
    if left:
        raise ValueError(f"predictions without an MLVU item: {left}")

    order = range(len(records))
    if compat == "original" and world_size > 1:
        order = [i for rank in iterable_dataset_shard_indices(len(records), world_size)
                 for i in rank]
    acc_dict: dict[str, list[int]] = {}
    for i in order:
        item_id, task, correct = records[i]
        per_item[item_id]["n_evaluations"] += 1
        acc = acc_dict.setdefault(task, [0, 0])
        acc[1] += 1
        acc[0] += int(correct)
    return {"scores": _mean_of_tasks(acc_dict), "per_item": per_item, "acc_dict": acc_dict}


# ----------------------------------------------------------------------------------------------
# Video-MME (BradyFU/Video-MME evaluation/eval_your_results.py)
# ----------------------------------------------------------------------------------------------


def extract_videomme_answer(response: str, *, compat: str = "corrected") -> str:
    """Reads the answer letter of a Video-MME response; "" when there is none.

    Args:
      response: the model's text.
      compat: "original": `extract_characters_regex` of eval_your_results.py (the prefixes as
        written there, two of them fused by missing commas; then the first capital A-D anywhere;
        "" when there is none); "corrected": the prefixes removed, then `parse_choice_letter`
        with four options.

    Returns:
      "A".."D" or "".
    """
    check_compat(compat)
    s = response.strip()
    prefixes = _VIDEOMME_PREFIXES_ORIGINAL if compat == "original" else (
        _VIDEOMME_PREFIXES_CORRECTED)
    for prefix in prefixes:
        s = s.replace(prefix, "")
    if compat == "corrected":
        return parse_choice_letter(s, 4) or ""
    if len(s.split()) > 10 and not re.search("[ABCD]", s):
        return ""
    match = re.search(r"[ABCD]", s)
    return "" if match is None else match[0]


def _videomme_questions(predictions, ground_truth, answer_key, response_key):
    """Flattens results into one record per question: (duration, category, sub, task, gt, resp)."""
    if isinstance(predictions, Mapping):  # {question_id: response}
        if ground_truth is None:
            raise ValueError("predictions given as {question_id: response} need ground_truth")
        responses = dict(predictions)
    else:
        responses = {}
        for video in predictions:
            if video.get("missing"):
                continue
            for q in video["questions"]:
                responses[q["question_id"]] = q[response_key]
    source = predictions if ground_truth is None else ground_truth
    records = []
    for entry in source:
        if "questions" in entry:  # eval_your_results.py / output_test_template.json layout
            meta = (entry["duration_category"], entry["video_category"],
                    entry["video_subcategory"], entry["video_id"])
            questions = entry["questions"]
        else:  # one row of the lmms-lab/Video-MME parquet
            meta = (entry["duration"], entry["domain"], entry["sub_category"],
                    entry.get("video_id", entry.get("videoID")))
            questions = [entry]
        for q in questions:
            qid = q["question_id"]
            if qid not in responses:
                if ground_truth is None:
                    continue
                raise ValueError(f"no response for Video-MME question {qid!r}")
            records.append((qid, *meta, q["task_type"], q[answer_key], responses.pop(qid)))
    if ground_truth is not None and responses:
        raise ValueError(f"responses without a Video-MME question: {sorted(responses)[:5]}")
    return records


def evaluate_videomme(predictions: Sequence[Mapping[str, Any]] | Mapping[str, str],
                      ground_truth: Sequence[Mapping[str, Any]] | None = None, *,
                      compat: str = "corrected",
                      durations: Sequence[str] | None = None,
                      answer_key: str = "answer", response_key: str = "response"
                      ) -> dict[str, Any]:
    """Video-MME multiple-choice accuracy per duration, task type, video category and overall.

    Follows `eval_your_results.py` of BradyFU/Video-MME; unlike it, it does not assert 300 videos
    per duration (subsets are allowed) and skips videos marked `"missing": true`.

    Args:
      predictions: the results file of eval_your_results.py, a list of videos `{video_id,
        duration_category, video_category, video_subcategory, questions: [{question_id,
        task_type, question, choices, answer, response}]}`; or `{question_id: response}` when
        `ground_truth` is given.
      ground_truth: None (answers and categories are read from `predictions`, as the official
        script does), a list of videos in the layout above, or the rows of the lmms-lab Video-MME
        parquet `{video_id, duration, domain, sub_category, question_id, task_type, question,
        options, answer}`.
      compat: "original": the official letter extraction, accuracy = correct / answered
        (unparseable responses dropped), every official category printed (0 when empty);
        "corrected": see the module docstring.
      durations: the duration types to score (default: those present, in Video-MME's order).
      answer_key / response_key: question fields of the answer and the response.

    Returns:
      `{"scores": {"overall", "duration/<d>", "task/<t>",
        "category/<c>", "sub_category/<s>"} (accuracy x100), "per_item": {question_id:
        {duration, category, sub_category, task_type, answer, response, pred, correct}},
        "counts": {score key: [correct, denominator]}}`. Per-duration task/category scores are
        under "duration/<d>/task/<t>" etc.

    Raises:
      ValueError: unknown compat, or responses and questions that do not match.
    """
    check_compat(compat)
    records = _videomme_questions(predictions, ground_truth, answer_key, response_key)
    if durations is None:
        present = {r[1] for r in records}
        durations = [d for d in VIDEOMME_DURATIONS if d in present]
        durations += sorted(present - set(VIDEOMME_DURATIONS))
    counts: dict[str, list[int]] = {}
    per_item = {}

    def add(key, correct, answered):
        c = counts.setdefault(key, [0, 0])
        c[0] += int(correct)
        c[1] += int(answered)

    if compat == "original":  # every listed category is printed, 0 when none was answered
        for d in durations:
            for name, group in (("category", VIDEOMME_CATEGORIES),
                                ("sub_category", VIDEOMME_SUB_CATEGORIES),
                                ("task", VIDEOMME_TASK_TYPES)):
                for g in group:
                    add(f"{name}/{g}", 0, 0)
                    add(f"duration/{d}/{name}/{g}", 0, 0)
    for qid, duration, category, sub, _, task, gt, response in records:
        if duration not in durations:
            continue
        pred = extract_videomme_answer(response, compat=compat)
        correct = pred != "" and pred == gt
        answered = pred != "" if compat == "original" else True
        per_item[qid] = {"duration": duration, "category": category, "sub_category": sub,
                         "task_type": task, "answer": gt, "response": response, "pred": pred,
                         "correct": correct}
        if not answered:
            continue
        for prefix in ("", f"duration/{duration}/"):
            add(f"{prefix}category/{category}", correct, 1)
            add(f"{prefix}sub_category/{sub}", correct, 1)
            add(f"{prefix}task/{task}", correct, 1)
        add("overall", correct, 1)
        add(f"duration/{duration}", correct, 1)
    for d in durations:
        counts.setdefault(f"duration/{d}", [0, 0])
    counts.setdefault("overall", [0, 0])

    scores = {}
    for key in sorted(counts, key=_videomme_key_order(durations)):
        c, n = counts[key]
        scores[key] = 100 * c / n if n > 0 else 0.0
    return {"scores": scores, "per_item": per_item, "counts": counts}


def _videomme_key_order(durations):
    ranks = {"category": VIDEOMME_CATEGORIES, "sub_category": VIDEOMME_SUB_CATEGORIES,
             "task": VIDEOMME_TASK_TYPES}

    def rank(key: str):
        parts = key.split("/")
        d = 0
        if parts[0] == "duration":
            d = 1 + list(durations).index(parts[1]) if parts[1] in durations else 99
            parts = parts[2:] or ["overall"]
        if parts == ["overall"]:
            return (d, 0, 0, "")
        group = ranks[parts[0]]
        idx = group.index(parts[1]) if parts[1] in group else len(group)
        return (d, 1 + list(ranks).index(parts[0]), idx, parts[1])

    return rank
