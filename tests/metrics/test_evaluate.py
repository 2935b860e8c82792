"""`python -m longvid_jax.evaluate`: the benchmark registry, file loading, scoring, table, plots.

The fixtures' inputs are written to files in the originals' formats; the CLI's JSON must equal
what the benchmark's evaluate function returns on the same objects, and in compat="original" the
numbers the original scripts printed.
"""

import dataclasses
import json
import logging as std_logging
import os
import pathlib
import re
import subprocess
import sys
from collections.abc import Callable

import pytest
from absl import flags
from absl.testing import flagsaver

from longvid_jax import evaluate, metrics
from longvid_jax.metrics import (
    captioning,
    dense_captioning,
    grounding,
    highlight,
    mmduet_relevance,
    mmduet_streaming,
    multiple_choice,
    open_ended,
)
from longvid_jax.metrics.common import InputFileError
from tests.metrics.test_multiple_choice import VIDEOMME_RESULTS

REPO = pathlib.Path(__file__).resolve().parents[2]
TOL = 1e-9


def _dump(path: pathlib.Path, obj, *, jsonl: bool = False) -> pathlib.Path:
    if jsonl:
        path.write_text("".join(json.dumps(x) + "\n" for x in obj))
    else:
        path.write_text(json.dumps(obj))
    return path


def _same(a, b) -> bool:
    """Equal as JSON (NaN equals NaN)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _cli(argv: list[str]) -> None:
    """Runs the CLI in-process: parses the flags, calls main, restores the flags."""
    with flagsaver.flagsaver():
        flags.FLAGS(["evaluate", *argv])
        evaluate.main(["evaluate"])


# ----------------------------------------------------------------------------------------------
# One case per benchmark: which fixture; which inputs go to which file (flag -> input.json key,
# file name; names ending in .jsonl/.txt or "pred.json" are written as JSON lines, as the
# originals write them); extra keyword arguments of the direct call; and the numbers the
# original printed (score key -> value).
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    fixture: str
    files: dict[str, tuple[str, str]]
    kwargs: Callable[[dict], dict]
    printed: Callable[[dict], dict]


def _charades_printed(exp):
    want = {}
    for entry in exp["output_file"][::50]:
        key = f"w{entry['smooth_window_size']}/t{entry['threshold']:.2f}"
        names = ("mIoU", "R@0.3", "R@0.5", "R@0.7")
        want.update({f"{key}/{m}": v for m, v in zip(names, entry["scores"])})
    return want


def _magqa_printed(exp):
    run = exp["online"]["analyze"]["default_num_examples_2000"]
    return {"in_span_score": run["mean_in_span_score"], "num_turns": run["mean_num_turns"]}


_NONE = lambda inp: {}  # noqa: E731

CASES = {
    "timechat_tvg": Case(
        "timechat_tvg",
        {"predictions": ("model_results", "tvg_results.json"),
         "ground_truth": ("gt_file", "test.caption_coco_format.json")},
        _NONE,
        lambda exp: {f"R1@{t}": v for t, v in exp["R1"].items()},
    ),
    "timechat_vhd": Case(
        "timechat_vhd",
        {"predictions": ("model_results", "vhd_results.json"),
         "ground_truth": ("gt_jsonl", "highlight_val_release.jsonl"),
         "annotations": ("coco_format_annotations", "val.caption_coco_format.json")},
        lambda inp: {"annotations": inp["coco_format_annotations"]},
        lambda exp: dict(exp["eval_vhd_metrics_json"]["brief"]),
    ),
    "longvale_grounding": Case(
        "longvale_grounding",
        {"predictions": ("answers", "log.txt"), "ground_truth": ("annotation", "anno.json")},
        _NONE,
        lambda exp: dict(exp["metrics"]),
    ),
    "longvale_segment_caption": Case(  # Java: PTB tokenizer + METEOR
        "longvale_segment_caption",
        {"predictions": ("log_lines", "log.txt"), "ground_truth": ("annotation", "anno.json")},
        _NONE,
        lambda exp: {k: v * 100 for k, v in exp["eval_dict"].items()},
    ),
    "mmduet_charades": Case(
        "mmduet_charades",
        {"predictions": ("pred_jsonl_lines", "pred.json"),
         "ground_truth": ("gold_json", "gold.json")},
        _NONE,
        _charades_printed,
    ),
    "mmduet_magqa": Case(
        "mmduet_magqa",
        {"predictions": ("pred_jsonl_lines_online", "pred.json"),
         "ground_truth": ("gold_json", "magqa_test.json"),
         "judge_scores": ("judge_table", "judge.json")},
        lambda inp: {"judge": mmduet_streaming.RecordedJudge(inp["judge_table"])},
        _magqa_printed,
    ),
    "mlvu": Case(
        "tdc_mlvu",
        {"predictions": ("decoded_model_outputs", "mlvu_outputs.json"),
         "ground_truth": ("task_json", "mlvu_tasks.json")},
        _NONE,
        lambda exp: dict(exp["world_size_1"]["final_res"]),
    ),
}


def _case(metric_case, tmp_path, benchmark):
    """Writes the case's files; returns (files by flag, direct(compat) -> result, printed)."""
    case = CASES[benchmark]
    inp, exp = metric_case(case.fixture)
    files = {}
    for flag, (key, name) in case.files.items():
        jsonl = name.endswith((".jsonl", ".txt")) or name == "pred.json"
        files[flag] = _dump(tmp_path / name, inp[key], jsonl=jsonl)
    evaluate_fn = metrics.BENCHMARKS[benchmark].evaluate
    args = [inp[case.files[flag][0]] for flag in ("predictions", "ground_truth")]

    def direct(compat):
        return evaluate_fn(*args, compat=compat, **case.kwargs(inp))

    return files, direct, case.printed(exp)


