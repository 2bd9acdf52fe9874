"""vfm.data loading: CSV/TSV/JSONL/CoNLL, malformed rows reported with file and line."""

import json

import pytest

from vfm.data import Example, load_examples


def _write(tmp_path, name, text, bom=False):
    path = tmp_path / name
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return str(path)


def test_csv_rows_lines_and_malformed(tmp_path):
    path = _write(tmp_path, "d.csv", (
        "text,label,source_id\n"          # line 1
        "chest pain,cardiology,a1\n"      # line 2
        "\"multi\nline text\",other,a2\n"  # lines 3-4
        "too,many,fields,here\n"          # line 5: malformed
        ",billing,a3\n"                   # line 6: empty text
        "胸痛三天,,a4\n"                    # line 7: unlabelled Chinese row
        "short\n"                          # line 8: too few fields
    ), bom=True)
    examples, report = load_examples(path)
    assert [(e.text, e.label, e.line) for e in examples] == [
        ("chest pain", "cardiology", 2), ("multi\nline text", "other", 3), ("胸痛三天", None, 7)]
    assert examples[0].meta == {"source_id": "a1"} and examples[0].source == path
    assert [(m.file, m.line) for m in report.malformed] == [(path, 5), (path, 6), (path, 8)]
    assert "4 fields, the header has 3" in report.malformed[0].reason
    assert report.loaded == 3 and f"{path}:5:" in str(report)
    assert report.unlabelled == 1 and "without a label (kept, unlabelled): 1" in str(report)
    json.dumps(report.to_dict())


def test_csv_missing_text_column_and_tsv(tmp_path):
    path = _write(tmp_path, "d.csv", "body,label\nx,y\n")
    with pytest.raises(ValueError, match="text_field"):
        load_examples(path)
    examples, _ = load_examples(path, text_field="body")
    assert examples[0].text == "x"
    tsv = _write(tmp_path, "d.tsv", "text\tlabel\na, b\tc\n")
    examples, _ = load_examples(tsv)
    assert (examples[0].text, examples[0].label) == ("a, b", "c")


def test_jsonl(tmp_path):
    lines = [
        json.dumps({"text": "ok", "label": "a", "id": 7}),          # 1
        "",                                                           # 2 blank
        "{not json",                                                  # 3
        json.dumps([1, 2]),                                           # 4 not an object
        json.dumps({"label": "a"}),                                   # 5 missing text
        json.dumps({"text": "数字标签", "label": 3}),                  # 6 int label -> "3"
        json.dumps({"text": "x", "label": ["a"]}),                    # 7 bad label type
        json.dumps({"tokens": ["take", "aspirin"], "tags": ["O", "B-DRUG"]}),   # 8 tagging row
        json.dumps({"tokens": ["a", "b"], "tags": ["O"]}),            # 9 tags length mismatch
        json.dumps({"text": "   "}),                                  # 10 empty text
    ]
    path = _write(tmp_path, "d.jsonl", "\n".join(lines) + "\n")
    examples, report = load_examples(path)
    assert [(e.text, e.label, e.line) for e in examples] == [("ok", "a", 1), ("数字标签", "3", 6),
                                                             ("take aspirin", None, 8)]
    assert examples[0].meta == {"id": 7}
    assert examples[2].tokens == ["take", "aspirin"] and examples[2].tags == ["O", "B-DRUG"]
    assert [m.line for m in report.malformed] == [3, 4, 5, 7, 9, 10]
    assert report.blank_lines == 1
    assert "invalid JSON" in report.malformed[0].reason


def test_conll(tmp_path):
    path = _write(tmp_path, "d.conll", (
        "-DOCSTART- O\n"        # 1
        "\n"                    # 2
        "Take O\n"              # 3
        "aspirin NN B-DRUG\n"   # 4 (middle column ignored)
        "\n"                    # 5
        "bad\n"                 # 6: one column -> whole sentence skipped
        "line O\n"              # 7
        "\n"                    # 8
        "服用\tO\n"              # 9
        "阿司匹林\tB-DRUG\n"      # 10
    ))
    examples, report = load_examples(path)
    assert [(e.tokens, e.tags, e.line) for e in examples] == [
        (["Take", "aspirin"], ["O", "B-DRUG"], 3), (["服用", "阿司匹林"], ["O", "B-DRUG"], 9)]
    assert examples[0].text == "Take aspirin" and examples[1].text == "服用阿司匹林"
    assert [(m.line, "line 6" in m.reason) for m in report.malformed] == [(6, True)]
    assert report.docstart == 1


def test_format_errors(tmp_path):
    path = _write(tmp_path, "d.txt", "x\n")
    with pytest.raises(ValueError, match="suffix"):
        load_examples(path)
    with pytest.raises(ValueError, match="format must be"):
        load_examples(path, format="xml")
    examples, _ = load_examples(path, format="csv", text_field="x")
    assert examples == []
    with pytest.raises(FileNotFoundError):
        load_examples(str(tmp_path / "missing.csv"))
    assert Example("t").where == "<memory>:0"


def test_invalid_utf8_rows_reported(tmp_path):
    csv_path = tmp_path / "bad.csv"
    csv_path.write_bytes(b"text,label\nok,a\nbad \xff byte,b\nfine,c\n")
    examples, report = load_examples(str(csv_path))
    assert [e.text for e in examples] == ["ok", "fine"]
    assert [(m.line, m.reason) for m in report.malformed] == [(3, "not valid UTF-8")]
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_bytes(b'{"text": "ok"}\n{"text": "\xc3("}\n')
    examples, report = load_examples(str(jsonl))
    assert len(examples) == 1 and [m.line for m in report.malformed] == [2]
    conll = tmp_path / "bad.conll"
    conll.write_bytes(b"a O\nb\xfe O\n\nc O\n")
    examples, report = load_examples(str(conll))
    assert [e.tokens for e in examples] == [["c"]] and report.malformed[0].line == 1
