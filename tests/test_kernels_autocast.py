"""The fused LM-head Functions under autocast, as bench_train and any user code call them: fp32
weights, the forward under bf16 autocast, ``.backward()`` outside it (issue 26).

A custom autograd.Function is not autocast; its backward runs in the autocast state of the
thread that calls backward. Before the fix, fused_linear_cross_entropy raised a dtype mismatch
(in-place addmm_ of bf16 logits and fp32 hidden states) and fused_linear_logprob ran its
backward's matmuls in fp32 after a bf16 forward. CPU bf16 autocast has the same dispatch and
dtype rules as CUDA's, so this runs here. The matmul dtypes are read from the dispatcher
(every aten mm/addmm the ops run), the gradients checked against the fp32 materialising
references of kernels/reference.py at bf16 tolerance. On a CUDA machine (benchmarks/gpu/run.sh)
the same tests also run there with the Triton row kernel, where the fp32 weight-gradient
accumulation is one addmm with an fp32 output."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bumblefast.kernels import fused_linear
from bumblefast.kernels import reference as R

aten = torch.ops.aten
# (device, per-chunk step) pairs: the PyTorch step on CPU, the Triton one on CUDA
PATHS = [("cpu", "torch")] + ([("cuda", "triton")] if torch.cuda.is_available() else [])
MATMULS = {aten.mm: (0, 1), aten.addmm: (1, 2), aten.addmm_: (1, 2), aten.bmm: (0, 1), aten.baddbmm: (1, 2)}


class MatmulDtypes(TorchDispatchMode):
    """Records the input dtypes of every matmul dispatched while active."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[torch.dtype, torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        where = MATMULS.get(func.overloadpacket)
        if where is not None:
            self.seen.append(tuple(args[i].dtype for i in where))
        return func(*args, **(kwargs or {}))


def _inputs(T=48, H=16, V=96, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(T, H, generator=g)
    w = 0.5 * torch.randn(V, H, generator=g)
    y = torch.randint(0, V, (T,), generator=g)
    y[[1, 5, 6, 30]] = -100
    seg = torch.arange(T) * 4 // T
    return tuple(t.to(device) for t in (h, w, y, seg))


def _close_bf16(a, b):
    """bf16 tolerance: relative to the gradient's scale (bf16 keeps ~3 significant digits)."""
    torch.testing.assert_close(a, b, rtol=3e-2, atol=3e-2 * float(b.abs().max()))


OPS = {
    "fused_linear_cross_entropy": (
        lambda h, w, y, seg, chunk, impl: fused_linear.fused_linear_cross_entropy(h, w, y, chunk_size=chunk, impl=impl),
        lambda h, w, y, seg: R.fused_linear_cross_entropy(h, w, y),
    ),
    "fused_linear_logprob": (
        lambda h, w, y, seg, chunk, impl: fused_linear.fused_linear_logprob(
            h, w, y, seg, 4, chunk_size=chunk, impl=impl
        ).sum(),
        lambda h, w, y, seg: R.fused_linear_logprob(h, w, y, seg, 4).sum(),
    ),
}


@pytest.mark.parametrize("device,impl", PATHS)
def test_logprob_with_a_frozen_weight_makes_its_gradients_in_the_forward(device, impl):
    """LoRA's frozen LM head: the rows' gradients are made in the bf16 forward (2 matmuls per
    chunk) and backward runs no matmul; the hidden gradient matches the fp32 reference."""
    fused, ref = OPS["fused_linear_logprob"]
    h, w, y, seg = _inputs(device=device)
    h1 = h.clone().requires_grad_()
    with MatmulDtypes() as fwd, torch.autocast(device, dtype=torch.bfloat16):
        out = fused(h1, w, y, seg, 8, impl)
    with MatmulDtypes() as bwd:
        out.backward()
    assert set(fwd.seen) == {(torch.bfloat16, torch.bfloat16)} and bwd.seen == []
    h2 = h.clone().requires_grad_()
    ref(h2, w, y, seg).backward()
    assert h1.grad.dtype == torch.float32
    _close_bf16(h1.grad, h2.grad)


@pytest.mark.parametrize("device,impl", PATHS)
@pytest.mark.parametrize("op", sorted(OPS))
@pytest.mark.parametrize("chunk", [8, None])
def test_backward_runs_in_the_forwards_compute_dtype(op, chunk, device, impl):
    fused, ref = OPS[op]
    h, w, y, seg = _inputs(device=device)
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    with MatmulDtypes() as fwd, torch.autocast(device, dtype=torch.bfloat16):
        out = fused(h1, w1, y, seg, chunk, impl)
    with MatmulDtypes() as bwd:  # outside autocast, as a training loop calls it
        out.backward()
    assert fwd.seen and set(fwd.seen) == {(torch.bfloat16, torch.bfloat16)}
    if op == "fused_linear_logprob":  # it recomputes the logits in backward: 3 matmuls per chunk
        assert len(bwd.seen) == len(fwd.seen) * 3
    else:  # the gradients were made in forward: backward only scales them
        assert bwd.seen == []
    assert set(bwd.seen) <= {(torch.bfloat16, torch.bfloat16)}
    # the gradients come back in the parameters' dtype and match the fp32 reference
    assert h1.grad.dtype == torch.float32 and w1.grad.dtype == torch.float32
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    expect = ref(h2, w2, y, seg)
    expect.backward()
    torch.testing.assert_close(out.float(), expect, rtol=2e-2, atol=0.1)
    _close_bf16(h1.grad, h2.grad)
    _close_bf16(w1.grad, w2.grad)


@pytest.mark.parametrize("device,impl", PATHS)
@pytest.mark.parametrize("op", sorted(OPS))
def test_backward_under_autocast_keeps_the_forwards_dtype(op, device, impl):
    """The other way round: an fp32 forward whose backward is called inside bf16 autocast
    still runs fp32 matmuls (the dtype is the forward's, not the caller's)."""
    fused, _ = OPS[op]
    h, w, y, seg = _inputs(seed=1, device=device)
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    out = fused(h1, w1, y, seg, 8, impl)
    with MatmulDtypes() as bwd, torch.autocast(device, dtype=torch.bfloat16):
        out.backward()
    assert set(bwd.seen) <= {(torch.float32, torch.float32)}


@pytest.mark.parametrize("device,impl", PATHS)
@pytest.mark.parametrize("op", sorted(OPS))
def test_weight_gradient_accumulates_in_fp32(op, device, impl):
    """bf16 weights (DeepSpeed's bf16 mode), one row per chunk: 256 chunk products summed into
    the [V, H] gradient. Summed in fp32 and rounded once, it stays within ~1 bf16 rounding of
    the fp32 reference; a bf16 running sum (the old zeros_like(weight)) drifted ~5x further
    (relative error 0.013 vs 0.0025 at these sizes, measured 2026-12-02)."""
    fused, ref = OPS[op]
    h, w, y, seg = _inputs(T=256, H=16, V=32, seed=4, device=device)
    y[:] = torch.randint(0, 32, (256,), generator=torch.Generator().manual_seed(5)).to(device)
    hb, wb = h.bfloat16().requires_grad_(), w.bfloat16().requires_grad_()
    fused(hb, wb, y, seg, 1, impl).backward()
    assert wb.grad.dtype == torch.bfloat16
    h2, w2 = hb.detach().float().requires_grad_(), wb.detach().float().requires_grad_()
    ref(h2, w2, y, seg).backward()
    rel = float((wb.grad.float() - w2.grad).norm() / w2.grad.norm())
    assert rel < 0.006, rel
