"""What an unmerged LoRA module adds to an inference forward in modfit, and where: one model, its
module switched on and off in turn (the same weights in memory, so no copy's placement differs).

    PYTHONPATH=src .venv/peer/bin/python bench/lora_overhead.py --model minilm --rounds 4
    PYTHONPATH=src .venv/peer/bin/python bench/lora_overhead.py --model bert-base --rounds 2 --passes 5

Each round profiles `--passes` forwards (eval, no_grad, batch `--batch` x `--length`) with the module
off, then on (the order flips every round), after one unprofiled warm-up forward each, and prints per
forward: wall time, the operators' summed self CPU time, the LoRA module's own operators (its
down-projection, an `F.linear` onto r rows, and its `addmm_`), and the largest changes per operator
and input shape. The profiler inflates small operators; compare the on/off pairs, not absolute times.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from collections.abc import Callable

import torch
from peers_build import build, load_base
from torch.profiler import ProfilerActivity, profile

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
    return sum(ms for key, ms in ops.items() if key.startswith("aten::addmm_") or f", [{RANK}, " in key)


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
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    built = build("modfit", "lora", load_base(args.model), head=False)
    built.net.eval()
    ids = torch.randint(1000, 20000, (args.batch, args.length), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)

    def run() -> object:
        return built.hidden(ids, mask)

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
