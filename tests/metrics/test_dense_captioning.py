"""Tests for longvid_jax.metrics.dense_captioning against the originals' fixtures.

Fixtures: shared/fixtures/metrics/{timechat_dvc, mmduet_youcook2_merge, longvale_dense_caption}
(README sections 3, 6, 10). Each evaluation (Java: PTB tokenizer + METEOR) runs once per module;
the parsers, merges and the SODA dynamic programme are tested without Java.
"""

import itertools

import numpy as np
import pytest

from longvid_jax.metrics import dense_captioning as dc
from longvid_jax.metrics.common import COMPAT_MODES

TOL = 1e-9
# Per-video metric keys of TimeChat/MMDuet eval_dvc (SODA key added per split).
TC_METRICS = (
    ["CIDER", "METEOR"]
    + [f"{m}@{t}" for t in dc.DVC_TIOUS for m in ("Precision", "Recall")]
    + ["Precision_Mean", "Recall_Mean", "F1_Score", "n_preds"]
)


@pytest.fixture(scope="module")
def timechat(metric_case):
    inp, exp = metric_case("timechat_dvc")
    results = {
        (case, mode): dc.evaluate_timechat_dvc(
            c["model_results"], c["gt_file"], compat=mode, split=c["gt_file_name"]
        )
        for case, c in inp["cases"].items()
        for mode in COMPAT_MODES
    }
    return inp, exp, results


@pytest.fixture(scope="module")
def mmduet(metric_case, both_modes):
    inp, exp = metric_case("mmduet_youcook2_merge")
    return inp, exp, both_modes(dc.evaluate_mmduet_youcook2, inp["pred_jsonl_lines"],
                                inp["gold_json"])


@pytest.fixture(scope="module")
def longvale(metric_case, both_modes):
    inp, exp = metric_case("longvale_dense_caption")
    return inp, exp, both_modes(dc.evaluate_longvale_dense_caption, inp["log_lines"],
                                inp["annotation"])


# ------------------------------------------------------------------------------------------------
# Shared checks for eval_dvc.py outputs (TimeChat and MMDuet)
# ------------------------------------------------------------------------------------------------


def _check_eval_dvc_original(result, exp, n_pred_file_videos, split_name):
    """Every number of eval_with_files: per video, means, printout, paragraph and its inputs."""
    scores, per_item = result["scores"], result["per_item"]
    keys = exp["per_video"]["key"]
    assert list(per_item) == keys
    for name, values in exp["per_video"].items():
        if name == "key":
            continue
        for key, v in zip(keys, values):
            assert abs(per_item[key][name] - v) <= TOL, (key, name)
    for name, v in exp["mean_over_videos"].items():
        got = scores[name] if name == "n_preds" else scores[name] / 100
        assert abs(got - v) <= TOL, name
    for name, v in exp["paragraph"].items():
        assert abs(scores[name] / 100 - v) <= TOL, name
    assert list(scores) == list(exp["printed"])
    for name, v in exp["printed"].items():
        assert round(scores[name], 1) == v, name
    # The printout, line by line.
    n_with_pred = sum(item["has_prediction"] for item in per_item.values())
    lines = exp["stdout"].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"[{split_name}]"))
    lines = lines[start:]
    assert lines[0] == (
        f"[{split_name}] gt video nums {len(keys)}; pred video nums {n_pred_file_videos}"
    )
    assert lines[1] == f"gt video nums {len(keys)}; pred video nums {n_with_pred}"
    assert lines[2] == f"evaluate data samples:  {len(keys)}"
    printed = [line for line in lines[4:] if " " in line and not line.endswith("captioning")]
    assert printed == [f"{k} {round(v, 1)}" for k, v in scores.items()]
    # The paragraphs evaluate_para received (zip pairs them by position).
    args = exp["evaluate_para_args"]
    assert [per_item[k]["para_gt"] for k in keys] == [g[0] for g in args["gt_paras"]]
    used = [per_item[k]["para_pred"] for k in keys]
    assert [p for p in used if p is not None] == args["predicted_paras"][: len(keys)]


