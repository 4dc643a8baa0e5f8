"""Fixed per-example routing: `route(...)` (routing/fixed.py), its batched kernels (LoRA, (IA)³, bottleneck
adapters, prompt and prefix tuning), the generic path, and the routing context it reads (routing/context.py).

The reference for every mixed batch: each row run alone with its module active (or no module)."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch

import modfit
from conftest import FAMILIES
from modfit.composition import CompositionError, from_dict, parse
from modfit.methods.prompt import cache_keyword
from modfit.routing import FixedRoute, RouteError, current_route, route_ids, routed
from modfit.routing.fixed import RouteNode

VOCAB = 100


def _model(
    family: str, configs: dict[str, Any], seed: int = 0
) -> tuple[torch.nn.Module, modfit.ModularModel]:
    """A tiny model with modules of random weights (B of LoRA, up of adapters... all non-zero)."""
    model = FAMILIES[family].build()
    mm = modfit.wrap(model)
    for i, (name, config) in enumerate(configs.items()):
        mm.add(name, config)
        g = torch.Generator().manual_seed(seed * 1000 + i)
        with torch.no_grad():
            for p in mm.module_parameters(name):
                offset = 1.0 if config.method == "ia3" else 0.0  # scaling vectors around one
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 + offset)
    return model, mm


def _inputs(family: str, rows: int, length: int = 7, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1::3, -2:] = 0  # some right-padded rows
    out = {"input_ids": ids, "attention_mask": mask}
    if FAMILIES[family].kind == "seq2seq":
        out["decoder_input_ids"] = ids[:, :4]
    return out


def _run(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if getattr(out, "logits", None) is not None else out[0]


def _rows_alone(
    model: torch.nn.Module, mm: modfit.ModularModel, inputs: dict[str, torch.Tensor], route: list[str | None]
) -> torch.Tensor:
    """Every row run alone with its own module active (None: no module)."""
    outs = []
    for b, name in enumerate(route):
        if name is None:
            mm.deactivate()
        else:
            mm.activate(name)
        outs.append(_run(model, {k: v[b : b + 1] for k, v in inputs.items()}))
    return torch.cat(outs)


def _mixed(
    model: torch.nn.Module, mm: modfit.ModularModel, names: list[str], inputs: Any, route: list[Any]
) -> Any:
    mm.activate(f"route({', '.join(names)})")
    with routed(route):
        return _run(model, inputs)


def _kernels(mm: modfit.ModularModel) -> set[str]:
    """The batched kernels the active route runs at the sites ("generic" for the loop)."""
    found = set()
    for site in mm.container.all_sites():
        for item in site._active:
            if isinstance(item, RouteNode):
                found.add(item.kernel.__name__ if item.kernel is not None else "generic")
    return found


def _base(model: torch.nn.Module, mm: modfit.ModularModel, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    mm.deactivate()
    return _run(model, inputs)


# -- LoRA: the acceptance case ------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama", "t5"])
def test_lora_32_rows_over_16_modules_equal_single_module_runs(family: str) -> None:
    """Ranks 2/4/8 and different alphas (padded ranks, per-row scales); 32 rows over 16 modules."""
    targets = FAMILIES[family].targets
    configs = {
        f"m{i}": modfit.config("lora", r=(2, 4, 8)[i % 3], alpha=1.0 + i, targets=targets) for i in range(16)
    }
    model, mm = _model(family, configs)
    names = list(configs)
    inputs = _inputs(family, 32)
    route = [names[(5 * b) % 16] for b in range(32)]
    mixed = _mixed(model, mm, names, inputs, route)
    assert _kernels(mm) == {"LoraUnit"}
    # The mixed kernel sums in another order than one module alone: float32 roundoff, which T5's
    # unscaled attention scores (no 1/sqrt(d)) amplify over encoder and decoder: 1.0e-5 measured on
    # transformers 4.57.6, 1.3e-5 on 5.25.0, against about 1e-6 for the other families.
    atol = 3e-5 if family == "t5" else 1e-5
    torch.testing.assert_close(mixed, _rows_alone(model, mm, inputs, route), rtol=0, atol=atol)


def test_lora_rows_without_a_module_are_the_base_output_exactly() -> None:
    configs = {f"m{i}": modfit.config("lora", r=4) for i in range(3)}
    model, mm = _model("bert", configs)
    inputs = _inputs("bert", 6)
    route = ["m0", None, "m2", None, "m1", None]
    mixed = _mixed(model, mm, list(configs), inputs, route)
    base = _base(model, mm, inputs)
    assert torch.equal(mixed[1::2], base[1::2])
    torch.testing.assert_close(mixed, _rows_alone(model, mm, inputs, route), rtol=0, atol=1e-5)


def test_batched_lora_runs_no_per_module_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    """32 distinct modules in a batch of 32: one batched product per projection, no loop over modules."""
    from modfit.methods.lora import LoraUnit

    configs = {f"m{i}": modfit.config("lora", r=2) for i in range(32)}
    model, mm = _model("bert", configs)
    calls = {"forward": 0, "batched": 0}
    original = LoraUnit.batched.__func__  # type: ignore[attr-defined]

    def count_forward(self: LoraUnit, h: torch.Tensor, call: Any) -> torch.Tensor:
        calls["forward"] += 1
        raise AssertionError("a unit ran by itself")

    def count_batched(cls: type, *args: Any) -> torch.Tensor:
        calls["batched"] += 1
        return original(cls, *args)

    monkeypatch.setattr(LoraUnit, "forward", count_forward)
    monkeypatch.setattr(LoraUnit, "batched", classmethod(count_batched))
    _mixed(model, mm, list(configs), _inputs("bert", 32), list(configs))
    assert calls == {"forward": 0, "batched": 4}  # 2 layers x (query, value)


def test_lora_gradients_reach_each_module_from_its_rows_only() -> None:
    """Training through a mixed batch: each module's gradient is the sum of its rows' gradients."""
    configs = {f"m{i}": modfit.config("lora", r=2 + i) for i in range(3)}
    model, mm = _model("bert", configs)
    inputs = _inputs("bert", 5)
    route = ["m0", "m2", None, "m0", "m2"]
    weight = torch.randn(5, 7, 32, generator=torch.Generator().manual_seed(1))
    mm.activate("route(m0, m1, m2)")
    with routed(route):
        (model(**inputs)[0] * weight).sum().backward()
    mixed = {n: [p.grad.clone() for p in mm.module_parameters(n)] for n in configs}
    model.zero_grad()
    for b, name in enumerate(route):
        if name is None:
            continue
        mm.activate(name)
        out = model(**{k: v[b : b + 1] for k, v in inputs.items()})[0]
        (out * weight[b : b + 1]).sum().backward()
    for name in ("m0", "m2"):
        for got, want in zip(mixed[name], mm.module_parameters(name), strict=True):
            assert want.grad is not None
            torch.testing.assert_close(got, want.grad, rtol=1e-4, atol=1e-6)
    assert all(float(g.abs().max()) == 0 for g in mixed["m1"])  # routed nowhere


# -- (IA)³ and bottleneck adapters ----------------------------------------------------------------------


KIND_CONFIGS = {
    "ia3": lambda i: modfit.config("ia3"),
    "pfeiffer": lambda i: modfit.config("pfeiffer", reduction_factor=(2, 4, 8)[i % 3]),
    "houlsby": lambda i: modfit.config("houlsby", reduction_factor=(2, 4, 8)[i % 3]),
    "parallel": lambda i: modfit.config("parallel", reduction_factor=(2, 4)[i % 2], scaling=1.0 + i),
    "options": lambda i: modfit.config(
        "pfeiffer", ln_before=True, ln_after=True, use_gating=True, scaling=("learned", "channel")[i % 2]
    ),
}
KERNEL = {"ia3": {"Ia3InputUnit", "Ia3OutputUnit"}}


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama", "t5", "distilbert"])
@pytest.mark.parametrize("kind", sorted(KIND_CONFIGS))
def test_ia3_and_adapters_rows_equal_single_module_runs(family: str, kind: str) -> None:
    configs = {f"m{i}": KIND_CONFIGS[kind](i) for i in range(4)}
    model, mm = _model(family, configs)
    names = list(configs)
    inputs = _inputs(family, 9)
    route = ["m0", None, "m3", "m1", "m2", None, "m3", "m0", "m2"]
    mixed = _mixed(model, mm, names, inputs, route)
    assert _kernels(mm) == KERNEL.get(kind, {"BottleneckUnit"})
    base = _base(model, mm, inputs)
    assert torch.equal(mixed[[1, 5]], base[[1, 5]])  # no module: the base output, bit for bit
    torch.testing.assert_close(mixed, _rows_alone(model, mm, inputs, route), rtol=0, atol=1e-5)


def test_modules_of_different_kinds_in_one_route() -> None:
    """At each site the units present there are batched; a module absent at a site leaves its rows alone."""
    configs = {
        "l": modfit.config("lora"),
        "a": modfit.config("pfeiffer"),
        "i": modfit.config("ia3"),
        "c": modfit.config("compacter"),
    }
    model, mm = _model("bert", configs)
    inputs = _inputs("bert", 6)
    route = ["l", "a", None, "i", "c", "l"]
    mixed = _mixed(model, mm, list(configs), inputs, route)
    assert "generic" in _kernels(mm)  # compacter's PHM layers and the adapter share the FFN output site
    torch.testing.assert_close(mixed, _rows_alone(model, mm, inputs, route), rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_generic_path_for_units_without_kernel_and_for_expressions(family: str) -> None:
    """DoRA (a LoRA subclass: no inherited kernel), compacter, and a child that is an expression."""
    targets = FAMILIES[family].targets
    configs = {
        "d": modfit.config("dora", targets=targets),
        "c": modfit.config("compacter"),
        "x": modfit.config("pfeiffer"),
        "y": modfit.config("lora", targets=targets),
    }
    model, mm = _model(family, configs)
    inputs = _inputs(family, 5)
    mm.activate("route(d, c, stack(x, y))")
    with routed(["stack(x, y)", "d", None, "c", 0]):
        mixed = _run(model, inputs)
    assert _kernels(mm) == {"generic"}
    outs = []
    for b, expr in enumerate(["stack(x, y)", "d", None, "c", "d"]):
        if expr is None:
            mm.deactivate()
        else:
            mm.activate(expr)
        outs.append(_run(model, {k: v[b : b + 1] for k, v in inputs.items()}))
    torch.testing.assert_close(mixed, torch.cat(outs), rtol=0, atol=1e-5)


def test_route_in_a_stack_keeps_stage_order() -> None:
    """stack(shared adapter, route(loras)): the LoRA deltas first, then the adapter, as in a plain stack."""
    configs = {"s": modfit.config("pfeiffer"), "a": modfit.config("lora"), "b": modfit.config("lora")}
    model, mm = _model("bert", configs)
    inputs = _inputs("bert", 4)
    mm.activate("stack(s, route(a, b))")
    with routed(["a", "b", None, "a"]):
        mixed = _run(model, inputs)
    outs = []
    for b, expr in enumerate(["stack(s, a)", "stack(s, b)", "s", "stack(s, a)"]):
        mm.activate(expr)
        outs.append(_run(model, {k: v[b : b + 1] for k, v in inputs.items()}))
    torch.testing.assert_close(mixed, torch.cat(outs), rtol=0, atol=1e-5)


# -- prompt and prefix tuning -------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert", "gpt2", "llama", "t5"])
@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_virtual_tokens_per_row(family: str, method: str) -> None:
    """Each row its own prompt/prefix; rows without one equal the base (their virtual positions are hidden
    by the mask, so up to the attention kernel's rounding over a longer sequence)."""
    configs = {f"m{i}": modfit.config(method, num_virtual_tokens=3) for i in range(3)}
    model, mm = _model(family, configs)
    names = list(configs)
    inputs = _inputs(family, 6)
    route = ["m0", None, "m2", "m1", None, "m0"]
    mixed = _mixed(model, mm, names, inputs, route)
    assert _kernels(mm) and "generic" not in _kernels(mm)
    torch.testing.assert_close(mixed, _rows_alone(model, mm, inputs, route), rtol=0, atol=1e-5)
    torch.testing.assert_close(mixed[[1, 4]], _base(model, mm, inputs)[[1, 4]], rtol=0, atol=1e-5)
    # without padding transformers passes no mask to the attention: the route must build one
    unpadded = {**inputs, "attention_mask": torch.ones_like(inputs["attention_mask"])}
    mixed = _mixed(model, mm, names, unpadded, route)
    torch.testing.assert_close(mixed, _rows_alone(model, mm, unpadded, route), rtol=0, atol=1e-5)


def _decode(model: torch.nn.Module, ids: torch.Tensor, forced: torch.Tensor) -> torch.Tensor:
    """Last-position logits of a cached decoding loop that feeds `forced` one token at a time."""
    mask = torch.ones_like(ids)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
        logits, cache = [out.logits[:, -1]], out.past_key_values
        for t in range(forced.shape[1]):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out = model(
                input_ids=forced[:, t : t + 1],
                attention_mask=mask,
                **{cache_keyword(model): cache},
                use_cache=True,
            )
            logits.append(out.logits[:, -1])
            cache = out.past_key_values
    return torch.stack(logits, dim=1)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_prefix_generation_steps_per_row(family: str) -> None:
    """The cache holds each row's prefix; rows without one keep their positions at every step."""
    configs = {f"m{i}": modfit.config("prefix", num_virtual_tokens=3) for i in range(2)}
    model, mm = _model(family, configs)
    g = torch.Generator().manual_seed(3)
    ids, forced = torch.randint(3, VOCAB, (3, 5), generator=g), torch.randint(3, VOCAB, (3, 3), generator=g)
    route = ["m1", None, "m0"]
    mm.activate("route(m0, m1)")
    with routed(route):
        mixed = _decode(model, ids, forced)
    for b, name in enumerate(route):
        mm.activate(name) if name is not None else mm.deactivate()
        alone = _decode(model, ids[b : b + 1], forced[b : b + 1])
        torch.testing.assert_close(mixed[b : b + 1], alone, rtol=0, atol=1e-5)


def test_prompt_generation_without_a_prompt_in_some_rows_is_refused() -> None:
    configs = {f"m{i}": modfit.config("prompt", num_virtual_tokens=2) for i in range(2)}
    model, mm = _model("gpt2", configs)
    ids = torch.randint(3, VOCAB, (2, 4))
    mm.activate("route(m0, m1)")
    with routed(["m0", "m1"]):  # every row with a prompt: fine
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False)
    with routed(["m0", None]), pytest.raises(ValueError, match="cannot mix rows with and without a prompt"):
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False)


