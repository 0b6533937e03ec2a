"""Time and peak memory of each fused op: reference vs Liger vs ours, forward and backward.

Shapes are the 1.5B model's (hidden 1536, 12 heads / 2 KV heads of 128, intermediate 8960,
vocab 151936) at 8k-32k tokens on CUDA. `bumblefast bench kernels --size cpu` (float32) measures
the two fused-linear ops only, at 2048 tokens (~3 min on 2 cores, most of it our chunked
fwd+bwd): on CPU every other op has no impl but the reference, so nothing to compare; its
claims are the peak-memory ratios (at 2048 tokens the reference's [T, V] logits are ~1.2 GB).
Writes ``bench_kernels_<device>_<date>.json`` and ``.md`` to ``--out`` (default
``benchmarks/results/``).

Memory is the peak *above the inputs*:
- CUDA: ``torch.cuda.max_memory_allocated()`` minus the allocation before the call (in-process).
- CPU: one fresh subprocess per case; peak RSS (``ru_maxrss``) minus RSS after the inputs were
  built. Inputs are built in place (``normal_``) so setup never exceeds the baseline.

On CPU the materialising references of the fused-linear ops run forward only: their forward
peak is a lower bound of their forward+backward peak, so the reported ratio
``reference / ours(fwd+bwd)`` understates the saving. CPU-only impls: reference and the
chunked PyTorch path ("chunked"); Triton and Liger need CUDA.

    python benchmarks/bench_kernels.py                 # CPU: every op, 8k tokens, bf16 (long: ~10+ min)
    python benchmarks/bench_kernels.py --quick         # tiny CI smoke run (seconds)
    python benchmarks/bench_kernels.py --tokens 8192,32768 --out $OUT   # CUDA
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from bumblefast.kernels.dispatch import OPS

ROOT = Path(__file__).resolve().parents[1]

SHAPES = dict(hidden=1536, heads=12, kv_heads=2, head_dim=128, inter=8960, vocab=151936)
QUICK_SHAPES = dict(hidden=64, heads=4, kv_heads=2, head_dim=16, inter=96, vocab=1000)
FUSED = ("fused_linear_cross_entropy", "fused_linear_logprob")


def _impl_fn(op: str, impl: str, device: str):
    import torch  # noqa: F401

    from bumblefast.kernels import fused_linear, get_ops
    from bumblefast.kernels import reference as R

    if impl == "reference":
        return getattr(R, op)
    if impl == "chunked":  # our PyTorch chunked path (the CPU training path)
        return {
            "fused_linear_cross_entropy": fused_linear.fused_linear_cross_entropy,
            "fused_linear_logprob": fused_linear.fused_linear_logprob,
        }[op]
    ops = get_ops(impl, device)
    if ops.backends[op] != impl:
        raise RuntimeError(f"{op} has no {impl} implementation (resolves to {ops.backends[op]})")
    return getattr(ops, op)


def _make_inputs(op, tokens, shapes, dtype, device, backward):
    import torch

    g = dict(device=device, dtype=dtype)

    def leaf(*shape, std=1.0):
        return torch.empty(*shape, **g).normal_(0.0, std).requires_grad_(backward)

    T, H, V = tokens, shapes["hidden"], shapes["vocab"]
    if op == "rms_norm":
        return (leaf(T, H), torch.ones(H, **g).requires_grad_(backward), 1e-6)
    if op == "rope":
        from bumblefast.kernels.reference import rope_cos_sin

        pos = torch.arange(T, device=device) % 2048  # 2k-token documents
        cos, sin = rope_cos_sin(pos, shapes["head_dim"], 1e6, dtype)
        return (
            leaf(T, shapes["heads"], shapes["head_dim"]),
            leaf(T, shapes["kv_heads"], shapes["head_dim"]),
            cos,
            sin,
        )
    if op == "swiglu":
        return (leaf(T, shapes["inter"]), leaf(T, shapes["inter"]))
    labels = torch.randint(0, V, (T,), device=device)
    if op == "cross_entropy":
        return (leaf(T, V), labels)
    hidden, weight = leaf(T, H), leaf(V, H, std=0.02)
    if op == "fused_linear_cross_entropy":
        return (hidden, weight, labels)
    seg = torch.arange(T, device=device) // 512  # 512-token segments, as DPO pairs
    return (hidden, weight, labels, seg, int(T // 512 + 1))


def _call(op, fn, args, backward):

    out = fn(*args)
    if backward:
        outs = out if isinstance(out, tuple) else (out,)
        loss = sum(o.float().sum() for o in outs)
        loss.backward()
    return out


def run_case(case: dict) -> dict:
    """One measurement; on CPU call in a fresh process (see ``--case``)."""
    import torch

    op, impl, device = case["op"], case["impl"], case["device"]
    backward = case["pass"] == "fwd+bwd"
    dtype = getattr(torch, case["dtype"])
    shapes = QUICK_SHAPES if case.get("quick") else SHAPES
    rec = dict(case)
    try:
        fn = _impl_fn(op, impl, device)
        torch.manual_seed(0)
        args = _make_inputs(op, case["tokens"], shapes, dtype, device, backward)
        ctx = torch.enable_grad() if backward else torch.no_grad()
        with ctx:
            if device == "cuda":
                for _ in range(case.get("warmup", 2)):
                    _call(op, fn, args, backward)
                    for a in args:
                        if torch.is_tensor(a):
                            a.grad = None
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                times = []
                for _ in range(case.get("iters", 5)):
                    t0 = time.perf_counter()
                    _call(op, fn, args, backward)
                    torch.cuda.synchronize()
                    times.append(time.perf_counter() - t0)
                    for a in args:
                        if torch.is_tensor(a):
                            a.grad = None
                rec["peak_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
                rec["time_ms"] = 1e3 * sorted(times)[len(times) // 2]
            else:
                import psutil

                base = psutil.Process().memory_info().rss
                t0 = time.perf_counter()
                _call(op, fn, args, backward)
                rec["time_ms"] = 1e3 * (time.perf_counter() - t0)
                rec["peak_mb"] = max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base) / 2**20
        rec["status"] = "ok"
    except torch.cuda.OutOfMemoryError:
        rec["status"] = "oom"
    except Exception as e:  # noqa: BLE001 - a failing impl is a result, not a crash
        rec["status"] = f"error: {type(e).__name__}: {str(e)[:200]}"
    finally:
        if device == "cuda":
            torch.cuda.empty_cache()
    return rec


def _run_subprocess(case: dict, timeout: int) -> dict:
    # Each case is timed alone, so it gets every core: set, not setdefault, because
    # `bench all` imports bench_prep first and that pins OMP_NUM_THREADS=1 in this process.
    env = dict(os.environ, OMP_NUM_THREADS=str(case["threads"]))
    try:
        proc = subprocess.run(
            [sys.executable, __file__, "--case", json.dumps(case)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
    except subprocess.TimeoutExpired:
        return dict(case, status=f"timeout after {timeout}s")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return dict(case, status=f"crashed rc={proc.returncode}: {proc.stderr[-300:]}")


def plan_cases(device: str, tokens_list, dtype: str, quick: bool) -> list[dict]:
    have_liger = False
    if device == "cuda":
        from bumblefast.kernels import liger_available

        have_liger = liger_available()
    cases = []
    for tokens in tokens_list:
        for op in OPS:
            if device == "cuda":
                impls = ["reference", "triton"] + (["liger"] if have_liger and op != "fused_linear_logprob" else [])
                if op in FUSED:
                    impls.insert(1, "chunked")
            else:
                impls = ["reference"] + (["chunked"] if op in FUSED else [])
            for impl in impls:
                passes = ["fwd", "fwd+bwd"]
                if device == "cpu" and not quick:
                    # keep the 2-core run to minutes: materialising refs forward only (a lower
                    # bound of their fwd+bwd peak), ours forward+backward (the training cost)
                    passes = ["fwd"] if (op in FUSED and impl == "reference") else ["fwd+bwd"]
                t = tokens
                if device == "cpu" and op == "cross_entropy" and not quick:
                    t = min(tokens, 1024)  # its *input* is the [T, V] logits
                for p in passes:
                    cases.append(
                        dict(
                            op=op,
                            impl=impl,
                            tokens=t,
                            dtype=dtype,
                            device=device,
                            quick=quick,
                            threads=os.cpu_count() or 1,
                            **{"pass": p},
                        )
                    )
    return cases


def summarize(records: list[dict]) -> list[dict]:
    """Peak-memory ratio reference / ours for the fused-linear ops, per token count."""
    out = []
    for op in FUSED:
        for tokens in sorted({r["tokens"] for r in records if r["op"] == op}):
            rs = [r for r in records if r["op"] == op and r["tokens"] == tokens and r["status"] == "ok"]
            refs = [r for r in rs if r["impl"] == "reference"]
            if not refs:
                continue
            ref = max(refs, key=lambda r: r["pass"] == "fwd+bwd")
            for r in rs:
                if r["impl"] != "reference" and r["pass"] == "fwd+bwd" and r["peak_mb"] > 0:
                    out.append(
                        dict(
                            op=op,
                            tokens=tokens,
                            ours=r["impl"],
                            reference_pass=ref["pass"],
                            reference_peak_mb=round(ref["peak_mb"], 1),
                            ours_peak_mb=round(r["peak_mb"], 1),
                            memory_ratio=round(ref["peak_mb"] / r["peak_mb"], 2),
                        )
                    )
    return out


def to_markdown(meta: dict, records: list[dict], summary: list[dict]) -> str:
    lines = [
        f"# bench_kernels: {meta['device_name']} ({meta['date']})",
        "",
        f"dtype {meta['dtype']}, shapes {meta['shapes']}, torch {meta['torch']}, "
        f"{records[0].get('threads', '?') if records else '?'} intra-op threads per CPU case",
        "",
        *(
            [f"**Partial: {meta['cases_done']} of {meta['cases_planned']} cases** (the run stopped early).", ""]
            if meta.get("cases_done", 0) < meta.get("cases_planned", 0)
            else []
        ),
        "Peak MB is the peak above the inputs (CUDA: max_memory_allocated; CPU: peak RSS in a "
        "fresh process per case). On CPU the materialising references of the fused-linear ops "
        "run forward only, a lower bound of their fwd+bwd peak, so the ratios below understate "
        "the saving; CPU cross_entropy is capped at 1024 tokens (its input is the [T, V] logits). "
        "impl `chunked` is our PyTorch chunked path, `triton` our Triton kernels.",
        "",
        "| op | impl | pass | tokens | time ms | peak MB | status |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in records:
        t = f"{r['time_ms']:.1f}" if "time_ms" in r else "-"
        m = f"{r['peak_mb']:.1f}" if "peak_mb" in r else "-"
        lines.append(f"| {r['op']} | {r['impl']} | {r['pass']} | {r['tokens']} | {t} | {m} | {r['status']} |")
    if summary:
        lines += [
            "",
            "## Peak memory: materialised logits / fused (fwd+bwd)",
            "",
            "| op | tokens | ours | reference pass | reference MB | ours MB | ratio |",
            "|---|---|---|---|---|---|---|",
        ]
        for s in summary:
            lines.append(
                f"| {s['op']} | {s['tokens']} | {s['ours']} | {s['reference_pass']} | "
                f"{s['reference_peak_mb']} | {s['ours_peak_mb']} | {s['memory_ratio']}x |"
            )
    return "\n".join(lines) + "\n"


def measure(
    device: str, tokens_list, dtype: str, quick: bool, ops=OPS, timeout: int = 600, on_record=None
) -> list[dict]:
    """Every planned case in turn; ``on_record(records, n_planned)`` after each one (main writes
    the JSON there, so a run stopped by a timeout keeps the cases it finished)."""
    cases = [c for c in plan_cases(device, tokens_list, dtype, quick) if c["op"] in set(ops)]
    records = []
    for c in cases:
        t0 = time.time()
        r = run_case(c) if device == "cuda" else _run_subprocess(c, timeout)
        records.append(r)
        if on_record is not None:
            on_record(records, len(cases))
        print(
            f"{r['op']:28s} {r['impl']:10s} {r['pass']:8s} T={r['tokens']:<6d} "
            f"{r.get('time_ms', float('nan')):10.1f} ms {r.get('peak_mb', float('nan')):10.1f} MB "
            f"{r['status']} ({time.time() - t0:.0f}s)",
            file=sys.stderr,
            flush=True,
        )
    return records


SIZES = {  # tokens per case, shapes
    "min": dict(tokens=[256], quick=True, ops=FUSED),
    # cpu: the fused-linear ops only (the rest have no CPU impl but the reference: no comparison),
    # 2048 tokens: the chunked fwd+bwd at the 1.5B vocab is ~2.5 min on 2 cores
    "cpu": dict(tokens=[2048], quick=False, ops=FUSED),
    "gpu": dict(tokens=[8192, 32768], quick=False, ops=OPS),
}


def bench(size: str, workdir: Path) -> dict:
    """`bumblefast bench kernels`: the section described in benchmarks/benchlib.py. Ratios:
    peak memory of the materialising reference / ours for the fused-linear ops, and time of
    every other impl vs the reference (and vs Liger on CUDA) where both ran the same pass."""
    import benchlib as BL
    import torch

    device = "cuda" if size == "gpu" and torch.cuda.is_available() else "cpu"
    z = SIZES[size]
    dtype = "bfloat16" if device == "cuda" else "float32"
    records = measure(device, z["tokens"], dtype, z["quick"], z["ops"])
    bad = [r for r in records if r["status"] not in ("ok", "oom")]
    if bad:
        raise RuntimeError(
            "bench kernels: cases failed: " + "; ".join(f"{r['op']}/{r['impl']}: {r['status']}" for r in bad)
        )
    ok = [r for r in records if r["status"] == "ok"]
    ratios, points = [], []
    for s in summarize(ok):
        ratios.append(
            BL.ratio(
                f"{s['op']} peak memory, T={s['tokens']} (reference {s['reference_pass']})",
                BL.memory(f"{s['ours']} fwd+bwd", s["ours_peak_mb"]),
                BL.memory(f"reference {s['reference_pass']}", s["reference_peak_mb"]),
            )
        )

    def rate(r: dict) -> dict:
        return BL.measured(f"{r['impl']} {r['pass']}", r["tokens"], r["time_ms"] / 1e3)

    for r in ok:
        if r["impl"] in ("reference", "liger"):
            continue
        for base in ("reference", "liger"):
            match = [
                b
                for b in ok
                if b["impl"] == base and b["op"] == r["op"] and b["pass"] == r["pass"] and b["tokens"] == r["tokens"]
            ]
            if match:
                ratios.append(
                    BL.ratio(f"{r['op']} {r['impl']} vs {base}, {r['pass']}, T={r['tokens']}", rate(r), rate(match[0]))
                )
        if r["pass"] == "fwd+bwd":
            points.append(
                BL.point(f"{r['op']} {r['impl']} fwd+bwd T={r['tokens']}", r["tokens"] / (r["time_ms"] / 1e3))
            )
    meta = dict(
        device=device,
        dtype=dtype,
        shapes=QUICK_SHAPES if z["quick"] else SHAPES,
        tokens=z["tokens"],
        threads=records[0]["threads"] if records else torch.get_num_threads(),  # per CPU case
    )
    notes = (
        []
        if device == "cuda"
        else [
            "CPU: Triton and Liger need CUDA, so CPU compares our chunked PyTorch path with the "
            "materialising reference; the reference of the fused-linear ops runs forward only "
            "(a lower bound of its peak), and CPU times are single calls"
        ]
    )
    return {
        "config": {"size": size, **meta},
        "results": {"cases": records, "notes": notes},
        "ratios": ratios,
        "points": points,
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--tokens", default=None, help="comma list; default 8192 (CPU), 8192,32768 (CUDA)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--device", default=None, choices=["cpu", "cuda"])
    ap.add_argument("--quick", action="store_true", help="tiny shapes, seconds; for CI")
    ap.add_argument("--ops", default=",".join(OPS))
    ap.add_argument("--timeout", type=int, default=600, help="per CPU case, seconds")
    ap.add_argument("--case", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))), flush=True)
        return 0

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    default_tokens = "256" if args.quick else ("8192,32768" if device == "cuda" else "8192")
    tokens_list = [int(t) for t in (args.tokens or default_tokens).split(",")]
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    meta = dict(
        date=dt.datetime.now().strftime("%Y-%m-%d"),
        device=device,
        device_name=name,
        dtype=args.dtype,
        shapes=QUICK_SHAPES if args.quick else SHAPES,
        torch=torch.__version__,
        quick=args.quick,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"bench_kernels_{'quick_' if args.quick else ''}{device}_{meta['date']}"

    def write(records: list[dict], planned: int) -> None:
        """The JSON and table of the cases done so far (rewritten after every case)."""
        meta.update(cases_done=len(records), cases_planned=planned)
        meta["threads"] = records[0]["threads"] if records else torch.get_num_threads()  # per CPU case
        summary = summarize(records)
        (out / f"{stem}.json").write_text(json.dumps(dict(meta=meta, results=records, memory_ratios=summary), indent=2))
        (out / f"{stem}.md").write_text(to_markdown(meta, records, summary))

    records = measure(device, tokens_list, args.dtype, args.quick, args.ops.split(","), args.timeout, on_record=write)
    if not records:
        write(records, 0)
    summary = summarize(records)
    for s in summary:
        print(
            f"memory {s['op']} T={s['tokens']}: reference {s['reference_peak_mb']} MB / "
            f"{s['ours']} {s['ours_peak_mb']} MB = {s['memory_ratio']}x"
        )
    print(f"wrote {out / stem}.json and .md")
    bad = [r for r in records if r["status"] not in ("ok", "oom")]
    return 1 if bad else 0


if __name__ == "__main__":
    # bumblefast must be importable (pip install -e . or benchmarks/gpu/run.sh's package dir)
    sys.exit(main())
