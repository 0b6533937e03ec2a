"""Join finished tasks into one output: index, errors, manifest (the last step of every prep).

The joined `index.json` lists every task's shards in task order, each at
`tasks/tNNNNNN/<shard>`, so it depends only on the tasks, never on which worker or node ran
them: 1 worker, N workers and N nodes + `prep merge` give the same bytes. The counts are the
tasks' sums, checked again (read == written + skipped, per file and in total). Local outputs:
the shards are hard-linked from the work folder into a staging folder, published whole
(shards/manifest.py `staged_output`, manifest last), then the work folder is deleted. Remote
outputs: the tasks' shards are already in place; index, errors and manifest are uploaded,
the manifest last.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from bumblefast.config import UserError
from bumblefast.prep.taskstore import TaskStore
from bumblefast.shards.manifest import (
    DpoStats,
    Manifest,
    Records,
    TokenizerInfo,
    Tokens,
    shards_fingerprint,
    staged_output,
)
from bumblefast.shards.schema import ERRORS_NAME, row_len


def finished_tasks(store: TaskStore, plan: dict) -> list[dict]:
    """Every task's manifest, in task order; names the unfinished ones."""
    names = [f"t{i:06d}" for i in range(len(plan["tasks"]))]
    done = [store.done(n) for n in names]
    missing = [n for n, d in zip(names, done, strict=True) if d is None]
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise UserError(
            f"{store.output_dir}: {len(missing)} of {len(names)} tasks are not finished ({shown}); "
            "run (or rerun) `bumblefast prep` on every node first, with the same settings"
        )
    return done  # type: ignore[return-value]


def joined_index(store: TaskStore, names: list[str]) -> bytes:
    shards = []
    for name in names:
        data = store.read_bytes(f"{name}/index.json")
        if data is None:
            raise UserError(f"{store.url(name)}: finished task without index.json")
        for shard in json.loads(data)["shards"]:
            for key in ("raw_data", "zip_data"):
                if shard.get(key):
                    shard[key]["basename"] = f"tasks/{name}/{shard[key]['basename']}"
            shards.append(shard)
    return (json.dumps({"version": 2, "shards": shards}, sort_keys=True) + "\n").encode()


def joined_manifest(plan: dict, tasks: list[dict], index_bytes: bytes) -> Manifest:
    head = plan["header"]
    records = Records.total([Records(**t["records"]) for t in tasks])
    _check(records)
    tokens = Tokens.total([Tokens(**t["tokens"]) for t in tasks])
    written = records.written
    dpo = None
    if head["dpo_layout"] is not None:
        dpo = DpoStats.of(
            sum(t["pair_tokens"] for t in tasks), sum(t["prompt_tokens"] for t in tasks), tokens.real, written
        )
    tok = TokenizerInfo(**head["tokenizer"])
    return Manifest(
        stage=plan["stage"],
        seq_len=row_len(plan["stage"], plan["seq_len"]),  # dpo: seq_len is the cutoff per sequence
        columns=head["columns"],
        token_dtype=head["token_dtype"],
        tokenizer=tok,
        chat_template_hash=head["chat_template_hash"],
        fingerprint=shards_fingerprint(index_bytes, tok.fingerprint, plan["stage"]),
        records=records,
        tokens=tokens,
        rows=sum(t["rows"] for t in tasks),
        segments=sum(t["segments"] for t in tasks),
        packing_efficiency=tokens.packing_efficiency,
        prep=dict(head["prep"], tasks=len(tasks)),
        dpo_layout=head["dpo_layout"],
        dpo=dpo,
    )


def _check(rec: Records) -> None:
    if rec.read != rec.written + rec.skipped or rec.skipped != sum(rec.skipped_by_reason.values()):
        raise RuntimeError(f"prep lost records: {rec}")
    by_file = rec.by_file or {}
    if rec.read != sum(c["read"] for c in by_file.values()) or any(
        c["read"] != c["written"] + c["skipped"] for c in by_file.values()
    ):
        raise RuntimeError(f"prep lost records: read {rec.read} != the sum per file {by_file}")


def join_tasks(store: TaskStore, plan: dict) -> Manifest:
    """Publish the output of a prep whose tasks are all finished; returns its manifest."""
    tasks = finished_tasks(store, plan)
    names = [f"t{t['index']:06d}" for t in tasks]
    index_bytes = joined_index(store, names)
    manifest = joined_manifest(plan, tasks, index_bytes)
    errors = b"".join(store.read_bytes(f"{n}/{ERRORS_NAME}") or b"" for n in names)
    with staged_output(store.output_dir, upload=["index.json", ERRORS_NAME]) as staging:
        if not store.remote:
            for name in names:
                _link_shards(store.local_task_dir(name), staging / "tasks" / name)
        (staging / "index.json").write_bytes(index_bytes)
        (staging / ERRORS_NAME).write_bytes(errors)
        manifest.write(staging)
    store.remove()
    return manifest


def _link_shards(src: Path, dest: Path) -> None:
    """The shard files of one task (hard links: no copy; a copy where links are refused)."""
    dest.mkdir(parents=True)
    for p in sorted(src.iterdir()):
        if not p.name.startswith("shard."):
            continue
        try:
            os.link(p, dest / p.name)
        except OSError:
            shutil.copy2(p, dest / p.name)


def plan_of(store: TaskStore) -> dict[str, Any] | None:
    return store.read_json("plan.json")
