"""Kernel dispatch and every path that runs on CPU without Triton: the reference ops (also
against transformers' own Qwen2 pieces), the chunked PyTorch fused-linear ops against the
materialising references, the nn.Module wrappers, and loud failures for explicit backends."""

from __future__ import annotations

import os

import pytest
import torch

from bumblefast import kernels
from bumblefast.kernels import fused_linear, get_ops, lean
from bumblefast.kernels import reference as R

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
TOL = dict(atol=1e-4, rtol=1e-5)


def test_auto_and_reference_resolve_to_reference_on_cpu():
    for mode in ("auto", "reference"):
        ops = get_ops(mode, "cpu")
        assert set(ops.backends.values()) == {"reference"}
        assert ops.device == "cpu" and ops.mode == mode
    assert get_ops("auto", torch.device("cpu")) is get_ops("auto", "cpu")  # cached


@pytest.mark.skipif(INTERP or torch.cuda.is_available(), reason="Triton can run here")
@pytest.mark.parametrize("mode", ["triton", "liger"])
def test_explicit_backend_that_cannot_run_fails_loudly(mode):
    with pytest.raises(RuntimeError, match=mode):
        get_ops(mode, "cpu")


def test_unknown_mode_rejected():
    with pytest.raises(ValueError, match="auto"):
        get_ops("fast", "cpu")


