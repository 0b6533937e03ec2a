"""`bumblefast.shards`: the shard schema (shared by prep and train), readers and collation.

Public API:
    schema: columns(stage, vocab_size, ref_logps=False), token_dtype(vocab_size), SEGMENT_COLUMN
    manifest: SCHEMA_VERSION, MANIFEST_NAME, Manifest (Manifest.read(path) -> Manifest),
              read_manifest(path) -> dict, staged_output(final) (write an output whole or not at all)
    collate_rows(rows, stage, seq_len) -> dict[str, Tensor]   # the micro-batch contract
    build_loader(path, *, batch_size, seed=42, shuffle=True, num_canonical_nodes=1, ...)
        -> ShardLoader (StreamingDataLoader; state_dict()/load_state_dict() checked on resume)
    ShardDataset, ShardLoader, ResumeError
"""

if __name__ != "bumblefast.shards":  # this folder imported by its own name, e.g. from the checkout root
    raise ImportError(
        f"{__file__}: this folder is the package bumblefast.shards; import it by that name "
        "(as a top-level `shards` it would load a second copy of every module in it)"
    )

from bumblefast.shards.collate import IGNORE_INDEX, collate_rows  # noqa: E402
from bumblefast.shards.manifest import (  # noqa: E402
    MANIFEST_NAME,
    SCHEMA_VERSION,
    Manifest,
    ManifestError,
    read_manifest,
    staged_output,
)
from bumblefast.shards.reader import ResumeError, ShardDataset, ShardLoader, build_loader  # noqa: E402
from bumblefast.shards.schema import SEGMENT_COLUMN, columns, token_dtype  # noqa: E402

__all__ = [
    "IGNORE_INDEX",
    "MANIFEST_NAME",
    "SCHEMA_VERSION",
    "SEGMENT_COLUMN",
    "Manifest",
    "ManifestError",
    "ResumeError",
    "ShardDataset",
    "ShardLoader",
    "build_loader",
    "collate_rows",
    "columns",
    "read_manifest",
    "staged_output",
    "token_dtype",
]
