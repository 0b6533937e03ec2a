"""benchmarks/gpu/run.sh --rehearsal under the project's venv: the GPU run's script logic (its
steps, commands, scratch working folder, file names and the at-most-8-files $OUT layout) on CPU
at the smallest sizes. `make gpu-rehearsal` runs the same on a copy of the GPU machine's stack
with the carried wheels; this test keeps the script itself from rotting in CI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import ROOT, subprocess_env

pytestmark = pytest.mark.slow


def test_run_sh_rehearsal_writes_each_result_within_the_file_limit(tmp_path):
    out = tmp_path / "out"
    env = subprocess_env(OUT=str(out), PYTHON=sys.executable, WHEELS=str(tmp_path / "no-wheels"), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks/gpu/run.sh"), "--rehearsal"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    files = sorted(p.name for p in out.rglob("*") if p.is_file())
    assert len(files) <= 8, files  # the device tool returns at most 8 files
    names = " ".join(files)
    for want in (
        "gpu_env.json",
        "gpu_run.log",
        "bench_kernels_quick_cpu_",
        "bench_train_",
        "train_zero2_smoke_metrics.json",
    ):
        assert want in names, (want, files)
    env_json = json.loads((out / "gpu_env.json").read_text())
    assert env_json["gpu"] is None and env_json["attn_auto_bf16"] == "sdpa"
    train = json.loads(next(out.glob("bench_train_*.json")).read_text())
    assert [s["stage"] for s in train["stages"]] == ["pretrain", "sft", "dpo"]
    for st in train["stages"]:
        assert all(r["real_tokens_per_sec"] > 0 for r in st["results"])
    # every step ran, each with rc=0, from the scratch folder (not the checkout)
    for step in ("kernel_tests", "model_tests", "bench_kernels", "bench_train", "train_zero2_smoke"):
        assert f"== {step} rc=0" in log, step
