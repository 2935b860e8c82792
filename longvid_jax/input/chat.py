"""Chat templates of the five systems (data) and conversation tokenization with a loss mask.

Templates (`TEMPLATES`, one frozen `ChatTemplate` each; the code below has no per-system branch):

| name | system | follows |
|---|---|---|
| chatml | TDC (Qwen2), TPO `qwen_1_5` | conv_qwen; loss on answer + `<|im_end|>` |
| chatml_tdc | TDC, exact loss | preprocess_qwen's mask (see "Loss rules") |
| llama2 | TimeChat (LLaMA-2-chat) | `[INST] <<SYS>>..<</SYS>>`, `<Video><ImageHere>xN</Video>` |
| vicuna_v1 | LongVALE (Vicuna v1.5) | `USER: .. ASSISTANT: ..</s>`, `sep=" "`, `sep2="</s>"` |
| mmduet | MMDuet duet | roles system/user/assistant/stream, `<image>` x49 per frame |

Conversations come in two formats:

* LLaVA: `[{"from": "human" | "gpt", "value": str}, ...]`, alternating from "human". The first
  human turn may hold one video tag `<video>` or `<image>`; every "gpt" turn is learned.
* Roles (MMDuet's format): `[{"role": "system" | "user" | "assistant" | "stream", ...}]` with
  "content" (str) for system/user/assistant, "num_frames" (int) for stream turns and an optional
  "learn" flag on assistant turns (default `template.learn_by_default`). A system turn may only
  come first and replaces the `system` argument. Extra keys (times, labels) are ignored.

The video is either a run of `VIDEO_TOKEN_INDEX` (-200, the originals' IMAGE_TOKEN_INDEX; chatml,
vicuna_v1) or a run of a placeholder token (`template.video_token`: TimeChat's `<ImageHere>`,
MMDuet's `<image>`). Either way `tokenize_conversation` writes `VIDEO_TOKEN_INDEX` at the video
positions by default, where the model splices its video embeddings (`placeholder="token"` keeps
the placeholder token's id instead, as the originals' input_ids have it).

Tokenization follows the originals: for `VIDEO_TOKEN_INDEX` templates the text between videos is
encoded chunk by chunk (LLaVA's `tokenizer_image_token`); for placeholder-token templates the
whole text, placeholders included, is encoded at once (TimeChat, MMDuet). Loss targets are found
from the tokenizer's character offsets: a token is a target when the character it ends on belongs
to a learned piece of text (a token that starts before the text it ends in takes that text's
flag; a zero-width token takes the flag of the character it stands at). Tokenizers must be fast
(`tokenizers`-backed, for the offsets), as `tokenizer.load_tokenizer` gives for "qwen2",
tokenizer.json folders and LLaMA tokenizer.model folders.

Loss rules (what is learned; all as next-token targets, placeholders never):

* chatml, mmduet: each learned answer and its closing `<|im_end|>` (MMDuet's `get_learn_ranges`,
  and our deliberate choice for chatml: TDC's `preprocess_qwen` also learns the assistant role
  header, the newline after `<|im_end|>` and every `\\n`/`<|im_start|>`/`<|im_end|>` token of the
  system and user turns, i.e. the constant format; `chatml_tdc` reproduces that exactly).
* llama2: `" {answer} </s>"` per round, as `preprocess_for_llama_v2`'s length arithmetic gives.
* vicuna_v1: `" {answer}</s>"` per round (`preprocess_v1`; the space merges into the answer's
  first token).

API: `render_conversation` (the prompt text), `tokenize_conversation` (ids and loss mask),
`add_template_tokens` with the `SPECIAL_TOKENS` registry, `stream_event_text` (MMDuet's online
inference rule), `validate_conversation`, `question_text`.

Letters: T tokens.
"""

import copy
import dataclasses
import re
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tokenizers

VIDEO_TOKEN_INDEX = -200  # placeholder id in input_ids (the originals' IMAGE_TOKEN_INDEX)
VIDEO_TAGS = ("<video>", "<image>")
_TAG_RE = re.compile("|".join(re.escape(t) for t in VIDEO_TAGS))

TDC_SYSTEM = "You are a helpful assistant."
TIMECHAT_SYSTEM = (  # evaluate.py; training used " " (video_instruct_dataset.py), pass system=" "
    "You are able to understand the visual content that the user provides. Follow the "
    "instructions carefully and explain your answers in detail."
)
VICUNA_SYSTEM = (  # longvalellm/conversation.py conv_vicuna_v1
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user's questions."
)
MMDUET_SYSTEM = (  # data/stream.py StreamMixIn and models/arguments_live.py LiveTestArguments
    "A multimodal AI assistant is helping users with some activities. Below is their "
    "conversation, interleaved with the list of video frames received by the assistant."
)


