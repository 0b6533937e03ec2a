"""Rows -> one packed micro-batch: a flat token stream with per-document positions.

The micro-batch contract (the trainer and model depend on it exactly). T = real tokens of the
micro-batch (no padding), D = documents/segments, R = rows:

| key                 | dtype / shape        | meaning                                                  |
|---------------------|----------------------|----------------------------------------------------------|
| `input_ids`         | int64 [T]            | all rows concatenated                                    |
| `position_ids`      | int64 [T]            | restart at 0 for every document/segment                  |
| `cu_seqlens`        | int32 [D+1]          | document boundaries, cu_seqlens[0] = 0, [-1] = T         |
| `max_seqlen`        | int32 0-dim tensor   | longest document (`int(batch["max_seqlen"])` for flash)  |
| `labels`            | int64 [T]            | already shifted: labels[i] = input_ids[i+1] when i+1 is in|
|                     |                      | the same document and is a target, else -100             |
| `segment_ids`       | int64 [T]            | document index (0..D-1) of each token                    |
| `num_target_tokens` | int64 0-dim          | count of labels != -100                                  |
| `sample_ids`        | int64 [R]            | MDS sample indices of the rows (for error reports)       |
| `num_tokens`        | int64 0-dim          | T                                                        |
| `row_capacity`      | int64 0-dim          | R * seq_len (padding fraction = 1 - T / row_capacity)    |
| `ref_logps`         | float32 [D] (dpo)    | only when every row has it; chosen = 0::2, rejected 1::2 |
| `kv_prefix`         | int32 [D] (dpo)      | shared-prompt rows only: document d also attends the     |
|                     |                      | first kv_prefix[d] tokens of document d-1 (the prompt),  |
|                     |                      | and its position_ids start at kv_prefix[d]               |

Targets: pretrain every next token inside a document; sft/dpo tokens with loss_mask == 1.
Scalars are 0-dim tensors because a DataLoader collate must return tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from bumblefast.labels import IGNORE_INDEX
from bumblefast.shards.schema import PROMPT_COLUMN, SEGMENT_COLUMN


def collate_rows(rows: Sequence[dict[str, Any]], stage: str, seq_len: int) -> dict[str, torch.Tensor]:
    """Flatten decoded MDS rows (dicts with the stage's columns + `sample_id`) into a batch."""
    if not rows:
        raise ValueError("collate_rows: empty micro-batch")
    seg_key = SEGMENT_COLUMN[stage]
    ids = np.concatenate([np.asarray(r["input_ids"], dtype=np.int64) for r in rows])
    lens = np.concatenate([np.asarray(r[seg_key], dtype=np.int64) for r in rows])
    total = int(ids.shape[0])
    if int(lens.sum()) != total:
        raise ValueError(
            f"rows {[r.get('sample_id') for r in rows]}: segment lengths sum to {int(lens.sum())} "
            f"but the rows hold {total} tokens"
        )
    n_docs = len(lens)
    cu = np.zeros(n_docs + 1, dtype=np.int64)
    np.cumsum(lens, out=cu[1:])
    seg = np.repeat(np.arange(n_docs, dtype=np.int64), lens)
    pos = np.arange(total, dtype=np.int64) - cu[:-1][seg]
    kv_prefix = _kv_prefix(rows, lens) if stage == "dpo" else None
    if kv_prefix is not None:
        pos += kv_prefix[seg]

    if stage == "pretrain":
        target = np.ones(total, dtype=bool)
    else:
        target = np.concatenate([np.asarray(r["loss_mask"]) for r in rows]).astype(bool)
    labels = np.full(total, IGNORE_INDEX, dtype=np.int64)
    if total > 1:
        same_doc = seg[1:] == seg[:-1]
        keep = same_doc & target[1:]
        labels[:-1] = np.where(keep, ids[1:], IGNORE_INDEX)

    batch = {
        "input_ids": torch.from_numpy(ids),
        "position_ids": torch.from_numpy(pos),
        "cu_seqlens": torch.from_numpy(cu.astype(np.int32)),
        "max_seqlen": torch.tensor(int(lens.max()) if n_docs else 0, dtype=torch.int32),
        "labels": torch.from_numpy(labels),
        "segment_ids": torch.from_numpy(seg),
        "num_target_tokens": torch.tensor(int((labels != IGNORE_INDEX).sum()), dtype=torch.int64),
        "sample_ids": torch.tensor([int(r.get("sample_id", -1)) for r in rows], dtype=torch.int64),
        "num_tokens": torch.tensor(total, dtype=torch.int64),
        "row_capacity": torch.tensor(len(rows) * seq_len, dtype=torch.int64),
    }
    if stage == "dpo" and all(r.get("ref_logps") is not None for r in rows):
        ref = np.concatenate([np.asarray(r["ref_logps"], dtype=np.float32) for r in rows])
        batch["ref_logps"] = torch.from_numpy(ref.copy())
    if kv_prefix is not None:
        batch["kv_prefix"] = torch.from_numpy(kv_prefix.astype(np.int32))
    return batch


def _kv_prefix(rows, lens: np.ndarray) -> np.ndarray | None:
    """Shared-prompt rows: per segment, the chosen segment's head tokens the rejected one
    attends (prompt length - 1, as the rejected segment repeats the prompt's last token);
    None when no row has a prompt_lens column."""
    if not any(r.get(PROMPT_COLUMN) is not None for r in rows):
        return None
    parts = []
    for r in rows:
        n = len(r[SEGMENT_COLUMN["dpo"]])
        p = np.zeros(n, dtype=np.int64)
        if r.get(PROMPT_COLUMN) is not None:
            prompt = np.asarray(r[PROMPT_COLUMN], dtype=np.int64)
            if 2 * len(prompt) != n:
                raise ValueError(f"row {r.get('sample_id')}: {len(prompt)} prompt_lens for {n} segments")
            p[1::2] = np.maximum(prompt - 1, 0)
        parts.append(p)
    out = np.concatenate(parts)
    if (out[1::2] > lens[0::2]).any():
        raise ValueError(f"rows {[r.get('sample_id') for r in rows]}: a prompt is longer than its chosen segment")
    return out
