"""Music-AVQA: TDC's question template and the exact-match scorer, on records in the dataset's
real format (avqa-test.json fields, TDC eval_musicQA.py output fields)."""

import json

import pytest

from longvid_jax import evaluate
from longvid_jax.metrics import open_ended

# avqa-test.json records (the dataset spells the answer field "anser"; "type" is a string).
GROUND_TRUTH = [
    {"video_id": "00000272", "question_id": 30, "type": '["Audio", "Counting"]',
     "question_content": "How many instruments are sounding in the video?",
     "templ_values": "[]", "question_deleted": 0, "anser": "two"},
    {"video_id": "00000272", "question_id": 31, "type": '["Audio-Visual", "Comparative"]',
     "question_content": "Is the <Object> louder than the <Object>?",
     "templ_values": '["piano", "violin"]', "question_deleted": 0, "anser": "no"},
    {"video_id": "00000891", "question_id": 77, "type": '["Visual", "Location"]',
     "question_content": "Where is the <FL> instrument?", "templ_values": '["first"]',
     "question_deleted": 0, "anser": "left"},
    {"video_id": "00000891", "question_id": 78, "type": '["Audio-Visual", "Temporal"]',
     "question_content": "Which instrument sounds first?", "templ_values": "[]",
     "question_deleted": 0, "anser": "guitar"},
]
# TDC's output records ("Answer" already stripped by eval_musicQA.py).
PREDICTIONS = [
    {"idx": 30, "pred": "Two.", "correct_answer": "two", "type": '["Audio", "Counting"]'},
    {"idx": 31, "pred": "yes", "correct_answer": "no",
     "type": '["Audio-Visual", "Comparative"]'},
    {"idx": 77, "pred": ": the left", "correct_answer": "left", "type": '["Visual", "Location"]'},
]


def test_question_template_as_tdc_fills_it():
    q = open_ended.music_avqa_question(GROUND_TRUTH[1])
    assert q == "Is the piano louder than the violin? Answer with a single word or phrase."
    with pytest.raises(ValueError, match="placeholders"):
        open_ended.music_avqa_question({**GROUND_TRUTH[2], "templ_values": "[]"})


def test_accuracy_per_type_with_and_without_ground_truth():
    alone = open_ended.evaluate_music_avqa(PREDICTIONS)
    assert alone["scores"]["accuracy"] == pytest.approx(200 / 3)
    assert alone["scores"]["Audio/Counting"] == 100.0  # "Two." == "two" once normalised
    assert alone["scores"]["Audio-Visual"] == 0.0
    full = open_ended.evaluate_music_avqa(PREDICTIONS, GROUND_TRUTH)
    assert full["scores"]["n_questions"] == 4 and full["scores"]["accuracy"] == 50.0
    assert full["per_item"][78] == {"pred": None, "answer": "guitar",
                                    "type": "Audio-Visual/Temporal", "correct": False}
    assert open_ended.evaluate_music_avqa(PREDICTIONS, GROUND_TRUTH, compat="original") == full


def test_evaluate_cli_scores_music_avqa(tmp_path):
    pred, gt = tmp_path / "outputs.json", tmp_path / "avqa-test.json"
    pred.write_text(json.dumps(PREDICTIONS))
    gt.write_text(json.dumps(GROUND_TRUTH))
    out = evaluate.score("music_avqa", pred, gt)
    assert out["scores"]["accuracy"] == 50.0 and out["benchmark"] == "music_avqa"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"idx": 1}]))
    with pytest.raises(ValueError, match="bad.json"):
        evaluate.score("music_avqa", bad, gt)
