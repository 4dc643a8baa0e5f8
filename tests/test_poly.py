"""Polytropon / MHR (`methods/poly.py`): the mixing formula on hand-made tensors, the relaxed-Bernoulli
sample shared by the sites of one pass, rows routed by task, save/load, train_only, the dual-speed
learning rate, few-shot adaptation (`adapt`) and new task rows (`add_task`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
from safetensors.torch import load_file

import modfit
from modfit.methods import poly
from modfit.methods.poly import PolyRouter, PolyUnit
from modfit.model import ModularModel
from modfit.persistence import WEIGHTS
from modfit.routing import RouteError, routed
from modfit.sites import SiteCall

if TYPE_CHECKING:
    from conftest import Family

LABELS = ("no", "yes")
TASKS = ("a", "b", "c")


@pytest.fixture
def bert(tiny: Callable[[str], Family]) -> Family:
    return tiny("bert")


def _unit(in_f: int, out_f: int, r: int, skills: int, heads: int, logits: torch.Tensor) -> PolyUnit:
    """A unit with random skills (B non-zero) and the given allocation logits (T, h, S), in eval mode."""
    router = PolyRouter(tuple(f"t{i}" for i in range(logits.shape[0])), skills, heads, 1.0, 10.0)
    unit = PolyUnit(in_f, out_f, r, 2.0 * r, skills, heads, router, own_router=True)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        unit.lora_A.copy_(torch.randn(unit.lora_A.shape, generator=g))
        unit.lora_B.copy_(torch.randn(unit.lora_B.shape, generator=g))
        router.raw_logits.copy_(logits / router.lr_scale)
    return unit.eval()


def _call(unit: PolyUnit, x: torch.Tensor, tasks: list[int]) -> torch.Tensor:
    h = torch.zeros(*x.shape[:-1], unit.out_features)
    with routed({"task": torch.tensor(tasks)}):
        return unit(h, SiteCall(inputs=(x,), residual=None, norm=None, base=torch.nn.Identity()))


# -- the formula -----------------------------------------------------------------------------------


def test_polytropon_mixes_parameters_then_multiplies() -> None:
    """Row of task t: h = s · x A_tᵀ B_tᵀ with A_t = Σ_s w_ts A_s, w_t = σ(ẑ_t) / Σ σ(ẑ_t) (eval)."""
    logits = torch.tensor([[[2.0, -1.0, 0.5]], [[-3.0, 1.0, 1.0]]])  # (T=2, h=1, S=3)
    unit = _unit(4, 6, 2, 3, 1, logits)
    x = torch.randn(2, 5, 4)
    out = _call(unit, x, [1, 0])
    for row, task in enumerate([1, 0]):
        z = torch.sigmoid(logits[task, 0])
        w = z / z.sum()
        a = sum(w[s] * unit.lora_A[s] for s in range(3))  # (r, in)
        b = sum(w[s] * unit.lora_B[s] for s in range(3))  # (out, r)
        expected = unit.scale * x[row] @ a.t() @ b.t()  # (seq, out)
        torch.testing.assert_close(out[row], expected)


def test_mhr_heads_mix_blocks_of_a_inputs_and_b_outputs() -> None:
    """h = 2: head k mixes A's input-feature block k and B's output-feature block k with its own row."""
    logits = torch.tensor([[[1.0, -2.0, 0.0], [-1.0, 0.5, 3.0]]])  # (T=1, h=2, S=3)
    unit = _unit(4, 6, 2, 3, 2, logits)
    x = torch.randn(1, 3, 4)
    out = _call(unit, x, [0])
    a = torch.zeros(2, 4)
    b = torch.zeros(6, 2)
    for k, (ins, outs) in enumerate([(slice(0, 2), slice(0, 3)), (slice(2, 4), slice(3, 6))]):
        z = torch.sigmoid(logits[0, k])
        w = z / z.sum()
        for s in range(3):
            a[:, ins] += w[s] * unit.lora_A[s][:, ins].detach()
            b[outs, :] += w[s] * unit.lora_B[s][outs, :].detach()
    torch.testing.assert_close(out[0], unit.scale * x[0] @ a.t() @ b.t())


def test_training_samples_relaxed_bernoulli_once_per_pass() -> None:
    """Training: z = σ((ẑ + log u − log(1−u)) / τ), the same u at every site of one pass (one route
    object), a new u in the next pass."""
    logits = torch.tensor([[[0.3, -0.2, 1.0, 0.0]]])
    router = PolyRouter(("t",), 4, 1, 0.5, 10.0)
    with torch.no_grad():
        router.raw_logits.copy_(logits / 10.0)
    router.train()
    ids = torch.tensor([0, 0])
    torch.manual_seed(3)
    with routed({"task": ids}):
        first = router.weights(ids)
        again = router.weights(ids)  # another site of the same pass
    torch.manual_seed(3)
    u = torch.rand(2, 1, 4).clamp(1e-6, 1 - 1e-6)
    z = torch.sigmoid((logits[[0, 0]] + torch.log(u) - torch.log1p(-u)) / 0.5)
    torch.testing.assert_close(first, z / z.sum(-1, keepdim=True))
    assert torch.equal(first, again)
    assert not torch.allclose(first[0], first[1])  # one sample per example
    with routed({"task": ids}):
        assert not torch.allclose(router.weights(ids), first)  # the next pass draws again
    router.eval()
    z = torch.sigmoid(logits[0, 0])
    torch.testing.assert_close(router.weights(ids)[0, 0], z / z.sum())


def test_no_task_rows_get_no_delta() -> None:
    unit = _unit(4, 6, 2, 3, 1, torch.zeros(2, 1, 3))
    out = _call(unit, torch.randn(3, 2, 4), [0, -1, 1])
    assert torch.equal(out[1], torch.zeros(2, 6))
    assert out[0].abs().max() > 0


# -- on a model ------------------------------------------------------------------------------------


def _poly_model(family: Family, **options: object) -> ModularModel:
    mm = modfit.wrap(family.build())
    config = modfit.config("poly", tasks=TASKS, n_skills=3, r=4, targets=family.targets, **options)
    mm.add("p", config, head=modfit.head("seq-cls", LABELS))
    _randomise(mm, "p")
    mm.activate("p")
    return mm


@torch.no_grad()
def _randomise(mm: ModularModel, name: str) -> None:
    g = torch.Generator().manual_seed(1)
    for p in mm.module_parameters(name, include_head=False):
        p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
def test_mixed_task_batch_rows_equal_rows_alone(tiny: Callable[[str], Family], name: str) -> None:
    family = tiny(name)
    mm = _poly_model(family)
    model = mm.model
    base_model = family.build()
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 100, (5, 6), generator=g)
    tasks = [2, 0, -1, 1, 2]
    with torch.no_grad():
        with routed({"task": torch.tensor(tasks)}):
            mixed = model(input_ids=ids)[0]
        base = base_model(input_ids=ids)[0]
        for row, task in enumerate(tasks):
            with routed({"task": [TASKS[task] if task >= 0 else None]}):  # names work too
                alone = model(input_ids=ids[row : row + 1])[0]
            torch.testing.assert_close(mixed[row : row + 1], alone, atol=1e-5, rtol=0)
        assert torch.equal(mixed[2], base[2])  # the row without a task: the base model exactly
        assert (mixed[0] - base[0]).abs().max() > 1e-3


def test_head_mode_takes_task_ids(bert: Family) -> None:
    mm = _poly_model(bert)
    inputs = bert.encoder_inputs()
    with torch.no_grad():
        a = mm(**inputs, task_ids=torch.tensor([0, 1])).logits
        b = mm(**inputs, route={"task": ["a", "b"]}).logits
        c = mm(**inputs, task_ids=torch.tensor([1, 1])).logits
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a[0], c[0])


def test_route_errors_name_the_tasks(bert: Family) -> None:
    mm = _poly_model(bert)
    inputs = bert.encoder_inputs()
    with pytest.raises(RouteError, match=r"poly \(tasks: a, b, c\).*'task' routing.*task_ids"):
        mm(**inputs)
    with pytest.raises(RouteError, match=r"id 3 is out of range; valid ids are 0\.\.2"):
        mm(**inputs, task_ids=torch.tensor([0, 3]))
    with pytest.raises(RouteError, match="unknown name 'z'; known: a, b, c"):
        mm(**inputs, route={"task": ["a", "z"]})


def test_one_task_needs_no_route(bert: Family) -> None:
    mm = modfit.wrap(bert.build())
    mm.add("p", modfit.config("poly", n_skills=2, r=2), head=modfit.head("seq-cls", LABELS))
    _randomise(mm, "p")
    mm.activate("p")
    with torch.no_grad():
        plain = mm(**bert.encoder_inputs()).logits
        routed_ = mm(**bert.encoder_inputs(), task_ids=torch.tensor([0, 0])).logits
    assert torch.equal(plain, routed_)


def test_save_load_identical_and_allocation_stored_once(bert: Family, tmp_path: Path) -> None:
    mm = _poly_model(bert, n_splits=2)
    inputs, tasks = bert.encoder_inputs(), torch.tensor([2, 0])
    with torch.no_grad():
        before = mm(**inputs, task_ids=tasks).logits
    mm.save("p", tmp_path / "p")
    keys = list(load_file(str(tmp_path / "p" / WEIGHTS)))
    assert sum(k.endswith("router.raw_logits") for k in keys) == 1
    other = modfit.wrap(bert.build())
    other.load(tmp_path / "p")
    other.activate("p")
    with torch.no_grad():
        after = other(**inputs, task_ids=tasks).logits
    assert torch.equal(before, after)
    assert poly.router(other, "p").tasks == TASKS
    assert poly.allocation(other, "p").shape == (3, 2, 3)


def test_train_only_trains_skills_allocation_and_head(bert: Family) -> None:
    mm = _poly_model(bert)
    mm.add("other", modfit.config("lora", r=2, targets=bert.targets))
    params = mm.train_only("p")
    count = sum(p.numel() for p in params)
    # 2 layers x 2 projections x S·r·(in + out) + T·S + the head (32·32 + 32 + 32·2 + 2)
    assert count == 4 * 3 * 4 * 64 + 3 * 3 + (32 * 32 + 32 + 64 + 2)
    mm.model.train()
    out = mm(**bert.encoder_inputs(), task_ids=torch.tensor([0, 2]), labels=torch.tensor([0, 1]))
    out.loss.backward()
    ids = {id(p) for p in params}
    for name, p in mm.model.named_parameters():
        assert (p.grad is not None) == (id(p) in ids), name
    assert poly.router(mm, "p").raw_logits.grad is not None


def test_allocation_learns_router_lr_scale_times_faster(bert: Family) -> None:
    """One AdamW step of lr: every trained entry moves by about lr, so the logits ẑ = scale · raw
    move by about scale · lr while the skills move by lr."""
    lr = 1e-3
    for scale in (1.0, 30.0):
        mm = _poly_model(bert, router_lr_scale=scale)
        params = mm.train_only("p")
        router = poly.router(mm, "p")
        with torch.no_grad():  # logits near 0: no saturated sigmoid, every entry gets a gradient
            router.raw_logits.copy_(torch.randn(router.raw_logits.shape) * 0.1 / scale)
        unit = next(u for _, u in mm.units("p"))
        logits, skill = router.logits.detach().clone(), unit.lora_B.detach().clone()
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        mm.model.train()
        mm(
            **bert.encoder_inputs(), task_ids=torch.tensor([0, 1]), labels=torch.tensor([0, 1])
        ).loss.backward()
        optimizer.step()
        moved = (router.logits.detach() - logits).abs()
        rows = moved[:2]  # tasks 0 and 1 were in the batch; task 2 got no gradient
        torch.testing.assert_close(rows, torch.full_like(rows, scale * lr), rtol=1e-2, atol=0)
        assert torch.equal(moved[2], torch.zeros_like(moved[2]))
        skill_moved = (unit.lora_B.detach() - skill).abs()
        assert skill_moved.max() == pytest.approx(lr, rel=1e-2)


# -- few-shot adaptation and new tasks ---------------------------------------------------------------


def test_adapt_copies_skills_and_trains_only_the_new_allocation(bert: Family) -> None:
    mm = _poly_model(bert)
    poly.adapt(mm, "p", "new", ["d"])
    assert mm.records["new"].config.tasks == ("d",)  # type: ignore[attr-defined]
    for (_, src), (_, dst) in zip(mm.units("p"), mm.units("new"), strict=True):
        assert torch.equal(src.lora_A, dst.lora_A) and torch.equal(src.lora_B, dst.lora_B)
        assert not isinstance(dst.lora_A, torch.nn.Parameter)  # fixed: a buffer
    params = mm.train_only("new")
    assert {id(p) for p in params} == {
        id(p) for p in [poly.router(mm, "new").raw_logits, *mm.head_module("new").parameters()]
    }
    # the new task's row set to the source's task "b" row: the same outputs as "b" on the source
    with torch.no_grad():
        poly.router(mm, "new").raw_logits.copy_(poly.router(mm, "p").raw_logits[1:2])
    inputs = bert.encoder_inputs()
    with torch.no_grad():
        mm.activate("new")
        adapted = mm(**inputs).logits  # one task: no route needed
        mm.activate("p")
        source = mm(**inputs, task_ids=torch.tensor([1, 1])).logits
    torch.testing.assert_close(adapted, source)
    # head=source instead of a copy: the source head runs, and stays frozen
    poly.adapt(mm, "p", "bare", ["d"], copy_head=False)
    mm.activate("bare", head="p")
    params = mm.train_only("bare")
    assert [id(p) for p in params] == [id(poly.router(mm, "bare").raw_logits)]
    assert mm.head_name == "p"


def test_adapt_with_skills_trains_them(bert: Family) -> None:
    mm = _poly_model(bert)
    poly.adapt(mm, "p", "new", ["d", "e"], train_skills=True)
    unit = next(u for _, u in mm.units("new"))
    assert isinstance(unit.lora_A, torch.nn.Parameter)
    assert mm.trainable_parameters("new") == mm.trainable_parameters("p") - 3 * 3 + 2 * 3


def test_add_task_grows_the_allocation(bert: Family, tmp_path: Path) -> None:
    mm = _poly_model(bert)
    inputs = bert.encoder_inputs()
    with torch.no_grad():
        before = mm(**inputs, task_ids=torch.tensor([0, 2])).logits
    assert poly.add_task(mm, "p", "d") == 3
    assert mm.records["p"].config.tasks == (*TASKS, "d")  # type: ignore[attr-defined]
    with torch.no_grad():
        assert torch.equal(mm(**inputs, task_ids=torch.tensor([0, 2])).logits, before)
        new = mm(**inputs, route={"task": ["d", "d"]}).logits
    mm.save("p", tmp_path / "p")
    other = modfit.wrap(bert.build())
    other.load(tmp_path / "p")
    other.activate("p")
    with torch.no_grad():
        assert torch.equal(other(**inputs, route={"task": ["d", "d"]}).logits, new)
    with pytest.raises(modfit.ConfigError, match="already has a task 'a'"):
        poly.add_task(mm, "p", "a")


def test_config_errors(bert: Family) -> None:
    with pytest.raises(modfit.ConfigError, match=r"poly\.tasks: duplicate task names \['a'\]"):
        modfit.config("poly", tasks="a,b,a")
    with pytest.raises(modfit.ConfigError, match=r"poly\.router_lr_scale"):
        modfit.config("poly", router_lr_scale=0)
    mm = modfit.wrap(bert.build())
    with pytest.raises(
        modfit.TargetError, match=r"poly.n_splits: 3 heads do not divide .*query \(32 -> 32\)"
    ):
        mm.add("p", modfit.config("poly", n_splits=3))
    mm.add("l", modfit.config("lora"))
    with pytest.raises(modfit.ConfigError, match="module 'l' is a lora module, not poly"):
        poly.adapt(mm, "l", "x", ["t"])
