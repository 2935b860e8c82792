"""Model-running evaluation: benchmark loaders, `evaluate.run_benchmark` / the CLI, lmms-eval model.

Each benchmark's sample is hand-made in its real release layout under tmp_path (MLVU json/ +
video/<n>_<task>/, Video-MME videomme/ rows + data/<videoID>.mp4, Music-AVQA avqa-test.json +
videos/<video_id>.mp4), the videos symlinks to the shared clips. The model is a tiny demo-config
checkpoint with random weights, written as tests/test_infer.py writes one.

Speed: the prompt splice compiles once per prompt length (`infer.Predictor.encode`), so the
questions a test answers are worded to the same token count within a benchmark, and every answered
item uses the 2-frame clip.
"""

import importlib
import io
import json
import pathlib
import sys
import types

import numpy as np
import pytest
from absl import flags
from absl.testing import flagsaver

from longvid_jax import eval_data, evaluate, infer
from longvid_jax.metrics import multiple_choice, open_ended
from longvid_jax.metrics.common import InputFileError
from tests.conftest import MEDIA, REPO
from tests.helpers import tiny_checkpoint
from tests.test_train import record, small_config

CLIP_A = MEDIA / "realshort.mp4"
CLIP_B = MEDIA / "cockatoo.mp4"


def _link(dst: pathlib.Path, src: pathlib.Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.symlink_to(src)


def _write(path: pathlib.Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1))


# ---------------------------------------------------------------------------------- samples

MLVU_COUNT = [
    {"video": "count_7.mp4", "duration": 312.5, "question": "How many times does the bird bow?",
     "candidates": ["2", "5", "3", "4"], "answer": "3", "question_type": "count"},
    {"video": "count_7.mp4", "duration": 312.5, "question": "How many windows are shown?",
     "candidates": ["1", "6", "4", "8"], "answer": "1", "question_type": "count"},
]
MLVU_NEEDLE = [  # as many tokens as MLVU_COUNT[0]'s prompt (51)
    {"video": "needle_12.mp4", "duration": 481.0, "question": "What is on the window sill now?",
     "candidates": ["a cup", "a cat", "a book", "a plant"], "answer": "a plant",
     "question_type": "needle"},
]
MLVU_PLOTQA = [
    {"video": "movie101_66.mp4", "duration": 2052.0,
     "question": "What color is the bird in the video?",
     "candidates": ["Black", "Grey", "Red", "Green", "White"], "answer": "White",
     "question_type": "plotQA"},
]


def make_mlvu(root: pathlib.Path) -> pathlib.Path:
    for task, name in eval_data.MLVU_TASK_FILES.items():
        items = {"count": MLVU_COUNT, "needle": MLVU_NEEDLE, "plotQA": MLVU_PLOTQA}.get(task, [])
        _write(root / "json" / name, items)
    _link(root / "video" / "4_count" / "count_7.mp4", CLIP_A)
    _link(root / "video" / "2_needle" / "needle_12.mp4", CLIP_A)
    _link(root / "video" / "1_plotQA" / "movie101_66.mp4", CLIP_B)
    return root


VIDEOMME_ROWS = [
    {"video_id": "001", "duration": "short", "domain": "Knowledge",
     "sub_category": "Humanity & History", "url": "https://www.youtube.com/watch?v=fFjv93ACGo8",
     "videoID": "fFjv93ACGo8", "question_id": "001-1", "task_type": "Counting Problem",
     "question": "How many windows are visible in the video?",
     "options": ["A. 1.", "B. 2.", "C. 3.", "D. 4."], "answer": "A"},
    {"video_id": "001", "duration": "short", "domain": "Knowledge",
     "sub_category": "Humanity & History", "url": "https://www.youtube.com/watch?v=fFjv93ACGo8",
     "videoID": "fFjv93ACGo8", "question_id": "001-2", "task_type": "Object Recognition",
     "question": "What is standing on the window sill in the video?",
     "options": ["A. A cat.", "B. Plants.", "C. Shoes.", "D. A radio."], "answer": "B"},
    {"video_id": "302", "duration": "medium", "domain": "Life Record",
     "sub_category": "Pet & Animal", "url": "https://www.youtube.com/watch?v=Xm2uSQ6P0oA",
     "videoID": "Xm2uSQ6P0oA", "question_id": "302-1", "task_type": "Object Recognition",
     "question": "Which animal appears in the video?",
     "options": ["A. A cockatoo.", "B. A dog.", "C. A horse.", "D. A fish."], "answer": "A"},
]  # the three prompts have 79 tokens each


