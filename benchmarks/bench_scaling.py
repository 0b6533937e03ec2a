"""Scaling benchmark: the real trainer on 1 and 2 processes under ZeRO-2 and ZeRO-3.

    .venv/bin/python benchmarks/bench_scaling.py [--size min|cpu|gpu] [--out benchmarks/results]
    (or `bumblefast bench scaling`, which writes it into the combined report)

What runs: `python -m bumblefast train --stage pretrain` (2 processes: `python -m
torch.distributed.run --nproc_per_node 2`, gloo on CPU), each run a fresh subprocess, as
tests/test_train.py runs it, with configs/deepspeed/ds_z2.json and ds_z3.json:
ZeRO-2 x {1, 2} processes and ZeRO-3 x {1, 2} processes, the same fixed number of optimizer
steps each. The data is datasets/demo/pretrain.json with a byte-level BPE trained on it here
(size min/cpu: 1024 ids, the tiny preset's vocab), prepped in-process (bumblefast.prep.run,
what `bumblefast prep --stage pretrain` runs) into packed rows of `seq_len`.

Weak scaling: the *per-process* micro-batch is the same in every run, so 2 processes do twice
the work per optimizer step; the question is how the cost grows with the work. Every process
gets OMP_NUM_THREADS=1: 1 process uses one core and 2 processes the 2 cores of the CPU
machine, so ideal scaling is 2x tokens/s (efficiency = 2-process tokens/s / (2 x 1-process
tokens/s)). The machine may be shared: the load average and the cores busy with other work
(/proc/stat over 1 s) are recorded before and after, with a note when others were busy.

Throughput comes from what the trainer records in `training_metrics.json`, logged every step
(`--logging_steps 1`): per step `tokens_per_sec` (real tokens of the step over all ranks, over
the wall time since the previous log) and `padding_fraction` (1 - tokens / row capacity). The
file has no per-step token count or step time, so both are derived: row capacity is
micro-batch x accumulation x processes x seq_len (shards/collate.py), the step's tokens are
round((1 - padding_fraction) x capacity) and its seconds are tokens / tokens_per_sec. The first
`warmup` steps (allocation, first-call overheads; the first window also starts at logger
creation) are skipped; the rate is the sum of the remaining steps' tokens over the sum of
their seconds (benchlib.measured). MFU is the metrics file's `mfu` (CUDA only), time-weighted
over the same steps; None on CPU.

Also per run: wall time from launch to exit, split by the trainer's own output lines into
start-up (launch, imports incl. DeepSpeed, process group, model, engine: up to the "training
..." line), the training loop (up to "done:") and export + teardown; and the first and final
loss. No checkpoints are saved (--save_last false) and TensorBoard is off, so neither is timed.

Sizes: min (CI smoke: 3 timed steps at seq_len 64; ~45-55 s in all on the 2-core machine, most
of it the 4 start-ups of 6-11 s each: Python + torch + DeepSpeed imports, process group, engine;
torchrun's 2 processes start slower than 1 plain process), cpu (8 timed steps at seq_len 256,
tiny preset, ~5-9 s of timed steps per run; ~95-110 s), gpu (UNTESTED, written without a GPU: the 1.5B preset, bf16,
gradient checkpointing, seq_len 2048, an 8192-id tokenizer, the corpus repeated 6 times;
2-process runs only when 2 CUDA devices are visible, otherwise one process per ZeRO stage and
the 2-vs-1 ratios are omitted). Writes `<out>/bench_scaling_<host>_<date>.json` and `.md`
(`_<size>` appended for sizes other than cpu).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from harness import child_env, cli, launch_train, median_range, ratio_lines

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "datasets" / "demo"
DS = ROOT / "configs" / "deepspeed"

CPU = dict(
    preset="bumblebee-tiny",
    vocab=1024,
    accumulation=1,
    warmup=2,
    repeat=1,
    kernels="reference",
    bf16=False,
    checkpointing=False,
)
SIZES = {
    "min": {**CPU, "seq_len": 64, "micro_batch": 2, "timed": 3},
    "cpu": {**CPU, "seq_len": 256, "micro_batch": 4, "timed": 8},
    # untested: written without a GPU
    "gpu": dict(
        preset="bumblebee-1.5b",
        vocab=8192,
        accumulation=1,
        warmup=2,
        repeat=6,  # ~200+ rows of 2048 tokens: one epoch covers 2 processes x 22 steps
        kernels="auto",
        bf16=True,
        checkpointing=True,
        seq_len=2048,
        micro_batch=4,
        timed=20,
    ),
}
STAGES = (2, 3)
RUN_TIMEOUT_S = 900


def busy_cores(seconds: float = 1.0) -> float | None:
    """Cores kept busy by other work over `seconds` (from /proc/stat; None off Linux)."""

    def sample() -> tuple[int, int]:
        v = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        return sum(v), v[3] + v[4]  # total, idle + iowait

    try:
        t0, i0 = sample()
        time.sleep(seconds)
        t1, i1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return (os.cpu_count() or 1) * (1 - (i1 - i0) / max(t1 - t0, 1))


def prepare_data(workdir: Path, z: dict) -> tuple[Path, Path, dict]:
    """Tokenizer trained on the demo pretrain corpus, and its packed pretrain shards."""
    from bumblefast.config import PrepConfig
    from bumblefast.prep.run import run_prep
    from bumblefast.tokenizer import train_tokenizer

    src = DEMO / "pretrain.json"
    tok = workdir / "tokenizer"
    train_tokenizer([src], z["vocab"], tok)
    docs = json.loads(src.read_text(encoding="utf-8")) * z["repeat"]
    raw = workdir / "pretrain.jsonl"
    raw.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    shards = workdir / "shards"
    manifest = run_prep(
        PrepConfig(
            stage="pretrain",
            input=[str(raw)],
            tokenizer_name_or_path=str(tok),
            seq_len=z["seq_len"],
            output_dir=str(shards),
        ),
        progress=False,
    )
    return (
        tok,
        shards,
        {"documents": len(docs), "rows": manifest["rows"], "tokens": manifest["tokens"]["real"]},
    )


def train_cmd(out: Path, shards: Path, tok: Path, z: dict, zero: int, nproc: int) -> list[str]:
    args = {
        "stage": "pretrain",
        "model_name_or_path": ROOT / "configs" / "models" / z["preset"],
        "tokenizer_name_or_path": tok,
        "dataset_path": shards,
        "output_dir": out,
        "cutoff_len": z["seq_len"],
        "train_micro_batch_size_per_gpu": z["micro_batch"],
        "gradient_accumulation_steps": z["accumulation"],
        "max_steps": z["warmup"] + z["timed"],
        "learning_rate": 3e-3,
        "warmup_ratio": 0,
        "logging_steps": 1,
        "save_steps": 10**9,
        "save_last": "false",
        "use_tensorboard": "false",
        "seed": 0,
        "gradient_checkpointing": str(z["checkpointing"]).lower(),
        "bf16": str(z["bf16"]).lower(),
        "kernels": z["kernels"],
        "deepspeed_config_path": DS / f"ds_z{zero}.json",
    }
    return launch_train(args, nproc)


def run_timed(cmd: list[str], timeout: float = RUN_TIMEOUT_S) -> dict:
    """Run to exit, time-stamping the trainer's "training ..." (loop starts) and "done:" lines."""
    t0 = time.perf_counter()
    stamps: dict[str, float] = {}
    tail: list[str] = []
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    timer = threading.Timer(timeout, lambda: os.killpg(proc.pid, signal.SIGKILL))
    timer.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            now = time.perf_counter() - t0
            # (tqdm's "\r"-led bar updates may share a line with these)
            if "loop" not in stamps and re.search(r"training \w+: \d+ optimizer steps", line):
                stamps["loop"] = now
            elif re.search(r"done: \d+ steps; model in", line):
                stamps["done"] = now
            tail = (tail + [line])[-40:]
        rc = proc.wait()
    finally:
        timer.cancel()
    wall = time.perf_counter() - t0
    if rc != 0 or "loop" not in stamps or "done" not in stamps:
        raise RuntimeError(f"{' '.join(cmd)}\nexit {rc} after {wall:.0f}s:\n{''.join(tail)}")
    return {
        "wall_s": wall,
        "startup_s": stamps["loop"],
        "loop_s": stamps["done"] - stamps["loop"],
        "export_teardown_s": wall - stamps["done"],
    }


