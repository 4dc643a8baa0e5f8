"""Data readers: every error names the file and the 1-based line; every format round-trips."""

from __future__ import annotations

import csv
import json
import pickle
from pathlib import Path

import pytest

from modfit.data import (
    DataError,
    TextExample,
    TokenExample,
    label_list,
    read_conll,
    read_csv,
    read_examples,
    read_jsonl,
    read_text,
)


def write(tmp_path: Path, name: str, text: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def error(path: Path, line: int | None, task: str = "seq-cls", **kwargs: object) -> DataError:
    """Read `path` expecting a DataError located at `line`; return it for message checks."""
    with pytest.raises(DataError) as info:
        read_examples(path, task, **kwargs)  # type: ignore[arg-type]
    err = info.value
    assert err.path == str(path)
    assert err.line == line
    assert path.name in str(err)
    prefix = f"{path}:{line}: " if line is not None else f"{path}: "
    assert str(err).startswith(prefix), str(err)
    return err


# --------------------------------------------------------------------------- DataError


def test_data_error_format_and_pickle() -> None:
    err = DataError("a.csv", 3, "bad")
    assert str(err) == "a.csv:3: bad"
    assert (err.path, err.line, err.what) == ("a.csv", 3, "bad")
    assert str(DataError("a.csv", None, "bad")) == "a.csv: bad"
    assert str(DataError(None, None, "bad")) == "bad"
    assert isinstance(err, ValueError)
    back = pickle.loads(pickle.dumps(err))
    assert (back.path, back.line, str(back)) == ("a.csv", 3, "a.csv:3: bad")


# --------------------------------------------------------------------------- CSV / TSV


def test_csv_round_trip(tmp_path: Path) -> None:
    examples = [
        TextExample('comma, "quotes" and\na newline', label="pos"),
        TextExample("plain", label="neg"),
        TextExample("tab\tinside", label="0"),
    ]
    for suffix, delimiter in ((".csv", ","), (".tsv", "\t")):
        path = tmp_path / f"data{suffix}"
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, delimiter=delimiter)
            writer.writerow(["label", "text"])
            writer.writerows([ex.label, ex.text] for ex in examples)
        assert read_examples(path, "seq-cls") == examples


def test_csv_pair_and_alternative_names(tmp_path: Path) -> None:
    path = write(tmp_path, "d.csv", "sentence1,sentence2,label\na,b,1\nc,d,0\n")
    assert read_examples(path, "seq-cls") == [TextExample("a", "b", "1"), TextExample("c", "d", "0")]
    path = write(tmp_path, "e.csv", "id,review,stars\n1,good,5\n")
    got = read_examples(path, "seq-cls", text_column="review", label_column="stars")
    assert got == [TextExample("good", label="5")]


def test_csv_blank_lines_skipped_and_unlabeled(tmp_path: Path) -> None:
    path = write(tmp_path, "d.csv", "text\n\nhello\n\nworld\n")
    assert read_examples(path, "seq-cls", require_labels=False) == [
        TextExample("hello"),
        TextExample("world"),
    ]
    # the LM tasks ignore labels, even when a label column is there
    path = write(tmp_path, "e.csv", "text,label\nhello,pos\n")
    assert read_examples(path, "mlm") == [TextExample("hello")]


def test_csv_missing_text_column(tmp_path: Path) -> None:
    err = error(write(tmp_path, "d.csv", "body,label\nhi,1\n"), 1)
    assert "'text'" in err.what and "'body', 'label'" in err.what
    err = error(write(tmp_path, "e.csv", "body,label\nhi,1\n"), 1, text_column="content")
    assert "'content'" in err.what and "'body'" in err.what


def test_csv_wrong_number_of_fields(tmp_path: Path) -> None:
    err = error(write(tmp_path, "d.csv", "text,label\nfine,1\n\ntoo,many,fields\n"), 4)
    assert "expected 2 fields" in err.what and "found 3" in err.what


def test_csv_line_numbers_after_multiline_field(tmp_path: Path) -> None:
    path = write(tmp_path, "d.csv", 'text,label\n"two\nlines",1\nshort\n')
    assert "found 1" in error(path, 4).what


