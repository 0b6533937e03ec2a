"""The prep driver: plan the tasks, execute this node's share of them, join them.

A prep is cut into tasks of `--task_size` input bytes (prep/split.py `cut_tasks`: whole files,
large jsonl/txt files by byte ranges at line boundaries, parquet by row groups). Each task
reads, validates, tokenizes, packs and writes its own MDS shards and task manifest
(prep/task.py); workers (`--num_workers`, processes forked from this one: the tokenizer is
loaded and verified once, here) and nodes (`--node_rank/--num_nodes`: node r runs the tasks
i with i % num_nodes == r) only execute tasks. The join (prep/join.py) lists the tasks' shards
in task order, so the output depends on the input and the task size, never on the number of
workers or nodes. One node (num_nodes 1) joins at its end; several nodes leave their tasks in
the shared work folder and `bumblefast prep merge OUTPUT` joins them.

Resume: finished tasks are recorded (prep/taskstore.py: a task's task.json is written last), so
a killed prep rerun with the same command runs only the unfinished tasks; the work folder's
plan.json holds the settings, and a rerun with different ones (tokenizer, seq_len, task size,
...) is refused, naming the setting. The output itself stays complete or absent (staged,
manifest last). A run stopped by bad input (`--on_error fail`, an unreadable file) deletes a
single node's work folder: the fixed input is a new prep.

Tokenizer backend (`--tokenizer_backend`): this process opens and verifies it once
(bumblefast/tokenizer_backend.py, with the first records of this node's first task in the
sample); workers inherit it. The manifest records it; the shard fingerprint does not depend on
it (the backends must give the same ids, so the same shards).
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import os
import sys
import time
from itertools import islice
from pathlib import Path
from typing import Any

from bumblefast.config import PrepConfig, UserError
from bumblefast.prep.dataset_info import DatasetSpec, load_dataset_info
from bumblefast.prep.encode import Encoder, EncodeSettings, set_inherited_encoder, text_hash, tokenizer_fingerprint
from bumblefast.prep.join import join_tasks
from bumblefast.prep.sources import expand_inputs
from bumblefast.prep.split import Task, cut_tasks, iter_pieces, parse_bytes
from bumblefast.prep.task import (  # noqa: F401 - CHUNK_*, _chunks: re-exported for benchmarks
    CHUNK_CHARS,
    CHUNK_RECORDS,
    HASHES,
    TaskContext,
    _chunks,
    init_task_worker,
    run_task,
    task_in_worker,
)
from bumblefast.prep.taskstore import PLAN, TaskStore
from bumblefast.shards.manifest import Manifest
from bumblefast.shards.schema import ERRORS_NAME, columns, row_len, token_dtype

PLAN_VERSION = 1
PROFILE_ENV = "BUMBLEFAST_PREP_PROFILE"  # a file to write the task manifests of a run to (benchmarks)


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


@dataclasses.dataclass
class _Plan:
    """Everything a prep run settles before reading a record (see _plan)."""

    cfg: PrepConfig
    files: list[str]
    specs: list[DatasetSpec]
    tasks: list[Task]  # all of them, in order
    mine: list[Task]  # the ones this node executes
    settings: EncodeSettings  # what the workers get (the verified tokenizer backend)
    encoder: Encoder
    ctx: TaskContext
    doc: dict[str, Any]  # plan.json: the settings, the cut, the joined manifest's header


def run_prep(cfg: PrepConfig, progress: bool | None = None) -> dict[str, Any]:
    """Run `bumblefast prep` on one node; returns the manifest written (its JSON object), or,
    on one node of several, a summary of the tasks it ran (`prep merge` writes the manifest)."""
    plan = _plan(cfg, progress)
    store = plan.ctx.store
    t0 = time.perf_counter()
    resumed = store.check_plan(plan.doc)
    todo, done = [], {}
    for t in plan.mine:
        found = store.done(t.name) if resumed else None
        if found is None:
            todo.append(t)
        else:
            done[t.index] = found
    log = (lambda msg: None) if progress is False else (lambda msg: print(msg, file=sys.stderr))
    log(
        f"prep {cfg.stage}: {len(plan.tasks)} tasks of <= {cfg.task_size} input"
        + (f", {len(plan.mine)} on node {cfg.node_rank} of {cfg.num_nodes}" if cfg.num_nodes > 1 else "")
        + (f"; {len(done)} finished by an earlier run (skipped), {len(todo)} to run" if done else "")
        + f"; work folder {store.root}"
    )
    try:
        ran = _execute(plan, todo, progress)
    except UserError:
        if cfg.num_nodes <= 1:
            store.remove()  # bad input: the fixed input is a new prep
        raise
    summaries = sorted([*done.values(), *ran], key=lambda s: s["index"])
    if os.environ.get(PROFILE_ENV):  # benchmarks: the task manifests (with their profiles) of this run
        Path(os.environ[PROFILE_ENV]).write_text(json.dumps(ran, indent=1) + "\n", encoding="utf-8")
    if cfg.num_nodes > 1:
        log(
            f"prep {cfg.stage}: node {cfg.node_rank} finished its {len(plan.mine)} tasks; once every node has, "
            f"`bumblefast prep merge {cfg.output_dir}` joins them"
        )
        return _node_summary(plan, summaries, len(done))
    manifest = join_tasks(store, store.read_json(PLAN))  # as recorded: what every node and rerun joins
    if progress is not False:
        _report(manifest, cfg.output_dir, manifest.tokens.real / max(time.perf_counter() - t0, 1e-9))
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
    """Validate the settings, find the inputs, cut the tasks, and open (and verify) the
    tokenizer before any work."""
    from bumblefast.tokenizer_backend import FIRST_RECORDS

    _validate(cfg)
    files, specs = input_files(cfg)
    shared = cfg.stage == "dpo" and cfg.share_prompt
    task_bytes = parse_bytes(cfg.task_size)
    if task_bytes < 1:
        raise UserError(f"task_size: must be > 0, got {cfg.task_size!r}")
    tasks = cut_tasks(files, task_bytes)
    num_nodes = max(cfg.num_nodes, 1)
    mine = [t for t in tasks if t.index % num_nodes == cfg.node_rank]
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
    first = list(islice(iter_pieces(mine[0].pieces), FIRST_RECORDS)) if mine else []
    # validates the tokenizer/template and picks (verifies) the tokenizer backend
    encoder = Encoder(settings, first)
    settings = dataclasses.replace(settings, tokenizer_backend=encoder.backend.name)
    if progress is not False:
        b = encoder.backend
        print(
            f"prep {cfg.stage}: tokenizer backend {b.name} {b.version}"
            + (f" (verified identical to HF on {b.verified_strings} strings)" if b.name != "hf" else ""),
            file=sys.stderr,
        )
    vocab = len(encoder.hf)
    dtype, cols = token_dtype(vocab), columns(cfg.stage, vocab, shared_prompt=shared)
    ctx = TaskContext(
        store=TaskStore(cfg.output_dir),
        stage=cfg.stage,
        seq_len=row_len(cfg.stage, cfg.seq_len),  # dpo: a pair of two sequences at the cutoff fits a row
        pack_window=cfg.pack_window,
        shared=shared,
        on_error=cfg.on_error,
        dtype=dtype,
        columns=cols,
        compression=cfg.compression,
        shard_size_limit=cfg.shard_size_limit,
    )
    doc = _plan_doc(cfg, files, specs, tasks, encoder, cols, dtype)
    return _Plan(
        cfg=cfg,
        files=files,
        specs=specs,
        tasks=tasks,
        mine=mine,
        settings=settings,
        encoder=encoder,
        ctx=ctx,
        doc=doc,
    )


def _plan_doc(cfg, files, specs, tasks, encoder, cols, dtype) -> dict[str, Any]:
    """plan.json: every setting the shards depend on (a rerun must match them all), the cut,
    and the joined manifest's header."""
    tok_fp = tokenizer_fingerprint(cfg.tokenizer_name_or_path)
    dpo = cfg.stage == "dpo"
    shared = dpo and cfg.share_prompt
    prep = {
        "inputs": files,
        "overlong": cfg.overlong,
        "pack_window": cfg.pack_window,
        "compression": cfg.compression,
        "hashes": HASHES,
        "task_size": cfg.task_size,
        "text_key": cfg.text_key,
        "dataset_info": cfg.dataset_info,
        "datasets": {spec.name: spec.files for spec in specs},
    }
    if dpo:
        prep["share_prompt"] = shared
        prep["cutoff_len"] = cfg.seq_len  # per sequence; the manifest's seq_len is the row (2x)
    return {
        "plan_version": PLAN_VERSION,
        "stage": cfg.stage,
        "tokenizer": tok_fp,
        "seq_len": cfg.seq_len,
        "task_size": parse_bytes(cfg.task_size),
        "overlong": cfg.overlong,
        "text_key": cfg.text_key,
        "pack_window": cfg.pack_window,
        "share_prompt": shared,
        "compression": cfg.compression,
        "shard_size_limit": cfg.shard_size_limit,
        "datasets": {spec.name: spec.files for spec in specs},
        "inputs": [[f, os.path.getsize(f), os.stat(f).st_mtime_ns] for f in files],
        "tasks": [[p.as_list() for p in t.pieces] for t in tasks],
        "header": {
            "columns": cols,
            "token_dtype": dtype,
            "tokenizer": {
                "name_or_path": cfg.tokenizer_name_or_path,
                "fingerprint": tok_fp,
                "vocab_size": len(encoder.hf),
                "eos_token_id": encoder.eos_id,
                "backend": encoder.backend.as_dict(),  # not in the fingerprint: same ids, same shards
            },
            "chat_template_hash": text_hash(encoder.hf.chat_template),
            "dpo_layout": ("shared_prompt" if shared else "pairs") if dpo else None,
            "prep": prep,
        },
    }


