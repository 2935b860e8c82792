"""Grounding metrics against the TimeChat TVG and LongVALE grounding fixtures, both compat modes."""

from fractions import Fraction

import pytest

from longvid_jax.metrics import grounding

TOL = 1e-9


# ---------------------------------------------------------------------------------------------
# TimeChat TVG
# ---------------------------------------------------------------------------------------------

# Query ids whose answer hits a documented parser bug (fixtures README section 1), and the
# corrected parse.
TVG_BUGGY = {
    5: [[24.0, 30.0]],  # echoed prompt example "20.8 - 30.0" parsed (replace() result discarded)
    11: [[6.0, 12.0]],  # "start time ... 6 seconds, and the end time is 12" is one sentence
    12: [[21.0, 29.0]],  # "00:00:21 ... 00:00:29" -> [0, 0]
    15: [[14.0, 22.0]],  # "from 14.0 to 22.0" has no keyword
    16: [[21.0, 27.0]],  # "00:21 - 00:27" matched as "21 - 00"
}


@pytest.fixture(scope="module")
def tvg(metric_case, both_modes):
    inputs, expected = metric_case("timechat_tvg")
    results = both_modes(grounding.evaluate_timechat_tvg, inputs["model_results"],
                         inputs["gt_file"])
    return inputs, expected, results


def test_tvg_original_reproduces_fixture(tvg):
    _, expected, results = tvg
    out = results["original"]
    for thr, value in expected["R1"].items():
        assert out["scores"][f"R1@{thr}"] == pytest.approx(value, abs=TOL)
        assert out["scores"][f"R1@{thr}"] == value  # exact, same arithmetic order
    assert out["scores"]["n_parse_failed"] == expected["format_tvg_stdout_parse_failed_number"]
    assert out["scores"]["n_queries"] == 24
    for row in expected["per_query"]:
        item = out["per_item"][row["id"]]
        assert item["pred_spans"] == row["parsed_timestamp"]
        if row["iou_first_pred"] is None:
            assert item["iou"] is None
        else:
            assert item["iou"] == pytest.approx(row["iou_first_pred"], abs=TOL)
    for qid, entry in expected["format_tvg_output"].items():
        item = out["per_item"][int(qid)]
        assert item["pred_spans"] == entry["timestamp"]
        assert (item["vid"], item["query"]) == (entry["vid"], entry["query"])


def test_tvg_original_sample_run(tvg):
    inputs, expected, _ = tvg
    keep = set(inputs["sample_run"]["pred_query_ids"])
    preds = [p for p in inputs["model_results"] if p["id"] in keep]
    out = grounding.evaluate_timechat_tvg(preds, inputs["gt_file"], compat="original", sample=True)
    for thr, value in expected["sample_run"]["R1"].items():
        assert out["scores"][f"R1@{thr}"] == pytest.approx(value, abs=TOL)
    assert out["scores"]["n_queries"] == len(keep)
    with pytest.raises(ValueError, match="equal counts"):
        grounding.evaluate_timechat_tvg(preds, inputs["gt_file"], compat="original")


def test_tvg_corrected_differs_exactly_on_buggy_queries(tvg):
    inputs, _, results = tvg
    gt = {a["id"]: a["timestamp"] for a in inputs["gt_file"]["annotations"]}
    orig, corr = results["original"]["per_item"], results["corrected"]["per_item"]
    assert set(orig) == set(corr) == set(gt)
    for qid, gt_span in gt.items():
        if qid in TVG_BUGGY:
            assert corr[qid]["pred_spans"] == TVG_BUGGY[qid]
            assert corr[qid]["pred_spans"] != orig[qid]["pred_spans"]
            expected_iou = grounding.temporal_iou(TVG_BUGGY[qid][0], gt_span)
            assert corr[qid]["iou"] == pytest.approx(expected_iou, abs=TOL)
            assert corr[qid]["iou"] != orig[qid]["iou"]
        else:
            assert corr[qid]["pred_spans"] == orig[qid]["pred_spans"]
            assert corr[qid]["iou"] == orig[qid]["iou"]
    # Recomputing R@1 from the corrected per-query IoUs gives the corrected totals.
    ious = [corr[q]["iou"] for q in gt]
    for thr in grounding.R1_THRESHOLDS:
        hits = sum(1 for u in ious if u is not None and u >= thr)
        assert results["corrected"]["scores"][f"R1@{thr}"] == pytest.approx(hits * 100 / 24)
    assert results["corrected"]["scores"]["n_parse_failed"] == 2  # ids 13 (refusal) and 14 (empty)