def test_csv_empty_text(tmp_path: Path) -> None:
    assert "empty text" in error(write(tmp_path, "d.csv", "text,label\na,1\n  ,0\n"), 3).what
    assert "'text_pair'" in error(write(tmp_path, "e.csv", "text,text_pair,label\na,,1\n"), 2).what


def test_csv_empty_file_and_header_only(tmp_path: Path) -> None:
    assert "empty file" in error(write(tmp_path, "d.csv", ""), None).what
    assert "empty file" in error(write(tmp_path, "b.csv", "\n\n"), None).what
    assert "header" in error(write(tmp_path, "e.csv", "text,label\n"), None).what


def test_csv_labels(tmp_path: Path) -> None:
    err = error(write(tmp_path, "d.csv", "text\nhi\n"), 1)
    assert "label" in err.what and "require_labels=False" in err.what
    assert "empty label" in error(write(tmp_path, "e.csv", "text,label\nhi,1\nho,\n"), 3).what
    got = read_examples(tmp_path / "e.csv", "seq-cls", require_labels=False)
    assert got == [TextExample("hi", label="1"), TextExample("ho")]


def test_csv_duplicate_columns_and_bad_quoting(tmp_path: Path) -> None:
    assert "duplicate" in error(write(tmp_path, "d.csv", "text,text,label\na,b,1\n"), 1).what
    err = error(write(tmp_path, "e.csv", 'text,label\na,1\n"bad"quote,1\n'), 3)
    assert "malformed CSV" in err.what
    assert "TSV" in error(write(tmp_path, "f.tsv", 'text\tlabel\n"open\t1\n'), 2).what


def test_invalid_utf8_names_line(tmp_path: Path) -> None:
    path = write(tmp_path, "d.csv", b"text,label\nok,1\nbad \xff,1\n")
    assert "UTF-8" in error(path, 3).what


# --------------------------------------------------------------------------- JSON Lines


def test_jsonl_round_trip(tmp_path: Path) -> None:
    texts = [TextExample("a", "b", "pos"), TextExample('quote " and \\ and é', None, "neg")]
    lines = [json.dumps({"text": e.text, "text_pair": e.text_pair, "label": e.label}) for e in texts]
    assert read_examples(write(tmp_path, "d.jsonl", "\n".join(lines) + "\n"), "seq-cls") == texts

    tokens = [
        TokenExample(("EU", "rejects", "German"), ("B-ORG", "O", "B-MISC")),
        TokenExample(("Hi",), ("O",)),
    ]
    lines = [json.dumps({"tokens": list(e.tokens), "tags": list(e.tags or ())}) for e in tokens]
    assert read_examples(write(tmp_path, "t.json", "\n".join(lines)), "token-cls") == tokens


def test_jsonl_alternative_keys_and_int_labels(tmp_path: Path) -> None:
    path = write(tmp_path, "d.jsonl", '{"sentence": "a", "label": 1}\n\n{"sentence": "b", "label": 0}\n')
    assert read_examples(path, "seq-cls") == [TextExample("a", label="1"), TextExample("b", label="0")]
    path = write(
        tmp_path,
        "t.jsonl",
        '{"tokens": ["a", "b"], "ner_tags": [3, 0]}\n{"tokens": ["c"], "labels": ["O"]}\n',
    )
    assert read_examples(path, "token-cls") == [
        TokenExample(("a", "b"), ("3", "0")),
        TokenExample(("c",), ("O",)),
    ]
    path = write(tmp_path, "u.jsonl", '{"tokens": ["a"]}\n')
    assert read_examples(path, "token-cls", require_labels=False) == [TokenExample(("a",))]


def test_jsonl_invalid_json(tmp_path: Path) -> None:
    err = error(write(tmp_path, "d.jsonl", '{"text": "a", "label": "1"}\n\n{"text": "b", "label": }\n'), 3)
    assert "invalid JSON" in err.what
    err = error(write(tmp_path, "e.json", '[\n{"text": "a"}\n]\n'), 1)
    assert "JSON Lines" in err.what


