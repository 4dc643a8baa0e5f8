"""Linear layers on CPU through oneDNN: the same float32 product from another GEMM library.

Why: torch computes a float32 `F.linear` on CPU with MKL's sgemm. On the AMD EPYC (Zen 5) machines
this project runs on, MKL takes a path that uses 256-bit vectors (about 210 GFLOP/s on 2 cores at
BERT-base's shapes), while oneDNN, which torch ships as its `mkldnn` backend and which picks its
kernels by the processor's instruction set, runs 512-bit ones: the same products in 0.45-0.5 of the
time (`bench/linear_kernels.py`). A frozen base model's projections are most of a training step
(matrix products were 83% of a BERT-base LoRA step), forward and backward, and of inference.

What runs, only for float32 CPU tensors, outside autocast::

    out = x Wᵀ + b          (..., in) -> (..., out)    oneDNN inner product
    dx  = dout W            (..., out) -> (..., in)    oneDNN, W read through its transpose (no copy)
    dW  = doutᵀ x, db = Σ dout                         torch's own (only for weights that train)

The products stay float32 (oneDNN's default strict math, no reduced-precision accumulation): their
error against a float64 reference is of the same order as MKL's (tests/test_fast_linear.py), but the
summation order differs, so results are not bitwise torch's. Autograd keeps what it keeps for
`F.linear`: the input only when the weight trains, the weight only when the input needs a gradient.
Not differentiable twice (`once_differentiable`); `ModularModel.fast_linear` turns it off.

Where no gradient is needed (eval, `torch.no_grad`, nothing that requires one) the product runs
without the autograd wrapper, and only from `MIN_MACS` multiply-adds up: oneDNN's fixed cost per call
makes it the slower one for a few rows through a small matrix (a decoding step through MiniLM's
384 x 384 projections: 14 us against MKL's 8 us for one row; from 4 rows, or from 768 x 768 at one
row, it is as fast or faster: `bench/linear_kernels.py --tokens 1,2,4,16`).

`add_product(c, a, b, alpha)` forms c + alpha · a b the same way, with the sum in oneDNN's product
(one pass over c): a LoRA module folded into one inference call's weight, W + s·BA (`folding.py`).
"""

from __future__ import annotations

import functools
import platform
from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

SWITCH = "_modfit_fast_linear"  # the model attribute the CPU-kernel hooks read (see cpu_kernels.py)
_PLAIN = (torch.Tensor, torch.nn.Parameter)  # no tensor subclasses (fake, distributed, functional ...)
MIN_MACS = 1 << 19  # rows x in x out from which an inference product goes to oneDNN (see above)