def _execute(plan: _Plan, todo: list[Task], progress: bool | None) -> list[dict[str, Any]]:
    """Run `todo` (in-process with one worker, else in `num_workers` forked processes, each
    task whole in one of them); returns their task manifests."""
    from tqdm import tqdm

    cfg = plan.cfg
    bar = tqdm(
        total=len(todo),
        unit="task",
        desc=f"prep {cfg.stage}",
        disable=(None if progress is None else not progress) or not todo,
        file=sys.stderr,
    )
    out: list[dict[str, Any]] = []
    workers = min(max(cfg.num_workers, 1), len(todo))
    try:
        if workers <= 1:
            set_inherited_encoder(plan.encoder)
            for t in todo:
                out.append(run_task(plan.ctx, t))
                bar.update(1)
            return out
        out = _pool(plan, todo, workers, bar)
        return out
    finally:
        bar.close()


def _pool(plan: _Plan, todo: list[Task], workers: int, bar) -> list[dict[str, Any]]:
    from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait

    fork = sys.platform.startswith("linux")
    ctx = mp.get_context("fork" if fork else "spawn")
    if fork:  # workers inherit the loaded, verified tokenizer instead of loading it again
        set_inherited_encoder(plan.encoder)
    pool = ProcessPoolExecutor(
        workers, mp_context=ctx, initializer=init_task_worker, initargs=(plan.ctx, plan.settings, fork)
    )
    futures = {pool.submit(task_in_worker, t): t for t in todo}
    out = []
    try:
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for f in finished:
                out.append(f.result())  # raises a worker's error (a killed worker: BrokenProcessPool)
                bar.update(1)
    except BaseException:
        for p in list((pool._processes or {}).values()):  # stop the other tasks now, not after them
            p.kill()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return out