@dataclasses.dataclass(frozen=True)
class SpecialToken:
    """A placeholder or marker string that a template puts around the video.

    Attributes:
        text: the literal string.
        added: True when the original adds it to the tokenizer as one (special) token;
            False for literal markers that the original tokenizes as ordinary text.
        templates: the `TEMPLATES` keys that use it.
        note: what it is and where the original defines it.
    """

    text: str
    added: bool
    templates: tuple[str, ...]
    note: str


SPECIAL_TOKENS: dict[str, SpecialToken] = {
    t.text: t
    for t in (
        SpecialToken(
            "<image>", True, ("mmduet",),
            "MMDuet's per-frame placeholder (49 per frame), an additional special token "
            "(models/tokenization_live.py build_live_tokenizer_and_update_config). In LLaVA data "
            "(TDC, TPO) it is the video tag that becomes VIDEO_TOKEN_INDEX.",
        ),
        SpecialToken(
            "<ImageHere>", True, ("llama2",),
            "TimeChat's video placeholder, repeated once per video token; added with "
            "add_tokens(special_tokens=True) "
            "(timechat/datasets/datasets/video_instruct_dataset.py).",
        ),
        SpecialToken(
            "<Video>", False, ("llama2",),
            "TimeChat's video start marker: literal text around the placeholders, tokenized as "
            "ordinary text (never added to the vocabulary).",
        ),
        SpecialToken(
            "</Video>", False, ("llama2",),
            "TimeChat's video end marker: literal text, tokenized as ordinary text.",
        ),
        SpecialToken(
            "<video>", False, ("chatml", "chatml_tdc", "vicuna_v1"),
            "LLaVA/LongVALE video tag: split out before tokenization and replaced by "
            "VIDEO_TOKEN_INDEX (longvalellm/mm_utils.py tokenizer_image_token); never tokenized.",
        ),
    )
}


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """A chat format as data: the literal strings around each role and the video, and the loss rule.

    A conversation renders as: the system block `system_prefix + system + system_suffix` (omitted
    when the system text is empty unless `keep_empty_system`; placed at the start, or right after
    the first user prefix when `system_in_first_user`), then per turn

    * user: `user_prefix` (`first_user_prefix` for the first user turn) + text + `user_suffix`;
    * assistant: `assistant_prefix` + [`answer_prefix` + answer + `assistant_suffix`] +
      `turn_separator`, the bracket learned when the turn is learned;
    * stream: `stream_prefix` + placeholders + `stream_suffix` (nothing when it has no frames);

    and, for generation, `assistant_prefix`. The BOS token (not part of the text) comes first
    when `add_bos`.

    The video of a LLaVA-style conversation (templates without a stream role) is the block
    `video_prefix + placeholders + video_suffix` in the first user turn: in place of the video
    tag; a leading `"<tag>\\n"` and a missing tag both give `block + video_separator + text`.
    With `frame_times_format`, the frame times text follows the block (and separator).
    Templates with a stream role put a LLaVA-style video in a stream turn before the first user
    turn (the tag is removed and the text stripped).

    Attributes:
        name: the key in `TEMPLATES`.
        system_prefix: text before the system message.
        system_suffix: text after the system message.
        user_prefix: text before each user message (the role header).
        user_suffix: text after each user message.
        assistant_prefix: text before each answer (role header); also the generation prompt.
        assistant_suffix: text closing each answer (learned, e.g. `<|im_end|>`, `</s>`).
        turn_separator: text after `assistant_suffix` (not learned unless
            `learn_turn_separator`).
        video_separator: text between the video block and the question in the video-first form.
        default_system: system message used when the caller gives none.
        keep_empty_system: render the system block even for an empty system message.
        system_in_first_user: the system block goes inside the first user turn (LLaMA-2).
        first_user_prefix: `user_prefix` of the first user turn (None: the same).
        answer_prefix: learned text between `assistant_prefix` and the answer.
        add_bos: start the ids with the tokenizer's BOS token (LLaMA tokenizers).
        video_text: how a `VIDEO_TOKEN_INDEX` video shows in rendered text (once).
        video_token: the placeholder token repeated once per video token (None: the video is
            `VIDEO_TOKEN_INDEX`).
        video_prefix: literal text before the placeholders (TimeChat `<Video>`).
        video_suffix: literal text after the placeholders (TimeChat `</Video>`).
        frame_times_format: text after the video block given frame times, with `{num_frames}`
            and `{times}` fields ("" = never shown).
        frame_time_format: format of one time (seconds) in `{times}`, joined by ", ".
        stream_prefix: text opening a stream turn (None: the template has no stream role).
        stream_suffix: text closing a stream turn.
        tokens_per_frame: placeholders per frame of a stream turn.
        learn_by_default: whether a role-format assistant turn without "learn" is learned.
        learn_assistant_prefix: the role header of learned turns is learned too.
        learn_turn_separator: the separator after learned turns is learned too.
        always_learned: texts of single tokens learned wherever they occur (TDC's
            `unmask_tokens_idx`).
        added_tokens: tokens the original adds to its tokenizer (see `add_template_tokens`).
        source: the original code this template follows.
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
    default_system: str = ""
    keep_empty_system: bool = False
    system_in_first_user: bool = False
    first_user_prefix: str | None = None
    answer_prefix: str = ""
    add_bos: bool = False
    video_text: str = "<image>"
    video_token: str | None = None
    video_prefix: str = ""
    video_suffix: str = ""
    frame_times_format: str = ""
    frame_time_format: str = "{:.1f}"
    stream_prefix: str | None = None
    stream_suffix: str = ""
    tokens_per_frame: int = 0
    learn_by_default: bool = True
    learn_assistant_prefix: bool = False
    learn_turn_separator: bool = False
    always_learned: tuple[str, ...] = ()
    added_tokens: tuple[str, ...] = ()
    source: str = ""


# ChatML as in TDC's conv_qwen / preprocess_qwen and TPO's conv_qwen ("qwen_1_5"): Qwen2-Instruct.
CHATML = ChatTemplate(
    name="chatml",
    system_prefix="<|im_start|>system\n",
    system_suffix="<|im_end|>\n",
    user_prefix="<|im_start|>user\n",
    user_suffix="<|im_end|>\n",
    assistant_prefix="<|im_start|>assistant\n",
    assistant_suffix="<|im_end|>",
    turn_separator="\n",
    video_separator="\n",
    default_system=TDC_SYSTEM,
    video_text="<image>",
    source="TDC tdc/conversation.py conv_qwen, tdc/mm_datautils.py preprocess_qwen; "
    "TPO LLaVA/llava/conversation.py conv_qwen",
)

# TDC's exact loss mask: preprocess_qwen learns whole assistant turns and unmasks the token ids
# [198 ("\n"), <|im_start|>, <|im_end|>] everywhere; the system turn is always present.
CHATML_TDC = dataclasses.replace(
    CHATML,
    name="chatml_tdc",
    keep_empty_system=True,
    learn_assistant_prefix=True,
    learn_turn_separator=True,
    always_learned=("\n", "<|im_start|>", "<|im_end|>"),
    source="TDC tdc/mm_datautils.py preprocess_qwen (unmask_tokens_idx)",
)

# TimeChat: LLaMA-2 chat as built by conv_llava_llama_2.get_prompt and preprocess_for_llama_v2.
LLAMA2 = ChatTemplate(
    name="llama2",
    system_prefix="<<SYS>>\n",
    system_suffix="\n<</SYS>>\n\n",
    user_prefix="<s>[INST] ",
    user_suffix=" [/INST]",
    assistant_prefix="",
    assistant_suffix=" </s>",
    turn_separator="",
    video_separator=" ",
    default_system=TIMECHAT_SYSTEM,
    keep_empty_system=True,
    system_in_first_user=True,
    first_user_prefix="[INST] ",
    answer_prefix=" ",
    add_bos=True,
    video_token="<ImageHere>",
    video_prefix="<Video>",
    video_suffix="</Video>",
    frame_times_format="The video contains {num_frames} frames sampled at {times} seconds. ",
    frame_time_format="{:.1f}",
    added_tokens=("<ImageHere>",),
    source="TimeChat timechat/conversation/conversation_video.py (LLAMA_2), "
    "timechat/datasets/datasets/video_instruct_dataset.py preprocess_multimodal, "
    "preprocess_for_llama_v2; timechat/processors/video_processor.py load_video (msg)",
)

# LongVALE: Vicuna v1 (SeparatorStyle.TWO, sep=" ", sep2="</s>") with LLaVA's tokenizer_image_token.
VICUNA_V1 = ChatTemplate(
    name="vicuna_v1",
    system_prefix="",
    system_suffix=" ",
    user_prefix="USER: ",
    user_suffix=" ",
    assistant_prefix="ASSISTANT:",
    assistant_suffix="</s>",
    turn_separator="",
    video_separator="\n",
    default_system=VICUNA_SYSTEM,
    keep_empty_system=True,
    answer_prefix=" ",
    add_bos=True,
    video_text="<video>",
    source="LongVALE longvalellm/conversation.py conv_vicuna_v1, "
    "longvalellm/train/dataset.py preprocess_v1, longvalellm/mm_utils.py tokenizer_image_token",
)

# MMDuet: the duet chat template of models/tokenization_live.py (chat_template_llava).
MMDUET = ChatTemplate(
    name="mmduet",
    system_prefix="<|im_start|>system\n",
    system_suffix="<|im_end|>",
    user_prefix="\n<|im_start|>user\n",
    user_suffix="<|im_end|>",
    assistant_prefix="\n<|im_start|>assistant\n",
    assistant_suffix="<|im_end|>",
    turn_separator="",
    default_system=MMDUET_SYSTEM,
    keep_empty_system=True,
    video_token="<image>",
    stream_prefix="\n<|im_start|>stream\n",
    stream_suffix="<|im_end|>",
    tokens_per_frame=49,
    learn_by_default=False,
    added_tokens=("<image>",),
    source="MMDuet models/tokenization_live.py chat_template_llava, get_learn_ranges; "
    "data/data_collator.py; test/inference.py LiveInferForBenchmark",
)

TEMPLATES: dict[str, ChatTemplate] = {
    t.name: t for t in (CHATML, CHATML_TDC, LLAMA2, VICUNA_V1, MMDUET)
}

_ROLES = ("human", "gpt")
_MESSAGE_ROLES = ("system", "user", "assistant", "stream")


def get_template(template: str | ChatTemplate) -> ChatTemplate:
    """The `ChatTemplate` for a `TEMPLATES` key (a `ChatTemplate` is returned as is).

    Raises:
        ValueError: unknown template name.
    """
    if isinstance(template, ChatTemplate):
        return template
    if template not in TEMPLATES:
        raise ValueError(f"unknown chat template {template!r}; known: {sorted(TEMPLATES)}")
    return TEMPLATES[template]


def _is_role_format(conversations: Any) -> bool:
    return (
        isinstance(conversations, Sequence)
        and not isinstance(conversations, str)
        and len(conversations) > 0
        and isinstance(conversations[0], Mapping)
        and "role" in conversations[0]
    )


def validate_conversation(conversations: Any, *, allow_open_end: bool = False) -> None:
    """Checks a conversation's structure (LLaVA format, or role format when turn 0 has "role").

    Args:
        conversations: the record's "conversations" value.
        allow_open_end: accept a final LLaVA human turn without an answer (for generation).
            Role-format conversations may end with any turn.

    Raises:
        ValueError: naming the problem. LLaVA: not a non-empty list, a turn that is not a dict
            with string "from" and "value", roles not alternating human/gpt from a human turn,
            a missing final answer, or a video tag outside the first human turn or repeated.
            Roles: an unknown role, a system turn not first, a non-string "content", a stream
            turn without a non-negative int "num_frames", no turn besides the system one.
    """
    if not isinstance(conversations, Sequence) or isinstance(conversations, str):
        raise ValueError(f"conversations must be a list, got {type(conversations).__name__}")
    if not conversations:
        raise ValueError("conversations is empty")
    if _is_role_format(conversations):
        _validate_messages(conversations)
        return
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


def _validate_messages(messages: Sequence[Any]) -> None:
    """Role-format checks (see `validate_conversation`)."""
    for i, turn in enumerate(messages):
        if not isinstance(turn, Mapping):
            raise ValueError(f"turn {i} is a {type(turn).__name__}, not a dict")
        role = turn.get("role")
        if role not in _MESSAGE_ROLES:
            raise ValueError(f"turn {i} has role {role!r}; expected one of {_MESSAGE_ROLES}")
        if role == "system" and i != 0:
            raise ValueError(f"turn {i} is a system turn; only turn 0 may be")
        if role == "stream":
            n = turn.get("num_frames")
            if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
                raise ValueError(f"turn {i} (stream) needs an int 'num_frames' >= 0, got {n!r}")
        else:
            if not isinstance(turn.get("content"), str):
                got = type(turn.get("content")).__name__
                raise ValueError(f"turn {i} ({role}) 'content' is {got}, not str")
        if role != "user" and role != "stream" and _TAG_RE.search(turn.get("content", "")):
            raise ValueError(f"turn {i} ({role}) has a video tag; only user turns may")
    if all(t["role"] == "system" for t in messages):
        raise ValueError("conversation has no turn besides the system turn")


# ----------------------------------------------------------------------------------- rendering


@dataclasses.dataclass(frozen=True)
class _Text:
    text: str
    learned: bool = False


@dataclasses.dataclass(frozen=True)
class _Video:
    count: int


def _messages(
    conversations: Sequence[Mapping[str, Any]],
    t: ChatTemplate,
    system: str | None,
    num_video_tokens: int | None,
    tokens_per_frame: int | None,
    allow_open_end: bool,
) -> tuple[str, list[dict[str, Any]]]:
    """Normalizes either format to (system text, role messages); videos as `video` counts."""
    validate_conversation(conversations, allow_open_end=allow_open_end)
    if num_video_tokens is not None and num_video_tokens < 0:
        raise ValueError(f"num_video_tokens must be >= 0, got {num_video_tokens}")
    per_frame = t.tokens_per_frame if tokens_per_frame is None else tokens_per_frame
    msgs: list[dict[str, Any]] = []
    if _is_role_format(conversations):
        for turn in conversations:
            msgs.append(dict(turn))
        if msgs[0]["role"] == "system":
            if system is not None:
                raise ValueError("system message given twice: as an argument and as turn 0")
            system = msgs.pop(0)["content"]
        users = [m for m in msgs if m["role"] == "user"]
        tagged = [i for i, m in enumerate(users) if _TAG_RE.search(m["content"])]
        if t.stream_prefix is None:
            if any(m["role"] == "stream" for m in msgs):
                raise ValueError(f"template {t.name!r} has no stream role")
            if tagged and (tagged != [0] or len(_TAG_RE.findall(users[0]["content"])) > 1):
                raise ValueError("only the first user turn may hold a video tag, and only one")
            if users:
                users[0]["video"] = num_video_tokens or 0
            elif num_video_tokens:
                raise ValueError("a video needs a user turn to go in")
        else:
            if tagged:
                raise ValueError(
                    f"template {t.name!r} takes the video as stream turns, not as a tag in a "
                    "user turn"
                )
            total = 0
            for m in msgs:
                if m["role"] == "stream":
                    m["video"] = int(m["num_frames"]) * per_frame
                    total += m["video"]
            if num_video_tokens is not None and num_video_tokens != total:
                raise ValueError(
                    f"num_video_tokens={num_video_tokens} but the stream turns hold {total} "
                    f"placeholders ({per_frame} per frame)"
                )
    else:
        for turn in conversations:
            role = "user" if turn["from"] == "human" else "assistant"
            msgs.append({"role": role, "content": turn["value"], "learn": True})
        n = num_video_tokens or 0
        if t.stream_prefix is None:
            msgs[0]["video"] = n
        else:
            if n or _TAG_RE.search(msgs[0]["content"]):
                msgs[0]["content"] = _TAG_RE.sub("", msgs[0]["content"], count=1).strip()
            if n:
                msgs.insert(0, {"role": "stream", "video": n})
    return (t.default_system if system is None else system), msgs


def _video_block(t: ChatTemplate, count: int) -> list[_Text | _Video]:
    return [_Text(t.video_prefix), _Video(count), _Text(t.video_suffix)]


def _user_pieces(
    t: ChatTemplate, content: str, count: int, frame_times: Sequence[float] | None
) -> list[_Text | _Video]:
    """The first user turn's text with its video (see `ChatTemplate`)."""
    if count == 0:
        return [_Text(_TAG_RE.sub("", content, count=1))]
    times = ""
    if t.frame_times_format and frame_times is not None:
        times = t.frame_times_format.format(
            num_frames=len(frame_times),
            times=", ".join(t.frame_time_format.format(float(x)) for x in frame_times),
        )
    match = _TAG_RE.search(content)
    if match is None:
        return _video_block(t, count) + [_Text(t.video_separator + times + content)]
    before, after = content[: match.start()], content[match.end() :]
    if not before and after.startswith("\n"):  # LLaVA's "<video>\n{q}": the video-first form
        return _video_block(t, count) + [_Text(t.video_separator + times + after[1:])]
    return [_Text(before)] + _video_block(t, count) + [_Text(times + after)]