def steady_state(records: list[dict], capacity: int, warmup: int) -> dict:
    """Tokens and seconds of the steps after warm-up, derived from the per-step records."""
    steps = []
    for r in records:
        tokens = round((1.0 - r.get("padding_fraction", 0.0)) * capacity)
        steps.append(
            {
                "step": r["step"],
                "tokens": tokens,
                "seconds": tokens / r["tokens_per_sec"],
                "mfu": r.get("mfu"),
            }
        )
    timed = [s for s in steps if s["step"] > warmup]
    if not timed:
        raise RuntimeError(f"no steps after the {warmup} warm-up steps: {[s['step'] for s in steps]}")
    tokens, seconds = sum(s["tokens"] for s in timed), sum(s["seconds"] for s in timed)
    mfus = [(s["mfu"], s["seconds"]) for s in timed if s["mfu"] is not None]
    step_ms = median_range(1e3 * s["seconds"] for s in timed)
    return {
        "timed_steps": len(timed),
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "mfu": sum(m * s for m, s in mfus) / sum(s for _, s in mfus) if len(mfus) == len(timed) else None,
        "step_ms_median": step_ms[0],
        "step_ms_min": step_ms[1],
        "step_ms_max": step_ms[2],
        "warmup_step_ms": [round(1e3 * s["seconds"], 1) for s in steps if s["step"] <= warmup],
        "step_seconds": [s["seconds"] for s in timed],
        "step_tokens_per_s": [s["tokens"] / s["seconds"] for s in timed],
    }


