"""Saving and loading modules: the card, the file format, base checks, every malformed-folder error,
and atomic saves."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import modfit
from modfit.model import ModularModel
from modfit.persistence import CARD, FORMAT_VERSION, WEIGHTS, fingerprint

if TYPE_CHECKING:
    from conftest import Family

LABELS = ("neg", "pos")


@torch.no_grad()
def _randomise(mm: ModularModel, name: str, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in mm.module_parameters(name):
        p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _saved(bert: Family, folder: Path, method: str = "lora", **params: Any) -> ModularModel:
    """A BERT with module "sst" (random weights, seq-cls head) saved to `folder`."""
    mm = modfit.wrap(bert.build())
    mm.add("sst", modfit.config(method, **params), head=modfit.head("seq-cls", LABELS), language="en")
    _randomise(mm, "sst")
    mm.save("sst", folder, metrics={"accuracy": 0.75})
    return mm


def _bert(**changes: Any) -> transformers.BertModel:
    """A tiny BERT like conftest's, with some config values changed (seeded)."""
    config = {
        "vocab_size": 100,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 64,
        "max_position_embeddings": 64,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
    }
    seed = changes.pop("seed", 0)
    torch.manual_seed(seed)
    return transformers.BertModel(transformers.BertConfig(**{**config, **changes})).eval()


@pytest.fixture
def bert(tiny: Callable[[str], Family]) -> Family:
    return tiny("bert")


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return tmp_path / "sst"


def _outputs(family: Family, mm: ModularModel) -> torch.Tensor:
    with torch.no_grad():
        return family.run(mm.model)


# -- the card and the files ------------------------------------------------------------------------


def test_card_content(bert: Family, folder: Path) -> None:
    mm = _saved(bert, folder, "lora", r=4, targets="query,value")
    card = json.loads((folder / CARD).read_text(encoding="utf-8"))
    assert card == modfit.read_card(folder)
    assert card["format"] == "modfit-module"
    assert card["format_version"] == FORMAT_VERSION
    assert card["modfit_version"] == modfit.__version__
    assert card["name"] == "sst"
    assert card["method"] == "lora"
    assert card["config"] == modfit.config("lora", r=4).to_dict()
    assert card["config"]["targets"] == ["query", "value"]
    assert card["head"] == {"task": "seq-cls", "labels": ["neg", "pos"], "pooling": "mean", "dropout": 0.1}
    assert card["task"] == "seq-cls"
    assert card["language"] == "en"
    assert card["metrics"] == {"accuracy": 0.75}
    assert card["parameters"] == mm.trainable_parameters("sst") == 2 * 2 * 4 * (32 + 32)
    fp = card["base"]["fingerprint"]
    assert fp == mm.base_fingerprint
    assert fp["model_type"] == "bert"
    assert fp["hidden_size"] == 32
    assert fp["num_parameters"] == sum(p.numel() for p in bert.build().parameters())
    assert card["base"]["name_or_path"] is None  # built from a config, not from_pretrained
    assert isinstance(card["saved_at"], str)


def test_card_records_base_name_and_accumulates_metrics(bert: Family, folder: Path) -> None:
    model = bert.build()
    model.config._name_or_path = "org/tiny-bert"
    mm = modfit.wrap(model)
    mm.add("sst", modfit.config("lora"), head=modfit.head("token-cls", ["O", "B", "I"]), task="ner")
    mm.save("sst", folder, metrics={"f1": 0.5})
    mm.save("sst", folder, metrics={"accuracy": 0.9})
    card = modfit.read_card(folder)
    assert card["base"]["name_or_path"] == "org/tiny-bert"
    assert card["metrics"] == {"f1": 0.5, "accuracy": 0.9}
    assert card["task"] == "token-cls"  # the head's task
    assert card["head"]["labels"] == ["O", "B", "I"]
    assert card["language"] is None


