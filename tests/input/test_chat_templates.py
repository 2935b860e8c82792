"""The five systems' chat templates: prompt strings of ORIGINALS.md, loss masks, placeholders."""

import copy
import dataclasses

import numpy as np
import pytest
import tokenizers
import transformers

from longvid_jax.input import chat

V = chat.VIDEO_TOKEN_INDEX
Q1, A1 = "What does the cockatoo do?", "It bows its head."
Q2, A2 = "And then?", "It turns left."
LLAVA_2TURN = [{"from": "human", "value": "<video>\n" + Q1}, {"from": "gpt", "value": A1},
               {"from": "human", "value": Q2}, {"from": "gpt", "value": A2}]
# Literal system prompts of ORIGINALS.md (sections 1, 3, 4, 5).
TDC_SYS = "You are a helpful assistant."
TIMECHAT_SYS = ("You are able to understand the visual content that the user provides. Follow the "
                "instructions carefully and explain your answers in detail.")
VICUNA_SYS = ("A chat between a curious user and an artificial intelligence assistant. The "
              "assistant gives helpful, detailed, and polite answers to the user's questions.")
MMDUET_SYS = ("A multimodal AI assistant is helping users with some activities. Below is their "
              "conversation, interleaved with the list of video frames received by the assistant.")


def _runs(mask):
    """[start, stop) of each run of True."""
    edges = np.diff(np.concatenate([[0], mask.astype(int), [0]]))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)))


def tiny_llama_tokenizer(pieces, merges):
    """A LlamaTokenizerFast over <unk> <s> </s>, 256 byte pieces and `pieces` (byte fallback,
    "▁" Metaspace pre-tokenizer, BOS post-processor): LLaMA's tokenizer.json layout."""
    from tokenizers import decoders, models, pre_tokenizers, processors  # noqa: PLC0415

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece in pieces:
        vocab.setdefault(piece, len(vocab))
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>",
                                              fuse_unk=True, byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first",
                                                     split=False)
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                         decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    return transformers.LlamaTokenizerFast(tokenizer_object=backend, bos_token="<s>",
                                           eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def llama_tok():
    """A tiny LLaMA tokenizer: "▁" and printable ASCII as pieces, one merge ("▁", "A")."""
    pieces = ["▁"] + [chr(i) for i in range(33, 127)] + ["▁A"]
    return tiny_llama_tokenizer(pieces, [("▁", "A")])


def _text(tok, ids):
    """Reassembles the text of LLaMA tokens (all single characters here)."""
    return "".join(tok.convert_ids_to_tokens([int(i) for i in ids])).replace("▁", " ")


def test_templates_are_frozen_data():
    assert set(chat.TEMPLATES) == {"chatml", "chatml_tdc", "llama2", "vicuna_v1", "mmduet"}
    for name, t in chat.TEMPLATES.items():
        assert isinstance(t, chat.ChatTemplate) and t.name == name and t.source
        with pytest.raises(dataclasses.FrozenInstanceError):
            t.user_prefix = "x"  # type: ignore[misc]
    assert chat.get_template(chat.LLAMA2) is chat.LLAMA2
    with pytest.raises(ValueError, match="unknown chat template"):
        chat.get_template("vicuna")


# ---------------------------------------------------------------- prompt strings of ORIGINALS.md


def test_tdc_and_tpo_chatml_prompts():
    # ORIGINALS.md section 1, "Prompt" (conv_qwen).
    conv = [{"from": "human", "value": "<video>\n" + Q1}]
    want = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
            f"<image>\n{Q1}<|im_end|>\n<|im_start|>assistant\n")
    for name in ("chatml", "chatml_tdc"):
        got = chat.render_conversation(conv, template=name, num_video_tokens=144,
                                       add_generation_prompt=True)
        assert got == want
    # Section 2: LLaVA-Video-TPO's demo question, DEFAULT_IMAGE_TOKEN + text, template qwen_1_5.
    q = ("The video lasts for 14.00 seconds, and 3 frames are uniformly sampled from it. These "
         "frames are located at 0.00s,7.00s,14.00s.Please answer the following questions related "
         "to this video.\nPlease describe this video in detail.")
    got = chat.render_conversation([{"from": "human", "value": "<image>" + q}], num_video_tokens=1,
                                   add_generation_prompt=True)
    assert got == (f"<|im_start|>system\n{TDC_SYS}<|im_end|>\n<|im_start|>user\n<image>{q}"
                   "<|im_end|>\n<|im_start|>assistant\n")


