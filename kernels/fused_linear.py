"""Chunked fused linear + cross-entropy and fused linear per-segment log-prob.

Both ops take the final hidden states ``[T, H]`` and the LM-head weight ``[V, H]`` and hold
at most one chunk of the ``[T, V]`` logits (see default_chunk_size): tokens are processed in
chunks of ``chunk_size`` rows, each chunk's logits are reduced to a per-row loss and (when
gradients are needed) overwritten in place by their gradient, which is folded into
``grad_hidden`` / ``grad_weight`` right away.

- ``fused_linear_cross_entropy`` (scalar output): gradients are computed during the forward
  (the Liger trick) and scaled in place by the incoming scalar gradient in backward, so the
  LM head costs 3 matmuls, as unfused.
- ``fused_linear_logprob`` (``[n_segments]`` output, the quantity DPO needs): the per-segment
  upstream gradient is unknown in forward, but it is one scalar per row. With a frozen weight
  (LoRA, BumbleCore's DPO) the forward computes ``d logp / d hidden`` per row (2 matmuls, as
  unfused) and backward scales each row by its segment's gradient. With a trained weight the
  weight gradient sums rows of different segments, so the forward keeps only the inputs and
  the backward recomputes each chunk's logits (4 matmuls instead of 3, memory still
  O(chunk*V)).

Autocast. A custom Function is not autocast: its forward sees the caller's dtypes (fp32
weights under bf16 autocast) and its backward runs under whatever autocast state the thread
calling ``.backward()`` has (usually none). So both Functions fix the compute dtype in forward
(autocast's when it is on for the tensors' device, else the inputs' promoted dtype), run every
matmul in it with autocast off, store it, and run backward's matmuls in the same dtype: a bf16
forward never gets an fp32 backward, and in-place ops never meet mixed dtypes.

The ``[V, H]`` weight gradient sums one product per chunk (~64 at 8k tokens): it is
accumulated in fp32 (a bf16 sum of 64 terms loses low bits of every term) and returned in the
weight's dtype. On CUDA with bf16/fp16 products the accumulation is one ``addmm`` with an fp32
output (torch >= 2.8, as Liger's ``accum_dtype=torch.float32`` path); elsewhere the chunk's
product is added to the fp32 buffer.

The inner per-chunk step is either plain PyTorch (``impl="torch"``: runs anywhere, the CPU
path) or the Triton row kernel of ``triton_cross_entropy`` (``impl="triton"``).
"""

from __future__ import annotations

import math

import torch

from bumblefast.labels import IGNORE_INDEX

from ._triton_utils import next_pow2

CPU_CHUNK_LOGITS_BYTES = 256 << 20


def default_chunk_size(n_tokens: int, hidden: int, vocab: int, device_type: str = "cuda") -> int:
    """Liger's heuristic: the logits chunk is about the size of the hidden states.

    On CPU a chunk of few rows makes each matmul stream the whole [V, H] weight (and
    ``grad_w.addmm_`` read and write it) for little work: at the 1.5B head (vocab 152k) and
    2048 tokens Liger's 32-row chunks ran fwd+bwd 2.4x slower than 256-row ones (2 cores,
    benchmarks/bench_kernels.py). So a CPU chunk also takes as many rows as fit ~256 MiB of
    fp32 logits (256 rows at vocab 152k): still O(chunk * V), never [T, V]."""
    n = max(1, n_tokens)
    inc = max(1, math.ceil(vocab / max(1, hidden)))
    rows = next_pow2(math.ceil(n / inc))
    if device_type == "cpu":
        fit = CPU_CHUNK_LOGITS_BYTES // (4 * max(1, vocab))
        rows = max(rows, 1 << max(0, fit.bit_length() - 1))  # a power of two <= fit
    return max(1, min(rows, next_pow2(n)))


