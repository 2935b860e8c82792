"""ChatML rendering, video placeholders and the assistant-only loss mask."""

import numpy as np
import pytest

from longvid_jax.input import chat

V = chat.VIDEO_TOKEN_INDEX
SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"


def _runs(mask):
    """[start, stop) of each run of True."""
    edges = np.diff(np.concatenate([[0], mask.astype(int), [0]]))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)))


def test_single_turn_layout_and_mask(qwen2):
    conv = [{"from": "human", "value": "<video>\nWhat is the bird doing?"},
            {"from": "gpt", "value": "It is moving its head."}]
    out = chat.tokenize_conversation(conv, qwen2, num_video_tokens=5)
    ids, mask = out["input_ids"], out["loss_mask"]
    assert ids.dtype == np.int32 and mask.dtype == bool and ids.shape == mask.shape
    enc = lambda s: qwen2.encode(s)  # noqa: E731
    want = (enc(SYSTEM + "<|im_start|>user\n") + [V] * 5
            + enc("\nWhat is the bird doing?<|im_end|>\n<|im_start|>assistant\n")
            + enc("It is moving its head.<|im_end|>") + enc("\n"))
    assert ids.tolist() == want
    assert qwen2.decode(ids[mask]) == "It is moving its head.<|im_end|>"
    assert _runs(mask) == [(len(want) - 1 - len(enc("It is moving its head.<|im_end|>")),
                            len(want) - 1)]
    assert not mask[ids == V].any() and (ids == V).sum() == 5


def test_multi_turn_mask_and_image_tag(qwen2):
    conv = [{"from": "human", "value": "Look: <image> what colour?"},
            {"from": "gpt", "value": "White."},
            {"from": "human", "value": "And the beak?"},
            {"from": "gpt", "value": "Grey, curved."}]
    out = chat.tokenize_conversation(conv, qwen2, num_video_tokens=3, system="")
    ids, mask = out["input_ids"], out["loss_mask"]
    text = qwen2.decode([i for i in ids if i != V])
    assert text == ("<|im_start|>user\nLook:  what colour?<|im_end|>\n<|im_start|>assistant\n"
                    "White.<|im_end|>\n<|im_start|>user\nAnd the beak?<|im_end|>\n"
                    "<|im_start|>assistant\nGrey, curved.<|im_end|>\n")
    runs = _runs(mask)
    assert [qwen2.decode(ids[a:b]) for a, b in runs] == ["White.<|im_end|>",
                                                         "Grey, curved.<|im_end|>"]
    for a, _ in runs:  # each answer follows its role header
        assert qwen2.decode(ids[a - 3 : a]) == "<|im_start|>assistant\n"


def test_video_without_tag_goes_first(qwen2):
    conv = [{"from": "human", "value": "Describe."}, {"from": "gpt", "value": "A bird."}]
    ids = chat.tokenize_conversation(conv, qwen2, num_video_tokens=2)["input_ids"].tolist()
    start = len(qwen2.encode(SYSTEM + "<|im_start|>user\n"))
    assert ids[start : start + 2] == [V, V]
    assert qwen2.decode(ids[start + 2 : start + 4]) == "\nDescribe"
    none = chat.tokenize_conversation(conv, qwen2, num_video_tokens=0)["input_ids"]
    assert (none != V).all()


def test_generation_prompt(qwen2):
    conv = [{"from": "human", "value": "<video>\nWhy?"}]
    out = chat.tokenize_conversation(conv, qwen2, num_video_tokens=1, add_generation_prompt=True)
    assert qwen2.decode(out["input_ids"][-3:]) == "<|im_start|>assistant\n"
    assert not out["loss_mask"].any()


@pytest.mark.parametrize("conv, problem", [
    ([], "empty"),
    ("hello", "must be a list"),
    ([{"from": "gpt", "value": "x"}], "expected 'human'"),
    ([{"from": "human", "value": "q"}, {"from": "human", "value": "q"}], "expected 'gpt'"),
    ([{"from": "human"}, {"from": "gpt", "value": "a"}], "no 'value'"),
    ([{"value": "q"}, {"from": "gpt", "value": "a"}], "no 'from'"),
    ([{"from": "human", "value": 3}, {"from": "gpt", "value": "a"}], "not str"),
    ([{"from": "human", "value": "q"}], "ends with a human turn"),
    ([{"from": "human", "value": "<video><video>"}, {"from": "gpt", "value": "a"}], "2 video tags"),
    ([{"from": "human", "value": "q"}, {"from": "gpt", "value": "<video>"}], "turn 1 has a video"),
])
def test_malformed_conversations(qwen2, conv, problem):
    with pytest.raises(ValueError, match=problem):
        chat.tokenize_conversation(conv, qwen2, num_video_tokens=1)


def test_unknown_template_and_question_text(qwen2):
    conv = [{"from": "human", "value": "<video>\n  What is typed? "}, {"from": "gpt", "value": "a"}]
    with pytest.raises(ValueError, match="unknown chat template"):
        chat.tokenize_conversation(conv, qwen2, template="nope", num_video_tokens=1)
    assert chat.question_text(conv) == "What is typed?"
    assert set(chat.TEMPLATES) >= {"chatml"}
