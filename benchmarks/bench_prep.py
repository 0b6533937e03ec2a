"""Prep + shard-reading benchmark, in one run.

    .venv/bin/python benchmarks/bench_prep.py [--size min|cpu] [--out benchmarks/results]
    (or `bumblefast bench prep`, which writes it into the combined report)

Measures, on the same records with the same tokenizer, in interleaved rounds (median and
min-max of each side; "within noise" when the ranges overlap), wall and CPU-seconds:
- raw limits: HF `tokenizers`' `encode_batch_fast` and fastokens' `encode_batch_flat`, one
  core, over the texts alone;
- `bumblefast prep` end to end (read, parse, check, render, tokenize, pack, zstd MDS write,
  manifest) with `--tokenizer_backend hf` and `fastokens`, 1 and 2 workers, and the *old
  pipeline*: prep as it was before the backends (git ref OLD_PIPELINE_REF, extracted and run
  from its own source tree). Each prep run is a fresh process that times only `run_prep`:
  forked from a server that imported prep once (one per source tree; the imports, ~8
  CPU-seconds, are not prep's work and made most of the section's time when every run paid
  them); ratios are of time for the same text (the raw HF encode's token count over each side's
  seconds), so the EOS prep appends is not credited;
- pretrain documents (../shared/data/pretrain_zh_demo.json repeated), sft (alpaca + ShareGPT
  multi-turn + tool calls) and dpo (dpo_zh_demo) records, as jsonl;
- naive baselines on the same jsonl: `datasets.load_dataset("json")` + `map` one record at a
  time into rows padded to seq_len (BumbleCore's way), `map(batched=True)` padded the same way,
  and HF's own pretraining recipe (run_clm.py: batched tokenize unpadded, then `group_texts`
  into seq_len blocks); their timed region holds only their own loading and mapping;
- nodes: 2 nodes run as 2 concurrent processes (forked together), each reading only its share
  of the input (prep/split.py), then `prep merge`; wall time and per-node rate are measured; the N-node
  table for 1B tokens is a *projection* from those measured numbers;
- a per-stage profile (CPU-seconds of read, parse, validate, render, tokenize, pack, write)
  of each stage and backend, in one process;
- packing efficiency of prep's SFT and DPO rows at seq_len 2048 against pad-to-longest
  micro-batches of 4 of the same sequences (DPO: [prompt+chosen][prompt+rejected] on both
  sides, the layout a padded trainer collates; prep's shared-prompt rows as tokens computed
  per pair, their own row); streaming read tokens/s over the pretrain shards.

Data: ../shared/data (the real samples) when present, else a printed reason and the demo data
only. The tokenizer is a byte-level BPE trained here on the same data (8192 ids; size min:
1024) so that Chinese text compresses roughly as with a production vocabulary.
Writes `<out>/bench_prep_<host>_<date>.json` and `.md`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from harness import BenchServer, cli, compare, median_range, ratio_lines

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one core per process, fair per-worker numbers
os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("FASTOKENS_BPE_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "datasets" / "demo"
SHARED = ROOT.parent / "shared" / "data"
OLD_PIPELINE_REF = "ca1edf1"  # main just before the tokenizer backends (issue 18): "today's prep"


def _records(names: list[str], demo: list[str]) -> list[dict]:
    files = [SHARED / n for n in names] if SHARED.is_dir() else [DEMO / n for n in demo]
    return [r for f in files for r in json.loads(f.read_text(encoding="utf-8"))]


def stage_records(stage: str) -> list[dict]:
    if stage == "pretrain":
        return _records(["pretrain_zh_demo.json"], ["pretrain.json"])
    if stage == "sft":
        return _records(
            ["alpaca_zh_demo.json", "duolun_train.json", "glaive_toolcall_zh_demo.json"],
            ["sft_alpaca.json", "sft_sharegpt.json"],
        )
    return _records(["dpo_zh_demo.json"], ["dpo.json"])


def build_corpus(tmp: Path, stage: str, target_chars: int) -> Path:
    """A jsonl of the stage's records, repeated to about `target_chars` characters."""
    base = stage_records(stage)
    path = tmp / f"corpus_{stage}.jsonl"
    n = 0
    with path.open("w", encoding="utf-8") as f:
        while n < target_chars:
            for r in base:
                line = json.dumps(r, ensure_ascii=False)
                f.write(line + "\n")
                n += len(line)
                if n >= target_chars:
                    break
    return path


