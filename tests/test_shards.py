"""bumblefast.shards: schema, the micro-batch contract, exact resume (new process, other world
size), a clear error on a resume that would change the order, remote write + stream back."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import DEMO

from bumblefast.config import PrepConfig
from bumblefast.prep.run import run_prep
from bumblefast.shards import (
    IGNORE_INDEX,
    ResumeError,
    build_loader,
    collate_rows,
    columns,
    token_dtype,
)

pytestmark = pytest.mark.usefixtures("clean_shm")


@pytest.fixture(scope="session")
def sft_dir(tok_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft") / "shards"
    cfg = PrepConfig(
        stage="sft",
        input=[str(DEMO / "sft_alpaca.json")],
        tokenizer_name_or_path=tok_dir,
        seq_len=256,
        output_dir=str(out),
    )
    run_prep(cfg, progress=False)
    return str(out)


def test_schema():
    assert token_dtype(65536) == "uint16" and token_dtype(151936) == "uint32"
    assert columns("pretrain", 1000) == {"input_ids": "ndarray:uint16", "doc_lens": "ndarray:uint32"}
    assert set(columns("sft", 200000)) == {"input_ids", "loss_mask", "seq_lens"}
    assert columns("dpo", 10, ref_logps=True)["ref_logps"] == "ndarray:float32"
    with pytest.raises(ValueError, match="stage"):
        columns("rlhf", 10)


def test_collate_contract_sft_and_pretrain():
    rows = [
        {
            "input_ids": np.array([1, 2, 3, 4, 5], np.uint16),
            "loss_mask": np.array([0, 0, 1, 1, 0], np.uint8),
            "seq_lens": np.array([3, 2], np.uint32),
            "sample_id": 7,
        },
        {
            "input_ids": np.array([6, 7, 8], np.uint16),
            "loss_mask": np.array([0, 1, 1], np.uint8),
            "seq_lens": np.array([3], np.uint32),
            "sample_id": 2,
        },
    ]
    b = collate_rows(rows, "sft", seq_len=6)
    assert b.input_ids.dtype == torch.int64 and b.input_ids.tolist() == [1, 2, 3, 4, 5, 6, 7, 8]
    assert b.position_ids.tolist() == [0, 1, 2, 0, 1, 0, 1, 2]
    assert b.cu_seqlens.dtype == torch.int32 and b.cu_seqlens.tolist() == [0, 3, 5, 8]
    assert b.max_seqlen == 3 and isinstance(b.max_seqlen, int) and b.n_segments == 3
    X = IGNORE_INDEX
    # labels[i] = ids[i+1] if same doc and mask[i+1]; doc 0 = [1,2,3] mask [0,0,1]; doc 1 = [4,5] mask [1,0]
    assert b.labels.tolist() == [X, 3, X, X, X, 7, 8, X]
    assert b.segment_ids.tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
    assert int(b.num_target_tokens) == 3 and b.sample_ids.tolist() == [7, 2]
    assert int(b.num_tokens) == 8 and int(b.row_capacity) == 12
    p = collate_rows(
        [{"input_ids": np.array([1, 2, 3, 4]), "doc_lens": np.array([1, 3]), "sample_id": 0}], "pretrain", seq_len=4
    )
    assert p.labels.tolist() == [X, 3, 4, X] and int(p.num_target_tokens) == 2
    d = collate_rows(
        [
            {
                "input_ids": np.arange(4),
                "loss_mask": np.array([0, 1, 0, 1]),
                "seq_lens": np.array([2, 2]),
                "ref_logps": np.array([-1.0, -2.0], np.float32),
                "sample_id": 0,
            }
        ],
        "dpo",
        seq_len=4,
    )
    assert d.ref_logps.tolist() == [-1.0, -2.0]


def test_loader_batches_match_shards(sft_dir):
    """Every row comes once per epoch; labels agree with loss_mask; contract invariants hold."""
    from streaming import StreamingDataset

    ds = StreamingDataset(local=sft_dir, batch_size=1)
    n = ds.num_samples
    loader = build_loader(sft_dir, batch_size=4, seed=3)
    seen = []
    for b in loader:
        seen += b.sample_ids.tolist()
        T = int(b.num_tokens)
        assert b.input_ids.shape == b.labels.shape == b.position_ids.shape == (T,)
        assert int(b.cu_seqlens[-1]) == T and int((b.labels != IGNORE_INDEX).sum()) == int(b.num_target_tokens)
        rows = [ds[i] for i in b.sample_ids.tolist()]
        assert b.input_ids.tolist() == np.concatenate([r["input_ids"] for r in rows]).tolist()
        mask = np.concatenate([r["loss_mask"] for r in rows])
        lab = b.labels.numpy()
        starts = set(b.cu_seqlens.tolist()[1:-1])
        for i in range(T - 1):
            want = mask[i + 1] and (i + 1) not in starts
            assert (lab[i] != IGNORE_INDEX) == bool(want)
    assert sorted(seen) == list(range(n))


RESUME_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from bumblefast.shards import build_loader
    path, mode, out, tag = sys.argv[1:5]
    loader = build_loader(path, batch_size=3, seed=11)  # a new loader + dataset, as a resume must
    loader.load_state_dict(torch.load(out + ".state", weights_only=False))
    ids = [b.sample_ids.tolist() for b in loader]
    json.dump(ids, open(out + "." + tag + ".json", "w"))
    """
)


