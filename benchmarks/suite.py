"""`bumblefast bench [prep|stream|kernels|train|scaling|all]`: the benchmark suite, one report
(bumblefast/bench.py, the command's arguments, hands over to cli_main here).

Runs the scripts in the checkout's `benchmarks/` folder (each exposes `bench(size, workdir)`,
see benchmarks/benchlib.py for the format, benchmarks/harness.py for how they measure) at sizes
for the machine it is on (CPU: tiny preset and small data; CUDA: the 1.5B preset), checks
every section, and writes `<out>/<date>-<host>.json`, `.md` and `.png` (tokens/s and MFU per
configuration; a run of some sections: `<date>-<host>-<section>.json`).
Every claim in the report is a ratio of two figures measured side by side in this run.
"""

from __future__ import annotations

import datetime
import faulthandler
import importlib.util
import json
import os
import platform
import signal
import socket
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from benchlib import SCHEMA, SECTIONS, Interrupted, check_section, timed_section
from harness import cpu_model

from bumblefast.config import UserError

HERE = Path(__file__).resolve().parent  # benchmarks/, on sys.path (bumblefast.bench.benchmarks_dir)
SCRIPTS = {
    "prep": "bench_prep.py",
    "stream": "bench_stream.py",
    "kernels": "bench_kernels.py",
    "train": "bench_train.py",
    "scaling": "bench_scaling.py",
    "serve": "bench_serve.py",
}
assert tuple(SCRIPTS) == SECTIONS


