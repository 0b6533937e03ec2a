"""`bumblefast prep merge DIR`: join the per-node parts (`DIR/node-*`) into one dataset.

streaming's `merge_index` writes `DIR/index.json` listing every part's shards (paths relative
to DIR); we then write a merged `DIR/bumblefast.json` whose counts are the parts' sums. The
parts must agree on stage, seq_len, columns, tokenizer and chat template.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from bumblefast.config import UserError
from bumblefast.shards.manifest import (
    MANIFEST_NAME,
    DpoStats,
    Manifest,
    Records,
    Tokens,
    shards_fingerprint,
    staged_output,
)
from bumblefast.shards.schema import is_remote

MUST_AGREE = ("schema_version", "stage", "seq_len", "columns", "token_dtype", "chat_template_hash")


def _part_names(root: str) -> list[str]:
    if is_remote(root):
        from streaming.base.storage import CloudUploader

        cu = CloudUploader.get(out=(tempfile.mkdtemp(prefix="bf-merge-"), root), exist_ok=True)
        names = set()
        for obj in cu.list_objects() or []:
            rel = str(obj).split(root.split("://", 1)[1].rstrip("/").split("/", 1)[-1] + "/", 1)[-1]
            first = rel.split("/", 1)[0]
            if first.startswith("node-") and rel.endswith("/" + MANIFEST_NAME):
                names.add(first)
        return sorted(names)
    return sorted(p.name for p in Path(root).iterdir() if p.is_dir() and p.name.startswith("node-"))


def _read_parts(root: str) -> tuple[list[str], list[Manifest]]:
    """The finished parts under `root`, checked to agree with the first."""
    names = _part_names(root)
    if not names:
        raise UserError(f"{root}: no finished parts (node-*/{MANIFEST_NAME}) to merge")
    parts = []
    for name in names:
        try:
            parts.append(Manifest.read(root.rstrip("/") + "/" + name))
        except FileNotFoundError as e:
            raise UserError(f"{root}/{name}: part is not finished ({e})") from e
    first = parts[0]
    for name, m in zip(names, parts, strict=True):
        bad = [k for k in MUST_AGREE if getattr(m, k) != getattr(first, k)]
        if m.tokenizer.fingerprint != first.tokenizer.fingerprint:
            bad.append("tokenizer.fingerprint")
        if bad:
            raise UserError(f"{root}/{name}: differs from {names[0]} in {', '.join(bad)}; cannot merge")
    nodes = {m.prep["num_nodes"] for m in parts}
    if len(nodes) == 1 and len(parts) != next(iter(nodes)):
        raise UserError(f"{root}: found {len(parts)} finished parts of {next(iter(nodes))} nodes")
    return names, parts


def merged(names: list[str], parts: list[Manifest], index_bytes: bytes) -> Manifest:
    """The manifest of the joined dataset: the parts' settings, the sums of their counts."""
    first = parts[0]
    records = Records.total([m.records for m in parts])
    tokens = Tokens.total([m.tokens for m in parts])
    dpo = None
    if first.dpo_layout is not None:  # the columns agree, so the layout does
        dpo = DpoStats.of(
            sum(m.dpo.pair_tokens_unshared for m in parts),
            sum(m.dpo.prompt_tokens_unshared for m in parts),
            tokens.real,
            records.written,
        )
    return Manifest(
        schema_version=first.schema_version,
        stage=first.stage,
        seq_len=first.seq_len,
        columns=first.columns,
        token_dtype=first.token_dtype,
        chat_template_hash=first.chat_template_hash,
        tokenizer=first.tokenizer,
        fingerprint=shards_fingerprint(index_bytes, first.tokenizer.fingerprint, first.stage),
        records=records,
        tokens=tokens,
        rows=sum(m.rows for m in parts),
        segments=sum(m.segments for m in parts),
        packing_efficiency=tokens.packing_efficiency,
        parts=names,
        prep={k: v for k, v in first.prep.items() if k != "node_rank"},
        dpo_layout=first.dpo_layout,
        dpo=dpo,
    )


def merge_parts(root: str) -> dict:
    """Merge the finished parts under `root`; returns the merged manifest (its JSON object)."""
    from streaming.base.util import merge_index

    if not is_remote(root) and not Path(root).is_dir():
        raise UserError(f"{root}: not a folder")
    names, parts = _read_parts(root)
    index_urls = [root.rstrip("/") + f"/{n}/index.json" for n in names]
    # the index and then the manifest replace the previous merge's (each by a rename, or uploaded)
    with staged_output(root, into=True) as stage:
        merge_index(index_urls, (str(stage), root) if is_remote(root) else str(stage), keep_local=True)
        manifest = merged(names, parts, Path(stage, "index.json").read_bytes())
        manifest.write(stage)
    return manifest.to_dict()
