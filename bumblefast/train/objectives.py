"""What a stage optimises, as a module DeepSpeed wraps: packed micro-batch in,
(sum of losses, number of loss terms) out. The loop divides by the global count of the
whole optimizer step, so gradient accumulation and data parallelism give the same update
as one big batch (not a mean of per-micro-batch means)."""

from __future__ import annotations

import torch
from torch import nn

MODEL_INPUTS = ("input_ids", "position_ids", "cu_seqlens", "max_seqlen")


def _max_seqlen(batch: dict) -> int:
    m = batch["max_seqlen"]
    return int(m.item()) if torch.is_tensor(m) else int(m)


class LMObjective(nn.Module):
    """Next-token loss on the target tokens of a packed batch (pretrain: every token in its
    document; sft: assistant tokens only, as the collator's labels say)."""

    count_key = "num_target_tokens"

    def __init__(self, model: nn.Module, zero_stage: int = 0):
        super().__init__()
        self.model = model
        if zero_stage == 3:
            # The fused loss reads lm_head.weight outside lm_head.forward: ZeRO-3 must gather it
            # whenever this module runs.
            import deepspeed

            deepspeed.zero.register_external_parameter(self, self.lm_head_weight())

    def lm_head_weight(self) -> torch.Tensor:
        return self.model.lm_head.weight

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.lm_loss(
            batch["input_ids"], batch["position_ids"], batch["cu_seqlens"], _max_seqlen(batch), batch["labels"]
        )
