"""Prep + shard-reading benchmark, in one run.

    .venv/bin/python benchmarks/bench_prep.py [--size min|cpu] [--out benchmarks/results]
    (or `bumblefast bench prep`, which writes it into the combined report)

Measures, on the same text with the same tokenizer:
- raw limit: the tokenizer's own batch encode (`encode_batch_fast`, one core) over the texts;
- `bumblefast prep --stage pretrain` with 1 and 2 workers, end to end (read, parse, check,
  tokenize, pack, zstd MDS write, manifest). Ratios are of *time for the same text* (the raw
  encode's token count over each side's seconds), so the EOS prep appends is not credited;
  also per CPU-second (all processes), which is what "per worker" means on a shared machine;
- two corpora: real pretraining documents (../shared/data/pretrain_zh_demo.json, repeated;
  the acceptance figure) and short records (every string of the sample files, ~60 chars,
  the worst case for per-record overhead);
- a naive per-record baseline as BumbleCore does it: `datasets.map` tokenizing one record at a
  time into rows padded to seq_len;
- nodes: the corpus split over 2 nodes (run one after the other here) and `prep merge`; with
  the measured per-node rate and merge cost, the projected wall time of a 1B-token corpus
  on N nodes;
- packing efficiency (real tokens / row capacity) of prep's SFT and DPO rows at seq_len 2048
  against pad-to-longest micro-batches of 4 (DPO: the 8 chosen+rejected sequences of 4 pairs);
- streaming read: tokens/s of `bumblefast.shards.build_loader` over the pretrain shards.

Data: ../shared/data (the real samples) when present, else a printed reason and the demo data
only. The tokenizer is a byte-level BPE trained here on the same data (8192 ids; size min:
1024) so that Chinese text compresses roughly as with a production vocabulary.
Writes `<out>/bench_prep_<host>_<date>.json` and `.md`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one core per process, fair per-worker numbers
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "datasets" / "demo"
SHARED = ROOT.parent / "shared" / "data"


def texts_of(path: Path) -> list[str]:
    """Every string of a json file (for the pretrain corpus)."""
    from bumblefast.tokenizer import iter_texts

    return list(iter_texts(path))


def corpus_texts(kind: str) -> list[str]:
    """documents: real pretraining documents; short: every string of every sample file."""
    if kind == "documents":
        src = SHARED / "pretrain_zh_demo.json"
        return [t for t in texts_of(src if src.is_file() else DEMO / "pretrain.json") if t.strip()]
    files = (sorted(SHARED.glob("*.json")) if SHARED.is_dir() else []) + sorted(DEMO.glob("*.json"))
    return [t for f in files for t in texts_of(f) if t.strip()]


def build_corpus(tmp: Path, kind: str, target_chars: int) -> tuple[Path, list[str]]:
    base = corpus_texts(kind)
    texts, n = [], 0
    while n < target_chars:
        for t in base:
            texts.append(t)
            n += len(t)
            if n >= target_chars:
                break
    path = tmp / f"corpus_{kind}.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
    return path, texts


def _cpu() -> float:
    """CPU seconds of this process and its reaped children (pool workers are joined in prep)."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def bench_raw(tok_dir: str, texts: list[str]) -> dict:
    from bumblefast.tokenizer import load_tokenizer

    tok = load_tokenizer(tok_dir).backend_tokenizer
    tok.encode_batch_fast(texts[:256], add_special_tokens=False)  # warm up
    t, c = time.perf_counter(), _cpu()
    n = 0
    for i in range(0, len(texts), 256):
        n += sum(len(e.ids) for e in tok.encode_batch_fast(texts[i : i + 256], add_special_tokens=False))
    el, cpu = time.perf_counter() - t, _cpu() - c
    return {"tokens": n, "seconds": el, "cpu_seconds": cpu, "tokens_per_s": n / el, "tokens_per_cpu_s": n / cpu}


def bench_prep(tok_dir: str, corpus: Path, out: Path, workers: int, seq_len: int, node: tuple[int, int] = (0, 1)) -> dict:
    from bumblefast.config import PrepConfig
    from bumblefast.prep.run import run_prep

    cfg = PrepConfig(stage="pretrain", input=[str(corpus)], tokenizer_name_or_path=tok_dir,
                     seq_len=seq_len, output_dir=str(out), num_workers=workers,
                     node_rank=node[0], num_nodes=node[1])
    t, c = time.perf_counter(), _cpu()
    m = run_prep(cfg, progress=False)
    el, cpu = time.perf_counter() - t, _cpu() - c
    n = m["tokens"]["real"] + m["tokens"]["tail_tokens_dropped"]
    return {"workers": workers, "tokens": n, "seconds": el, "cpu_seconds": cpu,
            "tokens_per_s": n / el, "tokens_per_cpu_s": n / cpu}


