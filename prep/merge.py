"""`bumblefast prep merge DIR`: join the per-node parts (`DIR/node-*`) into one dataset.

streaming's `merge_index` writes `DIR/index.json` listing every part's shards (paths relative
to DIR); we then write a merged `DIR/bumblefast.json` whose counts are the parts' sums. The
parts must agree on stage, seq_len, columns, tokenizer and chat template.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from bumblefast.config import UserError
from bumblefast.shards.schema import MANIFEST_NAME, fingerprint_bytes, is_remote, read_manifest

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


def merge_parts(root: str) -> dict[str, Any]:
    """Merge the finished parts under `root`; returns the merged manifest."""
    from streaming.base.util import merge_index

    if not is_remote(root) and not Path(root).is_dir():
        raise UserError(f"{root}: not a folder")
    names = _part_names(root)
    if not names:
        raise UserError(f"{root}: no finished parts (node-*/{MANIFEST_NAME}) to merge")
    parts = []
    for name in names:
        try:
            parts.append(read_manifest(root.rstrip("/") + "/" + name))
        except FileNotFoundError as e:
            raise UserError(f"{root}/{name}: part is not finished ({e})") from e
    first = parts[0]
    for name, m in zip(names, parts, strict=True):
        bad = [k for k in MUST_AGREE if m.get(k) != first.get(k)]
        if m["tokenizer"]["fingerprint"] != first["tokenizer"]["fingerprint"]:
            bad.append("tokenizer.fingerprint")
        if bad:
            raise UserError(f"{root}/{name}: differs from {names[0]} in {', '.join(bad)}; cannot merge")
    nodes = {m["prep"]["num_nodes"] for m in parts}
    if len(nodes) == 1 and len(parts) != next(iter(nodes)):
        raise UserError(f"{root}: found {len(parts)} finished parts of {next(iter(nodes))} nodes")

    index_urls = [root.rstrip("/") + f"/{n}/index.json" for n in names]
    if is_remote(root):
        local = tempfile.mkdtemp(prefix="bf-merge-")
        merge_index(index_urls, (local, root), keep_local=True)
        index_bytes = Path(local, "index.json").read_bytes()
    else:  # merged beside root, then renamed over it: a re-merge replaces index.json atomically
        local = tempfile.mkdtemp(prefix=".merge-", dir=root)  # (streaming's own move refuses to)
        merge_index(index_urls, local, keep_local=True)
        index_bytes = Path(local, "index.json").read_bytes()
        os.replace(Path(local, "index.json"), Path(root, "index.json"))
        os.rmdir(local)

    def total(path: str) -> int:
        out = 0
        for m in parts:
            v: Any = m
            for k in path.split("."):
                v = v[k]
            out += v
        return out

    skipped: dict[str, int] = {}
    for m in parts:
        for reason, n in m["records"]["skipped_by_reason"].items():
            skipped[reason] = skipped.get(reason, 0) + n
    by_file: dict[str, dict[str, int]] = {}
    for m in parts:  # each node read every file and kept its share of the records
        for path, counts in m["records"].get("by_file", {}).items():
            into = by_file.setdefault(path, {"read": 0, "written": 0, "skipped": 0})
            for k in into:
                into[k] += counts[k]
    rows = total("rows")
    manifest = {k: first[k] for k in MUST_AGREE}
    manifest.update(
        {
            "tokenizer": first["tokenizer"],
            "fingerprint": fingerprint_bytes(index_bytes, first["tokenizer"]["fingerprint"].encode(), first["stage"].encode()),
            "records": {
                "read": total("records.read"),
                "written": total("records.written"),
                "skipped": total("records.skipped"),
                "skipped_by_reason": dict(sorted(skipped.items())),
                "truncated": total("records.truncated"),
                "by_file": by_file,
            },
            "tokens": {
                "real": total("tokens.real"),
                "target": total("tokens.target"),
                "row_capacity": total("tokens.row_capacity"),
                "tail_tokens_dropped": total("tokens.tail_tokens_dropped"),
            },
            "rows": rows,
            "segments": total("segments"),
            "packing_efficiency": round(total("tokens.real") / max(total("tokens.row_capacity"), 1), 6),
            "parts": names,
            "prep": {k: v for k, v in first["prep"].items() if k != "node_rank"},
        }
    )
    if "dpo_layout" in first:  # the columns agree, so the layout does
        pair, prompt, written = (total("dpo.pair_tokens_unshared"), total("dpo.prompt_tokens_unshared"),
                                 total("records.written"))
        manifest["dpo_layout"] = first["dpo_layout"]
        manifest["dpo"] = {"pair_tokens_unshared": pair, "prompt_tokens_unshared": prompt,
                           "prompt_fraction": round(prompt / max(pair, 1), 6),
                           "tokens_per_pair": round(total("tokens.real") / max(written, 1), 3)}
    text = json.dumps(manifest, indent=2, ensure_ascii=False) + "\n"
    if is_remote(root):
        from streaming.base.storage import CloudUploader

        Path(local, MANIFEST_NAME).write_text(text, encoding="utf-8")
        CloudUploader.get(out=(local, root), exist_ok=True, keep_local=True).upload_file(MANIFEST_NAME)
    else:
        tmp = Path(root, f".{MANIFEST_NAME}.tmp-{os.getpid()}")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, Path(root, MANIFEST_NAME))
    return manifest