def bench_run(workdir: Path, shards: Path, tok: Path, z: dict, zero: int, nproc: int) -> dict:
    out = workdir / f"z{zero}_p{nproc}"
    times = run_timed(train_cmd(out, shards, tok, z, zero, nproc))
    records = json.loads((out / "training_metrics.json").read_text())
    capacity = z["micro_batch"] * z["accumulation"] * nproc * z["seq_len"]
    shutil.rmtree(out, ignore_errors=True)  # the exported model is not needed
    return {
        "zero": zero,
        "processes": nproc,
        **times,
        **steady_state(records, capacity, z["warmup"]),
        "first_loss": records[0]["loss"],
        "final_loss": records[-1]["loss"],
        "steps": len(records),
    }


def measurement(run: dict) -> dict:
    """A run's steady-state rate (its timed steps' tokens over their seconds), with the slowest
    and fastest step's rate as its range: the timed steps are its rounds, so a ratio of two
    runs carries their spread and a "within noise" verdict (benchlib.verdict)."""
    import benchlib as BL

    rates = run["step_tokens_per_s"]
    return BL.measured(
        label(run), run["tokens"], run["seconds"], range=[min(rates), max(rates)], round_seconds=run["step_seconds"]
    )


def label(run: dict) -> str:
    return f"ZeRO-{run['zero']}, {run['processes']} process{'es' if run['processes'] > 1 else ''}"


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def bench(size: str, workdir: Path) -> dict:
    """`bumblefast bench scaling`: the section described in benchmarks/benchlib.py."""
    import benchlib as BL

    z = SIZES[size]
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    notes = []
    nprocs = (1, 2)
    if size == "gpu":
        notes.append("size gpu is untested (written without a GPU)")
        if visible_gpus() < 2:
            nprocs = (1,)
            notes.append("one CUDA device visible: 1 process per ZeRO stage only; 2-process scaling needs 2 GPUs")
    ext_dir = Path(child_env()["TORCH_EXTENSIONS_DIR"])
    if not any(ext_dir.rglob("*.so")):
        notes.append(f"no compiled DeepSpeed ops in {ext_dir}: the first run's start-up includes building them")
    load_start, busy_start = os.getloadavg()[0], busy_cores()
    t = time.perf_counter()
    tok, shards, data = prepare_data(workdir, z)
    data["prep_s"] = time.perf_counter() - t
    runs = [bench_run(workdir, shards, tok, z, zero, n) for zero in STAGES for n in nprocs]
    load_end, busy_end = os.getloadavg()[0], busy_cores()
    for when, busy in (("start", busy_start), ("end", busy_end)):
        if busy is not None and busy > 0.3:
            notes.append(f"{busy:.1f} cores busy with other work at the {when}: runs may be slowed")

    m = {(r["zero"], r["processes"]): measurement(r) for r in runs}
    ratios, efficiency = [], {}
    if 2 in nprocs:
        for zero in STAGES:
            ratios.append(BL.ratio(f"ZeRO-{zero}: 2 processes vs 1 (tokens/s)", m[zero, 2], m[zero, 1]))
            efficiency[f"zero{zero}"] = m[zero, 2]["value"] / (2 * m[zero, 1]["value"])
    top = max(nprocs)
    noun = "processes" if top > 1 else "process"
    ratios.append(BL.ratio(f"ZeRO-3 vs ZeRO-2, {top} {noun} (tokens/s)", m[3, top], m[2, top]))
    points = [BL.point(label(r), r["tokens_per_s"], r["mfu"]) for r in runs]
    config = {
        "size": size,
        **z,
        "steps": z["warmup"] + z["timed"],
        "stages": list(STAGES),
        "processes": list(nprocs),
        "omp_num_threads_per_process": 1,
        "scaling": "weak (same micro-batch per process)",
        "cpu_count": os.cpu_count(),
        "data": "datasets/demo/pretrain.json",
    }
    results = {
        "runs": runs,
        "scaling_efficiency": efficiency,
        "data": data,
        "notes": notes,
        "load_average_start": load_start,
        "load_average_end": load_end,
        "other_busy_cores_start": busy_start,
        "other_busy_cores_end": busy_end,
        "bench_wall_s": time.perf_counter() - t,
    }
    return {"config": config, "results": results, "ratios": ratios, "points": points}


