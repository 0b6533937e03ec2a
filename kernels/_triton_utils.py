"""Small helpers shared by the Triton kernels (launch sizes, interpreter detection)."""

from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_can_run(device: torch.device | str) -> bool:
    """Whether a Triton kernel can launch on ``device`` in this process."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return False
        return True
    return device.type == "cpu" and interpreting()


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def num_programs(device: torch.device, work: int) -> int:
    """Persistent-grid size: a few programs per SM on CUDA, a handful in the interpreter."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(work, 4 * sms))
    return max(1, min(work, 4))
