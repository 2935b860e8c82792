"""MMDuet's streaming reply rule and the MAGQA in-span score.

Sources (facts only, no code copied), yellow-binary-tree/MMDuet @ 33be138:
  * `test/inference.py`: `LiveInferForBenchmark.set_fps`, `reset`, `inference` (which frames
    trigger a reply, when user queries are encoded) and `round_numbers` (the saved debug data).
    Fixture: `shared/fixtures/metrics/mmduet_stream_rule` (README section 8).
  * `test/evaluate.py`, `--func magqa`: offline-baseline reformatting, judge-call selection,
    `LlamaServerEvaluator` / `CorrectnessEvaluator` score reading; `test/analyze_magqa_results.py`:
    in-span score, turn counts, padding. Fixture: `shared/fixtures/metrics/mmduet_magqa`
    (README section 7).

The LLM judge is a plain callable `judge(question, gold_answer, pred_answer) -> str | int`;
nothing here calls a network. `RecordedJudge` replays recorded judge outputs.

Every function whose original has a documented bug takes `compat="corrected"` (default) or
`compat="original"`. The corrected behaviours:

  Streaming rule (README section 8):
  * Times. The original accumulates `video_time += 1 / fps`, so at 0.3 fps the reply times drift
    from `i / fps` (26.666666666666664 against 26.666666666666668); corrected: the time of frame i
    is `i / fps`, the time the frame queue gives it.
  * Queries. The original encodes at most one query per frame step ("Two queries at 3.3 s at
    2 fps are encoded before frames 7 and 8"); corrected: every query that is due is encoded
    before the frame.
  MAGQA (README section 7):
  * Judge text. `LlamaServerEvaluator` reads the last character ("4." -> 1) and
    `CorrectnessEvaluator` the first ("Score: 4" -> 1); corrected: the first stand-alone digit
    1-5 anywhere in the text (1 when there is none).
  * Padding. `analyze_magqa_results.py` pads the per-example lists with 1 (turns with 0) up to
    `--num_examples`, default 2000 whatever the gold file holds ("With 15 examples the printed
    score is therefore 1.02"); corrected: the default is the number of gold examples, so an
    example without replies counts 1 and nothing else is added.
  * An example with no gold answer is dropped from the in-span list but kept in the turn lists
    (`if not example_acc_score_list: ... append(1)` appends to the wrong list); corrected: its
    in-span score is 1.
"""

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from longvid_jax.metrics.common import check_compat

HEAD_NAMES = ("informative_score", "relevance_score")  # the order inference() sums them in
MAGQA_NUM_EXAMPLES = 2000  # analyze_magqa_results.py --num_examples default

Judge = Callable[[str, str, str], "str | int | float"]


# ----------------------------------------------------------------------------------------------
# Streaming reply rule (test/inference.py LiveInferForBenchmark.inference)
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StreamRuleConfig:
    """When MMDuet replies while it watches a stream.

    Attributes:
      stream_end_prob_threshold: reply when the frame score is > this (None: rule off).
      stream_end_score_sum_threshold: add each frame score to a running sum; reply when the sum
        is > this and reset the sum to 0 (None: rule off). Checked before the probability rule;
        either rule can trigger the reply.
      score_heads: heads whose P(class 1) makes the frame score, from HEAD_NAMES (the original
        takes a comma-separated string and tests substrings; for these names that is the same).
      running_list_length: frames kept in the running score list (only logged).
    """

    stream_end_prob_threshold: float | None = None
    stream_end_score_sum_threshold: float | None = None
    score_heads: tuple[str, ...] = ("informative_score",)
    running_list_length: int = 20

    def __post_init__(self):
        heads = self.score_heads
        if isinstance(heads, str):
            heads = tuple(h.strip() for h in heads.split(",") if h.strip())
            object.__setattr__(self, "score_heads", heads)
        unknown = sorted(set(heads) - set(HEAD_NAMES))
        if unknown:
            raise ValueError(f"unknown score heads {unknown}; known: {HEAD_NAMES}")


