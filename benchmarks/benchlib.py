"""The one home of the benchmark report format (`bumblefast bench` and benchmarks/*.py; the
scripts time and compare through benchmarks/harness.py).

Every figure is a *measurement*: work done and the seconds it took, measured in this run
(`value` = work / seconds), a peak memory in MB, or a fraction (part / whole). Every claim is a *ratio* of two
measurements taken side by side in the same run, stored with both, so a reader (and the CI
smoke test) can recompute it: `value` = ours / baseline for rates, baseline / ours for
memory (how many times better ours is, either way).

A benchmark script exposes `bench(size, workdir) -> section`, a section being
    {"config": {...}, "results": <the script's own detail>, "ratios": [ratio, ...],
     "points": [point, ...]}
where a point is one configuration for the plot: {"label", "tokens_per_s", "mfu" or None}.
Sizes: "min" (CI smoke, seconds), "cpu" (the 2-core machine, minutes), "gpu" (one CUDA
device, the 1.5B preset).
"""

from __future__ import annotations

import math
from typing import Any

from bumblefast.bench import SECTIONS, SIZES  # noqa: F401 (re-exported: the command's own lists)

SCHEMA = "bumblefast.bench/1"


def measured(label: str, work: float, seconds: float, unit: str = "tokens/s", **extra: Any) -> dict:
    """A rate measured in this run: `work` units of work in `seconds` wall seconds."""
    if not (seconds > 0 and math.isfinite(seconds)):
        raise ValueError(f"{label}: seconds must be a positive time, got {seconds}")
    return {"label": label, "work": work, "seconds": seconds, "value": work / seconds, "unit": unit, **extra}


def median_range(values) -> tuple[float, float, float]:
    """(median, min, max) of some values: the one median of the benchmarks (of an even count,
    the mean of the two middle values)."""
    v = sorted(values)
    if not v:
        raise ValueError("median_range: no values")
    mid = len(v) // 2
    return (v[mid] if len(v) % 2 else (v[mid - 1] + v[mid]) / 2), v[0], v[-1]


def rounds(label: str, work: float, round_seconds: list[float], unit: str = "tokens/s", **extra: Any) -> dict:
    """A rate timed in several rounds of the same `work` each: `value` is the median round's rate
    (work / median seconds), `range` the slowest and fastest rounds' rates, so a reader can see
    the spread and a ratio can say whether it stands out of the noise."""
    if not round_seconds:
        raise ValueError(f"{label}: no rounds timed")
    median, fastest, slowest = median_range(round_seconds)
    return measured(
        label, work, median, unit, range=[work / slowest, work / fastest], round_seconds=list(round_seconds), **extra
    )


def verdict(ours: dict, baseline: dict) -> str:
    """Says "faster" / "slower" only when the two sides' min-max ranges do not overlap, else
    "within noise"; "single round" when a side was timed once (no spread known)."""
    if "range" not in ours or "range" not in baseline:
        return "single round"
    if min(len(ours.get("round_seconds", ())), len(baseline.get("round_seconds", ()))) < 2:
        return "single round"
    (olo, ohi), (blo, bhi) = ours["range"], baseline["range"]
    if olo > bhi:
        return "faster"
    if ohi < blo:
        return "slower"
    return "within noise"


def memory(label: str, mb: float, **extra: Any) -> dict:
    """A peak memory (MB) measured in this run; lower is better."""
    return {"label": label, "value": float(mb), "unit": "MB", **extra}


def fraction(label: str, part: float, whole: float, **extra: Any) -> dict:
    """A share measured in this run (e.g. real tokens / row capacity); higher is better."""
    return {"label": label, "part": part, "whole": whole, "value": part / whole, "unit": "fraction", **extra}


def ratio(name: str, ours: dict, baseline: dict) -> dict:
    """How many times better `ours` is than `baseline` (both measured in this run)."""
    if ours["unit"] != baseline["unit"]:
        raise ValueError(f"{name}: units differ ({ours['unit']} vs {baseline['unit']})")
    lower_better = ours["unit"] == "MB"
    value = baseline["value"] / ours["value"] if lower_better else ours["value"] / baseline["value"]
    out = {
        "name": name,
        "value": value,
        "ours": ours,
        "baseline": baseline,
        "better": "lower" if lower_better else "higher",
    }
    if "range" in ours and "range" in baseline:
        out["verdict"] = verdict(ours, baseline)
    return out


def point(label: str, tokens_per_s: float, mfu: float | None = None) -> dict:
    return {"label": label, "tokens_per_s": tokens_per_s, "mfu": mfu}


def check_section(name: str, section: dict) -> list[str]:
    """Problems with a section (empty when it is well-formed and every ratio recomputes)."""
    problems = []
    for key in ("config", "results", "ratios", "points"):
        if key not in section:
            problems.append(f"{name}: missing '{key}'")
    for r in section.get("ratios", []):
        problems += [f"{name}/{r.get('name')}: {p}" for p in check_ratio(r)]
    return problems


def check_ratio(r: dict) -> list[str]:
    problems = []
    for side in ("ours", "baseline"):
        m = r.get(side) or {}
        v = m.get("value")
        if not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)):
            problems.append(f"{side} value {v!r} is not a positive number")
            return problems
        if m.get("unit") == "fraction":
            if not (m.get("whole", 0) > 0 and math.isclose(v, m.get("part", -1) / m["whole"], rel_tol=1e-9)):
                problems.append(f"{side}: value {v} != part / whole")
        elif m.get("unit") != "MB":
            if not (m.get("seconds", 0) > 0 and m.get("work", 0) > 0):
                problems.append(f"{side}: a rate needs positive work and seconds")
            elif not math.isclose(v, m["work"] / m["seconds"], rel_tol=1e-9):
                problems.append(f"{side}: value {v} != work / seconds")
    ours, base = r["ours"]["value"], r["baseline"]["value"]
    expect = base / ours if r.get("better") == "lower" else ours / base
    if not math.isclose(r.get("value", float("nan")), expect, rel_tol=1e-9):
        problems.append(f"ratio {r.get('value')} != {expect} recomputed from its measurements")
    return problems


class Interrupted(Exception):
    """A section that failed part-way, carrying what it finished (`partial`: a section dict, e.g.
    the train stages done before a later one failed), so the suite can write it instead of losing
    a long run's finished work."""

    def __init__(self, cause: BaseException, partial: dict):
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.partial = partial


def timed_section(name: str, bench, size: str) -> dict:
    """`bench(size, workdir)` in a fresh temporary folder (removed after), with its wall
    `seconds` added: how both `bumblefast bench` and a script run alone (benchmarks/harness.py)
    call a benchmark."""
    import shutil
    import tempfile
    import time
    from pathlib import Path

    work = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
    t = time.perf_counter()
    try:
        section = bench(size, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    section["seconds"] = time.perf_counter() - t
    return section