def test_jsonl_not_an_object(tmp_path: Path) -> None:
    err = error(write(tmp_path, "d.jsonl", '{"text": "a", "label": "1"}\n["text"]\n'), 2)
    assert "expected a JSON object, found array" in err.what


def test_jsonl_missing_keys(tmp_path: Path) -> None:
    err = error(write(tmp_path, "d.jsonl", '{"text": "a", "label": "1"}\n{"body": "b", "label": "1"}\n'), 2)
    assert "'text'" in err.what and "'body'" in err.what
    assert "label" in error(write(tmp_path, "e.jsonl", '{"text": "a"}\n'), 1).what
    assert (
        "'tokens'"
        in error(write(tmp_path, "f.jsonl", '{"words": ["a"], "tags": ["O"]}\n'), 1, "token-cls").what
    )
    assert "'tags'" in error(write(tmp_path, "g.jsonl", '{"tokens": ["a"]}\n'), 1, "token-cls").what


def test_jsonl_wrong_types(tmp_path: Path) -> None:
    cases = [
        ('{"text": 3, "label": "1"}', "seq-cls", "must be a string, found number"),
        ('{"text": "  ", "label": "1"}', "seq-cls", "empty text"),
        ('{"text": "a", "label": 1.5}', "seq-cls", "found number"),
        ('{"text": "a", "label": true}', "seq-cls", "found boolean"),
        ('{"text": "a", "label": ""}', "seq-cls", "non-empty"),
        ('{"tokens": "a b", "tags": ["O"]}', "token-cls", "array of strings, found string"),
        ('{"tokens": [], "tags": []}', "token-cls", "empty 'tokens'"),
        ('{"tokens": ["a", 2], "tags": ["O", "O"]}', "token-cls", "'tokens'[1]"),
        ('{"tokens": ["a"], "tags": "O"}', "token-cls", "must be an array"),
        ('{"tokens": ["a"], "tags": ["B PER"]}', "token-cls", "without spaces"),
        ('{"tokens": ["a"], "tags": [null]}', "token-cls", "found null"),
    ]
    for i, (line, task, message) in enumerate(cases):
        path = write(
            tmp_path, f"d{i}.jsonl", '{"text": "ok", "label": "1", "tokens": ["x"], "tags": ["O"]}\n' + line
        )
        assert message in error(path, 2, task).what, line


def test_jsonl_length_mismatch(tmp_path: Path) -> None:
    path = write(
        tmp_path, "d.jsonl", '{"tokens": ["a"], "tags": ["O"]}\n\n\n{"tokens": ["a", "b"], "tags": ["O"]}\n'
    )
    assert "2 tokens but 1 tags" in error(path, 4, "token-cls").what


def test_jsonl_empty(tmp_path: Path) -> None:
    assert "no examples" in error(write(tmp_path, "d.jsonl", "\n  \n"), None).what


# --------------------------------------------------------------------------- CoNLL


CONLL = """-DOCSTART- -X- -X- O

EU NNP B-NP B-ORG
rejects VBZ B-VP O
German JJ B-NP B-MISC

Peter\tB-PER
Blackburn\tI-PER
"""


def test_conll_round_trip_and_format_details(tmp_path: Path) -> None:
    expected = [
        TokenExample(("EU", "rejects", "German"), ("B-ORG", "O", "B-MISC")),
        TokenExample(("Peter", "Blackburn"), ("B-PER", "I-PER")),
    ]
    assert read_examples(write(tmp_path, "d.conll", CONLL), "token-cls") == expected
    # .txt is CoNLL for token-cls; writing the examples back gives the same examples
    lines = ["\n".join(f"{t} {g}" for t, g in zip(e.tokens, e.tags or (), strict=True)) for e in expected]
    assert read_examples(write(tmp_path, "d.txt", "\n\n".join(lines) + "\n"), "token-cls") == expected
    assert read_conll(write(tmp_path, "d.iob", "a O\r\nb O\r\n\r\n\r\nc O\r\n")) == [
        TokenExample(("a", "b"), ("O", "O")),
        TokenExample(("c",), ("O",)),
    ]


