"""MLVU (TDC eval_mlvu.py) against the tdc_mlvu fixture; Video-MME on a hand-made sample."""


import pytest

from longvid_jax.metrics import multiple_choice as mc

TOL = 1e-9


@pytest.fixture(scope="module")
def mlvu(metric_case):
    return metric_case("tdc_mlvu")


def _item_id(it):
    return f"{it['task_type']}/{it['video_name']}"


def _assert_scores(got, want):
    assert list(got) == list(want)  # the original's first-appearance order
    for k, v in want.items():
        assert abs(got[k] - v) <= TOL, k


def test_mlvu_original_items(mlvu):
    inp, exp = mlvu
    assert list(inp["task_json"]) == list(mc.MLVU_TASKS) == inp["task_order"]
    res = mc.evaluate_mlvu(inp["decoded_model_outputs"], inp["task_json"], compat="original",
                           stop_str=inp["stop_str"])
    assert len(res["per_item"]) == len(exp["items"]) == 33
    for it in exp["items"]:
        got = res["per_item"][_item_id(it)]
        assert (got["prompt"], got["answer"], got["pred"]) == (
            it["prompt"], it["answer"], it["pred"]), it["video_name"]


@pytest.mark.parametrize("world_size", [1, 8])
def test_mlvu_original_scores(mlvu, world_size):
    inp, exp = mlvu
    want = exp[f"world_size_{world_size}"]
    res = mc.evaluate_mlvu(inp["decoded_model_outputs"], inp["task_json"], compat="original",
                           world_size=world_size)
    _assert_scores(res["scores"], want["final_res"])
    assert res["acc_dict"] == want["acc_dict"]
    if world_size == 8:
        names = [it["video"] for task in inp["task_json"].values() for it in task]
        ranks = mc.iterable_dataset_shard_indices(len(names), 8)
        assert [[names[i] for i in r] for r in ranks] == want["per_rank_video_names"]
        assert sum(v["n_evaluations"] for v in res["per_item"].values()) == want["n_evaluated"]


def test_mlvu_corrected_differs_exactly_on_documented_bugs(mlvu):
    inp, _ = mlvu
    orig = mc.evaluate_mlvu(inp["decoded_model_outputs"], inp["task_json"], compat="original")
    corr = mc.evaluate_mlvu(inp["decoded_model_outputs"], inp["task_json"])
    # Parsing bugs: "Based on..." -> B, "ANSWER: B" -> A, no letter -> A; E unreadable.
    pred_bug = {"count/count_5.mp4": "C", "ego/ego_4.mp4": None, "ego/ego_5.mp4": "C",
                "needle/needle_3.mp4": "B", "needle/needle_4.mp4": None,
                "plotQA/plot_4.mp4": None, "anomaly_reco/anomaly_2.mp4": None,
                "topic_reasoning/topic_4.mp4": "E"}
    # Ground-truth letter: last duplicate (anomaly_5), answer not a candidate (topic_5).
    answer_bug = {"anomaly_reco/anomaly_5.mp4": "A", "topic_reasoning/topic_5.mp4": None}
    prompt_bug = {"topic_reasoning/topic_4.mp4"}  # five candidates, prompt says (A, B, C or D)
    correct_changes = {"count/count_5.mp4": True, "ego/ego_4.mp4": False,
                       "ego/ego_5.mp4": True, "needle/needle_3.mp4": True,
                       "topic_reasoning/topic_4.mp4": True}
    for key, o in orig["per_item"].items():
        c = corr["per_item"][key]
        if key in pred_bug:
            assert c["pred"] == pred_bug[key] != o["pred"], key
        else:
            assert c["pred"] == o["pred"], key
        if key in answer_bug:
            assert c["answer"] == answer_bug[key] != o["answer"], key
        else:
            assert c["answer"] == o["answer"], key
        assert (c["prompt"] != o["prompt"]) == (key in prompt_bug), key
        if key in correct_changes:
            assert c["correct"] == correct_changes[key] != o["correct"], key
        else:
            assert c["correct"] == o["correct"], key
    assert corr["per_item"]["topic_reasoning/topic_4.mp4"]["prompt"].endswith(
        "Respond with only the letter (A, B, C, D or E) of the correct option.")
    want = {"count": 80.0, "ego": 80.0, "needle": 75.0, "order": 75.0, "plotQA": 80.0,
            "anomaly_reco": 60.0, "topic_reasoning": 80.0, "Acc": 530.0 / 7}
    _assert_scores(corr["scores"], want)
    # Corrected mode counts every item once whatever the world size.
    assert mc.evaluate_mlvu(inp["decoded_model_outputs"], inp["task_json"],
                            world_size=8)["scores"] == corr["scores"]


