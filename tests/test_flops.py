"""bumblefast.flops.step_flops (the MFU numerator) against torch's own FLOP counter.

FlopCounterMode counts every matmul a step runs (forward, activation and weight gradients,
the reference forward). Its CPU SDPA has no formula, so attention runs here as explicit
per-document matmuls that it does count; they compute full s x s scores, which equal the
causal s(s+1)/2 convention of flops.py for one-token documents: those are used where the
attention term matters, so the comparison is exact."""

from __future__ import annotations

import math

import pytest
import torch
from test_model import make_model, tiny_config
from torch.utils.flop_counter import FlopCounterMode

from bumblefast import attention as A
from bumblefast import flops
from bumblefast.config import DPOConfig
from bumblefast.shards.collate import PackedBatch
from bumblefast.train.engine import apply_lora
from bumblefast.train.objectives import DPOObjective, LMObjective
from bumblefast.train.pref_losses import PrefLossConfig


def matmul_attention(q, k, v, plan):
    """Per-document causal attention as bmm (counted by FlopCounterMode), GQA by repetition."""
    rep = q.shape[1] // k.shape[1]
    bounds = plan.cu_seqlens.tolist()
    outs = []
    for a, b in zip(bounds, bounds[1:]):
        qd = q[a:b].transpose(0, 1)
        kd = k[a:b].repeat_interleave(rep, dim=1).transpose(0, 1)
        vd = v[a:b].repeat_interleave(rep, dim=1).transpose(0, 1)
        scores = qd @ kd.transpose(1, 2) / math.sqrt(q.shape[-1])
        causal = torch.ones(b - a, b - a, dtype=torch.bool).tril()
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        outs.append((probs @ vd).transpose(0, 1))
    return torch.cat(outs)


@pytest.fixture
def counted_attention(monkeypatch):
    monkeypatch.setitem(A.ATTENTION, "sdpa", matmul_attention)


def batch_of(doc_lens, vocab, dpo=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = sum(doc_lens)
    cu = torch.tensor([0, *torch.tensor(doc_lens).cumsum(0).tolist()], dtype=torch.int32)
    ids = torch.randint(0, vocab, (n,), generator=g)
    labels = torch.randint(0, vocab, (n,), generator=g)
    ref = -torch.rand(len(doc_lens), generator=g) if dpo else None
    return PackedBatch.from_tensors(ids, cu, labels, ref_logps=ref)


def addmm_inplace_flops(self_shape, a_shape, b_shape, out_shape=None, **_) -> int:
    """FLOPs of ``c.addmm_(a, b)``: the matmul, 2 * m * k * n (as the counter's addmm)."""
    (m, k), (_, n) = a_shape, b_shape
    return 2 * m * k * n


def counted(objective, batch) -> int:
    # the fused LM-head loss accumulates its weight gradient with in-place addmm_, which the
    # counter has no formula for: count it like addmm
    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.addmm_: addmm_inplace_flops}) as fc:
        loss, _ = objective(batch)
        loss.backward()
    return fc.get_total_flops()


def lora_model(cfg, targets, rank=4):
    dpo = DPOConfig(
        finetuning_type="lora", lora_rank=rank, lora_alpha=2 * rank, lora_dropout=0.0, lora_target_modules=list(targets)
    )
    return apply_lora(make_model(cfg), dpo)


def test_full_training_step_is_6n_plus_attention(counted_attention):
    cfg = tiny_config()
    docs = [1] * 24
    got = counted(LMObjective(make_model(cfg)), batch_of(docs, cfg.vocab_size))
    assert got == flops.step_flops(cfg, docs) == flops.train_flops(cfg, docs)


@pytest.mark.parametrize(
    "targets",
    [
        ("q_proj", "k_proj", "v_proj", "o_proj"),
        ("q_proj", "v_proj", "down_proj"),
        ("gate_proj", "up_proj", "down_proj"),
        ("o_proj",),
    ],
)
def test_lora_step_counts_adapter_weight_gradients_only(counted_attention, targets):
    cfg = tiny_config()
    docs = [1] * 24
    model = lora_model(cfg, targets)
    got = counted(LMObjective(model), batch_of(docs, cfg.vocab_size))
    want = flops.step_flops(cfg, docs, lora_rank=4, lora_targets=targets)
    assert got == want
    assert want < flops.train_flops(cfg, docs)  # the old 6N overstated LoRA


