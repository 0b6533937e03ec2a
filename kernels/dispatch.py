"""Pick an implementation per op and device: Liger-Kernel, our Triton kernels, or PyTorch.

``get_ops(mode, device)`` returns a :class:`KernelOps` with one callable per op:

==========================  ==========================  =======================  ==========
op                          auto / liger on CUDA         triton                   reference
==========================  ==========================  =======================  ==========
rms_norm                    Liger                        own Triton               PyTorch
rope                        Liger                        own Triton               PyTorch
swiglu                      Liger                        own Triton               PyTorch
cross_entropy               Liger                        own Triton               PyTorch
fused_linear_cross_entropy  Liger                        own chunked + Triton     chunked PyTorch
fused_linear_logprob        own chunked + Triton (*)     own chunked + Triton     chunked PyTorch
==========================  ==========================  =======================  ==========

(*) Liger has no packed per-segment log-prob, so ``liger`` uses ours for it.
Liger works in place where it can: its rope rotates q/k in place and its cross_entropy
writes the gradient into the logits; pass clones if the inputs are needed afterwards.

``reference`` mode is plain PyTorch and runs anywhere; its fused-linear ops are the chunked
PyTorch implementations (at most one chunk of the ``[T, V]`` logits, ~256 MiB on CPU), its
rms_norm and swiglu the autograd Functions of :mod:`.lean` (same forward, one activation
fewer kept for backward; with the lean swiglu the model's MLP also fuses it into down_proj,
:func:`.lean.swiglu_linear`); the composed baselines live in :mod:`bumblefast.kernels.reference`.

``auto`` falls back (CUDA: Liger -> own Triton -> reference; CPU: reference). An explicitly
requested ``liger`` or ``triton`` that cannot run on the device raises ``RuntimeError``. On
CPU, Triton kernels run only in the interpreter (``TRITON_INTERPRET=1``, tests only).

Autocast: the own Triton Functions (rms_norm, rope, swiglu, cross_entropy) run no matmul and
follow their inputs' dtypes; they carry ``torch.amp.custom_fwd/custom_bwd(device_type="cuda")``
so a backward runs in its forward's autocast state, as Liger's do. The fused-linear Functions
fix their compute dtype in forward themselves (see :mod:`.fused_linear`), on any device.

Nothing falls back silently: ``KernelOps.reasons`` says, per op, why a faster backend was
not taken (not installed, no CUDA, or the exception its loading raised), and the first
resolution of a (mode, device) prints one line on rank 0, e.g.
``kernels auto on cuda: liger for rms_norm, ...; triton for fused_linear_logprob (Liger has
none)``.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from bumblefast.labels import IGNORE_INDEX

from . import fused_linear, lean, reference
from ._triton_utils import interpreting, triton_can_run

MODES = ("auto", "liger", "triton", "reference")


def liger_available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


@dataclass(frozen=True)
class KernelOps:
    """The op table the model calls; ``backends`` names what each op resolved to and
    ``reasons`` why a faster backend was not taken (absent when none exists)."""

    mode: str
    device: str
    rms_norm: Callable
    rope: Callable
    swiglu: Callable
    cross_entropy: Callable
    fused_linear_cross_entropy: Callable
    fused_linear_logprob: Callable
    backends: dict = field(default_factory=dict)
    reasons: dict = field(default_factory=dict)

    def describe(self) -> str:
        """One line: which backend each op uses and why a faster one was not taken."""
        groups: dict[tuple[str, str], list[str]] = {}
        for op in OPS:
            groups.setdefault((self.backends[op], self.reasons.get(op, "")), []).append(op)
        parts = [
            f"{backend} for {', '.join(ops)}" + (f" ({why})" if why else "") for (backend, why), ops in groups.items()
        ]
        return f"kernels {self.mode} on {self.device}: " + "; ".join(parts)


# ---------------------------------------------------------------------------- reference


def _ref_flce(hidden, weight, labels, reduction="sum", ignore_index=IGNORE_INDEX, chunk_size=None):
    return fused_linear.fused_linear_cross_entropy(
        hidden, weight, labels, reduction, ignore_index, chunk_size, impl="torch"
    )


def _ref_logprob(hidden, weight, labels, segment_ids, n_segments, ignore_index=IGNORE_INDEX, chunk_size=None):
    return fused_linear.fused_linear_logprob(
        hidden, weight, labels, segment_ids, n_segments, ignore_index, chunk_size, impl="torch"
    )


# ---------------------------------------------------------------------------- own Triton


def _triton_ops() -> dict:
    from . import triton_cross_entropy, triton_rms_norm, triton_rope, triton_swiglu

    def flce(hidden, weight, labels, reduction="sum", ignore_index=IGNORE_INDEX, chunk_size=None):
        return fused_linear.fused_linear_cross_entropy(
            hidden, weight, labels, reduction, ignore_index, chunk_size, impl="triton"
        )

    def logprob(hidden, weight, labels, segment_ids, n_segments, ignore_index=IGNORE_INDEX, chunk_size=None):
        return fused_linear.fused_linear_logprob(
            hidden, weight, labels, segment_ids, n_segments, ignore_index, chunk_size, impl="triton"
        )

    return dict(
        rms_norm=triton_rms_norm.rms_norm,
        rope=triton_rope.rope,
        swiglu=triton_swiglu.swiglu,
        cross_entropy=triton_cross_entropy.cross_entropy,
        fused_linear_cross_entropy=flce,
        fused_linear_logprob=logprob,
    )


# ---------------------------------------------------------------------------- Liger


def _liger_ops() -> dict:
    from liger_kernel.transformers import functional as LF

    def rms_norm(x, weight, eps=1e-6):
        return LF.liger_rms_norm(x, weight, eps, offset=0.0, casting_mode="llama", in_place=False)

    def rope(q, k, cos, sin):
        # Liger wants [B, H, S, D]; a [T, H, D] packed stream is batch 1 with S = T.
        qo, ko = LF.liger_rope(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos[None], sin[None])
        return qo[0].transpose(0, 1), ko[0].transpose(0, 1)

    def swiglu(gate, up):
        return LF.liger_swiglu(gate, up)

    def cross_entropy(logits, labels, reduction="sum", ignore_index=IGNORE_INDEX):
        return LF.liger_cross_entropy(logits, labels, ignore_index=ignore_index, reduction=reduction)

    def flce(hidden, weight, labels, reduction="sum", ignore_index=IGNORE_INDEX, chunk_size=None):
        # accum_dtype: the [V, H] weight gradient summed over ~64 chunks in fp32 (its default
        # keeps the weight's dtype: a bf16 sum under DeepSpeed bf16), as our own FLCE does
        return LF.liger_fused_linear_cross_entropy(
            hidden, weight, labels, ignore_index=ignore_index, reduction=reduction, accum_dtype=torch.float32
        )

    return dict(
        rms_norm=rms_norm,
        rope=rope,
        swiglu=swiglu,
        cross_entropy=cross_entropy,
        fused_linear_cross_entropy=flce,
    )


OPS = (  # the op table's names, in the order benchmarks report them
    "rms_norm",
    "rope",
    "swiglu",
    "cross_entropy",
    "fused_linear_cross_entropy",
    "fused_linear_logprob",
)


def _reference_table() -> dict:
    return dict(
        rms_norm=lean.rms_norm,
        rope=reference.rope,
        swiglu=lean.swiglu,
        cross_entropy=reference.cross_entropy,
        fused_linear_cross_entropy=_ref_flce,
        fused_linear_logprob=_ref_logprob,
    )


LIGER_OPS = OPS[:5]  # Liger has no packed per-segment log-prob


def _failed(what: str, e: Exception) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{what} failed to load: {type(e).__name__}: {first}"[:300]


@functools.cache
def _resolve(mode: str, device_type: str, interpret: bool) -> KernelOps:
    ops = _build(mode, device_type)
    if os.environ.get("RANK", "0") == "0":
        print(ops.describe(), file=sys.stderr, flush=True)
    return ops


def _build(mode: str, device_type: str) -> KernelOps:
    device = torch.device(device_type)
    table, backends = _reference_table(), dict.fromkeys(OPS, "reference")
    reasons: dict[str, str] = {}

    def use(ops: dict, name: str):
        for op, fn in ops.items():
            table[op] = fn
            backends[op] = name
            reasons.pop(op, None)

    def why(ops, reason: str):
        for op in ops:
            reasons[op] = reason

    if mode == "reference":
        why(OPS, "kernels='reference' was asked for")
    elif mode == "triton":
        if not triton_can_run(device):
            raise RuntimeError(
                f"kernels='triton' cannot run on device {device_type!r}: Triton needs CUDA "
                "(or TRITON_INTERPRET=1 on CPU, for tests). Use kernels='auto' or 'reference'."
            )
        use(_triton_ops(), "triton")
    elif mode == "liger":
        if not liger_available():
            raise RuntimeError(
                "kernels='liger' but liger-kernel is not installed; pip install liger-kernel or use kernels='auto'."
            )
        if not triton_can_run(device):
            raise RuntimeError(
                f"kernels='liger' cannot run on device {device_type!r}: Liger's Triton kernels "
                "need CUDA. Use kernels='auto' or 'reference'."
            )
        use(_triton_ops(), "triton")  # logprob has no Liger equivalent
        use(_liger_ops(), "liger")
        why(OPS[5:], "Liger has none")
    elif mode == "auto":
        if device.type != "cuda":
            why(OPS, "auto uses Triton and Liger kernels on CUDA only")
        elif not triton_can_run(device):
            why(OPS, "triton is not installed")
        else:
            try:
                use(_triton_ops(), "triton")
            except Exception as e:  # noqa: BLE001 - auto falls back to the reference, and says why
                why(OPS, _failed("own Triton kernels", e))
            if not liger_available():
                why(
                    [op for op in LIGER_OPS if backends[op] == "triton"],
                    "liger-kernel is not installed",
                )
            else:
                try:
                    use(_liger_ops(), "liger")
                except Exception as e:  # noqa: BLE001 - same
                    for op in LIGER_OPS:  # keep the Triton failure, if any, beside this one
                        reasons[op] = "; ".join(filter(None, [reasons.get(op), _failed("Liger", e)]))
            if backends[OPS[5]] == "triton":
                why(OPS[5:], "Liger has none")
    else:
        raise ValueError(f"kernels must be one of {MODES}, got {mode!r}")
    return KernelOps(mode=mode, device=device_type, backends=backends, reasons=reasons, **table)


def get_ops(mode: str = "auto", device: torch.device | str = "cpu") -> KernelOps:
    """The op table for ``mode`` in ``auto|liger|triton|reference`` on ``device``."""
    if mode not in MODES:
        raise ValueError(f"kernels must be one of {MODES}, got {mode!r}")
    return _resolve(mode, torch.device(device).type, interpreting())