def _cpu() -> float:
    """CPU seconds of this process and its reaped children."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def bench_raw(tok_dir: str, texts: list[str], backend: str) -> dict:
    """The tokenizer alone over the texts, in prep-sized batches, one core."""
    if backend == "hf":
        from bumblefast.tokenizer import load_tokenizer

        tok = load_tokenizer(tok_dir).backend_tokenizer

        def enc(batch):
            return sum(len(e.ids) for e in tok.encode_batch_fast(batch, add_special_tokens=False))
    else:
        import fastokens

        ft = fastokens.Tokenizer.from_file(os.path.join(tok_dir, "tokenizer.json"))

        def enc(batch):
            return len(ft.encode_batch_flat(batch, add_special_tokens=False)[0]) // 4

    enc(texts[:256])  # warm up
    t, c = time.perf_counter(), _cpu()
    n = sum(enc(texts[i : i + 1024]) for i in range(0, len(texts), 1024))
    return {"tokens": n, "seconds": time.perf_counter() - t, "cpu_seconds": _cpu() - c}


OLD_BACKEND = "hf (old pipeline)"  # what the old pipeline's manifest says: no backend key
RESULT_TAG = "PREP_RESULTS "
# A prep server: imports prep once (Python, torch, streaming, tokenizers: ~8 CPU-s, most of a
# small run's wall time), then, per line of stdin (a JSON list of PrepConfig kwargs), forks one
# child per config, all at once, and prints their results as one tagged JSON line. Each child
# is a fresh process for prep (nothing of an earlier run in it) that times only `run_prep`.
SERVER = """
import json, os, resource, sys, time, traceback
from bumblefast.config import PrepConfig
from bumblefast.prep.run import run_prep

def run(kw):
    r0, k0 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    m = run_prep(PrepConfig(**kw), progress=False)
    el = time.perf_counter() - t
    r1, k1 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = sum(getattr(b, f) - getattr(a, f) for a, b in ((r0, r1), (k0, k1)) for f in ("ru_utime", "ru_stime"))
    return {"seconds": el, "cpu_seconds": cpu, "tokens": m["tokens"]["real"] + m["tokens"]["tail_tokens_dropped"],
            "records": m["records"]["read"], "rows": m["rows"], "fingerprint": m["fingerprint"],
            "backend": m["tokenizer"].get("backend", {}).get("name", OLD_BACKEND),
            "peak_rss_mb": r1.ru_maxrss / 1024, "peak_rss_worker_mb": k1.ru_maxrss / 1024}

for line in sys.stdin:
    kids = []
    for kw in json.loads(line):
        sys.stdout.flush(); sys.stderr.flush()
        rd, wr = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(rd)
            try:
                res = run(kw)
            except BaseException:
                res = {"error": traceback.format_exc()[-3000:]}
            with os.fdopen(wr, "w") as f:
                f.write(json.dumps(res))
            sys.stdout.flush(); sys.stderr.flush()
            os._exit(0)
        os.close(wr)
        kids.append((pid, rd))
    out = []
    for pid, rd in kids:
        with os.fdopen(rd) as f:
            text = f.read()
        _, status = os.waitpid(pid, 0)
        out.append(json.loads(text) if text else {"error": f"prep child exited with status {status}"})
    print(RESULT_TAG + json.dumps(out), flush=True)
