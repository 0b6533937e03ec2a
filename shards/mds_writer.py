"""A local MDS writer for prep: the bytes of streaming's `MDSWriter`, without importing streaming.

`import streaming` costs ~4 CPU-s (it imports torch, torchvision and transformers for its vision,
text and multimodal datasets) and prep needs none of them: a 200-record prep paid more for that
import than for its work. The MDS format is small and documented (streaming's docs, "MDS"):

    shard.NNNNN.mds = [num_samples: u32][offsets: (num_samples + 1) x u32][config JSON][samples]
    sample          = [sizes of its variable-size columns: u32 each][column bytes, name order]
    ndarray:<dtype> = [ndim << 2 | shape_dtype: u8][shape][values]   (dynamic shape, fixed dtype)

plus `index.json` ({"version": 2, "shards": [...]}, keys sorted). This writer covers what prep
writes (local folders, `ndarray:<dtype>` columns, no or zstd compression, sha1/xxh64 hashes) and
`open_writer` hands anything else (a remote output, another codec) to streaming's own MDSWriter.
tests/test_mds_writer.py asserts byte-identical folders against streaming's MDSWriter and reads
them back with streaming's reader.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import numpy as np

_VALUE_DTYPES = ("uint8", "int8", "uint16", "int16", "float16", "uint32", "int32", "float32", "uint64")
_SHAPE_DTYPES = ("uint8", "uint16", "uint32", "uint64")  # index = the 2-bit code in the header byte


def parse_bytes(value: str | int | None) -> int:
    """'64mb', '1gb', '500kb', '4096' -> bytes (powers of 1024, as streaming's size_limit)."""
    if value is None or isinstance(value, int):
        return value or 0
    s = str(value).strip().lower()
    for suffix, mult in (("kb", 1 << 10), ("mb", 1 << 20), ("gb", 1 << 30), ("tb", 1 << 40), ("b", 1)):
        if s.endswith(suffix):
            return int(float(s[: -len(suffix)]) * mult)
    return int(s)


def _hash(algo: str, data: bytes) -> str:
    if algo == "xxh64":
        import xxhash

        return xxhash.xxh64(data).hexdigest()
    return hashlib.new(algo, data).hexdigest()


def _encode_ndarray(dtype: str, value: np.ndarray) -> bytes:
    if value.dtype.name != dtype:
        raise ValueError(f"Wrong dtype: expected {dtype}, got {value.dtype.name}.")
    if value.size == 0:
        raise ValueError("Attempting to encode a numpy array with 0 elements.")
    shape = np.array(value.shape, np.int64)
    top = int(shape.max())
    code = 0 if top < 1 << 8 else 1 if top < 1 << 16 else 2 if top < 1 << 32 else 3
    head = bytes([(len(value.shape) << 2) | code]) + shape.astype(_SHAPE_DTYPES[code]).tobytes()
    return head + np.ascontiguousarray(value).tobytes()


def _zstd_level(compression: str | None) -> int | None:
    """None = no compression; the zstd level ('zstd' = 3, streaming's default); ValueError otherwise."""
    if not compression:
        return None
    name, _, level = compression.partition(":")
    if name != "zstd":
        raise ValueError(compression)
    return int(level) if level else 3


def supported(out: Any, columns: dict[str, str], compression: str | None, hashes: list[str]) -> bool:
    """Whether LocalMDSWriter writes this output (else streaming's MDSWriter does)."""
    if not isinstance(out, str) or "://" in out:
        return False
    try:
        _zstd_level(compression)
    except ValueError:
        return False
    ok_cols = all(
        e.startswith("ndarray:") and e.split(":")[1] in _VALUE_DTYPES and e.count(":") == 1 for e in columns.values()
    )
    return ok_cols and all(h in ("sha1", "xxh64") for h in hashes)


class LocalMDSWriter:
    """`MDSWriter(out=folder, columns=..., compression=None|'zstd[:level]', hashes=..., size_limit=...)`."""

    def __init__(
        self, *, out: str, columns: dict[str, str], compression: str | None, hashes: list[str], size_limit: int
    ):
        if list(hashes) != sorted(hashes):
            raise ValueError("Hashes must be unique and in sorted order.")
        self.local, self.hashes, self.size_limit = out, list(hashes), parse_bytes(size_limit) or None
        self.compression = compression or None
        self.level = _zstd_level(self.compression)
        os.makedirs(out, exist_ok=True)
        if os.listdir(out):
            raise FileExistsError(f"Directory is not empty: {out}")
        self.names = sorted(columns)
        self.dtypes = [columns[n].split(":")[1] for n in self.names]
        self.config = {
            "version": 2,
            "format": "mds",
            "compression": self.compression,
            "hashes": self.hashes,
            "size_limit": self.size_limit,
            "column_names": self.names,
            "column_encodings": [columns[n] for n in self.names],
            "column_sizes": [None] * len(self.names),
        }
        self.config_data = json.dumps(self.config, sort_keys=True).encode("utf-8")
        self.shards: list[dict[str, Any]] = []
        self._reset()

    def _reset(self) -> None:
        self.samples: list[bytes] = []
        self.size = 4 + 4 + len(self.config_data)  # MDSWriter's extra_bytes_per_shard

    def write(self, sample: dict[str, Any]) -> None:
        data = [_encode_ndarray(d, sample[n]) for n, d in zip(self.names, self.dtypes, strict=True)]
        encoded = np.array([len(x) for x in data], np.uint32).tobytes() + b"".join(data)
        size = len(encoded) + 4  # + its offset (MDSWriter's extra_bytes_per_sample)
        if self.size_limit and self.size_limit < self.size + size:
            self._flush()  # as MDSWriter: an over-limit first sample flushes an empty shard first
            self._reset()
        self.samples.append(encoded)
        self.size += size

    def _flush(self) -> None:
        n = len(self.samples)
        offsets = np.array([0] + [len(s) for s in self.samples]).cumsum().astype(np.uint32)
        offsets += 4 + 4 * (n + 1) + len(self.config_data)
        raw = np.uint32(n).tobytes() + offsets.tobytes() + self.config_data + b"".join(self.samples)
        raw_name = f"shard.{len(self.shards):05}.mds"
        raw_info = {"basename": raw_name, "bytes": len(raw), "hashes": {a: _hash(a, raw) for a in self.hashes}}
        zip_info, data, name = None, raw, raw_name
        if self.level is not None:
            import zstd

            data, name = zstd.compress(raw, self.level), raw_name + ".zstd"
            zip_info = {"basename": name, "bytes": len(data), "hashes": {a: _hash(a, data) for a in self.hashes}}
        with open(os.path.join(self.local, name), "wb") as f:
            f.write(data)
        shard = {"samples": n, "raw_data": raw_info, "zip_data": zip_info}
        shard.update(self.config)
        self.shards.append(shard)

    def finish(self) -> None:
        if self.samples:
            self._flush()
            self._reset()
        with open(os.path.join(self.local, "index.json"), "w") as f:
            json.dump({"version": 2, "shards": self.shards}, f, sort_keys=True)


def open_writer(
    *, out, columns: dict[str, str], compression: str | None, hashes: list[str], size_limit, exist_ok=False
):
    """LocalMDSWriter where it applies, else streaming's MDSWriter with the same arguments."""
    if supported(out, columns, compression, hashes) and not exist_ok:
        return LocalMDSWriter(out=out, columns=columns, compression=compression, hashes=hashes, size_limit=size_limit)
    from bumblefast.shards.streaming_install import missing_streaming

    try:
        from streaming import MDSWriter
    except ModuleNotFoundError as e:  # installed --no-deps: a plain `pip install bumblefast` lacks it
        raise missing_streaming(e) from e
    return MDSWriter(
        out=out, columns=columns, compression=compression, hashes=hashes, size_limit=size_limit, exist_ok=exist_ok
    )
