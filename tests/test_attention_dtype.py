"""The attention backend follows the compute dtype (autocast's, else the weights'), and the
model's label is the backend its forward actually ran.

The bug this guards against: fp32 weights under bf16 autocast give an fp32 embedding output,
the backend was resolved from that, so CUDA ran the per-document SDPA fallback while the
benchmark printed the flash/varlen name. No GPU is needed: the resolution rule is a pure
function of (device type, dtype, what is installed), fed here the dtypes autocast produces."""

from __future__ import annotations

import pytest
import torch
from test_model import make_model, tiny_config

from bumblefast import attention as A
from bumblefast import model as M

HALF = (torch.bfloat16, torch.float16)


@pytest.mark.parametrize("amp", HALF)
def test_compute_dtype_is_autocasts_even_with_fp32_weights(amp):
    cpu = torch.device("cpu")
    assert A.compute_dtype(cpu, torch.float32) == torch.float32
    with torch.autocast("cpu", dtype=amp):
        assert A.compute_dtype(cpu, torch.float32) == amp
        # what a linear layer really yields under this autocast: the dtype the rule must see
        assert torch.nn.Linear(4, 4)(torch.ones(2, 4)).dtype == amp


@pytest.mark.parametrize("amp", HALF)
def test_cuda_rule_takes_the_fast_kernels_for_autocast_dtypes(amp):
    with torch.autocast("cpu", dtype=amp):
        dtype = A.compute_dtype(torch.device("cpu"), torch.float32)
    assert A.choose_backend("auto", "cuda", dtype, flash=True, varlen=True) == "flash"
    assert A.choose_backend("auto", "cuda", dtype, flash=False, varlen=True) == "varlen"
    assert A.choose_backend("auto", "cuda", dtype, flash=False, varlen=False) == "sdpa"
    # plain fp32 compute has no flash kernel: the fallback, and the label must say so
    assert A.choose_backend("auto", "cuda", torch.float32, flash=True, varlen=True) == "sdpa"
    assert A.choose_backend("auto", "cpu", dtype, flash=True, varlen=True) == "sdpa"
    with pytest.raises(RuntimeError, match="needs CUDA"):
        A.choose_backend("varlen", "cpu", dtype, flash=False, varlen=True)


def _spy(monkeypatch, choice: str):
    """Record the dtype the model resolves with and the q dtype the chosen kernel receives;
    resolve to `choice` (a backend that runs on CPU), as the CUDA rule would to a fast one."""
    seen = {"resolved": [], "ran": []}

    def resolve(backend, device, dtype=None):
        seen["resolved"].append(dtype)
        return choice

    kernel = A.ATTENTION[choice]

    def run(q, k, v, plan):
        seen["ran"].append((plan.backend, q.dtype, k.dtype, v.dtype))
        return kernel(q, k, v, plan)

    monkeypatch.setattr(M, "resolve_backend", resolve)
    monkeypatch.setitem(A.ATTENTION, choice, run)
    return seen


@pytest.mark.parametrize(
    ("weights", "amp", "want"),
    [
        (torch.float32, None, torch.float32),
        (torch.float32, torch.bfloat16, torch.bfloat16),  # the benchmark's case
        (torch.bfloat16, None, torch.bfloat16),  # DeepSpeed bf16: the weights are bf16
    ],
)
def test_model_resolves_with_the_compute_dtype_and_labels_what_ran(monkeypatch, weights, amp, want):
    model = make_model(tiny_config()).to(weights)
    seen = _spy(monkeypatch, "sdpa_mask")
    ids = torch.randint(0, 96, (20,))
    cu = torch.tensor([0, 7, 20], dtype=torch.int32)
    with torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
        model(ids, cu_seqlens=cu)
    assert seen["resolved"] == [want]
    # every layer ran the resolved kernel on inputs of the resolved dtype
    assert seen["ran"] == [("sdpa_mask", want, want, want)] * len(model.model.layers)


def test_backend_is_resolved_per_forward_by_its_compute_dtype(monkeypatch):
    """The backend is chosen per forward, not fixed at construction: fp32, then bf16 autocast,
    run different kernels, and resolved_attn (benchmark labels) names the one that ran."""
    model = make_model(tiny_config())
    ran = []

    def resolve(backend, device, dtype=None):  # the CUDA rule with varlen installed, on CPU kernels
        return "sdpa_mask" if dtype in HALF else "sdpa"

    for name in ("sdpa", "sdpa_mask"):

        def run(q, k, v, plan, _kernel=A.ATTENTION[name]):
            ran.append(plan.backend)
            return _kernel(q, k, v, plan)

        monkeypatch.setitem(A.ATTENTION, name, run)
    monkeypatch.setattr(M, "resolve_backend", resolve)
    ids = torch.randint(0, 96, (12,))
    model(ids)
    assert set(ran) == {"sdpa"} and model.resolved_attn("cpu", torch.float32) == "sdpa"
    ran.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(ids)
    assert set(ran) == {"sdpa_mask"} and model.resolved_attn("cpu", torch.bfloat16) == "sdpa_mask"


def test_refused_backends_say_why_a_faster_one_was_not_taken(monkeypatch):
    """gpu_env.json's attention entry (issue 26): the backend chosen and, per faster one, why not."""
    cuda = torch.device("cuda")  # a device object only: resolution needs no GPU
    monkeypatch.setattr(A, "flash_attn_available", lambda: False)
    monkeypatch.setattr(A, "_varlen_fn", lambda: object())
    assert A.resolve_backend("auto", cuda, torch.bfloat16) == "varlen"
    assert A.refused_backends(cuda, torch.bfloat16) == {"flash": "flash-attn is not installed"}
    monkeypatch.setattr(A, "_varlen_fn", lambda: None)
    assert A.refused_backends(cuda, torch.bfloat16) == {
        "flash": "flash-attn is not installed",
        "varlen": "torch.nn.attention.varlen is missing (torch < 2.10)",
    }
    monkeypatch.setattr(A, "flash_attn_available", lambda: True)
    assert A.refused_backends(cuda, torch.bfloat16) == {}
    assert A.refused_backends(cuda, torch.float32) == {
        "flash": "no torch.float32 kernels",
        "varlen": "no torch.float32 kernels",
    }
    assert A.refused_backends(torch.device("cpu"), torch.bfloat16) == {"flash": "needs CUDA", "varlen": "needs CUDA"}
