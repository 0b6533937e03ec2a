"""DPO with a shared prompt: per-segment log-probs, losses and gradients on shared-prompt rows
equal the unshared [prompt+chosen][prompt+rejected] rows of the same pairs (fp32, CPU, every
CPU attention backend), and prep writes the layout the trainer reads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bumblefast.prep import share
from bumblefast.shards.collate import collate_rows

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "models" / "bumblebee-tiny"
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
        row = {k: (np.concatenate(v) if k in ("input_ids", "loss_mask") else np.asarray(v, np.uint32))
               for k, v in row.items()}
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
    assert "kv_prefix" in shared and "kv_prefix" not in plain
    # the shared row carries the same targets, so the same pair structure and counts
    assert torch.equal(plain["labels"][plain["labels"] != -100], shared["labels"][shared["labels"] != -100])

    results = {}
    for name, batch in (("plain", plain), ("shared", shared)):
        model = _model(backend)  # the same seeded weights each time
        n = batch["cu_seqlens"].numel() - 1
        with torch.no_grad():
            logps = model.segment_logps(batch["input_ids"], batch["position_ids"], batch["cu_seqlens"],
                                        int(batch["max_seqlen"]), batch["labels"], batch["segment_ids"], n,
                                        kv_prefix=batch.get("kv_prefix"))
            h = model.hidden_states(batch["input_ids"], batch["position_ids"], batch["cu_seqlens"], None,
                                    batch.get("kv_prefix"))
            keep = batch["labels"] != -100  # per target token, by the plain formula
            tokens = torch.log_softmax(h[keep] @ model.lm_head.weight.T, -1).gather(1, batch["labels"][keep, None])
        cfg = PrefLossConfig(loss="sigmoid", sft_weight=0.5)
        ref = torch.linspace(-30.0, -10.0, n)  # a fixed reference, so the loss is not log 2
        loss, metrics = DPOObjective(model, cfg, "precomputed")({**batch, "ref_logps": ref})
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
            out[backend] = model.hidden_states(batch["input_ids"], batch["position_ids"], batch["cu_seqlens"],
                                               int(batch["max_seqlen"]), batch["kv_prefix"])
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
                hs.append(model.hidden_states(b["input_ids"], b["position_ids"], b["cu_seqlens"], None,
                                              b["kv_prefix"]))
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
