"""Rows -> one packed micro-batch (`PackedBatch`): a flat token stream with per-document positions.

The micro-batch contract (the trainer and model depend on it exactly). T = real tokens of the
micro-batch (no padding), D = documents/segments, R = rows:

| field               | type                 | meaning                                                  |
|---------------------|----------------------|----------------------------------------------------------|
| `input_ids`         | int64 [T]            | all rows concatenated                                    |
| `position_ids`      | int64 [T]            | restart at 0 for every document/segment                  |
| `cu_seqlens`        | int32 [D+1]          | document boundaries, cu_seqlens[0] = 0, [-1] = T         |
| `max_seqlen`        | int                  | longest document (a host int: flash never reads it back) |
| `labels`            | int64 [T]            | already shifted: labels[i] = input_ids[i+1] when i+1 is in|
|                     |                      | the same document and is a target, else -100             |
| `segment_ids`       | int64 [T]            | document index (0..D-1) of each token                    |
| `num_target_tokens` | int                  | count of labels != -100                                  |
| `sample_ids`        | int64 [R] (host)     | MDS sample indices of the rows (for error reports)       |
| `num_tokens`        | int                  | T                                                        |
| `row_capacity`      | int                  | R * seq_len (padding fraction = 1 - T / row_capacity)    |
| `ref_logps`         | float32 [D] or None  | dpo, only when every row has it; chosen 0::2, rejected 1::2 |
| `kv_prefix`         | int32 [D] or None    | dpo shared-prompt rows only: document d also attends the |
|                     |                      | first kv_prefix[d] tokens of document d-1 (the prompt),  |
|                     |                      | and its position_ids start at kv_prefix[d]               |

Targets: pretrain every next token inside a document; sft/dpo tokens with loss_mask == 1.
`PackedBatch.to(device)` moves the tensors the model reads; the host facts (ints, `sample_ids`)
stay where they are, so the step's bookkeeping never syncs with the device.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from bumblefast.labels import IGNORE_INDEX
from bumblefast.shards.schema import PROMPT_COLUMN, SEGMENT_COLUMN


@dataclasses.dataclass
class PackedBatch:
    """One packed micro-batch (the table above)."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    labels: torch.Tensor
    segment_ids: torch.Tensor
    num_target_tokens: int
    sample_ids: torch.Tensor
    num_tokens: int
    row_capacity: int
    ref_logps: torch.Tensor | None = None
    kv_prefix: torch.Tensor | None = None

    DEVICE_FIELDS = ("input_ids", "position_ids", "cu_seqlens", "labels", "segment_ids", "ref_logps", "kv_prefix")

    @classmethod
    def from_tensors(
        cls,
        input_ids: torch.Tensor,
        cu_seqlens: torch.Tensor,
        labels: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        kv_prefix: torch.Tensor | None = None,
        ref_logps: torch.Tensor | None = None,
    ) -> PackedBatch:
        """A batch from a flat stream and its boundaries, labels already shifted (tests, tools
        that pack their own tensors); positions restart per document (after ``kv_prefix``)."""
        cu = cu_seqlens.to(torch.int32)
        lens = torch.diff(cu.long().cpu())
        n = int(input_ids.shape[0])
        seg = torch.repeat_interleave(torch.arange(len(lens)), lens, output_size=n).to(input_ids.device)
        if position_ids is None:
            position_ids = torch.arange(n, device=input_ids.device) - cu.long()[:-1][seg]
            if kv_prefix is not None:
                position_ids = position_ids + kv_prefix.long()[seg]
        return cls(
            input_ids=input_ids,
            position_ids=position_ids,
            cu_seqlens=cu,
            max_seqlen=int(lens.max()) if len(lens) else 0,
            labels=labels,
            segment_ids=seg,
            num_target_tokens=int((labels != IGNORE_INDEX).sum()),
            sample_ids=torch.full((1,), -1, dtype=torch.int64),
            num_tokens=n,
            row_capacity=n,
            ref_logps=ref_logps,
            kv_prefix=kv_prefix,
        )

    @property
    def n_segments(self) -> int:
        return self.cu_seqlens.numel() - 1

    @property
    def doc_lens(self) -> list[int]:
        """Document lengths (FLOP counts, tables): read from the host batch, never a device copy."""
        cu = self.cu_seqlens.tolist()
        return [e - s for s, e in zip(cu, cu[1:])]

    def replace(self, **changes: Any) -> PackedBatch:
        return dataclasses.replace(self, **changes)

    def _map(self, fn) -> PackedBatch:
        return self.replace(**{f: fn(getattr(self, f)) for f in self.DEVICE_FIELDS if getattr(self, f) is not None})

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PackedBatch:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> PackedBatch:  # DataLoader(pin_memory=True) calls this
        return self._map(lambda t: t.pin_memory())


def collate_rows(rows: Sequence[dict[str, Any]], stage: str, seq_len: int) -> PackedBatch:
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

    ref = None
    if stage == "dpo" and all(r.get("ref_logps") is not None for r in rows):
        ref = torch.from_numpy(np.concatenate([np.asarray(r["ref_logps"], dtype=np.float32) for r in rows]).copy())
    return PackedBatch(
        input_ids=torch.from_numpy(ids),
        position_ids=torch.from_numpy(pos),
        cu_seqlens=torch.from_numpy(cu.astype(np.int32)),
        max_seqlen=int(lens.max()) if n_docs else 0,
        labels=torch.from_numpy(labels),
        segment_ids=torch.from_numpy(seg),
        num_target_tokens=int((labels != IGNORE_INDEX).sum()),
        sample_ids=torch.tensor([int(r.get("sample_id", -1)) for r in rows], dtype=torch.int64),
        num_tokens=total,
        row_capacity=len(rows) * seq_len,
        ref_logps=ref,
        kv_prefix=None if kv_prefix is None else torch.from_numpy(kv_prefix.astype(np.int32)),
    )


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