def _check_corrected_vs_original(orig, corr, buggy_items, para_differs, filler_keys):
    """Corrected differs from original exactly on `buggy_items` (both directions)."""
    for key in filler_keys:  # the -1 fillers exist only in original mode
        assert key in orig["scores"] and key not in corr["scores"]
        assert all(key not in item for item in corr["per_item"].values())
    assert set(corr["scores"]) == set(orig["scores"]) - set(filler_keys)
    soda = [k for k in corr["scores"] if k.startswith("SODA_c_")]
    metric_names = TC_METRICS + soda
    for key, o in orig["per_item"].items():
        c = corr["per_item"][key]
        changed = [m for m in metric_names + ["pred_events"] if c[m] != o[m]]
        if key in buggy_items:
            assert "pred_events" in changed and len(changed) >= 2, key
        else:
            assert changed == [], (key, changed)
            assert c["gt_spans"] == o["gt_spans"] and c["gt_captions"] == o["gt_captions"]
    for name in ("Para_CIDER", "Para_METEOR"):
        assert (corr["scores"][name] != orig["scores"][name]) == para_differs, name
    # Means move exactly where an item moved, and equal the mean of the corrected items.
    for name in metric_names:
        moved = any(
            corr["per_item"][k][name] != orig["per_item"][k][name] for k in orig["per_item"]
        )
        assert (corr["scores"][name] != orig["scores"][name]) == moved, name
        mean = sum(item[name] for item in corr["per_item"].values()) / len(corr["per_item"])
        assert corr["scores"][name] == pytest.approx(mean if name == "n_preds" else mean * 100)


# ------------------------------------------------------------------------------------------------
# TimeChat
# ------------------------------------------------------------------------------------------------


def test_timechat_parser_original_matches_format_dvc(metric_case):
    inp, exp = metric_case("timechat_dvc")
    for case, c in inp["cases"].items():
        formatted = dc.format_timechat_dvc(c["model_results"], compat="original")
        assert formatted == exp["cases"][case]["format_dvc_output"], case
        counts = [len(v) for v in formatted.values()]
        assert exp["cases"][case]["format_dvc_stdout_tail"] == [
            f"predict avg {sum(counts) / len(counts)} events per video",
            f"parse failed number: {counts.count(0)}",
        ]


TC_CORRECTED_EVENTS = {
    "V53XmPeyjIU.mp4": [  # leading "Here are the steps:" no longer shifts the captions
        ([10.0, 25.0], "crack the eggs into a bowl."),
        ([28.0, 55.0], "whisk the eggs."),
        ([58.0, 90.0], "pour the eggs into the pan."),
        ([92.0, 128.0], "fold the omelette."),
    ],
    "mZwK0TBI1iY.mp4": [  # the empty step keeps its span and an empty caption
        ([5.0, 30.0], "slice the onions."),
        ([31.0, 70.0], ""),
        ([80.0, 118.0], "add the beef and brown it."),
        ([125.0, 160.0], "add tomato sauce and stir."),
        ([170.0, 230.0], "serve over spaghetti."),
    ],
    "JT1HjYMGRhk.mp4": [  # every fallback line, caption without the time text
        ([30.0, 60.0], "chop the onions finely."),
        ([65.0, 90.0], "fry the onions until brown."),
        ([95.0, 140.0], "add the rice and stir."),
    ],
    "ysK3QbU6w0o.mp4": [  # every fallback line ("At t seconds" -> [t - 20, t + 20])
        ([25.0, 65.0], "pour the batter into a tray."),
        ([50.0, 90.0], "bake the cake."),
    ],
}


def test_timechat_parser_corrected(metric_case):
    inp, _ = metric_case("timechat_dvc")
    for case, c in inp["cases"].items():
        orig = dc.format_timechat_dvc(c["model_results"], compat="original")
        corr = dc.format_timechat_dvc(c["model_results"], compat="corrected")
        for vid, events in corr.items():
            if vid in TC_CORRECTED_EVENTS:
                assert [(e["timestamp"], e["caption"]) for e in events] == TC_CORRECTED_EVENTS[vid]
                assert events != orig[vid]
            else:
                assert events == orig[vid], (case, vid)


