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

Output is complete or absent: a local output is written into a hidden sibling folder and
renamed into place after the manifest is written; the manifest (`bumblefast.json`) is the
last file, so a folder without it is never a finished output. For a remote URL, MDSWriter
uploads shards as they complete, `index.json` on finish, and the manifest last.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import os
import sys
import time
from collections import Counter
from collections.abc import Iterator
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


class _Stats:
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
        self.pair_tokens = 0  # dpo: tokens of the pairs written, as [prompt+chosen][prompt+rejected]
        self.prompt_tokens = 0  # dpo: of which prompt tokens (counted twice, as that layout has them)

    def read_from(self, runs: list[tuple[str, int]]) -> None:
        for f, n in runs:
            self.files[f][0] += n

    def by_file(self) -> dict[str, dict[str, int]]:
        return {f: {"read": r, "written": r - s, "skipped": s} for f, (r, s) in self.files.items()}


def _skip(where: str, reason: str, message: str, on_error: str, stats: _Stats, err_file) -> None:
    """A bad record: stop (--on_error fail) or log it to errors.jsonl and count it by reason."""
    if on_error == "fail":
        raise UserError(f"{where}: {reason}: {message} (use --on_error skip to log and skip bad records)")
    stats.skipped[reason] += 1
    stats.files[file_of(where)][1] += 1
    err_file.write(json.dumps({"where": where, "reason": reason, "message": message}, ensure_ascii=False) + "\n")


def _write_row(writer, row: dict[str, np.ndarray], dtype: str, stats: _Stats, stage: str) -> None:
    row = dict(row)
    row["input_ids"] = np.ascontiguousarray(row["input_ids"], dtype=dtype)
    writer.write(row)
    n = len(row["input_ids"])
    stats.rows += 1
    stats.tokens += n
    if stage == "pretrain":
        stats.segments += len(row["doc_lens"])
        stats.target_tokens += n - len(row["doc_lens"])  # next-token targets inside documents
    else:
        stats.segments += len(row["seq_lens"])
        stats.target_tokens += int(row["loss_mask"].sum())


