"""Fusion weights per layer (`compose/fusion_weights.py`) and `modfit fusion-weights`, plus fusion
training from the command line (`modfit train --method fusion --compose 'fuse(a, b)'`).

Tiny random-init models: a 2-layer BERT from `conftest` for the library function, and a 2-layer BERT
folder with the tokenizer of `train_fixtures` for the command line.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

import modfit
from cli_run import Run, run_cli
from conftest import FAMILIES
from modfit.compose.fusion_weights import FusionWeights, format_table, fusion_weights, plot_fusion_weights
from modfit.methods.fusion import recording, set_mask
from modfit.persistence import CARD, WEIGHTS
from train_fixtures import SEQ_LABELS, bert_config, tiny_tokenizer

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _randomise(mm: modfit.ModularModel, name: str, seed: int, scale: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in mm.module_parameters(name, include_head=False):
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def _fused(kinds: dict[str, str]) -> modfit.ModularModel:
    """A tiny BERT with random modules `kinds` (name -> method) and random fusion layers "fu" over them."""
    mm = modfit.wrap(FAMILIES["bert"].build())
    for seed, (name, method) in enumerate(kinds.items(), start=1):
        mm.add(name, modfit.config(method))
        _randomise(mm, name, seed, scale=0.1)
    mm.add("fu", modfit.config("fusion", children=list(kinds)))
    _randomise(mm, "fu", 99)
    mm.activate(f"fuse({', '.join(kinds)})")
    return mm


def _batch(pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Two rows of 7 tokens; the second has 3 real tokens and 4 of padding."""
    ids = torch.randint(3, 60, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 3:] = 0
    ids[1, 3:] = pad_id
    return {"input_ids": ids, "attention_mask": mask}


# -- the library function -------------------------------------------------------------------------


def test_rows_sum_to_one_and_layers_follow_the_model() -> None:
    mm = _fused({"a": "lora", "b": "pfeiffer", "c": "houlsby"})
    result = fusion_weights(mm, "fu", [_batch()])
    assert isinstance(result, FusionWeights)
    assert result.layers == ["0", "1"] and result.modules == ["a", "b", "c"]
    assert result.matrix.shape == (2, 3) and result.matrix.dtype == torch.float64
    torch.testing.assert_close(
        result.matrix.sum(dim=1), torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-6
    )
    assert result.tokens == 7 + 3
    assert not torch.allclose(result.matrix, torch.full_like(result.matrix, 1 / 3), atol=1e-3)  # not uniform
    table = format_table(result)
    assert table.splitlines()[0].split() == ["layer", "a", "b", "c"] and len(table.splitlines()) == 3


def test_several_sites_in_one_layer_are_averaged() -> None:
    """LoRA on query and value: two fusion sites per layer; a layer's row is the token-weighted mean."""
    mm = _fused({"a": "lora", "b": "lora"})
    with recording(mm, "fu") as records:
        batch = _batch()
        set_mask(records, batch["attention_mask"])
        with torch.no_grad():
            mm.model(**batch)
    result = fusion_weights(mm, "fu", [_batch()])
    for row, layer in enumerate(result.layers):
        paths = [p for p in records if p.startswith(f"encoder.layer.{layer}.")]
        assert len(paths) == 2, paths  # query and value
        expected = sum(records[p]["sum"] for p in paths) / sum(records[p]["count"] for p in paths)
        torch.testing.assert_close(result.matrix[row], expected)


def test_padding_does_not_count() -> None:
    """The padded batch gives the weights of its real tokens: the same as the rows run unpadded, and
    the same whatever the padding holds."""
    mm = _fused({"a": "lora", "b": "pfeiffer"})
    padded = fusion_weights(mm, "fu", [_batch()])
    batch = _batch()
    unpadded = [
        {"input_ids": batch["input_ids"][:1], "attention_mask": batch["attention_mask"][:1]},
        {"input_ids": batch["input_ids"][1:, :3], "attention_mask": batch["attention_mask"][1:, :3]},
    ]
    alone = fusion_weights(mm, "fu", unpadded)
    assert padded.tokens == alone.tokens == 10
    torch.testing.assert_close(padded.matrix, alone.matrix, rtol=0, atol=1e-6)
    other_padding = fusion_weights(mm, "fu", [_batch(pad_id=42)])
    torch.testing.assert_close(other_padding.matrix, padded.matrix, rtol=0, atol=1e-6)
    # Without the mask, the padding positions would change the averages.
    with recording(mm, "fu") as records, torch.no_grad():
        mm.model(**_batch(pad_id=42))
    counted = next(iter(records.values()))
    assert counted["count"] == 14


