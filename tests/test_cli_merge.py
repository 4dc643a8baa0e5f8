"""`modfit merge` and `modfit fisher` end to end on a tiny BERT folder: modules saved through the
Python API, merged into modules and full models, Fishers computed and used; user errors exit 2 with
one `modfit: error:` line."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from safetensors.torch import load_file

import modfit
from modfit import cli
from modfit.compose import merge_modules, module_deltas
from modfit.compose.fisher import FISHER_FILE
from modfit.persistence import CARD, WEIGHTS
from train_fixtures import SEQ_LABELS, WORDS, bert_config, tiny_tokenizer

IDS = torch.tensor([[2, 8, 9, 10, 3]])


def run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    capsys.readouterr()
    status = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def ok(result: tuple[int, str, str]) -> str:
    status, out, err = result
    assert status == 0, err
    return out


def user_error(result: tuple[int, str, str], *fragments: str) -> None:
    status, out, err = result
    assert status == 2 and out == "", (status, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("modfit: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny BERT folder (weights, tokenizer), a CSV, modules a, b (LoRA, heads), s (sft), p (pfeiffer)."""
    root = tmp_path_factory.mktemp("merge")
    torch.manual_seed(0)
    base = transformers.BertModel(bert_config()).eval()
    base.save_pretrained(root / "bert")
    tiny_tokenizer().save_pretrained(root / "bert")
    rng = random.Random(0)
    rows = [(" ".join(rng.choice(WORDS) for _ in range(4)), rng.choice(SEQ_LABELS)) for _ in range(6)]
    (root / "train.csv").write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows))
    mm = modfit.wrap(transformers.AutoModel.from_pretrained(root / "bert").eval())
    specs: dict[str, tuple[str, dict[str, Any], bool]] = {
        "a": ("lora", {"r": 2}, True),
        "b": ("lora", {"r": 2, "targets": "query,key"}, True),
        "s": ("sft", {"selection": "random", "k": 200}, False),
        "p": ("pfeiffer", {}, False),
    }
    out = {"root": root, "bert": root / "bert", "data": root / "train.csv"}
    for i, (name, (method, params, head)) in enumerate(specs.items()):
        mm.add(
            name, modfit.config(method, **params), head=modfit.head("seq-cls", SEQ_LABELS) if head else None
        )
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in mm.module_parameters(name, include_head=False):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
        out[name] = mm.save(name, root / name)
    return out


def _loaded(folders: dict[str, Path], *names: str) -> modfit.ModularModel:
    mm = modfit.wrap(transformers.AutoModel.from_pretrained(folders["bert"]).eval())
    for name in names:
        mm.load(folders[name])
    return mm