def ce_rows_torch(logits, labels, grad_out=None, scale=None, ignore_index=IGNORE_INDEX, scratch=False):
    """PyTorch twin of ``triton_cross_entropy.ce_rows``: per-row loss in fp32 (0 on ignored
    rows); optionally writes ``scale[row] * (softmax - onehot)`` into ``grad_out``.
    Works in place on one fp32 ``[rows, V]`` buffer (the logits themselves when they are
    fp32 and ``grad_out is logits``, or when the caller passes ``scratch``: a temporary it
    will not read again, so no ``[rows, V]`` copy is made)."""
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    target = logits.gather(1, safe[:, None]).squeeze(1).float()
    write = grad_out is not None
    x = logits.float()
    if x is logits and not (write and grad_out is logits) and not scratch:
        x = x.clone()  # never modify the caller's logits unless they are the grad buffer
    m = x.amax(dim=-1, keepdim=True)
    p = x.sub_(m).exp_()
    denom = p.sum(dim=-1, keepdim=True)
    loss = (m + denom.log()).squeeze(1) - target
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    if write:
        s = valid.float() if scale is None else scale.float() * valid
        p.mul_(s[:, None] / denom)  # scale * softmax
        rows = torch.arange(p.shape[0], device=p.device)
        p[rows, safe] -= s
        if p is not grad_out:
            grad_out.copy_(p)
    return loss


def chunk_logits(h, w, impl: str):
    """A chunk's logits ``h @ w.T`` ``[rows, V]``. On CPU computed as ``(w @ h.T).T``, a
    column-major view of the same values: MKL runs the tall ``[V, H] @ [H, rows]`` product faster
    than the wide one (256 rows at vocab 152k, 2-core AMD EPYC: 382 vs 504 ms, 7 rounds, ranges
    apart), while the per-row loss, its in-place gradient and the gradient matmuls read the view
    at about the same speed (docs/LOG.md, issue 29). CUDA, and the Triton row kernel anywhere,
    keep the row-major product (the kernel reads contiguous rows). The benchmarks' GEMM ceiling
    times the head in this layout too (benchmarks/harness.gemm_sides)."""
    return (w @ h.t()).t() if impl == "torch" and h.device.type == "cpu" else h @ w.t()


def _step(impl: str):
    if impl == "torch":
        return ce_rows_torch
    if impl == "triton":
        from .triton_cross_entropy import ce_rows

        return ce_rows
    raise ValueError(f"impl must be 'torch' or 'triton', got {impl!r}")


_ADDMM_OUT_DTYPE = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 8)


def compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the LM-head matmuls run in: autocast's for the tensors' device when it is on
    (as ``hidden @ weight.T`` would get there), else the inputs' promoted dtype."""
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _accumulate_grad_weight(grad_w, dlogits, h, weight):
    """``grad_w += dlogits.T @ h`` into the fp32 buffer ``grad_w`` (module docstring); returns
    the buffer. ``grad_w`` None: the first chunk, whose fp32 product is the buffer itself (no
    ``[V, H]`` zero-fill, on CPU ~0.1-1 s a step at a 152k vocabulary)."""
    a = dlogits.t()
    if grad_w is None:
        if a.dtype == torch.float32:
            return a @ h
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    if grad_w.dtype == a.dtype:
        grad_w.addmm_(a, h)
    elif (
        _ADDMM_OUT_DTYPE
        and grad_w.device.type == "cuda"
        and a.dtype in (torch.float16, torch.bfloat16)
        and torch.cuda.get_device_capability(grad_w.device)[0] >= 8
    ):
        torch.addmm(grad_w, a, h, out_dtype=torch.float32, out=grad_w)
    else:
        grad_w.add_(a @ h)
    return grad_w


def _finish_grad_weight(grad_w, weight):
    """The accumulated fp32 weight gradient in the weight's dtype (zeros when no row had a target)."""
    if grad_w is None:
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    return grad_w.to(weight.dtype)


def _scatter_rows(grad_kept, keep, n_rows: int, dtype):
    """The kept rows' gradients into a zero ``[n_rows, H]`` tensor (rows without a target: 0)."""
    out = torch.zeros((n_rows, grad_kept.shape[1]), dtype=dtype, device=grad_kept.device)
    return out.index_copy_(0, keep, grad_kept.to(dtype))


class ChunkedLinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, reduction, ignore_index, chunk_size, impl):
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        cd = compute_dtype(hidden, weight)
        with torch.autocast(hidden.device.type, enabled=False):
            return ChunkedLinearCrossEntropyFunction._forward(
                ctx, hidden, weight, labels, reduction, ignore_index, chunk_size, impl, need_h, need_w, cd
            )

    @staticmethod
    def _forward(ctx, hidden, weight, labels, reduction, ignore_index, chunk_size, impl, need_h, need_w, cd):
        step = _step(impl)
        # Rows without a target add no loss and no gradient: skip their logits entirely (in
        # SFT the prompt tokens, often half of the stream, never touch the LM head).
        keep = (labels != ignore_index).nonzero().squeeze(1)
        all_rows = keep.numel() == labels.shape[0]
        h_all = (hidden if all_rows else hidden.index_select(0, keep)).to(cd)
        y_all = labels if all_rows else labels.index_select(0, keep)
        w = weight.to(cd)  # once, not per chunk (autocast would cast it per matmul)
        n_tok = h_all.shape[0]
        chunk = chunk_size or default_chunk_size(n_tok, hidden.shape[1], weight.shape[0], hidden.device.type)
        grad_kept = torch.empty((n_tok, hidden.shape[1]), dtype=hidden.dtype, device=hidden.device) if need_h else None
        grad_w = None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for s in range(0, n_tok, chunk):
            h = h_all[s : s + chunk]
            y = y_all[s : s + chunk]
            logits = chunk_logits(h, w, impl)
            write = need_h or need_w
            total += step(logits, y, grad_out=logits if write else None, ignore_index=ignore_index, scratch=True).sum()
            if need_h:
                grad_kept[s : s + chunk] = logits @ w
            if need_w:
                grad_w = _accumulate_grad_weight(grad_w, logits, h, weight)
        if need_w:
            grad_w = _finish_grad_weight(grad_w, weight)
        grad_h = grad_kept
        if need_h and not all_rows:
            grad_h = _scatter_rows(grad_kept, keep, hidden.shape[0], hidden.dtype)
        n_valid = torch.tensor(n_tok, device=hidden.device)
        if reduction == "mean":
            total = total / n_valid
        ctx.reduction = reduction
        ctx.save_for_backward(grad_h, grad_w, n_valid)
        ctx.done = False
        return total

    @staticmethod
    def backward(ctx, g):
        # The gradients were computed in forward; scale them in place (no [V, H] copy), so
        # this backward can run once per forward (no retain_graph double backward).
        if ctx.done:
            raise RuntimeError("fused_linear_cross_entropy: backward can run only once per forward")
        ctx.done = True
        grad_h, grad_w, n_valid = ctx.saved_tensors
        scale = g.float() / n_valid if ctx.reduction == "mean" else g.float()
        if grad_h is not None:
            grad_h.mul_(scale.to(grad_h.dtype))
        if grad_w is not None:
            grad_w.mul_(scale.to(grad_w.dtype))
        return grad_h, grad_w, None, None, None, None, None


class ChunkedLinearLogprobFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, segment_ids, n_segments, ignore_index, chunk_size, impl):
        cd = compute_dtype(hidden, weight)
        with torch.autocast(hidden.device.type, enabled=False):
            return ChunkedLinearLogprobFunction._forward(
                ctx, hidden, weight, labels, segment_ids, n_segments, ignore_index, chunk_size, impl, cd
            )

    @staticmethod
    def _forward(ctx, hidden, weight, labels, segment_ids, n_segments, ignore_index, chunk_size, impl, cd):
        step = _step(impl)
        # only rows with a target contribute (DPO repeats each prompt: often most of the row)
        keep = (labels != ignore_index).nonzero().squeeze(1)
        hidden_k = hidden.index_select(0, keep).to(cd)
        labels_k, segment_k = labels.index_select(0, keep), segment_ids.index_select(0, keep)
        n_tok = hidden_k.shape[0]
        chunk = chunk_size or default_chunk_size(n_tok, hidden.shape[1], weight.shape[0], hidden.device.type)
        out = torch.zeros(n_segments, dtype=torch.float32, device=hidden.device)
        w = weight.to(cd)
        # a frozen weight: d(-logp)/d hidden per kept row now; backward only scales the rows
        eager = ctx.needs_input_grad[0] and not ctx.needs_input_grad[1]
        grad_k = torch.empty(hidden_k.shape, dtype=hidden.dtype, device=hidden.device) if eager else None
        for s in range(0, n_tok, chunk):
            logits = chunk_logits(hidden_k[s : s + chunk], w, impl)
            y = labels_k[s : s + chunk]
            loss = step(logits, y, grad_out=logits if eager else None, ignore_index=ignore_index, scratch=True)
            out.index_add_(0, segment_k[s : s + chunk], -loss)
            if eager:
                grad_k[s : s + chunk] = logits @ w
        # eager: the rows' gradients replace the inputs (the same [kept, H] bytes)
        ctx.save_for_backward(grad_k if eager else hidden_k, weight, labels_k, segment_k, keep)
        ctx.n_rows, ctx.hidden_dtype, ctx.eager = hidden.shape[0], hidden.dtype, eager
        ctx.cfg = (ignore_index, chunk, impl, cd)
        return out

    @staticmethod
    def backward(ctx, g):
        # the forward's compute dtype, whatever autocast state the caller of backward has
        with torch.autocast(g.device.type, enabled=False):
            return ChunkedLinearLogprobFunction._backward(ctx, g)

    @staticmethod
    def _backward(ctx, g):
        saved, weight, labels, segment_ids, keep = ctx.saved_tensors  # the kept rows only
        ignore_index, chunk, impl, cd = ctx.cfg
        # d logp / d logits = onehot - softmax = -(softmax - onehot), times the segment's grad
        row_scale = (-g.float())[segment_ids].contiguous()
        if ctx.eager:  # saved = d(-logp)/d hidden per row: scale each by its segment's gradient
            grad_h = _scatter_rows(saved * row_scale[:, None].to(saved.dtype), keep, ctx.n_rows, ctx.hidden_dtype)
            return grad_h, None, None, None, None, None, None, None
        hidden, step, w = saved, _step(impl), weight.to(cd)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty(hidden.shape, dtype=ctx.hidden_dtype, device=hidden.device) if need_h else None
        grad_w = None
        for s in range(0, hidden.shape[0], chunk):
            h = hidden[s : s + chunk]
            logits = chunk_logits(h, w, impl)
            step(
                logits,
                labels[s : s + chunk],
                grad_out=logits,
                scale=row_scale[s : s + chunk],
                ignore_index=ignore_index,
            )
            if need_h:
                grad_h[s : s + chunk] = logits @ w
            if need_w:
                grad_w = _accumulate_grad_weight(grad_w, logits, h, weight)
        if need_h:
            grad_h = _scatter_rows(grad_h, keep, ctx.n_rows, ctx.hidden_dtype)
        if need_w:
            grad_w = _finish_grad_weight(grad_w, weight)
        return grad_h, grad_w, None, None, None, None, None, None


def fused_linear_cross_entropy(
    hidden,
    weight,
    labels,
    reduction="sum",
    ignore_index=IGNORE_INDEX,
    chunk_size=None,
    impl="torch",
):
    """``sum``/``mean`` token CE of ``hidden @ weight.T`` without materialising the logits."""
    if not torch.is_grad_enabled():  # the forward computes gradients eagerly: skip that work
        hidden, weight = hidden.detach(), weight.detach()
    return ChunkedLinearCrossEntropyFunction.apply(hidden, weight, labels, reduction, ignore_index, chunk_size, impl)


def fused_linear_logprob(
    hidden,
    weight,
    labels,
    segment_ids,
    n_segments,
    ignore_index=IGNORE_INDEX,
    chunk_size=None,
    impl="torch",
):
    """Summed target log-probs per segment ``[n_segments]`` (fp32) without materialising logits."""
    if not torch.is_grad_enabled():  # no backward will come: skip the frozen-weight eager gradients
        hidden, weight = hidden.detach(), weight.detach()
    return ChunkedLinearLogprobFunction.apply(
        hidden, weight, labels, segment_ids, int(n_segments), ignore_index, chunk_size, impl
    )
