"""Highlight metrics against the TimeChat VHD fixture (both compat modes)."""


import numpy as np
import pytest

from longvid_jax.metrics import highlight

TOL = 1e-9

# qids whose answer hits a documented parser bug (fixtures README section 2):
PARSE_BUGGY = {
    77,  # "There is 1 highlight moment": the "1" read as a time
    8810,  # "3.75" and "10.0" not read as scores, later scores shifted
    905,  # class 2: score appended without a time, times <= 10 and HH:MM:SS dropped
}
# 4432: no parse -> all-zero scores -> clip 0 -> a HIT at min score 2 (worker 2 gave clip 0 a 2).
HIT_BUGGY = {("Fair", 4432)}


@pytest.fixture(scope="module")
def vhd(metric_case, both_modes):
    inputs, expected = metric_case("timechat_vhd")
    results = both_modes(highlight.evaluate_timechat_vhd, inputs["model_results"],
                         inputs["gt_jsonl"], annotations=inputs["coco_format_annotations"])
    return inputs, expected, results


def test_vhd_original_reproduces_fixture(vhd):
    _, expected, results = vhd
    out = results["original"]
    assert {k: v for k, v in out["scores"].items() if k.startswith("HL")} == dict(
        expected["eval_vhd_metrics_json"]["brief"]
    )
    for name, _ in highlight.HL_THRESHOLDS:
        block = expected["eval_vhd_metrics_json"][f"HL-min-{name}"]
        assert out["scores"][f"HL-min-{name}-mAP"] == block["HL-mAP"]
        assert out["scores"][f"HL-min-{name}-Hit1"] == block["HL-Hit1"]
    assert out["scores"]["n_parse_failed"] == expected["format_vhd_stdout_parse_failed_number"]
    for qid, parse in expected["parse_highlights"].items():
        item = out["per_item"][int(qid)]
        for key in ("highlights", "timestamps", "scores"):
            assert item[key] == parse[key], (qid, key)
    for entry in expected["format_vhd_output"]:
        item = out["per_item"][entry["qid"]]
        np.testing.assert_allclose(
            item["pred_saliency_scores"], entry["pred_saliency_scores"], rtol=0, atol=TOL
        )
        assert (item["vid"], item["query"]) == (entry["vid"], entry["query"])
    for name, rows in expected["per_query_derived"].items():
        for row in rows:
            item = out["per_item"][row["qid"]]
            np.testing.assert_allclose(item["ap"][name], row["ap_per_worker"], rtol=0, atol=TOL)
            assert item["argmax_clip"] == row["argmax_clip"]
            assert item["hit"][name] == row["hit"]


def test_vhd_corrected_differs_exactly_on_buggy_items(vhd):
    inputs, _, results = vhd
    orig, corr = results["original"]["per_item"], results["corrected"]["per_item"]
    assert set(orig) == set(corr) == {r["id"] for r in inputs["model_results"]}
    for qid in orig:
        o, c = orig[qid], corr[qid]
        buggy = qid in PARSE_BUGGY
        assert (c["timestamps"], c["scores"]) != (o["timestamps"], o["scores"]) or not buggy
        assert (c["pred_saliency_scores"] != o["pred_saliency_scores"]) == buggy, qid
        assert (c["argmax_clip"] != o["argmax_clip"]) == buggy, qid
        for name, _ in highlight.HL_THRESHOLDS:
            # AP changes with the clip scores unless a worker's labels are all 0 or all 1.
            for w in range(3):
                if c["ap"][name][w] != o["ap"][name][w]:
                    assert buggy, (qid, name, w)
            hit_changed = c["hit"][name] != o["hit"][name]
            assert not hit_changed or buggy or (name, qid) in HIT_BUGGY, (qid, name)
            if (name, qid) in HIT_BUGGY:
                assert (o["hit"][name], c["hit"][name]) == (1.0, 0.0)
    # The corrected parses of the buggy answers.
    assert (corr[77]["timestamps"], corr[77]["scores"]) == ([46.0], [3.7])
    assert corr[77]["pred_saliency_scores"][22] == 3.7  # int((46 - 1) / 2) = 22
    assert corr[8810]["scores"] == [3.75, 4.0, 2.5, 10.0, 1.0]
    assert corr[905]["timestamps"] == [12.0, 8.0, 84.0, 86.5, 144.0]
    assert corr[905]["scores"] == [3.0, 2.7, 4.0, 3.7, 1.3]
    # Totals follow from the corrected per-query values.
    for name, _ in highlight.HL_THRESHOLDS:
        ap = np.array([corr[q]["ap"][name] for q in corr])
        hit = np.array([corr[q]["hit"][name] for q in corr])
        assert results["corrected"]["scores"][f"HL-min-{name}-mAP"] == round(100 * ap.mean(), 2)
        assert results["corrected"]["scores"][f"HL-min-{name}-Hit1"] == round(100 * hit.mean(), 2)


def test_vhd_durations_from_ground_truth(vhd):
    inputs, _, results = vhd
    out = highlight.evaluate_timechat_vhd(
        inputs["model_results"], inputs["gt_jsonl"], compat="original"
    )
    assert out["scores"] == results["original"]["scores"]


def test_clip_scores_partial_last_clip():
    # duration 61: 30 clips; t = 61 maps to clip 30 (README: an IndexError stops the run).
    with pytest.raises(IndexError):
        highlight.timechat_clip_scores([61.0], [3.0], 61, compat="original")
    clips = highlight.timechat_clip_scores([61.0, 3.0, 4.0], [3.0, 1.0, 2.0], 61)
    assert len(clips) == 30 and clips[1] == 1.5 and sum(clips) == 1.5
    assert highlight.timechat_clip_scores([70.0], [2.0], 61, compat="original") == [0.0] * 30


def test_parser_cases():
    text = "Highlight 1: 00:00:20 second, score 2.0\nHighlight 2: 5 second, score 3\nx: 30 second"
    assert highlight.parse_timechat_highlights(text, compat="corrected")["timestamps"] == [
        20.0,
        5.0,
    ]
    assert highlight.parse_timechat_highlights(text, compat="corrected")["scores"] == [2.0, 3.0]
    assert highlight.parse_timechat_highlights(text, compat="original")["timestamps"] == [30.0]
    none = highlight.parse_timechat_highlights("No highlight.", compat="corrected")
    assert none == {"highlights": [], "timestamps": [], "scores": []}
    with pytest.raises(ValueError, match="compat"):
        highlight.parse_timechat_highlights("", compat="buggy")


def test_ap_and_hit_helpers():
    assert highlight.average_precision(np.zeros(4), np.arange(4.0)) == 0.0
    assert highlight.average_precision(np.ones(4), np.arange(4.0)) == 1.0
    assert (
        highlight.average_precision(np.array([0, 1, 0, 1]), np.array([0.1, 0.9, 0.2, 0.8])) == 1.0
    )
    binary = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    assert highlight.hit_at_one([0.0, 0.0], binary, compat="original") == (0, 1.0)
    assert highlight.hit_at_one([0.0, 0.0], binary, compat="corrected") == (0, 0.0)
    assert highlight.hit_at_one([0.1, 0.5], binary) == (1, 1.0)
    assert highlight.hit_at_one([0.0, 0.0, 0.9], binary) == (2, 0.0)  # past the GT clips
    np.testing.assert_array_equal(highlight.fit_length([1.0, 2.0], 3), [1.0, 2.0, 0.0])
    np.testing.assert_array_equal(highlight.fit_length([1.0, 2.0], 1), [1.0])