# The benchmark settings of MMDuet's scripts/inference/*.sh (README section 8).
VARIANTS: dict[str, dict[str, Any]] = {
    "magqa": dict(stream_end_prob_threshold=0.5,
                  score_heads=("informative_score", "relevance_score")),  # 2 fps
    "youcook2": dict(stream_end_score_sum_threshold=2.0),  # 0.5 fps
    "grounding": dict(stream_end_prob_threshold=1.0),  # never triggers; logs relevance only
}


def make_config(variant: str | None = None, **overrides: Any) -> StreamRuleConfig:
    """Builds a `StreamRuleConfig` from a named variant plus field overrides.

    Raises:
      ValueError: an unknown variant, field or head name.
    """
    # Imported here so that scoring never imports JAX (models.vit does); the helper is the
    # project's one variant-plus-overrides rule.
    from longvid_jax.variants import config_from_variant

    return config_from_variant(StreamRuleConfig, VARIANTS, variant, overrides)


def from_dict(d: Mapping[str, Any]) -> StreamRuleConfig:
    """`make_config` from a dict / ConfigDict that may hold a `variant` key."""
    d = dict(d)
    return make_config(d.pop("variant", None), **d)


@dataclasses.dataclass(frozen=True)
class StreamStep:
    """What the rule decided for one encoded frame.

    Attributes:
      frame_index: index of the frame just encoded.
      time: its time in seconds (the reply time if `respond`).
      score: the frame score (sum of the chosen heads' P(1)).
      score_sum: the running sum after this frame (0 right after a sum-rule reply).
      respond: whether the model replies after this frame.
    """

    frame_index: int
    time: float
    score: float
    score_sum: float
    respond: bool


class StreamReplyRule:
    """The per-video state of MMDuet's reply rule, one `step` per encoded frame.

    The caller encodes the due queries (`due`), then the frame, then calls `step` with the
    frame's head probabilities, and generates a reply when the step says so.

    Args:
      config: thresholds and heads.
      fps: frame rate of the stream (frames per second).
      compat: "original" accumulates the time and lets one query in per frame; "corrected"
        (see the module docstring).

    Raises:
      ValueError: fps <= 0 or unknown compat.
    """

    def __init__(self, config: StreamRuleConfig, fps: float, *, compat: str = "corrected"):
        check_compat(compat)
        if not fps > 0:
            raise ValueError(f"fps must be > 0, got {fps}")
        self.config, self.fps, self.compat = config, fps, compat
        self.reset()

    def reset(self) -> None:
        """Starts a new video (`LiveInferForBenchmark.reset`)."""
        self.frame_index = 0
        self._acc_time: float = 0  # the original's video_time, an int 0 before the first frame
        self.score_sum: float = 0
        self.score_list: list[float] = []

    @property
    def video_time(self) -> float:
        """Time (s) of the next frame to encode."""
        if self.compat == "original":
            return self._acc_time
        return self.frame_index / self.fps

    def due(self, query_times: Sequence[float]) -> int:
        """How many of the pending queries (times, in queue order) to encode before the next
        frame: the original takes at most the head of the queue, corrected every due one."""
        n = 0
        for t in query_times:
            if self.video_time >= t:
                n += 1
                if self.compat == "original":
                    break
            else:
                break
        return n

    def step(self, head_probs: Mapping[str, float]) -> StreamStep:
        """Scores the frame just encoded and decides whether to reply.

        Args:
          head_probs: `{"informative_score": P(1), "relevance_score": P(1)}` of the frame (the
            softmax of each head at the frame's last token, as Python floats).

        Returns:
          The decision; the rule then moves to the next frame.
        """
        cfg = self.config
        score = sum([head_probs[k] for k in HEAD_NAMES if k in head_probs and k in cfg.score_heads])
        self.score_list.append(score)
        self.score_sum += score
        if cfg.running_list_length > 0:
            self.score_list = self.score_list[-cfg.running_list_length:]
        respond = False
        if (cfg.stream_end_score_sum_threshold is not None
                and self.score_sum > cfg.stream_end_score_sum_threshold):
            respond = True
            self.score_sum = 0
        if cfg.stream_end_prob_threshold is not None and score > cfg.stream_end_prob_threshold:
            respond = True
        out = StreamStep(self.frame_index, self.video_time, score, self.score_sum, respond)
        self.frame_index += 1
        self._acc_time += 1 / self.fps
        return out


