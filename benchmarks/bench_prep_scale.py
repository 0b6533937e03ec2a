"""Prep at scale: time and memory vs corpus size, 1 and 2 workers.

    .venv/bin/python benchmarks/bench_prep_scale.py [--tokens 10M,30M,100M] [--workers 1,2]
        [--backend auto] [--out benchmarks/results]

Synthesises a pretraining jsonl of about N tokens by repeating and perturbing the real
documents (../shared/data/pretrain_zh_demo.json, else the demo's): each copy is the
document rotated at a random sentence boundary with a random run number spliced in, so the
tokenizer sees varied text rather than one cached string. Then runs `bumblefast prep
--stage pretrain` on it in a fresh process per size and worker count and reports tokens/s
(wall and per CPU-second), and the peak RSS of every process of the run (sampled every
0.1 s with psutil, plus the kernel's ru_maxrss). Time should grow linearly with size and
memory stay flat (prep streams: one chunk per worker in flight, one partial row in the
packer, one shard in the writer).
Writes `<out>/bench_prep_scale_<host>_<date>.json` and `.md`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_prep import RUNNER, SHARED, stage_records  # noqa: E402

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]


def parse_count(s: str) -> int:
    s = s.strip().upper()
    mult = {"K": 10**3, "M": 10**6, "B": 10**9}.get(s[-1], 1)
    return int(float(s.rstrip("KMB")) * mult)


def synthesize(path: Path, tokens: int, tokens_per_char: float, seed: int = 0) -> int:
    """Write perturbed copies of the base documents until about `tokens` tokens; returns chars."""
    rng = random.Random(seed)
    base = [r["text"] for r in stage_records("pretrain") if r.get("text", "").strip()]
    target_chars = int(tokens / tokens_per_char)
    n = 0
    with path.open("w", encoding="utf-8") as f:
        while n < target_chars:
            t = rng.choice(base)
            cut = t.find("。", rng.randrange(len(t))) + 1 or rng.randrange(len(t))
            t = f"{t[cut:]} {rng.randrange(10**6)} {t[:cut]}"
            f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
            n += len(t)
    return n


def run_measured(cfg: dict) -> dict:
    """One prep run in a fresh process; peak RSS of each process of its tree, sampled."""
    import psutil

    proc = subprocess.Popen(
        [sys.executable, "-c", RUNNER, json.dumps(cfg)],
        cwd=str(ROOT),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    ps = psutil.Process(proc.pid)
    peak: dict[int, float] = {}
    while proc.poll() is None:
        try:
            for p in [ps, *ps.children(recursive=True)]:
                try:
                    peak[p.pid] = max(peak.get(p.pid, 0.0), p.memory_info().rss / 2**20)
                except psutil.NoSuchProcess:
                    pass
        except psutil.NoSuchProcess:
            pass
        time.sleep(0.1)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(err[-3000:])
    res = json.loads(out.strip().splitlines()[-1])
    main = peak.pop(proc.pid, 0.0)
    res["peak_rss_main_mb_sampled"] = main
    res["peak_rss_workers_mb_sampled"] = sorted(peak.values(), reverse=True)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", default="10M,30M,100M", help="corpus sizes in tokens (K/M/B suffixes)")
    p.add_argument("--workers", default="1,2")
    p.add_argument("--backend", default="auto", choices=["auto", "hf", "fastokens"])
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--workdir", default=None, help="where the corpora and shards go (default: a temp folder)")
    args = p.parse_args(argv)
    from bumblefast.tokenizer import load_tokenizer, train_tokenizer

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-prep-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    tok_dir = work / "tok"
    if not (tok_dir / "tokenizer.json").is_file():
        files = (sorted(SHARED.glob("*.json")) if SHARED.is_dir() else []) + sorted(
            (ROOT / "datasets" / "demo").glob("*.json")
        )
        train_tokenizer(files, args.vocab, tok_dir)
    tok = load_tokenizer(tok_dir)
    sample = [r["text"] for r in stage_records("pretrain")]
    tpc = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in sample) / sum(map(len, sample))
    sizes = [parse_count(s) for s in args.tokens.split(",")]
    workers = [int(w) for w in args.workers.split(",")]
    rows = []
    load0 = os.getloadavg()
    for n in sizes:
        corpus = work / f"corpus_{n}.jsonl"
        if not corpus.is_file():
            synthesize(corpus, n, tpc)
        for w in workers:
            cfg = dict(
                stage="pretrain",
                input=[str(corpus)],
                tokenizer_name_or_path=str(tok_dir),
                seq_len=2048,
                output_dir=str(work / f"out_{n}_{w}"),
                num_workers=w,
                tokenizer_backend=args.backend,
            )
            r = run_measured(cfg)
            r.update(
                target_tokens=n,
                workers=w,
                corpus_bytes=corpus.stat().st_size,
                tokens_per_s=r["tokens"] / r["seconds"],
                tokens_per_cpu_s=r["tokens"] / r["cpu_seconds"],
            )
            rows.append(r)
            print(
                f"{n:>12,} tokens target, {w} worker(s): {r['tokens']:,} tokens in {r['seconds']:.1f}s "
                f"({r['tokens_per_s']:,.0f} tok/s, {r['tokens_per_cpu_s']:,.0f} tok/CPU-s), peak RSS main "
                f"{r['peak_rss_main_mb_sampled']:.0f} MB, "
                f"workers {[round(x) for x in r['peak_rss_workers_mb_sampled']]} MB",
                flush=True,
            )
            subprocess.run(["rm", "-rf", cfg["output_dir"]], check=False)
    day, host = datetime.date.today().isoformat(), socket.gethostname()
    md = [
        f"# bench_prep_scale ({host}, {os.cpu_count()} CPUs, {day})",
        "",
        f"backend {args.backend}; load average at start {load0[0]:.1f}, at end {os.getloadavg()[0]:.1f}",
        "",
        "| tokens | workers | seconds | tokens/s | tokens/CPU-s | peak RSS main MB | peak RSS per worker MB |",
        "|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        md.append(
            f"| {r['tokens']:,} | {r['workers']} | {r['seconds']:.1f} | {r['tokens_per_s']:,.0f} | "
            f"{r['tokens_per_cpu_s']:,.0f} | {r['peak_rss_main_mb_sampled']:.0f} | "
            f"{', '.join(str(round(x)) for x in r['peak_rss_workers_mb_sampled']) or '-'} |"
        )
    for w in workers:
        mine = [r for r in rows if r["workers"] == w]
        if len(mine) >= 2:
            a, b = mine[0], mine[-1]
            md.append(
                f"\n{w} worker(s): {b['tokens'] / a['tokens']:.1f}x the tokens took {b['seconds'] / a['seconds']:.2f}x "
                f"the time and {b['peak_rss_main_mb_sampled'] / a['peak_rss_main_mb_sampled']:.2f}x the main "
                "process's peak RSS"
            )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"bench_prep_scale_{host}_{day}"
    stem.with_suffix(".json").write_text(
        json.dumps(
            {"date": day, "host": host, "backend": args.backend, "load_average_at_start": load0, "runs": rows}, indent=2
        )
        + "\n"
    )
    stem.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