def _pieces(
    t: ChatTemplate,
    system: str,
    msgs: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool,
    frame_times: Sequence[float] | None,
) -> list[_Text | _Video]:
    """The conversation as text pieces (with learned flags) and video runs."""
    out: list[_Text | _Video] = []
    sys_block = (
        [_Text(t.system_prefix + system + t.system_suffix)]
        if system or t.keep_empty_system
        else []
    )
    if t.system_in_first_user and msgs and msgs[0]["role"] != "user" and sys_block:
        raise ValueError(f"template {t.name!r} puts the system message in the first user turn, "
                         f"but the conversation starts with a {msgs[0]['role']} turn")
    if not t.system_in_first_user:
        out += sys_block
    seen_user = False
    for m in msgs:
        role = m["role"]
        if role == "user":
            first = not seen_user
            prefix = t.first_user_prefix if first and t.first_user_prefix is not None else (
                t.user_prefix)
            out.append(_Text(prefix))
            if first and t.system_in_first_user:
                out += sys_block
            if "video" in m:
                out += _user_pieces(t, m["content"], m["video"], frame_times)
            else:
                out.append(_Text(m["content"]))
            out.append(_Text(t.user_suffix))
            seen_user = True
        elif role == "assistant":
            learn = bool(m.get("learn", t.learn_by_default))
            out.append(_Text(t.assistant_prefix, learn and t.learn_assistant_prefix))
            out.append(_Text(t.answer_prefix + m["content"] + t.assistant_suffix, learn))
            out.append(_Text(t.turn_separator, learn and t.learn_turn_separator))
        elif m["video"] > 0:  # stream; MMDuet renders nothing for a stream without frames
            out += [_Text(t.stream_prefix), _Video(m["video"]), _Text(t.stream_suffix)]
    if add_generation_prompt:
        out.append(_Text(t.assistant_prefix))
    pieces = [p for p in out if not isinstance(p, _Text) or p.text]
    if t.video_token is not None:
        for p in pieces:
            if isinstance(p, _Text) and t.video_token in p.text:
                raise ValueError(
                    f"text {p.text[:60]!r} contains the placeholder token {t.video_token!r}"
                )
    return pieces


