"""Tokenizer backends in prep: fastokens is used only when it matches HF `tokenizers` (ids and
token start offsets) on a hard sample; a mismatch falls back to HF loudly; both backends write
byte-identical shards, identical to main's pre-backend pipeline; multi-node prep splits the
input so each line is read by exactly one node."""

from __future__ import annotations

import hashlib
import json
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
from helpers import DEMO

from bumblefast.config import PrepConfig, UserError
from bumblefast.prep.run import run_prep

STAGE_FILES = {
    "pretrain": ["pretrain.json"],
    "sft": ["sft_alpaca.json", "sft_sharegpt.json"],
    "dpo": ["dpo.json"],
}

# sha256 of the uncompressed shard files written by main's prep (commit 82cfe2e, before the
# backends) for the demo inputs at seq_len 256 (dpo: rows of 256, now prepped at a per-sequence
# cutoff of 128, which cuts none of these pairs) with the 1024-id demo tokenizer trained below;
# valid only for that tokenizer (its tokenizer.json hash,
# `tokenizer_hash`), which BPE training reproduces.
# Regenerated 2026-12-01 when the demo data changed, and 2026-12-02 when train_tokenizer began adding
# the chat template's words to its corpus: 82cfe2e's prep/ shards/ bumblefast/ from `git archive`
# (prep/, shards/, kernels/ moved under bumblefast/), run with PYTHONPATH (and working folder) on that
# tree, seq_len 256, compression=None, on the tokenizer today's train_tokenizer writes.
MAIN_SHARDS = {
    "tokenizer_sha256": "bcea5be1d6a0cb088fb423f27e31f6b60dcc220cd3d69bcf1e8b1847d3537249",
    "pretrain": "3d0fb3571434a9cdc38dab9782664413fdb2d3fe4a079db802d536057edfc40b",
    "sft": "d9a91775325e8fbf2f573ec7f6fedd0c88af3821bc904d853d9be4f708e5ec58",
    "dpo": "e1da18a3c7e4bbe66247d781ee2a800a035ebff50fc45666ce8b1433b403dfbe",
}


def tokenizer_hash(tok_dir: str) -> str:
    """sha256 of tokenizer.json as canonical JSON, with an identity post-processor read as none:
    transformers 5 saves `TemplateProcessing` [A] / [A, B] without special tokens where 4.57 saved
    null (same ids; the vocab and merges BPE training gives are the same under both)."""
    data = json.loads(Path(tok_dir, "tokenizer.json").read_text())
    post = data.get("post_processor")
    if post and post.get("type") == "TemplateProcessing" and not post.get("special_tokens"):
        if [s["Sequence"]["id"] for s in post["single"]] == ["A"]:
            data["post_processor"] = None
    return hashlib.sha256(json.dumps(data, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


fastokens = pytest.importorskip("fastokens", reason="fastokens not installed (a regular dependency)")


@pytest.fixture(scope="module")
def hf(tok_dir):
    from bumblefast.tokenizer import load_tokenizer

    return load_tokenizer(tok_dir)


pytestmark = pytest.mark.usefixtures("clean_shm")


def demo_texts(hf) -> list[str]:
    """Pretrain documents and rendered chats of the demo data (what prep tokenizes)."""
    texts = [r["text"] for r in json.loads((DEMO / "pretrain.json").read_text())][:80]
    for r in json.loads((DEMO / "sft_sharegpt.json").read_text())[:80]:
        msgs = [
            {
                "role": {"human": "user", "gpt": "assistant"}.get(m["from"], m["from"]),
                "content": m["value"],
            }
            for m in r["conversations"]
        ]
        texts.append(hf.apply_chat_template(msgs, tokenize=False))
    return texts


def prep(tok_dir, out, stage, backend, **kw):
    cfg = PrepConfig(
        stage=stage,
        input=[str(DEMO / f) for f in STAGE_FILES[stage]],
        tokenizer_name_or_path=tok_dir,
        seq_len=128 if stage == "dpo" else 256,  # dpo: per sequence, rows of 2 x 128 (main's rows of 256)
        output_dir=str(out),
        tokenizer_backend=backend,
        **kw,
    )
    return run_prep(cfg, progress=False)


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("shard.*"))}


