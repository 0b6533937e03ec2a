"""RMSNorm and SwiGLU as plain-PyTorch autograd Functions that save less for backward.

The op table's CPU path (``reference`` and ``auto`` off CUDA). Composed from PyTorch ops, as in
:mod:`.reference`, autograd keeps one extra activation per op for backward: RMSNorm keeps its
normalised fp32 rows ``[T, H]`` beside the input (and an fp32 copy of a bf16 input), SwiGLU
keeps ``silu(gate)`` ``[T, I]`` beside ``gate`` and ``up``. These Functions keep only the inputs
(and RMSNorm's per-row ``rstd``) and recompute the rest in backward, as Liger's kernels do: at
the 0.5B shape (24 layers, hidden 896, intermediate 4,864) that is ~26 MiB per layer per 1,024
tokens in fp32. The forward runs the same ops as :mod:`.reference` (same numerics; an fp64
input alone stays fp64 where the reference rounds it to fp32); backward is the closed form,
computed in fp32 (fp64 for fp64 inputs) and cast to the input's dtype.
Tested against autograd through :mod:`.reference` and by gradcheck in
tests/test_kernels_dispatch.py.
"""

from __future__ import annotations

import torch


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
        acc = _acc(gate.dtype)
        g, dyf = gate.to(acc), dy.to(acc)
        s = torch.sigmoid(g)
        silu = g * s
        d_up = (dyf * silu).to(up.dtype) if ctx.needs_input_grad[1] else None
        d_gate = (dyf * up.to(acc) * s * (1 + g * (1 - s))).to(gate.dtype) if ctx.needs_input_grad[0] else None
        return d_gate, d_up


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return RMSNormFunction.apply(x, weight, eps)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return SwiGLUFunction.apply(gate, up)
