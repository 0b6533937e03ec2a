"""The demo data generator: deterministic, in the exact formats of ../shared/data, and the
held-out pairs really are held out of SFT and DPO."""

from __future__ import annotations

import json
import re
import runpy

import pytest
from helpers import ROOT

gen = runpy.run_path(str(ROOT / "datasets" / "make_demo.py"), run_name="make_demo")


def test_deterministic_for_a_seed(tmp_path):
    assert gen["build"](0) == gen["build"](0)
    assert gen["build"](0) != gen["build"](1)
    gen["write"](tmp_path / "a", 3)
    gen["write"](tmp_path / "b", 3)
    for f in (tmp_path / "a").iterdir():
        assert f.read_bytes() == (tmp_path / "b" / f.name).read_bytes()


def test_shipped_files_are_the_generator_output(tmp_path):
    gen["write"](tmp_path, 0)
    for f in tmp_path.iterdir():
        assert f.read_bytes() == (ROOT / "datasets" / "demo" / f.name).read_bytes(), f.name


def keysets(records):
    return {tuple(sorted(r)) for r in records}


def test_formats_match_the_real_samples(shared_data):
    demo = gen["build"](0)
    real = {
        name: json.loads((shared_data / name).read_text())
        for name in ("pretrain_zh_demo.json", "alpaca_zh_demo.json", "duolun_train.json", "dpo_zh_demo.json")
    }
    assert keysets(demo["pretrain.json"]) == keysets(real["pretrain_zh_demo.json"])
    assert keysets(demo["sft_alpaca.json"]) >= keysets(real["alpaca_zh_demo.json"])
    assert keysets(demo["sft_sharegpt.json"]) == keysets(real["duolun_train.json"])
    assert keysets(demo["dpo.json"]) == keysets(real["dpo_zh_demo.json"])
    real_roles = {t["from"] for r in real["duolun_train.json"] for t in r["conversations"]}
    assert {t["from"] for r in demo["sft_sharegpt.json"] for t in r["conversations"]} == real_roles
    assert {r["chosen"]["from"] for r in demo["dpo.json"]} == {r["chosen"]["from"] for r in real["dpo_zh_demo.json"]}


QUESTION = re.compile(r"(\d+) \+ (\d+) =$")  # every question ends with the sum to complete


def qa(question: str, reply: str) -> tuple[int, int, int]:
    ((a, b),) = QUESTION.findall(question.strip())
    return int(a), int(b), int(reply)


def test_answers_are_correct_and_held_out_questions_unseen_in_finetuning():
    demo = gen["build"](0)

    def alpaca(r):
        return (r["instruction"] + ("\n" + r["input"] if r["input"] else ""), r["output"])

    def turns(conv):
        return [(conv[i]["value"], conv[i + 1]["value"]) for i in range(0, len(conv) - 1, 2)]

    trained = {alpaca(r) for r in demo["sft_alpaca.json"]}
    trained |= {tuple(h) for r in demo["sft_alpaca.json"] for h in r.get("history", [])}
    trained |= {t for r in demo["sft_sharegpt.json"] for t in turns(r["conversations"])}
    trained |= {(r["conversations"][-1]["value"], r["chosen"]["value"]) for r in demo["dpo.json"]}
    test = {alpaca(r) for r in demo["sft_test.json"]}
    test |= {(r["conversations"][-1]["value"], r["chosen"]["value"]) for r in demo["dpo_test.json"]}
    assert all(a + b == c for a, b, c in (qa(*x) for x in trained | test))
    # every question, follow-ups included, ends "= ": the answer slot is the same few tokens
    # after the space where pretraining text predicts the sum (docs/LOG.md, 2026-12-02)
    assert all(q.endswith(" = ") for q, _ in trained | test)
    # no held-out question is ever asked in SFT or DPO...
    assert {q for q, _ in trained}.isdisjoint({q for q, _ in test})
    # ...but every fact is trained in some phrasing, and stated in the pretraining text
    pairs = {(a, b) for a in range(5) for b in range(5)}
    assert {qa(*x)[:2] for x in trained} == pairs
    pretrain_text = " ".join(r["text"] for r in demo["pretrain.json"])
    assert all(f"{a} + {b} = {a + b}." in pretrain_text for a, b in pairs)
    assert len({q for q, _ in test}) == len(demo["sft_test.json"])  # each held-out question once
    # rejected answers are wrong
    for r in demo["dpo.json"] + demo["dpo_test.json"]:
        a, b, c = qa(r["conversations"][-1]["value"], r["rejected"]["value"])
        assert a + b != c


@pytest.mark.parametrize("name", ["sft_test.json", "dpo_test.json"])
def test_held_out_split_is_not_empty(name):
    assert len(gen["build"](0)[name]) >= 30