def test_files_are_safetensors_and_json_only(bert: Family, folder: Path) -> None:
    mm = _saved(bert, folder, "houlsby")
    assert sorted(p.name for p in folder.iterdir()) == [CARD, WEIGHTS]  # no temporary files left
    raw = (folder / WEIGHTS).read_bytes()
    (header_size,) = struct.unpack("<Q", raw[:8])  # safetensors: u64 header length, JSON header
    header = json.loads(raw[8 : 8 + header_size])
    assert header["__metadata__"] == {"format": "modfit-module", "name": "sst"}
    tensors = load_file(str(folder / WEIGHTS))
    expected = {f"units.{path}.{key}" for path, unit in mm.units("sst") for key in unit.state_dict()}
    expected |= {f"head.{key}" for key in mm.head_module("sst").state_dict()}  # type: ignore[union-attr]
    assert set(tensors) == expected
    for path in folder.iterdir():
        head = path.read_bytes()[:2]
        assert head != b"\x80\x04" and head != b"PK", f"{path.name} looks like a pickle / torch zip"


def test_save_load_round_trip_bottleneck_options(bert: Family, folder: Path) -> None:
    mm = _saved(bert, folder, "pfeiffer", bottleneck_size=5, layers=(1,), activation="gelu")
    mm.activate("sst")
    expected = _outputs(bert, mm)
    mm2 = modfit.wrap(bert.build())
    mm2.load(folder)
    assert mm2.records["sst"].config == mm.records["sst"].config
    assert mm2.records["sst"].head == mm.records["sst"].head
    assert mm2.records["sst"].card["language"] == "en"
    assert mm2.records["sst"].card["metrics"] == {"accuracy": 0.75}
    assert mm2.active is None  # loading does not activate
    mm2.activate("sst")
    assert torch.equal(_outputs(bert, mm2), expected)


def test_load_onto_model_with_task_head(bert: Family, folder: Path) -> None:
    """A module saved on a bare BertModel loads onto a BertForSequenceClassification of the same weights:
    the fingerprint covers `base_model` only."""
    mm = _saved(bert, folder)
    mm.activate("sst")
    expected = _outputs(bert, mm)
    torch.manual_seed(0)
    with_head = transformers.BertForSequenceClassification(bert.config_obj).eval()
    with_head.bert.load_state_dict(bert.build().state_dict())
    mm2 = modfit.wrap(with_head)
    assert mm2.base_fingerprint == mm.base_fingerprint
    mm2.load(folder)
    mm2.activate("sst")
    with torch.no_grad():
        assert torch.equal(with_head.bert(**bert.inputs())[0], expected)


def test_fingerprint_is_of_the_unmerged_base(bert: Family, folder: Path) -> None:
    mm = modfit.wrap(bert.build())
    mm.add("sst", modfit.config("lora"))
    _randomise(mm, "sst")
    mm.merge("sst")
    mm.save("sst", folder)
    mm2 = modfit.wrap(bert.build())
    mm2.load(folder)  # the merged weights are not the base the card names
    assert modfit.read_card(folder)["base"]["fingerprint"] == fingerprint(mm2.view)


def test_load_with_new_name(bert: Family, folder: Path) -> None:
    mm = _saved(bert, folder)
    mm.activate("sst")
    expected = _outputs(bert, mm)
    assert mm.load(folder, name="sst2") == "sst2"
    assert mm.module_names == ["sst", "sst2"]
    assert mm.head_module("sst2") is not None
    mm.activate("sst2")
    assert torch.equal(_outputs(bert, mm), expected)


def test_load_twice_under_same_name(bert: Family, folder: Path) -> None:
    _saved(bert, folder)
    mm = modfit.wrap(bert.build())
    mm.load(folder)
    with pytest.raises(ValueError, match="'sst' already exists"):
        mm.load(folder)
    assert mm.module_names == ["sst"]
    mm.activate("sst")  # the first load is intact
    mm.remove("sst")
    assert not hasattr(mm.model, "modfit")


# -- base checks -------------------------------------------------------------------------------------


def test_load_onto_other_architecture(bert: Family, folder: Path, tiny: Callable[[str], Family]) -> None:
    _saved(bert, folder)
    mm = modfit.wrap(tiny("roberta").build())
    with pytest.raises(modfit.BaseMismatchError, match="model type: module has 'bert', base is 'roberta'"):
        mm.load(folder)
    mm = modfit.wrap(tiny("gpt2").build())
    with pytest.raises(modfit.BaseMismatchError, match="model type") as info:
        mm.load(folder, check_base=False)  # never skips the architecture check
    assert str(folder / CARD) in str(info.value)
    assert mm.module_names == []


