"""`bumblefast chat` driven through a pseudo-terminal: streamed replies equal transformers'
greedy generation, history is used, /reset clears it, /exit quits; --prompt and --no_history."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time

import pytest
import torch
from helpers import ROOT, subprocess_env


@pytest.fixture(scope="module")
def model_dir(chatty_model_dir):
    return chatty_model_dir


def greedy(model_dir, messages, n=24) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    stops = [tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id]
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        do_sample=False,
        eos_token_id=stops,
        pad_token_id=tok.pad_token_id,
    )
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


class Terminal:
    """A child process on a pty: type lines, read until a marker appears."""

    def __init__(self, args):
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(
            args, stdin=slave, stdout=slave, stderr=slave, cwd=ROOT, close_fds=True, env=subprocess_env()
        )
        os.close(slave)
        self.poll = select.poll()
        self.poll.register(self.master, select.POLLIN)
        self.buf = ""
        self.reads = 0

    def read_until(self, marker: str, timeout: float = 120) -> str:
        end = time.time() + timeout
        while marker not in self.buf:
            assert time.time() < end, f"timed out waiting for {marker!r}; got {self.buf[-2000:]!r}"
            if self.poll.poll(500):  # poll, not select: select fails on fds above 1023
                try:
                    chunk = os.read(self.master, 4096).decode(errors="replace")
                except OSError:
                    break
                self.buf += chunk
                self.reads += 1
        i = self.buf.index(marker) + len(marker)
        out, self.buf = self.buf[:i], self.buf[i:]
        return out

    def send(self, line: str) -> None:
        os.write(self.master, (line + "\n").encode())


def answer_of(screen: str) -> str:
    """The reply text between 'assistant> ' and the next prompt."""
    text = screen.replace("\r", "")
    return text.split("assistant> ", 1)[1].split("\nuser> ", 1)[0].strip()


def test_multi_turn_session_in_a_pty(model_dir):
    q1, q2 = "What is 2 + 3?", "And 4 + 4?"
    a1 = greedy(model_dir, [{"role": "user", "content": q1}])
    a2 = greedy(
        model_dir,
        [{"role": "user", "content": q1}, {"role": "assistant", "content": a1}, {"role": "user", "content": q2}],
    )
    a2_fresh = greedy(model_dir, [{"role": "user", "content": q2}])
    assert a2 != a2_fresh  # the history changes the answer, so the test can see it is used

    # 24 tokens: the streamer flushes at word boundaries, so replies this long come in pieces
    term = Terminal(
        [
            sys.executable,
            "-m",
            "bumblefast",
            "chat",
            "--model_path",
            str(model_dir),
            "--temperature",
            "0",
            "--max_new_tokens",
            "24",
        ]
    )
    term.read_until("user> ")
    term.send(q1)
    assert answer_of("assistant> " + term.read_until("user> ").split("assistant> ", 1)[1]) == a1
    reads_before = term.reads
    term.send(q2)
    screen = term.read_until("user> ")
    assert answer_of("assistant> " + screen.split("assistant> ", 1)[1]) == a2
    assert term.reads - reads_before >= 2  # the reply arrived in pieces, not as one block
    term.send("/reset")
    assert "history cleared" in term.read_until("user> ")
    term.send(q2)
    assert answer_of("assistant> " + term.read_until("user> ").split("assistant> ", 1)[1]) == a2_fresh
    term.send("/exit")
    assert term.proc.wait(timeout=60) == 0


def test_prompt_once_and_no_history(model_dir):
    q = "What is 2 + 3?"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "bumblefast",
            "chat",
            "--model_path",
            str(model_dir),
            "--prompt",
            q,
            "--temperature",
            "0",
            "--max_new_tokens",
            "24",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=subprocess_env(),
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == greedy(model_dir, [{"role": "user", "content": q}])

    from bumblefast.chat import Chat

    chat = Chat(model_dir, temperature=0, max_new_tokens=24)
    first = chat.reply(q, out=open(os.devnull, "w"), keep_history=False)
    assert chat.history == [] and chat.reply(q, out=open(os.devnull, "w"), keep_history=False) == first
    raw = Chat(model_dir, raw=True, temperature=0, max_new_tokens=4)
    assert raw._input_ids("3 + 4 =").tolist()[0] == raw.tok("3 + 4 =")["input_ids"]  # no template


def test_generation_config_malformed_fails_naming_the_file_missing_warns(model_dir, tmp_path, caplog):
    """A malformed generation_config.json stops chat/serve with the file and the JSON error
    (they would otherwise lose the model's eos and sampling settings); a missing one is said."""
    import shutil

    from bumblefast.chat import Chat, load_generation_config
    from bumblefast.config import UserError

    saved = load_generation_config(model_dir)
    assert saved.eos_token_id is not None  # the file the model was saved with is read
    bad = tmp_path / "bad"
    shutil.copytree(model_dir, bad)
    (bad / "generation_config.json").write_text('{"eos_token_id": 2,\n')
    with pytest.raises(UserError, match=r"bad/generation_config\.json: cannot be loaded \(JSONDecodeError: .*line 2"):
        Chat(bad)
    (bad / "generation_config.json").unlink()
    with caplog.at_level("WARNING", logger="bumblefast.chat"):
        chat = Chat(bad, temperature=0, max_new_tokens=2)
    assert f"{bad / 'generation_config.json'} not found: using transformers' default" in caplog.text
    assert chat.gen.eos_token_id  # stops still come from the tokenizer