def test_timechat_parser_other_formats():
    text = "start time 1.5, end time 4, a dog runs.\nstart time 5, end time 9, it jumps."
    with pytest.raises(NotImplementedError, match="pdb"):
        dc.parse_timechat_dvc(text, compat="original")
    assert dc.parse_timechat_dvc(text) == [
        {"timestamp": [1.5, 4.0], "caption": "a dog runs."},
        {"timestamp": [5.0, 9.0], "caption": "it jumps."},
    ]
    numbered = "1. 0 - 10 seconds, cut.\n2. 10 - 22 seconds, fry the onion for 30 seconds."
    assert dc.parse_timechat_dvc(numbered, compat="original")[1] == {
        "timestamp": [10.0, 22.0],
        "caption": "fry the onion for 30 .",  # every "seconds" removed
    }
    assert dc.parse_timechat_dvc(numbered) == [
        {"timestamp": [0.0, 10.0], "caption": "cut."},
        {"timestamp": [10.0, 22.0], "caption": "fry the onion for 30 seconds."},
    ]
    # str.replace of "0 - 10" also hits "90 - 100" in the original and corrupts two captions.
    text = "0 - 10 seconds, wash the rice.  90 - 100 seconds, cook the rice."
    assert [e["caption"] for e in dc.parse_timechat_dvc(text, compat="original")] == [
        "wash the rice.  9",
        "0 , cook the rice.",
    ]
    assert [e["caption"] for e in dc.parse_timechat_dvc(text)] == [
        "wash the rice.",
        "cook the rice.",
    ]
    assert dc.parse_timechat_dvc("nothing to see here") == []
    with pytest.raises(ValueError, match="compat"):
        dc.parse_timechat_dvc("0 - 1 seconds, x", compat="new")


@pytest.mark.parametrize("case", ["youcook2", "activitynet"])
def test_timechat_original_matches_fixture(timechat, case):
    inp, exp, results = timechat
    c = inp["cases"][case]
    split = c["gt_file_name"].split(".")[0]
    _check_eval_dvc_original(
        results[(case, "original")], exp["cases"][case], len(c["model_results"]), split
    )
    assert exp["cases"][case]["seed_invariant"]


def test_timechat_corrected(timechat):
    _, _, results = timechat
    # YouCook2: the four parsing bugs and the paragraph misalignment after Bv0yQm9d7kE.
    orig, corr = results[("youcook2", "original")], results[("youcook2", "corrected")]
    _check_corrected_vs_original(orig, corr, set(TC_CORRECTED_EVENTS), True, ["SODA_c_1"])
    keys = list(corr["per_item"])
    missing = keys.index("Bv0yQm9d7kE.mp4")
    assert corr["per_item"]["Bv0yQm9d7kE.mp4"]["para_pred"] == ""
    assert orig["per_item"][keys[-1]]["para_pred"] is None  # zip dropped the last GT paragraph
    for k in keys[missing + 1 :]:
        assert orig["per_item"][k]["para_pred"] != corr["per_item"][k]["para_pred"]
    # ActivityNet: every video has a prediction and no parsing bug applies: only the fillers go.
    orig, corr = results[("activitynet", "original")], results[("activitynet", "corrected")]
    _check_corrected_vs_original(orig, corr, set(), False, ["SODA_c_1", "SODA_c_2"])
    assert {k: v for k, v in orig["scores"].items() if k in corr["scores"]} == corr["scores"]


def test_timechat_soda_column_order_bug():
    """With >= 11 predictions the original's METEOR columns are in sorted string order."""
    steps = [
        f"step {w} of the recipe"
        for w in (
            "alpha",
            "bravo",
            "charlie",
            "delta",
            "echo",
            "foxtrot",
            "golf",
            "hotel",
            "india",
            "juliett",
            "kilo",
            "lima",
        )
    ]
    gt = {
        "annotations": [
            {
                "image_id": "v1.mp4",
                "duration": 130.0,
                "segments": [[10 * i, 10 * i + 10] for i in range(12)],
                "pure_cap": ". ".join(steps),
            }
        ]
    }
    text = "  ".join(f"{10.0 * i} - {10.0 * i + 10} seconds, {s}." for i, s in enumerate(steps))
    preds = [{"vname": "v1.mp4", "generated_cap": text}]
    orig = dc.evaluate_timechat_dvc(preds, gt, compat="original")
    corr = dc.evaluate_timechat_dvc(preds, gt, compat="corrected")
    assert corr["scores"]["SODA_c_2"] > orig["scores"]["SODA_c_2"] + 10
    for name in TC_METRICS:  # nothing else changes
        assert corr["scores"][name] == orig["scores"][name], name