@pytest.mark.parametrize("reference", ["adapter", "precomputed"])
def test_dpo_step_counts_the_reference_forward_only_when_live(counted_attention, reference):
    cfg = tiny_config()
    docs = [1] * 20  # 10 pairs of one-token segments
    targets = ("q_proj", "k_proj", "v_proj", "o_proj")
    model = lora_model(cfg, targets)
    obj = DPOObjective(model, PrefLossConfig(), reference)
    got = counted(obj, batch_of(docs, cfg.vocab_size, dpo=True))
    want = flops.step_flops(cfg, docs, lora_rank=4, lora_targets=targets, reference=reference)
    # the LM head is frozen under LoRA: the per-segment log-prob kernel computes the rows'
    # gradients in its forward and recomputes no logits, so the counter sees exactly the count
    assert got == want
    live = flops.step_flops(cfg, docs, lora_rank=4, lora_targets=targets, reference="adapter")
    pre = flops.step_flops(cfg, docs, lora_rank=4, lora_targets=targets, reference="precomputed")
    assert live - pre == 2 * flops.matmul_params(cfg) * sum(docs) + flops.attention_flops(cfg, docs) / 3


def test_full_dpo_recomputes_the_logits_of_its_trained_head(counted_attention):
    """A trained LM head (full DPO): the weight gradient sums rows of different segments, so the
    kernel keeps the inputs and recomputes each chunk's logits in backward: hardware FLOPs
    (memory for compute, like activation checkpointing) that MFU does not count."""
    cfg = tiny_config()
    docs = [1] * 20
    got = counted(
        DPOObjective(make_model(cfg), PrefLossConfig(), "precomputed"), batch_of(docs, cfg.vocab_size, dpo=True)
    )
    recompute = 2 * cfg.vocab_size * cfg.hidden_size * sum(docs)
    assert got == flops.step_flops(cfg, docs, reference="precomputed") + recompute


@pytest.mark.parametrize("stage", ["sft", "lora_sft", "dpo"])
def test_lm_head_counts_only_the_rows_with_a_target(counted_attention, stage):
    """Rows without a target (an SFT/DPO prompt) need no logits: our fused heads skip them and
    step_flops(head_tokens=) leaves them out, to the FLOP: the counter agrees."""
    cfg = tiny_config()
    docs = [1] * 24
    batch = batch_of(docs, cfg.vocab_size, dpo=stage == "dpo")
    masked = torch.arange(sum(docs)) % 3 == 0  # a third of the rows without a target
    batch = batch.replace(labels=batch.labels.masked_fill(masked, -100), num_target_tokens=int((~masked).sum()))
    targets = ("q_proj", "v_proj")
    lora = dict(lora_rank=4, lora_targets=targets) if stage != "sft" else {}
    model = lora_model(cfg, targets) if lora else make_model(cfg)
    obj = DPOObjective(model, PrefLossConfig(), "precomputed") if stage == "dpo" else LMObjective(model)
    got = counted(obj, batch)
    kw = dict(reference="precomputed") if stage == "dpo" else {}
    want = flops.step_flops(cfg, docs, head_tokens=batch.num_target_tokens, **lora, **kw)
    assert got == want
    skipped = flops.step_flops(cfg, docs, **lora, **kw) - want
    assert skipped == (4 if lora else 6) * cfg.vocab_size * cfg.hidden_size * int(masked.sum())
    with pytest.raises(ValueError, match="head_tokens must be between"):
        flops.step_flops(cfg, docs, head_tokens=sum(docs) + 1)


def test_matmul_part_with_long_documents():
    """Longer documents: the attention term is the only difference from FlopCounterMode,
    whose full s x s count is 2s/(s+1) times the causal one (checked on the formula)."""
    cfg = tiny_config()
    docs = [7, 5, 12]
    a_causal = flops.attention_flops(cfg, docs)
    layers, d_attn = cfg.num_hidden_layers, cfg.num_attention_heads * (cfg.hidden_size // cfg.num_attention_heads)
    full_square = sum(3 * 4 * layers * d_attn * s * s for s in docs)
    assert flops.step_flops(cfg, docs) - a_causal + full_square == _count_full(cfg, docs)


def _count_full(cfg, docs):
    mp = pytest.MonkeyPatch()
    mp.setitem(A.ATTENTION, "sdpa", matmul_attention)
    try:
        return counted(LMObjective(make_model(cfg)), batch_of(docs, cfg.vocab_size))
    finally:
        mp.undo()


def test_bad_arguments_are_named():
    cfg = tiny_config()
    with pytest.raises(ValueError, match="lora_targets"):
        flops.step_flops(cfg, [4], lora_rank=4, lora_targets=["qkv"])
    with pytest.raises(ValueError, match="reference"):
        flops.step_flops(cfg, [4], reference="live")


# ---------------------------------------------------------------- bench_train's rows (issue 26)


def _bench_train():
    import sys

    from helpers import ROOT

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_train

    return bench_train


def _count_fn(fn) -> int:
    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.addmm_: addmm_inplace_flops}) as fc:
        fn()
    return fc.get_total_flops()


