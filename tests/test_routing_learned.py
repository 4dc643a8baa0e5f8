"""Learned routing: the router method and moe(...) (`routing/router.py`, `routing/moe.py`,
`methods/router.py`): the formulas on hand-made tensors, the mixture at the sites, training,
saving, and the entropy/usage reported by the training loop."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

import modfit
from conftest import FAMILIES
from modfit.composition import CompositionError
from modfit.routing.router import (
    RouterUnit,
    gumbel_sigmoid_st,
    gumbel_softmax_st,
    load_balance_loss,
    mean_probs,
    routing_entropy,
    temperature_at,
    top_k_weights,
    usage,
)
from modfit.train import TrainSettings, train

# -- formulas ------------------------------------------------------------------------------------


def test_top_k_keeps_exactly_k_and_renormalises() -> None:
    probs = torch.tensor([[0.1, 0.4, 0.2, 0.3], [0.26, 0.24, 0.3, 0.2]])
    kept = top_k_weights(probs, 2)
    assert ((kept != 0).sum(dim=-1) == 2).all()
    torch.testing.assert_close(
        kept, torch.tensor([[0.0, 4 / 7, 0.0, 3 / 7], [0.26 / 0.56, 0.0, 0.3 / 0.56, 0.0]])
    )
    torch.testing.assert_close(kept.sum(dim=-1), torch.ones(2))
    raw = top_k_weights(probs, 1, renormalize=False)  # Switch top-1: the probability itself
    torch.testing.assert_close(raw, torch.tensor([[0.0, 0.4, 0.0, 0.0], [0.0, 0.0, 0.3, 0.0]]))
    logits = torch.randn(5, 7, 6, requires_grad=True)
    kept = top_k_weights(torch.softmax(logits, dim=-1), 3)
    assert ((kept != 0).sum(dim=-1) == 3).all()
    (kept * torch.randn(6)).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_load_balance_loss_is_the_switch_formula() -> None:
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.5, 0.3, 0.2], [0.2, 0.2, 0.6]])
    assigned = torch.nn.functional.one_hot(probs.argmax(-1), 3).float()  # modules 0, 1, 0, 2
    f = torch.tensor([2 / 4, 1 / 4, 1 / 4])
    p = probs.mean(dim=0)  # (0.375, 0.325, 0.3)
    expected = 3 * (f * p).sum()
    torch.testing.assert_close(load_balance_loss(probs, assigned), expected)
    assert float(expected) == pytest.approx(3 * (0.5 * 0.375 + 0.25 * 0.325 + 0.25 * 0.3))
    # uniform routing: the minimum, 1
    uniform = torch.full((6, 4), 0.25)
    spread = torch.eye(4)[torch.tensor([0, 1, 2, 3, 0, 1])][:4]
    assert float(load_balance_loss(uniform[:4], spread)) == pytest.approx(1.0)
    # everything on one module with certainty: n
    certain = torch.tensor([[1.0, 0.0, 0.0]] * 5)
    assert float(load_balance_loss(certain, certain)) == pytest.approx(3.0)
    # a mask drops rows (padding) from f and P; top-k rows count 1/k per kept module
    mask = torch.tensor([1, 1, 0, 1])
    kept = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0], [1.0, 0.0, 1.0], [1.0, 0.0, 1.0]])
    f = torch.tensor([1.0, 1.0, 1.0]) / 3  # rows 0, 1, 3: (.5+0+.5, .5+.5+0, 0+.5+.5) / 3
    p = probs[[0, 1, 3]].mean(dim=0)
    torch.testing.assert_close(usage(kept, mask), f)
    torch.testing.assert_close(mean_probs(probs, mask), p)
    torch.testing.assert_close(load_balance_loss(probs, kept, mask), 3 * (f * p).sum())
    # the gradient flows through P only
    logits = torch.randn(8, 3, requires_grad=True)
    soft = torch.softmax(logits, dim=-1)
    load_balance_loss(soft, torch.nn.functional.one_hot(soft.argmax(-1), 3).float()).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_entropy_and_usage() -> None:
    assert float(routing_entropy(torch.full((3, 4), 0.25))) == pytest.approx(math.log(4))
    assert float(routing_entropy(torch.eye(3))) == pytest.approx(0.0, abs=1e-6)
    probs = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    assert float(routing_entropy(probs, torch.tensor([1, 0]))) == pytest.approx(math.log(2))
    assert float(routing_entropy(probs)) == pytest.approx(math.log(2) / 2)
    torch.testing.assert_close(
        usage(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])), torch.tensor([2 / 3, 1 / 3])
    )


@pytest.mark.parametrize("sampler", [gumbel_softmax_st, gumbel_sigmoid_st])
def test_gumbel_straight_through_is_hard_forward_and_differentiable(sampler: Any) -> None:
    torch.manual_seed(0)
    logits = torch.randn(64, 5, requires_grad=True)
    weights, hard = sampler(logits, 0.5)
    assert set(weights.detach().unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(weights.detach(), hard, rtol=0, atol=1e-6)
    if sampler is gumbel_softmax_st:
        assert (hard.sum(dim=-1) == 1).all()  # one-hot rows
    (weights * torch.randn(5)).sum().backward()
    assert logits.grad is not None and (logits.grad != 0).float().mean() > 0.5


def test_gumbel_samples_follow_the_router_distribution() -> None:
    """argmax(z + g) ~ softmax(z); the binary form switches gate i on with probability sigmoid(z_i)."""
    torch.manual_seed(1)
    z = torch.tensor([1.0, 0.0, -1.0])
    _, hard = gumbel_softmax_st(z.expand(20000, 3), 0.3)
    torch.testing.assert_close(hard.mean(dim=0), torch.softmax(z, dim=0), rtol=0, atol=0.02)
    _, gates = gumbel_sigmoid_st(z.expand(20000, 3), 0.3)
    torch.testing.assert_close(gates.mean(dim=0), torch.sigmoid(z), rtol=0, atol=0.02)


def test_temperature_schedule() -> None:
    def at(step: int, *args: Any) -> float:
        return float(temperature_at(step, *args))

    assert at(0, 1.0, 0.1, 10) == pytest.approx(1.0)
    assert at(5, 1.0, 0.1, 10) == pytest.approx(math.sqrt(0.1))  # geometric: 1 * 0.1 ** 0.5
    assert at(10, 1.0, 0.1, 10) == pytest.approx(0.1)
    assert at(50, 1.0, 0.1, 10) == pytest.approx(0.1)  # constant afterwards
    assert at(5, 1.0, 0.2, 10, "linear") == pytest.approx(0.6)
    assert at(2, 2.0, 1.0, 8, "linear") == pytest.approx(1.75)
    assert at(7, 0.5) == pytest.approx(0.5)  # no final temperature: constant
    assert at(7, 0.5, 0.1, 0) == pytest.approx(0.5)  # no anneal steps: constant


def test_router_unit_counts_training_passes_and_anneals() -> None:
    unit = RouterUnit(
        8, ("a", "b"), mode="gumbel_softmax", temperature=2.0, final_temperature=0.5, anneal_steps=2
    )
    h = torch.randn(2, 3, 8)
    unit.eval()
    unit.route(h)
    assert int(unit.step) == 0 and float(unit.temperature) == pytest.approx(2.0)
    unit.train()
    with torch.no_grad():  # no gradient: not a training pass
        unit.route(h)
    assert int(unit.step) == 0
    unit.route(h)
    assert float(unit.temperature) == pytest.approx(1.0)
    unit.route(h)
    unit.route(h)
    assert int(unit.step) == 3 and float(unit.temperature) == pytest.approx(0.5)
    assert unit.metrics()["temperature"] == pytest.approx(0.5)


# -- the mixture at the sites ---------------------------------------------------------------------


def _randomise(mm: modfit.ModularModel, name: str, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in mm.module_parameters(name, include_head=False):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _model_with(family_name: str, methods: dict[str, str]) -> tuple[torch.nn.Module, modfit.ModularModel]:
    model = FAMILIES[family_name].build()
    mm = modfit.wrap(model)
    for seed, (name, method) in enumerate(methods.items(), start=1):
        mm.add(name, modfit.config(method))
        _randomise(mm, name, seed)
    return model, mm


def _ids(batch: int, length: int = 7, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(3, 60, (batch, length), generator=g)}


def _hidden(model: torch.nn.Module, ids: dict[str, torch.Tensor]) -> torch.Tensor:
    if getattr(model.config, "is_encoder_decoder", False):
        ids = {**ids, "decoder_input_ids": ids["input_ids"][:, :3]}
    with torch.no_grad():
        out = model(**ids)
    return out.logits if hasattr(out, "logits") and out.logits is not None else out[0]


def _set_router(mm: modfit.ModularModel, name: str, bias: list[float] | None = None) -> None:
    """Zero the router's weights: fixed logits (equal, or `bias`) at every site and token."""
    with torch.no_grad():
        for _, unit in mm.units(name):
            unit.gate.weight.zero_()
            unit.gate.bias.copy_(torch.tensor(bias) if bias is not None else torch.zeros_like(unit.gate.bias))


