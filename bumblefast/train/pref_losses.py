"""Preference-optimisation losses on per-pair summed log-probs (pure functions, no model code).

Inputs are per-pair fp32 tensors ``[P]``: ``pc``/``pr`` = summed target log-probs of the
chosen/rejected reply under the policy, ``rc``/``rr`` = the same under the reference (``None``
for a reference-free run), ``nc``/``nr`` = number of target tokens of each reply (int).

``preference_loss`` returns **per-pair** losses: the caller SUMS them over its micro-batch and
divides by the global pair count of the optimizer step (see ``bumblefast.train.objectives``),
so accumulation and data parallelism give the same update as one big batch.

Conventions follow TRL (``DPOTrainer.dpo_loss``, ``CPOTrainer.cpo_loss``,
``ORPOTrainer.odds_ratio_loss``), per pair instead of batch-mean:

======== ================================================================ ==========================
loss     per-pair formula (z = logits, s = label_smoothing, b = beta)     source
======== ================================================================ ==========================
sigmoid  z = (pc - pr) - (rc - rr);                                       DPO, Rafailov et al. 2023
         -(1-s) logsig(b z) - s logsig(-b z)                             (arXiv:2305.18290); cDPO,
                                                                          Mitchell 2023
ipo      z as sigmoid but on length-averaged log-probs (pc/nc, ...);      IPO, Azar et al. 2023
         (z - 1/(2b))^2                                                   (arXiv:2310.12036)
hinge    relu(1 - b z)                                                    SLiC, Zhao et al. 2023
                                                                          (arXiv:2305.10425)
robust   ((1-s)(-logsig(b z)) + s logsig(-b z)) / (1 - 2s)                rDPO, Chowdhury et al.
                                                                          2024 (arXiv:2403.00409)
simpo    z = (pc/nc - pr/nr) - gamma/b;                                   SimPO, Meng et al. 2024
         -(1-s) logsig(b z) - s logsig(-b z)       (reference-free)       (arXiv:2405.14734)
orpo     a = pc/nc, a' = pr/nr;                                           ORPO, Hong et al. 2024
         L = a - a' - (log(1-e^a) - log(1-e^a'));                         (arXiv:2403.07691)
         -b logsig(L) + (-a)                       (reference-free)
======== ================================================================ ==========================

``sft_weight`` w > 0 adds ``w * (-pc/nc)`` (chosen reply's mean-token NLL) to every pair's loss
(all losses but orpo, which has its NLL term built in; TRL's CPO ``cpo_alpha`` / RPO).
Rewards (detached): ``b (pc - rc)``, ``b (pr - rr)`` for sigmoid/hinge/robust (TRL); for ipo
on the length-averaged log-probs the loss uses (TRL averages before the reward too); for
simpo/orpo ``b * pc/nc``, ``b * pr/nr``.

A reference of ``None`` with a reference-based loss means reference-free DPO (TRL's
``reference_free=True``: the reference log-probs are taken as 0).

Length-desensitised DPO (LD-DPO, Liu et al. 2024, arXiv:2409.06411): each reply's log-prob is
the sum over its first ``min(nc, nr)`` target tokens plus ``alpha`` times the sum over the rest
(for policy and reference alike). The fused per-segment log-prob op only returns per-segment
sums, so ``split_segments_for_ld`` re-labels every target token past the shorter reply of its
pair to a "tail" segment ``n_segments + id``; one call of the op over ``2 * n_segments``
segments then gives head and tail sums, and ``combine_ld`` returns ``head + alpha * tail``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bumblefast.labels import IGNORE_INDEX

PREF_LOSSES = ("sigmoid", "ipo", "hinge", "robust", "simpo", "orpo")
REFERENCE_FREE = ("simpo", "orpo")


@dataclass
class PrefLossConfig:
    """Values come from ``bumblefast.config.DPOConfig``: pref_loss, pref_beta,
    dpo_label_smoothing, simpo_gamma, sft_weight (see ``from_dpo_config``)."""

    loss: str = "sigmoid"  # sigmoid|ipo|hinge|robust|simpo|orpo
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    sft_weight: float = 0.0

    @classmethod
    def from_dpo_config(cls, cfg) -> PrefLossConfig:
        return cls(
            loss=cfg.pref_loss,
            beta=cfg.pref_beta,
            label_smoothing=cfg.dpo_label_smoothing,
            simpo_gamma=cfg.simpo_gamma,
            sft_weight=cfg.sft_weight,
        )

    @property
    def needs_reference(self) -> bool:
        return self.loss not in REFERENCE_FREE


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable at both ends (Maechler 2012). ``x`` is clamped to
    ``<= -1e-6`` so a reply with mean log-prob exactly 0 gives a finite value, not -inf/NaN."""
    x = x.clamp(max=-1e-6)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _smoothed_sigmoid(z: torch.Tensor, beta: float, eps: float) -> torch.Tensor:
    """-(1-eps) logsig(beta z) - eps logsig(-beta z); the eps term is skipped at eps == 0."""
    loss = -F.logsigmoid(beta * z) * (1.0 - eps)
    if eps:
        loss = loss - F.logsigmoid(-beta * z) * eps
    return loss


