"""RMSNorm and SwiGLU (alone and with the MLP's down projection) as plain-PyTorch autograd
Functions that save less for backward.

The op table's CPU path (``reference`` and ``auto`` off CUDA). Composed from PyTorch ops, as in
:mod:`.reference`, autograd keeps one extra activation per op for backward: RMSNorm keeps its
normalised fp32 rows ``[T, H]`` beside the input (and an fp32 copy of a bf16 input), SwiGLU
keeps ``silu(gate)`` ``[T, I]`` beside ``gate`` and ``up``. These Functions keep only the inputs
(and RMSNorm's per-row ``rstd``) and recompute the rest in backward, as Liger's kernels do: at
the 0.5B shape (24 layers, hidden 896, intermediate 4,864) that is ~26 MiB per layer per 1,024
tokens in fp32. :class:`SwiGLULinearFunction` also takes the down projection: a linear keeps
its input ``silu(gate) * up`` ``[T, I]`` for the weight gradient, this Function recomputes it
from ``gate`` and ``up`` (one elementwise product in backward; 19 MiB per layer per 1,024 tokens
at the 0.5B shape). The forward runs the same ops as :mod:`.reference` (same numerics; an fp64
input alone stays fp64 where the reference rounds it to fp32); backward is the closed form,
computed in fp32 (fp64 for fp64 inputs) and cast to the input's dtype.
Tested against autograd through :mod:`.reference` and by gradcheck in
tests/test_kernels_dispatch.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _acc(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half types and fp32, fp64 for fp64 (so gradcheck can check these Functions)."""
    return torch.promote_types(dtype, torch.float32)


class RMSNormFunction(torch.autograd.Function):
    """``weight * (x * rstd).to(x.dtype)`` with ``rstd = rsqrt(mean(x^2) + eps)`` in fp32 or wider."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        xf = x.to(_acc(x.dtype))
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (xf * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        acc = _acc(x.dtype)
        n = x.to(acc) * rstd  # the normalised rows, recomputed
        dw = None
        if ctx.needs_input_grad[1]:
            dw = (dy * n.to(x.dtype)).reshape(-1, n.shape[-1]).sum(0).to(weight.dtype)
        dx = None
        if ctx.needs_input_grad[0]:
            dn = dy.to(acc) * weight.to(acc)
            dx = (rstd * (dn - n * (dn * n).mean(-1, keepdim=True))).to(x.dtype)
        return dx, dw, None


class SwiGLUFunction(torch.autograd.Function):
    """``silu(gate) * up``; backward recomputes ``sigmoid(gate)`` instead of keeping ``silu(gate)``."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return torch.nn.functional.silu(gate) * up

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        return _swiglu_grads(gate, up, dy, *ctx.needs_input_grad)


def _swiglu_grads(gate, up, dy, need_gate: bool, need_up: bool, silu=None):
    """``(d_gate, d_up)`` of ``silu(gate) * up`` for the gradient ``dy`` of the product, computed
    in fp32 or wider; ``silu``: the activation where the caller has it (else ``gate * sigmoid``)."""
    acc = _acc(gate.dtype)
    g, dyf = gate.to(acc), dy.to(acc)
    s = torch.sigmoid(g)
    d_up = None
    if need_up:
        d_up = (dyf * (g * s if silu is None else silu.to(acc))).to(up.dtype)
    d_gate = None
    if need_gate:  # dy * up * s * (1 + g * (1 - s)) in two [T, I] buffers instead of the plain
        # expression's six, each product the one it forms (bit-identical: the demo's fp32
        # trajectory follows the rounding, docs/LOG.md issue 29)
        t = torch.sub(1, s).mul_(g).add_(1)
        d_gate = (dyf * up.to(acc)).mul_(s).mul_(t).to(gate.dtype)
    return d_gate, d_up


class SwiGLULinearFunction(torch.autograd.Function):
    """``linear(silu(gate) * up, weight, bias)`` keeping only ``gate``, ``up`` and the weight;
    the product the linear would keep is recomputed for the weight gradient. No autocast: the
    caller (``MLP``) takes this path only when autocast is off."""

    @staticmethod
    def forward(ctx, gate, up, weight, bias):
        ctx.save_for_backward(gate, up, weight)
        ctx.has_bias = bias is not None
        return F.linear(F.silu(gate) * up, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        gate, up, weight = ctx.saved_tensors
        need_gate, need_up, need_w, need_b = ctx.needs_input_grad
        silu = F.silu(gate)  # as the forward computed it, so the product below is the forward's
        rows = dy.reshape(-1, dy.shape[-1])
        dw = db = d_gate = d_up = None
        if need_w:
            h = silu * up
            dw = rows.t().mm(h.reshape(-1, h.shape[-1])).to(weight.dtype)
            del h  # freed before the input gradients allocate theirs
        if ctx.has_bias and need_b:
            db = rows.sum(0)
        if need_gate or need_up:
            d_gate, d_up = _swiglu_grads(gate, up, dy.matmul(weight), need_gate, need_up, silu)
        return d_gate, d_up, dw, db


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return RMSNormFunction.apply(x, weight, eps)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return SwiGLUFunction.apply(gate, up)


def swiglu_linear(gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    return SwiGLULinearFunction.apply(gate, up, weight, bias)