def run_stream(head_probs: Sequence[Mapping[str, float] | Sequence[float]],
               conversation: Sequence[Mapping[str, Any]], config: StreamRuleConfig, fps: float,
               *, respond: Callable[[int, float], str] | None = None,
               compat: str = "corrected") -> dict[str, Any]:
    """Runs the reply rule over a whole video (`LiveInferForBenchmark.inference`).

    Args:
      head_probs: per frame, `{"informative_score": p, "relevance_score": p}` or the pair
        `[informative P(1), relevance P(1)]`.
      conversation: the turns of the example; user turns `{role: "user", content, time}` are
        the queries (in their order).
      config: the rule.
      fps: frame rate; frame i is at i / fps seconds.
      respond: `respond(frame_index, time) -> text` of a reply (default "reply after frame k").
      compat: "original" or "corrected" (module docstring).

    Returns:
      {"model_response_list": user turns and replies `{time, content, role}` sorted by time
       (stable; a query after the last frame is listed though never encoded),
       "reply_frame_indices": [int], "reply_times": [float],
       "events": `{"event": "query_encoded", frame_index (next frame), video_time, query_time,
       query}` and `{"event": "response", frame_index, video_time, stream_end_score_sum_after}`,
       "stream_end_score_per_frame": [float], "debug_data": [{time, informative_score,
       relevance_score}] (as saved before rounding), "final_video_time",
       "final_stream_end_score_sum", "stream_end_prob_list" (the last `running_list_length`)}.
    """
    respond = respond or (lambda k, t: f"reply after frame {k}")
    rule = StreamReplyRule(config, fps, compat=compat)
    queries = [(t["time"], t["content"]) for t in conversation if t["role"] == "user"]
    responses = [{"time": t, "content": q, "role": "user"} for t, q in queries]
    pending = list(queries)
    events, replies, debug, per_frame = [], [], [], []
    for probs in head_probs:
        if not isinstance(probs, Mapping):
            probs = dict(zip(HEAD_NAMES, probs))
        for _ in range(rule.due([t for t, _ in pending])):
            q_time, q = pending.pop(0)
            events.append({"event": "query_encoded", "frame_index": rule.frame_index,
                           "video_time": rule.video_time, "query_time": q_time, "query": q})
        debug.append(dict(time=rule.video_time, **probs))
        step = rule.step(probs)
        per_frame.append(step.score)
        if step.respond:
            responses.append({"time": step.time, "content": respond(step.frame_index, step.time),
                              "role": "assistant"})
            replies.append(step)
            events.append({"event": "response", "frame_index": step.frame_index,
                           "video_time": step.time, "stream_end_score_sum_after": step.score_sum})
    return {
        "model_response_list": sorted(responses, key=lambda x: x["time"]),
        "reply_frame_indices": [s.frame_index for s in replies],
        "reply_times": [s.time for s in replies],
        "events": events,
        "stream_end_score_per_frame": per_frame,
        "debug_data": debug,
        "final_video_time": rule.video_time,
        "final_stream_end_score_sum": rule.score_sum,
        "stream_end_prob_list": list(rule.score_list),
    }


def round_numbers(data: Any, n: int) -> Any:
    """Rounds every float in nested lists / dicts to n decimals (`round_numbers` of inference.py,
    applied with n=3 to the saved debug data)."""
    if isinstance(data, list):
        return [round_numbers(d, n) for d in data]
    if isinstance(data, dict):
        return {k: round_numbers(v, n) for k, v in data.items()}
    if isinstance(data, float):
        return round(data, n)
    return data


