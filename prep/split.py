"""Cutting the input: into tasks of a fixed size (prep's unit of work), and node shares.

Tasks (`cut_tasks`): the input files in reading order, cut into pieces of about `task_bytes`.
A `.jsonl` or `.txt` file larger than that is cut into byte ranges (a line belongs to the
range that holds its first byte, as below); a parquet file larger than that is cut by row
groups; any other file (JSON arrays, compressed files) is one piece. Consecutive small pieces
share a task up to `task_bytes`. The cut depends on the file sizes and `task_bytes` only, so
every executor (worker, node) of a prep sees the same tasks.

Node shares (`node_share`, the older unit, kept for benchmarks): the input files are laid end
to end (sorted, as `expand_inputs` lists them) and the total
byte count is cut into `num_nodes` equal intervals. Plain `.jsonl` files are split inside:
a line belongs to the node whose interval holds its first byte, so every line is read by
exactly one node and no line is cut. Files that cannot be entered at a byte offset (JSON
arrays, compressed files, parquet) go whole to the node whose interval holds their first
byte. A node seeks to its range; to name bad records by exact line it counts the newlines
before its range (`bytes.count` at memory speed, no decoding or parsing).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from bumblefast.prep.sources import BadRecord, RawJSON, TextLine, iter_records
from bumblefast.shards.mds_writer import parse_bytes  # noqa: F401 - re-exported: prep.run uses it

SPLITTABLE = (".jsonl",)
LINE_FILES = (".jsonl", ".txt")  # cut into byte ranges by tasks
BLOCK = 1 << 24  # bytes per read when counting newlines


def _splittable(path: str) -> bool:
    return path.lower().endswith(SPLITTABLE)


def node_share(files: list[str], node_rank: int, num_nodes: int) -> list[tuple[str, int, int | None]]:
    """This node's (path, start byte, end byte) pieces; end None: the whole file."""
    if num_nodes <= 1:
        return [(f, 0, None) for f in files]
    sizes = [os.path.getsize(f) for f in files]
    total = sum(sizes)
    lo, hi = total * node_rank // num_nodes, total * (node_rank + 1) // num_nodes
    out, base = [], 0
    for f, size in zip(files, sizes, strict=True):
        if _splittable(f) and size > 0:
            a, b = max(lo - base, 0), min(hi - base, size)
            if a < b:
                out.append((f, a, b))
        elif lo <= base < hi or (node_rank == num_nodes - 1 and base == total):
            out.append((f, 0, None))
        base += size
    return out


def _line_start(f, start: int) -> int:
    """The first line start at or after `start` (a line that begins earlier is the previous node's)."""
    if start == 0:
        return 0
    f.seek(start - 1)
    if f.read(1) == b"\n":
        return start
    f.readline()
    return f.tell()


def _newlines_before(f, pos: int) -> int:
    f.seek(0)
    n, left = 0, pos
    while left > 0:
        block = f.read(min(BLOCK, left))
        if not block:
            break
        n += block.count(b"\n")
        left -= len(block)
    return n


def iter_jsonl_range(path: str, start: int, end: int, wrap=RawJSON) -> Iterator[tuple[str, Any]]:
    """The lines of a jsonl file whose first byte lies in [start, end), as `iter_jsonl` yields them
    (`wrap=TextLine`: a .txt file's lines, as `iter_txt` yields them)."""
    strip = wrap is TextLine
    with open(path, "rb", buffering=1 << 20) as f:
        pos = _line_start(f, start)
        lineno = _newlines_before(f, pos)
        f.seek(pos)
        while pos < end:
            raw = f.readline()
            if not raw:
                break
            pos += len(raw)
            lineno += 1
            if raw.isspace():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield (
                    f"{path}:{lineno}",
                    BadRecord("invalid_utf8", f"text is not valid UTF-8 (byte {e.start})"),
                )
                continue
            yield f"{path}:{lineno}", wrap(line.rstrip("\r\n") if strip else line)


def iter_share(share: list[tuple[str, int, int | None]]) -> Iterator[tuple[str, Any]]:
    for path, start, end in share:
        if end is None:
            yield from iter_records([path])
        else:
            yield from iter_jsonl_range(path, start, end)


# ---- tasks --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Piece:
    """Part of one input file: `unit` "file" (the whole file), "bytes" (the lines starting in
    [start, end)) or "row_groups" (parquet row groups [start, end))."""

    path: str
    unit: str
    start: int
    end: int

    def as_list(self) -> list:
        return [self.path, self.unit, self.start, self.end]


@dataclass(frozen=True)
class Task:
    index: int
    pieces: tuple[Piece, ...]

    @property
    def name(self) -> str:
        return f"t{self.index:06d}"

    @property
    def files(self) -> list[str]:
        return list(dict.fromkeys(p.path for p in self.pieces))


def _row_group_bytes(path: str) -> list[int]:
    import pyarrow.parquet as pq

    md = pq.ParquetFile(path).metadata
    return [
        sum(md.row_group(g).column(c).total_compressed_size for c in range(md.num_columns))
        for g in range(md.num_row_groups)
    ]


def _file_pieces(path: str, task_bytes: int) -> list[tuple[Piece, int]]:
    """One file's pieces and their sizes in bytes."""
    size = os.path.getsize(path)
    name = path.lower()
    if size > task_bytes and name.endswith(LINE_FILES):
        n = -(-size // task_bytes)
        cuts = [size * k // n for k in range(n + 1)]
        return [(Piece(path, "bytes", a, b), b - a) for a, b in zip(cuts, cuts[1:]) if b > a]
    if size > task_bytes and name.endswith(".parquet"):
        groups = _row_group_bytes(path)
        out, lo, acc = [], 0, 0
        for g, nbytes in enumerate(groups):
            if acc and acc + nbytes > task_bytes:
                out.append((Piece(path, "row_groups", lo, g), acc))
                lo, acc = g, 0
            acc += nbytes
        if lo < len(groups):
            out.append((Piece(path, "row_groups", lo, len(groups)), acc))
        if len(out) > 1:
            return out
    return [(Piece(path, "file", 0, size), size)]


def cut_tasks(files: list[str], task_bytes: int) -> list[Task]:
    """The tasks of a prep, in input order (see the module docstring)."""
    tasks: list[Task] = []
    current: list[Piece] = []
    acc = 0
    for f in files:
        for piece, nbytes in _file_pieces(f, task_bytes):
            if current and acc + nbytes > task_bytes:
                tasks.append(Task(len(tasks), tuple(current)))
                current, acc = [], 0
            current.append(piece)
            acc += nbytes
    if current:
        tasks.append(Task(len(tasks), tuple(current)))
    return tasks


def _iter_row_groups(path: str, lo: int, hi: int) -> Iterator[tuple[str, Any]]:
    """Records of parquet row groups [lo, hi), named by their row in the whole file (as iter_parquet)."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    row = sum(pf.metadata.row_group(g).num_rows for g in range(lo))
    for batch in pf.iter_batches(batch_size=4096, row_groups=list(range(lo, hi))):
        for rec in batch.to_pylist():
            row += 1
            yield f"{path}:{row}", rec


def iter_pieces(pieces) -> Iterator[tuple[str, Any]]:
    """Every record of a task's pieces, in order, each at its exact file:line."""
    for p in pieces:
        if p.unit == "file":
            yield from iter_records([p.path])
        elif p.unit == "row_groups":
            yield from _iter_row_groups(p.path, p.start, p.end)
        else:
            wrap = TextLine if p.path.lower().endswith(".txt") else RawJSON
            yield from iter_jsonl_range(p.path, p.start, p.end, wrap)