def make_videomme(root: pathlib.Path) -> pathlib.Path:
    # pandas / pyarrow are not in the venv: the rows are given as the JSON export beside the
    # parquet's place (eval_data reads the parquet itself where either is installed).
    _write(root / "videomme" / "test-00000-of-00001.json", VIDEOMME_ROWS)
    _link(root / "data" / "fFjv93ACGo8.mp4", CLIP_A)
    _link(root / "data" / "Xm2uSQ6P0oA.MP4", CLIP_A)  # lmms-eval also looks for .MP4 / .mkv
    return root


MUSIC_AVQA = [
    {"video_id": "00000272", "question_id": 12, "type": "[\"Audio\", \"Counting\"]",
     "question_content": "How many musical instruments were heard throughout the video?",
     "templ_values": "[]", "question_deleted": 0, "anser": "two"},
    {"video_id": "00003422", "question_id": 35, "type": "[\"Audio-Visual\", \"Temporal\"]",
     "question_content": "Where is the <FL> sounding instrument in the video?",
     "templ_values": "[\"first\"]", "question_deleted": 0, "anser": "left"},
    {"video_id": "00003422", "question_id": 36, "type": "[\"Visual\", \"Location\"]",
     "question_content": "Is the <Object> on the <LR> of the <Object>?",
     "templ_values": "[\"piano\", \"left\", \"violin\"]", "question_deleted": 0,
     "anser": "yes"},
]


def make_music_avqa(root: pathlib.Path) -> pathlib.Path:
    _write(root / "avqa-test.json", MUSIC_AVQA)
    _link(root / "videos" / "00000272.mp4", CLIP_A)
    _link(root / "videos" / "00003422.mp4", CLIP_A)
    return root


# ---------------------------------------------------------------------------------- loaders


def test_mlvu_loader_items_and_prompts(tmp_path):
    root = make_mlvu(tmp_path / "MLVU")
    items = eval_data.load_mlvu(root)
    assert [i.id for i in items] == ["count/count_7.mp4", "count/count_7.mp4#2",
                                     "needle/needle_12.mp4", "plotQA/movie101_66.mp4"]
    assert [i.task for i in items] == ["count", "count", "needle", "plotQA"]
    assert [i.answer for i in items] == ["C", "A", "D", "E"]
    assert items[0].video == str((root / "video/4_count/count_7.mp4").resolve())
    assert items[3].video == str(CLIP_B.resolve())  # video/1_plotQA/movie101_66.mp4
    assert all(i.max_new_tokens == 5 for i in items)
    assert items[0].prompt == (
        "Question: How many times does the bird bow?\nOptions:\n(A) 2\n(B) 5\n(C) 3\n(D) 4\n"
        "Respond with only the letter (A, B, C or D) of the correct option.")
    # Five candidates: TDC's text names A-D (original); corrected names all five letters.
    tail = "(E) White\nRespond with only the letter ({}) of the correct option."
    assert items[3].prompt.endswith(tail.format("A, B, C, D or E"))
    orig = eval_data.load_mlvu(root, compat="original")
    assert orig[3].prompt.endswith(tail.format("A, B, C or D"))
    assert orig[3].prompt == multiple_choice.mlvu_prompt(MLVU_PLOTQA[0], compat="original")
    assert [i.id for i in eval_data.load_mlvu(root, tasks=["plotQA"])] == [items[3].id]


def test_videomme_loader_items_and_prompts(tmp_path):
    root = make_videomme(tmp_path / "Video-MME")
    items = eval_data.load_videomme(root)
    assert [(i.id, i.task, i.answer) for i in items] == [
        ("001-1", "Counting Problem", "A"), ("001-2", "Object Recognition", "B"),
        ("302-1", "Object Recognition", "A")]
    assert items[0].video == str((root / "data" / "fFjv93ACGo8.mp4").resolve())
    assert items[2].video == str((root / "data" / "Xm2uSQ6P0oA.MP4").resolve())
    assert all(i.max_new_tokens == 16 for i in items)
    assert items[1].prompt == (
        "Select the best answer to the following multiple-choice question based on the video and "
        "the subtitles. Respond with only the letter (A, B, C, or D) of the correct option.\n"
        "What is standing on the window sill in the video?\n"
        "A. A cat.\nB. Plants.\nC. Shoes.\nD. A radio.\n\n"
        "Answer with the option's letter from the given choices directly.")
    assert items[2].record["duration"] == "medium"