def test_mlvu_prediction_matching_errors(mlvu):
    inp, _ = mlvu
    with pytest.raises(ValueError, match="no prediction"):
        mc.evaluate_mlvu(inp["decoded_model_outputs"][1:], inp["task_json"])
    extra = inp["decoded_model_outputs"] + [
        {"task_type": "count", "video_name": "nope.mp4", "decoded": "A"}]
    with pytest.raises(ValueError, match="without an MLVU item"):
        mc.evaluate_mlvu(extra, inp["task_json"])
    with pytest.raises(ValueError, match="compat"):
        mc.evaluate_mlvu(inp["decoded_model_outputs"], inp["task_json"], compat="new")


@pytest.mark.parametrize("text,n,want", [
    ("B", 4, "B"), (" c.", 4, "C"), ("(A)", 4, "A"), ("Answer: A", 4, "A"),
    ("Based on the video, C", 4, "C"), ("The answer is (B).", 4, "B"), ("", 4, None),
    ("ANSWER: B", 4, "B"), ("E", 4, None), ("E", 5, "E"), ("B) dog, girl, boy", 4, "B"),
    ("None of the options is correct.", 4, None), ("Normal", 4, None),
    ("Considering the plot, the answer is C", 4, "C"), ("a", 4, "A"),
    ("a cat sits, so D", 4, "D"), ("Best answer: D", 4, "D"), ("[C] Moon", 4, "C"),
])
def test_parse_choice_letter(text, n, want):
    assert mc.parse_choice_letter(text, n) == want


def test_parse_mlvu_answer_original_quirks():
    assert mc.parse_mlvu_answer("Based on the video, C", compat="original") == "B"
    assert mc.parse_mlvu_answer("ANSWER: B", compat="original") == "A"
    for text in ("", "c", "E", "Normal"):
        assert mc.parse_mlvu_answer(text, compat="original") == "A"
    assert mc.parse_mlvu_answer("D<|im_end|>", compat="original") == "D"
    assert mc.parse_mlvu_answer("D<|im_end|>") == "D"


# ----------------------------------------------------------------------------------------------
# Video-MME: a hand-made sample in the layout of BradyFU/Video-MME
# evaluation/output_test_template.json (what eval_your_results.py reads).


def _q(qid, task, answer, response):
    return {"question_id": qid, "task_type": task, "question": f"question {qid}?",
            "choices": ["A. one.", "B. two.", "C. three.", "D. four."], "answer": answer,
            "response": response}


