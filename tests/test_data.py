from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tree_of_experts import ToEError
from tree_of_experts.data import DataSpec, encode, file_hash, read_rows, scan_rows
from tree_of_experts.toy import tiny_tokenizer

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "arith.jsonl")
SPEC = DataSpec()  # question / answer
GOOD = '{"question": "what is 1 plus 2?", "answer": "1 plus 2 is 3.\\n#### 3"}'


def fixture_rows() -> list[dict]:
    return [json.loads(line) for line in open(FIXTURE)]


def test_jsonl_rows_are_the_lines_as_written():
    assert read_rows(FIXTURE, SPEC) == fixture_rows()
    assert read_rows(FIXTURE, SPEC, limit=3) == fixture_rows()[:3]


def test_every_format_gives_the_same_rows(tmp_path):
    import datasets
    import pandas as pd

    rows = fixture_rows()
    (tmp_path / "a.json").write_text(json.dumps(rows))  # one JSON array
    pd.DataFrame(rows).to_csv(tmp_path / "a.csv", index=False)  # answers hold newlines, commas: quoted cells
    pd.DataFrame(rows).to_parquet(tmp_path / "a.parquet")
    (tmp_path / "folder").mkdir()
    text = Path(FIXTURE).read_text()
    (tmp_path / "folder" / "test.jsonl").write_text(text)  # datasets names splits by file name
    datasets.DatasetDict({"dev": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "saved"))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "one"))  # a Dataset, not a DatasetDict
    datasets.Dataset.from_list(rows, split="dev").save_to_disk(str(tmp_path / "dev"))  # one that names its split
    (tmp_path / "bom.jsonl").write_text("\ufeff" + text)  # how some editors mark UTF-8
    for source in ("a.json", "a.csv", "a.parquet", "bom.jsonl"):
        assert read_rows(tmp_path / source, SPEC) == rows, source
        assert read_rows(tmp_path / source, SPEC, limit=2) == rows[:2], source
        assert len(file_hash(tmp_path / source)) == 64
    for ref in (f"hf:{tmp_path / 'folder'}:test", f"hf:{tmp_path / 'saved'}:dev", f"hf:{tmp_path / 'one'}",
                f"hf:{tmp_path / 'dev'}", f"hf:{tmp_path / 'dev'}:dev"):
        assert read_rows(ref, SPEC) == rows, ref
        assert read_rows(ref, SPEC, limit=2) == rows[:2], ref
        assert len(file_hash(ref)) == 64
    with pytest.raises(ToEError, match=r"holds the split 'dev' alone: write hf:.*dev"):
        read_rows(f"hf:{tmp_path / 'dev'}:train", SPEC)
    with pytest.raises(ToEError, match="hf:FOLDER"):
        read_rows(f"hf:{tmp_path / 'saved'}", SPEC)  # a DatasetDict: which split?


def test_an_unknown_format_is_one_error(tmp_path):
    (tmp_path / "rows.txt").write_text(GOOD + "\n")
    with pytest.raises(ToEError, match=r"unknown format: pass a \.jsonl, \.json, \.csv or \.parquet file"):
        read_rows(tmp_path / "rows.txt")
    with pytest.raises(ToEError, match="not found"):
        read_rows(tmp_path / "none.jsonl")
    (tmp_path / "broken.parquet").write_text("not parquet")
    with pytest.raises(ToEError, match="could not read .*broken.parquet as parquet"):
        read_rows(tmp_path / "broken.parquet")


