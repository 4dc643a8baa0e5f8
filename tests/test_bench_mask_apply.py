"""bench/mask_apply.py times modfit's dropout kernels against `torch.where` ones: both must compute the
same values and gradients from the same masks, or the comparison would time two different things."""

from __future__ import annotations

from typing import Any

import torch

from load_script import load_script
from modfit import fast_dropout as fd


def _bench() -> Any:
    return load_script("bench/mask_apply.py", "bench_mask_apply")


def _backward(out: torch.Tensor) -> None:
    out.backward(torch.linspace(-1, 1, out.numel()).view(out.shape))


def _dropout(kernel: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_()
    torch.manual_seed(1)
    out = kernel.apply(x, 0.3)
    _backward(out)
    assert x.grad is not None
    return out.detach(), x.grad


def _times_value(kernel: Any, weights: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, ...]:
    weights, value = weights.clone().requires_grad_(), value.clone().requires_grad_()
    torch.manual_seed(2)
    out = kernel.apply(weights, fd.keep_mask(weights.shape, 0.3), value)
    _backward(out)
    assert weights.grad is not None and value.grad is not None
    return out.detach(), weights.grad, value.grad


def test_reference_kernels_equal_the_shipped_ones() -> None:
    bench = _bench()
    torch.manual_seed(0)
    x, weights, value = torch.randn(3, 7, 16), torch.rand(2, 3, 5, 6), torch.randn(2, 3, 6, 4)
    pairs = [
        (_dropout(fd._Dropout, x), _dropout(bench._WhereDropout, x)),
        (
            _times_value(fd._DroppedTimesValue, weights, value),
            _times_value(bench._WhereTimesValue, weights, value),
        ),
    ]
    for shipped, reference in pairs:
        for a, b in zip(shipped, reference, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_operation_timing_runs() -> None:
    where, product = _bench()._operation((2, 3, 8), repeats=2)
    assert where > 0 and product > 0
