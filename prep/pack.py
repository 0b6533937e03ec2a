"""Packing tokenized samples into training rows (done once here, never in the collator).

- pretrain: documents (tokens + EOS) are concatenated and cut into rows of exactly seq_len;
  `doc_lens` lists the pieces in each row. The last partial row (< seq_len tokens) is dropped
  and counted (`tail_tokens_dropped`).
- sft / dpo: best-fit-decreasing over a window of `window` samples: samples sorted by length
  (longest first, ties in arrival order) each go into the open row with the least room that
  still fits them, else a new row. Rows come out in creation order. A dpo sample is a pair,
  kept whole: [prompt+chosen][prompt+rejected], so a row's segments are ordered
  [chosen_0, rejected_0, chosen_1, rejected_1, ...]. With a shared prompt a pair is one group
  [prompt+chosen][prompt[-1]+rejected] (prep/share.py), sorted by the group's length, and the
  row gets a `prompt_lens` column (one per pair).
All of it is deterministic: the same samples in the same order give the same rows.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator

import numpy as np

Row = dict[str, np.ndarray]


class PretrainPacker:
    """Concatenate documents and cut rows of exactly seq_len (vectorised per chunk)."""

    def __init__(self, seq_len: int):
        self.L = seq_len
        self.ids: list[np.ndarray] = []
        self.lens: list[np.ndarray] = []
        self.n = 0
        self.tail_tokens_dropped = 0

    def add(self, ids: np.ndarray) -> Iterator[Row]:
        return self.add_many(ids, np.asarray([len(ids)], dtype=np.int64))

    def add_many(self, flat: np.ndarray, lens: np.ndarray) -> Iterator[Row]:
        """Documents given as one flat array and their lengths (which sum to len(flat))."""
        if len(flat):
            self.ids.append(flat)
            self.lens.append(np.asarray(lens, dtype=np.int64))
            self.n += len(flat)
        if self.n >= self.L:
            yield from self._cut()

    def _cut(self) -> Iterator[Row]:
        L = self.L
        cat = np.concatenate(self.ids) if len(self.ids) > 1 else self.ids[0]
        lens = np.concatenate(self.lens) if len(self.lens) > 1 else self.lens[0]
        nrows = self.n // L
        used = nrows * L
        doc_ends = np.cumsum(lens)
        # segment boundaries = document ends and row ends; each segment lies in one row
        bounds = np.union1d(doc_ends[doc_ends < used], np.arange(1, nrows + 1, dtype=np.int64) * L)
        seg_lens = np.diff(bounds, prepend=0)
        row_of_seg = (bounds - 1) // L
        splits = np.searchsorted(row_of_seg, np.arange(1, nrows), side="left")
        for r, row_lens in enumerate(np.split(seg_lens, splits)):
            yield {
                "input_ids": cat[r * L : (r + 1) * L],
                "doc_lens": row_lens.astype(np.uint32),
            }
        rest_ends = doc_ends[doc_ends > used]
        self.lens = [np.diff(rest_ends, prepend=used)] if len(rest_ends) else []
        rest = cat[used:]
        self.ids = [rest] if len(rest) else []
        self.n = len(rest)

    def finish(self) -> Iterator[Row]:
        self.tail_tokens_dropped = self.n
        self.ids, self.lens, self.n = [], [], 0
        return iter(())


class BFDPacker:
    """Best-fit-decreasing over a window. A sample is a list of (ids, loss_mask) segments,
    plus its prompt length for shared-prompt dpo groups (`shared=True`)."""

    def __init__(self, seq_len: int, window: int, shared: bool = False):
        self.L = seq_len
        self.window = max(1, window)
        self.shared = shared
        self.items: list[list[tuple[np.ndarray, np.ndarray]]] = []
        self.prompts: list[int] = []

    def add(self, segments, prompt_len: int | None = None) -> Iterator[Row]:
        if self.shared != (prompt_len is not None):
            raise ValueError("BFDPacker: a prompt length comes with every shared-prompt group and only then")
        self.items.append(segments)
        if self.shared:
            self.prompts.append(prompt_len)
        if len(self.items) >= self.window:
            yield from self._flush()

    def finish(self) -> Iterator[Row]:
        yield from self._flush()

    def _flush(self) -> Iterator[Row]:
        items, self.items = self.items, []
        prompts, self.prompts = self.prompts, []
        if not items:
            return
        sizes = [sum(len(ids) for ids, _ in segs) for segs in items]
        order = sorted(range(len(items)), key=lambda k: (-sizes[k], k))
        bins: list[list[int]] = []
        room: list[tuple[int, int]] = []  # sorted (remaining, bin index) of open bins
        for k in order:
            size = sizes[k]
            pos = bisect.bisect_left(room, (size, -1))
            if pos < len(room):
                rem, b = room.pop(pos)
            else:
                b, rem = len(bins), self.L
                bins.append([])
            bins[b].append(k)
            rem -= size
            if rem > 0:
                bisect.insort(room, (rem, b))
        for members in bins:
            segs = [seg for k in members for seg in items[k]]
            row = {
                "input_ids": np.concatenate([ids for ids, _ in segs]),
                "loss_mask": np.concatenate([m for _, m in segs]).astype(np.uint8),
                "seq_lens": np.asarray([len(ids) for ids, _ in segs], dtype=np.uint32),
            }
            if self.shared:
                row["prompt_lens"] = np.asarray([prompts[k] for k in members], dtype=np.uint32)
            yield row