def best_of(rounds: list[dict]) -> dict:
    """The fastest round by wall time (the machine may be shared), with every round kept."""
    best = dict(max(rounds, key=lambda r: r["tokens_per_s"]))
    best["rounds_tokens_per_s"] = [round(r["tokens_per_s"]) for r in rounds]
    best["tokens_per_cpu_s"] = max(r["tokens_per_cpu_s"] for r in rounds)
    return best


def bench_naive(tok_dir: str, texts: list[str], seq_len: int) -> dict:
    """BumbleCore-style: datasets.map, one record at a time, padded to seq_len rows."""
    from transformers import AutoTokenizer

    import datasets

    datasets.disable_progress_bars()
    tok = AutoTokenizer.from_pretrained(tok_dir)
    ds = datasets.Dataset.from_dict({"text": texts})

    def fn(rec):
        enc = tok(rec["text"] + tok.eos_token, truncation=True, max_length=seq_len, padding="max_length")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    t = time.perf_counter()
    out = ds.map(fn, remove_columns=["text"], keep_in_memory=True)
    real = sum(sum(m) for m in out["attention_mask"])
    el = time.perf_counter() - t
    return {"tokens": real, "seconds": el, "tokens_per_s": real / el, "padded_fraction": 1 - real / (len(texts) * seq_len)}


def padded_capacity(lengths: list[list[int]], batch: int = 4) -> tuple[int, int]:
    """(real tokens, padded capacity); lengths: per sample, the sequences it contributes
    (sft: [n]; dpo: [chosen, rejected])."""
    real = cap = 0
    for i in range(0, len(lengths), batch):
        group = lengths[i : i + batch]
        longest = max(n for s in group for n in s)
        real += sum(n for s in group for n in s)
        cap += longest * sum(len(s) for s in group)
    return real, cap


def bench_packing(tok_dir: str, stage: str, files: list[Path], out: Path, seq_len: int) -> dict:
    import numpy as np
    from streaming import StreamingDataset

    from bumblefast.config import PrepConfig
    from bumblefast.prep.run import run_prep

    m = run_prep(PrepConfig(stage=stage, input=[str(f) for f in files], tokenizer_name_or_path=tok_dir,
                            seq_len=seq_len, output_dir=str(out)), progress=False)
    ds = StreamingDataset(local=str(out), batch_size=1)
    seqs = []
    for i in range(ds.num_samples):
        lens = np.asarray(ds[i]["seq_lens"]).tolist()
        seqs += [lens[k : k + 2] for k in range(0, len(lens), 2)] if stage == "dpo" else [[n] for n in lens]
    # pad-to-longest in the original record order is what a per-record loader sees; the packed
    # rows' samples are reordered, so shuffle deterministically for a like-for-like random order
    rng = np.random.default_rng(0)
    order = rng.permutation(len(seqs))
    real, cap = padded_capacity([seqs[i] for i in order])
    assert real == m["tokens"]["real"], "packing: the rows hold other tokens than the samples"
    return {
        "stage": stage,
        "files": [f.name for f in files],
        "seq_len": seq_len,
        "records_written": m["records"]["written"],
        "skipped_overlong": m["records"]["skipped_by_reason"].get("overlong", 0),
        "packed_efficiency": m["packing_efficiency"],
        "pad_to_longest_b4_efficiency": real / cap,
        "real_tokens": real,
        "packed_capacity": m["tokens"]["row_capacity"],
        "padded_capacity": cap,
    }


def bench_read(shards: Path) -> dict:
    from streaming.base.util import clean_stale_shared_memory

    from bumblefast.shards import build_loader

    clean_stale_shared_memory()
    loader = build_loader(str(shards), batch_size=8, seed=0)
    t = time.perf_counter()
    n = sum(int(b["num_tokens"]) for b in loader)
    el = time.perf_counter() - t
    return {"tokens": n, "seconds": el, "tokens_per_s": n / el}


SIZES = {  # corpus chars (documents, short records), BPE vocab, timing rounds
    "min": dict(doc_chars=300_000, short_chars=150_000, vocab=1024, rounds=1, naive_records=300),
    "cpu": dict(doc_chars=6_000_000, short_chars=3_000_000, vocab=8192, rounds=5, naive_records=3000),
}
SIZES["gpu"] = SIZES["cpu"]  # prep runs on CPU nodes: the same sizes wherever it runs


def raw_vs_prep(tok_dir: str, tmp: Path, kind: str, chars: int, rounds: int, workers: tuple[int, ...], seq_len: int) -> dict:
    """Interleaved rounds (a busy moment hits all sides alike); the best round of each."""
    corpus, texts = build_corpus(tmp, kind, chars)
    runs: dict[str, list] = {"raw": [], **{f"p{w}": [] for w in workers}}
    for _ in range(rounds):
        runs["raw"].append(bench_raw(tok_dir, texts))
        for w in workers:
            runs[f"p{w}"].append(bench_prep(tok_dir, corpus, tmp / f"{kind}_p{w}", w, seq_len))
    out = {"corpus": kind, "records": len(texts), "chars": sum(map(len, texts)), "corpus_path": corpus,
           "raw": best_of(runs["raw"])}
    for w in workers:
        out[f"prep_{w}"] = best_of(runs[f"p{w}"])
    return out


