"""The offline Qwen2 tokenizer: known ids, special tokens, round trips, tiktoken parity, cache."""

import pytest

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
