"""Reading prep's shards: StreamingDataset (local path or remote URL) -> packed micro-batches.

    loader = build_loader("data/sft_shards", batch_size=4, seed=42)
    for batch in loader: ...                       # dicts of tensors, see shards/collate.py
    state = loader.state_dict()                    # store in the checkpoint
    ...                                            # new process, possibly another world size
    loader = build_loader("data/sft_shards", batch_size=4, seed=42)   # a NEW loader/dataset
    loader.load_state_dict(state)                  # checks the settings, then resumes exactly

Streaming's pitfalls are handled here: the dataset gets `batch_size` equal to the loader's,
an explicit `num_canonical_nodes` (default 1, so the order does not depend on the node count
when a run resumes elsewhere), collate returns a dict of tensors, decoded arrays are copied
(they are read-only views), the loader counts rows by `sample_ids` (not by the first tensor,
which is the flat token stream), and the loader state carries what streaming's own state
lacks (batch size, shuffle settings, the manifest's fingerprint) so a resume that would
change the order fails with a clear error instead of silently training on other samples.

Local data is opened with `local=` only; remote data (s3://...) needs a cache folder unique to
the dataset object (`cache_dir`, default a fresh temporary folder). Datasets created at the
same moment on one machine (two trainings started together) take turns registering streaming's
shared-memory prefix, which streaming itself does not make atomic.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bumblefast.shards.collate import collate_rows
from bumblefast.shards.manifest import Manifest
from bumblefast.shards.schema import is_remote
from bumblefast.shards.streaming_install import missing_streaming

try:
    from streaming import StreamingDataLoader, StreamingDataset
    from streaming.base.world import World
except ModuleNotFoundError as e:  # installed --no-deps, so a plain `pip install bumblefast` lacks it
    raise missing_streaming(e) from e

STATE_VERSION = 1
PREFIX_LOCK = Path(tempfile.gettempdir()) / "bumblefast-streaming-prefix.lock"


class ResumeError(ValueError):
    """A loader state that cannot resume this loader (the sample order would change)."""


@contextlib.contextmanager
def one_registration_at_a_time():
    """Held by each node's local leader while its dataset is created. Streaming's leader looks
    for the first free shared-memory prefix, then creates it: two datasets created at once on
    one machine can pick the same prefix, and the second fails with `FileExistsError:
    '/000310_locals'` (4 processes started together: 13 of 32 failed, docs/LOG.md). A
    machine-wide file lock makes the look-and-create one process at a time; the other ranks
    of the leader's own run only look its prefix up, so they do not take it."""
    if not World.detect().is_local_leader:
        yield
        return
    fd = _prefix_lock_fd()
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock (so does the process's death)


def _prefix_lock_fd() -> int:
    """The machine's lock file, opened read-only (flock needs no more, so another user's file
    serves). Made readable by all whatever the umask; opened without O_CREAT when it exists, since
    Linux's protected_regular refuses O_CREAT on another user's file in /tmp. A user who still
    cannot open it takes a lock file of their own: their runs then take turns among themselves."""
    try:
        try:
            return os.open(PREFIX_LOCK, os.O_RDONLY)
        except FileNotFoundError:
            fd = os.open(PREFIX_LOCK, os.O_RDONLY | os.O_CREAT, 0o666)
    except PermissionError:  # another user's, unreadable to us or created by them meanwhile
        return os.open(f"{PREFIX_LOCK}.{os.getuid()}", os.O_RDONLY | os.O_CREAT, 0o600)
    with contextlib.suppress(PermissionError):  # only its owner may, and only the owner needs to
        os.fchmod(fd, 0o666)
    return fd


class ShardDataset(StreamingDataset):
    """StreamingDataset whose samples carry their index (`sample_id`) as writable arrays."""

    def __init__(self, path: str, *, cache_dir: str | None = None, **kwargs: Any):
        if is_remote(path):
            kwargs.update(remote=path, local=cache_dir or tempfile.mkdtemp(prefix="bf-shards-"))
        else:
            kwargs.update(local=path)
        with one_registration_at_a_time():
            super().__init__(**kwargs)

    def get_item(self, sample_id: int, retry: int = 7) -> Any:
        obj = super().get_item(sample_id, retry)
        out = {k: (np.array(v) if isinstance(v, np.ndarray) else v) for k, v in obj.items()}
        out["sample_id"] = int(sample_id)
        return out


class ShardLoader(StreamingDataLoader):
    """StreamingDataLoader with a checked, self-describing resume state."""

    def __init__(self, dataset: ShardDataset, *, meta: dict[str, Any], **kwargs: Any):
        super().__init__(dataset, **kwargs)
        self.meta = meta

    def _get_batch_size(self, batch: Any) -> int:
        return len(batch.sample_ids)

    def close(self) -> None:
        """Stop streaming's background threads of an unfinished epoch: until that epoch would
        have ended they hold the dataset and its shared memory (~50 file descriptors), so a
        process that trains more than once (a notebook, the tests) would leak them."""
        it, executor = getattr(self.dataset, "_iterator", None), getattr(self.dataset, "_executor", None)
        if it is not None:
            it.exit()
        if executor is not None:
            executor.shutdown(wait=True)

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "meta": dict(self.meta), "streaming": super().state_dict()}

    def load_state_dict(self, obj: dict[str, Any]) -> None:
        if not isinstance(obj, dict) or obj.get("version") != STATE_VERSION or "streaming" not in obj:
            raise ResumeError("loader state: not a bumblefast loader state (or another version)")
        saved, now = obj["meta"], self.meta
        diffs = [
            f"{k}: checkpoint has {saved.get(k)!r}, now {now.get(k)!r}"
            for k in sorted(set(saved) | set(now))
            if saved.get(k) != now.get(k)
        ]
        if diffs:
            raise ResumeError(
                "cannot resume the data loader, the sample order would change:\n  "
                + "\n  ".join(diffs)
                + "\n(use the same data and loader settings as the checkpoint, or start a new run)"
            )
        super().load_state_dict(obj["streaming"])