VIDEOMME_RESULTS = [
    {"video_id": "001", "duration_category": "short", "video_category": "Knowledge",
     "video_subcategory": "Humanity & History", "questions": [
         _q("001-1", "Object Reasoning", "A", "A"),
         _q("001-2", "Attribute Perception", "D", "Best answer: D"),  # original: "B" of "Best"
         _q("001-3", "Action Reasoning", "C", "I am not sure."),  # no letter
     ]},
    {"video_id": "002", "duration_category": "short", "video_category": "Film & Television",
     "video_subcategory": "Movie & TV Show", "questions": [
         _q("002-1", "Object Recognition", "B", "The answer is (B)."),
         _q("002-2", "Counting Problem", "C", "Based on the video, C."),  # original: "B"
         _q("002-3", "Temporal Perception", "A", "D"),
     ]},
    {"video_id": "003", "duration_category": "medium", "video_category": "Knowledge",
     "video_subcategory": "Geography", "questions": [
         _q("003-1", "OCR Problems", "B", "The best option is B"),
         _q("003-2", "Counting Problem", "D",
            "there are four people in the scene and the man on the left holds a cup"),
         _q("003-3", "Temporal Reasoning", "C", "C"),
     ]},
]


def test_videomme_original():
    res = mc.evaluate_videomme(VIDEOMME_RESULTS, compat="original")
    s = res["scores"]
    preds = {q: v["pred"] for q, v in res["per_item"].items()}
    assert preds == {"001-1": "A", "001-2": "B", "001-3": "", "002-1": "B", "002-2": "B",
                     "002-3": "D", "003-1": "B", "003-2": "", "003-3": "C"}
    want = {"overall": 400 / 7, "duration/short": 40.0, "duration/medium": 100.0,
            "category/Knowledge": 75.0, "category/Film & Television": 100 / 3,
            "category/Sports Competition": 0.0,  # printed although empty
            "task/Counting Problem": 0.0, "task/Action Reasoning": 0.0,
            "task/OCR Problems": 100.0, "sub_category/Geography": 100.0,
            "duration/short/task/Object Reasoning": 100.0}
    for k, v in want.items():
        assert abs(s[k] - v) <= TOL, k
    assert res["counts"]["task/Counting Problem"] == [0, 1]  # 003-2 is not "answered"
    assert len([k for k in s if k.startswith("category/")]) == len(mc.VIDEOMME_CATEGORIES)
    assert f"{s['overall']: .1f}" == " 57.1"  # what the script prints


def test_videomme_corrected_and_formats():
    res = mc.evaluate_videomme(VIDEOMME_RESULTS)
    s = res["scores"]
    preds = {q: v["pred"] for q, v in res["per_item"].items()}
    assert preds == {"001-1": "A", "001-2": "D", "001-3": "", "002-1": "B", "002-2": "C",
                     "002-3": "D", "003-1": "B", "003-2": "", "003-3": "C"}
    want = {"overall": 600 / 9, "duration/short": 400 / 6, "duration/medium": 200 / 3,
            "category/Knowledge": 400 / 6, "category/Film & Television": 200 / 3,
            "task/Counting Problem": 50.0, "task/Action Reasoning": 0.0}
    for k, v in want.items():
        assert abs(s[k] - v) <= TOL, k
    assert "category/Sports Competition" not in s
    orig = mc.evaluate_videomme(VIDEOMME_RESULTS, compat="original")
    changed = {q for q in preds if preds[q] != orig["per_item"][q]["pred"]}
    assert changed == {"001-2", "002-2"}  # the prefix bug and the "Based" bug, nothing else
    # Same questions as parquet rows plus {question_id: response}.
    rows, responses = [], {}
    for v in VIDEOMME_RESULTS:
        for q in v["questions"]:
            rows.append({"video_id": v["video_id"], "duration": v["duration_category"],
                         "domain": v["video_category"], "sub_category": v["video_subcategory"],
                         "question_id": q["question_id"], "task_type": q["task_type"],
                         "question": q["question"], "options": q["choices"],
                         "answer": q["answer"]})
            responses[q["question_id"]] = q["response"]
    for compat in ("original", "corrected"):
        flat = mc.evaluate_videomme(responses, rows, compat=compat)
        assert flat["scores"] == mc.evaluate_videomme(VIDEOMME_RESULTS, compat=compat)["scores"]
    with pytest.raises(ValueError, match="no response"):
        mc.evaluate_videomme({"001-1": "A"}, rows)
