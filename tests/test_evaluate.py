"""`bumblefast eval` numbers against a hand computation with transformers on tiny examples."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import prep


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir


def hf(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(
        model_dir
    )


def reply_logp(model, tok, question: str, reply: str, end: str = "<|im_end|>") -> float:
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    r = tok(reply + end, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([p + r]), use_cache=False).logits[0]
    logp = torch.log_softmax(logits, -1)
    return sum(float(logp[len(p) - 1 + i, t]) for i, t in enumerate(r))


def test_heldout_loss_is_mean_ce_over_assistant_tokens(model_dir, tmp_path):
    from bumblefast.evaluate import evaluate

    recs = [
        {"instruction": "What is 2 + 3?", "input": "", "output": "2 + 3 = 5"},
        {"instruction": "What is 7 + 1?", "input": "", "output": "7 + 1 = 8"},
    ]
    (tmp_path / "sft.json").write_text(json.dumps(recs))
    prep(model_dir, tmp_path / "shards", "sft", [tmp_path / "sft.json"], seq_len=64)
    got = evaluate(model_dir, tmp_path / "shards")

    model, tok = hf(model_dir)
    total, count = 0.0, 0
    for r in recs:
        total -= reply_logp(model, tok, r["instruction"], r["output"])
        count += len(tok(r["output"] + "<|im_end|>", add_special_tokens=False)["input_ids"])
    assert got["stage"] == "sft" and got["target_tokens"] == count
    assert got["loss"] == pytest.approx(total / count, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)


def test_preference_accuracy_and_margin(model_dir, tmp_path):
    from bumblefast.evaluate import evaluate

    pairs = [
        {
            "conversations": [{"from": "human", "value": f"What is {a} + {b}?"}],
            "chosen": {"from": "gpt", "value": f"{a} + {b} = {a + b}"},
            "rejected": {"from": "gpt", "value": f"{a} + {b} = {a + b + 1}"},
        }
        for a, b in ((1, 2), (3, 4), (5, 6))
    ]
    (tmp_path / "pairs.json").write_text(json.dumps(pairs))
    model, tok = hf(model_dir)
    margins = [
        reply_logp(model, tok, p["conversations"][0]["value"], p["chosen"]["value"])
        - reply_logp(model, tok, p["conversations"][0]["value"], p["rejected"]["value"])
        for p in pairs
    ]
    expected_acc = sum(m > 0 for m in margins) / len(margins)

    from_file = evaluate(model_dir, tmp_path / "pairs.json")
    assert from_file["preference_accuracy"] == expected_acc
    assert from_file["mean_margin"] == pytest.approx(sum(margins) / len(margins), rel=1e-4, abs=1e-4)
    assert from_file["margins"] == pytest.approx(margins, rel=1e-4, abs=1e-4)

    manifest = prep(model_dir, tmp_path / "shards", "dpo", [tmp_path / "pairs.json"], seq_len=256)
    assert manifest["records"]["written"] == 3
    from_shards = evaluate(model_dir, tmp_path / "shards")
    assert from_shards["n"] == 3 and from_shards["preference_accuracy"] == expected_acc
    assert from_shards["mean_margin"] == pytest.approx(sum(margins) / len(margins), rel=1e-4, abs=1e-4)


def test_answer_accuracy_and_cli(model_dir, tmp_path, capsys):
    from bumblefast.cli import main

    recs = [{"instruction": "What is 2 + 3?", "input": "", "output": "2 + 3 = 5"}]
    (tmp_path / "q.json").write_text(json.dumps(recs))
    assert (
        main(
            [
                "eval",
                "--model_path",
                str(model_dir),
                "--dataset_path",
                str(tmp_path / "q.json"),
                "--out",
                str(tmp_path / "r.json"),
            ]
        )
        == 0
    )
    result = json.loads((tmp_path / "r.json").read_text())
    # a random model does not answer correctly; the example shows what it produced
    assert result["stage"] == "sft" and result["n"] == 1 and result["accuracy"] == 0.0
    # the reference reply's NLL per token (its tokens, not <|im_end|>), by hand with transformers
    model, tok = hf(model_dir)
    n_tokens = len(tok("2 + 3 = 5", add_special_tokens=False)["input_ids"])
    expected_nll = -reply_logp(model, tok, "What is 2 + 3?", "2 + 3 = 5", end="") / n_tokens
    assert result["answer_nll"] == pytest.approx(expected_nll, rel=1e-5)
    assert result["examples"][0]["expected"] == "2 + 3 = 5"
    assert json.loads(capsys.readouterr().out) == result
    (tmp_path / "bad.json").write_text(json.dumps([{"text": "x"}]))
    assert main(["eval", "--model_path", str(model_dir), "--dataset_path", str(tmp_path / "bad.json")]) == 1


@pytest.mark.parametrize(
    "answer, expected, ok",
    [
        ("7", "7", True),
        (" 7\n", "7", True),
        ("The answer is 7.", "7", True),  # the number read out of a sentence
        ("答案是 7。", "7", True),
        ("The answer is 8.", "7", False),
        ("17", "7", False),
        ("3 + 4 = 7", "7", False),  # one number, and only that one
        ("7, 8, 9", "7", False),
        ("", "7", False),
        ("Paris", "Paris", True),
        ("Paris, France", "Paris", False),  # non-numeric references: exact match only
    ],
)
def test_is_correct(answer, expected, ok):
    from bumblefast.evaluate import is_correct

    assert is_correct(answer, expected) is ok


def test_reward_margins_are_dpo_implicit_rewards():
    from bumblefast.evaluate import reward_margins

    # policy margins 3, -1, 2 against reference margins 1, 0, 2.5: rewards 0.5 * (2, -1, -0.5)
    got = reward_margins({"margins": [3.0, -1.0, 2.0]}, {"margins": [1.0, 0.0, 2.5]}, beta=0.5)
    assert got["reward_margin"] == pytest.approx(0.5 * (2 - 1 - 0.5) / 3)
    assert got["reward_accuracy"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="different pairs"):
        reward_margins({"margins": [1.0]}, {"margins": [1.0, 2.0]}, beta=0.1)


def test_completion_accuracy_against_generate_and_hf_loss(model_dir):
    """Plain-text completion: right iff greedy `generate` continues with the expected tokens;
    the NLL is transformers' own loss with the prompt masked out."""
    from bumblefast.evaluate import completion_accuracy

    model, tok = hf(model_dir)
    enc = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731

    def greedy(prompt: str, n: int) -> list[int]:
        ids = torch.tensor([enc(prompt)])
        out = model.generate(input_ids=ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
        return out[0, ids.shape[1] :].tolist()

    first = "3 + 4 = "
    items = [(first, tok.decode(greedy(first, 2))), ("1 + 1 = ", "2"), ("The sum of 2 and 2 is ", "4")]
    got = completion_accuracy(model_dir, items)
    total, count, right = 0.0, 0, 0
    for p, e in items:
        ids, n_p = enc(p + e), len(enc(p))
        right += greedy(p, len(ids) - n_p) == ids[n_p:]
        labels = torch.tensor([ids])
        labels[0, :n_p] = -100
        with torch.no_grad():
            loss = model(torch.tensor([ids]), labels=labels, use_cache=False).loss
        total, count = total + float(loss) * (len(ids) - n_p), count + len(ids) - n_p
    assert right >= 1  # the first item is the model's own continuation
    assert got["n"] == 3 and got["accuracy"] == pytest.approx(right / 3)
    assert got["nll"] == pytest.approx(total / count, rel=1e-5)