def _argv(benchmark, files, *more):
    return [f"--benchmark={benchmark}", *(f"--{k}={v}" for k, v in files.items()), *more]


@pytest.mark.parametrize("benchmark", list(CASES))
def test_cli_json_equals_evaluate_and_original_numbers(metric_case, tmp_path, benchmark, capsys):
    files, direct, printed = _case(metric_case, tmp_path, benchmark)
    out = tmp_path / "scores.json"
    _cli(_argv(benchmark, files, "--compat=original", f"--output={out}"))
    got = json.loads(out.read_text())
    want = evaluate.to_jsonable(direct("original"))
    assert (got["benchmark"], got["compat"]) == (benchmark, "original")
    assert _same(got["scores"], want["scores"])
    assert _same(got["per_item"], want["per_item"])
    assert _same(got["details"], {k: v for k, v in want.items() if k not in ("scores", "per_item")})
    assert got["files"]["predictions"] == str(files["predictions"].resolve())
    assert got["files"]["output"] == str(out.resolve())
    for key, value in printed.items():  # what the original scripts printed
        assert abs(got["scores"][key] - value) <= TOL, key
    # The table: every headline row present (no "n/a"), columns aligned.
    table = capsys.readouterr().out.split("\nwrote ")[0]
    rows = table.splitlines()[3:]
    assert rows and "n/a" not in table
    assert len({len(r) for r in rows}) == 1
    headline = metrics.BENCHMARKS[benchmark].headline
    for key, _ in evaluate.headline_scores(got["scores"], headline):
        assert any(r.split()[0] == key for r in rows), key


