"""`bumblefast.shards`: the shard schema (shared by prep and train), readers and collation.

Public API:
    schema: columns(stage, vocab_size, ref_logps=False), token_dtype(vocab_size), SEGMENT_COLUMN
    manifest: SCHEMA_VERSION, MANIFEST_NAME, Manifest (Manifest.read(path) -> Manifest),
              read_manifest(path) -> dict, staged_output(final) (write an output whole or not at all)
    collate_rows(rows, stage, seq_len) -> PackedBatch   # the micro-batch contract (.to(device))
    build_loader(path, *, batch_size, seed=42, shuffle=True, num_canonical_nodes=1, ...)
        -> ShardLoader (StreamingDataLoader; state_dict()/load_state_dict() checked on resume)
    ShardDataset, ShardLoader, ResumeError
"""

if __name__ != "bumblefast.shards":  # this folder imported by its own name, e.g. from the checkout root
    raise ImportError(
        f"{__file__}: this folder is the package bumblefast.shards; import it by that name "
        "(as a top-level `shards` it would load a second copy of every module in it)"
    )

# Names resolved on first use (PEP 562): prep imports bumblefast.shards.manifest and .schema, and
# must not pay for collate's torch or the reader's streaming (~4 CPU-s) to do so.
_HOMES = {
    "IGNORE_INDEX": "collate",
    "collate_rows": "collate",
    "PackedBatch": "collate",
    "MANIFEST_NAME": "manifest",
    "SCHEMA_VERSION": "manifest",
    "Manifest": "manifest",
    "ManifestError": "manifest",
    "read_manifest": "manifest",
    "staged_output": "manifest",
    "ResumeError": "reader",
    "ShardDataset": "reader",
    "ShardLoader": "reader",
    "build_loader": "reader",
    "SEGMENT_COLUMN": "schema",
    "columns": "schema",
    "token_dtype": "schema",
}


def __getattr__(name: str):
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'bumblefast.shards' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"bumblefast.shards.{home}"), name)


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
    "PackedBatch",
    "columns",
    "read_manifest",
    "staged_output",
    "token_dtype",
]
