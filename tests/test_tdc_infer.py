"""A tiny TDC release in the original layout, converted, answers a question about a real clip
(`longvid_jax/tdc_infer.py`): every stage runs, the layout matches the scene split, and the
first generated token is the argmax of the full forward over the same prompt."""

import dataclasses
import io
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convert import decoder_keys, qformer_keys, sva_keys, tdc_keys
from longvid_jax import tdc_infer
from longvid_jax.input import tokenizer as tokenizer_lib
from longvid_jax.models import decoder, tdc
from longvid_jax.models.video_llm import VIDEO_TOKEN_INDEX
from tests.conftest import MEDIA, REPO
from tests.convert import test_tdc_keys as rel

QWEN_VOCAB = 151646
LLM = decoder.make_config("tiny", hidden_size=48, head_dim=12, vocab_size=QWEN_VOCAB)
WORDS = ["what", "is", "the", "bird", "doing", "in", "this", "video", "?", "a", "on"]


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("tdc_release"))
    rng = np.random.default_rng(0)
    parts = {"llm": rel._llm_params(rng, LLM),
             "connector": rel._tree_from_rules(sva_keys.rules(rel.SVA), 0, rng),
             "compressor": rel._comp_params(rng),
             "siglip": rel._tree_from_rules(tdc_keys.vit_keys.rules(rel.SIGLIP),
                                            rel.SIGLIP.num_layers_run, rng),
             "dinov2": rel._tree_from_rules(tdc_keys.dinov2_keys.rules(rel.DINO),
                                            rel.DINO.num_layers_run, rng),
             "beats": rel._tree_from_rules(tdc_keys.beats_keys.rules(rel.BEATS),
                                           rel.BEATS.depth, rng)}
    state = {**decoder_keys.params_to_hf(parts["llm"], LLM),
             **sva_keys.params_to_hf(parts["connector"], rel.SVA),
             **qformer_keys.params_to_tdc(parts["compressor"], rel.COMP), **rel._extras(rng)}
    tdc_dir = os.path.join(root, "TDC-Qwen2-7B")
    rel.write_release(tdc_dir, state, {**rel.HF_CONFIG, "vocab_size": QWEN_VOCAB})
    towers = rel._write_towers(root, parts, rng)
    params, configs = tdc_keys.import_tdc(tdc_dir, **towers, overrides=rel.OVERRIDES)
    vocab = os.path.join(root, "vocab.txt")
    with open(vocab, "w") as f:  # a WordPiece vocabulary inside the tiny Q-Former's 49 ids
        f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    bert = tokenizer_lib.wordpiece_tokenizer(vocab)
    assert bert("What is the bird doing?")["input_ids"] == [2, 5, 6, 7, 8, 9, 13, 3]  # no [UNK]
    log = io.StringIO()
    pred = tdc_infer.TDCPredictor(params, configs, tokenizer_lib.qwen2_tokenizer(),
                                  bert_tokenizer=bert, encode_chunk=8, log=log)
    pred.release = (params, configs, vocab)  # for the CLI test
    return pred, log


def test_converted_release_answers_about_a_real_clip(predictor):
    pred, log = predictor
    question = "What is the bird doing in this video?"
    out = pred.answer(str(MEDIA / "cockatoo.mp4"), question, max_new_tokens=3)
    assert 1 <= len(out["tokens"]) <= 3 and isinstance(out["answer"], str)
    assert set(out["times"]) == {"decode", "encode", "split", "audio", "compress", "generate"}
    for stage in ("[decode]", "[encode]", "[compress]", "[generate]"):
        assert stage in log.getvalue()
    assert out["video"].shape == (out["video_tokens"], LLM.hidden_size)
    assert out["segments"] >= 1 and out["frames"] >= 1

    # The first answer token is the argmax of the whole model over the same prompt.
    conv = [{"from": "human", "value": "<image>\n" + question}]
    prompt = tdc_infer.chat.tokenize_conversation(
        conv, pred.tok, template="chatml_tdc", num_video_tokens=out["video_tokens"],
        add_generation_prompt=True)["input_ids"].astype(np.int32)[None]
    assert (prompt == VIDEO_TOKEN_INDEX).sum() == out["video_tokens"]
    model = tdc.TDCModel(pred.config)
    pos = np.arange(prompt.shape[1], dtype=np.int32)[None]
    logits = jax.jit(lambda p: model.apply(
        {"params": p}, model.apply({"params": p}, prompt, pos, None,
                                   jnp.asarray(out["video"])[None])[0][:, -1:],
        method=tdc.TDCModel.logits))(pred.params)
    assert out["tokens"][0] == int(np.argmax(np.asarray(logits[0, -1])))


def test_long_video_tokens_are_trimmed_per_chunk_to_the_context(predictor):
    """With a context 9 tokens too short for the video, every chunk loses its last
    ceil(9 / chunks) tokens, as the original trims them."""
    pred, _ = predictor
    question = "What is the bird doing?"
    full = pred.answer(str(MEDIA / "cockatoo.mp4"), question, max_new_tokens=1)
    text = pred.prompt_len_without_video(question)
    config = pred.config
    pred.config = dataclasses.replace(config, max_context=text + 16 + full["video_tokens"] - 9)
    try:
        short = pred.answer(str(MEDIA / "cockatoo.mp4"), question, max_new_tokens=1)
    finally:
        pred.config = config
    chunks = full["chunks"]
    assert chunks >= 2 and short["chunks"] == chunks
    assert short["video_tokens"] == full["video_tokens"] - chunks * -(-9 // chunks)


def test_missing_tower_or_bert_is_a_clear_error(predictor):
    pred, _ = predictor
    configs = {"siglip": None, "dinov2": None}
    with pytest.raises(ValueError, match="siglip"):
        tdc_infer.model_config(configs)
    with pytest.raises(ValueError, match="bert_tokenizer"):
        tdc_infer.TDCPredictor(pred.params, {"siglip": pred.config.siglip,
                                             "dinov2": pred.config.dinov2,
                                             "connector": pred.config.connector,
                                             "compressor": pred.config.compressor,
                                             "llm": pred.config.llm,
                                             "beats": pred.config.beats}, pred.tok)


def test_cli_answers_from_the_converted_orbax_checkpoint(predictor, tmp_path):
    pred, _ = predictor
    params, configs, vocab = pred.release
    tdc_keys.save_orbax(params, configs, str(tmp_path / "ckpt"))
    proc = subprocess.run(
        [sys.executable, "-m", "longvid_jax.tdc_infer", f"--checkpoint={tmp_path / 'ckpt'}",
         f"--video={MEDIA / 'cockatoo.mp4'}", "--question=What is the bird doing?",
         f"--bert_vocab={vocab}", "--max_new_tokens=2"],
        capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "[generate]" in proc.stderr and "[compress]" in proc.stderr


def test_converted_release_scores_mlvu_samples(predictor, tmp_path):
    """`evaluate.run_benchmark` with the TDC predictor on hand-made MLVU samples (real layout)."""
    from longvid_jax import evaluate
    from tests.test_eval_run import make_mlvu

    pred, _ = predictor
    data = make_mlvu(tmp_path / "MLVU")
    result = evaluate.run_benchmark(None, "tdc", "mlvu", data, limit=2,
                                    output=tmp_path / "scores.json", predictor=pred)
    assert result["run"]["items"] == 2 and result["per_task"]
    for row in result["per_task"].values():
        assert 0.0 <= row["accuracy"] <= 1.0 and row["n"] >= 1
    assert (tmp_path / "scores.json").exists()