def test_load_onto_other_shapes(bert: Family, folder: Path) -> None:
    _saved(bert, folder)
    for changes, what in (({"intermediate_size": 48}, "parameter names/shapes differ"), ({}, None)):
        mm = modfit.wrap(_bert(**changes, seed=0))
        if what is None:
            mm.load(folder)  # same config, same seed: the same base
            continue
        for check_base in (True, False):
            with pytest.raises(modfit.BaseMismatchError, match=what):
                mm.load(folder, check_base=check_base)
    wider = modfit.wrap(_bert(hidden_size=48, num_attention_heads=4))
    with pytest.raises(modfit.BaseMismatchError, match="hidden size: module has 32, base has 48"):
        wider.load(folder, check_base=False)


def test_load_onto_other_weights(bert: Family, folder: Path) -> None:
    _saved(bert, folder)
    mm = modfit.wrap(_bert(seed=123))
    with pytest.raises(modfit.BaseMismatchError, match="same architecture but different weights") as info:
        mm.load(folder)
    assert "check_base=False" in str(info.value)
    assert "an unnamed model" in str(info.value)
    assert mm.module_names == []
    assert mm.load(folder, check_base=False) == "sst"  # a deliberate transfer


# -- malformed folders ---------------------------------------------------------------------------------


def test_missing_folder_and_missing_card(bert: Family, folder: Path, tmp_path: Path) -> None:
    mm = modfit.wrap(bert.build())
    with pytest.raises(modfit.ModuleFileError, match="no such module folder"):
        mm.load(tmp_path / "nowhere")
    _saved(bert, folder)
    (folder / CARD).unlink()
    with pytest.raises(modfit.ModuleFileError, match=r"module\.json: missing") as info:
        mm.load(folder)
    assert str(folder / CARD) in str(info.value)


def test_invalid_json_card(bert: Family, folder: Path) -> None:
    _saved(bert, folder)
    (folder / CARD).write_text('{\n  "format": "modfit-module",\n  "name": oops\n}\n', encoding="utf-8")
    with pytest.raises(modfit.ModuleFileError, match="invalid JSON") as info:
        modfit.wrap(bert.build()).load(folder)
    assert f"{folder / CARD}:3:" in str(info.value)


def _edit_card(folder: Path, **changes: Any) -> None:
    card = json.loads((folder / CARD).read_text(encoding="utf-8"))
    card.update(changes)
    for key in [k for k, v in changes.items() if v is ...]:
        del card[key]
    (folder / CARD).write_text(json.dumps(card), encoding="utf-8")


@pytest.mark.parametrize(
    ("changes", "error", "message"),
    [
        ({"format_version": FORMAT_VERSION + 1}, modfit.ModuleFileError, "format_version 2 .*upgrade modfit"),
        ({"format_version": "1"}, modfit.ModuleFileError, "format_version '1'"),
        ({"format": "something-else"}, modfit.ModuleFileError, "not a modfit module card"),
        ({"method": ...}, modfit.ModuleFileError, 'missing key "method"'),
        ({"base": ...}, modfit.ModuleFileError, 'missing key "base"'),
        ({"base": None}, modfit.ModuleFileError, '"base" must be a JSON object, got None'),
        ({"config": [8]}, modfit.ModuleFileError, r'"config" must be a JSON object, got \[8\]'),
        ({"head": "seq-cls"}, modfit.ModuleFileError, "\"head\" must be a JSON object, got 'seq-cls'"),
        ({"method": 3}, modfit.ModuleFileError, '"method" must be a string, got 3'),
        ({"method": "no-such-method"}, modfit.ConfigError, "unknown method 'no-such-method'; available: "),
        ({"config": {"r": 8, "rank": 4}}, modfit.ConfigError, r"unknown parameter\(s\) rank"),
        ({"config": {"r": "eight"}}, modfit.ConfigError, "lora.r: expected an integer"),
        ({"head": {"labels": ["a", "b"]}}, modfit.ConfigError, "head: missing key 'task'"),
    ],
)
def test_bad_card(
    bert: Family, folder: Path, changes: dict[str, Any], error: type[Exception], message: str
) -> None:
    _saved(bert, folder)
    _edit_card(folder, **changes)
    mm = modfit.wrap(bert.build())
    with pytest.raises(error, match=message) as info:
        mm.load(folder)
    assert str(folder / CARD) in str(info.value)
    assert mm.module_names == []


