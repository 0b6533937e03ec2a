"""Thin ``nn.Module`` wrappers over the dispatched ops (the Liger layering: op -> Function ->
module). Each resolves its implementation from the input's device at call time."""

from __future__ import annotations

import torch
from torch import nn

from .dispatch import get_ops
from .reference import rope_cos_sin


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6, kernels: str = "auto"):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps  # HF's attribute name
        self.kernels = kernels

    def forward(self, x):
        return get_ops(self.kernels, x.device).rms_norm(x, self.weight, self.variance_epsilon)

    def extra_repr(self):
        return f"{self.weight.shape[0]}, eps={self.variance_epsilon}, kernels={self.kernels}"


class RotaryEmbedding(nn.Module):
    """Builds cos/sin from per-token positions and rotates q ``[T, Hq, D]`` and k ``[T, Hk, D]``."""

    def __init__(self, head_dim: int, theta: float = 1e6, kernels: str = "auto"):
        super().__init__()
        self.head_dim, self.theta, self.kernels = head_dim, theta, kernels

    def cos_sin(self, position_ids, dtype=torch.float32):
        return rope_cos_sin(position_ids, self.head_dim, self.theta, dtype)

    def forward(self, q, k, position_ids=None, cos=None, sin=None):
        if cos is None:
            cos, sin = self.cos_sin(position_ids)
        return get_ops(self.kernels, q.device).rope(q, k, cos, sin)


class SwiGLU(nn.Module):
    def __init__(self, kernels: str = "auto"):
        super().__init__()
        self.kernels = kernels

    def forward(self, gate, up):
        return get_ops(self.kernels, gate.device).swiglu(gate, up)


class FusedLinearCrossEntropy(nn.Module):
    def __init__(self, reduction: str = "sum", ignore_index: int = -100, kernels: str = "auto"):
        super().__init__()
        self.reduction, self.ignore_index, self.kernels = reduction, ignore_index, kernels

    def forward(self, hidden, weight, labels):
        ops = get_ops(self.kernels, hidden.device)
        return ops.fused_linear_cross_entropy(
            hidden, weight, labels, reduction=self.reduction, ignore_index=self.ignore_index
        )


class FusedLinearLogprob(nn.Module):
    def __init__(self, ignore_index: int = -100, kernels: str = "auto"):
        super().__init__()
        self.ignore_index, self.kernels = ignore_index, kernels

    def forward(self, hidden, weight, labels, segment_ids, n_segments):
        ops = get_ops(self.kernels, hidden.device)
        return ops.fused_linear_logprob(hidden, weight, labels, segment_ids, n_segments, ignore_index=self.ignore_index)
