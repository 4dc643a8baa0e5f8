"""The cross-lingual recipe end to end on tiny generated data (real learning is measured in bench/)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

import modfit
from modfit.recipes import CrossLingualSpec, run_cross_lingual

KINDS = {"paris": "LOC", "london": "LOC", "bob": "PER", "alice": "PER", "google": "ORG", "acme": "ORG"}
OTHER = ["the", "went", "to", "saw", "in", "today", "with", "a", "big", "house"]


def _sentence(rng: random.Random) -> list[tuple[str, str]]:
    words = [rng.choice(OTHER + list(KINDS)) for _ in range(rng.randint(4, 8))]
    return [(w, "B-" + KINDS[w] if w in KINDS else "O") for w in words]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """English text and NER; a 'target language' (every word reversed) whose NER file has a DATE."""
    d = tmp_path_factory.mktemp("xl")
    rng = random.Random(0)
    (d / "en.txt").write_text("\n".join(" ".join(w for w, _ in _sentence(rng)) for _ in range(40)) + "\n")
    conll = lambda sents: "\n\n".join("\n".join(f"{w} {t}" for w, t in s) for s in sents) + "\n"  # noqa: E731
    (d / "en.conll").write_text(conll([_sentence(rng) for _ in range(24)]))
    target = [[(w[::-1], t) for w, t in _sentence(rng)] for _ in range(24)]
    target[0].append(("ajan", "B-DATE"))
    (d / "sw.conll").write_text(conll(target))
    return d


@pytest.mark.slow
@pytest.mark.parametrize("method", ["pfeiffer", "sft"])
def test_recipe_writes_table_modules_and_curves(files: Path, tmp_path: Path, method: str) -> None:
    spec = CrossLingualSpec(
        base="default",
        source_text=str(files / "en.txt"),
        target_text=str(files / "sw.conll"),  # CoNLL read as raw text: its tags are ignored
        train=str(files / "en.conll"),
        eval_target=str(files / "sw.conll"),
        out=str(tmp_path / "out"),
        method=method,
        mlm_steps=2,
        task_steps=2,
        batch_size=4,
        max_length=32,
        extend_vocab=8 if method == "pfeiffer" else 0,
        shared_head=method == "sft",  # the target module trains under the source's frozen MLM head
    )
    report = run_cross_lingual(spec)
    assert list(report.table) == ["task alone", "stack(source, task)", "stack(target, task)"]
    assert all(0.0 <= row["f1"] <= 1.0 for row in report.table.values())
    assert report.unknown_labels == ["B-DATE"]
    out = tmp_path / "out"
    results = json.loads((out / "results.json").read_text())
    assert results["table"] == report.table and results["spec"]["method"] == method
    assert (out / "results.md").read_text().startswith("| setting | entity F1")
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(report.curves["source mlm"]) >= 2 and len(report.curves["task"]) >= 2  # sft: 2 phases
    # the saved modules combine again from their folders, the target language swapped in
    mm = modfit.wrap(modfit.base.load_base("default"))
    for name in ("target", "task"):
        mm.load(out / name)
    mm.activate("stack(target, task)")
    assert mm.head_name == "task"
    target_card = json.loads((out / "target" / "module.json").read_text())
    assert (target_card.get("head") is None) == (method == "sft")  # a shared head is not the target's
    if method == "pfeiffer":
        card = json.loads((out / "target" / "module.json").read_text())
        assert [c["method"] for c in card["config"]["components"]] == ["pfeiffer_inv", "vocab"]
