"""What an unmerged LoRA module adds to an inference forward in modfit, and where: one model, its
module switched on and off in turn (the same weights in memory, so no copy's placement differs).

    PYTHONPATH=src .venv/peer/bin/python bench/lora_overhead.py --model minilm --rounds 4
    PYTHONPATH=src .venv/peer/bin/python bench/lora_overhead.py --model bert-base --rounds 2 --passes 5

Each round profiles `--passes` forwards (eval, no_grad, batch `--batch` x `--length`) with the module
off, then on (the order flips every round), after one unprofiled warm-up forward each, and prints per
forward: wall time, the operators' summed self CPU time, the LoRA module's own operators (its
down-projection, an `F.linear` onto r rows or 2r for query's and value's A stacked, and its
`addmm_`; folded, W + s·BA formed by one oneDNN product per projection, `fast_linear.add_product`,
src/modfit/folding.py), and the largest changes per operator and input shape. The profiler inflates
small operators; compare the on/off pairs, not absolute times. `--unfolded` profiles the branch's two
products instead of the folded weight (`mm.fold_per_call = False`).

    PYTHONPATH=src .venv/peer/bin/python bench/lora_overhead.py --model bert-base --pieces 10

`--pieces N` times instead, without the profiler, N on/off pairs (order flipping every pair) for each
of four versions of the LoRA unit's forward, interleaved: `hooks` (the site runs it, it adds nothing),
`down` (its down-projection alone, shared with its sibling as shipped, result dropped), `up` (its
in-place up-projection alone, from a stand-in of the down-projection's result kept per unit) and
`whole` (the branch as shipped). It prints the median ms each adds per forward, and what one unit's
two products take per forward on their own, on tensors of the model's shapes that stay in cache (one
call after another on the same tensors). Always with `mm.fold_per_call = False`: a folded call runs
no branch (`bench/peers.py --parts overhead --variants unfolded` compares the two ways).
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
from collections import defaultdict
from collections.abc import Callable

import torch
from _timing import timed
from peers_build import Built, build, load_base, token_batch
from torch.profiler import ProfilerActivity, profile

from modfit import fast_linear
from modfit.methods.lora import LoraUnit
from modfit.sites import SiteCall

RANK = 8  # peers_build's LoRA rank: its down-projection is the F.linear whose weight has RANK rows


def _profiled(run: Callable[[], object], passes: int) -> tuple[float, dict[str, float]]:
    """(wall ms per forward, {operator and shapes: self CPU ms per forward})."""
    run()  # warm-up
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        start = time.perf_counter()
        for _ in range(passes):
            run()
        wall = (time.perf_counter() - start) * 1000 / passes
    ops = {
        f"{e.key} {e.input_shapes[:2]}": e.self_cpu_time_total / 1000 / passes
        for e in prof.key_averages(group_by_input_shape=True)
    }
    return wall, ops


def _lora_own(ops: dict[str, float]) -> float:
    """The LoRA module's operators: its down-projections onto r rows, or 2r for query's and value's
    A stacked (methods/lora_shared.py) with the stacking and the split, and its addmm_; or, folded,
    the product forming W + s·BA from W (out, in) and B (out, r)."""
    own = ("aten::addmm_", "aten::cat", "aten::split_with_sizes")
    # the second input is A, (r or 2r, in); forming the folded weight, torch's addmm gets B (out, r)
    # second, oneDNN's product (fast_linear.add_product) first
    weight = re.compile(
        rf", \[({RANK}|{2 * RANK}), \d+\]\]$|^aten::addmm \[.*, {RANK}\]\]$|^mkldnn::\w+ \[\[\d+, {RANK}\]"
    )
    return sum(ms for key, ms in ops.items() if key.startswith(own) or weight.search(key))


def _hooks_only(unit: LoraUnit, h: torch.Tensor, call: SiteCall) -> torch.Tensor:
    return h


def _down_only(unit: LoraUnit, h: torch.Tensor, call: SiteCall) -> torch.Tensor:
    unit.down_projection(call.inputs[0], call)
    return h


def _up_only(unit: LoraUnit, h: torch.Tensor, call: SiteCall) -> torch.Tensor:
    assert call.writable, "the bench expects LoRA's in-place inference path"
    h2d = h.view(-1, h.shape[-1])  # (tokens, out)
    xa = unit.__dict__.get("_bench_xa")  # a stand-in for x Aᵀ: (tokens, r)
    if xa is None or xa.shape[0] != h2d.shape[0]:
        xa = unit.__dict__["_bench_xa"] = torch.randn(h2d.shape[0], unit.lora_A.shape[0])
    h2d.addmm_(xa, unit.lora_B.t(), alpha=unit.scale)
    return h


PIECES: dict[str, Callable[[LoraUnit, torch.Tensor, SiteCall], torch.Tensor]] = {
    "hooks": _hooks_only,
    "down": _down_only,
    "up": _up_only,
    "whole": LoraUnit.forward,
}


def _pieces(built: Built, run: Callable[[], object], pairs: int) -> dict[str, float]:
    """Median ms per forward that each version of LoRA's forward adds (see the module docstring)."""
    handle = built.handle
    added: dict[str, list[float]] = defaultdict(list)
    shipped = LoraUnit.forward
    try:
        for rep in range(pairs):
            for piece, forward in PIECES.items():
                LoraUnit.forward = forward  # type: ignore[method-assign]
                ms = {}
                for on in (True, False) if rep % 2 == 0 else (False, True):
                    handle.activate("m") if on else handle.deactivate()
                    ms[on] = timed(run)
                added[piece].append(ms[True] - ms[False])
    finally:
        LoraUnit.forward = shipped  # type: ignore[method-assign]
    return {piece: statistics.median(values) for piece, values in added.items()}


