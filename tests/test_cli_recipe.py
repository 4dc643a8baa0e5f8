"""`modfit recipe cross-lingual` end to end on tiny generated data, and its user errors.

The data: a made-up "English" NER set and a "target language" whose words are the English words
reversed, its NER file with a DATE the English tags lack. Every run trains 2 steps per module on the
packaged MiniLM: the numbers mean nothing, the plumbing is what is tested (real transfer is measured
by bench/cross_lingual.py). The saved modules must combine again from their folders through
`modfit eval --load ... --compose`, with the same F1 as the recipe's table.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from cli_run import Run
from cli_run import run_cli as modfit_cli

KINDS = {"paris": "LOC", "london": "LOC", "bob": "PER", "alice": "PER", "google": "ORG", "acme": "ORG"}
OTHER = ["the", "went", "to", "saw", "in", "today", "with", "a", "big", "house"]
TINY = ("--mlm-steps", "2", "--task-steps", "2", "--batch-size", "4", "--max-length", "32")


def _sentence(rng: random.Random) -> list[tuple[str, str]]:
    words = [rng.choice(OTHER + list(KINDS)) for _ in range(rng.randint(4, 8))]
    return [(w, "B-" + KINDS[w] if w in KINDS else "O") for w in words]


def _conll(sentences: list[list[tuple[str, str]]]) -> str:
    return "\n\n".join("\n".join(f"{w} {t}" for w, t in s) for s in sentences) + "\n"


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """en.txt, en.conll; sw.txt (raw), sw.conll (with a B-DATE) and sw_as_o.conll (the DATE as O)."""
    d = tmp_path_factory.mktemp("xl-cli")
    rng = random.Random(0)
    (d / "en.txt").write_text("\n".join(" ".join(w for w, _ in _sentence(rng)) for _ in range(40)) + "\n")
    (d / "en.conll").write_text(_conll([_sentence(rng) for _ in range(24)]))
    target = [[(w[::-1], t) for w, t in _sentence(rng)] for _ in range(24)]
    (d / "sw.txt").write_text("\n".join(" ".join(w for w, _ in s) for s in target) + "\n")
    target[0].append(("ajan", "B-DATE"))
    (d / "sw.conll").write_text(_conll(target))
    (d / "sw_as_o.conll").write_text(
        _conll([[(w, "O" if t == "B-DATE" else t) for w, t in s] for s in target])
    )
    return d


def _args(data: Path, out: Path, *extra: str) -> list[str | Path]:
    return [
        "recipe",
        "cross-lingual",
        "--source-text",
        data / "en.txt",
        "--target-text",
        data / "sw.txt",
        "--task",
        "token-cls",
        "--train",
        data / "en.conll",
        "--eval-target",
        data / "sw.conll",
        "--out",
        out,
        *TINY,
        *extra,
    ]


@pytest.fixture(scope="module")
def pfeiffer(data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Run, Path]:
    out = tmp_path_factory.mktemp("xl-out") / "en-sw"
    names = ("--source-lang", "en", "--target-lang", "sw", "--task-name", "ner")
    return modfit_cli(*_args(data, out, *names, "--shared-head", "--threads", "1")), out


@pytest.mark.slow
def test_prints_and_saves_the_table(pfeiffer: tuple[Run, Path]) -> None:
    run, out = pfeiffer
    assert run.status == 0, run.err
    assert "Traceback" not in run.err
    rows = [line.split("|")[1].strip() for line in run.out.splitlines() if line.startswith("| ")]
    assert rows == ["setting", "ner alone", "stack(en, ner)", "stack(sw, ner)"]
    assert "modfit: warning: target labels unknown to the task head count as O: B-DATE" in run.err
    results = json.loads((out / "results.json").read_text())
    assert list(results["table"]) == ["ner alone", "stack(en, ner)", "stack(sw, ner)"]
    assert results["unknown_labels_as_o"] == ["B-DATE"]
    table_lines = [line for line in run.out.splitlines() if line.startswith("|")]
    assert (out / "results.md").read_text().splitlines() == table_lines
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(results["curves"]) == {"en mlm", "sw mlm", "ner"}
    for name in ("en", "sw", "ner"):
        assert (out / name / "module.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("loads", "compose", "row"),
    [
        (("sw", "ner"), "stack(sw,ner)", "stack(sw, ner)"),
        (("en", "ner"), "stack(en,ner)", "stack(en, ner)"),
        (("ner",), None, "ner alone"),
    ],
)
def test_saved_modules_combine_in_eval(
    pfeiffer: tuple[Run, Path], data: Path, loads: tuple[str, ...], compose: str | None, row: str
) -> None:
    """The target language module and the task module trained on the source language's module,
    from separate folders: `modfit eval` gives the recipe's F1 (the DATE as O in its data)."""
    run, out = pfeiffer
    assert run.status == 0, run.err
    argv: list[str | Path] = ["eval", "--data", data / "sw_as_o.conll", "--max-length", "32", "--json"]
    for name in loads:
        argv += ["--load", out / name]
    if compose:
        argv += ["--compose", compose]
    evaluated = modfit_cli(*argv)
    assert evaluated.status == 0, evaluated.err
    table = json.loads((out / "results.json").read_text())["table"]
    assert evaluated.json()["metrics"]["f1"] == pytest.approx(table[row]["f1"], abs=1e-6)


