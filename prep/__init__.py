"""`bumblefast prep`: raw json/jsonl/parquet -> packed, tokenized MDS shards + manifest.

Public API:
    run_prep(cfg: PrepConfig, progress=None) -> dict          # one node's prep; returns the manifest
    merge_parts(root: str) -> dict                            # join node-* parts (prep merge)
    inspect_output(path, rows=2, tokenizer=None, color=None) -> str   # prep inspect
    main(argv: list[str]) -> int                              # the CLI (bumblefast.prep.cli)
"""

from bumblefast.prep.inspect_shards import inspect_output
from bumblefast.prep.merge import merge_parts
from bumblefast.prep.run import run_prep

__all__ = ["run_prep", "merge_parts", "inspect_output"]
