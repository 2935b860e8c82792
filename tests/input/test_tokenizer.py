"""The offline Qwen2 tokenizer: known ids, special tokens, round trips, tiktoken parity, cache."""

import json

import pytest
import transformers

from longvid_jax.input import tokenizer as tokenizer_lib

TEXT = (
    "Héllo wörld! 你好，世界。こんにちは 🎉🎉 ünïcödé"
    "\tTabs\t\tand\n\nnewlines  \r\n"
    " 12345 3.14159 don't I'll <video> x**2 + y_1 == 'ok'?\n    indented code()\n"
)


def test_known_ids(qwen2):
    # Qwen/Qwen2-7B-Instruct: "You"=2610 " are"=525 " a"=264 " helpful"=10950 " assistant"=17847.
    assert qwen2.encode("You are a helpful assistant") == [2610, 525, 264, 10950, 17847]
    assert qwen2.encode("You are a helpful assistant.")[-1] == 13
    assert qwen2.encode("\n") == [198]


def test_special_tokens(qwen2):
    ids = qwen2.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    assert ids == [151643, 151644, 151645]
    assert qwen2.encode("<|im_start|>user\nHi<|im_end|>\n") == [151644, 872, 198, 13048, 151645,
                                                                198]
    assert qwen2.eos_token_id == 151645 and qwen2.pad_token_id == 151643
    assert qwen2.bos_token_id is None and len(qwen2) == 151646


def test_unicode_round_trip(qwen2):
    ids = qwen2.encode(TEXT)
    assert qwen2.decode(ids) == TEXT
    assert max(ids) < 151643


def test_matches_tiktoken(qwen2):
    tiktoken = pytest.importorskip("tiktoken")
    ranks = tokenizer_lib._read_tiktoken(tokenizer_lib._tiktoken_path())
    enc = tiktoken.Encoding(
        "qwen2", pat_str=tokenizer_lib.QWEN2_PRETOKENIZE_REGEX, mergeable_ranks=ranks,
        special_tokens={s: 151643 + i for i, s in enumerate(tokenizer_lib.QWEN2_SPECIAL_TOKENS)},
    )
    text = TEXT + open(tokenizer_lib.__file__, encoding="utf-8").read()
    assert qwen2.encode(text) == enc.encode(text, allowed_special="all")


def test_cache_file_and_load_tokenizer(qwen2, tokenizer_cache, tmp_path):
    assert list(tokenizer_cache.glob("qwen2_tokenizer_*.json"))
    tokenizer_lib.qwen2_tokenizer.cache_clear()
    reloaded = tokenizer_lib.qwen2_tokenizer()  # from the cached tokenizer.json
    assert reloaded is not qwen2 and reloaded.encode(TEXT) == qwen2.encode(TEXT)
    assert tokenizer_lib.load_tokenizer("qwen2") is tokenizer_lib.qwen2_tokenizer()
    qwen2.save_pretrained(tmp_path / "tok")
    local = tokenizer_lib.load_tokenizer(str(tmp_path / "tok"))
    assert local.encode(TEXT) == qwen2.encode(TEXT)
    with pytest.raises(ValueError, match="neither"):
        tokenizer_lib.load_tokenizer(str(tmp_path / "nowhere"))


# ------------------------------------------------------------------- local checkpoint folders

SAMPLES = ["hello hello world", "  two leading spaces", "tabs\tand\nnewlines\n\n", "héllo 🎉 12",
           "trailing  "]


