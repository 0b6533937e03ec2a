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
        "gpu_steps.json",
        "bench_kernels_quick_cpu_",
        "bench_train_",
        "train_zero2_smoke_metrics.json",
    ):
        assert want in names, (want, files)
    env_json = json.loads((out / "gpu_env.json").read_text())
    assert env_json["gpu"] is None
    # per attention and kernel op: the backend chosen and why each faster one was refused
    assert env_json["attention_auto_bf16"] == {
        "backend": "sdpa",
        "refused": {"flash": "needs CUDA", "varlen": "needs CUDA"},
    }
    assert {k["backend"] for k in env_json["kernels_auto"].values()} == {"reference"}
    assert all("CUDA" in k["refused"] for k in env_json["kernels_auto"].values())
    assert env_json["baselines"]["attn_implementation"] == "sdpa" and env_json["baselines"]["liger"] is False
    # every step's rc and seconds, and each pytest step's tests, as they ended
    steps = json.loads((out / "gpu_steps.json").read_text())
    assert [s["name"] for s in steps] == [
        "kernel_tests",
        "shared_prompt_cuda",
        "model_tests",
        "bench_kernels",
        "bench_train",
        "train_zero2_smoke",
    ]
    assert all(s["rc"] == 0 and not s["timed_out"] for s in steps), steps
    assert sum(t["outcome"] == "passed" for t in steps[0]["tests"].values()) > 20
    # the log's last line reached the file (run.sh waits for its tee)
    assert (out / "gpu_run.log").read_text().rstrip().splitlines()[-1].startswith("== done status=0")
    train = json.loads(next(out.glob("bench_train_*.json")).read_text())
    assert [s["stage"] for s in train["stages"]] == ["pretrain", "sft", "dpo"]
    for st in train["stages"]:
        assert all(r["real_tokens_per_sec"] > 0 for r in st["results"])
    # every step ran, each with rc=0, from the scratch folder (not the checkout)
    for step in ("kernel_tests", "model_tests", "bench_kernels", "bench_train", "train_zero2_smoke"):
        assert f"== {step} rc=0" in log, step