def to_markdown(section: dict, host: str, day: str) -> str:
    c, r = section["config"], section["results"]
    md = [
        f"# bench_scaling ({host}, {c['cpu_count']} CPUs, {day}, size {c['size']})",
        "",
        f"`bumblefast train` pretrain, {c['preset']}, seq_len {c['seq_len']}, micro-batch {c['micro_batch']} per "
        f"process x accumulation {c['accumulation']}, {c['steps']} steps ({c['warmup']} warm-up + {c['timed']} timed), "
        f"OMP_NUM_THREADS=1 per process, weak scaling. Load average {r['load_average_start']:.2f} at start, "
        f"{r['load_average_end']:.2f} at end; data prep {r['data']['prep_s']:.1f}s ({r['data']['rows']} rows).",
        "",
    ]
    md += [f"note: {n}" for n in r["notes"]] + ([""] if r["notes"] else [])
    md += [
        "| run | tokens/s | step ms (median, min-max) | start-up s | loop s | export+exit s | wall s "
        "| loss first -> final |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for x in r["runs"]:
        md.append(
            f"| {label(x)} | {x['tokens_per_s']:,.0f} | {x['step_ms_median']:.0f} ({x['step_ms_min']:.0f}-"
            f"{x['step_ms_max']:.0f}) | {x['startup_s']:.1f} | {x['loop_s']:.1f} | {x['export_teardown_s']:.1f} | "
            f"{x['wall_s']:.1f} | {x['first_loss']:.3f} -> {x['final_loss']:.3f} |"
        )
    md += ["", *ratio_lines(section["ratios"])]  # each with its verdict over the timed steps
    if r["scaling_efficiency"]:
        md += [
            "",
            "scaling efficiency (2-process tokens/s / (2 x 1-process)): "
            + ", ".join(f"ZeRO-{k[-1]} {v:.0%}" for k, v in r["scaling_efficiency"].items()),
        ]
    md += ["", f"whole bench: {r['bench_wall_s']:.0f}s"]
    return "\n".join(md) + "\n"


if __name__ == "__main__":
    sys.exit(cli("scaling", __doc__, bench, to_markdown, SIZES))
