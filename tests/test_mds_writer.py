"""shards/mds_writer.py against its reference, streaming's own MDSWriter: the same bytes in every
file (shards, index.json), and streaming's StreamingDataset reads the rows back."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bumblefast.shards.mds_writer import LocalMDSWriter, open_writer, parse_bytes, supported
from bumblefast.shards.schema import columns


def _rows(stage: str, n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    cols = columns(stage, 151_936, shared_prompt=stage == "dpo")
    rows = []
    for _ in range(n):
        length = int(rng.integers(1, 300))
        row = {}
        for name, enc in cols.items():
            dtype = enc.split(":")[1]
            hi = 151_000 if name == "input_ids" else 2 if name == "loss_mask" else 5_000
            row[name] = rng.integers(0, hi, size=length if name in ("input_ids", "loss_mask") else 3).astype(dtype)
        rows.append(row)
    return rows


def _write_both(tmp_path: Path, stage: str, compression, size_limit, rows):
    from streaming import MDSWriter

    cols = columns(stage, 151_936, shared_prompt=stage == "dpo")
    ours, ref = tmp_path / "ours", tmp_path / "ref"
    args = dict(columns=cols, compression=compression, hashes=["sha1", "xxh64"], size_limit=size_limit)
    w = LocalMDSWriter(out=str(ours), **args)
    r = MDSWriter(out=str(ref), **args)
    for row in rows:
        w.write(row)
        r.write(row)
    w.finish()
    r.finish()
    return ours, ref


@pytest.mark.parametrize(
    "stage,compression,size_limit",
    [
        ("pretrain", "zstd", "64mb"),
        ("sft", None, 4096),  # many shards, uncompressed
        ("dpo", "zstd:7", 3000),
        ("sft", "zstd", 100),  # every sample over the limit: streaming flushes an empty shard first
    ],
)
def test_same_bytes_as_streaming_mdswriter(tmp_path, stage, compression, size_limit):
    rows = _rows(stage, 60, seed=len(stage))
    ours, ref = _write_both(tmp_path, stage, compression, size_limit, rows)
    names = sorted(p.name for p in ref.iterdir())
    assert sorted(p.name for p in ours.iterdir()) == names
    assert len(names) > (1 if size_limit != "64mb" else 0)
    for name in names:
        assert (ours / name).read_bytes() == (ref / name).read_bytes(), name


def test_streaming_reads_our_rows_back(tmp_path):
    from streaming import StreamingDataset
    from streaming.base.util import clean_stale_shared_memory

    rows = _rows("dpo", 40, seed=3)
    out = tmp_path / "out"
    w = LocalMDSWriter(out=str(out), columns=columns("dpo", 151_936, shared_prompt=True), compression="zstd",
                       hashes=["sha1", "xxh64"], size_limit=5000)  # fmt: skip
    for row in rows:
        w.write(row)
    w.finish()
    clean_stale_shared_memory()
    ds = StreamingDataset(local=str(out), batch_size=1, shuffle=False)
    assert ds.num_samples == len(rows)
    for i, row in enumerate(rows):
        got = ds[i]
        for k, v in row.items():
            np.testing.assert_array_equal(np.asarray(got[k]), v)


def test_open_writer_hands_other_outputs_to_streaming(tmp_path):
    cols = columns("pretrain", 8000)
    assert supported(str(tmp_path / "a"), cols, "zstd", ["sha1", "xxh64"])
    assert not supported("s3://bucket/x", cols, "zstd", ["sha1"])
    assert not supported((str(tmp_path / "b"), "s3://bucket/x"), cols, "zstd", ["sha1"])
    assert not supported(str(tmp_path / "c"), cols, "br", ["sha1"])
    assert not supported(str(tmp_path / "d"), {"text": "str"}, None, [])
    w = open_writer(out=str(tmp_path / "e"), columns=cols, compression="br", hashes=["sha1"], size_limit="1mb")
    assert type(w).__module__.startswith("streaming.")
    w.finish()
    assert isinstance(open_writer(out=str(tmp_path / "f"), columns=cols, compression=None, hashes=[], size_limit=0),
                      LocalMDSWriter)  # fmt: skip
    assert parse_bytes("64mb") == 64 << 20 and parse_bytes("1.5kb") == 1536 and parse_bytes(4096) == 4096


def test_a_local_prep_imports_neither_torch_nor_streaming(tmp_path, demo_tokenizer_dir):
    """What start-up is made of (issue 27): prep's own process stays free of both."""
    src = tmp_path / "in.jsonl"
    src.write_text("".join(f'{{"text": "line {i} of some text"}}\n' for i in range(50)), encoding="utf-8")
    kw = dict(stage="pretrain", input=[str(src)], tokenizer_name_or_path=str(demo_tokenizer_dir), seq_len=64)
    kw["output_dir"] = str(tmp_path / "out")
    code = (
        "import sys\n"
        "from bumblefast.config import PrepConfig\n"
        "from bumblefast.prep.run import run_prep\n"
        f"run_prep(PrepConfig(**{kw!r}), progress=False)\n"
        "print(sorted(m for m in ('torch', 'streaming', 'torchvision') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr
