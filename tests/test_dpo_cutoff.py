"""DPO truncation does not depend on the layout: `--seq_len` is the cutoff of each sequence
(prompt + chosen, prompt + rejected), the same rule cuts both layouts, and the shards of the
unshared and the shared-prompt layouts hold the same token sequences and loss masks for every
pair (read back with streaming's own reader), so `bumblefast eval` gives the same margins."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from bumblefast.prep.cutoff import cut_pair

CUTOFF = 96  # per sequence: cuts most dpo_zh_demo pairs with the 1024-id demo tokenizer


# ---- the rule on token arrays -------------------------------------------------------------------
def _seq(head: np.ndarray, tail: np.ndarray, untrained_tail: int = 0):
    """(ids, mask): an untrained head, then a tail whose first `untrained_tail` tokens are
    untrained too (a seam token the tokenizer merged differently), the rest trained."""
    mask = np.concatenate([np.zeros(len(head) + untrained_tail), np.ones(len(tail) - untrained_tail)])
    return np.concatenate([head, tail]).astype(np.int64), mask.astype(np.uint8)


@pytest.mark.parametrize("seed", range(40))
def test_cut_pair_keeps_one_prompt_window_and_each_reply_start(seed):
    rng = np.random.default_rng(seed)
    cutoff = int(rng.integers(8, 64))
    prompt = rng.integers(10, 1000, int(rng.integers(0, 3 * cutoff)))
    seam = int(rng.integers(0, 2))  # chosen's first tail token untrained (a differently merged seam)
    tails = [rng.integers(10, 1000, int(rng.integers(1 + seam, 2 * cutoff))) for _ in range(2)]
    tails[0][0], tails[1][0] = 1, 2  # the sequences differ right after the prompt
    chosen, rejected = _seq(prompt, tails[0], seam), _seq(prompt, tails[1])
    cut = cut_pair(chosen, rejected, cutoff)
    P, R = len(prompt), max(len(t) for t in tails)
    if P + R <= cutoff:  # within the cutoff: untouched
        assert all(np.array_equal(a, b) for (a, _), (b, _) in zip(cut, (chosen, rejected), strict=True))
        return
    n = min(len(ids) for ids, _ in cut)
    keep_p = int(np.flatnonzero(cut[0][0][:n] != cut[1][0][:n])[0])  # where the replies start (1 vs 2)
    for (ids, mask), full, tail in zip(cut, (chosen, rejected), tails, strict=True):
        assert len(ids) <= cutoff
        assert ids[:keep_p].tolist() == prompt[P - keep_p :].tolist()  # the prompt's end, the same window
        kept = ids[keep_p:]
        assert kept.tolist() == tail[: len(kept)].tolist()  # the reply keeps its start
        start = P - keep_p
        assert mask.tolist() == full[1][start : start + len(ids)].tolist()  # masks cut with their tokens
        assert len(kept) >= min(len(tail), cutoff // 2)  # a reply keeps at least half the cutoff
    # nothing is cut that fits: the longer sequence fills the cutoff exactly
    assert max(len(ids) for ids, _ in cut) == cutoff
    assert keep_p == min(P, cutoff - min(R, max(cutoff - P, cutoff // 2)))


def test_encoder_cuts_both_layouts_alike_and_skips_a_pair_left_without_reply():
    """The encoder's per-pair decision (tokens given): the same sequences, flag and counts for
    both layouts; a cut that keeps only an untrained seam token of a reply is skipped, counted."""
    from types import SimpleNamespace

    from bumblefast.prep import share
    from bumblefast.prep.encode import Encoder, EncodeSettings, Skipped

    prompt = np.arange(10, 40)
    chosen, rejected = _seq(prompt, np.array([1, 5, 6, 7, 8, 9, 11])), _seq(prompt, np.array([2, 5, 6]))
    out = {}
    for flag in (False, True):
        enc = SimpleNamespace(s=EncodeSettings("dpo", "unused", 16, share_prompt=flag))
        r = Encoder._dpo_result(enc, "f:1", [chosen, rejected])
        segs = r.segments
        if flag:  # rebuild the rejected sequence from the shared prompt
            head = max(r.prompt_len - 1, 0)
            segs = [segs[0], (np.concatenate([segs[0][0][:head], segs[1][0]]), segs[1][1])]
        out[flag] = (r.truncated, r.pair_tokens, r.prompt_tokens, [s[0].tolist() for s in segs])
    assert out[False] == out[True] and out[False][0]
    # the longer reply (7) fits the cutoff of 16 whole, the prompt keeps its last 9 tokens in both
    assert out[False][3] == [list(range(31, 40)) + [1, 5, 6, 7, 8, 9, 11], list(range(31, 40)) + [2, 5, 6]]
    assert out[False][1:3] == (16 + 12, 9) and share.prompt_len(*cut_pair(chosen, rejected, 16)) == 9
    # the reply's first token untrained (a seam merged into the prompt's last token), budget 1
    seamy = _seq(prompt, np.array([1, 5, 6]), untrained_tail=1), _seq(prompt, np.array([2, 5, 6]), untrained_tail=1)
    r = Encoder._dpo_result(SimpleNamespace(s=EncodeSettings("dpo", "unused", 2)), "f:2", list(seamy))
    assert isinstance(r, Skipped) and r.reason == "overlong" and "no reply token" in r.message


# ---- prep: both layouts hold the same sequences ---------------------------------------------------
def _long_pairs() -> list[dict]:
    """Pairs over the cutoff every way the rule distinguishes: long prompt, long replies, both,
    replies of very different lengths, a long multi-turn history, pairs just over the cutoff
    whose shared group would fit a row, and pairs that fit."""
    turn = lambda who, v: {"from": who, "value": v}  # noqa: E731
    words = "the cat sat on a mat and then ran off to see the dog ".split()
    text = lambda n, k=0: " ".join(words[(i + k) % len(words)] for i in range(n))  # noqa: E731
    history = [turn("human", text(40)), turn("gpt", text(50, 3)), turn("human", text(30, 5))]
    return [
        {"instruction": text(200), "chosen": "yes", "rejected": "no, not at all"},  # long prompt
        {"instruction": "Say hi", "chosen": text(150), "rejected": text(120, 2)},  # long replies
        {"instruction": text(120, 1), "chosen": text(150, 4), "rejected": text(90, 6)},  # both long
        {"instruction": text(30), "chosen": text(200, 1), "rejected": "ok"},  # very different replies
        {"instruction": text(60, 2), "chosen": "ok", "rejected": text(70, 3)},  # rejected the long one
        {"conversations": history, "chosen": turn("gpt", text(20)), "rejected": turn("gpt", text(25, 1))},
        # over the cutoff, though the shared group fits a row (where the layouts used to differ)
        {"instruction": text(25), "chosen": text(25, 2), "rejected": text(8, 1)},
        {"instruction": text(40, 3), "chosen": text(10), "rejected": "no"},
        {"instruction": "Add 2 and 3", "chosen": "5", "rejected": "6"},  # fits
        {"system": "Be brief.", "instruction": text(10), "chosen": text(8), "rejected": text(9, 1)},  # fits
    ]


def _pairs_file(tmp_path: Path, data: str, shared_dir: Path | None, limit: int | None = None) -> Path:
    recs = _long_pairs()
    if data == "dpo_zh_demo":
        recs = json.loads((shared_dir / "dpo_zh_demo.json").read_text(encoding="utf-8"))[:limit] + recs
    path = tmp_path / f"{data}.json"
    path.write_text(json.dumps(recs, ensure_ascii=False), encoding="utf-8")
    return path


def _prep(tok_dir, pairs: Path, out: Path, share_prompt: bool, cutoff: int = CUTOFF) -> dict:
    from bumblefast.config import PrepConfig
    from bumblefast.prep.run import run_prep

    cfg = PrepConfig(
        stage="dpo",
        input=[str(pairs)],
        tokenizer_name_or_path=str(tok_dir),
        seq_len=cutoff,
        output_dir=str(out),
        share_prompt=share_prompt,
    )
    return run_prep(cfg, progress=False)


def _pairs_from_shards(out: Path) -> Counter:
    """Every pair of a dpo shard folder as (chosen ids, chosen mask, rejected ids, rejected mask),
    read with streaming's StreamingDataset; a shared-prompt pair's rejected sequence is rebuilt
    as the trainer reads it: the chosen segment's first prompt_lens - 1 tokens, then its segment."""
    from streaming import StreamingDataset

    ds = StreamingDataset(local=str(out), batch_size=1)
    got = Counter()
    for i in range(ds.num_samples):
        row = ds[i]
        ids, mask, lens = (np.asarray(row[k]) for k in ("input_ids", "loss_mask", "seq_lens"))
        starts = np.cumsum([0, *lens.tolist()])
        segs = [(ids[a:b], mask[a:b]) for a, b in zip(starts[:-1], starts[1:], strict=True)]
        prompts = row.get("prompt_lens")
        for k in range(0, len(segs), 2):
            (c, cm), (r, rm) = segs[k], segs[k + 1]
            if prompts is not None:
                head = max(int(prompts[k // 2]) - 1, 0)
                assert not cm[:head].any() and not rm[:1].any()  # the stored prompt is untrained
                r, rm = np.concatenate([c[:head], r]), np.concatenate([cm[:head], rm])
            got[(tuple(c.tolist()), tuple(cm.tolist()), tuple(r.tolist()), tuple(rm.tolist()))] += 1
    return got


def _expected_pairs(tok, pairs: Path, cutoff: int) -> tuple[Counter, int]:
    """The cut pairs from the HF tokenizer's own chat rendering and tokens, the rule written out:
    the reply (from the generation prompt's end; trained through <|im_end|>, not the newline
    after it) keeps its start, the longer reply's budget is max(cutoff - prompt, cutoff // 2),
    the prompt keeps its end in what is left; and how many pairs that cuts."""
    from bumblefast.prep.records import dpo_pair

    expected, cut = Counter(), 0
    for rec in json.loads(pairs.read_text(encoding="utf-8")):
        prompt, chosen, rejected, tools = dpo_pair(rec)
        head = tok.apply_chat_template(prompt, tools=tools, tokenize=False, add_generation_prompt=True)
        P = len(tok(head, add_special_tokens=False)["input_ids"])
        full = []
        for reply in (chosen, rejected):
            text = tok.apply_chat_template(prompt + [reply], tools=tools, tokenize=False)
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert ids[-1] == tok("\n", add_special_tokens=False)["input_ids"][-1]  # the untrained newline
            full.append((ids, [0] * P + [1] * (len(ids) - P - 1) + [0]))
        R = max(len(ids) for ids, _ in full) - P
        keep_r = R if P + R <= cutoff else min(R, max(cutoff - P, cutoff // 2))
        lo = P - min(P, cutoff - keep_r)
        cut += P + R > cutoff
        key = []
        for ids, mask in full:
            key += [tuple(ids[lo : P + keep_r]), tuple(mask[lo : P + keep_r])]
        expected[tuple(key)] += 1
    return expected, cut


@pytest.fixture(params=["long_pairs", "dpo_zh_demo"])
def data(request, tmp_path):
    shared = None
    if request.param == "dpo_zh_demo":
        shared = request.getfixturevalue("shared_data")  # skips where ../shared/data is absent
    return _pairs_file(tmp_path, request.param, shared)


def test_both_layouts_hold_the_same_cut_sequences(data, tmp_path, demo_tokenizer_dir):
    from bumblefast.tokenizer import load_tokenizer

    manifests, pairs = {}, {}
    for layout, flag in (("pairs", False), ("shared_prompt", True)):
        manifests[layout] = _prep(demo_tokenizer_dir, data, tmp_path / layout, flag)
        pairs[layout] = _pairs_from_shards(tmp_path / layout)
    expected, cut = _expected_pairs(load_tokenizer(str(demo_tokenizer_dir)), data, CUTOFF)
    assert pairs["pairs"] == pairs["shared_prompt"] == expected  # every pair, tokens and masks
    n = sum(expected.values())
    assert cut >= (n // 2 if "zh" in data.name else 8)  # the set is mostly over the cutoff
    mp, ms = manifests["pairs"], manifests["shared_prompt"]
    assert mp["records"] == ms["records"]  # read, written, skipped, truncated: per record, not per layout
    assert mp["records"]["truncated"] == cut and mp["records"]["written"] == n and mp["records"]["skipped"] == 0
    assert mp["seq_len"] == ms["seq_len"] == 2 * CUTOFF and mp["prep"]["cutoff_len"] == CUTOFF
    assert mp["tokens"]["target"] == ms["tokens"]["target"] and ms["tokens"]["real"] < mp["tokens"]["real"]
    assert all(max(len(k[0]), len(k[2])) <= CUTOFF for k in expected)


def test_overlong_drop_drops_the_same_pairs_in_both_layouts(tmp_path, demo_tokenizer_dir):
    from bumblefast.config import PrepConfig
    from bumblefast.prep.run import run_prep

    data = _pairs_file(tmp_path, "long_pairs", None)
    got = []
    for flag in (False, True):
        cfg = PrepConfig(
            stage="dpo",
            input=[str(data)],
            tokenizer_name_or_path=str(demo_tokenizer_dir),
            seq_len=CUTOFF,
            output_dir=str(tmp_path / str(flag)),
            share_prompt=flag,
            overlong="drop",
        )
        m = run_prep(cfg, progress=False)
        got.append((m["records"], _pairs_from_shards(tmp_path / str(flag))))
    assert got[0] == got[1]
    assert got[0][0]["skipped_by_reason"] == {"overlong": 8} and got[0][0]["written"] == 2


# ---- eval: the same margins from either layout ---------------------------------------------------
def _margins(model, out: Path) -> dict[tuple, float]:
    """Per pair, logp(chosen) - logp(rejected) as `bumblefast eval` computes them on the shards'
    batches, keyed by the pair's two token sequences (a shared pair's rejected one rebuilt)."""
    from bumblefast.evaluate import pair_margins
    from bumblefast.shards.reader import build_loader

    margins = {}
    for b in build_loader(str(out), batch_size=4, shuffle=False):
        n = b.n_segments
        per_pair = pair_margins(model, b).tolist()
        cu, ids = b.cu_seqlens.tolist(), b.input_ids.tolist()
        prefix = b.kv_prefix.tolist() if b.kv_prefix is not None else [0] * n
        for k in range(0, n, 2):
            chosen = tuple(ids[cu[k] : cu[k + 1]])
            rejected = chosen[: prefix[k + 1]] + tuple(ids[cu[k + 1] : cu[k + 2]])
            margins[(chosen, rejected)] = per_pair[k // 2]
    return margins


def test_eval_margins_agree_between_layouts(tmp_path, demo_tokenizer_dir, shared_data):
    from helpers import save_tiny_model

    from bumblefast.evaluate import evaluate
    from bumblefast.model import Bumblebee

    data = _pairs_file(tmp_path, "dpo_zh_demo", shared_data, limit=16)  # small: CI's 2 cores
    n = 16 + len(_long_pairs())
    for layout, flag in (("pairs", False), ("shared_prompt", True)):
        _prep(demo_tokenizer_dir, data, tmp_path / layout, flag)
    path = save_tiny_model(tmp_path / "model", demo_tokenizer_dir)
    model = Bumblebee.from_pretrained(path, torch_dtype=torch.float32).eval()
    a, b = (_margins(model, tmp_path / layout) for layout in ("pairs", "shared_prompt"))
    assert a.keys() == b.keys() and len(a) == n
    keys = sorted(a)
    np.testing.assert_allclose([b[k] for k in keys], [a[k] for k in keys], rtol=1e-5, atol=1e-4)
    evals = [evaluate(path, tmp_path / layout) for layout in ("pairs", "shared_prompt")]
    assert evals[0]["n"] == evals[1]["n"] == n
    assert evals[1]["mean_margin"] == pytest.approx(evals[0]["mean_margin"], rel=1e-5, abs=1e-4)
    # accuracy counts margin signs: only a margin within float noise of 0 could flip between layouts
    near_zero = sum(abs(m) < 1e-3 for m in a.values())
    assert abs(evals[0]["preference_accuracy"] - evals[1]["preference_accuracy"]) * n <= near_zero + 1e-9


# ---- train accepts the rows ----------------------------------------------------------------------
def test_train_reads_dpo_rows_of_twice_the_cutoff(tmp_path, demo_tokenizer_dir):
    from bumblefast.config import UserError, load_train_config
    from bumblefast.train.data import open_loader

    data = _pairs_file(tmp_path, "long_pairs", None)
    m = _prep(demo_tokenizer_dir, data, tmp_path / "shards", True)
    assert m["seq_len"] == 2 * CUTOFF
    overrides = {"dataset_path": str(tmp_path / "shards"), "cutoff_len": str(CUTOFF), "shuffle": "false"}
    loader, meta, _ = open_loader(load_train_config("dpo", overrides=overrides), str(demo_tokenizer_dir))
    batch = next(iter(loader))
    assert meta["seq_len"] == 2 * CUTOFF
    assert int(batch.row_capacity) == 2 * CUTOFF * len(batch.sample_ids) >= int(batch.num_tokens)
    overrides["cutoff_len"] = str(CUTOFF - 1)  # shards cut at a longer cutoff than the run allows
    with pytest.raises(UserError, match="per sequence"):
        open_loader(load_train_config("dpo", overrides=overrides), str(demo_tokenizer_dir))