def render_conversation(
    conversations: Sequence[Mapping[str, Any]],
    *,
    template: str | ChatTemplate = "chatml",
    system: str | None = None,
    num_video_tokens: int | None = None,
    add_generation_prompt: bool = False,
    frame_times: Sequence[float] | None = None,
    tokens_per_frame: int | None = None,
) -> str:
    """The prompt text of a conversation, as the original builds it before tokenization.

    A `VIDEO_TOKEN_INDEX` video shows as `template.video_text` once (e.g. "<image>"); a
    placeholder-token video as `template.video_token` repeated once per video token. The BOS
    token that `template.add_bos` adds is not part of the text.

    Args: as `tokenize_conversation`.

    Returns:
        The rendered text.

    Raises:
        ValueError: as `tokenize_conversation`.
    """
    t = get_template(template)
    system, msgs = _messages(conversations, t, system, num_video_tokens, tokens_per_frame,
                             add_generation_prompt)
    parts = []
    for p in _pieces(t, system, msgs, add_generation_prompt, frame_times):
        if isinstance(p, _Text):
            parts.append(p.text)
        elif t.video_token is not None:
            parts.append(t.video_token * p.count)
        else:
            parts.append(t.video_text)
    return "".join(parts)


# -------------------------------------------------------------------------------- tokenization

