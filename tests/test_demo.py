"""The README's first command end to end: `bumblefast demo` on the bundled data, as a user
runs it (tokenizer, prep, pretrain, SFT, DPO with LoRA, merge, chat, plots): every stage's
outputs exist and the held-out numbers meet issue 30's targets with the slack the measured
runs support: SFT teaches the answers, DPO keeps them and lifts the preferences, the answer NLL
falls at SFT, the held-out margin rises at DPO, the closing chat answers its held-out question.

The bounds come from benchmarks/results/demo_runs_vm_2026-12-03.json (seeds 0-4 x 1 and 2
threads, the 8-head untied demo model, DPO at lr 1e-3; README's generated table), not from one machine's run:
each is the issue's target where every run met it with room, else the lowest measured value
less a few questions, and the comment gives the measured range.
Run with `--threads 2`: the test has the 2 cores to itself, where 2 intra-op threads train
faster than the default 1 (benchmarks/bench_threads.py). The longest test, marked slow."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import ROOT

pytestmark = pytest.mark.slow


def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    res = subprocess.run(
        [sys.executable, "-m", "bumblefast", "demo", "--out", str(out), "--threads", "2"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    assert "answer NLL" in res.stdout and "outputs in" in res.stdout

    summary = json.loads((out / "summary.json").read_text())
    pre, sft, dpo = summary["pretrain"], summary["sft"], summary["dpo"]
    # Held-out questions (never asked in SFT or DPO): 37 questions, 120 pairs; measured ranges
    # over the 10 runs of demo_runs_vm_2026-12-03.json in the comments.
    assert pre["answer_accuracy"] < 0.2  # pretraining has no chat format (0% on every run)
    # pretraining learns the sums in its own text format beyond their marginal (20%): 56-100%
    assert pre["sum_accuracy"] >= 0.3
    assert sft["answer_accuracy"] >= 0.8  # target; measured 97-100%
    # target >= SFT's - 3 points (one question of 37 may go); measured: no run lost one
    assert dpo["answer_accuracy"] >= sft["answer_accuracy"] - 0.03 - 1e-9
    assert dpo["preference_accuracy"] >= 0.9  # target; measured 98-100%
    if sft["preference_accuracy"] < 0.85:  # target: DPO adds >= 10 points where SFT left room (SFT: 100%)
        assert dpo["preference_accuracy"] >= sft["preference_accuracy"] + 0.1 - 1e-9
    # continuous measures: the reference answers' NLL falls at SFT (4.5-6.1 -> at most 0.032),
    # and DPO widens the held-out margin over SFT's (+1.0 to +2.3 nats) with a positive implicit
    # reward margin (0.51-1.13)
    assert sft["answer_nll"] < min(0.1, pre["answer_nll"] / 10)
    assert dpo["preference_margin"] > sft["preference_margin"] + 0.5 and dpo["reward_margin"] > 0.3
    assert dpo["accuracy"] > 0.75  # DPO separates its own training pairs (0.83-0.97 over its last 5 logs)
    assert summary["chat"]["correct"], summary["chat"]  # "Complete: 0 + 2 = " -> "2" (right in every run)
    assert summary["run"]["threads"] == 2 and summary["run"]["cpu_s"] > 0

    for stage in ("pretrain", "sft", "dpo"):
        assert (out / stage / "plots" / "loss.png").is_file()
        assert (out / stage / "training_metrics.json").is_file()
        assert json.loads((out / stage / "heldout.json").read_text())["answer_nll"] == summary[stage]["answer_nll"]
    for png in ("rewards.png", "margins.png", "accuracy.png"):
        assert (out / "dpo" / "plots" / png).is_file()
    assert (out / "dpo_merged" / "model.safetensors").is_file()
