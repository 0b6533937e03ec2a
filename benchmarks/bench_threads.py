"""Demo training speed by intra-op thread count, with and without a competing process.

Why: on a 2-core machine a 2-thread torch process collapses when anything else runs (each
op's threads wait at a barrier for the sibling the scheduler took away), so the demo's
thread default must be the one that stays steady on a shared machine.

Runs the demo's pretraining stage (tiny preset, demo shards) for a few steps per case,
1 and 2 threads x {idle, one busy-looping process}, in interleaved rounds; reports the
median and min-max of the steps' tokens/s (training_metrics.json, first log dropped).

    python benchmarks/bench_threads.py [--rounds 3] [--steps 40] [--out benchmarks/results]
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
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from harness import launch_train, median_range  # noqa: E402 - bumblefast from ROOT when not installed


def prepare(work: Path) -> None:
    """Tokenizer and pretrain shards of the demo data, as `bumblefast demo` makes them."""
    from bumblefast.demo import step_prep, step_tokenizer

    step_tokenizer(work, 0)
    step_prep(work, 0)


def run_case(work: Path, threads: int, steps: int, tag: str) -> float:
    out = work / f"run_{tag}"
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    args = {
        "yaml_config": ROOT / "configs/demo/pretrain.yaml",
        "tokenizer_name_or_path": work / "tokenizer",
        "dataset_path": work / "shards/pretrain",
        "output_dir": out,
        "max_steps": steps,
        "logging_steps": 5,
        "save_steps": 100000,
        "save_last": "false",
    }
    cmd = launch_train(args)
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    history = json.loads((out / "training_metrics.json").read_text())
    speeds = [r["tokens_per_sec"] for r in history[1:]] or [history[-1]["tokens_per_sec"]]
    return median_range(speeds)[0]


def busy() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args()
    cases = [(t, c) for c in (False, True) for t in (1, 2)]
    speeds: dict[str, list[float]] = {f"{t} thread(s), {'1 competing process' if c else 'idle'}": [] for t, c in cases}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prepare(work)
        for r in range(args.rounds):
            for (t, c), label in zip(cases, speeds):
                rival = busy() if c else None
                try:
                    speeds[label].append(run_case(work, t, args.steps, f"{r}_{t}_{int(c)}"))
                finally:
                    if rival:
                        rival.kill()
                        rival.wait()
                print(f"round {r + 1}: {label}: {speeds[label][-1]:.0f} tok/s", flush=True)
    rows = {k: dict(zip(("median", "min", "max"), median_range(v)), rounds=v) for k, v in speeds.items()}
    print("\n| case | tokens/s median | min-max |\n|---|---|---|")
    for k, v in rows.items():
        print(f"| {k} | {v['median']:.0f} | {v['min']:.0f}-{v['max']:.0f} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"bench_threads_{platform.node() or 'host'}_{time.strftime('%Y-%m-%d')}.json"
    (out / name).write_text(
        json.dumps({"cpu": platform.processor(), "cores": os.cpu_count(), "steps": args.steps, "cases": rows}, indent=2)
    )
    print(f"wrote {out / name}")


if __name__ == "__main__":
    main()