def preference_loss(
    pc: torch.Tensor,
    pr: torch.Tensor,
    rc: torch.Tensor | None,
    rr: torch.Tensor | None,
    nc: torch.Tensor,
    nr: torch.Tensor,
    cfg: PrefLossConfig,
) -> dict[str, torch.Tensor]:
    """Per-pair preference losses and implicit rewards (formulas: module docstring).

    Returns ``{"losses": [P], "chosen_rewards": [P], "rejected_rewards": [P]}``; the rewards
    are detached. ``losses`` is to be SUMMED by the caller and divided by the global pair count.
    ``nc``/``nr`` are clamped to >= 1 so an empty reply cannot divide by zero.
    """
    loss_type = cfg.loss
    if loss_type not in PREF_LOSSES:
        raise ValueError(f"pref_loss: must be one of {'|'.join(PREF_LOSSES)}, got '{loss_type}'")
    beta, eps = float(cfg.beta), float(cfg.label_smoothing)
    if beta <= 0:
        raise ValueError(f"pref_beta: must be > 0, got {beta}")
    if (rc is None) != (rr is None):
        raise ValueError("preference_loss: give both reference log-probs (rc, rr) or neither")
    pc, pr = pc.float(), pr.float()
    ncf = nc.to(pc.device, torch.float32).clamp(min=1.0)
    nrf = nr.to(pc.device, torch.float32).clamp(min=1.0)

    if loss_type in ("simpo", "orpo"):
        ac, ar = pc / ncf, pr / nrf
        if loss_type == "simpo":
            # TRL CPOTrainer loss_type="simpo": logits - gamma/beta, smoothed sigmoid
            z = (ac - ar) - cfg.simpo_gamma / beta
            losses = _smoothed_sigmoid(z, beta, eps)
        else:
            # TRL ORPOTrainer.odds_ratio_loss: loss = nll - beta * logsig(log_odds)
            log_odds = (ac - ar) - (_log1mexp(ac) - _log1mexp(ar))
            losses = -beta * F.logsigmoid(log_odds) - ac
        chosen_rewards, rejected_rewards = beta * ac, beta * ar
    else:
        if rc is None:
            rc, rr = torch.zeros_like(pc), torch.zeros_like(pr)
        rc, rr = rc.to(pc.device, torch.float32), rr.to(pc.device, torch.float32)
        if loss_type == "ipo":
            # TRL averages the log-probs over the reply's tokens for IPO (policy and reference)
            pc_, pr_, rc_, rr_ = pc / ncf, pr / nrf, rc / ncf, rr / nrf
        else:
            pc_, pr_, rc_, rr_ = pc, pr, rc, rr
        z = (pc_ - pr_) - (rc_ - rr_)
        if loss_type == "sigmoid":
            losses = _smoothed_sigmoid(z, beta, eps)
        elif loss_type == "ipo":
            losses = (z - 1.0 / (2.0 * beta)) ** 2
        elif loss_type == "hinge":
            losses = torch.relu(1.0 - beta * z)
        else:  # robust
            if not 0.0 <= eps < 0.5:
                raise ValueError(f"robust loss needs label_smoothing in [0, 0.5), got {eps}")
            losses = (-F.logsigmoid(beta * z) * (1.0 - eps) + F.logsigmoid(-beta * z) * eps) / (1.0 - 2.0 * eps)
        chosen_rewards, rejected_rewards = beta * (pc_ - rc_), beta * (pr_ - rr_)

    if cfg.sft_weight and loss_type != "orpo":
        losses = losses + cfg.sft_weight * (-pc / ncf)
    return {
        "losses": losses,
        "chosen_rewards": chosen_rewards.detach(),
        "rejected_rewards": rejected_rewards.detach(),
    }