def test_conll_single_column(tmp_path: Path) -> None:
    err = error(write(tmp_path, "d.conll", "a O\nb O\n\nc\n"), 4, "token-cls")
    assert "one column" in err.what
    unlabeled = read_examples(write(tmp_path, "u.bio", "a\nb\n\nc\n"), "token-cls", require_labels=False)
    assert unlabeled == [TokenExample(("a", "b")), TokenExample(("c",))]


def test_conll_bad_tag_and_token(tmp_path: Path) -> None:
    assert "non-space" in error(write(tmp_path, "d.conll", "a\tO\nb\tB PER\n"), 2, "token-cls").what
    assert "empty token" in error(write(tmp_path, "e.conll", "a\tO\n\tO\n"), 2, "token-cls").what


def test_conll_mixed_tagged_and_untagged(tmp_path: Path) -> None:
    path = write(tmp_path, "d.conll", "a O\n\nb\n")
    assert "no tag" in error(path, 3, "token-cls", require_labels=False).what


def test_conll_empty(tmp_path: Path) -> None:
    assert "no examples" in error(write(tmp_path, "d.conll", "-DOCSTART- O\n\n"), None, "token-cls").what


# --------------------------------------------------------------------------- plain text


def test_text_round_trip(tmp_path: Path) -> None:
    examples = [TextExample("first line"), TextExample("second, with comma")]
    path = write(tmp_path, "d.txt", "first line\n\n  second, with comma  \n")
    assert read_examples(path, "mlm") == examples
    assert read_text(write(tmp_path, "d.raw", "\n".join(e.text for e in examples))) == examples
    assert read_examples(tmp_path / "d.raw", "causal-lm") == examples


def test_text_empty(tmp_path: Path) -> None:
    assert "no examples" in error(write(tmp_path, "d.text", "\n \n"), None, "mlm").what


# --------------------------------------------------------------------------- read_examples


def test_missing_file_and_directory(tmp_path: Path) -> None:
    assert "not found" in error(tmp_path / "nope.csv", None).what
    (tmp_path / "dir.csv").mkdir()
    assert "directory" in error(tmp_path / "dir.csv", None).what


def test_unknown_extension_suggests_fmt(tmp_path: Path) -> None:
    path = write(tmp_path, "d.dat", "text,label\na,1\n")
    assert "fmt=" in error(path, None).what
    assert read_examples(path, "seq-cls", fmt="csv") == [TextExample("a", label="1")]


def test_format_cannot_serve_task(tmp_path: Path) -> None:
    assert "cannot serve" in error(write(tmp_path, "d.conll", "a O\n"), None, "seq-cls").what
    assert "cannot serve" in error(write(tmp_path, "d.raw", "a\n"), None, "seq-cls").what
    err = error(write(tmp_path, "d.csv", "text,label\na,1\n"), None, "token-cls")
    assert "cannot serve" in err.what and "jsonl" in err.what


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown task"):
        read_examples("x.csv", "ner")
    with pytest.raises(ValueError, match="unknown fmt"):
        read_examples("x.csv", "seq-cls", fmt="xml")


def test_columns_rejected_for_formats_without_columns(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="text_column"):
        read_examples(write(tmp_path, "d.conll", "a O\n"), "token-cls", text_column="x")


def test_readers_callable_directly(tmp_path: Path) -> None:
    assert read_csv(write(tmp_path, "d.tsv", "text\tlabel\na\t1\n"), delimiter="\t") == [
        TextExample("a", label="1")
    ]
    assert read_jsonl(write(tmp_path, "d.jsonl", '{"text": "a"}\n'), "mlm") == [TextExample("a")]


def test_label_list() -> None:
    texts = [
        TextExample("a", label="10"),
        TextExample("b", label="2"),
        TextExample("c", label="2"),
        TextExample("d"),
    ]
    assert label_list(texts) == ["2", "10"]
    assert label_list([TextExample("a", label="pos"), TextExample("b", label="neg")]) == ["neg", "pos"]
    tokens = [
        TokenExample(("a", "b"), ("O", "B-PER")),
        TokenExample(("c",), ("I-PER",)),
        TokenExample(("d",)),
    ]
    assert label_list(tokens) == ["B-PER", "I-PER", "O"]
    assert label_list([]) == []
