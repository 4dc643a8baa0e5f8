"""ModularModel's API: adding, activating, stacking, merging, removing, head mode, unknown models, and
every error path on the way."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers.modeling_outputs import BaseModelOutput

import modfit
from modfit.model import ModularModel
from modfit.sites import SiteCall

if TYPE_CHECKING:
    from conftest import Family

LABELS = ("neg", "pos")


@torch.no_grad()
def _randomise(mm: ModularModel, name: str, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in mm.module_parameters(name, include_head=False):
        p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _run(family: Family, mm: ModularModel) -> torch.Tensor:
    with torch.no_grad():
        return family.run(mm.model)


@pytest.fixture
def bert(tiny: Callable[[str], Family]) -> Family:
    return tiny("bert")


@pytest.fixture
def mm(bert: Family) -> ModularModel:
    return modfit.wrap(bert.build())


# -- names and adding ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["", "-a", "_a", "a.b", "a b", "a/b", "stack(a)", "naïve", "a,b"])
def test_invalid_names(mm: ModularModel, name: str) -> None:
    with pytest.raises(ValueError, match="must start with a letter or digit"):
        mm.add(name, modfit.config("lora"))
    assert mm.module_names == []
    assert not hasattr(mm.model, "modfit")


@pytest.mark.parametrize("name", ["a", "A1", "1a", "sst-2", "en_ner", "x" * 100])
def test_valid_names(mm: ModularModel, name: str) -> None:
    mm.add(name, modfit.config("lora"))
    mm.activate(name)
    assert mm.module_names == [name]


def test_duplicate_name(mm: ModularModel) -> None:
    mm.add("a", modfit.config("lora"))
    with pytest.raises(ValueError, match="a module named 'a' already exists"):
        mm.add("a", modfit.config("pfeiffer"))
    assert [type(u).__name__ for _, u in mm.units("a")] == ["LoraUnit"] * 4


def test_add_records_sites_and_parameters(mm: ModularModel) -> None:
    mm.add("a", modfit.config("lora", r=2), head=modfit.head("seq-cls", LABELS))
    paths = [path for path, _ in mm.units("a")]
    assert paths == [f"encoder.layer.{i}.attention.self.{p}" for i in (0, 1) for p in ("query", "value")]
    assert mm.records["a"].sites == paths
    assert mm.trainable_parameters("a") == 4 * 2 * (32 + 32)
    head = mm.head_module("a")
    assert head is not None
    assert mm.trainable_parameters("a", include_head=True) == 4 * 2 * 64 + sum(
        p.numel() for p in head.parameters()
    )
    with pytest.raises(KeyError, match=r"no module named 'b' on this model \(modules: a\)"):
        mm.units("b").__next__()


def test_config_strings_are_coerced(mm: ModularModel) -> None:
    config = modfit.config("lora", targets="query,value", r="8", alpha="16", layers="1", rslora="true")
    assert config.targets == ("query", "value")  # type: ignore[attr-defined]
    assert (config.r, config.alpha, config.layers, config.rslora) == (8, 16.0, (1,), True)  # type: ignore[attr-defined]
    mm.add("a", config)
    assert [p for p, _ in mm.units("a")] == [
        "encoder.layer.1.attention.self.query",
        "encoder.layer.1.attention.self.value",
    ]
    unit = next(u for _, u in mm.units("a"))
    assert unit.scale == pytest.approx(16 / 8**0.5)  # type: ignore[union-attr]


def test_targets_matching_nothing(mm: ModularModel) -> None:
    with pytest.raises(modfit.TargetError, match="target 'qkv' matches no Linear/Conv1D module") as info:
        mm.add("a", modfit.config("lora", targets="query,qkv"))
    message = str(info.value)
    for known in ("query", "key", "value", "dense", "ffn_out"):  # module names and roles
        assert known in message
    with pytest.raises(modfit.TargetError, match="matches no"):
        mm.add("a", modfit.config("lora", targets="re:.*nothing.*"))
    with pytest.raises(modfit.TargetError, match=r"layers \[7, 9\] are out of range"):
        mm.add("a", modfit.config("lora", layers="7,9"))
    with pytest.raises(modfit.TargetError, match=r"layers \[5\] are out of range"):
        mm.add("a", modfit.config("houlsby", layers=(5,)))
    assert mm.module_names == []
    assert not hasattr(mm.model, "modfit")


def test_module_name_targets_match_the_table_roles(family: Family) -> None:
    """Naming the projections (as for a model the table does not know) finds what the roles find."""
    mm = modfit.wrap(family.build())
    mm.add("roles", modfit.config("lora"))  # query, value
    mm.add("names", modfit.config("lora", targets=family.targets))
    roles = [p for p, _ in mm.units("roles")]
    assert roles == [p for p, _ in mm.units("names")]
    assert len(roles) >= (2 if family.model_type == "gpt2" else 4)  # 2 layers × q, v (GPT-2: fused c_attn)


def test_patterns_and_repeated_layers(mm: ModularModel) -> None:
    mm.add("re", modfit.config("lora", targets=r"re:encoder\.layer\.0\..*\.(key|dense)"))
    assert [p for p, _ in mm.units("re")] == [
        "encoder.layer.0.attention.self.key",
        "encoder.layer.0.attention.output.dense",
        "encoder.layer.0.intermediate.dense",
        "encoder.layer.0.output.dense",
    ]
    mm.add("suffix", modfit.config("lora", targets="output.dense"))
    assert len(list(mm.units("suffix"))) == 4  # attention.output.dense and output.dense, both layers
    mm.add("all", modfit.config("lora", targets="all-linear"))
    assert len(list(mm.units("all"))) == 2 * 6
    mm.add("twice", modfit.config("pfeiffer", layers=(1, 1, 1)))
    assert [p for p, _ in mm.units("twice")] == ["encoder.layer.1.output.dropout"]


def test_modules_never_target_modfit_modules(mm: ModularModel) -> None:
    """Heads and adapter layers of other modules live inside the model; they are not targets."""
    mm.add("adapter", modfit.config("houlsby"), head=modfit.head("seq-cls", LABELS))
    mm.add("all", modfit.config("lora", targets="all-linear"))
    mm.add("dense", modfit.config("lora", targets="dense"))
    sites = [p for p, _ in mm.units("all")] + [p for p, _ in mm.units("dense")]
    assert not [p for p in sites if p.startswith("modfit.") or ".modfit." in p]
    assert len(list(mm.units("dense"))) == 2 * 3 + 1  # 3 per layer and the pooler; no head dense
    for name in ("down", "up", "out"):  # only adapter layers and heads have these names
        with pytest.raises(modfit.TargetError, match=r"module names: dense, key, query, value$"):
            mm.add("x", modfit.config("lora", targets=name))


@pytest.mark.parametrize("with_head", [False, True])
def test_base_modules_are_named_modules_without_modfits_own(bert: Family, with_head: bool) -> None:
    """The target scan walks the base model as `named_modules` does, leaving out modfit's container
    (below base_model on a bare encoder, beside it on a model with a task head)."""
    model = bert.build()
    if with_head:
        model = transformers.BertForSequenceClassification(model.config)
    mm = modfit.wrap(model)
    assert (mm.view.base_model is mm.model) is not with_head
    mm.add("adapter", modfit.config("houlsby"), head=modfit.head("seq-cls", LABELS))
    mm.add("lora", modfit.config("lora", targets="all-linear"))
    own = {id(m) for m in mm.model.modfit.modules()}
    expected = [(p, id(m)) for p, m in mm.view.base_model.named_modules() if p and id(m) not in own]
    assert [(p, id(m)) for p, m in mm.view.base_modules()] == expected


# -- wrap -----------------------------------------------------------------------------------------------


def test_wrap_twice_returns_same_object(bert: Family) -> None:
    model = bert.build()
    mm = modfit.wrap(model)
    assert modfit.wrap(model) is mm
    assert mm.model is model
    copied = copy.deepcopy(model)  # the copy carries the original's reference to its wrapper
    other = modfit.wrap(copied)
    assert other is not mm
    assert other.model is copied
    assert modfit.wrap(copied) is other


def test_new_modules_follow_train_and_eval_mode(bert: Family) -> None:
    model = bert.build()
    assert not model.training
    mm = modfit.wrap(model)
    mm.add("a", modfit.config("lora", dropout=0.5), head=modfit.head("seq-cls", LABELS, dropout=0.5))
    mm.activate("a")
    assert not any(m.training for m in model.modules())
    inputs = bert.encoder_inputs()
    with torch.no_grad():
        assert torch.equal(mm(**inputs).logits, mm(**inputs).logits)  # no dropout in eval mode
    mm.train()
    assert all(m.training for m in model.modules())
    mm.eval()
    model.train()
    mm.add("b", modfit.config("pfeiffer", dropout=0.1), head=modfit.head("token-cls", LABELS))
    assert all(u.training for _, u in mm.units("b"))
    assert mm.head_module("b").training  # type: ignore[union-attr]


def test_half_precision_base_trains_float32_modules(bert: Family) -> None:
    model = bert.build().to(torch.bfloat16)
    mm = modfit.wrap(model)
    mm.add("a", modfit.config("lora"), head=modfit.head("seq-cls", LABELS))
    mm.add("b", modfit.config("houlsby"))
    assert {p.dtype for n in ("a", "b") for p in mm.module_parameters(n)} == {torch.float32}
    mm.activate("stack(a, b)")
    out = mm(**bert.encoder_inputs(), labels=torch.tensor([0, 1]))
    assert out.hidden_states.dtype == torch.bfloat16
    assert out.logits.dtype == torch.float32
    assert torch.isfinite(out.loss)


# -- activation and composition ------------------------------------------------------------------------


def test_activate_unknown_module(mm: ModularModel) -> None:
    mm.add("a", modfit.config("lora"))
    with pytest.raises(modfit.CompositionError, match=r"names unknown module 'b' \(modules: a\)"):
        mm.activate("b")
    with pytest.raises(modfit.CompositionError, match="unknown module 'c'"):
        mm.activate(modfit.Stack("a", "c"))
    assert mm.active is None
    mm.activate("a")
    with pytest.raises(modfit.CompositionError):
        mm.activate("stack(a, nope)")
    assert str(mm.active) == "a"  # a failed activate changes nothing


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty composition"),
        ("stack(a", r"missing '\)'"),
        ("stack(a,)", "expected a module name"),
        ("stack()", "expected a module name"),
        ("mix(a, b)", r"unknown composition 'mix\(...\)'"),
        ("a b", "unexpected 'b'"),
        ("stack(a, a)", "module 'a' appears twice"),
        ("a; b", "cannot read composition"),
    ],
)
def test_activate_parse_errors(mm: ModularModel, text: str, message: str) -> None:
    mm.add("a", modfit.config("lora"))
    mm.add("b", modfit.config("lora"))
    with pytest.raises(modfit.CompositionError, match=message):
        mm.activate(text)
    assert mm.active is None


def test_activate_head_choice(mm: ModularModel) -> None:
    mm.add("lang", modfit.config("pfeiffer"), head=modfit.head("mlm"))
    mm.add("task", modfit.config("pfeiffer"), head=modfit.head("seq-cls", LABELS))
    mm.add("plain", modfit.config("lora"))
    mm.activate("stack(lang, task)")
    assert mm.head_name == "task"  # the last module with a head
    mm.activate("stack(lang, task)", head="lang")
    assert mm.head_name == "lang"
    mm.activate("plain")
    assert mm.head_name is None
    with pytest.raises(RuntimeError, match="no active module has a head"):
        mm(input_ids=torch.ones(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="module 'plain' has no head"):
        mm.activate("stack(lang, task)", head="plain")
    with pytest.raises(KeyError, match="no module named 'nope'"):
        mm.activate("task", head="nope")
    assert str(mm.active) == "plain"  # unchanged by the failed calls
    mm.deactivate()
    assert mm.active is None and mm.head_name is None


def _capture_output(module: nn.Module, store: dict[str, Any], key: str) -> Any:
    def hook(mod: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        store[key] = output

    return module.register_forward_hook(hook)


def test_stack_of_bottleneck_adapters_applies_in_order(bert: Family, mm: ModularModel) -> None:
    """At one site, stack(a, b) gives b(a(h)), computed here by calling the units by hand."""
    for name, seed in (("a", 1), ("b", 2)):
        mm.add(name, modfit.config("pfeiffer", layers=(0,)))
        _randomise(mm, name, seed)
    layer = mm.model.encoder.layer[0].output
    seen: dict[str, Any] = {}

    def residual(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen["r"] = args[1] if len(args) > 1 else kwargs["input_tensor"]

    handles = [layer.register_forward_pre_hook(residual, with_kwargs=True)]
    handles.append(_capture_output(layer.dropout, seen, "h"))  # registered after the site's hook
    base = _run(bert, mm)
    h, r = seen["h"], seen["r"]
    units = dict(mm.container.sites["encoder__layer__0__output__dropout"].units.items())
    call = SiteCall(inputs=(h,), residual=r, norm=layer.LayerNorm, base=layer.dropout)
    with torch.no_grad():
        a_then_b = units["b"](units["a"](h, call), call)
        b_then_a = units["a"](units["b"](h, call), call)
    assert not torch.allclose(a_then_b, b_then_a, atol=1e-4)

    mm.activate("stack(a, b)")
    out_ab = _run(bert, mm)
    torch.testing.assert_close(seen["h"], a_then_b, atol=1e-6, rtol=0)
    mm.activate("stack(b, a)")
    torch.testing.assert_close(_run(bert, mm), _run(bert, mm))
    torch.testing.assert_close(seen["h"], b_then_a, atol=1e-6, rtol=0)
    assert not torch.allclose(_run(bert, mm), out_ab, atol=1e-4)  # order matters
    mm.deactivate()
    assert torch.equal(_run(bert, mm), base)
    for handle in handles:
        handle.remove()


def test_stack_of_loras_is_their_sum(bert: Family, mm: ModularModel) -> None:
    for name, seed in (("a", 1), ("b", 2)):
        mm.add(name, modfit.config("lora", r=4, alpha=8, targets="query", layers=(0,)))
        _randomise(mm, name, seed)
    query = mm.model.encoder.layer[0].attention.self.query
    seen: dict[str, Any] = {}
    handle = query.register_forward_pre_hook(lambda mod, args: seen.update(x=args[0]))
    handle2 = _capture_output(query, seen, "h")
    mm.activate("stack(a, b)")
    stacked = _run(bert, mm)
    x = seen["x"]
    with torch.no_grad():
        expected = F.linear(x, query.weight, query.bias)
        for name in ("a", "b"):
            ((_, unit),) = mm.units(name)
            expected = expected + 2.0 * (x @ unit.lora_A.t() @ unit.lora_B.t())  # scale alpha / r = 2
    torch.testing.assert_close(seen["h"], expected, atol=1e-6, rtol=0)
    mm.activate("stack(b, a)")
    torch.testing.assert_close(_run(bert, mm), stacked, atol=1e-6, rtol=0)  # addition commutes
    mm.deactivate()
    mm.merge("a")
    mm.merge("b")
    torch.testing.assert_close(_run(bert, mm), stacked, atol=1e-5, rtol=0)
    handle.remove()
    handle2.remove()


def test_lora_runs_before_adapter_at_one_site(bert: Family, tiny: Callable[[str], Family]) -> None:
    """On Llama the attention's o_proj is both a LoRA target and the adapter's site: LoRA first."""
    llama = tiny("llama")
    mm = modfit.wrap(llama.build())
    mm.add("adapter", modfit.config("houlsby", placement="attn_output", layers=(0,)))
    mm.add("lora", modfit.config("lora", targets="o_proj", layers=(0,)))
    _randomise(mm, "adapter", 1)
    _randomise(mm, "lora", 2)
    mm.activate("stack(adapter, lora)")
    first = _run(llama, mm)
    mm.activate("stack(lora, adapter)")
    torch.testing.assert_close(_run(llama, mm), first, atol=0, rtol=0)


# -- merging ------------------------------------------------------------------------------------------


def test_merged_module_stays_applied_and_is_skipped(bert: Family, mm: ModularModel) -> None:
    base = _run(bert, mm)
    mm.add("a", modfit.config("lora"))
    _randomise(mm, "a")
    mm.activate("a")
    active = _run(bert, mm)
    mm.merge("a")
    sites = list(mm.container.sites.values())
    assert all(site._active == [] for site in sites)  # the units do not run a second time
    torch.testing.assert_close(_run(bert, mm), active, atol=1e-5, rtol=0)
    mm.deactivate()
    torch.testing.assert_close(_run(bert, mm), active, atol=1e-5, rtol=0)  # still in the weights
    mm.activate("a")
    assert all(site._active == [] for site in sites)
    torch.testing.assert_close(_run(bert, mm), active, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="already merged"):
        mm.merge("a")
    with pytest.raises(ValueError, match="merged into the weights; unmerge it before training"):
        mm.train_only("a")
    mm.unmerge("a")
    assert all(len(site._active) == 1 for site in sites)
    with pytest.raises(ValueError, match="is not merged"):
        mm.unmerge("a")
    torch.testing.assert_close(_run(bert, mm), active, atol=1e-5, rtol=0)
    mm.merge("a")
    mm.remove("a")  # unmerges first
    torch.testing.assert_close(_run(bert, mm), base, atol=1e-5, rtol=0)


def test_merge_refused_for_adapters(bert: Family, mm: ModularModel) -> None:
    mm.add("a", modfit.config("houlsby"))
    with pytest.raises(ValueError, match=r"'a' \(houlsby\) cannot be merged: its BottleneckUnit"):
        mm.merge("a")
    with pytest.raises(KeyError, match="no module named 'b'"):
        mm.merge("b")


# -- removing -----------------------------------------------------------------------------------------


def test_removing_an_active_module_deactivates(bert: Family, mm: ModularModel) -> None:
    base = _run(bert, mm)
    mm.add("a", modfit.config("lora"))
    mm.add("b", modfit.config("pfeiffer"), head=modfit.head("seq-cls", LABELS))
    mm.add("c", modfit.config("lora"))
    _randomise(mm, "b")
    mm.activate("stack(a, b)")
    mm.remove("c")  # not active: the composition stays
    assert str(mm.active) == "stack(a, b)"
    mm.remove("a")
    assert mm.active is None
    assert mm.head_name is None
    assert torch.equal(_run(bert, mm), base)  # b is inactive now
    with pytest.raises(KeyError, match=r"no module named 'a' on this model \(modules: b\)"):
        mm.remove("a")
    mm.remove("b")
    assert not hasattr(mm.model, "modfit")
    with pytest.raises(KeyError, match=r"\(modules: none\)"):
        mm.remove("b")


def test_failed_add_leaves_no_trace(bert: Family, mm: ModularModel) -> None:
    mm.add("a", modfit.config("lora"))
    before = {k: v.clone() for k, v in mm.model.state_dict().items()}
    with pytest.raises(modfit.TargetError):
        mm.add("b", modfit.config("lora", targets="query,nothing"))
    with pytest.raises(modfit.ConfigError):
        mm.add("b", modfit.config("lora"), head=modfit.head("seq-cls", ["only-one"]))
    assert mm.module_names == ["a"]
    after = mm.model.state_dict()
    assert after.keys() == before.keys()


# -- head mode ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("pooling", ["mean", "first", "last"])
def test_head_mode_seq_cls(bert: Family, mm: ModularModel, pooling: str) -> None:
    mm.add("a", modfit.config("lora"), head=modfit.head("seq-cls", ["x", "y", "z"], pooling=pooling))
    mm.activate("a")
    out = mm(**bert.encoder_inputs(), labels=torch.tensor([0, 2]))
    assert out.logits.shape == (2, 3)
    assert out.hidden_states.shape == (2, 7, 32)
    assert out.loss.shape == () and torch.isfinite(out.loss)
    assert mm(**bert.encoder_inputs()).loss is None


def test_head_mode_token_cls(bert: Family, mm: ModularModel) -> None:
    mm.add("a", modfit.config("pfeiffer"), head=modfit.head("token-cls", ["O", "B", "I"]))
    mm.activate("a")
    labels = torch.randint(0, 3, (2, 7))
    labels[1, -2:] = -100  # padding
    out = mm(**bert.encoder_inputs(), labels=labels)
    assert out.logits.shape == (2, 7, 3)
    keep = labels != -100
    expected = F.cross_entropy(out.logits[keep], labels[keep])
    torch.testing.assert_close(out.loss, expected)


@pytest.mark.parametrize("name", ["bert", "electra", "distilbert"])
def test_head_mode_mlm(tiny: Callable[[str], Family], name: str) -> None:
    family = tiny(name)  # ELECTRA's embeddings are 16 wide, its hidden states 32
    mm = modfit.wrap(family.build())
    mm.add("a", modfit.config("lora"), head=modfit.head("mlm"))
    mm.activate("a")
    inputs = family.encoder_inputs()
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[:, 2] = inputs["input_ids"][:, 2]
    out = mm(**inputs, labels=labels)
    assert out.logits.shape == (2, 7, 100)
    assert torch.isfinite(out.loss)
    embeddings = mm.model.get_input_embeddings().weight
    assert all(p is not embeddings for p in mm.module_parameters("a"))  # the decoder is tied, frozen


@pytest.mark.parametrize("method", ["lora", "pfeiffer_inv"])
def test_mlm_training_scores_only_the_labelled_positions(tiny: Callable[[str], Family], method: str) -> None:
    """In training mode (dropout 0 here) the MLM head scores the labelled rows only: the same loss and
    gradients as the full (batch, seq, vocab) scores of evaluation mode, logits (targets, vocab)."""
    family = tiny("bert")
    mm = modfit.wrap(family.build())
    mm.add("a", modfit.config(method), head=modfit.head("mlm"))
    _randomise(mm, "a")
    mm.activate("a")
    inputs = family.encoder_inputs()
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[0, 1], labels[0, 4], labels[1, 3] = 7, 11, 13

    def run(train: bool) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        mm.train(train)
        mm.zero_grad()
        out = mm(**inputs, labels=labels)
        out.loss.backward()
        return out.loss.detach(), out.logits.detach(), [p.grad.clone() for p in mm.module_parameters("a")]

    full_loss, full_logits, full_grads = run(train=False)
    loss, logits, grads = run(train=True)
    assert full_logits.shape == (2, 7, 100) and logits.shape == (3, 100)
    torch.testing.assert_close(logits, full_logits[labels != -100], rtol=0, atol=1e-5)
    torch.testing.assert_close(loss, full_loss, rtol=0, atol=1e-6)
    for got, want in zip(grads, full_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    labels.fill_(-100)  # nothing masked: a zero loss that still backpropagates, not NaN
    mm.train()
    out = mm(**inputs, labels=labels)
    assert out.loss.item() == 0.0 and out.logits.shape == (0, 100)
    out.loss.backward()


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_head_mode_causal_lm(tiny: Callable[[str], Family], name: str) -> None:
    family = tiny(name)
    mm = modfit.wrap(family.build())
    mm.add("a", modfit.config("lora"), head=modfit.head("causal-lm"))
    _randomise(mm, "a")
    mm.activate("a")
    assert mm.trainable_parameters("a", include_head=True) == mm.trainable_parameters("a")
    inputs = family.encoder_inputs()
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    with torch.no_grad():
        out = mm(**inputs, labels=labels)
        reference = mm.model(**inputs, labels=labels)  # the HF model with the module applied
    assert out.logits.shape == (2, 7, 100)
    torch.testing.assert_close(out.logits, reference.logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.loss, reference.loss, atol=1e-5, rtol=1e-5)


def test_head_mode_on_seq2seq_uses_the_encoder(tiny: Callable[[str], Family]) -> None:
    t5 = tiny("t5")
    mm = modfit.wrap(t5.build())
    mm.add("a", modfit.config("lora"), head=modfit.head("seq-cls", LABELS))
    mm.activate("a")
    inputs = t5.encoder_inputs()
    with torch.no_grad():  # (T5 in grad mode differs from no-grad mode in the last bits)
        out = mm(**inputs, labels=torch.tensor([1, 0]))
        encoded = mm.model.get_encoder()(**inputs).last_hidden_state
    torch.testing.assert_close(out.hidden_states, encoded, atol=0, rtol=0)
    assert out.logits.shape == (2, 2)


def test_set_head_replaces_head(mm: ModularModel) -> None:
    mm.add("a", modfit.config("lora"), head=modfit.head("seq-cls", LABELS))
    mm.set_head("a", modfit.head("token-cls", ["O", "B", "I"]))
    assert mm.records["a"].head.task == "token-cls"  # type: ignore[union-attr]
    assert mm.records["a"].card["task"] == "token-cls"
    assert mm.head_module("a").out.out_features == 3  # type: ignore[union-attr]


# -- models the table does not know ---------------------------------------------------------------------


class ToyConfig(transformers.PretrainedConfig):
    model_type = "modfit-toy"

    def __init__(self, vocab_size: int = 50, hidden_size: int = 16, num_layers: int = 2, **kwargs: Any):
        super().__init__(**kwargs)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers


class ToyBlock(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.mix = nn.Linear(hidden, hidden)
        self.gate = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.mix(x)) * torch.sigmoid(self.gate(x))


class ToyModel(transformers.PreTrainedModel):
    """A HuggingFace model of a type modfit's table does not know."""

    config_class = ToyConfig

    def __init__(self, config: ToyConfig) -> None:
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(ToyBlock(config.hidden_size) for _ in range(config.num_layers))
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> Any:
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x)
        return BaseModelOutput(last_hidden_state=x)


