"""The run's data: a shard folder or URL is streamed as is; raw json/jsonl/parquet is prepped
once per node into a cache keyed by the input files, the tokenizer and seq_len, then streamed."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from bumblefast.config import PrepConfig, TrainConfig, UserError
from bumblefast.shards.manifest import MANIFEST_NAME
from bumblefast.shards.schema import is_remote, row_len
from bumblefast.train.prep_once import local_rank, nodes, prep_once, wait_for_ranks

# `continue_pretrain` reads pretraining shards.
SHARD_STAGE = {"pretrain": "pretrain", "continue_pretrain": "pretrain", "sft": "sft", "dpo": "dpo"}


def cache_root() -> Path:
    return Path(os.environ.get("BUMBLEFAST_CACHE", Path.home() / ".cache" / "bumblefast"))


def _is_shards(path: str) -> bool:
    return is_remote(path) or (Path(path) / MANIFEST_NAME).is_file()


def prep_cache_dir(cfg: TrainConfig, tokenizer_path: str) -> tuple[Path, list[str]]:
    from bumblefast.prep.encode import tokenizer_fingerprint
    from bumblefast.prep.sources import expand_inputs

    files = expand_inputs([cfg.dataset_path])
    h = hashlib.sha256()
    for f in files:
        st = Path(f).stat()
        h.update(f"{Path(f).resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    key = f"{tokenizer_fingerprint(tokenizer_path)}|{cfg.cutoff_len}|{SHARD_STAGE[cfg.stage]}"
    if SHARD_STAGE[cfg.stage] == "dpo":  # not an old cache of rows of cutoff_len (before the per-sequence cut)
        key += f"|rows {row_len('dpo', cfg.cutoff_len)}"
    h.update(key.encode())
    return cache_root() / "prep" / h.hexdigest()[:16], files


def resolve_dataset(cfg: TrainConfig, tokenizer_path: str) -> str:
    """The shard location of the run. Raw input is prepped once per node into the node's cache
    (see prep_once: the node's local rank 0 preps, the other ranks wait on a file marker, and
    every wait says what it waits for), then every rank waits until all ranks have it."""
    if not cfg.dataset_path:
        raise UserError("dataset_path: required (a `bumblefast prep` output, a URL, or raw json/jsonl/parquet)")
    if _is_shards(cfg.dataset_path):
        return cfg.dataset_path
    if not Path(cfg.dataset_path).exists() and not any(c in cfg.dataset_path for c in "*?["):
        raise FileNotFoundError(f"dataset_path: {cfg.dataset_path} does not exist")
    out, files = prep_cache_dir(cfg, tokenizer_path)
    stage = SHARD_STAGE[cfg.stage]
    command = (
        f"bumblefast prep --stage {stage} --input '{cfg.dataset_path}' --tokenizer_name_or_path "
        f"'{tokenizer_path}' --seq_len {cfg.cutoff_len} --output_dir SHARDS_DIR"
    )

    def prep() -> None:
        from bumblefast.prep.run import run_prep

        where = f"this node's cache (one prep per node, {nodes()} nodes)" if nodes() > 1 else "the cache"
        print(
            f"dataset_path {cfg.dataset_path} is raw data: running `bumblefast prep` once into {where} {out}; "
            f"to prep once for all runs and nodes: `{command}`, then --dataset_path SHARDS_DIR",
            flush=True,
        )
        run_prep(
            PrepConfig(
                stage=stage,
                input=files,
                tokenizer_name_or_path=tokenizer_path,
                seq_len=cfg.cutoff_len,
                output_dir=str(out),
                seed=cfg.seed,
            )
        )

    prepped = prep_once(out, prep, may_prep=local_rank() == 0)
    if not prepped and local_rank() == 0:
        print(f"dataset_path {cfg.dataset_path}: using the prepped cache {out}", flush=True)
    wait_for_ranks("their data")
    return str(out)


def open_loader(cfg: TrainConfig, tokenizer_path: str):
    """(resumable loader of packed micro-batches, data facts stored with each checkpoint, the
    shards' manifest)."""
    from bumblefast.shards.manifest import Manifest
    from bumblefast.shards.reader import build_loader

    path = resolve_dataset(cfg, tokenizer_path)
    manifest = Manifest.read(path)
    stage = SHARD_STAGE[cfg.stage]
    if manifest.stage != stage:
        raise UserError(f"dataset_path: {path} holds {manifest.stage} shards; --stage {cfg.stage} needs {stage} shards")
    rows = row_len(stage, cfg.cutoff_len)
    if manifest.seq_len > rows:
        per = " (dpo: cutoff_len is per sequence, a row holds a pair, 2 x cutoff_len)" if stage == "dpo" else ""
        raise UserError(
            f"cutoff_len: {cfg.cutoff_len} allows rows of {rows} tokens{per}, shorter than the shards' rows "
            f"({manifest.seq_len}); re-run prep with --seq_len or raise cutoff_len"
        )
    loader = build_loader(
        path,
        batch_size=cfg.train_micro_batch_size_per_gpu,
        seed=cfg.seed,
        shuffle=cfg.shuffle,
        num_workers=cfg.num_workers,
        stage=stage,
    )
    meta = {"path": path, "fingerprint": manifest.fingerprint, "stage": stage, "seq_len": manifest.seq_len}
    return loader, json.loads(json.dumps(meta)), manifest
