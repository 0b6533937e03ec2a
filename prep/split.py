"""Multi-node prep: each node reads only its share of the input.

The input files are laid end to end (sorted, as `expand_inputs` lists them) and the total
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
from typing import Any

from bumblefast.prep.sources import BadRecord, RawJSON, iter_records

SPLITTABLE = (".jsonl",)
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


def iter_jsonl_range(path: str, start: int, end: int) -> Iterator[tuple[str, Any]]:
    """The lines of a jsonl file whose first byte lies in [start, end), as `iter_jsonl` yields them."""
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
            yield f"{path}:{lineno}", RawJSON(line)


def iter_share(share: list[tuple[str, int, int | None]]) -> Iterator[tuple[str, Any]]:
    for path, start, end in share:
        if end is None:
            yield from iter_records([path])
        else:
            yield from iter_jsonl_range(path, start, end)