# ------------------------------------------------------------------------------------------------
# MMDuet
# ------------------------------------------------------------------------------------------------


def test_mmduet_merge_and_gold(metric_case):
    inp, exp = metric_case("mmduet_youcook2_merge")
    for p in inp["pred_jsonl_lines"]:
        qid, turns = str(p["question_id"]), p["model_response_list"]
        orig = dc.merge_streamed_replies(turns, compat="original")
        corr = dc.merge_streamed_replies(turns, compat="corrected")
        assert orig == exp["merged_pred_tmp_file"][qid], qid
        replies = [t for t in turns if t["role"] == "assistant"]
        if not replies:  # video 3: nothing to merge in either mode
            assert corr == orig == []
            continue
        # Corrected: the first run is kept, spanning [0, last time of the run]; the rest as is.
        first_end = next(
            (t["time"] for a, t in itertools.pairwise(replies) if t["content"] != a["content"]),
            None,
        )
        first = corr[0]
        assert first["caption"] == replies[0]["content"] and first["timestamp"][0] == 0.0
        assert first_end is None or first["timestamp"][1] < first_end
        assert corr[1:] == orig
    gold = dc.mmduet_youcook2_ground_truth(
        inp["gold_json"], keep_ids={str(p["question_id"]) for p in inp["pred_jsonl_lines"]}
    )
    assert gold == exp["gold_tmp_file_val_json"]["annotations"]


def test_mmduet_original_matches_fixture(mmduet):
    inp, exp, results = mmduet
    result = results["original"]
    _check_eval_dvc_original(result, exp, len(inp["pred_jsonl_lines"]), "val")
    for qid, events in exp["merged_pred_tmp_file"].items():
        assert result["per_item"][qid]["pred_events"] == events
    assert exp["seed_invariant"]


def test_mmduet_corrected(mmduet):
    inp, _, results = mmduet
    with_reply = {
        str(p["question_id"])
        for p in inp["pred_jsonl_lines"]
        if any(t["role"] == "assistant" for t in p["model_response_list"])
    }
    assert with_reply == {str(i) for i in range(12)} - {"3"}
    _check_corrected_vs_original(
        results["original"], results["corrected"], with_reply, True, ["SODA_c_1"]
    )


# ------------------------------------------------------------------------------------------------
# LongVALE
# ------------------------------------------------------------------------------------------------


def _longvale_events(inp, compat):
    out = {}
    for log in inp["log_lines"]:
        vid = log["video_id"]
        merged = dc.merge_similar_sentences(dc.parse_longvale_dense_caption(log["answer"]))
        out[vid] = dc.longvale_positions_to_seconds(
            merged, inp["annotation"][vid]["duration"], compat=compat
        )
    return out


def test_longvale_parse_merge_convert(metric_case):
    inp, exp = metric_case("longvale_dense_caption")
    expected = exp["pred_result_after_merge_and_conversion"]["results"]
    assert _longvale_events(inp, "original") == expected
    corr = _longvale_events(inp, "corrected")
    for vid, events in corr.items():
        if vid == "Cc3Vv6Xx9Zz":  # "From 90 to 105": clamped to the video end
            assert events[:-1] == expected[vid][:-1]
            assert expected[vid][-1]["timestamp"][1] > 310.6
            assert events[-1]["timestamp"] == [279.54, 310.6]
        else:
            assert events == expected[vid], vid


def test_merge_similar_sentences_rules():
    def ev(s, e, text="she makes coffee."):
        return {"timestamp": [s, e], "sentence": text}

    chain = dc.merge_similar_sentences([ev(20, 30), ev(31, 50), ev(49, 60), ev(70, 80, "x.")])
    assert chain == [ev(20, 60), ev(70, 80, "x.")]
    assert dc.merge_similar_sentences([ev(30, 99), ev(30, 99)]) == [ev(30, 99), ev(30, 99)]
    assert dc.merge_similar_sentences([ev(0, 25), ev(30, 50)]) == [ev(0, 25), ev(30, 50)]
    assert dc.merge_similar_sentences([]) == []
    assert dc.parse_longvale_dense_caption(None) == []


