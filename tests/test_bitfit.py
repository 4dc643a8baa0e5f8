"""BitFit: which biases it trains, what it does where there are none, and the exact bias merge."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest
import torch

import modfit
from modfit.methods.bitfit import AddedBiasUnit, BiasUnit

if TYPE_CHECKING:
    from conftest import Family


def _layer_biases(mm: modfit.ModularModel) -> dict[str, int]:
    """Every bias inside the layer stacks: its module path -> size."""
    assert mm.view.arch is not None
    stacks = tuple(g.path + "." for g in mm.view.arch.groups)
    return {
        name.removesuffix(".bias"): p.numel()
        for name, p in mm.view.base_model.named_parameters()
        if name.endswith(".bias") and name.startswith(stacks)
    }


@pytest.mark.parametrize("name", ["bert", "distilbert", "gpt2", "electra"])
def test_default_is_every_bias_in_the_layers(name: str, tiny: Callable[[str], Family]) -> None:
    mm = modfit.wrap(tiny(name).build())
    mm.add("b", modfit.config("bitfit"))
    units = dict(mm.units("b"))
    assert all(isinstance(u, BiasUnit) for u in units.values())
    assert {p: u.delta_bias.numel() for p, u in units.items()} == _layer_biases(mm)


def test_qwen2_trains_its_qkv_biases_only(tiny: Callable[[str], Family]) -> None:
    mm = modfit.wrap(tiny("qwen2").build())
    mm.add("b", modfit.config("bitfit"))
    leaves = sorted({p.rsplit(".", 1)[-1] for p, _ in mm.units("b")})
    assert leaves == ["k_proj", "q_proj", "v_proj"]
    mm.add("all", modfit.config("bitfit", add_bias="always"))
    units = dict(mm.units("all"))
    assert len(units) == 2 * (7 + 2)  # every projection and norm of both layers
    assert sum(isinstance(u, BiasUnit) for u in units.values()) == 2 * 3


@pytest.mark.parametrize("name", ["llama", "t5"])
def test_bias_free_models_get_new_biases(name: str, tiny: Callable[[str], Family]) -> None:
    family = tiny(name)
    mm = modfit.wrap(family.build())
    mm.add("b", modfit.config("bitfit"))
    units = dict(mm.units("b"))
    assert units and all(isinstance(u, AddedBiasUnit) and not u.mergeable for u in units.values())
    with pytest.raises(ValueError, match="cannot be merged"):
        mm.merge("b")
    with pytest.raises(modfit.TargetError, match="has a bias"):
        mm.add("never", modfit.config("bitfit", add_bias="never"))


def test_targets_roles_and_patterns(tiny: Callable[[str], Family]) -> None:
    mm = modfit.wrap(tiny("bert").build())
    mm.add("qv", modfit.config("bitfit", targets=("query", "value"), layers=(1,)))
    assert [p for p, _ in mm.units("qv")] == [
        "encoder.layer.1.attention.self.query",
        "encoder.layer.1.attention.self.value",
    ]
    mm.add("outside", modfit.config("bitfit", targets=("embeddings.LayerNorm", "pooler.dense")))
    assert [p for p, _ in mm.units("outside")] == ["embeddings.LayerNorm", "pooler.dense"]
    mm.add("ln", modfit.config("bitfit", targets=("LayerNorm",)))
    assert len(list(mm.units("ln"))) == 5
    with pytest.raises(modfit.TargetError, match="matches no Linear/Conv1D or LayerNorm/RMSNorm"):
        mm.add("none", modfit.config("bitfit", targets=("nothing_here",)))
    with pytest.raises(modfit.ConfigError, match=r"^.*bitfit\.add_bias"):
        modfit.config("bitfit", add_bias="sometimes")


def test_merge_adds_the_delta_to_the_bias(tiny: Callable[[str], Family]) -> None:
    mm = modfit.wrap(tiny("gpt2").build())
    mm.add("b", modfit.config("bitfit", targets=("c_attn",)))
    path, unit = next(iter(mm.units("b")))
    module = mm.view.module(path)
    before = module.bias.detach().clone()
    with torch.no_grad():
        unit.delta_bias.fill_(0.25)
    mm.merge("b")
    assert torch.equal(module.bias, before + 0.25)
    mm.unmerge("b")
    torch.testing.assert_close(module.bias, before, atol=1e-7, rtol=0)