# ---------------------------------------------------------------- LD-DPO (length desensitised)


def split_segments_for_ld(
    labels: torch.Tensor,
    segment_ids: torch.Tensor,
    n_segments: int,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, int]:
    """Re-label target tokens past the shorter reply of each pair to a tail segment.

    ``labels``/``segment_ids``: the packed micro-batch's per-token tensors (any equal shape);
    segments ``(2i, 2i+1)`` are ``(chosen_i, rejected_i)``. For each pair, ``h = min(nc, nr)``
    (target-token counts); the first ``h`` target tokens of each reply keep their segment id,
    later target tokens get ``n_segments + id``. Non-target tokens keep their id (they add 0).
    Returns ``(new_segment_ids, 2 * n_segments)``: feed both to the per-segment log-prob op,
    then ``combine_ld``. Target order inside a segment is token order (segments need not be
    contiguous).
    """
    n_segments = int(n_segments)
    if n_segments % 2:
        raise ValueError(f"split_segments_for_ld: pairs need an even segment count, got {n_segments}")
    if labels.shape != segment_ids.shape:
        raise ValueError(f"labels {tuple(labels.shape)} and segment_ids {tuple(segment_ids.shape)} differ")
    seg = segment_ids.reshape(-1).long()
    is_t = (labels.reshape(-1) != ignore_index).long()
    counts = torch.zeros(n_segments, dtype=torch.long, device=seg.device).index_add_(0, seg, is_t)
    # rank of each target token among its segment's targets (0-based), in token order
    order = torch.argsort(seg, stable=True)
    seg_sorted = seg[order]
    starts = torch.cumsum(counts, 0) - counts
    rank_sorted = torch.cumsum(is_t[order], 0) - 1 - starts[seg_sorted]
    rank = torch.empty_like(rank_sorted)
    rank[order] = rank_sorted
    pair_counts = counts.view(-1, 2)
    head = pair_counts.min(dim=1).values.repeat_interleave(2)  # [n_segments]
    tail = (is_t == 1) & (rank >= head[seg])
    new = torch.where(tail, seg + n_segments, seg)
    return new.view_as(segment_ids).to(segment_ids.dtype), 2 * n_segments


def combine_ld(sums: torch.Tensor, n_segments: int, alpha: float) -> torch.Tensor:
    """``head + alpha * tail`` per original segment from the ``[2 * n_segments]`` sums of the
    split segments (also works on target counts with alpha=1 to recover nc/nr)."""
    n_segments = int(n_segments)
    if sums.shape[-1] != 2 * n_segments:
        raise ValueError(f"combine_ld: expected {2 * n_segments} sums, got {sums.shape[-1]}")
    return sums[..., :n_segments] + alpha * sums[..., n_segments:]


def ld_token_weights(
    labels: torch.Tensor,
    segment_ids: torch.Tensor,
    n_segments: int,
    alpha: float,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Per-token LD-DPO weights (fp32, shape of ``labels``): 1 for a reply's first
    ``min(nc, nr)`` target tokens, ``alpha`` past them, 0 for non-targets. For a per-token
    (non-fused) path: ``(token_logps * w).index_add`` over segments equals
    ``combine_ld`` of the split sums."""
    new, _ = split_segments_for_ld(labels, segment_ids, n_segments, ignore_index)
    w = torch.where(new >= n_segments, float(alpha), 1.0).to(torch.float32)
    return w * (labels != ignore_index).to(torch.float32)
