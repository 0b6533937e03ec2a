"""shards/manifest.py: the manifest round-trips byte for byte (key order included), names the
key at fault when it is wrong, and staged_output() never leaves a moment without a complete
output nor a staging folder behind."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import DEMO

from bumblefast.shards.manifest import (
    MANIFEST_NAME,
    Manifest,
    ManifestError,
    read_manifest,
    staged_output,
)

# A manifest as prep wrote it before the dataclass existed (key order included).
PREP = {
    "schema_version": 1,
    "stage": "dpo",
    "seq_len": 256,
    "columns": {
        "input_ids": "ndarray:uint16",
        "loss_mask": "ndarray:uint8",
        "seq_lens": "ndarray:uint32",
    },
    "token_dtype": "uint16",
    "tokenizer": {
        "name_or_path": "/tok",
        "fingerprint": "0123456789abcdef",
        "vocab_size": 1024,
        "eos_token_id": 3,
        "backend": {"name": "hf", "version": "0.21"},
    },
    "chat_template_hash": None,
    "fingerprint": "fedcba9876543210",
    "records": {
        "read": 5,
        "written": 4,
        "skipped": 1,
        "skipped_by_reason": {"overlong": 1},
        "truncated": 0,
        "by_file": {"/d/a.jsonl": {"read": 5, "written": 4, "skipped": 1}},
    },
    "tokens": {"real": 900, "target": 300, "row_capacity": 1024, "tail_tokens_dropped": 0},
    "rows": 4,
    "segments": 8,
    "packing_efficiency": 0.878906,
    "prep": {"inputs": ["/d/a.jsonl"], "num_nodes": 1, "node_rank": 0, "séparateur": "é"},
    "dpo_layout": "pairs",
    "dpo": {
        "pair_tokens_unshared": 900,
        "prompt_tokens_unshared": 400,
        "prompt_fraction": 0.444444,
        "tokens_per_pair": 225.0,
    },
}


def _merged_order(d: dict) -> dict:
    """The key order `prep merge` writes: chat_template_hash before tokenizer, parts before prep."""
    order = [
        "schema_version",
        "stage",
        "seq_len",
        "columns",
        "token_dtype",
        "chat_template_hash",
        "tokenizer",
        "fingerprint",
        "records",
        "tokens",
        "rows",
        "segments",
        "packing_efficiency",
        "parts",
        "prep",
        "dpo_layout",
        "dpo",
    ]
    d = dict(d, parts=["node-00000", "node-00001"])
    return {k: d[k] for k in order}


def _text(d: dict) -> str:
    return json.dumps(d, indent=2, ensure_ascii=False) + "\n"


def _older(d: dict) -> dict:
    """A manifest from before tokenizer backends and per-file counts."""
    d = copy.deepcopy(d)
    del d["tokenizer"]["backend"], d["records"]["by_file"]
    return d


@pytest.mark.parametrize(
    "data",
    [PREP, _merged_order(PREP), _older(PREP), dict(PREP, unknown_key=[1, 2])],
    ids=["prep", "merged", "older", "unknown-key"],
)
def test_round_trip_is_byte_identical(data, tmp_path):
    m = Manifest.from_dict(copy.deepcopy(data))
    assert m.to_json() == _text(data)
    (tmp_path / MANIFEST_NAME).write_text(_text(data), encoding="utf-8")
    assert read_manifest(str(tmp_path)) == data
    (tmp_path / "again").mkdir()
    m.write(tmp_path / "again")
    assert (tmp_path / "again" / MANIFEST_NAME).read_text(encoding="utf-8") == _text(data)
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == [MANIFEST_NAME]  # no temporary file left


def test_ref_logps_and_fields():
    m = Manifest.from_dict(
        dict(
            PREP,
            ref_logps={
                "model_name_or_path": "/m",
                "model_fingerprint": "a" * 16,
                "source_fingerprint": "b" * 16,
                "source_path": "/s",
            },
        )
    )
    assert m.ref_logps.model_fingerprint == "a" * 16 and m.records.by_file["/d/a.jsonl"]["written"] == 4
    assert m.layout == "pairs" and not m.has_ref_logps
    assert list(m.to_dict())[-1] == "ref_logps"
    assert Manifest.from_dict(dict(PREP, stage="sft", dpo_layout=None, dpo=None)).layout == "pairs"


def _without(path: str) -> dict:
    d = copy.deepcopy(PREP)
    *parents, last = path.split(".")
    node = d
    for k in parents:
        node = node[k]
    del node[last]
    return d


@pytest.mark.parametrize(
    "data, message",
    [
        (_without("records.read"), "key 'records.read' is missing"),
        (_without("tokenizer.vocab_size"), "key 'tokenizer.vocab_size' is missing"),
        (_without("fingerprint"), "key 'fingerprint' is missing"),
        (dict(PREP, seq_len="256"), "key 'seq_len': expected int, got str '256'"),
        (dict(PREP, rows=True), "key 'rows': expected int, got bool"),
        (dict(PREP, tokenizer="tok"), "key 'tokenizer': expected an object, got str"),
        (dict(PREP, stage="rlhf"), "key 'stage': must be one of pretrain|sft|dpo, got 'rlhf'"),
        (dict(PREP, dpo_layout="zigzag"), "key 'dpo_layout': must be one of pairs|shared_prompt"),
        (dict(PREP, schema_version=2), "shard schema version 2, this BumbleFast reads 1"),
        ([1, 2], "expected a JSON object, got list"),
    ],
)
def test_validation_names_file_and_key(data, message, tmp_path):
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(ManifestError) as e:
        Manifest.read(str(tmp_path))
    assert message in str(e.value) and str(tmp_path / MANIFEST_NAME) in str(e.value)


def test_missing_manifest_is_not_a_finished_output(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a finished `bumblefast prep` output"):
        Manifest.read(str(tmp_path))


# ---- staged_output ---------------------------------------------------------------------------------
def _write_output(folder: Path, tag: str) -> None:
    (folder / "data.bin").write_text(tag)
    Manifest.from_dict(dict(PREP, fingerprint=tag)).write(folder)


def _tag(folder: Path) -> str:
    """The output's tag, read only through a complete output (its manifest must read)."""
    return Manifest.read(str(folder)).fingerprint


