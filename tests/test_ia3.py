"""(IA)³: placement per family, the two scalings against hand computation, merging on Linear and
Conv1D, target errors, and a half-precision base. (The shared invariants are in test_conformance.)"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest
import torch
from torch import nn

import modfit
from modfit.methods.ia3 import Ia3InputUnit, Ia3OutputUnit
from modfit.model import ModularModel

if TYPE_CHECKING:
    from conftest import Family


def _placement(mm: ModularModel, name: str = "m") -> dict[str, str]:
    return {path: "in" if isinstance(unit, Ia3InputUnit) else "out" for path, unit in mm.units(name)}


@torch.no_grad()
def _randomise(mm: ModularModel, name: str = "m", seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in mm.module_parameters(name, include_head=False):
        p.copy_(torch.rand(p.shape, generator=g) + 0.5)  # well away from 0


def test_bert_default_is_peft_placement(tiny: Callable[[str], Family]) -> None:
    mm = modfit.wrap(tiny("bert").build())
    mm.add("m", modfit.config("ia3"))
    assert _placement(mm) == {
        f"encoder.layer.{i}.{path}": side
        for i in range(2)
        for path, side in (
            ("attention.self.key", "out"),
            ("attention.self.value", "out"),
            ("attention.output.dense", "in"),
            ("output.dense", "in"),
        )
    }


@pytest.mark.parametrize(
    ("family", "expected"),
    [
        ("gpt2", {"h.0.attn.c_attn": "out", "h.0.mlp.c_proj": "in"}),
        (
            "llama",
            {
                "layers.0.self_attn.k_proj": "out",
                "layers.0.self_attn.v_proj": "out",
                "layers.0.mlp.down_proj": "in",
            },
        ),
        (
            "qwen2",
            {
                "layers.0.self_attn.q_proj": "out",
                "layers.0.self_attn.v_proj": "out",
                "layers.0.mlp.down_proj": "in",
            },
        ),
        (
            "distilbert",
            {
                "transformer.layer.0.attention.k_lin": "out",
                "transformer.layer.0.attention.v_lin": "out",
                "transformer.layer.0.ffn.lin2": "in",
            },
        ),
        (
            "t5",
            {
                "decoder.block.0.layer.0.SelfAttention.k": "out",
                "decoder.block.0.layer.0.SelfAttention.v": "out",
                "decoder.block.0.layer.1.EncDecAttention.k": "out",
                "decoder.block.0.layer.1.EncDecAttention.v": "out",
                "decoder.block.0.layer.2.DenseReluDense.wo": "in",
            },
        ),
    ],
)
def test_default_placement_of_other_families(
    tiny: Callable[[str], Family], family: str, expected: dict[str, str]
) -> None:
    mm = modfit.wrap(tiny(family).build())
    mm.add("m", modfit.config("ia3"))
    placement = _placement(mm)
    first = {
        p: s for p, s in placement.items() if p.startswith(("h.0.", "layers.0.", "transformer.layer.0."))
    }
    first |= {p: s for p, s in placement.items() if p.startswith("decoder.block.0.")}
    assert first == expected


def test_scalings_match_hand_computation(tiny: Callable[[str], Family]) -> None:
    bert = tiny("bert")
    model = bert.build()
    mm = modfit.wrap(model)
    mm.add("m", modfit.config("ia3"))
    _randomise(mm)
    mm.activate("m")
    layer = model.encoder.layer[0]
    seen: dict[str, torch.Tensor] = {}

    def keep(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            seen[name + ".in"], seen[name + ".out"] = args[0], output

        return hook

    handles = [
        layer.attention.self.key.register_forward_hook(keep("key")),
        layer.output.dense.register_forward_hook(keep("ffn_out")),
    ]
    # registered after the site's hooks: they see what the site made of the input and output
    with torch.no_grad():
        bert.run(model)
    for handle in handles:
        handle.remove()
    key = layer.attention.self.key
    l_key = mm.container.site("encoder__layer__0__attention__self__key").unit("m").ia3_l
    torch.testing.assert_close(seen["key.out"], (seen["key.in"] @ key.weight.T + key.bias) * l_key)
    dense = layer.output.dense
    l_ffn = mm.container.site("encoder__layer__0__output__dense").unit("m").ia3_l
    assert l_ffn.shape == (dense.in_features,)
    # the forward hook sees the already scaled input x ⊙ l: W (x ⊙ l) + b
    torch.testing.assert_close(seen["ffn_out.out"], seen["ffn_out.in"] @ dense.weight.T + dense.bias)
    mm.deactivate()
    with torch.no_grad():
        x = torch.randn(3, dense.in_features)
        mm.activate("m")
        scaled = dense(x)
        mm.deactivate()
        torch.testing.assert_close(scaled, dense(x * l_ffn))


@pytest.mark.parametrize("family", ["bert", "gpt2"])  # Linear (out, in) and Conv1D (in, out) weights
def test_merge_scales_rows_or_columns(tiny: Callable[[str], Family], family: str) -> None:
    model = tiny(family).build()
    mm = modfit.wrap(model)
    mm.add("m", modfit.config("ia3"))
    _randomise(mm)
    before = {
        path: (mm.view.module(path).weight.clone(), mm.view.module(path).bias.clone())
        for path, _ in mm.units("m")
    }
    mm.merge("m")
    for path, unit in mm.units("m"):
        weight, bias = before[path]
        base = mm.view.module(path)
        scale = unit.ia3_l
        conv1d = family == "gpt2"
        if isinstance(unit, Ia3OutputUnit):
            expected = weight * (scale[None, :] if conv1d else scale[:, None])
            torch.testing.assert_close(base.bias, bias * scale)
        else:
            expected = weight * (scale[:, None] if conv1d else scale[None, :])
            assert torch.equal(base.bias, bias)
        torch.testing.assert_close(base.weight, expected)
    mm.unmerge("m")
    for path, _ in mm.units("m"):
        torch.testing.assert_close(mm.view.module(path).weight, before[path][0], atol=1e-7, rtol=0)


def test_explicit_targets_and_feedforward(tiny: Callable[[str], Family]) -> None:
    mm = modfit.wrap(tiny("bert").build())
    mm.add(
        "m",
        modfit.config(
            "ia3", targets="value,intermediate.dense", feedforward="intermediate.dense", layers="1"
        ),
    )
    assert _placement(mm) == {
        "encoder.layer.1.attention.self.value": "out",
        "encoder.layer.1.intermediate.dense": "in",
    }
    mm.add("n", modfit.config("ia3", targets="query,ffn_out", feedforward=""))
    assert set(_placement(mm, "n").values()) == {"out"}
    assert modfit.config("ia3", feedforward="none").feedforward is None  # type: ignore[attr-defined]


def test_errors(tiny: Callable[[str], Family]) -> None:
    mm = modfit.wrap(tiny("bert").build())
    with pytest.raises(
        modfit.TargetError, match=r"ia3.feedforward: encoder.layer.0.output.dense.* not among"
    ):
        mm.add("m", modfit.config("ia3", targets="key,value", feedforward="ffn_out"))
    with pytest.raises(modfit.TargetError, match="target 'nothing' matches no Linear"):
        mm.add("m", modfit.config("ia3", targets="nothing"))
    with pytest.raises(modfit.ConfigError, match=r"ia3\.targets: name at least one projection"):
        modfit.config("ia3", targets="")
    assert mm.module_names == []


class _Tiny(nn.Module):
    """A model the architecture table does not know."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 6)
        self.out = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.proj(x)))


def test_unknown_model_needs_targets() -> None:
    mm = modfit.wrap(_Tiny())
    with pytest.raises(modfit.TargetError, match="no default placement for model type '_Tiny'"):
        mm.add("m", modfit.config("ia3"))
    mm.add("m", modfit.config("ia3", targets="proj,out"))
    assert _placement(mm) == {"proj": "out", "out": "out"}  # no default feed-forward without a table row
    mm.add("n", modfit.config("ia3", targets="proj,out", feedforward="out"))
    assert _placement(mm, "n") == {"proj": "out", "out": "in"}


def test_half_precision_base(tiny: Callable[[str], Family]) -> None:
    bert = tiny("bert")
    model = bert.build(torch.bfloat16)
    mm = modfit.wrap(model)
    mm.add("m", modfit.config("ia3"))
    assert all(p.dtype == torch.float32 for p in mm.module_parameters("m"))
    mm.activate("m")
    with torch.no_grad():
        out = bert.run(model)
    assert out.dtype == torch.bfloat16
    mm.merge("m")
    mm.unmerge("m")