def _toy() -> ToyModel:
    torch.manual_seed(0)
    return ToyModel(ToyConfig()).eval()


def test_unknown_model_type_with_explicit_targets(tmp_path: Path) -> None:
    model = _toy()
    ids = torch.randint(0, 50, (2, 5))
    with torch.no_grad():
        base = model(ids).last_hidden_state
    mm = modfit.wrap(model)
    for config in (
        modfit.config("lora"),
        modfit.config("pfeiffer"),
        modfit.config("lora", targets="mix", layers="0"),
    ):
        with pytest.raises(modfit.TargetError, match="'modfit-toy' is not in modfit's architecture table"):
            mm.add("x", config)
    mm.add("suffix", modfit.config("lora", targets="mix"), head=modfit.head("seq-cls", LABELS))
    assert [p for p, _ in mm.units("suffix")] == ["blocks.0.mix", "blocks.1.mix"]
    mm.add("regex", modfit.config("lora", targets=r"re:blocks\.1\.(mix|gate)"))
    assert [p for p, _ in mm.units("regex")] == ["blocks.1.mix", "blocks.1.gate"]
    mm.add("all", modfit.config("lora", targets="all-linear"))
    assert sorted(p for p, _ in mm.units("all")) == sorted(
        f"blocks.{i}.{n}" for i in (0, 1) for n in ("mix", "gate")
    )
    with pytest.raises(modfit.TargetError, match=r"module names: gate, mix$"):
        mm.add("x", modfit.config("lora", targets="q_proj"))

    _randomise(mm, "suffix")
    mm.activate("suffix")
    with torch.no_grad():
        out = mm(input_ids=ids, labels=torch.tensor([0, 1]))
        assert not torch.allclose(out.hidden_states, base)
    mm.save("suffix", tmp_path / "suffix")
    mm2 = modfit.wrap(_toy())
    mm2.load(tmp_path / "suffix")
    mm2.activate("suffix")
    with torch.no_grad():
        assert torch.equal(mm2(input_ids=ids).logits, out.logits)
    for name in list(mm.module_names):
        mm.remove(name)
    with torch.no_grad():
        assert torch.equal(model(ids).last_hidden_state, base)


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def test_plain_torch_module() -> None:
    """Not even a HuggingFace model: LoRA by module name still works; heads need a hidden size."""
    torch.manual_seed(0)
    model = Mlp().eval()
    x = torch.randn(3, 4)
    mm = modfit.wrap(model)
    mm.add("a", modfit.config("lora", r=2, targets="re:fc.*"))
    assert [p for p, _ in mm.units("a")] == ["fc1", "fc2"]
    _randomise(mm, "a")
    mm.activate("a")
    with torch.no_grad():
        active = model(x)
    mm.merge("a")
    mm.deactivate()
    with torch.no_grad():
        torch.testing.assert_close(model(x), active, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="no hidden_size"):
        mm.add("b", modfit.config("lora", targets="fc1"), head=modfit.head("seq-cls", LABELS))
    assert mm.module_names == ["a"]


def test_default_base_resolves() -> None:
    folder = Path(modfit.DEFAULT_BASE)
    assert folder.is_dir()
    assert (folder / "config.json").is_file()
    with pytest.raises(AttributeError, match="no attribute 'NO_SUCH_THING'"):
        _ = modfit.NO_SUCH_THING  # type: ignore[attr-defined]
