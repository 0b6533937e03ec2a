"""bumblefast prep: shards decode to exactly the tokenizer's tokens, masks cover exactly the
assistant turns, every record is accounted for, output is complete-or-absent and reproducible."""

from __future__ import annotations

import gzip
import json
import os
import re
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from helpers import DEMO, prep
from helpers import SHARED_DATA as SHARED

from bumblefast.config import UserError
from bumblefast.prep.cli import join_multi_values, parse_prep_args
from bumblefast.prep.cli import main as prep_main
from bumblefast.prep.records import dpo_pair, sft_messages
from bumblefast.prep.sources import UnreadableInput, iter_records

needs_shared = pytest.mark.skipif(
    not SHARED.is_dir(), reason=f"real sample data not present at {SHARED} (only in the dev workspace)"
)


@pytest.fixture(scope="session")
def tok(tok_dir):
    from bumblefast.tokenizer import load_tokenizer

    return load_tokenizer(tok_dir)


pytestmark = pytest.mark.usefixtures("clean_shm")


def read_rows(out) -> list[dict]:
    """Every row, in index order, read back with streaming's own StreamingDataset."""
    from streaming import StreamingDataset

    ds = StreamingDataset(local=str(out), batch_size=1)
    return [{k: np.array(v) for k, v in ds[i].items()} for i in range(ds.num_samples)]


def segments(row, key):
    out, start = [], 0
    for n in row[key].tolist():
        out.append((row["input_ids"][start : start + n], row.get("loss_mask", np.ones(0))[start : start + n]))
        start += n
    return out


def load_records(paths):
    return [rec for p in paths for rec in json.loads(Path(p).read_text(encoding="utf-8"))]


def expected_ids(tok, messages, tools=None):
    text = tok.apply_chat_template(messages, tools=tools, tokenize=False)
    return tuple(tok(text, add_special_tokens=False)["input_ids"])