def _node_summary(plan: _Plan, summaries: list[dict], skipped: int) -> dict[str, Any]:
    """What one node of several did (its tasks), in the manifest's terms where they apply
    (no fingerprint: only `prep merge` has the whole index)."""
    from bumblefast.shards.manifest import Records, Tokens

    cfg = plan.cfg
    records = Records.total([Records(**s["records"]) for s in summaries])
    tokens = Tokens.total([Tokens(**s["tokens"]) for s in summaries])
    return {
        "stage": cfg.stage,
        "seq_len": row_len(cfg.stage, cfg.seq_len),
        "node_rank": cfg.node_rank,
        "num_nodes": cfg.num_nodes,
        "tasks": [s["index"] for s in summaries],
        "tasks_skipped": skipped,
        "records": dataclasses.asdict(records),
        "tokens": dataclasses.asdict(tokens),
        "rows": sum(s["rows"] for s in summaries),
        "segments": sum(s["segments"] for s in summaries),
        "tokenizer": plan.doc["header"]["tokenizer"],
        "fingerprint": None,
        "pieces": [p for s in summaries for p in s["pieces"]],
        "work_folder": plan.ctx.store.root,
    }


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
    cutoff = manifest.get("prep", {}).get("cutoff_len")  # dpo: per sequence; its rows hold 2x
    limit = seq_len if cutoff is None else f"{cutoff} per sequence"
    dropped = rec["skipped_by_reason"].get("overlong", 0)
    if dropped > WARN_FRACTION * read:
        lines.append(
            f"warning: {dropped} records ({dropped / read:.1%}) were longer than seq_len {limit} and "
            "dropped; --overlong truncate keeps them (cut to fit), or raise --seq_len"
        )
    if stage != "pretrain" and rec["truncated"] > WARN_FRACTION * read:  # pretrain only splits
        lines.append(
            f"warning: {rec['truncated']} records ({rec['truncated'] / read:.1%}) were truncated to seq_len "
            f"{limit} (replies cut first); raise --seq_len, or --overlong drop to skip them instead"
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