def test_virtual_tokens_of_different_sizes_are_refused_with_the_reason() -> None:
    configs = {
        "p2": modfit.config("prompt", num_virtual_tokens=2),
        "p3": modfit.config("prompt", num_virtual_tokens=3),
    }
    _, mm = _model("bert", configs)
    with pytest.raises(CompositionError, match="same num_virtual_tokens"):
        mm.activate("route(p2, p3)")
    assert mm.active is None  # nothing changed


# -- the two ways in, head mode, and the operator itself ------------------------------------------------


def test_mm_route_argument_and_routed_block_agree() -> None:
    model = FAMILIES["bert"].build()
    mm = modfit.wrap(model)
    mm.add("a", modfit.config("lora"), head=modfit.head("seq-cls", ["x", "y"]))
    mm.add("b", modfit.config("lora"))
    for seed, name in enumerate(("a", "b")):
        with torch.no_grad():
            for p in mm.module_parameters(name, include_head=False):
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)) * 0.3)
    mm.eval()
    inputs = _inputs("bert", 4)
    mm.activate("route(a, b)")
    assert mm.head_name == "a"
    with torch.no_grad():
        out = mm(**inputs, route=["a", "b", None, "b"])
        with routed(["a", "b", None, "b"]):
            hidden = model(**inputs)[0]
    torch.testing.assert_close(out.hidden_states, hidden, rtol=0, atol=0)
    assert out.logits.shape == (4, 2)
    assert current_route() is None  # nothing stays behind