def trained_runs(tok, ids, mask):
    runs, start = [], None
    for i, m in enumerate(list(mask) + [0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append(tok.decode(ids[start:i].tolist()))
            start = None
    return runs


# ---- pretrain ----------------------------------------------------------------------------------
def check_pretrain(tok, tok_dir, tmp_path, files, seq_len):
    m = prep(tok_dir, tmp_path / "pt", "pretrain", files, seq_len=seq_len)
    rows = read_rows(tmp_path / "pt")
    assert m["rows"] == len(rows) > 0
    assert all(len(r["input_ids"]) == seq_len and int(r["doc_lens"].sum()) == seq_len for r in rows)
    assert rows[0]["input_ids"].dtype == np.uint16  # vocab 1024 fits
    stream = []
    for rec in load_records(files):
        stream += tok(rec["text"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    got = np.concatenate([r["input_ids"] for r in rows]).tolist()
    assert got == stream[: len(got)]
    assert len(stream) - len(got) == m["tokens"]["tail_tokens_dropped"] < seq_len
    # doc_lens: every segment ends in EOS unless it is cut at the row end
    for r in rows:
        ends = np.cumsum(r["doc_lens"])[:-1] - 1
        assert (r["input_ids"][ends] == tok.eos_token_id).all()
    assert m["records"]["read"] == m["records"]["written"] == len(load_records(files))


def test_pretrain_demo(tok, tok_dir, tmp_path):
    check_pretrain(tok, tok_dir, tmp_path, [DEMO / "pretrain_test.json", DEMO / "pretrain.json"], 128)


@needs_shared
def test_pretrain_shared(tok, tok_dir, tmp_path):
    check_pretrain(tok, tok_dir, tmp_path, [SHARED / "pretrain_zh_demo.json"], 2048)


# ---- sft ---------------------------------------------------------------------------------------
def check_sft(tok, tok_dir, tmp_path, files, seq_len):
    m = prep(tok_dir, tmp_path / "sft", "sft", files, seq_len=seq_len, overlong="drop")
    rows = read_rows(tmp_path / "sft")
    assert all(len(r["input_ids"]) <= seq_len for r in rows)
    expected = {}
    n_over = 0
    for rec in load_records(files):
        msgs, tools = sft_messages(rec)
        ids = expected_ids(tok, msgs, tools)
        if len(ids) > seq_len:
            n_over += 1
            continue
        expected.setdefault(ids, []).append([x["content"] + "<|im_end|>" for x in msgs if x["role"] == "assistant"])
    got = Counter()
    for r in rows:
        for ids, mask in segments(r, "seq_lens"):
            key = tuple(ids.tolist())
            assert key in expected, "a segment is not the tokenization of any rendered record"
            got[key] += 1
            assert trained_runs(tok, ids, mask) in expected[key]
    assert got == Counter({k: len(v) for k, v in expected.items()})
    assert m["records"]["skipped_by_reason"].get("overlong", 0) == n_over
    assert m["records"]["read"] == m["records"]["written"] + m["records"]["skipped"]
    return m


def test_sft_demo(tok, tok_dir, tmp_path):
    check_sft(tok, tok_dir, tmp_path, [DEMO / "sft_alpaca.json", DEMO / "sft_sharegpt.json"], 256)


@needs_shared
def test_sft_shared(tok, tok_dir, tmp_path):
    m = check_sft(
        tok,
        tok_dir,
        tmp_path,
        [SHARED / "alpaca_zh_demo.json", SHARED / "glaive_toolcall_zh_demo.json", SHARED / "duolun_train.json"],
        2048,
    )
    assert m["packing_efficiency"] > 0.95


def test_sft_mask_exact_on_handwritten_record(tok, tok_dir, tmp_path):
    rec = {
        "system": "Be brief.",
        "instruction": "Add",
        "input": "2 and 3",
        "output": "5",
        "history": [["hi", "hello"]],
    }
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps(rec) + "\n")
    prep(tok_dir, tmp_path / "o", "sft", [path], seq_len=128)
    (row,) = read_rows(tmp_path / "o")
    text = tok.decode(row["input_ids"].tolist())
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>assistant\nhello<|im_end|>\n<|im_start|>user\nAdd\n2 and 3<|im_end|>\n"
        "<|im_start|>assistant\n5<|im_end|>\n"
    )
    assert trained_runs(tok, row["input_ids"], row["loss_mask"]) == ["hello<|im_end|>", "5<|im_end|>"]


# ---- dpo ---------------------------------------------------------------------------------------
def check_dpo(tok, tok_dir, tmp_path, files, seq_len, share_prompt=False):
    m = prep(tok_dir, tmp_path / "dpo", "dpo", files, seq_len=seq_len, share_prompt=share_prompt, overlong="drop")
    assert m["dpo_layout"] == ("shared_prompt" if share_prompt else "pairs")
    # seq_len is the cutoff per sequence; a row holds a pair at the cutoff
    assert m["seq_len"] == 2 * seq_len and m["prep"]["cutoff_len"] == seq_len
    rows = read_rows(tmp_path / "dpo")
    expected = Counter()
    reply = {}  # segment tokens -> the reply text the record says is trained there
    for rec in load_records(files):
        prompt, ch, rj, tools = dpo_pair(rec)
        pair = (expected_ids(tok, prompt + [ch], tools), expected_ids(tok, prompt + [rj], tools))
        reply[pair[0]], reply[pair[1]] = ch["content"], rj["content"]
        if max(len(pair[0]), len(pair[1])) <= seq_len:  # each sequence within the cutoff, either layout
            expected[pair] += 1
    got = Counter()
    for r in rows:
        assert len(r["input_ids"]) <= 2 * seq_len and len(r["seq_lens"]) % 2 == 0
        segs = segments(r, "seq_lens")
        prompts = r["prompt_lens"].tolist() if share_prompt else [None] * (len(segs) // 2)
        assert len(prompts) == len(segs) // 2
        for c, rj, p in zip(segs[0::2], segs[1::2], prompts, strict=True):
            if p is not None:  # the rejected segment continues from the chosen one's prompt
                assert p >= 1 and not c[1][:p].any() and not rj[1][:1].any()
                assert rj[0][0] == c[0][p - 1]  # the prompt's last token, repeated
                rj = (np.concatenate([c[0][: p - 1], rj[0]]), np.concatenate([c[1][: p - 1], rj[1]]))
            got[(tuple(c[0].tolist()), tuple(rj[0].tolist()))] += 1
            for ids, mask in (c, rj):
                runs = trained_runs(tok, ids, mask)
                assert runs == [reply[tuple(ids.tolist())] + "<|im_end|>"]  # exactly the record's reply
                # the trained span is the final assistant reply, right at the end of the segment
                assert tok.decode(ids.tolist()).endswith(runs[0] + "\n")
    assert got == expected  # the same pairs in both layouts
    assert m["records"]["read"] == m["records"]["written"] + m["records"]["skipped"]
    return m


@pytest.mark.parametrize("share_prompt", [False, True])
def test_dpo_demo(tok, tok_dir, tmp_path, share_prompt):
    m = check_dpo(tok, tok_dir, tmp_path, [DEMO / "dpo.json"], 256, share_prompt)
    assert 0.3 < m["dpo"]["prompt_fraction"] < 1


@needs_shared
def test_dpo_shared(tok, tok_dir, tmp_path):
    # packing efficiency >= 95% is measured in benchmarks/bench_prep.py with a tokenizer trained
    # on this data; the 1024-vocab demo tokenizer makes these Chinese pairs ~1000+ tokens each
    check_dpo(tok, tok_dir, tmp_path, [SHARED / "dpo_zh_demo.json"], 2048, share_prompt=True)


@pytest.mark.parametrize("share_prompt", [False, True])
def test_dpo_multi_turn_history_is_prompt(tok, tok_dir, tmp_path, share_prompt):
    """A multi-turn pair scores only its final reply: the history's assistant turns are prompt
    (untrained), so the shared layout shares the whole history."""
    turn = lambda who, v: {"from": who, "value": v}  # noqa: E731
    history = [turn("human", "what is 2+2?"), turn("gpt", "4, since two and two make four."), turn("human", "and 3+3?")]
    recs = [
        {"conversations": history, "chosen": turn("gpt", "6"), "rejected": turn("gpt", "7, I think")},
        {"conversations": history[:1], "chosen": "four", "rejected": "five"},  # single turn beside it
    ]
    path = tmp_path / "mt.json"
    path.write_text(json.dumps(recs), encoding="utf-8")
    m = check_dpo(tok, tok_dir, tmp_path, [path], 512, share_prompt)  # trained = exactly the final reply
    assert m["records"]["written"] == 2
    if share_prompt:
        (row,) = read_rows(tmp_path / "dpo")
        c = segments(row, "seq_lens")[0]  # the multi-turn pair's chosen segment (packed first: longest)
        assert row["prompt_lens"][0] == int(c[1].argmax())  # the whole untrained head is shared
        assert "4, since two and two make four." in tok.decode(c[0][: row["prompt_lens"][0]].tolist())


# ---- bad input: nothing lost -------------------------------------------------------------------
BAD_JSONL = [
    b'{"instruction": "q", "output": "a"}',
    b'{"instruction": "q", "output": ',  # malformed JSON
    b'{"instruction": "q"}',  # missing output
    b'{"instruction": 3, "output": "a"}',  # wrong type
    b'{"instruction": "  ", "output": "a"}',  # empty text
    b'{"conversations": [{"from": "alien", "value": "x"}, {"from": "gpt", "value": "y"}]}',
    b'{"instruction": "caf\xe9", "output": "a"}',  # invalid UTF-8 (latin-1 byte)
    b"[1, 2]",  # not an object
    b'{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}',
]
BAD_REASONS = {
    "malformed_json": 1,
    "missing_field": 1,
    "wrong_type": 1,
    "empty_text": 1,
    "unknown_role": 1,
    "invalid_utf8": 1,
    "not_an_object": 1,
    "empty_file": 1,
}


def write_bad(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_bytes(b"\n".join(BAD_JSONL) + b"\n")
    (tmp_path / "in" / "empty.jsonl").write_bytes(b"")
    return tmp_path / "in"


def test_bad_records_skipped_and_logged(tok_dir, tmp_path):
    folder = write_bad(tmp_path)
    m = prep(tok_dir, tmp_path / "o", "sft", [folder], seq_len=128)
    assert m["records"]["read"] == len(BAD_JSONL) + 1
    assert m["records"]["written"] == 2
    assert m["records"]["skipped_by_reason"] == BAD_REASONS
    assert m["records"]["read"] == m["records"]["written"] + m["records"]["skipped"]
    errs = [json.loads(x) for x in (tmp_path / "o" / "errors.jsonl").read_text().splitlines()]
    assert Counter(e["reason"] for e in errs) == Counter(BAD_REASONS)
    where = {e["reason"]: e["where"] for e in errs}
    assert where["malformed_json"].endswith("a.jsonl:2") and where["invalid_utf8"].endswith("a.jsonl:7")
    assert where["empty_file"].endswith("empty.jsonl:0")


def test_on_error_fail_stops_with_message_and_leaves_nothing(tok_dir, tmp_path, capsys):
    folder = write_bad(tmp_path)
    with pytest.raises(UserError, match=r"a\.jsonl:2: malformed_json"):
        prep(tok_dir, tmp_path / "o", "sft", [folder], seq_len=128, on_error="fail")
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.*"))  # no staging, no work folder
    rc = prep_main(
        [
            "--stage",
            "sft",
            "--input",
            str(folder),
            "--tokenizer",
            tok_dir,
            "--output_dir",
            str(tmp_path / "o"),
            "--on_error",
            "fail",
        ]
    )
    assert rc == 1 and "malformed_json" in capsys.readouterr().err


def test_json_array_streaming_errors(tmp_path):
    p = tmp_path / "a.json"
    p.write_text('[\n {"text": "a"},\n {"text": "b"},\n {"text": oops}\n]')
    got = list(iter_records([str(p)]))
    assert [w for w, _ in got] == [f"{p}:2", f"{p}:3", f"{p}:4"]
    assert got[0][1] == {"text": "a"} and got[2][1].reason == "malformed_json"
    e = tmp_path / "e.json"
    e.write_text("  [ ]  ")
    assert [r.reason for _, r in iter_records([str(e)])] == ["empty_file"]


def _array_with_bad_elements(n: int, bad: dict[int, str]) -> tuple[str, list[str], dict[int, int]]:
    """A pretty-printed array of n {"text": ...} elements, element i replaced by the raw text
    bad[i]; returns (file text, the good texts in order, {bad index: its line})."""
    parts, good, lines, line = [], [], {}, 2  # line 1 is "["
    for i in range(n):
        if i in bad:
            parts.append(bad[i])
            lines[i] = line
        else:
            text = f"doc {i} " + "word " * (i % 7)
            parts.append(json.dumps({"text": text}))
            good.append(text)
        line += parts[-1].count("\n") + 1
    return "[\n" + ",\n".join(parts) + "\n]\n", good, lines


# malformed elements of several kinds: each is one bad record; the next element is read again
BAD_ELEMENTS = {
    0: '{"text": oops}',  # not a value
    1: '{"text": "unterminated,\n "id": 3}',  # an unclosed string (a raw newline ends it)
    999: '{"text": "x"} {"text": "missing comma"}',  # two values without ','
    1000: '{"text": [1, 2}',  # brackets that do not match
    1998: '{"text": "caf\\ud800"}',  # an escaped lone surrogate: parses, but is not text
    1999: '{"text": "last", }',  # a trailing ',' inside the object
}


def test_json_array_resynchronises_after_bad_elements(tok, tok_dir, tmp_path):
    """2,000 elements with bad ones at the start, middle and end: every good element is
    written (the token stream equals the tokenizer's), each bad one is counted at its line,
    read = written + skipped, per file too."""
    text, good, lines = _array_with_bad_elements(2000, BAD_ELEMENTS)
    path = tmp_path / "big.json"
    path.write_text(text)
    other = tmp_path / "small.jsonl"
    other.write_text('{"text": "fine"}\n')
    m = prep(tok_dir, tmp_path / "o", "pretrain", [path, other], seq_len=64)
    assert m["records"]["read"] == 2001 and m["records"]["written"] == len(good) + 1 == 1995
    assert m["records"]["skipped_by_reason"] == {"malformed_json": 5, "invalid_utf8": 1}
    assert m["records"]["by_file"] == {
        str(path): {"read": 2000, "written": 1994, "skipped": 6},
        str(other): {"read": 1, "written": 1, "skipped": 0},
    }
    errs = [json.loads(x) for x in (tmp_path / "o" / "errors.jsonl").read_text().splitlines()]
    assert [e["where"] for e in errs] == [f"{path}:{lines[i]}" for i in sorted(BAD_ELEMENTS)]
    stream = []
    for doc in [*good, "fine"]:
        stream += tok(doc, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    got = np.concatenate([r["input_ids"] for r in read_rows(tmp_path / "o")]).tolist()
    assert got == stream[: len(got)] and len(stream) - len(got) == m["tokens"]["tail_tokens_dropped"] < 64


def test_json_array_small_buffer_same_records(tmp_path, monkeypatch):
    """Elements and bad elements cut across buffer refills read the same as in one buffer."""
    from bumblefast.prep import sources

    text, _, _ = _array_with_bad_elements(60, {0: BAD_ELEMENTS[0], 30: BAD_ELEMENTS[999], 59: BAD_ELEMENTS[1]})
    path = tmp_path / "a.json"
    path.write_text(text)
    whole = [(w, r if isinstance(r, dict) else r.reason) for w, r in iter_records([str(path)])]
    monkeypatch.setattr(sources, "CHUNK_CHARS", 7)
    assert [(w, r if isinstance(r, dict) else r.reason) for w, r in iter_records([str(path)])] == whole
    assert len(whole) == 60 and sum(not isinstance(r, dict) for _, r in whole) == 3


@pytest.mark.parametrize(
    "text, line, why",
    [
        ('[\n {"text": "a"},\n {"text": "b"},\n {"text": "cut he', 4, "ends before the element"),  # truncated
        ('[\n {"text": "a"},\n {"text": "b"}\n', 3, "ends before the element"),  # no closing ']'
        ('[{"text": "a"}, {"text": "b}, {"text": "c"}]', 1, "ends before the element"),  # string open to EOF
        ('[\n {"text": "a"}\n]\n[{"text": "b"}]\n', 4, "after the JSON array's closing"),  # two arrays
        ('{"text": "a"}\n{"text": "b"}\n', 2, "must be named .jsonl"),  # JSON lines in a .json file
    ],
)
def test_unreadable_json_fails_naming_file_line(tok_dir, tmp_path, text, line, why):
    """A JSON file that cannot be read to its end stops the run, even with --on_error skip,
    naming file:line and the bytes not read; no output is left behind."""
    path = tmp_path / "t.json"
    path.write_text(text)
    with pytest.raises(UnreadableInput, match=rf"{re.escape(str(path))}:{line}: .*{re.escape(why)}") as e:
        prep(tok_dir, tmp_path / "o", "pretrain", [path], seq_len=64, on_error="skip")
    assert "bytes" in str(e.value) and "--on_error" in str(e.value) or ".jsonl" in str(e.value)
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.*"))  # no staging, no work folder


def test_truncated_json_array_fails_with_workers_and_cli(tok_dir, tmp_path, capsys):
    text, _, _ = _array_with_bad_elements(3000, {})
    lines = text.split("\n")
    path = tmp_path / "cut.json"
    path.write_text("\n".join(lines[:1501]) + "\n" + lines[1501][:10])  # element 1500 cut after 10 bytes
    line, lost = 1502, 10
    with pytest.raises(UnreadableInput, match=rf"cut\.json:{line}: .*remaining {lost:,} bytes"):
        prep(tok_dir, tmp_path / "o", "sft", [path], seq_len=64, num_workers=2)
    rc = prep_main(
        [
            "--stage",
            "pretrain",
            "--input",
            str(path),
            "--tokenizer",
            tok_dir,
            "--output_dir",
            str(tmp_path / "o"),
            "--on_error",
            "skip",
        ]
    )
    assert rc == 1 and f"cut.json:{line}:" in capsys.readouterr().err


def test_readers_formats_agree(tok_dir, tmp_path):
    """json, jsonl, jsonl.gz, jsonl.zst, parquet, a glob and a folder give the same rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    recs = load_records([DEMO / "sft_test.json"])
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs).encode()
    d = tmp_path / "fmt"
    d.mkdir()
    (d / "x.jsonl").write_bytes(lines)
    (d / "x.jsonl.gz").write_bytes(gzip.compress(lines))
    (d / "x.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    pq.write_table(pa.Table.from_pylist(recs), d / "x.parquet")
    ref = read_rows_of(tok_dir, tmp_path, "ref", [DEMO / "sft_test.json"])
    for name in ["x.jsonl", "x.jsonl.gz", "x.jsonl.zst", "x.parquet"]:
        assert read_rows_of(tok_dir, tmp_path, name, [d / name]) == ref, name
    m = prep(tok_dir, tmp_path / "all", "sft", [d], seq_len=256)
    assert m["records"]["read"] == 4 * len(recs)
    m = prep(tok_dir, tmp_path / "glob", "sft", [str(d / "*.jsonl*")], seq_len=256)
    assert m["records"]["read"] == 3 * len(recs)


def read_rows_of(tok_dir, tmp_path, name, inputs):
    prep(tok_dir, tmp_path / f"o_{name}", "sft", inputs, seq_len=256)
    return [{k: v.tolist() for k, v in r.items()} for r in read_rows(tmp_path / f"o_{name}")]


# ---- determinism, workers, atomic output -------------------------------------------------------
def tree_bytes(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` by its relative path (shards live in tasks/tNNNNNN/)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_workers_same_rows_and_rerun_byte_identical(tok_dir, tmp_path):
    files = [DEMO / "sft_alpaca.json", DEMO / "sft_sharegpt.json"]
    prep(tok_dir, tmp_path / "w1", "sft", files, seq_len=512)
    first = tree_bytes(tmp_path / "w1")
    prep(tok_dir, tmp_path / "w1", "sft", files, seq_len=512)  # rerun in place
    assert tree_bytes(tmp_path / "w1") == first
    prep(tok_dir, tmp_path / "w2", "sft", files, seq_len=512, num_workers=2)
    rows1 = [{k: v.tolist() for k, v in r.items()} for r in read_rows(tmp_path / "w1")]
    rows2 = [{k: v.tolist() for k, v in r.items()} for r in read_rows(tmp_path / "w2")]
    assert rows1 == rows2
    shards = [n for n in first if Path(n).name.startswith("shard.")]
    assert shards and all(first[n] == tree_bytes(tmp_path / "w2")[n] for n in shards)
    assert list(tmp_path.glob(".*")) == []  # no staging folders left behind


def test_sigkill_mid_task_and_rerun_resumes_byte_identical(tok_dir, tmp_path):
    """The whole prep SIGKILLed (a node lost) inside task 2 of 4: no output, tasks 0-1 finished
    in the work folder; the same command again runs only tasks 2-3 (0-1 keep their files: same
    inodes) and gives the bytes of an uninterrupted run."""
    big = tmp_path / "big.jsonl"
    texts = [r["text"] for r in load_records([DEMO / "pretrain.json"])]
    with big.open("w") as f:
        for i in range(4000):
            f.write(json.dumps({"text": texts[i % len(texts)]}) + "\n")
    size = big.stat().st_size

    def cmd(out):
        return [
            sys.executable, "-m", "bumblefast.prep.cli", "--stage", "pretrain", "--input", str(big),
            "--tokenizer", tok_dir, "--seq_len", "128", "--output_dir", str(out),
            "--shard_size_limit", "16kb", "--task_size", str(size // 4 + 1),
        ]  # fmt: skip

    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(cmd(tmp_path / "whole"), env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out = tmp_path / "out"
    killed = subprocess.run(cmd(out), env=dict(env, BUMBLEFAST_PREP_TEST_KILL_TASK="2"), capture_output=True)
    assert killed.returncode == -signal.SIGKILL
    assert not out.exists()  # complete or absent
    work = tmp_path / ".out.tasks" / "tasks"
    names = sorted(p.name for p in work.iterdir() if p.is_dir())
    assert names[:2] == ["t000000", "t000001"] and len(names) == 3 and names[2].startswith("t000002.tmp-")
    before = {p.name: p.stat().st_ino for p in work.glob("t00000[01]/shard.*")}
    done = subprocess.run(cmd(out), env=env, check=True, capture_output=True, text=True)
    assert "2 finished by an earlier run (skipped), 2 to run" in done.stderr
    assert tree_bytes(out) == tree_bytes(tmp_path / "whole")
    after = {p.name: p.stat().st_ino for p in out.glob("tasks/t00000[01]/shard.*")}
    assert before and after == before  # the finished tasks' shards were not written again
    assert not any(tmp_path.glob(".*"))  # work folder and staging gone


def test_dpo_alpaca_pairs_and_truncate(tok, tok_dir, tmp_path):
    recs = [
        {"instruction": "Add", "input": "2 and 3", "chosen": "5", "rejected": "6"},
        {"system": "S", "instruction": "Say hi " * 40, "chosen": "hi", "rejected": "no"},
    ]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    m = prep(tok_dir, tmp_path / "d", "dpo", [path], seq_len=160, share_prompt=False, overlong="drop")
    assert m["records"]["skipped_by_reason"] == {"overlong": 1}
    (row,) = read_rows(tmp_path / "d")
    (c, cm), (r, rm) = segments(row, "seq_lens")
    assert tok.decode(c.tolist()).endswith(
        "<|im_start|>user\nAdd\n2 and 3<|im_end|>\n<|im_start|>assistant\n5<|im_end|>\n"
    )
    assert trained_runs(tok, c, cm) == ["5<|im_end|>"] and trained_runs(tok, r, rm) == ["6<|im_end|>"]
    m = prep(tok_dir, tmp_path / "t", "dpo", [path], seq_len=160, share_prompt=False)  # truncate: the default
    assert m["records"]["truncated"] == 1 and m["records"]["written"] == 2
    rows = read_rows(tmp_path / "t")  # each sequence cut to the cutoff, a row holds a pair of them
    assert all(len(x["input_ids"]) <= 320 for x in rows)
    assert max(n for x in rows for n in x["seq_lens"].tolist()) == 160  # the long pair's longer sequence


# ---- multi-node + merge, inspect, CLI ----------------------------------------------------------
def test_nodes_merge(tok_dir, tmp_path):
    """Two nodes run alternate tasks into the shared work folder; merge joins them into the
    bytes one node writes (manifest included), and refuses while a task is missing."""
    from bumblefast.prep.merge import merge_parts

    files = [DEMO / "dpo.json", DEMO / "dpo_test.json", DEMO / "sft_alpaca.json"]  # 3 files, 3 tasks
    kw = dict(seq_len=256, task_size="1kb")
    whole = prep(tok_dir, tmp_path / "one", "dpo", files, **kw)
    assert whole["prep"]["tasks"] == 3
    node0 = prep(tok_dir, tmp_path / "multi", "dpo", files, node_rank=0, num_nodes=2, **kw)
    assert node0["tasks"] == [0, 2] and not (tmp_path / "multi").exists()
    with pytest.raises(UserError, match=r"1 of 3 tasks are not finished \(t000001\)"):
        merge_parts(str(tmp_path / "multi"))
    node1 = prep(tok_dir, tmp_path / "multi", "dpo", files, node_rank=1, num_nodes=2, **kw)
    assert node1["tasks"] == [1]
    assert node0["records"]["read"] + node1["records"]["read"] == whole["records"]["read"]
    assert prep_main(["merge", str(tmp_path / "multi")]) == 0
    assert tree_bytes(tmp_path / "multi") == tree_bytes(tmp_path / "one")
    assert prep_main(["merge", str(tmp_path / "multi")]) == 0  # merged already: says so, changes nothing
    assert tree_bytes(tmp_path / "multi") == tree_bytes(tmp_path / "one")
    m = json.loads((tmp_path / "multi" / "bumblefast.json").read_text())
    assert (
        m["records"]["written"] == 800 + 120
        and m["records"]["skipped_by_reason"] == whole["records"]["skipped_by_reason"]
    )
    assert not any(tmp_path.glob(".*"))


def test_inspect_and_cli(tok_dir, tmp_path, capsys):
    argv = join_multi_values(["--input", "a", "b", "--seq_len", "8"])
    assert argv == ["--input", "a,b", "--seq_len", "8"]
    cfg = parse_prep_args(["--stage", "sft", "--input", "a", "b", "--cutoff_len", "64", "--output_dir", "o"])
    assert cfg.input == ["a", "b"] and cfg.seq_len == 64
    out = tmp_path / "s"
    rc = prep_main(
        [
            "--stage",
            "sft",
            "--input",
            str(DEMO / "sft_test.json"),
            "--tokenizer_name_or_path",
            tok_dir,
            "--cutoff_len",
            "256",
            "--output_dir",
            str(out),
        ]
    )
    assert rc == 0
    capsys.readouterr()
    assert prep_main(["inspect", str(out), "--rows", "1", "--color", "never"]) == 0
    text = capsys.readouterr().out
    assert '"schema_version": 1' in text and "[[" in text and "<|im_end|>]]" in text
    n = len(json.loads((DEMO / "sft_test.json").read_text()))
    assert re.search(rf"^ +{n} +{n} +0  {re.escape(str(DEMO / 'sft_test.json'))}$", text, re.M)
    assert prep_main(["--help"]) == 0 and "--seq_len" in capsys.readouterr().out


# ---- overlong: truncate by default (replies cut first, the prompt keeps its end) ---------------
def encode_one(tok_dir, stage, rec, seq_len, overlong="truncate"):
    """(where, "ok", payload, truncated) or (where, "err", reason, message); the payload is sft's
    (ids, mask), dpo's (segments, prompt_lens value, pair tokens, prompt tokens)."""
    from bumblefast.prep.encode import Encoder, EncodeSettings, Skipped

    r = Encoder(EncodeSettings(stage, tok_dir, seq_len, overlong=overlong)).encode_chunk([("f:1", rec)])[0]
    if isinstance(r, Skipped):
        return (r.where, "err", r.reason, r.message)
    payload = r.segments[0] if stage == "sft" else (r.segments, r.prompt_len, r.pair_tokens, r.prompt_tokens)
    return (r.where, "ok", payload, r.truncated)


def test_overlong_truncate_cuts_the_reply_first_and_keeps_the_prompt_end(tok_dir):
    L = 64
    cases = {  # record -> the window of the full tokenization it must keep
        "long reply": {"instruction": "Say hi", "output": "word " * 200},
        "long prompt": {"instruction": "q " * 200, "output": "short answer"},
        "both long": {"instruction": "q " * 200, "output": "word " * 200},
    }
    for name, rec in cases.items():
        _, status, (full, full_mask), truncated = encode_one(tok_dir, "sft", rec, 100_000)
        assert status == "ok" and not truncated and len(full) > L
        p, n = int(np.flatnonzero(full_mask)[0]), len(full)  # prompt tokens, all tokens
        reply = max(L - p, L // 2)  # the rule, written out: the reply keeps at least half the row
        lo = max(p - (L - min(reply, n - p)), 0)
        _, status, (ids, mask), truncated = encode_one(tok_dir, "sft", rec, L)
        assert status == "ok" and truncated and len(ids) == L, name
        assert ids.tolist() == full[lo : lo + L].tolist() and mask.tolist() == full_mask[lo : lo + L].tolist(), name
    assert lo == p - L // 2  # both long: half prompt end, half reply start
    assert encode_one(tok_dir, "sft", cases["long reply"], L, "drop")[1:3] == ("err", "overlong")
    # dpo: the same rule per sequence (seq_len is the cutoff of each), the same prompt end in both
    pair = {"instruction": "q " * 200, "chosen": "yes " * 100, "rejected": "no"}
    _, _, (full_segs, *_), _ = encode_one(tok_dir, "dpo", pair, 100_000)  # payload: segments first
    _, status, (segs, *_), truncated = encode_one(tok_dir, "dpo", pair, L)
    assert status == "ok" and truncated and all(len(a) <= L for a, _ in segs)
    p = int(np.flatnonzero(full_segs[0][1])[0])
    assert segs[0][0].tolist() == full_segs[0][0][p - L // 2 : p + L // 2].tolist()  # half the cutoff each
    assert segs[1][0].tolist() == full_segs[1][0][p - L // 2 :].tolist()  # same prompt end, whole short reply


def test_summary_warns_past_one_percent_with_the_flag(tok_dir, tmp_path):
    from bumblefast.prep.run import summary

    recs = [{"instruction": "Say hi", "output": "word " * 200}] + [{"instruction": "Add", "output": "5"}] * 9
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    m = prep(tok_dir, tmp_path / "t", "sft", [path], seq_len=64)
    assert m["records"]["truncated"] == 1 and m["records"]["written"] == 10
    text = summary(m, "OUT", 1.0)
    assert "10 records read, 10 written, 0 skipped (none), 1 truncated" in text
    assert "warning: 1 records (10.0%) were truncated" in text and "--overlong drop" in text
    m = prep(tok_dir, tmp_path / "d", "sft", [path], seq_len=64, overlong="drop")
    text = summary(m, "OUT", 1.0)
    assert "1 skipped (1 overlong)" in text and "dropped; --overlong truncate keeps them" in text