def test_reference_rope_and_norm_match_transformers():
    from transformers import Qwen2Config
    from transformers.models.qwen2 import modeling_qwen2 as Q

    cfg = Qwen2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6)
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3]])
    x = torch.randn(1, 7, 64)
    cos_hf, sin_hf = Q.Qwen2RotaryEmbedding(config=cfg)(x, pos)
    cos, sin = R.rope_cos_sin(pos[0], 16, 1e6)
    torch.testing.assert_close(cos, cos_hf[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(sin, sin_hf[0], atol=1e-6, rtol=0)
    q, k = torch.randn(7, 4, 16), torch.randn(7, 2, 16)
    q_hf, k_hf = Q.apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos_hf, sin_hf)
    qo, ko = R.rope(q, k, cos, sin)
    torch.testing.assert_close(qo, q_hf[0].transpose(0, 1), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ko, k_hf[0].transpose(0, 1), atol=1e-6, rtol=1e-6)
    norm = Q.Qwen2RMSNorm(64, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
    torch.testing.assert_close(R.rms_norm(x, norm.weight, 1e-6), norm(x), atol=1e-6, rtol=1e-6)


LEAN_TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def _grads(fn, *xs, dy):
    xs = [x.detach().clone().requires_grad_(True) for x in xs]
    y = fn(*xs)
    y.backward(dy)
    return y, [x.grad for x in xs]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_rms_norm_and_swiglu_match_autograd_through_the_reference(dtype):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 9, 48, generator=g).to(dtype)
    w = (1 + 0.3 * torch.randn(48, generator=g)).to(dtype)
    dy = torch.randn(2, 9, 48, generator=g).to(dtype)
    y_lean, g_lean = _grads(lambda a, b: lean.rms_norm(a, b, 1e-6), x, w, dy=dy)
    y_ref, g_ref = _grads(lambda a, b: R.rms_norm(a, b, 1e-6), x, w, dy=dy)
    torch.testing.assert_close(y_lean, y_ref, atol=0, rtol=0)  # the same forward ops
    for a, b in zip(g_lean, g_ref):
        torch.testing.assert_close(a, b, **LEAN_TOL[dtype])
    gate, up = (3 * torch.randn(9, 40, generator=g)).to(dtype), torch.randn(9, 40, generator=g).to(dtype)
    dy = torch.randn(9, 40, generator=g).to(dtype)
    y_lean, g_lean = _grads(lean.swiglu, gate, up, dy=dy)
    y_ref, g_ref = _grads(R.swiglu, gate, up, dy=dy)
    torch.testing.assert_close(y_lean, y_ref, atol=0, rtol=0)
    for a, b in zip(g_lean, g_ref):
        torch.testing.assert_close(a, b, **LEAN_TOL[dtype])


def test_lean_ops_gradcheck_and_frozen_weight():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(5, 12, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(12, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: lean.rms_norm(a, b, 1e-6), (x, w))
    up = torch.randn(5, 12, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lean.swiglu, (x, up))
    frozen = w.detach()  # LoRA: the norm's weight takes no gradient, the input does
    lean.rms_norm(x, frozen, 1e-6).sum().backward()
    assert x.grad is not None and frozen.grad is None


def _swiglu_down_reference(gate, up, w, b):
    return torch.nn.functional.linear(R.swiglu(gate, up), w, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_lean_swiglu_linear_matches_autograd_through_the_reference(dtype, bias):
    g = torch.Generator().manual_seed(9)
    gate, up = (3 * torch.randn(2, 9, 40, generator=g)).to(dtype), torch.randn(2, 9, 40, generator=g).to(dtype)
    w = (0.2 * torch.randn(24, 40, generator=g)).to(dtype)
    b = torch.randn(24, generator=g).to(dtype) if bias else None
    dy = torch.randn(2, 9, 24, generator=g).to(dtype)
    xs = (gate, up, w) + ((b,) if bias else ())
    y_lean, g_lean = _grads(lambda *a: lean.swiglu_linear(*a), *xs, dy=dy)
    y_ref, g_ref = _grads(lambda *a: _swiglu_down_reference(*a, *([] if bias else [None])), *xs, dy=dy)
    torch.testing.assert_close(y_lean, y_ref, atol=0, rtol=0)  # the same forward ops
    for a, r in zip(g_lean, g_ref):
        torch.testing.assert_close(a, r, **LEAN_TOL[dtype])


def test_lean_swiglu_linear_gradcheck_and_frozen_weight():
    g = torch.Generator().manual_seed(10)
    gate, up = (torch.randn(5, 12, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    w = torch.randn(7, 12, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lean.swiglu_linear, (gate, up, w, b))
    frozen = w.detach()  # LoRA elsewhere: the projection takes no gradient, its inputs do
    lean.swiglu_linear(gate, up, frozen).sum().backward()
    assert gate.grad is not None and up.grad is not None and frozen.grad is None


def _saved_bytes(fn, *xs) -> int:
    """Bytes autograd keeps for backward of fn(*xs), counting each storage once."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*xs)
    return sum(seen.values())


def test_lean_ops_keep_one_activation_fewer_for_backward():
    x = torch.randn(64, 96, requires_grad=True)
    w = torch.ones(96, requires_grad=True)
    row, rstd = x.numel() * 4, 64 * 4
    assert _saved_bytes(lambda a, b: R.rms_norm(a, b, 1e-6), x, w) >= 2 * row
    assert _saved_bytes(lambda a, b: lean.rms_norm(a, b, 1e-6), x, w) == row + w.numel() * 4 + rstd
    gate, up = torch.randn(64, 96, requires_grad=True), torch.randn(64, 96, requires_grad=True)
    assert _saved_bytes(R.swiglu, gate, up) == 3 * row
    assert _saved_bytes(lean.swiglu, gate, up) == 2 * row
    w_down = torch.randn(32, 96, requires_grad=True)  # the down projection keeps its input too; fused, not
    assert _saved_bytes(lambda a, b, c: torch.nn.functional.linear(lean.swiglu(a, b), c), gate, up, w_down) == (
        3 * row + w_down.numel() * 4
    )
    assert _saved_bytes(lean.swiglu_linear, gate, up, w_down) == 2 * row + w_down.numel() * 4
    assert get_ops("reference", "cpu").rms_norm is lean.rms_norm
    assert get_ops("auto", "cpu").swiglu is lean.swiglu


def _inputs(T=23, H=16, V=70, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(T, H, generator=g).to(dtype)
    w = (0.5 * torch.randn(V, H, generator=g)).to(dtype)
    y = torch.randint(0, V, (T,), generator=g)
    y[[1, 5, 6]] = -100
    return h, w, y


@pytest.mark.parametrize("chunk", [1, 5, 23, 64, None])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_chunked_linear_ce_matches_reference(chunk, reduction):
    h, w, y = _inputs()
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    a = fused_linear.fused_linear_cross_entropy(h1, w1, y, reduction, chunk_size=chunk)
    b = R.fused_linear_cross_entropy(h2, w2, y, reduction)
    torch.testing.assert_close(a, b, **TOL)
    (2.5 * a).backward()
    (2.5 * b).backward()
    torch.testing.assert_close(h1.grad, h2.grad, **TOL)
    torch.testing.assert_close(w1.grad, w2.grad, **TOL)


def test_chunked_linear_ce_frozen_weight_and_no_grad():
    h, w, y = _inputs(seed=1)
    h1 = h.clone().requires_grad_()
    a = fused_linear.fused_linear_cross_entropy(h1, w, y, chunk_size=4)  # LoRA: frozen lm_head
    a.backward()
    h2 = h.clone().requires_grad_()
    R.fused_linear_cross_entropy(h2, w, y).backward()
    torch.testing.assert_close(h1.grad, h2.grad, **TOL)
    with torch.no_grad():
        torch.testing.assert_close(
            fused_linear.fused_linear_cross_entropy(h, w, y),
            R.fused_linear_cross_entropy(h, w, y),
            **TOL,
        )


def test_chunked_linear_ce_bf16_close_to_fp32_reference():
    h, w, y = _inputs(seed=2, T=40, V=300)
    a = fused_linear.fused_linear_cross_entropy(h.bfloat16(), w.bfloat16(), y, chunk_size=8)
    b = R.fused_linear_cross_entropy(h, w, y)
    torch.testing.assert_close(a, b, atol=0.5, rtol=1e-2)


@pytest.mark.parametrize("chunk", [1, 7, None])
@pytest.mark.parametrize("frozen_weight", [False, True])
def test_chunked_logprob_matches_reference(chunk, frozen_weight):
    h, w, y = _inputs(seed=3)
    seg = torch.repeat_interleave(torch.arange(5), torch.tensor([4, 6, 0, 9, 4]))
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_(not frozen_weight)
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_(not frozen_weight)
    a = fused_linear.fused_linear_logprob(h1, w1, y, seg, 5, chunk_size=chunk)
    b = R.fused_linear_logprob(h2, w2, y, seg, 5)
    assert a.shape == (5,) and a[2] == 0
    torch.testing.assert_close(a, b, **TOL)
    go = torch.tensor([1.0, -2.0, 3.0, 0.5, -0.1])
    a.backward(go)
    b.backward(go)
    torch.testing.assert_close(h1.grad, h2.grad, **TOL)
    if not frozen_weight:
        torch.testing.assert_close(w1.grad, w2.grad, **TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_swiglu_grads_are_the_plain_expression_bit_for_bit(dtype):
    """The in-place SwiGLU gradient forms the plain expression's products in its order: training
    trajectories (the demo's, fp32 on CPU) do not move by a bit."""
    from bumblefast.kernels import lean

    g, u, dy = (torch.randn(64, 96, generator=torch.Generator().manual_seed(i)).to(dtype) for i in range(3))
    d_gate, d_up = lean._swiglu_grads(g, u, dy, True, True)
    gf, uf, dyf = g.float(), u.float(), dy.float()
    s = torch.sigmoid(gf)
    assert torch.equal(d_gate, (dyf * uf * s * (1 + gf * (1 - s))).to(dtype))
    assert torch.equal(d_up, (dyf * (gf * s)).to(dtype))


def test_logprob_under_no_grad_makes_no_gradients(monkeypatch):
    """Scoring (no_grad) with inputs that require grad: the forward computes the log-probs only
    (no eager row gradients for the backward that cannot come) and equals the grad-mode value."""
    h, w, y = _inputs(seed=4)
    seg = torch.repeat_interleave(torch.arange(5), torch.tensor([4, 6, 0, 9, 4]))
    h.requires_grad_()
    want = fused_linear.fused_linear_logprob(h, w, y, seg, 5, chunk_size=7).detach()
    mms = []
    real_mm = torch.Tensor.__matmul__
    monkeypatch.setattr(torch.Tensor, "__matmul__", lambda a, b: mms.append(1) or real_mm(a, b))
    with torch.no_grad():
        got = fused_linear.fused_linear_logprob(h, w, y, seg, 5, chunk_size=7)
    assert len(mms) == -(-int((y != -100).sum()) // 7)  # one logits matmul per chunk, nothing else
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_dispatch_reference_ops_equal_reference_functions():
    ops = get_ops("reference", "cpu")
    h, w, y = _inputs(seed=4)
    seg = torch.zeros(len(y), dtype=torch.long)
    torch.testing.assert_close(ops.fused_linear_cross_entropy(h, w, y), R.fused_linear_cross_entropy(h, w, y), **TOL)
    torch.testing.assert_close(
        ops.fused_linear_logprob(h, w, y, seg, 1), R.fused_linear_logprob(h, w, y, seg, 1), **TOL
    )
    logits = h @ w.t()
    for red in ("sum", "mean", "none"):
        torch.testing.assert_close(ops.cross_entropy(logits, y, reduction=red), R.cross_entropy(logits, y, red))


def test_modules_wrap_the_dispatch():
    x = torch.randn(5, 32)
    norm = kernels.RMSNorm(32, eps=1e-6, kernels="reference")
    torch.testing.assert_close(norm(x), R.rms_norm(x, norm.weight, 1e-6))
    rot = kernels.RotaryEmbedding(8, theta=1e4, kernels="auto")
    pos = torch.tensor([0, 1, 0, 1, 2])
    q, k = torch.randn(5, 4, 8), torch.randn(5, 2, 8)
    cos, sin = R.rope_cos_sin(pos, 8, 1e4)
    for a, b in zip(rot(q, k, pos), R.rope(q, k, cos, sin)):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(kernels.SwiGLU()(x, x), R.swiglu(x, x))
    h, w, y = _inputs(seed=5)
    torch.testing.assert_close(
        kernels.FusedLinearCrossEntropy(reduction="mean")(h, w, y),
        R.fused_linear_cross_entropy(h, w, y, "mean"),
        **TOL,
    )
    seg = torch.arange(len(y)) % 3
    torch.testing.assert_close(
        kernels.FusedLinearLogprob()(h, w, y, seg, 3),
        R.fused_linear_logprob(h, w, y, seg, 3),
        **TOL,
    )


def test_default_chunk_keeps_logits_chunk_near_hidden_size_and_cpu_chunks_big():
    # 1.5B head: hidden 1536, vocab 151936 -> 128-token chunks at 8k tokens (78 MB fp32 each)
    assert fused_linear.default_chunk_size(8192, 1536, 151936) == 128
    assert fused_linear.default_chunk_size(3, 16, 70) == 1
    assert fused_linear.default_chunk_size(100, 64, 32) == 128
    # CPU: also >= the rows of ~256 MiB of fp32 logits (a few-row matmul streams the whole
    # [V, H] weight for little work), a power of two, never more rows than the tokens
    assert fused_linear.default_chunk_size(8192, 1536, 151936, "cpu") == 256
    assert fused_linear.default_chunk_size(2048, 256, 1024, "cpu") == 2048
    assert fused_linear.default_chunk_size(3, 16, 70, "cpu") == 4


def test_bench_kernels_quick_cases_run_in_process(tmp_path):
    """The benchmark's case runner and report writers work (tiny shapes, no subprocesses)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_kernels.py"
    spec = importlib.util.spec_from_file_location("bench_kernels", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    cases = bench.plan_cases("cpu", [64], "float32", quick=True)
    assert {c["impl"] for c in cases} == {"reference", "chunked"}
    recs = [bench.run_case(c) for c in cases if c["op"] in bench.FUSED]
    assert all(r["status"] == "ok" and r["time_ms"] >= 0 for r in recs), recs
    for r in recs:  # in-process RSS deltas are meaningless; the real run uses a subprocess per case
        r["peak_mb"] = 10.0 if r["impl"] == "reference" else 2.0
    summary = bench.summarize(recs)
    assert {s["op"] for s in summary} == set(bench.FUSED)
    assert all(s["memory_ratio"] == 5.0 for s in summary)
    md = bench.to_markdown(dict(device_name="cpu", date="d", dtype="float32", shapes={}, torch="t"), recs, summary)
    assert "| fused_linear_logprob | chunked |" in md


def test_auto_says_why_a_faster_backend_was_not_taken(monkeypatch, capsys):
    """auto on CUDA whose Triton and Liger loading raise: every op falls back to the reference,
    and the reasons (with the exceptions) are recorded and printed in one line; an explicit
    backend that fails to load raises instead."""
    from bumblefast.kernels import dispatch

    def boom(name):
        def fail():
            raise ImportError(f"{name} exploded\ntraceback detail")

        return fail

    monkeypatch.setattr(dispatch, "triton_can_run", lambda device: True)
    monkeypatch.setattr(dispatch, "liger_available", lambda: True)
    monkeypatch.setattr(dispatch, "_triton_ops", boom("triton ops"))
    monkeypatch.setattr(dispatch, "_liger_ops", boom("liger ops"))
    dispatch._resolve.cache_clear()
    try:
        ops = dispatch._resolve("auto", "cuda", False)
        assert set(ops.backends.values()) == {"reference"}
        for op in dispatch.OPS:
            assert "ImportError: triton ops exploded" in ops.reasons[op]
        for op in dispatch.LIGER_OPS:
            assert "ImportError: liger ops exploded" in ops.reasons[op]
        line = capsys.readouterr().err.strip()
        assert line == ops.describe() and "\n" not in line
        assert line.startswith("kernels auto on cuda: reference for rms_norm, rope") and "liger ops exploded" in line
        for mode in ("triton", "liger"):
            with pytest.raises(ImportError, match="exploded"):
                dispatch._resolve(mode, "cuda", False)
    finally:
        dispatch._resolve.cache_clear()


def test_auto_names_the_missing_liger(monkeypatch, capsys):
    from bumblefast.kernels import dispatch

    monkeypatch.setattr(dispatch, "triton_can_run", lambda device: True)
    monkeypatch.setattr(dispatch, "liger_available", lambda: False)
    monkeypatch.setattr(dispatch, "_triton_ops", lambda: {op: (lambda *a: None) for op in dispatch.OPS})
    dispatch._resolve.cache_clear()
    try:
        ops = dispatch._resolve("auto", "cuda", False)
        assert set(ops.backends.values()) == {"triton"}
        assert {ops.reasons[op] for op in dispatch.LIGER_OPS} == {"liger-kernel is not installed"}
        assert ops.reasons["fused_linear_logprob"] == "Liger has none"
        assert "triton for rms_norm" in capsys.readouterr().err
        cpu = dispatch._resolve("auto", "cpu", False)
        assert set(cpu.reasons.values()) == {"auto uses Triton and Liger kernels on CUDA only"}
    finally:
        dispatch._resolve.cache_clear()