def _inner_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x Wᵀ + b by oneDNN: x (rows, in), weight (out, in), any strides -> (rows, out)."""
    out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return out


@functools.cache
def available() -> bool:
    """Whether this torch build has the oneDNN kernel and this processor is x86-64 (elsewhere torch's
    own BLAS is the one tuned for it). Checked once, on a product that is exact in float32."""
    if platform.machine().lower() not in ("x86_64", "amd64") or not torch.backends.mkldnn.is_available():
        return False
    x = torch.arange(6.0).view(2, 3)
    weight = torch.arange(12.0).view(4, 3)
    bias = torch.ones(4)
    try:
        return torch.equal(_inner_product(x, weight, bias), F.linear(x, weight, bias))
    except (AttributeError, RuntimeError, NotImplementedError):  # no such op, or it refuses plain tensors
        return False


class _Linear(torch.autograd.Function):
    """F.linear with oneDNN products forward and for the input's gradient (see the module docstring)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        needs_x, needs_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.save_for_backward(x if needs_weight else None, weight if needs_x else None)
        ctx.x_shape = x.shape
        out = _inner_product(x.reshape(-1, x.shape[-1]), weight, bias)  # (rows, out)
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @once_differentiable
    def backward(
        ctx: Any, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        x, weight = ctx.saved_tensors
        grad = grad.reshape(-1, grad.shape[-1])  # (rows, out)
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = _inner_product(grad, weight.t(), None).view(ctx.x_shape)  # dout W: (rows, in)
        if ctx.needs_input_grad[1]:
            grad_weight = grad.t() @ x.reshape(-1, x.shape[-1])  # (out, in)
        if ctx.needs_input_grad[2]:
            grad_bias = grad.sum(0)
        return grad_x, grad_weight, grad_bias


def _applies(x: Any, weight: Any, bias: Any) -> bool:
    """A plain float32 product on CPU that F.linear would accept, outside autocast and functorch."""
    tensors = (x, weight) if bias is None else (x, weight, bias)
    return (
        all(type(t) in _PLAIN and t.dtype == torch.float32 and t.layout == torch.strided for t in tensors)
        and x.device.type == "cpu"
        and weight.dim() == 2
        and (bias is None or bias.dim() == 1)
        and x.dim() >= 1
        and x.shape[-1] == weight.shape[1]
        and x.numel() > 0
        and weight.numel() > 0
        and torch._C._get_mkldnn_enabled()  # the user's torch.backends.mkldnn.flags(enabled=False) wins
        and not torch.is_autocast_enabled("cpu")  # autocast casts F.linear to bfloat16: torch's path
        and not torch._C._are_functorch_transforms_active()  # vmap / grad need setup_context
        and available()
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, by oneDNN where it applies (float32 CPU tensors outside autocast on
    x86-64), by torch otherwise. Shapes: x (..., in), weight (out, in), bias (out,) -> (..., out)."""
    out = route({"input": x, "weight": weight, "bias": bias})
    return F.linear(x, weight, bias) if out is None else out


@functools.cache
def _has_binary_add() -> bool:
    """Whether oneDNN's inner product with an added tensor (a "binary add" post-op) runs here."""
    if not available():
        return False
    a, b, c = torch.arange(6.0).view(2, 3), torch.arange(12.0).view(4, 3), torch.ones(2, 4)
    try:
        out = torch.ops.mkldnn._linear_pointwise.binary(a, c, b, None, "add")
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    return torch.equal(out, torch.addmm(c, a, b.t()))


def add_product(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """c + alpha · a b, a new tensor: c (m, n), a (m, k), b (k, n) -> (m, n). By oneDNN with the sum in
    the product's epilogue (one pass over c) for float32 CPU tensors, else `torch.addmm`.

    Why: for a thin k (a LoRA rank), forming W + s·BA is a pass over W; `torch.addmm` copies c into
    the output first and then runs a product that reads and writes it again. Between a model's
    products, with W out of cache: 55 against 68 us at 384 x 384, 98 against 225 at 768 x 768, 150
    against 570 at 1024 x 1024, r = 8 (`bench/fold_cost.py --widths 384,512,640,768,1024 --tokens
    2048`, 2 threads, AMD EPYC Zen 5)."""
    plain_c = (
        type(c) in _PLAIN and c.dtype == torch.float32 and c.layout == torch.strided and c.is_contiguous()
    )
    records = torch.is_grad_enabled() and any(t.requires_grad for t in (a, b, c))  # the op has no backward
    if (
        plain_c
        and not records
        and c.device.type == "cpu"
        and c.shape == (a.shape[0], b.shape[1])
        and _applies(a, b.t(), None)
        and _has_binary_add()
    ):
        scaled = a if alpha == 1.0 else a * alpha  # (m, k): cheaper to scale than the (m, n) result
        out: torch.Tensor = torch.ops.mkldnn._linear_pointwise.binary(scaled, c, b.t(), None, "add")
        return out
    return torch.addmm(c, a, b, alpha=alpha)


def route(call: dict[str, Any]) -> torch.Tensor | None:
    """An `F.linear` call (its arguments by name) through oneDNN, or None where torch's own runs it."""
    x, weight, bias = call.get("input"), call.get("weight"), call.get("bias")
    if not _applies(x, weight, bias):
        return None
    assert isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor)  # as _applies checked
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        out: torch.Tensor = _Linear.apply(x, weight, bias)
        return out
    if x.numel() * weight.shape[0] < MIN_MACS:  # rows x in x out: a small inference product
        return None
    return _inner_product(x.reshape(-1, x.shape[-1]), weight, bias).view(*x.shape[:-1], weight.shape[0])
