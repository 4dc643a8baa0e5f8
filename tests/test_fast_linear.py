"""modfit.fast_linear: oneDNN's float32 products give F.linear's values and gradients to float32
rounding (their error against float64 is of MKL's order), autograd keeps what it keeps for F.linear,
every case the kernel does not cover runs torch's own, and a ModularModel uses it exactly when it
should (switch on, no compile; in training, no checkpointing; in inference, products from MIN_MACS
multiply-adds), with the loss, gradients and outputs of torch's products."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
import transformers

import modfit
from modfit import fast_linear
from modfit.cpu_kernels import CpuKernels
from modfit.fast_linear import linear

pytestmark = pytest.mark.skipif(not fast_linear.available(), reason="no oneDNN kernel on this machine")
DEFAULT_MIN_MACS = fast_linear.MIN_MACS


@pytest.fixture(autouse=True)
def every_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel for inference products of every size, so the small operands here exercise it."""
    monkeypatch.setattr(fast_linear, "MIN_MACS", 0)


def _count_kernel_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls = [0]
    product = fast_linear._inner_product

    def counting(*args: Any) -> torch.Tensor:
        calls[0] += 1
        return product(*args)

    monkeypatch.setattr(fast_linear, "_inner_product", counting)
    return calls


def _operands(shape: tuple[int, ...], out: int, bias: bool, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    weight = torch.randn(out, shape[-1], generator=g) / shape[-1] ** 0.5
    b = torch.randn(out, generator=g) if bias else None
    return (x, weight, b) if bias else (x, weight)


def _error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return (value.double() - reference).abs().max().item()


@pytest.mark.parametrize("shape", [(48,), (5, 48), (3, 7, 48), (2, 3, 5, 48), (300, 768)])
@pytest.mark.parametrize("bias", [True, False])
def test_values_are_float32_products(shape: tuple[int, ...], bias: bool) -> None:
    operands = _operands(shape, 96 if shape[-1] == 48 else 3072, bias)
    reference = F.linear(*(t.double() for t in operands))
    ours, torchs = linear(*operands), F.linear(*operands)
    assert ours.shape == torchs.shape and ours.dtype == torch.float32
    # float32 rounding of sums of in-features terms: oneDNN sums in another order than MKL, not worse
    # than a few times MKL's error (measured: at most 2.5x, the largest 5.0e-06 at 768 -> 3072)
    assert _error(ours, reference) <= max(4 * _error(torchs, reference), 1e-6)
    torch.testing.assert_close(ours, torchs, rtol=1e-5, atol=1e-5)


def test_non_contiguous_input() -> None:
    x, weight, bias = _operands((7, 5, 48), 32, True)
    x = x.transpose(1, 2).contiguous().transpose(1, 2)  # (7, 5, 48), strided
    torch.testing.assert_close(linear(x, weight, bias), F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("trains", ["all", "input", "weight", "bias"])
def test_gradients_are_torchs(trains: str) -> None:
    x, weight, bias = _operands((4, 9, 64), 80, True)
    grads = {}
    for name, fn in (("ours", linear), ("torch", F.linear)):
        leaves = [t.clone().requires_grad_(trains in ("all", role)) for t, role in
                  ((x, "input"), (weight, "weight"), (bias, "bias"))]  # fmt: skip
        upstream = torch.randn(4, 9, 80, generator=torch.Generator().manual_seed(1))
        fn(*leaves).backward(upstream)
        grads[name] = [t.grad for t in leaves]
    for ours, theirs in zip(grads["ours"], grads["torch"], strict=True):
        assert (ours is None) == (theirs is None)
        if ours is not None:
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def _saved(fn: Any, x: torch.Tensor, weight: torch.Tensor) -> list[int]:
    """Storage addresses of the tensors autograd keeps for backward of fn(x, weight)."""
    kept: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        kept.append(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x, weight)
    return kept


@pytest.mark.parametrize("trains", ["input", "weight"])
def test_keeps_what_torch_keeps(trains: str) -> None:
    """A frozen weight: only the weight is kept (the input is not, as in F.linear); a weight that
    trains on an input that needs no gradient: only the input."""
    x, weight = _operands((6, 32), 16, False)
    x.requires_grad_(trains == "input")
    weight.requires_grad_(trains == "weight")
    ours = _saved(linear, x, weight)
    kept = weight if trains == "input" else x
    assert ours == [kept.untyped_storage().data_ptr()]
    assert set(ours) <= set(_saved(F.linear, x, weight))


def test_twice_differentiable_is_refused() -> None:
    x, weight = _operands((3, 8), 4, False)
    x.requires_grad_()
    (grad,) = torch.autograd.grad(linear(x, weight).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad.sum().backward()


def test_torchs_own_where_it_does_not_apply(monkeypatch: pytest.MonkeyPatch) -> None:
    """float64, bfloat16, autocast, oneDNN switched off, no kernel, a shape mismatch: torch's F.linear."""
    calls = _count_kernel_calls(monkeypatch)
    x, weight, bias = _operands((5, 16), 8, True)
    for dtype in (torch.float64, torch.bfloat16):
        cast = [t.to(dtype) for t in (x, weight, bias)]
        assert torch.equal(linear(*cast), F.linear(*cast))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert linear(x, weight, bias).dtype == torch.bfloat16
    torch.backends.mkldnn.enabled = False  # (its flags() context also sets TF32 for Intel GPUs: a warning)
    try:
        assert torch.equal(linear(x, weight, bias), F.linear(x, weight, bias))
    finally:
        torch.backends.mkldnn.enabled = True
    with pytest.raises(RuntimeError):  # torch's own error for a shape mismatch
        linear(x, weight[:, :15], bias)
    assert calls[0] == 0
    linear(x, weight, bias)
    assert calls[0] == 1
    monkeypatch.setattr(fast_linear, "available", lambda: False)
    assert torch.equal(linear(x, weight, bias), F.linear(x, weight, bias))
    assert calls[0] == 1


def test_mode_routes_linear_calls() -> None:
    x, weight, bias = _operands((5, 16), 8, True)
    with CpuKernels(dropout=False, linear=True):
        routed = F.linear(x, weight, bias=bias)
        kept = F.dropout(x, 0.5)  # the dropout kernel is off: torch's own
    assert routed.grad_fn is None and torch.equal(routed, linear(x, weight, bias))
    assert kept.shape == x.shape


def test_small_inference_products_stay_torchs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Below MIN_MACS (rows x in x out) a product that needs no gradient is torch's: oneDNN's fixed
    cost per call makes it the slower one there (a decoding step's single row)."""
    monkeypatch.setattr(fast_linear, "MIN_MACS", DEFAULT_MIN_MACS)
    calls = _count_kernel_calls(monkeypatch)
    weight = _operands((384,), 384, False)[1]
    one_row = torch.randn(1, 1, 384)
    assert torch.equal(linear(one_row, weight), F.linear(one_row, weight))
    assert calls[0] == 0
    rows = torch.randn(2, 8, 384)  # 16 x 384 x 384 multiply-adds
    torch.testing.assert_close(linear(rows, weight), F.linear(rows, weight), rtol=1e-5, atol=1e-5)
    assert calls[0] == 1
    one_row.requires_grad_()  # training: every size (a backward needs the autograd function)
    linear(one_row, weight).sum().backward()
    assert calls[0] == 3 and one_row.grad is not None


def test_no_autograd_record_without_gradients() -> None:
    x, weight, bias = _operands((4, 16), 8, True)
    weight.requires_grad_()
    with torch.no_grad():
        assert linear(x, weight, bias).grad_fn is None
    with torch.inference_mode():
        out = linear(x, weight, bias)
    assert out.is_inference() and torch.allclose(out, F.linear(x, weight, bias).detach(), atol=1e-6)
    assert linear(x, weight.detach(), bias).grad_fn is None


# -- in a ModularModel ------------------------------------------------------------------------------


def _bert(dropout: float = 0.0) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    return transformers.BertModel(config, add_pooling_layer=False)


def _lora_model(dropout: float = 0.0) -> modfit.ModularModel:
    mm = modfit.wrap(_bert(dropout))
    mm.add("m", modfit.config("lora", r=2), head=modfit.head("seq-cls", ["a", "b"]))
    mm.activate("m")
    with torch.no_grad():  # B away from zero, so gradients reach A too
        for p in mm.module_parameters("m"):
            p.normal_(0, 0.1)
    mm.train()
    return mm


INPUTS = {"input_ids": torch.randint(1, 99, (2, 7)), "attention_mask": torch.ones(2, 7, dtype=torch.long)}
LABELS = torch.tensor([0, 1])


def test_model_uses_it_in_training(fast_linear_calls: list[int]) -> None:
    mm = _lora_model()
    assert mm.fast_linear
    mm(**INPUTS, labels=LABELS).loss.backward()
    # per layer: q, k, v, attention output, FFN in and out, and LoRA's down-projections on q and v
    # (the head is modfit's)
    assert fast_linear_calls[0] == 2 * (6 + 2)


@pytest.mark.parametrize("why", ["switched off", "compiling", "checkpointing"])
def test_model_uses_torchs_products_otherwise(
    fast_linear_calls: list[int], why: str, monkeypatch: Any
) -> None:
    mm = _lora_model()
    if why == "switched off":
        mm.fast_linear = False
    elif why == "compiling":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    else:  # the recomputation would run torch's F.linear, which saves other tensors: refused by torch
        mm.gradient_checkpointing_enable()
    mm(**INPUTS, labels=LABELS).loss.backward()
    assert fast_linear_calls[0] == 0


@pytest.mark.parametrize("checkpointing", [False, True])
def test_model_uses_it_in_inference(fast_linear_calls: list[int], checkpointing: bool) -> None:
    """eval (checkpointing plays no part there): the base's products by oneDNN, the outputs torch's
    to float32 rounding; switched off, torch's exactly."""
    mm = _lora_model()
    if checkpointing:
        mm.gradient_checkpointing_enable()
    mm.eval()
    with torch.no_grad():
        ours = mm(**INPUTS).logits
        # as in training, but one LoRA down-projection per layer: query's and value's A stacked
        # (methods/lora_shared.py)
        assert fast_linear_calls[0] == 2 * (6 + 1)
        mm.fast_linear = False
        torchs = mm(**INPUTS).logits
    assert fast_linear_calls[0] == 2 * (6 + 1)
    torch.testing.assert_close(ours, torchs, rtol=1e-5, atol=1e-6)


def _loss_and_grads(mm: modfit.ModularModel) -> tuple[torch.Tensor, list[torch.Tensor]]:
    mm.zero_grad()
    torch.manual_seed(0)  # the head's own dropout
    loss = mm(**INPUTS, labels=LABELS).loss
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in mm.parameters() if p.grad is not None]


def test_training_step_equals_torchs() -> None:
    mm = _lora_model()
    loss, grads = _loss_and_grads(mm)
    mm.fast_linear = False
    loss_torch, grads_torch = _loss_and_grads(mm)
    torch.testing.assert_close(loss, loss_torch, rtol=1e-5, atol=1e-6)
    assert len(grads) == len(grads_torch) > 0
    for ours, theirs in zip(grads, grads_torch, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("alpha", [1.0, 2.5])
def test_add_product_is_addmm(alpha: float, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    c, a, b = torch.randn(48, 40), torch.randn(48, 8), torch.randn(8, 40)
    called: list[str] = []
    binary = torch.ops.mkldnn._linear_pointwise.binary
    assert fast_linear._has_binary_add()  # checked (and cached) before the spy goes in

    class Spy:  # stands in for torch.ops.mkldnn._linear_pointwise, records oneDNN's use
        def binary(self, *args: Any) -> torch.Tensor:
            called.append("onednn")
            return binary(*args)

    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", Spy())
    expected = torch.addmm(c.double(), a.double(), b.double(), alpha=alpha)
    out = fast_linear.add_product(c, a, b, alpha)
    assert called == ["onednn"]
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=0)
    assert torch.equal(c, c.clone()) and out.data_ptr() != c.data_ptr()  # a new tensor


def test_add_product_leaves_other_cases_to_torch() -> None:
    c, a, b = (
        torch.randn(6, 5, dtype=torch.float64),
        torch.randn(6, 2, dtype=torch.float64),
        torch.randn(2, 5),
    )
    out = fast_linear.add_product(c, a, b.double(), 3.0)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, torch.addmm(c, a, b.double(), alpha=3.0))
    leaf = torch.randn(2, 5, requires_grad=True)  # gradient recorded: torch's addmm, which has a backward
    out = fast_linear.add_product(c.float(), a.float(), leaf)
    out.sum().backward()
    assert leaf.grad is not None
    strided = torch.randn(5, 6).t()  # (6, 5), not contiguous
    torch.testing.assert_close(
        fast_linear.add_product(strided, a.float(), b), torch.addmm(strided, a.float(), b), atol=1e-6, rtol=0
    )
