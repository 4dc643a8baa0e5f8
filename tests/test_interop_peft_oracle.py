"""modfit against the real PEFT (skipped where `peft` is not installed; run them in the peer venv:
`make peer-test`): the same weights give the same outputs, both directions, for LoRA (plain, rsLoRA,
DoRA, rank/alpha patterns, GPT-2's fan_in_fan_out), IA3, prompt and prefix tuning; a LoRA exported by
modfit loads in plain transformers with `model.load_adapter`.

PEFT -> modfit: PEFT builds the adapter on a tiny base, its parameters are randomised, it saves itself
(`save_pretrained`) and modfit loads the folder with `mm.load`. modfit -> PEFT: modfit builds and
randomises, saves with `format="peft"`, PEFT loads with `PeftModel.from_pretrained`.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch

import modfit

peft = pytest.importorskip("peft")

if TYPE_CHECKING:
    from conftest import Family

TOL = 1e-5


@torch.no_grad()
def _randomise(params: list[torch.nn.Parameter], seed: int, around_one: bool = False) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in params:
        noise = torch.randn(p.shape, generator=g) * 0.1
        p.copy_(p + noise if around_one else torch.randn(p.shape, generator=g) * 0.3)


def _first(out: Any) -> torch.Tensor:
    return out[0] if not isinstance(out, torch.Tensor) else out


def _changes(family: Family, output: torch.Tensor) -> None:
    """The adapter must change the base's output (else equal outputs would prove nothing)."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = _first(family.build()(**family.inputs()))
    assert float((output - base).abs().max()) > 1e-3


def _record(label: str, diff: float) -> float:
    print(f"max-abs-diff {label}: {diff:.3g}")
    return diff


def _peft_output(model: Any, family: Family, virtual: int) -> torch.Tensor:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _first(model(**family.inputs()))[:, virtual:]


def _modfit_output(mm: modfit.ModularModel, family: Family) -> torch.Tensor:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _first(mm.model(**family.inputs()))


def _peft_to_modfit(family: Family, config: Any, tmp_path: Path, **save: Any) -> tuple[float, Any]:
    model = peft.get_peft_model(family.build(), config).eval()
    trainable = [p for p in model.parameters() if p.requires_grad]
    around_one = config.peft_type.value == "IA3"
    _randomise(trainable, 1, around_one)
    if getattr(config, "use_dora", False):  # the magnitudes near their init, the rest random
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                with torch.no_grad():
                    p.copy_(p.abs() + 0.5)
    virtual = config.num_virtual_tokens if config.peft_type.value == "PROMPT_TUNING" else 0
    expected = _peft_output(model, family, virtual)
    _changes(family, expected)
    model.save_pretrained(str(tmp_path / "peft"), **save)
    mm = modfit.wrap(family.build())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        name = mm.load(tmp_path / "peft")
    mm.activate(name)
    got = _modfit_output(mm, family)
    label = f"peft->modfit {family.name} {config.peft_type.value}"
    return _record(label, float((got - expected).abs().max())), mm.records[name].config


def _modfit_to_peft(family: Family, method: str, params: dict[str, Any], tmp_path: Path) -> float:
    mm = modfit.wrap(family.build())
    mm.add("m", modfit.config(method, **params))
    _randomise(mm.module_parameters("m"), 2, around_one=method in ("ia3", "dora"))
    mm.activate("m")
    expected = _modfit_output(mm, family)
    _changes(family, expected)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mm.save("m", tmp_path / "out", format="peft")
        model = peft.PeftModel.from_pretrained(family.build(), str(tmp_path / "out")).eval()
    virtual = params.get("num_virtual_tokens", 0) if method == "prompt" else 0
    diff = float((_peft_output(model, family, virtual) - expected).abs().max())
    return _record(f"modfit->peft {family.name} {method}", diff)


LORA_CASES = [
    ("bert", dict(r=4, lora_alpha=8, target_modules=["query", "value"]), {}),
    ("llama", dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"]), {}),
    ("bert", dict(r=4, lora_alpha=8, use_dora=True, target_modules=["query", "value", "dense"]), {}),
    (
        "bert",
        dict(
            r=4,
            lora_alpha=8,
            target_modules=["query", "value", "output.dense"],
            rank_pattern={"value": 2, "layer.1.output.dense": 6},
            alpha_pattern={"query": 16},
        ),
        {},
    ),
    ("gpt2", dict(r=4, lora_alpha=8, fan_in_fan_out=True, target_modules=["c_attn", "c_proj"]), {}),
    ("llama", dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], layers_to_transform=[1]), {}),
    ("bert", dict(r=4, lora_alpha=8, target_modules=r".*\.(query|key)"), {"safe_serialization": False}),
    (
        "gpt2",
        dict(r=4, lora_alpha=8, use_dora=True, fan_in_fan_out=True, target_modules=["c_attn", "c_fc"]),
        {},
    ),
]
LORA_IDS = [
    "plain",
    "rslora",
    "dora",
    "rank-pattern",
    "gpt2-fan-in-fan-out",
    "layers",
    "regex-bin",
    "gpt2-dora",
]


