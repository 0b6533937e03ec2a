"""Fused kernels: Triton ops, their PyTorch references, and the per-device dispatch.

``get_ops(mode, device)`` is the entry point (see :mod:`.dispatch`); ``reference`` holds the
plain-PyTorch baselines used by tests and benchmarks; ``fused_linear`` the chunked
fused-linear ops. Triton modules (``triton_*``) are imported lazily, only when a Triton path
is selected, so importing this package never imports triton.
"""

if __name__ != "bumblefast.kernels":  # this folder imported by its own name, e.g. from the checkout root
    raise ImportError(
        f"{__file__}: this folder is the package bumblefast.kernels; import it by that name "
        "(as a top-level `kernels` it would load a second copy of every module in it)"
    )

from . import fused_linear, reference  # noqa: E402
from .dispatch import MODES, KernelOps, get_ops, liger_available  # noqa: E402
from .modules import (  # noqa: E402
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
