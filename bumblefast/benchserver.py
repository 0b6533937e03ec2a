"""The parent's side of a benchmark's fork server (benchmarks/bench_prep.py, bench_stream.py).

A server is a child process that imports what the timed runs need once, then answers each
JSON request written to its stdin with one JSON line on stdout, prefixed by `tag` (other
output is ignored); it forks the timed runs itself, so each starts fresh without paying the
imports. Its stderr goes to `log`, whose tail is in the error when it dies.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any


class BenchServer:
    def __init__(self, cmd: list[str], *, env: dict[str, str], log: Path, tag: str, name: str, cwd: str | None = None):
        self.log, self.tag, self.name = log, tag, name
        self._err = log.open("w")
        self.proc = subprocess.Popen(
            cmd,
            env=env,
            cwd=cwd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._err,
            text=True,
        )

    def request(self, obj: Any) -> Any:
        """Send one request; the server's tagged answer."""
        self.proc.stdin.write(json.dumps(obj) + "\n")
        self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line.startswith(self.tag):
                return json.loads(line[len(self.tag) :])
        raise RuntimeError(f"{self.name} exited ({self.proc.wait()}):\n{self.log.read_text()[-3000:]}")

    def close(self) -> None:
        """End of input: the server exits (killed after 30 s)."""
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._err.close()