def test_key_option_routes_by_task_ids() -> None:
    configs = {"t0": modfit.config("lora"), "t1": modfit.config("ia3")}
    model, mm = _model("bert", configs)
    inputs = _inputs("bert", 4)
    mm.activate("route(t0, t1, key=task)")
    with routed({"task": torch.tensor([1, 0, -1, 1])}):
        mixed = _run(model, inputs)
    torch.testing.assert_close(
        mixed, _rows_alone(model, mm, inputs, ["t1", "t0", None, "t1"]), rtol=0, atol=1e-5
    )
    mm.activate("route(t0, t1, key=task)")
    with routed({"task": ["t1", "t0", None, "t1"]}):  # names work for any key
        torch.testing.assert_close(_run(model, inputs), mixed, rtol=0, atol=0)


def test_operator_text_and_json_round_trip() -> None:
    expr = parse("route(a, stack(b, c), key=language)")
    assert isinstance(expr, FixedRoute)
    assert str(expr) == "route(a, stack(b, c), key=language)"
    assert from_dict(expr.to_dict()) == expr
    assert expr.child_names() == ["a", "stack(b, c)"]
    assert str(parse("route(a)")) == "route(a)"
    with pytest.raises(CompositionError, match="appears twice"):
        parse("route(a, a)").names()


