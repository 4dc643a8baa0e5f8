"""Where one training step of bench/peers.py's configurations spends its time: a torch.profiler table.

    PYTHONPATH=src .venv/peer/bin/python bench/profile_step.py --system modfit --config lora
    PYTHONPATH=src .venv/peer/bin/python bench/profile_step.py --system peft --config lora --rows 12
    PYTHONPATH=src .venv/peer/bin/python bench/profile_step.py --system modfit --torch-dropout --torch-linear

The step is peers.py's (forward + backward + AdamW of module and head, train mode, batch `--batch` x
`--length`, `--threads` threads) on the model and configuration peers_build.py builds; two warm-up
steps, then `--steps` profiled ones. Prints the operators by self CPU time (the profiler's overhead
inflates small operators; compare shares, not absolute times).
`--torch-dropout`: modfit with `mm.fast_dropout = False`; `--torch-linear`: with `mm.fast_linear = False`.
"""

from __future__ import annotations

import argparse

import torch
from peers_build import build, load_base, train_step
from torch.profiler import profile


def main(argv: list[str] | None = None) -> int:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--system", default="modfit", help="modfit, peft or adapters")
    parser.add_argument("--config", default="lora", help="a peers_build.TRAIN_CONFIGS key")
    parser.add_argument("--model", default="minilm", help="minilm or bert-base")
    parser.add_argument("--torch-dropout", action="store_true")
    parser.add_argument("--torch-linear", action="store_true")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rows", type=int, default=20)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    built = build(args.system, args.config, load_base(args.model))
    if args.torch_dropout:
        built.net.fast_dropout = False
    if args.torch_linear:
        built.net.fast_linear = False
    step = train_step(built, args.batch, args.length)
    step()
    step()
    with profile() as trace:
        for _ in range(args.steps):
            step()
    print(trace.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
