"""The diagonal Fisher of a module, computed on a data set and stored beside the module.

    F[j] = (1/N) Σ_n ( ∂ log p_θ(y_n | x_n) / ∂θ_j )²          one squared gradient per example

The log-likelihood of an example is the sum over its predictions (one label for seq-cls; every
labelled token for token-cls, mlm and causal-lm), so a sequence counts once, as one draw.

Which y: by default (`target="sample"`) y is drawn from the model's own predictive distribution
p_θ(y | x), one draw per prediction, from a seeded generator. That is a Monte Carlo estimate of the
Fisher information itself (an expectation over the model's y, as Matena & Raffel 2022 define the
Fisher they merge with; EWR's released code also draws one label per position), and it needs no
labels, so any text file will do. `target="label"` uses the data's labels: the *empirical*
Fisher. It is a worse estimate: on examples the module fits well the gradient of the true label
is near zero, so the empirical Fisher vanishes exactly where the module is confident (Kunstner et
al. 2019, "Limitations of the empirical Fisher approximation").

Three parts, each keyed "<site path>.<name>":

- `units`: w.r.t. the module's own parameters (LoRA's A and B, an adapter's weights), module
  active. Parameter averaging of identically built modules reads these.
- `deltas`: w.r.t. the base parameters the module changes, at θ0 + τ (module merged). This is the
  F_i of a merge of task vectors (dense deltas), whatever the method's parametrisation.
- `base`: the same base parameters at θ0 (module's units off, its head kept): F0 for Elastic Weight
  Removal.

`deltas` and `base` exist for mergeable modules only. Each part costs one forward and backward per
example (batch size 1: per-example gradients cannot be recovered from a batch's summed gradient).
The model's weights are restored bit for bit afterwards.

On disk: `fisher.safetensors` in the module's folder, keys `units.…`, `deltas.…`, `base.…`, with
metadata naming the module, the target and the digest of the module's weights file, written
atomically.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open

from ..atomic import write_safetensors
from ..batching import IGNORE_INDEX
from ..evaluate import CollateFn, Feature, to_device
from ..model import ModularModel
from ..persistence import WEIGHTS

FISHER_FILE = "fisher.safetensors"
FORMAT = "modfit-fisher"
PARTS = ("units", "deltas", "base")
Target = Literal["sample", "label"]


class FisherFileError(ValueError):
    """A Fisher file is missing, unreadable or stale; the message names the folder."""


@dataclass
class Fisher:
    """A module's diagonal Fisher in three parts (see the module doc), each "<site path>.<name>" -> F.

    Attributes:
        metadata: strings stored with the file (module, target, examples, seed, module_sha256).
    """

    units: dict[str, torch.Tensor] = field(default_factory=dict)
    deltas: dict[str, torch.Tensor] = field(default_factory=dict)
    base: dict[str, torch.Tensor] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)

    def part(self, name: str) -> dict[str, torch.Tensor]:
        """One of "units", "deltas", "base"."""
        if name not in PARTS:
            raise ValueError(f"unknown Fisher part '{name}'; use one of {', '.join(PARTS)}")
        part: dict[str, torch.Tensor] = getattr(self, name)
        return part

    def tensors(self) -> dict[str, torch.Tensor]:
        """All parts under their file keys "<part>.<site path>.<name>"."""
        return {f"{part}.{k}": v for part in PARTS for k, v in self.part(part).items()}


def compute_fisher(
    mm: ModularModel,
    name: str,
    features: Sequence[Feature],
    *,
    collate_fn: CollateFn,
    target: Target = "sample",
    seed: int = 0,
    task: str | None = None,
) -> Fisher:
    """The diagonal Fisher of module `name` over `features` (see the module doc).

    The module runs in the active composition when that contains it (e.g. stacked on a language
    module), else alone; the model is in eval mode throughout. Activation, mode and weights are
    restored afterwards.

    Args:
        features: encoded examples (labels required for `target="label"`).
        collate_fn: features -> batch, as for training (an MLM collator masks the tokens).
        target: "sample" (y drawn from the model, the default) or "label" (the empirical Fisher).
        seed: seeds the draws of y.
        task: the likelihood's task when the module has no head (only "causal-lm", through the
            model's own output layer); default: the head's task.

    Raises:
        KeyError: no such module. ValueError: no features, a merged module, labels missing for
            target="label", or no head and no output layer to score with.
    """
    from .module_merge import module_deltas  # module_merge imports this module

    record = mm._record(name)
    if record.merged:
        raise ValueError(f"module '{name}' is merged into the weights; unmerge it first")
    if not features:
        raise ValueError("no examples to compute the Fisher on")
    if target not in ("sample", "label"):
        raise ValueError(f"target must be 'sample' or 'label', got {target!r}")
    task = record.head.task if record.head is not None else task
    if record.head is None and task != "causal-lm":
        raise ValueError(
            f"module '{name}' has no head, so there is no likelihood to differentiate; a module without a "
            "head works only with task causal-lm (the base model's own output layer)"
        )
    assert task is not None
    composition, head_name = mm.active, mm.head_name
    training = mm.training
    if composition is None or name not in composition.names():
        mm.activate(name)
    elif record.head is not None:
        mm.activate(composition, head=name)
    mm.eval()
    result = Fisher(metadata={"format": FORMAT, "module": name, "target": target, "seed": str(seed)})
    result.metadata["examples"] = str(len(features))
    try:

        def squares(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return _squared_grads(mm, params, features, collate_fn, task, target, seed)

        units = list(mm.units(name))
        result.units = squares({f"{p}.{k}": v for p, u in units for k, v in u.named_parameters()})
        if all(u.mergeable for _, u in units):
            keys = list(module_deltas(mm, name))
            params = {k: _base_param(mm, k) for k in keys}
            original = {k: v.detach().clone() for k, v in params.items()}
            merged: dict[str, torch.Tensor] = {}
            mm.merge(name)
            try:
                merged = {k: v.detach().clone() for k, v in params.items()}
                result.deltas = squares(params)  # at θ0 + τ
                _copy(params, original)  # θ0 with the units still off ("merged"): the base, with the head
                result.base = squares(params)
            finally:
                if merged:
                    _copy(params, merged)  # what unmerge expects to find
                mm.unmerge(name)
                _copy(params, original)  # bit for bit, whatever unmerge's rounding
    finally:
        if composition is None:
            mm.deactivate()
        else:
            mm.activate(composition, head=head_name)
        mm.train(training)
    return result


def _base_param(mm: ModularModel, key: str) -> torch.Tensor:
    path, param = key.rsplit(".", 1)
    value = getattr(mm.view.module(path), param)
    assert isinstance(value, torch.Tensor)
    return value


@torch.no_grad()
def _copy(params: dict[str, torch.Tensor], values: dict[str, torch.Tensor]) -> None:
    for key, param in params.items():
        param.copy_(values[key])


@contextlib.contextmanager
def _gradients_for(mm: ModularModel, params: Sequence[torch.Tensor]) -> Iterator[None]:
    """Only `params` require gradients inside the block; every flag is restored afterwards."""
    flags = [(p, p.requires_grad) for p in mm.model.parameters()]
    try:
        for param, _ in flags:
            param.requires_grad_(False)
        for tensor in params:
            tensor.requires_grad_(True)
        yield
    finally:
        for tensor in params:
            tensor.requires_grad_(False)
        for param, flag in flags:
            param.requires_grad_(flag)


def _squared_grads(
    mm: ModularModel,
    params: dict[str, torch.Tensor],
    features: Sequence[Feature],
    collate_fn: CollateFn,
    task: str,
    target: Target,
    seed: int,
) -> dict[str, torch.Tensor]:
    """(1/N) Σ_n (∂ log p(y_n | x_n) / ∂θ)² for each tensor of `params`, one example at a time."""
    sums = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in params.items()}
    if not params:
        return sums
    generator = torch.Generator().manual_seed(seed)
    device = next(mm.model.parameters()).device
    tensors = list(params.values())
    with _gradients_for(mm, tensors):
        for index, feature in enumerate(features):
            batch = to_device(collate_fn([feature]), device)
            loglik = _log_likelihood(mm, batch, task, target, generator, index)
            if loglik is None:
                continue  # nothing to predict in this example (an MLM draw that masked no token)
            grads = torch.autograd.grad(loglik, tensors, allow_unused=True)
            for key, grad in zip(params, grads, strict=True):
                if grad is not None:
                    sums[key] += grad.detach().float() ** 2
    return {k: v / len(features) for k, v in sums.items()}


def _log_likelihood(
    mm: ModularModel,
    batch: dict[str, torch.Tensor],
    task: str,
    target: Target,
    generator: torch.Generator,
    index: int,
) -> torch.Tensor | None:
    """log p(y | x) of one example, summed over its predictions; None if it has none."""
    labels = batch.pop("labels", None)
    if target == "label" and labels is None:
        raise ValueError(
            f"example {index + 1} has no label: target='label' (the empirical Fisher) needs labelled data; "
            "target='sample' does not"
        )
    if mm.head_name is not None:
        logits = mm(**batch).logits
    else:
        logits = getattr(mm.model(**batch), "logits", None)
        if logits is None:
            raise ValueError("the model gives no logits to score with; give the module a head")
    log_probs = F.log_softmax(logits.float(), dim=-1)
    if task == "seq-cls":
        rows = log_probs.reshape(-1, log_probs.shape[-1])  # (1, labels)
        gold = labels.reshape(-1) if labels is not None else None
    else:
        mask = batch["attention_mask"].bool() if "attention_mask" in batch else None
        if task == "causal-lm":  # position t predicts token t+1
            log_probs = log_probs[:, :-1]
            labels = labels[:, 1:] if labels is not None else None
            mask = mask[:, 1:] if mask is not None else None
        if labels is not None:
            mask = labels != IGNORE_INDEX
        if mask is None:
            mask = torch.ones(log_probs.shape[:-1], dtype=torch.bool, device=log_probs.device)
        rows = log_probs[mask]  # (predictions, classes)
        gold = labels[mask] if labels is not None else None
    if rows.shape[0] == 0:
        return None
    if target == "label":
        assert gold is not None
        y = gold
    else:
        probs = rows.detach().exp().cpu()
        y = torch.multinomial(probs, 1, generator=generator).squeeze(-1).to(rows.device)
    return rows.gather(1, y[:, None]).sum()


# -- files ---------------------------------------------------------------------------------------


def module_digest(directory: str | Path) -> str:
    """sha256 of a module folder's weights file: a Fisher records the module it belongs to."""
    digest = hashlib.sha256()
    with open(Path(directory) / WEIGHTS, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_fisher(fisher: Fisher, directory: str | Path) -> Path:
    """Write `fisher` as `<directory>/fisher.safetensors` (atomically); returns the file's path."""
    path = Path(directory) / FISHER_FILE
    write_safetensors(path, fisher.tensors(), metadata={**fisher.metadata, "format": FORMAT})
    return path


def read_fisher(directory: str | Path, *, check_module: bool = True) -> Fisher:
    """The Fisher stored in a module folder.

    Args:
        check_module: refuse a Fisher whose recorded weights digest is not the folder's module's.

    Raises:
        FisherFileError: no file (the message says how to make one), an unreadable file, one that
            is not a modfit Fisher, or a stale one.
    """
    directory = Path(directory)
    path = directory / FISHER_FILE
    if not path.is_file():
        raise FisherFileError(
            f"{directory}: no {FISHER_FILE}; compute it with `modfit fisher --load {directory} --data FILE "
            f"--out {directory}`"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118  (safe_open has no __iter__)
    except (SafetensorError, OSError) as e:
        raise FisherFileError(f"{path}: cannot read safetensors: {e}") from None
    if metadata.get("format") != FORMAT:
        raise FisherFileError(f'{path}: not a modfit Fisher file (metadata "format" is not "{FORMAT}")')
    recorded = metadata.get("module_sha256")
    if check_module and recorded and (directory / WEIGHTS).is_file() and recorded != module_digest(directory):
        raise FisherFileError(
            f"{path}: computed for other weights than {directory / WEIGHTS} (the module changed since); "
            "run modfit fisher again"
        )
    fisher = Fisher(metadata=metadata)
    for key, value in tensors.items():
        part, _, rest = key.partition(".")
        if part not in PARTS or not rest:
            raise FisherFileError(f"{path}: unexpected key {key!r} (expected units.*, deltas.* or base.*)")
        fisher.part(part)[rest] = value
    return fisher
