"""Training one module on a frozen base: a small loop over a deterministic data stream.

    result = train(mm, "sst", features, collate_fn=partial(collate, pad_token_id=0),
                   settings=TrainSettings(epochs=3, lr=5e-4, batch_size=32), eval_features=dev)
    evaluate(mm, dev, collate_fn=..., batch_size=64)     # {"accuracy", "macro_f1", "loss"}
    predict(mm, test, collate_fn=..., batch_size=64)     # label names, or one tag list per sentence

One optimizer step takes the next `batch_size` examples (the *global* batch) of a data stream
that visits every example once per epoch, in an order fixed by the seed; each process takes an
equal slice of it, in `grad_accum` micro-batches (see `distributed.py`).

The loss of a step is the mean over *every* prediction of the global batch (examples for seq-cls,
labelled tokens otherwise): each micro-batch's mean loss is weighted by its share of the
predictions, so gradient accumulation and any number of processes give the gradient of one big
batch. The data position is a function of the step, which makes resuming exact.

Under `torchrun` (WORLD_SIZE > 1) the loop joins the process group (gloo on CPU, nccl on CUDA),
wraps the model in DistributedDataParallel, and only rank 0 writes checkpoints and shows progress.

Checkpoints (`checkpoint_dir`, `resume`) are folders `step-00000040/` holding the module and the
trainer's state, described in `checkpoint.py`. `evaluate` and `predict` live in `evaluate.py` and
are re-exported here, with `latest_checkpoint`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from tqdm import tqdm

from .checkpoint import (
    TrainerState,
    check_resumable,
    checkpoint_to_resume,
    gather_rng,
    latest_checkpoint,
    read_checkpoint,
    restore_module,
    restore_rng,
    save_checkpoint,
    seed_all,
)
from .config import ConfigError, check
from .distributed import Processes, Stream
from .evaluate import CollateFn, Feature, count_targets, evaluate, predict, to_device
from .model import ModularModel

__all__ = ["TrainResult", "TrainSettings", "evaluate", "latest_checkpoint", "predict", "train"]

log = logging.getLogger(__name__)

Callback = Callable[[int, dict[str, float]], None]


@dataclass(frozen=True)
class TrainSettings:
    """How to train.

    Attributes:
        epochs: passes over the training data (fractions allowed); give this or `steps`.
        steps: optimizer steps; give this or `epochs` (neither: 3 epochs).
        lr: peak learning rate of AdamW.
        batch_size: examples per optimizer step across all processes (the global batch).
        grad_accum: micro-batches per step; batch_size must divide by world size × grad_accum.
        weight_decay: AdamW decoupled weight decay, applied to matrices only (not biases, norms).
        warmup_ratio: fraction of the steps with a linear warmup from 0; then linear decay to 0.
        max_grad_norm: clip the global gradient norm to this (None: no clipping).
        seed: seeds python, numpy and torch (plus the rank) and fixes the data order.
        eval_every: evaluate every this many steps (None: at the end of each epoch).
        checkpoint_dir: where checkpoints go (None: no checkpoints).
        checkpoint_every: checkpoint every this many steps (None: at the end of each epoch);
            the last step is always checkpointed.
        resume: continue from the latest checkpoint in checkpoint_dir, if there is one (without
            resume, a checkpoint_dir that holds checkpoints is refused).
        progress: show a progress bar (only on a terminal, only on rank 0).
        log_every: add the mean training loss to the history every this many steps.
        stop_after_steps: stop once this global step is done, as if interrupted (no final
            checkpoint or evaluation); the schedule still spans the full run.
        gradient_checkpointing: recompute the base model's layer activations during backward
            instead of storing them (`ModularModel.gradient_checkpointing_enable`): less memory,
            about one more forward pass of compute; the model's setting is restored afterwards.
        compile: run the training forward and backward through `torch.compile` (True: the
            default inductor backend; a string names another backend, e.g. "aot_eager"). The
            graph holds the model's hooks, so the modules run in it; activating, removing or
            merging modules later recompiles rather than reusing a stale graph. The first steps
            pay the compilation (about a minute for MiniLM on a CPU); in exchange the compiled
            step stores fewer activations (see the README's benchmarks).
    """

    epochs: float | None = None
    steps: int | None = None
    lr: float = 5e-4
    batch_size: int = 16
    grad_accum: int = 1
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    max_grad_norm: float | None = 1.0
    seed: int = 42
    eval_every: int | None = None
    checkpoint_dir: str | None = None
    checkpoint_every: int | None = None
    resume: bool = False
    progress: bool = True
    log_every: int = 10
    stop_after_steps: int | None = None
    gradient_checkpointing: bool = False
    compile: bool | str = False

    def __post_init__(self) -> None:
        check(
            self.epochs is None or self.steps is None,
            "train",
            "epochs",
            f"give epochs or steps, not both (got epochs={self.epochs}, steps={self.steps})",
        )
        if self.epochs is None and self.steps is None:
            object.__setattr__(self, "epochs", 3.0)
        if self.checkpoint_dir is not None:
            object.__setattr__(self, "checkpoint_dir", os.fspath(self.checkpoint_dir))  # a Path works too
        check(self.epochs is None or self.epochs > 0, "train", "epochs", f"must be > 0, got {self.epochs}")
        check(self.steps is None or self.steps >= 1, "train", "steps", f"must be >= 1, got {self.steps}")
        check(self.lr > 0, "train", "lr", f"must be > 0, got {self.lr}")
        check(self.batch_size >= 1, "train", "batch_size", f"must be >= 1, got {self.batch_size}")
        check(self.grad_accum >= 1, "train", "grad_accum", f"must be >= 1, got {self.grad_accum}")
        check(
            self.batch_size % self.grad_accum == 0,
            "train",
            "batch_size",
            f"{self.batch_size} is not divisible by grad_accum {self.grad_accum}: "
            "every micro-batch must have the same size",
        )
        check(self.weight_decay >= 0, "train", "weight_decay", f"must be >= 0, got {self.weight_decay}")
        check(
            0 <= self.warmup_ratio < 1, "train", "warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}"
        )
        check(
            self.max_grad_norm is None or self.max_grad_norm > 0,
            "train",
            "max_grad_norm",
            f"must be > 0 or None, got {self.max_grad_norm}",
        )
        check(0 <= self.seed < 2**32, "train", "seed", f"must be in [0, 2**32), got {self.seed}")
        for name in ("eval_every", "checkpoint_every", "stop_after_steps"):
            value = getattr(self, name)
            check(value is None or value >= 1, "train", name, f"must be >= 1 or None, got {value}")
        check(self.log_every >= 1, "train", "log_every", f"must be >= 1, got {self.log_every}")
        check(
            isinstance(self.compile, bool) or (isinstance(self.compile, str) and self.compile != ""),
            "train",
            "compile",
            f"must be True, False or a torch.compile backend name, got {self.compile!r}",
        )
        for name in ("checkpoint_every", "resume"):
            check(
                not getattr(self, name) or self.checkpoint_dir is not None,
                "train",
                name,
                "needs checkpoint_dir",
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready field values."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainSettings:
        """Settings from `to_dict` output.

        Raises:
            ConfigError: an unknown field (the message lists the known ones) or an invalid value.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"train: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return cls(**values)

    def total_steps(self, num_examples: int) -> int:
        """Optimizer steps of the whole run on `num_examples` examples."""
        if self.steps is not None:
            return self.steps
        assert self.epochs is not None
        return max(1, math.ceil(self.epochs * num_examples / self.batch_size))


@dataclass
class TrainResult:
    """What `train` returns.

    Attributes:
        history: one dict per logged step: step, epoch, loss (mean since the previous entry), lr,
            and eval_<metric> when an evaluation ran at that step. Includes a resumed run's past.
            Also the units' own scalars (`ModularModel.unit_metrics()`, e.g. `router.entropy`,
            `router.usage.a`), averaged over the steps since the previous entry.
        metrics: the last evaluation's metrics ({} without eval_features or when stopped early).
        resumed_from: the checkpoint step this run continued from, or None.
        step: the last step done; total_steps: the steps of the full run.
    """

    history: list[dict[str, float]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    resumed_from: int | None = None
    step: int = 0
    total_steps: int = 0


# -- training ------------------------------------------------------------------------------------


def train(
    mm: ModularModel,
    name: str,
    train_features: Sequence[Feature],
    *,
    collate_fn: CollateFn,
    settings: TrainSettings | None = None,
    eval_features: Sequence[Feature] | None = None,
    callback: Callback | None = None,
) -> TrainResult:
    """Train module `name` of `mm` (everything else frozen) with AdamW and a linear schedule.

    The loss is the active head's (`mm.head_name`), or the HF model's own loss when no active
    module has a head (e.g. a language adapter under `BertForMaskedLM`), plus the running units'
    `mm.regularization()`. The model is left in the train/eval mode it had.

    The module's config decides the passes (`ModuleConfig.fit`): one plain run for most methods;
    several for a method trained in phases (LT-SFT: dense, select, sparse), each with a fresh
    optimizer and its checkpoints in a subfolder of `checkpoint_dir` named after the phase. Steps
    number on across passes (history, callback, `stop_after_steps`).

    Args:
        mm: the model; under torchrun every process passes the same model and data.
        name: the module to train (`mm.train_only(name)` picks its parameters).
        train_features: encoded examples (see `batching.encode`); each step collates a slice.
        collate_fn: features -> batch of tensors (with `labels`); e.g.
            `functools.partial(collate, pad_token_id=tok.pad_token_id)` or an `MlmCollator`.
            A collator's own `torch.Generator` at `.generator` is checkpointed with the RNGs.
        settings: see `TrainSettings` (default: 3 epochs).
        eval_features: evaluated with `evaluate` at each epoch end (or every `eval_every`
            steps) and at the end.
        callback: `callback(step, logs)` after every step (logs: step, epoch, loss, lr); an
            exception it raises stops the run, leaving the checkpoints written so far.

    Returns:
        A `TrainResult` with the history and final metrics.

    Raises:
        ValueError: no training data, a batch size the world size cannot split, or a batch
            without labels.
        FileExistsError: checkpoint_dir holds checkpoints and settings.resume is False.
        ConfigError: resuming from a checkpoint of another module or with another data order.
    """
    settings = settings or TrainSettings()
    if not train_features:
        raise ValueError("no training features")
    procs = Processes.setup()
    config = mm._record(name).config
    phases: list[TrainResult] = []

    def run(phase: str | None = None, **overrides: Any) -> TrainResult:
        # One pass of the loop for `config.fit` (see `ModuleConfig.fit`). Steps number on from the
        # passes before it: in the history, the callback and `stop_after_steps`.
        done = sum(r.total_steps for r in phases)
        s = dataclasses.replace(settings, **overrides)
        if phase is not None and s.checkpoint_dir is not None:
            s = dataclasses.replace(s, checkpoint_dir=os.path.join(s.checkpoint_dir, phase))
        if s.stop_after_steps is not None and s.stop_after_steps - done < 1:
            result = TrainResult(total_steps=s.total_steps(len(train_features)))  # stopped before it
        else:
            if s.stop_after_steps is not None:
                s = dataclasses.replace(s, stop_after_steps=s.stop_after_steps - done)
            shifted = _shifted(callback, done) if callback is not None and done else callback
            result = _Run(mm, name, train_features, collate_fn, s, eval_features, shifted, procs).run()
            for entry in result.history:
                entry["step"] += done
        phases.append(result)
        return result

    config.fit(mm, name, run)
    if not phases:
        raise RuntimeError(f"{config.method}: fit() ran no training pass")
    last = phases[-1]
    resumed = [
        sum(r.total_steps for r in phases[:i]) + r.resumed_from
        for i, r in enumerate(phases)
        if r.resumed_from is not None
    ]
    return TrainResult(
        history=[entry for r in phases for entry in r.history],
        metrics=last.metrics,
        resumed_from=resumed[-1] if resumed else None,
        step=sum(r.step for r in phases),
        total_steps=sum(r.total_steps for r in phases),
    )


def _shifted(callback: Callback, offset: int) -> Callback:
    """`callback` seeing global step numbers in a pass that starts after `offset` steps."""
    return lambda step, logs: callback(step + offset, {**logs, "step": step + offset})


class _Run:
    """The state of one `train` call."""

    def __init__(
        self,
        mm: ModularModel,
        name: str,
        features: Sequence[Feature],
        collate_fn: CollateFn,
        settings: TrainSettings,
        eval_features: Sequence[Feature] | None,
        callback: Callback | None,
        procs: Processes,
    ) -> None:
        s = settings
        procs.check_split(s.batch_size, s.grad_accum)
        self.mm, self.name, self.features, self.collate_fn = mm, name, features, collate_fn
        self.s, self.eval_features, self.callback, self.procs = s, eval_features, callback, procs
        self.n = len(features)
        self.total = s.total_steps(self.n)
        self.stream = Stream(self.n, s.seed)
        self.history: list[dict[str, float]] = []
        self.step = 0
        self.resumed_from: int | None = None

        seed_all(s.seed + procs.rank)  # distinct dropout per process; rank 0 matches one process
        self.params = mm.train_only(name)
        if procs.device.type == "cuda" and next(mm.parameters()).device != procs.device:
            mm.to(procs.device)
        self.device = next(mm.parameters()).device
        # nanoGPT's rule: decay matrices, not biases or norm gains (no name matching).
        groups = [
            {"params": [p for p in self.params if p.ndim >= 2], "weight_decay": s.weight_decay},
            {"params": [p for p in self.params if p.ndim < 2], "weight_decay": 0.0},
        ]
        self.optimizer = torch.optim.AdamW(groups, lr=s.lr)
        warmup = math.ceil(s.warmup_ratio * self.total)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _linear_schedule(warmup, self.total)
        )
        head = mm.records[mm.head_name].head if mm.head_name is not None else None
        self.task = head.task if head is not None else None
        self.forward = procs.loss_forward(mm, self.device)  # in DDP under torchrun
        if s.compile:
            backend = "inductor" if s.compile is True else s.compile
            self.forward = cast(nn.Module, torch.compile(self.forward, backend=backend))

    def run(self) -> TrainResult:
        s, mm = self.s, self.mm
        latest = checkpoint_to_resume(s.checkpoint_dir, s.resume)
        if latest is not None:
            self._restore(latest)
        was_training = mm.model.training  # the HF model's flag: the wrapper's starts True regardless
        was_checkpointing = mm.is_gradient_checkpointing
        if s.gradient_checkpointing and not was_checkpointing:
            mm.gradient_checkpointing_enable()
        bar = tqdm(
            total=self.total,
            initial=self.step,
            desc=f"train {self.name}",
            unit="step",
            disable=not (s.progress and self.procs.rank == 0 and sys.stderr.isatty()),
        )
        metrics: dict[str, float] = {}
        losses: list[float] = []
        observed: dict[str, list[float]] = {}  # units' own scalars (a router's entropy, usage) per step
        stopped = False
        try:
            mm.train()
            while self.step < self.total:
                lr = self.optimizer.param_groups[0]["lr"]
                loss = self._step()
                self.step += 1
                losses.append(loss)
                for key, value in mm.unit_metrics().items():
                    observed.setdefault(key, []).append(value)
                bar.update(1)
                epoch_done = (self.step * s.batch_size) // self.n > ((self.step - 1) * s.batch_size) // self.n
                last = self.step == self.total
                entry: dict[str, float] = {}
                if self.eval_features is not None and (
                    last or (epoch_done if s.eval_every is None else self.step % s.eval_every == 0)
                ):
                    metrics = self._evaluate()
                    entry.update({f"eval_{k}": v for k, v in metrics.items()})
                if entry or last or self.step % s.log_every == 0:
                    mean = sum(losses) / len(losses)
                    entry = {"step": self.step, "epoch": self._epoch(), "loss": mean, "lr": lr, **entry}
                    units = {key: sum(values) / len(values) for key, values in observed.items()}
                    entry.update(units)
                    losses, observed = [], {}
                    self.history.append(entry)
                    shown = {k: f"{v:.3f}" for k, v in units.items()}
                    bar.set_postfix(loss=f"{entry['loss']:.4f}", lr=f"{lr:.2e}", **shown)
                    if self.procs.rank == 0:
                        log.info("%s", entry)
                every = s.checkpoint_every
                if s.checkpoint_dir is not None and (
                    last or (epoch_done if every is None else self.step % every == 0)
                ):
                    self._checkpoint(Path(s.checkpoint_dir))
                if self.callback is not None:
                    self.callback(
                        self.step, {"step": self.step, "epoch": self._epoch(), "loss": loss, "lr": lr}
                    )
                if s.stop_after_steps is not None and self.step >= s.stop_after_steps and not last:
                    stopped = True
                    break
            if not stopped and not metrics and self.eval_features is not None:
                metrics = self._evaluate()  # resumed from the final checkpoint: nothing left to run
        finally:
            bar.close()
            mm.train(was_training)
            if s.gradient_checkpointing and not was_checkpointing:
                mm.gradient_checkpointing_disable()
        if stopped:
            metrics = {}
        return TrainResult(self.history, metrics, self.resumed_from, self.step, self.total)

    def _epoch(self) -> float:
        return self.step * self.s.batch_size / self.n

    def _step(self) -> float:
        """One optimizer step on the next global batch; returns its mean loss (all processes)."""
        s, procs = self.s, self.procs
        micro_batches = procs.micro_batches(self.stream, self.step, s.batch_size, s.grad_accum)
        batches = [self._batch([self.features[i] for i in ids]) for ids in micro_batches]
        counts = [count_targets(self.task, b["labels"]) for b in batches]
        total = procs.sum([float(sum(counts))])[0]
        if total == 0:
            raise ValueError(f"step {self.step + 1}: the global batch has no labelled position to learn from")
        loss_sum = 0.0
        for j, (batch, count) in enumerate(zip(batches, counts, strict=True)):
            sync = j == len(batches) - 1
            no_sync = getattr(self.forward, "no_sync", None)
            with nullcontext() if sync or no_sync is None else no_sync():
                out = self.forward(batch)
                if out.loss is None:
                    raise ValueError("the model returned no loss: the batches need labels")
                # weight = share of the global batch's predictions; DDP averages over processes,
                # hence × world. A micro-batch without targets still runs backward (DDP needs it).
                weighted = out.loss * (count * procs.world / total) if count else out.logits.sum() * 0.0
                weighted.backward()
            loss_sum += out.loss.item() * count if count else 0.0
        if s.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, s.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return procs.sum([loss_sum])[0] / total

    def _batch(self, features: list[Feature]) -> dict[str, torch.Tensor]:
        batch = to_device(self.collate_fn(features), self.device)
        if "labels" not in batch:
            raise ValueError(f"the collated batch has no 'labels' (keys: {', '.join(batch)})")
        return batch

    def _evaluate(self) -> dict[str, float]:
        size = max(1, self.s.batch_size // self.s.grad_accum)
        metrics = evaluate(self.mm, self.eval_features or [], collate_fn=self.collate_fn, batch_size=size)
        self.mm.unit_metrics()  # drop what the units observed on evaluation passes: the log is training's
        return metrics

    # -- checkpoints -----------------------------------------------------------------------------

    def _checkpoint(self, directory: Path) -> None:
        rng = gather_rng(self.procs, self.collate_fn)
        if self.procs.rank == 0:
            state = TrainerState(
                module=self.name,
                step=self.step,
                epoch=self._epoch(),
                total_steps=self.total,
                num_examples=self.n,
                world_size=self.procs.world,
                settings=self.s.to_dict(),
                optimizer=self.optimizer.state_dict(),
                scheduler=self.scheduler.state_dict(),
                rng=rng,
                history=self.history,
            )
            save_checkpoint(directory, self.mm, state)
        self.procs.barrier()  # no process goes on (and maybe resumes) before the checkpoint exists

    def _restore(self, path: Path) -> None:
        state = read_checkpoint(path)
        check_resumable(path, state, self.name, self.s, self.n, self.total)
        restore_module(self.mm, self.name, path)
        self.optimizer.load_state_dict(state.optimizer)
        self.scheduler.load_state_dict(state.scheduler)
        restore_rng(path, state.rng, self.procs, self.collate_fn)
        self.step = self.resumed_from = state.step
        self.history = state.history
        if self.procs.rank == 0:
            log.info("resumed %s from %s (step %d of %d)", self.name, path, self.step, self.total)


def _linear_schedule(warmup: int, total: int) -> Callable[[int], float]:
    """lr factor at step s: s/warmup while warming up, then linearly down to 0 at `total`."""

    def factor(step: int) -> float:
        if step < warmup:
            return step / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor
