"""Router: learned soft or hard routing over several modules, per token or per example.

A router module holds one `RouterUnit` (`routing/router.py`) at every site where a module it routes
over acts; the composition `moe(a, b, c)` (`routing/moe.py`) mixes the branches with its weights::

    mm.add("a", modfit.config("lora")); mm.add("b", modfit.config("pfeiffer"))   # trained before
    mm.add("r", modfit.config("router", children=["a", "b"], mode="top_k", k=1, renormalize=False,
                              load_balance=0.01), head=modfit.head("seq-cls", labels))
    mm.activate("moe(a, b)")
    mm.train_only("r")            # the router's linear maps (and its head); a and b stay frozen

Parameters per site: width x n + n (n routed branches). The load-balancing term reaches the loss
through `Unit.regularizer()`, summed over sites as Switch Transformer sums it over layers; the
routing entropy and per-branch usage are reported through `Unit.metrics()` (the training loop logs
them: `router.entropy`, `router.usage.a`, ...).

The routed modules must be on the model when the router is added or loaded (load them first); the
config names them by the textual form of each branch, so a saved router knows what it routes over.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from torch import nn

from ..composition import CompositionError, parse
from ..config import ModuleConfig, check
from ..registry import register_method
from ..routing.router import Anneal, Level, Mode, RouterUnit
from ..sites import Attachment
from ..targets import ModelView, TargetError, is_projection, projection_shape

if TYPE_CHECKING:
    from ..model import ModularModel


def _width(module: nn.Module, hidden: int | None) -> int:
    """The output width of a site: a projection's out_features, an embedding's dimension, else the
    model's hidden size."""
    if is_projection(module):
        return projection_shape(module)[1]
    if isinstance(module, nn.Embedding):
        return module.embedding_dim
    if hidden is None:
        raise TargetError(f"router: cannot tell the output width of {type(module).__name__}")
    return hidden


@register_method(
    "router",
    RouterUnit,
    "learned routing over several modules: dense, top-k, Gumbel-softmax/-sigmoid; use with moe(...)",
    standalone=False,
)
@dataclass(frozen=True)
class RouterConfig(ModuleConfig):
    """A router over the branches `children` (textual composition forms, e.g. ("a", "stack(l, b)")).

    Attributes:
        children: what is routed over, in order; `moe(<children>)` is the composition that uses it.
        level: "token" (weights per token from the site's output) or "example" (one weight vector per
            example, from the mean of the site's output over the example's real tokens).
        mode: "dense" (softmax), "top_k" (the k largest kept), "gumbel_softmax" (a hard one-hot sample,
            straight-through), "gumbel_sigmoid" (independent hard gates, straight-through).
        k: modules kept per token/example by top_k.
        renormalize: top_k divides the kept probabilities by their sum; False keeps them as they are
            (Switch Transformer's top-1: the chosen module scaled by its probability, which is what
            lets top-1 routing learn).
        temperature: the (initial) temperature tau of the softmax / the Gumbel relaxation.
        final_temperature: anneal tau to this value (None: constant).
        anneal_steps: training forward passes (micro-batches) over which tau anneals.
        anneal: "exponential" (geometric) or "linear" interpolation; see `routing.router.temperature_at`.
        load_balance: weight of the load-balancing loss n * sum_i f_i P_i added per site (0: none).
        hard_eval: Gumbel modes at evaluation: the argmax / gates z > 0 (True) or the soft weights.
    """

    identity_at_init: ClassVar[bool] = False  # starts near the mean of the branches

    children: tuple[str, ...] = ()
    level: Level = "token"
    mode: Mode = "dense"
    k: int = 1
    renormalize: bool = True
    temperature: float = 1.0
    final_temperature: float | None = None
    anneal_steps: int = 0
    anneal: Anneal = "exponential"
    load_balance: float = 0.0
    hard_eval: bool = True

    def __post_init__(self) -> None:
        n = len(self.children)
        check(n >= 2, "router", "children", "name at least 2 modules or expressions to route over")
        for child in self.children:
            try:
                parse(child)
            except CompositionError as e:
                check(False, "router", "children", str(e))
        check(
            self.level in ("token", "example"),
            "router",
            "level",
            f"must be token or example, got {self.level!r}",
        )
        modes = ("dense", "top_k", "gumbel_softmax", "gumbel_sigmoid")
        check(self.mode in modes, "router", "mode", f"must be one of {', '.join(modes)}, got {self.mode!r}")
        check(1 <= self.k <= n, "router", "k", f"must be in [1, {n}] (the number of children), got {self.k}")
        check(
            not (self.mode == "top_k" and self.k == 1 and self.renormalize),
            "router",
            "renormalize",
            "top_k with k=1 and renormalize=true gives the chosen module weight 1 whatever the logits, so "
            "the router gets no gradient: set renormalize=false (Switch Transformer) or k >= 2",
        )
        check(self.temperature > 0, "router", "temperature", f"must be > 0, got {self.temperature}")
        check(
            self.final_temperature is None or self.final_temperature > 0,
            "router",
            "final_temperature",
            f"must be > 0 or none, got {self.final_temperature}",
        )
        check(self.anneal_steps >= 0, "router", "anneal_steps", f"must be >= 0, got {self.anneal_steps}")
        check(
            self.anneal in ("exponential", "linear"), "router", "anneal", f"unknown schedule {self.anneal!r}"
        )
        check(self.load_balance >= 0, "router", "load_balance", f"must be >= 0, got {self.load_balance}")

    def composition(self) -> str:
        """The expression that uses this router: moe(children...)."""
        return f"moe({', '.join(self.children)})"

    def module_names(self) -> list[str]:
        return parse(self.composition()).names()

    def build(self, view: ModelView) -> list[Attachment]:
        raise TargetError("router: its layers go where the routed modules are; add it through a ModularModel")

    def build_on(self, mm: ModularModel) -> list[Attachment]:
        """One `RouterUnit` at every site where a routed module has a unit.

        Raises:
            ValueError: a routed module is not on `mm`.
        """
        paths: dict[str, None] = {}
        for name in self.module_names():
            if name not in mm.records:
                known = ", ".join(mm.records) or "none"
                raise ValueError(
                    f"router over {self.composition()}: module '{name}' is not on this model "
                    f"(modules: {known}); add or load the routed modules first"
                )
            for path in mm.records[name].sites:
                paths.setdefault(path, None)
        return [
            Attachment(path, self.unit(_width(mm.view.module(path), mm.view.hidden_size))) for path in paths
        ]

    def unit(self, width: int) -> RouterUnit:
        """A router unit for a site of this output width."""
        return RouterUnit(
            width,
            self.children,
            level=self.level,
            mode=self.mode,
            k=self.k,
            renormalize=self.renormalize,
            temperature=self.temperature,
            final_temperature=self.final_temperature,
            anneal_steps=self.anneal_steps,
            anneal=self.anneal,
            load_balance=self.load_balance,
            hard_eval=self.hard_eval,
        )
