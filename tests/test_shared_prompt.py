"""DPO with a shared prompt: per-segment log-probs, losses and gradients on shared-prompt rows
equal the unshared [prompt+chosen][prompt+rejected] rows of the same pairs (fp32, CPU, every
CPU attention backend), and prep writes the layout the trainer reads."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import ROOT, TINY, prep

from bumblefast.prep import share
from bumblefast.shards.collate import collate_rows
from bumblefast.train.objectives import segment_stats

CPU_BACKENDS = ("sdpa", "sdpa_mask")


def _pair(rng, prompt: int, chosen: int, rejected: int, turns: int = 1):
    """(chosen, rejected) token sequences with loss masks: a prompt (multi-turn: earlier
    assistant turns are in it, untrained, as prep masks a dpo history) then each reply."""
    p = rng.integers(3, 1000, prompt)
    segs = []
    for n in (chosen, rejected):
        reply = rng.integers(3, 1000, n)
        reply[0] = 1 if n is chosen else 2  # the replies differ at their first token
        ids = np.concatenate([p, reply]).astype(np.uint32)
        mask = np.concatenate([np.zeros(prompt), np.ones(n)]).astype(np.uint8)
        segs.append((ids, mask))
    return segs


# (prompt, chosen, rejected) per pair of one row; the cases the issue names
ROWS = {
    "single_turn": [(12, 7, 9), (20, 5, 5), (6, 11, 3)],
    "multi_turn": [(90, 9, 14), (70, 6, 4)],
    "very_different_lengths": [(10, 60, 2), (8, 1, 45)],
    "one_token_replies": [(9, 1, 1), (15, 1, 6), (4, 5, 1)],
    "prompt_fills_the_row": [(230, 3, 4)],
}


def _rows(case: str, seed: int = 0):
    """The same pairs as an unshared row and as a shared-prompt row (built by prep's share)."""
    rng = np.random.default_rng(seed)
    pairs = [_pair(rng, *spec) for spec in ROWS[case]]
    plain = {"input_ids": [], "loss_mask": [], "seq_lens": []}
    shared = {"input_ids": [], "loss_mask": [], "seq_lens": [], "prompt_lens": []}
    for chosen, rejected in pairs:
        p = share.prompt_len(chosen, rejected)
        assert p == len(chosen[0]) - int(chosen[1].sum())  # the whole untrained head is shared
        for row, segs in ((plain, [chosen, rejected]), (shared, share.share(chosen, rejected, p))):
            for ids, mask in segs:
                row["input_ids"].append(ids)
                row["loss_mask"].append(mask)
                row["seq_lens"].append(len(ids))
        shared["prompt_lens"].append(p)
    out = []
    for row in (plain, shared):
        row = {
            k: (np.concatenate(v) if k in ("input_ids", "loss_mask") else np.asarray(v, np.uint32))
            for k, v in row.items()
        }
        out.append({**row, "sample_id": 0})
    return out


def _model(backend: str):
    from transformers import AutoConfig

    from bumblefast.model import Bumblebee

    torch.manual_seed(0)
    return Bumblebee(AutoConfig.from_pretrained(TINY), attn_backend=backend, kernels="reference").init_weights()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", list(ROWS))
def test_shared_prompt_logps_losses_and_grads_equal_unshared(case, backend):
    from bumblefast.train.objectives import DPOObjective
    from bumblefast.train.pref_losses import PrefLossConfig

    plain_row, shared_row = _rows(case)
    assert len(shared_row["input_ids"]) < len(plain_row["input_ids"])
    plain, shared = (collate_rows([r], "dpo", seq_len=256) for r in (plain_row, shared_row))
    assert shared.kv_prefix is not None and plain.kv_prefix is None
    # the shared row carries the same targets, so the same pair structure and counts
    assert torch.equal(plain.labels[plain.labels != -100], shared.labels[shared.labels != -100])

    results = {}
    for name, batch in (("plain", plain), ("shared", shared)):
        model = _model(backend)  # the same seeded weights each time
        n = batch.n_segments
        with torch.no_grad():
            logps = segment_stats(model, batch)[0]
            h = model.hidden_states(batch)
            keep = batch.labels != -100  # per target token, by the plain formula
            tokens = torch.log_softmax(h[keep] @ model.lm_head.weight.T, -1).gather(1, batch.labels[keep, None])
        cfg = PrefLossConfig(loss="sigmoid", sft_weight=0.5)
        ref = torch.linspace(-30.0, -10.0, n)  # a fixed reference, so the loss is not log 2
        loss, metrics = DPOObjective(model, cfg, "precomputed")(batch.replace(ref_logps=ref))
        loss.backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters()}
        results[name] = (logps, loss.detach(), metrics, grads, tokens)
    (lp, lossp, mp, gp, tp), (ls, losss, ms, gs, ts) = results["plain"], results["shared"]
    torch.testing.assert_close(ts, tp, rtol=0, atol=1e-5)  # every target token's log-prob
    # segment sums reach a few hundred nats, where fp32's own spacing is ~3e-5: relative there
    torch.testing.assert_close(ls, lp, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(losss, lossp, rtol=0, atol=1e-5)
    for key in mp:
        torch.testing.assert_close(ms[key], mp[key], rtol=1e-6, atol=1e-5, msg=key)
    for key in gp:
        torch.testing.assert_close(gs[key], gp[key], rtol=1e-5, atol=1e-5, msg=key)


@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "hinge", "robust", "simpo", "orpo"])
def test_every_preference_loss_and_ld_alpha_agree(loss):
    from bumblefast.train.objectives import DPOObjective
    from bumblefast.train.pref_losses import PrefLossConfig

    plain, shared = (collate_rows([r], "dpo", seq_len=256) for r in _rows("very_different_lengths", seed=1))
    cfg = PrefLossConfig(loss=loss, sft_weight=0.3)
    reference = "none" if loss in ("simpo", "orpo") else "copy"
    out = []
    for batch in (plain, shared):
        model, ref = _model("sdpa"), _model("sdpa")
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.01)  # the policy differs from its reference
        obj = DPOObjective(model, cfg, reference, ld_alpha=0.5 if loss == "sigmoid" else None, ref_model=ref)
        value, metrics = obj(batch)
        value.backward()
        out.append((value.detach(), metrics, model.model.embed_tokens.weight.grad.clone()))
    torch.testing.assert_close(out[1][0], out[0][0], rtol=0, atol=1e-5)
    for key in out[0][1]:
        torch.testing.assert_close(out[1][1][key], out[0][1][key], rtol=1e-6, atol=1e-5, msg=key)
    torch.testing.assert_close(out[1][2], out[0][2], rtol=1e-5, atol=1e-5)  # ipo's (z - 5)^2 amplifies


