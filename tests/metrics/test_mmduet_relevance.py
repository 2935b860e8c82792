"""MMDuet relevance post-processing against the mmduet_charades and mmduet_qvh fixtures."""

import math

import numpy as np
import pytest

from longvid_jax.metrics import mmduet_relevance as mr

TOL = 1e-9


def _flipped(predictions, thresholds_o, thresholds_c, windows=mr.WINDOW_SIZES):
    """(qid, window, k) where some normalised score lies in [corrected_t, original_t)."""
    flips = set()
    for pred in predictions:
        _, raw = mr.frames_from_debug_data(pred["debug_data"])
        for w in windows:
            norm = mr.minmax_normalize(mr.smooth_scores(raw, w))
            for k, (t_o, t_c) in enumerate(zip(thresholds_o, thresholds_c)):
                if any(t_c <= p < t_o for p in norm):
                    flips.add((pred["question_id"], w, k))
    return flips


def _assert_sweep_equal(mine, theirs):
    assert len(mine) == len(theirs)
    for a, b in zip(mine, theirs):
        assert a["smooth_window_size"] == b["smooth_window_size"]
        assert a["threshold"] == b["threshold"]
        np.testing.assert_allclose(a["scores"], b["scores"], rtol=0, atol=TOL)


# ---------------------------------------------------------------------------------------------
# Charades-STA grounding
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def charades(metric_case, both_modes):
    inputs, expected = metric_case("mmduet_charades")
    results = both_modes(mr.evaluate_mmduet_charades, inputs["pred_jsonl_lines"],
                         inputs["gold_json"])
    return inputs, expected, results


def test_charades_original_reproduces_fixture(charades):
    inputs, expected, results = charades
    out = results["original"]
    assert [repr(t) for t in out["thresholds"]] == expected["thresholds_repr"]
    _assert_sweep_equal(out["sweep"], expected["output_file"])
    # The printout: per threshold, then "best among all thresholds", per window (2 decimals).
    printed = iter(expected["stdout_parsed"])
    for w in mr.WINDOW_SIZES:
        for t in out["thresholds"]:
            line = next(printed)
            assert (line["window"], line["threshold"]) == (w, f"{t:.2f}")
            key = f"w{w}/t{t:.2f}"
            mine = [out["scores"][f"{key}/{m}"] for m in ("mIoU", "R@0.3", "R@0.5", "R@0.7")]
            assert [float(f"{v:.2f}") for v in mine] == line["scores"]
        line = next(printed)
        mine = [out["scores"][f"w{w}/best_thr/{m}"] for m in ("mIoU", "R@0.3", "R@0.5", "R@0.7")]
        assert [float(f"{v:.2f}") for v in mine] == line["best_among_all_thresholds"]
    qids = [p["question_id"] for p in inputs["pred_jsonl_lines"]]
    for derived in expected["derived_per_window"]:
        w = derived["window"]
        for k, row in enumerate(derived["per_video_iou"]):
            mine = [out["per_item"][q]["iou_per_threshold"][w][k] for q in qids]
            np.testing.assert_allclose(mine, row, rtol=0, atol=TOL)
        best = out["best_among_thresholds"][w]
        np.testing.assert_allclose(
            best["per_video"], derived["best_among_all_thresholds_per_video"], rtol=0, atol=TOL
        )
        np.testing.assert_allclose(
            best["scores"], derived["best_among_all_thresholds"], rtol=0, atol=TOL
        )
        if derived["normalized_scores"] is not None:
            for pred, row in zip(inputs["pred_jsonl_lines"], derived["normalized_scores"]):
                _, raw = mr.frames_from_debug_data(pred["debug_data"])
                mine = mr.minmax_normalize(mr.smooth_scores(raw, w))
                np.testing.assert_allclose(mine, row, rtol=0, atol=TOL)  # NaN == NaN here
    # Video 5 has no relevance scores: constant -> NaN -> never above a threshold -> IoU 0.
    assert all(math.isnan(x) for x in expected["derived_per_window"][0]["normalized_scores"][5])
    assert all(v == 0.0 for row in out["per_item"][5]["iou_per_threshold"].values() for v in row)


