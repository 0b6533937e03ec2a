"""Raw input -> a stream of (where, record-or-error): json arrays, jsonl (plain/gz/zst), parquet.

Nothing loads a whole corpus: JSON arrays are parsed incrementally element by element
(`json.JSONDecoder.raw_decode` over a sliding buffer; one element must fit in memory), jsonl
line by line, parquet in record batches. `where` is `file:line` (parquet: `file:row`).

Nothing is lost silently: a malformed array element is one bad record, and reading resumes at
the next element (the next ',' or ']' at nesting depth 0 outside strings). A file that cannot
be resynchronised (truncated, a string or bracket left open to the end) or that has data after
its closing ']' raises UnreadableInput, naming the line and the bytes not read.

Bytes that are not UTF-8 are decoded with `surrogateescape` so the record boundary survives;
the record is then reported as `invalid_utf8` instead of silently altered.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import json.scanner
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bumblefast.config import UserError

SUFFIXES = (".json", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".json.gz", ".json.zst", ".parquet", ".txt")
CHUNK_CHARS = 1 << 20
MAX_ELEMENT_CHARS = 256 << 20  # one JSON array element larger than this is reported as malformed


@dataclass
class BadRecord:
    """A record that could not even be parsed; validation errors use RecordError instead."""

    reason: str
    message: str


def _kind(path: str) -> str | None:
    name = path.lower()
    for suf in SUFFIXES:
        if name.endswith(suf):
            return suf
    return None


def expand_inputs(inputs: list[str]) -> list[str]:
    """Files, globs and folders (searched recursively) -> a sorted, de-duplicated file list."""
    files: list[str] = []
    missing = []
    for item in inputs:
        if os.path.isdir(item):
            found = [str(p) for p in sorted(Path(item).rglob("*")) if p.is_file() and _kind(str(p))]
            if not found:
                missing.append(f"{item} (folder has no {'/'.join(SUFFIXES)} files)")
            files.extend(found)
        elif any(ch in item for ch in "*?["):
            found = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
            if not found:
                missing.append(f"{item} (glob matched nothing)")
            files.extend(found)
        elif os.path.isfile(item):
            files.append(item)
        else:
            missing.append(f"{item} (not found)")
    if missing:
        raise UserError("input not readable:\n  " + "\n  ".join(missing))
    seen, out = set(), []
    for f in files:
        if f not in seen and _kind(f):
            seen.add(f)
            out.append(f)
        elif not _kind(f):
            raise UserError(f"{f}: unsupported file type (use {', '.join(SUFFIXES)})")
    return out


def _open_text(path: str) -> io.TextIOBase:
    name = path.lower()
    if name.endswith(".gz"):
        raw = gzip.open(path, "rb")
    elif name.endswith(".zst"):
        import zstandard

        raw = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)
    else:
        raw = open(path, "rb")
    return io.TextIOWrapper(io.BufferedReader(raw), encoding="utf-8", errors="surrogateescape", newline="")


def _has_surrogate(obj: Any) -> bool:
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
            return False
        except UnicodeEncodeError:
            return True
    if isinstance(obj, dict):
        return any(_has_surrogate(k) or _has_surrogate(v) for k, v in obj.items())
    if isinstance(obj, list):
        return any(_has_surrogate(v) for v in obj)
    return False


def _checked(obj: Any) -> Any:
    if _has_surrogate(obj):
        return BadRecord("invalid_utf8", "text is not valid UTF-8")
    return obj


_SCAN = json.scanner.make_scanner(json.JSONDecoder())  # C scanner: (obj, end) = _SCAN(s, idx)


class RawJSON(str):
    """One jsonl line, parsed later by the worker that tokenizes it (keeps the reader light)."""

    __slots__ = ()

    def parse(self) -> Any:
        try:
            if self[:1] == "{":  # the common case, without json.loads' wrapper layers
                obj, end = _SCAN(self, 0)
                if end != len(self) and not self[end:].isspace():
                    raise json.JSONDecodeError("Extra data", self, end)
            else:
                obj = json.loads(self)
        except StopIteration as e:
            return BadRecord("malformed_json", f"not valid JSON: expecting value (column {e.value + 1})")
        except json.JSONDecodeError as e:
            return BadRecord("malformed_json", f"not valid JSON: {e.msg} (column {e.colno})")
        if "\\ud" in self or "\\uD" in self:  # escaped lone surrogates, rare: check deeply
            return _checked(obj)
        return obj


def _open_binary(path: str) -> io.BufferedIOBase:
    name = path.lower()
    if name.endswith(".gz"):
        return io.BufferedReader(gzip.open(path, "rb"), 1 << 20)
    if name.endswith(".zst"):
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True), 1 << 20)
    return open(path, "rb", buffering=1 << 20)


def _iter_lines(path: str, wrap) -> Iterator[tuple[str, Any]]:
    """Non-blank lines of a (possibly compressed) text file as `wrap(line)`, each at file:line;
    bytes that are not UTF-8 become a BadRecord, an empty file one `empty_file` record."""
    n = 0
    with _open_binary(path) as f:
        for lineno, raw in enumerate(f, 1):
            if raw.isspace() or not raw:
                continue
            n += 1
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield f"{path}:{lineno}", BadRecord("invalid_utf8", f"text is not valid UTF-8 (byte {e.start})")
                continue
            yield f"{path}:{lineno}", wrap(line)
    if n == 0:
        yield f"{path}:0", BadRecord("empty_file", "file has no records")


def iter_jsonl(path: str) -> Iterator[tuple[str, Any]]:
    return _iter_lines(path, RawJSON)


_WS = " \t\r\n"
_CODE = re.compile(r'[\[\]{},"]')  # what changes the nesting outside strings
_IN_STRING = re.compile(r'["\\\n]')  # what ends or escapes inside a string (a raw newline is invalid JSON)


class UnreadableInput(UserError):
    """An input file that cannot be read past some point (a truncated or unsynchronisable JSON
    array): the run stops whatever --on_error says, because the rest of the file would be lost."""


def file_of(where: str) -> str:
    """The file of a `file:line` location."""
    return where.rpartition(":")[0]


def file_runs(items: list) -> list[tuple[str, int]]:
    """[(file, n)] for consecutive items (tuples whose first field is `file:line`) from one file.
    Records arrive file by file, so a chunk within one file costs two look-ups, not one per record."""
    if not items:
        return []
    first = file_of(items[0][0])
    if first == file_of(items[-1][0]):
        return [(first, len(items))]
    runs: list[list] = []
    for item in items:
        f = file_of(item[0])
        if runs and runs[-1][0] == f:
            runs[-1][1] += 1
        else:
            runs.append([f, 1])
    return [(f, n) for f, n in runs]


class _Window:
    """Unconsumed text of a stream: `buf` grows by `fill` and shrinks by `drop`; `line_at(pos)`
    is the line number of `buf[pos]`, counted incrementally (no rescans of the buffer)."""

    def __init__(self, f: io.TextIOBase):
        self.f, self.buf, self.eof = f, "", False
        self.line = 1  # line of buf[0]
        self._lpos, self._lno = 0, 1  # a cursor: line of buf[_lpos]

    def fill(self) -> bool:
        chunk = self.f.read(CHUNK_CHARS)
        if not chunk:
            self.eof = True
            return False
        self.buf += chunk
        return True

    def line_at(self, pos: int) -> int:
        if pos < self._lpos:
            self._lpos, self._lno = 0, self.line
        self._lno += self.buf.count("\n", self._lpos, pos)
        self._lpos = pos
        return self._lno

    def drop(self, n: int) -> None:
        self.line = self.line_at(n)
        self.buf = self.buf[n:]
        self._lpos, self._lno = 0, self.line

    def skip_ws(self, pos: int) -> int:
        """The first non-whitespace index at or after pos; len(buf) at end of file."""
        while True:
            while pos < len(self.buf) and self.buf[pos] in _WS:
                pos += 1
            if pos < len(self.buf) or self.eof or not self.fill():
                return pos

    def rest_bytes(self, pos: int) -> int:
        """Bytes of the file from buf[pos] to its end (reads the rest; for error messages)."""
        n = _nbytes(self.buf[pos:])
        while chunk := self.f.read(CHUNK_CHARS):
            n += _nbytes(chunk)
        return n


def _nbytes(text: str) -> int:
    return len(text.encode("utf-8", "surrogateescape"))


def _element_end(w: _Window, pos: int) -> tuple[int | None, int]:
    """Index of the ',' or ']' that ends the array element at `pos`: the next one at nesting
    depth 0 outside strings (escapes tracked). Two repairs let a pretty-printed file
    resynchronise: a raw newline ends a broken string, and a closing bracket closes the
    brackets opened after its match (a closer with no match is ignored). Returns (index or None at
    end of file, characters dropped from the front of the buffer: an element longer than
    MAX_ELEMENT_CHARS is not kept, only scanned: the bytes dropped are returned)."""
    opened: list[str] = []  # the open brackets, innermost last
    in_string, dropped, start = False, 0, pos
    buf = w.buf
    while True:
        m = (_IN_STRING if in_string else _CODE).search(buf, pos)
        if m is None:
            pos = len(buf)  # nothing that matters up to the end of the buffer
            if pos - start > MAX_ELEMENT_CHARS:  # too large to decode: stop keeping it
                dropped += _nbytes(buf[start:pos])
                w.drop(pos)
                pos = start = 0
            if not w.fill():
                return None, dropped
            buf = w.buf
            continue
        c, pos = m.group(), m.end()
        if in_string:
            if c == "\\":
                if pos >= len(buf) and w.fill():
                    buf = w.buf
                if pos < len(buf) and buf[pos] != "\n":
                    pos += 1
            else:  # '"' closes the string; a raw newline means it was never closed
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "[{":
            opened.append(c)
        elif not opened:
            if c != "}":  # ',' or ']' at depth 0
                return pos - 1, dropped
        elif c != ",":
            match = "[" if c == "]" else "{"
            if match in opened:
                del opened[len(opened) - 1 - opened[::-1].index(match) :]


def _unreadable(path: str, w: _Window, pos: int, line: int, why: str, count: int, dropped: int = 0) -> UnreadableInput:
    n = dropped + w.rest_bytes(pos)
    return UnreadableInput(
        f"{path}:{line}: {why}: the JSON array cannot be resynchronised, so the remaining {n:,} bytes "
        f"(line {line} to the end of the file) were not read ({count} element(s) before them were). "
        "Is the file truncated? Repair it and rerun; this stops the run whatever --on_error says."
    )


def _single_value(path: str, w: _Window, pos: int) -> Iterator[tuple[str, Any]]:
    """A file holding one JSON value (e.g. one object): one record."""
    while w.fill():
        pass
    where = f"{path}:{w.line_at(pos)}"
    try:
        obj, end = json.JSONDecoder().raw_decode(w.buf, pos)
    except json.JSONDecodeError as e:
        yield f"{path}:{e.lineno}", BadRecord("malformed_json", f"not valid JSON: {e.msg}")
        return
    rest = w.skip_ws(end)
    if rest < len(w.buf):
        line = w.line_at(rest)
        raise UnreadableInput(
            f"{path}:{line}: extra data after the JSON value that starts at {where}: "
            f"{w.rest_bytes(rest):,} bytes not read. A file of one JSON object per line must be named .jsonl"
        )
    yield where, _checked(obj)


def iter_json_array(path: str) -> Iterator[tuple[str, Any]]:
    """Elements of a top-level JSON array, streamed; a single top-level value is one record.

    Every element is yielded: parsed, or a BadRecord at its first line when it is malformed
    (reading resumes at the next top-level ',' or ']'). When no next element can be found
    (truncated file, unclosed string or bracket to the end of the file) or data follows the
    closing ']', raises UnreadableInput naming the line and the bytes not read."""
    dec = json.JSONDecoder()
    with _open_text(path) as f:
        w = _Window(f)
        pos = w.skip_ws(0)
        if pos >= len(w.buf):
            yield f"{path}:0", BadRecord("empty_file", "file has no records")
            return
        if w.buf[pos] != "[":
            yield from _single_value(path, w, pos)
            return
        pos += 1
        count = 0
        while True:
            pos = w.skip_ws(pos)
            if pos > CHUNK_CHARS:  # forget consumed text (not per element: that copies the buffer)
                w.drop(pos)
                pos = 0
            line = w.line_at(pos)
            where = f"{path}:{line}"
            if pos >= len(w.buf):
                raise _unreadable(path, w, pos, line, "the file ends inside the JSON array (no closing ']')", count)
            ch = w.buf[pos]
            if ch == "]" and count == 0:
                break
            if ch in ",]":  # an empty element: a doubled or trailing ','
                count += 1
                yield (
                    where,
                    BadRecord("malformed_json", f"empty array element (a doubled or trailing ',' at line {line})"),
                )
                if ch == "]":
                    break
                pos += 1
                continue
            count += 1
            obj, end, error = None, pos, None
            try:
                obj, end = dec.raw_decode(w.buf, pos)
                if end == len(w.buf) and not w.eof:  # a number may continue in the next chunk
                    raise json.JSONDecodeError("element continues past the buffer", w.buf, end)
                after = w.skip_ws(end)
                if after < len(w.buf) and w.buf[after] in ",]":  # the common case: a good element
                    yield where, _checked(obj)
                    if w.buf[after] == "]":
                        pos = after
                        break
                    pos = after + 1
                    continue
                if after < len(w.buf):
                    error = f"expected ',' or ']' after the element, got {w.buf[after]!r} at line {w.line_at(after)}"
                    end = after
            except json.JSONDecodeError as e:
                error, obj = e, None
            # a malformed element, or one that continues past the buffer
            record, boundary = _finish_element(path, w, dec, (pos, end, line, count), obj, error)
            yield where, record
            if w.buf[boundary] == "]":
                pos = boundary
                break
            pos = boundary + 1
        after = w.skip_ws(pos + 1)
        if after < len(w.buf):
            line = w.line_at(after)
            raise UnreadableInput(
                f"{path}:{line}: extra data after the JSON array's closing ']': {w.rest_bytes(after):,} bytes "
                "not read. A file of one JSON object per line must be named .jsonl"
            )
        if count == 0:
            yield f"{path}:0", BadRecord("empty_file", "JSON array has no records")


def _finish_element(
    path: str, w: _Window, dec: json.JSONDecoder, at: tuple[int, int, int, int], obj: Any, error: Any
) -> tuple[Any, int]:
    """An element that did not parse in one go (malformed, or continuing past the buffer):
    find where it ends (the next top-level ',' or ']') and parse it again whole. `at` is
    (its start, where the first parse stopped, its line, elements so far). Returns (the
    record or a BadRecord, the position of the ',' or ']' after it)."""
    pos, end, line, count = at
    boundary, dropped = _element_end(w, pos if obj is None else end)
    if dropped:
        pos, error = 0, f"element larger than {MAX_ELEMENT_CHARS:,} characters"
    if boundary is None:
        why = f"the file ends before the element at line {line} is closed by ',' or ']'"
        raise _unreadable(path, w, pos, line, why, count - 1, dropped)
    if isinstance(error, json.JSONDecodeError):  # retry with the whole element in the buffer
        try:
            obj, end = dec.raw_decode(w.buf, pos)
            if not w.buf[end:boundary].strip(_WS):
                error = None
            else:
                error = f"expected ',' or ']' after the element, got {w.buf[w.skip_ws(end)]!r}"
        except json.JSONDecodeError as e:
            error = f"not valid JSON: {e.msg} (line {w.line + e.lineno - 1})"
    if error is None:
        return _checked(obj), boundary
    k = boundary
    while k > pos and w.buf[k - 1] in _WS:
        k -= 1
    last = w.line_at(max(k - 1, pos))
    return BadRecord("malformed_json", f"{error}; element (lines {line}-{last}) skipped"), boundary


def iter_parquet(path: str) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    row = 0
    for batch in pf.iter_batches(batch_size=4096):
        for rec in batch.to_pylist():
            row += 1
            yield f"{path}:{row}", rec
    if row == 0:
        yield f"{path}:0", BadRecord("empty_file", "file has no records")


class TextLine(str):
    """One line of a plain .txt file: a pretraining document (no JSON to parse)."""

    __slots__ = ()


def iter_txt(path: str) -> Iterator[tuple[str, Any]]:
    """A document per line, as the Hugging Face `text` loader and LLaMA-Factory read .txt files
    (line ending removed). Blank lines separate nothing and are not records, as in jsonl."""
    return _iter_lines(path, lambda line: TextLine(line.rstrip("\r\n")))


def iter_file(path: str) -> Iterator[tuple[str, Any]]:
    kind = _kind(path)
    if kind == ".txt":
        yield from iter_txt(path)
    elif kind == ".parquet":
        yield from iter_parquet(path)
    elif kind in (".json", ".json.gz", ".json.zst"):
        yield from iter_json_array(path)
    else:
        yield from iter_jsonl(path)


def iter_records(files: list[str]) -> Iterator[tuple[str, Any]]:
    for path in files:
        if os.path.getsize(path) == 0:
            yield f"{path}:0", BadRecord("empty_file", "file is empty")
            continue
        yield from iter_file(path)