def _hidden(root: Path) -> list[str]:
    return sorted(p.name for p in root.rglob(".*"))


def test_fresh_output_appears_whole(tmp_path):
    final = tmp_path / "out"
    with staged_output(final) as stage:
        assert stage.parent == tmp_path and stage.name.startswith(".out.tmp-")
        _write_output(stage, "new")
        assert not final.exists()  # nothing is published before the block ends
    assert _tag(final) == "new" and (final / "data.bin").read_text() == "new"
    assert _hidden(tmp_path) == []


def test_interrupted_write_keeps_previous_output(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    _write_output(final, "old")
    with pytest.raises(RuntimeError, match="killed mid-write"):
        with staged_output(final) as stage:
            _write_output(stage, "new")
            raise RuntimeError("killed mid-write")
    assert _tag(final) == "old" and (final / "data.bin").read_text() == "old"
    assert _hidden(tmp_path) == []  # the staging folder is gone


def test_replacing_leaves_a_complete_output_at_every_moment(tmp_path, monkeypatch):
    final = tmp_path / "out"
    final.mkdir()
    _write_output(final, "old")
    seen: list[str] = []
    real_replace = os.replace

    def complete_output() -> str:
        if final.exists():
            return _tag(final)
        (old,) = tmp_path.glob(".out.old-*")  # the previous output, renamed aside
        return _tag(old)

    def checked_replace(src, dst):
        seen.append(complete_output())
        real_replace(src, dst)
        seen.append(complete_output())

    monkeypatch.setattr(os, "replace", checked_replace)
    with staged_output(final) as stage:
        _write_output(stage, "new")
    monkeypatch.undo()
    assert len(seen) >= 4  # the old output moved aside, the new one moved in (+ the manifest write)
    assert seen[0] == "old" and seen[-1] == "new" and set(seen) == {"old", "new"}
    assert _tag(final) == "new" and _hidden(tmp_path) == []


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_leftovers_of_a_killed_run_are_cleaned_and_the_old_output_restored(tmp_path):
    """A run killed between its two renames leaves the old output aside: the next run puts it back
    (here the next run fails too, so the old output is what remains)."""
    final = tmp_path / "out"
    pid = _dead_pid()
    old = tmp_path / f".out.old-{pid}"
    old.mkdir()
    _write_output(old, "old")
    (tmp_path / f".out.tmp-{pid}").mkdir()
    with pytest.raises(KeyboardInterrupt):
        with staged_output(final):
            raise KeyboardInterrupt
    assert _tag(final) == "old" and _hidden(tmp_path) == []


def test_into_existing_folder_publishes_manifest_last(tmp_path, monkeypatch):
    root = tmp_path / "merged"
    (root / "node-00000").mkdir(parents=True)
    moved: list[str] = []
    real_replace = os.replace

    def recording_replace(src, dst):
        if Path(dst).parent == root:
            moved.append(Path(dst).name)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", recording_replace)
    with staged_output(root, into=True) as stage:
        assert stage.parent == root
        Manifest.from_dict(PREP).write(stage)
        (stage / "index.json").write_text("{}")
    monkeypatch.undo()
    assert moved == ["index.json", MANIFEST_NAME]
    assert sorted(p.name for p in root.iterdir()) == [MANIFEST_NAME, "index.json", "node-00000"]


def _failing_fsync(monkeypatch, err: int, on: str):
    """os.fsync (as shards.manifest calls it) raising `err` on folders (`on="dir"`) or files."""
    import stat

    from bumblefast.shards import manifest as M

    real = os.fsync

    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode) == (on == "dir"):
            raise OSError(err, os.strerror(err))
        real(fd)

    monkeypatch.setattr(M.os, "fsync", fsync)


