"""Prep at the seed's scale: start-up, 1 vs 2 workers, 10M-1B tokens, SFT at 1M records, resume.

    flock /work/measure.lock .venv/bin/python benchmarks/bench_prep_scale.py \\
        [--tokens 10M,100M,1B] [--workers 1,2] [--rounds 3] [--only startup,scale,kill,sft,edge] \\
        [--tokenizer ../shared/tokenizers/qwen2] [--workdir .benchdata] [--out benchmarks/results]

Corpora are built from real text: every string of ../shared/data/*.json (Chinese pretraining
documents, Alpaca/ShareGPT/tool-call conversations, preference pairs) and datasets/demo/*.json
(English), cut into sentences and reshuffled into documents of 3-40 sentences (seeded), written
as 8 jsonl files per corpus (1B: the 100M corpus's files, 10 copies each), sized in tokens of
the tokenizer used (the Qwen2-compatible 151k
byte-level BPE by default). SFT: the real Alpaca / multi-turn / tool-call records, repeated
with a counter in the first user turn, to >= 1M records.

Every prep runs as `python -m bumblefast.prep.cli` in a fresh process (what a user runs);
measured: wall, CPU-s (user+sys of the process and its workers, from wait4), peak RSS of every
process (psutil, sampled every 0.1 s), tokens/s, and the per-task profile the tasks record
(read / encode / write MDS / pack, via BUMBLEFAST_PREP_PROFILE). Start-up: a 200-record prep,
timed whole, plus a phase profile (imports, the two tokenizer loads, the verification sample,
tasks, join) from an in-process run. Kill: a 100M-token prep SIGKILLed once half its tasks are
finished, then rerun: rerun time vs a full run, and the output compared byte for byte. Edge:
packing efficiency with the default task size vs one task for the same SFT corpus.
Rounds are interleaved (round r runs every configuration once); medians and ranges reported.
The machine is shared: load averages are recorded with every run.
Writes `<out>/bench_prep_scale_<host>_<date>.json` and `.md`.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from harness import median_range

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SENT = re.compile(r"(?<=[。！？!?\.])\s*")


def parse_count(s: str) -> int:
    s = s.strip().upper()
    mult = {"K": 10**3, "M": 10**6, "B": 10**9}.get(s[-1], 1)
    return int(float(s.rstrip("KMB")) * mult)


def source_files() -> list[Path]:
    return sorted((SHARED / "data").glob("*.json")) + sorted((ROOT / "datasets" / "demo").glob("*.json"))


def sentences() -> list[str]:
    from bumblefast.tokenizer import iter_texts

    out = []
    for f in source_files():
        for t in iter_texts(f):
            out += [s.strip() for s in SENT.split(t) if len(s.strip()) > 3]
    return out


def tokens_per_char(tok_dir: str, sample: list[str]) -> float:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(tok_dir) / "tokenizer.json"))
    n = sum(len(e.ids) for e in tok.encode_batch(sample, add_special_tokens=False))
    return n / sum(map(len, sample))


def build_pretrain(folder: Path, tokens: int, tpc: float, sents: list[str], files: int = 8) -> list[Path]:
    """`files` jsonl files of reshuffled real sentences, about `tokens` tokens in all. From 1B
    tokens up: the 100M corpus's files repeated (k copies each; generating 4.6 GB of shuffled
    sentences in Python takes longer than prepping them)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"part-{k:02d}.jsonl" for k in range(files)]
    if all(p.is_file() for p in paths):
        return paths
    if tokens >= 10**9:
        base = build_pretrain(folder.parent / f"pt_{10**8}", 10**8, tpc, sents, files)
        for src, p in zip(base, paths, strict=True):
            with p.with_suffix(".tmp").open("wb") as f:
                for _ in range(tokens // 10**8):
                    f.write(src.read_bytes())
            p.with_suffix(".tmp").rename(p)
        return paths
    rng = random.Random(tokens)
    per_file = int(tokens / tpc / files)
    for p in paths:
        tmp = p.with_suffix(".tmp")
        n = 0
        with tmp.open("w", encoding="utf-8") as f:
            buf = []
            while n < per_file:
                doc = " ".join(rng.choices(sents, k=rng.randint(3, 40)))
                buf.append(json.dumps({"text": doc}, ensure_ascii=False))
                n += len(doc)
                if len(buf) >= 4096:
                    f.write("\n".join(buf) + "\n")
                    buf = []
            if buf:
                f.write("\n".join(buf) + "\n")
        tmp.rename(p)
    return paths


def build_sft(folder: Path, records: int) -> list[Path]:
    """Real SFT records (Alpaca, multi-turn ShareGPT, tool calls), repeated with a counter."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "sft.jsonl"
    if path.is_file():
        return [path]
    base = []
    for name in ("alpaca_zh_demo.json", "duolun_train.json", "glaive_toolcall_zh_demo.json"):
        base += json.loads((SHARED / "data" / name).read_text(encoding="utf-8"))
    with path.with_suffix(".tmp").open("w", encoding="utf-8") as f:
        for i in range(records):
            r = dict(base[i % len(base)])
            if "instruction" in r:
                r["instruction"] = f"{i} {r['instruction']}"
            else:
                conv = [dict(t) for t in r["conversations"]]
                conv[0]["value"] = f"{i} {conv[0]['value']}"
                r["conversations"] = conv
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    path.with_suffix(".tmp").rename(path)
    return [path]


# ---- one measured prep ------------------------------------------------------------------------
def prep_cmd(stage: str, inputs: list[Path], tok: str, out: Path, workers: int, seq_len: int, **kw) -> list[str]:
    cmd = [sys.executable, "-m", "bumblefast.prep.cli", "--stage", stage, "--input", *map(str, inputs),
           "--tokenizer_name_or_path", tok, "--seq_len", str(seq_len), "--output_dir", str(out),
           "--num_workers", str(workers)]  # fmt: skip
    for k, v in kw.items():
        cmd += [f"--{k}", str(v)]
    return cmd


def measure(cmd: list[str], profile: Path | None = None, kill_when=None) -> dict:
    """Run `cmd`; wall, CPU-s (wait4), peak RSS per process (sampled). `kill_when()`: SIGKILL
    the process group as soon as it returns True."""
    import psutil

    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    if profile is not None:
        env["BUMBLEFAST_PREP_PROFILE"] = str(profile)
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=str(ROOT), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    ps = psutil.Process(proc.pid)
    peak: dict[int, float] = {}
    killed = False
    status = ru = None
    while True:
        pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        try:
            for p in [ps, *ps.children(recursive=True)]:
                try:
                    peak[p.pid] = max(peak.get(p.pid, 0.0), p.memory_info().rss / 2**20)
                except psutil.NoSuchProcess:
                    pass
        except psutil.NoSuchProcess:
            pass
        if kill_when is not None and not killed and kill_when():
            os.killpg(proc.pid, signal.SIGKILL)
            killed = True
        time.sleep(0.1)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode(errors="replace")
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0 and not killed:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    main_rss = peak.pop(proc.pid, 0.0)
    res = {
        "wall_s": round(wall, 3),
        "cpu_s": round(ru.ru_utime + ru.ru_stime, 3),
        "peak_rss_main_mb": round(main_rss, 1),
        "peak_rss_workers_mb": sorted((round(v, 1) for v in peak.values()), reverse=True),
        "load_before": round(load0, 2),
        "load_after": round(os.getloadavg()[0], 2),
        "killed": killed,
    }
    if profile is not None and profile.is_file():
        res["tasks"] = json.loads(profile.read_text())
        profile.unlink()
    return res


def tree_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode())
            h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()[:16]


def manifest_of(out: Path) -> dict:
    return json.loads((out / "bumblefast.json").read_text())


def stage_profile(tasks: list[dict]) -> dict:
    """The tasks' per-stage seconds summed, and per worker process: tokens / busy seconds."""
    keys = ("read", "encode", "write_mds", "pack_and_count", "seconds", "cpu_seconds")
    total = {k: round(sum(t["profile"][k] for t in tasks), 3) for k in keys}
    by_pid: dict[int, list[float]] = {}
    for t in tasks:
        acc = by_pid.setdefault(t["profile"]["pid"], [0.0, 0.0])
        acc[0] += t["tokens"]["real"]
        acc[1] += t["profile"]["seconds"]
    total["tokens_per_busy_s_per_worker"] = [round(a / max(b, 1e-9)) for a, b in by_pid.values()]
    total["tasks"] = len(tasks)
    return total


def summarize(runs: list[dict], key: str = "wall_s") -> dict:
    return dict(zip(("median", "min", "max"), (round(v, 3) for v in median_range(r[key] for r in runs))))


# ---- the phases -------------------------------------------------------------------------------
STARTUP_PROFILE = r"""
import json, sys, time
t0 = time.perf_counter()
from bumblefast.config import PrepConfig
import bumblefast.prep.run as R
import bumblefast.prep.encode as E
import bumblefast.tokenizer_backend as B
t_import = time.perf_counter() - t0
phases = {"import": t_import}
def timed(mod, name, label):
    f = getattr(mod, name)
    def w(*a, **k):
        t = time.perf_counter()
        try:
            return f(*a, **k)
        finally:
            phases[label] = phases.get(label, 0.0) + time.perf_counter() - t
    setattr(mod, name, w)
import bumblefast.tokenizer as T
timed(T, "load_tokenizer", "hf_tokenizer_load")
timed(B, "FastokensEncoder", "fastokens_load")
timed(B, "verify", "verification")
timed(R, "_execute", "tasks")
timed(R, "join_tasks", "join_and_publish")
cfg = json.loads(sys.argv[1])
t = time.perf_counter()
R.run_prep(PrepConfig(**cfg), progress=False)
phases["run_prep"] = time.perf_counter() - t
phases["total"] = time.perf_counter() - t0
print(json.dumps({k: round(v, 3) for k, v in phases.items()}))
"""


def phase_startup(a, work: Path, tok: str, sents: list[str], tpc: float) -> dict:
    small = work / "startup" / "small.jsonl"
    small.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    small.write_text(
        "".join(json.dumps({"text": " ".join(rng.choices(sents, k=20))}, ensure_ascii=False) + "\n" for _ in range(200))
    )
    out = work / "startup" / "out"
    runs, profiles = [], []
    for _ in range(a.rounds):
        runs.append(measure(prep_cmd("pretrain", [small], tok, out, 1, 4096)))
        cfg = {"stage": "pretrain", "input": [str(small)], "tokenizer_name_or_path": tok, "seq_len": 4096,
               "output_dir": str(out)}  # fmt: skip
        env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
        p = subprocess.run([sys.executable, "-c", STARTUP_PROFILE, json.dumps(cfg)], cwd=ROOT, env=env,
                           capture_output=True, text=True, check=True)  # fmt: skip
        profiles.append(json.loads(p.stdout.strip().splitlines()[-1]))
    shutil.rmtree(out, ignore_errors=True)
    keys = profiles[0].keys()
    return {
        "records": 200,
        "runs": runs,
        "wall_s": summarize(runs),
        "cpu_s": summarize(runs, "cpu_s"),
        "phases_in_process_median_s": {k: round(median_range(p.get(k, 0.0) for p in profiles)[0], 3) for k in keys},
        "target_wall_s": 3.0,
    }


def phase_scale(a, work: Path, tok: str, sents, tpc) -> list[dict]:
    rows = []
    for n in [parse_count(s) for s in a.tokens.split(",")]:
        corpus = build_pretrain(work / f"pt_{n}", n, tpc, sents)
        rounds = a.rounds if n <= 200 * 10**6 else 1
        per = {w: [] for w in a.worker_list}
        for _ in range(rounds):
            for w in a.worker_list:
                out = work / f"out_pt_{n}_{w}"
                r = measure(prep_cmd("pretrain", corpus, tok, out, w, 4096), profile=work / "profile.json")
                m = manifest_of(out)
                r.update(tokens=m["tokens"]["real"], tail_tokens_dropped=m["tokens"]["tail_tokens_dropped"],
                         tasks_n=m["prep"]["tasks"], hash=tree_hash(out) if n <= 200 * 10**6 else None)  # fmt: skip
                r["profile"] = stage_profile(r.pop("tasks", []))
                per[w].append(r)
                shutil.rmtree(out, ignore_errors=True)
                print(f"pretrain {n:,} tokens, {w} worker(s): {r['wall_s']:.1f} s wall, {r['cpu_s']:.1f} CPU-s, "
                      f"{r['tokens'] / r['wall_s'] / 1e6:.2f} M tok/s, RSS main {r['peak_rss_main_mb']:.0f} MB "
                      f"workers {r['peak_rss_workers_mb']} (load {r['load_before']})", flush=True)  # fmt: skip
        for w, runs in per.items():
            rows.append(
                {
                    "stage": "pretrain",
                    "target_tokens": n,
                    "corpus_bytes": sum(p.stat().st_size for p in corpus),
                    "workers": w,
                    "tokens": runs[0]["tokens"],
                    "wall_s": summarize(runs),
                    "cpu_s": summarize(runs, "cpu_s"),
                    "tokens_per_s": round(runs[0]["tokens"] / median_range(r["wall_s"] for r in runs)[0]),
                    "tokens_per_cpu_s": round(runs[0]["tokens"] / median_range(r["cpu_s"] for r in runs)[0]),
                    "identical_across_workers": None,
                    "runs": runs,
                }
            )
        hashes = {r["runs"][0]["hash"] for r in rows if r["target_tokens"] == n}
        for r in rows:
            if r["target_tokens"] == n and None not in hashes:
                r["identical_across_workers"] = len(hashes) == 1
        if n >= 10**9 and not a.keep:
            shutil.rmtree(work / f"pt_{n}", ignore_errors=True)
    return rows


def phase_kill(a, work: Path, tok: str, sents, tpc) -> dict:
    n = parse_count(a.kill_tokens)
    corpus = build_pretrain(work / f"pt_{n}", n, tpc, sents)
    w = max(a.worker_list)
    full_out, out = work / "kill_full", work / "kill_out"
    full = measure(prep_cmd("pretrain", corpus, tok, full_out, w, 4096))
    ref = tree_hash(full_out)
    shutil.rmtree(full_out)
    tasks_dir = out.parent / f".{out.name}.tasks" / "tasks"
    plan_n = None

    def half_done() -> bool:
        nonlocal plan_n
        if plan_n is None:
            try:
                plan_n = len(json.loads((tasks_dir / "plan.json").read_text())["tasks"])
            except (OSError, ValueError):
                return False
        done = sum(1 for p in tasks_dir.glob("t*") if p.is_dir() and ".tmp-" not in p.name)
        return done >= plan_n / 2

    killed = measure(prep_cmd("pretrain", corpus, tok, out, w, 4096), kill_when=half_done)
    done_at_kill = sum(1 for p in tasks_dir.glob("t*") if p.is_dir() and ".tmp-" not in p.name)
    rerun = measure(prep_cmd("pretrain", corpus, tok, out, w, 4096))
    same = tree_hash(out) == ref
    shutil.rmtree(out)
    res = {
        "tokens_target": n,
        "workers": w,
        "tasks": plan_n,
        "finished_at_kill": done_at_kill,
        "full": full,
        "killed_after_s": killed["wall_s"],
        "rerun": rerun,
        "rerun_fraction_of_full": round(rerun["wall_s"] / full["wall_s"], 3),
        "byte_identical": same,
        "target_fraction": 0.6,
    }
    print(f"kill at 50%: rerun {rerun['wall_s']:.1f} s vs full {full['wall_s']:.1f} s, identical {same}", flush=True)
    return res


def phase_sft(a, work: Path, tok: str, sents, tpc) -> list[dict]:
    corpus = build_sft(work / "sft", parse_count(a.sft_records))
    rows = []
    for w in a.worker_list:
        out = work / f"out_sft_{w}"
        r = measure(prep_cmd("sft", corpus, tok, out, w, 4096), profile=work / "profile.json")
        m = manifest_of(out)
        r.update(records=m["records"]["read"], tokens=m["tokens"]["real"], packing=m["packing_efficiency"],
                 hash=tree_hash(out))  # fmt: skip
        r["profile"] = stage_profile(r.pop("tasks", []))
        r["tokens_per_s"] = round(r["tokens"] / r["wall_s"])
        r["tokens_per_cpu_s"] = round(r["tokens"] / r["cpu_s"])
        rows.append({"stage": "sft", "workers": w, **r})
        shutil.rmtree(out, ignore_errors=True)
        print(
            f"sft {r['records']:,} records, {w} worker(s): {r['wall_s']:.1f} s, {r['tokens_per_s']:,} tok/s", flush=True
        )
    return rows


def phase_edge(a, work: Path, tok: str, sents, tpc) -> dict:
    """Packing efficiency at the default task size vs the whole input as one task (SFT, BFD)."""
    corpus = build_sft(work / "sft_edge", 100_000)
    out = {}
    for label, size in (("default_task_size", None), ("one_task", "100gb")):
        o = work / f"edge_{label}"
        extra = {"task_size": size} if size else {}
        measure(prep_cmd("sft", corpus, tok, o, max(a.worker_list), 4096, **extra))
        m = manifest_of(o)
        out[label] = {"tasks": m["prep"]["tasks"], "rows": m["rows"], "packing_efficiency": m["packing_efficiency"]}
        shutil.rmtree(o)
    out["packing_points_lost"] = round(
        100 * (out["one_task"]["packing_efficiency"] - out["default_task_size"]["packing_efficiency"]), 4
    )
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", default="10M,100M,1B")
    p.add_argument("--workers", default="1,2")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--only", default="startup,scale,kill,sft,edge")
    p.add_argument("--kill_tokens", default="100M")
    p.add_argument("--sft_records", default="1M")
    p.add_argument("--tokenizer", default=str(SHARED / "tokenizers" / "qwen2"))
    p.add_argument("--workdir", default=str(ROOT / ".benchdata"))
    p.add_argument("--keep", action="store_true", help="keep the 1B corpus (else deleted after its runs)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--tag", default=None, help="suffix of the result files (default: the phases run)")
    a = p.parse_args(argv)
    a.worker_list = [int(w) for w in a.workers.split(",")]
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    sents = sentences()
    rng = random.Random(1)
    tpc = tokens_per_char(a.tokenizer, rng.sample(sents, min(3000, len(sents))))
    res = {
        "date": datetime.date.today().isoformat(),
        "host": socket.gethostname(),
        "cpus": os.cpu_count(),
        "tokenizer": a.tokenizer,
        "text": f"{len(sents):,} real sentences from {', '.join(f.name for f in source_files())}, reshuffled",
        "tokens_per_char": round(tpc, 4),
        "load_at_start": os.getloadavg(),
    }
    phases = {"startup": phase_startup, "scale": phase_scale, "kill": phase_kill, "sft": phase_sft, "edge": phase_edge}
    for name in a.only.split(","):
        t = time.perf_counter()
        res[name] = phases[name](a, work, a.tokenizer, sents, tpc)
        print(f"[{name}: {time.perf_counter() - t:.0f} s]", flush=True)
    res["load_at_end"] = os.getloadavg()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"bench_prep_scale_{res['host']}_{res['date']}"
    if a.tag or a.only != "startup,scale,kill,sft,edge":
        stem = stem.with_name(stem.name + "_" + (a.tag or a.only.replace(",", "-")))
    stem.with_suffix(".json").write_text(json.dumps(res, indent=1, ensure_ascii=False) + "\n")
    stem.with_suffix(".md").write_text(report(res) + "\n")
    print(report(res))
    return 0


def report(res: dict) -> str:
    md = [f"# bench_prep_scale ({res['host']}, {res['cpus']} CPUs, {res['date']})", "", res["text"], ""]
    md.append(f"load average at start {res['load_at_start'][0]:.2f}, at end {res['load_at_end'][0]:.2f}")
    if "startup" in res:
        s = res["startup"]
        md += ["", f"## start-up (200 records, {res['tokenizer']})", "",
               f"wall median {s['wall_s']['median']} s (range {s['wall_s']['min']}-{s['wall_s']['max']}), "
               f"CPU {s['cpu_s']['median']} s; target <= {s['target_wall_s']} s: "
               f"{'met' if s['wall_s']['median'] <= s['target_wall_s'] else 'MISSED'}", "",
               "phases (in-process, median s): " + ", ".join(f"{k} {v}" for k, v in
                                                           s["phases_in_process_median_s"].items())]  # fmt: skip
    if "scale" in res:
        md += ["", "## pretrain, seq 4096", "",
               "| tokens | workers | wall s (median, range) | CPU s | tokens/s | tokens/CPU-s | peak RSS main MB | "
               "peak RSS workers MB | tokens/busy-s per worker | tasks |",
               "|---:|---:|---|---:|---:|---:|---:|---|---|---:|"]  # fmt: skip
        for r in res["scale"]:
            r0 = r["runs"][0]
            md.append(
                f"| {r['tokens']:,} | {r['workers']} | {r['wall_s']['median']} ({r['wall_s']['min']}-"
                f"{r['wall_s']['max']}) | {r['cpu_s']['median']} | {r['tokens_per_s']:,} | {r['tokens_per_cpu_s']:,} "
                f"| {r0['peak_rss_main_mb']} | {r0['peak_rss_workers_mb']} | "
                f"{r0['profile']['tokens_per_busy_s_per_worker']} | {r0['profile']['tasks']} |"
            )
        for r in res["scale"]:
            if r["workers"] == 1:
                pr = r["runs"][0]["profile"]
                md.append(f"\nprofile, {r['tokens']:,} tokens, 1 worker (s summed over tasks): read {pr['read']}, "
                          f"encode {pr['encode']}, write MDS {pr['write_mds']}, "
                          f"pack+count {pr['pack_and_count']}")  # fmt: skip
    if "kill" in res:
        k = res["kill"]
        md += ["", "## kill at 50% and rerun", "",
               f"{k['tokens_target']:,} tokens, {k['workers']} workers, {k['tasks']} tasks: killed after "
               f"{k['killed_after_s']} s ({k['finished_at_kill']} tasks finished), rerun {k['rerun']['wall_s']} s vs "
               f"full {k['full']['wall_s']} s = {k['rerun_fraction_of_full']:.0%} (target <= 60%), byte-identical: "
               f"{k['byte_identical']}"]  # fmt: skip
    if "sft" in res:
        md += ["", "## sft, seq 4096", "",
               "| records | workers | wall s | CPU s | tokens | tokens/s | tokens/CPU-s | packing | "
               "peak RSS main MB | workers MB |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]  # fmt: skip
        for r in res["sft"]:
            md.append(f"| {r['records']:,} | {r['workers']} | {r['wall_s']} | {r['cpu_s']} | {r['tokens']:,} | "
                      f"{r['tokens_per_s']:,} | {r['tokens_per_cpu_s']:,} | {r['packing']:.4f} | "
                      f"{r['peak_rss_main_mb']} | {r['peak_rss_workers_mb']} |")  # fmt: skip
    if "edge" in res:
        e = res["edge"]
        md += ["", "## packing lost at task edges (sft, 100k records)", "",
               f"default task size: {e['default_task_size']}; one task: {e['one_task']}; "
               f"{e['packing_points_lost']} points of packing efficiency lost"]  # fmt: skip
    return "\n".join(md)


if __name__ == "__main__":
    sys.exit(main())
