"""The shard manifest (`bumblefast.json`) and staged outputs: the one home of both.

Every shard folder holds a manifest beside streaming's `index.json`: what the rows are (stage,
seq_len, columns, tokenizer), where they came from (inputs, settings) and what happened to each
record (read, written, skipped by reason, truncated). `Manifest` is its only definition: prep,
`prep merge` and `precompute-ref` build one, everything else reads one (`Manifest.read`), and
`to_json()` writes the same bytes the loose dicts of earlier versions wrote (key order included:
merged manifests keep `chat_template_hash` before `tokenizer` and `parts` before `prep`).

| key                  | type        | meaning                                                  |
|----------------------|-------------|----------------------------------------------------------|
| `schema_version`     | int         | SCHEMA_VERSION; a reader refuses any other                |
| `stage`              | str         | pretrain, sft or dpo                                      |
| `seq_len`            | int         | row capacity in tokens                                    |
| `columns`            | dict        | MDS column -> encoding (shards/schema.py `columns`)       |
| `token_dtype`        | str         | uint16 or uint32                                          |
| `tokenizer`          | TokenizerInfo | path, fingerprint, vocab size, EOS id, backend          |
| `chat_template_hash` | str or null | hash of the chat template the rows were rendered with     |
| `fingerprint`        | str         | hash of index.json + tokenizer + stage (+ reference model) |
| `records`            | Records     | read / written / skipped (by reason, by file) / truncated |
| `tokens`             | Tokens      | real, target, row capacity, tail dropped                  |
| `rows`, `segments`   | int         | MDS samples, documents or pair segments                   |
| `packing_efficiency` | float       | real tokens / row capacity                                |
| `prep`               | dict        | the prep settings (inputs, task size, tasks, ...): a record |
| `parts`              | list        | outputs merged from node parts by older versions          |
| `dpo_layout`, `dpo`  | str, DpoStats | dpo only: `pairs` or `shared_prompt`, prompt sharing   |
| `ref_logps`          | RefLogps    | precompute-ref outputs only: the reference model and source |

`staged_output()` is the one way an output folder is written: into a staging folder, fsynced,
then renamed into place, so a reader sees the old output or the new one and never a half one.
"""

from __future__ import annotations

import dataclasses
import errno
import glob
import json
import os
import shutil
import tempfile
import types
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from bumblefast.shards.schema import DPO_LAYOUTS, STAGES, fingerprint_bytes, is_remote

SCHEMA_VERSION = 1
MANIFEST_NAME = "bumblefast.json"


class ManifestError(ValueError):
    """A manifest that does not match the schema; the message names the file and the key."""


# ---- the manifest ------------------------------------------------------------------------------
@dataclass
class TokenizerInfo:
    name_or_path: str
    fingerprint: str
    vocab_size: int
    eos_token_id: int | None
    backend: dict[str, Any] | None = None  # absent in manifests written before tokenizer backends


@dataclass
class Records:
    """What happened to every input record: read == written + skipped (prep checks it)."""

    read: int
    written: int
    skipped: int
    skipped_by_reason: dict[str, int]
    truncated: int
    by_file: dict[str, dict[str, int]] | None = None  # absent in older manifests

    @classmethod
    def total(cls, parts: Sequence[Records]) -> Records:
        """The sums over node parts (each node read its own share of the records)."""
        reasons: dict[str, int] = {}
        by_file: dict[str, dict[str, int]] = {}
        for r in parts:
            for reason, n in r.skipped_by_reason.items():
                reasons[reason] = reasons.get(reason, 0) + n
            for path, counts in (r.by_file or {}).items():
                into = by_file.setdefault(path, {"read": 0, "written": 0, "skipped": 0})
                for k in into:
                    into[k] += counts[k]
        return cls(
            read=sum(r.read for r in parts),
            written=sum(r.written for r in parts),
            skipped=sum(r.skipped for r in parts),
            skipped_by_reason=dict(sorted(reasons.items())),
            truncated=sum(r.truncated for r in parts),
            by_file=by_file,
        )


@dataclass
class Tokens:
    real: int
    target: int
    row_capacity: int
    tail_tokens_dropped: int

    @property
    def packing_efficiency(self) -> float:
        return round(self.real / max(self.row_capacity, 1), 6)

    @classmethod
    def total(cls, parts: Sequence[Tokens]) -> Tokens:
        return cls(*(sum(getattr(t, f.name) for t in parts) for f in dataclasses.fields(cls)))


