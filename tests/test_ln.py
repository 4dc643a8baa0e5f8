"""LayerNorm tuning: which norms it finds, and that its x̂ is the one each norm class computes."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest
import torch
import transformers
from torch import nn

import modfit
from modfit.methods.ln import NormUnit

if TYPE_CHECKING:
    from conftest import Family


def _gemma() -> nn.Module:
    config = transformers.GemmaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
    )
    torch.manual_seed(0)
    return transformers.GemmaForCausalLM(config).eval()


@pytest.mark.parametrize("name", ["bert", "distilbert", "gpt2", "llama", "qwen2", "t5", "gemma"])
def test_normalised_input_times_weight_gives_the_norm_output(
    name: str, tiny: Callable[[str], Family]
) -> None:
    """y = w ⊙ x̂ + b (Gemma: x̂ ⊙ (1 + w)) for every norm the method targets: the contribution
    x̂ ⊙ Δw + Δb is then exactly the change of y when w and b move by Δw and Δb."""
    model = _gemma() if name == "gemma" else tiny(name).build()
    mm = modfit.wrap(model)
    mm.add("n", modfit.config("ln", outside_layers=True))
    g = torch.Generator().manual_seed(0)
    units = dict(mm.units("n"))
    assert units
    for path, unit in units.items():
        assert isinstance(unit, NormUnit)
        norm = mm.view.module(path)
        with torch.no_grad():
            norm.weight.add_(torch.randn(norm.weight.shape, generator=g) * 0.1)  # not all ones
            x = torch.randn(2, 3, *norm.weight.shape, generator=g) * 3 + 1
            x_hat = unit.normalise(x, x.dtype)
            scale = norm.weight + 1 if name == "gemma" else norm.weight
            expected = x_hat * scale + (norm.bias if unit.delta_bias is not None else 0)
            torch.testing.assert_close(norm(x), expected, atol=1e-5, rtol=1e-5)
        assert (unit.kind == "layer") is isinstance(norm, nn.LayerNorm)
        assert (unit.delta_bias is None) is (getattr(norm, "bias", None) is None)


@pytest.mark.parametrize(
    ("name", "inside", "outside"),
    [("bert", 4, ["embeddings.LayerNorm"]), ("gpt2", 4, ["ln_f"]), ("llama", 4, ["norm"]),
     ("t5", 10, ["encoder.final_layer_norm", "decoder.final_layer_norm"])],
)  # fmt: skip
def test_outside_layers_adds_the_embedding_and_final_norms(
    name: str, inside: int, outside: list[str], tiny: Callable[[str], Family]
) -> None:
    mm = modfit.wrap(tiny(name).build())
    mm.add("a", modfit.config("ln"))
    mm.add("b", modfit.config("ln", outside_layers=True))
    paths_a = [p for p, _ in mm.units("a")]
    paths_b = [p for p, _ in mm.units("b")]
    assert len(paths_a) == inside
    assert sorted(set(paths_b) - set(paths_a)) == sorted(outside)
    mm.add("c", modfit.config("ln", layers=(1,), outside_layers=True))
    assert len(list(mm.units("c"))) == inside // 2 + len(outside)


def test_patterns_and_modfit_own_norms(tiny: Callable[[str], Family]) -> None:
    mm = modfit.wrap(tiny("bert").build())
    mm.add("adapter", modfit.config("houlsby", ln_after=True))  # LayerNorms inside modfit's container
    mm.add("all", modfit.config("ln", targets=("re:.*",)))
    assert len(list(mm.units("all"))) == 5  # the base model's own LayerNorms only
    mm.add("one", modfit.config("ln", targets=("attention.output.LayerNorm",), layers=(0,)))
    assert [p for p, _ in mm.units("one")] == ["encoder.layer.0.attention.output.LayerNorm"]
    with pytest.raises(modfit.TargetError, match="matches no LayerNorm/RMSNorm"):
        mm.add("none", modfit.config("ln", targets=("query",)))


def test_unknown_norm_class_is_refused() -> None:
    class FancyLayerNorm(nn.Module):  # a name that says norm, a normalisation we cannot know
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.weight

    model = nn.Sequential(nn.Linear(4, 4), FancyLayerNorm())
    mm = modfit.wrap(model)
    with pytest.raises(modfit.TargetError, match="cannot tell whether FancyLayerNorm"):
        mm.add("n", modfit.config("ln", targets=("1",)))
