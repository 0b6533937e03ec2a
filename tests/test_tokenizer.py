"""Trained tokenizer: round trip, AutoTokenizer loading, ChatML specials and template."""

from __future__ import annotations

import unicodedata

import pytest

from bumblefast.tokenizer import DEFAULT_SYSTEM_PROMPT, train_tokenizer


@pytest.fixture(scope="module")
def tok(demo_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_tokenizer_dir)


@pytest.mark.parametrize(
    "text",
    [
        "3 + 4 = 7. The sum of 12 and 9 is 21.",
        "这是一个苹果。你是一个会做加法的助手！",
        "Mixed 中文 and English, with   spaces\nand newlines\t and emoji 🐝.",
        "Unseen words: Zürich, naïve, 東京, ﬁ",
    ],
)
def test_round_trip(tok, text):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert all(0 <= i < len(tok) for i in ids)
    assert tok.decode(ids) == unicodedata.normalize("NFC", text)


def test_specials_and_digits(tok):
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|endoftext|>"
    # digits are split one by one (Qwen2 convention), so numbers share their digit tokens
    assert tok.tokenize("1234") == ["1", "2", "3", "4"]
    # special tokens are atomic inside text
    ids = tok("<|im_start|>user", add_special_tokens=False)["input_ids"]
    assert ids[0] == 1


def test_chat_template_words_are_whole_tokens(tok):
    """The template's role names and default system prompt are in the tokenizer's corpus, so a
    chat's frame is a few tokens (the demo answer sits 5 tokens after its question, not 11)."""
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "2 + 3 = "}], tokenize=False, add_generation_prompt=True
    )
    tokens = tok.tokenize(prompt)
    assert tokens[-3:] == ["<|im_start|>", "assistant", "Ċ"]
    assert tokens[:3] == ["<|im_start|>", "system", "Ċ"] and "user" in tokens
    assert tokens.index("<|im_end|>") <= 12  # "You are a helpful assistant." is a handful of words


def test_chat_template(tok):
    msgs = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "2 + 2 = 4"}]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text == (
        f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n"
        "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n"
        "<|im_start|>assistant\n2 + 2 = 4<|im_end|>\n"
    )
    # an explicit system message replaces the default one
    sys_text = tok.apply_chat_template([{"role": "system", "content": "Be brief."}] + msgs, tokenize=False)
    assert sys_text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n") and DEFAULT_SYSTEM_PROMPT not in sys_text
    # prefix-stable: rendering the first turns gives a prefix of the whole rendering
    prompt = tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    assert text.startswith(prompt) and prompt.endswith("<|im_start|>assistant\n")
    tools = tok.apply_chat_template(msgs[:1], tools=[{"name": "add", "parameters": {}}], tokenize=False)
    assert "# Tools" in tools and '{"name": "add", "parameters": {}}' in tools


def test_deterministic_and_bad_input(tmp_path):
    from bumblefast.config import UserError

    src = tmp_path / "a.jsonl"
    src.write_text('{"text": "hello world 123"}\n{"text": "你好 世界"}\n' * 50)
    a = train_tokenizer([src], 300, tmp_path / "a")
    b = train_tokenizer([src], 300, tmp_path / "b")
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    assert len(a) == len(b) <= 300
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": broken\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: not valid JSON"):
        train_tokenizer([bad], 300, tmp_path / "c")
    with pytest.raises(UserError, match="vocab_size must be at least"):
        train_tokenizer([src], 100, tmp_path / "d")


def test_load_tokenizer_is_what_autotokenizer_loads(demo_tokenizer_dir):
    """The generic-class shortcut (no AutoTokenizer import, so no torch in prep) loads the same
    class with the same ids, specials and template as AutoTokenizer."""
    from transformers import AutoTokenizer

    from bumblefast.tokenizer import GENERIC_FAST_CLASSES, load_tokenizer, tokenizer_class_name

    assert tokenizer_class_name(demo_tokenizer_dir) in GENERIC_FAST_CLASSES
    ours, ref = load_tokenizer(demo_tokenizer_dir), AutoTokenizer.from_pretrained(str(demo_tokenizer_dir))
    assert type(ours) is type(ref)
    assert (len(ours), ours.eos_token_id, ours.pad_token_id, ours.chat_template) == (
        len(ref), ref.eos_token_id, ref.pad_token_id, ref.chat_template
    )  # fmt: skip
    text = "Hello, world! 你好 <|im_start|>user\nhi<|im_end|>"
    assert ours(text)["input_ids"] == ref(text)["input_ids"]
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert ours.apply_chat_template(msgs, tokenize=False) == ref.apply_chat_template(msgs, tokenize=False)
