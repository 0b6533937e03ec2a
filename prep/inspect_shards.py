"""`bumblefast prep inspect DIR`: the manifest, records per input file, then a few rows decoded
back to text.

Trained tokens (loss_mask == 1) are wrapped in [[...]] (green when writing to a terminal),
so a user sees exactly what the model will learn from; segment boundaries are marked with
`--- segment i (n tokens) ---`. Pretrain rows are fully trained, so only boundaries show.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from bumblefast.shards.manifest import Manifest
from bumblefast.shards.schema import SEGMENT_COLUMN

GREEN, RESET = "\x1b[32m", "\x1b[0m"


def _decode_marked(tok, ids: np.ndarray, mask: np.ndarray | None, color: bool) -> str:
    if mask is None:
        return tok.decode(ids.tolist(), skip_special_tokens=False)
    open_, close = (GREEN + "[[", "]]" + RESET) if color else ("[[", "]]")
    out, start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or mask[i] != mask[start]:
            text = tok.decode(ids[start:i].tolist(), skip_special_tokens=False)
            out.append(open_ + text + close if mask[start] else text)
            start = i
    return "".join(out)


def per_file_table(manifest: Manifest) -> list[str]:
    """Records read / written / skipped per input file (the skipped ones are in errors.jsonl)."""
    by_file = manifest.records.by_file
    if not by_file:
        return []
    out = [f"{'read':>10} {'written':>10} {'skipped':>10}  input file"]
    for path, c in by_file.items():
        out.append(f"{c['read']:>10,} {c['written']:>10,} {c['skipped']:>10,}  {path}")
    return out


def inspect_output(path: str, rows: int = 2, tokenizer: str | None = None, color: bool | None = None) -> str:
    """The text `prep inspect` prints: manifest JSON + `rows` decoded rows."""
    from bumblefast.shards.reader import ShardDataset
    from bumblefast.tokenizer import load_tokenizer

    manifest = Manifest.read(path)
    color = sys.stdout.isatty() if color is None else color
    lines = [manifest.to_json().rstrip("\n"), "", *per_file_table(manifest)]
    tok_path = tokenizer or manifest.tokenizer.name_or_path
    try:
        tok = load_tokenizer(tok_path)
    except (FileNotFoundError, ValueError) as e:
        lines.append(f"(cannot decode rows: {e}; pass --tokenizer)")
        return "\n".join(lines)
    ds = ShardDataset(path, batch_size=1)
    seg_key = SEGMENT_COLUMN[manifest.stage]
    for r in range(min(rows, ds.num_samples)):
        row: dict[str, Any] = ds[r]
        ids = np.asarray(row["input_ids"])
        mask = np.asarray(row["loss_mask"]) if "loss_mask" in row else None
        lens = np.asarray(row[seg_key])
        lines.append(f"\n=== row {r}: {len(ids)} tokens, {len(lens)} segments ===")
        start = 0
        for s, n in enumerate(lens.tolist()):
            tag = ""
            if manifest.stage == "dpo":
                tag = f" (pair {s // 2}, {'chosen' if s % 2 == 0 else 'rejected'})"
            lines.append(f"--- segment {s}{tag}: {n} tokens ---")
            seg_mask = mask[start : start + n] if mask is not None else None
            lines.append(_decode_marked(tok, ids[start : start + n], seg_mask, color))
            start += n
    return "\n".join(lines)
