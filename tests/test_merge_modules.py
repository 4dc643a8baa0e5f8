"""Merging modules (`compose/merge_modules.py`, `svd.py`, `fisher.py`) on a tiny BERT: a merge equals
applying the merged deltas; LoRA via dense deltas and SVD (exact at full rank); sums of sparse diffs;
parameter averaging for adapters; the refusals; full models that plain transformers loads; heads;
the Fisher against per-example gradients by hand."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

import modfit
from modfit.compose import (
    MergeError,
    compute_fisher,
    merge_into_model,
    merge_modules,
    module_deltas,
    read_fisher,
    save_fisher,
)
from modfit.compose.fisher import Fisher, FisherFileError
from modfit.compose.svd import lora_factors, numerical_rank
from modfit.methods.sft import sparse_diff
from modfit.model import ModularModel
from train_fixtures import SEQ_LABELS, collate_fn, seq_cls_features, tiny_bert

IDS = torch.tensor([[1, 5, 9, 13, 2, 7], [1, 14, 6, 2, 0, 0]])
MASK = (IDS != 0).long()


def randomise(mm: ModularModel, name: str, seed: int, scale: float = 0.1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in mm.module_parameters(name, include_head=False):
            p.add_(torch.randn(p.shape, generator=g) * scale)


def add(mm: ModularModel, name: str, method: str, draw: int, head: bool = False, **params: Any) -> None:
    """Add a module with random (non-zero) parameters drawn with seed `draw`."""
    labels = modfit.head("seq-cls", SEQ_LABELS, dropout=0.0) if head else None
    mm.add(name, modfit.config(method, **params), head=labels)
    randomise(mm, name, draw)


def hidden(mm: ModularModel, composition: str) -> torch.Tensor:
    mm.activate(composition)
    with torch.no_grad():
        return mm.model(input_ids=IDS, attention_mask=MASK)[0]


@pytest.fixture
def mm() -> ModularModel:
    return modfit.wrap(tiny_bert())


def close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-6) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=atol) for k in a)


# -- task vectors of modules --------------------------------------------------------------------------


def test_module_deltas_are_the_changes_of_the_base_parameters(mm: ModularModel) -> None:
    add(mm, "a", "lora", 1, r=2)
    add(mm, "i", "ia3", 2)
    deltas = module_deltas(mm, "a")
    assert set(deltas) == {
        f"encoder.layer.{i}.attention.self.{p}.weight" for i in (0, 1) for p in ("query", "value")
    }
    for path, unit in mm.units("a"):
        assert torch.allclose(deltas[f"{path}.weight"], unit.lora_B @ unit.lora_A * unit.scale)
    # (IA)³ implements only merge: its change is read off a stand-in, the base is not touched
    before = {k: v.clone() for k, v in mm.model.state_dict().items()}
    ia3 = module_deltas(mm, "i")
    assert all(torch.equal(v, mm.model.state_dict()[k]) for k, v in before.items())
    mm.merge("i")
    for key, delta in ia3.items():
        path, param = key.rsplit(".", 1)
        assert torch.allclose(
            before[f"{path}.{param}"] + delta, getattr(mm.view.module(path), param), atol=1e-6
        )


def test_merged_lora_equals_applying_both_deltas(mm: ModularModel, tmp_path: Path) -> None:
    add(mm, "a", "lora", 1, r=2)
    add(mm, "b", "lora", 2, r=3, targets="query,key")
    result = merge_modules(mm, ["a", "b"], "ab", method="task_arithmetic")
    assert (result.method, result.route) == ("lora", "deltas")
    assert mm.records["ab"].config.r == 5  # rank(Δa + Δb) <= 2 + 3: kept exactly
    assert torch.allclose(hidden(mm, "ab"), hidden(mm, "stack(a, b)"), atol=1e-5)
    # the same merge folded into a full model, loaded by plain transformers
    merge_into_model(mm, ["a", "b"], tmp_path / "full", method="task_arithmetic")
    plain = transformers.AutoModel.from_pretrained(tmp_path / "full").eval()
    with torch.no_grad():
        loaded = plain(input_ids=IDS, attention_mask=MASK)[0]
    assert torch.allclose(loaded, hidden(mm, "stack(a, b)"), atol=1e-5)
    assert not any("modfit" in k for k in plain.state_dict())


def test_linear_lora_merge_averages_deltas_not_factors(mm: ModularModel) -> None:
    add(mm, "a", "lora", 1, r=2)
    add(mm, "b", "lora", 2, r=2)
    merge_modules(mm, ["a", "b"], "avg", weights=[1, 3])
    da, db = module_deltas(mm, "a"), module_deltas(mm, "b")
    assert close(module_deltas(mm, "avg"), {k: (da[k] + 3 * db[k]) / 4 for k in da}, atol=1e-6)


def test_svd_factors_exact_at_full_rank_and_best_below() -> None:
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(12, 3, generator=g) @ torch.randn(3, 9, generator=g)  # rank 3
    assert numerical_rank(delta) == 3
    b, a = lora_factors(delta, 3)
    assert b.shape == (12, 3) and a.shape == (3, 9)
    assert torch.allclose(b @ a, delta, atol=1e-5)
    b, a = lora_factors(delta, 5)  # more rank than needed: zero columns, still exact
    assert torch.allclose(b @ a, delta, atol=1e-5)
    b, a = lora_factors(delta, 1)
    s = torch.linalg.svdvals(delta)
    assert torch.allclose(
        torch.linalg.norm(delta - b @ a), s[1:].square().sum().sqrt(), rtol=1e-4
    )  # Eckart–Young


def test_lora_rerank_to_a_lower_rank(mm: ModularModel) -> None:
    add(mm, "a", "lora", 1, r=2)
    add(mm, "b", "lora", 2, r=2)
    merge_modules(mm, ["a", "b"], "r1", method="task_arithmetic", to="lora", rank=1)
    assert mm.records["r1"].config.r == 1
    da, db, got = module_deltas(mm, "a"), module_deltas(mm, "b"), module_deltas(mm, "r1")
    for key in da:
        b, a = lora_factors(da[key] + db[key], 1)
        assert torch.allclose(got[key], b @ a, atol=1e-6)


# -- sparse diffs, same-structure parameters ------------------------------------------------------------


def test_sum_of_sparse_diffs(mm: ModularModel) -> None:
    add(mm, "s1", "sft", 1, selection="random", k=300, seed=1)
    add(mm, "s2", "sft", 2, selection="random", k=200, seed=2)
    result = merge_modules(mm, ["s1", "s2"], "s12", method="task_arithmetic")
    assert (result.method, result.route) == ("sft", "deltas")  # different entries: via the deltas
    total = sparse_diff(mm, "s1") + sparse_diff(mm, "s2")
    merged = sparse_diff(mm, "s12")
    assert merged.numel == total.numel  # the union of the entries
    for path, entries in total.entries.items():
        assert torch.equal(merged.entries[path].indices.long(), entries.indices.long())
        assert torch.allclose(merged.entries[path].values, entries.values)
    assert torch.allclose(hidden(mm, "s12"), hidden(mm, "stack(s1, s2)"), atol=1e-5)


def test_same_structure_merges_parameters(mm: ModularModel) -> None:
    add(mm, "s1", "sft", 1, selection="random", k=300, seed=7)
    add(mm, "s2", "sft", 2, selection="random", k=300, seed=7)  # the same entries
    result = merge_modules(mm, ["s1", "s2"], "s12", weights=[1, 3])
    assert (result.method, result.route) == ("sft", "parameters")
    for (_, u1), (_, u2), (_, u) in zip(mm.units("s1"), mm.units("s2"), mm.units("s12"), strict=True):
        assert torch.equal(u.indices, u1.indices)
        assert torch.allclose(u.values, (u1.values + 3 * u2.values) / 4)
    add(mm, "b1", "bitfit", 3)
    add(mm, "b2", "bitfit", 4)
    assert merge_modules(mm, ["b1", "b2"], "b12", method="ties", density=0.5).route == "parameters"


def test_adapters_average_parameters_only(mm: ModularModel) -> None:
    add(mm, "p1", "pfeiffer", 1)
    add(mm, "p2", "pfeiffer", 2)
    result = merge_modules(mm, ["p1", "p2"], "pp")
    assert (result.method, result.route) == ("pfeiffer", "parameters")
    params = [dict(mm.units(n)) for n in ("p1", "p2", "pp")]
    for path in params[0]:
        for (k, a), (_, b), (_, m) in zip(
            params[0][path].named_parameters(),
            params[1][path].named_parameters(),
            params[2][path].named_parameters(),
            strict=True,
        ):
            assert torch.allclose(m, (a + b) / 2), k
    with pytest.raises(MergeError, match="no task vector, so ties does not apply; only parameter averaging"):
        merge_modules(mm, ["p1", "p2"], "x", method="ties")


# -- refusals ------------------------------------------------------------------------------------------


def test_refusals_name_the_module_unit_and_site(mm: ModularModel) -> None:
    add(mm, "p", "pfeiffer", 1)
    add(mm, "a", "lora", 2, r=2)
    add(mm, "b", "bitfit", 3)
    add(mm, "d1", "dora", 4, r=2)
    add(mm, "d2", "dora", 5, r=2)
    with pytest.raises(MergeError, match=r"different methods \(lora, pfeiffer\): choose the form"):
        merge_modules(mm, ["p", "a"], "x")
    with pytest.raises(
        MergeError, match=r"module 'p' \(pfeiffer\): its BottleneckUnit at encoder\.layer\.0\.output\.dropout"
    ):
        merge_modules(mm, ["p", "a"], "x", to="lora")
    with pytest.raises(MergeError, match=r"changes bias of encoder\.layer\.0\.attention\.self\.query"):
        merge_modules(mm, ["a", "b"], "x", to="lora")
    with pytest.raises(MergeError, match="not linear in their parameters"):
        merge_modules(mm, ["d1", "d2"], "x")
    assert merge_modules(mm, ["d1", "d2"], "dd", to="lora").method == "lora"  # DoRA via its dense deltas
    with pytest.raises(MergeError, match="named twice"):
        merge_modules(mm, ["a", "a"], "x")
    with pytest.raises(MergeError, match="rank applies to LoRA results only"):
        merge_modules(mm, ["a", "b"], "x", to="sft", rank=2)
    mm.merge("a")
    with pytest.raises(MergeError, match="module 'a' is merged into the base weights"):
        merge_modules(mm, ["a"], "x")
    assert "x" not in mm.records


def test_mixed_methods_into_sft(mm: ModularModel) -> None:
    add(mm, "a", "lora", 1, r=2)
    add(mm, "s", "sft", 2, selection="random", k=100)
    merge_modules(mm, ["a", "s"], "as", method="task_arithmetic", to="sft")
    da, ds = module_deltas(mm, "a"), module_deltas(mm, "s")
    expected = {k: da.get(k, 0) + ds.get(k, 0) for k in {*da, *ds}}
    assert close(module_deltas(mm, "as"), expected)


# -- full models: add then negate ------------------------------------------------------------------


def test_add_then_negate_restores_the_base_exactly(mm: ModularModel, tmp_path: Path) -> None:
    add(mm, "a", "lora", 1, r=2)
    mm.save("a", tmp_path / "a")
    mm.load(tmp_path / "a", name="a_again")
    merge_into_model(mm, ["a", "a_again"], tmp_path / "full", method="task_arithmetic", weights=[1, -1])
    plain = transformers.AutoModel.from_pretrained(tmp_path / "full")
    base = tiny_bert().state_dict()
    assert all(torch.equal(v, base[k]) for k, v in plain.state_dict().items())


# -- heads -----------------------------------------------------------------------------------------


def test_heads(mm: ModularModel) -> None:
    add(mm, "a", "lora", 1, head=True, r=2)
    add(mm, "b", "lora", 2, head=True, r=2)
    add(mm, "c", "lora", 3, r=2)
    with torch.no_grad():
        for p in mm.head_module("b").parameters():  # type: ignore[union-attr]
            p.add_(1.0)
    state = {n: mm.head_module(n).state_dict() for n in ("a", "b")}  # type: ignore[union-attr]
    merge_modules(mm, ["c", "b", "a"], "first")
    assert all(torch.equal(v, state["b"][k]) for k, v in mm.head_module("first").state_dict().items())  # type: ignore[union-attr]
    merge_modules(mm, ["a", "b"], "avg", head="average")
    got = mm.head_module("avg").state_dict()  # type: ignore[union-attr]
    assert all(torch.allclose(got[k], (state["a"][k] + state["b"][k]) / 2) for k in got)
    merge_modules(mm, ["a", "b"], "none", head=None)
    assert mm.records["none"].head is None
    with pytest.raises(MergeError, match="needs a head on every module"):
        merge_modules(mm, ["a", "c"], "x", head="average")


# -- the Fisher ------------------------------------------------------------------------------------


def _by_hand(
    mm: ModularModel, name: str, features: list[dict[str, Any]], params: dict[str, torch.Tensor]
) -> dict:
    """(1/N) Σ_n (∂ log p(y_n | x_n) / ∂θ)² with the gold labels, one example at a time."""
    sums = {k: torch.zeros_like(v) for k, v in params.items()}
    for p in mm.model.parameters():
        p.requires_grad_(False)
    for v in params.values():
        v.requires_grad_(True)
    for feature in features:
        batch = collate_fn([feature])
        logits = mm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loglik = torch.log_softmax(logits, -1)[0, batch["labels"][0]]
        grads = torch.autograd.grad(loglik, list(params.values()))
        for k, g in zip(params, grads, strict=True):
            sums[k] += g**2
    for v in params.values():
        v.requires_grad_(False)
    return {k: v / len(features) for k, v in sums.items()}


def test_fisher_is_the_mean_squared_gradient_of_the_log_likelihood(mm: ModularModel, tmp_path: Path) -> None:
    add(mm, "a", "lora", 1, head=True, r=2)
    features = seq_cls_features(5)
    before = {k: v.clone() for k, v in mm.model.state_dict().items()}
    fisher = compute_fisher(mm, "a", features, collate_fn=collate_fn, target="label")
    assert all(torch.equal(v, mm.model.state_dict()[k]) for k, v in before.items())  # bit for bit
    assert mm.active is None  # activation restored
    mm.activate("a")
    units = {f"{p}.{k}": v for p, u in mm.units("a") for k, v in u.named_parameters()}
    assert close(fisher.units, _by_hand(mm, "a", features, units), atol=1e-7)
    # deltas: w.r.t. the base weights with the module merged; base: the same weights without it
    keys = list(module_deltas(mm, "a"))
    weights = {k: mm.view.module(k.rsplit(".", 1)[0]).weight for k in keys}
    mm.merge("a")
    assert close(fisher.deltas, _by_hand(mm, "a", features, weights), atol=1e-7)
    mm.unmerge("a")
    mm.deactivate()
    mm.records["a"].merged = True  # units off, head on: the base with the module's head
    mm.activate("a")
    assert close(fisher.base, _by_hand(mm, "a", features, weights), atol=1e-7)
    mm.records["a"].merged = False
    # files: written and read back, stale ones refused
    save_fisher(fisher, tmp_path)
    again = read_fisher(tmp_path)
    assert close(again.units, fisher.units, atol=0) and again.metadata["target"] == "label"
    with pytest.raises(FisherFileError, match=r"no fisher\.safetensors"):
        read_fisher(tmp_path / "elsewhere")


def test_sampled_fisher_is_seeded_and_needs_no_labels(mm: ModularModel) -> None:
    add(mm, "a", "lora", 1, head=True, r=2)
    features = [{k: v for k, v in f.items() if k != "labels"} for f in seq_cls_features(4)]
    one = compute_fisher(mm, "a", features, collate_fn=collate_fn, seed=3)
    two = compute_fisher(mm, "a", features, collate_fn=collate_fn, seed=3)
    assert close(one.units, two.units, atol=0) and close(one.deltas, two.deltas, atol=0)
    with pytest.raises(ValueError, match="target='label' \\(the empirical Fisher\\) needs labelled data"):
        compute_fisher(mm, "a", features, collate_fn=collate_fn, target="label")


def test_fisher_merges(mm: ModularModel) -> None:
    add(mm, "a", "lora", 1, head=True, r=2)
    add(mm, "b", "lora", 2, head=True, r=2)
    add(mm, "p1", "pfeiffer", 3, head=True)
    add(mm, "p2", "pfeiffer", 4, head=True)
    da, db = module_deltas(mm, "a"), module_deltas(mm, "b")
    ones = Fisher(deltas={k: torch.ones_like(v) for k, v in da.items()})
    merge_modules(mm, ["a", "b"], "f", method="fisher", weights=[1, 3], fishers={"a": ones, "b": ones})
    assert close(
        module_deltas(mm, "f"), {k: (da[k] + 3 * db[k]) / 4 for k in da}, atol=1e-6
    )  # equal F: linear
    features = seq_cls_features(4)
    fishers = {n: compute_fisher(mm, n, features, collate_fn=collate_fn) for n in ("a", "b", "p1", "p2")}
    assert not fishers["p1"].deltas and fishers["p1"].units  # an adapter: its own parameters only
    # EWR: b as an anti-expert, θ* = (λ0 F0 θ0 + F_a τ_a − F_b τ_b) / (λ0 F0 + F_a + F_b)
    merge_modules(
        mm, ["a", "b"], "ewr", method="fisher", weights=[1, -1], base_weight=2.0, fishers=fishers, to="sft"
    )
    fa, fb = fishers["a"].deltas, fishers["b"].deltas
    f0 = {k: (fishers["a"].base[k] + fishers["b"].base[k]) / 2 for k in da}
    for key, got in module_deltas(mm, "ewr").items():
        theta0 = mm.view.module(key.rsplit(".", 1)[0]).weight
        f0k, fak, fbk = (x[key].clamp_min(1e-6) for x in (f0, fa, fb))
        theta = (2 * f0k * theta0 + fak * da[key] - fbk * db[key]) / (2 * f0k + fak + fbk)
        assert torch.allclose(got, theta - theta0, atol=1e-5)
    assert merge_modules(mm, ["p1", "p2"], "pf", method="fisher", fishers=fishers).route == "parameters"
    with pytest.raises(MergeError, match="needs each module's Fisher; none for b"):
        merge_modules(mm, ["a", "b"], "x", method="fisher", fishers={"a": fishers["a"]})