@pytest.mark.slow
def test_extended_vocabulary_module_evaluates_with_its_pieces(data: Path, tmp_path: Path) -> None:
    """A target module with new word pieces: `modfit eval` tokenizes with them (the extended
    tokenizer is rebuilt from the module's card), so it reproduces the recipe's stack(sw, ner) F1."""
    out = tmp_path / "vocab"
    names = ("--source-lang", "en", "--target-lang", "sw", "--task-name", "ner")
    run = modfit_cli(*_args(data, out, *names, "--extend-vocab", "8", "--threads", "1"))
    assert run.status == 0, run.err
    card = json.loads((out / "sw" / "module.json").read_text())
    assert "vocab" in json.dumps(card["config"])
    evaluated = modfit_cli(
        "eval", "--data", data / "sw_as_o.conll", "--max-length", "32", "--json",
        "--load", out / "sw", "--load", out / "ner", "--compose", "stack(sw,ner)",
    )  # fmt: skip
    assert evaluated.status == 0, evaluated.err
    table = json.loads((out / "results.json").read_text())["table"]
    assert evaluated.json()["metrics"]["f1"] == pytest.approx(table["stack(sw, ner)"]["f1"], abs=1e-6)


@pytest.mark.slow
def test_sft_json(data: Path, tmp_path: Path) -> None:
    run = modfit_cli(*_args(data, tmp_path / "sft", "--method", "sft", "--json"))
    assert run.status == 0, run.err
    result = run.json()
    assert list(result["table"]) == ["task alone", "stack(source, task)", "stack(target, task)"]
    assert result["spec"]["method"] == "sft" and result["unknown_labels_as_o"] == ["B-DATE"]
    assert "modfit: warning:" in run.err  # the warning still goes to stderr; stdout is JSON only
    assert Path(result["modules"]["target"], "module.json").is_file()


def _assert_user_error(run: Run, *fragments: str) -> None:
    assert run.status == 2, (run.status, run.out, run.err)
    assert run.out == ""
    lines = run.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("modfit: error: "), run.err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.mark.parametrize("flag", ["--source-text", "--target-text", "--train", "--eval-target"])
def test_missing_file_is_named(data: Path, tmp_path: Path, flag: str) -> None:
    argv = [str(a) for a in _args(data, tmp_path / "out")]
    missing = tmp_path / "nope.txt"
    argv[argv.index(flag) + 1] = str(missing)
    run = modfit_cli(*argv)
    _assert_user_error(run, flag, str(missing), "no such file")
    assert not (tmp_path / "out").exists()


def test_bad_conll_fails_before_training(data: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.conll"
    bad.write_text("Juma B-PER\nna O\n\nkwa\n")
    argv = [str(a) for a in _args(data, tmp_path / "out")]
    argv[argv.index("--eval-target") + 1] = str(bad)
    run = modfit_cli(*argv)
    assert run.status == 2 and "bad.conll:4" in run.err, run.err
    assert not (tmp_path / "out").exists()


def test_bad_method_is_a_usage_error(data: Path, tmp_path: Path) -> None:
    run = modfit_cli(*_args(data, tmp_path / "out", "--method", "lora"))
    assert run.status == 2 and run.out == ""
    assert "argument --method: invalid choice: 'lora'" in run.err and "pfeiffer" in run.err


def test_module_names_must_differ(data: Path, tmp_path: Path) -> None:
    run = modfit_cli(*_args(data, tmp_path / "out", "--source-lang", "xx", "--target-lang", "xx"))
    _assert_user_error(run, "module names must differ")


def test_lang_param_without_value(data: Path, tmp_path: Path) -> None:
    run = modfit_cli(*_args(data, tmp_path / "out", "--lang-param", "reduction_factor"))
    _assert_user_error(run, "expected KEY=VALUE")