def _dpo_rows(cfg, docs, targets, rank=4):
    """bench_train's rows for a precomputed-reference policy side: the policy step, its
    reference scoring (ref_side) and both together (combined), as run_stage builds them."""
    B = _bench_train()
    policy = B.side(
        "policy",
        None,
        [],
        sum(docs),
        sum(docs),
        docs,
        len(docs) // 2,
        work=dict(lora_rank=rank, lora_targets=targets, reference="precomputed"),
        ref_step=None,
    )
    policy.round_seconds = [1.0]
    scoring = B.ref_side("scoring", policy)
    scoring.round_seconds = [1.0]
    return policy, scoring, B.combined("scoring + policy", scoring, policy)


def test_reference_scoring_row_counts_one_forward(counted_attention):
    """The scoring row is charged what scoring computes (a forward of the base model, the
    adapter disabled), not the policy's LoRA training step it was copied from."""
    cfg = tiny_config()
    docs = [1] * 20
    targets = ("q_proj", "k_proj", "v_proj", "o_proj")
    model = lora_model(cfg, targets)
    batch = batch_of(docs, cfg.vocab_size, dpo=True)
    got = _count_fn(lambda: DPOObjective(model, PrefLossConfig(), "adapter").reference_logps(batch))
    policy, scoring, _ = _dpo_rows(cfg, docs, targets)
    assert got == flops.row_flops(cfg, scoring.work) == flops.forward_flops(cfg, docs)
    assert flops.row_flops(cfg, scoring.work) < flops.row_flops(cfg, policy.work) / 2


def test_combined_row_counts_scoring_plus_policy(counted_attention):
    """ "scoring + policy": the sum of both parts' FLOPs (over the sum of both times)."""
    cfg = tiny_config()
    docs = [1] * 20
    targets = ("q_proj", "k_proj", "v_proj", "o_proj")
    model = lora_model(cfg, targets)
    batch = batch_of(docs, cfg.vocab_size, dpo=True)
    scoring_flops = _count_fn(lambda: DPOObjective(model, PrefLossConfig(), "adapter").reference_logps(batch))
    policy_flops = counted(DPOObjective(model, PrefLossConfig(), "precomputed"), batch)
    policy, scoring, both = _dpo_rows(cfg, docs, targets)
    assert scoring_flops + policy_flops == flops.row_flops(cfg, both.work)
    assert both.round_seconds == [2.0]
    assert flops.row_flops(cfg, both.work) == flops.row_flops(cfg, scoring.work) + flops.row_flops(cfg, policy.work)


def test_rows_keep_their_shared_prompt_prefix():
    """The shared-prompt rows pass their kv_prefix to the count (the prefix keys are attended)."""
    cfg = tiny_config()
    docs, prefix = [9, 4, 7, 3], [0, 5, 0, 6]
    B = _bench_train()
    policy = B.side(
        "shared",
        None,
        [],
        23,
        23,
        docs,
        2,
        work=dict(lora_rank=4, lora_targets=("q_proj",), reference="precomputed", kv_prefix=prefix),
        ref_step=None,
    )
    with_prefix = flops.row_flops(cfg, policy.work)
    assert with_prefix == flops.step_flops(
        cfg, docs, lora_rank=4, lora_targets=("q_proj",), reference="precomputed", kv_prefix=prefix
    )
    assert with_prefix > flops.step_flops(cfg, docs, lora_rank=4, lora_targets=("q_proj",), reference="precomputed")
    scoring = B.ref_side("scoring", policy)
    assert flops.row_flops(cfg, scoring.work) == flops.forward_flops(cfg, docs, prefix)


def test_row_layout_shares_put_forwards_in_forward_and_a_frozen_base_has_no_weight_gradient():
    """A row's GEMM ceiling mix (benchmarks/harness.gemm_rate): a full step is a third of its
    FLOPs in each layout (forward 2x, backward 4x the weights' multiply-adds), scoring only
    forwards, a LoRA step its forwards (a live reference's too) and the rest input gradients."""
    cfg = tiny_config()
    docs, targets = [9, 4, 7, 3], ("q_proj", "k_proj", "v_proj", "o_proj")
    full = flops.row_layout_shares(cfg, {"doc_lens": docs})
    assert full == pytest.approx({"forward": 1 / 3, "input_grad": 1 / 3, "weight_grad": 1 / 3})
    policy, scoring, both = _dpo_rows(cfg, docs, targets)
    assert flops.row_layout_shares(cfg, scoring.work) == {"forward": 1.0}
    fwd, total = flops.forward_flops(cfg, docs), flops.row_flops(cfg, policy.work)
    lora = flops.row_layout_shares(cfg, policy.work)
    assert lora == pytest.approx({"forward": fwd / total, "input_grad": 1 - fwd / total})
    live = dict(policy.work, reference="adapter")
    assert flops.row_layout_shares(cfg, live)["forward"] == pytest.approx(2 * fwd / flops.row_flops(cfg, live))
    mixed = flops.row_layout_shares(cfg, both.work)  # scoring then policy: each part by its FLOPs
    assert mixed["forward"] == pytest.approx(2 * fwd / (fwd + total))
    assert sum(mixed.values()) == pytest.approx(1.0)
