"""ModularModel: one frozen HuggingFace model, many named modules.

    mm = modfit.wrap(model)                    # model: any transformers PreTrainedModel
    mm.add("sst", modfit.config("lora", r=8), head=modfit.head("seq-cls", ["neg", "pos"]))
    mm.activate("sst")                         # or "stack(en, ner)", or a Composition
    mm.train_only("sst")                       # freeze everything but sst's units and head
    out = mm(**batch)                          # head mode: loss and logits from sst's head
    mm.model(**batch)                          # or the HF model itself, modules applied
    mm.save("sst", "out/sst"); mm.load("out/sst", name="sst2")

The model keeps its classes and forward code; modules attach through `Site` hooks and live in a
container at `model.modfit`, so `model.parameters()` (Trainer, DDP, optimisers) sees them.
Removing every module removes the container and the hooks: the state dict is the base's again.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers.utils import ModelOutput

from . import cpu_kernels, fast_dropout, fast_linear, folding
from .base import is_checkpointing
from .composition import (
    BatchSplit,
    Composition,
    CompositionError,
    Parallel,
    Single,
    Stack,
    as_composition,
)
from .config import ModuleConfig
from .heads import Head, HeadConfig, MaskedLmHead, build_head, head_loss
from .registry import method_entry
from .routing.context import RouteLike, as_route, checkpoint_context, current_route, repeated, routed
from .siblings import group_siblings
from .sites import Site, Unit
from .targets import ModelView

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")
CONTAINER = "modfit"


@dataclass
class ModuleRecord:
    """What the model knows about one named module.

    Attributes:
        name: the module's name; config: its method config; head: its head config, if any.
        sites: paths (relative to base_model) of the sites holding its units.
        merged: whether its deltas are folded into the base weights.
        card: extra card fields kept for saving (task, language, metrics, ...).
    """

    name: str
    config: ModuleConfig
    head: HeadConfig | None
    sites: list[str]
    merged: bool = False
    card: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModularOutput(ModelOutput):
    """Head-mode output: `loss` (when labels were given), `logits`, and the last hidden states.

    Under `parallel(...)` (or a `batchsplit(...)` whose branches have different heads) `logits` is a
    tuple, one entry per branch, and `hidden_states` holds the replicated batch. An MLM head in
    training mode with labels scores only the labelled positions: `logits` is (targets, vocab)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | tuple[torch.Tensor, ...] | None = None
    hidden_states: torch.Tensor | None = None


class Container(nn.Module):
    """Holds the sites and heads inside the HuggingFace model (`model.modfit`)."""

    def __init__(self) -> None:
        super().__init__()
        self.sites = nn.ModuleDict()
        self.heads = nn.ModuleDict()

    def site(self, key: str) -> Site:
        return cast(Site, self.sites[key])

    def all_sites(self) -> list[Site]:
        return [cast(Site, site) for site in self.sites.values()]

    def head(self, name: str) -> Head:
        return cast(Head, self.heads[name])


def _site_key(path: str) -> str:
    # ModuleDict keys may not contain "." or be empty ("" is base_model itself, e.g. for prompts)
    return path.replace(".", "__") or "base_model"


