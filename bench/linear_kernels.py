"""torch's float32 `F.linear` (MKL on x86-64) against `modfit.fast_linear` (oneDNN), at a base model's shapes.

    .venv/bin/python bench/linear_kernels.py                              # BERT-base and MiniLM, 2 threads
    .venv/bin/python bench/linear_kernels.py --tokens 2048 --repeats 20 --threads 1
    .venv/bin/python bench/linear_kernels.py --tokens 1,2,4,16 --repeats 200   # a decoding step's sizes

For each projection shape (tokens x in -> out) it times, alternating the two kernels call by call,
the forward product and the input gradient's product (dout W, the one a frozen weight needs in
backward) and prints the medians, their ratio (oneDNN / torch) and each kernel's largest error
against a float64 reference. The machine's processor and both libraries' versions head the table.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from modfit import fast_linear

ONEDNN = fast_linear._inner_product  # x (rows, in), weight (out, in) in any strides, bias -> (rows, out)
SHAPES = {  # model -> (in, out) of its projections: q/k/v/attention output, FFN in, FFN out
    "bert-base": ((768, 768), (768, 3072), (3072, 768)),
    "minilm": ((384, 384), (384, 1536), (1536, 384)),
}


def _median_ms(a: Callable[[], object], b: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Medians of `a` and `b`, called alternately (one warm-up each)."""
    a(), b()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for run, out in ((a, times[0]), (b, times[1])):
            start = time.perf_counter()
            run()
            out.append((time.perf_counter() - start) * 1000)
    return statistics.median(times[0]), statistics.median(times[1])


def _error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return (value.double() - reference).abs().max().item()


def main(argv: list[str] | None = None) -> int:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--models", default="bert-base,minilm")
    parser.add_argument(
        "--tokens", default="2048", help="rows of the product (batch x length), comma-separated"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    if not fast_linear.available():
        print("modfit.fast_linear does not apply here (no oneDNN kernel, or not x86-64)")
        return 1
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cpu = platform.machine()
    with contextlib.suppress(OSError):  # Linux: the processor's model name
        names = [
            line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")
        ]
        cpu = names[0].split(":", 1)[1].strip() if names else cpu
    print(f"torch {torch.__version__}, {cpu}, {args.threads} threads")
    print(torch.__config__.show().splitlines()[3:5])  # the MKL and oneDNN lines
    print(
        "| model | tokens | in -> out | forward: torch ms | oneDNN ms | ratio | dout W: torch ms | oneDNN ms "
        "| ratio | error: torch | oneDNN |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    cases = [
        (m, int(t), shape)
        for m in args.models.split(",")
        for t in args.tokens.split(",")
        for shape in SHAPES[m]
    ]
    for model, tokens, (fan_in, fan_out) in cases:
        x = torch.randn(tokens, fan_in)
        weight = torch.randn(fan_out, fan_in) / fan_in**0.5
        bias = torch.randn(fan_out)
        grad = torch.randn(tokens, fan_out)
        forward = _median_ms(
            partial(F.linear, x, weight, bias), partial(ONEDNN, x, weight, bias), args.repeats
        )
        backward = _median_ms(
            partial(torch.mm, grad, weight), partial(ONEDNN, grad, weight.t(), None), args.repeats
        )
        reference = F.linear(x.double(), weight.double(), bias.double())
        errors = _error(F.linear(x, weight, bias), reference), _error(ONEDNN(x, weight, bias), reference)
        print(
            f"| {model} | {tokens} | {fan_in} -> {fan_out} | {forward[0]:.3g} | {forward[1]:.3g} | "
            f"{forward[1] / forward[0]:.2f} | {backward[0]:.3g} | {backward[1]:.3g} | "
            f"{backward[1] / backward[0]:.2f} | {errors[0]:.1e} | {errors[1]:.1e} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
