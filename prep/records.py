"""Record validation: raw dicts -> text (pretrain), messages (sft) or preference pairs (dpo).

Every problem raises `RecordError(reason, message)`; `reason` is a short stable key that the
manifest counts (`skipped_by_reason`) and `errors.jsonl` records.

Accepted shapes:
- pretrain: `{"text": str}` (key set by --text_key).
- sft, Alpaca: `instruction`, `input`, `output` (str), optional `system` (str) and `history`
  ([[user, assistant], ...]).
- sft, ShareGPT: `conversations: [{"from": role, "value": str}]`, roles human/user, gpt/assistant,
  system, function_call (an assistant turn: trained), observation (rendered as role `tool`);
  optional `tools` (JSON string or list). OpenAI-style `messages: [{"role", "content"}]` too.
- dpo, ShareGPT: `conversations` (the prompt) + `chosen` / `rejected` ({from, value} or str).
- dpo, Alpaca: `instruction` (+ `input`, `system`, `history`) + `chosen` / `rejected` strings.
- TRL: sft `prompt` + `completion` (strings: one user turn and the reply; or message lists);
  dpo `prompt` (string or messages) + `chosen` / `rejected`, or `chosen` / `rejected` whole
  conversations that repeat the prompt (UltraFeedback-binarized: the common prefix is the prompt).
- `.txt` lines (sources.TextLine) are pretrain documents; LLaMA-Factory dataset_info mappings
  are applied before these checks (prep/dataset_info.py).
"""

from __future__ import annotations

import json
from typing import Any

from bumblefast.prep.sources import TextLine

ROLE_MAP = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "function_call": "assistant",
    "observation": "tool",
    "tool": "tool",
    "system": "system",
}
TRAINED_ROLES = ("assistant",)


class RecordError(ValueError):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


def _object(rec: Any) -> dict:
    if isinstance(rec, TextLine):
        raise RecordError("not_an_object", "a .txt line is plain text (pretrain only); sft/dpo read JSON records")
    if not isinstance(rec, dict):
        raise RecordError("not_an_object", f"record is {type(rec).__name__}, expected a JSON object")
    return rec


def _require(rec: Any, key: str, typ: type | tuple, what: str = "") -> Any:
    _object(rec)
    if key not in rec or rec[key] is None:
        raise RecordError("missing_field", f"missing field '{key}'{what}")
    val = rec[key]
    if not isinstance(val, typ):
        names = typ.__name__ if isinstance(typ, type) else "/".join(t.__name__ for t in typ)
        raise RecordError("wrong_type", f"field '{key}' must be {names}, got {type(val).__name__}")
    return val


def _nonempty(text: str, where: str) -> str:
    if not text or text.isspace():  # (no copy of a long document, unlike strip())
        raise RecordError("empty_text", f"{where} is empty")
    return text


def pretrain_text(rec: Any, text_key: str = "text") -> str:
    if isinstance(rec, TextLine):
        return _nonempty(rec, "line")
    return _nonempty(_require(rec, text_key, str), f"field '{text_key}'")


def _tools(rec: dict) -> list | None:
    tools = rec.get("tools")
    if tools is None or tools == "" or tools == []:
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise RecordError("wrong_type", f"field 'tools' is not valid JSON: {e.msg}") from e
    if isinstance(tools, dict):
        tools = [tools]
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise RecordError("wrong_type", "field 'tools' must be a list of JSON objects")
    return tools


def _turn(msg: Any, i: int, key: str) -> dict[str, str]:
    if not isinstance(msg, dict):
        raise RecordError("wrong_type", f"{key}[{i}] must be an object, got {type(msg).__name__}")
    role_key, text_key = ("from", "value") if "from" in msg else ("role", "content")
    role = msg.get(role_key)
    text = msg.get(text_key)
    if role is None:
        raise RecordError("missing_field", f"{key}[{i}] has no '{role_key}'")
    if text is None:
        raise RecordError("missing_field", f"{key}[{i}] has no '{text_key}'")
    if not isinstance(role, str) or not isinstance(text, str):
        raise RecordError("wrong_type", f"{key}[{i}]: '{role_key}' and '{text_key}' must be strings")
    if role not in ROLE_MAP:
        raise RecordError("unknown_role", f"{key}[{i}] has unknown role '{role}' (known: {', '.join(ROLE_MAP)})")
    mapped = ROLE_MAP[role]
    if mapped != "system":
        _nonempty(text, f"{key}[{i}] ({role})")
    return {"role": mapped, "content": text}