@dataclass
class DpoStats:
    """Prompt sharing: the tokens the pairs would take as [prompt+chosen][prompt+rejected]."""

    pair_tokens_unshared: int
    prompt_tokens_unshared: int
    prompt_fraction: float
    tokens_per_pair: float

    @classmethod
    def of(cls, pair_tokens: int, prompt_tokens: int, real_tokens: int, pairs: int) -> DpoStats:
        return cls(
            pair_tokens,
            prompt_tokens,
            round(prompt_tokens / max(pair_tokens, 1), 6),
            round(real_tokens / max(pairs, 1), 3),
        )


@dataclass
class RefLogps:
    """Where a precompute-ref output's `ref_logps` column came from."""

    model_name_or_path: str
    model_fingerprint: str
    source_fingerprint: str
    source_path: str


@dataclass
class Manifest:
    stage: str
    seq_len: int
    columns: dict[str, str]
    token_dtype: str
    tokenizer: TokenizerInfo
    chat_template_hash: str | None
    fingerprint: str
    records: Records
    tokens: Tokens
    rows: int
    segments: int
    packing_efficiency: float
    prep: dict[str, Any]
    schema_version: int = SCHEMA_VERSION
    parts: list[str] | None = None
    dpo_layout: str | None = None
    dpo: DpoStats | None = None
    ref_logps: RefLogps | None = None
    # keys this version does not know: kept as read, written after the known ones
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def layout(self) -> str:
        """The DPO layout a shard set holds (`pairs` for shards written before the key existed)."""
        return self.dpo_layout or "pairs"

    @property
    def has_ref_logps(self) -> bool:
        return "ref_logps" in self.columns

    # -- dict / JSON -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The JSON object, in the key order every writer has used."""
        tok = ["tokenizer", "chat_template_hash"] if self.parts is None else ["chat_template_hash", "tokenizer"]
        order = ["schema_version", "stage", "seq_len", "columns", "token_dtype", *tok, "fingerprint", "records",
                 "tokens", "rows", "segments", "packing_efficiency", "parts", "prep", "dpo_layout", "dpo",
                 "ref_logps"]  # fmt: skip
        out = {k: _plain(getattr(self, k)) for k in order if k == "chat_template_hash" or getattr(self, k) is not None}
        out.update(self.extra)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n"

    @classmethod
    def from_dict(cls, data: Any, where: str = MANIFEST_NAME) -> Manifest:
        """Validate and convert; a ManifestError names `where` and the key at fault."""
        if not isinstance(data, dict):
            raise ManifestError(f"{where}: expected a JSON object, got {type(data).__name__}")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ManifestError(
                f"{where}: shard schema version {version}, this BumbleFast reads {SCHEMA_VERSION}; "
                "re-run `bumblefast prep`"
            )
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        m = _build(cls, {k: v for k, v in data.items() if k in known}, where, "")
        m.extra = {k: v for k, v in data.items() if k not in known}
        m.validate(where)
        return m

    def validate(self, where: str = MANIFEST_NAME) -> None:
        """The checks beyond types: values a reader relies on."""
        if self.stage not in STAGES:
            raise ManifestError(f"{where}: key 'stage': must be one of {'|'.join(STAGES)}, got {self.stage!r}")
        if self.seq_len < 1:
            raise ManifestError(f"{where}: key 'seq_len': must be >= 1, got {self.seq_len}")
        if self.dpo_layout is not None and self.dpo_layout not in DPO_LAYOUTS:
            raise ManifestError(
                f"{where}: key 'dpo_layout': must be one of {'|'.join(DPO_LAYOUTS)}, got {self.dpo_layout!r}"
            )
        if "input_ids" not in self.columns:
            raise ManifestError(f"{where}: key 'columns': has no 'input_ids' column")

    # -- files -----------------------------------------------------------------------------------
    @classmethod
    def read(cls, path: str, cache_dir: str | None = None) -> Manifest:
        """The manifest of a shard folder (local path or remote URL)."""
        return cls.from_dict(json.loads(_read_text(path, cache_dir)), where=f"{str(path).rstrip('/')}/{MANIFEST_NAME}")

    def write(self, folder: str | Path) -> Path:
        """Write `folder/bumblefast.json` atomically (temporary file, fsync, rename)."""
        dest = Path(folder, MANIFEST_NAME)
        tmp = dest.with_name(f".{MANIFEST_NAME}.tmp-{os.getpid()}")
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(self.to_json())
                f.flush()
                _fsync_fd(f.fileno(), dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, dest)
        _fsync_dir(dest.parent)  # the rename too: a manifest marks a finished output
        return dest


