"""Raw data on several nodes: one prep per node cache (its local rank 0), the other ranks wait
on a file marker and say so, a failed prep stops the waiters, a dead process's lock is taken
over, and the all-ranks wait polls the store instead of blocking in a collective. Two "nodes"
are simulated by two cache folders and threads (ranks) or processes (the store wait)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bumblefast.config import UserError
from bumblefast.shards.manifest import MANIFEST_NAME
from bumblefast.train import prep_once as P

FAST = dict(report_s=0.05, poll_s=0.01)


def fake_prep(out: Path, calls: list, seconds: float = 0.3, fail: str | None = None):
    def prep():
        calls.append(threading.get_ident())
        time.sleep(seconds)
        if fail:
            raise RuntimeError(fail)
        out.mkdir(parents=True)
        (out / MANIFEST_NAME).write_text("{}")

    return prep


def run_ranks(out: Path, calls: list, local_ranks: int, **kw) -> tuple[list, list, list]:
    """`local_ranks` threads on one node: (their results, their exceptions, every message)."""
    results, errors, said = [None] * local_ranks, [], []

    def rank(r):
        try:
            results[r] = P.prep_once(out, fake_prep(out, calls, **kw), may_prep=r == 0, say=said.append, **FAST)
        except Exception as e:  # noqa: BLE001 - collected for the assertions
            errors.append(e)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(local_ranks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results, errors, said


def test_one_prep_per_node_cache_others_wait_and_say_so(tmp_path):
    calls = {"a": [], "b": []}
    nodes = {
        n: threading.Thread(target=lambda n=n: done.__setitem__(n, run_ranks(tmp_path / n / "c", calls[n], 3)))
        for n in ("a", "b")
    }
    done: dict = {}
    for t in nodes.values():
        t.start()
    for t in nodes.values():
        t.join(60)
    for n in ("a", "b"):
        results, errors, said = done[n]
        assert errors == [] and len(calls[n]) == 1  # one prep on each node, by its local rank 0
        assert results == [True, False, False]
        assert (tmp_path / n / "c" / MANIFEST_NAME).is_file() and not (tmp_path / n / "c.lock").exists()
        assert said and all(str(tmp_path / n / "c") in s for s in said)  # the waiters said what they wait for


def test_shared_cache_is_prepped_once_across_nodes(tmp_path):
    """Two nodes' local rank 0 on one shared cache folder: one preps, the other waits."""
    calls, out, results = [], tmp_path / "shared", {}
    said: list[str] = []

    def node(n):
        results[n] = P.prep_once(out, fake_prep(out, calls), may_prep=True, say=said.append, **FAST)

    threads = [threading.Thread(target=node, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(calls) == 1 and sorted(results.values()) == [False, True]
    assert any(f"being prepped by {socket.gethostname()} pid {os.getpid()}" in s for s in said)


def test_failed_prep_stops_the_waiters_with_its_error(tmp_path):
    calls = []
    results, errors, _ = run_ranks(tmp_path / "c", calls, 3, fail="tokenizer exploded")
    assert len(calls) == 1 and len(errors) == 3
    assert sum(isinstance(e, RuntimeError) and not isinstance(e, UserError) for e in errors) == 1  # the prepper's own
    waiters = [e for e in errors if isinstance(e, UserError)]
    assert len(waiters) == 2 and all("RuntimeError: tokenizer exploded" in str(e) for e in waiters)
    # a later run does not trip over the old failure: it preps again
    calls2 = []
    results, errors, _ = run_ranks(tmp_path / "c", calls2, 2)
    assert errors == [] and results == [True, False] and not (tmp_path / "c.failed").exists()


def test_lock_of_a_dead_process_is_taken_over_and_a_foreign_one_named(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "c"
    (tmp_path / "c.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "token": "x"}))
    said, calls = [], []
    assert P.prep_once(out, fake_prep(out, calls, 0.0), may_prep=True, say=said.append, **FAST) is True
    assert calls and any("dead process" in s for s in said)

    other = tmp_path / "d"
    (tmp_path / "d.lock").write_text(json.dumps({"host": "node-7", "pid": 1, "token": "y", "since": time.time()}))
    said = []
    with pytest.raises(UserError, match="gave up after .* waiting for .*being prepped by node-7 pid 1"):
        P.prep_once(other, fake_prep(other, calls), may_prep=True, timeout_s=0.3, say=said.append, **FAST)
    assert len(said) >= 2 and all(f"delete {tmp_path / 'd.lock'}" in s for s in said)


def test_local_rank_and_nodes_from_launcher_env(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert P.local_rank() == 3 and P.nodes() == 2
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert P.nodes() == 1


WAIT_SCRIPT = """
import os, sys, time, torch.distributed as dist
from bumblefast.train.prep_once import wait_for_ranks
rank, port, folder = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
reported = os.path.join(folder, "reported")
if rank == 1:  # this 'node' preps until rank 0 has said that it waits
    while not os.path.exists(reported):
        time.sleep(0.05)
said = []
def say(msg):
    said.append(msg)
    open(reported, "w").close()
wait_for_ranks("their data", report_s=0.2, poll_s=0.05, say=say)
open(os.path.join(folder, f"{rank}.log"), "w").write("\\n".join(said))
dist.destroy_process_group()
"""


def test_wait_for_ranks_polls_the_store_and_reports(tmp_path):
    """Rank 1 reaches the wait only after rank 0 has reported waiting for it: both return."""
    script = tmp_path / "wait.py"
    script.write_text(WAIT_SCRIPT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(r), str(port), str(tmp_path)], env=env, stderr=subprocess.PIPE, text=True
        )
        for r in range(2)
    ]
    try:
        for p in procs:
            assert p.wait(600) == 0, p.stderr.read()
    finally:
        for p in procs:
            p.kill()
    said = (tmp_path / "0.log").read_text().splitlines()
    assert said and all(s.startswith("1 of 2 ranks have their data; waiting") for s in said)
    assert (tmp_path / "1.log").read_text() == ""  # the last rank to arrive does not wait


def test_resolve_dataset_preps_per_node_cache(tmp_path, monkeypatch, capsys, demo_tokenizer_dir):
    """resolve_dataset on two 'nodes' (two caches): each node's local rank 0 preps its own copy,
    naming the `bumblefast prep` command that would do it once ahead; another local rank of a
    node whose cache is ready uses it without a prep."""
    from bumblefast.config import PretrainConfig
    from bumblefast.train.data import resolve_dataset

    raw = tmp_path / "raw.jsonl"
    raw.write_text("".join(json.dumps({"text": f"document {i} " * 5}) + "\n" for i in range(50)))
    cfg = PretrainConfig(dataset_path=str(raw), cutoff_len=32)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    outs = {}
    for node, local in (("a", "0"), ("b", "0"), ("a", "1")):
        monkeypatch.setenv("BUMBLEFAST_CACHE", str(tmp_path / f"cache-{node}"))
        monkeypatch.setenv("LOCAL_RANK", local)
        outs[node, local] = Path(resolve_dataset(cfg, str(demo_tokenizer_dir)))
        text = capsys.readouterr().out
        if local == "0":
            assert "this node's cache (one prep per node, 2 nodes)" in text
            assert f"bumblefast prep --stage pretrain --input '{raw}'" in text and "--seq_len 32" in text
        else:
            assert "running `bumblefast prep`" not in text
    assert outs["a", "1"] == outs["a", "0"] != outs["b", "0"]
    for out in outs.values():
        assert json.loads((out / MANIFEST_NAME).read_text())["records"]["written"] == 50
