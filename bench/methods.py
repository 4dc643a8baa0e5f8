"""Every registered method on the packaged MiniLM: trainable parameters, training step time, peak memory.

    .venv/bin/python bench/methods.py                     # all methods, default configs
    .venv/bin/python bench/methods.py --methods lora,ia3 --batch 16 --length 128 --steps 10 --json

Each method runs in its own subprocess so that its peak resident memory (ru_maxrss) is its own.
A step is one forward + backward + AdamW step of a seq-cls head and the module (the base frozen),
on random token ids of the given shape, with `--threads` torch threads. The reported step time is
the median over `--steps` steps after `--warmup` unmeasured ones. "full" is full fine-tuning of
the same model and head, the reference. Later benchmarks run PEFT and AdapterHub `adapters` in
the same way beside these rows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from typing import Any

from _timing import peak_rss_kib, run_child, step_times


def measure(method: str, batch: int, length: int, steps: int, warmup: int, threads: int) -> dict[str, Any]:
    """Train-step time and peak memory of one method (runs in the current process)."""
    import torch

    import modfit
    from modfit.base import load_base

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    rss_before = peak_rss_kib()
    model = load_base("default")
    mm = modfit.wrap(model)
    head = modfit.head("seq-cls", ["a", "b"])
    if method == "full":
        mm.add("full", modfit.config("lora", r=1), head=head)  # a 1-rank module only to carry the head
        mm.activate("full")
        params = list(model.parameters())
        for p in params:
            p.requires_grad_(True)
        carrier = {id(p) for p in mm.module_parameters("full")}  # the rank-1 module and the head
        trainable = sum(p.numel() for p in params if id(p) not in carrier)
    else:
        mm.add("bench", modfit.config(method), head=head)  # method names need not be module names
        mm.activate("bench")
        params = mm.train_only("bench")
        trainable = mm.trainable_parameters("bench")
    optimizer = torch.optim.AdamW([p for p in params if p.requires_grad], lr=1e-4)
    ids = torch.randint(1000, 20000, (batch, length))
    labels = torch.randint(0, 2, (batch,))
    mask = torch.ones_like(ids)
    mm.train()

    def step() -> None:
        loss = mm(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = step_times(step, warmup, steps)
    peak_kib = peak_rss_kib()
    return {
        "method": method,
        "trainable_parameters": int(trainable),
        "step_ms": statistics.median(times),
        "peak_rss_mib": peak_kib / 1024,
        "peak_rss_delta_mib": (peak_kib - rss_before) / 1024,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", help="comma-separated (default: every registered method, then full)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one method here
    args = parser.parse_args(argv)
    shape = (args.batch, args.length, args.steps, args.warmup, args.threads)
    if args.one:
        print(json.dumps(measure(args.one, *shape)))
        return 0
    import modfit
    from modfit.registry import method_entry

    standalone = [m for m in modfit.methods() if method_entry(m).standalone]  # fusion needs other modules
    names = args.methods.split(",") if args.methods else [*standalone, "full"]
    rows = []
    for name in names:
        command = [
            sys.executable,
            __file__,
            "--one",
            name,
            "--batch",
            str(args.batch),
            "--length",
            str(args.length),
        ]
        command += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads)]
        row = run_child(command)
        rows.append({"method": name, **row} if "error" in row else row)
        if not args.json:
            _print_row(rows[-1])
    if args.json:
        print(json.dumps({"batch": args.batch, "length": args.length, "threads": args.threads, "rows": rows}))
    return 0


def _print_row(row: dict[str, Any]) -> None:
    if "error" in row:
        print(f"{row['method']:<16} error: {row['error']}")
        return
    print(
        f"{row['method']:<16} {row['trainable_parameters']:>12,} params  {row['step_ms']:>8.0f} ms/step  "
        f"peak {row['peak_rss_mib']:>7.0f} MiB"
    )


if __name__ == "__main__":
    sys.exit(main())
