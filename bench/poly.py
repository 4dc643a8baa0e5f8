"""Few-shot transfer to new tasks on shared-skill synthetic data: Polytropon against a shared module and
per-task modules (issue 5's acceptance).

    .venv/bin/python bench/poly.py                      # the full run (3 seeds)
    .venv/bin/python bench/poly.py --seeds 0 --json     # one seed, JSON out
    .venv/bin/python bench/poly.py --plot-dir runs/poly  # also the learned allocation of each seed (PNG)

Data (`modfit.routing.skills_data`): tasks are pairs of word-category skills ("mentions an animal
and a colour"); some pairs are held out. On the packaged MiniLM:

1. multi-task training on the training tasks (the batches carry task ids) of
   - Polytropon ("poly": S skill LoRAs, Gumbel-sigmoid allocation, dual-speed learning), and
   - one shared LoRA ("shared": same targets; no task ids, it sees one mixed data set),
   each with one seq-cls head (no/yes) shared by every task;
2. few-shot adaptation, separately on each held-out task, with `shots` labelled examples:
   - poly-alloc: a new allocation row for the task (`poly.adapt`), skills fixed, shared head frozen;
   - poly-skills: the same, skills trained too;
   - shared: the shared LoRA and its head fine-tuned on the shots;
   - private: a fresh LoRA and head trained on the shots only;
3. accuracy on `test` examples of each held-out task (balanced: chance is 0.5).

`run(Settings(...))` is the experiment; tests/test_poly_learning.py (marked heavy) runs seed 0.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

import modfit
from modfit.base import load_base, load_tokenizer
from modfit.batching import collate, encode
from modfit.methods import poly
from modfit.routing import skills_data as sd
from modfit.routing.plot import module_allocation, plot_allocation
from modfit.train import TrainSettings, evaluate, train

METHODS = ("poly-alloc", "poly-skills", "shared", "private")


@dataclass(frozen=True)
class Settings:
    """One run of the experiment (the defaults: the full run reported in the README)."""

    seed: int = 0
    n_skills_data: int = 6  # skills (word categories) in the data: 15 pair tasks
    heldout: int = 3  # held-out tasks
    per_task: int = 240  # training examples per training task
    test: int = 200  # test examples per held-out task
    shots: int = 16  # labelled examples per held-out task in few-shot adaptation
    # multi-task training
    skills: int = 6  # Polytropon's S
    rank: int = 4  # each skill's rank, and the LoRA baselines' rank
    targets: tuple[str, ...] = ("query", "value")
    router_lr_scale: float = 30.0
    steps: int = 600
    batch: int = 32
    lr: float = 5e-3
    # few-shot adaptation
    fs_steps: int = 40
    fs_lr_poly: float = 1e-2
    fs_lr_lora: float = 2e-3
    methods: tuple[str, ...] = METHODS

    def multitask_key(self) -> str:
        """The fields that decide the multi-task phase (its trained modules are cached under it)."""
        fields = ("seed", "n_skills_data", "heldout", "per_task", "skills", "rank", "targets")
        more = ("router_lr_scale", "steps", "batch", "lr")
        return "-".join(str(getattr(self, f)).replace(" ", "") for f in (*fields, *more))


def _collate(tokenizer: Any) -> Any:
    return lambda features: collate(features, tokenizer.pad_token_id)


def _settings(steps: int, lr: float, batch: int, seed: int) -> TrainSettings:
    return TrainSettings(steps=steps, lr=lr, batch_size=batch, seed=seed, warmup_ratio=0.1, progress=False)


def run(s: Settings, log: Any = None, cache: Path | None = None, plot: Path | None = None) -> dict[str, Any]:
    """The experiment; returns {"settings", "heldout", "accuracy": {method: {task: acc}}, "mean",
    "multitask": {...}, "seconds"}. With `cache`, the multi-task modules are saved there (per
    `Settings.multitask_key`) and reused by later runs that differ only in the few-shot phase. With
    `plot`, the multi-task module's learned task x skill allocation is drawn there (PNG)."""
    say = log or (lambda *a: None)
    start = time.perf_counter()
    torch.manual_seed(s.seed)
    tokenizer = load_tokenizer("default")
    collate_fn = _collate(tokenizer)
    tasks = sd.skill_tasks(s.n_skills_data)
    train_tasks, new_tasks = sd.split_tasks(tasks, s.heldout, seed=s.seed)
    names = [t.name for t in train_tasks]
    labels = sd.LABELS

    def enc(examples: list[Any], task_names: list[str] | None) -> list[Any]:
        return encode(examples, tokenizer, "seq-cls", labels=labels, max_length=32, tasks=task_names)

    train_examples = [ex for t in train_tasks for ex in sd.examples(t, s.per_task, seed=s.seed)]
    features = enc(train_examples, names)
    mm = modfit.wrap(load_base("default"))
    head = modfit.head("seq-cls", labels)
    multitask: dict[str, float] = {}
    check = [ex for t in train_tasks for ex in sd.examples(t, 40, seed=s.seed, split="test")]
    check_features = enc(check, names)
    needs_poly = any(m.startswith("poly") for m in s.methods)
    folder = Path(tempfile.mkdtemp(prefix="modfit-poly-bench-"))
    cached = cache / s.multitask_key() if cache is not None else None

    def fit(name: str) -> None:
        if cached is not None and (cached / name / "module.json").is_file():
            mm.remove(name)
            mm.load(cached / name)
            mm.activate(name)
            say(f"multi-task {name}: loaded from {cached / name}")
        else:
            train(
                mm, name, features, collate_fn=collate_fn, settings=_settings(s.steps, s.lr, s.batch, s.seed)
            )
        multitask[name] = evaluate(mm, check_features, collate_fn=collate_fn)["accuracy"]
        say(f"multi-task {name}: accuracy on the training tasks {multitask[name]:.3f}")
        if cached is not None:
            mm.save(name, cached / name)
        mm.save(name, folder / name)

    if needs_poly:
        config = modfit.config(
            "poly",
            tasks=names,
            n_skills=s.skills,
            r=s.rank,
            alpha=s.rank,
            targets=s.targets,
            router_lr_scale=s.router_lr_scale,
        )
        mm.add("poly", config, head=head)
        mm.activate("poly")
        fit("poly")
    if needs_poly and plot is not None:
        title = f"Polytropon allocation, seed {s.seed}\nheld out: {', '.join(t.name for t in new_tasks)}"
        plot_allocation(module_allocation(mm, "poly"), plot, title=title)
        say(f"allocation plot: {plot}")
    if "shared" in s.methods:
        lora = modfit.config("lora", r=s.rank, alpha=s.rank, targets=s.targets)
        mm.add("shared", lora, head=head)
        mm.activate("shared")
        fit("shared")

    accuracy: dict[str, dict[str, float]] = {m: {} for m in s.methods}
    for task in new_tasks:
        shots = enc(sd.examples(task, s.shots, seed=s.seed, split="shots"), [task.name])
        test = enc(sd.examples(task, s.test, seed=s.seed, split="test"), [task.name])
        fs_batch = min(s.shots, 16)
        for method in s.methods:
            name = f"{method}-{task.name}"
            torch.manual_seed(s.seed)
            if method.startswith("poly"):
                poly.adapt(
                    mm, "poly", name, [task.name], train_skills=method == "poly-skills", copy_head=False
                )
                mm.activate(name, head="poly")  # the multi-task head, frozen
                lr = s.fs_lr_poly
            elif method == "shared":
                mm.load(folder / "shared", name=name)
                mm.activate(name)
                lr = s.fs_lr_lora
            else:
                mm.add(name, modfit.config("lora", r=s.rank, alpha=s.rank, targets=s.targets), head=head)
                mm.activate(name)
                lr = s.fs_lr_lora
            train(
                mm, name, shots, collate_fn=collate_fn, settings=_settings(s.fs_steps, lr, fs_batch, s.seed)
            )
            accuracy[method][task.name] = evaluate(mm, test, collate_fn=collate_fn)["accuracy"]
            mm.remove(name)
        say(f"{task.name}: " + ", ".join(f"{m} {accuracy[m][task.name]:.3f}" for m in s.methods))
    mean = {m: statistics.mean(accuracy[m].values()) for m in s.methods}
    allocation = poly.allocation(mm, "poly")[:, 0, :].tolist() if needs_poly else None
    return {
        "settings": asdict(s),
        "train_tasks": names,
        "heldout": [t.name for t in new_tasks],
        "multitask": multitask,
        "accuracy": accuracy,
        "mean": mean,
        "allocation": allocation,
        "seconds": time.perf_counter() - start,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (data split, init, order)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--cache", type=Path, help="keep the multi-task modules here and reuse them")
    parser.add_argument(
        "--plot-dir", type=Path, help="draw each seed's allocation here (allocation-seedN.png)"
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="FIELD=VALUE", help="override a Settings field"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    overrides: dict[str, Any] = {}
    for item in args.set:
        key, _, value = item.partition("=")
        current = getattr(Settings(), key)
        if isinstance(current, tuple):
            overrides[key] = tuple(value.split(","))
        else:
            overrides[key] = type(current)(value)
    runs = []
    for seed in [int(x) for x in args.seeds.split(",")]:
        settings = replace(Settings(seed=seed), **overrides)
        plot = args.plot_dir / f"allocation-seed{seed}.png" if args.plot_dir is not None else None
        say = None if args.json else lambda *a: print(*a, flush=True)
        result = run(settings, log=say, cache=args.cache, plot=plot)
        runs.append(result)
        if not args.json:
            means = ", ".join(f"{m} {v:.3f}" for m, v in result["mean"].items())
            print(
                f"seed {seed}: held-out {result['heldout']}: {means} ({result['seconds']:.0f} s)", flush=True
            )
    methods = runs[0]["settings"]["methods"]
    summary = {m: statistics.mean(r["mean"][m] for r in runs) for m in methods}
    if args.json:
        print(json.dumps({"runs": runs, "mean_over_seeds": summary}, indent=2))
    else:
        print("mean over seeds: " + ", ".join(f"{m} {v:.3f}" for m, v in summary.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
