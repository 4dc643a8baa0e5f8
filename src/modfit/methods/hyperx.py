"""Hyper-X: adapters (and LoRA) generated per task, language and layer by one hyper-network.

Üstün et al. 2022, "Hyper-X: A Unified Hypernetwork for Multi-Task Multilingual Transfer"
(arXiv:2205.12148), after HyperFormer (Karimi Mahabadi et al. 2021). Nothing is trained per task or
per language pair: one generator holds a learned embedding per task (T, d_t), per language (L, d_l)
and per layer (N, d_layer), and writes the weights of every adapter from them::

    e = [E_task[t] ; E_lang[l] ; E_layer[i]]                  (d_t + d_l + d_layer,)
    s = W_2 relu(W_1 e + c_1) + c_2                            (source_dim,)   the "source embedding"
    [D ; d]  = G_down(s)      D: (b, H), d: (b,)               one linear head per placement
    [U ; u]  = G_up(s)        U: (H, b), u: (H,)               zero-initialised: a new module is the identity
    h' = h + U act(D h + d) + u                                a sequential adapter on the sub-layer output h

and, with `lora_targets`, low-rank deltas on projections, one A/B head pair per projection role::

    A = G_A(s): (r, in),  B = G_B(s): (out, r)  (zero-initialised),   y = W x + (alpha / r) · B A x

The task and language of each example come with the batch (`mm(..., task_ids=, language_ids=)`,
or `route={"task": [...names], "language": [...]}`), so a batch may mix pairs, and a pair never
seen in training (a task trained in other languages, a language seen with other tasks) gets its
own adapters all the same: that is the point of the method.

Initialisation: embeddings N(0, 1) as in the reference, the source MLP as nn.Linear; the up and B
heads start at zero (a new module is exactly the identity); the down and A heads start so that the
matrices they generate have nn.Linear's default variance 1/(3·fan_in) over the initial (task,
language, layer) grid. Left at nn.Linear's default they generated about 6× that on MiniLM, and
training on `routing/lang_tasks_data.py` at lr 3e-3 diverged (it did not with this init).

Per forward pass the generator runs once: on the first site it embeds every (task, language) pair
present in the batch (U ≤ batch of them) for every layer, s: (U, N, source_dim), and caches that;
each site then applies its own head to its layer's s (U rows), gathers the generated weights per
example (B rows) and runs them batched (`torch.baddbmm`). A row whose task or language is None
(id -1) gets no module: its output is the base output, exactly.

Parameter count (H hidden size, b bottleneck, D = d_t + d_l + d_layer, h_g the generator's hidden
width, N layers with units, P placements × layer groups, Q LoRA projection roles × groups)::

    T·d_t + L·d_l + N·d_layer + (D + 1)·h_g + (h_g + 1)·source_dim           embeddings and source MLP
    + P · (source_dim + 1) · ((b·H + b) + (H·b + H))                          adapter heads
    + Σ_q (source_dim + 1) · (r·in_q + out_q·r)                               LoRA heads

(without the source MLP, `source_mlp=False`: no MLP term, and D in place of source_dim), independent
of how many (task, language) pairs it serves. With the defaults (64/64/64, 192, 32,
b = 64, FFN output only) on MiniLM (H = 384, 6 layers) and 3 tasks × 4 languages: 1,680,864.

The reference code (ahmetustun/hyperx) embeds the three sources the same way (N(0, 1) embeddings,
a two-layer ReLU MLP to the source embedding, one linear generator per weight and per bias) with
the same default sizes; it takes one task-language pair per batch. Its training script uses a
source embedding of 192 and bottleneck 256 (for mBERT), generates a LayerNorm after each adapter
and trains the base LayerNorms too; none of these is done here.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from torch import nn
from transformers.activations import get_activation

from ..config import ModuleConfig, check
from ..registry import register_method
from ..routing.context import RouteError, route_ids
from ..sites import Attachment, SiteCall, Unit
from ..targets import LayerRef, ModelView, projection_shape
from .union import UnionUnit

Placement = Literal["attn_output", "ffn_output"]


class HyperGenerator(nn.Module):
    """The embeddings, the source MLP and the weight heads of one hyperx module, shared by its units.

    Args:
        tasks, languages: names in id order (ids come with the batch; names are for `route`).
        layers: the number of layers with units (one layer embedding each).
        config: the dimensions.
    """

    def __init__(self, tasks: tuple[str, ...], languages: tuple[str, ...], layers: int, config: HyperXConfig):
        super().__init__()
        self.tasks, self.languages = tasks, languages
        self.task_embedding = nn.Embedding(len(tasks), config.task_dim)  # N(0, 1), as the reference
        self.language_embedding = nn.Embedding(len(languages), config.language_dim)
        self.layer_embedding = nn.Embedding(layers, config.layer_dim)
        width = config.task_dim + config.language_dim + config.layer_dim
        self.source: nn.Module
        if config.source_mlp:
            self.source = nn.Sequential(
                nn.Linear(width, config.hidden_dim),
                nn.ReLU(),
                nn.Linear(config.hidden_dim, config.source_dim),
            )
            self.source_dim = config.source_dim
        else:  # the heads read e itself: every generated weight is linear (additive) in the three embeddings
            self.source = nn.Identity()
            self.source_dim = width
        self.heads = nn.ModuleDict()  # weight heads, added by `add_head`
        self._stash = threading.local()  # this thread's source embeddings of the running pass

    def add_head(self, key: str, size: int, fan_in: int | None) -> None:
        """A linear head source_dim -> `size` generated numbers.

        Args:
            fan_in: the input size of the generated matrix; its numbers start with nn.Linear's
                default variance 1/(3·fan_in) (the head's weight is scaled by the mean square of the
                initial source embeddings: variance matching, Chang et al. 2020, arXiv:2312.08399).
                None: weight and bias start at zero, so the generated matrix is 0.
        """
        if key in self.heads:
            return  # heads are shared by every layer (the layer embedding tells layers apart)
        head = nn.Linear(self.source_dim, size)
        nn.init.zeros_(head.bias)
        if fan_in is None:
            nn.init.zeros_(head.weight)
        else:
            with torch.no_grad():
                mean_square = float(self._initial_sources().pow(2).mean().clamp(min=1e-12))
            nn.init.normal_(head.weight, std=(3 * fan_in * self.source_dim * mean_square) ** -0.5)
        self.heads[key] = head

    @torch.no_grad()
    def _initial_sources(self) -> torch.Tensor:
        """s for every (task, language, layer), (T·L·N, source_dim)."""
        t, lang, n = (e.weight for e in (self.task_embedding, self.language_embedding, self.layer_embedding))
        grid = torch.cat(
            (
                t[:, None, None].expand(-1, lang.shape[0], n.shape[0], -1),
                lang[None, :, None].expand(t.shape[0], -1, n.shape[0], -1),
                n[None, None].expand(t.shape[0], lang.shape[0], -1, -1),
            ),
            dim=-1,
        )
        return self.source(grid.reshape(-1, grid.shape[-1]))

    def generate(self, key: str, layer: int, source: torch.Tensor) -> torch.Tensor:
        """Head `key` on the source embeddings of layer `layer`: (U, N, source_dim) -> (U, size)."""
        head: nn.Linear = self.heads[key]  # type: ignore[assignment]
        return head(source[:, layer])

    def ids(self, key: str, names: tuple[str, ...], batch: int, device: torch.device) -> torch.Tensor:
        """The (batch,) ids of route key `key`: -1 (None) for no module, else 0..len(names)-1.

        With one name only the route may leave the key out (every row has that one task/language).

        Raises:
            RouteError: the key is missing (with more than one name) or an id is out of range; the
                message names the key and the valid ids and names.
        """
        valid = f"valid ids: 0..{len(names) - 1} ({', '.join(names)}), or -1/None for no module"
        try:
            ids = route_ids(key, batch, names, device=device, required=False)
        except RouteError as e:
            raise RouteError(f"hyperx: {e}; {valid}") from None
        if ids is None:
            if len(names) == 1:
                return torch.zeros(batch, dtype=torch.long, device=device)
            raise RouteError(
                f"hyperx: this forward pass needs per-example '{key}' ids ({valid}); pass "
                f"mm(..., {key}_ids=...) or route={{'{key}': ...}}, or wrap the call in modfit.routing.routed"
            )
        bad = (ids < -1) | (ids >= len(names))
        if bool(bad.any()):
            raise RouteError(f"hyperx: route '{key}' id {int(ids[bad][0])} is out of range; {valid}")
        return ids

    def sources(self, unit: Unit, batch: int, device: torch.device) -> _Sources:
        """The source embeddings of this pass's (task, language) pairs for every layer, computed by
        the first unit that runs in a pass and reused by the others.

        A pass is recognised by the units: a unit asking twice means a new pass (or a recomputation,
        e.g. gradient checkpointing), which regenerates; so do other ids, another grad mode, or
        changed generator parameters (an optimizer step, a load).
        """
        tasks = self.ids("task", self.tasks, batch, device)
        languages = self.ids("language", self.languages, batch, device)
        keep = (tasks >= 0) & (languages >= 0)
        pair = tasks.clamp(min=0) * len(self.languages) + languages.clamp(min=0)  # (B,)
        versions = tuple(p._version for p in self._source_parameters())
        cached: _Sources | None = getattr(self._stash, "sources", None)
        if (
            cached is not None
            and id(unit) not in cached.users
            and cached.grad == torch.is_grad_enabled()
            and cached.versions == versions
            and cached.pair.device == pair.device
            and torch.equal(cached.pair, pair)
        ):
            cached.users.add(id(unit))
            return cached
        unique, inverse = torch.unique(pair, return_inverse=True)  # U pairs; row b uses unique[inverse[b]]
        t, lang = unique // len(self.languages), unique % len(self.languages)
        layers = self.layer_embedding.weight  # (N, d_layer)
        count, n = unique.numel(), layers.shape[0]
        e = torch.cat(
            (
                self.task_embedding(t)[:, None].expand(count, n, -1),
                self.language_embedding(lang)[:, None].expand(count, n, -1),
                layers[None].expand(count, n, -1),
            ),
            dim=-1,
        )  # (U, N, d_t + d_l + d_layer)
        fresh = _Sources(
            pair=pair,
            source=self.source(e),  # (U, N, source_dim)
            inverse=inverse,
            keep=None if bool(keep.all()) else keep,
            grad=torch.is_grad_enabled(),
            versions=versions,
            users={id(unit)},
        )
        self._stash.sources = fresh
        return fresh

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the generator (and so the generated modules) compute in."""
        return self.task_embedding.weight.dtype

    def _source_parameters(self) -> list[torch.Tensor]:
        return [
            self.task_embedding.weight,
            self.language_embedding.weight,
            self.layer_embedding.weight,
            *self.source.parameters(),
        ]


