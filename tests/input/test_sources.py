"""Annotation files: loading, path resolution, and errors naming the file and the record."""

import json

import pytest

from longvid_jax.input.sources import AnnotationError, JsonAnnotationSource

GOOD = {"video": "clips/a.mp4",
        "conversations": [{"from": "human", "value": "<video>\nQ?"},
                          {"from": "gpt", "value": "A."}]}


def _jsonl(path, records):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


def test_json_and_jsonl_and_video_root(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([GOOD, dict(GOOD, video="/abs/b.mp4", id="x")]))
    src = JsonAnnotationSource(tmp_path / "a.json")
    assert len(src) == 2
    assert src[0]["video"] == str(tmp_path / "clips/a.mp4") and src[0]["_index"] == 0
    assert src[1]["video"] == "/abs/b.mp4" and src[1]["id"] == "x"
    assert src[0]["_source"] == str(tmp_path / "a.json")
    src = JsonAnnotationSource(_jsonl(tmp_path / "b.jsonl", [GOOD, "", GOOD]), video_root="/data")
    assert len(src) == 2 and src[1]["video"] == "/data/clips/a.mp4"


def test_llava_image_records(tmp_path):
    """LLaVA single-image records ("image" instead of "video", `<image>` in the text: TDC
    stage 1's LLaVA-OneVision data) resolve like video records into the item's `video`."""
    image = {"image": "imgs/cat.jpg", "id": 7,
             "conversations": [{"from": "human", "value": "<image>\nWhat is it?"},
                               {"from": "gpt", "value": "A cat."}]}
    src = JsonAnnotationSource(_jsonl(tmp_path / "ov.jsonl", [image, GOOD]))
    assert src[0]["video"] == str(tmp_path / "imgs/cat.jpg") and src[0]["image"] == "imgs/cat.jpg"
    assert src[1]["video"] == str(tmp_path / "clips/a.mp4") and "image" not in src[1]


def test_separate_audio_files(tmp_path):
    """TDC stage-3 records name their sound file under "audio" (resolved like the video); the
    original's no-audio values give None; without the key the item has no "audio"."""
    recs = [dict(GOOD, audio="sounds/a.wav"), dict(GOOD, audio="None"), dict(GOOD, audio=""),
            GOOD]
    src = JsonAnnotationSource(_jsonl(tmp_path / "s3.jsonl", recs), video_root="/data")
    assert src[0]["audio"] == "/data/sounds/a.wav"
    assert src[1]["audio"] is None and src[2]["audio"] is None and "audio" not in src[3]


def test_bad_json_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"video": "a.mp4", "conversations": [}')
    with pytest.raises(AnnotationError, match=r"broken\.json: invalid JSON"):
        JsonAnnotationSource(path)
    path.write_text(json.dumps({"video": "a.mp4"}))
    with pytest.raises(AnnotationError, match="must hold a list"):
        JsonAnnotationSource(path)
    with pytest.raises(AnnotationError, match="missing.json: cannot read"):
        JsonAnnotationSource(tmp_path / "missing.json")


@pytest.mark.parametrize("bad, problem", [
    ('{"video": "a.mp4", "conversations": [', "invalid JSON on line 2"),
    ({"video": "a.mp4"}, "missing 'conversations'"),
    ({"conversations": GOOD["conversations"]}, "missing 'video'"),
    (dict(GOOD, image="a.jpg"), "exactly one of 'video' and 'image'"),
    ({"image": "", "conversations": GOOD["conversations"]}, "'image' must be a non-empty"),
    ({"video": "a.mp4", "conversations": [{"from": "gpt", "value": "x"},
                                          {"from": "human", "value": "y"}]}, "expected 'human'"),
    ({"video": "a.mp4", "conversations": [{"from": "user", "value": "x"},
                                          {"from": "gpt", "value": "y"}]}, "from 'user'"),
    ([1, 2], "not an object"),
])
def test_bad_records_name_file_and_index(tmp_path, bad, problem):
    path = _jsonl(tmp_path / "ann.jsonl", [GOOD, bad, GOOD])
    with pytest.raises(AnnotationError, match=rf"ann\.jsonl: record 1: .*{problem}") as err:
        JsonAnnotationSource(path)
    assert err.value.index == 1 and err.value.path == str(path)
    lenient = JsonAnnotationSource(path, skip_bad_records=True)  # the pipeline's mode: skip and count
    assert len(lenient) == 3 and lenient.num_malformed == 1
    assert problem.split("'")[0] in lenient[1]["_error"] and "_error" not in lenient[2]


def test_all_records_malformed(tmp_path):
    path = _jsonl(tmp_path / "ann.jsonl", [{"video": "a.mp4"}, {"video": "b.mp4"}])
    with pytest.raises(AnnotationError, match="all 2 records are malformed"):
        JsonAnnotationSource(path, skip_bad_records=True)