def test_timechat_llama2_prompt():
    # ORIGINALS.md section 4, "Prompt": [INST] <<SYS>>\n{sys}\n<</SYS>>\n\n<Video><ImageHere>xN
    # </Video> The video contains {n} frames sampled at {t1, t2, ...} seconds. {q} [/INST] {a} </s>
    conv = [{"from": "human", "value": Q1}, {"from": "gpt", "value": A1}]
    got = chat.render_conversation(conv, template="llama2", num_video_tokens=4,
                                   frame_times=[0.0, 1.0, 2.04, 3.0])
    assert got == ("[INST] <<SYS>>\n" + TIMECHAT_SYS + "\n<</SYS>>\n\n<Video>"
                   + "<ImageHere>" * 4 + "</Video> The video contains 4 frames sampled at "
                   f"0.0, 1.0, 2.0, 3.0 seconds. {Q1} [/INST] {A1} </s>")
    # A LLaVA "<video>\n" tag means the same video-first form; later rounds open with <s>.
    got = chat.render_conversation(LLAVA_2TURN, template="llama2", num_video_tokens=2,
                                   system=" ", add_generation_prompt=False)
    assert got == ("[INST] <<SYS>>\n \n<</SYS>>\n\n<Video><ImageHere><ImageHere></Video> "
                   f"{Q1} [/INST] {A1} </s><s>[INST] {Q2} [/INST] {A2} </s>")
    gen = chat.render_conversation(LLAVA_2TURN[:3], template="llama2", num_video_tokens=1,
                                   add_generation_prompt=True)
    assert gen.endswith(f"</s><s>[INST] {Q2} [/INST]")


def test_longvale_vicuna_prompt():
    # ORIGINALS.md section 5: "... questions. USER: <video>\n {q} ASSISTANT:" (eval.py passes
    # "<video>\n " + query for captioning, "<video>\n" + query for grounding).
    q = "Could you please detail the events that took place during different time segments?"
    for value, shown in (("<video>\n " + q, "\n " + q), ("<video>\n" + q, "\n" + q), (q, "\n" + q)):
        got = chat.render_conversation([{"from": "human", "value": value}], template="vicuna_v1",
                                       num_video_tokens=120, add_generation_prompt=True)
        assert got == f"{VICUNA_SYS} USER: <video>{shown} ASSISTANT:"
    got = chat.render_conversation(LLAVA_2TURN, template="vicuna_v1", num_video_tokens=1)
    assert got == (f"{VICUNA_SYS} USER: <video>\n{Q1} ASSISTANT: {A1}</s>USER: {Q2} "
                   f"ASSISTANT: {A2}</s>")


def test_mmduet_duet_prompt_and_query_rule():
    # ORIGINALS.md section 3: turns "\n<|im_start|>{role}\n{content}<|im_end|>", stream turns of
    # 49 * n_frames <image>, the system prompt, learn flags on assistant turns.
    conv = [{"role": "stream", "num_frames": 2, "learn": 1},
            {"role": "user", "content": Q1, "time": 1.0},
            {"role": "stream", "num_frames": 1, "learn": True},
            {"role": "assistant", "content": A1, "learn": True}]
    want = ("<|im_start|>system\n" + MMDUET_SYS + "<|im_end|>"
            + "\n<|im_start|>stream\n" + "<image>" * 98 + "<|im_end|>"
            + "\n<|im_start|>user\n" + Q1 + "<|im_end|>"
            + "\n<|im_start|>stream\n" + "<image>" * 49 + "<|im_end|>"
            + "\n<|im_start|>assistant\n" + A1 + "<|im_end|>")
    assert chat.render_conversation(conv, template="mmduet") == want
    assert chat.render_conversation(conv, template="mmduet", num_video_tokens=147) == want
    # The user-query encoding rule, "<|im_end|>"-prefixed when it interrupts a stream.
    ev = chat.stream_event_text
    assert ev("query", content=Q1) == f"\n<|im_start|>user\n{Q1}<|im_end|>\n<|im_start|>stream\n"
    assert ev("query", content=Q1, last_role="stream") == (
        f"<|im_end|>\n<|im_start|>user\n{Q1}<|im_end|>\n<|im_start|>stream\n")
    assert ev("start", content=MMDUET_SYS) == f"<|im_start|>system\n{MMDUET_SYS}<|im_end|>"
    assert ev("respond", last_role="stream") == "<|im_end|>\n<|im_start|>assistant\n"
    assert ev("frames", last_role="assistant") == "\n<|im_start|>stream\n"
    assert ev("frames", last_role="stream") == ev("frames", last_role="user") == ""
    with pytest.raises(ValueError, match="no stream role"):
        ev("query", template="chatml")
    with pytest.raises(ValueError, match="unknown stream event"):
        ev("pause")