@dataclass
class _Sources:
    """One pass's generator state: s (U, N, source_dim), the row -> pair index (B,), the rows that
    get a module (None: all), and what it was computed from."""

    pair: torch.Tensor
    source: torch.Tensor
    inverse: torch.Tensor
    keep: torch.Tensor | None
    grad: bool
    versions: tuple[int, ...]
    users: set[int]


class HyperXUnit(Unit):
    """A hyperx module's piece at one site: no weights of its own, it asks the shared generator.

    The first unit of a module holds the generator (so a saved module stores it once, under that
    unit's key); the others reference it without registering it.

    Args:
        generator: the module's generator; owner: whether this unit holds it.
        layer: this unit's layer (row of the layer embedding).
    """

    def __init__(self, generator: HyperGenerator, owner: bool, layer: int) -> None:
        super().__init__()
        if owner:
            self.generator = generator
        else:
            self.__dict__["_generator"] = generator  # a plain reference: not a child, not in state_dict
        self.layer = layer

    @property
    def hyper(self) -> HyperGenerator:
        """The module's shared generator."""
        shared = self.__dict__.get("_generator")
        return shared if shared is not None else self.generator

    def _weights(self, key: str, sources: _Sources) -> torch.Tensor:
        """Head `key`'s generated numbers per example: (U, size) once per pair, gathered to (B, size)."""
        generated = self.hyper.generate(key, self.layer, sources.source)
        if generated.shape[0] == 1:  # one pair in the batch: a broadcast view, no copy per row
            return generated.expand(sources.inverse.numel(), -1)
        return generated[sources.inverse]


