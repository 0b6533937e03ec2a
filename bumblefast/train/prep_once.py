"""Raw `--dataset_path` on one or many nodes: prep once per cache, everyone else waits on a file.

A collective barrier is the wrong wait for a prep: it holds every rank for as long as the prep
takes and ends in the process-group timeout (10-30 min) with no word; and with the cache in a
node-local `~/.cache`, ranks on other nodes never see what global rank 0 wrote there.

So the local rank 0 of each node (``LOCAL_RANK`` from torchrun / the deepspeed launcher) that
first creates ``<cache>.lock`` (``O_EXCL``) preps; the other ranks poll for the cache's
manifest and say every 30 s what they wait for. With a node-local cache every node preps its
own copy; with a cache on a shared file system one local rank 0 preps and the others wait on
the same lock. A failed prep writes ``<cache>.failed`` with its error, so the waiters stop
with it instead of hanging; a lock left by a dead process on this host is taken over. Then
:func:`wait_for_ranks` holds every rank until all have their data, polling the process
group's store with the same messages instead of blocking in a collective.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from bumblefast.config import UserError

REPORT_S = 30.0  # how often a waiting rank says what it waits for
POLL_S = 1.0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def nodes() -> int:
    """Number of nodes as the launcher tells it (WORLD_SIZE / LOCAL_WORLD_SIZE), 1 if unknown."""
    world, local = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_WORLD_SIZE", "0"))
    return max(world // local, 1) if local > 0 else 1


def _say(msg: str) -> None:
    print(f"[{socket.gethostname()} rank {os.environ.get('RANK', '0')}] {msg}", flush=True)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # absent, or being written
        return None


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _take_lock(lock: Path) -> str | None:
    """Create the lock if nobody holds it; returns our token."""
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return None
    token = uuid.uuid4().hex
    with os.fdopen(fd, "w") as f:
        json.dump({"host": socket.gethostname(), "pid": os.getpid(), "token": token, "since": time.time()}, f)
    return token


def _dead_here(holder: dict) -> bool:
    """The holder ran on this host and its process is gone (a killed run's lock)."""
    if holder.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, KeyError, ValueError, TypeError):
        return False
    return False


def prep_once(
    out: Path,
    prep: Callable[[], None],
    may_prep: bool,
    report_s: float = REPORT_S,
    poll_s: float = POLL_S,
    timeout_s: float | None = None,
    say: Callable[[str], None] = _say,
) -> bool:
    """Make sure `out` holds a finished prep (its manifest); returns True if this process ran
    `prep`. `may_prep`: this rank may take the lock (the node's local rank 0); others only wait.
    Waiting says where it stands every `report_s` seconds; `timeout_s` (None: no limit) stops it."""
    # imported here: importing bumblefast.shards loads streaming, slow for the store-wait test
    from bumblefast.shards.manifest import MANIFEST_NAME

    out = Path(out)
    manifest, lock, failed = out / MANIFEST_NAME, out.with_name(out.name + ".lock"), out.with_name(out.name + ".failed")
    out.parent.mkdir(parents=True, exist_ok=True)
    t0, started = time.monotonic(), time.time()
    next_report = t0 + report_s
    tokens: set[str] = set()  # the locks seen while waiting: their failures are ours to report
    while True:
        if manifest.is_file():
            return False
        if may_prep and (token := _take_lock(lock)) is not None:
            try:
                failed.unlink(missing_ok=True)  # an older run's failure
                if manifest.is_file():  # finished between our check and the lock
                    return False
                prep()
                return True
            except BaseException as e:
                note = {"token": token, "host": socket.gethostname(), "error": f"{type(e).__name__}: {e}"}
                failed.write_text(json.dumps(note))
                raise
            finally:
                lock.unlink(missing_ok=True)
        holder = _read_json(lock)
        if holder:
            tokens.add(str(holder.get("token")))
            if may_prep and _dead_here(holder):
                say(f"removing the lock of a dead process (pid {holder.get('pid')}): {lock}")
                lock.unlink(missing_ok=True)
                continue
        note = _read_json(failed)
        if note and (note.get("token") in tokens or _mtime(failed) >= started):
            raise UserError(f"dataset_path: preparing {out} failed on {note.get('host')}: {note.get('error')}")
        now = time.monotonic()
        if timeout_s is not None and now - t0 > timeout_s:
            raise UserError(
                f"dataset_path: gave up after {now - t0:.0f} s waiting for {out} to be prepped "
                f"({_who(holder, lock)}); prep it ahead with `bumblefast prep` and pass that folder"
            )
        if now >= next_report:
            say(f"waiting {now - t0:.0f} s for {out} ({_who(holder, lock)})")
            next_report = now + report_s
        time.sleep(poll_s)


def _who(holder: dict | None, lock: Path) -> str:
    if not holder:
        return "the local rank 0 of this node is starting the prep"
    since = time.strftime("%H:%M:%S", time.localtime(holder.get("since", 0)))
    return (
        f"being prepped by {holder.get('host')} pid {holder.get('pid')} since {since}; if no such process "
        f"runs, delete {lock}"
    )


_barriers = 0


def wait_for_ranks(
    what: str, report_s: float = REPORT_S, poll_s: float = POLL_S, say: Callable[[str], None] = _say
) -> None:
    """A barrier over all ranks that polls the process group's store (each poll returns at
    once), so no rank sits in a collective longer than the process-group timeout, and the
    waiting ranks say every `report_s` seconds how many ranks are ready."""
    import torch.distributed as dist

    global _barriers
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    _barriers += 1
    store, world = dist.distributed_c10d._get_default_store(), dist.get_world_size()
    key = f"bumblefast/{what}/{_barriers}"
    ready, t0 = store.add(key, 1), time.monotonic()
    next_report = t0 + report_s
    while ready < world:
        time.sleep(poll_s)
        ready = store.add(key, 0)
        if ready < world and time.monotonic() >= next_report:
            say(f"{ready} of {world} ranks have {what}; waiting {time.monotonic() - t0:.0f} s for the rest")
            next_report = time.monotonic() + report_s