def test_llava_record_as_duet():
    got = chat.render_conversation(LLAVA_2TURN[:2], template="mmduet", num_video_tokens=3,
                                   add_generation_prompt=False)
    assert got == ("<|im_start|>system\n" + MMDUET_SYS + "<|im_end|>\n<|im_start|>stream\n"
                   + "<image>" * 3 + "<|im_end|>\n<|im_start|>user\n" + Q1
                   + "<|im_end|>\n<|im_start|>assistant\n" + A1 + "<|im_end|>")


def test_system_defaults_and_empty_system():
    conv = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]
    assert chat.render_conversation(conv, system="").startswith("<|im_start|>user\n")
    assert chat.render_conversation(conv, template="chatml_tdc", system="").startswith(
        "<|im_start|>system\n<|im_end|>\n")
    assert chat.render_conversation(conv, template="vicuna_v1", system="") == (
        " USER: Hi ASSISTANT: Hello</s>")
    roles = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert chat.render_conversation(roles) == ("<|im_start|>system\nBe brief.<|im_end|>\n"
                                               "<|im_start|>user\nHi<|im_end|>\n")
    with pytest.raises(ValueError, match="given twice"):
        chat.render_conversation(roles, system="x")
    # frame times only where the template shows them; no video, no tag text.
    assert "0.0" not in chat.render_conversation(conv, num_video_tokens=1, frame_times=[0.0])
    assert chat.render_conversation([{"from": "human", "value": "<video>\nHi"}],
                                    template="llama2", system="s", add_generation_prompt=True
                                    ) == "[INST] <<SYS>>\ns\n<</SYS>>\n\n\nHi [/INST]"


# ------------------------------------------------------------------------------ tokens and masks


def test_chatml_tdc_mask_matches_preprocess_qwen(qwen2):
    """TDC's rule restated: per-turn ChatML encoding, assistant turns learned whole, and the
    tokens "\\n", <|im_start|>, <|im_end|> learned everywhere; <image> -> VIDEO_TOKEN_INDEX."""
    out = chat.tokenize_conversation(LLAVA_2TURN, qwen2, template="chatml_tdc",
                                     num_video_tokens=3)
    unmask = {198, 151644, 151645}
    ids, mask = [], []
    for role, content in [("system", TDC_SYS), ("user", "<image>\n" + Q1), ("assistant", A1),
                          ("user", Q2), ("assistant", A2)]:
        turn = []
        for k, part in enumerate(f"<|im_start|>{role}\n{content}<|im_end|>\n".split("<image>")):
            turn += ([V] * 3 if k else []) + qwen2.encode(part)
        ids += turn
        mask += [role == "assistant" or (t in unmask) for t in turn]
    assert out["input_ids"].tolist() == ids
    assert out["loss_mask"].tolist() == mask
    plain = chat.tokenize_conversation(LLAVA_2TURN, qwen2, num_video_tokens=3)
    assert plain["input_ids"].tolist() == ids  # same ids, answer-only mask
    runs = _runs(plain["loss_mask"])
    assert [qwen2.decode(plain["input_ids"][a:b]) for a, b in runs] == [
        A1 + "<|im_end|>", A2 + "<|im_end|>"]