# -- errors -------------------------------------------------------------------------------------------


def test_route_errors_name_the_problem() -> None:
    configs = {"a": modfit.config("lora"), "b": modfit.config("lora")}
    model, mm = _model("bert", configs)
    inputs = _inputs("bert", 3)
    mm.activate("route(a, b)")
    with pytest.raises(RouteError, match=r"needs per-example 'module' routing \(route keys given: none\)"):
        _run(model, inputs)
    with routed(["a", "zz", "b"]), pytest.raises(RouteError, match="unknown name 'zz'; known: a, b"):
        _run(model, inputs)
    with routed(["a", "b"]), pytest.raises(RouteError, match="has 2 entries for a batch of 3 rows"):
        _run(model, inputs)
    with routed([0, 2, 1]), pytest.raises(RouteError, match=r"id 2 is out of range for route\(a, b\)"):
        _run(model, inputs)
    with routed({"task": [0, 1, 0]}), pytest.raises(RouteError, match="route keys given: task"):
        _run(model, inputs)
    with pytest.raises(CompositionError, match="unknown module 'c'"):
        mm.activate("route(a, c)")


# -- interplay with row-splitting compositions -----------------------------------------------------------


def test_route_inside_batchsplit_and_parallel_reads_its_own_rows() -> None:
    configs = {"a": modfit.config("lora"), "b": modfit.config("lora"), "c": modfit.config("pfeiffer")}
    model, mm = _model("bert", configs)
    inputs = _inputs("bert", 5)
    mm.activate("batchsplit(route(a, b), c, sizes=[3, 2])")
    route = ["b", None, "a", "c", "c"]  # rows 3, 4 belong to the second branch: their entries are not read
    with routed(route):
        mixed = _run(model, inputs)
    torch.testing.assert_close(mixed, _rows_alone(model, mm, inputs, route), rtol=0, atol=1e-5)

    mm.activate("parallel(route(a, b), c)")
    with routed(["a", "b", None, "a", "b"]), torch.no_grad():  # the model repeats the route with the batch
        both = model(**{k: v.repeat(2, 1) for k, v in inputs.items()})[0]
    torch.testing.assert_close(
        both[:5], _rows_alone(model, mm, inputs, ["a", "b", None, "a", "b"]), rtol=0, atol=1e-5
    )


