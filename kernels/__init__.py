"""Fused kernels: Triton ops, their PyTorch references, and the per-device dispatch.

``get_ops(mode, device)`` is the entry point (see :mod:`.dispatch`); ``reference`` holds the
plain-PyTorch baselines used by tests and benchmarks; ``fused_linear`` the chunked
fused-linear ops. Triton modules (``triton_*``) are imported lazily, only when a Triton path
is selected, so importing this package never imports triton.
"""

if __name__ == "kernels":
    # The checkout root on sys.path (`python -m ...`, pytest from the root) and transformers >= 5, which
    # probes Hugging Face's `kernels` package by importing it: hand out this package itself, one module
    # object (no copies); it has no __version__, which transformers reads as "HF kernels not installed".
    import importlib
    import sys

    sys.modules[__name__] = importlib.import_module("bumblefast.kernels")
elif __name__ != "bumblefast.kernels":  # this folder imported by its own name, e.g. from the checkout root
    raise ImportError(
        f"{__file__}: this folder is the package bumblefast.kernels; import it by that name "
        "(as a top-level `kernels` it would load a second copy of every module in it)"
    )
else:
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
