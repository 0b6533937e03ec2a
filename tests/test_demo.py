"""The README's first command end to end: `bumblefast demo` on the bundled data, as a user
runs it (tokenizer, prep, pretrain, SFT, DPO with LoRA, merge, chat, plots), and the
held-out answer and preference accuracies improve stage over stage.

About 6-9 minutes on 2 CPU cores (one thread per training process): the longest test, marked slow."""

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
        [sys.executable, "-m", "bumblefast", "demo", "--out", str(out)],
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
    # Held-out questions (never asked in SFT or DPO). What every observed run supports (docs/LOG.md,
    # 2026-12-01, AMD EPYC, the data since then, seeds 0-2, 1 thread): answers 0% -> 19-95% ->
    # 38-95%, preferences 62-65% -> 64-99% -> 67-99%. SFT always lifts the answers (the plateau
    # it sat on before is gone); preferences end above pretraining's after DPO, but a seed's SFT
    # or DPO step alone can leave them flat or 10 points lower (seeds 1 and 0), so neither step's
    # preference change is asserted: which way it goes depends on float reduction order.
    assert sft["answer_accuracy"] >= pre["answer_accuracy"] + 0.1  # 4 of 37 questions
    assert dpo["preference_accuracy"] >= pre["preference_accuracy"] + 0.025  # 3 of 120 pairs
    assert dpo["answer_accuracy"] >= sft["answer_accuracy"] - 0.1
    assert dpo["accuracy"] > 0.5  # DPO separated its training pairs (rewards/accuracies, last logs)
    assert pre["loss"] < 1.5

    for stage in ("pretrain", "sft", "dpo"):
        assert (out / stage / "plots" / "loss.png").is_file()
        assert (out / stage / "training_metrics.json").is_file()
    assert (out / "dpo" / "plots" / "rewards.png").is_file()
    assert (out / "dpo_merged" / "model.safetensors").is_file()
    assert "Q: " in res.stdout and "-> A: " in res.stdout  # the chat step answered
