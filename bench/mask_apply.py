"""How modfit's fast dropout applies its bool masks: a product through uint8 against `torch.where`.

    PYTHONPATH=src .venv/peer/bin/python bench/mask_apply.py                  # the operation alone
    PYTHONPATH=src .venv/peer/bin/python bench/mask_apply.py --steps 16 --config lora --model minilm

The operation alone: medians over `--repeats` calls, at the shapes of MiniLM's attention matrix and
hidden states (batch 16 x 128). With `--steps N`: peers.py's modfit training step (bench/peers_build.py)
alternating, step by step in one process, between `modfit.fast_dropout` as it ships and the same
module with its masks applied by `torch.where` (the way it applied them before); the masks and the
values are the same, only the kernels differ. Prints medians and the ratio of the medians.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from typing import Any

import torch
from _timing import step_times

from modfit import fast_dropout as fd


def _median_us(run: Callable[[], Any], repeats: int) -> float:
    return statistics.median(step_times(run, 3, repeats)) * 1e3


class _WhereDropout(torch.autograd.Function):
    """fd._Dropout with `torch.where` in place of the product (the reference)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, p: float) -> torch.Tensor:
        keep = fd.keep_mask(x.shape, p)
        ctx.save_for_backward(keep)
        ctx.scale = 1.0 / (1.0 - p)
        return torch.where(keep, x, 0.0).mul_(ctx.scale)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (keep,) = ctx.saved_tensors
        return torch.where(keep, grad, 0.0).mul_(ctx.scale), None


class _WhereTimesValue(torch.autograd.Function):
    """fd._DroppedTimesValue with `torch.where` in place of the product (the reference)."""

    @staticmethod
    def forward(ctx: Any, weights: torch.Tensor, keep: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weights, keep, value)
        return torch.where(keep, weights, 0.0) @ value

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, torch.Tensor]:
        weights, keep, value = ctx.saved_tensors
        grad_weights = torch.where(keep, grad @ value.transpose(-2, -1), 0.0)
        return grad_weights, None, torch.where(keep, weights, 0.0).transpose(-2, -1) @ grad


SHAPES = {"attention 16x12x128x128": (16, 12, 128, 128), "hidden 16x128x384": (16, 128, 384)}


def _operation(shape: tuple[int, ...], repeats: int) -> tuple[float, float]:
    x = torch.rand(shape)
    keep = fd.keep_mask(shape, 0.1)
    where = _median_us(lambda: torch.where(keep, x, 0.0), repeats)
    product = _median_us(lambda: fd._as_factor(keep, x.dtype).mul_(x), repeats)
    return where, product


def operation(repeats: int) -> None:
    for label, shape in SHAPES.items():
        where, product = _operation(shape, repeats)
        print(f"{label}: where {where:,.0f} us, product {product:,.0f} us, ratio {product / where:.2f}")


def steps(model: str, config: str, count: int) -> None:
    from peers_build import build, load_base, train_step

    step = train_step(build("modfit", config, load_base(model)))
    kernels = {
        "product": (fd._Dropout, fd._DroppedTimesValue),
        "where": (_WhereDropout, _WhereTimesValue),
    }
    times: dict[str, list[float]] = {name: [] for name in kernels}
    try:
        for i in range(count):
            for name in list(kernels)[:: 1 if i % 2 == 0 else -1]:  # alternate which goes first
                fd._Dropout, fd._DroppedTimesValue = kernels[name]  # type: ignore[misc]
                times[name] += step_times(step, 1, 1)  # one unmeasured step after each switch
    finally:
        fd._Dropout, fd._DroppedTimesValue = kernels["product"]  # type: ignore[misc]
    product, where = (statistics.median(times[name]) for name in ("product", "where"))
    ratio = product / where
    print(f"{model} {config} step: product {product:,.0f} ms, where {where:,.0f} ms, ratio {ratio:.3f}")


def main(argv: list[str] | None = None) -> int:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--steps", type=int, default=0, help="training steps of each kind (0: none)")
    parser.add_argument("--model", default="minilm", help="minilm or bert-base")
    parser.add_argument("--config", default="lora", help="a peers_build.TRAIN_CONFIGS key")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    operation(args.repeats)
    if args.steps:
        steps(args.model, args.config, args.steps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
