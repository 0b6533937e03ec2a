"""`bumblefast.shards`: the shard schema (shared by prep and train), readers and collation.

Public API:
    schema: SCHEMA_VERSION, MANIFEST_NAME, columns(stage, vocab_size, ref_logps=False),
            token_dtype(vocab_size), read_manifest(path) -> dict, SEGMENT_COLUMN
    collate_rows(rows, stage, seq_len) -> dict[str, Tensor]   # the micro-batch contract
    build_loader(path, *, batch_size, seed=42, shuffle=True, num_canonical_nodes=1, ...)
        -> ShardLoader (StreamingDataLoader; state_dict()/load_state_dict() checked on resume)
    ShardDataset, ShardLoader, ResumeError
"""

from bumblefast.shards.collate import IGNORE_INDEX, collate_rows
from bumblefast.shards.reader import ResumeError, ShardDataset, ShardLoader, build_loader
from bumblefast.shards.schema import (
    MANIFEST_NAME,
    SCHEMA_VERSION,
    SEGMENT_COLUMN,
    columns,
    read_manifest,
    token_dtype,
)

__all__ = [
    "IGNORE_INDEX",
    "MANIFEST_NAME",
    "SCHEMA_VERSION",
    "SEGMENT_COLUMN",
    "ResumeError",
    "ShardDataset",
    "ShardLoader",
    "build_loader",
    "collate_rows",
    "columns",
    "read_manifest",
    "token_dtype",
]
