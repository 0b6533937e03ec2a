"""The prep driver: read -> validate + tokenize (N processes) -> pack -> MDS write -> manifest.

Parallelism: the main process reads records and hands chunks to `num_workers` tokenizer
processes (`imap`, ordered), then packs and writes their results in input order. So the rows
do not depend on the worker count, and the single writer is no bottleneck (MDS writes about
8 M tokens/s). Nodes: node r of K reads only its share of the input (prep/split.py: whole
files, and plain jsonl files cut into byte ranges at line boundaries) and writes its own part,
`output_dir/node-rrrrr`; `bumblefast prep merge output_dir` then joins the parts' indexes.

Tokenizer backend (`--tokenizer_backend`): the main process opens and verifies it once
(bumblefast/tokenizer_backend.py, with the input's first records in the sample); workers use
the backend it settled on. The manifest records it; the shard fingerprint does not depend on
it (the backends must give the same ids, so the same shards).

Output is complete or absent (shards/manifest.py `staged_output`): a local output is written
into a hidden sibling folder and renamed into place after the manifest is written; the
manifest (`bumblefast.json`) is the last file, so a folder without it is never a finished
output. For a remote URL, MDSWriter uploads shards as they complete, `index.json` on finish,
and the manifest last.

Workers return one `Encoded` or `Skipped` per record (prep/encode.py; pretrain: one compact
`PretrainChunk` per chunk); the main process counts them (`_Stats`), logs the skipped ones to
`errors.jsonl` and packs the rest (`_take`, `_Sink`).
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import os
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from bumblefast.config import PrepConfig, UserError
from bumblefast.prep.dataset_info import DatasetSpec, load_dataset_info
from bumblefast.prep.encode import (
    Encoder,
    EncodeSettings,
    PretrainChunk,
    Result,
    Skipped,
    encode_in_worker,
    init_worker,
    set_inherited_encoder,
    text_hash,
    tokenizer_fingerprint,
)
from bumblefast.prep.pack import BFDPacker, PretrainPacker
from bumblefast.prep.sources import expand_inputs, file_of, file_runs
from bumblefast.prep.split import iter_share, node_share
from bumblefast.shards.manifest import (
    DpoStats,
    Manifest,
    Records,
    TokenizerInfo,
    Tokens,
    shards_fingerprint,
    staged_output,
)
from bumblefast.shards.schema import ERRORS_NAME, columns, is_remote, token_dtype

CHUNK_RECORDS = 1024  # at most, per tokenizer call / IPC message
CHUNK_CHARS = 64_000  # about, per chunk
HASHES = ["sha1", "xxh64"]


def part_dir(output_dir: str, node_rank: int, num_nodes: int) -> str:
    if num_nodes <= 1:
        return output_dir
    return output_dir.rstrip("/") + f"/node-{node_rank:05d}"


def _chunks(it: Iterator[tuple[str, Any]], max_records: int, max_chars: int) -> Iterator[list]:
    """Chunks of at most `max_records` records and about `max_chars` characters: the tokenizer
    slows down by ~15% on batches much larger than its caches (measured: 1024 documents of
    ~330 chars vs 256), while short records want many per chunk to amortise the IPC."""
    chunk: list = []
    chars = 0
    for item in it:
        chunk.append(item)
        rec = item[1]
        chars += len(rec) if isinstance(rec, str) else 512  # a jsonl line; else a parsed record
        if chars >= max_chars or len(chunk) >= max_records:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def input_files(cfg: PrepConfig) -> tuple[list[str], list[DatasetSpec]]:
    """Every input file in reading order (--input, then each --dataset's files) and the
    dataset_info entries that map the records of their files."""
    files = expand_inputs(list(cfg.input)) if cfg.input else []
    specs = load_dataset_info(cfg.dataset_info, list(cfg.dataset), cfg.stage) if cfg.dataset_info else []
    seen = set(files)
    for spec in specs:
        for f in spec.files:
            if f in seen:
                raise UserError(f"dataset: {f} is read twice (by --input or another --dataset); give it once")
            seen.add(f)
        files += spec.files
    return files, specs


@dataclass
class _Plan:
    """Everything a prep run settles before reading a record (see _plan)."""

    cfg: PrepConfig
    files: list[str]
    specs: list[DatasetSpec]
    share: list[tuple[str, int, int]]  # this node's part of the input (prep/split.py)
    settings: EncodeSettings  # what the workers get (the verified tokenizer backend)
    encoder: Encoder  # the main process's
    shared: bool  # dpo shared_prompt layout
    vocab: int
    dtype: str
    columns: dict[str, str]
    out: str  # this node's output folder or URL


class _Stats:
    """The counts of a run: records by file and by outcome, rows, tokens."""

    def __init__(self, files: list[str]):
        self.files = {f: [0, 0] for f in files}  # per input file: [read, skipped]
        self.read = 0
        self.written = 0
        self.skipped: Counter[str] = Counter()
        self.truncated = 0
        self.rows = 0
        self.tokens = 0
        self.target_tokens = 0
        self.segments = 0
        # dpo: tokens of the pairs written, as [prompt+chosen][prompt+rejected], and of which
        # prompt tokens (counted twice, as that layout has them)
        self.pair_tokens = 0
        self.prompt_tokens = 0

    def read_from(self, runs: list[tuple[str, int]]) -> None:
        for f, n in runs:
            self.files[f][0] += n

    def by_file(self) -> dict[str, dict[str, int]]:
        return {f: {"read": r, "written": r - s, "skipped": s} for f, (r, s) in self.files.items()}

    def records(self) -> Records:
        return Records(
            read=self.read,
            written=self.written,
            skipped=sum(self.skipped.values()),
            skipped_by_reason=dict(sorted(self.skipped.items())),
            truncated=self.truncated,
            by_file=self.by_file(),
        )

    def check(self) -> None:
        """The accounting invariant: every record read was written or skipped, file by file."""
        if self.read != self.written + sum(self.skipped.values()):
            raise RuntimeError(
                f"prep lost records: read {self.read} != written {self.written} + skipped {dict(self.skipped)}"
            )
        if self.read != sum(r for r, _ in self.files.values()):
            raise RuntimeError(f"prep lost records: read {self.read} != the sum per file {self.by_file()}")


class _Sink:
    """Where a run's outcome goes: rows to the MDS writer, bad records to errors.jsonl (or a
    UserError with --on_error fail), and the counts of both to `stats`."""

    def __init__(self, writer, err_file, stats: _Stats, plan: _Plan):
        self.writer, self.err_file, self.stats = writer, err_file, stats
        self.dtype, self.stage, self.on_error = plan.dtype, plan.cfg.stage, plan.cfg.on_error

    def skip(self, bad: Skipped) -> None:
        if self.on_error == "fail":
            raise UserError(
                f"{bad.where}: {bad.reason}: {bad.message} (use --on_error skip to log and skip bad records)"
            )
        self.stats.skipped[bad.reason] += 1
        self.stats.files[file_of(bad.where)][1] += 1
        self.err_file.write(json.dumps(bad._asdict(), ensure_ascii=False) + "\n")

    def rows(self, rows: Iterable[dict[str, np.ndarray]]) -> None:
        stats = self.stats
        for row in rows:
            row = dict(row)
            row["input_ids"] = np.ascontiguousarray(row["input_ids"], dtype=self.dtype)
            self.writer.write(row)
            n = len(row["input_ids"])
            stats.rows += 1
            stats.tokens += n
            if self.stage == "pretrain":
                stats.segments += len(row["doc_lens"])
                # next-token targets inside documents
                stats.target_tokens += n - len(row["doc_lens"])
            else:
                stats.segments += len(row["seq_lens"])
                stats.target_tokens += int(row["loss_mask"].sum())


def run_prep(cfg: PrepConfig, progress: bool | None = None) -> dict[str, Any]:
    """Run `bumblefast prep` for one node; returns the manifest written (its JSON object).
    Steps: validate and plan, stage the output, run the workers and write the rows, write the
    manifest, publish (rename into place, or upload: staged_output)."""
    plan = _plan(cfg, progress)
    stats = _Stats(plan.files)
    t0 = time.perf_counter()
    with staged_output(plan.out, upload=[ERRORS_NAME]) as staging:
        tail_dropped = _write_shards(plan, staging, stats, progress)
        stats.check()
        manifest = _manifest(plan, stats, tail_dropped, _index_bytes(plan, staging))
        manifest.write(staging)
    if progress is not False:
        _report(manifest, plan.out, stats.tokens / max(time.perf_counter() - t0, 1e-9))
    return manifest.to_dict()


def _validate(cfg: PrepConfig) -> None:
    errors = cfg.validate()
    if errors:
        raise UserError("invalid prep configuration:\n  " + "\n  ".join(errors))
    if cfg.tokenizer_name_or_path is None:
        raise UserError("tokenizer_name_or_path: required (a tokenizer folder)")
    if cfg.stage not in ("pretrain", "sft", "dpo"):
        raise UserError(f"stage: must be pretrain|sft|dpo, got '{cfg.stage}'")


def _plan(cfg: PrepConfig, progress: bool | None) -> _Plan:
    """Validate the settings, find the inputs, and open (and verify) the tokenizer before any work."""
    from bumblefast.tokenizer_backend import FIRST_RECORDS

    _validate(cfg)
    files, specs = input_files(cfg)
    shared = cfg.stage == "dpo" and cfg.share_prompt
    share = node_share(files, cfg.node_rank, max(cfg.num_nodes, 1))
    settings = EncodeSettings(
        cfg.stage,
        cfg.tokenizer_name_or_path,
        cfg.seq_len,
        cfg.text_key,
        cfg.overlong,
        share_prompt=shared,
        tokenizer_backend=cfg.tokenizer_backend,
        datasets={f: spec for spec in specs for f in spec.files},
    )
    # validates the tokenizer/template and picks (verifies) the tokenizer backend
    encoder = Encoder(settings, list(islice(iter_share(share), FIRST_RECORDS)))
    settings = dataclasses.replace(settings, tokenizer_backend=encoder.backend.name)
    if progress is not False:
        b = encoder.backend
        print(
            f"prep {cfg.stage}: tokenizer backend {b.name} {b.version}"
            + (f" (verified identical to HF on {b.verified_strings} strings)" if b.name != "hf" else ""),
            file=sys.stderr,
        )
    vocab = len(encoder.hf)
    return _Plan(
        cfg,
        files,
        specs,
        share,
        settings,
        encoder,
        shared,
        vocab,
        token_dtype(vocab),
        columns(cfg.stage, vocab, shared_prompt=shared),
        part_dir(cfg.output_dir, cfg.node_rank, cfg.num_nodes),
    )


def _write_shards(plan: _Plan, staging: Path, stats: _Stats, progress: bool | None) -> int:
    """Encode every record of this node's share (in worker processes), pack and write the rows
    into `staging` (a remote output's shards are uploaded as they complete); returns the
    pretrain tail tokens dropped (0 for packed stages)."""
    from streaming import MDSWriter
    from tqdm import tqdm

    cfg, remote = plan.cfg, is_remote(plan.out)
    packer = (
        PretrainPacker(cfg.seq_len) if cfg.stage == "pretrain" else BFDPacker(cfg.seq_len, cfg.pack_window, plan.shared)
    )
    writer = MDSWriter(
        out=(os.path.join(staging, "mds"), plan.out) if remote else str(staging),
        columns=plan.columns,
        compression=cfg.compression or None,
        hashes=HASHES,
        size_limit=cfg.shard_size_limit,
        exist_ok=remote,  # a rerun overwrites the remote part in place
    )
    bar = tqdm(
        unit="rec",
        desc=f"prep {cfg.stage}",
        disable=(None if progress is None else not progress),
        file=sys.stderr,
    )
    t0 = time.perf_counter()
    with (
        open(os.path.join(staging, ERRORS_NAME), "w", encoding="utf-8") as err_file,
        _encoded_chunks(plan) as results,
    ):
        sink = _Sink(writer, err_file, stats, plan)
        for chunk_out in results:
            bar.update(_take(chunk_out, packer, sink))
            el = max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix_str(f"{stats.read / el:,.0f} rec/s, {stats.tokens / el:,.0f} tok/s", refresh=False)
        sink.rows(packer.finish())
    bar.close()
    writer.finish()
    return getattr(packer, "tail_tokens_dropped", 0)


@contextmanager
def _encoded_chunks(plan: _Plan) -> Iterator[Iterator[list[Result] | PretrainChunk]]:
    """The encoded chunks of this node's share, in input order: `num_workers` processes
    (ordered imap), or the main process alone. The pool is closed after the block, killed if
    it raised."""
    chunks = _chunks(iter_share(plan.share), CHUNK_RECORDS, CHUNK_CHARS)
    if plan.cfg.num_workers <= 1:
        yield map(plan.encoder.encode_chunk, chunks)
        return
    fork = sys.platform.startswith("linux")
    ctx = mp.get_context("fork" if fork else "spawn")
    if fork:  # workers inherit the loaded tokenizer instead of loading it again
        set_inherited_encoder(plan.encoder)
    pool = ctx.Pool(plan.cfg.num_workers, initializer=init_worker, initargs=(plan.settings, fork))
    set_inherited_encoder(None)
    try:
        yield pool.imap(encode_in_worker, chunks, chunksize=1)
    except BaseException:
        pool.terminate()
        pool.join()
        raise
    pool.close()
    pool.join()


def _take(chunk_out: list[Result] | PretrainChunk, packer, sink: _Sink) -> int:
    """Count, log and pack one encoded chunk, writing the rows it completes; returns its records."""
    stats = sink.stats
    if isinstance(chunk_out, PretrainChunk):  # documents packed per chunk
        stats.read += chunk_out.read
        stats.read_from(chunk_out.files)
        for bad in chunk_out.errors:
            sink.skip(bad)
        stats.written += len(chunk_out.lens)
        stats.truncated += chunk_out.truncated
        sink.rows(packer.add_many(chunk_out.flat, chunk_out.lens))
        return chunk_out.read
    stats.read_from(file_runs(chunk_out))
    for r in chunk_out:
        stats.read += 1
        if isinstance(r, Skipped):
            sink.skip(r)
            continue
        stats.written += 1
        stats.truncated += r.truncated
        stats.pair_tokens += r.pair_tokens
        stats.prompt_tokens += 2 * r.prompt_tokens
        sink.rows(packer.add(r.segments, r.prompt_len))
    return len(chunk_out)


def _index_bytes(plan: _Plan, staging: Path) -> bytes:
    """streaming's index.json as written (a remote one was uploaded and removed locally)."""
    index_path = os.path.join(staging, "index.json")
    if is_remote(plan.out):
        from streaming.base.storage import CloudDownloader

        CloudDownloader.direct_download(plan.out.rstrip("/") + "/index.json", index_path)
    return Path(index_path).read_bytes()


def _manifest(plan: _Plan, stats: _Stats, tail_dropped: int, index_bytes: bytes) -> Manifest:
    cfg, enc = plan.cfg, plan.encoder
    tok_fp = tokenizer_fingerprint(cfg.tokenizer_name_or_path)
    tokens = Tokens(
        real=stats.tokens,
        target=stats.target_tokens,
        row_capacity=stats.rows * cfg.seq_len,
        tail_tokens_dropped=tail_dropped,
    )
    prep = {
        "inputs": plan.files,
        "overlong": cfg.overlong,
        "pack_window": cfg.pack_window,
        "compression": cfg.compression,
        "hashes": HASHES,
        "node_rank": cfg.node_rank,
        "num_nodes": cfg.num_nodes,
        "node_share": [[f, a, b] for f, a, b in plan.share],
        "text_key": cfg.text_key,
        "dataset_info": cfg.dataset_info,
        "datasets": {spec.name: spec.files for spec in plan.specs},
    }
    dpo = cfg.stage == "dpo"
    if dpo:
        prep["share_prompt"] = plan.shared
    return Manifest(
        stage=cfg.stage,
        seq_len=cfg.seq_len,
        columns=plan.columns,
        token_dtype=plan.dtype,
        tokenizer=TokenizerInfo(
            name_or_path=cfg.tokenizer_name_or_path,
            fingerprint=tok_fp,
            vocab_size=plan.vocab,
            eos_token_id=enc.eos_id,
            backend=enc.backend.as_dict(),  # not in the fingerprint: same ids, same shards
        ),
        chat_template_hash=text_hash(enc.hf.chat_template),
        fingerprint=shards_fingerprint(index_bytes, tok_fp, cfg.stage),
        records=stats.records(),
        tokens=tokens,
        rows=stats.rows,
        segments=stats.segments,
        packing_efficiency=tokens.packing_efficiency,
        prep=prep,
        dpo_layout=("shared_prompt" if plan.shared else "pairs") if dpo else None,
        dpo=DpoStats.of(stats.pair_tokens, stats.prompt_tokens, stats.tokens, stats.written) if dpo else None,
    )


def _report(manifest: Manifest, out: str, tok_per_s: float) -> None:
    print(summary(manifest.to_dict(), out, tok_per_s), file=sys.stderr)
    for path, c in (manifest.records.by_file or {}).items():
        if c["skipped"]:
            print(
                f"  {path}: {c['read']} read, {c['written']} written, {c['skipped']} skipped (see {ERRORS_NAME})",
                file=sys.stderr,
            )


WARN_FRACTION = 0.01  # more than this share of records dropped or truncated prints a warning


def summary(manifest: dict[str, Any], out: str, tok_per_s: float) -> str:
    """The console lines after prep: what was read, written, skipped (by reason) and
    truncated, and a warning naming the flag to change when the loss is more than 1%."""
    rec, stage, seq_len = manifest["records"], manifest["stage"], manifest["seq_len"]
    skipped = ", ".join(f"{n} {reason}" for reason, n in rec["skipped_by_reason"].items()) or "none"
    lines = [
        f"prep {stage}: {rec['read']} records read, {rec['written']} written, {rec['skipped']} skipped ({skipped}), "
        f"{rec['truncated']} truncated",
        f"prep {stage}: {manifest['rows']} rows, {manifest['tokens']['real']:,} tokens ({tok_per_s:,.0f} tok/s), "
        f"packing {manifest['packing_efficiency']:.1%} -> {out}",
    ]
    read = max(rec["read"], 1)
    dropped = rec["skipped_by_reason"].get("overlong", 0)
    if dropped > WARN_FRACTION * read:
        lines.append(
            f"warning: {dropped} records ({dropped / read:.1%}) were longer than seq_len {seq_len} and "
            "dropped; --overlong truncate keeps them (cut to fit), or raise --seq_len"
        )
    if stage != "pretrain" and rec["truncated"] > WARN_FRACTION * read:  # pretrain only splits
        lines.append(
            f"warning: {rec['truncated']} records ({rec['truncated'] / read:.1%}) were truncated to seq_len "
            f"{seq_len} (replies cut first); raise --seq_len, or --overlong drop to skip them instead"
        )
    bad = rec["skipped"] - dropped
    if bad > WARN_FRACTION * read:
        lines.append(
            f"warning: {bad} records ({bad / read:.1%}) were skipped as malformed; "
            f"see {ERRORS_NAME} in the output folder"
        )
    return "\n".join(lines)


def config_dict(cfg: PrepConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