def build_loader(
    path: str,
    *,
    batch_size: int,
    seed: int = 42,
    shuffle: bool = True,
    num_canonical_nodes: int = 1,
    shuffle_algo: str = "py1e",
    shuffle_block_size: int | None = None,
    drop_last: bool = False,
    num_workers: int = 0,
    cache_dir: str | None = None,
    stage: str | None = None,
) -> ShardLoader:
    """A resumable loader of micro-batches (`batch_size` rows each) over a prep output."""
    manifest = Manifest.read(path)
    if stage is not None and manifest.stage != stage:
        raise ValueError(f"{path}: shards are for stage '{manifest.stage}', expected '{stage}'")
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    dataset = ShardDataset(
        path,
        cache_dir=cache_dir,
        batch_size=batch_size,
        shuffle=shuffle,
        shuffle_seed=seed,
        shuffle_algo=shuffle_algo,
        shuffle_block_size=shuffle_block_size,
        num_canonical_nodes=num_canonical_nodes,
    )
    meta = {
        "fingerprint": manifest.fingerprint,
        "stage": manifest.stage,
        "seq_len": manifest.seq_len,
        "batch_size": batch_size,
        "seed": seed,
        "shuffle": shuffle,
        "shuffle_algo": shuffle_algo,
        "shuffle_block_size": shuffle_block_size,
        "num_canonical_nodes": num_canonical_nodes,
        "drop_last": drop_last,
    }
    collate = functools.partial(collate_rows, stage=manifest.stage, seq_len=manifest.seq_len)
    return ShardLoader(
        dataset,
        meta=meta,
        batch_size=batch_size,
        collate_fn=collate,
        drop_last=drop_last,
        num_workers=num_workers,
        persistent_workers=False,
    )