def test_llama2_ids_and_mask(llama_tok):
    tok = llama_tok
    out = chat.tokenize_conversation(LLAVA_2TURN, tok, template="llama2", num_video_tokens=5,
                                     frame_times=[0.0, 2.5])
    ids, mask = out["input_ids"], out["loss_mask"]
    assert ids[0] == tok.bos_token_id and not mask[0]
    assert (ids == V).sum() == 5 and not mask[ids == V].any()
    # The whole rendered text encoded at once with <ImageHere> a token (as TimeChat does).
    twin = copy.deepcopy(tok)
    image_here = chat.add_template_tokens(twin, "llama2")["<ImageHere>"]
    text = chat.render_conversation(LLAVA_2TURN, template="llama2", num_video_tokens=5,
                                    frame_times=[0.0, 2.5])
    want = [tok.bos_token_id] + twin.encode(text, add_special_tokens=False)
    assert [V if i == image_here else i for i in want] == ids.tolist()
    # preprocess_for_llama_v2: " {a} </s>" of every round is learned, nothing else.
    assert [_text(tok, ids[a:b]) for a, b in _runs(mask)] == [f" {A1} </s>", f" {A2} </s>"]
    assert len(tok) == 259 + 95 + 1  # the caller's tokenizer is unchanged
    # placeholder="token" keeps the original's ids; it needs the token in the tokenizer.
    as_tokens = chat.tokenize_conversation(LLAVA_2TURN, twin, template="llama2",
                                           num_video_tokens=5, frame_times=[0.0, 2.5],
                                           placeholder="token")
    assert as_tokens["input_ids"].tolist() == want
    with pytest.raises(ValueError, match="add_template_tokens"):
        chat.tokenize_conversation(LLAVA_2TURN, tok, template="llama2", num_video_tokens=5,
                                   placeholder="token")


def test_vicuna_ids_follow_tokenizer_image_token(llama_tok):
    tok = llama_tok
    conv = [{"from": "human", "value": "<video>\n " + Q1}, {"from": "gpt", "value": A1},
            {"from": "human", "value": Q2}, {"from": "gpt", "value": "12 s."}]
    out = chat.tokenize_conversation(conv, tok, template="vicuna_v1", num_video_tokens=4)
    ids, mask = out["input_ids"], out["loss_mask"]
    # tokenizer_image_token: BOS, the chunks around <video> encoded apart, -200 in between.
    before = f"{VICUNA_SYS} USER: "
    after = f"\n {Q1} ASSISTANT: {A1}</s>USER: {Q2} ASSISTANT: 12 s.</s>"
    want = ([tok.bos_token_id] + tok.encode(before, add_special_tokens=False) + [V] * 4
            + tok.encode(after, add_special_tokens=False))
    assert ids.tolist() == want
    # preprocess_v1: each round's " {a}</s>" (the space token included) is learned.
    assert [_text(tok, ids[a:b]) for a, b in _runs(mask)] == [f" {A1}</s>", " 12 s.</s>"]


def test_mmduet_ids_mask_and_learn_flags(qwen2):
    conv = [{"role": "stream", "num_frames": 1},
            {"role": "user", "content": Q1},
            {"role": "stream", "num_frames": 2},
            {"role": "assistant", "content": A1, "learn": True},
            {"role": "stream", "num_frames": 1},
            {"role": "assistant", "content": "Not learned."},
            {"role": "user", "content": Q2},
            {"role": "assistant", "content": A2, "learn": 1}]
    size = len(qwen2)
    out = chat.tokenize_conversation(conv, qwen2, template="mmduet")
    ids, mask = out["input_ids"], out["loss_mask"]
    assert len(qwen2) == size  # <image> went into a private copy
    assert (ids == V).sum() == 4 * 49 and not mask[ids == V].any()
    # The collator's encoding of the whole prompt, <image> (added last) -> VIDEO_TOKEN_INDEX.
    text = chat.render_conversation(conv, template="mmduet")
    whole = chat._with_tokens(qwen2, ("<image>",)).encode(text, add_special_tokens=False)
    assert [V if i == size else i for i in whole] == ids.tolist()
    # get_learn_ranges: content + <|im_end|> of assistant turns marked learn.
    assert [qwen2.decode(ids[a:b]) for a, b in _runs(mask)] == [
        A1 + "<|im_end|>", A2 + "<|im_end|>"]
    # The last placeholder of each frame (where MMDuet reads its heads) ends a 49-run.
    pos = np.flatnonzero(ids == V)
    assert (np.diff(pos.reshape(4, 49), axis=1) == 1).all()
    few = chat.tokenize_conversation(conv, qwen2, template="mmduet", tokens_per_frame=2)
    assert (few["input_ids"] == V).sum() == 8