@pytest.mark.parametrize(
    "text, original, corrected",
    [
        ("The event happens in 0.0 - 6.5 seconds.", [[0.0, 6.5]], [[0.0, 6.5]]),
        ("-3.0 - 13.0 seconds", [[3.0, 13.0]], [[3.0, 13.0]]),
        ("2. The event happens in 4. - 9. seconds.", [[4.0, 9.0]], [[4.0, 9.0]]),
        ("It happens at 19.0 - 12.0 seconds.", [[12.0, 19.0]], [[12.0, 19.0]]),
        ("It lasts from 1:05 to 1:20.", [], [[65.0, 80.0]]),
        ("Between 3 and 5 seconds.", [], [[3.0, 5.0]]),
        ("No idea.", [], []),
    ],
)
def test_parse_timechat_span_cases(text, original, corrected):
    assert grounding.parse_timechat_span(text, compat="original") == original
    assert grounding.parse_timechat_span(text, compat="corrected") == corrected


# ---------------------------------------------------------------------------------------------
# LongVALE grounding
# ---------------------------------------------------------------------------------------------

# (video_id, sentence_id) whose answer hits a documented parser bug, with the corrected positions.
LONGVALE_PARSE_BUGGY = {
    ("Qm9Zt0Lk2Pw", 0): [6, 30],  # "From 6 to 30" does not match \d{2}
    ("Qm9Zt0Lk2Pw", 2): [66, 100],  # "66 to 100" read as 66-10
    ("Hh4Rr7Tt1Yy", 2): [50, 70],  # reversed pair not swapped
    ("Dd4Ff7Gg0Jj", 3): [75, 100],  # "75 to 100" read as 75-10
}


@pytest.fixture(scope="module")
def longvale(metric_case, both_modes):
    inputs, expected = metric_case("longvale_grounding")
    results = both_modes(grounding.evaluate_longvale_grounding, inputs["answers"],
                         inputs["annotation"])
    return inputs, expected, results


def test_longvale_original_reproduces_fixture(longvale):
    _, expected, results = longvale
    out = results["original"]
    for name, value in expected["metrics"].items():
        assert out["scores"][name] == pytest.approx(value, abs=TOL)
    printed = dict(
        line.split(": ") for line in expected["metric_py_stdout"].splitlines() if ": " in line
    )
    for name, value in out["scores"].items():
        assert f"{value:.2f}" == printed[name]
    assert len(out["per_item"]) == len(expected["per_query"]) == 35
    for row, log in zip(expected["per_query"], expected["log_lines"]):
        item = out["per_item"][f"{row['video_id']}/{row['sentence_id']}"]
        assert item["query"] == row["query"]
        assert item["gt_normalised"] == pytest.approx(row["gt_normalised"], abs=TOL)
        assert item["matched"] == row["matched"]
        assert item["iou"] == row["iou_rounded"] == log["info"]["iou"]
        assert type(item["iou"]) is type(row["iou_rounded"])  # int 0 for unparsable answers
        assert item["answer"] == log["answer"]


def test_longvale_original_from_log_lines(longvale):
    inputs, expected, results = longvale
    out = grounding.evaluate_longvale_grounding(
        expected["log_lines"], inputs["annotation"], compat="original"
    )
    assert out["scores"] == results["original"]["scores"]


def _exact_iou(positions, video, sentence_id):
    duration = Fraction(str(video["duration"]))
    s, e = (Fraction(str(x)) / duration for x in video["timestamps"][sentence_id])
    a, b = (Fraction(p, 100) for p in positions)
    inter = max(min(b, e) - max(a, s), Fraction(0))
    return inter / (max(b, e) - min(a, s))


