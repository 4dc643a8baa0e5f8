"""Training checkpoints: the module and the trainer's state, in JSON and safetensors (no pickle).

A checkpoint is a folder `step-00000040/` in the checkpoint directory, written under a temporary
name and renamed when complete, so a failing run never damages the checkpoints before it::

    module/                 the module as `mm.save` writes it (loadable with `mm.load`)
    trainer.safetensors     optimizer moments, RNG states: every tensor, under flattened keys
    trainer.json            step, settings, optimizer/scheduler fields, RNG states, history

Saving, on every process (only rank 0 writes)::

    rng = gather_rng(procs, collate_fn)
    save_checkpoint(directory, mm, TrainerState(module="sst", step=40, ..., rng=rng))

Resuming, on every process::

    state = read_checkpoint(path)                       # tensors back in place
    check_resumable(path, state, "sst", settings, num_examples, total_steps)
    restore_module(mm, "sst", path)                     # the module's weights, in place
    optimizer.load_state_dict(state.optimizer); ...; restore_rng(path, state.rng, procs, collate_fn)
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import load_file

from .atomic import write_json, write_safetensors
from .config import ConfigError
from .distributed import Processes
from .model import ModularModel
from .persistence import CARD, load_weights, read_card, verify_base

if TYPE_CHECKING:
    from .train import TrainSettings

__all__ = [
    "TrainerState",
    "check_resumable",
    "checkpoint_to_resume",
    "gather_rng",
    "latest_checkpoint",
    "read_checkpoint",
    "restore_module",
    "restore_rng",
    "rng_state",
    "save_checkpoint",
    "seed_all",
    "set_rng_state",
]

STATE_JSON = "trainer.json"
STATE_TENSORS = "trainer.safetensors"
STATE_FORMAT = "modfit-train-state"
CHECKPOINT_PREFIX = "step-"


@dataclass
class TrainerState:
    """Everything but the module's weights that a run needs to go on exactly where it stopped.

    Attributes:
        module: the name of the module being trained.
        step: optimizer steps done; epoch: step × batch size / num_examples.
        total_steps: the steps of the full run; num_examples: the training examples.
        world_size: the processes of the run that wrote it (one RNG state each in `rng`).
        settings: the run's `TrainSettings.to_dict()`.
        optimizer, scheduler: their `state_dict()`s (tensors included).
        rng: one `rng_state` per process, by rank.
        history: the run's history so far.
    """

    module: str
    step: int
    epoch: float
    total_steps: int
    num_examples: int
    world_size: int
    settings: dict[str, Any]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: list[dict[str, Any]]
    history: list[dict[str, float]]


def save_checkpoint(directory: str | Path, mm: ModularModel, state: TrainerState) -> Path:
    """Write module `state.module` of `mm` and `state` as the checkpoint of `state.step`.

    Returns:
        The checkpoint folder (`directory/step-XXXXXXXX`); an earlier one of the same step is
        replaced only once the new one is complete.

    Raises:
        TypeError: the optimizer or scheduler state holds a value JSON cannot store.
    """
    tensors: dict[str, torch.Tensor] = {}
    data = {
        "format": STATE_FORMAT,
        "format_version": 1,
        "module": state.module,
        "step": state.step,
        "epoch": state.epoch,
        "total_steps": state.total_steps,
        "num_examples": state.num_examples,
        "world_size": state.world_size,
        "settings": state.settings,
        "optimizer": _to_json(state.optimizer, "optimizer", tensors),
        "scheduler": _to_json(state.scheduler, "scheduler", tensors),
        "rng": _to_json(state.rng, "rng", tensors),
        "history": state.history,
    }
    final = Path(directory) / f"{CHECKPOINT_PREFIX}{state.step:08d}"
    _write_checkpoint(final, mm, state.module, data, tensors)
    return final


def read_checkpoint(path: str | Path) -> TrainerState:
    """The trainer state of the checkpoint folder `path`.

    Raises:
        ConfigError: the folder's trainer.json is not a modfit training checkpoint.
    """
    path = Path(path)
    state = json.loads((path / STATE_JSON).read_text(encoding="utf-8"))
    tensors = load_file(str(path / STATE_TENSORS))
    if state.get("format") != STATE_FORMAT:
        raise ConfigError(f"{path / STATE_JSON}: not a modfit training checkpoint")
    return TrainerState(
        module=state["module"],
        step=int(state["step"]),
        epoch=state["epoch"],
        total_steps=state["total_steps"],
        num_examples=state["num_examples"],
        world_size=state["world_size"],
        settings=state["settings"],
        optimizer=_from_json(state["optimizer"], tensors),
        scheduler=_from_json(state["scheduler"], tensors),
        rng=_from_json(state["rng"], tensors),
        history=list(state["history"]),
    )


def check_resumable(
    path: Path,
    state: TrainerState,
    name: str,
    settings: TrainSettings,
    num_examples: int,
    total_steps: int,
) -> None:
    """Refuse a checkpoint that cannot continue this run; warn when only the schedule changed.

    Resuming is exact when the data order is the same: the same seed, global batch size and
    number of examples (the stream position is a function of the step).

    Raises:
        ConfigError: a checkpoint of another module, invalid saved settings, or another data order.
    """
    if state.module != name:
        raise ConfigError(f"{path}: a checkpoint of module '{state.module}', not '{name}'")
    saved = type(settings).from_dict(state.settings)  # validated like the settings given now
    fixed = {
        "seed": (saved.seed, settings.seed),
        "batch_size": (saved.batch_size, settings.batch_size),
        "number of examples": (state.num_examples, num_examples),
    }
    differ = [f"{k}: {a} then, {b} now" for k, (a, b) in fixed.items() if a != b]
    if differ:
        raise ConfigError(f"{path}: cannot resume, the data order changed ({'; '.join(differ)})")
    if state.total_steps != total_steps or saved.lr != settings.lr:
        warnings.warn(
            f"resuming {path} with another schedule (total steps {state.total_steps} -> {total_steps}, "
            f"lr {saved.lr} -> {settings.lr}); the result will differ from one uninterrupted run",
            stacklevel=4,  # the line in train() (check_resumable <- _restore <- run <- train)
        )


def restore_module(mm: ModularModel, name: str, path: str | Path) -> None:
    """Copy the module weights of checkpoint `path` into module `name` of `mm`, in place.

    Raises:
        BaseMismatchError: the checkpoint was trained on another base model.
        ModuleFileError: a missing or unreadable card or weights file, or weights that do not fit.
    """
    module_dir = Path(path) / "module"
    card = read_card(module_dir)
    verify_base(card, mm, module_dir / CARD)
    load_weights(mm, name, module_dir)


def checkpoint_to_resume(directory: str | None, resume: bool) -> Path | None:
    """The checkpoint a run continues from: the latest in `directory` (None: a fresh run).

    Raises:
        FileExistsError: `directory` holds checkpoints and `resume` is False.
    """
    latest = latest_checkpoint(directory) if directory is not None else None
    if latest is not None and not resume:
        # A second run's checkpoints would interleave with the first's, and a later resume
        # could pick the wrong run's latest step.
        raise FileExistsError(
            f"{directory} already holds checkpoints (latest: {latest.name}); "
            "pass resume=True to continue that run, or use an empty checkpoint_dir"
        )
    return latest


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The complete checkpoint with the highest step in `directory`, or None."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    found = max(_checkpoints(directory), default=None)
    return found[1] if found is not None else None


def _checkpoints(directory: Path) -> Iterator[tuple[int, Path]]:
    for path in directory.glob(f"{CHECKPOINT_PREFIX}*"):
        digits = path.name[len(CHECKPOINT_PREFIX) :]
        if digits.isdigit() and (path / STATE_JSON).is_file():
            yield int(digits), path


def _write_checkpoint(
    final: Path, mm: ModularModel, name: str, state: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> None:
    """Write the checkpoint in a temporary folder, then rename it to `final`."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        mm.save(name, tmp / "module")
        write_safetensors(tmp / STATE_TENSORS, tensors, metadata={"format": STATE_FORMAT})
        write_json(tmp / STATE_JSON, state)  # last: a folder with trainer.json is complete
        if final.exists():  # the same step again: set the old one aside, never delete it first
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent))
            os.replace(final, old / final.name)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# -- RNG states ----------------------------------------------------------------------------------


