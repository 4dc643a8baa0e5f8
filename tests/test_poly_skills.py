"""Polytropon over skills of other methods (`methods/poly_skills.py`): rows equal the skill method run
with the allocation-averaged parameters; LoRA through the generic path equals the batched LoRA kernel;
identity at init, save/load, training, few-shot adaptation; what is refused and why."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch

import modfit
from modfit.config import ConfigError
from modfit.methods import poly
from modfit.methods.poly_skills import PolySkillsUnit
from modfit.model import ModularModel
from modfit.routing import routed

if TYPE_CHECKING:
    from conftest import Family

LABELS = ("no", "yes")
TASKS = ("a", "b", "c")
IA3 = {"method": "ia3", "targets": ["key", "value", "ffn_in"], "feedforward": []}


@pytest.fixture
def bert(tiny: Callable[[str], Family]) -> Family:
    return tiny("bert")


@torch.no_grad()
def _randomise(mm: ModularModel, name: str, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in mm.module_parameters(name, include_head=False):
        p.copy_(1.0 + torch.randn(p.shape, generator=g) * 0.3)


def _poly(family: Family, skill: Any, head: bool = False, **options: Any) -> ModularModel:
    mm = modfit.wrap(family.build())
    config = modfit.config("poly", tasks=TASKS, n_skills=3, skill=skill, **options)
    mm.add("p", config, head=modfit.head("seq-cls", LABELS) if head else None)
    mm.activate("p")
    return mm


def _weights(mm: ModularModel, task: int) -> torch.Tensor:
    """w_t (S,) in eval: σ(ẑ_t) normalised."""
    z = torch.sigmoid(poly.router(mm, "p").logits[task, 0]).detach()
    return z / z.sum()


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
def test_rows_equal_the_skill_method_with_averaged_parameters(
    tiny: Callable[[str], Family], name: str
) -> None:
    """Row of task t = an ia3 module whose vectors are Σ_s w_ts l_s, run alone on that row."""
    family = tiny(name)
    skill = {"method": "ia3", "targets": list(family.targets), "feedforward": []}
    mm = _poly(family, skill)
    _randomise(mm, "p")
    tasks = [2, 0, -1, 1]
    ids = torch.randint(3, 100, (len(tasks), 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), routed({"task": torch.tensor(tasks)}):
        mixed = mm.model(input_ids=ids)[0]
    base = family.build()
    ref = modfit.wrap(family.build())
    ref.add("ref", modfit.config("ia3", targets=family.targets, feedforward=()))
    ref.activate("ref")
    units = dict(mm.units("p"))
    for row, task in enumerate(tasks):
        with torch.no_grad():
            if task < 0:
                torch.testing.assert_close(mixed[row], base(input_ids=ids[row : row + 1])[0][0])
                continue
            w = _weights(mm, task)
            for path, unit in ref.units("ref"):
                skills = units[path].skills  # type: ignore[union-attr]
                unit.ia3_l.copy_(sum(w[s] * skills[s].ia3_l for s in range(3)))
            alone = ref.model(input_ids=ids[row : row + 1])[0]
        torch.testing.assert_close(mixed[row : row + 1], alone, atol=1e-5, rtol=0)


def test_lora_through_the_generic_path_equals_the_batched_kernel(bert: Family) -> None:
    """skill={"method": "lora", ...} (generic: per task, functional_call) and the built-in LoRA skills
    (per row, batched) with the same A, B and allocation give the same rows."""
    generic = _poly(bert, {"method": "lora", "r": 2, "alpha": 4, "targets": list(bert.targets)})
    kernel = modfit.wrap(bert.build())
    kernel.add("p", modfit.config("poly", tasks=TASKS, n_skills=3, r=2, alpha=4, targets=bert.targets))
    kernel.activate("p")
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        poly.router(generic, "p").raw_logits.copy_(torch.randn(3, 1, 3, generator=g))
        poly.router(kernel, "p").raw_logits.copy_(poly.router(generic, "p").raw_logits)
        mine = dict(generic.units("p"))
        for path, unit in kernel.units("p"):
            skills = mine[path].skills  # type: ignore[union-attr]
            for s, skill in enumerate(skills):
                skill.lora_A.copy_(torch.randn(skill.lora_A.shape, generator=g))
                skill.lora_B.copy_(torch.randn(skill.lora_B.shape, generator=g))
                unit.lora_A[s].copy_(skill.lora_A)
                unit.lora_B[s].copy_(skill.lora_B)
        inputs = bert.inputs()
        tasks = torch.tensor([1, 2])
        with routed({"task": tasks}):
            a = generic.model(**inputs)[0]
            b = kernel.model(**inputs)[0]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert (a - bert.build()(**inputs)[0]).abs().max() > 1e-3


@pytest.mark.parametrize(
    "skill",
    [IA3, {"method": "bitfit"}, {"method": "ln"}, {"method": "dora", "r": 2}],
    ids=lambda s: s["method"],
)
def test_new_module_is_identity_and_save_load_is_exact(bert: Family, tmp_path: Path, skill: Any) -> None:
    mm = _poly(bert, skill, head=True)
    inputs, tasks = bert.encoder_inputs(), torch.tensor([2, 0])
    base = bert.build()
    with torch.no_grad(), routed({"task": tasks}):
        torch.testing.assert_close(mm.model(**bert.inputs())[0], base(**bert.inputs())[0], atol=1e-6, rtol=0)
    if skill["method"] != "dora":  # DoRA's magnitude starts at ||W||: keep it
        _randomise(mm, "p")
    with torch.no_grad():
        before = mm(**inputs, task_ids=tasks).logits
    mm.save("p", tmp_path / "p")
    other = modfit.wrap(bert.build())
    other.load(tmp_path / "p")
    other.activate("p")
    loaded = other.records["p"].config
    assert loaded.skill is not None and loaded.skill.method == skill["method"]  # type: ignore[attr-defined]
    with torch.no_grad():
        after = other(**inputs, task_ids=tasks).logits
    assert torch.equal(before, after)


def test_training_reaches_skills_and_allocation_and_adapt_fixes_the_skills(bert: Family) -> None:
    mm = _poly(bert, IA3, head=True)
    params = mm.train_only("p")
    mm.model.train()
    out = mm(**bert.encoder_inputs(), task_ids=torch.tensor([0, 2]), labels=torch.tensor([0, 1]))
    out.loss.backward()
    ids = {id(p) for p in params}
    for name, p in mm.model.named_parameters():
        assert (p.grad is not None) == (id(p) in ids), name
    assert poly.router(mm, "p").raw_logits.grad is not None
    skill_grads = [s.ia3_l.grad for _, u in mm.units("p") for s in u.skills]  # type: ignore[union-attr]
    assert all(g is not None and g.abs().sum() > 0 for g in skill_grads)

    _randomise(mm, "p")
    poly.adapt(mm, "p", "new", ["d"], copy_head=False)
    mm.activate("new", head="p")
    trainable = mm.train_only("new")
    assert trainable == [poly.router(mm, "new").raw_logits]  # the skills are buffers now
    for (_, src), (_, unit) in zip(mm.units("p"), mm.units("new"), strict=True):
        assert isinstance(unit, PolySkillsUnit)
        for a, b in zip(src.skills, unit.skills, strict=True):  # type: ignore[union-attr]
            assert torch.equal(a.ia3_l, b.ia3_l)
    with torch.no_grad():
        mm.model.eval()
        new = mm(**bert.encoder_inputs()).logits  # one task: no route needed
    assert new.shape == (2, 2)


def test_cli_style_json_and_name(bert: Family) -> None:
    text = '{"method": "ia3", "targets": "key,value", "feedforward": []}'
    config = modfit.config("poly", tasks="a,b", skill=text)
    assert config.skill is not None and config.skill.method == "ia3"  # type: ignore[attr-defined]
    assert config.to_dict()["skill"]["targets"] == ["key", "value"]
    assert modfit.config("poly", skill="lora").skill is None  # the built-in LoRA skills
    assert modfit.config("poly", skill="bitfit").skill.method == "bitfit"  # type: ignore[attr-defined]


def test_refusals_say_why(bert: Family) -> None:
    mm = modfit.wrap(bert.build())
    with pytest.raises(ConfigError, match=r"Ia3InputUnit at .*cannot be averaged"):
        mm.add("p", modfit.config("poly", tasks=TASKS, skill="ia3"))  # default ia3 scales FFN inputs
    with pytest.raises(ConfigError, match=r"PromptUnit at .*cannot be averaged"):
        mm.add("q", modfit.config("poly", tasks=TASKS, skill="prompt"))
    with pytest.raises(ConfigError, match="MHR heads"):
        modfit.config("poly", skill="bitfit", n_splits=2)
    with pytest.raises(ConfigError, match="cannot be poly"):
        modfit.config("poly", skill="poly")
    with pytest.raises(ConfigError, match="not valid JSON"):
        modfit.config("poly", skill="{bad")
    assert "p" not in mm.records and "q" not in mm.records