class HyperXAdapterUnit(HyperXUnit):
    """A generated sequential bottleneck adapter on one sub-layer output: h' = h + U act(D h + d) + u,
    with D, d, U, u generated per example."""

    stage = 1

    def __init__(
        self,
        generator: HyperGenerator,
        owner: bool,
        layer: int,
        key: str,
        hidden: int,
        bottleneck: int,
        act: str,
    ) -> None:
        super().__init__(generator, owner, layer)
        self.key, self.hidden, self.bottleneck = key, hidden, bottleneck
        self.act = get_activation(act)
        generator.add_head(f"{key}-down", bottleneck * hidden + bottleneck, fan_in=hidden)
        generator.add_head(f"{key}-up", hidden * bottleneck + hidden, fan_in=None)

    def forward(self, h: torch.Tensor, call: SiteCall) -> torch.Tensor:
        dtype = self.hyper.dtype
        x = h.to(dtype)
        batch, hidden, b = x.shape[0], self.hidden, self.bottleneck
        sources = self.hyper.sources(self, batch, x.device)
        if sources.keep is not None and not bool(sources.keep.any()):
            return h  # no row has a module
        rows = x.reshape(batch, -1, hidden)  # (B, S, H)
        down = self._weights(f"{self.key}-down", sources)  # (B, b·H + b)
        up = self._weights(f"{self.key}-up", sources)  # (B, H·b + H)
        w_down, b_down = down[:, : b * hidden].view(batch, b, hidden), down[:, b * hidden :]
        w_up, b_up = up[:, : hidden * b].view(batch, hidden, b), up[:, hidden * b :]
        z = self.act(torch.baddbmm(b_down[:, None], rows, w_down.transpose(1, 2)))  # (B, S, b)
        out = torch.baddbmm(b_up[:, None], z, w_up.transpose(1, 2))  # (B, S, H)
        y = (rows + out).view_as(x)
        if sources.keep is not None:  # rows without a task or language: the base output, exactly
            y = torch.where(sources.keep.view(-1, *([1] * (x.ndim - 1))), y, x)
        return y.to(h.dtype)

    def extra_repr(self) -> str:
        return f"layer={self.layer}, head={self.key}, hidden={self.hidden}, bottleneck={self.bottleneck}"