def test_corrected_is_default_and_output_next_to_predictions(metric_case, tmp_path):
    files, direct, _ = _case(metric_case, tmp_path, "timechat_tvg")
    _cli(_argv("timechat_tvg", files))
    out = pathlib.Path(f"{files['predictions']}.timechat_tvg.scores.json")
    got = json.loads(out.read_text())
    want = evaluate.to_jsonable(direct("corrected"))
    assert got["compat"] == "corrected"
    assert _same(got["scores"], want["scores"]) and _same(got["per_item"], want["per_item"])
    assert got["scores"] != evaluate.to_jsonable(direct("original"))["scores"]
    # score() is the same step, callable after predictions are produced.
    again = evaluate.score("timechat_tvg", files["predictions"], files["ground_truth"])
    assert _same(again["scores"], got["scores"])


def test_params_reach_the_evaluate_function(metric_case, tmp_path):
    files, _, _ = _case(metric_case, tmp_path, "mlvu")
    inp, exp = metric_case("tdc_mlvu")
    res = evaluate.score("mlvu", files["predictions"], files["ground_truth"], compat="original",
                         params=evaluate.parse_params(["world_size=8"]))
    assert res["params"] == {"world_size": 8}
    for key, value in exp["world_size_8"]["final_res"].items():
        assert abs(res["scores"][key] - value) <= TOL, key
    with pytest.raises(ValueError, match="not parameters of mlvu"):
        evaluate.score("mlvu", files["predictions"], files["ground_truth"], params={"nope": 1})
    assert evaluate.parse_params(["split=test", "sample=true", "n=3"]) == {
        "split": "test", "sample": True, "n": 3}
    with pytest.raises(ValueError, match="key=value"):
        evaluate.parse_params(["world_size"])


def test_plots(metric_case, tmp_path, caplog):
    files, _, _ = _case(metric_case, tmp_path, "timechat_tvg")
    _cli(_argv("timechat_tvg", files, f"--plot={tmp_path / 'plots'}", "--max_plots=3"))
    pngs = sorted((tmp_path / "plots").glob("*.png"))
    assert len(pngs) == 3
    for p in pngs:
        data = p.read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 2000
    # Points (VHD saliency, MAGQA reply times) and zero-length spans (MMDuet QVH gold) draw too.
    vhd_dir = tmp_path / "vhd_case"
    vhd_dir.mkdir()
    vhd_files, _, _ = _case(metric_case, vhd_dir, "timechat_vhd")
    vhd = evaluate.score("timechat_vhd", vhd_files["predictions"], vhd_files["ground_truth"],
                         extra_files={"annotations": vhd_files["annotations"]})
    paths = evaluate.write_plots(vhd, tmp_path / "vhd_plots", max_plots=2)
    assert len(paths) == 2 and all(p.stat().st_size > 2000 for p in paths)
    # Benchmarks without time spans write nothing and say so.
    mlvu_dir = tmp_path / "mlvu_case"
    mlvu_dir.mkdir()
    mlvu_files, _, _ = _case(metric_case, mlvu_dir, "mlvu")
    mlvu = evaluate.score("mlvu", mlvu_files["predictions"], mlvu_files["ground_truth"])
    # Listen on absl's logger itself: earlier tests in the same process (in-process CLIs,
    # libraries) may change its level or propagation.
    absl_logger = std_logging.getLogger("absl")
    absl_logger.addHandler(caplog.handler)
    try:
        with caplog.at_level("INFO", logger="absl"):
            assert evaluate.write_plots(mlvu, tmp_path / "mlvu_plots") == []
    finally:
        absl_logger.removeHandler(caplog.handler)
    assert "no time spans" in caplog.text
    assert not (tmp_path / "mlvu_plots").exists()


