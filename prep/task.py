"""One prep task: read its pieces, validate + tokenize, pack, write its own MDS shards and
task manifest (runs in a worker process, or in the main process with one worker).

A task owns everything between its input pieces and its finished folder (prep/taskstore.py):
its packer (pretrain concatenate-and-cut, sft/dpo best-fit-decreasing: rows never span two
tasks), its MDSWriter (zstd and hashes in the worker), its errors.jsonl and its counts
(`_Stats`: every record read is written or skipped, per file). The main process only
schedules tasks and joins their results (prep/join.py), so it is no ceiling on the workers.

`task.json` records the counts and a per-stage profile (seconds reading, encoding, writing
MDS; the rest is packing and counting). Test hook: `BUMBLEFAST_PREP_TEST_KILL_TASK=N` SIGKILLs
the process running task N after its first chunk is written (tests of resume only).
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from bumblefast.config import UserError
from bumblefast.prep import encode
from bumblefast.prep.encode import PretrainChunk, Result, Skipped
from bumblefast.prep.pack import BFDPacker, PretrainPacker
from bumblefast.prep.sources import file_of, file_runs
from bumblefast.prep.split import Task, iter_pieces
from bumblefast.prep.taskstore import TaskStore
from bumblefast.shards.manifest import Records
from bumblefast.shards.schema import ERRORS_NAME

CHUNK_RECORDS = 1024  # at most, per tokenizer call
CHUNK_CHARS = 64_000  # about, per chunk
HASHES = ["sha1", "xxh64"]
KILL_ENV = "BUMBLEFAST_PREP_TEST_KILL_TASK"


@dataclass
class TaskContext:
    """What every task of a prep shares (sent to the workers once)."""

    store: TaskStore
    stage: str
    seq_len: int
    pack_window: int
    shared: bool  # dpo shared_prompt layout
    on_error: str
    dtype: str
    columns: dict[str, str]
    compression: str | None
    shard_size_limit: str


def _chunks(it: Iterator[tuple[str, Any]], max_records: int, max_chars: int) -> Iterator[list]:
    """Chunks of at most `max_records` records and about `max_chars` characters: the tokenizer
    slows down by ~15% on batches much larger than its caches (measured: 1024 documents of
    ~330 chars vs 256), while short records want many per chunk to amortise the IPC."""
    chunk: list = []
    chars = 0
    for item in it:
        chunk.append(item)
        rec = item[1]
        chars += len(rec) if isinstance(rec, str) else 512  # a jsonl line; else a parsed record
        if chars >= max_chars or len(chunk) >= max_records:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


class _Stats:
    """The counts of a run: records by file and by outcome, rows, tokens."""

    def __init__(self, files: list[str]):
        self.files = {f: [0, 0] for f in files}  # per input file: [read, skipped]
        self.read = 0
        self.written = 0
        self.skipped: Counter[str] = Counter()
        self.truncated = 0
        self.rows = 0
        self.tokens = 0
        self.target_tokens = 0
        self.segments = 0
        # dpo: tokens of the pairs written, as [prompt+chosen][prompt+rejected], and of which
        # prompt tokens (counted twice, as that layout has them)
        self.pair_tokens = 0
        self.prompt_tokens = 0

    def read_from(self, runs: list[tuple[str, int]]) -> None:
        for f, n in runs:
            self.files[f][0] += n

    def by_file(self) -> dict[str, dict[str, int]]:
        return {f: {"read": r, "written": r - s, "skipped": s} for f, (r, s) in self.files.items()}

    def records(self) -> Records:
        return Records(
            read=self.read,
            written=self.written,
            skipped=sum(self.skipped.values()),
            skipped_by_reason=dict(sorted(self.skipped.items())),
            truncated=self.truncated,
            by_file=self.by_file(),
        )

    def check(self) -> None:
        """The accounting invariant: every record read was written or skipped, file by file."""
        if self.read != self.written + sum(self.skipped.values()):
            raise RuntimeError(
                f"prep lost records: read {self.read} != written {self.written} + skipped {dict(self.skipped)}"
            )
        if self.read != sum(r for r, _ in self.files.values()):
            raise RuntimeError(f"prep lost records: read {self.read} != the sum per file {self.by_file()}")


class _Sink:
    """Where a run's outcome goes: rows to the MDS writer, bad records to errors.jsonl (or a
    UserError with --on_error fail), and the counts of both to `stats`."""

    def __init__(self, writer, err_file, stats: _Stats, ctx: TaskContext):
        self.writer, self.err_file, self.stats = writer, err_file, stats
        self.dtype, self.stage, self.on_error = ctx.dtype, ctx.stage, ctx.on_error

    def skip(self, bad: Skipped) -> None:
        if self.on_error == "fail":
            raise UserError(
                f"{bad.where}: {bad.reason}: {bad.message} (use --on_error skip to log and skip bad records)"
            )
        self.stats.skipped[bad.reason] += 1
        self.stats.files[file_of(bad.where)][1] += 1
        self.err_file.write(json.dumps(bad._asdict(), ensure_ascii=False) + "\n")

    def rows(self, rows: Iterable[dict[str, np.ndarray]]) -> None:
        stats = self.stats
        for row in rows:
            row = dict(row)
            row["input_ids"] = np.ascontiguousarray(row["input_ids"], dtype=self.dtype)
            self.writer.write(row)
            n = len(row["input_ids"])
            stats.rows += 1
            stats.tokens += n
            if self.stage == "pretrain":
                stats.segments += len(row["doc_lens"])
                # next-token targets inside documents
                stats.target_tokens += n - len(row["doc_lens"])
            else:
                stats.segments += len(row["seq_lens"])
                stats.target_tokens += int(row["loss_mask"].sum())


def _take(chunk_out: list[Result] | PretrainChunk, packer, sink: _Sink) -> int:
    """Count, log and pack one encoded chunk, writing the rows it completes; returns its records."""
    stats = sink.stats
    if isinstance(chunk_out, PretrainChunk):  # documents packed per chunk
        stats.read += chunk_out.read
        stats.read_from(chunk_out.files)
        for bad in chunk_out.errors:
            sink.skip(bad)
        stats.written += len(chunk_out.lens)
        stats.truncated += chunk_out.truncated
        sink.rows(packer.add_many(chunk_out.flat, chunk_out.lens))
        return chunk_out.read
    stats.read_from(file_runs(chunk_out))
    for r in chunk_out:
        stats.read += 1
        if isinstance(r, Skipped):
            sink.skip(r)
            continue
        stats.written += 1
        stats.truncated += r.truncated
        stats.pair_tokens += r.pair_tokens
        stats.prompt_tokens += 2 * r.prompt_tokens
        sink.rows(packer.add(r.segments, r.prompt_len))
    return len(chunk_out)


class _TimedWriter:
    """MDSWriter.write with its time counted (MDS encoding, zstd and hashes happen inside it)."""

    def __init__(self, writer):
        self.w, self.seconds = writer, 0.0

    def write(self, row) -> None:
        t = time.perf_counter()
        self.w.write(row)
        self.seconds += time.perf_counter() - t


def _timed(it: Iterator, box: list[float]) -> Iterator:
    """`it`, with the time spent producing its items added to box[0]."""
    while True:
        t = time.perf_counter()
        try:
            item = next(it)
        except StopIteration:
            box[0] += time.perf_counter() - t
            return
        box[0] += time.perf_counter() - t
        yield item


def run_task(ctx: TaskContext, task: Task, on_records=None) -> dict[str, Any]:
    """Run one task to its finished folder; returns its task manifest (also in task.json)."""
    from bumblefast.shards.mds_writer import open_writer

    enc = encode.current_encoder()
    t0, cpu0 = time.perf_counter(), time.process_time()
    local, remote, side = ctx.store.begin(task.name)
    if ctx.stage == "pretrain":
        packer = PretrainPacker(ctx.seq_len)
    else:
        packer = BFDPacker(ctx.seq_len, ctx.pack_window, ctx.shared)
    mds = open_writer(  # local: streaming's bytes without importing it; remote: streaming's MDSWriter
        out=(str(local), remote) if remote else str(local),
        columns=ctx.columns,
        compression=ctx.compression or None,
        hashes=HASHES,
        size_limit=ctx.shard_size_limit,
        exist_ok=bool(remote),  # a rerun overwrites an unfinished remote task in place
    )
    writer = _TimedWriter(mds)
    stats = _Stats(task.files)
    read_s, encode_s = [0.0], 0.0
    kill = os.environ.get(KILL_ENV) == str(task.index)
    with open(side / ERRORS_NAME, "w", encoding="utf-8") as err_file:
        sink = _Sink(writer, err_file, stats, ctx)
        for chunk in _timed(_chunks(iter_pieces(task.pieces), CHUNK_RECORDS, CHUNK_CHARS), read_s):
            t = time.perf_counter()
            out = enc.encode_chunk(chunk)
            encode_s += time.perf_counter() - t
            n = _take(out, packer, sink)
            if on_records is not None:
                on_records(n)
            if kill:
                err_file.flush()
                os.kill(os.getpid(), signal.SIGKILL)
        sink.rows(packer.finish())
    t = time.perf_counter()
    mds.finish()
    writer.seconds += time.perf_counter() - t
    stats.check()
    total = time.perf_counter() - t0
    summary = {
        "index": task.index,
        "pieces": [p.as_list() for p in task.pieces],
        "records": _plain(stats.records()),
        "rows": stats.rows,
        "segments": stats.segments,
        "tokens": {
            "real": stats.tokens,
            "target": stats.target_tokens,
            "row_capacity": stats.rows * ctx.seq_len,
            "tail_tokens_dropped": getattr(packer, "tail_tokens_dropped", 0),
        },
        "pair_tokens": stats.pair_tokens,
        "prompt_tokens": stats.prompt_tokens,
        "backend": enc.backend.name,
        "profile": {
            "seconds": round(total, 4),
            "cpu_seconds": round(time.process_time() - cpu0, 4),
            "read": round(read_s[0], 4),
            "encode": round(encode_s, 4),
            "write_mds": round(writer.seconds, 4),
            "pack_and_count": round(max(total - read_s[0] - encode_s - writer.seconds, 0.0), 4),
            "pid": os.getpid(),
        },
    }
    ctx.store.finish(task.name, side, summary)
    return summary


def _plain(rec: Records) -> dict:
    import dataclasses

    return dataclasses.asdict(rec)


# ---- worker processes (one Encoder per process, inherited through fork) -----------------------
_CTX: TaskContext | None = None


def init_task_worker(ctx: TaskContext, settings, inherited: bool) -> None:
    global _CTX
    _CTX = ctx
    encode.init_worker(settings, inherited)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles ^C and stops the pool


def task_in_worker(task: Task) -> dict[str, Any]:
    assert _CTX is not None
    return run_task(_CTX, task)
