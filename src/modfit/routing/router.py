"""Learned routers: per-token or per-example weights over an inventory of modules.

A `RouterUnit` sits at one site, next to the units of the modules it routes over, and turns the
site's output h into mixture weights w over the n modules (`routing/moe.py` then computes
h + sum_i w_i (o_i - h), o_i being module i's output)::

    z = LN(h) W + b                       token level: h (batch, seq, width) -> z (batch, seq, n)
    z = LN(mean_t h_t) W + b              example level: the mean over the real tokens -> (batch, n)

LN is a layer norm without gain, so that the logits start in the same range at every site whatever
the scale of the watched module's output. Then, by `mode` (tau: the temperature)::

    dense            w = softmax(z / tau)
    top_k            p = softmax(z / tau); keep the k largest p_i, zero the rest, renormalise
    gumbel_softmax   training: y = softmax((z + g) / tau), g ~ Gumbel(0, 1) i.i.d.;
                     w = onehot(argmax y) forward, grad of y backward (straight-through)
                     evaluation: onehot(argmax z)  (or softmax(z / tau) with hard_eval=False)
    gumbel_sigmoid   training: s_i = sigmoid((z_i + l_i) / tau), l_i ~ Logistic(0, 1) i.i.d.;
                     gate_i = [s_i > 1/2] forward, grad of s_i backward (straight-through);
                     w = gate / max(1, sum_j gate_j): the mean of the modules switched on
                     evaluation: gate_i = [z_i > 0]  (or sigmoid(z_i / tau) with hard_eval=False)

Gumbel-softmax: Jang et al. 2017 (arXiv:1611.01144) and Maddison et al. 2017 (arXiv:1611.00712);
the sigmoid form is their binary special case (the difference of two Gumbels is logistic).

The router's probabilities P (what it would choose, without noise) are softmax(z / tau) for dense
and top_k, softmax(z) for gumbel_softmax (argmax(z + g) is distributed as softmax(z), whatever tau),
and sigmoid(z) normalised over the modules for gumbel_sigmoid. Its assignment A (what a token or
example is dispatched to, rows summing to 1) is the argmax for dense, the kept k (1/k each) for
top_k, the hard sample (or argmax at evaluation) for gumbel_softmax, and the gates switched on
(normalised) for gumbel_sigmoid. From them, over the real tokens (token level) or the examples::

    load balance   L = n * sum_i f_i P_i,   f_i = mean A_i, P_i = mean P_i          (Switch Transformer,
                   Fedus et al. 2022, arXiv:2101.03961, eq. 4-6; f has no gradient; L = 1 when uniform)
    entropy        mean of -sum_i P_i log P_i         (log n: uniform; 0: one module takes everything)
    usage          f_i                                (module collapse: one f_i near 1)

The temperature follows `temperature_at` over the router's training forward passes (counted in a
buffer saved with the module, so a loaded router goes on at the temperature it reached).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..sites import SiteCall, Unit

Mode = Literal["dense", "top_k", "gumbel_softmax", "gumbel_sigmoid"]
Level = Literal["token", "example"]
Anneal = Literal["exponential", "linear"]

_TINY = 1e-9  # keeps log() of the uniform noise and of probabilities finite


# -- formulas (small pure functions, tested on hand-made tensors) --------------------------------


def temperature_at(
    step: int | torch.Tensor,
    initial: float,
    final: float | None = None,
    anneal_steps: int = 0,
    anneal: Anneal = "exponential",
) -> torch.Tensor:
    """The temperature after `step` training steps: from `initial` to `final` over `anneal_steps`, then
    constant. With u = min(step, anneal_steps) / anneal_steps::

        exponential   tau = initial * (final / initial) ** u     (a geometric decay, as Jang et al. anneal)
        linear        tau = initial + (final - initial) * u

    `final=None` or `anneal_steps=0` keeps `initial`.

    Args:
        step: a count, a Python int or a 0-d tensor (the router's buffer: no device sync).

    Returns:
        A 0-d float32 tensor on the step's device.
    """
    step_t = torch.as_tensor(step, dtype=torch.float32)
    if final is None or anneal_steps <= 0 or final == initial:
        return torch.full_like(step_t, initial)
    u = step_t.clamp(0, anneal_steps) / anneal_steps
    if anneal == "linear":
        return initial + (final - initial) * u
    return initial * (final / initial) ** u


def top_k_weights(probs: torch.Tensor, k: int, renormalize: bool = True) -> torch.Tensor:
    """Keep the k largest entries of `probs` along the last dimension, zero the others, and (by
    default) divide by what is kept so that each row sums to 1.

    Args:
        probs: (..., n) non-negative weights (e.g. a softmax); gradients flow to the kept entries.

    Returns:
        (..., n), exactly k non-zero entries per row (ties broken as `torch.topk` does).
    """
    values, index = probs.topk(k, dim=-1)
    kept = torch.zeros_like(probs).scatter(-1, index, values)
    return kept / kept.sum(dim=-1, keepdim=True).clamp_min(_TINY) if renormalize else kept


def _uniform(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    u = torch.rand(like.shape, generator=generator, device=like.device, dtype=like.dtype)
    return u.clamp(_TINY, 1 - _TINY)


def gumbel_softmax_st(
    logits: torch.Tensor, tau: float | torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A hard one-hot sample with straight-through gradients.

    y = softmax((z + g) / tau) with g = -log(-log u), u ~ U(0, 1); the forward value is onehot(argmax y),
    the gradient that of y.

    Returns:
        (weights, hard): weights (..., n) equal `hard` forward and carry y's gradient backward; hard is
        the one-hot sample without gradient.
    """
    noise = -torch.log(-torch.log(_uniform(logits, generator)))
    y = torch.softmax((logits + noise) / tau, dim=-1)
    hard = F.one_hot(y.argmax(dim=-1), logits.shape[-1]).to(y.dtype)
    return hard - y.detach() + y, hard


def gumbel_sigmoid_st(
    logits: torch.Tensor, tau: float | torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent hard Bernoulli gates with straight-through gradients (binary Gumbel-softmax).

    s = sigmoid((z + log u - log(1 - u)) / tau), u ~ U(0, 1); forward value [s > 1/2], gradient that of s.
    P(gate on) = sigmoid(z), whatever tau.

    Returns:
        (gates, hard): gates (..., n) equal `hard` (0/1) forward and carry s's gradient backward.
    """
    u = _uniform(logits, generator)
    s = torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / tau)
    hard = (s > 0.5).to(s.dtype)
    return hard - s.detach() + s, hard


def _flatten(values: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., n) values and a (...) mask -> (rows, n) and (rows,) float weights (1 without mask)."""
    flat = values.reshape(-1, values.shape[-1])
    if mask is None:
        return flat, torch.ones(flat.shape[0], device=flat.device, dtype=flat.dtype)
    return flat, mask.reshape(-1).to(device=flat.device, dtype=flat.dtype)


def usage(assigned: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """f_i: the share of tokens (or examples) dispatched to module i.

    Args:
        assigned: (..., n) what each row is dispatched to; rows are normalised to sum to 1 (a row with
            nothing assigned counts for nothing), so top-k rows give 1/k to each kept module.
        mask: (...) 1 for rows that count (real tokens), 0 for padding.

    Returns:
        (n,) summing to 1 (0s when no row counts).
    """
    flat, weight = _flatten(assigned.detach(), mask)
    rows = flat / flat.sum(dim=-1, keepdim=True).clamp_min(_TINY)
    total = (rows * weight[:, None]).sum(dim=0)
    return total / total.sum().clamp_min(_TINY)


def mean_probs(probs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """P_i: the mean router probability of module i over the rows that count. (n,), with gradient."""
    flat, weight = _flatten(probs, mask)
    return (flat * weight[:, None]).sum(dim=0) / weight.sum().clamp_min(_TINY)


def load_balance_loss(
    probs: torch.Tensor, assigned: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch Transformer's auxiliary load-balancing loss (Fedus et al. 2022, arXiv:2101.03961, eq. 4):

        L = n * sum_i f_i * P_i

    with f_i = `usage(assigned)` (no gradient: dispatch is discrete) and P_i = `mean_probs(probs)`.
    L = 1 when routing is uniform (f_i = P_i = 1/n), its minimum over P for uniform f; it reaches n when
    every row goes to one module with certainty.

    Args:
        probs: (..., n) router probabilities (rows summing to 1).
        assigned: (..., n) what each row is dispatched to (one-hot, top-k indicator, gates).
        mask: (...) 1 for rows that count.

    Returns:
        A 0-d tensor (not multiplied by the loss weight).
    """
    n = probs.shape[-1]
    return n * (usage(assigned, mask) * mean_probs(probs, mask)).sum()


def routing_entropy(probs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The mean over rows that count of -sum_i p_i log p_i (natural log): log n when uniform, 0 when every
    row is certain. 0-d, without gradient."""
    flat, weight = _flatten(probs.detach(), mask)
    per_row = -(flat * flat.clamp_min(_TINY).log()).sum(dim=-1)
    return (per_row * weight).sum() / weight.sum().clamp_min(_TINY)


# -- the unit ------------------------------------------------------------------------------------


class RouterUnit(Unit):
    """The router of one site: a linear map from the site's output to n logits, and the mode that
    turns them into weights (see the module docstring).

    It is not an item the site runs by itself (`parts()` is empty): a `moe(...)` node calls `route`.

    Args:
        width: the site's output width; children: the routed branches' textual forms (names of the
            usage metrics); the rest: `RouterConfig`'s fields.
    """

    step: torch.Tensor  # buffer: training forward passes so far

    def __init__(
        self,
        width: int,
        children: tuple[str, ...],
        *,
        level: Level = "token",
        mode: Mode = "dense",
        k: int = 1,
        renormalize: bool = True,
        temperature: float = 1.0,
        final_temperature: float | None = None,
        anneal_steps: int = 0,
        anneal: Anneal = "exponential",
        load_balance: float = 0.0,
        hard_eval: bool = True,
    ) -> None:
        super().__init__()
        self.children_names = tuple(children)
        self.n = len(children)
        self.level, self.mode, self.k, self.renormalize = level, mode, k, renormalize
        self.schedule = (temperature, final_temperature, anneal_steps, anneal)
        self.load_balance, self.hard_eval = load_balance, hard_eval
        self.gate = nn.Linear(width, self.n)
        nn.init.normal_(self.gate.weight, std=0.02)  # near-uniform weights at the start
        nn.init.zeros_(self.gate.bias)
        # training forward passes so far: drives the temperature; saved, so a loaded router goes on
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self._aux: torch.Tensor | None = None  # the last training pass's load-balancing term
        self._stats: dict[str, torch.Tensor] | None = None  # sums since the last `metrics()`

    def parts(self) -> list[Unit]:
        return []

    def forward(self, h: Any, call: SiteCall) -> Any:  # pragma: no cover - never run as an item
        return h

    @property
    def temperature(self) -> torch.Tensor:
        """The current temperature (0-d tensor), from the schedule and the training step count."""
        return temperature_at(self.step, *self.schedule)

    @property
    def zeros_are_inert(self) -> bool:
        """Whether a zero weight also has a zero gradient right now, so the branch may be skipped:
        not for Gumbel modes while training (straight-through passes gradients to unchosen modules)."""
        return self.mode in ("dense", "top_k") or not (self.training and torch.is_grad_enabled())

    def logits(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Router logits: (..., n) per token, or (batch, n) per example (mean over tokens where `mask`,
        a (batch, seq) tensor, is 1; over all positions without it).

        Raises:
            ValueError: h's width is not the router's.
        """
        width = self.gate.in_features
        if h.shape[-1] != width:
            raise ValueError(
                f"router over {', '.join(self.children_names)}: the site's output has width "
                f"{h.shape[-1]}, the router was built for {width}"
            )
        x = h.to(self.gate.weight.dtype)
        if self.level == "example" and x.ndim >= 3:
            x = x.reshape(x.shape[0], -1, width)  # (batch, positions, width)
            if mask is not None:
                m = mask.reshape(x.shape[0], -1, 1).to(x.dtype)
                x = (x * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)
            else:
                x = x.mean(dim=1)  # (batch, width)
        return self.gate(F.layer_norm(x, (width,)))

    def route(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The mixture weights for the site's output h.

        Args:
            h: (batch, seq, width) (or (rows, width)); mask: (batch, seq) 1 for real tokens, or None.

        Returns:
            (..., n) weights broadcastable against h's leading dimensions: (batch, seq, n) per token,
            (batch, 1, n) per example. Records the load-balancing term and the metrics on the way.
        """
        z = self.logits(h, mask)
        tau = self.temperature
        training = self.training and torch.is_grad_enabled()
        if self.mode == "gumbel_sigmoid":
            if training:
                gates, hard = gumbel_sigmoid_st(z, tau)
            elif self.hard_eval:
                gates = hard = (z > 0).to(z.dtype)
            else:
                gates = torch.sigmoid(z / tau)
                hard = (gates > 0.5).to(z.dtype)
            weights = gates / gates.sum(dim=-1, keepdim=True).clamp_min(1.0)  # mean of the gates on
            sig = torch.sigmoid(z)
            probs = sig / sig.sum(dim=-1, keepdim=True)
            assigned = hard
        elif self.mode == "gumbel_softmax":
            probs = torch.softmax(z, dim=-1)
            if training:
                weights, assigned = gumbel_softmax_st(z, tau)
            else:
                assigned = F.one_hot(z.argmax(dim=-1), self.n).to(z.dtype)
                weights = assigned if self.hard_eval else torch.softmax(z / tau, dim=-1)
        else:
            probs = torch.softmax(z / tau, dim=-1)
            if self.mode == "top_k":
                weights = top_k_weights(probs, self.k, self.renormalize)
                assigned = (weights != 0).to(z.dtype)
            else:
                weights = probs
                assigned = F.one_hot(probs.argmax(dim=-1), self.n).to(z.dtype)
        counted = mask if self.level == "token" else None
        if counted is not None and tuple(counted.shape) != tuple(z.shape[:-1]):
            counted = None
        if training:
            self.step += 1
            if self.load_balance > 0:
                self._aux = self.load_balance * load_balance_loss(probs, assigned, counted)
        self._record(probs, assigned, counted)
        if self.level == "example" and h.ndim >= 3:
            weights = weights.reshape(weights.shape[0], *([1] * (h.ndim - 2)), self.n)  # (batch, 1, n)
        return weights.to(h.dtype)

    def regularizer(self) -> torch.Tensor | None:
        """The load-balancing term of the last training forward pass (weight x `load_balance_loss`),
        handed out once: a later call returns None until another training pass ran."""
        aux, self._aux = self._aux, None
        return aux

    def _record(self, probs: torch.Tensor, assigned: torch.Tensor, mask: torch.Tensor | None) -> None:
        """Add this pass's entropy and usage to the running sums (tensors: no device sync here)."""
        _, weight = _flatten(probs, mask)
        rows = weight.sum().detach()
        entropy = routing_entropy(probs, mask) * rows
        used = usage(assigned, mask) * rows
        if self._stats is None:
            self._stats = {"rows": rows, "entropy": entropy, "usage": used}
        else:
            self._stats = {
                "rows": self._stats["rows"] + rows,
                "entropy": self._stats["entropy"] + entropy,
                "usage": self._stats["usage"] + used,
            }

    def metrics(self) -> dict[str, float]:
        """Entropy and usage per routed branch since the last call, weighted by tokens (or examples);
        then starts over. Adds the temperature when it anneals. {} when nothing was routed."""
        stats, self._stats = self._stats, None
        if stats is None or float(stats["rows"]) == 0:
            return {}
        rows = float(stats["rows"])
        out = {"entropy": float(stats["entropy"]) / rows}
        for name, value in zip(self.children_names, stats["usage"].tolist(), strict=True):
            out[f"usage.{name}"] = value / rows
        initial, final, steps, _ = self.schedule
        if final is not None and steps > 0 and final != initial:
            out["temperature"] = float(self.temperature)
        return out
