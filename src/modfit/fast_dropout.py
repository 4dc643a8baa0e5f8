"""Dropout for CPU training: the same distribution as torch's, drawn about 3x faster, stored in a quarter.

Why: a frozen base model trains in train mode, so its own dropout runs (BERT: 0.1 on the
embeddings, on every attention matrix and twice per layer on the hidden states). On CPU torch draws
each mask with `bernoulli_` (one serial double per element), keeps it for backward as a float tensor
(4 bytes an element), and `F.scaled_dot_product_attention` leaves its fused kernel for the math path
whenever `dropout_p > 0`. In a LoRA training step on the packaged MiniLM (batch 16 x 128, 2 threads)
`bernoulli_` alone was 25% of PEFT's CPU time, the same kernels as in `adapters`.

What changes here, only for CPU tensors in training mode:

    keep = random_int32 >= round(p * 2**32) - 2**31    # P(keep) = 1 - p to within 2**-32
    out  = x * float(keep) * 1 / (1 - p)                # keep: bool, 1 byte an element, for backward

The random bits come from one `random_` over int64 words (two draws of torch's default CPU
generator per word, so `torch.manual_seed` makes runs reproducible); attention with dropout is the
math formula softmax(q kᵀ * scale + mask), masked by `keep`, times v / (1 - p). The masks are not
torch's own masks (another stream), so a run does not repeat a run made with torch's dropout.

`cpu_kernels.CpuKernels` (a `TorchFunctionMode` entered around the model's forward while it trains)
routes `F.dropout` and `F.scaled_dot_product_attention` with dropout here through `route_dropout`
and `route_attention` (see `ModularModel.fast_dropout`). The model's classes and forward code stay
as they are.
"""

from __future__ import annotations

import math
import threading
from typing import Any

import torch

_local = threading.local()  # per thread: the scratch words for the random bits


def _random_words(count: int) -> torch.Tensor:
    """`count` int64 words of 64 uniform random bits, in a scratch buffer reused within this thread
    (a fresh buffer of this size costs page faults comparable to the draw itself)."""
    words: torch.Tensor | None = getattr(_local, "words", None)
    if words is None or words.numel() < count:
        words = _local.words = torch.empty(count, dtype=torch.int64)
    return words[:count].random_(-(2**63), None)  # from -2**63 to the int64 maximum: all 64 bits


def _as_factor(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The bool mask as 1.0 / 0.0 in `dtype`, a new tensor (callers multiply into it in place).

    Why not `torch.where(keep, x, 0)`: on CPU, cast through uint8 (bool's own cast to float is
    about 10x slower) and multiplied, the mask is applied 3 to 4 times faster than by `where` on
    MiniLM's 16 x 12 x 128 x 128 attention matrix and 4 to 10 times on its hidden states (2 threads),
    and a training step takes 0.95-1.00 of its time with `where` (bench/mask_apply.py). A dropped
    element is x * 0, as in torch's dropout (NaN where x is infinite or NaN).
    """
    return keep.view(torch.uint8).to(dtype)


def keep_mask(shape: torch.Size | tuple[int, ...], p: float) -> torch.Tensor:
    """A bool tensor of `shape`, each element True with probability 1 - p (to within 2**-32)."""
    if p <= 0.0 or p >= 1.0:  # thresholds outside int32
        return torch.full(shape, p <= 0.0, dtype=torch.bool)
    n = math.prod(shape)
    bits = _random_words((n + 1) // 2).view(torch.int32)[:n]  # (n,) uniform over all int32 values
    threshold = round(p * 2**32) - 2**31  # P(bits < threshold) = p
    return (bits >= threshold).view(shape)


class _Dropout(torch.autograd.Function):
    """out = x * keep / (1 - p); backward uses the same mask, saved as bool."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")
    def forward(ctx: Any, x: torch.Tensor, p: float) -> torch.Tensor:
        keep = keep_mask(x.shape, p)
        ctx.save_for_backward(keep)
        ctx.scale = 1.0 / (1.0 - p)
        return _as_factor(keep, x.dtype).mul_(x).mul_(ctx.scale)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (keep,) = ctx.saved_tensors
        return _as_factor(keep, grad.dtype).mul_(grad).mul_(ctx.scale), None


def dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Training-mode dropout of `x` with probability `p` in [0, 1] (see the module docstring)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    if p == 0.0:
        return x
    if p == 1.0:
        return x * 0.0
    out: torch.Tensor = _Dropout.apply(x, p)
    return out


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """`F.scaled_dot_product_attention`'s math, its dropout drawn by `keep_mask`.

    Shapes: query (..., heads, L, E), key (..., kv_heads, S, E), value (..., kv_heads, S, Ev)
    -> (..., heads, L, Ev). A bool mask marks the positions to attend to, a float mask is added to
    the scores; a row with nothing to attend to gives zeros, as torch's math path does.
    """
    if enable_gqa and key.size(-3) != query.size(-3):  # each key/value head serves a group of query heads
        group = query.size(-3) // key.size(-3)
        key, value = key.repeat_interleave(group, -3), value.repeat_interleave(group, -3)
    scale = 1.0 / math.sqrt(query.size(-1)) if scale is None else scale
    scores = (query * scale) @ key.transpose(-2, -1)  # (..., heads, L, S)
    dead: torch.Tensor | None = None  # (..., L, 1) rows with nothing to attend to
    if is_causal:
        length, source = scores.shape[-2:]
        attn_mask = torch.ones(length, source, dtype=torch.bool, device=scores.device).tril()
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            dead = ~attn_mask.any(-1, keepdim=True)
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            dead = torch.isneginf(attn_mask).all(-1, keepdim=True)
            scores = scores + attn_mask
    if dead is not None and bool(dead.any()):  # softmax over finite scores, then zeros: no NaN, no NaN grads
        weights = scores.masked_fill(dead, 0.0).softmax(-1).masked_fill(dead, 0.0)
    else:
        weights = scores.softmax(-1)
    if dropout_p > 0.0:
        keep = keep_mask(weights.shape, dropout_p)
        value = value * (1.0 / (1.0 - dropout_p))  # the 1 / (1 - p) on the smaller operand
        if weights.shape[:-2] == value.shape[:-2]:
            out: torch.Tensor = _DroppedTimesValue.apply(weights, keep, value)
            return out
        weights = weights * _as_factor(keep, weights.dtype)  # broadcast batch dimensions: plain autograd
    return weights @ value


class _DroppedTimesValue(torch.autograd.Function):
    """(weights * keep) @ value, keeping for backward only what softmax keeps anyway (its
    output, `weights`) and the bool mask: the dropped weights, a float tensor as large as the
    attention matrix, are formed again in backward instead of stored.

    Shapes: weights and keep (..., L, S), value (..., S, Ev) with the same leading dimensions.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")  # backward under the forward's autocast state (bf16 on CPU)
    def forward(ctx: Any, weights: torch.Tensor, keep: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weights, keep, value)
        return _as_factor(keep, weights.dtype).mul_(weights) @ value

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, torch.Tensor | None]:
        weights, keep, value = ctx.saved_tensors
        grad_weights = grad_value = None
        factor = _as_factor(keep, grad.dtype)  # (..., L, S)
        if ctx.needs_input_grad[0]:
            grad_weights = (grad @ value.transpose(-2, -1)).mul_(factor)  # (..., L, S)
        if ctx.needs_input_grad[2]:
            grad_value = factor.mul_(weights).transpose(-2, -1) @ grad  # (..., S, Ev); factor is spent
        return grad_weights, None, grad_value


SWITCH = "_modfit_fast_dropout"  # the model attribute the CPU-kernel hooks read (see cpu_kernels.py)


def route_dropout(call: dict[str, Any]) -> torch.Tensor | None:
    """An `F.dropout` call (its arguments by name) through `dropout`, or None where torch's own runs
    it: in place, not training, or not on CPU."""
    x = call.get("input")
    if not isinstance(x, torch.Tensor) or x.device.type != "cpu":
        return None
    if not call.get("training", True) or call.get("inplace", False):
        return None
    return dropout(x, float(call.get("p", 0.5)))


def route_attention(call: dict[str, Any]) -> torch.Tensor | None:
    """An `F.scaled_dot_product_attention` call with dropout through `attention`, or None where
    torch's own runs it: no dropout (its fused kernels), not CPU, nested, or both a causal flag and a
    mask (torch raises)."""
    query = call.get("query")
    if not isinstance(query, torch.Tensor) or query.device.type != "cpu" or query.is_nested:
        return None
    if call.get("dropout_p", 0.0) <= 0.0:
        return None
    if call.get("is_causal", False) and call.get("attn_mask") is not None:
        return None
    return attention(**call)
