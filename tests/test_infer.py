"""The inference CLI end to end on a tiny demo-config model and the bundled clips (CPU).

The checkpoint is written with the trainer's `checkpoints.Checkpointer` in the trainer's layout
(`{"params", "opt_state", "step"}` under `<workdir>/checkpoints/<step>/state`), from freshly
initialised parameters: a real training step would add a minute of compilation to CI.
"""

import io
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longvid_jax import checkpoints, infer
from longvid_jax.input import decode
from longvid_jax.models import video_llm
from tests.helpers import tiny_checkpoint
from tests.test_train import SAMPLES, record, small_config

VIDEO = SAMPLES / "cockatoo.mp4"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("infer")
    config = small_config(tmp, [record(VIDEO)], **{"input.batch_size": 1})
    model_cfg = video_llm.make_config(config.model)
    model = video_llm.VideoLLM(model_cfg)
    workdir = tmp / "run"
    params = tiny_checkpoint(config, workdir, step=2, seed=3)
    return config, workdir, params, model


def test_single_video_streams_tokens_and_stage_times(setup):
    config, workdir, params, model = setup
    out, log = io.StringIO(), io.StringIO()
    (res,) = infer.run(config, str(workdir), video=str(VIDEO), question="What bird is this?",
                       max_new_tokens=6, stream=out, log=log)
    assert len(res["tokens"]) == 6 and res["frames"] > 0
    assert out.getvalue() == res["answer"] + "\n"
    text = log.getvalue()
    for stage in ("[load]", "[decode video]", "[encode]", "[prefill]", "[generate]",
                  "tokens/s", "encode: 100%"):
        assert stage in text, text
    assert set(res["times"]) == {"decode_video", "encode", "prefill", "generate"}

    # The chunked encode + splice + KV-cache prefill gives the full model's next token.
    pred = infer.Predictor(config, params=params, log=io.StringIO())
    example = infer.prepare_example(pred.input_cfg, pred.model_cfg, pred.tok, str(VIDEO),
                                    "What bird is this?")
    logits = jax.jit(lambda p, b: model.apply(
        {"params": p}, b, method=lambda m, x: m.logits(m(x)[0][:, -1:])))(params, example)
    assert res["tokens"][0] == int(np.argmax(np.asarray(logits)[0, -1]))


def test_batch_jsonl_one_answer_per_line_and_step_folder(setup, tmp_path):
    config, workdir, _, _ = setup
    lines = [{"video": str(VIDEO), "question": "Describe it."},
             {"video": "missing.mp4", "question": "Anything?"},
             record(VIDEO, question="What colour?")]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    dst = tmp_path / "out.jsonl"
    res = infer.run(config, str(workdir / "checkpoints" / "2"), batch_jsonl=str(src),
                    output=str(dst), max_new_tokens=3,
                    log=io.StringIO())
    written = [json.loads(x) for x in dst.read_text().splitlines()]
    assert len(written) == 3 and written == res
    assert "answer" in written[0] and written[2]["question"] == "What colour?"
    assert "missing.mp4" in written[1]["error"] and "answer" not in written[1]


def test_bad_inputs_name_the_file(setup, tmp_path):
    config, workdir, _, _ = setup
    with pytest.raises(decode.VideoDecodeError, match="nope.mp4"):
        infer.run(config, str(workdir), video=str(tmp_path / "nope.mp4"), question="Q?")
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x01 not a video" * 100)
    pred = infer.Predictor(config, str(workdir), log=io.StringIO())
    with pytest.raises(decode.VideoDecodeError, match="corrupt.mp4"):
        pred.answer(str(corrupt), "Q?", max_new_tokens=2)
    with pytest.raises(infer.InferenceError, match="no checkpoint"):
        infer.run(config, str(tmp_path), video=str(VIDEO), question="Q?")


def test_lora_checkpoint_is_restored_and_merged(setup, tmp_path):
    lora = pytest.importorskip("longvid_jax.models.lora")
    config, _, _, _ = setup
    config = config.copy_and_resolve_references()
    config.lora = {"rank": 2, "alpha": 4.0, "dropout": 0.0, "targets": lora.TDC_TARGETS,
                   "init": "gaussian"}
    lora_cfg = infer.lora_config(config)
    model_cfg = video_llm.make_config(config.model)
    abstract = infer.abstract_params(model_cfg, config.input, lora_cfg)
    leaves = jax.tree_util.tree_leaves_with_path(abstract)
    assert any("lora_b" in jax.tree_util.keystr(p) for p, _ in leaves)
    rng = np.random.default_rng(5)
    params = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * 0.1, x.dtype),
                          abstract)
    ckpt = checkpoints.Checkpointer(str(tmp_path / "checkpoints"))
    ckpt.save(1, {"params": params, "opt_state": {}, "step": jnp.asarray(1, jnp.int32)}, {},
              force=True)
    ckpt.close()
    pred = infer.Predictor(config, str(tmp_path), log=io.StringIO())
    want = lora.merge_lora(params, lora_cfg)
    assert jax.tree.structure(pred.params) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(pred.params), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
