"""Merging modules: the module-level API over the formulas of `merging.py`.

    merge_modules(mm, ["a", "b"], "ab", method="ties", density=0.2)            # a new module "ab"
    merge_modules(mm, ["en", "de"], "ende", method="linear", to="lora", rank=16)
    merge_into_model(mm, ["a", "toxic"], "out/", method="task_arithmetic", weights=[1, -1])

What is merged, the *route*:

- **parameters**: when the modules share one method and identical structure (the same config, the
  same parameter names and shapes, equal buffers such as an sft module's entry indices), their
  parameters are merged directly and the result is a module of that method. For methods whose
  change to the base weights is linear in their parameters (sft/diff_pruning with the same entries,
  bitfit, ln, intrinsic without SAID) this *is* the merge of their deltas; modfit checks that
  linearity on the modules themselves (Δ(θ_a + θ_b) = Δ(θ_a) + Δ(θ_b), Δ(−θ_a) = −Δ(θ_a)). For
  modules that change the base function rather than its weights (bottleneck and compacter
  adapters, prompt and prefix tuning) it is plain parameter averaging: the only merge that exists
  for them, so only `linear` and `fisher` are allowed.
- **deltas**: otherwise every module's task vector is its dense delta of the base parameters,
  "<site path>.<param>" -> ΔW in that parameter's layout (`module_deltas`); the formula merges
  those, and the result is stored as a LoRA module (truncated SVD, `svd.py`), an sft module (a
  sparse diff of the non-zero entries), or folded into a full model (`merge_into_model`). This is
  also how LoRA modules merge: averaging A and B is not averaging B·A. Every unit must be
  mergeable; a bottleneck adapter is not linear in any weight and has no delta, so a merge that
  needs one is refused with the module, unit and site named.

`to` picks the form: "same" (the sources' method: the parameter route, or the delta route when a
converter exists for that method, as for lora and sft), "lora", "sft"; `merge_into_model` writes a
`save_pretrained` folder that plain transformers loads. The dense deltas of big modules take as
much memory as the weights they change (merging is offline).

Heads: `head="first"` (default) copies the head of the first source that has one; "average" takes
the mean of the heads' parameters (their configs, labels included, must be equal); a source's name
copies that one's; None gives no head. A merged full model carries no modfit head.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ..config import ModuleConfig
from ..heads import HeadConfig
from ..methods.sft import SparseDiff, SparseEntries, add_diff
from ..model import CONTAINER, ModularModel
from ..sites import Unit
from ..targets import is_projection
from .fisher import Fisher
from .merging import FisherInputs, MergeError, MergeSpec, merge
from .svd import add_lora_from_deltas

Route = Literal["parameters", "deltas"]
HeadChoice = str | None

# -- task vectors of modules ------------------------------------------------------------------------


def unit_deltas(unit: Unit, base: nn.Module) -> dict[str, torch.Tensor]:
    """A mergeable unit's additive change of `base`'s parameters, by parameter name.

    Units that implement only `merge` (multiplicative ones such as (IA)³) are merged into a
    stand-in holding copies of `base`'s parameters, and the change is read off: the real base
    module is never touched.
    """
    try:
        return {k: v.detach() for k, v in unit.deltas(base).items()}
    except NotImplementedError:
        pass
    stand_in = nn.Module()
    for key, param in base.named_parameters(recurse=False):
        stand_in.register_parameter(key, nn.Parameter(param.detach().clone(), requires_grad=False))
    with torch.no_grad():
        unit.merge(stand_in)
    changed = {}
    for key, param in base.named_parameters(recurse=False):
        diff = getattr(stand_in, key).detach().to(torch.promote_types(param.dtype, torch.float32)) - param
        if bool(diff.any()):
            changed[key] = diff
    return changed


def module_deltas(mm: ModularModel, name: str) -> dict[str, torch.Tensor]:
    """Module `name`'s task vector: "<site path>.<param>" -> the dense change of that base parameter.

    Raises:
        MergeError: a unit is not mergeable (the message names the module, unit and site), or the
            module is merged into the weights already.
    """
    record = mm._record(name)
    if record.merged:
        raise MergeError(f"module '{name}' is merged into the base weights; unmerge it first")
    out: dict[str, torch.Tensor] = {}
    for path, unit in mm.units(name):
        if not unit.mergeable:
            raise MergeError(
                f"module '{name}' ({record.config.method}): its {type(unit).__name__} at "
                f"{path or 'the input'} does not change base weights, so the module has no task vector; "
                "modules like it merge only with modules of the same method and identical structure, "
                "by parameter averaging (to='same', method linear or fisher)"
            )
        for param, delta in unit_deltas(unit, mm.view.module(path)).items():
            out[f"{path}.{param}"] = delta
    return out


def module_parameters(mm: ModularModel, name: str) -> dict[str, torch.Tensor]:
    """Module `name`'s unit parameters, "<site path>.<param>" (the module file's keys without
    "units."), live tensors."""
    return {f"{path}.{k}": p for path, unit in mm.units(name) for k, p in unit.named_parameters()}


def _buffers(mm: ModularModel, name: str) -> dict[str, torch.Tensor]:
    return {f"{path}.{k}": b for path, unit in mm.units(name) for k, b in unit.named_buffers()}


# -- converters: a merged delta -> a module of some method ------------------------------------------

Converter = Callable[
    [
        ModularModel,
        str,
        Mapping[str, torch.Tensor],
        "HeadConfig | None",
        Sequence[ModuleConfig],
        "int | None",
    ],
    None,
]
_CONVERTERS: dict[str, Converter] = {}


def register_converter(name: str) -> Callable[[Converter], Converter]:
    """Register `fn(mm, name, deltas, head, source_configs, rank)`, adding a module of method
    `name` that holds the merged deltas; `to=name` (and `to="same"` for modules of that method)
    uses it."""

    def decorate(fn: Converter) -> Converter:
        _CONVERTERS[name] = fn
        return fn

    return decorate


@register_converter("lora")
def _to_lora(
    mm: ModularModel,
    name: str,
    deltas: Mapping[str, torch.Tensor],
    head: HeadConfig | None,
    like: Sequence[ModuleConfig],
    rank: int | None,
) -> None:
    add_lora_from_deltas(mm, name, deltas, head, rank=rank, like=like)


@register_converter("sft")
def _to_sft(
    mm: ModularModel,
    name: str,
    deltas: Mapping[str, torch.Tensor],
    head: HeadConfig | None,
    like: Sequence[ModuleConfig],
    rank: int | None,
) -> None:
    if rank is not None:
        raise MergeError("rank applies to to='lora' only")
    entries = {}
    for key, delta in deltas.items():
        path, param = key.rsplit(".", 1)
        if param != "weight" or not is_projection(mm.view.module(path)):
            raise MergeError(
                f"to='sft' stores changes of projection weights; the merge also changes {param} of "
                f"{path or 'the model'}, which an sft module cannot hold (use to='full', or to='same' for "
                "modules of one method)"
            )
        flat = delta.detach().reshape(-1)
        where = flat.nonzero().reshape(-1)
        entries[path] = SparseEntries(tuple(delta.shape), where, flat[where].clone())
    if not any(e.indices.numel() for e in entries.values()):
        raise MergeError("the merged delta is zero everywhere: there is no entry for an sft module to hold")
    add_diff(mm, name, SparseDiff(entries), head, like=like[0] if like else None)


def converters() -> list[str]:
    """The `to` forms besides "same" (and the full model of `merge_into_model`)."""
    return sorted(_CONVERTERS)


# -- the API ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MergeResult:
    """What `merge_modules` did.

    Attributes:
        name: the new module; method: its method; route: "parameters" or "deltas" (module doc).
    """

    name: str
    method: str
    route: Route


def merge_modules(
    mm: ModularModel,
    sources: Sequence[str],
    name: str,
    *,
    method: str = "linear",
    weights: Sequence[float] | None = None,
    density: float | None = None,
    scale: float = 1.0,
    seed: int = 0,
    to: str = "same",
    rank: int | None = None,
    head: HeadChoice = "first",
    fishers: Mapping[str, Fisher] | None = None,
    base_weight: float | None = None,
    fisher_floor: float = 1e-6,
) -> MergeResult:
    """Merge modules `sources` of `mm` into a new module `name` (added inactive, like `mm.add`).

    Args:
        sources: module names on `mm` (a name may not repeat; load a module twice under two names
            to combine it with itself).
        method: a merge method (`merging.merge_methods()`): linear, task_arithmetic, ties,
            dare_linear, dare_ties, magnitude_prune, fisher.
        weights: w_i / λ_i, one per source (default 1 each); negative for task_arithmetic's
            negation and EWR's anti-experts.
        density: the fraction ties / magnitude_prune keep (0.2) and dare_* keep (0.5).
        scale: multiplies the merged task vector. seed: DARE's draw.
        to: "same" (the sources' method), "lora" or "sft" (see the module doc).
        rank: the LoRA rank for to="lora" (default: the smallest that keeps the merge exactly).
        head: "first", "average", a source's name, or None.
        fishers: source name -> its `Fisher` (method fisher).
        base_weight: λ0 of Elastic Weight Removal (method fisher, delta route).
        fisher_floor: the smallest Fisher value used.

    Returns:
        A `MergeResult`.

    Raises:
        MergeError: the merge is not possible as asked; the message names the module, unit, site or
            setting and what to do instead. KeyError: an unknown module.
    """
    spec = MergeSpec(method, _tuple(weights), density, scale, seed, base_weight, fisher_floor)
    _check_sources(mm, sources, spec, fishers)
    head_config, head_state = _head(mm, sources, head)
    records = [mm.records[s] for s in sources]
    methods = sorted({r.config.method for r in records})
    if to == "same":
        if len(methods) > 1:
            raise MergeError(
                f"modules {', '.join(sources)} are of different methods ({', '.join(methods)}): choose "
                f"the form of the result, to={' | '.join(repr(c) for c in converters())}, or merge into "
                "a full model"
            )
        route = _same_route(mm, sources, spec)
        target = methods[0]
    elif to in _CONVERTERS:
        route, target = "deltas", to
    else:
        raise MergeError(f"unknown form to={to!r}; use 'same', {', '.join(repr(c) for c in converters())}")
    if rank is not None and target != "lora":
        raise MergeError("rank applies to LoRA results only (to='lora', or to='same' for LoRA modules)")
    language = records[0].card.get("language")
    if any(r.card.get("language") != language for r in records):
        language = None
    if name in mm.records:
        raise MergeError(f"a module named '{name}' already exists; choose another name for the merge")
    try:
        if route == "parameters":
            _merge_parameters(mm, sources, name, spec, fishers, head_config)
        else:
            deltas = _merged_deltas(mm, sources, spec, fishers)
            _CONVERTERS[target](mm, name, deltas, head_config, [r.config for r in records], rank)
        new = mm.records[name]
        if language is not None:
            new.card["language"] = language
        if head_state is not None:
            built = mm.head_module(name)
            assert built is not None
            built.load_state_dict(head_state)
    except BaseException:
        if name in mm.records:  # a half-made module: gone, as if the merge had not started
            mm.remove(name)
        raise
    return MergeResult(name, new.config.method, route)


def merge_into_model(
    mm: ModularModel,
    sources: Sequence[str],
    directory: str | Path,
    *,
    method: str = "linear",
    weights: Sequence[float] | None = None,
    density: float | None = None,
    scale: float = 1.0,
    seed: int = 0,
    fishers: Mapping[str, Fisher] | None = None,
    base_weight: float | None = None,
    fisher_floor: float = 1e-6,
    tokenizer: Any = None,
) -> Path:
    """Merge modules `sources` and write the base model plus the merged delta, θ0 + τ*, as a
    `save_pretrained` folder that plain transformers loads (`AutoModel.from_pretrained`).

    Arguments as for `merge_modules`; a `tokenizer` given is saved in the folder too, so that it
    is complete for pipelines. `mm` is not changed. The weights written are the model's
    as they are now (a module folded in with `mm.merge` stays in them); no modfit module or head
    is saved. The files are written to a temporary folder beside `directory`, then moved in.

    Raises:
        MergeError: a source without a task vector (e.g. a bottleneck adapter), or invalid settings.
    """
    spec = MergeSpec(method, _tuple(weights), density, scale, seed, base_weight, fisher_floor)
    _check_sources(mm, sources, spec, fishers)
    deltas = _merged_deltas(mm, sources, spec, fishers)
    prefix = mm.view.prefix
    state = {k: v for k, v in mm.model.state_dict().items() if not k.startswith(CONTAINER + ".")}
    for key, delta in deltas.items():
        full = prefix + key
        base = state[full]
        state[full] = base + delta.to(device=base.device, dtype=base.dtype)
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise MergeError(f"{directory}: exists and is not a folder")
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    try:
        save_pretrained = getattr(mm.model, "save_pretrained", None)
        if save_pretrained is None:
            raise MergeError("the base model has no save_pretrained: it is not a transformers model")
        save_pretrained(staging, state_dict=state)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        directory.mkdir(exist_ok=True)
        for item in sorted(staging.iterdir()):
            os.replace(item, directory / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


# -- helpers ----------------------------------------------------------------------------------------


def _tuple(weights: Sequence[float] | None) -> tuple[float, ...] | None:
    return None if weights is None else tuple(float(w) for w in weights)


def _check_sources(
    mm: ModularModel, sources: Sequence[str], spec: MergeSpec, fishers: Mapping[str, Fisher] | None
) -> None:
    if not sources:
        raise MergeError("name at least one module to merge")
    repeated = sorted({s for s in sources if list(sources).count(s) > 1})
    if repeated:
        raise MergeError(
            f"module {', '.join(repeated)} is named twice; load it a second time under another name to "
            "combine it with itself"
        )
    for source in sources:
        if mm._record(source).merged:
            raise MergeError(f"module '{source}' is merged into the base weights; unmerge it first")
    if spec.weights is not None and len(spec.weights) != len(sources):
        raise MergeError(
            f"{len(spec.weights)} weights for {len(sources)} modules: give one weight per module"
        )
    if spec.needs_fisher:
        missing = [s for s in sources if fishers is None or s not in fishers]
        if missing:
            raise MergeError(
                f"method fisher needs each module's Fisher; none for {', '.join(missing)} "
                "(compute_fisher, or modfit fisher)"
            )


def _same_route(mm: ModularModel, sources: Sequence[str], spec: MergeSpec) -> Route:
    """The route for to="same" (module doc), or a MergeError saying why there is none."""
    config = mm.records[sources[0]].config
    method = config.method
    mergeable = all(u.mergeable for s in sources for _, u in mm.units(s))
    same = _same_structure(mm, sources)
    if same and (not mergeable or _linear_in_parameters(mm, sources)):
        if spec.is_ewr:
            raise MergeError(
                f"Elastic Weight Removal works on the base weights: merge these {method} modules with "
                f"to={' | '.join(repr(c) for c in converters())} or into a full model"
            )
        if not mergeable and spec.method not in ("linear", "fisher"):
            raise MergeError(
                f"{method} modules change the base function, not its weights: they have no task vector, so "
                f"{spec.method} does not apply; only parameter averaging does (method linear or fisher)"
            )
        return "parameters"
    if mergeable and method in _CONVERTERS:
        return "deltas"
    if not mergeable:
        raise MergeError(
            f"{method} modules {', '.join(sources)} differ in structure (config, parameter shapes or "
            "entries) and have no task vector: they cannot be merged"
        )
    raise MergeError(
        f"{method} modules cannot be merged into one {method} module: their change to the weights is not "
        "linear in their parameters, so merging parameters is not merging their deltas; merge the "
        f"deltas with to={' | '.join(repr(c) for c in converters())} or into a full model"
    )


def _same_structure(mm: ModularModel, sources: Sequence[str]) -> bool:
    first = sources[0]
    config = mm.records[first].config
    params = module_parameters(mm, first)
    buffers = _buffers(mm, first)
    for other in sources[1:]:
        if mm.records[other].config != config:
            return False
        theirs = module_parameters(mm, other)
        if theirs.keys() != params.keys() or any(theirs[k].shape != params[k].shape for k in params):
            return False
        their_buffers = _buffers(mm, other)
        if their_buffers.keys() != buffers.keys():
            return False
        if any(
            their_buffers[k].shape != buffers[k].shape or not torch.equal(their_buffers[k], buffers[k])
            for k in buffers
        ):
            return False
    return True


@torch.no_grad()
def _linear_in_parameters(mm: ModularModel, sources: Sequence[str]) -> bool:
    """Whether the deltas of these identically built modules are linear in their parameters:
    Δ(θ_a + θ_b) = Δ(θ_a) + Δ(θ_b) and Δ(−θ_a) = −Δ(θ_a), tried on the first and last source."""
    a, b = sources[0], sources[-1]
    live = module_parameters(mm, a)
    saved = {k: v.detach().clone() for k, v in live.items()}
    other = {k: v.detach().clone() for k, v in module_parameters(mm, b).items()}
    delta_a, delta_b = module_deltas(mm, a), module_deltas(mm, b)

    def deltas_at(values: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for key, param in live.items():
            param.copy_(values[key])
        return {k: v.clone() for k, v in module_deltas(mm, a).items()}

    try:
        summed = deltas_at({k: saved[k] + other[k] for k in live})
        negated = deltas_at({k: -saved[k] for k in live})
    finally:
        for key, param in live.items():
            param.copy_(saved[key])
    expected_sum = {k: delta_a.get(k, 0) + delta_b.get(k, 0) for k in {*delta_a, *delta_b}}
    expected_neg = {k: -v for k, v in delta_a.items()}
    return _close(summed, expected_sum) and _close(negated, expected_neg)


def _close(got: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor | int]) -> bool:
    for key in {*got, *expected}:
        x = got.get(key)
        y = expected.get(key)
        x = torch.zeros(()) if x is None else x
        y_t = torch.as_tensor(0.0) if y is None or isinstance(y, int) else y
        tolerance = 1e-4 * float(y_t.abs().max()) + 1e-7 if y_t.numel() else 1e-7
        if not torch.allclose(x.float(), y_t.float(), rtol=1e-4, atol=tolerance):
            return False
    return True


def _merge_parameters(
    mm: ModularModel,
    sources: Sequence[str],
    name: str,
    spec: MergeSpec,
    fishers: Mapping[str, Fisher] | None,
    head: HeadConfig | None,
) -> None:
    vectors = [{k: v.detach().clone() for k, v in module_parameters(mm, s).items()} for s in sources]
    inputs = None
    if spec.needs_fisher:
        assert fishers is not None
        inputs = FisherInputs([_fisher_part(fishers, s, "units") for s in sources])
    merged = merge(vectors, spec, inputs)
    first = mm.records[sources[0]]
    mm.add(name, first.config, head, task=head.task if head else None)
    source_buffers = _buffers(mm, sources[0])
    with torch.no_grad():
        for key, param in module_parameters(mm, name).items():
            param.copy_(merged[key])
        for key, buffer in _buffers(mm, name).items():
            buffer.copy_(source_buffers[key])


def _merged_deltas(
    mm: ModularModel, sources: Sequence[str], spec: MergeSpec, fishers: Mapping[str, Fisher] | None
) -> dict[str, torch.Tensor]:
    vectors = [module_deltas(mm, s) for s in sources]
    inputs = None
    if spec.needs_fisher:
        assert fishers is not None
        parts = [_fisher_part(fishers, s, "deltas") for s in sources]
        theta0 = fisher0 = None
        if spec.is_ewr:
            keys = list(dict.fromkeys(k for v in vectors for k in v))
            theta0 = {}
            fisher0 = {}
            for key in keys:
                path, param = key.rsplit(".", 1)
                value = getattr(mm.view.module(path), param).detach()
                theta0[key] = value.to(torch.promote_types(value.dtype, torch.float32))
                given = [fishers[s].base[key] for s in sources if key in fishers[s].base]
                if not given:
                    raise MergeError(
                        f"Elastic Weight Removal needs the base Fisher F0 of {key}, which none of the "
                        "modules' Fishers holds (compute_fisher stores it for mergeable modules)"
                    )
                fisher0[key] = torch.stack(given).mean(0)  # one F0 per parameter: the mean of the estimates
        inputs = FisherInputs(parts, theta0, fisher0)
    return merge(vectors, spec, inputs)


def _fisher_part(fishers: Mapping[str, Fisher], source: str, part: str) -> dict[str, torch.Tensor]:
    values = fishers[source].part(part)
    if not values:
        raise MergeError(
            f"the Fisher of module '{source}' has no '{part}' values: it was computed for another "
            "kind of merge"
        )
    return values


def _head(
    mm: ModularModel, sources: Sequence[str], head: HeadChoice
) -> tuple[HeadConfig | None, dict[str, torch.Tensor] | None]:
    """The merged module's head config and parameters."""
    if head is None or head == "none":
        return None, None
    with_heads = [s for s in sources if mm.records[s].head is not None]
    if head == "average":
        if len(with_heads) != len(sources):
            raise MergeError("head='average' needs a head on every module; some have none")
        configs = {mm.records[s].head for s in sources}
        if len(configs) > 1:
            raise MergeError(
                "head='average' needs heads of one task with the same labels; these differ "
                "(choose one with head=<module name>)"
            )
        states = []
        for s in sources:
            built = mm.head_module(s)
            assert built is not None
            states.append(built.state_dict())
        mean = {k: torch.stack([st[k].detach() for st in states]).mean(0) for k in states[0]}
        return mm.records[sources[0]].head, mean
    if head == "first":
        if not with_heads:
            return None, None
        chosen = with_heads[0]
    elif head in sources:
        chosen = head
        if mm.records[chosen].head is None:
            raise MergeError(f"head='{head}': module '{head}' has no head")
    else:
        raise MergeError(
            f"head={head!r}: use 'first', 'average', None or one of the modules ({', '.join(sources)})"
        )
    built = mm.head_module(chosen)
    assert built is not None
    return mm.records[chosen].head, {k: v.detach().clone() for k, v in built.state_dict().items()}
