"""Streaming read benchmark: tokens/s of `bumblefast.shards.build_loader` with 1 and 2 ranks.

    .venv/bin/python benchmarks/bench_stream.py [--size min|cpu] [--out benchmarks/results]
    (or `bumblefast bench stream`, which writes it into the combined report)

What is measured, on pretrain shards built here:
- data: a byte-level BPE trained on ../shared/data/pretrain_zh_demo.json (else, with a printed
  note, datasets/demo/pretrain.json); its `{"text"}` documents repeated into a jsonl corpus of
  a target token count, prepped with `bumblefast prep --stage pretrain` (1 worker, zstd MDS
  shards). The corpus is cut so that the packed row count is even: streaming pads an epoch
  that does not split evenly over the ranks by repeating rows, which would defeat the check;
- every run reads its own fresh copy of prep's output: streaming decompresses a local zstd
  shard next to itself on first use (and keeps both files), so a reader after the first would
  skip work the first one paid for. Each run reads 2 epochs: the first over the shards as prep
  wrote them (what a training run's first epoch costs: the ratio, points and headroom), the
  second over the decompressed ones (results only);
- ranks are fresh processes forked by a rank server (this file with a hidden `--serve`) that
  imported torch and streaming once, so a run does not pay ~6-8 s of imports per rank; rank r
  is pinned to core r (one core per rank in both configurations: unpinned, the single rank's
  streaming threads took the idle second core and slowed it, see `pin_to_core`);
- 1 rank: `build_loader(shards, batch_size=8, seed=0)` in a fresh process (started as each
  of the 2 ranks is, so only the world size differs), every micro-batch
  collated (the trainer's input); tokens = sum of batch.num_tokens. The loader's
  construction is timed separately and is not in the rate;
- 2 ranks on one node: two fresh processes (forked together) with the
  variables streaming reads for its world (RANK, WORLD_SIZE=2, LOCAL_RANK, LOCAL_WORLD_SIZE=2)
  and a gloo process group on 127.0.0.1 (streaming's dataset constructor would create one
  itself from MASTER_ADDR/MASTER_PORT for its barriers; here the rank creates it first and also
  uses it for a barrier before each timed epoch). Each rank times its own epoch share from that
  barrier; aggregate tokens/s = total tokens / the slower rank's seconds. Start-up (the
  process group) is recorded, not rated. Both ranks' sample ids must be disjoint and cover
  every row exactly once, in every epoch of every run (else this raises);
- the ratio 2 ranks vs 1 rank (aggregate tokens/s). On the 2-core CPU machine 2 ranks use
  both cores, so 2x is the ceiling (less when the machine is shared: the load average is
  recorded before and after);
- the trainer's need (computed, not measured): the tokens/s one H200 consumes training the
  1.5B preset at seq_len 4096 and 50% MFU, from bumblefast.flops, and the read headroom per
  rank (first-epoch read tokens/s per rank / need).

Sizes: min (CI smoke, ~200k tokens, seq_len 512, seconds), cpu (~4.5M tokens, seq_len 2048,
about a minute, 5 rounds alternating 1 rank and 2 ranks; median and min-max); gpu = cpu
(reading runs on the host CPU). Per run and rank also the CPU time of the process (all its
threads): CPU-s per M tokens says whether both configurations did the same work, CPU / wall
("busy") whether a reader computed or waited; the note under the table compares the ratio with
its ceiling (2x on 2 cores) and the per-rank rate with the 1-rank rate, from these figures.
Streaming's leaked shared memory is cleaned (`clean_stale_shared_memory`) before each run.
Writes `<out>/bench_stream_<host>_<date>.json` and `.md` (`_min` appended for size min).
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import json
import os
import sys
import threading
import time
from pathlib import Path

from harness import BenchServer, cli, free_port, interleave, ratio_lines

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "datasets" / "demo"
SHARED = ROOT.parent / "shared" / "data"
PRESET = ROOT / "configs" / "models" / "bumblebee-1.5b"
WORLD_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
RESULT_TAG = "BENCH_STREAM_RESULT "
BATCH_SIZE = 8
SEED = 0
EPOCHS = 2  # per run: the first reads the shards as prep wrote them, the second warm

SIZES = {  # target tokens, packed row length, BPE vocab, interleaved timing rounds (median, min-max)
    "min": dict(tokens=200_000, seq_len=512, vocab=1024, rounds=2),
    "cpu": dict(tokens=4_500_000, seq_len=2048, vocab=8192, rounds=5),
}
SIZES["gpu"] = SIZES["cpu"]  # the loader runs on the host CPU wherever it runs

# the trainer's need: one GPU training the 1.5B preset
NEED = dict(device="NVIDIA H200", preset="bumblebee-1.5b", seq_len=4096, mfu=0.5)


HEADROOM = (
    "one {device} training {preset} at seq_len {seq_len} and {mfu:.0%} MFU consumes {n:,.0f} tokens/s; each reading "
    "rank (one per GPU) reads headroom times that (2 ranks: the aggregate / 2, both ranks on this machine)"
)


def source_file() -> Path:
    src = SHARED / "pretrain_zh_demo.json"
    return src if src.is_file() else DEMO / "pretrain.json"


def documents(path: Path) -> list[str]:
    """The `{"text"}` documents of a json array (or jsonl) file, empty ones left out."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        records = json.loads(text)
    return [r["text"] for r in records if isinstance(r, dict) and str(r.get("text", "")).strip()]


