"""Plain-PyTorch references for every fused op.

These are the numerics the Triton kernels, Liger and the chunked paths are tested against,
and the baselines `benchmarks/bench_kernels.py` times. They favour clarity over memory: the
fused-linear references materialise the full ``[tokens, vocab]`` logits on purpose (that is
the cost the fused ops remove). Math is done in fp32 and cast back, as the kernels do.

Shapes use the packed layout of the model: a flat token stream of ``T`` tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bumblefast.labels import IGNORE_INDEX


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Qwen2/Llama RMSNorm: normalise in fp32, cast to the input dtype, then scale."""
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def rope_cos_sin(
    position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables ``[T, head_dim]`` (halves duplicated, HF layout) for per-token positions.

    Positions restart at 0 per packed document, so each document is rotated as if alone.
    Computed in fp32 exactly as transformers' Qwen2RotaryEmbedding does.
    """
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=position_ids.device).float() / head_dim)
    )
    freqs = position_ids.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding. q ``[T, Hq, D]``, k ``[T, Hk, D]``, cos/sin ``[T, D]``."""
    cos = cos[:, None, :].to(q.dtype)
    sin = sin[:, None, :].to(q.dtype)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, the Qwen2 MLP activation."""
    return F.silu(gate) * up


def cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    reduction: str = "sum",
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Token cross-entropy in fp32; ``reduction`` in {"sum", "mean", "none"}."""
    return F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction=reduction)


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    reduction: str = "sum",
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """``cross_entropy(hidden @ weight.T, labels)``, materialising the ``[T, V]`` logits."""
    return cross_entropy(hidden @ weight.t(), labels, reduction=reduction, ignore_index=ignore_index)


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX):
    """Per-token target log-prob in fp32, 0 where ``labels == ignore_index``."""
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    lp = torch.log_softmax(logits.float(), dim=-1).gather(-1, safe[:, None]).squeeze(-1)
    return lp * valid


def fused_linear_logprob(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    segment_ids: torch.Tensor,
    n_segments: int,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Summed target log-probs per packed segment, ``[n_segments]`` fp32 (DPO's quantity).

    Materialises the ``[T, V]`` logits. Tokens labelled ``ignore_index`` contribute 0.
    """
    lp = token_logprobs(hidden @ weight.t(), labels, ignore_index)
    out = torch.zeros(n_segments, dtype=torch.float32, device=hidden.device)
    return out.index_add(0, segment_ids, lp)
