"""The trainer's test hooks, as loop.Callback objects (not in the product's Run): a JSON line
per step with each rank's sample ids, and losses made NaN on chosen (step, rank) pairs.

In this process: `train_in_process(argv, callbacks)`. In a child process (multi-rank runs,
SIGKILL): `python tests/train_hooks.py train ...` (or torchrun on this file) is the
`bumblefast` CLI with the hooks the environment names: TRACE_ENV (a file) and NAN_ENV
('step:rank,...')."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

from bumblefast.train import distributed as D
from bumblefast.train.loop import Callback

SCRIPT = Path(__file__).resolve()
TRACE_ENV, NAN_ENV = "BUMBLEFAST_TEST_SAMPLE_TRACE", "BUMBLEFAST_TEST_INJECT_NAN"


class SampleTrace(Callback):
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def on_step_end(self, run, sample_ids):
        with self.path.open("a") as f:
            f.write(json.dumps({"step": run.step + 1, "rank": D.rank(), "sample_ids": sum(sample_ids, [])}) + "\n")


class InjectNaN(Callback):
    def __init__(self, pairs: set[tuple[int, int]]):
        self.pairs = pairs

    def on_loss(self, run, loss):
        return loss * float("nan") if (run.step + 1, D.rank()) in self.pairs else loss


def from_env() -> list[Callback]:
    hooks: list[Callback] = []
    if os.environ.get(TRACE_ENV):
        hooks.append(SampleTrace(os.environ[TRACE_ENV]))
    if os.environ.get(NAN_ENV):
        hooks.append(InjectNaN({tuple(map(int, p.split(":"))) for p in os.environ[NAN_ENV].split(",")}))
    return hooks


def cli_with(callbacks: list[Callback], argv: list[str]) -> int:
    """`bumblefast <argv>` with the callbacks handed to the train loop."""
    from bumblefast import cli
    from bumblefast.train import loop

    with mock.patch.object(loop, "main", functools.partial(loop.main, callbacks=callbacks)):
        return cli.main(argv)


def train_in_process(argv: list[str], callbacks: list[Callback] | None = None) -> tuple[int, str, str]:
    """`bumblefast <argv>` in this process (with conftest's one_rank fixture): exit code, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli_with(callbacks or [], argv)
    return rc, out.getvalue(), err.getvalue()


def run_here(cmd: list[str], callbacks: list[Callback] | None = None, rc: int = 0) -> subprocess.CompletedProcess:
    """A one-process `bumblefast train` command line (helpers.train_command) run in this process
    (with the one_rank fixture), checked for exit code `rc`; stdout/stderr as a child's would be."""
    argv = cmd[cmd.index("train") :]
    code, stdout, stderr = train_in_process(argv, callbacks)
    assert code == rc, f"{' '.join(map(str, argv))}: exit {code}\n{stdout[-3000:]}\n{stderr[-5000:]}"
    return subprocess.CompletedProcess(argv, code, stdout, stderr)


if __name__ == "__main__":
    sys.exit(cli_with(from_env(), sys.argv[1:]))