def test_videomme_parquet(tmp_path):
    root = tmp_path / "Video-MME"
    parquet = root / eval_data.VIDEOMME_PARQUET
    parquet.parent.mkdir(parents=True)
    try:
        import pandas as pd
    except ImportError:
        pd = None
    if pd is None:
        parquet.write_bytes(b"PAR1 not read here PAR1")
        with pytest.raises(InputFileError, match="pandas / pyarrow are not installed"):
            eval_data.read_videomme_rows(root)
        return
    pd.DataFrame(VIDEOMME_ROWS).to_parquet(parquet)  # pragma: no cover - needs pandas
    rows, source = eval_data.read_videomme_rows(root)
    assert source == parquet and rows == VIDEOMME_ROWS


def test_music_avqa_loader_items_and_prompts(tmp_path):
    root = make_music_avqa(tmp_path / "Music-AVQA")
    items = eval_data.load_music_avqa(root)
    assert [(i.id, i.task, i.answer) for i in items] == [
        ("12", "Audio/Counting", "two"), ("35", "Audio-Visual/Temporal", "left"),
        ("36", "Visual/Location", "yes")]
    assert items[0].prompt == ("How many musical instruments were heard throughout the video? "
                               "Answer with a single word or phrase.")
    assert items[1].prompt == ("Where is the first sounding instrument in the video? "
                               "Answer with a single word or phrase.")
    assert items[2].prompt == ("Is the piano on the left of the violin? "
                               "Answer with a single word or phrase.")
    assert items[2].prompt == open_ended.music_avqa_question(MUSIC_AVQA[2])
    assert items[0].video == str((root / "videos" / "00000272.mp4").resolve())
    assert items[0].max_new_tokens == 16


def test_loader_errors_name_the_file(tmp_path):
    root = make_mlvu(tmp_path / "MLVU")
    (root / "json" / "3_ego.json").unlink()
    with pytest.raises(InputFileError, match=r"3_ego\.json: no such file"):
        eval_data.load_mlvu(root)
    _write(root / "json" / "3_ego.json", [{"video": "ego_1.mp4", "question": "Q?"}])
    with pytest.raises(InputFileError, match=r"3_ego\.json: record 0 has no field 'candidates'"):
        eval_data.load_mlvu(root)
    _write(root / "json" / "3_ego.json", [{**MLVU_PLOTQA[0], "video": "ego_9.mp4"}])
    with pytest.raises(InputFileError, match=r"video .*video/3_ego/ego_9\.mp4 not found"):
        eval_data.load_mlvu(root)
    assert len(eval_data.load_mlvu(root, check_videos=False)) == 5

    mme = make_videomme(tmp_path / "mme")
    (mme / "data" / "Xm2uSQ6P0oA.MP4").unlink()
    with pytest.raises(InputFileError, match=r"row 2.*data/Xm2uSQ6P0oA\.mp4 not found"):
        eval_data.load_videomme(mme)
    with pytest.raises(InputFileError, match=r"test-00000-of-00001\.parquet: no such file"):
        eval_data.load_videomme(tmp_path / "MLVU")

    avqa = make_music_avqa(tmp_path / "avqa")
    _write(avqa / "avqa-test.json", [{**MUSIC_AVQA[1], "templ_values": "[]"}])
    with pytest.raises(InputFileError, match=r"avqa-test\.json record 0 \(question 35\).*1 "
                       r"placeholders but 0"):
        eval_data.load_music_avqa(avqa)
    with pytest.raises(ValueError, match="no model-running loader"):
        eval_data.load("timechat_tvg", avqa)


def test_take_spreads_over_tasks():
    items = [eval_data.EvalItem(str(i), "v", "p", "A", t, 5, {})
             for i, t in enumerate("aaabbc")]
    assert [i.id for i in eval_data.take(items, 2)] == ["0", "3"]
    assert [i.id for i in eval_data.take(items, 4)] == ["0", "1", "3", "5"]
    assert len(eval_data.take(items, None)) == 6 and len(eval_data.take(items, 99)) == 6