# ----------------------------------------------------------------------------------------------
# Errors name the file and the problem
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("benchmark,flag,content,message", [
    ("timechat_tvg", "predictions", None, "predictions file {}: no such file"),
    ("timechat_tvg", "predictions", lambda t: t[:500], "predictions file {}: not valid JSON"),
    ("timechat_tvg", "ground_truth", lambda t: t[:-3], "ground-truth file {}: not valid JSON"),
    ("timechat_tvg", "predictions", lambda t: "", "predictions file {}: is empty"),
    ("timechat_tvg", "predictions", lambda t: '[{"vname": "a", "query": "q", "id": 0}]',
     "predictions file {}: record 0 has no field 'generated_cap'"),
    ("timechat_tvg", "ground_truth", lambda t: '{"videos": []}',
     "ground-truth file {}: expected the coco format"),
    ("timechat_tvg", "ground_truth", lambda t: "[1, 2]",
     "ground-truth file {}: record 0 is a JSON int"),
    ("longvale_grounding", "predictions", lambda t: t.splitlines()[0] + '\n{"video_id": "b\n',
     "predictions file {}: line 2 is not valid JSON"),
])
def test_bad_files_are_named(metric_case, tmp_path, benchmark, flag, content, message):
    files, _, _ = _case(metric_case, tmp_path, benchmark)
    path = files[flag]
    if content is None:
        path.unlink()
    else:
        path.write_text(content(path.read_text()))
    with pytest.raises(InputFileError, match=re.escape(message.format(path))):
        evaluate.score(benchmark, files["predictions"], files["ground_truth"])


def test_directory_and_mismatched_files(metric_case, tmp_path):
    files, _, _ = _case(metric_case, tmp_path, "timechat_tvg")
    pred = files["predictions"]
    with pytest.raises(InputFileError, match=f"ground-truth file {tmp_path}: is a directory"):
        evaluate.score("timechat_tvg", pred, tmp_path)
    # Files that parse but do not fit together: both are named.
    other = _dump(tmp_path / "other_gt.json", {"annotations": [{"id": 999, "timestamp": [0, 1]}]})
    with pytest.raises(InputFileError, match="do not fit together") as info:
        evaluate.score("timechat_tvg", pred, other)
    assert str(pred.resolve()) in str(info.value) and str(other.resolve()) in str(info.value)
    # The CLI reports such errors in one line, without a traceback.
    with pytest.raises(SystemExit, match=f"error: predictions file {tmp_path / 'x.json'}: no such"):
        _cli(_argv("timechat_tvg", {**files, "predictions": tmp_path / "x.json"}))


def test_bad_arguments(metric_case, tmp_path):
    files, _, _ = _case(metric_case, tmp_path, "timechat_tvg")
    pred, gt = files["predictions"], files["ground_truth"]
    with pytest.raises(ValueError, match="unknown benchmark 'bogus'; known: timechat_tvg"):
        evaluate.score("bogus", pred, gt)
    with pytest.raises(flags.IllegalFlagValueError, match="benchmark"):
        _cli(["--benchmark=bogus", f"--predictions={pred}"])
    with pytest.raises(ValueError, match="compat"):
        evaluate.score("timechat_tvg", pred, gt, compat="fixed")
    with pytest.raises(ValueError, match="reads no \\['annotations'\\] file"):
        evaluate.score("timechat_tvg", pred, gt, extra_files={"annotations": gt})
    with pytest.raises(ValueError, match="needs a ground-truth file"):
        evaluate.score("timechat_tvg", pred, None)
    magqa_dir = tmp_path / "magqa"
    magqa_dir.mkdir()
    mfiles, _, _ = _case(metric_case, magqa_dir, "mmduet_magqa")
    with pytest.raises(ValueError, match="--judge_scores=FILE.*pluggable.*network"):
        evaluate.score("mmduet_magqa", mfiles["predictions"], mfiles["ground_truth"])


