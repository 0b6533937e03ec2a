"""Where a training step's time goes: the profile a missed MFU or GEMM-rate share needs.

On CPU the sampler is `perf` from outside the process when it can attach: torch.profiler
allocates in the process it profiles, so its steps fault in pages the timed steps do not and
every op that writes a fresh tensor looks several times dearer than it is (docs/LOG.md, issue
29, sessions 9-10). perf reads no Python and keeps no state in the process; its shares are of
CPU samples over the profiled steps, by the function they landed in, so the GEMMs that CPU
flash attention runs internally count as matmul. Without perf (or on CUDA) torch.profiler's
self time, as before."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

MATMUL = ("mm", "gemm", "linear", "matmul", "cutlass", "sm90_xmma", "nvjet")  # op names, torch.profiler
ATTENTION = ("flash", "attention", "sdpa", "fmha")
PERF_HZ = 499
# perf report --stdio -n --sort dso,sym: "  84.26%  20636  libtorch_cpu.so  [.] mkl_blas_..."
_PERF_LINE = re.compile(r"^\s*([\d.]+)%\s+(\d+)\s+(\S+)\s+\[(.)\]\s+(.+?)\s*$")


def profile_steps(step, batches: list, device, top: int = 15) -> dict:
    """The profile of one pass over `batches`: perf on CPU where it attaches, else torch.profiler."""
    if device.type == "cpu" and shutil.which("perf"):
        prof = perf_steps(step, batches, top)
        if prof is not None:
            return prof
    return torch_profile_steps(step, batches, device, top)


def torch_profile_steps(step, batches: list, device, top: int = 15) -> dict:
    """torch.profiler: ops by self time on the device (CPU when there is none)."""
    from harness import sync
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for b in batches:
            step(b)
        sync(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    ops = [(e.key, getattr(e, key) / 1e3, e.count) for e in prof.key_averages() if getattr(e, key, 0) > 0]
    return summary(ops, len(batches), f"torch.profiler {key}", top, calls=True)


def perf_steps(step, batches: list, top: int = 15) -> dict | None:
    """`perf record` on this process for one pass over `batches`; None if perf cannot attach."""
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "perf.data"
        cmd = ["perf", "record", "-F", str(PERF_HZ), "-p", str(os.getpid()), "-o", str(data)]
        rec = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)  # attached by then (perf has no ready signal)
        if rec.poll() is not None:
            return None  # e.g. perf_event_paranoid forbids it
        for b in batches:
            step(b)
        rec.send_signal(signal.SIGINT)
        rec.wait(timeout=120)
        report = ["perf", "report", "-i", str(data), "--stdio", "-n", "--no-children", "--sort", "dso,sym"]
        out = subprocess.run(report, capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        return None
    return perf_summary(out.stdout, len(batches), top)


def perf_summary(report: str, steps: int, top: int = 15) -> dict:
    """A `perf report -n --sort dso,sym` text as a profile: each function's CPU-ms (samples /
    PERF_HZ), grouped under a short name (the aten kernel, the MKL routine, the library)."""
    ms: dict[str, float] = {}
    for line in report.splitlines():
        m = _PERF_LINE.match(line)
        if m:
            name = short_name(m.group(3), m.group(4), m.group(5))
            ms[name] = ms.get(name, 0.0) + int(m.group(2)) * 1e3 / PERF_HZ
    return summary(list(ms.items()), steps, f"perf CPU samples at {PERF_HZ} Hz", top)


def short_name(dso: str, kind: str, sym: str) -> str:
    """A readable name for a sampled function: an aten kernel's `*_kernel`, a BLAS routine's
    family, `kernel` for the OS (page faults, scheduling), else the library."""
    if kind == "k":
        return "kernel (page faults, scheduling)"
    if "gemm" in sym:
        return "sgemm (MKL)" if "mkl" in sym else "gemm"
    if "flash_attention" in sym:
        return "flash attention (CPU)"
    m = re.search(r"(\w+_kernel)\b", sym)
    if m and "at::native" in sym:
        return m.group(1)
    if dso.startswith(("libgomp", "libiomp")):
        return "OpenMP (barrier waits)"
    if dso.startswith("libpython"):
        return "Python"
    return f"other in {dso}"


def describe(basis: str) -> str:
    """A profile's `time_basis` in words, for the reports (older results say `self_cpu_time_total`)."""
    if basis.startswith("perf"):
        return "perf's CPU samples by function, the GEMMs inside CPU flash attention counted as matmul"
    if basis.endswith("self_cpu_time_total"):
        return "torch.profiler, self CPU time"
    return f"torch.profiler, {basis}"


def summary(ops: list[tuple], steps: int, basis: str, top: int, calls: bool = False) -> dict:
    """Ops (name, ms[, calls]) as the profile dict the reports read: totals, the matmul and
    attention shares by name, the top ops by time."""
    total = sum(o[1] for o in ops) or 1.0
    ops = sorted(ops, key=lambda o: o[1], reverse=True)

    def share(needles) -> float:
        return sum(o[1] for o in ops if any(n in o[0].lower() for n in needles)) / total

    return {
        "steps": steps,
        "time_basis": basis,
        "total_ms": total,
        "share_matmul": share(MATMUL),
        "share_attention": share(ATTENTION),
        "top_ops": [
            {"op": o[0], "self_ms": o[1], "share": o[1] / total, **({"calls": o[2]} if calls else {})}
            for o in ops[:top]
        ],
    }