""".replace("OLD_BACKEND", json.dumps(OLD_BACKEND)).replace("RESULT_TAG", json.dumps(RESULT_TAG))


def old_pipeline(tmp: Path) -> str | None:
    """The source tree of prep before the backends (for `PYTHONPATH`), or None if this is not
    a git checkout holding OLD_PIPELINE_REF."""
    dest = tmp / "old_pipeline"
    if (dest / "bumblefast").is_dir():
        return str(dest)
    try:
        tar = subprocess.run(
            ["git", "-C", str(ROOT), "archive", OLD_PIPELINE_REF, "bumblefast", "prep", "shards"],
            capture_output=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    dest.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=tar, check=True)
    for sub in ("prep", "shards"):  # the package-dir mapping of pyproject.toml
        os.replace(dest / sub, dest / "bumblefast" / sub)
    return str(dest)


class PrepServer(BenchServer):
    """A running SERVER for one source tree (`pythonpath`: the old pipeline's; None: this
    checkout's); `run` a list of configs, concurrently, one forked process each."""

    def __init__(self, pythonpath: str | None, log: Path):
        env = dict(os.environ)
        if pythonpath:
            env["PYTHONPATH"] = pythonpath
        # `python -c` puts its working folder first on sys.path, ahead of PYTHONPATH: the old
        # tree's server starts there, or it imports the checkout's bumblefast
        cmd = [sys.executable, "-c", SERVER]
        super().__init__(cmd, env=env, log=log, tag=RESULT_TAG, name="prep server", cwd=pythonpath or str(ROOT))

    def run(self, cfgs: list[dict]) -> list[dict]:
        results = self.request(cfgs)
        for r in results:
            if "error" in r:
                raise RuntimeError(f"prep run failed:\n{r['error']}")
        return results


def bench_prep(
    tok_dir: str,
    corpus: Path,
    out: Path,
    stage: str,
    workers: int,
    seq_len: int,
    backend: str | None,
    server: PrepServer,
    node: tuple[int, int] = (0, 1),
) -> dict:
    """One prep run in a fresh process forked by `server` (backend None: the old pipeline, which
    has no such key; its server runs the old tree)."""
    cfg = dict(
        stage=stage,
        input=[str(corpus)],
        tokenizer_name_or_path=tok_dir,
        seq_len=seq_len if backend is None else prep_seq_len(stage, seq_len),  # rows of seq_len either way
        output_dir=str(out),
        num_workers=workers,
        node_rank=node[0],
        num_nodes=node[1],
    )
    if backend is not None:
        cfg["tokenizer_backend"] = backend
        if stage != "pretrain":  # the old pipeline's behaviour, so every variant writes the same shards:
            cfg["overlong"] = "drop"  # it dropped overlong sft/dpo records (today's default truncates)
        if stage == "dpo":
            cfg["share_prompt"] = False  # and stored both sequences of a pair whole
    (result,) = server.run([cfg])
    if backend is None and result["backend"] != OLD_BACKEND:
        raise RuntimeError(f"the old pipeline's run used backend {result['backend']!r}: it imported today's prep")
    return result


def rate(label: str, work: float, rounds: list[dict], cpu: bool = False) -> dict:
    """A rate over the rounds (median round, the slowest and fastest rounds' rates)."""
    import benchlib as BL

    key = "cpu_seconds" if cpu else "seconds"
    return BL.rounds(label, work, [r[key] for r in rounds], "tokens/cpu-s" if cpu else "tokens/s")


def prep_seq_len(stage: str, row: int) -> int:
    """prep's --seq_len for rows of `row` tokens: dpo's is the cutoff per sequence, its rows
    hold a pair of them (2x, since 2026-12-02)."""
    return row // 2 if stage == "dpo" else row


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


def _sample_lengths(tok_dir: str, stage: str, files: list[Path], out: Path, seq_len: int, **kw) -> tuple:
    """prep's manifest and, per sample in its rows, the sequences it holds (sft: [n]; dpo:
    [chosen, rejected] segments of the layout written)."""
    import numpy as np
    from streaming import StreamingDataset

    from bumblefast.config import PrepConfig
    from bumblefast.prep.run import run_prep

    m = run_prep(
        PrepConfig(
            stage=stage,
            input=[str(f) for f in files],
            tokenizer_name_or_path=tok_dir,
            seq_len=prep_seq_len(stage, seq_len),  # rows of seq_len
            output_dir=str(out),
            **kw,
        ),
        progress=False,
    )
    ds = StreamingDataset(local=str(out), batch_size=1)
    seqs = []
    for i in range(ds.num_samples):
        lens = np.asarray(ds[i]["seq_lens"]).tolist()
        seqs += [lens[k : k + 2] for k in range(0, len(lens), 2)] if stage == "dpo" else [[n] for n in lens]
    return m, seqs


def bench_packing(tok_dir: str, stage: str, files: list[Path], out: Path, seq_len: int) -> dict:
    """prep's packed rows vs micro-batches of 4 padded to the longest, on the same sequences.
    DPO: both sides in the layout a padded trainer uses, [prompt+chosen] and [prompt+rejected]
    (TRL's collator pads both to the batch's longest); prep's default shared-prompt rows hold
    fewer tokens per pair, reported beside it as tokens computed per pair."""
    import numpy as np

    kw = {"share_prompt": False} if stage == "dpo" else {}
    m, seqs = _sample_lengths(tok_dir, stage, files, out, seq_len, **kw)
    # pad-to-longest in the original record order is what a per-record loader sees; the packed
    # rows' samples are reordered, so shuffle deterministically for a like-for-like random order
    rng = np.random.default_rng(0)
    order = rng.permutation(len(seqs))
    real, cap = padded_capacity([seqs[i] for i in order])
    assert real == m["tokens"]["real"], "packing: the rows hold other tokens than the samples"
    res = {
        "stage": stage,
        "files": [f.name for f in files],
        "seq_len": seq_len,
        "layout": "pairs [prompt+chosen][prompt+rejected]" if stage == "dpo" else "samples",
        "records_written": m["records"]["written"],
        "skipped_overlong": m["records"]["skipped_by_reason"].get("overlong", 0),
        "truncated": m["records"].get("truncated", 0),
        "packed_efficiency": m["packing_efficiency"],
        "pad_to_longest_b4_efficiency": real / cap,
        "real_tokens": real,
        "packed_capacity": m["tokens"]["row_capacity"],
        "padded_capacity": cap,
    }
    if stage == "dpo":  # prep's default layout on the same pairs: [prompt+chosen][prompt[-1]+rejected]
        ms, _ = _sample_lengths(tok_dir, stage, files, out.with_name(out.name + "_shared"), seq_len, share_prompt=True)
        if ms["records"]["written"] != res["records_written"]:
            raise RuntimeError(
                f"packing dpo: the shared layout kept {ms['records']['written']} pairs, not {res['records_written']}"
            )
        res["shared_prompt"] = {
            "real_tokens": ms["tokens"]["real"],
            "packed_capacity": ms["tokens"]["row_capacity"],
            "packed_efficiency": ms["packing_efficiency"],
        }
    return res


def bench_read(shards: Path) -> dict:
    from streaming.base.util import clean_stale_shared_memory

    from bumblefast.shards import build_loader

    clean_stale_shared_memory()
    loader = build_loader(str(shards), batch_size=8, seed=0)
    t = time.perf_counter()
    n = sum(b.num_tokens for b in loader)
    el = time.perf_counter() - t
    return {"tokens": n, "seconds": el, "tokens_per_s": n / el}


NAIVE = {  # mode -> label: datasets baselines on the same jsonl
    "per_record": "datasets.map per record, padded to seq_len (BumbleCore)",
    "batched": "datasets.map batched=True, padded to seq_len",
    "group_texts": "datasets.map batched, unpadded + group_texts (run_clm)",
}


def bench_naive(tok_dir: str, corpus: Path, seq_len: int, mode: str, tmp: Path) -> dict:
    """datasets: load the jsonl and tokenize it (mode, see NAIVE): into rows padded to seq_len,
    one record at a time (BumbleCore) or batched (datasets' advice for speed); or as
    transformers' run_clm.py does it: tokenize unpadded, batched, then `group_texts`
    (concatenate each batch of 1000 and cut blocks of seq_len, dropping the remainder).
    Every document gets its EOS, as in prep. Timed: load_dataset + map(s) only."""
    import tempfile
    from itertools import chain

    from transformers import AutoTokenizer

    import datasets

    datasets.disable_progress_bars()
    tok = AutoTokenizer.from_pretrained(tok_dir)
    eos = tok.eos_token

    def one(rec):
        enc = tok(rec["text"] + eos, truncation=True, max_length=seq_len, padding="max_length")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def many(batch):
        enc = tok([t + eos for t in batch["text"]], truncation=True, max_length=seq_len, padding="max_length")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def unpadded(batch):
        return tok([t + eos for t in batch["text"]])

    def group_texts(examples):  # run_clm.py's, with block_size = seq_len
        concatenated = {k: list(chain(*examples[k])) for k in examples.keys()}
        total_length = len(concatenated[list(examples.keys())[0]])
        total_length = (total_length // seq_len) * seq_len
        result = {k: [t[i : i + seq_len] for i in range(0, total_length, seq_len)] for k, t in concatenated.items()}
        result["labels"] = result["input_ids"].copy()
        return result

    cache = tempfile.mkdtemp(dir=tmp, prefix="hf-cache-")  # a fresh cache: nothing reused between rounds
    t, c = time.perf_counter(), _cpu()
    ds = datasets.load_dataset("json", data_files=str(corpus), split="train", cache_dir=cache, keep_in_memory=True)
    if mode == "group_texts":
        ids = ds.map(unpadded, batched=True, remove_columns=ds.column_names, keep_in_memory=True)
        out = ids.map(group_texts, batched=True, keep_in_memory=True)
    else:
        batched = mode == "batched"
        out = ds.map(many if batched else one, batched=batched, remove_columns=ds.column_names, keep_in_memory=True)
    el, cpu = time.perf_counter() - t, _cpu() - c
    real = int(sum(map(sum, out["attention_mask"])))  # outside the timed region
    return {"seconds": el, "cpu_seconds": cpu, "real_tokens": real, "rows": len(out)}


class _Phases(dict):
    """CPU-seconds (this process) per named phase, in the order they ran."""

    def __call__(self, name: str, fn, *args):
        c = time.process_time()
        out = fn(*args)
        self[name] = time.process_time() - c
        return out


def stage_profile(tok_dir: str, corpus: Path, stage: str, backend: str, seq_len: int, tmp: Path) -> dict:
    """CPU-seconds of each stage of prep, run one after the other in this process: start-up
    (tokenizer load, backend verification), read (jsonl lines), parse (JSON), validate
    (record checks), render (chat template), tokenize (the backend's batch encode, with token
    offsets for chat stages), glue (the rest of the worker's per-chunk work: EOS, masks,
    truncation, result tuples), pack, write (MDSWriter with zstd)."""
    from itertools import islice

    from bumblefast.prep.encode import Encoder, EncodeSettings
    from bumblefast.prep.records import RecordError, dpo_pair, pretrain_text, sft_messages
    from bumblefast.prep.run import CHUNK_CHARS, CHUNK_RECORDS, _chunks
    from bumblefast.prep.split import iter_share

    T, share = _Phases(), [(str(corpus), 0, None)]
    overlong = "truncate" if stage == "pretrain" else "drop"
    settings = EncodeSettings(stage, tok_dir, prep_seq_len(stage, seq_len), "text", overlong, tokenizer_backend=backend)
    enc = T("start-up", lambda: Encoder(settings, list(islice(iter_share(share), 64))))  # rows of seq_len
    lines = T("read", lambda: list(iter_share(share)))
    recs = T("parse", lambda: [line.parse() for _, line in lines])
    check = {"pretrain": pretrain_text, "sft": sft_messages, "dpo": dpo_pair}[stage]

    def valid(r):
        try:
            return check(r)
        except RecordError:  # skipped by prep too
            return None

    items = T("validate", lambda: [x for x in map(valid, recs) if x is not None])
    if stage == "pretrain":
        texts = T("render", lambda: items)
    elif stage == "sft":
        texts = T("render", lambda: [enc.render_with_spans(m, tools)[0] for m, tools in items])
    else:
        both = lambda: [enc.render_with_spans(p + [x], tools)[0] for p, ch, rj, tools in items for x in (ch, rj)]  # noqa: E731
        texts = T("render", both)
    n = CHUNK_RECORDS * (1 if stage != "dpo" else 2)
    encode = enc.bulk.encode_flat if stage == "pretrain" else enc.bulk.encode_with_starts
    T("tokenize", lambda: [encode(texts[i : i + n]) for i in range(0, len(texts), n)])
    results = T("glue", lambda: [enc.encode_chunk(ch) for ch in _chunks(iter(lines), CHUNK_RECORDS, CHUNK_CHARS)])
    T["glue"] = max(T["glue"] - sum(T[k] for k in ("parse", "validate", "render", "tokenize")), 0.0)
    shared = stage == "dpo" and enc.s.share_prompt  # the layout prep writes by default
    rows = T("pack", _pack, stage, seq_len, shared, results)
    T("write", _write, rows, stage, len(enc.hf), shared, tmp / f"profile_{stage}_{backend}")
    return {
        "stage": stage,
        "backend": enc.backend.name,
        "records": len(lines),
        "tokens": sum(len(r["input_ids"]) for r in rows),
        "cpu_seconds": {k: round(v, 4) for k, v in T.items()},
        "total": round(sum(T.values()), 4),
    }


def _pack(stage: str, seq_len: int, shared: bool, results: list) -> list:
    from bumblefast.prep.encode import Encoded, PretrainChunk
    from bumblefast.prep.pack import BFDPacker, PretrainPacker

    packer = PretrainPacker(seq_len) if stage == "pretrain" else BFDPacker(seq_len, 10000, shared)
    rows = []
    for res in results:
        if isinstance(res, PretrainChunk):
            rows += packer.add_many(res.flat, res.lens)
        else:
            for r in res:
                if isinstance(r, Encoded):
                    rows += packer.add(r.segments, r.prompt_len)
    rows += packer.finish()
    return rows


def _write(rows: list, stage: str, vocab: int, shared: bool, out: Path) -> None:
    from streaming import MDSWriter

    from bumblefast.shards.schema import columns, token_dtype

    dtype = token_dtype(vocab)
    cols = columns(stage, vocab, shared_prompt=shared)
    w = MDSWriter(
        out=str(out), columns=cols, compression="zstd", hashes=["sha1", "xxh64"], size_limit="64mb", exist_ok=True
    )
    for row in rows:
        w.write({**row, "input_ids": row["input_ids"].astype(dtype)})
    w.finish()


SIZES = {  # corpus chars per stage, BPE vocab, timing rounds
    "min": dict(doc_chars=100_000, sft_chars=60_000, dpo_chars=60_000, vocab=1024, rounds=1),
    "cpu": dict(doc_chars=3_000_000, sft_chars=2_000_000, dpo_chars=2_000_000, vocab=8192, rounds=3),
}
SIZES["gpu"] = SIZES["cpu"]  # prep runs on CPU nodes: the same sizes wherever it runs
VARIANTS = {  # name -> (workers, backend; None = the old pipeline)
    "old": (1, None),
    "hf": (1, "hf"),
    "fastokens": (1, "fastokens"),
    "fastokens_2w": (2, "fastokens"),
}


def bench_nodes(tok_dir: str, corpus: Path, root: Path, seq_len: int, server: PrepServer, nodes: int = 2) -> dict:
    """`nodes` nodes as concurrent processes (1 worker each, fastokens; forked by `server`
    together), each reading only its share of the input; then the merge."""
    from bumblefast.prep.merge import merge_parts

    t = time.perf_counter()
    cfgs = []
    for r in range(nodes):
        cfg = dict(
            stage="pretrain",
            input=[str(corpus)],
            tokenizer_name_or_path=tok_dir,
            seq_len=seq_len,
            output_dir=str(root),
            num_workers=1,
            node_rank=r,
            num_nodes=nodes,
            tokenizer_backend="fastokens",
            # tasks, not nodes, cut the input: two per node, so every node has work at any size
            task_size=str(max(corpus.stat().st_size // (2 * nodes), 1)),
        )
        cfgs.append(cfg)
    parts = server.run(cfgs)
    wall = time.perf_counter() - t  # includes the forks and the result exchange, not the imports
    t = time.perf_counter()
    merged = merge_parts(str(root))
    merge_s = time.perf_counter() - t
    shards = len(json.loads((root / "index.json").read_text())["shards"])
    return {
        "nodes": nodes,
        "parts": parts,
        "wall_seconds_incl_fork": wall,
        "slowest_part_seconds": max(p["seconds"] for p in parts),
        "merge_seconds": merge_s,
        "merged_shards": shards,
        "merged_rows": merged["rows"],
        "merged_tokens": merged["tokens"]["real"],
    }


def project_nodes(
    rate_per_node: float,
    merge_s_per_shard: float,
    shard_tokens: float,
    corpus_tokens: float = 1e9,
    nodes=(1, 2, 4, 8, 16, 32),
) -> list[dict]:
    """PROJECTION (not measured): wall time of a corpus on N nodes = tokenize at the measured
    per-node rate, N nodes in parallel, + merge (index-only; measured cost per shard)."""
    shards = corpus_tokens / shard_tokens
    out = []
    for n in nodes:
        tok_s = corpus_tokens / (n * rate_per_node)
        merge_s = merge_s_per_shard * shards
        out.append(
            {"nodes": n, "tokenize_seconds": tok_s, "merge_seconds": merge_s, "total_hours": (tok_s + merge_s) / 3600}
        )
    return out


def bench(size: str, workdir: Path) -> dict:
    """`bumblefast bench prep`: the section described in benchmarks/benchlib.py."""

    z = SIZES[size]
    tmp = Path(workdir)
    tmp.mkdir(parents=True, exist_ok=True)
    notes = [] if SHARED.is_dir() else [f"{SHARED} not present: demo data only, no real-sample figures"]
    tok_files = (sorted(SHARED.glob("*.json")) if SHARED.is_dir() else []) + sorted(DEMO.glob("*.json"))
    load = os.getloadavg()
    old_src = old_pipeline(tmp)
    # the prep servers import while the tokenizer trains (nothing is timed yet)
    servers = {"new": PrepServer(None, tmp / "prep_server.log")}
    if old_src:
        servers["old"] = PrepServer(old_src, tmp / "prep_server_old.log")
    try:
        return _bench(size, z, tmp, tok_files, load, old_src, servers, notes)
    finally:
        for s in servers.values():
            s.close()


LABEL = {
    "old": "old prep (before backends)",
    "hf": "prep, hf backend",
    "fastokens": "prep, fastokens",
    "fastokens_2w": "prep, fastokens, 2 workers",
}
VS_OLD = (("fastokens", "CPU-s"), ("fastokens", "wall"), ("hf", "CPU-s"))  # per stage, 1 worker, vs the old prep
VS = (  # pretrain: (comparison, ours, baseline, CPU-s?)
    ("prep fastokens vs HF raw encode (1 core, CPU-s)", "pretrain_fastokens", "raw_hf", True),
    ("prep fastokens vs HF raw encode (1 core, wall)", "pretrain_fastokens", "raw_hf", False),
    ("prep fastokens 2 workers vs 1 (wall)", "pretrain_fastokens_2w", "pretrain_fastokens", False),
    ("prep fastokens vs datasets.map per record, padded (wall)", "pretrain_fastokens", "naive_per_record", False),
    ("prep fastokens vs datasets.map batched, padded (wall)", "pretrain_fastokens", "naive_batched", False),
    ("prep fastokens vs datasets.map + group_texts, unpadded (wall)", "pretrain_fastokens", "naive_group_texts", False),
    ("prep hf backend vs datasets.map + group_texts, unpadded (wall)", "pretrain_hf", "naive_group_texts", False),
)


def _bench(size, z, tmp, tok_files, load, old_src, servers, notes) -> dict:
    """bench()'s body, run while the prep servers are up."""
    import benchlib as BL

    from bumblefast.tokenizer import train_tokenizer

    tok_dir = str(tmp / "tok")
    train_tokenizer(tok_files, z["vocab"], tok_dir)
    seq_len = 2048
    variants = {k: v for k, v in VARIANTS.items() if k != "old" or old_src}
    if not old_src:
        notes.append(
            f"old pipeline ({OLD_PIPELINE_REF}) not available (not a git checkout with that commit): not measured"
        )
    corpora = {
        st: build_corpus(tmp, st, z[f"{k}_chars"]) for st, k in (("pretrain", "doc"), ("sft", "sft"), ("dpo", "dpo"))
    }
    for server in servers.values():
        server.run([])  # returns once its imports are done
    runs = _rounds(z["rounds"], tok_dir, corpora, variants, servers, seq_len, tmp)
    profiles = [stage_profile(tok_dir, corpora[st], st, b, seq_len, tmp) for st in corpora for b in ("hf", "fastokens")]
    ntok = runs["raw_hf"][0]["tokens"]  # the text's tokens (HF raw encode): the work for every side
    m, mc = _rates(runs, corpora, variants, ntok)
    ratios = []
    for st in corpora if "old" in variants else ():
        for v, clock in VS_OLD:
            by = mc if clock == "CPU-s" else m
            name = f"{st}: prep {LABEL[v].removeprefix('prep, ')} vs old prep (1 worker, {clock})"
            ratios.append(compare(name, by[f"{st}_{v}"], by[f"{st}_old"]))
    ratios += [compare(f"pretrain: {name}", (mc if cpu else m)[o], (mc if cpu else m)[b]) for name, o, b, cpu in VS]
    packing = _packing(tok_dir, tmp, seq_len)
    ratios += [r for p in packing for r in packing_ratios(p)]
    results = {
        "seq_len": seq_len,
        "vocab": z["vocab"],
        "load_average_at_start": load,
        "cpu_count": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
        "notes": notes,
        "old_pipeline_ref": OLD_PIPELINE_REF,
        "text_tokens": ntok,
        "rounds": runs,
        "measured": m,
        "measured_cpu": mc,
        "stage_profile": profiles,
        "nodes": _nodes(runs["nodes"]),
        "packing": packing,
        "streaming_read": bench_read(tmp / "pretrain_fastokens"),
    }
    points = [BL.point(v["label"], v["value"]) for k, v in m.items() if k.startswith(("raw", "pretrain", "naive"))]
    return {"config": {"size": size, **z, "seq_len": seq_len}, "results": results, "ratios": ratios, "points": points}


def _rounds(rounds: int, tok_dir, corpora: dict, variants: dict, servers: dict, seq_len: int, tmp: Path) -> dict:
    """Every measurement once per round (in the same order: a busy moment hits every side
    alike); then a check that every variant wrote the same shards."""
    doc_texts = [json.loads(line)["text"] for line in corpora["pretrain"].open(encoding="utf-8")]
    runs: dict[str, list] = {}
    for _ in range(rounds):
        for b in ("hf", "fastokens"):
            runs.setdefault(f"raw_{b}", []).append(bench_raw(tok_dir, doc_texts, b))
        for st, corpus in corpora.items():
            for name, (w, backend) in variants.items():
                if st != "pretrain" and w > 1:
                    continue
                server = servers["old" if backend is None else "new"]
                run = bench_prep(tok_dir, corpus, tmp / f"{st}_{name}", st, w, seq_len, backend, server)
                runs.setdefault(f"{st}_{name}", []).append(run)
        for mode in NAIVE:
            runs.setdefault(f"naive_{mode}", []).append(bench_naive(tok_dir, corpora["pretrain"], seq_len, mode, tmp))
        nodes = bench_nodes(tok_dir, corpora["pretrain"], tmp / "nodes", seq_len, servers["new"])
        runs.setdefault("nodes", []).append(nodes)
    for st in corpora:  # same ids -> same shards, whatever the backend or worker count
        # (not the old pipeline: it wrote one shard sequence where today's prep writes one per task,
        # under tasks/tNNNNNN/, and its dpo cut differs: a pair over seq_len in all, today a sequence
        # over the per-sequence cutoff)
        fps = {r["fingerprint"] for k, v in runs.items() if k.startswith(st + "_") and k != f"{st}_old" for r in v}
        if len(fps) != 1:
            raise RuntimeError(f"{st}: prep variants wrote different shards: {fps}")
    return runs


def _rates(runs: dict, corpora: dict, variants: dict, ntok: int) -> tuple[dict, dict]:
    """Per measurement: its tokens/s (wall) and tokens/CPU-s over the rounds."""
    m = {
        "raw_hf": rate("HF tokenizers encode_batch_fast, 1 core", ntok, runs["raw_hf"]),
        "raw_fastokens": rate("fastokens encode_batch_flat, 1 core", ntok, runs["raw_fastokens"]),
        **{f"naive_{k}": rate(v, ntok, runs[f"naive_{k}"]) for k, v in NAIVE.items()},
    }
    mc = {"raw_hf": rate("HF tokenizers encode_batch_fast, 1 core", ntok, runs["raw_hf"], cpu=True)}
    for st in corpora:
        work = runs[f"{st}_hf"][0]["tokens"]  # chat stages: prep's own token count (same for all variants)
        for name in variants:
            if f"{st}_{name}" in runs:
                w = ntok if st == "pretrain" else work
                m[f"{st}_{name}"] = rate(f"{st}: {LABEL[name]}", w, runs[f"{st}_{name}"])
                mc[f"{st}_{name}"] = rate(f"{st}: {LABEL[name]}", w, runs[f"{st}_{name}"], cpu=True)
    return m, mc


def _packing(tok_dir: str, tmp: Path, seq_len: int) -> list[dict]:
    files = [
        ("sft", [DEMO / "sft_alpaca.json", DEMO / "sft_sharegpt.json"], "sft_d"),
        ("dpo", [DEMO / "dpo.json"], "dpo_d"),
    ]
    if SHARED.is_dir():
        files = [
            ("sft", [SHARED / "alpaca_zh_demo.json"], "sft_a"),
            ("dpo", [SHARED / "dpo_zh_demo.json"], "dpo_a"),
            *files,
        ]
    return [bench_packing(tok_dir, st, fs, tmp / out, seq_len) for st, fs, out in files]


def packing_ratios(p: dict) -> list[dict]:
    import benchlib as BL

    files, unshared = ", ".join(p["files"]), " (pairs unshared on both sides)" if p["stage"] == "dpo" else ""
    padded = BL.fraction("pad to longest, batch 4", p["real_tokens"], p["padded_capacity"])
    out = [
        compare(
            f"packing {p['stage']} ({files}) vs pad-to-longest x4{unshared}",
            BL.fraction("packed rows", p["real_tokens"], p["packed_capacity"]),
            padded,
        )
    ]
    if "shared_prompt" in p:  # tokens computed per pair: the pairs' unshared tokens per row token
        out.append(
            compare(
                f"dpo ({files}): pair tokens per computed token, shared-prompt packed rows vs pad-to-longest x4",
                BL.fraction("shared-prompt packed rows", p["real_tokens"], p["shared_prompt"]["packed_capacity"]),
                {**padded, "label": "pad to longest, batch 4 (unshared)"},
            )
        )
    return out


def _nodes(nodes: list[dict]) -> dict:
    """The node runs, and the PROJECTION to 1B tokens from the slowest node's median rate."""
    node_rate = median_range(min(p["tokens"] / p["seconds"] for p in n["parts"]) for n in nodes)[0]
    last = nodes[-1]
    shard_tokens = last["merged_tokens"] / max(last["merged_shards"], 1)
    merge = median_range(n["merge_seconds"] for n in nodes)[0] / max(last["merged_shards"], 1)
    return {
        "measured": nodes,
        "per_node_tokens_per_s": [p["tokens"] / p["seconds"] for n in nodes for p in n["parts"]],
        "projection_1b_tokens_from_measured_rate": project_nodes(node_rate, merge, shard_tokens),
    }


def to_markdown(section: dict, host: str, day: str) -> str:
    r = section["results"]
    la, le = r["load_average_at_start"], r["load_average_at_end"]
    md = [
        f"# bench_prep ({host}, {r['cpu_count']} CPUs, {day}, size {section['config']['size']})",
        "",
        f"load average (1/5/15 min) at start {la[0]:.1f}/{la[1]:.1f}/{la[2]:.1f}, at end "
        f"{le[0]:.1f}/{le[1]:.1f}/{le[2]:.1f}; median of {section['config']['rounds']} interleaved rounds, "
        "[min-max]; CPU-s rates count every process of a run",
        "",
    ]
    md += [f"note: {n}" for n in r["notes"]]

    def rng(x):
        return f" [{x['range'][0]:,.0f}-{x['range'][1]:,.0f}]" if "range" in x else ""

    md += ["| measurement | tokens/s (wall) | tokens/CPU-s |", "|---|---:|---:|"]
    for k, x in r["measured"].items():
        c = r["measured_cpu"].get(k)
        cpu = "" if c is None else f"{c['value']:,.0f}{rng(c)}"
        md.append(f"| {x['label']} | {x['value']:,.0f}{rng(x)} | {cpu} |")
    md += ["", *ratio_lines(section["ratios"], "{:,.3f}")]
    md += ["", "per-stage profile (CPU-seconds, one process):", ""]
    keys = list(r["stage_profile"][0]["cpu_seconds"])
    md += [
        "| stage | backend | tokens | " + " | ".join(keys) + " | total |",
        "|---|---|---:|" + "---:|" * (len(keys) + 1),
    ]
    for p in r["stage_profile"]:
        md.append(
            f"| {p['stage']} | {p['backend']} | {p['tokens']:,} | "
            + " | ".join(f"{p['cpu_seconds'][k]:.3f}" for k in keys)
            + f" | {p['total']:.3f} |"
        )
    n = r["nodes"]
    md += ["", "nodes, measured (2 concurrent processes on this machine, 1 worker each, each reading its share):", ""]
    for i, run in enumerate(n["measured"]):
        parts = ", ".join(
            f"node {k}: {p['tokens']:,} tokens in {p['seconds']:.2f}s ({p['tokens'] / p['seconds']:,.0f} tok/s)"
            for k, p in enumerate(run["parts"])
        )
        md.append(
            f"- round {i + 1}: wall {run['wall_seconds_incl_fork']:.2f}s incl. fork; {parts}; "
            f"merge {run['merge_seconds']:.2f}s ({run['merged_shards']} shards)"
        )
    md += [
        "",
        "PROJECTION from the measured per-node rate (slowest node, median round) and merge cost, "
        "1B tokens, 1 worker per node (not measured):",
        "",
        "| nodes | tokenize h | merge s | total h |",
        "|---:|---:|---:|---:|",
    ]
    md += [
        f"| {p['nodes']} | {p['tokenize_seconds'] / 3600:.2f} | {p['merge_seconds']:.1f} | {p['total_hours']:.2f} |"
        for p in n["projection_1b_tokens_from_measured_rate"]
    ]
    md += ["", f"streaming read + collate (build_loader, 1 rank): {r['streaming_read']['tokens_per_s']:,.0f} tokens/s"]
    return "\n".join(md) + "\n"


if __name__ == "__main__":
    sys.exit(cli("prep", __doc__, bench, to_markdown, SIZES))