# ----------------------------------------------------------------------------------------------
# MAGQA (test/evaluate.py --func magqa, test/analyze_magqa_results.py)
# ----------------------------------------------------------------------------------------------


class RecordedJudge:
    """A judge that answers from a table of recorded outputs.

    Args:
      table: rows `{question, gold_answer, pred_answer, judge_text}`.

    Calling it with a (question, gold, pred) not in the table raises KeyError.
    """

    def __init__(self, table: Sequence[Mapping[str, Any]]):
        self.table = {(r["question"], r["gold_answer"], r["pred_answer"]): r["judge_text"]
                      for r in table}

    def __call__(self, question: str, gold_answer: str, pred_answer: str) -> str:
        try:
            return self.table[(question, gold_answer, pred_answer)]
        except KeyError:
            raise KeyError(f"no recorded judge output for {(question, gold_answer, pred_answer)}")


def parse_judge_score(text: str | int | float, *, reader: str = "last",
                      compat: str = "corrected") -> int | float:
    """The 1-5 correctness score in a judge's reply.

    Args:
      text: the judge's text (a number is returned unchanged).
      reader: original mode only: "last" reads the last character (`LlamaServerEvaluator`, the
        server the MAGQA script uses), "first" the first (`CorrectnessEvaluator`, the local HF
        model, and analyze_magqa_results.py's `text_score_to_int`). A character that is not
        1-5 gives 1.
      compat: "original", or "corrected": the first digit 1-5 standing alone (not part of a
        longer number) anywhere in the text; 1 when there is none. "4." -> 4, "Score: 4" -> 4.

    Returns:
      An int in 1..5 (or the number given).

    Raises:
      ValueError: unknown compat or reader; an empty text in original mode (the original
        indexes it and fails).
    """
    check_compat(compat)
    if reader not in ("last", "first"):
        raise ValueError(f"reader must be 'last' or 'first', got {reader!r}")
    if not isinstance(text, str):
        return text
    if compat == "corrected":
        match = re.search(r"(?<![0-9.])([1-5])(?![0-9]|\.[0-9])", text)
        return int(match.group(1)) if match else 1
    if not text:
        raise ValueError("empty judge text (the original fails on text[0] / text[-1])")
    char = text[-1] if reader == "last" else text[0]
    return int(char) if char in "12345" else 1


def offline_response_to_turns(model_response: str | Sequence[str],
                              video_duration: float) -> list[dict[str, Any]]:
    """Turns an offline model's grounded answer into timed reply turns (`--is_online_model 0`).

    VTimeLLM lines "From a to b, text" (a, b in percent of the duration) reply at
    (a/100 * L + b/100 * L) / 2; TimeChat lines "x.x - y.y seconds, text" at (x + y) / 2; all
    VTimeLLM turns come first. Text in neither format is one turn at time -1, which pairs with
    every gold span. Only the first string of a list is read.

    Args:
      model_response: the answer (or a list whose first element is the answer).
      video_duration: L, seconds.

    Returns:
      `[{time, content, role: "assistant"}]`.
    """
    text = model_response if isinstance(model_response, str) else model_response[0]
    turns = []
    for a, b, caption in re.findall(r"From (\d+) to (\d+), (.*)", text):
        t = (int(a) / 100 * video_duration + int(b) / 100 * video_duration) / 2
        turns.append({"time": t, "content": caption, "role": "assistant"})
    for a, b, caption in re.findall(r"(\d+\.\d+) - (\d+\.\d+)\s*seconds,\s*(.*)", text):
        turns.append({"time": (float(a) + float(b)) / 2, "content": caption,
                      "role": "assistant"})
    if not turns:
        turns.append({"time": -1, "content": text, "role": "assistant"})
    return turns