# ---- the backend and its verification ------------------------------------------------------------
def test_auto_picks_fastokens_and_matches_hf_ids_and_offsets(hf, tok_dir):
    from bumblefast.tokenizer_backend import open_encoder

    enc, info = open_encoder(hf, tok_dir, "auto", offsets=True)
    assert info.name == "fastokens" and info.version == metadata.version("fastokens")
    assert info.verified_strings >= 20 and info.fallback_reason is None and info.offsets == "byte lengths"
    texts = demo_texts(hf) + ["e\u0301 not NFC", "  lead", "🐝x<|im_end|>\n"]
    ref = hf.backend_tokenizer.encode_batch(texts, add_special_tokens=False)  # the independent reference
    got = enc.encode_with_starts(texts)
    for r, (ids, starts) in zip(ref, got, strict=True):
        assert ids.tolist() == r.ids
        assert starts.tolist() == [o[0] for o in r.offsets]
    flat, lens = enc.encode_flat(texts)
    assert flat.tolist() == [i for r in ref for i in r.ids] and lens.tolist() == [len(r.ids) for r in ref]


def test_verification_sample_covers_the_hard_cases(hf):
    from bumblefast.tokenizer_backend import LONG_LINE_CHARS, verification_sample

    sample = dict(verification_sample(hf, [("input record a.jsonl:1", "hello")]))
    for label in (
        "chinese",
        "english",
        "code",
        "emoji",
        "combining",
        "whitespace runs",
        "chat template",
        "chat template + generation prompt",
        "input record a.jsonl:1",
    ):
        assert label in sample
    for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        assert sample[f"special {t}"] == t
    assert len(sample["100k-character line"]) == LONG_LINE_CHARS and "\n" not in sample["100k-character line"]
    assert "<|im_start|>assistant" in sample["chat template"]


def test_forced_mismatch_falls_back_loudly_and_forced_backend_fails(hf, tok_dir, tmp_path, monkeypatch, capsys):
    from bumblefast import tokenizer_backend as TB

    real = TB.FastokensEncoder.encode_flat

    def wrong_on_emoji(self, texts):  # one id off, only in the string holding the bee
        flat, lens = real(self, texts)
        flat = flat.copy()
        k = next(i for i, t in enumerate(texts) if "🐝🐝" in t)
        flat[int(lens[:k].sum())] += 1
        return flat, lens

    monkeypatch.setattr(TB.FastokensEncoder, "encode_flat", wrong_on_emoji)
    enc, info = TB.open_encoder(hf, tok_dir, "auto")
    assert info.name == "hf" and isinstance(enc, TB.HFEncoder)
    assert "'emoji'" in info.fallback_reason and "first difference at token 0" in info.fallback_reason
    err = capsys.readouterr().err
    assert "WARNING" in err and "falling back to HF" in err and "'emoji'" in err
    with pytest.raises(UserError, match="'emoji'"):
        TB.open_encoder(hf, tok_dir, "fastokens")
    # a prep run under auto records the fallback and still writes the HF shards
    m = prep(tok_dir, tmp_path / "fallback", "pretrain", "auto")
    assert m["tokenizer"]["backend"]["name"] == "hf" and "'emoji'" in m["tokenizer"]["backend"]["fallback_reason"]


def test_offset_mismatch_alone_falls_back_for_chat_stages(hf, tok_dir, monkeypatch):
    from bumblefast import tokenizer_backend as TB

    real = TB.FastokensEncoder.encode_with_starts

    def late_last_token(self, texts):  # ids right, the last token's start one character late
        return [(ids, np.concatenate([st[:-1], st[-1:] + 1])) for ids, st in real(self, texts)]

    monkeypatch.setattr(TB.FastokensEncoder, "encode_with_starts", late_last_token)
    _, info = TB.open_encoder(hf, tok_dir, "auto", offsets=False)
    assert info.name == "fastokens"  # ids still agree: fine for pretrain
    _, info = TB.open_encoder(hf, tok_dir, "auto", offsets=True)
    assert info.name == "hf" and "token offsets differ" in info.fallback_reason


