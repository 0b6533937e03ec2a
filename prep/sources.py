"""Raw input -> a stream of (where, record-or-error): json arrays, jsonl (plain/gz/zst), parquet.

Nothing loads a whole corpus: JSON arrays are parsed incrementally element by element
(`json.JSONDecoder.raw_decode` over a sliding buffer; one element must fit in memory, and a
malformed element ends the file because an array cannot be re-synchronised), jsonl line by
line, parquet in record batches. `where` is `file:line` (parquet: `file:row`).

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
            found = [
                str(p) for p in sorted(Path(item).rglob("*")) if p.is_file() and _kind(str(p))
            ]
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


def iter_jsonl(path: str) -> Iterator[tuple[str, Any]]:
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
            yield f"{path}:{lineno}", RawJSON(line)
    if n == 0:
        yield f"{path}:0", BadRecord("empty_file", "file has no records")


_WS = " \t\r\n"


def iter_json_array(path: str) -> Iterator[tuple[str, Any]]:
    """Elements of a top-level JSON array, streamed; a single top-level object is one record."""
    dec = json.JSONDecoder()
    with _open_text(path) as f:
        buf = ""
        line_base = 1  # line number of buf[0]
        eof = False

        def fill() -> bool:
            nonlocal buf, eof
            chunk = f.read(CHUNK_CHARS)
            if not chunk:
                eof = True
                return False
            buf += chunk
            return True

        def skip_ws(pos: int) -> int:
            while True:
                while pos < len(buf) and buf[pos] in _WS:
                    pos += 1
                if pos < len(buf) or eof or not fill():
                    return pos

        pos = skip_ws(0)
        if pos >= len(buf):
            yield f"{path}:0", BadRecord("empty_file", "file has no records")
            return
        if buf[pos] != "[":
            # a single JSON value (e.g. one object): parse the whole file
            while fill():
                pass
            where = f"{path}:{line_base + buf.count(chr(10), 0, pos)}"
            try:
                obj, end = dec.raw_decode(buf, pos)
            except json.JSONDecodeError as e:
                yield f"{path}:{e.lineno}", BadRecord("malformed_json", f"not valid JSON: {e.msg}")
                return
            yield where, _checked(obj)
            return
        pos = skip_ws(pos + 1)
        count = 0
        expect_value = True
        while True:
            pos = skip_ws(pos)
            if pos >= len(buf):
                yield f"{path}:{line_base + buf.count(chr(10))}", BadRecord(
                    "malformed_json", "unexpected end of file inside the JSON array"
                )
                return
            ch = buf[pos]
            if ch == "]" and (count == 0 or not expect_value):
                break
            if not expect_value:
                if ch != ",":
                    line = line_base + buf.count("\n", 0, pos)
                    yield f"{path}:{line}", BadRecord(
                        "malformed_json", f"expected ',' or ']' between array elements, got {ch!r}; rest of file skipped"
                    )
                    return
                pos += 1
                expect_value = True
                continue
            line = line_base + buf.count("\n", 0, pos)
            while True:
                try:
                    obj, end = dec.raw_decode(buf, pos)
                    break
                except json.JSONDecodeError as e:
                    if not eof and len(buf) - pos < MAX_ELEMENT_CHARS and fill():
                        continue
                    yield f"{path}:{line}", BadRecord(
                        "malformed_json",
                        f"not valid JSON: {e.msg} (line {e.lineno}); rest of file skipped",
                    )
                    return
            count += 1
            yield f"{path}:{line}", _checked(obj)
            expect_value = False
            # drop consumed text so memory stays bounded by one element + one chunk
            line_base += buf.count("\n", 0, end)
            buf = buf[end:]
            pos = 0
        if count == 0:
            yield f"{path}:0", BadRecord("empty_file", "JSON array has no records")


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
            yield f"{path}:{lineno}", TextLine(line.rstrip("\r\n"))
    if n == 0:
        yield f"{path}:0", BadRecord("empty_file", "file has no records")


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