def test_registry():
    assert {name: b.evaluate for name, b in metrics.BENCHMARKS.items()} == {
        "timechat_tvg": grounding.evaluate_timechat_tvg,
        "timechat_vhd": highlight.evaluate_timechat_vhd,
        "timechat_dvc": dense_captioning.evaluate_timechat_dvc,
        "longvale_grounding": grounding.evaluate_longvale_grounding,
        "longvale_dense_caption": dense_captioning.evaluate_longvale_dense_caption,
        "longvale_segment_caption": captioning.evaluate_longvale_segment_caption,
        "mmduet_charades": mmduet_relevance.evaluate_mmduet_charades,
        "mmduet_qvh": mmduet_relevance.evaluate_mmduet_qvh,
        "mmduet_youcook2": dense_captioning.evaluate_mmduet_youcook2,
        "mmduet_magqa": mmduet_streaming.evaluate_mmduet_magqa,
        "mlvu": multiple_choice.evaluate_mlvu,
        "videomme": multiple_choice.evaluate_videomme,
        "music_avqa": open_ended.evaluate_music_avqa,
    }
    for name, bench in metrics.BENCHMARKS.items():
        assert bench.name == name and bench.description and bench.headline
        with pytest.raises(TypeError):
            bench.params["x"] = 1  # read-only defaults
    with pytest.raises(ValueError, match="not parameters"):
        metrics.Benchmark("x", grounding.evaluate_timechat_tvg, lambda *a: None, "d", ("a",),
                          {"nope": 1})
    scores = {"Acc": 1.0, "count": 2.0, "duration/short": 3, "duration/short/task/x": 4}
    assert evaluate.headline_scores(scores, ("Acc", "*", "missing")) == [
        ("Acc", 1.0), ("count", 2.0), ("missing", None)]
    assert evaluate.headline_scores(scores, ("duration/*",)) == [("duration/short", 3)]


def test_mlvu_folder_and_tdc_outputs(metric_case, tmp_path):
    files, direct, _ = _case(metric_case, tmp_path, "mlvu")
    inp, _ = metric_case("tdc_mlvu")
    data = tmp_path / "MLVU"
    (data / "json").mkdir(parents=True)
    for task, name in metrics.MLVU_TASK_FILES.items():  # the layout eval_mlvu.py reads
        _dump(data / "json" / name, inp["task_json"][task])
    from_folder = evaluate.score("mlvu", files["predictions"], data)
    assert _same(from_folder["scores"], evaluate.to_jsonable(direct("corrected"))["scores"])
    # TDC's own outputs-*.json carry the parsed letter as "pred" (no decoded text).
    letters = [{"task_type": it["task_type"], "video_name": it["video_name"], "pred": it["pred"]}
               for it in metric_case("tdc_mlvu")[1]["items"]]
    tdc_out = _dump(tmp_path / "outputs-2024.json", letters)
    res = evaluate.score("mlvu", tdc_out, data, compat="original")
    assert _same(res["scores"], evaluate.to_jsonable(direct("original"))["scores"])
    (data / "json" / "4_count.json").unlink()
    with pytest.raises(InputFileError, match="4_count.json: no such file"):
        evaluate.score("mlvu", files["predictions"], data)


def test_videomme_reads_answers_from_the_results_file(tmp_path):
    results = _dump(tmp_path / "videomme_results.json", VIDEOMME_RESULTS)
    for compat in ("original", "corrected"):
        res = evaluate.score("videomme", results, compat=compat)
        want = multiple_choice.evaluate_videomme(VIDEOMME_RESULTS, compat=compat)
        assert _same(res["scores"], evaluate.to_jsonable(want["scores"]))
    assert [k for k, _ in evaluate.headline_scores(res["scores"], ("overall", "duration/*"))] == [
        "overall", "duration/short", "duration/medium"]


def test_subprocess_end_to_end(metric_case, tmp_path):
    files, _, exp = _case(metric_case, tmp_path, "timechat_tvg")
    out = tmp_path / "out" / "tvg.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-m", "longvid_jax.evaluate", *_argv("timechat_tvg", files),
         "--compat=original", f"--output={out}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "R1@0.5" in proc.stdout and f"{exp['R1@0.5']:.4f}" in proc.stdout
    assert json.loads(out.read_text())["scores"]["R1@0.5"] == exp["R1@0.5"]