def _in_cache(tokens: int, width: int, sites: int, repeats: int = 200) -> tuple[float, float]:
    """ms per forward of `sites` down- and up-projections on tensors that stay in cache, by the
    kernels a model's forward uses (the down-projection through modfit.fast_linear, as routed)."""
    x, h = torch.randn(tokens, width), torch.randn(tokens, width)
    a, b, xa = torch.randn(RANK, width), torch.randn(width, RANK), torch.randn(tokens, RANK)
    out = []
    for step in (lambda: fast_linear.linear(x, a), lambda: h.addmm_(xa, b.t(), alpha=2.0)):
        out.append(statistics.median(timed(step) for _ in range(repeats)) * sites)
    return out[0], out[1]


def main(argv: list[str] | None = None) -> int:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--model", default="minilm", help="minilm or bert-base")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--passes", type=int, default=10)
    parser.add_argument("--rows", type=int, default=8, help="operators listed by their change")
    parser.add_argument("--pieces", type=int, default=0, help="time the forward's pieces over N pairs")
    parser.add_argument("--unfolded", action="store_true", help="profile the branch, not the folded weight")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    built = build("modfit", "lora", load_base(args.model), head=False)
    built.net.eval()
    built.handle.fold_per_call = not (args.unfolded or args.pieces)  # the pieces are the branch's
    ids, mask = token_batch(args.batch, args.length)

    def run() -> object:
        return built.hidden(ids, mask)

    if args.pieces:
        with torch.no_grad():
            added = _pieces(built, run, args.pieces)
            sites = sum(isinstance(m, LoraUnit) for m in built.handle.modules())
            width = built.handle.model.config.hidden_size
            down, up = _in_cache(args.batch * args.length, width, sites)
        print(
            f"{args.model}, batch {args.batch} x {args.length}, {args.threads} threads, {sites} LoRA sites; "
            f"median ms added per forward over {args.pieces} on/off pairs:"
        )
        for piece, ms in added.items():
            print(f"  {piece:<6} {ms:+7.2f}")
        print(f"the same products in cache, per forward: down {down:.2f}, up {up:.2f}")
        return 0

    walls: dict[str, list[float]] = defaultdict(list)
    ops: dict[str, dict[str, list[float]]] = {"off": defaultdict(list), "on": defaultdict(list)}
    with torch.no_grad():
        for round_ in range(args.rounds):
            for state in ("off", "on") if round_ % 2 == 0 else ("on", "off"):
                if state == "on":
                    built.handle.activate("m")
                else:
                    built.handle.deactivate()
                wall, per_op = _profiled(run, args.passes)
                walls[state].append(wall)
                for key, ms in per_op.items():
                    ops[state][key].append(ms)
    med = {s: {k: statistics.median(v) for k, v in ops[s].items()} for s in ops}
    wall = {s: statistics.median(walls[s]) for s in walls}
    total = {s: sum(med[s].values()) for s in med}
    print(
        f"{args.model}, batch {args.batch} x {args.length}, {args.threads} threads; medians of {args.rounds} "
        f"rounds of {args.passes} forwards"
    )
    print(f"wall ms per forward: off {wall['off']:.1f}, on {wall['on']:.1f} ({wall['on'] / wall['off']:.3f})")
    added = total["on"] - total["off"]
    print(f"operators' self CPU ms: off {total['off']:.1f}, on {total['on']:.1f} ({added:+.1f})")
    print(f"  of which the LoRA module's own operators: {_lora_own(med['on']):.1f}")
    changes = {k: med["on"].get(k, 0.0) - med["off"].get(k, 0.0) for k in set(med["on"]) | set(med["off"])}
    print("largest changes per operator and shapes (ms per forward, on - off):")
    for key, change in sorted(changes.items(), key=lambda kv: -abs(kv[1]))[: args.rows]:
        print(f"  {change:+6.2f}  {key}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