def seed_all(seed: int) -> None:
    """Seed the python, numpy and torch (CPU and every CUDA device) generators `rng_state` captures."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also every CUDA device


def gather_rng(procs: Processes, collate_fn: Any) -> list[dict[str, Any]]:
    """Every process's `rng_state`, by rank, on rank 0 (other ranks get [])."""
    return [_unpack_rng(p) for p in procs.gather_to_zero(_pack_rng(rng_state(collate_fn)))]


def restore_rng(path: Path, states: list[dict[str, Any]], procs: Processes, collate_fn: Any) -> None:
    """Put back this process's random states from a checkpoint's `states` (one per process).

    A checkpoint written by another number of processes has no state for each of them: the random
    states then start afresh, with a warning.
    """
    if len(states) == procs.world:
        set_rng_state(states[procs.rank], collate_fn)
    else:
        warnings.warn(
            f"{path} was written by {len(states)} processes, this run has {procs.world}: "
            "random states start afresh",
            stacklevel=4,  # the line in train() (restore_rng <- _restore <- run <- train)
        )


def rng_state(collate_fn: Any) -> dict[str, Any]:
    """The python, numpy, torch (CPU and CUDA) random states, and the collator's own generator's.

    Args:
        collate_fn: the training collator; its `torch.Generator` at `.generator`, if any, is included.
    """
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # type: ignore[misc]
    generator = getattr(collate_fn, "generator", None)
    return {
        "python": [version, list(mt), gauss],
        "numpy": [kind, np.asarray(keys).tolist(), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "collate": generator.get_state() if isinstance(generator, torch.Generator) else None,
    }


def set_rng_state(state: dict[str, Any], collate_fn: Any) -> None:
    """Put back the random states `rng_state` returned (CUDA and collator ones where they exist)."""
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    generator = getattr(collate_fn, "generator", None)
    if state["collate"] is not None and isinstance(generator, torch.Generator):
        generator.set_state(state["collate"])


def _pack_rng(state: dict[str, Any]) -> bytes:
    """RNG state as JSON bytes (byte tensors as hex), to gather over processes without pickle."""

    def encode(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return {"__bytes__": bytes(v.cpu().tolist()).hex()}
        return [encode(x) for x in v] if isinstance(v, list) else v

    return json.dumps({k: encode(v) for k, v in state.items()}).encode()


def _unpack_rng(payload: bytes) -> dict[str, Any]:
    """Inverse of `_pack_rng`."""

    def decode(v: Any) -> Any:
        if isinstance(v, dict) and "__bytes__" in v:
            return torch.frombuffer(bytearray.fromhex(v["__bytes__"]), dtype=torch.uint8).clone()
        return [decode(x) for x in v] if isinstance(v, list) else v

    return {k: decode(v) for k, v in json.loads(payload).items()}


# -- state files (JSON + safetensors, no pickle) -------------------------------------------------


def _to_json(obj: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    """`obj` as JSON, its tensors moved to `tensors` under flattened keys ("optimizer.state.0.exp_avg")."""
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: _to_json(v, f"{key}.{k}", tensors) for k, v in obj.items()}
        # non-string keys (optimizer state is keyed by int): keep their type
        return {"__items__": [[k, _to_json(v, f"{key}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_to_json(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_to_json(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"{key}: a {type(obj).__name__} cannot be stored in a checkpoint")


def _from_json(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of `_to_json`."""
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__items__" in obj:
            return {k: _from_json(v, tensors) for k, v in obj["__items__"]}
        if "__tuple__" in obj:
            return tuple(_from_json(v, tensors) for v in obj["__tuple__"])
        return {k: _from_json(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_from_json(v, tensors) for v in obj]
    return obj
