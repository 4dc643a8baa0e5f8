"""Sparse fine-tuning (`methods/sft.py`): the selection formulas, the sparse-diff algebra, the file
size, LT-SFT's phases inside `train()` (exact k, checkpoints, resume) and by hand for the HF Trainer."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

import modfit
from modfit import cli
from modfit.config import ConfigError
from modfit.methods.sft import (
    SparseDiff,
    SparseDiffUnit,
    SparseEntries,
    _SparseProjection,
    dense,
    random_indices,
    scatter,
    select,
    sparse_diff,
    split_count,
    sum_modules,
    top_k,
)
from modfit.model import ModularModel
from modfit.persistence import WEIGHTS
from modfit.train import TrainSettings, train
from train_fixtures import SEQ_LABELS, bert_config, collate_fn, seq_cls_features, tiny_bert, tiny_tokenizer

# tiny_bert: 2 layers of query/key/value/attn-out 32×32 and FFN 37×32, 32×37: 2 · (4·1024 + 2·1184)
TINY_ENTRIES = 2 * (4 * 32 * 32 + 2 * 37 * 32)


def _model(**params: Any) -> ModularModel:
    mm = modfit.wrap(tiny_bert())
    mm.add("s", modfit.config("sft", **params), head=modfit.head("seq-cls", SEQ_LABELS, dropout=0.0))
    mm.activate("s")
    return mm


@torch.no_grad()
def _randomise_values(mm: ModularModel, name: str, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in mm.module_parameters(name, include_head=False):
        p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _inputs() -> dict[str, torch.Tensor]:
    return {
        "input_ids": torch.tensor([[1, 5, 9, 13, 2], [1, 14, 6, 2, 0]]),
        "attention_mask": torch.ones(2, 5),
    }


# -- formulas ----------------------------------------------------------------------------------


def test_split_count_is_proportional_and_exact() -> None:
    assert split_count(10, [100, 100, 200]) == [3, 2, 5]  # 2.5, 2.5, 5: the first tie gets the rest
    assert split_count(7, [3, 3, 3]) == [3, 2, 2]  # largest remainder, ties to the first
    assert split_count(0, [5, 5]) == [0, 0]
    numels = [589_824] * 48 + [2_359_296] * 24  # BERT-base's projections
    counts = split_count(849_346, numels)
    assert sum(counts) == 849_346 and all(c <= n for c, n in zip(counts, numels, strict=True))
    with pytest.raises(ValueError, match="cannot pick 11 entries"):
        split_count(11, [5, 5])


@pytest.mark.parametrize(("numel", "k"), [(100, 90), (100, 3), (1_000_000, 1234)])
def test_random_indices_are_distinct_sorted_in_range(numel: int, k: int) -> None:
    picked = random_indices(numel, k, torch.Generator().manual_seed(0))
    assert picked.numel() == k and picked.dtype == torch.long
    assert torch.unique(picked).numel() == k
    assert bool((picked[1:] > picked[:-1]).all()) and int(picked[0]) >= 0 and int(picked[-1]) < numel
    assert torch.equal(picked, random_indices(numel, k, torch.Generator().manual_seed(0)))


def test_top_k_is_global_and_exact() -> None:
    a = torch.tensor([[0.1, 5.0], [3.0, 0.0]])
    b = torch.tensor([4.0, 0.2, 6.0])
    picks = top_k([a, b], 3)  # 6, 5, 4: one entry of a, two of b
    assert [p.tolist() for p in picks] == [[1], [0, 2]]
    assert [p.tolist() for p in top_k([a, b], 4)] == [[1, 2], [0, 2]]
    ties = top_k([torch.ones(10), torch.ones(7)], 5)  # all equal: still exactly 5
    assert sum(p.numel() for p in ties) == 5
    assert [p.numel() for p in top_k([a, b], 0)] == [0, 0]
    with pytest.raises(ValueError, match="cannot pick 8"):
        top_k([a, b], 8)


def test_scatter_layout() -> None:
    dense_w = scatter(torch.tensor([1.0, 2.0]), torch.tensor([1, 5], dtype=torch.int32), (2, 3))
    assert torch.equal(dense_w, torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 2.0]]))


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_sparse_projection_gradients(fan_in_fan_out: bool) -> None:
    """The hand-written backward agrees with autograd through a dense scatter, and passes gradcheck."""
    torch.manual_seed(0)
    shape = (5, 3) if fan_in_fan_out else (3, 5)  # in 5, out 3
    indices = torch.tensor([0, 4, 7, 11, 14])
    x = torch.randn(2, 4, 5, dtype=torch.float64, requires_grad=True)
    values = torch.randn(5, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(
        lambda x, v: _SparseProjection.apply(x, v, indices, shape, fan_in_fan_out), (x, values)
    )
    out = _SparseProjection.apply(x, values, indices, shape, fan_in_fan_out)
    delta = scatter(values, indices, shape)
    reference = x @ delta if fan_in_fan_out else x @ delta.t()
    torch.testing.assert_close(out, reference)


def test_config_validation() -> None:
    assert modfit.config("sft", k=100).density is None  # k decides
    assert modfit.config("sft").count(TINY_ENTRIES) == int(0.01 * TINY_ENTRIES)
    with pytest.raises(ConfigError, match=r"sft\.density"):
        modfit.config("sft", density=1.5)
    with pytest.raises(ConfigError, match=r"sft\.k"):
        modfit.config("sft", k=0)
    with pytest.raises(ConfigError, match=r"sft\.selection"):
        modfit.config("sft", selection="best")
    mm = modfit.wrap(tiny_bert())
    with pytest.raises(ConfigError, match=r"sft\.k: 100000 entries asked"):
        mm.add("s", modfit.config("sft", k=100_000))
    with pytest.raises(ConfigError, match=r"sft\.sizes: 2 counts for the 12 weights"):
        mm.add("s", modfit.config("sft", sizes=(1, 2)))


# -- the module: entries, storage ------------------------------------------------------------


def test_new_module_holds_exactly_k_random_entries() -> None:
    mm = _model(selection="random", k=300)
    assert mm.trainable_parameters("s") == 300
    units = [u for _, u in mm.units("s")]
    assert all(isinstance(u, SparseDiffUnit) and u.indices is not None for u in units)
    assert all(u.indices.dtype == torch.int32 for u in units)  # weights far below 2^31 entries
    assert sum(u.values.numel() for u in units) == 300  # split across the 12 weights by size


def test_file_size_is_proportional_to_k(tmp_path: Path) -> None:
    sizes = {}
    for k in (1000, 3000):
        mm = modfit.wrap(tiny_bert())
        mm.add("s", modfit.config("sft", selection="random", k=k))
        _randomise_values(mm, "s", seed=1)
        mm.save("s", tmp_path / str(k))
        sizes[k] = (tmp_path / str(k) / WEIGHTS).stat().st_size
    # 8 bytes an entry (int32 index + float32 value); the header differs only in a few digits
    assert abs(sizes[3000] - sizes[1000] - 2000 * 8) < 200
    assert sizes[1000] < 1000 * 8 + 5000 < TINY_ENTRIES * 4


def test_save_load_after_selection_rebuilds_the_same_sizes(tmp_path: Path) -> None:
    mm = _model(k=200)
    dense(mm, "s")
    _randomise_values(mm, "s", seed=2)
    select(mm, "s", reset=False)
    expected = mm(**_inputs()).logits
    mm.save("s", tmp_path / "s")
    mm2 = modfit.wrap(tiny_bert())
    mm2.load(tmp_path / "s")
    mm2.activate("s")
    torch.testing.assert_close(mm2(**_inputs()).logits, expected, atol=0, rtol=0)
    assert mm2.records["s"].config == mm.records["s"].config
    assert sum(mm2.records["s"].config.sizes) == 200


# -- LT-SFT selection ------------------------------------------------------------------------


def test_select_keeps_exactly_k_largest_changes_and_resets() -> None:
    mm = _model(k=123)
    dense(mm, "s")
    assert mm.trainable_parameters("s") == TINY_ENTRIES  # the dense phase trains every entry
    _randomise_values(mm, "s", seed=3)
    units = [u for _, u in mm.units("s")]
    magnitudes = torch.cat([u.dense_delta().detach().abs().reshape(-1) for u in units])
    select(mm, "s")
    assert mm.trainable_parameters("s") == 123
    config = mm.records["s"].config
    assert config.k == 123 and config.density is None and sum(config.sizes) == 123
    offsets = [0, *itertools.accumulate(u.numel for u in units)][:-1]
    chosen = torch.cat([u.indices.long() + offset for u, offset in zip(units, offsets, strict=True)])
    kept = torch.zeros_like(magnitudes, dtype=torch.bool)
    kept[chosen] = True
    assert magnitudes[kept].min() >= magnitudes[~kept].max()
    assert all(float(u.values.detach().abs().sum()) == 0 for _, u in mm.units("s"))  # reset to the base
    with pytest.raises(ValueError, match="no dense delta to select from"):
        select(mm, "s")


def test_lottery_training_runs_both_phases(tmp_path: Path) -> None:
    features = seq_cls_features(32)
    mm = _model(k=150, full_ft_steps=4)
    head_before = {k: v.clone() for k, v in mm.head_module("s").state_dict().items()}
    settings = TrainSettings(
        steps=3, lr=1e-2, batch_size=8, progress=False, checkpoint_dir=str(tmp_path / "ck")
    )
    result = train(mm, "s", features, collate_fn=collate_fn, settings=settings)
    assert result.total_steps == result.step == 7
    assert [e["step"] for e in result.history] == [4, 7]  # each phase logs its last step; steps number on
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["dense", "sparse"]
    assert mm.trainable_parameters("s") == 150
    assert sum(mm.records["s"].config.sizes) == 150
    assert any(float(u.values.detach().abs().sum()) > 0 for _, u in mm.units("s"))  # the sparse phase trained
    head_now = mm.head_module("s").state_dict()
    assert any(not torch.equal(head_now[k], head_before[k]) for k in head_before)


def test_lottery_training_resumes_across_phases(tmp_path: Path) -> None:
    """Interrupted in the sparse phase, then resumed: the same module as one uninterrupted run."""
    features = seq_cls_features(32)

    def run(**overrides: Any) -> tuple[ModularModel, Any]:
        torch.manual_seed(0)
        mm = _model(k=150, full_ft_steps=4)
        base = dict(steps=4, lr=1e-2, batch_size=8, progress=False, checkpoint_every=1)
        settings = TrainSettings(**{**base, **overrides})
        return mm, train(mm, "s", features, collate_fn=collate_fn, settings=settings)

    whole, full = run(checkpoint_dir=str(tmp_path / "a"))
    _, stopped = run(checkpoint_dir=str(tmp_path / "b"), stop_after_steps=6)
    assert stopped.step == 6 and stopped.total_steps == 8
    resumed_mm, resumed = run(checkpoint_dir=str(tmp_path / "b"), resume=True)
    assert resumed.resumed_from == 6 and resumed.step == 8
    assert [e["step"] for e in resumed.history] == [e["step"] for e in full.history]
    for (_, a), (_, b) in zip(whole.units("s"), resumed_mm.units("s"), strict=True):
        assert torch.equal(a.indices, b.indices)
        torch.testing.assert_close(a.values, b.values, atol=1e-6, rtol=0)


def test_random_selection_trains_in_one_run_on_fixed_entries() -> None:
    mm = _model(selection="random", k=100)
    indices = [u.indices.clone() for _, u in mm.units("s")]
    settings = TrainSettings(steps=3, lr=1e-2, batch_size=8, progress=False)
    result = train(mm, "s", seq_cls_features(16), collate_fn=collate_fn, settings=settings)
    assert result.total_steps == 3
    assert all(torch.equal(a, u.indices) for a, (_, u) in zip(indices, mm.units("s"), strict=True))
    assert mm.trainable_parameters("s") == 100


def test_phases_by_hand_with_the_hf_trainer(tmp_path: Path) -> None:
    pytest.importorskip("accelerate")
    mm = _model(k=80)
    mm.train_only("s")
    features = seq_cls_features(32)
    args = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=8, learning_rate=1e-2, report_to=[],
        use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0, dataloader_num_workers=0,
    )  # fmt: skip
    dense(mm, "s")
    phase = transformers.TrainingArguments(max_steps=3, **args)
    transformers.Trainer(model=mm, args=phase, train_dataset=features, data_collator=collate_fn).train()
    select(mm, "s")
    assert mm.trainable_parameters("s") == 80
    transformers.Trainer(model=mm, args=phase, train_dataset=features, data_collator=collate_fn).train()
    assert sum(float(u.values.detach().abs().sum()) > 0 for _, u in mm.units("s")) > 0


# -- the diff algebra ------------------------------------------------------------------------


def _two_modules() -> ModularModel:
    mm = modfit.wrap(tiny_bert())
    for name, seed in (("a", 1), ("b", 2)):
        mm.add(name, modfit.config("sft", selection="random", k=400, seed=seed))
        _randomise_values(mm, name, seed)
    return mm


def test_sparse_entries_add_unions_and_sums() -> None:
    a = SparseEntries((2, 3), torch.tensor([0, 4]), torch.tensor([1.0, 2.0]))
    b = SparseEntries((2, 3), torch.tensor([4, 5]), torch.tensor([10.0, 20.0]))
    both = a + b
    assert both.indices.tolist() == [0, 4, 5] and both.values.tolist() == [1.0, 12.0, 20.0]
    assert torch.equal(both.dense(), a.dense() + b.dense())
    with pytest.raises(ValueError, match="shapes"):
        _ = a + SparseEntries((3, 2), torch.tensor([0]), torch.tensor([1.0]))


def test_apply_then_revert_restores_the_weights() -> None:
    mm = _two_modules()
    before = {k: v.clone() for k, v in mm.model.state_dict().items() if "modfit" not in k}
    diff = sparse_diff(mm, "a")
    assert diff.numel == 400
    diff.apply(mm.model)
    changed = [k for k, v in before.items() if not torch.equal(mm.model.state_dict()[k], v)]
    assert changed
    diff.revert(mm)
    for k, v in before.items():
        torch.testing.assert_close(mm.model.state_dict()[k], v, atol=1e-7, rtol=0)


def test_merging_the_sum_equals_merging_one_after_the_other() -> None:
    mm = _two_modules()
    sum_modules(mm, "ab", ["a", "b"])
    sizes = mm.records["ab"].config.sizes
    a, b = sparse_diff(mm, "a"), sparse_diff(mm, "b")
    union = sum(
        torch.unique(torch.cat([a.entries[p].indices, b.entries[p].indices])).numel() for p in a.entries
    )
    assert sum(sizes) == union == mm.trainable_parameters("ab")
    assert mm.records["ab"].config.targets == ("all-linear",)  # the sources' targets, reused

    mm.merge("a")
    mm.merge("b")
    sequential = {k: v.clone() for k, v in mm.model.state_dict().items() if "modfit" not in k}
    mm.unmerge("b")
    mm.unmerge("a")
    mm.merge("ab")
    for k, v in sequential.items():
        torch.testing.assert_close(mm.model.state_dict()[k], v, atol=1e-6, rtol=0)
    mm.unmerge("ab")
    mm.activate("stack(a, b)")
    stacked = mm.model(**_inputs()).last_hidden_state
    mm.activate("ab")
    torch.testing.assert_close(mm.model(**_inputs()).last_hidden_state, stacked, atol=1e-5, rtol=0)


def test_sum_of_modules_on_different_weights_uses_exact_paths() -> None:
    mm = modfit.wrap(tiny_bert())
    mm.add("q", modfit.config("sft", selection="random", k=50, targets=("query",)))
    mm.add("v", modfit.config("sft", selection="random", k=50, targets=("value",), seed=1))
    _randomise_values(mm, "q", 1)
    _randomise_values(mm, "v", 2)
    sum_modules(mm, "qv", ["q", "v"])
    config = mm.records["qv"].config
    assert len(config.targets) == 4 and all(t.endswith(("query", "value")) for t in config.targets)
    diff = sparse_diff(mm, "qv")
    total = sparse_diff(mm, "q") + sparse_diff(mm, "v")
    assert diff.entries.keys() == total.entries.keys()
    assert all(torch.equal(diff.entries[p].dense(), total.entries[p].dense()) for p in diff.entries)
    assert isinstance(total, SparseDiff)


# -- the command line ------------------------------------------------------------------------


def test_cli_train_and_count(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = tmp_path / "base"
    torch.manual_seed(0)
    transformers.BertModel(bert_config()).save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    rows = [("cat sat on the mat", "a"), ("bob ran in paris", "b")] * 8
    (tmp_path / "train.csv").write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows))
    out = tmp_path / "sft"
    argv = ["train", "--base", base, "--task", "seq-cls", "--train", tmp_path / "train.csv", "--out", out]
    argv += ["--method", "sft", "--param", "k=60", "--param", "full_ft_steps=2", "--steps", "2"]
    argv += ["--batch-size", "8", "--checkpoint-every", "1", "--json"]
    capsys.readouterr()
    assert cli.main([str(a) for a in argv]) == 0, capsys.readouterr().err
    result = json.loads(capsys.readouterr().out)
    assert result["parameters"] == 60 and result["steps"] == 4
    card = json.loads((out / "module.json").read_text())
    assert sum(card["config"]["sizes"]) == 60 and card["parameters"] == 60
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["dense", "sparse"]
    assert cli.main(["count", "--base", str(base), "--method", "sft", "--param", "k=60", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["module_parameters"] == 60
