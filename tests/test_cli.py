"""The `modfit` command line, end to end: `cli.main(argv)` in-process, plus one run of the console script.

The bases are tiny random-init models saved with `save_pretrained` into temporary folders, with
the tokenizer from `train_fixtures` (a WordPiece over a few words, built in code): a 2-layer BERT
for seq-cls / token-cls / mlm, a 2-layer GPT-2 for causal-lm (its tokenizer has an eos token and
no pad token, as decoder-only models ship). Every train call runs a few steps.

User errors must give exit status 2 and exactly one line `modfit: error: ...` on stderr, no
traceback, nothing on stdout; a failed `train` must leave a module saved earlier in `--out` as it
was.
"""

from __future__ import annotations

import csv
import io
import json
import random
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from safetensors.torch import load_file

import modfit
from cli_run import Run
from cli_run import run_cli as quiet_cli  # for module-scoped fixtures, which cannot use capsys
from modfit import cli, commands
from modfit.persistence import CARD, WEIGHTS
from train_fixtures import SEQ_LABELS, TAGS, bert_config, tiny_tokenizer

# Words of the tiny tokenizer's vocabulary, split so that the seq-cls classes are easy to tell apart.
CLASS_WORDS = {"a": ("cat", "dog", "sat", "ran", "mat"), "b": ("paris", "london", "park", "bob", "alice")}
# token-cls: a word's tag follows from the word (places are LOC, names PER).
ENTITY = {"paris": "LOC", "london": "LOC", "bob": "PER", "alice": "PER"}
OTHER = ("the", "a", "cat", "dog", "sat", "ran", "on", "in")
BERT_BASE_PARAMETERS = 109_482_240  # BertModel(BertConfig()), pooler included


# -- running the command -----------------------------------------------------------------------