@pytest.mark.parametrize("family_name", ["bert", "gpt2", "t5"])
@pytest.mark.parametrize("level", ["token", "example"])
@pytest.mark.parametrize("kinds", [["lora", "pfeiffer", "ia3"], ["houlsby", "lora"]])
def test_equal_logits_give_the_average(family_name: str, level: str, kinds: list[str]) -> None:
    names = [f"m{i}" for i in range(len(kinds))]
    model, mm = _model_with(family_name, dict(zip(names, kinds, strict=True)))
    mm.add("r", modfit.config("router", children=names, level=level))
    _set_router(mm, "r")
    ids = _ids(3)
    mm.activate(f"moe({', '.join(names)})")
    mixed = _hidden(model, ids)
    mm.activate(f"average({', '.join(names)})")
    torch.testing.assert_close(mixed, _hidden(model, ids), rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", ["top_k", "gumbel_softmax"])
def test_a_certain_router_equals_the_chosen_module(mode: str) -> None:
    model, mm = _model_with("bert", {"a": "lora", "b": "pfeiffer", "c": "ia3"})
    params = {"k": 1, "renormalize": False} if mode == "top_k" else {}
    mm.add("r", modfit.config("router", children=["a", "b", "c"], mode=mode, **params))
    _set_router(mm, "r", [0.0, 30.0, 0.0])  # softmax weight of b: 1 - 2e-13
    ids = _ids(2)
    mm.activate("moe(a, b, c)")
    routed = _hidden(model, ids)
    mm.activate("b")
    torch.testing.assert_close(routed, _hidden(model, ids), rtol=0, atol=1e-5)


def test_gumbel_sigmoid_gates_average_the_modules_on_and_keep_h_when_none_is() -> None:
    model, mm = _model_with("bert", {"a": "pfeiffer", "b": "houlsby", "c": "lora"})
    mm.add("r", modfit.config("router", children=["a", "b", "c"], mode="gumbel_sigmoid"))
    ids = _ids(2)
    mm.activate("moe(a, b, c)")
    _set_router(mm, "r", [-1.0, -2.0, -3.0])  # evaluation: gates z > 0, none on
    off = _hidden(model, ids)
    _set_router(mm, "r", [1.0, -2.0, 3.0])  # a and c on: their mean
    on = _hidden(model, ids)
    mm.deactivate()
    torch.testing.assert_close(off, _hidden(model, ids), rtol=0, atol=1e-6)
    mm.activate("average(a, c)")
    torch.testing.assert_close(on, _hidden(model, ids), rtol=0, atol=1e-5)


def test_token_level_formula_at_one_site() -> None:
    _model, mm = _model_with("bert", {"a": "lora", "b": "lora"})
    mm.add("r", modfit.config("router", children=["a", "b"], mode="top_k", k=2, temperature=0.7))
    path, unit = next(iter(mm.units("r")))
    with torch.no_grad():
        unit.gate.weight.normal_(0, 1.0)
    site = mm.view.module(path)
    x = torch.randn(2, 5, site.in_features)
    with torch.no_grad():
        mm.deactivate()
        h = site(x)
        outs = []
        for name in ("a", "b"):
            mm.activate(name)
            outs.append(site(x))
        z = unit.gate(torch.nn.functional.layer_norm(h, (h.shape[-1],)))
        w = torch.softmax(z / 0.7, dim=-1)  # (2, 5, 2): top-2 of 2 is the softmax itself
        expected = w[..., :1] * outs[0] + w[..., 1:] * outs[1]
        mm.activate("moe(a, b)")
        torch.testing.assert_close(site(x), expected, rtol=0, atol=1e-5)


def test_example_level_pools_over_real_tokens_only() -> None:
    """mm(...) puts the attention mask in the routing context: a row routes the same, padded or not."""
    model = FAMILIES["bert"].build()
    mm = modfit.wrap(model)
    for seed, name in enumerate(["a", "b"], start=1):
        mm.add(name, modfit.config("pfeiffer"))
        _randomise(mm, name, seed)
    mm.add(
        "r",
        modfit.config("router", children=["a", "b"], level="example"),
        head=modfit.head("seq-cls", ["x", "y"]),
    )
    _randomise(mm, "r", 3)
    mm.activate("moe(a, b)")
    mm.eval()
    ids = _ids(2, length=9)["input_ids"]
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    with torch.no_grad():
        both = mm(input_ids=ids, attention_mask=mask).logits
        alone = mm(input_ids=ids[1:, :5], attention_mask=mask[1:, :5]).logits
    torch.testing.assert_close(both[1:], alone, rtol=0, atol=1e-5)


def test_unchosen_modules_are_not_run_at_inference() -> None:
    model, mm = _model_with("bert", {"a": "pfeiffer", "b": "houlsby"})
    mm.add(
        "r",
        modfit.config("router", children=["a", "b"], level="example", mode="top_k", k=1, renormalize=False),
    )
    _set_router(mm, "r", [5.0, 0.0])
    calls = []
    for _, unit in mm.units("b"):
        unit.register_forward_hook(lambda *_: calls.append(1))
    mm.activate("moe(a, b)")
    _hidden(model, _ids(3))
    assert not calls
    _set_router(mm, "r", [0.0, 5.0])
    _hidden(model, _ids(3))
    assert calls


# -- training, the loss, saving ---------------------------------------------------------------------


def _labelled(mm: modfit.ModularModel, batch: int = 4) -> dict[str, torch.Tensor]:
    ids = _ids(batch)["input_ids"]
    mask = torch.ones_like(ids)
    mask[-1, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.arange(batch) % 2}


def test_load_balance_enters_the_training_loss_once_per_site() -> None:
    _model, mm = _model_with("bert", {"a": "lora", "b": "pfeiffer"})
    mm.add(
        "r",
        modfit.config("router", children=["a", "b"], load_balance=0.25),
        head=modfit.head("seq-cls", ["x", "y"], dropout=0.0),
    )
    _set_router(mm, "r")  # uniform P; argmax ties all go to a: f = (1, 0), L = 2 * 1 * 1/2 = 1 per site
    mm.activate("moe(a, b)")
    batch = _labelled(mm)
    mm.eval()
    with torch.no_grad():
        plain = mm(**batch).loss
    mm.train()
    with torch.no_grad():
        assert mm(**batch).loss == pytest.approx(float(plain))  # no gradient: no training pass, no term
    loss = mm(**batch).loss
    sites = len(list(mm.units("r")))
    assert float(loss.detach() - plain) == pytest.approx(0.25 * sites, rel=1e-5)
    assert mm.regularization() is None  # handed out once


def test_train_only_the_router_trains_only_the_router() -> None:
    model, mm = _model_with("bert", {"a": "lora", "b": "houlsby", "c": "ia3"})
    mm.add(
        "r",
        modfit.config("router", children=["a", "b", "c"], mode="gumbel_softmax", load_balance=0.01),
        head=modfit.head("seq-cls", ["x", "y"]),
    )
    mm.activate("moe(a, b, c)")
    params = mm.train_only("r")
    assert mm.active == modfit.parse("moe(a, b, c)") and mm.head_name == "r"
    mm.train()
    mm(**_labelled(mm)).loss.backward()
    owned = {id(p) for p in params}
    for name, p in model.named_parameters():
        if id(p) not in owned:
            assert p.grad is None, f"{name} got a gradient"
    router = mm.module_parameters("r", include_head=False)
    assert router and all(p.grad is not None and p.grad.abs().sum() > 0 for p in router)
    assert {id(p) for p in router} <= owned


@pytest.mark.parametrize(
    "expression",
    [
        "stack(lang, moe(m0, m1))",
        "moe(stack(lang, m0), m1)",
        "average(moe(m0, m1), lang)",
        "split(moe(m0, m1), lang, at=3)",
    ],
)
def test_nesting(expression: str) -> None:
    """moe(...) nests like the other operators; its router trains alone inside any of them."""
    _model, mm = _model_with("bert", {"lang": "pfeiffer", "m0": "lora", "m1": "houlsby"})
    node = next(c for c in modfit.parse(expression).walk() if c.op == "moe")
    mm.add(
        "r",
        modfit.config("router", children=[str(c) for c in node.children], mode="gumbel_sigmoid"),
        head=modfit.head("seq-cls", ["x", "y"]),
    )
    mm.activate(expression)
    assert mm.head_name == "r"
    mm.train_only("r")
    assert mm.active == modfit.parse(expression)
    mm.train()
    mm(**_labelled(mm)).loss.backward()
    assert all(p.grad is not None for p in mm.module_parameters("r", include_head=False))
    assert set(mm.unit_metrics()) == {
        "r.entropy",
        f"r.usage.{node.children[0]}",
        f"r.usage.{node.children[1]}",
    }


@pytest.mark.parametrize("family_name", ["bert", "llama"])
def test_router_saves_loads_and_removes(family_name: str, tmp_path: Path) -> None:
    before = {k: v.clone() for k, v in FAMILIES[family_name].build().state_dict().items()}
    model, mm = _model_with(family_name, {"a": "lora", "b": "pfeiffer"})
    config = modfit.config(
        "router", children=["a", "b"], level="example", mode="top_k", k=1, renormalize=False, temperature=0.5
    )
    mm.add("r", config)
    _randomise(mm, "r", 7)
    with torch.no_grad():
        for _, unit in mm.units("r"):
            unit.step.fill_(12)
    ids = _ids(3)
    mm.activate("moe(a, b)")
    routed = _hidden(model, ids)
    for name in ("a", "b", "r"):
        mm.save(name, tmp_path / name)
    assert '"composition": "moe(a, b)"' in (tmp_path / "r" / "module.json").read_text()

    fresh = FAMILIES[family_name].build()
    other = modfit.wrap(fresh)
    with pytest.raises(ValueError, match="module 'a' is not on this model"):
        other.load(tmp_path / "r")
    for name in ("a", "b", "r"):
        other.load(tmp_path / name)
    assert other.records["r"].config == config
    assert all(int(unit.step) == 12 for _, unit in other.units("r"))
    other.activate("moe(a, b)")
    torch.testing.assert_close(_hidden(fresh, ids), routed, rtol=0, atol=0)

    for name in ("r", "a", "b"):
        mm.remove(name)
    assert not hasattr(model, "modfit")
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


def test_training_reports_entropy_and_usage_and_shows_collapse() -> None:
    model = FAMILIES["bert"].build()
    mm = modfit.wrap(model)
    for seed, name in enumerate(["a", "b"], start=1):
        mm.add(name, modfit.config("lora"))
        _randomise(mm, name, seed)
    mm.add(
        "r",
        modfit.config("router", children=["a", "b"], mode="top_k", k=1, renormalize=False, load_balance=0.01),
        head=modfit.head("seq-cls", ["x", "y"]),
    )
    mm.activate("moe(a, b)")
    g = torch.Generator().manual_seed(0)
    features = [
        {"input_ids": torch.randint(3, 60, (6,), generator=g).tolist(), "label": i % 2} for i in range(16)
    ]

    def collate(batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids = torch.tensor([f["input_ids"] for f in batch])
        return {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "labels": torch.tensor([f["label"] for f in batch]),
        }

    settings = TrainSettings(steps=4, lr=1e-2, batch_size=4, log_every=2, progress=False)
    result = train(mm, "r", features, collate_fn=collate, settings=settings, eval_features=features[:4])
    assert [e["step"] for e in result.history] == [2, 4]
    for entry in result.history:
        assert 0 <= entry["r.entropy"] <= math.log(2) + 1e-6
        assert entry["r.usage.a"] + entry["r.usage.b"] == pytest.approx(1.0)

    _set_router(mm, "r", [0.0, 20.0])  # collapse: everything to b
    with torch.no_grad():
        for _, unit in mm.units("r"):
            unit.gate.bias.requires_grad_(False)
            unit.gate.weight.requires_grad_(False)
    result = train(
        mm,
        "r",
        features,
        collate_fn=collate,
        settings=TrainSettings(steps=2, lr=1e-9, batch_size=4, progress=False),
    )
    last = result.history[-1]
    assert last["r.usage.b"] == pytest.approx(1.0) and last["r.usage.a"] == pytest.approx(0.0)
    assert last["r.entropy"] < 1e-6
    assert mm.unit_metrics() == {}  # read by the loop


# -- errors -----------------------------------------------------------------------------------------


def test_config_and_composition_errors() -> None:
    _model, mm = _model_with("bert", {"a": "lora", "b": "lora"})
    with pytest.raises(modfit.ConfigError, match=r"router\.children: name at least 2"):
        modfit.config("router", children=["a"])
    with pytest.raises(modfit.ConfigError, match=r"router\.k: must be in \[1, 2\]"):
        modfit.config("router", children=["a", "b"], mode="top_k", k=3)
    with pytest.raises(modfit.ConfigError, match=r"router\.renormalize: .*no gradient"):
        modfit.config("router", children=["a", "b"], mode="top_k", k=1)
    with pytest.raises(modfit.ConfigError, match=r"router\.mode"):
        modfit.config("router", children=["a", "b"], mode="sparse")
    with pytest.raises(modfit.ConfigError, match=r"router\.final_temperature"):
        modfit.config("router", children=["a", "b"], final_temperature=0)
    with pytest.raises(ValueError, match="module 'c' is not on this model"):
        mm.add("r", modfit.config("router", children=["a", "c"]))
    with pytest.raises(CompositionError, match="has no router layers on this model"):
        mm.activate("moe(a, b)")
    mm.add("r1", modfit.config("router", children=["a", "b"]))
    mm.add("r2", modfit.config("router", children=["a", "b"], mode="gumbel_softmax"))
    with pytest.raises(CompositionError, match=r"several router modules fit \(r1, r2\)"):
        mm.activate("moe(a, b)")
    mm.activate("moe(a, b, router=r2)")
    assert mm.active_names() == ["a", "b", "r2"]
    assert str(modfit.parse("moe(a, b, router=r2)")) == "moe(a, b, router=r2)"
    with pytest.raises(CompositionError, match="was made for moe\\(a, b\\)"):
        mm.activate("moe(b, a, router=r1)")
    mm.add("f", modfit.config("fusion", children=["a", "b"]))
    with pytest.raises(CompositionError, match="'f' is not a router module"):
        mm.activate("moe(a, b, router=f)")
