"""One projection with a LoRA module, in inference: what the branch adds against what folding adds.

    .venv/bin/python bench/fold_cost.py                               # widths 384, 768; 16..2048 rows
    .venv/bin/python bench/fold_cost.py --widths 1024 --tokens 64,512,4096 --repeats 400

For each square width and number of rows (tokens), the median µs over `--repeats` calls, each kind
timed in turn round after round, of:

- `base`: the projection alone, x Wᵀ + b, as modfit runs it (`fast_linear.linear`);
- `branch`: the base plus LoRA's two products as the unfolded forward runs them (x Aᵀ, then its
  in-place `addmm_` into the output);
- `folded`: W + s·BA formed by `fast_linear.add_product` (oneDNN, the sum in the product), then the
  base product with it (src/modfit/folding.py);
- `addmm`: the same W + s·BA formed by `torch.addmm` alone, and `oneDNN`: by `add_product` alone.

It prints what `branch` and `folded` add to `base`, and the number of rows from which LoRA folds
(`methods.lora.fold_tokens`: 2 · in · out / (in + out)). Rank `--rank`, 2 threads by default.
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from collections.abc import Callable

import torch
from _timing import timed

from modfit import fast_linear
from modfit.methods.lora import fold_tokens


def kinds(tokens: int, width: int, rank: int) -> dict[str, Callable[[], object]]:
    x, weight, bias = torch.randn(tokens, width), torch.randn(width, width), torch.randn(width)
    a, b, scale = torch.randn(rank, width), torch.randn(width, rank), 2.0

    def branch() -> object:
        h = fast_linear.linear(x, weight, bias)  # (tokens, out)
        return h.addmm_(fast_linear.linear(x, a), b.t(), alpha=scale)  # + s (x Aᵀ) Bᵀ

    def folded() -> object:
        return fast_linear.linear(x, fast_linear.add_product(weight, b, a, scale), bias)

    return {
        "base": lambda: fast_linear.linear(x, weight, bias),
        "branch": branch,
        "folded": folded,
        "addmm": lambda: torch.addmm(weight, b, a, alpha=scale),
        "oneDNN": lambda: fast_linear.add_product(weight, b, a, scale),
    }


def main(argv: list[str] | None = None) -> int:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--widths", default="384,768")
    parser.add_argument("--tokens", default="16,64,128,256,512,1024,2048")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"{args.threads} threads, rank {args.rank}; median µs of {args.repeats} calls")
    print("| width | rows | base | branch adds | folded adds | W + s·BA: addmm | oneDNN |")
    print("|---|---|---|---|---|---|---|")
    for width in (int(w) for w in args.widths.split(",")):
        threshold = fold_tokens(width, width)
        for tokens in (int(t) for t in args.tokens.split(",")):
            runs = kinds(tokens, width, args.rank)
            us: dict[str, list[float]] = defaultdict(list)
            for _ in range(args.repeats):
                for name, run in runs.items():
                    us[name].append(timed(run) * 1000)
            med = {name: statistics.median(values) for name, values in us.items()}
            mark = " (folds)" if tokens >= threshold else ""
            print(
                f"| {width} | {tokens}{mark} | {med['base']:.1f} | {med['branch'] - med['base']:+.1f} | "
                f"{med['folded'] - med['base']:+.1f} | {med['addmm']:.1f} | {med['oneDNN']:.1f} |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
