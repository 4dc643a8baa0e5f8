"""Learned routing on the packaged MiniLM: two modules trained on different demo tasks, then a router
over them trained on a mixed data set; held-out accuracy and where the router sends each task.

    .venv/bin/python bench/routing.py                                  # dense, top-1 and Gumbel routers
    .venv/bin/python bench/routing.py --modes top_k --seeds 0,1 --router-steps 60

1. `sentiment` (LoRA r=8 on query/value, its own head) is trained on demo sentiment data, `topic` (the
   same) on demo topic data: fixed subsets of 384 training examples each, 48 steps of 16 at lr 2e-3.
2. For each router mode, a router module over (sentiment, topic) at the example level with a fresh head
   over the union of the labels (2 sentiment + 4 topic labels) trains on the two training sets mixed
   (768 examples), the modules frozen: `moe(sentiment, topic)`.
3. Reported on the two test subsets (200 each): accuracy over the 6 labels, and the usage of each module
   on each task's test examples (`ModularModel.unit_metrics()` after evaluating that task alone).
   "uniform" is the same router with temperature 1e4 (weights 1/2 each: `average(...)` plus a trained
   head), the reference a learned router should beat or match while routing each task to its module;
   its usage is the argmax of near-equal weights and means nothing.

Runs on one thread by default (the machine is shared). The default run took 2.4 CPU minutes, 7 minutes of
wall time on a busy 2-core machine. The README's Routing section has the numbers for seeds 0 and 1.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch

import modfit
from modfit.base import load_base, load_tokenizer
from modfit.batching import collate, encode
from modfit.data import label_list, read_examples
from modfit.demo import demo_data_path
from modfit.train import TrainSettings, evaluate, train

TRAIN, TEST, LENGTH, BATCH = 384, 200, 48, 16
ROUTERS: dict[str, dict[str, Any]] = {
    "uniform": {"mode": "dense", "temperature": 1e4},
    "dense": {"mode": "dense"},
    "top_k": {"mode": "top_k", "k": 1, "renormalize": False},
    "gumbel_softmax": {"mode": "gumbel_softmax", "temperature": 1.0, "final_temperature": 0.3},
}


def subset(task: str, split: str, size: int) -> list[Any]:
    examples = read_examples(demo_data_path(f"{task}_{split}.csv"), "seq-cls")
    return examples[:: max(len(examples) // size, 1)][:size]  # the files alternate labels in blocks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default="uniform,dense,top_k,gumbel_softmax")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--module-steps", type=int, default=48)
    parser.add_argument("--router-steps", type=int, default=48)
    parser.add_argument("--router-lr", type=float, default=5e-3)
    parser.add_argument("--load-balance", type=float, default=0.01)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer("default")
    tasks = ("sentiment", "topic")
    data = {t: (subset(t, "train", TRAIN), subset(t, "test", TEST)) for t in tasks}
    own = {t: tuple(label_list(data[t][0])) for t in tasks}
    union = own["sentiment"] + own["topic"]

    def features(examples: list[Any], labels: tuple[str, ...]) -> list[dict[str, Any]]:
        return encode(examples, tokenizer, "seq-cls", labels=labels, max_length=LENGTH)

    def collate_fn(batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return collate(batch, tokenizer.pad_token_id)

    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        torch.manual_seed(seed)
        mm = modfit.wrap(load_base("default"))
        start = time.perf_counter()
        alone = {}
        for t in tasks:  # 1. one module per task, with its own head
            mm.add(t, modfit.config("lora", r=8), head=modfit.head("seq-cls", own[t]))
            mm.activate(t)
            settings = TrainSettings(
                steps=args.module_steps,
                lr=2e-3,
                batch_size=BATCH,
                seed=seed,
                warmup_ratio=0.1,
                progress=False,
            )
            train(mm, t, features(data[t][0], own[t]), collate_fn=collate_fn, settings=settings)
            test = features(data[t][1], own[t])
            alone[t] = evaluate(mm, test, collate_fn=collate_fn, batch_size=64)["accuracy"]
        module_time = time.perf_counter() - start
        mixed = features(data["sentiment"][0], union) + features(data["topic"][0], union)
        tests = {t: features(data[t][1], union) for t in tasks}
        for mode in args.modes.split(","):  # 2. a router over both, on the mixed data
            start = time.perf_counter()
            name = f"r_{mode}"
            options = {**ROUTERS[mode], "level": "example", "load_balance": args.load_balance}
            if "final_temperature" in options:
                options["anneal_steps"] = args.router_steps
            mm.add(
                name,
                modfit.config("router", children=list(tasks), **options),
                head=modfit.head("seq-cls", union),
            )
            mm.activate(f"moe(sentiment, topic, router={name})")
            settings = TrainSettings(
                steps=args.router_steps,
                lr=args.router_lr,
                batch_size=BATCH,
                seed=seed,
                warmup_ratio=0.1,
                progress=False,
                log_every=args.router_steps // 4,
            )
            result = train(mm, name, mixed, collate_fn=collate_fn, settings=settings)
            row: dict[str, Any] = {
                "seed": seed,
                "mode": mode,
                "train_s": round(time.perf_counter() - start, 1),
            }
            for t in tasks:  # 3. accuracy and usage per task
                mm.unit_metrics()  # start the counts over
                row[f"acc_{t}"] = evaluate(mm, tests[t], collate_fn=collate_fn, batch_size=64)["accuracy"]
                observed = mm.unit_metrics()
                row[f"{t}->sentiment"] = observed.get(f"{name}.usage.sentiment", float("nan"))
                row[f"{t}->topic"] = observed.get(f"{name}.usage.topic", float("nan"))
            row["acc"] = (row["acc_sentiment"] + row["acc_topic"]) / 2
            row["train_entropy_last"] = result.history[-1].get(f"{name}.entropy", float("nan"))
            row.update({f"alone_{t}": alone[t] for t in tasks}, module_s=round(module_time, 1))
            rows.append(row)
            mm.deactivate()
            mm.remove(name)
            if not args.json:
                print(
                    f"seed {seed} {mode:>14}: acc {row['acc']:.3f} (sentiment {row['acc_sentiment']:.3f}, "
                    f"topic {row['acc_topic']:.3f}); usage sentiment->sentiment "
                    f"{row['sentiment->sentiment']:.2f}, "
                    f"topic->topic {row['topic->topic']:.2f}; train entropy {row['train_entropy_last']:.3f}; "
                    f"{row['train_s']} s",
                    flush=True,
                )
        if not args.json:
            print(f"seed {seed} modules alone: {alone} ({module_time:.0f} s)", flush=True)
    if args.json:
        print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
