"""longvid_jax.metrics.common: the compat switch, clock times and the input-file readers."""

import json

import pytest

from longvid_jax.metrics import common


def test_check_compat():
    assert common.check_compat("original") == "original"
    assert common.check_compat("corrected") == "corrected"
    with pytest.raises(ValueError, match="compat must be one of"):
        common.check_compat("fixed")


@pytest.mark.parametrize("token,seconds", [
    ("65", 65.0), ("4.", 4.0), (".5", 0.5), ("1:05", 65.0), ("01:05.5", 65.5),
    ("00:00:21", 21.0), ("1:02:03", 3723.0),
])
def test_clock_to_seconds(token, seconds):
    assert common.clock_to_seconds(token) == seconds


def test_read_records_layouts(tmp_path):
    rows = [{"a": 1, "b": 2}, {"a": 3, "c": 4}]
    as_list = tmp_path / "list.json"
    as_list.write_text(json.dumps(rows, indent=1))
    lines = "".join(json.dumps(r) + "\n" for r in rows)
    as_jsonl = tmp_path / "rows.jsonl"
    as_jsonl.write_text(lines + "\n")
    lines_in_json = tmp_path / "pred.json"  # MMDuet writes JSON lines into .json files
    lines_in_json.write_text(lines)
    one_line = tmp_path / "one.json"
    one_line.write_text(json.dumps(rows[0]) + "\n")
    for path in (as_list, as_jsonl, lines_in_json):
        assert common.read_records(path, keys=("a", "b|c")) == rows
    assert common.read_records(one_line) == [rows[0]]
    with pytest.raises(common.InputFileError, match=f"input file {as_list}: record 1 has no "
                                                    "field 'b'"):
        common.read_records(as_list, keys=("b",))
    obj = tmp_path / "obj.json"
    obj.write_text(json.dumps({"x": rows}, indent=1))
    with pytest.raises(common.InputFileError, match="expected a JSON list .* got a JSON dict"):
        common.read_records(obj)