class HyperXLoraUnit(HyperXUnit):
    """A generated low-rank delta on one projection: h + (alpha / r) · B A x, A and B per example."""

    stage = 0

    def __init__(
        self,
        generator: HyperGenerator,
        owner: bool,
        layer: int,
        key: str,
        in_features: int,
        out_features: int,
        r: int,
        alpha: float,
    ) -> None:
        super().__init__(generator, owner, layer)
        self.key, self.in_features, self.out_features, self.r = key, in_features, out_features, r
        self.scale = alpha / r
        generator.add_head(f"{key}-A", r * in_features, fan_in=in_features)
        generator.add_head(f"{key}-B", out_features * r, fan_in=None)

    def forward(self, h: torch.Tensor, call: SiteCall) -> torch.Tensor:
        dtype = self.hyper.dtype
        x = call.inputs[0].to(dtype)
        batch = x.shape[0]
        sources = self.hyper.sources(self, batch, x.device)
        if sources.keep is not None and not bool(sources.keep.any()):
            return h  # no row has a module
        a = self._weights(f"{self.key}-A", sources)
        b = self._weights(f"{self.key}-B", sources)
        a = a.view(batch, self.r, self.in_features)  # (B, r, in)
        b = b.view(batch, self.out_features, self.r)  # (B, out, r)
        rows = x.reshape(batch, -1, self.in_features)  # (B, S, in)
        delta = torch.bmm(torch.bmm(rows, a.transpose(1, 2)), b.transpose(1, 2)) * self.scale  # (B, S, out)
        y = h + delta.view(h.shape).to(h.dtype)
        if sources.keep is not None:
            y = torch.where(sources.keep.view(-1, *([1] * (h.ndim - 1))), y, h)
        return y

    def extra_repr(self) -> str:
        return (
            f"layer={self.layer}, head={self.key}, in={self.in_features}, out={self.out_features}, r={self.r}"
        )


