"""The README's first command end to end: `bumblefast demo` on the bundled data, as a user
runs it (tokenizer, prep, pretrain, SFT, DPO with LoRA, merge, chat, plots): every stage's
outputs exist, SFT teaches the answer format and DPO does not undo SFT on held-out questions.

Run with `--threads 2`: the test has the 2 cores to itself, where 2 intra-op threads train
1.6x faster than the default 1 (benchmarks/bench_threads.py); what is asserted below held in
every observed run at 1 and 2 threads. About 10 minutes on 2 CPU cores: the longest test, marked slow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

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
    assert "held-out answers" in res.stdout and "outputs in" in res.stdout

    summary = json.loads((out / "summary.json").read_text())
    pre, sft, dpo = summary["pretrain"], summary["sft"], summary["dpo"]
    # Held-out questions (never asked in SFT or DPO). Float reduction order moves how much a
    # 3M-parameter model learns in minutes of CPU: seeds 0-2 x 1 and 2 threads gave answers
    # 0% -> 19-95% -> 65-89%, preferences 62-65% -> 64-99% -> 82-98%; the same seed after a
    # change of the LM head's chunk size only (same math, other summation order) gave 0% -> 11%
    # -> 22% and 62% -> 55% -> 64%, DPO separating 66% of its training pairs (docs/LOG.md).
    # So only what every observed order supports is asserted: SFT teaches the answer format
    # (pretraining never answers), and DPO does not undo SFT; how far each stage lifts the
    # accuracies is measured and reported (README, docs/LOG.md), not asserted.
    assert sft["answer_accuracy"] > pre["answer_accuracy"]
    assert dpo["answer_accuracy"] >= sft["answer_accuracy"] - 0.1  # 4 of 37 questions
    assert dpo["preference_accuracy"] >= sft["preference_accuracy"] - 0.05  # 6 of 120 pairs
    assert dpo["accuracy"] > 0.55  # DPO separated more of its training pairs than chance
    assert pre["loss"] < 1.5

    for stage in ("pretrain", "sft", "dpo"):
        assert (out / stage / "plots" / "loss.png").is_file()
        assert (out / stage / "training_metrics.json").is_file()
    assert (out / "dpo" / "plots" / "rewards.png").is_file()
    assert (out / "dpo_merged" / "model.safetensors").is_file()
    assert "Q: " in res.stdout and "-> A: " in res.stdout  # the chat step answered