def test_sdpa_shared_equals_sdpa_mask_reference():
    """The per-document path against the one-mask reference on several rows at once."""
    rows = [_rows(case, seed=i)[1] for i, case in enumerate(ROWS) if case != "prompt_fills_the_row"]
    batch = collate_rows(rows, "dpo", seq_len=256)
    out = {}
    for backend in CPU_BACKENDS:
        model = _model(backend)
        with torch.no_grad():
            out[backend] = model.hidden_states(batch)
    torch.testing.assert_close(out["sdpa"], out["sdpa_mask"], rtol=0, atol=1e-5)


def test_rejected_never_sees_the_chosen_reply():
    """Changing the chosen reply changes no rejected-segment hidden state (and vice versa the
    prompt does): the attention masks hold on every backend."""
    plain_row, shared_row = _rows("single_turn")
    other = dict(shared_row)
    other["input_ids"] = shared_row["input_ids"].copy()
    p0, c0 = int(shared_row["prompt_lens"][0]), int(shared_row["seq_lens"][0])
    other["input_ids"][p0:c0] = 5  # the first pair's chosen reply
    for backend in CPU_BACKENDS:
        model = _model(backend)
        hs = []
        for row in (shared_row, other):
            b = collate_rows([row], "dpo", seq_len=256)
            with torch.no_grad():
                hs.append(model.hidden_states(b))
        rejected = slice(c0, c0 + int(shared_row["seq_lens"][1]))
        torch.testing.assert_close(hs[1][rejected], hs[0][rejected], rtol=0, atol=0)
        assert not torch.allclose(hs[1][p0:c0], hs[0][p0:c0])


