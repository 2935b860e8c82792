"""Chat templates (data) and conversation tokenization with an assistant-only loss mask.

Conversations use the LLaVA annotation format, a list of turns
`{"from": "human" | "gpt", "value": str}` starting with "human" and alternating. The first human
turn holds the video tag `<video>` (or `<image>`), which becomes `num_video_tokens` copies of
`VIDEO_TOKEN_INDEX` in `input_ids`; the model splices its video embeddings there.

Tokenization is piecewise (each template string and each message is encoded on its own and the
ids concatenated), as in TDC's `preprocess_qwen` (tdc/mm_datautils.py), so mask boundaries fall
exactly between pieces.
"""

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

VIDEO_TOKEN_INDEX = -200  # placeholder id in input_ids (the originals' IMAGE_TOKEN_INDEX)
VIDEO_TAGS = ("<video>", "<image>")
_TAG_RE = re.compile("|".join(re.escape(t) for t in VIDEO_TAGS))


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """A chat format as data: the literal strings around each role's message.

    A conversation renders as
    `system_prefix + system + system_suffix` (skipped when the system text is empty), then per
    exchange `user_prefix + question + user_suffix + assistant_prefix + answer +
    assistant_suffix + turn_separator`. The loss covers `answer + assistant_suffix`.

    Attributes:
        name: the template's key in `TEMPLATES`.
        system_prefix: text before the system message.
        system_suffix: text after the system message.
        user_prefix: text before each human message (the role header).
        user_suffix: text after each human message.
        assistant_prefix: text before each answer (the role header; not learned).
        assistant_suffix: text closing each answer (learned, e.g. the end-of-turn token).
        turn_separator: text after `assistant_suffix` (not learned).
        video_separator: text put after the video placeholders when the first human turn has no
            video tag and the video is inserted at its start.
    """

    name: str
    system_prefix: str
    system_suffix: str
    user_prefix: str
    user_suffix: str
    assistant_prefix: str
    assistant_suffix: str
    turn_separator: str
    video_separator: str = "\n"


# ChatML as in TDC's conv_qwen / preprocess_qwen (Qwen2-Instruct's format).
CHATML = ChatTemplate(
    name="chatml",
    system_prefix="<|im_start|>system\n",
    system_suffix="<|im_end|>\n",
    user_prefix="<|im_start|>user\n",
    user_suffix="<|im_end|>\n",
    assistant_prefix="<|im_start|>assistant\n",
    assistant_suffix="<|im_end|>",
    turn_separator="\n",
)

TEMPLATES: dict[str, ChatTemplate] = {CHATML.name: CHATML}

_ROLES = ("human", "gpt")


def validate_conversation(conversations: Any, *, allow_open_end: bool = False) -> None:
    """Checks the LLaVA conversation structure.

    Args:
        conversations: the record's "conversations" value.
        allow_open_end: accept a final human turn without an answer (for generation).

    Raises:
        ValueError: naming the problem: not a non-empty list, a turn that is not a dict with
            string "from" and "value", roles not alternating human/gpt from a human turn, a
            missing final answer, or a video tag outside the first human turn or repeated.
    """
    if not isinstance(conversations, Sequence) or isinstance(conversations, str):
        raise ValueError(f"conversations must be a list, got {type(conversations).__name__}")
    if not conversations:
        raise ValueError("conversations is empty")
    for i, turn in enumerate(conversations):
        if not isinstance(turn, Mapping):
            raise ValueError(f"turn {i} is a {type(turn).__name__}, not a dict")
        for key in ("from", "value"):
            if key not in turn:
                raise ValueError(f"turn {i} has no {key!r} key")
            if not isinstance(turn[key], str):
                raise ValueError(f"turn {i} {key!r} is {type(turn[key]).__name__}, not str")
        want = _ROLES[i % 2]
        if turn["from"] != want:
            raise ValueError(
                f"turn {i} is from {turn['from']!r}, expected {want!r} (turns must alternate "
                "human/gpt starting with human)"
            )
        n_tags = len(_TAG_RE.findall(turn["value"]))
        if i == 0 and n_tags > 1:
            raise ValueError(f"turn 0 has {n_tags} video tags, at most one is allowed")
        if i > 0 and n_tags:
            raise ValueError(f"turn {i} has a video tag; only the first human turn may")
    if conversations[-1]["from"] != "gpt" and not allow_open_end:
        raise ValueError("conversation ends with a human turn (no answer to learn)")


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False)) if text else []


