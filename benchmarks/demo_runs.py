#!/usr/bin/env python3
"""`bumblefast demo` over seeds x thread counts: does the demo learn on every run (issue 30)?

Each run is the demo as a newcomer runs it: a fresh output folder, its own tokenizer, prep,
pretraining, SFT, DPO and closing chat, one `bumblefast demo` process per run, one at a time.
Thread counts change the order of float sums, seeds the init, packing and shuffles: the
trajectories a user's machine may take. The result file holds every run's summary.json
(written by the demo) with its wall and CPU time, and the targets checked over all runs; it
is rewritten after each run, and `--resume` keeps the runs a file already holds.

README's demo table is generated from it (`bumblefast bench report`, kind `demo_runs`).
Usage: python benchmarks/demo_runs.py [--seeds 0,1,2,3,4] [--threads 1,2] [--resume FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import harness as H

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
TIME_LIMIT_S = 600  # the demo's run after install, on 2 idle cores


def run_one(seed: int, threads: int, work: Path) -> dict:
    out = work / f"seed{seed}-t{threads}"
    cmd = [
        sys.executable,
        "-m",
        "bumblefast",
        "demo",
        "--out",
        str(out),
        "--seed",
        str(seed),
        "--threads",
        str(threads),
    ]
    t0, load = time.perf_counter(), os.getloadavg()[0]
    log = subprocess.run(cmd, capture_output=True, text=True)
    if log.returncode:
        raise RuntimeError(f"demo seed {seed}, {threads} thread(s) failed:\n{log.stdout[-2000:]}\n{log.stderr[-4000:]}")
    summary = json.loads((out / "summary.json").read_text())
    summary["run"].update(outer_wall_s=time.perf_counter() - t0, load_at_start=load, load_at_end=os.getloadavg()[0])
    return summary


def _every(runs, ok) -> tuple[bool, str]:
    failed = [f"seed {r['run']['seed']}/{r['run']['threads']}t" for r in runs if not ok(r)]
    return not failed, "every run" if not failed else "missed on " + ", ".join(failed)


# (id, target as the issue states it, check over the runs)
TARGETS = [
    ("sft_answers", "held-out answers after SFT >= 80%", lambda r: r["sft"]["answer_accuracy"] >= 0.8),
    (
        "dpo_keeps_answers",
        "answers after DPO >= SFT's - 3 points",
        lambda r: r["dpo"]["answer_accuracy"] >= r["sft"]["answer_accuracy"] - 0.03,
    ),
    ("dpo_preferences", "held-out preferences after DPO >= 90%", lambda r: r["dpo"]["preference_accuracy"] >= 0.9),
    (
        "dpo_lifts_preferences",
        "preferences after DPO >= SFT's + 10 points where SFT's < 85%",
        lambda r: (
            r["sft"]["preference_accuracy"] >= 0.85
            or r["dpo"]["preference_accuracy"] >= r["sft"]["preference_accuracy"] + 0.1
        ),
    ),
    ("chat", "the closing chat answers its held-out question", lambda r: r["chat"]["correct"]),
    ("nll_falls", "held-out answer NLL falls at SFT", lambda r: r["sft"]["answer_nll"] < r["pretrain"]["answer_nll"]),
    (
        "margin_rises",
        "held-out preference margin rises at DPO",
        lambda r: r["dpo"]["preference_margin"] > r["sft"]["preference_margin"],
    ),
    ("time", f"run <= {TIME_LIMIT_S // 60} minutes", lambda r: r["run"]["wall_s"] <= TIME_LIMIT_S),
]


def targets(runs: list[dict]) -> list[dict]:
    out = []
    for key, text, ok in TARGETS:
        met, detail = _every(runs, ok)
        out.append({"id": key, "target": text, "met": met, "detail": detail})
    return out


def _span(runs, get, fmt="{:.0%}") -> str:
    values = [get(r) for r in runs]
    return f"{fmt.format(min(values))}-{fmt.format(max(values))}"


def table(result: dict, source: str) -> str:
    """README's demo table: one row per run, the range over the runs, each target met or MISSED."""
    runs = result["runs"]
    pct = lambda x: f"{x:.0%}"  # noqa: E731
    lines = [
        f"{len(runs)} runs of `bumblefast demo` on {result['host']} ({result['cpu']}; {result['date']}), one at a "
        f"time, load average {min(r['run']['load_at_start'] for r in runs):.1f}-"
        f"{max(r['run']['load_at_start'] for r in runs):.1f} at their starts; `{source}`. Held-out questions "
        "(never asked in SFT or DPO), pretraining -> SFT -> DPO:",
        "",
        "| seed / threads | answers | answer NLL | sums (text) | preferences | DPO margin gain | chat | time |",
        "|---|---|---|---|---|---:|---|---:|",
    ]
    for r in runs:
        p, s, d, run = r["pretrain"], r["sft"], r["dpo"], r["run"]
        lines.append(
            f"| {run['seed']} / {run['threads']} | {pct(p['answer_accuracy'])} -> {pct(s['answer_accuracy'])} -> "
            f"{pct(d['answer_accuracy'])} | {p['answer_nll']:.2f} -> {s['answer_nll']:.3f} -> {d['answer_nll']:.3f} | "
            f"{pct(p['sum_accuracy'])} -> {pct(s['sum_accuracy'])} | {pct(p['preference_accuracy'])} -> "
            f"{pct(s['preference_accuracy'])} -> {pct(d['preference_accuracy'])} | "
            f"{d['preference_margin'] - s['preference_margin']:+.2f} | "
            f"{'right' if r['chat']['correct'] else 'wrong'} ({r['chat']['answer']!r}) | "
            f"{run['wall_s'] / 60:.1f} min |"
        )
    lines += [
        "",
        f"Over the {len(runs)} runs: answers after SFT {_span(runs, lambda r: r['sft']['answer_accuracy'])}, after "
        f"DPO {_span(runs, lambda r: r['dpo']['answer_accuracy'])}; preferences after DPO "
        f"{_span(runs, lambda r: r['dpo']['preference_accuracy'])}; time "
        f"{_span(runs, lambda r: r['run']['wall_s'] / 60, '{:.1f}')} min.",
        "",
        *(f"- {t['target']}: {'met' if t['met'] else 'MISSED'} ({t['detail']})" for t in result["targets"]),
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated seeds")
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts per training process")
    p.add_argument("--out", default=str(RESULTS), help="folder for demo_runs_<host>_<date>.json and .md")
    p.add_argument("--resume", default=None, help="a result file: keep its runs, add the missing ones")
    args = p.parse_args(argv)
    plan = [(s, t) for t in map(int, args.threads.split(",")) for s in map(int, args.seeds.split(","))]
    if args.resume:
        path = Path(args.resume)
        result = json.loads(path.read_text())
    else:
        path = Path(args.out) / f"demo_runs_{platform.node()}_{date.today().isoformat()}.json"
        result = {"benchmark": "demo_runs", "date": date.today().isoformat(), "host": platform.node(), "runs": []}
        result["cpu"] = f"{os.cpu_count()} x {H.cpu_model()}"
    done = {(r["run"]["seed"], r["run"]["threads"]) for r in result["runs"]}
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="demo-runs-") as work:
        for seed, threads in plan:
            if (seed, threads) in done:
                continue
            print(f"demo seed {seed}, {threads} thread(s) ...", flush=True)
            result["runs"].append(run_one(seed, threads, Path(work)))
            result["targets"] = targets(result["runs"])
            path.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
            r = result["runs"][-1]
            print(
                f"  answers {r['sft']['answer_accuracy']:.0%} -> {r['dpo']['answer_accuracy']:.0%}, preferences "
                f"{r['dpo']['preference_accuracy']:.0%}, chat {r['chat']['answer']!r}, {r['run']['wall_s']:.0f} s",
                flush=True,
            )
    source = path.resolve().relative_to(HERE.parent).as_posix() if HERE.parent in path.resolve().parents else str(path)
    path.with_suffix(".md").write_text(table(result, source) + "\n")
    print(table(result, str(path)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
