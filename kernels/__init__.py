"""Fused kernels: Triton ops, their PyTorch references, and the per-device dispatch.

``get_ops(mode, device)`` is the entry point (see :mod:`.dispatch`); ``reference`` holds the
plain-PyTorch baselines used by tests and benchmarks; ``fused_linear`` the chunked
fused-linear ops. Triton modules (``triton_*``) are imported lazily, only when a Triton path
is selected, so importing this package never imports triton.
"""

from . import fused_linear, reference
from .dispatch import MODES, KernelOps, get_ops, liger_available
from .modules import (
    FusedLinearCrossEntropy,
    FusedLinearLogprob,
    RMSNorm,
    RotaryEmbedding,
    SwiGLU,
)

__all__ = [
    "MODES",
    "FusedLinearCrossEntropy",
    "FusedLinearLogprob",
    "KernelOps",
    "RMSNorm",
    "RotaryEmbedding",
    "SwiGLU",
    "fused_linear",
    "get_ops",
    "liger_available",
    "reference",
]
