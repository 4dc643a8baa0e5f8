"""modfit.fast_dropout: the masks have the right rate and scaling, gradients use the same mask, the
attention math equals torch's SDPA without dropout (masks, causal, GQA, dead rows), and a
ModularModel uses it exactly when it should (training, CPU, switch on, no compile, no activation
checkpointing), leaving no mode entered behind, even when the forward raises."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import transformers

import modfit
from modfit import fast_dropout
from modfit.cpu_kernels import CpuKernels
from modfit.fast_dropout import attention, dropout, keep_mask


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate(p: float) -> None:
    torch.manual_seed(0)
    n = 1 << 20
    kept = keep_mask((n,), p).double().mean().item()
    assert abs(kept - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)  # 5 standard deviations


def test_keep_mask_ends_and_odd_sizes() -> None:
    assert bool(keep_mask((3, 5), 0.0).all())
    assert not bool(keep_mask((3, 5), 1.0).any())
    assert keep_mask((7,), 0.5).shape == (7,)  # an odd count: half a 64-bit word left over


def test_seed_reproduces_masks() -> None:
    torch.manual_seed(3)
    a = keep_mask((4, 100), 0.3)
    torch.manual_seed(3)
    assert torch.equal(a, keep_mask((4, 100), 0.3))


def test_dropout_values_and_gradient() -> None:
    p = 0.25
    x = torch.randn(6, 50, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(0)
    y = dropout(x, p)
    torch.manual_seed(0)
    keep = keep_mask(x.shape, p)
    torch.testing.assert_close(y, torch.where(keep, x / (1 - p), 0.0), rtol=1e-15, atol=0)
    grad = torch.randn_like(y)
    y.backward(grad)
    assert x.grad is not None
    torch.testing.assert_close(x.grad, torch.where(keep, grad / (1 - p), 0.0), rtol=1e-15, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_dtype_and_non_finite_as_torch(dtype: torch.dtype) -> None:
    """The mask multiplies, as torch's dropout does: the input's dtype stays, a dropped inf is NaN."""
    x = torch.full((8, 64), float("inf"), dtype=dtype)
    torch.manual_seed(1)
    y = dropout(x, 0.5)
    torch.manual_seed(1)
    keep = keep_mask(x.shape, 0.5)
    assert y.dtype == dtype
    assert bool(torch.isinf(y[keep]).all()) and bool(torch.isnan(y[~keep]).all())
    assert bool(torch.isnan(F.dropout(x, 0.5)).any())  # torch's own: the same rule


def test_dropout_ends_and_bad_probability() -> None:
    x = torch.randn(3, 4)
    assert dropout(x, 0.0) is x
    assert torch.equal(dropout(x, 1.0), torch.zeros_like(x))
    with pytest.raises(ValueError, match="between 0 and 1"):
        dropout(x, 1.5)


def _qkv(heads: int = 4, kv_heads: int = 4, length: int = 6) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, heads, length, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, kv_heads, length, 8, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, kv_heads, length, 5, generator=g, dtype=torch.float64, requires_grad=True)
    return q, k, v


def _masks() -> Iterator[tuple[str, dict[str, Any]]]:
    bool_mask = torch.ones(2, 1, 6, 6, dtype=torch.bool)
    bool_mask[0, :, :, 4:] = False  # padding
    dead = bool_mask.clone()
    dead[1, :, 2, :] = False  # a row with nothing to attend to: torch gives zeros
    additive = torch.zeros(2, 1, 1, 6, dtype=torch.float64)
    additive[0, ..., 3:] = torch.finfo(torch.float64).min  # HF's padding mask
    yield "none", {}
    yield "bool", {"attn_mask": bool_mask}
    yield "dead row", {"attn_mask": dead}
    yield "additive", {"attn_mask": additive}
    yield "-inf row", {"attn_mask": torch.where(dead, 0.0, float("-inf")).double()}
    yield "causal", {"is_causal": True}
    yield "scale", {"scale": 0.3}


@pytest.mark.parametrize(("kind", "options"), list(_masks()), ids=[k for k, _ in _masks()])
def test_attention_equals_sdpa_without_dropout(kind: str, options: dict[str, Any]) -> None:
    ours, theirs = _qkv(), _qkv()
    out = attention(*ours, **options)
    expected = F.scaled_dot_product_attention(*theirs, **options)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    out.square().sum().backward()
    expected.square().sum().backward()
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12)


def test_attention_grouped_query_heads() -> None:
    ours, theirs = _qkv(4, 2), _qkv(4, 2)
    out = attention(*ours, enable_gqa=True)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(*theirs, enable_gqa=True))


def test_attention_dropout_is_the_formula_with_the_drawn_mask() -> None:
    q, k, v = _qkv()
    p = 0.2
    torch.manual_seed(1)
    out = attention(q, k, v, dropout_p=p)
    torch.manual_seed(1)
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    weights = (q2 @ k2.transpose(-2, -1) / math.sqrt(8)).softmax(-1)  # (2, 4, 6, 6)
    keep = keep_mask(weights.shape, p)
    expected = torch.where(keep, weights / (1 - p), 0.0) @ v2
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    for ours, theirs in ((q, q2), (k, k2), (v, v2)):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-12, atol=1e-12)


def test_mode_routes_only_what_it_should() -> None:
    x = torch.randn(4, 10)
    with CpuKernels(dropout=True, linear=False):
        torch.manual_seed(0)
        routed = F.dropout(x, 0.3, training=True)
        assert torch.equal(F.dropout(x, 0.3, training=False), x)
        kept = x.clone()
        assert F.dropout(kept, 0.3, True, True) is kept  # in place: torch's own
        meta = F.dropout(torch.empty(4, 10, device="meta"), 0.3)  # not CPU: torch's own
        assert meta.device.type == "meta"
        q, k, v = _qkv()
        plain = F.scaled_dot_product_attention(q, k, v)  # no dropout: torch's fused kernel
    torch.manual_seed(0)
    assert torch.equal(routed, dropout(x, 0.3))
    torch.testing.assert_close(plain, attention(q, k, v))


def _dropout_bert() -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
    )
    return transformers.BertModel(config, add_pooling_layer=False)


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the masks fast_dropout draws."""
    calls = [0]
    draw = fast_dropout.keep_mask

    def counting(shape: Any, p: float) -> torch.Tensor:
        calls[0] += 1
        return draw(shape, p)

    monkeypatch.setattr(fast_dropout, "keep_mask", counting)
    return calls