def tokenize_conversation(
    conversations: Sequence[Mapping[str, str]],
    tokenizer,
    *,
    template: str | ChatTemplate = "chatml",
    system: str = "You are a helpful assistant.",
    num_video_tokens: int,
    add_generation_prompt: bool = False,
) -> dict[str, np.ndarray]:
    """Renders and tokenizes a conversation with its video placeholders and loss mask.

    ChatML gives `<|im_start|>system\\n{system}<|im_end|>\\n` then per exchange
    `<|im_start|>user\\n{q}<|im_end|>\\n<|im_start|>assistant\\n{a}<|im_end|>\\n`
    (TDC conv_qwen / preprocess_qwen). The tag `<video>` or `<image>` in the first human turn
    becomes `num_video_tokens` copies of `VIDEO_TOKEN_INDEX`; without a tag, the placeholders
    and `template.video_separator` ("\\n") go at the start of the first human turn, as LLaVA
    data write "<video>\\n{q}".

    Args:
        conversations: LLaVA turns `{"from": "human"|"gpt", "value": str}`, alternating from
            "human"; multi-turn allowed.
        tokenizer: a `transformers` tokenizer that knows the template's special tokens.
        template: a `TEMPLATES` key or a `ChatTemplate`.
        system: the system message ("" for none).
        num_video_tokens: placeholders for the video (0: a text-only conversation).
        add_generation_prompt: allow a final human turn and append the assistant header (for
            generation); its answer is then absent from the ids.

    Returns:
        dict with `input_ids` int32[T] (placeholders = VIDEO_TOKEN_INDEX) and `loss_mask`
        bool[T], True exactly on answer tokens and each answer's closing `assistant_suffix`
        tokens (`<|im_end|>`), False on the system and user turns, role headers, separators
        and placeholders.

    Raises:
        ValueError: malformed conversation (see `validate_conversation`), unknown template, or a
            negative `num_video_tokens`.
    """
    if isinstance(template, str):
        if template not in TEMPLATES:
            raise ValueError(f"unknown chat template {template!r}; known: {sorted(TEMPLATES)}")
        template = TEMPLATES[template]
    if num_video_tokens < 0:
        raise ValueError(f"num_video_tokens must be >= 0, got {num_video_tokens}")
    validate_conversation(conversations, allow_open_end=add_generation_prompt)

    ids: list[int] = []
    mask: list[bool] = []

    def add(piece: list[int], learned: bool) -> None:
        ids.extend(piece)
        mask.extend([learned] * len(piece))

    if system:
        add(_encode(tokenizer, template.system_prefix + system + template.system_suffix), False)
    for i, turn in enumerate(conversations):
        text = turn["value"]
        if turn["from"] == "human":
            add(_encode(tokenizer, template.user_prefix), False)
            if i == 0:
                parts = _TAG_RE.split(text, maxsplit=1)
                if len(parts) == 1:  # no tag: the video opens the turn
                    parts = ["", template.video_separator + text]
                add(_encode(tokenizer, parts[0]), False)
                add([VIDEO_TOKEN_INDEX] * num_video_tokens, False)
                add(_encode(tokenizer, parts[1]), False)
            else:
                add(_encode(tokenizer, text), False)
            add(_encode(tokenizer, template.user_suffix), False)
            add(_encode(tokenizer, template.assistant_prefix), False)
        else:
            add(_encode(tokenizer, text + template.assistant_suffix), True)
            add(_encode(tokenizer, template.turn_separator), False)
    return {
        "input_ids": np.asarray(ids, dtype=np.int32),
        "loss_mask": np.asarray(mask, dtype=bool),
    }


def question_text(conversations: Sequence[Mapping[str, str]]) -> str:
    """The first human turn without its video tag, stripped (the Q-Former's text input).

    Raises:
        ValueError: no first human turn.
    """
    if not conversations or not isinstance(conversations[0], Mapping):
        raise ValueError("conversation has no first turn")
    first = conversations[0]
    if first.get("from") != "human" or not isinstance(first.get("value"), str):
        raise ValueError("the first turn is not a human turn with a string value")
    return _TAG_RE.sub("", first["value"]).strip()