def test_errors_and_mode() -> None:
    mm = _fused({"a": "lora", "b": "pfeiffer"})
    mm.train()
    fusion_weights(mm, "fu", [_batch()])
    assert mm.training  # put back as it was
    with pytest.raises(ValueError, match=r"module 'a' \(lora\) is not a fusion module"):
        fusion_weights(mm, "a", [_batch()])
    with pytest.raises(KeyError, match="no module named 'zz'"):
        fusion_weights(mm, "zz", [_batch()])
    with pytest.raises(ValueError, match="no token reached"):
        fusion_weights(mm, "fu", [])
    mm.activate("a")
    with pytest.raises(ValueError, match=r"does not run in the active composition a; .*fuse\(a, b\)"):
        fusion_weights(mm, "fu", [_batch()])


def test_nested_fusion_in_a_head_mode_composition() -> None:
    """fuse inside stack(...), with a head: run as evaluation runs it (head mode)."""
    mm = _fused({"a": "lora", "b": "pfeiffer"})
    mm.add("lang", modfit.config("pfeiffer"))
    mm.set_head("fu", modfit.head("seq-cls", ["x", "y"]))
    mm.activate("stack(lang, fuse(a, b))")
    result = fusion_weights(mm, "fu", [_batch()])
    torch.testing.assert_close(result.matrix.sum(dim=1), torch.ones(2, dtype=torch.float64))


def test_heatmap_is_a_png(tmp_path: Path) -> None:
    mm = _fused({"a": "lora", "b": "pfeiffer", "c": "houlsby"})
    result = fusion_weights(mm, "fu", [_batch()])
    out = plot_fusion_weights(result, tmp_path / "heat.png")
    assert out == tmp_path / "heat.png"
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000
    assert [p.name for p in tmp_path.iterdir()] == ["heat.png"]  # no temporary file left behind


def test_heatmap_without_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result = FusionWeights(["0"], ["a", "b"], torch.tensor([[0.5, 0.5]], dtype=torch.float64), 1)
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules: the import fails
    with pytest.raises(ModuleNotFoundError, match=r"needs matplotlib: pip install 'modfit\[plot\]'"):
        plot_fusion_weights(result, tmp_path / "heat.png")
    assert not list(tmp_path.iterdir())


# -- the command line -----------------------------------------------------------------------------


def ok(run: Run) -> Run:
    assert run.status == 0, run.err
    return run


def user_error(run: Run, *fragments: str) -> None:
    """Exit 2 with one line `modfit: error: ...` naming the problem, no traceback."""
    assert run.status == 2, (run.status, run.out, run.err)
    lines = run.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("modfit: error: "), run.err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