def test_longvale_original_matches_fixture(longvale):
    inp, exp, results = longvale
    scores, per_item = results["original"]["scores"], results["original"]["per_item"]
    for name, v in exp["eval_dvc_full"].items():
        assert abs(scores[name] / 100 - v) <= TOL, name
    assert abs(scores["soda_c"] / 100 - exp["eval_soda"]["soda_c"]) <= TOL
    for name, v in exp["captioning_metrics"].items():
        assert abs(scores[name] - v) <= 100 * TOL, name
    expected = exp["pred_result_after_merge_and_conversion"]["results"]
    assert {vid: item["pred_events"] for vid, item in per_item.items()} == expected
    stdout = exp["metric_py_stdout_without_bleu_debug_lines"]
    assert stdout[1] == f"avg. outputs: {scores['avg_outputs']}"
    assert stdout[2] == f"available video number {len(per_item)}"
    assert stdout[3] == f"Found {len(inp['log_lines'])} logs"
    assert stdout[4:] == [f"{k}: {scores[k]:.2f}" for k in exp["captioning_metrics"]]
    # Per-video values are consistent with the totals.
    assert np.mean([it["soda_c"] for it in per_item.values()]) == pytest.approx(
        scores["soda_c"] / 100, abs=1e-12
    )
    assert per_item["Bb2Nn5Mm8Kk"]["n_preds"] == 0 and per_item["Bb2Nn5Mm8Kk"]["CIDEr"] == 0


def test_longvale_corrected(longvale):
    _, _, results = longvale
    orig, corr = results["original"], results["corrected"]
    # The only bug that applies (Cc3Vv6Xx9Zz's span past the end) moves that span but no score:
    # its IoU with the last GT event stays below 0.3 and SODA matches that GT event elsewhere.
    assert corr["scores"] == orig["scores"]
    for vid, o in orig["per_item"].items():
        c = corr["per_item"][vid]
        assert (c["pred_spans"] != o["pred_spans"]) == (vid == "Cc3Vv6Xx9Zz"), vid
        assert {k: v for k, v in c.items() if "pred_" not in k} == {
            k: v for k, v in o.items() if "pred_" not in k
        }


# ------------------------------------------------------------------------------------------------
# SODA dynamic programme and detection P/R (no Java)
# ------------------------------------------------------------------------------------------------


def _brute_force_matching(scores):
    g, p = scores.shape
    best = 0.0
    for k in range(1, min(g, p) + 1):
        for rows in itertools.combinations(range(g), k):
            for cols in itertools.combinations(range(p), k):
                best = max(best, sum(scores[r, c] for r, c in zip(rows, cols)))
    return best


def test_chased_dp_assignment_is_best_ordered_matching():
    rng = np.random.default_rng(0)
    for g, p in [(1, 1), (1, 4), (3, 2), (4, 4), (5, 3)]:
        scores = rng.uniform(0.0, 1.0, (g, p)) * (rng.uniform(size=(g, p)) > 0.3)
        assert dc.chased_dp_assignment(scores) == pytest.approx(_brute_force_matching(scores))
    iou = np.array([[0.9, 0.0], [0.0, 0.6]])
    meteor = np.array([[0.5, 0.2], [0.1, 0.25]])
    p, r, f = dc.soda_c_prf(iou, meteor)
    assert p == pytest.approx(0.6 / 2) and r == pytest.approx(0.6 / 2) and f == pytest.approx(0.3)


def test_detection_precision_recall():
    preds = [[0, 10], [20, 30], [100, 90]]  # reversed span: TimeChat's IoU sorts it
    gts = [[0, 10], [22, 30], [90, 100], [200, 210]]
    precision, recall, iou = dc.detection_precision_recall(preds, gts)
    assert iou.shape == (4, 3)
    assert iou[1, 1] == pytest.approx(0.8)
    assert precision == [1.0, 1.0, 1.0, 2 / 3]  # [20, 30] vs [22, 30]: IoU 0.8
    assert recall == [0.75, 0.75, 0.75, 0.5]
    precision, recall, _ = dc.detection_precision_recall([], gts)
    assert precision == [0.0] * 4 and recall == [0.0] * 4
