"""Held-out evaluation of a Hugging Face model folder (ours or any Qwen2-compatible one).

- `heldout_loss`: mean next-token loss and perplexity over the target tokens of shards
  (pretrain: every token; sft: assistant tokens), computed with the same packed objective
  the trainer uses.
- `answer_accuracy`: greedy answers to Alpaca-style questions vs their reference `output`,
  through the chat template: correct when equal after stripping or, for a numeric reference,
  when the answer states that number and no other ("The answer is 7." answers "7", as
  GSM8K-style scoring reads the number out of a sentence; "3 + 4 = 7" or a list of numbers
  does not); `exact_match` is also reported, and `answer_nll`: the mean per-token NLL of the
  reference replies' tokens (without the closing `<|im_end|>`, which a pretrained model has
  never seen), a measure that moves smoothly where the accuracy flips question by question.
- `completion_accuracy`: plain-text prompts (no chat template) completed greedily by the next
  tokens, and the mean NLL of the expected tokens: what pretraining itself learnt, in its own
  format (the demo asks it the sums "a + b = ").
- `preference_accuracy`: fraction of preference pairs whose chosen reply gets a higher
  summed log-prob than the rejected one under the model, the mean margin and each pair's.
- `reward_margins`: DPO's implicit reward margin beta * (policy margin - reference margin)
  of each pair, from two `preference_accuracy` results on the same pairs.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from bumblefast.config import UserError


def load_records(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"evaluation data not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from e
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON array of records")
    return data


def _load(model_path: str | Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_path = Path(model_path)
    if not (model_path / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {model_path}")
    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    return tok, model


def _prompt_messages(rec: dict) -> list[dict]:
    msgs = []
    if rec.get("system"):
        msgs.append({"role": "system", "content": rec["system"]})
    for q, a in rec.get("history") or []:
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    question = rec["instruction"] + (("\n" + rec["input"]) if rec.get("input") else "")
    return msgs + [{"role": "user", "content": question}]


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def is_correct(answer: str, expected: str) -> bool:
    answer, expected = answer.strip(), expected.strip()
    if answer == expected:
        return True
    if _NUMBER.fullmatch(expected):
        found = _NUMBER.findall(answer)
        return len(found) == 1 and float(found[0]) == float(expected)
    return False


def _stop_ids(tok) -> list[int]:
    from bumblefast.train.export import stop_tokens  # the template's end of turn (Llama 3: <|eot_id|>) + eos

    return [tok.convert_tokens_to_ids(t) for t in stop_tokens(tok)]


@torch.no_grad()
def answer_accuracy(model_path: str | Path, records: list[dict], max_new_tokens: int = 32) -> dict:
    tok, model = _load(model_path)
    correct, exact, examples = 0, 0, []
    nll, n_tokens = 0.0, 0
    for rec in records:
        msgs = _prompt_messages(rec)
        logp, count = _reply_logp(model, tok, msgs, rec["output"], with_count=True, end="")
        nll, n_tokens = nll - logp, n_tokens + count
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        ids = tok(text, return_tensors="pt", add_special_tokens=False)
        out = model.generate(
            **ids,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=_stop_ids(tok),
            pad_token_id=tok.pad_token_id,
        )
        answer = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        correct += is_correct(answer, rec["output"])
        exact += answer == rec["output"].strip()
        if len(examples) < 3:
            examples.append({"question": rec["instruction"], "answer": answer, "expected": rec["output"]})
    n = max(len(records), 1)
    return {
        "accuracy": correct / n,
        "exact_match": exact / n,
        "answer_nll": nll / max(n_tokens, 1),
        "n": len(records),
        "examples": examples,
    }


@torch.no_grad()
def completion_accuracy(model_path: str | Path, items: list[tuple[str, str]]) -> dict:
    """(prompt, expected) pairs: right when the greedy next tokens are the expected ones, and
    the mean per-token NLL of the expected tokens after the prompt."""
    tok, model = _load(model_path)
    right, nll, n_tokens = 0, 0.0, 0
    for prompt, expected in items:
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        full = tok(prompt + expected, add_special_tokens=False)["input_ids"]
        if full[: len(p_ids)] != p_ids:  # the boundary merged: the expected text on its own
            full = p_ids + tok(expected, add_special_tokens=False)["input_ids"]
        e_ids = full[len(p_ids) :]
        logits = model(torch.tensor([p_ids + e_ids]), use_cache=False).logits[0, len(p_ids) - 1 : -1].float()
        logp = torch.log_softmax(logits, -1).gather(1, torch.tensor(e_ids)[:, None])
        right += bool((logits.argmax(-1) == torch.tensor(e_ids)).all())
        nll, n_tokens = nll - float(logp.sum()), n_tokens + len(e_ids)
    return {"accuracy": right / max(len(items), 1), "nll": nll / max(n_tokens, 1), "n": len(items)}


def _reply_logp(model, tok, prompt_msgs: list[dict], reply: str, with_count: bool = False, end: str = "<|im_end|>"):
    """Summed log-prob of `reply` + `end` after the prompt (and its token count)."""
    prompt = tok.apply_chat_template(prompt_msgs, tokenize=False, add_generation_prompt=True)
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    r_ids = tok(reply + end, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p_ids + r_ids])
    logits = model(ids, use_cache=False).logits[0, len(p_ids) - 1 : -1].float()
    logp = float(torch.log_softmax(logits, -1).gather(1, torch.tensor(r_ids)[:, None]).sum())
    return (logp, len(r_ids)) if with_count else logp


def _pair(rec: dict) -> tuple[list[dict], str, str]:
    """(prompt messages, chosen text, rejected text) of a ShareGPT or Alpaca-style pair."""

    def text(x):
        return x["value"] if isinstance(x, dict) else x

    if "conversations" in rec:
        role = {"human": "user", "gpt": "assistant", "system": "system"}
        msgs = [{"role": role.get(t["from"], t["from"]), "content": t["value"]} for t in rec["conversations"]]
    else:
        msgs = _prompt_messages({**rec, "input": rec.get("input", "")})
    return msgs, text(rec["chosen"]), text(rec["rejected"])


@torch.no_grad()
def preference_accuracy(model_path: str | Path, records: list[dict]) -> dict:
    tok, model = _load(model_path)
    wins, margins = 0, []
    for rec in records:
        msgs, chosen, rejected = _pair(rec)
        margin = _reply_logp(model, tok, msgs, chosen) - _reply_logp(model, tok, msgs, rejected)
        wins += margin > 0
        margins.append(margin)
    n = max(len(records), 1)
    return {"preference_accuracy": wins / n, "mean_margin": sum(margins) / n, "n": len(records), "margins": margins}


def reward_margins(policy: dict, reference: dict, beta: float) -> dict:
    """DPO's implicit rewards on held-out pairs: each pair's beta * (policy margin - reference
    margin), from `preference_accuracy` of the trained and the reference model on the same
    pairs; `reward_accuracy` is the fraction above 0 (what DPO's rewards/accuracies counts)."""
    if len(policy["margins"]) != len(reference["margins"]):
        raise ValueError("policy and reference were scored on different pairs")
    rewards = [beta * (p - r) for p, r in zip(policy["margins"], reference["margins"])]
    n = max(len(rewards), 1)
    return {"reward_margin": sum(rewards) / n, "reward_accuracy": sum(r > 0 for r in rewards) / n}


@torch.no_grad()
def heldout_loss(model_path: str | Path, shards: str | Path, batch_size: int = 8) -> dict:
    from bumblefast.model import Bumblebee
    from bumblefast.shards.reader import build_loader

    model = Bumblebee.from_pretrained(model_path, torch_dtype=torch.float32).eval()
    total, count = 0.0, 0
    for batch in build_loader(str(shards), batch_size=batch_size, shuffle=False):
        loss, n = model.lm_loss(batch)
        total += float(loss)
        count += int(n)
    mean = total / max(count, 1)
    return {"loss": mean, "perplexity": math.exp(min(mean, 50)), "target_tokens": count}


@torch.no_grad()
def pair_margins(model, batch) -> torch.Tensor:
    """logp(chosen) - logp(rejected) per pair of a packed dpo batch (chosen = even segments)."""
    from bumblefast.train.objectives import segment_stats

    logps = segment_stats(model, batch)[0]
    return logps[0::2] - logps[1::2]


@torch.no_grad()
def preference_from_shards(model_path: str | Path, shards: str | Path, batch_size: int = 8) -> dict:
    """Preference accuracy and mean margin over packed dpo shards (chosen = even segments)."""
    from bumblefast.model import Bumblebee
    from bumblefast.shards.reader import build_loader

    model = Bumblebee.from_pretrained(model_path, torch_dtype=torch.float32).eval()
    wins, margins = 0, []
    for b in build_loader(str(shards), batch_size=batch_size, shuffle=False):
        margin = pair_margins(model, b).tolist()
        wins += sum(m > 0 for m in margin)
        margins += margin
    n = max(len(margins), 1)
    return {"preference_accuracy": wins / n, "mean_margin": sum(margins) / n, "n": len(margins)}


def evaluate(model_path: str | Path, dataset_path: str | Path) -> dict:
    """Dispatch on the data: shards by their manifest's stage, raw files by their records."""
    from bumblefast.shards.manifest import MANIFEST_NAME, Manifest

    dataset_path = Path(dataset_path)
    if (dataset_path / MANIFEST_NAME).is_file():
        stage = Manifest.read(str(dataset_path)).stage
        result = (
            preference_from_shards(model_path, dataset_path)
            if stage == "dpo"
            else heldout_loss(model_path, dataset_path)
        )
        return {"model": str(model_path), "data": str(dataset_path), "stage": stage, **result}
    records = load_records(dataset_path)
    if not records:
        raise UserError(f"{dataset_path}: no records")
    first = records[0]
    if "chosen" in first and "rejected" in first:
        return {
            "model": str(model_path),
            "data": str(dataset_path),
            "stage": "dpo",
            **preference_accuracy(model_path, records),
        }
    if "instruction" in first and "output" in first:
        return {
            "model": str(model_path),
            "data": str(dataset_path),
            "stage": "sft",
            **answer_accuracy(model_path, records),
        }
    raise UserError(
        f"{dataset_path}: records need chosen/rejected (preferences) or instruction/output "
        "(questions); for loss and perplexity on text or chats, prep the file and pass the shards"
    )


def cli_main(args) -> int:
    result = evaluate(args.model_path, args.dataset_path)
    text = json.dumps(result, indent=2, ensure_ascii=False)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    return 0