def test_prompt_len_stops_at_the_first_trained_or_differing_token():
    a = (np.array([1, 2, 3, 4, 5]), np.array([0, 0, 0, 1, 1]))
    b = (np.array([1, 2, 3, 4, 9]), np.array([0, 0, 0, 0, 1]))
    assert share.prompt_len(a, b) == 3  # token 4 is trained in a
    c = (np.array([1, 2, 7, 4]), np.array([0, 0, 0, 1]))
    assert share.prompt_len(a, c) == 2
    d = (np.array([8, 2]), np.array([0, 1]))
    assert share.prompt_len(a, d) == 0
    segs = share.share(a, c, 2)
    assert segs[1][0].tolist() == [2, 7, 4] and share.group_len(a, c, 2) == 5 + 4 - 1
    assert share.share(a, d, 0)[1][0].tolist() == [8, 2]  # nothing shared: standalone


def test_kv_prefix_is_checked():
    from bumblefast.attention import PackedPlan

    cu = torch.tensor([0, 3, 5], dtype=torch.int32)
    with pytest.raises(ValueError, match="previous document"):
        PackedPlan.build(cu, None, 5, "sdpa", torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="previous document"):
        PackedPlan.build(cu, None, 5, "sdpa", torch.tensor([1, 0]))


CUDA = torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA (flash / varlen attention are CUDA-only)")
@pytest.mark.parametrize("backend", ["flash", "varlen"])
def test_cuda_backends_shared_prompt_match_sdpa_mask_bf16(backend):
    """flash / varlen on shared-prompt rows vs the one-mask reference, bf16, forward and
    backward, and vs the same pairs unshared on the same backend."""
    from bumblefast.attention import flash_attn_available

    if backend == "flash" and not flash_attn_available():
        pytest.skip("flash-attn is not installed (optional extra)")
    tol = dict(atol=6e-2, rtol=5e-2)  # the kernel tests' bf16 tolerance
    rows = [_rows(case, seed=i) for i, case in enumerate(ROWS)]
    shared = collate_rows([r[1] for r in rows], "dpo", seq_len=256)
    plain = collate_rows([r[0] for r in rows], "dpo", seq_len=256)
    out = {}
    for name, b, bk in (
        ("ref", shared, "sdpa_mask"),
        ("ours", shared, backend),
        ("plain", plain, backend),
    ):
        model = _model(bk).cuda().to(torch.bfloat16)
        logps = segment_stats(model, b.to("cuda"))[0]
        (logps.float() / 50).sum().backward()
        out[name] = (logps.float(), model.model.layers[0].self_attn.q_proj.weight.grad.float())
    torch.testing.assert_close(out["ours"][0], out["ref"][0], **tol)
    torch.testing.assert_close(out["ours"][0], out["plain"][0], **tol)
    torch.testing.assert_close(out["ours"][1], out["ref"][1], **tol)


SLOW_PAIRS = 24