class ModularModel(nn.Module):
    """A HuggingFace model with named modules that can be added, combined, trained, merged, saved.

    Args:
        model: the base model; `mm.model` stays a normal transformers model.
    """

    # Tells the HF Trainer that forward() takes no `num_items_in_batch`: the Trainer then scales
    # the loss for gradient accumulation itself (and does not pass the key on to the base model).
    accepts_loss_kwargs = False

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.train(model.training)  # start in the wrapped model's mode, not nn.Module's default
        model.__dict__["_modfit_owner"] = weakref.ref(self)  # lets wrap() find this wrapper again
        self.view = ModelView(model)
        self.records: dict[str, ModuleRecord] = {}
        self._composition: Composition | None = None
        # each operator of the active composition with layers of its own (fuse) -> the module holding them
        self._layers: dict[Composition, str] = {}
        self._head_name: str | None = None
        self._fingerprint: dict[str, Any] | None = None
        self._kernel_hooks: list[RemovableHandle] = []  # cpu_kernels.install's, while there is a container
        model.__dict__.setdefault(fast_dropout.SWITCH, True)
        model.__dict__.setdefault(fast_linear.SWITCH, True)
        model.__dict__.setdefault(folding.SWITCH, True)

    @property
    def base_fingerprint(self) -> dict[str, Any]:
        """Identity of the base weights (see `persistence.fingerprint`), taken on first use and
        always before a merge changes the weights, so it names the base modules are trained on."""
        if self._fingerprint is None:
            from .persistence import fingerprint  # persistence imports this module

            self._fingerprint = fingerprint(self.view)
        return self._fingerprint

    @property
    def fast_dropout(self) -> bool:
        """Whether the base model's own dropout (and attention dropout) draws its masks with
        `modfit.fast_dropout` while it trains on CPU: the same distribution as torch's, about 3x
        faster to draw and a quarter of the memory kept for backward, but another random stream.
        True by default; False runs torch's dropout exactly as the model would without modfit.
        Not used under `torch.compile` or with activation checkpointing (see `cpu_kernels`).
        """
        return bool(self.model.__dict__.get(fast_dropout.SWITCH, False))

    @fast_dropout.setter
    def fast_dropout(self, on: bool) -> None:
        self.model.__dict__[fast_dropout.SWITCH] = bool(on)

    @property
    def fast_linear(self) -> bool:
        """Whether the base model's float32 `F.linear` calls run through `modfit.fast_linear` (oneDNN's
        matrix products, forward and for the input gradient) on an x86-64 CPU, in training and in
        inference (there only products of `fast_linear.MIN_MACS` multiply-adds and up): the same
        float32 products in about half of MKL's time on the AMD EPYC this project measures on,
        rounded in another order (outputs differ from torch's by about 1e-6). True by default; False
        runs torch's own products. Not used under `torch.compile`, autocast or, in training,
        activation checkpointing (see `cpu_kernels`).
        """
        return bool(self.model.__dict__.get(fast_linear.SWITCH, False))

    @fast_linear.setter
    def fast_linear(self, on: bool) -> None:
        self.model.__dict__[fast_linear.SWITCH] = bool(on)

    @property
    def fold_per_call(self) -> bool:
        """Whether, in inference, a LoRA (or DoRA) module running alone on an `nn.Linear` projection is
        applied by computing that call's weight W + s·BA and one product with it, where that is the
        cheaper way (`folding.py`; for LoRA from about 2·in·out/(in + out) tokens on, 384 for a 384-wide
        projection). The module stays unmerged: the weight is a new tensor for that call alone and the
        model's own is not touched. Outputs match the two low-rank products' to float32 rounding
        (about 1e-6). True by default; False always runs the module's own forward. Only in eval,
        without gradients, and not under `torch.compile` (see `cpu_kernels`).
        """
        return bool(self.model.__dict__.get(folding.SWITCH, False))

    @fold_per_call.setter
    def fold_per_call(self, on: bool) -> None:
        self.model.__dict__[folding.SWITCH] = bool(on)

    # -- containers ------------------------------------------------------------------------------

    @property
    def container(self) -> Container:
        existing: Container | None = getattr(self.model, CONTAINER, None)
        if existing is None:
            existing = Container().train(self.model.training)  # in the model's train/eval mode
            self.model.add_module(CONTAINER, existing)
            self._kernel_hooks = cpu_kernels.install(self.model, [self.model, self._encoder()])
        return existing

    def _drop_container_if_empty(self) -> None:
        existing: Container | None = getattr(self.model, CONTAINER, None)
        if existing is not None and len(existing.sites) == 0 and len(existing.heads) == 0:
            delattr(self.model, CONTAINER)
            for handle in self._kernel_hooks:  # the base model runs as it did before modfit
                handle.remove()
            self._kernel_hooks = []

    # -- adding and removing -------------------------------------------------------------------

    @property
    def module_names(self) -> list[str]:
        """Names of the modules on this model, in the order they were added."""
        return list(self.records)

    def add(
        self,
        name: str,
        config: ModuleConfig,
        head: HeadConfig | None = None,
        *,
        task: str | None = None,
        language: str | None = None,
    ) -> None:
        """Attach a new module (inactive until `activate`).

        Args:
            name: letters, digits, `_` and `-`; unique on this model.
            config: a method config, e.g. `modfit.config("lora", r=8)`.
            head: a task head trained and saved with the module.
            task, language: recorded on the module's card.

        Raises:
            ValueError: invalid or duplicate name.
            TargetError: the config's targets match nothing on this model.
        """
        if not _NAME.match(name):
            raise ValueError(
                f"module name '{name}' must start with a letter or digit and use only [A-Za-z0-9_-]"
            )
        if name in self.records:
            raise ValueError(f"a module named '{name}' already exists; remove it or choose another name")
        method_entry(config.method)  # the config's method must be registered
        # A config whose units depend on other modules (fusion layers go where the fused modules are)
        # builds from the whole model; every other config from the view of the base alone.
        build_on = getattr(config, "build_on", None)
        attachments = build_on(self) if build_on is not None else config.build(self.view)  # type: ignore[attr-defined]
        if not attachments:
            raise ValueError(f"module '{name}' ({config.method}) attaches nowhere on this model")
        record = ModuleRecord(name, config, head, [], card={"task": task or (head.task if head else None)})
        if language is not None:
            record.card["language"] = language
        composition = getattr(config, "composition", None)
        if callable(composition):  # a fusion module: the expression that uses it, saved on its card
            record.card["composition"] = composition()
        self.records[name] = record
        try:
            for attachment in attachments:
                site = self._site(attachment.path)
                if attachment.hook is not None and attachment.unit.needs_residual:
                    point = attachment.hook
                    norm = self.view.module(point.norm_path) if point.norm_path else None
                    site.read_residual(point.residual, self.view.module(point.residual_path), norm)
                site.add_unit(name, self._place(attachment.unit, site.target))
                record.sites.append(attachment.path)
            if head is not None:
                self.set_head(name, head)
        except BaseException:
            self.remove(name)
            raise

    def set_head(self, name: str, head: HeadConfig) -> None:
        """Give module `name` a (new) task head, replacing any it had."""
        record = self._record(name)
        if self.view.hidden_size is None:
            raise ValueError("cannot build a head: the model config has no hidden_size")
        built = build_head(head, self.view.hidden_size, self.model)
        reference = next(self.model.parameters())
        built = built.to(device=reference.device, dtype=_unit_dtype(reference.dtype))
        self.container.heads[name] = built.train(self.model.training)  # e.g. no head dropout in eval mode
        record.head = head
        record.card["task"] = head.task

    def remove(self, name: str) -> None:
        """Detach module `name` (unmerging it first if merged) and its head.

        Raises:
            KeyError: no such module.
        """
        record = self._record(name)
        if record.merged:
            self.unmerge(name)
        container = self.container
        for path in record.sites:
            container.site(_site_key(path)).remove_unit(name)
        for key in [k for k in container.sites if len(container.site(k).units) == 0]:
            # also catches a site created by an add() that failed before its unit was attached
            container.site(key).close()
            del container.sites[key]
        if name in container.heads:
            del container.heads[name]
        del self.records[name]
        if self._composition is not None and name in self.active_names():
            self.deactivate()
        self._drop_container_if_empty()

    def _site(self, path: str) -> Site:
        sites = self.container.sites
        key = _site_key(path)
        if key not in sites:
            sites[key] = Site(path, self.view.module(path)).train(self.model.training)
        site: Site = sites[key]  # type: ignore[assignment]
        return site

    def _place(self, unit: Unit, target: nn.Module) -> Unit:
        reference = next(target.parameters(), None)
        if reference is None:  # e.g. a dropout: use the model's first parameter
            reference = next(self.model.parameters())
        # Follow the model's mode: a unit added to a model in eval mode must not apply dropout.
        return unit.to(device=reference.device, dtype=_unit_dtype(reference.dtype)).train(self.model.training)

    def _record(self, name: str) -> ModuleRecord:
        try:
            return self.records[name]
        except KeyError:
            known = ", ".join(self.records) or "none"
            raise KeyError(f"no module named '{name}' on this model (modules: {known})") from None

    # -- activation ----------------------------------------------------------------------------

    def activate(self, composition: Composition | str, head: str | None = None) -> None:
        """Make a module or composition active for every forward pass.

        Args:
            composition: a module name, an expression string ("stack(en, ner)") or a Composition.
            head: whose head `mm(...)` uses; default: the last module in the composition with one.

        A merged module may be named: it acts through the weights, and its units are skipped.

        Raises:
            CompositionError: the expression does not parse or names unknown modules.
            KeyError, ValueError: `head` names no module, or one without a head.
        """
        expr = as_composition(composition)
        names = expr.names()
        for n in names:
            if n not in self.records:
                known = ", ".join(self.records) or "none"
                raise CompositionError(f"composition '{expr}' names unknown module '{n}' (modules: {known})")
        if head is not None and self._record(head).head is None:  # checked before anything changes
            raise ValueError(f"module '{head}' has no head")
        layers = self._resolve_layers(expr)
        plans = self._plans(expr, layers)  # raises for a nesting that cannot be meaningful
        self._composition, self._layers = expr, layers
        self._apply_plans(plans)
        if head is not None:
            self._head_name = head
        else:
            with_heads = [n for n in self.active_names() if self.records[n].head is not None]
            self._head_name = with_heads[-1] if with_heads else None

    def _resolve_layers(self, expr: Composition) -> dict[Composition, str]:
        """The module holding each operator's own layers (e.g. each fuse(...)'s fusion module): the one
        named by its option (`fusion=`), else the only module of that method made for exactly those
        children."""
        out: dict[Composition, str] = {}
        for node in expr.walk():
            method = node.layers_method
            if method is None:
                continue
            children = tuple(str(c) for c in node.children)
            named = node.layers_name()
            if named is not None:
                record = self._record(named)
                if record.config.method != method:
                    raise CompositionError(f"{node}: module '{named}' is not a {method} module")
                made_for = tuple(getattr(record.config, "children", ()))
                if made_for != children:
                    raise CompositionError(
                        f"{node}: {method} '{named}' was made for {node.op}({', '.join(made_for)})"
                    )
                out[node] = named
                continue
            matches = [
                r.name
                for r in self.records.values()
                if r.config.method == method and tuple(getattr(r.config, "children", ())) == children
            ]
            if not matches:
                raise CompositionError(
                    f"{node} has no {method} layers on this model: add them with "
                    f"mm.add(NAME, modfit.config('{method}', children={list(children)})), or train them with "
                    f"`modfit train --method {method} --compose '{node}'`"
                )
            if len(matches) > 1:
                raise CompositionError(
                    f"{node}: several {method} modules fit ({', '.join(matches)}); name one with "
                    f"{node.op}({', '.join(children)}, {node.layers_option}=NAME)"
                )
            out[node] = matches[0]
        return out

    def active_names(self) -> list[str]:
        """Every module the active composition runs: its module names, then its fusion modules."""
        if self._composition is None:
            return []
        names = self._composition.names()
        return names + [f for f in dict.fromkeys(self._layers.values()) if f not in names]

    def deactivate(self) -> None:
        """No module active (merged modules stay in the weights)."""
        self._composition = None
        self._layers = {}
        self._head_name = None
        self._refresh_sites()

    def _refresh_sites(self) -> None:
        self._apply_plans(self._plans(self._composition, self._layers))

    def _plans(self, expr: Composition | None, layers: dict[Composition, str]) -> dict[str, Any]:
        """What every site runs under `expr`: the running module names (a plain stack), or compiled
        items and editors (a composition tree, `compose/plan.py`). Nothing changes here, so a
        composition that cannot be meaningful is refused before the model's state is touched."""
        # Merged modules are already in the weights: their units must not run a second time.
        # imported here: the compose package's merging tools import this module
        from .compose.plan import compile_site, is_flat

        existing: Container | None = getattr(self.model, CONTAINER, None)
        if existing is None:
            return {}
        if expr is None:
            return {key: [] for key in existing.sites}
        names = expr.names() + [f for f in dict.fromkeys(layers.values()) if f not in expr.names()]
        running = [n for n in names if not self.records[n].merged]
        if is_flat(expr):
            return {key: running for key in existing.sites}
        parallels = [node for node in expr.walk() if isinstance(node, Parallel)]
        if len(parallels) > 1 or (parallels and _outer_split(expr) is not parallels[0]):
            raise CompositionError(
                f"{expr}: parallel() replicates the batch at the model's input, so there can be one, at the "
                "top of the composition or inside stack()"
            )
        for node in expr.walk():
            if isinstance(node, (Single, Stack)):
                continue
            merged = [n for n in node.names() if self.records[n].merged]
            if merged:
                raise CompositionError(
                    f"module '{merged[0]}' is merged into the weights, so it would act in every branch of "
                    f"{node}; unmerge it first"
                )
        plans: dict[str, Any] = {}
        for key, site in existing.sites.items():
            site = cast(Site, site)
            units = {n: site.unit(n) for n in running if n in site.units}
            plans[key] = compile_site(expr, units, layers, site.path)
        return plans

    def _apply_plans(self, plans: dict[str, Any]) -> None:
        existing: Container | None = getattr(self.model, CONTAINER, None)
        if existing is None:
            return
        for key, site in existing.sites.items():
            plan = plans.get(key, [])
            if isinstance(plan, tuple):
                cast(Site, site).set_plan(*plan)
            else:
                cast(Site, site).set_active(plan)
        group_siblings(existing.all_sites())
        self.model.__dict__[folding.ARMED] = any(site.folds for site in existing.all_sites())

    @property
    def active(self) -> Composition | None:
        """The active composition, or None."""
        return self._composition

    # -- parameters and training ---------------------------------------------------------------

    def units(self, name: str) -> Iterator[tuple[str, Unit]]:
        """(site path, unit) of module `name`."""
        self._record(name)
        for site in self.container.all_sites():
            if name in site.units:
                yield site.path, site.unit(name)

    def head_module(self, name: str) -> Head | None:
        """The head of module `name`, if it has one."""
        self._record(name)
        existing: Container | None = getattr(self.model, CONTAINER, None)
        if existing is None or name not in existing.heads:
            return None
        built: Head = existing.head(name)
        return built

    def module_parameters(self, name: str, include_head: bool = True) -> list[nn.Parameter]:
        """The parameters owned by module `name` (its units, and its head unless excluded)."""
        params = [p for _, unit in self.units(name) for p in unit.parameters()]
        built = self.head_module(name) if include_head else None
        if built is not None:
            params.extend(built.parameters())
        # by identity: units of one module may share a parameter (e.g. one intrinsic vector)
        return list({id(p): p for p in params}.values())

    def trainable_parameters(self, name: str, include_head: bool = False) -> int:
        """Number of parameters module `name` trains (its units; plus its head if asked)."""
        return sum(p.numel() for p in self.module_parameters(name, include_head=include_head))

    def train_only(self, name: str) -> list[nn.Parameter]:
        """Freeze every parameter of the model, including other modules, except module `name`'s.

        Activates `name` if the active composition does not contain it.

        Returns:
            The parameters left trainable (units and head), e.g. for an optimizer.
        """
        record = self._record(name)
        if record.merged:
            raise ValueError(f"module '{name}' is merged into the weights; unmerge it before training")
        for p in self.model.parameters():
            p.requires_grad_(False)
        params = self.module_parameters(name)
        for p in params:
            p.requires_grad_(True)
        if self._composition is None or name not in self.active_names():
            self.activate(name)
        return params

    def gradient_checkpointing_enable(
        self,
        gradient_checkpointing_kwargs: dict[str, Any] | None = None,
        every_n_layers: int = 1,
        offload: bool = False,
    ) -> None:
        """Activation checkpointing of the base model's layers (its own HF implementation): in training,
        each layer's activations are recomputed during backward instead of stored, trading compute
        for memory. The modules' hooks run again in the recomputation, under the same route. The HF
        Trainer's `activation_checkpointing=True` (`gradient_checkpointing=True` before transformers 5)
        calls this.

        Args:
            gradient_checkpointing_kwargs: passed to `torch.utils.checkpoint.checkpoint`; by default
                the non-reentrant variant, with a `context_fn` that restores the call's route.
            every_n_layers, offload: transformers 5's options (every n-th layer only; saved inputs in
                host memory).

        Raises:
            ValueError: the base model does not support gradient checkpointing, or the options need
                transformers 5.
        """
        options: dict[str, Any] = {"use_reentrant": False, "context_fn": checkpoint_context}
        options.update(gradient_checkpointing_kwargs or {})
        if options.get("use_reentrant"):
            options.pop("context_fn", None)  # reentrant checkpointing takes none
        if not getattr(self.model, "supports_gradient_checkpointing", False):
            raise ValueError(f"{type(self.model).__name__} does not support gradient checkpointing")
        model: Any = self.model
        if hasattr(model, "activation_checkpointing_enable"):  # transformers 5.x's name
            model.activation_checkpointing_enable(
                activation_checkpointing_kwargs=options, every_n_layers=every_n_layers, offload=offload
            )
        elif every_n_layers != 1 or offload:
            raise ValueError("every_n_layers and offload need transformers 5's activation checkpointing")
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)

    def activation_checkpointing_enable(
        self,
        activation_checkpointing_kwargs: dict[str, Any] | None = None,
        every_n_layers: int = 1,
        offload: bool = False,
    ) -> None:
        """transformers 5.x's name for `gradient_checkpointing_enable` (the HF Trainer calls it)."""
        self.gradient_checkpointing_enable(activation_checkpointing_kwargs, every_n_layers, offload)

    def gradient_checkpointing_disable(self) -> None:
        """Store activations again (undoes `gradient_checkpointing_enable`)."""
        for name in ("activation_checkpointing_disable", "gradient_checkpointing_disable"):
            disable = getattr(self.model, name, None)
            if callable(disable):
                disable()
                return

    activation_checkpointing_disable = gradient_checkpointing_disable

    @property
    def is_gradient_checkpointing(self) -> bool:
        """Whether the base model's layers are checkpointed."""
        return is_checkpointing(self.model)

    def regularization(self) -> torch.Tensor | None:
        """The sum of the running units' auxiliary losses (`Unit.regularizer()`), or None if none has one.

        `forward` adds it to the head's loss in training mode, so a loop or the HF Trainer that
        calls `mm(...)` gets it; code that calls `mm.model(...)` directly adds it itself. Merged
        modules do not run and contribute nothing.
        """
        if self._composition is None:
            return None
        total: torch.Tensor | None = None
        for name in self.active_names():
            if self.records[name].merged:
                continue
            for _, unit in self.units(name):
                term = unit.regularizer()
                if term is not None:
                    total = term if total is None else total + term
        return total

    def unit_metrics(self) -> dict[str, float]:
        """What the running units observed since the last call (`Unit.metrics()`, e.g. a router's
        routing entropy and per-module usage), as "<module>.<metric>", each averaged over the module's
        sites that report it. Reading starts the units' counts over; {} when no unit reports anything.
        """
        if self._composition is None:
            return {}
        out: dict[str, float] = {}
        for name in self.active_names():
            if self.records[name].merged:
                continue
            sums: dict[str, list[float]] = {}
            for _, unit in self.units(name):
                for key, value in unit.metrics().items():
                    sums.setdefault(key, []).append(value)
            out.update({f"{name}.{key}": sum(values) / len(values) for key, values in sums.items()})
        return out

    # -- merging -------------------------------------------------------------------------------

    @torch.no_grad()
    def merge(self, name: str) -> None:
        """Fold module `name` into the base weights: W += delta. It then acts whatever is active.

        Raises:
            ValueError: the method is not mergeable (e.g. bottleneck adapters), or already merged.
        """
        record = self._record(name)
        if record.merged:
            raise ValueError(f"module '{name}' is already merged")
        for node in self._composition.walk() if self._composition is not None else []:
            if not isinstance(node, (Single, Stack)) and name in node.names():
                raise ValueError(
                    f"module '{name}' is a branch of {node} in the active composition: merged, it would act "
                    "in every branch; deactivate or change the composition first"
                )
        self.base_fingerprint  # noqa: B018  (taken from the unmerged weights)
        for path, unit in self.units(name):
            if not unit.mergeable:
                raise ValueError(
                    f"module '{name}' ({record.config.method}) cannot be merged: its {type(unit).__name__} "
                    f"at {path} is not linear in the weights"
                )
        for path, unit in self.units(name):
            unit.merge(self.view.module(path))
        record.merged = True
        self._refresh_sites()

    @torch.no_grad()
    def unmerge(self, name: str) -> None:
        """Subtract module `name`'s delta from the base weights again (exact up to rounding)."""
        record = self._record(name)
        if not record.merged:
            raise ValueError(f"module '{name}' is not merged")
        for path, unit in self.units(name):
            unit.unmerge(self.view.module(path))
        record.merged = False
        self._refresh_sites()

    # -- persistence ---------------------------------------------------------------------------

    def save(
        self,
        name: str,
        directory: str | Path,
        *,
        metrics: dict[str, float] | None = None,
        format: str = "modfit",
        **options: Any,
    ) -> Path:
        """Save module `name` (weights, head, card) to `directory`. See `modfit.persistence`.

        `format="peft"` (or another registered format, `modfit.interop`) writes that library's files
        instead; `options` go to its writer (PEFT: `drop_head=True`, `task_type=...`)."""
        if format != "modfit":
            from .interop import save_external

            return save_external(self, name, directory, format, **options)
        from .persistence import save_module

        return save_module(self, name, directory, metrics=metrics)

    def load(self, directory: str | Path, name: str | None = None, *, check_base: bool = True) -> str:
        """Load a saved module, or a PEFT adapter folder; returns its name on this model. See
        `modfit.persistence` and `modfit.interop`."""
        from .persistence import load_module

        return load_module(self, directory, name=name, check_base=check_base)

    # -- head mode -----------------------------------------------------------------------------

    @property
    def head_name(self) -> str | None:
        """The module whose head `forward` uses."""
        return self._head_name

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        route: RouteLike | None = None,
        task_ids: torch.Tensor | None = None,
        language_ids: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> ModularOutput:
        """Run the base model with the active modules, then the active head.

        `token_type_ids` is named (not left to `**kwargs`) because the HF Trainer keeps only the
        batch columns that `forward`'s signature names; so are the routing columns.

        Args:
            route: per-example routing for this call (see `modfit.routing`): module names (or None)
                per row, or a mapping key -> (batch,) ids.
            task_ids, language_ids: (batch,) ids, the same as route={"task": ..., "language": ...}.

        Returns:
            `ModularOutput(loss, logits, hidden_states)`; loss only when `labels` are given, in
            training mode plus `regularization()` (the running units' auxiliary losses).

        Raises:
            RuntimeError: no active module has a head (use `mm.model(...)` for the HF outputs).
        """
        branches = self._branch_heads()
        if branches is None and self._head_name is None:
            raise RuntimeError(
                "no active module has a head; add one with head=..., or call mm.model(...) directly"
            )
        encoder = self._encoder()
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        copies = len(branches) if branches is not None and branches[0][0] is None else 1
        given = as_route(route)
        for key, ids in (("task", task_ids), ("language", language_ids)):
            if ids is not None:
                given = {**(given or {}), key: ids}
        if attention_mask is not None:  # lets routers pool over each example's real tokens (routing/moe.py)
            outer = given if given is not None else current_route() or {}
            given = {"attention_mask": attention_mask, **outer}
        if copies > 1:  # parallel(...): every row once per branch, branch i in block i
            input_ids, attention_mask = _repeat(input_ids, copies), _repeat(attention_mask, copies)
            kwargs = {k: _repeat(v, copies) for k, v in kwargs.items()}
            given = repeated(given if given is not None else current_route(), copies)
        if given is not None:
            with routed(given):
                outputs = encoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        else:  # keep a route the caller set around this call, if any
            outputs = encoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        hidden = outputs[0]  # (batch, seq, hidden)
        logits: torch.Tensor | tuple[torch.Tensor, ...]
        if branches is None:
            assert self._head_name is not None
            logits, loss = self._head(self._head_name, hidden, attention_mask, labels)
        else:
            logits, loss = self._branch_outputs(branches, hidden, attention_mask, labels)
        if loss is not None and self.model.training:
            extra = self.regularization()  # e.g. diff pruning's L0 penalty; training only, so that
            if extra is not None:  # evaluation losses stay comparable across methods
                loss = loss + extra
        return ModularOutput(loss=loss, logits=logits, hidden_states=hidden)

    def _encoder(self) -> nn.Module:
        """What head mode runs: the base model, or an encoder-decoder's (T5's) encoder alone."""
        is_seq2seq = getattr(getattr(self.model, "config", None), "is_encoder_decoder", False)
        encoder: nn.Module = cast(Any, self.model).get_encoder() if is_seq2seq else self.view.base_model
        return encoder

    def _head(
        self, name: str, hidden: torch.Tensor, mask: torch.Tensor | None, labels: Any
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        built = self.container.head(name)
        if isinstance(built, MaskedLmHead) and labels is not None and self.model.training:
            # Training MLM scores only the masked positions: the decoder over the whole vocabulary is
            # the costliest matmul of a step, and ~85% of positions carry no target. `logits` is then
            # (targets, vocab), one row per labelled position in row-major order (like ModernBERT's
            # sparse prediction); evaluation (and labels=None) keeps (batch, seq, vocab).
            chosen = labels != -100  # (batch, seq)
            hidden, labels = hidden[chosen], labels[chosen]  # (targets, hidden), (targets,)
        if built.config.task in ("mlm", "causal-lm"):
            hidden = self._invert(hidden)
        # A head is kept in at least float32 (like the units); a half-precision base feeds it in its own
        # dtype. A head without parameters (causal-lm) reuses the base's output layer, in the base dtype.
        head_param = next(built.parameters(), None)
        extra = self._decoder_rows() if isinstance(built, MaskedLmHead) else []
        if extra:  # a vocabulary extension: the MLM head scores its new pieces too
            assert head_param is not None
            logits = cast(MaskedLmHead, built).logits(hidden.to(head_param.dtype), extra)
        else:
            logits = built(hidden if head_param is None else hidden.to(head_param.dtype), mask)
        loss = head_loss(built.config.task, logits, labels) if labels is not None else None
        return logits, loss

    def _running_parts(self) -> list[tuple[str, Unit]]:
        """(site path, unit) of every running unit (members of unions included), in module order."""
        out: list[tuple[str, Unit]] = []
        for name in self.active_names():
            if not self.records[name].merged:
                out.extend((path, part) for path, unit in self.units(name) for part in unit.parts())
        return out

    def _decoder_rows(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Extra decoder rows (embeddings, bias) of the running vocabulary extensions."""
        return [part.decoder_rows() for _, part in self._running_parts() if hasattr(part, "decoder_rows")]  # type: ignore[operator]

    def _invert(self, hidden: torch.Tensor) -> torch.Tensor:
        """Undo the running invertible units (`Unit.invert`, MAD-X's invertible adapters), last first,
        so that a language-modelling head tied to the frozen embeddings sees the original space."""
        is_seq2seq = getattr(getattr(self.model, "config", None), "is_encoder_decoder", False)
        inverses = [
            part
            for path, part in self._running_parts()
            if hasattr(part, "invert") and not (is_seq2seq and not path.startswith("encoder"))
        ]  # head mode reads the encoder of an encoder-decoder
        for part in reversed(inverses):
            hidden = part.invert(hidden)  # type: ignore[operator]
        return hidden

    def _branch_heads(self) -> list[tuple[int | None, str]] | None:
        """For a `parallel(...)` or `batchsplit(...)` at the top of the active composition (or inside
        stacks) whose branches have different heads: (block size or None for parallel, head) per
        branch. None when one head serves every row."""
        expr = self._composition
        if expr is None:
            return None
        outer = _outer_split(expr)
        if outer is None:
            return None
        heads = []
        for child in outer.children:
            names = child.names()
            names += [f for node, f in self._layers.items() if set(node.names()) <= set(names)]
            with_heads = [n for n in names if self.records[n].head is not None]
            if not with_heads:
                raise ValueError(f"branch '{child}' of {outer} has no module with a head")
            heads.append(with_heads[-1])
        if isinstance(outer, BatchSplit):
            if len(set(heads)) == 1:
                return None
            return list(zip(outer.sizes, heads, strict=True))
        return [(None, h) for h in heads]

    def _branch_outputs(
        self,
        branches: list[tuple[int | None, str]],
        hidden: torch.Tensor,
        mask: torch.Tensor | None,
        labels: Any,
    ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None]:
        """Each branch's head on its block of rows; labels: one tensor per branch (or None), or, for
        batchsplit, one tensor for the whole batch."""
        n = len(branches)
        rows = hidden.shape[0]
        sizes = [size if size is not None else rows // n for size, _ in branches]
        if isinstance(labels, torch.Tensor):
            labels = list(torch.split(labels, sizes)) if branches[0][0] is not None else [labels] * n
        if labels is not None and len(labels) != n:
            raise ValueError(f"{n} branches but {len(labels)} label tensors")
        logits, losses, start = [], [], 0
        for i, (size, (_, head)) in enumerate(zip(sizes, branches, strict=True)):
            block_mask = mask[start : start + size] if mask is not None else None
            out, loss = self._head(
                head, hidden[start : start + size], block_mask, labels[i] if labels else None
            )
            logits.append(out)
            if loss is not None:
                losses.append(loss * (size if branches[0][0] is not None else 1))
            start += size
        if not losses:
            return tuple(logits), None
        total = torch.stack(losses).sum()
        # batchsplit: the mean over all rows (blocks weighted by size); parallel: the sum of the tasks' losses
        return tuple(logits), total / rows if branches[0][0] is not None else total


def _repeat(value: Any, copies: int) -> Any:
    """A batch tensor repeated block-wise along the batch (rows 0..B-1, then again, ...)."""
    if isinstance(value, torch.Tensor) and value.ndim >= 1:
        return value.repeat(copies, *([1] * (value.ndim - 1)))
    return value


def _outer_split(expr: Composition) -> Parallel | BatchSplit | None:
    """The parallel/batchsplit reached from the top through stacks only, if any."""
    if isinstance(expr, (Parallel, BatchSplit)):
        return expr
    if isinstance(expr, Stack):
        found = [s for s in (_outer_split(c) for c in expr.children) if s is not None]
        return found[0] if found else None
    return None


def _unit_dtype(base_dtype: torch.dtype) -> torch.dtype:
    # Train module weights in at least float32 even on a half-precision base.
    return torch.promote_types(base_dtype, torch.float32)


def wrap(model: nn.Module) -> ModularModel:
    """Wrap a HuggingFace model; wrapping the same model twice returns the same ModularModel.

    Args:
        model: a transformers `PreTrainedModel` (bare encoder/decoder or with a task head).

    Returns:
        The ModularModel; `mm.model is model`.
    """
    owner_ref = model.__dict__.get("_modfit_owner")
    owner = owner_ref() if owner_ref is not None else None
    # `owner.model is model` fails for a deep copy: it copies the reference to the original's wrapper.
    return owner if owner is not None and owner.model is model else ModularModel(model)