def test_longvale_corrected_differs_exactly_on_buggy_items(longvale):
    inputs, _, results = longvale
    orig, corr = results["original"]["per_item"], results["corrected"]["per_item"]
    assert set(orig) == set(corr)
    n_rounding = 0
    for key, o_item in orig.items():
        c_item = corr[key]
        vid, sid = c_item["video_id"], c_item["sentence_id"]
        video = inputs["annotation"][vid]
        parse_bug = (vid, sid) in LONGVALE_PARSE_BUGGY
        if parse_bug:
            assert c_item["pred_spans"][0] == pytest.approx(
                [p / 100 * video["duration"] for p in LONGVALE_PARSE_BUGGY[(vid, sid)]]
            )
        if c_item["matched"] is None:
            assert not parse_bug and o_item["matched"] is None
            assert c_item["iou"] == o_item["iou"] == 0
            continue
        positions = LONGVALE_PARSE_BUGGY.get((vid, sid))
        if positions is None:
            assert c_item["matched"] == o_item["matched"]
            positions = [int(x) for x in o_item["matched"].split()[::2]]
        exact = _exact_iou(positions, video, sid)
        assert c_item["iou"] == pytest.approx(float(exact), abs=1e-10)
        rounding_bug = (exact * 100).denominator != 1  # not a 2-decimal number
        n_rounding += rounding_bug and not parse_bug
        assert (c_item["iou"] != o_item["iou"]) == (parse_bug or rounding_bug), key
    assert n_rounding > 0
    # The documented threshold crossings: 0.6996 -> 0.7 and 0.2956 -> 0.3 no longer count.
    assert orig["x1A2b3C4d5E/1"]["iou"] == 0.7 and corr["x1A2b3C4d5E/1"]["iou"] < 0.7
    assert orig["Hh4Rr7Tt1Yy/3"]["iou"] == 0.3 and corr["Hh4Rr7Tt1Yy/3"]["iou"] < 0.3
    ious = [item["iou"] for item in corr.values()]
    assert results["corrected"]["scores"]["mIoU"] == pytest.approx(sum(ious) / len(ious) * 100)
    for thr in grounding.R1_THRESHOLDS:
        share = sum(u >= thr for u in ious) / len(ious) * 100
        assert results["corrected"]["scores"][f"R1@{thr}"] == pytest.approx(share)


def test_longvale_parser_cases():
    assert grounding.parse_longvale_span("From 66 to 100.", compat="original")["span"] == [
        0.66,
        0.1,
    ]
    assert grounding.parse_longvale_span("From 66 to 100.", compat="corrected")["span"] == [
        0.66,
        1.0,
    ]
    assert grounding.parse_longvale_span("Between 00 and 69.", compat="corrected")["span"] == [
        0.0,
        0.69,
    ]
    assert grounding.parse_longvale_span("From 6 to 30.", compat="original") is None
    assert grounding.parse_longvale_span("No timestamps.", compat="corrected") is None


def test_helpers_and_compat_validation():
    assert grounding.temporal_iou([0.0, 10.0], [5.0, 15.0]) == pytest.approx(1 / 3)
    assert grounding.temporal_iou([6.1, 6.1], [6.1, 12.0]) == 0.0
    assert grounding.temporal_iou([3.0, 3.0], [3.0, 3.0]) == 0.0
    assert grounding.recall_at_iou([0.3, None, 0.71], num=4) == {0.3: 50.0, 0.5: 25.0, 0.7: 25.0}
    assert grounding.mean_iou([0.5, None]) == 25.0
    with pytest.raises(ValueError, match="compat"):
        grounding.parse_timechat_span("1 - 2", compat="fixed")
    with pytest.raises(ValueError, match="compat"):
        grounding.evaluate_longvale_grounding([], {}, compat="")
    with pytest.raises(ValueError, match="arithmetic"):
        grounding.recall_at_iou([0.5], arithmetic="exact")