def run_prep(cfg: PrepConfig, progress: bool | None = None) -> dict[str, Any]:
    """Run `bumblefast prep` for one node; returns the manifest written."""
    from streaming import MDSWriter
    from tqdm import tqdm

    errors = cfg.validate()
    if errors:
        raise UserError("invalid prep configuration:\n  " + "\n  ".join(errors))
    if cfg.tokenizer_name_or_path is None:
        raise UserError("tokenizer_name_or_path: required (a tokenizer folder)")
    if cfg.stage not in ("pretrain", "sft", "dpo"):
        raise UserError(f"stage: must be pretrain|sft|dpo, got '{cfg.stage}'")
    files, specs = input_files(cfg)
    overlong = cfg.overlong
    shared = cfg.stage == "dpo" and cfg.share_prompt
    share = node_share(files, cfg.node_rank, max(cfg.num_nodes, 1))
    settings = EncodeSettings(cfg.stage, cfg.tokenizer_name_or_path, cfg.seq_len, cfg.text_key, overlong,
                              share_prompt=shared, tokenizer_backend=cfg.tokenizer_backend,
                              datasets={f: spec for spec in specs for f in spec.files})
    from bumblefast.tokenizer_backend import FIRST_RECORDS

    # validates the tokenizer/template and picks (verifies) the tokenizer backend before any work
    main_encoder = Encoder(settings, list(islice(iter_share(share), FIRST_RECORDS)))
    settings = dataclasses.replace(settings, tokenizer_backend=main_encoder.backend.name)
    if progress is not False:
        b = main_encoder.backend
        print(f"prep {cfg.stage}: tokenizer backend {b.name} {b.version}"
              + (f" (verified identical to HF on {b.verified_strings} strings)" if b.name != "hf" else ""),
              file=sys.stderr)
    vocab = len(main_encoder.hf)
    dtype = token_dtype(vocab)
    cols = columns(cfg.stage, vocab, shared_prompt=shared)

    out = part_dir(cfg.output_dir, cfg.node_rank, cfg.num_nodes)
    remote = is_remote(out)
    stats = _Stats(files)
    packer = PretrainPacker(cfg.seq_len) if cfg.stage == "pretrain" else BFDPacker(cfg.seq_len, cfg.pack_window, shared)
    pool = None
    t0 = time.perf_counter()
    try:
        with staged_output(out, upload=[ERRORS_NAME]) as staging:
            writer = MDSWriter(
                out=(os.path.join(staging, "mds"), out) if remote else str(staging),
                columns=cols,
                compression=cfg.compression or None,
                hashes=HASHES,
                size_limit=cfg.shard_size_limit,
                exist_ok=remote,  # a rerun overwrites the remote part in place
            )
            err_file = open(os.path.join(staging, ERRORS_NAME), "w", encoding="utf-8")
            chunks = _chunks(iter_share(share), CHUNK_RECORDS, CHUNK_CHARS)
            if cfg.num_workers > 1:
                fork = sys.platform.startswith("linux")
                ctx = mp.get_context("fork" if fork else "spawn")
                if fork:  # workers inherit the loaded tokenizer instead of loading it again
                    set_inherited_encoder(main_encoder)
                pool = ctx.Pool(cfg.num_workers, initializer=init_worker, initargs=(settings, fork))
                set_inherited_encoder(None)
                results = pool.imap(encode_in_worker, chunks, chunksize=1)
            else:
                results = map(main_encoder.encode_chunk, chunks)
            bar = tqdm(unit="rec", desc=f"prep {cfg.stage}", disable=(None if progress is None else not progress), file=sys.stderr)
            for chunk_out in results:
                if isinstance(chunk_out, PretrainChunk):  # documents packed per chunk
                    stats.read += chunk_out.read
                    stats.read_from(chunk_out.files)
                    for where, _, reason, message in chunk_out.errors:
                        _skip(where, reason, message, cfg.on_error, stats, err_file)
                    stats.written += len(chunk_out.lens)
                    stats.truncated += chunk_out.truncated
                    for row in packer.add_many(chunk_out.flat, chunk_out.lens):
                        _write_row(writer, row, dtype, stats, cfg.stage)
                    n_chunk = chunk_out.read
                else:
                    stats.read_from(file_runs(chunk_out))
                    for where, status, a, b in chunk_out:
                        stats.read += 1
                        if status == "err":
                            _skip(where, a, b, cfg.on_error, stats, err_file)
                            continue
                        stats.written += 1
                        stats.truncated += bool(b)
                        if cfg.stage == "dpo":  # (segments, prompt_lens value, pair tokens, prompt tokens)
                            stats.pair_tokens += a[2]
                            stats.prompt_tokens += 2 * a[3]
                            rows = packer.add(a[0], a[1])
                        else:
                            rows = packer.add([a])
                        for row in rows:
                            _write_row(writer, row, dtype, stats, cfg.stage)
                    n_chunk = len(chunk_out)
                bar.update(n_chunk)
                el = max(time.perf_counter() - t0, 1e-9)
                bar.set_postfix_str(f"{stats.read / el:,.0f} rec/s, {stats.tokens / el:,.0f} tok/s", refresh=False)
            for row in packer.finish():
                _write_row(writer, row, dtype, stats, cfg.stage)
            bar.close()
            writer.finish()
            err_file.close()
            if pool is not None:
                pool.close()
                pool.join()
                pool = None

            index_path = os.path.join(staging, "index.json")
            if remote:  # shards and index went up and were removed locally (keep_local=False)
                from streaming.base.storage import CloudDownloader

                CloudDownloader.direct_download(out.rstrip("/") + "/index.json", index_path)
            index_bytes = Path(index_path).read_bytes()
            tok_fp = tokenizer_fingerprint(cfg.tokenizer_name_or_path)
            manifest = Manifest(
                stage=cfg.stage,
                seq_len=cfg.seq_len,
                columns=cols,
                token_dtype=dtype,
                tokenizer=TokenizerInfo(
                    name_or_path=cfg.tokenizer_name_or_path,
                    fingerprint=tok_fp,
                    vocab_size=vocab,
                    eos_token_id=main_encoder.eos_id,
                    backend=main_encoder.backend.as_dict(),  # not in the fingerprint: same ids, same shards
                ),
                chat_template_hash=text_hash(main_encoder.hf.chat_template),
                fingerprint=shards_fingerprint(index_bytes, tok_fp, cfg.stage),
                records=Records(
                    read=stats.read,
                    written=stats.written,
                    skipped=sum(stats.skipped.values()),
                    skipped_by_reason=dict(sorted(stats.skipped.items())),
                    truncated=stats.truncated,
                    by_file=stats.by_file(),
                ),
                tokens=(tokens := Tokens(
                    real=stats.tokens,
                    target=stats.target_tokens,
                    row_capacity=stats.rows * cfg.seq_len,
                    tail_tokens_dropped=getattr(packer, "tail_tokens_dropped", 0),
                )),
                rows=stats.rows,
                segments=stats.segments,
                packing_efficiency=tokens.packing_efficiency,
                prep={
                    "inputs": files,
                    "overlong": overlong,
                    "pack_window": cfg.pack_window,
                    "compression": cfg.compression,
                    "hashes": HASHES,
                    "node_rank": cfg.node_rank,
                    "num_nodes": cfg.num_nodes,
                    "node_share": [[f, a, b] for f, a, b in share],
                    "text_key": cfg.text_key,
                    "dataset_info": cfg.dataset_info,
                    "datasets": {spec.name: spec.files for spec in specs},
                },
            )
            if cfg.stage == "dpo":
                manifest.dpo_layout = "shared_prompt" if shared else "pairs"
                manifest.dpo = DpoStats.of(stats.pair_tokens, stats.prompt_tokens, stats.tokens, stats.written)
                manifest.prep["share_prompt"] = shared
            if stats.read != stats.written + sum(stats.skipped.values()):  # the accounting invariant
                raise RuntimeError(f"prep lost records: read {stats.read} != written {stats.written} + skipped {dict(stats.skipped)}")
            if stats.read != sum(r for r, _ in stats.files.values()):
                raise RuntimeError(f"prep lost records: read {stats.read} != the sum per file {stats.by_file()}")
            manifest.write(staging)
    except BaseException:
        if pool is not None:
            pool.terminate()
            pool.join()
        raise
    el = time.perf_counter() - t0
    if progress is not False:
        print(summary(manifest.to_dict(), out, stats.tokens / max(el, 1e-9)), file=sys.stderr)
        for path, c in manifest.records.by_file.items():
            if c["skipped"]:
                print(f"  {path}: {c['read']} read, {c['written']} written, {c['skipped']} skipped "
                      f"(see {ERRORS_NAME})", file=sys.stderr)
    return manifest.to_dict()


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
        lines.append(f"warning: {dropped} records ({dropped / read:.1%}) were longer than seq_len {seq_len} and "
                     "dropped; --overlong truncate keeps them (cut to fit), or raise --seq_len")
    if stage != "pretrain" and rec["truncated"] > WARN_FRACTION * read:  # pretrain only splits
        lines.append(f"warning: {rec['truncated']} records ({rec['truncated'] / read:.1%}) were truncated to seq_len "
                     f"{seq_len} (replies cut first); raise --seq_len, or --overlong drop to skip them instead")
    bad = rec["skipped"] - dropped
    if bad > WARN_FRACTION * read:
        lines.append(f"warning: {bad} records ({bad / read:.1%}) were skipped as malformed; "
                     f"see {ERRORS_NAME} in the output folder")
    return "\n".join(lines)


def config_dict(cfg: PrepConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