# -- the routing context ---------------------------------------------------------------------------------


def test_route_ids_from_names_ints_none_and_tensors() -> None:
    with routed(["x", None, 1, "y"]):
        ids = route_ids("module", 4, names=["x", "y"])
        assert ids is not None and ids.tolist() == [0, -1, 1, 1]
    with routed({"task": torch.tensor([[2], [0]])}):
        ids = route_ids("task", 2)
        assert ids is not None and ids.dtype == torch.long and ids.tolist() == [2, 0]
        assert route_ids("language", 2, required=False) is None
    with routed(["x"]), pytest.raises(RouteError, match="gives a name"):
        route_ids("module", 1)
    with routed([1.5]), pytest.raises(RouteError, match="expected names, ints or None"):
        route_ids("module", 1)


def test_routed_resets_after_an_exception_and_per_thread() -> None:
    assert current_route() is None
    with pytest.raises(KeyError), routed(["a"]):
        assert current_route() == {"module": ["a"]}
        raise KeyError("boom")
    assert current_route() is None
    seen: list[Any] = []
    with routed(["main"]):
        worker = threading.Thread(target=lambda: seen.append(current_route()))
        worker.start()
        worker.join()
        with routed({"task": [1]}):  # nested blocks restore the outer route
            assert current_route() == {"task": [1]}
        assert current_route() == {"module": ["main"]}
    assert seen == [None]  # another thread sees none


def test_narrowed_and_repeated_routes() -> None:
    from modfit.routing.context import narrowed, repeated

    route = {"module": ["a", "b", "c", "d"], "task": torch.tensor([0, 1, 2, 3]), "scalar": 7}
    part = narrowed(route, 1, 2, 4)
    assert part is not None and part["module"] == ["b", "c"] and part["task"].tolist() == [1, 2]
    assert part["scalar"] == 7
    twice = repeated(route, 2)
    assert twice is not None and twice["module"] == ["a", "b", "c", "d"] * 2
    assert twice["task"].tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