def test_tokenize_matches_render_and_llava_equals_roles(qwen2):
    roles = [{"role": "user", "content": "<video>\n" + Q1}, {"role": "assistant", "content": A1},
             {"role": "user", "content": Q2}, {"role": "assistant", "content": A2}]
    a = chat.tokenize_conversation(LLAVA_2TURN, qwen2, num_video_tokens=2)
    b = chat.tokenize_conversation(roles, qwen2, num_video_tokens=2)
    for key in ("input_ids", "loss_mask"):
        np.testing.assert_array_equal(a[key], b[key])
    text = chat.render_conversation(LLAVA_2TURN, num_video_tokens=2)
    assert qwen2.decode([i for i in a["input_ids"] if i != V]) == text.replace("<image>", "")
    off = chat.tokenize_conversation(roles[:2] + [dict(roles[2]), {**roles[3], "learn": False}],
                                     qwen2, num_video_tokens=2)
    assert len(_runs(off["loss_mask"])) == 1


@pytest.mark.parametrize("kwargs, problem", [
    (dict(conversations=[{"role": "stream", "num_frames": 1}, {"role": "user", "content": "q"}]),
     "no stream role"),
    (dict(conversations=[{"role": "user", "content": "<video>q"}], template="mmduet"),
     "stream turns"),
    (dict(conversations=[{"role": "stream", "num_frames": 1}], template="mmduet",
          num_video_tokens=5), "stream turns hold 49"),
    (dict(conversations=[{"role": "user", "content": "a <ImageHere>"}], template="llama2"),
     "placeholder token"),
    (dict(conversations=[{"role": "stream", "num_frames": -1}], template="mmduet"),
     "num_frames"),
    (dict(conversations=[{"role": "user", "content": "q"}, {"role": "system", "content": "s"}]),
     "only turn 0"),
    (dict(conversations=[{"role": "critic", "content": "q"}]), "role 'critic'"),
    (dict(conversations=[{"role": "user", "content": 1}]), "not str"),
    (dict(conversations=[{"role": "system", "content": "s"}]), "besides the system"),
    (dict(conversations=[{"role": "assistant", "content": "a"}], template="llama2"),
     "starts with a assistant"),
    (dict(conversations=LLAVA_2TURN, num_video_tokens=-1), ">= 0"),
    (dict(conversations=LLAVA_2TURN, placeholder="embed"), "'index' or 'token'"),
    (dict(conversations=LLAVA_2TURN, template="llama2"), "starts with BOS"),
])
def test_template_errors(qwen2, kwargs, problem):
    with pytest.raises(ValueError, match=problem):
        chat.tokenize_conversation(tokenizer=qwen2, **kwargs)


def test_special_token_registry_and_adding(llama_tok):
    reg = chat.SPECIAL_TOKENS
    assert {"<image>", "<ImageHere>", "<Video>", "</Video>"} <= set(reg)
    assert reg["<ImageHere>"].added and reg["<image>"].added
    assert not reg["<Video>"].added and not reg["</Video>"].added
    for t in chat.TEMPLATES.values():
        for s in t.added_tokens:
            assert reg[s].added and t.name in reg[s].templates
        for s in (t.video_token, t.video_prefix, t.video_suffix):
            if s:
                assert t.name in reg[s].templates
    twin = copy.deepcopy(llama_tok)
    size = len(twin)
    assert chat.add_template_tokens(twin, "chatml") == {}
    ids = chat.add_template_tokens(twin, "llama2")
    assert ids == {"<ImageHere>": size} and len(twin) == size + 1
    assert chat.add_template_tokens(twin, chat.LLAMA2) == ids  # idempotent
    assert twin.encode("x<ImageHere>", add_special_tokens=False)[-1] == size
    assert chat.add_template_tokens(twin, "mmduet") == {"<image>": size + 1}


def test_question_text_both_formats():
    assert chat.question_text(LLAVA_2TURN) == Q1
    roles = [{"role": "stream", "num_frames": 1}, {"role": "user", "content": " <video> Why? "}]
    assert chat.question_text(roles) == "Why?"
    with pytest.raises(ValueError, match="no user turn"):
        chat.question_text([{"role": "stream", "num_frames": 1}])
