"""Sites: the places in a frozen base model where modules attach.

A `Site` watches one module of the base model (a projection such as `attention.self.query`, or
the last step of a sub-layer such as BERT's `output.dropout`) through forward hooks: the base
model's classes and forward code stay exactly as HuggingFace wrote them. The site holds the
*units* attached there, one per named module, and at forward time folds the active ones over the
watched module's output::

    h = watched_module(*inputs)                # the frozen computation
    for unit in active_units:                  # parameter units first, then function units
        h = unit(h, call)                      # call: inputs, residual r, post-LN, base module
    return h

Every method's per-site piece is a `Unit` with that one signature: LoRA adds a low-rank branch of
the input (`h + s·B A x`), a sequential adapter transforms `h`, a parallel adapter adds a branch of
the residual `r`. A site may also read the residual stream `r` from another module's forward input
(a pre-hook), because parallel adapters and Pfeiffer's layer-norm placement need it.

In inference, a site whose one active unit can fold into the projection (LoRA, DoRA) may instead
offer the watched `nn.Linear` a weight with the unit's change in it for that call, from a pre-hook
(`folding.py`); the output then holds the unit's change already and the output hook leaves it.

Sites live in the `ModularModel`'s container (a child of the HuggingFace model, so the Trainer,
DDP and `.to()` see their parameters); removing the last unit removes the hooks.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, cast

import torch
from torch import nn

from . import cpu_kernels, folding
from .archs import InputRef
from .targets import ResolvedHookPoint

if TYPE_CHECKING:
    from .siblings import SiblingGroup


class _PerThread(threading.local):
    """A site's per-call state, per thread. `threading.local` runs `__init__` in every thread that
    touches it, so both fields are in the instance dict from the first call on: `torch.compile`'s
    guards then see the same attributes on every call and do not recompile on the second."""

    def __init__(self) -> None:
        self.residual: torch.Tensor | None = None  # from the residual pre-hook, for the output hook
        self.bypass = False  # set while `_rerun` calls the watched module without this site

    def __reduce__(self) -> tuple[type[_PerThread], tuple[()]]:
        # per-call state is not copied: a deep copy (or pickle) of the model starts with none
        return (_PerThread, ())


@dataclass
class SiteCall:
    """What a unit sees of one call of the watched module.

    Attributes:
        inputs: the watched module's positional inputs (`inputs[0]` is x for a projection).
        residual: the residual stream r for a sub-layer site (None for projection sites).
        norm: the post-residual LayerNorm of a post-LN family (None otherwise).
        base: the watched module itself (a projection's weight for merge-free variants).
        kwargs: the watched module's keyword inputs.
        output: the watched module's own output, as it returned it (for a tensor output, what the
            base computed before any unit ran: DoRA rescales the base part of a projection's output).
        rerun: runs the watched module again on other inputs `(args, kwargs)` with this site's own
            hooks switched off (a branch of `fuse`/`average` whose units edit the module's input).
        args: the positional inputs exactly as the module got them (`inputs` falls back to the
            keyword values when there are none), for `rerun`.
        writable: `h` is this call's alone, so the unit may write its result into it instead of
            allocating a new (tokens, width) tensor. Set only for a unit whose class has
            `writes_in_place`, run alone at its site, in inference (no gradient recorded), when no
            other forward hook could have kept the module's output and that output shares no memory
            with its inputs or the residual (see `_writable`).
    """

    inputs: tuple[Any, ...]
    residual: torch.Tensor | None
    norm: nn.Module | None
    base: nn.Module
    kwargs: dict[str, Any] = field(default_factory=dict)
    output: Any = None
    rerun: Callable[[tuple[Any, ...], dict[str, Any]], Any] | None = None
    args: tuple[Any, ...] = ()
    writable: bool = False


class Unit(nn.Module):
    """A method's piece at one site: `forward(h, call) -> h`, optionally `before(args, kwargs)`.

    Attributes:
        stage: 0 for parameter composition (a delta on the watched projection, computed from its
            input), 1 for function composition (a transform of the output). Parameter units run
            first so a function unit sees the full projection output.
        mergeable: whether `deltas()` exists, i.e. the unit can be folded into the base weights.
        needs_residual: whether the site must capture the residual stream r.
        edits_input: whether `before()` rewrites the watched module's inputs (a pre-hook), e.g.
            (IA)³ scaling a projection's input, or prompt tuning prepending virtual tokens.
        whole_output: whether `forward()` receives the watched module's raw output (a tuple or a
            ModelOutput) instead of its first tensor.
        averageable: whether identically built instances can be mixed by averaging their
            parameters (Polytropon's skills, `methods/poly_skills.py`): the forward depends on the
            unit's own parameters only, edits no input and shares nothing with other units.
        writes_in_place: whether `forward()` writes its result into `h` when `call.writable`.
        folds_per_call: whether `folded_weight()` may give the weight of one inference call with this
            unit's change in it (`folding.py`); the site then adds a pre-hook to offer it.
        siblings: the units of this class running alone at sibling sites (children of the same
            parent module, which a transformer usually calls on the same input), set by the model
            at each activation (`siblings.py`); None when this unit runs with others or has none.
    """

    stage: ClassVar[int] = 1
    mergeable: ClassVar[bool] = False
    needs_residual: ClassVar[bool] = False
    edits_input: ClassVar[bool] = False
    whole_output: ClassVar[bool] = False
    averageable: ClassVar[bool] = False
    writes_in_place: ClassVar[bool] = False
    folds_per_call: ClassVar[bool] = False
    siblings: SiblingGroup | None = None

    def forward(self, h: Any, call: SiteCall) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def before(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Rewrite the watched module's inputs (only called when `edits_input`)."""
        return args, kwargs

    def folded_weight(self, base: nn.Linear, x: torch.Tensor) -> torch.Tensor | None:
        """For one inference call of the projection `base` on x, (..., in): `base.weight` with this
        unit's change in it, (out, in), a new tensor, where that is cheaper than this unit's forward;
        None (the default) to run the forward. Only asked when `folds_per_call`."""
        return None

    def deltas(self, base: nn.Module) -> dict[str, torch.Tensor]:
        """Additive changes to the watched module's parameters, by parameter name ("weight",
        "bias"), each in that parameter's layout, given the unmerged base module."""
        raise NotImplementedError(f"{type(self).__name__} cannot be merged into the base weights")

    @torch.no_grad()
    def merge(self, base: nn.Module) -> None:
        """Fold this unit into `base`'s parameters (parameter += delta)."""
        for name, delta in self.deltas(base).items():
            param = cast(torch.Tensor, getattr(base, name))
            param.add_(delta.to(device=param.device, dtype=param.dtype))

    @torch.no_grad()
    def unmerge(self, base: nn.Module) -> None:
        """Undo `merge` (exact up to rounding). Units whose delta depends on the base override this."""
        for name, delta in self.deltas(base).items():
            param = cast(torch.Tensor, getattr(base, name))
            param.sub_(delta.to(device=param.device, dtype=param.dtype))

    def regularizer(self) -> torch.Tensor | None:
        """An auxiliary loss term of this unit (a scalar), or None (the default: no term).

        `ModularModel.regularization()` sums the terms of the running units and `ModularModel.forward`
        adds that sum to the loss in training mode. Diff pruning's λ·E[L0] penalty uses this
        channel; routers' load-balancing losses are meant to use it too.
        """
        return None

    def metrics(self) -> dict[str, float]:
        """Scalars this unit observed since the last call (e.g. a router's entropy and usage), then
        starts over; {} (the default) when it reports nothing.

        `ModularModel.unit_metrics()` collects them per module (averaged over its sites) and the
        training loop averages them over each logging interval into the history and progress bar.
        """
        return {}

    def parts(self) -> list[Unit]:
        """The units a site runs in place of this one: itself. A union of methods (several methods in
        one module, `methods/union.py`) returns its members, so that the site orders every member by
        its own stage and gives each the hooks it needs."""
        return [self]


@dataclass(frozen=True)
class Attachment:
    """Where a method puts one unit: the watched module's path and, for sub-layer sites, the hook
    point telling the site where to read the residual stream and the post-LN."""

    path: str
    unit: Unit
    hook: ResolvedHookPoint | None = None


class _Ref:
    """Holds a module without registering it as a child (the site must not own base modules, nor list
    a unit of its `units` twice)."""

    __slots__ = ("module",)

    def __init__(self, module: nn.Module | None) -> None:
        self.module = module


class Site(nn.Module):
    """The units attached at one watched module, and the hooks that apply them.

    Args:
        path: the watched module's path relative to `model.base_model` (for messages and keys).
        target: the watched module.
    """

    def __init__(self, path: str, target: nn.Module) -> None:
        super().__init__()
        self.path = path
        self.units = nn.ModuleDict()
        self._target = _Ref(target)
        self._norm = _Ref(None)
        self._residual_ref: InputRef | None = None
        self._residual_module = _Ref(None)
        self._active: list[Unit] = []
        self._editors: list[Unit] = []  # active units with `before()`
        self._folder = _Ref(None)  # the active unit, when it runs alone and can fold (not a child)
        self._plain_output = True  # no active unit wants the raw output
        self._input_hooked = False
        self._stash = _PerThread()
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._handles.append(target.register_forward_hook(self._on_output, with_kwargs=True))

    @property
    def target(self) -> nn.Module:
        """The watched base-model module."""
        module = self._target.module
        assert module is not None
        return module

    def read_residual(self, ref: InputRef, module: nn.Module, norm: nn.Module | None) -> None:
        """Capture the residual stream from `module`'s forward input (see `archs.InputRef`).

        Raises:
            ValueError: the site already reads its residual from somewhere else.
        """
        if self._residual_ref is not None:
            if self._residual_ref != ref or self._residual_module.module is not module:
                raise ValueError(
                    f"site {self.path}: conflicting residual sources {self._residual_ref} and {ref}"
                )
            return
        self._residual_ref = ref
        self._residual_module = _Ref(module)
        self._norm = _Ref(norm)
        self._handles.append(module.register_forward_pre_hook(self._on_residual, with_kwargs=True))

    def unit(self, name: str) -> Unit:
        """The unit of module `name` at this site."""
        return cast(Unit, self.units[name])

    def add_unit(self, name: str, unit: Unit) -> None:
        """Attach `unit` under the module name `name` (inactive until `set_active`)."""
        if name in self.units:
            raise ValueError(f"site {self.path} already holds a unit of module '{name}'")
        self.units[name] = unit
        wants_input = any(part.edits_input or part.folds_per_call for part in unit.parts())
        if wants_input and not self._input_hooked:  # registered only once a unit needs it
            self._handles.append(self.target.register_forward_pre_hook(self._on_input, with_kwargs=True))
            self._input_hooked = True

    def remove_unit(self, name: str) -> None:
        """Detach the unit of module `name` and drop it from the active list."""
        parts = cast(Unit, self.units[name]).parts()
        del self.units[name]
        self._active = [u for u in self._active if not any(u is p for p in parts)]
        self._editors = [u for u in self._editors if not any(u is p for p in parts)]
        self._folder = _Ref(self._lone_folder())

    def set_plan(self, items: list[Any], editors: list[Unit]) -> None:
        """Run `items` in order on the output: units, or the combining nodes of a composition tree
        (`compose/plan.py`: callables `(h, call) -> h` with the Unit's class attributes). `editors`
        are the units whose `before()` rewrites the input for the whole call (those at the top)."""
        self._active = list(items)
        self._editors = list(editors)
        self._plain_output = not any(getattr(u, "whole_output", False) for u in self._active)
        self._folder = _Ref(self._lone_folder())

    def set_active(self, names: list[str]) -> None:
        """Activate the units of these modules, in this order within each stage."""
        units = [part for n in names if n in self.units for part in cast(Unit, self.units[n]).parts()]
        self._active = sorted(units, key=lambda u: u.stage)  # stable: keeps composition order
        self._editors = [u for u in self._active if u.edits_input]
        self._plain_output = not any(u.whole_output for u in self._active)
        self._folder = _Ref(self._lone_folder())

    def lone_unit(self) -> Unit | None:
        """The unit that runs alone here (one active unit, no composition node), or None."""
        active = self._active
        return active[0] if len(active) == 1 and isinstance(active[0], Unit) else None

    @property
    def folds(self) -> bool:
        """Whether this site's one active unit may fold into its projection's weight (`folding.py`)."""
        return self._folder.module is not None

    def _lone_folder(self) -> Unit | None:
        lone = self.lone_unit()
        ok = lone is not None and lone.folds_per_call and not self._editors and self._plain_output
        return lone if ok else None

    def close(self) -> None:
        """Remove the hooks; the site must not be used afterwards."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.set_active([])

    # -- hooks -------------------------------------------------------------------------------

    def _bypassed(self) -> bool:
        return self._stash.bypass

    def _rerun(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The watched module on other inputs, without this site's hooks (they would recurse)."""
        self._stash.bypass = True
        try:
            return self.target(*args, **kwargs)
        finally:
            self._stash.bypass = False

    def _on_residual(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not self._active or self._bypassed():
            return None  # nothing will read it: keep no reference to the activation
        ref = self._residual_ref
        assert ref is not None
        value = args[ref.arg] if len(args) > ref.arg else kwargs.get(ref.kwarg)
        self._stash.residual = value
        return None

    def _on_input(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        if self._bypassed():
            return None
        folder = self._folder.module
        if folder is not None:
            self._offer_fold(cast(Unit, folder), module, args, kwargs)
            return None
        if not self._editors:
            return None
        for unit in self._editors:
            args, kwargs = unit.before(args, kwargs)
        return args, kwargs

    def _offer_fold(
        self, unit: Unit, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        """Offer this call's weight with `unit`'s change in it (`folding.py`) where it is safe: an exact
        `nn.Linear` (its forward is one `F.linear` on its own weight, whose output it returns), no
        gradient recorded, no hook of anyone else that could see the folded output, the mode that
        hands the weight to the product active on this thread."""
        if torch.is_grad_enabled() or type(module) is not nn.Linear or torch.compiler.is_compiling():
            return
        if not cpu_kernels.folding_on():  # (the mode is never entered while compiling)
            return
        x = args[0] if args else kwargs.get("input")
        if type(x) is not torch.Tensor or not _only_hooks(module):
            return
        folded = unit.folded_weight(module, x)
        if folded is not None:
            folding.offer(module.weight, folded)

    def _on_output(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> Any:
        active = self._active
        if not active or self._bypassed():
            return None  # leave the output untouched
        residual = self._stash.residual
        self._stash.residual = None  # do not keep activations alive after this call
        if self._folder.module is not None and folding.settle() is not None:
            return None  # the product ran with the folded weight: the unit's change is in the output
        raw_args = args
        if not args and kwargs:
            args = tuple(kwargs.values())
        call = SiteCall(
            inputs=args,
            residual=residual,
            norm=self._norm.module,
            base=module,
            kwargs=kwargs,
            output=output,
            rerun=self._rerun,
            args=raw_args,
        )
        if self._plain_output:
            is_tuple = isinstance(output, tuple)
            h = output[0] if is_tuple else output
            if len(active) == 1 and getattr(active[0], "writes_in_place", False):
                call.writable = _writable(module, h, call)
            for unit in active:
                h = unit(h, call)
            return (h, *output[1:]) if is_tuple else h
        for unit in active:
            output = unit(output, call) if unit.whole_output else _map_first(output, unit, call)
        return output


def _writable(module: nn.Module, h: Any, call: SiteCall) -> bool:
    """Whether a unit may overwrite `h`, the watched module's output, in place: no gradient is being
    recorded, the site's hook is the only forward hook (one registered before it may have kept the
    output; one after it gets what the units return anyway), and `h` shares no memory with the
    module's inputs or the residual (a module such as dropout in eval returns its input itself)."""
    if torch.is_grad_enabled() or type(h) is not torch.Tensor or not _only_hooks(module):
        return False
    if torch.compiler.is_compiling():  # storage pointers are not traceable; the compiler plans memory
        return False
    storage = h.untyped_storage().data_ptr()
    others = (*call.args, *call.kwargs.values(), call.residual)
    return all(not isinstance(t, torch.Tensor) or t.untyped_storage().data_ptr() != storage for t in others)


def _only_hooks(module: nn.Module) -> bool:
    """Whether the site's output hook is `module`'s only forward hook and no global one exists (one
    registered before it may keep or read the module's raw output; one after it gets what the units
    return anyway)."""
    # torch keeps global forward hooks in a private dict: where it is gone, assume some are there
    global_hooks = getattr(nn.modules.module, "_global_forward_hooks", None)
    return len(module._forward_hooks) == 1 and global_hooks is not None and len(global_hooks) == 0


def _map_first(output: Any, unit: Unit, call: SiteCall) -> Any:
    """Apply `unit` to the first tensor of a module output (a tensor, a tuple or a ModelOutput)."""
    if isinstance(output, tuple):
        return (unit(output[0], call), *output[1:])
    if isinstance(output, dict):  # a transformers ModelOutput: replace its first field in place
        key = next(iter(output.keys()))
        output[key] = unit(output[key], call)
        return output
    return unit(output, call)
