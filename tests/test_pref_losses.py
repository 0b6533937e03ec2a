"""Preference losses (bumblefast.train.pref_losses) vs independent plain-PyTorch formulas,
TRL when installed, and the LD-DPO segment split vs a direct per-token computation."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from bumblefast.train.pref_losses import (
    IGNORE_INDEX,
    PREF_LOSSES,
    PrefLossConfig,
    combine_ld,
    ld_token_weights,
    preference_loss,
    split_segments_for_ld,
)

TOL = {"rtol": 1e-5, "atol": 1e-6}  # fp32, same formulas in a different order


def _inputs(p: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    nc = torch.randint(1, 40, (p,), generator=g)
    nr = torch.randint(1, 40, (p,), generator=g)
    # mean token log-prob in (-3, -0.05): summed log-probs scale with length, as in real data
    pc = -(torch.rand(p, generator=g) * 2.95 + 0.05) * nc
    pr = -(torch.rand(p, generator=g) * 2.95 + 0.05) * nr
    rc = pc + torch.randn(p, generator=g) * 2
    rr = pr + torch.randn(p, generator=g) * 2
    return pc, pr, rc, rr, nc, nr


# ---------------------------------------------------------------- independent references


def _logsig(x):
    return -torch.log1p(torch.exp(-x))  # naive on purpose (inputs are moderate)


def ref_losses(pc, pr, rc, rr, nc, nr, loss, beta, eps, gamma, w):
    """Straight from the formulas in the brief, one pair at a time in float64."""
    out, rew_c, rew_r = [], [], []
    for i in range(pc.numel()):
        a, b = float(pc[i]), float(pr[i])
        ra = float(rc[i]) if rc is not None else 0.0
        rb = float(rr[i]) if rr is not None else 0.0
        la, lb = int(nc[i]), int(nr[i])
        t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
        if loss == "sigmoid":
            z = (a - b) - (ra - rb)
            val = -(1 - eps) * _logsig(t(beta * z)) - eps * _logsig(t(-beta * z))
            rc_, rr_ = beta * (a - ra), beta * (b - rb)
        elif loss == "ipo":
            z = (a / la - b / lb) - (ra / la - rb / lb)
            val = t((z - 1 / (2 * beta)) ** 2)
            rc_, rr_ = beta * (a - ra) / la, beta * (b - rb) / lb
        elif loss == "hinge":
            z = (a - b) - (ra - rb)
            val = t(max(0.0, 1 - beta * z))
            rc_, rr_ = beta * (a - ra), beta * (b - rb)
        elif loss == "robust":
            z = (a - b) - (ra - rb)
            val = ((1 - eps) * -_logsig(t(beta * z)) + eps * _logsig(t(-beta * z))) / (1 - 2 * eps)
            rc_, rr_ = beta * (a - ra), beta * (b - rb)
        elif loss == "simpo":
            z = (a / la - b / lb) - gamma / beta
            val = -(1 - eps) * _logsig(t(beta * z)) - eps * _logsig(t(-beta * z))
            rc_, rr_ = beta * a / la, beta * b / lb
        elif loss == "orpo":
            ac, ar = a / la, b / lb
            log_odds = (ac - ar) - (math.log(1 - math.exp(ac)) - math.log(1 - math.exp(ar)))
            val = -beta * _logsig(t(log_odds)) - ac
            rc_, rr_ = beta * ac, beta * ar
        if w and loss != "orpo":
            val = val + w * (-a / la)
        out.append(float(val))
        rew_c.append(rc_)
        rew_r.append(rr_)
    f = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731
    return f(out), f(rew_c), f(rew_r)


# ---------------------------------------------------------------- losses


@pytest.mark.parametrize("loss", PREF_LOSSES)
@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("sft_weight", [0.0, 0.5])
def test_losses_match_formulas(loss, eps, sft_weight):
    pc, pr, rc, rr, nc, nr = _inputs(seed=PREF_LOSSES.index(loss) * 10 + int(eps * 10) + int(sft_weight * 2))
    beta, gamma = 0.2, 0.7
    cfg = PrefLossConfig(loss=loss, beta=beta, label_smoothing=eps, simpo_gamma=gamma, sft_weight=sft_weight)
    free = loss in ("simpo", "orpo")
    out = preference_loss(pc, pr, None if free else rc, None if free else rr, nc, nr, cfg)
    want, want_c, want_r = ref_losses(pc, pr, rc, rr, nc, nr, loss, beta, eps, gamma, sft_weight)
    assert out["losses"].shape == (pc.numel(),) and out["losses"].dtype == torch.float32
    torch.testing.assert_close(out["losses"], want, **TOL)
    torch.testing.assert_close(out["chosen_rewards"], want_c, **TOL)
    torch.testing.assert_close(out["rejected_rewards"], want_r, **TOL)
    if loss in ("ipo", "hinge"):  # these ignore label smoothing (as in TRL)
        base = preference_loss(pc, pr, rc, rr, nc, nr, PrefLossConfig(loss=loss, beta=beta, sft_weight=sft_weight))
        torch.testing.assert_close(out["losses"], base["losses"])


def test_reference_none_means_reference_free():
    pc, pr, rc, rr, nc, nr = _inputs()
    cfg = PrefLossConfig("sigmoid", beta=0.1)
    a = preference_loss(pc, pr, None, None, nc, nr, cfg)
    b = preference_loss(pc, pr, torch.zeros_like(rc), torch.zeros_like(rr), nc, nr, cfg)
    for k in a:
        torch.testing.assert_close(a[k], b[k])
    # reference-free losses ignore any reference given
    s1 = preference_loss(pc, pr, rc, rr, nc, nr, PrefLossConfig("simpo"))
    s2 = preference_loss(pc, pr, None, None, nc, nr, PrefLossConfig("simpo"))
    torch.testing.assert_close(s1["losses"], s2["losses"])


def test_label_smoothing_zero_is_plain_dpo_and_robust_equals_sigmoid():
    pc, pr, rc, rr, nc, nr = _inputs(seed=3)
    beta = 0.1
    z = (pc - pr) - (rc - rr)
    plain = -torch.nn.functional.logsigmoid(beta * z)
    sig = preference_loss(pc, pr, rc, rr, nc, nr, PrefLossConfig("sigmoid", beta=beta, label_smoothing=0.0))
    rob = preference_loss(pc, pr, rc, rr, nc, nr, PrefLossConfig("robust", beta=beta, label_smoothing=0.0))
    torch.testing.assert_close(sig["losses"], plain, rtol=0, atol=0)
    torch.testing.assert_close(rob["losses"], plain, **TOL)
    # eps = 0 with extreme logits stays finite (no 0 * inf from the smoothing term)
    big = torch.tensor([1e4, -1e4])
    out = preference_loss(big, -big, None, None, torch.tensor([5, 5]), torch.tensor([5, 5]), PrefLossConfig())
    assert torch.isfinite(out["losses"]).all()
    torch.testing.assert_close(out["losses"][0], torch.tensor(0.0))
    # cDPO with eps: the loss at logits=0 is log 2 whatever eps
    zero = torch.zeros(3)
    for eps in (0.0, 0.2, 0.45):
        o = preference_loss(
            zero,
            zero,
            zero,
            zero,
            torch.ones(3, dtype=torch.long),
            torch.ones(3, dtype=torch.long),
            PrefLossConfig("sigmoid", label_smoothing=eps),
        )
        torch.testing.assert_close(o["losses"], torch.full((3,), math.log(2.0)))


def test_robust_rejects_half_smoothing():
    pc, pr, rc, rr, nc, nr = _inputs()
    with pytest.raises(ValueError, match="label_smoothing"):
        preference_loss(pc, pr, rc, rr, nc, nr, PrefLossConfig("robust", label_smoothing=0.5))
    with pytest.raises(ValueError, match="pref_loss"):
        preference_loss(pc, pr, rc, rr, nc, nr, PrefLossConfig("kto"))
    with pytest.raises(ValueError, match="both"):
        preference_loss(pc, pr, rc, None, nc, nr, PrefLossConfig())


@pytest.mark.parametrize("loss", PREF_LOSSES)
def test_gradients_flow_and_match_autograd_reference(loss):
    pc0, pr0, rc, rr, nc, nr = _inputs(seed=7)
    cfg = PrefLossConfig(loss=loss, beta=0.3, label_smoothing=0.1, sft_weight=0.2)
    pc, pr = pc0.clone().requires_grad_(), pr0.clone().requires_grad_()
    out = preference_loss(pc, pr, rc, rr, nc, nr, cfg)
    assert not out["chosen_rewards"].requires_grad and not out["rejected_rewards"].requires_grad
    out["losses"].sum().backward()
    assert torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()
    assert pc.grad.abs().sum() > 0
    if loss != "hinge":  # hinge is exactly 0 past the margin for some pairs
        assert pr.grad.abs().sum() > 0
    # vs autograd through the float64 formulas
    pc64, pr64 = pc0.double().requires_grad_(), pr0.double().requires_grad_()
    cfg64 = PrefLossConfig(loss=loss, beta=0.3, label_smoothing=0.1, sft_weight=0.2)
    free = loss in ("simpo", "orpo")
    o64 = preference_loss(pc64, pr64, None if free else rc.double(), None if free else rr.double(), nc, nr, cfg64)
    o64["losses"].sum().backward()
    torch.testing.assert_close(pc.grad, pc64.grad.float(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(pr.grad, pr64.grad.float(), rtol=1e-4, atol=1e-6)


def test_dpo_gradient_closed_form():
    """d/dpc of -logsig(b z) = -b sig(-b z); sft_weight adds -w/nc."""
    pc, pr, rc, rr, nc, nr = _inputs(seed=11)
    pc = pc.clone().requires_grad_()
    beta, w = 0.25, 0.5
    preference_loss(pc, pr, rc, rr, nc, nr, PrefLossConfig("sigmoid", beta=beta, sft_weight=w))[
        "losses"
    ].sum().backward()
    z = (pc.detach() - pr) - (rc - rr)
    torch.testing.assert_close(pc.grad, -beta * torch.sigmoid(-beta * z) - w / nc.float(), **TOL)


def test_orpo_is_stable_at_zero_logprob():
    # a reply with mean log-prob 0 (certain) must not give inf/NaN
    pc = torch.tensor([0.0, -1e-9, -5.0], requires_grad=True)
    pr = torch.tensor([-2.0, 0.0, -1e-3], requires_grad=True)
    n = torch.tensor([3, 3, 3])
    out = preference_loss(pc, pr, None, None, n, n, PrefLossConfig("orpo", beta=0.1))
    out["losses"].sum().backward()
    assert torch.isfinite(out["losses"]).all() and torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()


def test_zero_length_reply_is_clamped():
    z = torch.zeros(2)
    n0 = torch.tensor([0, 4])
    for loss in PREF_LOSSES:
        out = preference_loss(z - 1, z - 2, z, z, n0, n0, PrefLossConfig(loss, sft_weight=0.1))
        assert torch.isfinite(out["losses"]).all(), loss


def test_from_dpo_config():
    from bumblefast.config import DPOConfig

    d = DPOConfig(pref_loss="simpo", pref_beta=2.0, dpo_label_smoothing=0.1, simpo_gamma=1.0, sft_weight=0.3)
    c = PrefLossConfig.from_dpo_config(d)
    assert (c.loss, c.beta, c.label_smoothing, c.simpo_gamma, c.sft_weight) == (
        "simpo",
        2.0,
        0.1,
        1.0,
        0.3,
    )
    assert not c.needs_reference and PrefLossConfig().needs_reference


def _trl_pair_loss(loss: str, beta: float, eps: float, pc, pr, rc, rr, nc: int, nr: int):
    """TRL's own DPO loss code (trl >= 1.0: DPOTrainer._compute_loss, the loss inline) on one
    pair, with the model's per-token log-probs stubbed: their row sums are the sequence log-probs
    (the fused LM head's log-probs of non-target tokens are 0), the completion mask holds nc / nr
    tokens (IPO length-averages with it), the reference log-probs are precomputed inputs.
    Returns (loss, chosen reward, rejected reward) as TRL logs them."""
    from collections import defaultdict
    from types import SimpleNamespace

    from trl import DPOTrainer

    width = max(nc, nr) + 1
    mask = torch.zeros(2, width, dtype=torch.long)
    mask[0, 1 : nc + 1] = 1
    mask[1, 1 : nr + 1] = 1
    per_token = torch.zeros(2, width - 1)
    per_token[:, 0] = torch.stack([pc, pr])  # the row sum is the sequence log-prob
    zeros = torch.zeros(2, width - 1)
    outputs = SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())
    model = SimpleNamespace(training=True)
    same = SimpleNamespace(gather_for_metrics=lambda t: t, gather=lambda t: t, device=pc.device)
    fake = SimpleNamespace(
        model=model,
        accelerator=same,
        ld_alpha=None,
        precompute_ref_logps=True,
        aux_loss_enabled=False,
        f_divergence_type="reverse_kl",
        loss_types=[loss],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=eps,
        use_weighting=False,
        _metrics={"train": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.zeros(2, width, dtype=torch.long),
        "attention_mask": torch.ones(2, width),
        "completion_mask": mask,
        "ref_chosen_logps": rc[None],
        "ref_rejected_logps": rr[None],
    }
    out = DPOTrainer._compute_loss(fake, lambda **kw: outputs, inputs, False)
    m = fake._metrics["train"]
    return out, m["rewards/chosen"][-1], m["rewards/rejected"][-1]


@pytest.mark.skipif(
    importlib.util.find_spec("trl") is None,
    reason="trl is not installed (optional cross-check against TRL's DPO loss; the formulas are checked above)",
)
@pytest.mark.parametrize("loss", ["sigmoid", "hinge", "robust", "ipo"])
def test_matches_trl_dpo_loss(loss):
    """Ours against TRL's DPOTrainer loss code, pair by pair. TRL >= 1.0 applies label smoothing
    only in `robust` (sigmoid has no cDPO smoothing any more); its IPO loss averages the
    log-ratios over the completion tokens, its logged IPO rewards do not (ours: averaged, as in
    TRL 0.x), so for IPO only the loss is compared."""
    from trl import DPOTrainer

    if not hasattr(DPOTrainer, "_compute_loss"):
        pytest.fail("this TRL has no DPOTrainer._compute_loss (the 1.x loss); update the cross-check to its API")
    pc, pr, rc, rr, nc, nr = _inputs(seed=5)
    eps = 0.1 if loss == "robust" else 0.0
    ours = preference_loss(pc, pr, rc, rr, nc, nr, PrefLossConfig(loss, beta=0.1, label_smoothing=eps))
    for i in range(len(pc)):
        trl_loss, cr, rj = _trl_pair_loss(loss, 0.1, eps, pc[i], pr[i], rc[i], rr[i], int(nc[i]), int(nr[i]))
        torch.testing.assert_close(ours["losses"][i], trl_loss, **TOL)
        if loss != "ipo":
            assert ours["chosen_rewards"][i].item() == pytest.approx(cr, rel=1e-5, abs=1e-6)
            assert ours["rejected_rewards"][i].item() == pytest.approx(rj, rel=1e-5, abs=1e-6)


# ---------------------------------------------------------------- LD-DPO


def _packed_example():
    """2 pairs packed in one row: [prompt|chosen0][prompt|rejected0][prompt|chosen1][prompt|rejected1].
    Target counts: chosen0 = 3, rejected0 = 5, chosen1 = 4, rejected1 = 2."""
    layout = [(2, 3), (1, 5), (3, 4), (2, 2)]  # (prompt tokens, target tokens) per segment
    seg, lab = [], []
    for s, (n_prompt, n_target) in enumerate(layout):
        seg += [s] * (n_prompt + n_target + 1)  # +1: the last token has no next-token target
        lab += [IGNORE_INDEX] * n_prompt + [10 + s] * n_target + [IGNORE_INDEX]
    return torch.tensor(lab), torch.tensor(seg), [n for _, n in layout]


def test_split_segments_for_ld_hand_example():
    labels, seg, n_target = _packed_example()
    new, n_new = split_segments_for_ld(labels, seg, 4)
    assert n_new == 8
    # expected: head = min per pair = 3 (pair 0), 2 (pair 1)
    head = [3, 3, 2, 2]
    expect = []
    for s in range(4):
        idx = (seg == s).nonzero().flatten().tolist()
        k = 0
        for i in idx:
            if labels[i] == IGNORE_INDEX:
                expect.append(s)
            else:
                expect.append(s if k < head[s] else s + 4)
                k += 1
    assert new.tolist() == expect
    assert new.dtype == seg.dtype and new.shape == seg.shape
    # target counts per split segment: heads = min, tails = the rest
    counts = torch.zeros(8, dtype=torch.long).index_add_(0, new, (labels != IGNORE_INDEX).long())
    assert counts.tolist() == [3, 3, 2, 2, 0, 2, 2, 0]
    torch.testing.assert_close(combine_ld(counts, 4, 1), torch.tensor(n_target))


def test_ld_split_and_combine_match_per_token_computation():
    labels, seg, _ = _packed_example()
    g = torch.Generator().manual_seed(0)
    token_logps = -torch.rand(labels.numel(), generator=g) * 3
    token_logps = torch.where(labels != IGNORE_INDEX, token_logps, torch.zeros_like(token_logps))
    alpha = 0.4
    # what the fused op would return over the split segments
    new, n_new = split_segments_for_ld(labels, seg, 4)
    sums = torch.zeros(n_new).index_add_(0, new, token_logps)
    got = combine_ld(sums, 4, alpha)
    # direct: walk each reply's target tokens in order, weight 1 for the first min(nc, nr), alpha after
    tgt = {
        s: [float(token_logps[i]) for i in range(labels.numel()) if seg[i] == s and labels[i] != IGNORE_INDEX]
        for s in range(4)
    }
    want = []
    for s in range(4):
        h = min(len(tgt[s]), len(tgt[s ^ 1]))
        want.append(sum(tgt[s][:h]) + alpha * sum(tgt[s][h:]))
    torch.testing.assert_close(got, torch.tensor(want), **TOL)
    # alpha = 1 is plain DPO's sum; alpha = 0 keeps only the common-length prefix
    plain = torch.zeros(4).index_add_(0, seg, token_logps)
    torch.testing.assert_close(combine_ld(sums, 4, 1.0), plain, **TOL)
    prefix = [sum(tgt[s][: min(len(tgt[s]), len(tgt[s ^ 1]))]) for s in range(4)]
    torch.testing.assert_close(combine_ld(sums, 4, 0.0), torch.tensor(prefix), **TOL)
    # per-token weights give the same sums
    w = ld_token_weights(labels, seg, 4, alpha)
    torch.testing.assert_close(torch.zeros(4).index_add_(0, seg, token_logps * w), got, **TOL)
    assert set(w[labels == IGNORE_INDEX].tolist()) == {0.0}
    # 2-D [rows, T] input and gradients through the split sums
    new2, _ = split_segments_for_ld(labels.view(1, -1), seg.view(1, -1), 4)
    assert torch.equal(new2.view(-1), new)
    x = token_logps.clone().requires_grad_()
    combine_ld(torch.zeros(n_new).index_add(0, new, x), 4, alpha).sum().backward()
    is_t = labels != IGNORE_INDEX  # the real op gives non-targets 0 log-prob (and no gradient)
    torch.testing.assert_close(x.grad[is_t], w[is_t])


def test_ld_split_non_contiguous_segments_and_errors():
    # segments interleaved (not contiguous): ranks follow token order inside each segment
    labels = torch.tensor([1, 1, 1, 1, 1, 1])
    seg = torch.tensor([0, 1, 0, 0, 1, 0])  # chosen has 4 targets, rejected 2
    new, _ = split_segments_for_ld(labels, seg, 2)
    assert new.tolist() == [0, 1, 0, 2, 1, 2]
    with pytest.raises(ValueError, match="even"):
        split_segments_for_ld(labels, seg, 3)
    with pytest.raises(ValueError, match="expected 4"):
        combine_ld(torch.zeros(3), 2, 0.5)
