"""What a stage optimises, as a module DeepSpeed wraps: packed micro-batch in,
(sum of per-term losses, sums of metrics) out. `count(batch)` says how many loss terms the
micro-batch holds (target tokens for LM, pairs for DPO); the loop divides every sum by the
global count of the whole optimizer step, so gradient accumulation and data parallelism give
the same update as one big batch (not a mean of per-micro-batch means), and DPO metrics are
averages over all pairs of the step."""

from __future__ import annotations

import torch
from torch import nn

from bumblefast.labels import IGNORE_INDEX
from bumblefast.shards.collate import PackedBatch
from bumblefast.train.pref_losses import (
    PrefLossConfig,
    combine_ld,
    preference_loss,
    split_segments_for_ld,
)


def _register_lm_head(module: nn.Module, model: nn.Module, zero3: bool) -> None:
    # The fused losses read lm_head.weight outside lm_head.forward: ZeRO-3 must gather it
    # whenever `module` runs.
    if zero3:
        import deepspeed

        deepspeed.zero.register_external_parameter(module, model.lm_head.weight)


class LMObjective(nn.Module):
    """Next-token loss on the target tokens of a packed batch (pretrain: every token in its
    document; sft: assistant tokens only, as the collator's labels say)."""

    def __init__(self, model: nn.Module, *, zero3: bool = False):
        super().__init__()
        self.model = model
        _register_lm_head(self, model, zero3)

    @staticmethod
    def count(batch: PackedBatch) -> float:
        return float(batch.num_target_tokens)

    def forward(self, batch: PackedBatch) -> tuple[torch.Tensor, dict]:
        loss, _ = self.model.lm_loss(batch)
        return loss, {}


def segment_stats(model: nn.Module, batch: PackedBatch, ld_alpha: float | None = None):
    """The DPO head, of training, evaluation and precompute-ref alike: per segment (summed
    target log-probs fp32, target counts, mean logit over target tokens) of a packed dpo
    batch, without materialising [T, V] logits. The mean logit of a token over the vocabulary
    is h . mean(W rows), so it costs one matrix-vector product. ``ld_alpha``: LD-DPO's weight
    of the tokens past the shorter reply (pref_losses.combine_ld)."""
    h = model.hidden_states(batch)
    weight = model.lm_head.weight
    labels, seg, n = batch.labels, batch.segment_ids, batch.n_segments
    ops = model.ops(h.device)
    if ld_alpha is None:
        logps = ops.fused_linear_logprob(h, weight, labels, seg, n)
    else:
        seg2, n2 = split_segments_for_ld(labels, seg, n)
        logps = combine_ld(ops.fused_linear_logprob(h, weight, labels, seg2, n2), n, ld_alpha)
    target = (labels != IGNORE_INDEX).to(h.dtype)
    counts = torch.zeros(n, dtype=torch.float32, device=h.device).index_add_(0, seg, target.float())
    with torch.no_grad():
        mean_logit = (h @ weight.mean(0)) * target
        logit_sums = torch.zeros(n, dtype=torch.float32, device=h.device).index_add_(0, seg, mean_logit.float())
    return logps.float(), counts, logit_sums / counts.clamp(min=1)


class FrozenReference(nn.Module):
    """The `copy` reference's per-segment target log-probs as a module's forward. Under ZeRO-3
    its own engine (engine.shard_reference) gathers each layer as it runs, and the lm_head
    weight, read outside lm_head.forward, is an external parameter held for the whole forward:
    tied to embed_tokens, a GatheredParameters block around the call was re-partitioned by
    embed_tokens' own post-forward hook before the log-probs read it."""

    def __init__(self, model: nn.Module, ld_alpha: float | None = None, *, zero3: bool = False):
        super().__init__()
        self.model = model.requires_grad_(False).eval()
        self.ld_alpha = ld_alpha
        _register_lm_head(self, model, zero3)

    @torch.no_grad()
    def forward(self, batch: PackedBatch) -> torch.Tensor:
        return segment_stats(self.model, batch, self.ld_alpha)[0]


class DPOObjective(nn.Module):
    """Preference loss on packed rows of [prompt+chosen][prompt+rejected] segments, or of
    shared-prompt groups [prompt+chosen][rejected] whose rejected segment attends the prompt
    (the batch's `kv_prefix`); segments alternate chosen, rejected either way.

    reference: `adapter` (the same weights with LoRA disabled), `copy` (a frozen copy of the
    starting model, passed as `ref_model`: a FrozenReference, or a model it wraps),
    `precomputed` (the shards' `ref_logps` column) or `none` (reference-free losses)."""

    def __init__(
        self,
        model: nn.Module,
        loss_cfg: PrefLossConfig,
        reference: str,
        *,
        ld_alpha: float | None = None,
        ref_model: nn.Module | None = None,
        zero3: bool = False,
    ):
        super().__init__()
        self.model = model
        self.loss_cfg = loss_cfg
        self.reference = reference
        self.ld_alpha = ld_alpha
        if ref_model is not None and not isinstance(ref_model, FrozenReference):
            ref_model = FrozenReference(ref_model, ld_alpha)
        self._ref = [ref_model]  # a list: not a submodule, so neither trained nor checkpointed
        _register_lm_head(self, model, zero3)

    @staticmethod
    def count(batch: PackedBatch) -> float:
        return float(batch.n_segments // 2)

    @torch.no_grad()
    def reference_logps(self, batch: PackedBatch) -> torch.Tensor | None:
        if self.reference == "none":
            return None
        if self.reference == "precomputed":
            return batch.ref_logps.float()
        if self.reference == "adapter":
            with self.model.disable_adapter():
                return segment_stats(self.model, batch, self.ld_alpha)[0]
        return self._ref[0](batch)

    def forward(self, batch: PackedBatch) -> tuple[torch.Tensor, dict]:
        ref = self.reference_logps(batch)
        logps, counts, mean_logits = segment_stats(self.model, batch, self.ld_alpha)
        pc, pr, nc, nr = logps[0::2], logps[1::2], counts[0::2], counts[1::2]
        rc, rr = (ref[0::2], ref[1::2]) if ref is not None else (None, None)
        out = preference_loss(pc, pr, rc, rr, nc, nr, self.loss_cfg)
        chosen, rejected = out["chosen_rewards"], out["rejected_rewards"]
        metrics = {
            "rewards/chosen": chosen.sum(),
            "rewards/rejected": rejected.sum(),
            "rewards/accuracies": (chosen > rejected).float().sum(),
            "rewards/margins": (chosen - rejected).sum(),
            "logps/chosen": pc.detach().sum(),
            "logps/rejected": pr.detach().sum(),
            "logits/chosen": mean_logits[0::2].sum(),
            "logits/rejected": mean_logits[1::2].sum(),
        }
        return out["losses"].sum(), metrics
