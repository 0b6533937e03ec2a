"""`bumblefast prep`: raw json/jsonl/parquet -> packed, tokenized MDS shards + manifest.

Public API:
    run_prep(cfg: PrepConfig, progress=None) -> dict          # one node's prep; returns the manifest
    merge_parts(root: str) -> dict                            # join a multi-node prep's tasks (prep merge)
    inspect_output(path, rows=2, tokenizer=None, color=None) -> str   # prep inspect
    main(argv: list[str]) -> int                              # the CLI (bumblefast.prep.cli)
"""

if __name__ != "bumblefast.prep":  # this folder imported by its own name, e.g. from the checkout root
    raise ImportError(
        f"{__file__}: this folder is the package bumblefast.prep; import it by that name "
        "(as a top-level `prep` it would load a second copy of every module in it)"
    )

__all__ = ["run_prep", "merge_parts", "inspect_output"]

_HOMES = {"run_prep": "run", "merge_parts": "merge", "inspect_output": "inspect_shards"}


def __getattr__(name: str):
    """Lazy: `import streaming` costs seconds, and `bumblefast prep --help` needs none of it."""
    if name in _HOMES:
        import importlib

        return getattr(importlib.import_module(f"bumblefast.prep.{_HOMES[name]}"), name)
    raise AttributeError(f"module 'bumblefast.prep' has no attribute {name!r}")