def read_manifest(path: str, cache_dir: str | None = None) -> dict[str, Any]:
    """The manifest of a shard folder as its JSON object (validated; see `Manifest.read`)."""
    return Manifest.read(path, cache_dir).to_dict()


def shards_fingerprint(index_bytes: bytes, tokenizer_fingerprint: str, stage: str) -> str:
    """The fingerprint of a prep (or merged) output: its index, its tokenizer, its stage."""
    return fingerprint_bytes(index_bytes, tokenizer_fingerprint.encode(), stage.encode())


def ref_fingerprint(source_fingerprint: str, model_fingerprint: str) -> str:
    """The fingerprint of a precompute-ref output: its source shards and the reference model."""
    return fingerprint_bytes(source_fingerprint.encode(), model_fingerprint.encode())


def _read_text(path: str, cache_dir: str | None) -> str:
    if is_remote(path):
        from streaming.base.storage import CloudDownloader

        dest = Path(cache_dir or tempfile.mkdtemp(prefix="bf-manifest-")) / MANIFEST_NAME
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            CloudDownloader.direct_download(path.rstrip("/") + "/" + MANIFEST_NAME, str(dest))
        except Exception as e:  # noqa: BLE001 - any storage error means "not a finished output"
            raise FileNotFoundError(
                f"{path}: no {MANIFEST_NAME} (not a finished `bumblefast prep` output?): {e}"
            ) from e
        return dest.read_text(encoding="utf-8")
    p = Path(path) / MANIFEST_NAME
    if not p.is_file():
        raise FileNotFoundError(f"{path}: no {MANIFEST_NAME} (not a finished `bumblefast prep` output?)")
    return p.read_text(encoding="utf-8")


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(v) for f in dataclasses.fields(value) if (v := getattr(value, f.name)) is not None
                or f.default is not None}  # fmt: skip
    return value


def _build(cls: type, data: Any, where: str, prefix: str) -> Any:
    """A dataclass from a JSON object, checking each field's presence and type."""
    if not isinstance(data, dict):
        raise ManifestError(f"{where}: key '{prefix.rstrip('.')}': expected an object, got {type(data).__name__}")
    hints = get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name == "extra":
            continue
        key = prefix + f.name
        optional = f.default is not dataclasses.MISSING
        if f.name not in data:
            if optional:
                continue
            raise ManifestError(f"{where}: key '{key}' is missing")
        kwargs[f.name] = _check(data[f.name], hints[f.name], where, key)
    return cls(**kwargs)


def _check(value: Any, tp: Any, where: str, key: str) -> Any:
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None and len(args) < len(get_args(tp)):
            return None
        (tp,) = args
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where, key + ".")
    base = get_origin(tp) or tp
    allowed = (int, float) if base is float else (base,)
    if not isinstance(value, allowed) or (isinstance(value, bool) and base is not bool):
        raise ManifestError(f"{where}: key '{key}': expected {base.__name__}, got {type(value).__name__} {value!r}")
    return value