# ------------------------------------------------------------------------------ model runs


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(config, workdir, predictor): a tiny demo-config checkpoint with random weights."""
    tmp = tmp_path_factory.mktemp("eval_run")
    config = small_config(tmp, [record(CLIP_A)], **{"input.batch_size": 1})
    workdir = tmp / "run"
    params = tiny_checkpoint(config, workdir, step=1, seed=7)
    predictor = infer.Predictor(config, params=params, log=io.StringIO())
    return config, workdir, predictor


def test_cli_runs_mlvu_and_writes_per_task_scores(model, tmp_path, capsys):
    _, workdir, predictor = model
    root = make_mlvu(tmp_path / "MLVU")
    out = tmp_path / "out" / "mlvu.json"
    # `--config.x=y` overrides are defined from sys.argv when the flag is, so in-process the
    # checkpoint's config (demo, 8 frames) is given as a config file of its own.
    cfg_file = tmp_path / "tiny_tdc.py"
    base = str(REPO / "configs" / "tdc.py")
    cfg_file.write_text(
        "import importlib.util\n\n\ndef get_config(arg=None):\n"
        f"    spec = importlib.util.spec_from_file_location('base', {base!r})\n"
        "    module = importlib.util.module_from_spec(spec)\n"
        "    spec.loader.exec_module(module)\n"
        "    c = module.get_config(arg)\n"
        "    c.input.max_frames = 8\n"
        "    return c\n")
    evaluate._define_run_flags()
    with flagsaver.flagsaver():
        flags.FLAGS(["evaluate", f"--config={cfg_file}", f"--checkpoint={workdir}",
                     "--benchmark=mlvu", f"--data={root}", "--limit=2", f"--output={out}"])
        evaluate.main(["evaluate"])
    printed = capsys.readouterr().out
    assert "mlvu (compat=corrected, 2 items)" in printed and "Acc" in printed
    result = json.loads(out.read_text())
    preds = json.loads((tmp_path / "out" / "mlvu.predictions.json").read_text())
    assert [p["task_type"] for p in preds] == ["count", "needle"]  # one per task (--limit=2)
    assert set(result["per_task"]) == {"count", "needle"}
    assert all(v["n"] == 1 for v in result["per_task"].values())
    acc = [result["scores"][t] for t in ("count", "needle")]
    assert result["scores"]["Acc"] == pytest.approx(np.mean(acc))
    items = eval_data.load_mlvu(root)
    for pred, item in zip(preds, [items[0], items[2]]):
        letter = multiple_choice.parse_mlvu_answer(pred["decoded"], num_options=len(
            item.record["candidates"]))
        assert result["per_item"][item.id]["correct"] == (letter == item.answer)
        assert result["per_task"][item.task]["accuracy"] == 100.0 * (letter == item.answer)
        assert pred["prompt"] == item.prompt
    # The answers are the model's greedy answers to the loader's prompts, 5 tokens at most.
    want = predictor.answer(items[0].video, items[0].prompt, max_new_tokens=5)
    assert preds[0]["decoded"] == want["answer"] and len(want["tokens"]) <= 5
    assert result["run"]["items"] == 2 and result["run"]["checkpoint"] == str(workdir)


def test_run_videomme_and_music_avqa(model, tmp_path):
    config, _, predictor = model
    mme = make_videomme(tmp_path / "Video-MME")
    res = evaluate.run_benchmark(config, None, "videomme", mme, predictor=predictor,
                                 output=tmp_path / "mme.json")
    preds = json.loads((tmp_path / "mme.predictions.json").read_text())
    assert [v["video_id"] for v in preds] == ["001", "302"]
    assert [q["question_id"] for v in preds for q in v["questions"]] == ["001-1", "001-2", "302-1"]
    assert set(res["per_task"]) == {"Counting Problem", "Object Recognition"}
    assert res["per_task"]["Object Recognition"]["n"] == 2
    correct = [res["per_item"][q]["correct"] for q in ("001-1", "001-2", "302-1")]
    assert res["scores"]["overall"] == pytest.approx(100 * np.mean(correct))
    assert json.loads((tmp_path / "mme.json").read_text())["per_task"] == res["per_task"]

    avqa = make_music_avqa(tmp_path / "Music-AVQA")
    res = evaluate.run_benchmark(config, None, "music_avqa", avqa, predictor=predictor,
                                 limit=2, predictions_out=tmp_path / "avqa_preds.json")
    preds = json.loads((tmp_path / "avqa_preds.json").read_text())
    assert [p["idx"] for p in preds] == [12, 35]
    assert preds[0]["prompt"].endswith(" Answer with a single word or phrase.")
    assert preds[0]["pred"] == preds[0]["decoded"].strip().replace("Answer", "")
    assert res["per_task"] == {
        "Audio/Counting": {"accuracy": res["scores"]["Audio/Counting"], "n": 1},
        "Audio-Visual/Temporal": {"accuracy": res["scores"]["Audio-Visual/Temporal"], "n": 1}}
    assert res["scores"]["n_questions"] == 2
    assert (tmp_path / "avqa_preds.json.music_avqa.scores.json").is_file()


# ------------------------------------------------------------------------------- lmms-eval


def _fake_lmms_eval(monkeypatch) -> dict:
    """A minimal `lmms_eval` package: the `lmms` base class and both model registries."""
    registry: dict = {}
    manifests: dict = {}

    class lmms:
        is_simple = True

        def __init__(self):
            self._rank, self._world_size = 0, 1
            self.cache_hook = types.SimpleNamespace(
                calls=[], add_partial=lambda *a: self.cache_hook.calls.append(a))
            self.task_dict = {}

    def register_model(*names):
        def decorate(cls):
            assert issubclass(cls, lmms)
            for name in names:
                registry[name] = cls
            return cls
        return decorate

    class ModelManifest:
        def __init__(self, model_id, simple_class_path=None, chat_class_path=None):
            self.model_id, self.simple_class_path = model_id, simple_class_path

    class Registry:
        def register_manifest(self, manifest, overwrite=False):
            manifests[manifest.model_id] = manifest

    mods = {name: types.ModuleType(name) for name in (
        "lmms_eval", "lmms_eval.api", "lmms_eval.api.model", "lmms_eval.api.registry",
        "lmms_eval.models", "lmms_eval.models.registry_v2")}
    mods["lmms_eval.api.model"].lmms = lmms
    mods["lmms_eval.api.registry"].register_model = register_model
    mods["lmms_eval.models.registry_v2"].ModelManifest = ModelManifest
    mods["lmms_eval.models"].MODEL_REGISTRY_V2 = Registry()
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    return {"lmms": lmms, "registry": registry, "manifests": manifests}


def _reimport(monkeypatch):
    monkeypatch.delitem(sys.modules, "longvid_jax.lmms_eval_model", raising=False)
    return importlib.import_module("longvid_jax.lmms_eval_model")


def test_lmms_eval_model_on_fake_package(model, monkeypatch):
    _, _, predictor = model
    fake = _fake_lmms_eval(monkeypatch)
    mod = _reimport(monkeypatch)
    assert mod.HAVE_LMMS_EVAL and mod.REGISTERED
    assert fake["registry"]["longvid_jax"] is mod.LongVidJaxLMM
    assert issubclass(mod.LongVidJaxLMM, fake["lmms"])
    assert fake["manifests"]["longvid_jax"].simple_class_path == (
        "longvid_jax.lmms_eval_model.LongVidJaxLMM")

    lm = mod.LongVidJaxLMM(predictor=predictor, batch_size=1, device="cuda")
    docs = [{"videoID": "a", "question": "Q1"}, {"videoID": "b", "question": "Q2"}]
    lm.task_dict = {"videomme": {"test": docs}}
    paths = {"a": str(CLIP_A), "b": str(CLIP_A)}

    def doc_to_visual(doc):
        return [paths[doc["videoID"]]]

    requests = [types.SimpleNamespace(args=(
        f"{doc['question']}\nAnswer with the option's letter from the given choices directly.",
        {"max_new_tokens": n, "temperature": 0, "until": ["\n\n"], "do_sample": False},
        doc_to_visual, i, "videomme", "test")) for i, (doc, n) in enumerate(zip(docs, (3, 4)))]
    answers = lm.generate_until(requests)
    for req, doc, ans, n in zip(requests, docs, answers, (3, 4)):
        want = predictor.answer(paths[doc["videoID"]], req.args[0], max_new_tokens=n)
        assert ans == mod.cut_at_stop(want["answer"], ["\n\n"])
    assert [c[0] for c in lm.cache_hook.calls] == ["generate_until"] * 2

    with pytest.raises(NotImplementedError, match="generation only"):
        lm.loglikelihood(requests)
    bad = types.SimpleNamespace(args=("Q", {}, lambda d: [], 0, "videomme", "test"))
    with pytest.raises(ValueError, match="task 'videomme' doc 0: .*one video per request, got 0"):
        lm.generate_until([bad])
    image = types.SimpleNamespace(args=("Q", {}, lambda d: [object()], 1, "videomme", "test"))
    with pytest.raises(TypeError, match="doc 1: longvid_jax answers about video files"):
        lm.generate_until([image])
    with pytest.raises(ValueError, match="unknown model_args"):
        mod.LongVidJaxLMM(predictor=predictor, frames=8)


def test_lmms_eval_model_imports_without_lmms_eval(monkeypatch):
    monkeypatch.setitem(sys.modules, "lmms_eval", None)  # import lmms_eval -> ImportError
    mod = _reimport(monkeypatch)
    assert not mod.HAVE_LMMS_EVAL and not mod.REGISTERED
    assert mod.LongVidJaxLMM.__mro__[1] is object
    assert mod.cut_at_stop("B. Plants.\n\nBecause", ["\n\n", "Because"]) == "B. Plants."
    assert mod.cut_at_stop("C", "") == "C" and mod.cut_at_stop("C", None) == "C"
    with pytest.raises(ValueError, match="config=... and checkpoint=..."):
        mod.LongVidJaxLMM()
