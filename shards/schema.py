"""The on-disk format of BumbleFast shards: one module that prep (writer) and train (reader) share.

A shard folder is an MDS dataset (streaming's versioned `index.json` + zstd shards with
hashes) plus `bumblefast.json`, the manifest (shards/manifest.py). One MDS sample is one
training row:

| stage    | columns                                                              |
|----------|----------------------------------------------------------------------|
| pretrain | `input_ids` (exactly seq_len tokens), `doc_lens` (uint32 per segment)  |
| sft      | `input_ids` (<= seq_len), `loss_mask` (uint8), `seq_lens` (uint32)     |
| dpo      | `input_ids`, `loss_mask`, `seq_lens`, optional `ref_logps` (float32    |
|          | per segment); segments ordered [chosen_0, rejected_0, chosen_1, ...]   |
|          | shared-prompt layout: + `prompt_lens` (uint32, one per pair)           |

DPO rows are `row_len("dpo", seq_len)` = 2 x seq_len tokens: for dpo, `seq_len` (prep's
`--seq_len` / `--cutoff_len`) is the cutoff *per sequence* (prompt + reply <= seq_len, as
LLaMA-Factory's cutoff_len and TRL's max_length), so a pair at the cutoff fits one row in
either layout. The manifest's `seq_len` is the row length; `prep.cutoff_len` the cutoff.

DPO layouts (the manifest's `dpo_layout`; a manifest without it holds `pairs`):

- `pairs`: each pair is two segments [prompt + chosen][prompt + rejected].
- `shared_prompt`: each pair is one group [prompt + chosen][prompt[-1] + rejected]: the
  prompt (`prompt_lens[k]` = P tokens, the longest common untrained token prefix of the two
  sequences) is stored once, at the head of the chosen segment; the rejected segment repeats
  the prompt's last token (which predicts the rejected reply's first token) and then holds the
  rejected reply. `seq_lens` are the two segments' stored lengths (P + C and 1 + R), so the
  segment and target structure is that of `pairs`; the trainer lets the rejected segment
  attend the prompt's first P - 1 tokens and starts its positions at P - 1. With P = 0 (no
  common prefix) the rejected segment is the whole rejected sequence, standalone.

Token columns are `ndarray:uint16` when every id fits (vocab <= 65536), else `ndarray:uint32`.
"""

from __future__ import annotations

import hashlib

ERRORS_NAME = "errors.jsonl"
STAGES = ("pretrain", "sft", "dpo")

# name of the per-row segment-length column for each stage
SEGMENT_COLUMN = {"pretrain": "doc_lens", "sft": "seq_lens", "dpo": "seq_lens"}
DPO_LAYOUTS = ("pairs", "shared_prompt")
PROMPT_COLUMN = "prompt_lens"  # shared_prompt layout: prompt tokens per pair


def row_len(stage: str, seq_len: int) -> int:
    """Tokens per MDS row for a stage prepped at `seq_len`: dpo rows hold whole pairs of two
    sequences of up to seq_len each, every other stage's rows hold seq_len."""
    return 2 * seq_len if stage == "dpo" else seq_len


def token_dtype(vocab_size: int) -> str:
    """uint16 when every token id fits, else uint32."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def columns(stage: str, vocab_size: int, ref_logps: bool = False, shared_prompt: bool = False) -> dict[str, str]:
    """MDS `columns=` for a stage: name -> streaming encoding."""
    if stage not in STAGES:
        raise ValueError(f"stage: must be one of {'|'.join(STAGES)}, got '{stage}'")
    tok = f"ndarray:{token_dtype(vocab_size)}"
    if stage == "pretrain":
        return {"input_ids": tok, "doc_lens": "ndarray:uint32"}
    cols = {"input_ids": tok, "loss_mask": "ndarray:uint8", "seq_lens": "ndarray:uint32"}
    if stage == "dpo" and shared_prompt:
        cols[PROMPT_COLUMN] = "ndarray:uint32"
    if stage == "dpo" and ref_logps:
        cols["ref_logps"] = "ndarray:float32"
    return cols


def is_remote(path: str) -> bool:
    return "://" in str(path) and not str(path).startswith("file://")


def fingerprint_bytes(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()[:16]