WORDS = {"a": ("cat", "dog", "sat", "ran", "mat"), "b": ("paris", "london", "park", "bob", "alice")}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny BERT folder, a data file, and modules a (lora), b (pfeiffer) and fu = fuse(a, b) trained
    from the command line."""
    root = tmp_path_factory.mktemp("fusion-cli")
    base = root / "bert"
    torch.manual_seed(0)
    transformers.BertModel(bert_config()).save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    rng = random.Random(0)
    rows = [(" ".join(rng.choice(WORDS[y]) for _ in range(rng.randint(2, 6))), y) for y in SEQ_LABELS * 12]
    data = root / "train.csv"
    data.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows))
    common = ["--base", base, "--task", "seq-cls", "--train", data, "--steps", "3", "--batch-size", "8"]
    for name, method in (("a", "lora"), ("b", "pfeiffer")):
        ok(run_cli("train", *common, "--method", method, "--lr", "1e-2", "--out", root / name, "--json"))
    return {"base": base, "data": data, "a": root / "a", "b": root / "b", "root": root}


def _train_fusion(folders: dict[str, Path], out: Path, *extra: str | Path) -> Run:
    return run_cli(
        "train",
        "--base",
        folders["base"],
        "--task",
        "seq-cls",
        "--train",
        folders["data"],
        "--steps",
        "3",
        "--batch-size",
        "8",
        "--load",
        folders["a"],
        "--load",
        folders["b"],
        "--method",
        "fusion",
        *extra,
        "--out",
        out,
        "--json",
    )


@pytest.fixture(scope="module")
def fused(folders: dict[str, Path]) -> Path:
    out = folders["root"] / "fu"
    result = ok(_train_fusion(folders, out, "--compose", "fuse(a, b)")).json()
    assert result["composition"] == "fuse(a, b)" and result["name"] == "fu"
    return out


def test_train_a_fusion_from_the_cli(folders: dict[str, Path], fused: Path) -> None:
    card = json.loads((fused / CARD).read_text())
    assert card["method"] == "fusion" and card["config"]["children"] == ["a", "b"]
    assert card["composition"] == "fuse(a, b)" and card["head"]["labels"] == list(SEQ_LABELS)
    keys = set(load_file(str(fused / WEIGHTS)))
    assert any(k.startswith("head.") for k in keys)  # the fusion's own head
    # only the fusion layers: the fused modules' weights stay in their own folders
    assert {k.split(".")[-2] for k in keys if k.startswith("units.")} == {"query", "key", "value"}


def test_fusion_lr_default_and_children_by_param(folders: dict[str, Path], tmp_path: Path) -> None:
    assert modfit.config("fusion", children=["a", "b"]).default_lr == 2e-3
    # children by --param: the composition defaults to fuse(children)
    result = ok(_train_fusion(folders, tmp_path / "fp", "--param", "children=a,b")).json()
    assert result["composition"] == "fuse(a, b)"
    # fusion=NAME marks which fuse(...) the new module serves
    result = ok(_train_fusion(folders, tmp_path / "fn", "--compose", "fuse(b, a, fusion=fn)")).json()
    assert result["composition"] == "fuse(b, a, fusion=fn)"
    assert json.loads((tmp_path / "fn" / CARD).read_text())["config"]["children"] == ["b", "a"]


def test_eval_and_predict_use_the_fusion_card_composition(
    folders: dict[str, Path], fused: Path, tmp_path: Path
) -> None:
    loads = ["--base", folders["base"], "--load", folders["a"], "--load", folders["b"], "--load", fused]
    given = ok(run_cli("eval", *loads, "--compose", "fuse(a, b)", "--data", folders["data"], "--json")).json()
    default = ok(run_cli("eval", *loads, "--data", folders["data"], "--json")).json()
    assert given["composition"] == default["composition"] == "fuse(a, b)"
    assert given["metrics"] == default["metrics"]
    ok(run_cli("predict", *loads, "--data", folders["data"], "--out", tmp_path / "p.jsonl"))
    assert len((tmp_path / "p.jsonl").read_text().splitlines()) == 24


def test_fusion_weights_cli(folders: dict[str, Path], fused: Path, tmp_path: Path) -> None:
    loads = ["--base", folders["base"], "--load", folders["a"], "--load", folders["b"], "--load", fused]
    plot = tmp_path / "plots" / "fusion.png"
    result = ok(run_cli("fusion-weights", *loads, "--data", folders["data"], "--plot", plot, "--json")).json()
    assert result["fusion"] == "fu" and result["composition"] == "fuse(a, b)"
    assert result["layers"] == ["0", "1"] and result["modules"] == ["a", "b"]
    assert all(abs(sum(row) - 1) < 1e-6 for row in result["weights"])  # float32 softmax
    assert result["examples"] == 24 and result["plot"] == str(plot)
    assert plot.read_bytes().startswith(PNG_MAGIC)

    text = ok(run_cli("fusion-weights", *loads, "--compose", "fuse(a, b)", "--data", folders["data"])).out
    assert "fusion 'fu' in fuse(a, b)" in text
    assert any(line.split()[:1] == ["layer"] and line.split()[1:] == ["a", "b"] for line in text.splitlines())


def test_cli_errors(
    folders: dict[str, Path], fused: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, data = folders["base"], folders["data"]
    user_error(_train_fusion(folders, tmp_path / "x"), "--method fusion combines other modules", "--compose")
    user_error(
        _train_fusion(folders, tmp_path / "x", "--compose", "stack(a, b)"),
        "has no fuse(...) for 'x' to serve",
    )
    user_error(
        _train_fusion(folders, tmp_path / "x", "--compose", "average(fuse(a, b), fuse(b, a))"),
        "has 2 fuse(...)",
        "fusion=x",
    )
    user_error(
        _train_fusion(folders, tmp_path / "x", "--param", "children=a,b", "--compose", "stack(a, b)"),
        "must include the module being trained, 'x' (fuse(a, b))",
    )
    assert not (tmp_path / "x").exists()

    loads = ["--base", base, "--load", folders["a"], "--load", folders["b"], "--load", fused]
    weights = ["fusion-weights", "--data", data]
    user_error(run_cli(*weights, *loads, "--plot", tmp_path / "f.pdf"), "--plot", ".png")
    user_error(run_cli(*weights, "--base", base, "--load", folders["a"]), "runs no fusion module")
    user_error(run_cli(*weights, *loads, "--fusion", "a"), "--fusion a: not a fusion module")
    user_error(run_cli(*weights, *loads, "--fusion", "zz"), "--fusion zz: no such loaded module")
    user_error(
        run_cli(*weights, "--base", base, "--load", fused, "--load", folders["a"]),
        "module 'a' is not on this model",
        "load the fused modules first",
    )
    user_error(run_cli("fusion-weights", *loads, "--data", tmp_path / "none.csv"), "none.csv")
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    user_error(run_cli(*weights, *loads, "--plot", tmp_path / "f.png"), "pip install 'modfit[plot]'")
    assert not (tmp_path / "f.png").exists()
