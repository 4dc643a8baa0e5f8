"""The shipped synthetic demo data: reproducible, well-formed, balanced, no leaks between splits."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path
from types import ModuleType

import pytest

from load_script import load_script

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "src" / "modfit" / "demo_data"

EXPECTED_FILES = {
    "README.md",
    "sentiment_train.csv",
    "sentiment_test.csv",
    "sentiment_test.jsonl",
    "topic_train.csv",
    "topic_test.csv",
    "ner_train.conll",
    "ner_test.conll",
    "lm_text.txt",
}


def _load_script() -> ModuleType:
    return load_script("scripts/make_demo_data.py", "make_demo_data")


def _csv_rows(name: str) -> list[tuple[str, str]]:
    with (DATA / name).open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        assert next(reader) == ["text", "label"]
        rows = [tuple(row) for row in reader]
    assert all(len(row) == 2 and row[0].strip() and row[0] == row[0].strip() for row in rows)
    return rows  # type: ignore[return-value]


def _conll_sentences(name: str) -> list[list[tuple[str, str]]]:
    text = (DATA / name).read_text(encoding="utf-8")
    assert text.endswith("\n") and not text.endswith("\n\n\n")
    sentences = []
    for block in text.rstrip("\n").split("\n\n"):
        assert block, "two blank lines in a row"
        sentence = []
        for line in block.split("\n"):
            parts = line.split(" ")
            assert len(parts) == 2 and all(parts), f"bad CoNLL line {line!r}"
            sentence.append((parts[0], parts[1]))
        sentences.append(sentence)
    return sentences


def test_regenerating_gives_byte_identical_files(tmp_path: Path) -> None:
    written = _load_script().generate(tmp_path)
    assert {p.name for p in written} == EXPECTED_FILES
    assert {p.name for p in DATA.iterdir()} == EXPECTED_FILES
    for name in sorted(EXPECTED_FILES):
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), (
            f"{name} differs from a fresh run of scripts/make_demo_data.py; regenerate it"
        )


def test_small_and_ascii() -> None:
    total = 0
    for path in DATA.iterdir():
        data = path.read_bytes()
        total += len(data)
        data.decode("ascii")  # plain ASCII, no stray encodings
        assert b"\r" not in data
    assert total < 600_000


@pytest.mark.parametrize(
    ("task", "n_train", "n_test", "labels"),
    [
        ("sentiment", 1200, 300, {"positive", "negative"}),
        ("topic", 800, 200, {"sports", "technology", "food", "travel"}),
    ],
)
def test_classification_splits(task: str, n_train: int, n_test: int, labels: set[str]) -> None:
    train, test = _csv_rows(f"{task}_train.csv"), _csv_rows(f"{task}_test.csv")
    assert (len(train), len(test)) == (n_train, n_test)
    for rows, n in ((train, n_train), (test, n_test)):
        counts = Counter(label for _, label in rows)
        assert set(counts) == labels
        assert set(counts.values()) == {n // len(labels)}, counts
        texts = [text for text, _ in rows]
        assert len(set(texts)) == len(texts), "duplicate texts within a split"
    assert not {t for t, _ in train} & {t for t, _ in test}, "train/test overlap"


def test_sentiment_jsonl_matches_csv() -> None:
    lines = (DATA / "sentiment_test.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    assert all(set(r) == {"text", "label"} for r in records)
    assert [(r["text"], r["label"]) for r in records] == _csv_rows("sentiment_test.csv")


def test_sentiment_has_hard_cases() -> None:
    rows = [(f" {text.lower()} ", label) for text, label in _csv_rows("sentiment_train.csv")]
    script = _load_script()
    mild = tuple(f" {w.lower()}" for w in script.MILD_POS + script.MILD_NEG if w != script.HELD)
    kinds = {
        "negation": (" not ", "n't ", " never ", " nothing "),
        "contrast": (" but ", " although ", " yet "),
        "intensifier": (" really ", " truly ", " incredibly ", " absolutely ", " extremely "),
        "mild wording": mild,
        "two sentences": (". ",),
    }
    for kind, markers in kinds.items():
        for label in ("positive", "negative"):
            n = sum(any(m in text for m in markers) for text, lab in rows if lab == label)
            assert n >= 20, (kind, label, n)


def _check_iob2(sentence: list[tuple[str, str]]) -> None:
    previous = "O"
    for _token, tag in sentence:
        assert tag == "O" or tag[:2] in ("B-", "I-"), tag
        if tag != "O":
            assert tag[2:] in ("PER", "ORG", "LOC"), tag
        if tag.startswith("I-"):
            assert previous in (f"B-{tag[2:]}", f"I-{tag[2:]}"), f"{tag} after {previous}: {sentence}"
        previous = tag


def _entities(sentence: list[tuple[str, str]]) -> list[tuple[str, int]]:
    spans: list[tuple[str, int]] = []
    for _token, tag in sentence:
        if tag.startswith("B-"):
            spans.append((tag[2:], 1))
        elif tag.startswith("I-"):
            spans[-1] = (spans[-1][0], spans[-1][1] + 1)
    return spans


def test_ner_conll() -> None:
    train, test = _conll_sentences("ner_train.conll"), _conll_sentences("ner_test.conll")
    assert (len(train), len(test)) == (600, 150)
    keys = {}
    for split, sentences in (("train", train), ("test", test)):
        for sentence in sentences:
            _check_iob2(sentence)
        keys[split] = [" ".join(tok for tok, _ in s) for s in sentences]
        assert len(set(keys[split])) == len(keys[split]), f"duplicate sentences in {split}"
        spans = [span for s in sentences for span in _entities(s)]
        kinds = Counter(kind for kind, _ in spans)
        assert set(kinds) == {"PER", "ORG", "LOC"} and min(kinds.values()) >= len(sentences) // 5, kinds
        lengths = Counter(length > 1 for _, length in spans)
        assert lengths[True] >= len(spans) // 5 and lengths[False] >= len(spans) // 5, lengths
    assert not set(keys["train"]) & set(keys["test"]), "train/test overlap"


def test_lm_text() -> None:
    lines = (DATA / "lm_text.txt").read_text(encoding="utf-8").split("\n")
    assert lines[-1] == ""
    lines = lines[:-1]
    assert len(lines) == 1000
    assert all(line.strip() == line and line for line in lines)
    assert len(set(lines)) == len(lines)
    test_texts = {t for t, _ in _csv_rows("sentiment_test.csv")} | {t for t, _ in _csv_rows("topic_test.csv")}
    assert not set(lines) & test_texts


def test_readme() -> None:
    readme = (DATA / "README.md").read_text(encoding="utf-8")
    script = _load_script()
    assert "python scripts/make_demo_data.py" in readme
    assert f"seed {script.SEED}" in readme
    assert "Apache-2.0" in readme and "synthetic" in readme
    for name in EXPECTED_FILES - {"README.md"}:
        assert f"`{name}`" in readme, name