_COPIES: "weakref.WeakKeyDictionary[Any, dict[tuple[str, ...], Any]]" = (
    weakref.WeakKeyDictionary())


def _token_id(tokenizer, text: str) -> int | None:
    """The id of `text` when the tokenizer encodes it as exactly that one token, else None."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) == 1 and tokenizer.convert_ids_to_tokens(ids[0]) == text:
        return int(ids[0])
    return None


def _with_tokens(tokenizer, tokens: Sequence[str]):
    """`tokenizer`, or a cached private copy with the missing `tokens` added as special tokens.

    The originals add their placeholder token before tokenizing (TDC copies the tokenizer to do
    so); the copy keeps the caller's tokenizer unchanged.
    """
    missing = tuple(s for s in tokens if _token_id(tokenizer, s) is None)
    if not missing:
        return tokenizer
    try:
        cache = _COPIES.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable: no cache
        cache = {}
    if missing not in cache:
        twin = copy.deepcopy(tokenizer)
        _add_tokens(twin, missing)
        cache[missing] = twin
    return cache[missing]


def _add_tokens(tokenizer, tokens: Sequence[str]) -> None:
    tokenizer.add_tokens(
        [tokenizers.AddedToken(s, special=True, normalized=False) for s in tokens],
        special_tokens=True,
    )


def _encode(tokenizer, text: str, learned: np.ndarray) -> tuple[list[int], np.ndarray]:
    """Encodes one chunk; a token is learned when the character it ends on is."""
    if not text:
        return [], np.zeros((0,), bool)
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError as e:
        raise ValueError(
            f"{type(tokenizer).__name__} gives no character offsets; chat templates need a fast "
            "(tokenizers-backed) tokenizer, as tokenizer.load_tokenizer returns"
        ) from e
    offsets = np.asarray(enc["offset_mapping"], np.int64).reshape(-1, 2)
    anchor = np.clip(np.maximum(offsets[:, 1] - 1, offsets[:, 0]), 0, len(text) - 1)
    return list(enc["input_ids"]), learned[anchor]


def _chunks(pieces: Sequence[_Text | _Video]) -> list[tuple[str, np.ndarray] | _Video]:
    """Joins consecutive text pieces into (text, per-character learned flags)."""
    out: list[tuple[str, np.ndarray] | _Video] = []
    texts: list[_Text] = []

    def flush():
        if texts:
            text = "".join(p.text for p in texts)
            flags = np.concatenate([np.full(len(p.text), p.learned) for p in texts])
            out.append((text, flags))
            texts.clear()

    for p in pieces:
        if isinstance(p, _Text):
            texts.append(p)
        else:
            flush()
            out.append(p)
    flush()
    return out


def tokenize_conversation(
    conversations: Sequence[Mapping[str, Any]],
    tokenizer,
    *,
    template: str | ChatTemplate = "chatml",
    system: str | None = None,
    num_video_tokens: int | None = None,
    add_generation_prompt: bool = False,
    frame_times: Sequence[float] | None = None,
    tokens_per_frame: int | None = None,
    placeholder: str = "index",
) -> dict[str, np.ndarray]:
    """Renders and tokenizes a conversation with its video placeholders and loss mask.

    ChatML gives `<|im_start|>system\\n{system}<|im_end|>\\n` then per exchange
    `<|im_start|>user\\n{q}<|im_end|>\\n<|im_start|>assistant\\n{a}<|im_end|>\\n`
    (TDC conv_qwen / preprocess_qwen); the other templates are described in the module
    docstring and `ChatTemplate`. The video takes `num_video_tokens` positions (LLaVA format, or
    roles without a stream role) or `num_frames * tokens_per_frame` per stream turn (MMDuet).

    Args:
        conversations: LLaVA turns `{"from": "human"|"gpt", "value": str}` alternating from
            "human", or role-format turns (module docstring); multi-turn allowed.
        tokenizer: a fast `transformers` tokenizer that knows the template's special tokens
            (e.g. `<|im_start|>`); placeholder tokens it lacks are added on a private copy.
        template: a `TEMPLATES` key or a `ChatTemplate`.
        system: the system message (None: `template.default_system`; "" for none, unless the
            template keeps an empty system block).
        num_video_tokens: placeholders for the video (None or 0: no video). With stream turns,
            None or their total (checked).
        add_generation_prompt: allow a final LLaVA human turn and append the assistant header
            (for generation).
        frame_times: seconds of the sampled frames, shown by templates with a
            `frame_times_format` (TimeChat), ignored by the others.
        tokens_per_frame: placeholders per stream frame (None: `template.tokens_per_frame`).
        placeholder: "index" writes `VIDEO_TOKEN_INDEX` at video positions; "token" writes the
            id of `template.video_token` (which the tokenizer must hold, see
            `add_template_tokens`) as the originals' input_ids do.

    Returns:
        dict with `input_ids` int32[T] and `loss_mask` bool[T], True exactly on the target
        tokens of the template's loss rule; False on placeholders.

    Raises:
        ValueError: malformed conversation (see `validate_conversation`), unknown template or
            placeholder mode, a negative `num_video_tokens` or one that disagrees with the
            stream turns, stream turns for a template without a stream role, a text holding the
            placeholder token, a tokenizer without offsets, a missing BOS token, or an
            `always_learned` text that is not a single token.
    """
    t = get_template(template)
    if placeholder not in ("index", "token"):
        raise ValueError(f"placeholder must be 'index' or 'token', got {placeholder!r}")
    system, msgs = _messages(conversations, t, system, num_video_tokens, tokens_per_frame,
                             add_generation_prompt)
    pieces = _pieces(t, system, msgs, add_generation_prompt, frame_times)

    ids: list[int] = []
    masks: list[np.ndarray] = []
    if t.add_bos:
        if tokenizer.bos_token_id is None:
            raise ValueError(f"template {t.name!r} starts with BOS but the tokenizer has none")
        ids.append(int(tokenizer.bos_token_id))
        masks.append(np.zeros((1,), bool))

    if t.video_token is None:  # LLaVA tokenizer_image_token: text chunks around -200 runs
        for chunk in _chunks(pieces):
            if isinstance(chunk, _Video):
                ids += [VIDEO_TOKEN_INDEX] * chunk.count
                masks.append(np.zeros((chunk.count,), bool))
            else:
                chunk_ids, chunk_mask = _encode(tokenizer, *chunk)
                ids += chunk_ids
                masks.append(chunk_mask)
    else:  # the whole text at once, placeholders included (TimeChat, MMDuet)
        tok = _with_tokens(tokenizer, (t.video_token,))
        video_id = _token_id(tok, t.video_token)
        text_pieces = [p if isinstance(p, _Text) else _Text(t.video_token * p.count)
                       for p in pieces]
        (chunk,) = _chunks(text_pieces) or [("", np.zeros((0,), bool))]
        chunk_ids, chunk_mask = _encode(tok, *chunk)
        chunk_ids = np.asarray(chunk_ids, np.int64)
        is_video = chunk_ids == video_id
        want = sum(p.count for p in pieces if isinstance(p, _Video))
        if int(is_video.sum()) != want:
            raise ValueError(f"{int(is_video.sum())} placeholder tokens after tokenization, "
                             f"expected {want}")
        if placeholder == "token":
            caller_id = _token_id(tokenizer, t.video_token)
            if caller_id is None:
                raise ValueError(
                    f"the tokenizer has no {t.video_token!r} token; call "
                    f"chat.add_template_tokens(tokenizer, {t.name!r}) first"
                )
            chunk_ids[is_video] = caller_id
        else:
            chunk_ids[is_video] = VIDEO_TOKEN_INDEX
        ids += chunk_ids.tolist()
        masks.append(chunk_mask & ~is_video)

    input_ids = np.asarray(ids, dtype=np.int32)
    loss_mask = np.concatenate(masks) if masks else np.zeros((0,), bool)
    for text in t.always_learned:
        tid = tokenizer.encode(text, add_special_tokens=False)
        if len(tid) != 1:
            raise ValueError(f"always-learned text {text!r} is not one token of this tokenizer")
        loss_mask |= input_ids == tid[0]
    return {"input_ids": input_ids, "loss_mask": loss_mask.astype(bool)}


# ---------------------------------------------------------------------------- tokens, streams


def add_template_tokens(tokenizer, template: str | ChatTemplate) -> dict[str, int]:
    """Adds the template's placeholder tokens (`template.added_tokens`) to a tokenizer in place.

    Tokens already present keep their ids; new ones are added as special, unnormalized tokens
    at the end of the vocabulary (`len(tokenizer)` grows, so an LLM that embeds these ids needs
    a larger embedding table). Literal markers such as TimeChat's `<Video>` are not added: the
    original tokenizes them as text (see `SPECIAL_TOKENS`).

    Args:
        tokenizer: a `transformers` tokenizer (modified).
        template: a `TEMPLATES` key or a `ChatTemplate`.

    Returns:
        {token text: id} for each of `template.added_tokens` (empty for chatml, vicuna_v1).

    Raises:
        ValueError: unknown template, or a token that still does not encode to one id.
    """
    t = get_template(template)
    missing = [s for s in t.added_tokens if _token_id(tokenizer, s) is None]
    if missing:
        _add_tokens(tokenizer, missing)
    out = {}
    for s in t.added_tokens:
        tid = _token_id(tokenizer, s)
        if tid is None:
            raise ValueError(f"{s!r} does not encode to a single token after adding it")
        out[s] = tid
    return out


STREAM_EVENTS = ("start", "frames", "query", "respond")


def stream_event_text(
    event: str,
    *,
    template: str | ChatTemplate = "mmduet",
    last_role: str = "system",
    content: str = "",
) -> str:
    """The text a streaming duet model is fed at an event (MMDuet's online inference).

    As coded in MMDuet's `LiveInferForBenchmark` (test/inference.py):

    * "start": the system turn `<|im_start|>system\\n{content}<|im_end|>` (`_start_ids`).
    * "frames": before frame embeddings: `\\n<|im_start|>stream\\n` after an assistant reply
      (whose closing `<|im_end|>` the generator produced), else nothing: frames follow the
      system turn directly (training puts a stream header there) and continue an open stream.
    * "query": a user query, `\\n<|im_start|>user\\n{content}<|im_end|>\\n<|im_start|>stream\\n`,
      prefixed with `<|im_end|>` when it interrupts a stream (`last_role == "stream"`). A query
      before any frame is fed first and, as coded, the system turn is then never fed.
    * "respond": the assistant header that starts a reply, `<|im_end|>` (closing the stream)
      + `\\n<|im_start|>assistant\\n`.

    Args:
        event: one of `STREAM_EVENTS`.
        template: a template with a stream role.
        last_role: the role of what was fed last: "system" (nothing or the system turn),
            "stream", "user" or "assistant".
        content: the system message ("start") or the query ("query").

    Returns:
        The text to tokenize (without special-token additions) and feed.

    Raises:
        ValueError: unknown event or role, or a template without a stream role.
    """
    t = get_template(template)
    if t.stream_prefix is None:
        raise ValueError(f"template {t.name!r} has no stream role")
    if last_role not in ("system", "stream", "user", "assistant"):
        raise ValueError(f"unknown last_role {last_role!r}")
    close = t.stream_suffix if last_role == "stream" else ""
    if event == "start":
        return t.system_prefix + content + t.system_suffix
    if event == "frames":
        return t.stream_prefix if last_role == "assistant" else ""
    if event == "query":
        return close + t.user_prefix + content + t.user_suffix + t.stream_prefix
    if event == "respond":
        return close + t.assistant_prefix
    raise ValueError(f"unknown stream event {event!r}; expected one of {STREAM_EVENTS}")


def question_text(conversations: Sequence[Mapping[str, Any]]) -> str:
    """The first human (user) turn without its video tag, stripped (the Q-Former's text input).

    Raises:
        ValueError: no first human turn (LLaVA format) or no user turn (role format).
    """
    if _is_role_format(conversations):
        for turn in conversations:
            if turn.get("role") == "user" and isinstance(turn.get("content"), str):
                return _TAG_RE.sub("", turn["content"]).strip()
        raise ValueError("conversation has no user turn")
    if not conversations or not isinstance(conversations[0], Mapping):
        raise ValueError("conversation has no first turn")
    first = conversations[0]
    if first.get("from") != "human" or not isinstance(first.get("value"), str):
        raise ValueError("the first turn is not a human turn with a string value")
    return _TAG_RE.sub("", first["value"]).strip()