def test_real_tokenizer_fastokens_encodes_differently_falls_back(tmp_path, capsys):
    """A BPE with dropout (HF samples merges at random; fastokens does not) and one with a
    normalizer fastokens cannot load: auto falls back to HF for both, naming why."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from bumblefast.tokenizer_backend import open_encoder

    texts = [r["text"] for r in json.loads((DEMO / "pretrain.json").read_text())]
    for name, dropout, norm in [("dropout", 0.5, None), ("nfkc", None, normalizers.NFKC())]:
        tok = Tokenizer(models.BPE(dropout=dropout))
        if norm is not None:
            tok.normalizer = norm
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.train_from_iterator(
            texts,
            trainers.BpeTrainer(
                vocab_size=600,
                special_tokens=["<|endoftext|>"],
                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                show_progress=False,
            ),
        )
        folder = tmp_path / name
        PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(folder)
        hf = PreTrainedTokenizerFast.from_pretrained(folder)
        _, info = open_encoder(hf, str(folder), "auto")
        assert info.name == "hf", name
        expect = "ids differ" if name == "dropout" else "could not load"
        assert expect in info.fallback_reason, info.fallback_reason
    assert capsys.readouterr().err.count("falling back to HF") == 2


def test_chat_template_that_raises_is_named_in_a_warning_and_the_manifest(tok_dir, tmp_path, capsys):
    """A template that rejects tools: the strings it could not render are not verified, and
    that is said (stderr) and recorded with the cause (the manifest's backend entry)."""
    import shutil

    from bumblefast.tokenizer import load_tokenizer
    from bumblefast.tokenizer_backend import open_encoder

    folder = tmp_path / "no_tools_tok"
    shutil.copytree(tok_dir, folder)
    hf = load_tokenizer(str(folder))
    hf.chat_template = "{% if tools %}{{ raise_exception('this template takes no tools') }}{% endif %}" + (
        hf.chat_template
    )
    hf.save_pretrained(folder)
    capsys.readouterr()
    _, info = open_encoder(load_tokenizer(str(folder)), str(folder), "auto", offsets=True)
    assert info.name == "fastokens"
    assert info.unverified == ["chat template + tools: TemplateError: this template takes no tools"]
    assert info.as_dict()["unverified"] == info.unverified
    err = capsys.readouterr().err
    assert "WARNING" in err and "chat template + tools" in err and "this template takes no tools" in err
    m = prep(str(folder), tmp_path / "sft", "sft", "auto")
    assert m["tokenizer"]["backend"]["unverified"] == info.unverified


def test_auto_without_fastokens_installed_warns_and_records_it(hf, tok_dir, monkeypatch, capsys):
    from bumblefast import tokenizer_backend as TB

    monkeypatch.setattr(TB, "fastokens_version", lambda: None)
    enc, info = TB.open_encoder(hf, tok_dir, "auto")
    assert isinstance(enc, TB.HFEncoder) and info.fallback_reason == "fastokens is not installed"
    err = capsys.readouterr().err
    assert "WARNING" in err and "fastokens is not installed" in err and "falling back to HF" in err
    with pytest.raises(UserError, match="fastokens package is not installed"):
        TB.open_encoder(hf, tok_dir, "fastokens")


# ---- shards: identical across backends and to main's pipeline ----------------------------------
@pytest.mark.parametrize("stage", ["pretrain", "sft", "dpo"])
def test_backends_write_byte_identical_shards_equal_to_main(tok_dir, tmp_path, stage):
    got = {}
    for backend in ("hf", "fastokens"):
        m = prep(tok_dir, tmp_path / backend, stage, backend)
        assert m["tokenizer"]["backend"]["name"] == backend
        got[backend] = (shard_bytes(tmp_path / backend), m["fingerprint"])
        # main's pipeline wrote dpo pairs unshared: compare that layout (the shared one is new)
        old_layout = {"share_prompt": False} if stage == "dpo" else {}
        un = prep(tok_dir, tmp_path / f"{backend}-raw", stage, backend, compression=None, **old_layout)
        if not old_layout:
            assert un["records"]["written"] == m["records"]["written"]
        assert tokenizer_hash(tok_dir) == MAIN_SHARDS["tokenizer_sha256"], (
            "the demo tokenizer changed (demo data or tokenizers' BPE training): regenerate MAIN_SHARDS"
        )
        h = hashlib.sha256()
        for b in shard_bytes(tmp_path / f"{backend}-raw").values():
            h.update(b)
        assert h.hexdigest() == MAIN_SHARDS[stage], f"{backend} shards differ from main's pipeline"
    assert got["hf"][0] and got["hf"] == got["fastokens"]  # same bytes, same fingerprint


def test_fastokens_with_workers_matches_one_process(tok_dir, tmp_path):
    prep(tok_dir, tmp_path / "w1", "sft", "fastokens")
    prep(tok_dir, tmp_path / "w2", "sft", "fastokens", num_workers=2)
    assert shard_bytes(tmp_path / "w1") == shard_bytes(tmp_path / "w2")


# ---- multi-node: each node reads only its share ----------------------------------------------------
def test_node_share_reads_every_line_once_with_exact_line_numbers(tmp_path):
    from bumblefast.prep.sources import iter_records
    from bumblefast.prep.split import iter_share, node_share

    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text(
        "".join(
            json.dumps({"text": "x" * (i % 17 + 1), "i": i}) + "\n" + ("\n" if i % 5 == 0 else "") for i in range(301)
        )
    )
    b.write_text("".join(json.dumps({"text": "y", "i": i}) + "\n" for i in range(7)))  # no newline issues
    arr = tmp_path / "c.json"
    arr.write_text(json.dumps([{"text": "z"}] * 5))
    files = [str(a), str(b), str(arr)]
    whole = [(w, str(r)) for w, r in iter_records(files)]
    for k in (1, 2, 3, 7):
        parts = [[(w, str(r)) for w, r in iter_share(node_share(files, r, k))] for r in range(k)]
        assert sorted(x for p in parts for x in p) == sorted(whole)  # each line once, same `where`
        assert [x for p in parts for x in p] == whole  # and in file order, node by node
    shares = [node_share(files, r, 2) for r in range(2)]
    assert shares[0][0][:2] == (str(a), 0) and shares[1][-1] == (str(arr), 0, None)
    assert shares[0][0][2] == shares[1][0][1]  # a.jsonl is cut between the two nodes


def test_two_nodes_split_a_jsonl_and_merge(tok_dir, tmp_path):
    from bumblefast.prep.cli import main as prep_main

    src = tmp_path / "in.jsonl"
    texts = [r["text"] for r in json.loads((DEMO / "pretrain.json").read_text())]
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    whole = run_prep(
        PrepConfig(
            stage="pretrain",
            input=[str(src)],
            tokenizer_name_or_path=tok_dir,
            seq_len=256,
            output_dir=str(tmp_path / "one"),
            task_size=str(src.stat().st_size // 2 + 1),
        ),
        progress=False,
    )
    reads = []
    for r in range(2):
        m = run_prep(
            PrepConfig(
                stage="pretrain",
                input=[str(src)],
                tokenizer_name_or_path=tok_dir,
                seq_len=256,
                output_dir=str(tmp_path / "multi"),
                node_rank=r,
                num_nodes=2,
                task_size=str(src.stat().st_size // 2 + 1),
            ),
            progress=False,
        )
        ((f, unit, a, b),) = m["pieces"]
        assert f == str(src) and unit == "bytes" and b - a < src.stat().st_size  # a byte range, not the whole file
        reads.append(m["records"]["read"])
    assert prep_main(["merge", str(tmp_path / "multi")]) == 0
    merged = json.loads((tmp_path / "multi" / "bumblefast.json").read_text())
    assert sum(reads) == merged["records"]["read"] == whole["records"]["read"] == len(texts)
    assert min(reads) > 0.3 * len(texts)  # both nodes got a real share
    assert merged["records"]["written"] == whole["records"]["written"]