def build_corpus(tok_dir: str, docs: list[str], path: Path, tokens: int, seq_len: int) -> dict:
    """Repeat `docs` into a jsonl file of about `tokens` tokens (EOS included, as prep counts
    them) whose packed row count (total // seq_len) is even."""
    from bumblefast.tokenizer import load_tokenizer

    tok = load_tokenizer(tok_dir).backend_tokenizer
    enc = tok.encode_batch_fast(docs, add_special_tokens=False)
    lens = [len(e.ids) + 1 for e in enc]  # + EOS
    rows = max(2, round(tokens / seq_len / 2) * 2)
    chosen, total, i = [], 0, 0
    while total < rows * seq_len or (total // seq_len) % 2:
        chosen.append(docs[i % len(docs)])
        total += lens[i % len(docs)]
        i += 1
    with path.open("w", encoding="utf-8") as f:
        for t in chosen:
            f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
    return {"documents": len(chosen), "tokens_expected": total, "rows_expected": total // seq_len}


def prep(tok_dir: str, corpus: Path, out: Path, seq_len: int) -> dict:
    from bumblefast.config import PrepConfig
    from bumblefast.prep.run import run_prep

    cfg = PrepConfig(
        stage="pretrain",
        input=[str(corpus)],
        tokenizer_name_or_path=tok_dir,
        seq_len=seq_len,
        output_dir=str(out),
        num_workers=1,
    )
    t = time.perf_counter()
    m = run_prep(cfg, progress=False)
    return {
        "seconds": time.perf_counter() - t,
        "rows": m["rows"],
        "tokens": m["tokens"]["real"],
        "tail_tokens_dropped": m["tokens"]["tail_tokens_dropped"],
    }


@contextlib.contextmanager
def single_process_world():
    """This process as a world of one, whatever launched it (restored afterwards)."""
    saved = {k: os.environ.pop(k) for k in WORLD_VARS if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def fresh_copy(shards: Path, dst: Path) -> Path:
    """A copy of prep's output as prep wrote it (zstd shards only): streaming decompresses a
    local shard next to its .zstd on first read and keeps both, so a second reader of the same
    folder would skip the decompression the first one paid for."""
    import shutil

    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(shards, dst)
    return dst


def thread_cpu_seconds() -> dict[str, float]:
    """CPU seconds of each thread of this process so far (Linux /proc; empty elsewhere)."""
    tick, out = os.sysconf("SC_CLK_TCK"), {}
    with contextlib.suppress(OSError):
        for tid in os.listdir("/proc/self/task"):
            with contextlib.suppress(OSError, ValueError):
                stat = Path(f"/proc/self/task/{tid}/stat").read_text()
                fields = stat[stat.rindex(")") + 2 :].split()
                out[tid] = (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    return out


def background_cpu(before: dict[str, float], after: dict[str, float]) -> float:
    """CPU seconds spent by threads other than the main one between two snapshots."""
    main = str(threading.get_native_id())
    return sum(v - before.get(t, 0.0) for t, v in after.items() if t != main)


def read_epochs(shards: str, epochs: int, barrier=None) -> dict:
    """Build the loader (timed), then read `epochs` full epochs, each timed (after `barrier`,
    when given); per epoch: tokens, seconds and the sample ids read."""
    from bumblefast.shards import build_loader

    t = time.perf_counter()
    loader = build_loader(shards, batch_size=BATCH_SIZE, seed=SEED)
    construct = time.perf_counter() - t
    num_samples = int(loader.dataset.num_samples)
    out = []
    for _ in range(epochs):
        if barrier is not None:
            barrier()
        t, cpu, main_cpu, threads0 = time.perf_counter(), time.process_time(), time.thread_time(), thread_cpu_seconds()
        tokens, batches, ids, first = 0, 0, [], None
        for b in loader:
            if first is None:
                first = time.perf_counter() - t
            tokens += b.num_tokens
            ids += b.sample_ids.tolist()
            batches += 1
        seconds = time.perf_counter() - t
        out.append(
            {
                "tokens": tokens,
                "seconds": seconds,
                "batches": batches,
                "sample_ids": ids,
                "first_batch_seconds": first,
                "cpu_seconds": time.process_time() - cpu,
                "main_thread_cpu_seconds": time.thread_time() - main_cpu,
                # streaming's own threads (shard prepare: a cache file lock per sample; ready: polling)
                "background_cpu_seconds": background_cpu(threads0, thread_cpu_seconds()),
            }
        )
    del loader
    gc.collect()  # the dataset's shared memory goes with it
    return {"construct_seconds": construct, "num_samples": num_samples, "epochs": out}


def summarize(per_rank: list[dict], epoch: int) -> dict:
    """One epoch over all ranks: rows checked; tokens / the slowest rank's seconds."""
    num_samples = per_rank[0]["num_samples"]
    eps = [r["epochs"][epoch] for r in per_rank]
    check_rows([e.pop("sample_ids") for e in eps], num_samples, epoch)
    tokens, seconds = sum(e["tokens"] for e in eps), max(e["seconds"] for e in eps)
    cpu = sum(e["cpu_seconds"] for e in eps)
    return {
        "cpu_seconds": cpu,  # all threads of all ranks: the work done, whatever the scheduling
        "cpu_seconds_per_m_tokens": cpu / tokens * 1e6,
        "busy": [e["cpu_seconds"] / e["seconds"] for e in eps],  # per rank: CPU time / wall time
        "main_thread_cpu_seconds": sum(e["main_thread_cpu_seconds"] for e in eps),
        "background_cpu_seconds": sum(e["background_cpu_seconds"] for e in eps),
        "first_batch_seconds": max(e["first_batch_seconds"] or 0.0 for e in eps),
        "ranks": len(per_rank),
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "per_rank_tokens_per_s": tokens / seconds / len(per_rank),
        "rows": num_samples,
        "batches": sum(e["batches"] for e in eps),
        "rank_seconds": [e["seconds"] for e in eps],
        "construct_seconds": max(r["construct_seconds"] for r in per_rank),
    }


def rank_env(rank: int, world: int, port: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in WORLD_VARS}
    env.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p),
    )
    return env


class RankServer(BenchServer):
    """This file with a hidden `--serve`: imports what a rank imports (torch.distributed,
    streaming, bumblefast.shards; ~6-8 s of each run's start-up when every rank paid them), then
    per request forks `world` fresh rank processes, all at once, which run `rank_main` with
    their world's variables; answers with their exit codes. Every rank, 1-rank runs included,
    starts the same way: only the world size differs."""

    def __init__(self, log: Path):
        env = {k: v for k, v in os.environ.items() if k not in WORLD_VARS}
        env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--serve"]
        super().__init__(cmd, env=env, log=log, tag=RESULT_TAG, name="stream bench: rank server")

    def run(self, request: dict) -> list[int]:
        return self.request(request)


def serve_main() -> int:
    """The rank server's loop (see RankServer)."""
    import signal

    import torch.distributed  # noqa: F401  (what every rank imports, loaded once here)

    import bumblefast.shards  # noqa: F401

    for line in sys.stdin:
        req = json.loads(line)
        kids = []
        for r in range(req["world"]):
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    signal.alarm(int(req["timeout"]))  # a hung rank dies instead of hanging the bench
                    out = os.open(os.path.join(req["logs"], f"rank{r}.out"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                    err = os.open(os.path.join(req["logs"], f"rank{r}.err"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                    os.dup2(out, 1)
                    os.dup2(err, 2)
                    os.environ.update(rank_env(r, req["world"], req["port"]))
                    code = rank_main(r, req["shards"], req["epochs"])
                except BaseException:
                    import traceback

                    traceback.print_exc()
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
            kids.append(pid)
        codes = []
        for pid in kids:
            _, status = os.waitpid(pid, 0)
            codes.append(os.waitstatus_to_exitcode(status))
        print(RESULT_TAG + json.dumps(codes), flush=True)
    return 0


def read_n_ranks(shards: Path, epochs: int, logs: Path, server: RankServer, world: int = 2, timeout: float = 600):
    """`world` fresh rank processes on this node, forked together by `server`; per epoch, the
    summary, and the ranks' start-up figures."""
    from streaming.base.util import clean_stale_shared_memory

    with single_process_world():
        clean_stale_shared_memory()
    logs.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    codes = server.run(
        {
            "world": world,
            "shards": str(shards),
            "epochs": epochs,
            "port": free_port(),
            "logs": str(logs),
            "timeout": timeout,
        }
    )
    wall = time.perf_counter() - t
    for r, code in enumerate(codes):
        if code != 0:
            raise RuntimeError(f"stream bench: rank {r} of {world} exited with {code}\n" + rank_logs(logs, world))
    reports = []
    for r in range(world):
        text = (logs / f"rank{r}.out").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(RESULT_TAG)]
        if not lines:
            raise RuntimeError(f"stream bench: rank {r} printed no result\n{rank_logs(logs, world)}")
        reports.append(json.loads(lines[-1][len(RESULT_TAG) :]))
    startup = {
        "fork_to_exit_seconds": wall,
        "init_seconds": [rep["init_seconds"] for rep in reports],  # process group (imports: before the fork)
    }
    return [summarize(reports, e) for e in range(epochs)], startup


def rank_logs(logs: Path, world: int) -> str:
    parts = []
    for r in range(world):
        err = (logs / f"rank{r}.err").read_text(errors="replace")[-4000:]
        parts.append(f"--- rank {r} stderr (last 4000 chars) ---\n{err}")
    return "\n".join(parts)


def check_rows(per_rank: list[list[int]], num_samples: int, epoch: int = 0) -> None:
    """The ranks' sample ids are disjoint and cover 0..num_samples-1 exactly once."""
    seen = [i for ids in per_rank for i in ids]
    if sorted(seen) != list(range(num_samples)):
        sets = [set(ids) for ids in per_rank]
        overlap = set.intersection(*sets) if len(sets) > 1 else set()
        missing = set(range(num_samples)) - set(seen)
        raise RuntimeError(
            f"stream bench: in epoch {epoch}, {len(per_rank)} rank(s) did not read each of the "
            f"{num_samples} rows exactly once: {len(seen)} rows read, {len(missing)} missing, "
            f"{len(overlap)} read by more than one rank, {len(seen) - len(set(seen))} repeats "
            "(streaming pads an epoch that does not split evenly over the ranks by repeating rows)"
        )


def pin_to_core(rank: int) -> None:
    """Rank r runs on core r only: one core per rank, whatever the world size. Unpinned, a single
    rank's background threads (streaming's shard-prepare and ready threads) spread onto the idle
    second core and contend with its main thread for the GIL: measured on the 2-core VM
    (2026-12-01), 2.0 s and 2.3 CPU-s per epoch unpinned vs 1.2 s and 1.15 CPU-s pinned, which put
    the 2-rank / 1-rank ratio above the core ceiling."""
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {rank % os.cpu_count()})


def rank_main(rank: int, shards: str, epochs: int) -> int:
    """One rank of the multi-rank read (a process forked by the rank server): its world comes
    from the environment."""
    t_start = time.perf_counter()
    pin_to_core(rank)
    import torch.distributed as dist

    import bumblefast.shards  # noqa: F401  (timed here with the rest of start-up)

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    if dist.get_rank() != rank:
        raise RuntimeError(f"--rank {rank} but the process group says {dist.get_rank()}")
    ready = time.perf_counter() - t_start  # process group (the server imported torch, streaming)
    r = read_epochs(shards, epochs, barrier=dist.barrier)  # each epoch timed from a barrier
    dist.barrier()
    dist.destroy_process_group()
    r.update(rank=rank, init_seconds=ready)
    print(RESULT_TAG + json.dumps(r), flush=True)
    return 0


def trainer_need() -> dict:
    """Tokens/s one GPU consumes training the preset (computed from the FLOP formulas)."""
    from bumblefast import flops
    from bumblefast.modelinfo import read_model_config

    cfg = read_model_config(PRESET)
    peak = flops.peak_tflops(NEED["device"])
    per_token = flops.train_flops_per_token(cfg, NEED["seq_len"])
    need = NEED["mfu"] * peak * 1e12 / per_token
    return {
        **NEED,
        "peak_tflops": peak,
        "train_flops_per_token": per_token,
        "need_tokens_per_s_per_gpu": need,
    }


def median_round(rounds: list[dict]) -> dict:
    """The median round by rate, with every round's rate and seconds kept (min-max beside it)."""
    ordered = sorted(rounds, key=lambda r: r["tokens_per_s"])
    out = dict(ordered[len(ordered) // 2])
    out["rounds_tokens_per_s"] = [round(r["tokens_per_s"]) for r in rounds]
    out["round_seconds"] = [r["seconds"] for r in rounds]
    out["tokens_per_s_range"] = [ordered[0]["tokens_per_s"], ordered[-1]["tokens_per_s"]]
    return out


def ceiling_note(r1: dict, r2: dict, ratio: float, ceiling: float) -> str:
    """What the measurement says about the 2-rank / 1-rank ratio against the core ceiling."""
    work = r2["cpu_seconds_per_m_tokens"] / r1["cpu_seconds_per_m_tokens"]
    busy1, busy2 = r1["busy"][0], sum(r2["busy"]) / len(r2["busy"])
    head = (
        f"2 ranks vs 1: {ratio:.2f}x, ceiling {ceiling:.0f}x ({ceiling:.0f} cores); per rank "
        f"{r2['per_rank_tokens_per_s']:,.0f} tokens/s vs the 1-rank rate {r1['tokens_per_s']:,.0f} (the per-rank "
        f"ceiling). Work: {r2['cpu_seconds_per_m_tokens']:.3f} vs {r1['cpu_seconds_per_m_tokens']:.3f} CPU-s per "
        f"M tokens (2 ranks / 1 rank = {work:.2f}); CPU busy / wall: 1 rank {busy1:.0%}, 2 ranks {busy2:.0%} each; "
        f"streaming's background threads {r1['background_cpu_seconds']:.2f} CPU-s (1 rank) vs "
        f"{r2['background_cpu_seconds']:.2f} (2 ranks, summed); each rank pinned to its own core"
    )
    if ratio <= ceiling * 1.05:
        return head + "."
    if work < 0.9:
        why = f"2 ranks did {work:.2f}x the CPU work per token of 1 rank: not the same work"
    elif busy1 < 0.9 * busy2:
        why = (
            f"the same work, but the single rank computed only {busy1:.0%} of its wall time (each of 2 ranks "
            f"{busy2:.0%}): it waited (descheduled or sleeping), so the ratio measures its idle time, not scaling"
        )
    else:
        why = "the same work and CPU use: timing noise (compare the min-max ranges)"
    return f"{head}. Above the ceiling: {why}."


def stream_rounds(shards: Path, tmp: Path, rounds: int) -> dict:
    """1 rank and 2 ranks in interleaved rounds (order alternating: a busy moment hits both
    alike), each a run of EPOCHS epochs; per world size, each round's epochs (and 2 ranks' start-up)."""
    import shutil

    server = RankServer(tmp / "rank_server.log")  # started after prep: nothing else shares the cores

    def run(world: int, k: int):
        # each run: a fresh copy of prep's output (same first-read decompression) read by fresh
        # processes (the 1 rank too: the same start, only the world size differs)
        copy = fresh_copy(shards, tmp / f"run{k}_{world}")
        out = read_n_ranks(copy, EPOCHS, tmp / f"rank_logs_{k}_{world}", server, world)
        shutil.rmtree(copy, ignore_errors=True)
        return out

    try:
        one, two = interleave([1, 2], rounds, run)
    finally:
        server.close()
    return {"1": [e for e, _ in one], "2": [e for e, _ in two], "startup": [st for _, st in two]}


def bench(size: str, workdir: Path) -> dict:
    """`bumblefast bench stream`: the section described in benchmarks/benchlib.py."""
    import benchlib as BL

    from bumblefast.tokenizer import train_tokenizer

    z = SIZES[size]
    tmp = Path(workdir)
    tmp.mkdir(parents=True, exist_ok=True)
    src = source_file()
    notes = [] if SHARED.is_dir() else [f"{SHARED} not present: corpus from {src}"]
    load_start = os.getloadavg()[0]

    t = time.perf_counter()
    tok_dir = str(tmp / "tok")
    train_tokenizer([src], z["vocab"], tok_dir)
    tok_s = time.perf_counter() - t
    corpus = build_corpus(tok_dir, documents(src), tmp / "corpus.jsonl", z["tokens"], z["seq_len"])
    shards = tmp / "shards"  # never read: each run reads its own copy
    prepped = prep(tok_dir, tmp / "corpus.jsonl", shards, z["seq_len"])

    runs = stream_rounds(shards, tmp, z["rounds"])
    load_end = os.getloadavg()[0]
    # epoch 0 reads the shards as prep wrote them (streaming decompresses each on first use):
    # what a training run's first epoch costs; epoch 1 reads the shards already decompressed
    r1, r2 = median_round([r[0] for r in runs["1"]]), median_round([r[0] for r in runs["2"]])
    w1, w2 = median_round([r[1] for r in runs["1"]]), median_round([r[1] for r in runs["2"]])

    m1 = BL.rounds("stream 1 rank", r1["tokens"], r1["round_seconds"])
    m2 = BL.rounds("stream 2 ranks (aggregate)", r2["tokens"], r2["round_seconds"])
    ceiling = float(min(2, os.cpu_count() or 1))
    notes.append("first epoch: " + ceiling_note(r1, r2, m2["value"] / m1["value"], ceiling))
    notes.append(
        "second epoch (decompressed): " + ceiling_note(w1, w2, w2["tokens_per_s"] / w1["tokens_per_s"], ceiling)
    )
    need = trainer_need()
    n = need["need_tokens_per_s_per_gpu"]
    results = {
        "source": str(src),
        "notes": notes,
        "load_average_at_start": load_start,
        "load_average_at_end": load_end,
        "tokenizer_seconds": tok_s,
        "corpus": corpus,
        "prep": prepped,
        "read_1_rank": r1,
        "read_2_ranks": r2,
        "read_1_rank_second_epoch": w1,
        "read_2_ranks_second_epoch": w2,
        "rank_startup": runs["startup"],
        "rows_read_exactly_once": True,  # check_rows raised otherwise (every epoch, every run)
        "trainer_need": need,
        "need_tokens_per_s_per_gpu": n,
        "headroom_per_rank": {"1 rank": r1["per_rank_tokens_per_s"] / n, "2 ranks": r2["per_rank_tokens_per_s"] / n},
        "headroom_explanation": HEADROOM.format(n=n, **NEED),
    }
    config = {
        "size": size,
        **z,
        "batch_size": BATCH_SIZE,
        "seed": SEED,
        "epochs_per_run": EPOCHS,
        "world_sizes": [1, 2],
    }
    ratio = BL.ratio("stream 2 ranks vs 1 rank (aggregate tokens/s)", m2, m1)
    work = r2["cpu_seconds_per_m_tokens"] / r1["cpu_seconds_per_m_tokens"]
    if abs(work - 1) > 0.1:  # the table says so beside the ratio, not only the notes
        ratio["caveat"] = f"not like for like: 2 ranks did {work:.2f}x the CPU-s per token of 1 rank"
    return {
        "config": config,
        "results": results,
        "ratios": [ratio],
        "points": [BL.point("stream 1 rank", m1["value"]), BL.point("stream 2 ranks", m2["value"])],
    }


def to_markdown(section: dict, host: str, day: str) -> str:
    r, c = section["results"], section["config"]
    md = [
        f"# bench_stream ({host}, {os.cpu_count()} CPUs, {day}, size {c['size']})",
        "",
        f"{r['prep']['tokens']:,} tokens in {r['prep']['rows']} rows of {c['seq_len']}, "
        f"batch_size {c['batch_size']}; load average {r['load_average_at_start']:.2f} at start, "
        f"{r['load_average_at_end']:.2f} at end; median of {c['rounds']} interleaved round(s) (min-max)",
        "",
    ]
    md += [f"note: {n}" for n in r["notes"]]
    md += ratio_lines(section["ratios"], note="caveat")
    md += [
        "",
        "| configuration | epoch | s | tokens/s median (min-max) | per rank tokens/s | per-rank ceiling "
        "(1-rank rate) | CPU-s per M tokens | busy (CPU/wall) | loader build s | headroom |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    n = r["need_tokens_per_s_per_gpu"]
    for name, key in (("1 rank", "read_1_rank"), ("2 ranks", "read_2_ranks")):
        for epoch, x in (("first", r[key]), ("second", r[key + "_second_epoch"])):
            lo, hi = x["tokens_per_s_range"]
            one = r["read_1_rank" + ("" if epoch == "first" else "_second_epoch")]["tokens_per_s"]
            md.append(
                f"| {name} | {epoch} | {x['seconds']:.3f} | {x['tokens_per_s']:,.0f} ({lo:,.0f}-{hi:,.0f}) | "
                f"{x['per_rank_tokens_per_s']:,.0f} | {one:,.0f} | {x['cpu_seconds_per_m_tokens']:.3f} | "
                f"{', '.join(f'{b:.0%}' for b in x['busy'])} | {x['construct_seconds']:.3f} | "
                f"{x['per_rank_tokens_per_s'] / n:.1f}x |"
            )
    init = [s for run in r["rank_startup"] for s in run["init_seconds"]]
    md += [
        "",
        "first epoch: the shards as prep wrote them (streaming decompresses each zstd shard on "
        "first use); second: already decompressed. Ratio, points and headroom: first epoch.",
        f"every row read exactly once, every epoch: {r['rows_read_exactly_once']}; rank start-up "
        f"(process group; imports done once, before the fork): {min(init):.1f}-{max(init):.1f}s, not in the rates",
        f"need: {r['headroom_explanation']}",
    ]
    return "\n".join(md) + "\n"


if __name__ == "__main__":
    sys.exit(
        cli("stream", __doc__, bench, to_markdown, SIZES, hidden={"serve": serve_main})
    )  # --serve: the rank server
