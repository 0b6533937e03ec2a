"""Cross-entropy over rows of logits as a Triton kernel (online logsumexp, one row/program).

The same row kernel is the inner step of the chunked fused-linear ops (``fused_linear.py``):
given a ``[chunk, V]`` logits buffer it returns the per-row loss ``lse - x[y]`` and,
optionally, writes ``scale_row * (softmax - onehot(y))`` into a gradient buffer (which may be
the logits buffer itself, so a chunk needs no second ``[chunk, V]`` allocation).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from bumblefast.labels import IGNORE_INDEX

from ._triton_utils import next_pow2


@triton.jit
def _ce_row_kernel(
    X,
    G,
    LABELS,
    SCALE,
    LOSS,
    stride_x,
    stride_g,
    n_cols,
    ignore_index,
    WRITE_GRAD: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    y = tl.load(LABELS + row)
    valid = y != ignore_index
    m = float("-inf")
    d = 0.0
    for off in range(0, n_cols, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        x = tl.load(x_row + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(d)
    y_safe = tl.where(valid, y, 0)
    x_y = tl.load(x_row + y_safe).to(tl.float32)
    tl.store(LOSS + row, tl.where(valid, lse - x_y, 0.0))
    if WRITE_GRAD:
        if HAS_SCALE:
            s = tl.load(SCALE + row).to(tl.float32)
        else:
            s = 1.0
        s = tl.where(valid, s, 0.0)
        g_row = G + row * stride_g
        for off in range(0, n_cols, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            cmask = cols < n_cols
            x = tl.load(x_row + cols, mask=cmask, other=0.0).to(tl.float32)
            p = tl.exp(x - lse)
            g = tl.where(cols == y, p - 1.0, p) * s
            tl.store(g_row + cols, g.to(G.dtype.element_ty), mask=cmask)


def ce_rows(
    logits: torch.Tensor,
    labels: torch.Tensor,
    grad_out: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    scratch: bool = False,
) -> torch.Tensor:
    """Per-row loss (fp32, 0 on ignored rows); if ``grad_out`` is given, also write
    ``scale[row] * (softmax - onehot)`` into it (``grad_out`` may alias ``logits``).
    ``scratch``: the torch twin's flag; this kernel never writes ``logits`` unless they are
    ``grad_out``."""
    n_rows, n_cols = logits.shape
    assert logits.stride(1) == 1, "logits rows must be contiguous"
    loss = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    if n_rows == 0:
        return loss
    write = grad_out is not None
    g = grad_out if write else logits
    s = scale if scale is not None else loss
    _ce_row_kernel[(n_rows,)](
        logits,
        g,
        labels.contiguous(),
        s,
        loss,
        logits.stride(0),
        g.stride(0),
        n_cols,
        ignore_index,
        WRITE_GRAD=write,
        HAS_SCALE=scale is not None,
        BLOCK=min(next_pow2(n_cols), 4096),
    )
    return loss


class TritonCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, logits, labels, reduction, ignore_index):
        logits = logits.contiguous()
        loss = ce_rows(logits, labels, ignore_index=ignore_index)
        ctx.save_for_backward(logits, labels)
        ctx.reduction = reduction
        ctx.ignore_index = ignore_index
        if reduction == "none":
            return loss
        if reduction == "sum":
            return loss.sum()
        ctx.n_valid = int((labels != ignore_index).sum())
        return loss.sum() / ctx.n_valid

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dloss):
        logits, labels = ctx.saved_tensors
        if ctx.reduction == "none":
            scale = dloss.float().contiguous()
        else:
            g = dloss.float() / (ctx.n_valid if ctx.reduction == "mean" else 1)
            scale = g.expand(logits.shape[0]).contiguous()
        grad = torch.empty_like(logits)
        ce_rows(logits, labels, grad_out=grad, scale=scale, ignore_index=ctx.ignore_index)
        return grad, None, None, None


def cross_entropy(logits, labels, reduction: str = "sum", ignore_index: int = IGNORE_INDEX):
    if reduction not in ("sum", "mean", "none"):
        raise ValueError(f"reduction must be 'sum', 'mean' or 'none', got {reduction!r}")
    return TritonCrossEntropyFunction.apply(logits, labels, reduction, ignore_index)
