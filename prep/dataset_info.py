"""LLaMA-Factory's `dataset_info.json`: named data sets with their column mapping.

`bumblefast prep --dataset_info data/dataset_info.json --dataset alpaca_en_demo,dpo_en_demo`
reads the entries the way LLaMA-Factory does, so a LLaMA-Factory user's data needs no
conversion. An entry:

    "dpo_en_demo": {"file_name": "dpo_en_demo.json", "formatting": "sharegpt", "ranking": true,
                    "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"},
                    "tags": {"role_tag": "from", "content_tag": "value", "user_tag": "human", ...}}

- `file_name`: a file or folder next to dataset_info.json (remote `hf_hub_url`/`ms_hub_url`/
  `script_url`/`cloud_file_name` entries are not fetched: download the files first).
- `formatting`: alpaca (default) or sharegpt; `ranking: true` marks a preference set (dpo).
- `columns`: the record's key for each role (defaults below); pretrain reads `prompt` (the
  text column, default `text`).
- `tags` (sharegpt): the message keys and role names (defaults below).

Each record is mapped to the canonical shape that prep/records.py validates (Alpaca keys,
or `messages` with role/content), so every check and error message downstream is shared;
a missing mapped column is reported with both names (`'question' (columns.prompt)`).
Problems in the file itself (unknown dataset, key, formatting or tag) stop prep up front,
naming the dataset and the key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bumblefast.config import UserError
from bumblefast.prep.records import RecordError
from bumblefast.prep.sources import TextLine, expand_inputs

ALPACA_COLUMNS = {
    "prompt": "instruction",
    "query": "input",
    "response": "output",
    "history": None,
    "system": None,
    "tools": None,
    "chosen": "chosen",
    "rejected": "rejected",
}
SHAREGPT_COLUMNS = {
    "messages": "conversations",
    "system": None,
    "tools": None,
    "chosen": "chosen",
    "rejected": "rejected",
}
TAGS = {
    "role_tag": "from",
    "content_tag": "value",
    "user_tag": "human",
    "assistant_tag": "gpt",
    "observation_tag": "observation",
    "function_tag": "function_call",
    "system_tag": "system",
}
TAG_ROLES = {
    "user_tag": "user",
    "assistant_tag": "assistant",
    "observation_tag": "tool",
    "function_tag": "assistant",
    "system_tag": "system",
}  # function calls are trained replies
ENTRY_KEYS = {
    "file_name",
    "formatting",
    "ranking",
    "columns",
    "tags",
    "file_sha1",
    "subset",
    "split",
    "folder",
}
REMOTE_KEYS = ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")
UNSUPPORTED_COLUMNS = ("images", "videos", "audios", "kto_tag")


@dataclass
class DatasetSpec:
    """One dataset_info.json entry, checked: how to read each record of its files."""

    name: str
    files: list[str]
    formatting: str
    ranking: bool
    columns: dict[str, str | None]
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def text_column(self) -> str:
        return self.columns.get("prompt") or "text"


def load_dataset_info(path: str, names: list[str], stage: str) -> list[DatasetSpec]:
    """The entries `names` of `path`, checked against `stage`; every problem in one error."""
    p = Path(path)
    if p.is_dir():
        p = p / "dataset_info.json"
    if not p.is_file():
        raise UserError(f"dataset_info: {p} not found")
    try:
        info = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"dataset_info: {p}:{e.lineno}: not valid JSON: {e.msg}") from e
    if not isinstance(info, dict):
        raise UserError(f"dataset_info: {p} must be a JSON object of dataset name -> entry")
    if not names:
        raise UserError(f"dataset: name at least one entry of {p} (has: {', '.join(info)})")
    errors: list[str] = []
    specs = []
    for name in names:
        if name not in info:
            errors.append(f"dataset: '{name}' is not in {p} (has: {', '.join(info)})")
            continue
        try:
            specs.append(_spec(name, info[name], p.parent, stage))
        except UserError as e:
            errors.append(str(e))
    if errors:
        raise UserError(f"{p}:\n  " + "\n  ".join(errors))
    return specs


def _spec(name: str, entry: Any, root: Path, stage: str) -> DatasetSpec:
    where = f"dataset '{name}'"
    if not isinstance(entry, dict):
        raise UserError(f"{where}: the entry must be a JSON object")
    if "file_name" not in entry:
        remote = [k for k in REMOTE_KEYS if k in entry]
        if remote:
            raise UserError(f"{where}: '{remote[0]}' is not fetched by prep; download the data and set 'file_name'")
        raise UserError(f"{where}: missing key 'file_name'")
    unknown = sorted(set(entry) - ENTRY_KEYS - set(REMOTE_KEYS))
    if unknown:
        raise UserError(f"{where}: unknown key '{unknown[0]}' (known: {', '.join(sorted(ENTRY_KEYS))})")
    formatting = entry.get("formatting", "alpaca")
    if formatting not in ("alpaca", "sharegpt"):
        raise UserError(f"{where}: 'formatting' must be alpaca or sharegpt, got {formatting!r}")
    ranking = entry.get("ranking", False)
    if not isinstance(ranking, bool):
        raise UserError(f"{where}: 'ranking' must be true or false, got {ranking!r}")
    if stage == "dpo" and not ranking:
        raise UserError(f'{where}: --stage dpo needs a preference set ("ranking": true with chosen/rejected)')
    if stage != "dpo" and ranking:
        raise UserError(f"{where}: 'ranking' is true (a preference set); use it with --stage dpo")
    if stage == "pretrain" and formatting != "alpaca":
        raise UserError(f"{where}: pretrain reads plain text (formatting alpaca, columns.prompt = the text column)")
    defaults = dict(ALPACA_COLUMNS if formatting == "alpaca" else SHAREGPT_COLUMNS)
    if stage == "pretrain":
        defaults = {"prompt": "text"}
    columns = dict(defaults, **_mapping(entry, "columns", defaults, where))
    tags = dict(TAGS, **_mapping(entry, "tags", TAGS, where)) if formatting == "sharegpt" else {}
    file_name = entry["file_name"]
    if not isinstance(file_name, str) or not file_name:
        raise UserError(f"{where}: 'file_name' must be a file or folder name")
    target = root / file_name
    if not target.exists():
        raise UserError(f"{where}: file_name '{file_name}' not found in {root}")
    try:
        files = expand_inputs([str(target)])
    except UserError as e:
        raise UserError(f"{where}: file_name '{file_name}': {e}") from e
    return DatasetSpec(name, files, formatting, ranking, columns, tags)


def _mapping(entry: dict, key: str, valid: dict, where: str) -> dict[str, str]:
    value = entry.get(key) or {}
    if not isinstance(value, dict):
        raise UserError(f"{where}: '{key}' must be a JSON object")
    for k, v in value.items():
        if k in UNSUPPORTED_COLUMNS:
            raise UserError(f"{where}: {key}.{k}: multimodal/KTO columns are not supported (text-only trainer)")
        if k not in valid:
            raise UserError(f"{where}: unknown key {key}.{k} (valid here: {', '.join(valid)})")
        if not isinstance(v, str) or not v:
            raise UserError(f"{where}: {key}.{k} must be a non-empty string, got {v!r}")
    return value


# ---- per record (in the tokenizer workers) -------------------------------------------------------
def _get(rec: dict, spec: DatasetSpec, role: str, typ: type | tuple, required: bool) -> Any:
    col = spec.columns.get(role)
    val = rec.get(col) if col else None
    if val is None:
        if required:
            raise RecordError("missing_field", f"missing field '{col}' (columns.{role} of dataset '{spec.name}')")
        return None
    if not isinstance(val, typ):
        names = typ.__name__ if isinstance(typ, type) else "/".join(t.__name__ for t in typ)
        raise RecordError(
            "wrong_type",
            f"field '{col}' (columns.{role}) must be {names}, got {type(val).__name__}",
        )
    return val


def _message(msg: Any, spec: DatasetSpec, key: str, i: int) -> dict[str, str]:
    tags = spec.tags
    if not isinstance(msg, dict):
        raise RecordError("wrong_type", f"{key}[{i}] must be an object, got {type(msg).__name__}")
    role, content = msg.get(tags["role_tag"]), msg.get(tags["content_tag"])
    if role is None:
        raise RecordError("missing_field", f"{key}[{i}] has no '{tags['role_tag']}' (tags.role_tag)")
    if content is None:
        raise RecordError("missing_field", f"{key}[{i}] has no '{tags['content_tag']}' (tags.content_tag)")
    for tag, canonical in TAG_ROLES.items():
        if role == tags[tag]:
            return {"role": canonical, "content": content}
    known = ", ".join(f"{t}={tags[t]!r}" for t in TAG_ROLES)
    raise RecordError("unknown_role", f"{key}[{i}] has role {role!r}, not one of the dataset's tags ({known})")


def canonical_record(rec: Any, spec: DatasetSpec, stage: str) -> Any:
    """`rec` of dataset `spec` in the shape records.py reads (Alpaca keys, or `messages` of
    role/content), so validation and its errors are the same for every source."""
    if isinstance(rec, TextLine) or not isinstance(rec, dict):
        return rec  # records.py names the problem (or reads the .txt line)
    if stage == "pretrain":  # the text as a document line, whatever its column is called
        text = _get(rec, spec, "prompt", str, True)
        if not text or text.isspace():
            raise RecordError("empty_text", f"field '{spec.text_column}' is empty")
        return TextLine(text)
    out: dict[str, Any] = {}
    tools = _get(rec, spec, "tools", (str, list, dict), False)
    if tools is not None:
        out["tools"] = tools
    if spec.formatting == "alpaca":
        out["instruction"] = _get(rec, spec, "prompt", str, True)
        for role, key, typ in (
            ("query", "input", str),
            ("system", "system", str),
            ("history", "history", list),
        ):
            val = _get(rec, spec, role, typ, False)
            if val is not None:
                out[key] = val
        if spec.ranking:
            out["chosen"] = _get(rec, spec, "chosen", (str, dict, list), True)
            out["rejected"] = _get(rec, spec, "rejected", (str, dict, list), True)
        else:
            out["output"] = _get(rec, spec, "response", str, True)
        return out
    col = spec.columns["messages"]
    conv = _get(rec, spec, "messages", list, True)
    out["messages"] = [_message(m, spec, col, i) for i, m in enumerate(conv)]
    system = _get(rec, spec, "system", str, False)
    if system is not None:
        out["system"] = system
    if spec.ranking:
        for role in ("chosen", "rejected"):
            val = _get(rec, spec, role, (str, dict, list), True)
            if isinstance(val, dict):
                val = _message(val, spec, spec.columns[role], 0)
            elif isinstance(val, list):
                val = [_message(m, spec, spec.columns[role], i) for i, m in enumerate(val)]
            out[role] = val
    return out