def _lora_model() -> modfit.ModularModel:
    mm = modfit.wrap(_dropout_bert())
    mm.add("m", modfit.config("lora", r=2), head=modfit.head("seq-cls", ["a", "b"]))
    mm.activate("m")
    mm.train()
    return mm


INPUTS = {"input_ids": torch.randint(1, 99, (2, 7)), "attention_mask": torch.ones(2, 7, dtype=torch.long)}


def test_model_uses_it_in_training(counted: list[int]) -> None:
    mm = _lora_model()
    assert mm.fast_dropout
    mm(**INPUTS, labels=torch.tensor([0, 1])).loss.backward()  # head mode: runs the encoder
    per_forward = counted[0]
    assert per_forward == 1 + 2 * 3  # embeddings; per layer attention, attention output, output
    mm.model(**INPUTS)  # the HF model itself
    assert counted[0] == 2 * per_forward
    assert torch._C._len_torch_function_stack() == 0


@pytest.mark.parametrize("why", ["eval", "switched off", "compiling", "checkpointing"])
def test_model_uses_torchs_dropout_otherwise(counted: list[int], why: str, monkeypatch: Any) -> None:
    mm = _lora_model()
    if why == "eval":
        mm.eval()
    elif why == "switched off":
        mm.fast_dropout = False
    elif why == "compiling":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    else:
        mm.gradient_checkpointing_enable()
    mm(**INPUTS, labels=torch.tensor([0, 1]))
    assert counted[0] == 0


def test_bfloat16_autocast_training_step(counted: list[int]) -> None:
    """Under CPU autocast the matrix products run in bfloat16 and softmax in float32: the backward of
    the dropout functions runs under the same autocast state, and every gradient is finite."""
    mm = _lora_model()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = mm(**INPUTS, labels=torch.tensor([0, 1])).loss
    loss.backward()
    assert counted[0] > 0
    grads = [p.grad for p in mm.module_parameters("m")]
    assert grads and all(g is not None and bool(torch.isfinite(g).all()) for g in grads)


def test_removing_every_module_removes_the_hooks(counted: list[int]) -> None:
    mm = _lora_model()
    mm.remove("m")
    assert not mm.model._forward_pre_hooks and not mm.model._forward_hooks
    mm.model(**INPUTS)
    assert counted[0] == 0


def test_mode_left_when_forward_raises() -> None:
    mm = _lora_model()
    with pytest.raises(IndexError):
        mm.model(input_ids=torch.full((1, 3), 500))  # beyond the vocabulary
    assert torch._C._len_torch_function_stack() == 0


def test_deep_copy_keeps_its_own_switch() -> None:
    mm = _lora_model()
    mm.fast_dropout = False
    twin = modfit.wrap(copy.deepcopy(mm.model))
    assert not twin.fast_dropout
    twin.fast_dropout = True
    assert not mm.fast_dropout