def test_merge_into_a_module(
    capsys: pytest.CaptureFixture[str], folders: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "ab"
    argv = ["merge", "--base", folders["bert"], "--load", folders["a"], "--load", folders["b"]]
    result = json.loads(
        ok(run(capsys, *argv, "--method", "ties", "--density", "0.5", "--out", out, "--json"))
    )
    assert result["module_method"] == "lora" and result["route"] == "deltas" and result["name"] == "ab"
    card = json.loads((out / CARD).read_text())
    assert card["method"] == "lora" and card["head"]["labels"] == list(SEQ_LABELS)
    # the same merge through the Python API
    mm = _loaded(folders, "a", "b")
    merge_modules(mm, ["a", "b"], "ab", method="ties", density=0.5)
    mm.load(out, name="cli")
    expected, got = module_deltas(mm, "ab"), module_deltas(mm, "cli")
    assert all(torch.allclose(got[k], expected[k], atol=1e-6) for k in expected)
    human = ok(run(capsys, *argv, "--method", "linear", "--to", "sft", "--out", tmp_path / "as"))
    assert "(sft," in human and "via deltas" in human


def test_merge_into_a_full_model(
    capsys: pytest.CaptureFixture[str], folders: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "full"
    argv = ["merge", "--base", folders["bert"], "--load", folders["a"], "--load", folders["s"]]
    ok(run(capsys, *argv, "--method", "task_arithmetic", "--weights", "1,0.5", "--to", "full", "--out", out))
    plain = transformers.AutoModel.from_pretrained(out).eval()
    assert transformers.AutoTokenizer.from_pretrained(out)("cat")["input_ids"]  # the tokenizer came along
    mm = _loaded(folders, "a", "s")
    da, ds = module_deltas(mm, "a"), module_deltas(mm, "s")
    state = plain.state_dict()
    for key in {*da, *ds}:
        expected = mm.model.state_dict()[key] + da.get(key, 0) + 0.5 * ds.get(key, 0)
        assert torch.allclose(state[key], expected, atol=1e-6)


def test_add_then_negate_gives_the_base_bit_for_bit(
    capsys: pytest.CaptureFixture[str], folders: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "negated"
    argv = ["merge", "--base", folders["bert"], "--load", folders["a"], "--load", folders["a"]]
    ok(run(capsys, *argv, "--method", "task_arithmetic", "--weights=1,-1", "--to", "full", "--out", out))
    base = load_file(str(folders["bert"] / "model.safetensors"))
    merged = load_file(str(out / "model.safetensors"))
    assert base.keys() == merged.keys() and all(torch.equal(base[k], merged[k]) for k in base)


def test_fisher_then_fisher_merge(
    capsys: pytest.CaptureFixture[str], folders: dict[str, Path], tmp_path: Path
) -> None:
    fisher_args = ["fisher", "--base", folders["bert"], "--data", folders["data"], "--json"]
    a_out, b_out = tmp_path / "a", tmp_path / "b"
    for name, out in (("a", a_out), ("b", b_out)):
        result = json.loads(ok(run(capsys, *fisher_args, "--load", folders[name], "--out", out)))
        assert result["examples"] == 6 and result["parts"]["deltas"] == result["parts"]["base"] > 0
        assert (out / WEIGHTS).read_bytes() == (folders[name] / WEIGHTS).read_bytes()  # the module beside it
        assert (out / FISHER_FILE).is_file()
    merge = ["merge", "--base", folders["bert"], "--load", a_out, "--load", b_out, "--method", "fisher"]
    ok(run(capsys, *merge, "--out", tmp_path / "f"))
    ok(run(capsys, *merge, "--weights=1,-1", "--base-weight", "2", "--to", "full", "--out", tmp_path / "ewr"))
    user_error(run(capsys, *merge, "--weights=1,-1", "--out", tmp_path / "x"), "Elastic Weight Removal")
    # the empirical Fisher, into the module folder itself
    label = ok(run(capsys, *fisher_args[:-1], "--load", a_out, "--target", "label"))
    assert f"saved {a_out / FISHER_FILE}" in label


def test_user_errors(capsys: pytest.CaptureFixture[str], folders: dict[str, Path], tmp_path: Path) -> None:
    base = ["merge", "--base", folders["bert"], "--load", folders["a"]]
    out = ["--out", tmp_path / "x"]
    user_error(
        run(capsys, *base, "--load", folders["b"], "--method", "fisher", *out),
        str(folders["a"]),
        "modfit fisher",
    )
    user_error(
        run(capsys, *base, "--load", folders["b"], "--weights", "1,2,3", *out), "3 weights for 2 modules"
    )
    user_error(run(capsys, *base, "--weights", "one", *out), "--weights 'one': expected numbers")
    user_error(run(capsys, *base, "--method", "mean", *out), "unknown merge method 'mean'")
    user_error(
        run(capsys, *base, "--load", folders["p"], "--to", "lora", *out),
        "module 'p' (pfeiffer): its BottleneckUnit at encoder.layer.0.output.dropout",
    )
    user_error(run(capsys, *base, "--out", folders["a"]), "would overwrite it")
    user_error(run(capsys, *base, "--to", "full", "--rank", "2", *out), "--rank applies to --to lora")
    user_error(run(capsys, *base, "--to", "nowhere", *out), "unknown form to='nowhere'")
    user_error(
        run(capsys, "fisher", "--base", folders["bert"], "--load", folders["s"], "--data", folders["data"]),
        "the module has no head",
    )
    assert not (tmp_path / "x").exists()
