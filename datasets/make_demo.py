#!/usr/bin/env python3
"""Write BumbleFast's own demo data: a small addition task a tiny model learns on CPU.

Every fact "a + b = c" for single digits a, b (0..MAX_OPERAND) appears in the pretraining
text: short documents, mostly in the exact answer format "a + b = c", some as plain-text
question + answer (no chat format), some in other English and Chinese phrasings, a little
templated filler. Questions end with the sum to complete ("... 3 + 4 = ") and the reply is
the number ("7"). SFT teaches that chat format; DPO prefers the correct sum over a near miss
(off by 1 or 2).

Held out: questions, not facts. Of the 5 question templates x 25 pairs, a random 30% are
never asked in SFT or DPO (every pair keeps some of its phrasings there); `sft_test.json`
asks each held-out question once and `dpo_test.json` pairs them with near misses. So they
measure what each stage adds on questions it was never fine-tuned on, about facts the
model can know. (Holding out whole facts instead asks a 3M-parameter model to carry a fact
from pretraining text to chat on its own: it did for 30-40% of them, and the preference
accuracy on those stayed where pretraining left it; docs/LOG.md.)

Files have the exact input formats of ../shared/data (one JSON array each):
  pretrain.json / pretrain_test.json   {"text"}
  sft_alpaca.json / sft_test.json      {"instruction", "input", "output"} (+ "system", "history")
  sft_sharegpt.json                    {"conversations": [{"from": human|gpt, "value"}]}
  dpo.json / dpo_test.json             {"conversations", "chosen", "rejected"}

Deterministic: the same --seed gives byte-identical files. Stdlib only.
Usage: python datasets/make_demo.py [--out datasets/demo] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

MAX_OPERAND = 4
HELD_OUT_FRACTION = 0.3
FACT_SHARE = 0.5  # pretraining sentences in the exact fact format "a + b = c."
QA_SHARE = 0.2  # a plain-text question, then the fact ("What is a + b? a + b = c.")
# A plain-text exchange whose answer comes on the next line, a few tokens after "=" ("Q: a + b
# =\nA: c"): the carry of the sum past the end of a question that the chat template asks for.
# Without it SFT had to invent that step and stalled on a plateau on some seeds (docs/LOG.md).
DIALOGUE_SHARE = 0.1
PHRASED_SHARE = 0.1  # other phrasings of a fact; the rest is filler

FACT_TEMPLATES = [
    "{a} + {b} = {c}.",
    "{a} plus {b} equals {c}.",
    "The sum of {a} and {b} is {c}.",
    "Adding {b} to {a} gives {c}.",
    "{a} 加 {b} 等于 {c}。",
    "{a} 与 {b} 的和是 {c}。",
]
# Every question ends with the sum to complete, "a + b =", and the reply is the number alone:
# the answer is then read off where pretraining put it (after "="), a fixed few tokens back
# across the chat template, which a tiny model learns for all pairs at once instead of
# having to copy operands (what it failed to learn in minutes of CPU).
QUESTION_TEMPLATES = [
    ("Complete: {a} + {b} =", ""),
    ("What is the sum? {a} + {b} =", ""),
    ("Add the two numbers.", "{a} + {b} ="),
    ("计算：{a} + {b} =", ""),
    ("请填空：{a} + {b} =", ""),
]
# follow-up turns end "= " like every question (ending "=" they moved the answer slot one token)
FOLLOW_UPS = ["And {a} + {b} = ", "Now {a} + {b} = ", "那 {a} + {b} = "]
# plain-text questions in pretraining (no chat format), each followed by the fact
PRETRAIN_QUESTIONS = ["What is {a} + {b}?", "Compute {a} plus {b}."]
# plain-text exchanges in pretraining: none of QUESTION_TEMPLATES' phrasings, no chat tokens
DIALOGUES = ["Q: {a} + {b} =\nA: {c}", "User: {a} + {b} =\nBot: {c}", "问：{a} + {b} =\n答：{c}"]
SYSTEM_PROMPTS = ["You are a careful calculator.", "你是一个会做加法的助手。"]

COLORS = ["red", "blue", "green", "yellow", "white", "black"]
THINGS = ["apple", "bird", "car", "cup", "flower", "stone"]
ZH_THINGS = ["苹果", "小鸟", "汽车", "杯子", "花", "石头"]


def answer(a: int, b: int) -> str:
    """The reply to a question: the sum alone."""
    return str(a + b)


def fact(a: int, b: int) -> str:
    return f"{a} + {b} = {a + b}"


Prompt = tuple[int, int, int]  # (question template index, a, b)


def split_prompts(rng: random.Random) -> tuple[list[Prompt], list[Prompt]]:
    """(trained, held-out) questions; every pair keeps at least one trained phrasing."""
    pairs = [(a, b) for a in range(MAX_OPERAND + 1) for b in range(MAX_OPERAND + 1)]
    prompts = [(t, a, b) for t in range(len(QUESTION_TEMPLATES)) for a, b in pairs]
    rng.shuffle(prompts)
    n_test = int(len(prompts) * HELD_OUT_FRACTION)
    train, test = sorted(prompts[n_test:]), sorted(prompts[:n_test])
    assert {(a, b) for _, a, b in train} == set(pairs), "a pair lost all its trained phrasings"
    return train, test


def question(p: Prompt) -> tuple[str, str]:
    """(instruction, input) of a prompt. The question ends "= ": its last token is the space
    after "=", where pretraining text predicts the sum, so SFT only carries that prediction
    to the reply (ending at "=", SFT stalled on some seeds; docs/LOG.md)."""
    t, a, b = p
    instruction, inp = QUESTION_TEMPLATES[t]
    instruction, inp = instruction.format(a=a, b=b), inp.format(a=a, b=b)
    return (instruction, inp + " ") if inp else (instruction + " ", inp)


def prompt_text(p: Prompt) -> str:
    instruction, inp = question(p)
    return instruction + ("\n" + inp if inp else "")


def filler(rng: random.Random) -> str:
    """Plain templated sentences, so pretraining is not only arithmetic."""
    kind = rng.randrange(3)
    if kind == 0:
        start = rng.randrange(0, 20)
        return "Counting: " + ", ".join(str(start + i) for i in range(rng.randrange(4, 9))) + "."
    if kind == 1:
        i = rng.randrange(len(THINGS))
        return f"The {THINGS[i]} is {rng.choice(COLORS)}. 这是一个{ZH_THINGS[i]}。"
    n = rng.randrange(2, 10)
    return f"There are {n} {rng.choice(THINGS)}s on the table."


def pretrain_docs(rng: random.Random, pairs: list[tuple[int, int]], n_docs: int) -> list[dict]:
    """Short documents (2-4 lines), mostly facts in the exact answer format ("a + b = c"),
    some as a plain-text question and answer or exchange (no chat format), some in other phrasings, a
    little filler. The tiny model has a few hundred CPU steps to learn the table; short
    documents keep its attention on the operands of each fact."""
    docs = []
    for _ in range(n_docs):
        sentences = []
        for _ in range(rng.randrange(2, 5)):
            r = rng.random()
            a, b = rng.choice(pairs)
            if r < FACT_SHARE:
                sentences.append(f"{fact(a, b)}.")
            elif r < FACT_SHARE + QA_SHARE:
                q = rng.choice(PRETRAIN_QUESTIONS)
                sentences.append(f"{q.format(a=a, b=b)} {fact(a, b)}.")
            elif r < FACT_SHARE + QA_SHARE + DIALOGUE_SHARE:
                sentences.append(rng.choice(DIALOGUES).format(a=a, b=b, c=a + b))
            elif r < FACT_SHARE + QA_SHARE + DIALOGUE_SHARE + PHRASED_SHARE:
                sentences.append(rng.choice(FACT_TEMPLATES[1:]).format(a=a, b=b, c=a + b))
            else:
                sentences.append(filler(rng))
        docs.append({"text": "\n".join(sentences)})
    return docs


def alpaca_records(rng: random.Random, prompts: list[Prompt], n: int) -> list[dict]:
    out = []
    for _ in range(n):
        p = rng.choice(prompts)
        instruction, inp = question(p)
        rec = {"instruction": instruction, "input": inp, "output": answer(*p[1:])}
        r = rng.random()
        if r < 0.1:
            rec["system"] = rng.choice(SYSTEM_PROMPTS)
        elif r < 0.2:
            h = rng.choice(prompts)
            rec["history"] = [[prompt_text(h), answer(*h[1:])]]
        out.append(rec)
    return out


def sharegpt_records(rng: random.Random, prompts: list[Prompt], n: int) -> list[dict]:
    first = [p for p in prompts if not QUESTION_TEMPLATES[p[0]][1]]  # one-line questions
    pairs = sorted({p[1:] for p in prompts})
    out = []
    for _ in range(n):
        turns = []
        for t in range(rng.choice([1, 2, 3])):
            if t == 0:
                p = rng.choice(first)
                q, (a, b) = prompt_text(p), p[1:]
            else:  # follow-ups are never held out
                a, b = rng.choice(pairs)
                q = rng.choice(FOLLOW_UPS).format(a=a, b=b)
            turns.append({"from": "human", "value": q})
            turns.append({"from": "gpt", "value": answer(a, b)})
        out.append({"conversations": turns})
    return out


def wrong_sum(rng: random.Random, a: int, b: int) -> int:
    c = a + b
    wrong = c + rng.choice([-2, -1, 1, 2])  # near misses
    return wrong if wrong >= 0 and wrong != c else c + 1


def dpo_records(rng: random.Random, prompts: list[Prompt], n: int) -> list[dict]:
    out = []
    for _ in range(n):
        p = rng.choice(prompts)
        a, b = p[1:]
        out.append(
            {
                "conversations": [{"from": "human", "value": prompt_text(p)}],
                "chosen": {"from": "gpt", "value": answer(a, b)},
                "rejected": {"from": "gpt", "value": str(wrong_sum(rng, a, b))},
            }
        )
    return out


def build(seed: int = 0) -> dict[str, list[dict]]:
    """All demo files as {file name: records}; pure function of the seed."""
    rng = random.Random(seed)
    train, test = split_prompts(rng)
    every = [(a, b) for a in range(MAX_OPERAND + 1) for b in range(MAX_OPERAND + 1)]
    return {
        "pretrain.json": pretrain_docs(rng, every, 5000),
        "pretrain_test.json": pretrain_docs(rng, every, 100),
        "sft_alpaca.json": alpaca_records(rng, train, 1200),
        "sft_sharegpt.json": sharegpt_records(rng, train, 300),
        "sft_test.json": [dict(zip(("instruction", "input"), question(p)), output=answer(*p[1:])) for p in test],
        "dpo.json": dpo_records(rng, train, 800),
        "dpo_test.json": dpo_records(rng, test, 120),
    }


def write(out_dir: str | Path, seed: int = 0) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, records in build(seed).items():
        path = out_dir / name
        path.write_text(json.dumps(records, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        written.append(path)
    return written


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(Path(__file__).parent / "demo"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    for path in write(args.out, args.seed):
        n = len(json.loads(path.read_text(encoding="utf-8")))
        print(f"wrote {path} ({n} records)")


if __name__ == "__main__":
    main()
