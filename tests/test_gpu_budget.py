"""The GPU run's step budgets: benchmarks/gpu/run.sh holds them, docs/performance.md ("How to
run the GPU check") shows them in a table; both must say the same, and their sum must leave
the device call (540 s, with install and environment check) its margin (issue 26)."""

from __future__ import annotations

import re

from helpers import ROOT

RUN_SH = ROOT / "benchmarks" / "gpu" / "run.sh"
DOC = ROOT / "docs" / "performance.md"


def script_budgets() -> dict[str, int]:
    return {m[1]: int(m[2]) for m in re.finditer(r"^run (\w+) (\d+) ", RUN_SH.read_text(), re.M)}


def doc_budgets() -> tuple[dict[str, int], int]:
    text = DOC.read_text()
    section = text[text.index("## How to run the GPU check") :]
    rows = {m[1]: int(m[2]) for m in re.finditer(r"^\| (\w+) \| (\d+) \|", section, re.M)}
    total = int(re.search(r"^\| \*\*sum of step timeouts\*\* \| \*\*(\d+)\*\* \|", section, re.M)[1])
    return rows, total


def test_docs_budget_table_matches_run_sh():
    steps = script_budgets()
    assert list(steps) == [
        "kernel_tests",
        "shared_prompt_cuda",
        "model_tests",
        "bench_kernels",
        "bench_train",
        "train_zero2_smoke",
    ]
    rows, total = doc_budgets()
    assert rows == steps
    assert total == sum(steps.values())
    # the script's own comments state the same sum
    assert f"add up to {total} s" in RUN_SH.read_text()
    assert f"= {total} s" in RUN_SH.read_text()
    assert total <= 450  # under 8 minutes with margin for install + environment check (< 30 s)