def bench_nodes(tok_dir: str, corpus: Path, tmp: Path, seq_len: int, nodes: int = 2) -> dict:
    """Each node's part (run one after the other here, 1 worker each) and the merge."""
    from bumblefast.prep.merge import merge_parts

    root = tmp / "nodes"
    parts = [bench_prep(tok_dir, corpus, root, 1, seq_len, node=(r, nodes)) for r in range(nodes)]
    t = time.perf_counter()
    merged = merge_parts(str(root))
    merge_s = time.perf_counter() - t
    shards = len(json.loads((root / "index.json").read_text())["shards"])
    return {"nodes": nodes, "parts": parts, "merge_seconds": merge_s, "merged_shards": shards,
            "merged_rows": merged["rows"], "merged_tokens": merged["tokens"]["real"]}


def project_nodes(rate_per_node: float, merge_s_per_shard: float, shard_tokens: float,
                  corpus_tokens: float = 1e9, nodes=(1, 2, 4, 8, 16, 32)) -> list[dict]:
    """Wall time of a corpus on N nodes: tokenize (N nodes in parallel at the measured per-node
    rate) + merge (index-only; its cost grows with the number of shards, measured per shard)."""
    shards = corpus_tokens / shard_tokens
    out = []
    for n in nodes:
        tok_s = corpus_tokens / (n * rate_per_node)
        merge_s = merge_s_per_shard * shards
        out.append({"nodes": n, "tokenize_seconds": tok_s, "merge_seconds": merge_s, "total_hours": (tok_s + merge_s) / 3600})
    return out