def test_failed_file_fsync_fails_naming_the_file_and_publishes_nothing(tmp_path, monkeypatch):
    import errno

    _failing_fsync(monkeypatch, errno.EIO, on="file")
    final = tmp_path / "out"
    with pytest.raises(OSError, match=rf"fsync of .*{MANIFEST_NAME} failed \(Input/output error\)"):
        Manifest.from_dict(PREP).write(tmp_path)  # the manifest itself
    assert not (tmp_path / MANIFEST_NAME).exists()
    with pytest.raises(OSError, match=r"fsync of .*\.out\.tmp-\d+/data\.bin failed \(Input/output error\)"):
        with staged_output(final) as stage:
            (stage / "data.bin").write_text("new")
    assert not final.exists() and _hidden(tmp_path) == []


def test_failed_folder_fsync_fails_unless_the_filesystem_cannot_sync_folders(tmp_path, monkeypatch):
    import errno

    _failing_fsync(monkeypatch, errno.EIO, on="dir")
    with pytest.raises(OSError, match=rf"fsync of folder {tmp_path} failed \(Input/output error\)"):
        Manifest.from_dict(PREP).write(tmp_path)
    _failing_fsync(monkeypatch, errno.EINVAL, on="dir")  # e.g. some network/FUSE mounts
    with pytest.warns(UserWarning, match=rf"fsync of folder {tmp_path} not supported by its filesystem"):
        Manifest.from_dict(PREP).write(tmp_path)
    assert Manifest.read(str(tmp_path)).stage == "dpo"


# ---- the real writers ------------------------------------------------------------------------------
def test_prep_and_merge_manifests_round_trip(demo_tokenizer_dir, tmp_path):
    from bumblefast.config import PrepConfig
    from bumblefast.prep.merge import merge_parts
    from bumblefast.prep.run import run_prep

    common = dict(
        stage="dpo",
        input=[str(DEMO / "dpo.json")],
        tokenizer_name_or_path=str(demo_tokenizer_dir),
        seq_len=256,
    )
    returned = [run_prep(PrepConfig(output_dir=str(tmp_path / "one"), **common), progress=False)]
    for r in range(2):
        run_prep(
            PrepConfig(output_dir=str(tmp_path / "multi"), node_rank=r, num_nodes=2, **common),
            progress=False,
        )
    returned.append(merge_parts(str(tmp_path / "multi")))
    for folder, ret in zip(("one", "multi"), returned, strict=True):
        text = (tmp_path / folder / MANIFEST_NAME).read_text(encoding="utf-8")
        assert ret == json.loads(text)
        assert Manifest.read(str(tmp_path / folder)).to_json() == text
    assert returned[1] == returned[0]  # one node or two + merge: the same manifest
    assert _hidden(tmp_path / "multi") == [] and _hidden(tmp_path) == []
