"""The on-disk format of BumbleFast shards: one module that prep (writer) and train (reader) share.

A shard folder is an MDS dataset (streaming's versioned `index.json` + zstd shards with
hashes) plus `bumblefast.json`, the manifest. One MDS sample is one training row:

| stage    | columns                                                              |
|----------|----------------------------------------------------------------------|
| pretrain | `input_ids` (exactly seq_len tokens), `doc_lens` (uint32 per segment)  |
| sft      | `input_ids` (<= seq_len), `loss_mask` (uint8), `seq_lens` (uint32)     |
| dpo      | `input_ids`, `loss_mask`, `seq_lens`, optional `ref_logps` (float32    |
|          | per segment); segments ordered [chosen_0, rejected_0, chosen_1, ...]   |
|          | shared-prompt layout: + `prompt_lens` (uint32, one per pair)           |

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
import json
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
MANIFEST_NAME = "bumblefast.json"
ERRORS_NAME = "errors.jsonl"
STAGES = ("pretrain", "sft", "dpo")

# name of the per-row segment-length column for each stage
SEGMENT_COLUMN = {"pretrain": "doc_lens", "sft": "seq_lens", "dpo": "seq_lens"}
DPO_LAYOUTS = ("pairs", "shared_prompt")
PROMPT_COLUMN = "prompt_lens"  # shared_prompt layout: prompt tokens per pair


def dpo_layout(manifest: dict[str, Any]) -> str:
    """The DPO layout a shard set holds (`pairs` for shards written before the key existed)."""
    return manifest.get("dpo_layout", "pairs")


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


def read_manifest(path: str, cache_dir: str | None = None) -> dict[str, Any]:
    """The manifest of a shard folder (local path or remote URL)."""
    if is_remote(path):
        import tempfile

        from streaming.base.storage import CloudDownloader

        dest = Path(cache_dir or tempfile.mkdtemp(prefix="bf-manifest-")) / MANIFEST_NAME
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            CloudDownloader.direct_download(path.rstrip("/") + "/" + MANIFEST_NAME, str(dest))
        except Exception as e:  # noqa: BLE001 - any storage error means "not a finished output"
            raise FileNotFoundError(
                f"{path}: no {MANIFEST_NAME} (not a finished `bumblefast prep` output?): {e}"
            ) from e
        text = dest.read_text(encoding="utf-8")
    else:
        p = Path(path) / MANIFEST_NAME
        if not p.is_file():
            raise FileNotFoundError(
                f"{path}: no {MANIFEST_NAME} (not a finished `bumblefast prep` output?)"
            )
        text = p.read_text(encoding="utf-8")
    manifest = json.loads(text)
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ValueError(
            f"{path}: shard schema version {version}, this BumbleFast reads {SCHEMA_VERSION}; "
            "re-run `bumblefast prep`"
        )
    return manifest


def fingerprint_bytes(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()[:16]