def modfit_cli(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> Run:
    """`modfit ARGV...` in this process; its exit status and what it printed."""
    capsys.readouterr()  # drop anything printed before
    status = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return Run(status, captured.out, captured.err)


def ok(run: Run) -> Run:
    assert run.status == 0, run.err
    assert "Traceback" not in run.err
    return run


def assert_user_error(run: Run, *fragments: str, started: bool = False) -> str:
    """Exit 2, one line `modfit: error: ...` on stderr naming the problem, no traceback.

    Nothing on stdout either, unless the command `started` (train reports what it trains first).
    """
    assert run.status == 2, (run.status, run.out, run.err)
    assert run.out == "" or (started and "Traceback" not in run.out), run.out
    lines = run.err.strip().splitlines()
    assert len(lines) == 1, run.err
    assert lines[0].startswith("modfit: error: "), run.err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def files_of(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` (hidden temporaries included), by relative path."""
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()
    }


# -- bases and data ----------------------------------------------------------------------------


def _save_bert(directory: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    transformers.BertModel(bert_config()).save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-init BERT folder (weights, config, tokenizer)."""
    return _save_bert(tmp_path_factory.mktemp("bert"), seed=0)


@pytest.fixture(scope="module")
def other_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same architecture as `bert` with other weights: modules of one do not load on the other."""
    return _save_bert(tmp_path_factory.mktemp("other-bert"), seed=1)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-init GPT-2 folder; its tokenizer has an eos token and no pad token."""
    directory = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=24, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=3, eos_token_id=3
    )
    transformers.GPT2LMHeadModel(config).save_pretrained(directory)
    backend = tiny_tokenizer().backend_tokenizer
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", bos_token="[SEP]", eos_token="[SEP]"
    )
    assert tokenizer.pad_token is None
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def bert_base_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding only the config.json of BERT-base (no weights at all)."""
    directory = tmp_path_factory.mktemp("bert-base")
    transformers.BertConfig().save_pretrained(directory)
    assert [p.name for p in directory.iterdir()] == ["config.json"]
    return directory


def _sentence(rng: random.Random, label: str) -> str:
    return " ".join(rng.choice(CLASS_WORDS[label]) for _ in range(rng.randint(3, 6)))


def _ner_sentence(rng: random.Random) -> list[tuple[str, str]]:
    words = [rng.choice(OTHER + tuple(ENTITY)) for _ in range(rng.randint(3, 7))]
    tagged, previous = [], "O"
    for word in words:
        kind = ENTITY.get(word, "O")
        tag = "O" if kind == "O" else ("I-" if previous == kind else "B-") + kind
        tagged.append((word, tag))
        previous = kind
    return tagged


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Data files of every format: seq-cls (csv, tsv, jsonl), token-cls (conll) and plain text."""
    directory = tmp_path_factory.mktemp("data")
    rng = random.Random(0)
    rows = [(_sentence(rng, label), label) for label in SEQ_LABELS * 12]
    for name, delimiter in (("train.csv", ","), ("train.tsv", "\t")):
        with open(directory / name, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, delimiter=delimiter, lineterminator="\n")
            writer.writerow(["text", "label"])
            writer.writerows(rows)
    (directory / "train.jsonl").write_text(
        "".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows)
    )
    (directory / "dev.csv").write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows[:8]))
    # Line 3 has an extra field; dev_unknown.csv has a label the modules never saw.
    (directory / "bad.csv").write_text("text,label\ncat sat,a\nparis bob,b,extra\n")
    (directory / "bad.jsonl").write_text('{"text": "cat", "label": "a"}\n{"text": "dog", "label": \n')
    (directory / "dev_unknown.csv").write_text("text,label\ncat sat,a\nparis park,c\n")

    sentences = [_ner_sentence(rng) for _ in range(16)]
    blocks = ["\n".join(f"{w} {t}" for w, t in s) for s in sentences]
    (directory / "ner.conll").write_text("-DOCSTART- O\n\n" + "\n\n".join(blocks) + "\n")
    (directory / "ner_words.conll").write_text(
        "\n\n".join("\n".join(w for w, _ in s) for s in sentences) + "\n"
    )
    (directory / "bad.conll").write_text("paris B-LOC\nbob\n")
    (directory / "ner_unknown.conll").write_text("paris B-LOC\nbob B-ORG\n")
    (directory / "text.txt").write_text("\n".join(_sentence(rng, y) for y in SEQ_LABELS * 8) + "\n")
    return directory


def _train_args(base: Path, task: str, train: Path, out: Path, *extra: str | Path) -> list[str | Path]:
    common = ["--method", "lora", "--param", "r=2", "--steps", "3", "--batch-size", "8", "--lr", "1e-2"]
    return ["train", "--base", base, "--task", task, "--train", train, "--out", out, *common, *extra]


@pytest.fixture(scope="module")
def sst(bert: Path, data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seq-cls module (labels a, b) trained on `bert`."""
    out = tmp_path_factory.mktemp("modules") / "sst"
    ok(quiet_cli(*_train_args(bert, "seq-cls", data / "train.csv", out)))
    return out


@pytest.fixture(scope="module")
def lang(bert: Path, data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An mlm module trained on `bert` from plain text (a 'language' module to stack on)."""
    out = tmp_path_factory.mktemp("modules") / "lang"
    ok(quiet_cli(*_train_args(bert, "mlm", data / "text.txt", out)))
    return out


@pytest.fixture(scope="module")
def headless(bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A module without a task head, saved through the Python API on `bert`."""
    mm = modfit.wrap(transformers.AutoModel.from_pretrained(bert))
    mm.add("bare", modfit.config("lora", r=2))
    return mm.save("bare", tmp_path_factory.mktemp("modules") / "bare")


@pytest.fixture
def captured_models(monkeypatch: pytest.MonkeyPatch) -> list[modfit.ModularModel]:
    """The ModularModels that the commands build, in order (a spy on `commands.wrap`)."""
    models: list[modfit.ModularModel] = []

    def spy(model: torch.nn.Module) -> modfit.ModularModel:
        models.append(modfit.wrap(model))
        return models[-1]

    monkeypatch.setattr(commands, "wrap", spy)
    return models


# -- methods, and the console script -----------------------------------------------------------


def test_methods(capsys: pytest.CaptureFixture[str]) -> None:
    listed = ok(modfit_cli(capsys, "methods", "--json")).json()
    assert set(listed) == set(modfit.methods())
    assert {"lora", "pfeiffer", "houlsby"} <= set(listed)
    assert all(isinstance(text, str) and text for text in listed.values())
    human = ok(modfit_cli(capsys, "methods")).out
    assert [line.split()[0] for line in human.splitlines()] == sorted(listed)


def test_console_script_entry_point() -> None:
    script = shutil.which("modfit", path=str(Path(sys.executable).parent)) or shutil.which("modfit")
    assert script is not None, "the modfit console script is not installed"
    done = subprocess.run(
        [script, "methods", "--json"], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "lora" in json.loads(done.stdout)


def test_version_and_help_return_zero(capsys: pytest.CaptureFixture[str]) -> None:
    assert ok(modfit_cli(capsys, "--version")).out.strip() == f"modfit {modfit.__version__}"
    assert "train" in ok(modfit_cli(capsys, "--help")).out


def test_train_with_gradient_checkpointing(
    capsys: pytest.CaptureFixture[str], bert: Path, data: Path, tmp_path: Path
) -> None:
    """--gradient-checkpointing: the same module as without it (same seed, no dropout in the tiny base)."""
    outs = [tmp_path / "plain", tmp_path / "ckpt"]
    for out, extra in zip(outs, [(), ("--gradient-checkpointing",)], strict=True):
        ok(modfit_cli(capsys, *_train_args(bert, "seq-cls", data / "train.csv", out, *extra)))
    plain, ckpt = (load_file(str(out / WEIGHTS)) for out in outs)
    assert plain.keys() == ckpt.keys()
    for key in plain:
        torch.testing.assert_close(ckpt[key], plain[key], atol=1e-6, rtol=1e-5, msg=key)


def test_train_compiled(capsys: pytest.CaptureFixture[str], bert: Path, data: Path, tmp_path: Path) -> None:
    """--compile BACKEND trains through torch.compile: the same module as eager training (aot_eager
    here: dynamo and AOTAutograd without code generation, so the test stays fast)."""
    outs = [tmp_path / "eager", tmp_path / "compiled"]
    for out, extra in zip(outs, [(), ("--compile", "aot_eager")], strict=True):
        ok(modfit_cli(capsys, *_train_args(bert, "seq-cls", data / "train.csv", out, *extra)))
    eager, compiled = (load_file(str(out / WEIGHTS)) for out in outs)
    assert eager.keys() == compiled.keys()
    for key in eager:
        torch.testing.assert_close(compiled[key], eager[key], atol=1e-5, rtol=1e-4, msg=key)


def test_train_torch_dropout(capsys: pytest.CaptureFixture[str], data: Path, tmp_path: Path) -> None:
    """On a base with dropout: modfit's fast dropout and --torch-dropout each repeat themselves under
    --seed, and differ from each other (two random streams of the same distribution)."""
    torch.manual_seed(0)
    base = tmp_path / "dropout-bert"
    config = bert_config(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    transformers.BertModel(config).save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    runs = {}
    for run, extra in enumerate([(), (), ("--torch-dropout",), ("--torch-dropout",)]):
        out = tmp_path / f"run{run}"
        ok(modfit_cli(capsys, *_train_args(base, "seq-cls", data / "train.csv", out, *extra)))
        runs[run] = load_file(str(out / WEIGHTS))
    for key in runs[0]:
        assert torch.equal(runs[0][key], runs[1][key]), key
        assert torch.equal(runs[2][key], runs[3][key]), key
    assert any(not torch.equal(runs[0][key], runs[2][key]) for key in runs[0])


def test_seed_fixes_the_initial_module_and_head(
    capsys: pytest.CaptureFixture[str], bert: Path, data: Path, tmp_path: Path
) -> None:
    """--seed decides the new module's and head's initial weights too: the same command gives the
    same module whatever the global generator held before; another seed gives another one."""
    outs = {}
    for run, (seed, noise) in enumerate([(0, 1), (0, 2), (1, 1)]):
        torch.manual_seed(noise)  # what the process drew before must not matter
        outs[run] = tmp_path / f"run{run}"
        ok(
            modfit_cli(
                capsys, *_train_args(bert, "seq-cls", data / "train.csv", outs[run], "--seed", str(seed))
            )
        )
    first, again, other = (load_file(str(outs[i] / WEIGHTS)) for i in range(3))
    for key in first:
        assert torch.equal(first[key], again[key]), key
    assert any(not torch.equal(first[key], other[key]) for key in first)


# -- seq-cls from CSV, TSV, JSONL --------------------------------------------------------------


def test_seq_cls_csv_train_eval_predict_info(
    capsys: pytest.CaptureFixture[str], bert: Path, data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "sst"
    run = ok(
        modfit_cli(capsys, *_train_args(bert, "seq-cls", data / "train.csv", out, "--eval", data / "dev.csv"))
    )
    assert "training 'sst' (lora" in run.out
    assert f"saved {out}" in run.out
    assert {p.name for p in out.iterdir()} == {CARD, WEIGHTS}
    card = json.loads((out / CARD).read_text())
    assert card["name"] == "sst" and card["method"] == "lora" and card["config"]["r"] == 2
    assert card["head"]["task"] == "seq-cls" and card["head"]["labels"] == list(SEQ_LABELS)
    assert set(card["metrics"]) == {"accuracy", "macro_f1", "loss"}
    assert card["composition"] is None

    human = ok(modfit_cli(capsys, "eval", "--base", bert, "--load", out, "--data", data / "dev.csv")).out
    assert human.splitlines()[-1].startswith("eval: accuracy ")
    result = ok(
        modfit_cli(capsys, "eval", "--base", bert, "--load", out, "--data", data / "dev.csv", "--json")
    ).json()
    assert result["composition"] == "sst" and result["examples"] == 8
    assert set(result["metrics"]) == {"accuracy", "macro_f1", "loss"}
    assert 0.0 <= result["metrics"]["accuracy"] <= 1.0

    predictions = tmp_path / "pred.csv"
    run = ok(
        modfit_cli(
            capsys, "predict", "--base", bert, "--load", out, "--data", data / "dev.csv", "--out", predictions
        )
    )
    assert f"wrote 8 predictions to {predictions}" in run.out
    with open(predictions, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    dev = list(csv.reader(io.StringIO((data / "dev.csv").read_text())))
    assert rows[0] == ["text", "prediction"]
    assert [r[0] for r in rows[1:]] == [r[0] for r in dev[1:]]
    assert {r[1] for r in rows[1:]} <= set(SEQ_LABELS)

    info = ok(modfit_cli(capsys, "info", out)).out
    assert "module     sst  (lora," in info and "labels     a, b" in info
    assert ok(modfit_cli(capsys, "info", out, "--json")).json() == card


@pytest.mark.parametrize("fmt", ["jsonl", "tsv"])
def test_seq_cls_other_formats(
    capsys: pytest.CaptureFixture[str], bert: Path, data: Path, tmp_path: Path, fmt: str
) -> None:
    out, train = tmp_path / f"sst-{fmt}", data / f"train.{fmt}"
    result = ok(
        modfit_cli(capsys, *_train_args(bert, "seq-cls", train, out, "--eval", train, "--json"))
    ).json()
    assert set(result) == {
        "name",
        "out",
        "method",
        "parameters",
        "composition",
        "steps",
        "resumed_from",
        "metrics",
    }
    assert result["resumed_from"] is None
    assert result["name"] == f"sst-{fmt}" and result["out"] == str(out) and result["steps"] == 3
    assert result["parameters"] == json.loads((out / CARD).read_text())["parameters"] > 0
    assert set(result["metrics"]) == {"accuracy", "macro_f1", "loss"}

    metrics = ok(modfit_cli(capsys, "eval", "--base", bert, "--load", out, "--data", train, "--json")).json()
    assert metrics["examples"] == 24
    predictions = tmp_path / "pred.jsonl"
    ok(modfit_cli(capsys, "predict", "--base", bert, "--load", out, "--data", train, "--out", predictions))
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert len(rows) == 24 and all(set(r) == {"text", "prediction"} for r in rows)
    assert {r["prediction"] for r in rows} <= set(SEQ_LABELS)
    assert ok(modfit_cli(capsys, "info", out, "--json")).json()["name"] == f"sst-{fmt}"


# -- token-cls from CoNLL ----------------------------------------------------------------------


def test_token_cls_conll_train_eval_predict_info(
    capsys: pytest.CaptureFixture[str], bert: Path, data: Path, tmp_path: Path
) -> None:
    out, conll = tmp_path / "ner", data / "ner.conll"
    ok(modfit_cli(capsys, *_train_args(bert, "token-cls", conll, out, "--eval", conll)))
    card = ok(modfit_cli(capsys, "info", out, "--json")).json()
    assert card["task"] == "token-cls" and set(card["head"]["labels"]) <= set(TAGS)
    metrics = ok(modfit_cli(capsys, "eval", "--base", bert, "--load", out, "--data", conll, "--json")).json()
    assert set(metrics["metrics"]) == {"precision", "recall", "f1", "accuracy", "loss"}
    assert metrics["examples"] == 16

    sentences = [block.split("\n") for block in (data / "ner_words.conll").read_text().strip().split("\n\n")]
    for source in (conll, data / "ner_words.conll"):  # gold tags in the input play no part
        written = tmp_path / "pred.conll"
        ok(modfit_cli(capsys, "predict", "--base", bert, "--load", out, "--data", source, "--out", written))
        blocks = [block.split("\n") for block in written.read_text().strip().split("\n\n")]
        assert [[line.split(" ")[0] for line in block] for block in blocks] == sentences
        assert {line.split(" ")[1] for block in blocks for line in block} <= set(card["head"]["labels"])

    written = tmp_path / "pred.jsonl"
    ok(modfit_cli(capsys, "predict", "--base", bert, "--load", out, "--data", conll, "--out", written))
    rows = [json.loads(line) for line in written.read_text().splitlines()]
    assert [r["tokens"] for r in rows] == sentences
    assert all(len(r["tags"]) == len(r["tokens"]) for r in rows)


def test_token_cls_predict_tags_every_word_of_truncated_sentences(
    capsys: pytest.CaptureFixture[str], bert: Path, data: Path, tmp_path: Path
) -> None:
    out, conll = tmp_path / "ner", data / "ner.conll"
    ok(modfit_cli(capsys, *_train_args(bert, "token-cls", conll, out)))
    written = tmp_path / "pred.jsonl"
    argv = ["predict", "--base", bert, "--load", out, "--data", conll, "--out", written, "--max-length", "4"]
    run = ok(modfit_cli(capsys, *argv))
    assert "longer than --max-length 4" in run.err
    rows = [json.loads(line) for line in written.read_text().splitlines()]
    assert all(
        len(r["tags"]) == len(r["tokens"]) and r["tags"][2:] == ["O"] * (len(r["tokens"]) - 2) for r in rows
    )


def test_checkpoints_and_resume(
    capsys: pytest.CaptureFixture[str], bert: Path, data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "sst"
    argv = [*_train_args(bert, "seq-cls", data / "train.csv", out), "--steps", "4", "--checkpoint-every", "2"]
    assert ok(modfit_cli(capsys, *argv, "--json")).json()["resumed_from"] is None
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    first = load_file(str(out / WEIGHTS))
    # The same command again continues the finished run (nothing left to train) and says so.
    run = ok(modfit_cli(capsys, *argv))
    assert f"resumed from the checkpoint of step 4 in {out / 'checkpoints'}" in run.out
    again = load_file(str(out / WEIGHTS))  # the module the first run saved (safetensors bytes may differ)
    assert again.keys() == first.keys() and all(torch.equal(again[k], first[k]) for k in first)
    after = files_of(out)
    run = modfit_cli(capsys, *argv, "--no-resume")
    assert_user_error(run, "holds checkpoints of an earlier run (latest: step-00000004)", "drop --no-resume")
    assert files_of(out) == after


def test_json_output_is_strict_json(
    capsys: pytest.CaptureFixture[str], bert: Path, data: Path, sst: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import modfit.train

    # A loss over no targets (e.g. MLM masking chose nothing in a tiny file) is NaN: JSON has no NaN.
    monkeypatch.setattr(
        modfit.train, "evaluate", lambda *a, **k: {"loss": float("nan"), "perplexity": float("inf")}
    )
    run = ok(modfit_cli(capsys, "eval", "--base", bert, "--load", sst, "--data", data / "dev.csv", "--json"))

    def reject(constant: str) -> None:
        raise AssertionError(f"{constant} is not JSON")

    assert json.loads(run.out, parse_constant=reject)["metrics"] == {"loss": None, "perplexity": None}


# -- language modelling from plain text --------------------------------------------------------


def test_mlm_text(capsys: pytest.CaptureFixture[str], bert: Path, data: Path, tmp_path: Path) -> None:
    out, text = tmp_path / "mlm", data / "text.txt"
    result = ok(modfit_cli(capsys, *_train_args(bert, "mlm", text, out, "--eval", text, "--json"))).json()
    assert set(result["metrics"]) == {"loss", "perplexity"}
    card = ok(modfit_cli(capsys, "info", out, "--json")).json()
    assert card["task"] == "mlm" and card["head"]["task"] == "mlm" and card["head"]["labels"] == []
    metrics = ok(modfit_cli(capsys, "eval", "--base", bert, "--load", out, "--data", text, "--json")).json()
    assert set(metrics["metrics"]) == {"loss", "perplexity"} and metrics["examples"] == 16


def test_causal_lm_text(capsys: pytest.CaptureFixture[str], gpt2: Path, data: Path, tmp_path: Path) -> None:
    out, text = tmp_path / "clm", data / "text.txt"
    result = ok(
        modfit_cli(capsys, *_train_args(gpt2, "causal-lm", text, out, "--eval", text, "--json"))
    ).json()
    assert set(result["metrics"]) == {"loss", "perplexity"} and result["steps"] == 3
    card = ok(modfit_cli(capsys, "info", out, "--json")).json()
    assert card["task"] == "causal-lm" and card["base"]["fingerprint"]["model_type"] == "gpt2"
    metrics = ok(modfit_cli(capsys, "eval", "--base", gpt2, "--load", out, "--data", text, "--json")).json()
    assert metrics["metrics"]["perplexity"] > 1.0
    run = modfit_cli(
        capsys, "predict", "--base", gpt2, "--load", out, "--data", text, "--out", tmp_path / "p.jsonl"
    )
    assert_user_error(run, "predict supports seq-cls and token-cls heads", "causal-lm")


# -- a new module stacked on a frozen loaded one -----------------------------------------------


def test_train_on_top_of_a_loaded_module(
    capsys: pytest.CaptureFixture[str],
    bert: Path,
    data: Path,
    lang: Path,
    tmp_path: Path,
    captured_models: list[modfit.ModularModel],
) -> None:
    lang_files = files_of(lang)
    out = tmp_path / "task"
    argv = _train_args(
        bert, "seq-cls", data / "train.csv", out, "--load", lang, "--compose", "stack(lang, task)"
    )
    result = ok(modfit_cli(capsys, *argv, "--json")).json()
    assert result["composition"] == "stack(lang, task)"

    # The loaded module took part frozen: its weights in the trained model are still the saved ones.
    (mm,) = captured_models
    assert mm.module_names == ["lang", "task"]
    saved = load_file(str(lang / WEIGHTS))
    trained = {
        f"units.{path}.{k}": v for path, unit in mm.units("lang") for k, v in unit.state_dict().items()
    }
    head = mm.head_module("lang")
    assert head is not None
    trained.update({f"head.{k}": v for k, v in head.state_dict().items()})
    assert trained.keys() == saved.keys()
    assert all(torch.equal(trained[k], saved[k]) for k in saved)
    assert files_of(lang) == lang_files

    # The new module saved only its own weights and was trained with the loaded one active.
    card = json.loads((out / CARD).read_text())
    assert card["composition"] == "stack(lang, task)"
    assert card["name"] == "task" and card["parameters"] == result["parameters"] == mm.trainable_parameters(
        "task"
    )
    assert all(key.startswith(("units.", "head.")) for key in load_file(str(out / WEIGHTS)))

    both = ["--base", bert, "--load", lang, "--load", out, "--compose", "stack(lang, task)"]
    metrics = ok(modfit_cli(capsys, "eval", *both, "--data", data / "dev.csv", "--json")).json()
    assert metrics["composition"] == "stack(lang, task)" and set(metrics["metrics"]) == {
        "accuracy",
        "macro_f1",
        "loss",
    }


def test_new_module_trains_its_own_head_wherever_it_stands(
    capsys: pytest.CaptureFixture[str], bert: Path, data: Path, lang: Path, tmp_path: Path
) -> None:
    # In stack(task, lang) the last module with a head is lang (mlm); training must still use task's.
    out = tmp_path / "task"
    argv = _train_args(
        bert, "seq-cls", data / "train.csv", out, "--load", lang, "--compose", "stack(task, lang)"
    )
    assert ok(modfit_cli(capsys, *argv, "--json")).json()["composition"] == "stack(task, lang)"


def test_train_and_reload_a_union(
    capsys: pytest.CaptureFixture[str], bert: Path, data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "both"
    argv = ["train", "--base", bert, "--task", "seq-cls", "--train", data / "train.csv", "--out", out]
    argv += ["--method", "union", "--param", "components=lora,prefix", "--param", "lora.r=2"]
    argv += ["--param", "prefix.num_virtual_tokens=2", "--steps", "3", "--batch-size", "8", "--json"]
    ok(modfit_cli(capsys, *argv))
    card = json.loads((out / "module.json").read_text())
    assert card["method"] == "union"
    assert [(c["method"], c.get("r"), c.get("num_virtual_tokens")) for c in card["config"]["components"]] == [
        ("lora", 2, None),
        ("prefix", None, 2),
    ]
    metrics = ok(
        modfit_cli(capsys, "eval", "--base", bert, "--load", out, "--data", data / "dev.csv", "--json")
    )
    assert set(metrics.json()["metrics"]) >= {"accuracy", "macro_f1"}


# -- count -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "params", "expected"),
    [
        ("lora", ["r=8", "targets=query,value"], 294_912),
        ("pfeiffer", [], 894_528),
        ("houlsby", [], 1_789_056),
        ("unipelt", [], 11_083_376),
        ("mam", [], 22_493_984),
        # LoRA r=4 on q,v (147,456) + 10 virtual tokens (10 x 12 x 2 x 768 = 184,320)
        ("union", ["components=lora,prefix", "lora.r=4", "prefix.num_virtual_tokens=10"], 331_776),
    ],
)
def test_count_on_bert_base(
    capsys: pytest.CaptureFixture[str],
    bert_base_config: Path,
    monkeypatch: pytest.MonkeyPatch,
    captured_models: list[modfit.ModularModel],
    method: str,
    params: list[str],
    expected: int,
) -> None:
    def no_weights(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("count must not load weights")

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", no_weights)
    argv = ["count", "--base", bert_base_config, "--method", method]
    for param in params:
        argv += ["--param", param]
    result = ok(modfit_cli(capsys, *argv, "--json")).json()
    assert set(result) == {
        "method",
        "config",
        "module_parameters",
        "base_parameters",
        "total_parameters",
        "percent",
    }
    assert result["method"] == method
    assert result["module_parameters"] == expected
    assert result["base_parameters"] == BERT_BASE_PARAMETERS
    assert result["total_parameters"] == BERT_BASE_PARAMETERS + expected
    assert result["percent"] == pytest.approx(100 * expected / (BERT_BASE_PARAMETERS + expected))
    # Built on the meta device: shapes only, no memory for 110M weights, nothing read.
    (mm,) = captured_models
    assert all(p.is_meta for p in mm.model.parameters())

    human = ok(modfit_cli(capsys, *argv)).out
    assert f"{method}: {expected:,} module parameters; base {BERT_BASE_PARAMETERS:,}" in human


# -- user errors: exit 2, one line, no traceback -----------------------------------------------


@pytest.mark.parametrize(
    ("options", "fragments"),
    [
        (["--method", "nope"], ["unknown method 'nope'", "lora"]),
        (["--method", "lora", "--param", "r8"], ["--param 'r8': expected KEY=VALUE"]),
        (["--method", "lora", "--param", "rank=8"], ["unknown parameter(s) rank", "known: "]),
        (["--method", "lora", "--param", "r=abc"], ["lora.r", "expected an integer, got 'abc'"]),
        (["--method", "lora", "--param", "r=0"], ["lora.r", "must be >= 1"]),
        (["--method", "lora", "--param", "targets=nothing"], ["target 'nothing' matches no"]),
    ],
)
def test_train_method_errors(
    capsys: pytest.CaptureFixture[str],
    bert: Path,
    data: Path,
    tmp_path: Path,
    options: list[str],
    fragments: list[str],
) -> None:
    argv = [
        "train",
        "--base",
        bert,
        "--task",
        "seq-cls",
        "--train",
        data / "train.csv",
        "--out",
        tmp_path / "m",
    ]
    assert_user_error(modfit_cli(capsys, *argv, "--steps", "1", *options), *fragments)
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize(
    ("task", "file", "fragments"),
    [
        ("seq-cls", "missing.csv", ["missing.csv: file not found"]),
        ("seq-cls", "bad.csv", ["bad.csv:3: expected 2 fields (text, label), found 3"]),
        ("seq-cls", "bad.jsonl", ["bad.jsonl:2: invalid JSON"]),
        ("token-cls", "bad.conll", ["bad.conll:2: expected a token and a tag"]),
        ("token-cls", "train.csv", ["csv data cannot serve task 'token-cls'"]),
    ],
)
def test_train_data_errors(
    capsys: pytest.CaptureFixture[str],
    bert: Path,
    data: Path,
    tmp_path: Path,
    task: str,
    file: str,
    fragments: list[str],
) -> None:
    run = modfit_cli(capsys, *_train_args(bert, task, data / file, tmp_path / "m"))
    assert_user_error(run, *fragments)


def test_unknown_label_in_eval_data(
    capsys: pytest.CaptureFixture[str], bert: Path, data: Path, sst: Path
) -> None:
    run = modfit_cli(capsys, "eval", "--base", bert, "--load", sst, "--data", data / "dev_unknown.csv")
    assert_user_error(run, "dev_unknown.csv", "label 'c' is not a known label ('a', 'b')")


def test_unknown_label_in_train_eval_file(
    capsys: pytest.CaptureFixture[str], bert: Path, data: Path, tmp_path: Path
) -> None:
    run = modfit_cli(
        capsys,
        *_train_args(
            bert, "token-cls", data / "ner.conll", tmp_path / "m", "--eval", data / "ner_unknown.conll"
        ),
    )
    assert_user_error(run, "ner_unknown.conll", "tag 'B-ORG' is not a known label")
    assert not (tmp_path / "m").exists()


def test_eval_data_errors(capsys: pytest.CaptureFixture[str], bert: Path, data: Path, sst: Path) -> None:
    loaded = ["--base", bert, "--load", sst]
    assert_user_error(
        modfit_cli(capsys, "eval", *loaded, "--data", data / "nope.csv"), "nope.csv: file not found"
    )
    assert_user_error(modfit_cli(capsys, "eval", *loaded, "--data", data / "bad.csv"), "bad.csv:3:")


def test_load_of_a_folder_that_is_not_a_module(
    capsys: pytest.CaptureFixture[str], bert: Path, data: Path, tmp_path: Path
) -> None:
    dev = data / "dev.csv"
    assert_user_error(
        modfit_cli(capsys, "eval", "--base", bert, "--load", bert, "--data", dev),
        f"{bert / CARD}: missing",
        "not a modfit module folder",
    )
    assert_user_error(
        modfit_cli(capsys, "eval", "--base", bert, "--load", tmp_path / "nowhere", "--data", dev),
        "nowhere: no such module folder",
    )
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / CARD).write_text("{not json")
    assert_user_error(
        modfit_cli(
            capsys,
            "predict",
            "--base",
            bert,
            "--load",
            tmp_path / "broken",
            "--data",
            dev,
            "--out",
            tmp_path / "p.csv",
        ),
        f"{CARD}:1: invalid JSON",
    )
    run = modfit_cli(
        capsys, *_train_args(bert, "seq-cls", dev, tmp_path / "m", "--load", bert, "--compose", "stack(x, m)")
    )
    assert_user_error(run, "not a modfit module folder")
    assert_user_error(modfit_cli(capsys, "info", bert), "not a modfit module folder")


def test_module_trained_on_another_base(
    capsys: pytest.CaptureFixture[str], other_bert: Path, data: Path, sst: Path, tmp_path: Path
) -> None:
    fragments = ["module 'sst' was trained on", "same architecture but different weights"]
    run = modfit_cli(capsys, "eval", "--base", other_bert, "--load", sst, "--data", data / "dev.csv")
    assert_user_error(run, *fragments)
    run = modfit_cli(
        capsys,
        *_train_args(
            other_bert,
            "seq-cls",
            data / "train.csv",
            tmp_path / "m",
            "--load",
            sst,
            "--compose",
            "stack(sst, m)",
        ),
    )
    assert_user_error(run, *fragments)
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize(
    ("expr", "fragments"),
    [
        ("stack(sst", ["missing ')' in composition 'stack(sst'"]),
        ("mix(sst)", ["unknown composition 'mix(...)'"]),
        ("fuse(sst)", ["fuse() needs at least 2 modules"]),
        ("stack(sst,, x)", ["expected a module name in composition"]),
        ("stack(sst, zz)", ["names unknown module 'zz'"]),
        ("sst + zz", ["cannot read composition 'sst + zz'"]),
    ],
)
def test_unparseable_compose(
    capsys: pytest.CaptureFixture[str], bert: Path, data: Path, sst: Path, expr: str, fragments: list[str]
) -> None:
    run = modfit_cli(
        capsys, "eval", "--base", bert, "--load", sst, "--compose", expr, "--data", data / "dev.csv"
    )
    assert_user_error(run, *fragments)


def test_train_compose_errors(
    capsys: pytest.CaptureFixture[str], bert: Path, data: Path, sst: Path, tmp_path: Path
) -> None:
    train = data / "train.csv"
    run = modfit_cli(
        capsys, *_train_args(bert, "seq-cls", train, tmp_path / "m", "--load", sst, "--compose", "stack(sst")
    )
    assert_user_error(run, "missing ')' in composition")
    # A composition without the new module would silently train it alone.
    run = modfit_cli(
        capsys, *_train_args(bert, "seq-cls", train, tmp_path / "m", "--load", sst, "--compose", "sst")
    )
    assert_user_error(run, "--compose 'sst' must include the module being trained, 'm'")
    # Saving into a loaded module's folder would overwrite it.
    run = modfit_cli(capsys, *_train_args(bert, "seq-cls", train, sst, "--name", "other", "--load", sst))
    assert_user_error(run, "is the folder of a --load module")
    assert not (tmp_path / "m").exists()


def test_eval_with_modules_without_a_head(
    capsys: pytest.CaptureFixture[str], bert: Path, data: Path, headless: Path, sst: Path
) -> None:
    dev = data / "dev.csv"
    run = modfit_cli(capsys, "eval", "--base", bert, "--load", headless, "--data", dev)
    assert_user_error(run, "none of the --load modules has a task head")
    run = modfit_cli(
        capsys, "eval", "--base", bert, "--load", headless, "--load", sst, "--compose", "bare", "--data", dev
    )
    assert_user_error(run, "no module in the composition bare has a task head")


def test_predict_errors(
    capsys: pytest.CaptureFixture[str], bert: Path, data: Path, lang: Path, sst: Path, tmp_path: Path
) -> None:
    run = modfit_cli(
        capsys,
        "predict",
        "--base",
        bert,
        "--load",
        lang,
        "--data",
        data / "text.txt",
        "--out",
        tmp_path / "p.jsonl",
    )
    assert_user_error(run, "predict supports seq-cls and token-cls heads; the active head is mlm")
    run = modfit_cli(
        capsys,
        "predict",
        "--base",
        bert,
        "--load",
        sst,
        "--data",
        data / "dev.csv",
        "--out",
        tmp_path / "p.conll",
    )
    assert_user_error(run, "--out", "seq-cls predictions are written as .jsonl")
    assert not list(tmp_path.iterdir())


def test_missing_base(
    capsys: pytest.CaptureFixture[str], bert: Path, data: Path, sst: Path, tmp_path: Path
) -> None:
    nowhere = tmp_path / "no-base"
    run = modfit_cli(capsys, "eval", "--base", nowhere, "--load", sst, "--data", data / "dev.csv")
    assert_user_error(run, f"--base {nowhere}: no such folder")
    assert_user_error(
        modfit_cli(capsys, "count", "--base", nowhere, "--method", "lora"), "--base", "no such folder"
    )
    # A model folder without tokenizer files: transformers would quietly build an empty tokenizer.
    weights_only = tmp_path / "weights-only"
    shutil.copytree(bert, weights_only, ignore=lambda _, names: [n for n in names if "token" in n])
    run = modfit_cli(capsys, *_train_args(weights_only, "seq-cls", data / "train.csv", tmp_path / "m"))
    assert_user_error(run, f"--base {weights_only}: no tokenizer in this folder")
    weights_only.joinpath("model.safetensors").unlink()
    run = modfit_cli(capsys, "eval", "--base", weights_only, "--load", sst, "--data", data / "dev.csv")
    assert_user_error(run, f"--base {weights_only}: cannot load the model from this folder")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--epochs", "1", "--steps", "2"], "argument --steps: not allowed with argument --epochs"),
        (["--steps", "0"], "argument --steps: must be >= 1, got 0"),
        (["--batch-size", "x"], "argument --batch-size: expected an integer, got 'x'"),
        (["--task", "ner"], "argument --task: invalid choice: 'ner'"),
    ],
)
def test_usage_errors(
    capsys: pytest.CaptureFixture[str], bert: Path, data: Path, tmp_path: Path, extra: list[str], message: str
) -> None:
    argv = ["train", "--base", bert, "--task", "seq-cls", "--method", "lora", "--train", data / "train.csv"]
    run = modfit_cli(capsys, *argv, "--out", tmp_path / "m", *extra)
    assert run.status == 2 and run.out == ""
    assert run.err.strip().splitlines()[-1].startswith(f"modfit train: error: {message}")
    assert "Traceback" not in run.err


# -- failed runs leave the module saved earlier intact -----------------------------------------


@pytest.fixture
def saved(bert: Path, data: Path, tmp_path: Path) -> Iterator[tuple[Path, dict[str, bytes]]]:
    out = tmp_path / "sst"
    ok(quiet_cli(*_train_args(bert, "seq-cls", data / "train.csv", out)))
    before = files_of(out)
    yield out, before
    assert files_of(out) == before  # byte for byte, and no temporary file left behind


def test_failed_train_keeps_the_saved_module(
    capsys: pytest.CaptureFixture[str], bert: Path, data: Path, saved: tuple[Path, dict[str, bytes]]
) -> None:
    out, before = saved
    failures = [
        (data / "train.csv", ["--param", "rank=2"], "unknown parameter(s) rank"),
        (data / "bad.csv", [], "bad.csv:3:"),
        (data / "train.csv", ["--eval", data / "dev_unknown.csv"], "label 'c' is not a known label"),
        (data / "train.csv", ["--load", out.parent / "nowhere"], "no such module folder"),
        (data / "train.csv", ["--compose", "stack(sst"], "missing ')'"),
    ]
    for train, extra, fragment in failures:
        assert_user_error(modfit_cli(capsys, *_train_args(bert, "seq-cls", train, out, *extra)), fragment)
        assert files_of(out) == before


@pytest.mark.parametrize("failing", ["train", "evaluate"])
def test_failure_during_training_keeps_the_saved_module(
    capsys: pytest.CaptureFixture[str],
    bert: Path,
    data: Path,
    saved: tuple[Path, dict[str, bytes]],
    monkeypatch: pytest.MonkeyPatch,
    failing: str,
) -> None:
    import modfit.train

    def fail(*args: Any, **kwargs: Any) -> None:
        raise ValueError(f"{failing} went wrong")

    monkeypatch.setattr(modfit.train, failing, fail)
    out, _ = saved
    run = modfit_cli(
        capsys, *_train_args(bert, "seq-cls", data / "train.csv", out, "--eval", data / "dev.csv")
    )
    assert_user_error(run, f"{failing} went wrong", started=True)
    assert "training 'sst'" in run.out and "saved" not in run.out


def test_train_torch_linear(
    capsys: pytest.CaptureFixture[str], bert: Path, data: Path, tmp_path: Path
) -> None:
    """modfit's oneDNN products and --torch-linear each repeat themselves under --seed, and train the
    same module up to float32 rounding (the products sum in another order)."""
    runs = {}
    for run, extra in enumerate([(), (), ("--torch-linear",), ("--torch-linear",)]):
        out = tmp_path / f"run{run}"
        ok(modfit_cli(capsys, *_train_args(bert, "seq-cls", data / "train.csv", out, *extra)))
        runs[run] = load_file(str(out / WEIGHTS))
    for key in runs[0]:
        assert torch.equal(runs[0][key], runs[1][key]), key
        assert torch.equal(runs[2][key], runs[3][key]), key
        torch.testing.assert_close(runs[0][key], runs[2][key], atol=1e-5, rtol=1e-4, msg=key)


@pytest.mark.parametrize("command", ["eval", "predict"])
def test_inference_torch_linear(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    fast_linear_calls: list[int],
    bert: Path,
    data: Path,
    sst: Path,
    tmp_path: Path,
    command: str,
) -> None:
    """eval and predict run the base's products through modfit.fast_linear unless --torch-linear (the
    tiny test model's products are all below MIN_MACS: the threshold is lowered here)."""
    from modfit import fast_linear

    monkeypatch.setattr(fast_linear, "MIN_MACS", 0)
    results = []
    for extra in ((), ("--torch-linear",)):
        before = fast_linear_calls[0]
        args: list[str | Path] = [command, "--base", bert, "--load", sst, "--data", data / "dev.csv", *extra]
        out = tmp_path / f"predictions{len(extra)}.csv"
        args += ["--out", out] if command == "predict" else ["--json"]
        run = ok(modfit_cli(capsys, *args))
        results.append(out.read_text() if command == "predict" else run.json()["metrics"]["accuracy"])
        assert (fast_linear_calls[0] > before) == (not extra)
    assert results[0] == results[1]
