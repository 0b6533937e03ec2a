"""Rotary embedding for packed tokens as a Triton kernel.

q ``[T, H, D]`` and cos/sin ``[T, D]`` (HF layout, halves duplicated) built from per-document
``position_ids`` (see ``reference.rope_cos_sin``), so every packed document is rotated from
position 0. One program per token rotates all heads; the backward is the inverse rotation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_utils import next_pow2


@triton.jit
def _rope_kernel(
    X,
    Y,
    COS,
    SIN,
    stride_xt,
    stride_xh,
    stride_yt,
    stride_yh,
    stride_c,
    n_heads,
    half,
    SIGN: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0)
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < n_heads) & (d < half)
    cos = tl.load(COS + t * stride_c + d, mask=d < half, other=0.0).to(tl.float32)
    sin = tl.load(SIN + t * stride_c + d, mask=d < half, other=0.0).to(tl.float32) * SIGN
    x_ptr = X + t * stride_xt + h * stride_xh + d
    x1 = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + half, mask=mask, other=0.0).to(tl.float32)
    y_ptr = Y + t * stride_yt + h * stride_yh + d
    tl.store(y_ptr, (x1 * cos - x2 * sin).to(Y.dtype.element_ty), mask=mask)
    tl.store(y_ptr + half, (x2 * cos + x1 * sin).to(Y.dtype.element_ty), mask=mask)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
    x = x.contiguous()
    y = torch.empty_like(x)
    n_tok, n_heads, dim = x.shape
    half = dim // 2
    if n_tok:
        _rope_kernel[(n_tok,)](
            x,
            y,
            cos,
            sin,
            x.stride(0),
            x.stride(1),
            y.stride(0),
            y.stride(1),
            cos.stride(0),
            n_heads,
            half,
            SIGN=sign,
            BLOCK_H=next_pow2(n_heads),
            BLOCK_D=next_pow2(half),
        )
    return y


class TritonRopeFunction(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, q, k, cos, sin):
        cos = cos.contiguous()
        sin = sin.contiguous()
        ctx.save_for_backward(cos, sin)
        return _rotate(q, cos, sin, 1.0), _rotate(k, cos, sin, 1.0)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        return _rotate(dq, cos, sin, -1.0), _rotate(dk, cos, sin, -1.0), None, None


def rope(q, k, cos, sin):
    return TritonRopeFunction.apply(q, k, cos, sin)