def test_missing_weights(bert: Family, folder: Path) -> None:
    _saved(bert, folder)
    (folder / WEIGHTS).unlink()
    mm = modfit.wrap(bert.build())
    with pytest.raises(modfit.ModuleFileError, match=r"module\.safetensors: missing"):
        mm.load(folder)
    assert mm.module_names == []


@pytest.mark.parametrize("cut", ["garbage", "truncated", "empty"])
def test_corrupted_weights(bert: Family, folder: Path, cut: str) -> None:
    _saved(bert, folder)
    raw = (folder / WEIGHTS).read_bytes()
    corrupted = {"garbage": b"not a safetensors file" * 4, "truncated": raw[: len(raw) // 2], "empty": b""}
    (folder / WEIGHTS).write_bytes(corrupted[cut])
    mm = modfit.wrap(bert.build())
    with pytest.raises(modfit.ModuleFileError, match="cannot read safetensors") as info:
        mm.load(folder)
    assert str(folder / WEIGHTS) in str(info.value)
    assert mm.module_names == []


def _rewrite_weights(folder: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(str(folder / WEIGHTS))
    edit(tensors)
    save_file(tensors, str(folder / WEIGHTS))


def _first_unit_key(tensors: dict[str, torch.Tensor]) -> str:
    return sorted(k for k in tensors if k.startswith("units."))[0]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.pop(_first_unit_key(t)), r"missing \['units\..*lora_A'\], unexpected \[\]"),
        (lambda t: t.pop("head.out.bias"), r"missing \['head.out.bias'\]"),
        (
            lambda t: t.update({"units.nowhere.lora_A": torch.zeros(2)}),
            r"unexpected \['units.nowhere.lora_A'\]",
        ),
        (
            lambda t: t.update({_first_unit_key(t): torch.zeros(3, 32)}),
            r"has shape \(3, 32\), expected \(8, 32\)",
        ),
        (lambda t: t.update({"head.out.weight": torch.zeros(3, 32)}), r"head.out.weight has shape \(3, 32\)"),
    ],
    ids=["missing-unit", "missing-head", "unexpected", "unit-shape", "head-shape"],
)
def test_weights_do_not_fit_config(
    bert: Family, folder: Path, edit: Callable[[dict[str, torch.Tensor]], None], message: str
) -> None:
    _saved(bert, folder)
    _rewrite_weights(folder, edit)
    model = bert.build()
    mm = modfit.wrap(model)
    with pytest.raises(modfit.ModuleFileError, match=message) as info:
        mm.load(folder)
    assert str(folder / WEIGHTS) in str(info.value)
    assert mm.module_names == []  # the half-loaded module was removed again
    assert not hasattr(model, "modfit")
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# -- atomic saves ------------------------------------------------------------------------------------


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_failed_weights_write_keeps_previous_save(
    bert: Family, folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mm = _saved(bert, folder)
    before = _snapshot(folder)
    _randomise(mm, "sst", seed=7)

    def broken_save_file(tensors: dict[str, torch.Tensor], filename: str, metadata: Any = None) -> None:
        with open(filename, "wb") as f:
            f.write(b"\x00" * 100)  # half a file, then the disk fills up
        raise OSError("No space left on device")

    monkeypatch.setattr("modfit.atomic.save_file", broken_save_file)
    with pytest.raises(OSError, match="No space left"):
        mm.save("sst", folder, metrics={"accuracy": 0.1})
    assert _snapshot(folder) == before
    monkeypatch.undo()
    mm2 = modfit.wrap(bert.build())
    mm2.load(folder)  # still the earlier, complete module


def test_failed_card_write_keeps_previous_save(bert: Family, folder: Path) -> None:
    mm = _saved(bert, folder)
    before = _snapshot(folder)
    _randomise(mm, "sst", seed=7)
    with pytest.raises(TypeError, match="not JSON serializable"):
        mm.save("sst", folder, metrics={"accuracy": torch.tensor(0.9)})  # type: ignore[dict-item]
    assert _snapshot(folder) == before  # neither the new weights nor a new card
    assert mm.records["sst"].card["metrics"] == {"accuracy": 0.75}  # the failed save recorded nothing
    modfit.wrap(bert.build()).load(folder)
