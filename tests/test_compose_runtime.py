"""Runtime composition: average, split, batchsplit, parallel and fuse evaluated at the sites, nested
over every kind of module (`compose/plan.py`, `methods/fusion.py`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import modfit
from conftest import FAMILIES
from modfit.composition import CompositionError
from modfit.methods.fusion import FusionUnit


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


def _ids(batch: int, length: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(3, 60, (batch, length), generator=g)}


def _hidden(model: torch.nn.Module, ids: dict[str, torch.Tensor]) -> torch.Tensor:
    if getattr(model.config, "is_encoder_decoder", False):
        ids = {**ids, "decoder_input_ids": ids["input_ids"][:, :3]}
    with torch.no_grad():
        out = model(**ids)
    return out.logits if hasattr(out, "logits") and out.logits is not None else out[0]


KINDS = {"lora": "lora", "pfeiffer": "pfeiffer", "ia3": "ia3", "houlsby": "houlsby", "compacter": "compacter"}


@pytest.mark.parametrize("family_name", ["bert", "gpt2", "llama", "distilbert"])
@pytest.mark.parametrize(("a", "b"), [("lora", "pfeiffer"), ("ia3", "lora"), ("houlsby", "ia3")])
def test_batchsplit_rows_equal_single_module_runs(family_name: str, a: str, b: str) -> None:
    model, mm = _model_with(family_name, {"a": KINDS[a], "b": KINDS[b]})
    ids = _ids(5)
    mm.activate("batchsplit(a, b, sizes=[2, 3])")
    mixed = _hidden(model, ids)
    mm.activate("a")
    alone_a = _hidden(model, {"input_ids": ids["input_ids"][:2]})
    mm.activate("b")
    alone_b = _hidden(model, {"input_ids": ids["input_ids"][2:]})
    torch.testing.assert_close(mixed, torch.cat([alone_a, alone_b]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("family_name", ["bert", "t5"])
def test_average_weights(family_name: str) -> None:
    """average(a, b, weights=[1, 0]) = a; for LoRA modules average = one LoRA with the mean delta."""
    model, mm = _model_with(family_name, {"a": "pfeiffer", "b": "houlsby"})
    ids = _ids(2)
    mm.activate("a")
    alone = _hidden(model, ids)
    mm.activate("average(a, b, weights=[1.0, 0.0])")
    torch.testing.assert_close(_hidden(model, ids), alone, rtol=0, atol=1e-6)

    model, mm = _model_with(family_name, {"a": "lora", "b": "lora"})
    mm.activate("average(a, b, weights=[0.25, 0.75])")
    averaged = _hidden(model, ids)
    mm.add("sum", modfit.config("lora", r=16))
    with torch.no_grad():  # one rank-16 LoRA holding 0.25·δa + 0.75·δb (same alpha/r scale: 8/8 vs 8/16)
        for (_, unit), (_, ua), (_, ub) in zip(mm.units("sum"), mm.units("a"), mm.units("b"), strict=True):
            unit.lora_A.copy_(torch.cat([ua.lora_A, ub.lora_A]))
            unit.lora_B.copy_(torch.cat([ua.lora_B * 0.25, ub.lora_B * 0.75], dim=1) * 2)
    mm.activate("sum")
    torch.testing.assert_close(_hidden(model, ids), averaged, rtol=0, atol=1e-5)


def test_split_along_the_sequence_at_one_site() -> None:
    """split(a, b, at=K) at a projection: positions < K get a's delta, the rest b's."""
    _model, mm = _model_with("bert", {"a": "lora", "b": "lora"})
    path = next(p for p, _ in mm.units("a"))
    site = mm.view.module(path)
    x = torch.randn(2, 6, site.in_features)
    mm.activate("a")
    with torch.no_grad():
        ya = site(x)
    mm.activate("b")
    with torch.no_grad():
        yb = site(x)
    mm.activate("split(a, b, at=4)")
    with torch.no_grad():
        y = site(x)
    # to float32 rounding: a or b alone computes its down-projection stacked with its sibling's
    # (methods/lora_shared.py), a product that sums in another order than the one-unit product
    torch.testing.assert_close(y, torch.cat([ya[:, :4], yb[:, 4:]], dim=1), rtol=0, atol=1e-6)


def test_parallel_head_mode_gives_each_branch_its_head() -> None:
    model = FAMILIES["bert"].build()
    mm = modfit.wrap(model)
    mm.add("a", modfit.config("pfeiffer"), head=modfit.head("seq-cls", ["x", "y"]))
    mm.add("b", modfit.config("lora"), head=modfit.head("seq-cls", ["p", "q", "r"]))
    _randomise(mm, "a", 1)
    _randomise(mm, "b", 2)
    mm.eval()
    ids = _ids(3)
    mask = torch.ones_like(ids["input_ids"])
    mm.activate("parallel(a, b)")
    with torch.no_grad():
        out = mm(input_ids=ids["input_ids"], attention_mask=mask)
    logits_a, logits_b = out.logits
    mm.activate("a")
    with torch.no_grad():
        torch.testing.assert_close(logits_a, mm(**ids, attention_mask=mask).logits, rtol=0, atol=1e-5)
    mm.activate("b")
    with torch.no_grad():
        torch.testing.assert_close(logits_b, mm(**ids, attention_mask=mask).logits, rtol=0, atol=1e-5)
    labels = [torch.tensor([0, 1, 0]), torch.tensor([2, 1, 0])]
    mm.activate("parallel(a, b)")
    with torch.no_grad():
        loss = mm(**ids, attention_mask=mask, labels=labels).loss
    assert loss is not None and torch.isfinite(loss)


# -- fusion ---------------------------------------------------------------------------------------


def _fused(family_name: str, kinds: list[str]) -> tuple[torch.nn.Module, modfit.ModularModel, list[str]]:
    names = [f"m{i}" for i in range(len(kinds))]
    model, mm = _model_with(family_name, dict(zip(names, kinds, strict=True)))
    mm.add("fu", modfit.config("fusion", children=names))
    return model, mm, names


@pytest.mark.parametrize("family_name", ["bert", "gpt2", "t5"])
@pytest.mark.parametrize(
    "kinds", [["pfeiffer", "pfeiffer", "pfeiffer"], ["lora", "houlsby"], ["ia3", "lora", "compacter"]]
)
def test_uniform_fusion_equals_the_average(family_name: str, kinds: list[str]) -> None:
    """With Q = 0 every weight is 1/n and V = identity: fuse(...) = average(...)."""
    model, mm, names = _fused(family_name, kinds)
    with torch.no_grad():
        for _, unit in mm.units("fu"):
            unit.query.weight.zero_()
            unit.query.bias.zero_()
    ids = _ids(2)
    mm.activate(f"fuse({', '.join(names)})")
    fused = _hidden(model, ids)
    mm.activate(f"average({', '.join(names)})")
    torch.testing.assert_close(fused, _hidden(model, ids), rtol=0, atol=1e-5)


def _explicit_fusion(unit: FusionUnit, h: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """The formula with a key and a value per branch; o: (n, batch, seq, width)."""
    scores = torch.einsum("blw,nblw->bln", unit.query(h), unit.key(o)) / unit.temperature
    return torch.einsum("bln,nblw->blw", torch.softmax(scores, dim=-1), unit.value(o))


def test_fusion_formula_at_one_site() -> None:
    _model, mm, names = _fused("bert", ["lora", "lora"])
    path, unit = next(iter(mm.units("fu")))
    with torch.no_grad():
        for layer in (unit.query, unit.key, unit.value):
            layer.weight.normal_(0, 0.3)
            layer.bias.normal_(0, 0.3)
    site = mm.view.module(path)
    x = torch.randn(2, 5, site.in_features)
    outs = []
    with torch.no_grad():
        mm.deactivate()
        h = site(x)
        for name in names:
            mm.activate(name)
            outs.append(site(x))
        expected = _explicit_fusion(unit, h, torch.stack(outs))  # branches first: (2, 2, 5, width)
        mm.activate("fuse(m0, m1)")
        torch.testing.assert_close(site(x), expected, rtol=0, atol=1e-5)


def test_fusion_unit_equals_the_explicit_keys_and_values_with_gradients() -> None:
    # FusionUnit.fuse skips the n keys and values (Kᵀq and V of the mixed outputs); the explicit
    # formula, keys and values per branch, must give the same output and the same gradients.
    torch.manual_seed(0)
    unit = FusionUnit(width=16, n=3, temperature=0.5).double()  # float64: the algebra, not roundoff
    with torch.no_grad():
        for layer in (unit.query, unit.key, unit.value):
            layer.weight.normal_(0, 0.3)
            layer.bias.normal_(0, 0.3)
    # 2 x 5 tokens take the per-token path (fewer tokens than width 16), 4 x 9 the folded Kᵀ Q
    for tokens in ((2, 5), (4, 9)):
        _check_fusion_unit(unit, tokens)


def test_fusion_fold_cached_in_inference_follows_every_weight_change() -> None:
    torch.manual_seed(0)
    unit = FusionUnit(width=16, n=3).double()
    h = torch.randn(4, 9, 16, dtype=torch.float64)  # 36 tokens > width: the folded path
    o = torch.randn(3, 4, 9, 16, dtype=torch.float64)
    with torch.no_grad():
        first = unit.fuse(h, o)
        assert unit._fold_cache is not None
        torch.testing.assert_close(unit.fuse(h, o), first, rtol=0, atol=0)  # from the cache
        unit.key.weight.add_(torch.randn(16, 16, dtype=torch.float64))  # in place, as an optimizer
        torch.testing.assert_close(unit.fuse(h, o), _explicit_fusion(unit, h, o), rtol=0, atol=1e-12)
        state = {k: torch.randn_like(v) for k, v in unit.state_dict().items()}
        unit.load_state_dict(state)
        torch.testing.assert_close(unit.fuse(h, o), _explicit_fusion(unit, h, o), rtol=0, atol=1e-12)
    unit.fuse(h, o)  # with autograd: computed afresh, so that gradients reach Q and K
    assert unit._fold_cache is None


def _check_fusion_unit(unit: FusionUnit, tokens: tuple[int, int]) -> None:
    h = torch.randn(*tokens, 16, dtype=torch.float64, requires_grad=True)
    o = torch.randn(3, *tokens, 16, dtype=torch.float64, requires_grad=True)  # (branches, batch, seq, width)
    cotangent = torch.randn(*tokens, 16, dtype=torch.float64)
    grads = []
    for explicit in (False, True):
        out = _explicit_fusion(unit, h, o) if explicit else unit.fuse(h, o)
        leaves = [h, o, *unit.parameters()]
        grads.append((out, torch.autograd.grad((out * cotangent).sum(), leaves)))
    (fast, fast_grads), (slow, slow_grads) = grads
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-12)
    for a, b in zip(fast_grads, slow_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "expression",
    [
        "stack(lang, fuse(m0, m1))",
        "fuse(stack(lang, m0), m1)",
        "stack(fuse(m0, m1), lang)",
        "average(fuse(m0, m1), lang)",
    ],
)
def test_nesting_and_train_only_the_fusion(expression: str) -> None:
    model, mm = _model_with("bert", {"lang": "pfeiffer", "m0": "lora", "m1": "houlsby"})
    fuse = next(c for c in modfit.parse(expression).walk() if isinstance(c, modfit.composition.Fuse))
    mm.add(
        "fu",
        modfit.config("fusion", children=[str(c) for c in fuse.children]),
        head=modfit.head("seq-cls", ["a", "b"]),
    )
    mm.activate(expression)
    assert "fu" in mm.active_names() and mm.head_name == "fu"
    params = mm.train_only("fu")
    assert mm.active == modfit.parse(expression)  # train_only kept the composition
    mm.train()
    ids = _ids(2)
    out = mm(**ids, attention_mask=torch.ones_like(ids["input_ids"]), labels=torch.tensor([0, 1]))
    out.loss.backward()
    owned = {id(p) for p in params}
    for name, p in model.named_parameters():
        if id(p) in owned:
            continue
        assert p.grad is None, f"{name} got a gradient"
    assert all(p.grad is not None for p in mm.module_parameters("fu", include_head=False))


def test_meaningless_nestings_say_why() -> None:
    _model, mm = _model_with("bert", {"a": "lora", "b": "lora", "p": "prefix"})
    with pytest.raises(CompositionError, match=r"cannot be one branch of average\(\).*stack it outside"):
        mm.activate("average(p, a)")
    with pytest.raises(CompositionError, match="has no fusion layers on this model"):
        mm.activate("fuse(a, b)")
    mm.activate("stack(p, average(a, b))")  # the prefix outside the average is fine
    mm.activate("a")
    mm.merge("a")
    with pytest.raises(CompositionError, match="'a' is merged into the weights"):
        mm.activate("average(a, b)")
    mm.unmerge("a")
    mm.activate("average(a, b)")
    with pytest.raises(ValueError, match="is a branch of average"):
        mm.merge("a")
    with pytest.raises(ValueError, match="sizes \\[1, 1\\] add up to 2, the batch has 3 rows"):
        mm.activate("batchsplit(a, b, sizes=[1, 1])")
        mm.model(**_ids(3))


def test_fusion_errors() -> None:
    _model, mm = _model_with("bert", {"a": "lora", "b": "lora"})
    with pytest.raises(modfit.ConfigError, match=r"fusion\.children: name at least 2"):
        modfit.config("fusion", children=["a"])
    with pytest.raises(ValueError, match="module 'c' is not on this model"):
        mm.add("fu", modfit.config("fusion", children=["a", "c"]))
    mm.add("f1", modfit.config("fusion", children=["a", "b"]))
    mm.add("f2", modfit.config("fusion", children=["a", "b"]))
    with pytest.raises(CompositionError, match="several fusion modules fit \\(f1, f2\\)"):
        mm.activate("fuse(a, b)")
    mm.activate("fuse(a, b, fusion=f2)")
    assert mm.active_names() == ["a", "b", "f2"]
    with pytest.raises(CompositionError, match="'a' is not a fusion module"):
        mm.activate("fuse(a, b, fusion=a)")
    with pytest.raises(CompositionError, match="was made for fuse\\(a, b\\)"):
        mm.activate("fuse(b, a, fusion=f1)")


def test_fusion_saves_loads_and_removes(tmp_path: Path) -> None:
    family = FAMILIES["bert"]
    model, mm, names = _fused("bert", ["pfeiffer", "lora"])
    _randomise(mm, "fu", 9)
    before = {k: v.clone() for k, v in FAMILIES["bert"].build().state_dict().items()}
    ids = _ids(2)
    mm.activate("fuse(m0, m1)")
    fused = _hidden(model, ids)
    for name in [*names, "fu"]:
        mm.save(name, tmp_path / name)
    card = (tmp_path / "fu" / "module.json").read_text()
    assert '"composition": "fuse(m0, m1)"' in card

    fresh = family.build()
    other = modfit.wrap(fresh)
    with pytest.raises(ValueError, match="module 'm0' is not on this model"):
        other.load(tmp_path / "fu")
    for name in [*names, "fu"]:
        other.load(tmp_path / name)
    other.activate("fuse(m0, m1)")
    torch.testing.assert_close(_hidden(fresh, ids), fused, rtol=0, atol=0)

    for name in ["fu", *names]:
        mm.remove(name)
    assert not hasattr(model, "modfit")
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
