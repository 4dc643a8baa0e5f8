"""Unions: several methods in one module (`methods/union.py`), UniPELT's gates, the presets."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import modfit
from conftest import FAMILIES
from modfit.methods.union import UnionUnit


def _randomise(mm: modfit.ModularModel, name: str, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in mm.module_parameters(name, include_head=False):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _run(family_name: str, model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return FAMILIES[family_name].run(model)


# -- config ---------------------------------------------------------------------------------------


def test_components_from_names_dotted_fields_and_json_round_trip() -> None:
    config = modfit.config(
        "union", components="lora, prefix", **{"lora.r": "4", "prefix.num_virtual_tokens": 3}
    )
    lora, prefix = config.components
    assert (lora.method, lora.r, prefix.method, prefix.num_virtual_tokens) == ("lora", 4, "prefix", 3)
    card = config.to_dict()
    assert card["components"][0] == {"method": "lora", **lora.to_dict()}
    again = type(config).from_dict(card)
    assert again == config
    as_json = modfit.config("union", components='[{"method": "ia3"}, {"method": "lora", "r": 2}]')
    assert [c.method for c in as_json.components] == ["ia3", "lora"]


def test_repeated_method_members_are_numbered() -> None:
    config = modfit.config("union", components="lora,lora", **{"lora_2.r": 2})
    assert list(config.members()) == ["lora_1", "lora_2"]
    assert [c.r for c in config.components] == [8, 2]


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"components": ""}, "union.components: name at least one method"),
        ({"components": "lora,nosuch"}, "unknown method 'nosuch'"),
        ({"components": "[1, 2"}, "components is not valid JSON"),
        ({"components": [{"r": 4}]}, "components[0]: a member needs a 'method' name"),
        (
            {"components": "lora", "prefix.num_virtual_tokens": 3},
            "'prefix.num_virtual_tokens' names no member",
        ),
        ({"components": "lora", "lora.rank": 3}, "unknown parameter(s) rank for method 'lora'"),
        ({"components": "lora", "lora.r": 0}, "lora.r: must be >= 1"),
        ({"components": "lora,sft"}, "member 'sft' trains in phases of its own"),
        ({"components": "diff_pruning"}, "member 'diff_pruning' trains in phases of its own"),
    ],
)
def test_config_errors_name_the_member(params: dict[str, object], message: str) -> None:
    with pytest.raises(modfit.ConfigError, match=re.escape(message)):
        modfit.config("union", **params)


def test_defaults_and_rates() -> None:
    default = modfit.config("union")
    assert [c.method for c in default.components] == ["lora", "pfeiffer"]
    assert default.identity_at_init and default.default_lr is None
    with_prefix = modfit.config("union", components="lora,prefix")
    assert not with_prefix.identity_at_init
    assert with_prefix.default_lr == modfit.config("prefix").default_lr
    unipelt = modfit.config("unipelt")
    assert [c.method for c in unipelt.components] == ["lora", "prefix", "pfeiffer"]
    assert all(c.use_gating for c in unipelt.components)
    assert [c.method for c in modfit.config("mam").components] == ["prefix", "parallel"]


# -- the union acts as its members would, added separately ------------------------------------------


@pytest.mark.parametrize("family_name", ["bert", "gpt2", "t5"])
@pytest.mark.parametrize(
    "members", ["lora,pfeiffer", "prefix,lora,ia3", "prompt,parallel", "compacter,bitfit"]
)
def test_union_equals_its_members_stacked(family_name: str, members: str) -> None:
    """One union module = its members as separate modules with the same weights, stacked."""
    family = FAMILIES[family_name]
    model = family.build()
    mm = modfit.wrap(model)
    config = modfit.config("union", components=members)
    mm.add("u", config)
    _randomise(mm, "u")
    mm.activate("u")
    union_out = _run(family_name, model)

    separate = family.build()
    separate.load_state_dict(model.state_dict(), strict=False)
    ms = modfit.wrap(separate)
    names = list(config.members())
    for name, member in config.members().items():
        ms.add(name, member)
    # copy every member's tensors from the union module (keys units.<site>.<member>.<param>)
    union_state = {
        f"{path}.{key}": value for path, unit in mm.units("u") for key, value in unit.state_dict().items()
    }
    with torch.no_grad():
        for name in names:
            for path, unit in ms.units(name):
                for key, value in unit.state_dict(keep_vars=True).items():
                    value.copy_(union_state[f"{path}.members.{name}.{key}"])
    ms.activate(f"stack({', '.join(names)})")
    torch.testing.assert_close(_run(family_name, separate), union_out, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family_name", ["bert", "gpt2"])
def test_mergeable_union_merges_exactly(family_name: str) -> None:
    """LoRA + (IA)³ (a multiplicative member) merge into the weights: merged = unmerged; unmerge restores."""
    family = FAMILIES[family_name]
    model = family.build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mm = modfit.wrap(model)
    mm.add("u", modfit.config("union", components="lora,ia3"))
    _randomise(mm, "u")
    mm.activate("u")
    assert all(unit.mergeable for _, unit in mm.units("u"))
    unmerged = _run(family_name, model)
    mm.merge("u")
    torch.testing.assert_close(_run(family_name, model), unmerged, rtol=0, atol=1e-5)
    mm.unmerge("u")
    for key, value in before.items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=1e-6)


def test_union_deltas_equal_the_merged_change() -> None:
    family = FAMILIES["bert"]
    model = family.build()
    mm = modfit.wrap(model)
    mm.add("u", modfit.config("union", components="lora,ia3", **{"ia3.targets": "key,value"}))
    _randomise(mm, "u")
    for path, unit in mm.units("u"):
        base = mm.view.module(path)
        old = {n: p.detach().clone() for n, p in base.named_parameters()}
        deltas = unit.deltas(base)
        unit.merge(base)
        for n, p in base.named_parameters():
            expected = p.detach() - old[n]
            torch.testing.assert_close(deltas.get(n, torch.zeros_like(expected)), expected, rtol=0, atol=1e-6)
        unit.unmerge(base)


def test_files_name_each_member(tmp_path: Path) -> None:
    model = FAMILIES["bert"].build()
    mm = modfit.wrap(model)
    mm.add("u", modfit.config("unipelt"))
    mm.save("u", tmp_path / "u")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "u" / "module.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any(".members.lora.lora_A" in k for k in keys)
    assert any(".members.prefix.embedding.weight" in k for k in keys)
    assert any(".members.pfeiffer.gate.weight" in k for k in keys)
    assert all(isinstance(unit, UnionUnit) for _, unit in mm.units("u"))


# -- gates ------------------------------------------------------------------------------------------


def _constant_gates(mm: modfit.ModularModel, name: str, bias: float) -> None:
    """Every gate of module `name` outputs sigmoid(bias) whatever its input."""
    with torch.no_grad():
        for _, unit in mm.units(name):
            for module in unit.modules():
                for attr in ("gate", "gates"):
                    gate = getattr(module, attr, None)
                    if isinstance(gate, torch.nn.Linear):
                        gate.weight.zero_()
                        gate.bias.fill_(bias)


@pytest.mark.parametrize("family_name", ["bert", "distilbert", "gpt2", "llama", "t5"])
def test_gated_prefix_scales_keys_and_values(family_name: str) -> None:
    """A constant gate g gives the ungated prefix with its table multiplied by g."""
    family = FAMILIES[family_name]
    model = family.build()
    mm = modfit.wrap(model)
    mm.add("gated", modfit.config("prefix", num_virtual_tokens=3, use_gating=True))
    mm.add("plain", modfit.config("prefix", num_virtual_tokens=3))
    g = torch.sigmoid(torch.tensor(0.3)).item()
    _constant_gates(mm, "gated", 0.3)
    gated_tables = [u.embedding.weight for _, u in mm.units("gated") if hasattr(u, "embedding")]
    plain_tables = [u.embedding.weight for _, u in mm.units("plain") if hasattr(u, "embedding")]
    with torch.no_grad():
        for gated, plain in zip(gated_tables, plain_tables, strict=True):
            plain.copy_(gated * g)
    mm.activate("gated")
    out_gated = _run(family_name, model)
    mm.activate("plain")
    torch.testing.assert_close(out_gated, _run(family_name, model), rtol=0, atol=1e-5)


def test_gated_lora_matches_its_formula() -> None:
    family = FAMILIES["bert"]
    model = family.build()
    mm = modfit.wrap(model)
    mm.add("g", modfit.config("lora", r=2, targets="query", layers=(0,), use_gating=True))
    _randomise(mm, "g")
    ((path, unit),) = list(mm.units("g"))
    base = mm.view.module(path)
    x = torch.randn(2, 5, base.in_features)
    gate = torch.sigmoid(x @ unit.gate.weight.t() + unit.gate.bias).mean(dim=1, keepdim=True)  # (2, 1, 1)
    expected = base(x) + gate * unit.scale * (x @ unit.lora_A.t() @ unit.lora_B.t())
    mm.activate("g")
    with torch.no_grad():
        torch.testing.assert_close(base(x), expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="cannot be merged"):
        mm.merge("g")


def test_dora_refuses_gating() -> None:
    with pytest.raises(modfit.ConfigError, match=r"dora\.use_gating"):
        modfit.config("dora", use_gating=True)


def test_prefix_past_learned_positions_is_a_clear_error() -> None:
    family = FAMILIES["gpt2"]
    model = family.build()
    mm = modfit.wrap(model)
    limit = model.config.n_positions
    mm.add("p", modfit.config("prefix", num_virtual_tokens=limit))
    mm.activate("p")
    with pytest.raises(ValueError, match=f"{limit} virtual tokens \\+ 4 input tokens exceed"):
        model(input_ids=torch.ones(1, 4, dtype=torch.long))


# -- parameter counts against AdapterHub `adapters` -------------------------------------------------


@pytest.mark.parametrize(("method", "expected"), [("unipelt", 11_083_376), ("mam", 22_493_984)])
def test_counts_equal_adapters_on_bert_base(method: str, expected: int) -> None:
    """`adapters` 1.3.0 on BertModel(BertConfig()): UniPELTConfig() trains 11,083,376 parameters (LoRA
    r=8 q,v with gates 24 × (12,288 + 769); prefix 10 tokens, MLP 768 -> 512 -> 18,432, 9,857,024, plus
    12 gates of 769; SeqBn reduction 16 with gates 12 × 75,313), MAMConfig() 22,493,984 (prefix 30
    tokens, MLP inner 800: 15,402,272; ParBn reduction 2: 12 × 590,976). Counted by summing
    `numel()` of the parameters whose name holds the adapter name, after `model.add_adapter`."""
    import transformers

    with torch.device("meta"):
        model = transformers.BertModel(transformers.BertConfig())
    mm = modfit.wrap(model)
    mm.add("m", modfit.config(method))
    assert mm.trainable_parameters("m") == expected
    assert (
        24 * (8 * 768 * 2 + 769)
        + 10 * 768
        + 768 * 512
        + 512
        + 512 * 18432
        + 18432
        + 12 * 769
        + 12 * (768 * 48 + 48 + 48 * 768 + 768 + 769)
        == 11_083_376
    )