@pytest.mark.slow
def test_train_precompute_and_eval_agree_across_layouts(tmp_path, demo_tokenizer_dir, one_rank):
    """The same pairs prepped both ways: the same manifest facts, the same precomputed reference
    log-probs per pair, the same preference accuracy from shards, and `bumblefast train --stage
    dpo` gives the same first-step loss and metrics (one step over every pair: LoRA with the
    adapter reference, full fine-tuning with a frozen copy, LoRA with precomputed log-probs)."""
    from helpers import save_tiny_model, train_command
    from train_hooks import run_here

    from bumblefast.evaluate import preference_from_shards
    from bumblefast.shards.reader import ShardDataset
    from bumblefast.train.precompute import precompute_ref

    model = save_tiny_model(tmp_path / "sft", demo_tokenizer_dir)
    pairs = json.loads((ROOT / "datasets" / "demo" / "dpo.json").read_text())[:SLOW_PAIRS]
    (tmp_path / "pairs.json").write_text(json.dumps(pairs, ensure_ascii=False))
    manifests, rows = {}, {}
    for layout, flag in (("pairs", False), ("shared_prompt", True)):
        manifests[layout] = prep(
            demo_tokenizer_dir, tmp_path / layout, "dpo", [tmp_path / "pairs.json"], seq_len=128, share_prompt=flag
        )
        precompute_ref(str(model), str(tmp_path / layout), str(tmp_path / f"{layout}_ref"), kernels="reference")
        ds = ShardDataset(str(tmp_path / f"{layout}_ref"), shuffle=False, batch_size=1)
        rows[layout] = [ds[i] for i in range(ds.num_samples)]
    mp, ms = manifests["pairs"], manifests["shared_prompt"]
    assert (mp["dpo_layout"], ms["dpo_layout"]) == ("pairs", "shared_prompt")
    assert "prompt_lens" in ms["columns"] and "prompt_lens" not in mp["columns"]
    assert mp["records"] == ms["records"] and mp["records"]["written"] == SLOW_PAIRS
    assert mp["dpo"]["prompt_fraction"] == ms["dpo"]["prompt_fraction"] > 0.3
    assert ms["tokens"]["real"] < mp["tokens"]["real"]  # the prompts are stored once
    assert ms["tokens"]["target"] == mp["tokens"]["target"]

    def per_pair(layout):
        """{chosen segment tokens: (chosen ref logp, rejected ref logp)} (the chosen segment is
        the same tokens in both layouts)."""
        out = {}
        for r in rows[layout]:
            ids, lens, ref = r["input_ids"], r["seq_lens"].tolist(), r["ref_logps"].tolist()
            starts = np.cumsum([0] + lens)
            for k in range(0, len(lens), 2):
                out[ids[starts[k] : starts[k + 1]].tobytes()] = (ref[k], ref[k + 1])
        return out

    a, b = per_pair("pairs"), per_pair("shared_prompt")
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(b[key], a[key], rtol=1e-6, atol=1e-5)

    evals = [preference_from_shards(model, tmp_path / layout) for layout in ("pairs", "shared_prompt")]
    assert evals[0]["n"] == evals[1]["n"] == SLOW_PAIRS
    assert evals[0]["preference_accuracy"] == evals[1]["preference_accuracy"]
    assert evals[1]["mean_margin"] == pytest.approx(evals[0]["mean_margin"], rel=1e-5, abs=1e-5)

    def train(layout, out, *extra):
        cmd = train_command(
            "dpo",
            "--lora_dropout",  # dropout masks depend on the token count, which the layouts differ in
            "0",
            *extra,
            model_name_or_path=model,
            dataset_path=tmp_path / layout,
            output_dir=out,
            cutoff_len=128,
            train_micro_batch_size_per_gpu=max(mp["rows"], ms["rows"]),  # every pair in step 1
            gradient_accumulation_steps=1,
            max_steps=1,
            learning_rate=5e-3,
            attn_backend="sdpa",
            shuffle="false",
        )
        run_here(cmd)
        return json.loads((out / "training_metrics.json").read_text())[0]

    runs = (
        (
            "lora_adapter",
            (
                "--finetuning_type",
                "lora",
                "--lora_rank",
                "8",
                "--ref_model",
                "adapter",
                "--sft_weight",
                "0.5",
            ),
        ),
        ("full_copy", ("--finetuning_type", "full", "--ref_model", "copy", "--pref_loss", "ipo")),
        (
            "lora_precomputed",
            ("--finetuning_type", "lora", "--lora_rank", "8", "--ref_model", "precomputed"),
        ),
    )
    for name, extra in runs:
        suffix = "_ref" if "precomputed" in name else ""
        first = [train(layout + suffix, tmp_path / f"{name}_{layout}", *extra) for layout in ("pairs", "shared_prompt")]
        for key in (
            "loss",
            "rewards/chosen",
            "rewards/rejected",
            "rewards/accuracies",
            "rewards/margins",
            "logps/chosen",
            "logps/rejected",
            "logits/chosen",
            "logits/rejected",
            "grad_norm",
        ):
            # with a precomputed reference the first step's policy IS its reference (LoRA B = 0)
            # but is computed in another pass: every reward is float noise (~1e-7), and which of
            # a pair's two is larger, i.e. the accuracy, is that noise's sign: not compared
            if key == "rewards/accuracies" and name == "lora_precomputed":
                assert abs(first[0]["rewards/margins"]) < 1e-5 and abs(first[1]["rewards/margins"]) < 1e-5
                continue
            if key in first[0]:
                assert first[1][key] == pytest.approx(first[0][key], rel=1e-5, abs=1e-5), (
                    name,
                    key,
                )
