"""Where a prep's tasks live until they are joined, and what makes a task finished.

Local output `/a/out`: the work folder is the hidden sibling `/a/.out.tasks`; remote output
`s3://b/out`: the output URL itself. Under it, `tasks/plan.json` holds the settings and the cut
(written by the first executor; every later one must agree, see `check_plan`) and
`tasks/tNNNNNN/` one task's shards, `index.json`, `errors.jsonl` and `task.json`. A task is
finished when its `task.json` exists, which is written last: locally the task is written into
`tNNNNNN.tmp-HOST-PID` and renamed into place after `task.json` (fsynced first); remotely
`task.json` is uploaded after everything else. A killed task leaves only a `.tmp-` folder
(removed when the task starts again) or, remotely, files without `task.json` (overwritten).
The work folder of a local output is deleted once its tasks are joined into the output.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any

from bumblefast.config import UserError
from bumblefast.shards.manifest import fsync_tree, upload_files
from bumblefast.shards.schema import is_remote

TASK_MANIFEST = "task.json"
PLAN = "plan.json"


class TaskStore:
    def __init__(self, output_dir: str):
        self.output_dir = output_dir
        self.remote = is_remote(output_dir)
        if self.remote:
            self.root = output_dir.rstrip("/")
        else:
            out = Path(output_dir).resolve()
            self.root = str(out.parent / f".{out.name}.tasks")

    # -- paths -----------------------------------------------------------------------------------
    def url(self, rel: str) -> str:
        return f"{self.root}/tasks/{rel}"

    def local_task_dir(self, name: str) -> Path:
        return Path(self.root, "tasks", name)

    def exists(self) -> bool:
        return self.read_bytes(PLAN) is not None

    # -- reading ---------------------------------------------------------------------------------
    def read_bytes(self, rel: str) -> bytes | None:
        """`tasks/REL`'s bytes, or None when it does not exist (remote: cannot be downloaded)."""
        if not self.remote:
            p = Path(self.url(rel))
            return p.read_bytes() if p.is_file() else None
        from streaming.base.storage import CloudDownloader

        with tempfile.TemporaryDirectory(prefix="bf-task-") as tmp:
            dest = os.path.join(tmp, "f")
            try:
                CloudDownloader.direct_download(self.url(rel), dest)
            except Exception:  # noqa: BLE001 - any storage error: not there (not finished)
                return None
            return Path(dest).read_bytes()

    def read_json(self, rel: str) -> Any | None:
        data = self.read_bytes(rel)
        return None if data is None else json.loads(data)

    def done(self, name: str) -> dict | None:
        """The task manifest of a finished task, else None."""
        return self.read_json(f"{name}/{TASK_MANIFEST}")

    # -- the plan --------------------------------------------------------------------------------
    def check_plan(self, plan: dict) -> bool:
        """Record `plan` (settings + cut) or check it against the recorded one; returns True if
        tasks of an earlier run (with the same settings) may be reused. A different setting is
        refused, naming it: tasks of two settings never mix."""
        old = self.read_json(PLAN)
        fresh = old is None
        if fresh:
            self._write_plan(plan)
            old = self.read_json(PLAN)  # another node may have been first
        # `header` (what the joined manifest says about the tokenizer backend etc.) is no setting
        diff = [k for k in plan if k != "header" and plan.get(k) != old.get(k)]
        if diff:
            parts = "; ".join(f"{k}: {_short(old.get(k))} there, {_short(plan.get(k))} now" for k in diff)
            raise UserError(
                f"{self.output_dir}: the unfinished prep in {self.root} was started with other settings "
                f"({parts}); rerun with the same settings to resume it, or delete {self.root} to start over"
            )
        return not fresh

    def _write_plan(self, plan: dict) -> None:
        data = json.dumps(plan, indent=1, ensure_ascii=False) + "\n"  # key order kept: the manifest's
        if self.remote:
            with tempfile.TemporaryDirectory(prefix="bf-plan-") as tmp:
                Path(tmp, PLAN).write_text(data, encoding="utf-8")
                upload_files(Path(tmp), self.root + "/tasks", [PLAN])
            return
        folder = Path(self.root, "tasks")
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{PLAN}.tmp-{_me()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, folder / PLAN)  # fails if another executor wrote it first
        except FileExistsError:
            pass
        finally:
            tmp.unlink()

    # -- writing one task ------------------------------------------------------------------------
    def begin(self, name: str) -> tuple[Path, str | None, Path]:
        """Where to write task `name`: the MDS folder (not yet created: MDSWriter creates it), its
        remote URL (None: local), and the folder for errors.jsonl and task.json (the MDS folder
        locally; remotely a separate one, as MDSWriter deletes its local copy after the upload).
        Leftovers of a killed attempt at this task are removed first."""
        if self.remote:
            tmp = Path(tempfile.mkdtemp(prefix=f"bf-{name}-"))
            (tmp / "side").mkdir()
            return tmp / "mds", self.url(name), tmp / "side"
        folder = Path(self.root, "tasks")
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob(f"{name}.tmp-*"):
            shutil.rmtree(old, ignore_errors=True)
        local = folder / f"{name}.tmp-{_me()}"
        return local, None, local

    def finish(self, name: str, local: Path, summary: dict) -> None:
        """Write the task manifest last: after it the task counts as finished."""
        (local / TASK_MANIFEST).write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        if self.remote:
            try:
                upload_files(local, self.url(name), ["errors.jsonl", TASK_MANIFEST])
            finally:
                shutil.rmtree(local.parent, ignore_errors=True)
            return
        fsync_tree(local)
        final = self.local_task_dir(name)
        if final.exists():  # an older attempt's result (never expected: finished tasks are skipped)
            shutil.rmtree(final)
        os.replace(local, final)

    def remove(self) -> None:
        """Delete a local work folder (after its tasks were joined, or when the run failed on bad input)."""
        if not self.remote:
            shutil.rmtree(self.root, ignore_errors=True)


def _me() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 80 else text[:77] + "..."