# ---- staged outputs ----------------------------------------------------------------------------
@contextmanager
def staged_output(final: str | Path, *, upload: Sequence[str] = (), into: bool = False) -> Iterator[Path]:
    """Write an output folder whole or not at all; yields the local folder to write into.

    Local `final`: the block writes into the hidden sibling `.NAME.tmp-PID`; on a clean exit its
    files are fsynced and it is renamed into place. An older output is first renamed aside
    (`.NAME.old-PID`) and deleted only after the new one is in place, so at every moment the
    final path or the old copy holds a complete output. With `into=True` the output folder
    already exists and holds other things (prep merge: the node parts): the block writes into
    `final/.tmp-PID` and each file is renamed into `final`, the manifest last.

    Remote `final` (a URL): the block writes into a local temporary folder and uploads its bulk
    data itself (e.g. MDSWriter(out=(local, remote))); on a clean exit the files named in
    `upload` go up, then the manifest last (its presence marks a finished output).

    On an exception the staging folder is deleted and `final` is left as it was. Staging
    folders of killed runs (their process is gone) are removed, and an old copy a killed run
    left renamed aside is put back if nothing replaced it.
    """
    remote = is_remote(str(final))
    if remote:
        staging = Path(tempfile.mkdtemp(prefix="bumblefast-stage-"))
    else:
        final = Path(final).resolve()
        if into:
            if not final.is_dir():
                raise FileNotFoundError(f"{final}: not a folder")
            _recover_stale(final, "")
            staging = final / f".tmp-{os.getpid()}"
        else:
            final.parent.mkdir(parents=True, exist_ok=True)
            _recover_stale(final.parent, final.name)
            staging = final.parent / f".{final.name}.tmp-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
    try:
        yield staging
        if remote:
            upload_files(staging, str(final), [*upload, MANIFEST_NAME])
        else:
            fsync_tree(staging)
            if into:
                _move_files_into(staging, final)
            else:
                replace_dir(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already after a local rename


def upload_files(local: Path, remote: str, names: Iterable[str]) -> None:
    """Upload `local/NAME` to `remote/NAME` for each name that exists, in order."""
    from streaming.base.storage import CloudUploader

    up = CloudUploader.get(out=(str(local), remote), keep_local=True, exist_ok=True)
    for name in names:
        if (local / name).is_file():
            up.upload_file(name)


def replace_dir(staging: Path, final: Path) -> None:
    """Move a finished folder to `final`: an older output is renamed aside, the new one renamed
    in, then the old one deleted; `final` or the old copy exists at every moment."""
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        try:
            os.replace(staging, final)
        except BaseException:
            os.replace(old, final)  # put the old output back
            raise
        _fsync_dir(final.parent)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, final)
        _fsync_dir(final.parent)


def fsync_tree(folder: Path) -> None:
    """Flush every file and folder under `folder` to disk, so a rename after it cannot publish
    files whose data a crash would lose."""
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            path = os.path.join(dirpath, name)
            fd = os.open(path, os.O_RDONLY)
            try:
                _fsync_fd(fd, path)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


# fsync of a folder is refused by some filesystems (network, FUSE): nothing to flush there
_DIR_SYNC_UNSUPPORTED = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP}


def _fsync_fd(fd: int, path: str | Path) -> None:
    """os.fsync, failing with the path and the cause: data not on disk must not be published."""
    try:
        os.fsync(fd)
    except OSError as e:
        raise OSError(
            e.errno, f"fsync of {path} failed ({e.strerror}): not published, it might not survive a crash"
        ) from e


def _fsync_dir(folder: Path) -> None:
    """Make the renames in `folder` durable. A filesystem that cannot sync folders (EINVAL,
    ENOTSUP) gets a warning naming the folder; any other error (EIO, ENOSPC) fails, naming it.
    Windows cannot open folders: nothing to do there."""
    if os.name == "nt":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in _DIR_SYNC_UNSUPPORTED:
            raise OSError(
                e.errno, f"fsync of folder {folder} failed ({e.strerror}): its renames might not survive a crash"
            ) from e
        warnings.warn(
            f"fsync of folder {folder} not supported by its filesystem ({e.strerror}): "
            "a crash right after this write could lose the rename",
            stacklevel=2,
        )
    finally:
        os.close(fd)


def _move_files_into(staging: Path, final: Path) -> None:
    names = sorted(p.name for p in staging.iterdir())
    names.sort(key=lambda n: n == MANIFEST_NAME)  # the manifest last: it marks a finished output
    for name in names:
        os.replace(staging / name, final / name)
    _fsync_dir(final)


def _recover_stale(folder: Path, name: str) -> None:
    """Clean up after killed runs writing `folder/name` (or, name empty, into `folder`): delete
    their staging folders, and put back an old output they had renamed aside (`.NAME.old-PID`)
    when no new one replaced it."""
    prefix = f".{name}." if name else "."
    for p in folder.glob(glob.escape(prefix) + "*-*"):
        kind, _, pid = p.name[len(prefix) :].rpartition("-")
        if kind not in ("tmp", "old") or not _dead(pid):
            continue
        if kind == "old" and name and not (folder / name).exists():
            os.replace(p, folder / name)
        else:
            shutil.rmtree(p, ignore_errors=True)


def _dead(pid: str) -> bool:
    """True when no process `pid` runs here (a live or foreign one is not ours to judge)."""
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (ValueError, PermissionError):
        return False
    return False
