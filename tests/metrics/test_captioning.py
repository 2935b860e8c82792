"""Tests for longvid_jax.metrics.captioning: scorer wrappers and LongVALE segment captioning.

Fixture: shared/fixtures/metrics/longvale_segment_caption (README section 11). The Java scorers
are slow to start, so each evaluation runs once per module (module-scoped fixtures) and all share
one METEOR process.
"""

import os

import pytest

from longvid_jax.metrics import captioning as cap

TOL = 1e-9


@pytest.fixture(scope="module")
def seg_case(metric_case):
    return metric_case("longvale_segment_caption")


@pytest.fixture(scope="module")
def seg_results(seg_case, both_modes):
    inp, _ = seg_case
    return both_modes(cap.evaluate_longvale_segment_caption, inp["log_lines"], inp["annotation"])


def test_bad_compat():
    with pytest.raises(ValueError, match="compat"):
        cap.evaluate_longvale_segment_caption([], {}, compat="bogus")


def test_missing_java_gives_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no `java` anywhere
    with pytest.raises(cap.JavaNotFoundError, match="apt-get install default-jre"):
        cap.require_java()
    with pytest.raises(cap.JavaNotFoundError, match="java"):
        cap.ptb_tokenize({0: ["A man walks."]})
    assert os.environ["PATH"] == str(tmp_path)


def test_queries_match_fixture(seg_case):
    inp, exp = seg_case
    assert inp["seg_captioning_question_template"] == cap.LONGVALE_SEG_CAPTION_TEMPLATE
    for q in exp["queries"]:
        ann = inp["annotation"][q["video_id"]]
        s, e = ann["timestamps"][q["sentence_id"]]
        assert cap.longvale_seg_caption_query(ann["duration"], s, e) == {
            "start": q["start"],
            "end": q["end"],
            "query": q["query"],
        }
    assert cap.longvale_time_token(100.0, 2.5) == "02"  # half to even
    assert cap.longvale_time_token(100.0, 3.5) == "04"
    assert cap.longvale_time_token(10.0, 10.0) == "99"


def test_scorers_on_tiny_corpus():
    gts = {"a": ["a man is walking a dog"], "b": ["two girls play tennis"]}
    res = {"a": ["a man is walking a dog"], "b": ["a cat sleeps"]}
    m, m_each = cap.meteor(gts, res)
    assert m_each[0] == pytest.approx(1.0, abs=1e-3) and m_each[1] < 0.2 and 0 < m < 1
    c, c_each = cap.cider(gts, res)
    assert c_each[1] == 0.0 and c == pytest.approx(c_each.mean())
    b, _ = cap.bleu(gts, res)
    assert len(b) == 4 and all(0 < x < 1 for x in b)
    _, r_each = cap.rouge_l(gts, res)
    assert r_each[0] == pytest.approx(1.0) and r_each[1] == 0.0
    with pytest.raises(ValueError, match="same ids"):
        cap.cider(gts, {"a": res["a"]})
    tok = cap.tokenize_texts(["Serve..", 'He said "hi" (twice).'])
    assert tok == {"Serve..": "serve", 'He said "hi" (twice).': "he said hi -lrb- twice -rrb-"}


def test_seg_caption_original_matches_fixture(seg_case, seg_results):
    _, exp = seg_case
    scores = seg_results["original"]["scores"]
    assert list(scores) == ["BLEU4", "METEOR", "Rouge", "CIDEr"]
    for k, v in exp["eval_dict"].items():
        assert abs(scores[k] / 100 - v) <= TOL, k
        assert round(scores[k], 2) == exp["printed_percent"][k]
    printed = [line for line in exp["metric_py_stdout_tail"] if not line.startswith("ratio:")]
    assert printed == [f"{k}: {v:.2f}%" for k, v in scores.items()]


def test_seg_caption_corrected_equals_original_on_fixture(seg_case, seg_results):
    # The fixture's logs are in annotation order, so the positional-pairing bug does not apply:
    # every score and every per-segment value is identical.
    orig, corr = seg_results["original"], seg_results["corrected"]
    assert corr["scores"] == orig["scores"]
    assert corr["per_item"] == orig["per_item"]
    for key, item in corr["per_item"].items():
        assert item["reference_id"] == key


def test_seg_caption_pairing_by_position_bug(seg_case, seg_results):
    inp, _ = seg_case
    logs = list(reversed(inp["log_lines"]))  # same logs, another order
    orig = cap.evaluate_longvale_segment_caption(logs, inp["annotation"], compat="original")
    corr = cap.evaluate_longvale_segment_caption(logs, inp["annotation"], compat="corrected")
    ref = seg_results["corrected"]
    # Corrected: the order of the logs does not matter.
    for k, v in ref["scores"].items():
        assert corr["scores"][k] == pytest.approx(v, rel=1e-12, abs=1e-12), k
    for key, item in ref["per_item"].items():
        assert corr["per_item"][key]["reference"] == item["reference"]
        assert corr["per_item"][key]["CIDEr"] == pytest.approx(item["CIDEr"], rel=1e-12)
    # Original: reversed logs are paired with the wrong references (all but the middle one).
    wrong = [k for k, it in orig["per_item"].items() if it["reference_id"] != k]
    assert len(wrong) == len(logs) - 1
    for k in ref["scores"]:
        assert abs(orig["scores"][k] - ref["scores"][k]) > 1.0, k
    # Original fails when the counts differ (its assert); corrected rejects unknown ids.
    with pytest.raises(ValueError, match="by position"):
        cap.evaluate_longvale_segment_caption(logs[1:], inp["annotation"], compat="original")
    with pytest.raises(ValueError, match="unknown video"):
        cap.evaluate_longvale_segment_caption(
            [{**logs[0], "video_id": "nope"}], inp["annotation"], compat="corrected"
        )