def bench(size: str, workdir: Path) -> dict:
    """`bumblefast bench prep`: the section described in bumblefast/benchlib.py."""
    from bumblefast import benchlib as BL
    from bumblefast.tokenizer import train_tokenizer

    z = SIZES[size]
    tmp = Path(workdir)
    tmp.mkdir(parents=True, exist_ok=True)
    notes = [] if SHARED.is_dir() else [f"{SHARED} not present: demo data only, no real-sample figures"]
    tok_files = (sorted(SHARED.glob("*.json")) if SHARED.is_dir() else []) + sorted(DEMO.glob("*.json"))
    tok_dir = str(tmp / "tok")
    train_tokenizer(tok_files, z["vocab"], tok_dir)
    seq_len = 2048
    load = os.getloadavg()[0]
    docs = raw_vs_prep(tok_dir, tmp, "documents", z["doc_chars"], z["rounds"], (1, 2), seq_len)
    short = raw_vs_prep(tok_dir, tmp, "short", z["short_chars"], z["rounds"], (1,), seq_len)
    doc_texts = corpus_texts("documents")
    naive_texts = (doc_texts * (z["naive_records"] // max(len(doc_texts), 1) + 1))[: z["naive_records"]]
    naive = bench_naive(tok_dir, naive_texts, seq_len)
    nodes = bench_nodes(tok_dir, docs["corpus_path"], tmp, seq_len)
    packing = []
    if SHARED.is_dir():
        packing.append(bench_packing(tok_dir, "sft", [SHARED / "alpaca_zh_demo.json"], tmp / "sft_a", seq_len))
        packing.append(bench_packing(tok_dir, "dpo", [SHARED / "dpo_zh_demo.json"], tmp / "dpo_a", seq_len))
    packing.append(bench_packing(tok_dir, "sft", [DEMO / "sft_alpaca.json", DEMO / "sft_sharegpt.json"], tmp / "sft_d", seq_len))
    packing.append(bench_packing(tok_dir, "dpo", [DEMO / "dpo.json"], tmp / "dpo_d", seq_len))
    read = bench_read(tmp / "documents_p1")

    def same_text(label: str, raw: dict, run: dict, cpu: bool = False) -> dict:
        """`run` timed on the text `raw` encoded: raw's tokens over run's (CPU) seconds."""
        secs = run["cpu_seconds"] if cpu else run["seconds"]
        return BL.measured(label, raw["tokens"], secs, "tokens/cpu-s" if cpu else "tokens/s")

    raw_d, raw_s = docs["raw"], short["raw"]
    m_raw = BL.measured("raw encode_batch_fast, 1 core", raw_d["tokens"], raw_d["seconds"])
    m_raw_cpu = BL.measured("raw encode_batch_fast, 1 core", raw_d["tokens"], raw_d["cpu_seconds"], "tokens/cpu-s")
    m_p1 = same_text("prep 1 worker", raw_d, docs["prep_1"])
    m_p2 = same_text("prep 2 workers", raw_d, docs["prep_2"])
    ratios = [
        BL.ratio("prep 1 worker vs raw tokenizer (documents, wall)", m_p1, m_raw),
        BL.ratio("prep 1 worker vs raw tokenizer (documents, per CPU-second)", same_text("prep 1 worker", raw_d, docs["prep_1"], True), m_raw_cpu),
        BL.ratio("prep 2 workers vs raw tokenizer (documents, per CPU-second)", same_text("prep 2 workers", raw_d, docs["prep_2"], True), m_raw_cpu),
        BL.ratio("prep 2 workers vs 1 worker (wall)", m_p2, m_p1),
        BL.ratio("prep 1 worker vs raw tokenizer (short records, per CPU-second)",
                 same_text("prep 1 worker", raw_s, short["prep_1"], True),
                 BL.measured("raw encode_batch_fast, 1 core", raw_s["tokens"], raw_s["cpu_seconds"], "tokens/cpu-s")),
        BL.ratio("prep 1 worker vs naive datasets.map padded rows",
                 BL.measured("prep 1 worker", docs["prep_1"]["tokens"], docs["prep_1"]["seconds"]),
                 BL.measured("naive datasets.map, padded", naive["tokens"], naive["seconds"])),
    ]
    for p in packing:
        ratios.append(BL.ratio(f"packing {p['stage']} ({', '.join(p['files'])}) vs pad-to-longest x4",
                               BL.fraction("packed rows", p["real_tokens"], p["packed_capacity"]),
                               BL.fraction("pad to longest, batch 4", p["real_tokens"], p["padded_capacity"])))
    node_rate = min(r["tokens"] / r["seconds"] for r in nodes["parts"])  # the slower node sets the pace
    shard_tokens = nodes["merged_tokens"] / max(nodes["merged_shards"], 1)
    # a production node runs one worker per core: its rate is the measured 2-worker rate scaled
    # by cores/2 at best; the projection keeps the measured per-worker rate (1 worker per node)
    projection = project_nodes(node_rate, nodes["merge_seconds"] / max(nodes["merged_shards"], 1), shard_tokens)
    docs.pop("corpus_path"), short.pop("corpus_path")
    results = {"seq_len": seq_len, "vocab": z["vocab"], "load_average_at_start": load, "notes": notes,
               "documents": docs, "short_records": short, "naive_datasets_map_padded": naive,
               "nodes": {**nodes, "projection_1b_tokens_1_worker_per_node": projection}, "packing": packing,
               "streaming_read": read}
    points = [BL.point("raw tokenizer (1 core)", m_raw["value"]), BL.point("prep 1 worker", m_p1["value"]),
              BL.point("prep 2 workers", m_p2["value"]), BL.point("naive datasets.map", naive["tokens_per_s"])]
    return {"config": {"size": size, **z, "seq_len": seq_len}, "results": results, "ratios": ratios, "points": points}


def to_markdown(section: dict, host: str, day: str) -> str:
    r = section["results"]
    md = [f"# bench_prep ({host}, {os.cpu_count()} CPUs, {day}, size {section['config']['size']})", "",
          f"load average at start: {r['load_average_at_start']:.2f}; wall numbers are the best of the rounds", ""]
    md += [f"note: {n}" for n in r["notes"]]
    md += ["| ratio | ours | baseline | ratio |", "|---|---:|---:|---:|"]
    for x in section["ratios"]:
        o, b = x["ours"], x["baseline"]
        md.append(f"| {x['name']} | {o['value']:,.3f} {o['unit']} | {b['value']:,.3f} {b['unit']} | {x['value']:.2f}x |")
    n = r["nodes"]
    md += ["", f"nodes: {n['nodes']} parts merged in {n['merge_seconds']:.2f}s ({n['merged_shards']} shards); "
           "projection for a 1B-token corpus at the measured per-node rate (1 worker per node):", "",
           "| nodes | tokenize h | merge s | total h |", "|---:|---:|---:|---:|"]
    md += [f"| {p['nodes']} | {p['tokenize_seconds'] / 3600:.2f} | {p['merge_seconds']:.1f} | {p['total_hours']:.2f} |"
           for p in n["projection_1b_tokens_1_worker_per_node"]]
    md += ["", f"streaming read + collate (build_loader, 1 rank): {r['streaming_read']['tokens_per_s']:,.0f} tokens/s"]
    return "\n".join(md) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--size", default="cpu", choices=sorted(SIZES))
    args = p.parse_args(argv)
    from bumblefast.benchlib import run_standalone

    return run_standalone("prep", bench, to_markdown, args.size, args.out)


if __name__ == "__main__":
    sys.exit(main())
