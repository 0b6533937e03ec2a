"""The README's first command end to end: `bumblefast demo` on the bundled data, as a user
runs it (tokenizer, prep, pretrain, SFT, DPO with LoRA, merge, chat, plots): every stage's
outputs exist and the held-out numbers move the way every measured run moved (docs/LOG.md,
2026-12-02): SFT teaches the answers, DPO keeps them and widens the held-out margin, the
answer NLL falls at SFT.

The bounds are what the four measured runs of SFT at lr 5e-4 support (held-out answers
pretrain -> SFT -> DPO: 5 SFT epochs (the recipe), seeds 0 and 1: 0% -> 100% -> 100% both;
3 epochs, seeds 0 and 1: 0% -> 81% -> 100% and 0% -> 51% -> 62%; preferences 57% -> 100% ->
100% twice, 57% -> 94% -> 100%, 57% -> 72% -> 77%), looser than issue 30's targets (SFT >= 80%,
DPO preferences >= 90%), which the recipe met on its two runs: two runs, one pretraining seed,
1 thread only, are too few to assert them without slack (docs/LOG.md, 2026-12-02).
Run with `--threads 2`: the test has the 2 cores to itself, where 2 intra-op threads train
1.6x faster than the default 1 (benchmarks/bench_threads.py). About 8 minutes on 2 idle CPU
cores (estimated from the loaded runs' tokens/s): the longest test, marked slow."""

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
    # Held-out questions (never asked in SFT or DPO): 37 questions, 120 pairs.
    assert pre["answer_accuracy"] < 0.2  # pretraining has no chat format (0% in every run)
    assert sft["answer_accuracy"] >= pre["answer_accuracy"] + 0.3  # measured +100 (twice), +81, +51 points
    assert dpo["answer_accuracy"] >= sft["answer_accuracy"] - 0.03 - 1e-9  # 0, 0, +19, +11: one question of slack
    assert dpo["preference_accuracy"] >= max(0.7, sft["preference_accuracy"] - 0.03)  # 100%, 100%, 100%, 77%
    # continuous measures: the reference answers' NLL falls at SFT (4.70 -> 0.02-1.05), and DPO
    # widens the held-out margin over SFT's (+1.77, +1.55, +4.12, +2.75 nats) with a positive
    # implicit reward margin (0.89, 0.78, 2.06, 1.38)
    assert sft["answer_nll"] < pre["answer_nll"]
    assert dpo["preference_margin"] > sft["preference_margin"] + 0.5 and dpo["reward_margin"] > 0.3
    assert dpo["accuracy"] > 0.75  # DPO separates its own training pairs (0.92-1.00 over its last 5 logs)
    assert summary["chat"]["answer"]  # the closing chat answered (right in 3 of the 4 runs)

    for stage in ("pretrain", "sft", "dpo"):
        assert (out / stage / "plots" / "loss.png").is_file()
        assert (out / stage / "training_metrics.json").is_file()
        assert json.loads((out / stage / "heldout.json").read_text())["answer_nll"] == summary[stage]["answer_nll"]
    for png in ("rewards.png", "margins.png", "accuracy.png"):
        assert (out / "dpo" / "plots" / png).is_file()
    assert (out / "dpo_merged" / "model.safetensors").is_file()