def test_resume_in_new_process_and_other_world_size(sft_dir, tmp_path):
    import torch

    full = [i for b in build_loader(sft_dir, batch_size=3, seed=11) for i in b.sample_ids.tolist()]
    loader = build_loader(sft_dir, batch_size=3, seed=11)
    stop = []
    for i, b in enumerate(loader):
        stop += b.sample_ids.tolist()
        if i + 1 == 4:
            break
    out = tmp_path / "r"
    torch.save(loader.state_dict(), f"{out}.state")
    assert stop == full[:12]
    script = tmp_path / "resume.py"
    script.write_text(RESUME_SCRIPT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # one process (world size 1), then two ranks (world size 2) resume the same state. Not all
    # three at once: two local leaders of the same shard folder race for one shared-memory
    # prefix in streaming (FileExistsError '/000NNN_locals', seen 2026-12-01)
    procs = []
    for tag, world in (("w1", 1), ("0", 2), ("1", 2)):
        if tag == "0":
            _, err = procs[0].communicate(timeout=180)
            assert procs[0].returncode == 0, err.decode()[-3000:]
        rank = 0 if tag == "w1" else int(tag)
        env = dict(os.environ, OMP_NUM_THREADS="1")
        if world == 2:
            env.update(
                RANK=str(rank),
                WORLD_SIZE="2",
                LOCAL_RANK=str(rank),
                LOCAL_WORLD_SIZE="2",
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
            )
        procs.append(
            subprocess.Popen(
                [sys.executable, str(script), sft_dir, "resume", str(out), tag],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
        )
    for p in procs:
        _, err = p.communicate(timeout=180)
        assert p.returncode == 0, err.decode()[-3000:]
    got = {t: [i for b in json.loads(Path(f"{out}.{t}.json").read_text()) for i in b] for t in ("w1", "0", "1")}
    assert got["w1"] == full[12:]  # a new process continues at exactly the next sample
    # two ranks split the rest: every remaining sample once, none already seen; streaming pads the
    # epoch to a multiple of the world size by repeating a few samples (< world size * batch)
    both = got["0"] + got["1"]
    assert set(both) == set(full[12:]) and not set(both) & set(full[:12])
    assert 0 <= len(both) - len(full[12:]) < 2 * 3


def test_resume_mismatch_is_a_clear_error(sft_dir):
    loader = build_loader(sft_dir, batch_size=3, seed=11)
    it = iter(loader)
    next(it)
    state = loader.state_dict()
    other = build_loader(sft_dir, batch_size=4, seed=11)
    with pytest.raises(ResumeError, match="batch_size: checkpoint has 3, now 4"):
        other.load_state_dict(state)
    with pytest.raises(ResumeError, match="not a bumblefast loader state"):
        other.load_state_dict({"epoch": 0})


def _read_at_once(barrier, path: str, trials: int, results) -> None:
    """One of several processes that create a loader at the same moment, `trials` times."""
    rows = []
    try:
        for _ in range(trials):
            barrier.wait(timeout=120)
            loader = build_loader(path, batch_size=2, seed=1)
            rows.append(sum(int(b.sample_ids.numel()) for b in loader))
            loader.close()
        results.put(rows)
    except Exception as e:
        barrier.abort()  # the others stop waiting for this one
        results.put(f"{type(e).__name__}: {e}")


def test_loaders_created_at_the_same_moment(sft_dir, tmp_path):
    """Streaming's prefix pick-and-create is not atomic: 4 processes creating datasets together
    failed 13 of 32 times with FileExistsError before the machine-wide lock (docs/LOG.md)."""
    import multiprocessing
    import shutil

    n, trials = 4, 4
    reference = build_loader(sft_dir, batch_size=2, seed=1)
    expected = reference.dataset.num_samples
    reference.close()
    paths = [shutil.copytree(sft_dir, tmp_path / f"copy{i}") for i in range(n)]  # one local per dataset
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_read_at_once, args=(barrier, str(p), trials, results)) for p in paths]
    for p in procs:
        p.start()
    got = [results.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert got == [[expected] * trials] * n


def test_prefix_lock_is_readable_by_all_and_falls_back_per_user(tmp_path, monkeypatch):
    """The lock file serves every user (created readable whatever the umask); a user who cannot
    open it (another user's, or refused by protected_regular) locks a file of their own."""
    import stat

    from bumblefast.shards import reader

    monkeypatch.setattr(reader, "PREFIX_LOCK", tmp_path / "prefix.lock")
    old_umask = os.umask(0o077)
    try:
        os.close(reader._prefix_lock_fd())
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE((tmp_path / "prefix.lock").stat().st_mode) == 0o666
    real_open = os.open

    def refused(path, *args, **kw):
        if str(path) == str(tmp_path / "prefix.lock"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kw)

    monkeypatch.setattr(os, "open", refused)
    fd = reader._prefix_lock_fd()
    try:
        assert os.readlink(f"/proc/self/fd/{fd}") == f"{tmp_path / 'prefix.lock'}.{os.getuid()}"
    finally:
        os.close(fd)


# ---- remote: write to S3 (moto server on 127.0.0.1) and stream back ----------------------------
@pytest.fixture
def s3(monkeypatch):
    pytest.importorskip("moto")
    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    for k, v in {
        "S3_ENDPOINT_URL": url,
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_SESSION_TOKEN": "test",
    }.items():
        monkeypatch.setenv(k, v)
    boto3.client("s3", endpoint_url=url, region_name="us-east-1").create_bucket(Bucket="bumblefast-test")
    yield "s3://bumblefast-test"
    server.stop()


def test_remote_write_and_stream_back(s3, tok_dir, sft_dir, tmp_path):
    from bumblefast.prep.merge import merge_parts
    from bumblefast.shards import read_manifest

    url = f"{s3}/sft"
    cfg = PrepConfig(
        stage="sft", input=[str(DEMO / "sft_alpaca.json")], tokenizer_name_or_path=tok_dir, seq_len=256, output_dir=url
    )
    m = run_prep(cfg, progress=False)
    assert read_manifest(url)["fingerprint"] == m["fingerprint"]
    local = json.loads((Path(sft_dir) / "bumblefast.json").read_text())
    assert m["fingerprint"] == local["fingerprint"]  # same shards, remote or local
    remote_batches = [
        b.input_ids.tolist() for b in build_loader(url, batch_size=4, seed=1, cache_dir=str(tmp_path / "c1"))
    ]
    local_batches = [b.input_ids.tolist() for b in build_loader(sft_dir, batch_size=4, seed=1)]
    assert remote_batches == local_batches
    # two remote node parts + remote merge
    for r in range(2):
        cfg = PrepConfig(
            stage="dpo",
            input=[str(DEMO / "dpo_test.json")],
            tokenizer_name_or_path=tok_dir,
            seq_len=256,
            output_dir=f"{s3}/dpo",
            node_rank=r,
            num_nodes=2,
        )
        run_prep(cfg, progress=False)
    merged = merge_parts(f"{s3}/dpo")
    assert merged["records"]["read"] == 120
    n = sum(int(b.sample_ids.numel()) for b in build_loader(f"{s3}/dpo", batch_size=2, cache_dir=str(tmp_path / "c2")))
    assert n == merged["rows"]