def _alpaca_prompt(rec: dict) -> list[dict[str, str]]:
    msgs: list[dict[str, str]] = []
    system = rec.get("system")
    if system is not None:
        if not isinstance(system, str):
            raise RecordError("wrong_type", f"field 'system' must be str, got {type(system).__name__}")
        if system.strip():
            msgs.append({"role": "system", "content": system})
    history = rec.get("history") or []
    if not isinstance(history, list):
        raise RecordError("wrong_type", "field 'history' must be a list of [user, assistant] pairs")
    for i, pair in enumerate(history):
        if not (isinstance(pair, list | tuple) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise RecordError("wrong_type", f"history[{i}] must be [user, assistant] strings")
        msgs.append({"role": "user", "content": _nonempty(pair[0], f"history[{i}][0]")})
        msgs.append({"role": "assistant", "content": _nonempty(pair[1], f"history[{i}][1]")})
    instruction = _require(rec, "instruction", str)
    inp = rec.get("input") or ""
    if not isinstance(inp, str):
        raise RecordError("wrong_type", f"field 'input' must be str, got {type(inp).__name__}")
    prompt = instruction + ("\n" + inp if inp.strip() else "")
    msgs.append({"role": "user", "content": _nonempty(prompt, "instruction + input")})
    return msgs


def _turns(conv: Any, key: str) -> list[dict[str, str]]:
    """A list of {from, value} / {role, content} messages; a system turn only first."""
    if not isinstance(conv, list):
        raise RecordError("wrong_type", f"field '{key}' must be a list of messages, got {type(conv).__name__}")
    if not conv:
        raise RecordError("empty_text", f"field '{key}' is empty")
    msgs = [_turn(m, i, key) for i, m in enumerate(conv)]
    for i, m in enumerate(msgs[1:], 1):
        if m["role"] == "system":
            raise RecordError("unknown_role", f"{key}[{i}]: a system turn is only allowed first")
    return msgs


def _with_system(rec: dict, msgs: list[dict[str, str]]) -> list[dict[str, str]]:
    """ShareGPT's optional top-level `system` field, as a first system turn."""
    system = rec.get("system")
    if system is None or (msgs and msgs[0]["role"] == "system"):
        return msgs
    if not isinstance(system, str):
        raise RecordError("wrong_type", f"field 'system' must be str, got {type(system).__name__}")
    return ([{"role": "system", "content": system}] if system.strip() else []) + msgs


def _sharegpt_turns(rec: dict) -> list[dict[str, str]]:
    key = "conversations" if "conversations" in rec else "messages"
    return _with_system(rec, _turns(_require(rec, key, list), key))


def _prompt_turns(rec: dict) -> list[dict[str, str]]:
    """TRL's `prompt`: a string (one user turn) or a list of messages."""
    prompt = _require(rec, "prompt", (str, list))
    if isinstance(prompt, str):
        return [{"role": "user", "content": _nonempty(prompt, "field 'prompt'")}]
    return _turns(prompt, "prompt")


FORMATS_HELP = (
    "expected Alpaca ('instruction', 'output'), ShareGPT ('conversations'), OpenAI ('messages') "
    "or TRL ('prompt', 'completion')"
)


def sft_messages(rec: Any) -> tuple[list[dict[str, str]], list | None]:
    """(messages, tools) of an Alpaca, ShareGPT/OpenAI-messages or TRL prompt/completion
    record (TRL's standard form: a string prompt is one user turn, rendered with the chat
    template like an Alpaca instruction); at least one assistant turn."""
    rec = _object(rec)
    tools = None
    if "conversations" in rec or "messages" in rec:
        msgs = _sharegpt_turns(rec)
        tools = _tools(rec)
    elif "instruction" in rec:
        msgs = _alpaca_prompt(rec)
        output = _require(rec, "output", str)
        msgs.append({"role": "assistant", "content": _nonempty(output, "field 'output'")})
    elif "prompt" in rec or "completion" in rec:
        msgs = _prompt_turns(rec)
        completion = _require(rec, "completion", (str, list))
        if isinstance(completion, str):
            msgs.append({"role": "assistant", "content": _nonempty(completion, "field 'completion'")})
        else:
            msgs += _turns(completion, "completion")
        tools = _tools(rec)
    else:
        raise RecordError("missing_field", FORMATS_HELP)
    if not any(m["role"] in TRAINED_ROLES for m in msgs):
        raise RecordError("no_assistant_turn", "record has no assistant turn to train on")
    return msgs, tools


def _reply(val: Any, key: str) -> dict[str, str]:
    if isinstance(val, str):
        return {"role": "assistant", "content": _nonempty(val, f"field '{key}'")}
    if isinstance(val, dict):
        msg = _turn(val, 0, key)
        if msg["role"] != "assistant":
            raise RecordError("unknown_role", f"field '{key}' must be an assistant (gpt) reply, got '{msg['role']}'")
        return msg
    if isinstance(val, list) and len(val) == 1:
        return _reply(val[0], key)
    if isinstance(val, list):
        raise RecordError(
            "wrong_type", f"field '{key}' has {len(val)} turns after the prompt; one assistant reply expected"
        )
    raise RecordError("wrong_type", f"field '{key}' must be a string or a {{from, value}} object")


def _split_conversations(rec: dict) -> tuple[list[dict[str, str]], dict, dict] | None:
    """TRL's implicit-prompt conversational pairs (UltraFeedback-binarized): `chosen` and
    `rejected` are whole conversations that repeat the prompt. Their longest common prefix
    of messages is the prompt; what follows is the reply. None when they share nothing (the
    prompt is then in `prompt`/`conversations`)."""
    chosen, rejected = rec["chosen"], rec["rejected"]
    if not (isinstance(chosen, list) and isinstance(rejected, list) and len(chosen) > 1 and len(rejected) > 1):
        return None
    c, r = _turns(chosen, "chosen"), _turns(rejected, "rejected")
    k = 0
    while k < min(len(c), len(r)) and c[k] == r[k]:
        k += 1
    if k == 0:
        return None
    if k == len(c) or k == len(r):
        raise RecordError("wrong_type", "'chosen' and 'rejected' have no differing reply after their shared prompt")
    return c[:k], _reply(c[k:], "chosen"), _reply(r[k:], "rejected")


def dpo_pair(rec: Any) -> tuple[list[dict[str, str]], dict, dict, list | None]:
    """(prompt messages, chosen reply, rejected reply, tools) of a ShareGPT/OpenAI-messages,
    Alpaca or TRL (standard, explicit- or implicit-prompt conversational) preference record."""
    rec = _object(rec)
    for key in ("chosen", "rejected"):
        if rec.get(key) is None:
            raise RecordError("missing_field", f"missing field '{key}'")
    split = _split_conversations(rec)
    tools = _tools(rec)
    if split is not None:
        prompt, chosen, rejected = split
    else:
        if "conversations" in rec or "messages" in rec:
            prompt = _sharegpt_turns(rec)
        elif "instruction" in rec:
            prompt = _alpaca_prompt(rec)
        elif "prompt" in rec:
            prompt = _prompt_turns(rec)
        else:
            raise RecordError(
                "missing_field",
                "expected a prompt ('conversations', 'messages', 'instruction' or 'prompt') with "
                "'chosen'/'rejected', or 'chosen'/'rejected' conversations that repeat the prompt",
            )
        chosen, rejected = _reply(rec["chosen"], "chosen"), _reply(rec["rejected"], "rejected")
    if prompt[-1]["role"] == "assistant":
        raise RecordError("wrong_type", "the prompt must end with a user/tool turn, not an assistant turn")
    return prompt, chosen, rejected, tools