def load_script(name: str) -> ModuleType:
    path = HERE / SCRIPTS[name]
    spec = importlib.util.spec_from_file_location(f"bumblefast_bench_{name}", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses/pickle look modules up by name
    spec.loader.exec_module(mod)
    return mod


def default_size() -> str:
    import torch

    return "gpu" if torch.cuda.is_available() else "cpu"


def keep_memory_as_train_does() -> str | None:
    """Sets this process's allocator as `bumblefast train` does on CPU (keeps freed memory);
    returns what it did, for the report. None on CUDA, where the train command leaves it."""
    import torch

    from bumblefast.cpu_memory import keep_freed_memory

    return None if torch.cuda.is_available() else keep_freed_memory()


def machine() -> dict[str, Any]:
    """What the report says of the machine; reads only."""
    import torch

    cuda = torch.cuda.is_available()
    return {
        "host": socket.gethostname(),
        "cpu_count": os.cpu_count(),
        "cpu": cpu_model(),  # the same host name has been an AMD EPYC and an Intel Xeon VM
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }


class Unfinished(Exception):
    """A run stopped by a failing section; `report` holds the sections finished before it (and
    the failing one's finished part, when it had one) and says why under `interrupted`, for
    cli_main to write."""

    def __init__(self, report: dict[str, Any]):
        super().__init__(f"bench {report['interrupted']}")
        self.report = report


def run(sections: list[str], size: str, progress: bool = True) -> dict[str, Any]:
    """Run the sections; returns the report (checked: every ratio recomputes). A failing section
    raises Unfinished with the report of what was finished."""
    from tqdm import tqdm

    report: dict[str, Any] = {
        "schema": SCHEMA,
        "date": datetime.date.today().isoformat(),
        "size": size,
        "malloc": keep_memory_as_train_does(),
        **machine(),
        "sections": {},
    }
    t_all = time.perf_counter()
    bar = tqdm(sections, desc="bench", unit="section", disable=not progress, file=sys.stderr)
    for name in bar:
        bar.set_postfix_str(name)
        try:
            section = timed_section(name, load_script(name).bench, size)
        except (Exception, KeyboardInterrupt) as e:  # Ctrl-C too: a long run's finished part is kept
            if isinstance(e, Interrupted):  # its message names the cause's type already
                report["sections"][name], cause = e.partial, str(e)
            else:
                cause = f"{type(e).__name__}: {e}"
            report["interrupted"] = f"section {name}: {cause}"
            report["seconds"] = time.perf_counter() - t_all
            raise Unfinished(report) from e
        problems = check_section(name, section)
        if problems:
            raise RuntimeError(f"bench {name}: malformed section:\n  " + "\n  ".join(problems))
        report["sections"][name] = section
        tqdm.write(f"bench {name}: {len(section['ratios'])} ratios in {section['seconds']:.0f}s", file=sys.stderr)
    report["seconds"] = time.perf_counter() - t_all
    return report


def to_markdown(report: dict[str, Any]) -> str:
    stopped = (
        [f"**Interrupted** ({report['interrupted']}): only what finished is here.", ""]
        if "interrupted" in report
        else []
    )
    lines = [
        f"# bumblefast bench: {report['device']} on {report['host']} ({report['date']}, size {report['size']})",
        "",
        f"{report['cpu_count']} CPUs, torch {report['torch']}, python {report['python']}; "
        f"{report['seconds']:.0f} s in all. Each ratio: ours / baseline for rates and fractions, "
        "baseline / ours for memory (how many times better), both measured in this run.",
        "",
        *stopped,
        "| section | comparison | ours | baseline | ratio |",
        "|---|---|---:|---:|---:|",
    ]
    from benchreport import ratio_row

    for name, sec in report["sections"].items():
        lines += [ratio_row(name, r, mb_decimals=1) for r in sec["ratios"]]
    lines += ["", "| section | configuration | tokens/s | MFU |", "|---|---|---:|---:|"]
    for name, sec in report["sections"].items():
        for p in sec["points"]:
            mfu = f"{p['mfu']:.1%}" if p.get("mfu") is not None else "n/a"
            lines.append(f"| {name} | {p['label']} | {p['tokens_per_s']:,.0f} | {mfu} |")
    notes = [f"- {name}: {n}" for name, sec in report["sections"].items() for n in sec["results"].get("notes", [])]
    if notes:
        lines += ["", "Notes:", *notes]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> Path:
    """Bars of tokens/s (log scale) and MFU per configuration, one color per section."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(name, p) for name, sec in report["sections"].items() for p in sec["points"]]
    labels = [f"{name}: {p['label']}" for name, p in pts]
    colors = {name: f"C{i}" for i, name in enumerate(report["sections"])}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 0.35 * len(pts) + 2), sharey=True)
    y = range(len(pts))
    ax1.barh(y, [p["tokens_per_s"] for _, p in pts], color=[colors[n] for n, _ in pts])
    ax1.set_xscale("log")
    ax1.set_xlabel("tokens/s (log)")
    ax1.set_yticks(list(y), labels, fontsize=7)
    ax1.invert_yaxis()
    mfu = [p["mfu"] or 0.0 for _, p in pts]
    ax2.barh(y, [100 * m for m in mfu], color=[colors[n] for n, _ in pts])
    ax2.set_xlabel("MFU % (GPU only)")
    ax2.set_xlim(0, max(60.0, 100 * max(mfu) * 1.15))
    if not any(mfu):
        ax2.text(0.5, 0.5, "MFU: not measured on CPU", transform=ax2.transAxes, ha="center")
    fig.suptitle(f"bumblefast bench, {report['device']} ({report['date']}, size {report['size']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(report: dict[str, Any], out_dir: Path, suffix: str = "") -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    # a run of some sections is named for them, so it cannot overwrite a whole run of that day
    names = "" if tuple(report["sections"]) == SECTIONS else "-" + "-".join(report["sections"])
    size = "" if report["size"] in ("cpu", "gpu") else f"-{report['size']}"  # min/real never overwrite a cpu run
    stem = out_dir / f"{report['date']}-{report['host']}{names}{size}{suffix}"
    paths = {"json": stem.with_suffix(".json"), "md": stem.with_suffix(".md"), "png": stem.with_suffix(".png")}
    paths["json"].write_text(json.dumps(report, indent=2, default=str) + "\n")
    paths["md"].write_text(to_markdown(report))
    plot(report, paths["png"])
    return paths


def cli_main(args) -> int:
    if args.what == "report":
        from benchreport import PUBLISHED, publish

        stale = publish(args.results, check=args.check)
        if args.check and stale:
            print("stale (regenerate with `bumblefast bench report`): " + ", ".join(stale), file=sys.stderr)
            return 1
        print(
            ("differ: " if args.check else "regenerated: ")
            + (", ".join(stale) or "none")
            + f" (of {', '.join(PUBLISHED)})"
        )
        return 0
    if args.results:
        raise UserError(f"bench {args.what}: unexpected arguments {args.results} (only `bench report` takes files)")
    which = list(SECTIONS) if args.what == "all" else [args.what]
    size = args.size or default_size()  # argparse checked --size against SIZES
    if size.startswith("real") and which != ["train"]:
        raise UserError("--size real is the train section's (the 0.5B shape): `bumblefast bench train --size real`")
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 PID`: where a long run is
    try:
        report = run(which, size, progress=not args.no_progress)
    except Unfinished as e:  # what finished is written, named apart, never as a whole run
        paths = write(e.report, Path(args.out), suffix="-interrupted")
        print(f"{e}; the finished part is in {paths['json']}", file=sys.stderr)
        raise
    paths = write(report, Path(args.out))
    print(to_markdown(report))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