def _text_groups(texts: Sequence[str]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for i, t in enumerate(texts):
        groups.setdefault(t, []).append(i)
    return groups


def magqa_score_matrix(question: str, gold_texts: Sequence[str],
                       gold_spans: Sequence[Sequence[float]], pred_texts: Sequence[str],
                       pred_times: Sequence[float], judge: Judge, *, reader: str = "last",
                       compat: str = "corrected"
                       ) -> tuple[np.ndarray, list[tuple[str, str, str]]]:
    """Judge scores of every (gold answer, reply turn) cell that the in-span score can read.

    A (gold text, reply text) pair is judged only if some time of that reply text lies in some
    span of that gold text (both ends inclusive; time -1 always qualifies); identical texts are
    judged once and the score is written to every matching (gold turn, reply turn) cell. All
    other cells are 1.

    Args:
      question: the user question (first turn of the gold conversation).
      gold_texts: the G gold answers; gold_spans: their [start, end] (s).
      pred_texts: the R reply texts; pred_times: their times (s, -1 = anywhere).
      judge: `judge(question, gold, pred) -> str | int`.
      reader, compat: how to read the judge's text (`parse_judge_score`).

    Returns:
      (float64[G, R] scores, the judge calls in order as (question, gold, pred)).
    """
    scores = np.ones((len(gold_texts), len(pred_texts)))
    calls = []
    for gold, g_ids in _text_groups(gold_texts).items():
        spans = [gold_spans[i] for i in g_ids]
        for pred, p_ids in _text_groups(pred_texts).items():
            times = [pred_times[i] for i in p_ids]
            if not any(t == -1 or s[0] <= t <= s[1] for s in spans for t in times):
                continue
            calls.append((question, gold, pred))
            score = parse_judge_score(judge(question, gold, pred), reader=reader, compat=compat)
            scores[np.ix_(g_ids, p_ids)] = score
    return scores, calls


def magqa_evaluate_lines(predictions: Sequence[Mapping[str, Any]],
                         ground_truth: Sequence[Mapping[str, Any]], judge: Judge, *,
                         is_online_model: bool = True, reader: str = "last",
                         compat: str = "corrected"
                         ) -> tuple[list[dict[str, Any]], list[tuple[str, str, str]]]:
    """The judged output lines of `test/evaluate.py --func magqa`.

    Args:
      predictions: online model: `{question_id, model_response_list: [{time, content, role}]}`
        (the inference output); offline baseline: `{question_id, model_response (str or
        [str]), video_duration}`.
      ground_truth: MAGQA gold `{question_id, conversation: [{role: user, content, time}],
        answer: [{time: [s, e], content, role}]}`.
      judge: see `magqa_score_matrix`.
      is_online_model: False reformats offline answers with `offline_response_to_turns`.
      reader, compat: `parse_judge_score`.

    Returns:
      (lines, judge calls): one line per prediction that has at least one assistant turn,
      `{question_id, model_response_list, evaluator_output: [[score] * R] * G, answer:
      [gold texts], answer_time: [[s, e]]}` (the original also copies the prediction's other
      fields, less `debug_data`), and every judge call in order.

    Raises:
      ValueError: a prediction whose question_id is not in the gold file.
    """
    gold = {g["question_id"]: g for g in ground_truth}
    lines, calls = [], []
    for example in predictions:
        qid = example["question_id"]
        if qid not in gold:
            raise ValueError(f"prediction {qid!r} has no gold example")
        if is_online_model:
            turns = list(example["model_response_list"])
        else:
            turns = offline_response_to_turns(example["model_response"],
                                              example["video_duration"])
        answers = [t for t in turns if t["role"] == "assistant"]
        if not answers:
            continue
        g = gold[qid]
        gold_texts = [a["content"] for a in g["answer"]]
        gold_spans = [a["time"] for a in g["answer"]]
        scores, c = magqa_score_matrix(
            g["conversation"][0]["content"], gold_texts, gold_spans,
            [a["content"] for a in answers], [a["time"] for a in answers], judge,
            reader=reader, compat=compat)
        calls += c
        lines.append({"question_id": qid, "model_response_list": turns,
                      "evaluator_output": scores.tolist(), "answer": gold_texts,
                      "answer_time": gold_spans})
    return lines, calls


def magqa_in_span_score(evaluator_output: Sequence[Sequence[float]],
                        answer_time: Sequence[Sequence[float]], reply_times: Sequence[float], *,
                        all_match: bool = True, compat: str = "corrected") -> float | None:
    """In-span score of one example: mean over gold answers of the mean in-span reply score.

    For each gold answer, the reply turns whose time lies in its span (inclusive; with
    `all_match`, time -1 too) are averaged; with none, the answer scores 1.

    Args:
      evaluator_output: [G][R] judge scores.
      answer_time: G spans [start, end] (s).
      reply_times: R reply times (s).
      all_match: `--baseline_all_match` (time -1 lies in every span).
      compat: with no gold answer, "original" returns None (the example is dropped from the
        in-span list), "corrected" 1.0.

    Returns:
      The score, in [1, 5], or None.
    """
    check_compat(compat)
    per_answer = []
    for row, span in zip(evaluator_output, answer_time):
        idx = [i for i, t in enumerate(reply_times)
               if span[0] <= t <= span[1] or (all_match and t == -1)]
        per_answer.append(np.mean([row[i] for i in idx]) if idx else 1)
    if not per_answer:
        return None if compat == "original" else 1.0
    return float(np.mean(per_answer))


def _max_score(evaluator_output: Sequence[Sequence[float]], compat: str) -> float:
    """Mean over gold answers of the best reply score (analyze_magqa_results.py
    `max_acc_score_list`, computed but not printed); no gold answer: nan (original), 1.0."""
    if not evaluator_output:
        return float("nan") if compat == "original" else 1.0
    return float(np.mean([max(row) for row in evaluator_output]))


def analyze_magqa(lines: Sequence[Mapping[str, Any]], *, num_examples: int = MAGQA_NUM_EXAMPLES,
                  pad_with_one: bool = True, baseline_all_match: bool = True,
                  compat: str = "corrected") -> dict[str, Any]:
    """Means over examples of the in-span score and the turn counts (analyze_magqa_results.py).

    Only the first `num_examples` lines are read. With `baseline_all_match` off, examples whose
    first turn has time -1 are skipped. With `pad_with_one`, the lists are padded up to
    `num_examples` (scores with 1, turn counts with 0).

    Args:
      lines: output of `magqa_evaluate_lines`.
      num_examples: `--num_examples` (the caller chooses the default; see
        `evaluate_mmduet_magqa`).
      pad_with_one: `--pad_with_one`.
      baseline_all_match: `--baseline_all_match`.
      compat: see `magqa_in_span_score`.

    Returns:
      {"in_span_score", "num_turns", "num_turns_dedup", "max_score": means (float);
       "in_span_scores", "max_scores", "num_turns_list", "num_turns_dedup_list": the per-example
       values after padding (lists); "question_ids": the examples scored, in the order of the
       lists (entries past their number are padding); "printed_line": the
       LaTeX row the script prints, "score & turns/turns_dedup & \\\\" rounded to 2 decimals}.
    """
    check_compat(compat)
    turns, dedup, max_scores, in_span, qids = [], [], [], [], []
    for example in list(lines)[:num_examples]:
        if not baseline_all_match and example["model_response_list"][0]["time"] == -1:
            continue
        replies = [t for t in example["model_response_list"] if t["role"] == "assistant"]
        texts = [t["content"] for t in replies]
        turns.append(len(texts))
        dedup.append(len(set(texts)))
        max_scores.append(_max_score(example["evaluator_output"], compat))
        score = magqa_in_span_score(example["evaluator_output"], example["answer_time"],
                                    [t["time"] for t in replies], all_match=baseline_all_match,
                                    compat=compat)
        qids.append(example["question_id"])
        if score is not None:
            in_span.append(score)
    if len(turns) < num_examples and pad_with_one:
        for lst, value in zip((in_span, turns, dedup, max_scores), (1, 0, 0, 1)):
            lst += [value] * (num_examples - len(lst))
    means = [np.mean(x) for x in (in_span, turns, dedup, max_scores)]
    printed = [np.round(m, 2) for m in means[:3]]
    return {
        "in_span_score": float(means[0]), "num_turns": float(means[1]),
        "num_turns_dedup": float(means[2]), "max_score": float(means[3]),
        "in_span_scores": in_span, "max_scores": max_scores, "num_turns_list": turns,
        "num_turns_dedup_list": dedup, "question_ids": qids,
        "printed_line": f"{printed[0]} & {printed[1]}/{printed[2]} & \\",
    }


def evaluate_mmduet_magqa(predictions: Sequence[Mapping[str, Any]],
                          ground_truth: Sequence[Mapping[str, Any]], *, judge: Judge,
                          compat: str = "corrected", is_online_model: bool = True,
                          reader: str = "last", num_examples: int | None = None,
                          pad_with_one: bool = True,
                          baseline_all_match: bool = True) -> dict[str, Any]:
    """MAGQA: judge the replies, then the in-span score and reply counts (MMDuet's scripts).

    Args:
      predictions: the inference output lines (see `magqa_evaluate_lines`).
      ground_truth: the MAGQA gold json (a list of examples).
      judge: `judge(question, gold_answer, pred_answer) -> str | int` (e.g. `RecordedJudge`,
        or a wrapper around a local LLM).
      compat: "original" or "corrected" (module docstring).
      is_online_model: False for offline baselines (TimeChat / VTimeLLM / plain text answers).
      reader: how the judge's text was read in original mode ("last": LlamaServerEvaluator).
      num_examples: `--num_examples`; None means 2000 (original) or the number of gold examples
        (corrected).
      pad_with_one: `--pad_with_one`.
      baseline_all_match: `--baseline_all_match`.

    Returns:
      {"scores": {"in_span_score", "num_turns", "num_turns_dedup", "max_score"},
       "per_item": {question_id: {in_span_score, max_score, num_turns, num_turns_dedup,
         evaluator_output, gt_spans ([s, e] of the gold answers), reply_times, reply_texts}},
       "evaluate_output_lines": the judged lines, "judge_calls": [(question, gold, pred)],
       "analysis": the full `analyze_magqa` result}.
    """
    check_compat(compat)
    lines, calls = magqa_evaluate_lines(predictions, ground_truth, judge,
                                        is_online_model=is_online_model, reader=reader,
                                        compat=compat)
    if num_examples is None:
        num_examples = MAGQA_NUM_EXAMPLES if compat == "original" else len(ground_truth)
    analysis = analyze_magqa(lines, num_examples=num_examples, pad_with_one=pad_with_one,
                             baseline_all_match=baseline_all_match, compat=compat)
    per_item = {}
    scored = set(analysis["question_ids"])
    for line in lines:
        replies = [t for t in line["model_response_list"] if t["role"] == "assistant"]
        texts = [t["content"] for t in replies]
        item = {
            "in_span_score": magqa_in_span_score(
                line["evaluator_output"], line["answer_time"], [t["time"] for t in replies],
                all_match=baseline_all_match, compat=compat),
            "max_score": _max_score(line["evaluator_output"], compat),
            "num_turns": len(texts), "num_turns_dedup": len(set(texts)),
            "evaluator_output": line["evaluator_output"], "gt_spans": line["answer_time"],
            "reply_times": [t["time"] for t in replies], "reply_texts": texts,
            "scored": line["question_id"] in scored,
        }
        per_item[line["question_id"]] = item
    scores = {k: analysis[k] for k in ("in_span_score", "num_turns", "num_turns_dedup",
                                       "max_score")}
    return {"scores": scores, "per_item": per_item, "evaluate_output_lines": lines,
            "judge_calls": calls, "analysis": analysis}