BAD_LINES = {  # line 2 of a three-line JSONL file -> what the one-line error says
    "array": (b'["what is 1 plus 2?", "3"]', "is a list, not an object"),
    "null": (b'{"question": "q", "answer": null}', "field 'answer' is null, not text"),
    "number": (b'{"question": 7, "answer": "a"}', "field 'question' is a number (7), not text"),
    "list": (b'{"question": "q", "answer": ["a"]}', "field 'answer' is a list, not text"),
    "empty": (b'{"question": "q", "answer": "  "}', "field 'answer' is empty"),
    "empty question": (b'{"question": " ", "answer": "a"}', "field 'question' is empty: write the prompt"),
    "missing": (b'{"question": "q", "solution": "a"}', "has no field 'answer'"),
    "surrogate": (b'{"question": "q", "answer": "a \\ud800 b"}', "field 'answer' holds a lone surrogate"),
    "bytes": (b'{"question": "q \xff", "answer": "a"}', "is not valid UTF-8"),
    "bom": (b'\xef\xbb\xbf' + GOOD.encode(), "starts with a UTF-8 byte-order mark"),
    "json": (b'{"question": "q", "answer": "a"', "is not valid JSON"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_a_bad_jsonl_row_is_named_by_file_and_line(tmp_path, case):
    line, says = BAD_LINES[case]
    path = tmp_path / "rows.jsonl"
    path.write_bytes(GOOD.encode() + b"\n" + line + b"\n" + GOOD.encode() + b"\n")
    with pytest.raises(ToEError) as e:
        read_rows(path, SPEC)
    message = str(e.value)
    assert message.startswith(f"{path}:2") and says in message and ": " in message[len(str(path)) + 2:]
    assert "\n" not in message
    rows, skipped = scan_rows(path, SPEC, skip_bad=True)  # the explicit way past it: skipped and counted
    assert rows == [json.loads(GOOD)] * 2 and skipped == [message]


def test_lone_surrogates_would_reach_the_tokenizer():
    # Why they are refused: the tokenizer cannot encode one (a traceback deep in training or eval).
    with pytest.raises(Exception):  # noqa: B017 (the tokenizers library raises a bare TypeError/ValueError)
        tiny_tokenizer()("a \ud800 b")


def test_bad_rows_in_other_formats_are_named_by_row(tmp_path):
    import pandas as pd

    rows = [json.loads(GOOD), {"question": "q", "answer": None}, json.loads(GOOD)]
    pd.DataFrame(rows).to_parquet(tmp_path / "a.parquet")
    with pytest.raises(ToEError, match=r"a\.parquet row 2: field 'answer' is null, not text"):
        read_rows(tmp_path / "a.parquet", SPEC)
    (tmp_path / "a.csv").write_text("question,answer\nq1,a1\nq2,\n")  # an empty cell stays "" (no NaN guessing)
    with pytest.raises(ToEError, match=r"a\.csv row 2: field 'answer' is empty"):
        read_rows(tmp_path / "a.csv", SPEC)
    (tmp_path / "n.csv").write_text("question,answer\nq1,54\n")  # numbers in a CSV stay text
    assert read_rows(tmp_path / "n.csv", SPEC) == [{"question": "q1", "answer": "54"}]
    assert scan_rows(tmp_path / "a.parquet", SPEC, skip_bad=True)[0] == [rows[0], rows[2]]
    (tmp_path / "e.csv").write_text("question,answer\nq1,\n")
    with pytest.raises(ToEError, match=r"e\.csv has no rows \(1 skipped, the first: .*e\.csv row 1: field 'answer'"):
        scan_rows(tmp_path / "e.csv", SPEC, skip_bad=True)


def test_skip_bad_keeps_limit_usable_rows(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"question": "q", "answer": null}\n' + (GOOD + "\n") * 3)
    rows, skipped = scan_rows(path, SPEC, limit=2, skip_bad=True)
    assert len(rows) == 2 and len(skipped) == 1


def test_bad_data_fails_the_cli_before_any_model_loads(tmp_path, capsys):
    from tree_of_experts.cli import main

    path = tmp_path / "rows.jsonl"
    path.write_text(GOOD + "\n" + '{"question": "q", "answer": null}\n')
    before = sorted(os.listdir(tmp_path))
    # The base does not exist: reaching the model would be another error.
    assert main(["eval", "--base", str(tmp_path / "no-base"), "--data", str(path), "--out", str(tmp_path / "ev")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"toe: error: {path}:2: field 'answer' is null")
    assert sorted(os.listdir(tmp_path)) == before  # nothing written


def test_encode_counts_rows_cut_by_max_length():
    tok = tiny_tokenizer()
    prompt, response = "Question: what is 3 plus 4?\nAnswer: ", "3 plus 4 is 7."
    n = len(tok(prompt + response)["input_ids"]) + 1  # with the EOS encode appends
    assert not encode(tok, prompt, response, max_length=n).cut  # fills the budget exactly
    assert not encode(tok, prompt, response, max_length=n + 5).cut
    short = encode(tok, prompt, response, max_length=n - 1)
    assert short.cut and short.input_ids.shape == (n - 1,)