def _tiny_bpe_fast():
    """A tiny byte-level BPE trained with `tokenizers`, with ChatML special tokens."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers  # noqa: PLC0415

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TEXT] * 3 + SAMPLES, trainer=trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"])


def test_load_tokenizer_json_folder(tmp_path):
    from longvid_jax.input import chat  # noqa: PLC0415

    tok = _tiny_bpe_fast()
    tok.save_pretrained(tmp_path / "ckpt")
    loaded = tokenizer_lib.load_tokenizer(str(tmp_path / "ckpt"))
    assert loaded.is_fast and loaded.eos_token_id == tok.eos_token_id
    for text in SAMPLES + [TEXT]:
        assert loaded.encode(text) == tok.encode(text)
    assert tokenizer_lib.load_tokenizer(str(tmp_path / "ckpt")) is loaded  # cached
    # The ChatML template works on it: the mask covers exactly answer + <|im_end|>.
    conv = [{"from": "human", "value": "<video>\nhello?"}, {"from": "gpt", "value": " 12 🎉"}]
    out = chat.tokenize_conversation(conv, loaded, num_video_tokens=2)
    assert loaded.decode(out["input_ids"][out["loss_mask"]]) == " 12 🎉<|im_end|>"


def test_load_llama_tokenizer_folder(tmp_path):
    from tests.input.test_chat_templates import tiny_llama_tokenizer  # noqa: PLC0415

    merges = [("l", "l"), ("h", "e"), ("▁", "he"), ("ll", "o"), ("▁he", "llo")]
    tok = tiny_llama_tokenizer(["▁", "h", "e", "l", "o", "w", "ll", "he", "▁he", "llo",
                                "▁hello"], merges)
    tok.save_pretrained(tmp_path / "llama")
    loaded = tokenizer_lib.load_tokenizer(str(tmp_path / "llama"))
    assert loaded.bos_token_id == 1 and loaded.eos_token_id == 2
    for text in SAMPLES:
        assert loaded.encode(text) == tok.encode(text)
    assert loaded.encode("hello") == [1, tok.convert_tokens_to_ids("▁hello")]


def _write_sentencepiece_bpe(folder, pieces):
    """A sentencepiece BPE `tokenizer.model` written with protobuf alone (LLaMA's layout:
    <unk> <s> </s>, 256 byte pieces, then normal pieces ranked by score)."""
    from transformers.convert_slow_tokenizer import import_protobuf  # noqa: PLC0415

    model = import_protobuf().ModelProto()
    spec = model.trainer_spec
    spec.model_type, spec.byte_fallback = 2, True  # BPE
    spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id = 0, 1, 2, -1
    model.normalizer_spec.name, model.normalizer_spec.add_dummy_prefix = "identity", True
    for text, kind in [("<unk>", 2), ("<s>", 3), ("</s>", 3)]:
        p = model.pieces.add()
        p.piece, p.score, p.type = text, 0.0, kind
    for b in range(256):
        p = model.pieces.add()
        p.piece, p.score, p.type = f"<0x{b:02X}>", 0.0, 6
    for rank, text in enumerate(pieces):
        p = model.pieces.add()
        p.piece, p.score, p.type = text, -float(rank), 1
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes(model.SerializeToString())
    return model


def test_load_sentencepiece_model_folder(tmp_path):
    """tokenizer.model alone (LLaMA-2 / Vicuna checkpoints) loads without sentencepiece."""
    folder = tmp_path / "spm"
    _write_sentencepiece_bpe(folder, ["▁", "h", "e", "l", "o", "w", "ll", "he", "▁he", "llo",
                                      "▁hello"])
    tok = tokenizer_lib.load_tokenizer(str(folder))
    assert tok.is_fast and (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (1, 2, 0)
    got = tok.convert_ids_to_tokens(tok.encode("hello hello world\n", add_special_tokens=False))
    # Merges by score: ll, he, ▁he, llo, ▁hello; "r", "d", "\n" fall back to bytes.
    assert got == ["▁hello", "▁hello", "▁", "w", "o", "<0x72>", "l", "<0x64>", "<0x0A>"]
    # Sentencepiece's dummy prefix also goes before a leading space.
    assert tok.convert_ids_to_tokens(tok.encode(" he", add_special_tokens=False)) == [
        "▁", "▁he"]
    assert tok.decode(tok.encode("hello world\n", add_special_tokens=False)) == "hello world\n"
    # tokenizer_config.json settings and added tokens are honoured, ids checked.
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "pad_token": "<pad>",
        "added_tokens_decoder": {"0": {"content": "<unk>", "special": True},
                                 "270": {"content": "<pad>", "special": True}},
    }))
    padded = tokenizer_lib.sentencepiece_llama_tokenizer(folder)
    assert padded.pad_token_id == 270
    assert padded.encode("he<pad>", add_special_tokens=False)[-1] == 270


def test_sentencepiece_trained_model_matches_sentencepiece(tmp_path):
    """A real sentencepiece BPE model: our conversion encodes as sentencepiece itself."""
    spm = pytest.importorskip(
        "sentencepiece", reason="sentencepiece is not installed: no reference to compare to")
    lines = [line for line in (TEXT + open(tokenizer_lib.__file__, encoding="utf-8").read())
             .splitlines() if line.strip() and not any(t in line for t in ("<s>", "</s>", "<unk>"))]
    folder = tmp_path / "trained"
    folder.mkdir()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(folder / "tokenizer"), vocab_size=500,
        model_type="bpe", byte_fallback=True, split_digits=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", minloglevel=2)
    ref = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    tok = tokenizer_lib.load_tokenizer(str(folder))
    for text in lines + SAMPLES:
        assert tok.encode(text, add_special_tokens=False) == ref.encode(text), text


def test_unloadable_folders_name_the_folder(tmp_path):
    empty = tmp_path / "empty_ckpt"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=f"no tokenizer in {empty}.*config.json"):
        tokenizer_lib.load_tokenizer(str(empty))
    broken = tmp_path / "broken_ckpt"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match=f"could not load the tokenizer in {broken}"):
        tokenizer_lib.load_tokenizer(str(broken))
    unigram = tmp_path / "unigram"
    model = _write_sentencepiece_bpe(unigram, ["▁", "a"])
    model.trainer_spec.model_type = 1  # unigram
    (unigram / "tokenizer.model").write_bytes(model.SerializeToString())
    with pytest.raises(ValueError, match="not BPE"):
        tokenizer_lib.sentencepiece_llama_tokenizer(unigram)
    if not tokenizer_lib._has_sentencepiece():
        with pytest.raises(ValueError, match=f"in {unigram}.*needs the sentencepiece package"):
            tokenizer_lib.load_tokenizer(str(unigram))


def test_wordpiece_tokenizer_for_the_qformer(tmp_path):
    """bert-base-uncased's WordPiece from a vocab.txt: lower-cased, split into ## pieces,
    [CLS] ... [SEP]; a missing file or a vocabulary without BERT's specials is an error."""
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "what", "is", "the", "cock", "##atoo",
             "doing", "?", "."]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    tok = tokenizer_lib.wordpiece_tokenizer(str(tmp_path / "vocab.txt"))
    enc = tok("What is the Cockatoo doing?", truncation=True, max_length=16)
    assert enc["input_ids"] == [2, 5, 6, 7, 8, 9, 10, 11, 3]
    assert tok("what is the cockatoo doing ?", truncation=True, max_length=4)["input_ids"] == [
        2, 5, 6, 3]
    assert tok.pad_token_id == 0 and tok.convert_tokens_to_ids("zebra") == 1
    assert tok("a zebra")["input_ids"] == [2, 1, 1, 3]
    with pytest.raises(ValueError, match="does not exist"):
        tokenizer_lib.wordpiece_tokenizer(str(tmp_path / "missing.txt"))
    (tmp_path / "bad.txt").write_text("hello\nworld\n")
    with pytest.raises(ValueError, match="lacks"):
        tokenizer_lib.wordpiece_tokenizer(str(tmp_path / "bad.txt"))