def test_charades_corrected_differs_exactly_on_threshold_ties(charades):
    inputs, _, results = charades
    orig, corr = results["original"], results["corrected"]
    assert corr["thresholds"] == [round(0.30 + 0.02 * k, 2) for k in range(21)]
    flips = _flipped(inputs["pred_jsonl_lines"], orig["thresholds"], corr["thresholds"])
    # A normalised 0.5000000000000001 fails the drifted "0.5" (0.5000000000000002).
    assert flips == {(14, 0, 10), (11, 1, 10)}
    changed = set()
    for qid, item in orig["per_item"].items():
        for w, row in item["iou_per_threshold"].items():
            for k, value in enumerate(row):
                if corr["per_item"][qid]["iou_per_threshold"][w][k] != value:
                    changed.add((qid, w, k))
    # Video 11's extra frame is outside its gold span and its intersection is empty: IoU stays 0.
    assert orig["per_item"][11]["iou_per_threshold"][1][10] == 0.0
    assert changed == {(14, 0, 10)}
    for a, b in zip(orig["sweep"], corr["sweep"]):
        same_config = (a["smooth_window_size"], round(a["threshold"], 2)) == (
            b["smooth_window_size"],
            b["threshold"],
        )
        assert same_config
        if (b["smooth_window_size"], b["threshold"]) == (0, 0.5):
            assert a["scores"] != b["scores"]
        else:
            assert a["scores"] == b["scores"]
    assert orig["best_among_thresholds"] == corr["best_among_thresholds"]


# ---------------------------------------------------------------------------------------------
# QVHighlights: highlights and grounding
# ---------------------------------------------------------------------------------------------

# Corrected gold spans: every run of consecutive clips whose best worker score is 4.
QVH_CORRECTED_GOLD = {
    2579: [[82, 96], [98, 100]],
    5071: [[22, 30], [62, 66]],
    311: [[26, 30]],
    1204: [[130, 140]],
    4432: [],
    77: [[40, 48]],
    8810: [[0, 60]],
    905: [[10, 16], [84, 88], [142, 144]],
    6650: [[64, 74]],
    1337: [[0, 8], [142, 146]],
    2024: [[102, 104]],
    3141: [[42, 44], [46, 48], [52, 54], [56, 62], [64, 66], [68, 70]],
}


@pytest.fixture(scope="module")
def qvh(metric_case, both_modes):
    inputs, expected = metric_case("mmduet_qvh")
    results = both_modes(mr.evaluate_mmduet_qvh, inputs["pred_jsonl_lines"], inputs["gold_jsonl"],
                         grounding_gold=inputs["grounding"]["gold_json"])
    return inputs, expected, results


def test_qvh_original_reproduces_fixture(qvh):
    inputs, expected, results = qvh
    out = results["original"]
    assert len(out["highlight_sweep"]) == len(expected["qvh_highlight_output_file"])
    for mine, theirs in zip(out["highlight_sweep"], expected["qvh_highlight_output_file"]):
        assert mine["smooth_window_size"] == theirs["smooth_window_size"]
        assert mine["results"]["brief"] == theirs["results"]["brief"]
        w = mine["smooth_window_size"]
        for name in ("Fair", "Good", "VeryGood"):
            block = theirs["results"][f"HL-min-{name}"]
            assert out["scores"][f"hl/w{w}/HL-min-{name}-mAP"] == block["HL-mAP"]
            assert out["scores"][f"hl/w{w}/HL-min-{name}-Hit1"] == block["HL-Hit1"]
    for w, rows in expected["derived_pred_saliency_scores"].items():
        for row in rows:
            if row["qid"] not in out["per_item"]:  # 9999 has no gold: dropped by eval_submission
                assert row["qid"] == 9999
                pred = next(p for p in inputs["pred_jsonl_lines"] if p["question_id"] == 9999)
                times, raw = mr.frames_from_debug_data(pred["debug_data"])
                clips, n = mr.clip_saliency_from_frames(
                    times, mr.smooth_scores(raw, int(w)), compat="original"
                )
            else:
                item = out["per_item"][row["qid"]]
                clips, n = item["pred_saliency_scores"][int(w)], item["two_sec_frames"]
                assert item["frame_interval"] == row["frame_interval"]
            assert n == row["two_sec_frames"]
            np.testing.assert_allclose(clips, row["pred_saliency_scores"], rtol=0, atol=TOL)
    qids = inputs["grounding"]["pred_jsonl_question_ids"]
    gold = out["grounding"]["gold_spans"]
    assert [gold[q] for q in qids] == expected["grounding"]["qvh_to_charades_format_timestamps"]
    _assert_sweep_equal(out["grounding"]["sweep"], expected["grounding"]["output_file"])
    for mine, line in zip(
        out["grounding"]["best_among_thresholds"],
        expected["grounding"]["stdout_best_among_all_thresholds"],
    ):
        assert mine["smooth_window_size"] == line["window"]
        assert [float(f"{v:.2f}") for v in mine["scores"]] == line["best_among_all_thresholds"]