@register_method(
    "hyperx",
    HyperXUnit,
    "adapters (and LoRA) generated from task, language and layer embeddings by one hyper-network "
    "(Hyper-X, Üstün et al. 2022); routed per example",
)
@dataclass(frozen=True)
class HyperXConfig(ModuleConfig):
    """Hyper-X settings.

    Attributes:
        tasks, languages: the names in id order; `route` may give names, `task_ids`/`language_ids`
            give positions. With one name the key may be left out of the route.
        task_dim, language_dim, layer_dim: embedding sizes (64 each in the reference).
        source_mlp: project e = [E_task; E_lang; E_layer] by the two-layer ReLU MLP before the
            heads (the reference's `project_source_embeddings`); False: the heads read e, so each
            generated matrix is a sum of a task, a language and a layer part (hidden_dim and
            source_dim unused).
        hidden_dim: the source MLP's hidden width (192); source_dim: its output, the source
            embedding the weight heads read (32; the reference's script uses 192).
        placement: sub-layer outputs that get a generated adapter ("attn_output", "ffn_output");
            may be empty when `lora_targets` is not.
        bottleneck_size: the generated adapters' inner width.
        activation: the adapters' non-linearity (any HuggingFace activation name).
        lora_targets: projections that get a generated LoRA delta (roles, suffixes, `re:` patterns;
            empty: none).
        lora_r, lora_alpha: the generated LoRA's rank and scale numerator (scale alpha / r).
        layers: only these layer indices (None: all).
    """

    tasks: tuple[str, ...] = ("task",)
    languages: tuple[str, ...] = ("language",)
    task_dim: int = 64
    language_dim: int = 64
    layer_dim: int = 64
    source_mlp: bool = True
    hidden_dim: int = 192
    source_dim: int = 32
    placement: tuple[Placement, ...] = ("ffn_output",)
    bottleneck_size: int = 64
    activation: str = "relu"
    lora_targets: tuple[str, ...] = ()
    lora_r: int = 8
    lora_alpha: float = 8.0
    layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        m = self.method or "hyperx"
        for field, names in (("tasks", self.tasks), ("languages", self.languages)):
            check(len(names) > 0, m, field, "name at least one")
            check(all(isinstance(n, str) and n for n in names), m, field, f"empty name in {list(names)}")
            check(len(set(names)) == len(names), m, field, f"names a value twice: {list(names)}")
        for field in ("task_dim", "language_dim", "layer_dim", "hidden_dim", "source_dim", "bottleneck_size"):
            value = getattr(self, field)
            check(value >= 1, m, field, f"must be >= 1, got {value}")
        check(self.lora_r >= 1, m, "lora_r", f"must be >= 1, got {self.lora_r}")
        check(self.lora_alpha > 0, m, "lora_alpha", f"must be > 0, got {self.lora_alpha}")
        check(
            len(self.placement) > 0 or len(self.lora_targets) > 0,
            m,
            "placement",
            "generate something: give a placement or lora_targets",
        )
        check(len(set(self.placement)) == len(self.placement), m, "placement", "names a sub-layer twice")
        for p in self.placement:
            allowed = get_args(Placement)
            check(p in allowed, m, "placement", f"unknown value {p!r}; use one of {', '.join(allowed)}")
        try:
            get_activation(self.activation)
        except KeyError:
            check(False, m, "activation", f"unknown activation '{self.activation}'")

    def build(self, view: ModelView) -> list[Attachment]:
        """One unit per placement and LoRA target in every chosen layer, all sharing one generator
        (held by the first). Units at the same path (a LoRA target that is also a hook point, as
        Llama's down_proj) share a site through a `UnionUnit`.

        Raises:
            TargetError: the family is not in the architecture table (layer embeddings need its layer
                stacks), or a target matches nothing.
            ValueError: a LoRA target outside the layers, or one role with different shapes.
        """
        if view.hidden_size is None:
            raise ValueError(f"{self.method}: cannot read hidden_size from the {view.model_type} config")
        refs = view.layers(self.layers)
        groups = len({ref.group.path for ref in refs})
        # (path, layer, head key, the hook point of an adapter or the projection of a LoRA)
        planned: list[tuple[str, LayerRef, str, Any]] = []
        for point in view.hook_points(self.placement, self.layers) if self.placement else []:
            ref, rel = _layer_of(refs, point.path)
            role = next(p for p in self.placement if getattr(ref.group.layer, p).module == rel)
            planned.append((point.path, ref, _key(ref, role, groups), point))
        for path in view.projections(self.lora_targets, self.layers) if self.lora_targets else []:
            ref, rel = _layer_of(refs, path)
            planned.append((path, ref, _key(ref, rel, groups), view.module(path)))
        used = [ref for ref in refs if any(r is ref for _, r, _, _ in planned)]
        generator = HyperGenerator(self.tasks, self.languages, len(used), self)
        units: dict[str, list[Unit]] = {}
        hooks: dict[str, Any] = {}
        shapes: dict[str, tuple[int, int]] = {}
        for path, ref, key, target in planned:
            layer = next(i for i, r in enumerate(used) if r is ref)
            owner = not units
            unit: Unit
            if isinstance(target, nn.Module):
                in_f, out_f, _ = projection_shape(target)
                if shapes.setdefault(key, (in_f, out_f)) != (in_f, out_f):
                    raise ValueError(
                        f"{self.method}: projections named '{key}' differ in shape across layers "
                        f"({shapes[key]} and {(in_f, out_f)} at {path}); name them apart with `layers`"
                    )
                unit = HyperXLoraUnit(generator, owner, layer, key, in_f, out_f, self.lora_r, self.lora_alpha)
            else:
                unit = HyperXAdapterUnit(
                    generator, owner, layer, key, view.hidden_size, self.bottleneck_size, self.activation
                )
                hooks[path] = target
            units.setdefault(path, []).append(unit)
        attachments = []
        for path, members in units.items():
            unit = members[0] if len(members) == 1 else UnionUnit({f"p{i}": u for i, u in enumerate(members)})
            attachments.append(Attachment(path, unit, hook=hooks.get(path)))
        return attachments


def _layer_of(refs: list[LayerRef], path: str) -> tuple[LayerRef, str]:
    """The layer holding `path` and the path relative to it."""
    for ref in refs:
        if path.startswith(ref.path + "."):
            return ref, path[len(ref.path) + 1 :]
    raise ValueError(f"hyperx: {path} is in no layer of the model's layer stacks")


def _key(ref: LayerRef, name: str, groups: int) -> str:
    """A head key: the role or in-layer path, prefixed by the layer group when there are several
    (T5's encoder and decoder get their own heads). ModuleDict keys may not contain dots."""
    key = name.replace(".", "-")
    return f"{ref.group.name}-{key}" if groups > 1 else key