@pytest.mark.parametrize(("family_name", "fields", "save"), LORA_CASES, ids=LORA_IDS)
def test_peft_lora_loads_with_peft_outputs(
    tiny: Any, tmp_path: Path, family_name: str, fields: dict[str, Any], save: dict[str, Any]
) -> None:
    diff, config = _peft_to_modfit(tiny(family_name), peft.LoraConfig(**fields), tmp_path, **save)
    assert diff <= TOL, (diff, config)


MODFIT_LORA = [
    ("bert", "lora", dict(r=4, alpha=8, targets=("query", "value"))),
    ("llama", "lora", dict(r=4, alpha=8, rslora=True, targets=("q_proj", "v_proj", "down_proj"))),
    ("bert", "dora", dict(r=4, alpha=8, targets=("query", "value", "attn_out"))),
    (
        "bert",
        "union",
        dict(
            components=[
                {"method": "lora", "r": 4, "alpha": 8, "targets": ["query"]},
                {"method": "lora", "r": 2, "alpha": 3, "targets": ["value"], "layers": [1]},
            ]
        ),
    ),
    ("gpt2", "lora", dict(r=4, alpha=8, targets=("c_attn", "attn_out"))),
    ("llama", "lora", dict(r=2, alpha=4, targets=("q_proj",), layers=(0,))),
    ("gpt2", "dora", dict(r=4, alpha=8, targets=("c_attn", "ffn_in"))),
]


@pytest.mark.parametrize(
    ("family_name", "method", "params"),
    MODFIT_LORA,
    ids=["plain", "rslora", "dora", "rank-pattern", "gpt2-fan-in-fan-out", "layers", "gpt2-dora"],
)
def test_modfit_lora_loads_in_peft(
    tiny: Any, tmp_path: Path, family_name: str, method: str, params: dict[str, Any]
) -> None:
    assert _modfit_to_peft(tiny(family_name), method, params, tmp_path) <= TOL


IA3_CASES = [
    ("bert", dict(target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"])),
    (
        "gpt2",
        dict(
            target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"], fan_in_fan_out=True
        ),
    ),
    ("llama", dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])),
]


@pytest.mark.parametrize(("family_name", "fields"), IA3_CASES, ids=["bert", "gpt2", "llama"])
def test_ia3_both_directions(tiny: Any, tmp_path: Path, family_name: str, fields: dict[str, Any]) -> None:
    family = tiny(family_name)
    diff, _ = _peft_to_modfit(family, peft.IA3Config(**fields), tmp_path / "a")
    assert diff <= TOL
    assert _modfit_to_peft(family, "ia3", {}, tmp_path / "b") <= TOL


PROMPT_CASES = [("gpt2", "CAUSAL_LM"), ("llama", "CAUSAL_LM"), ("bert", "FEATURE_EXTRACTION")]


@pytest.mark.parametrize(("family_name", "task"), PROMPT_CASES, ids=["gpt2", "llama", "bert"])
def test_prompt_both_directions(tiny: Any, tmp_path: Path, family_name: str, task: str) -> None:
    family = tiny(family_name)
    config = peft.PromptTuningConfig(task_type=task, num_virtual_tokens=3)
    diff, _ = _peft_to_modfit(family, config, tmp_path / "a")
    assert diff <= TOL
    assert _modfit_to_peft(family, "prompt", dict(num_virtual_tokens=3, init="random"), tmp_path / "b") <= TOL


@pytest.mark.parametrize("projection", [False, True], ids=["table", "prefix-projection"])
@pytest.mark.parametrize("family_name", ["gpt2", "llama"])
def test_prefix_both_directions(tiny: Any, tmp_path: Path, family_name: str, projection: bool) -> None:
    family = tiny(family_name)
    config = peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=3, prefix_projection=projection, encoder_hidden_size=16
    )
    diff, loaded = _peft_to_modfit(family, config, tmp_path / "a")
    assert diff <= TOL
    assert loaded.prefix_projection is False  # PEFT saves the computed table, not the MLP
    params = dict(num_virtual_tokens=3, prefix_projection=projection)
    assert _modfit_to_peft(family, "prefix", params, tmp_path / "b") <= TOL


@pytest.mark.parametrize("family_name", ["bert", "gpt2", "llama"])
def test_exported_lora_loads_in_transformers(tiny: Any, tmp_path: Path, family_name: str) -> None:
    family = tiny(family_name)
    mm = modfit.wrap(family.build())
    mm.add("m", modfit.config("lora", r=4, alpha=8, targets=("query", "value")))
    _randomise(mm.module_parameters("m"), 3)
    mm.activate("m")
    expected = _modfit_output(mm, family)
    _changes(family, expected)
    mm.save("m", tmp_path / "out", format="peft")
    model = family.build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.load_adapter(str(tmp_path / "out"))
    with torch.no_grad():
        got = _first(model(**family.inputs()))
    assert _record(f"modfit->transformers {family_name} lora", float((got - expected).abs().max())) <= TOL