def test_qvh_default_grounding_gold_matches_file(qvh):
    inputs, _, results = qvh
    out = mr.evaluate_mmduet_qvh(
        inputs["pred_jsonl_lines"], inputs["gold_jsonl"], compat="original", window_sizes=(0, 3)
    )
    for key, value in out["scores"].items():
        if "best_config" not in key:  # chosen over the windows evaluated
            assert results["original"]["scores"][key] == value


def test_qvh_corrected_differs_exactly_on_buggy_items(qvh):
    inputs, _, results = qvh
    orig, corr = results["original"], results["corrected"]
    # Highlights: the corrected rules (two_sec_frames rounding, constant-prediction HIT@1) do
    # not apply to any fixture video (6650's constant scores pick clip 0, which is not relevant).
    assert orig["highlight_sweep"] == corr["highlight_sweep"]
    for qid, item in orig["per_item"].items():
        assert item["pred_saliency_scores"] == corr["per_item"][qid]["pred_saliency_scores"]
        assert item["highlight"] == corr["per_item"][qid]["highlight"]
    # Grounding gold: changed for every video with a best-score-4 clip not ending the list.
    assert corr["grounding"]["gold_spans"] == QVH_CORRECTED_GOLD
    same_gold = {
        q for q, spans in QVH_CORRECTED_GOLD.items() if orig["grounding"]["gold_spans"][q] == spans
    }
    assert same_gold == {4432, 8810}
    preds = [p for p in inputs["pred_jsonl_lines"] if p["question_id"] in QVH_CORRECTED_GOLD]
    preds_by_qid = {p["question_id"]: p for p in preds}
    flips = _flipped(preds, orig["grounding"]["thresholds"], corr["grounding"]["thresholds"])
    for qid in QVH_CORRECTED_GOLD:
        o_rows = orig["per_item"][qid]["iou_per_threshold"]
        c_rows = corr["per_item"][qid]["iou_per_threshold"]
        _, raw = mr.frames_from_debug_data(preds_by_qid[qid]["debug_data"])
        if len(set(raw)) == 1:  # 6650: no relevance scores, nothing predicted, IoU 0 in both
            assert o_rows == c_rows
            assert all(v == 0.0 for row in c_rows.values() for v in row)
        elif qid in same_gold:
            for w in mr.WINDOW_SIZES:
                for k in range(21):
                    if (qid, w, k) not in flips:
                        assert o_rows[w][k] == c_rows[w][k], (qid, w, k)
        else:
            assert o_rows != c_rows, qid


def test_helpers():
    assert mr.smooth_scores([1.0, 2.0, 6.0], 1) == [1.5, 3.0, 4.0]
    assert mr.smooth_scores([1.0, 2.0], 5) == [1.5, 1.5]
    assert mr.minmax_normalize([2.0, 4.0, 3.0]) == [0.0, 1.0, 0.5]
    assert mr.gold_frame_mask([0.0, 1.0, 2.0, 3.0], [[1.0, 2.0]]) == [False, True, True, False]
    assert mr.frame_iou([0.9, 0.1, 0.8], [True, True, False], 0.5) == 1 / 3
    assert mr.frame_iou([0.9, 0.1, 0.8], [True, False, False], 0.5, largest_span=True) == 1.0
    assert mr.mask_to_spans([0.0, 0.5, 1.0, 1.5], [True, True, False, True]) == [
        [0.0, 0.5],
        [1.5, 1.5],
    ]
    times, scores = mr.frames_from_debug_data(
        [{"time": 0.0, "relevance_score": 0.25}, {"video_time": 0.5}]
    )
    assert (times, scores) == ([0.0, 0.5], [0.25, 0])
    clips, n = mr.clip_saliency_from_frames([0.0, 0.667, 1.333], [1.0, 2.0, 3.0])
    assert (clips, n) == ([6.0], 3)
    assert mr.clip_saliency_from_frames([0.0, 0.667], [1.0, 2.0], compat="original")[1] == 2
    with pytest.raises(ValueError, match="interval"):
        mr.clip_saliency_from_frames([0.0, 2.5], [1.0, 2.0])
    answer = {"relevant_clip_ids": [3, 4, 5, 9], "saliency_scores": [[4], [4], [2], [4]]}
    assert mr.qvh_to_charades_spans(answer, compat="original") == [[10, 10], [18, 20]]
    assert mr.qvh_to_charades_spans(answer, compat="corrected") == [[6, 10], [18, 20]]
    with pytest.raises(ValueError, match="compat"):
        mr.sweep_thresholds(compat="legacy")
