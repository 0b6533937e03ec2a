#!/usr/bin/env python3
"""Training throughput: BumbleFast's packed path vs what a user would pick today.

Every side trains on exactly the same samples (as prep tokenized them, with their loss masks),
the same model size and initial weights (ours, loaded into each transformers model; DPO's LoRA
adapters start at B = 0 on every side), the same dtype and optimizer (AdamW), in one run:

  pretrain  ours: packed rows, document-masked attention, fused linear-CE
            transformers Qwen2ForCausalLM on the same rows as blocks (HF group_texts: attention
            across documents); transformers on the same rows with per-document position_ids
            (DataCollatorWithFlattening: documents kept apart, no padding)
  sft       ours: packed rows (best-fit-decreasing), per-document attention, fused loss
            transformers packed with position_ids (DataCollatorWithFlattening over the samples
            of each of our rows); TRL SFTTrainer as its docs recommend for speed (packing=True,
            packing_strategy="bfd", padding_free=True, completion-only loss), its training_step;
            BumbleCore's micro-batches of 4 padded to the longest (the seed row)
  dpo       ours with LoRA: precomputed reference log-probs, and the adapter disabled as live
            reference; TRL DPOTrainer (its collator, fused log-prob LM head and loss; peft LoRA)
            with a live reference and with precompute_ref_log_probs=True, the same pairs in the
            same micro-batches. Views: "policy step only" (both precomputed, the reference
            scoring timed as its own row) and "end to end" (scoring + policy, or live reference).
            Ours also with a shared prompt (issue 16): the same pairs re-laid by prep's share
            as [prompt+chosen][rejected] groups (their log-probs checked equal in fp32), in
            both views; its gain on longer prompts: bench_shared_prompt.py (`--stage dpo`)

Timing: one untimed warm-up step per side, then `--rounds` rounds (5), each side running all
its micro-batches once per round, the sides interleaved in an order rotated each round;
reported: median round with min-max, "within noise" unless the ranges part. DPO: >= --min_pairs
pairs per side over the rounds (64; `bumblefast bench --size cpu`: 2 micro-batches per round and
side, DPO 7, so the section fits in ~4 minutes on 2 cores). Liger kernels on the
transformers sides on CUDA, and the fastest attention transformers has there for packed rows
(hf_attention: flash_attention_2 if flash-attn imports, else sdpa; each row names it). Each
stage builds its models once on the device and copies them for every side (Initial): every
side starts from the same weights. MFU per row by what that row computes (flops.row_flops).
CPU: tiny preset with a tokenizer trained on the data; CUDA: the 1.5B preset.

Every side runs in this process, so under one host allocator, unless a size splits the parties
(`--size real-split`, `real-split-kept`; split_stage): then our sides run in one worker process,
with freed memory kept as `bumblefast train` keeps it, and the peers' in another, with glibc's
default as their users run it (or kept too); each worker builds its own models from the same seed
(the same weights), and the rounds are interleaved across the two workers as above.

  python benchmarks/bench_train.py                       # ../shared/data/alpaca_zh_demo.json
  python benchmarks/bench_train.py --stage all --quick   # CI-sized smoke run
  python benchmarks/bench_train.py --preset bumblebee-1.5b --seq_len 4096   # on a GPU
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import importlib.util
import json
import os
import platform
import signal
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

import harness as H
import stepprofile
import torch
from harness import (
    DEMO,
    ROOT,
    SHARED,
    Side,
    autocast,
    combined,
    device_setup,
    interleave,
    model_config,
    objective_step,
    prepare,
    ref_side,
    side,
)

# the same files copied into the checkout (`make gpu-wheels`), so a GPU run, which gets the
# checkout alone, benches the same data as the CPU runs
BENCHDATA = ROOT / ".benchdata"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")  # ours (DPOConfig's default) and the TRL peer
LORA_DROPOUT = 0.0  # every side (peft's default; ours ships 0.1, which would give our side alone the masks)


def lora_work(lora_rank: int, reference: str | None, **kw) -> dict:
    """A DPO side's `work`: the one LoRA configuration every side runs, and its reference."""
    return dict(lora_rank=lora_rank, lora_targets=LORA_TARGETS, lora_dropout=LORA_DROPOUT, reference=reference, **kw)


# stage -> (real sample file in ../shared/data, the project's own demo file as fallback)
DATA = {
    "sft": ("alpaca_zh_demo.json", "sft_alpaca.json"),
    "pretrain": ("pretrain_zh_demo.json", "pretrain.json"),
    "dpo": ("dpo_zh_demo.json", "dpo.json"),
}


def unpack_rows(shards: Path, row_ids: list[int]) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """The samples (input_ids, loss_mask) inside each of the given packed rows."""
    from streaming import StreamingDataset

    ds = StreamingDataset(local=str(shards), shuffle=False, batch_size=1)
    rows = []
    for i in row_ids:
        row = ds[i]
        ids = torch.from_numpy(row["input_ids"].astype("int64"))
        mask = torch.from_numpy(row["loss_mask"].astype("int64"))
        starts = [0, *torch.tensor(row["seq_lens"].astype("int64")).cumsum(0).tolist()]
        rows.append([(ids[a:b], mask[a:b]) for a, b in zip(starts[:-1], starts[1:])])
    return rows


def load_batches(shards: Path, rows_per_batch: int, n: int, device) -> list:
    """The first n micro-batches of shuffled rows (a representative sample: best-fit-decreasing
    puts the longest samples in the first rows)."""
    from bumblefast.shards.reader import build_loader

    batches = []
    for b in build_loader(str(shards), batch_size=rows_per_batch, shuffle=True, seed=0):
        batches.append(b.to(device))
        if len(batches) == n:
            break
    return batches


def profile_lines(title: str, prof: dict, top: int = 10) -> list[str]:
    lines = [
        "",
        f"### profile of {prof['steps']} steps, {title} ({prof['time_basis']}, {prof['total_ms']:.1f} ms): "
        f"matmul {prof['share_matmul']:.0%}, attention {prof['share_attention']:.0%}",
        "",
        "| op | self ms | share | calls |",
        "|---|---:|---:|---:|",
    ]
    lines += [
        f"| `{o['op'][:60]}` | {o['self_ms']:.1f} | {o['share']:.1%} | {o.get('calls', '')} |"
        for o in prof["top_ops"][:top]
    ]
    return lines


def build_ours(cfg, device):
    """Our model built on the device (meta, then to_empty + init there from a seeded generator
    on the device): a 1.5B fp32 random fill takes ~5-30 s single-threaded on a CPU and well
    under a second on a GPU."""
    from bumblefast.model import Bumblebee

    model = Bumblebee.from_config(cfg, device="meta").to_empty(device=device)
    return model.init_weights(torch.Generator(device=device).manual_seed(0))


class Initial:
    """A stage's initial models, each built once on the device and copied for every side, so
    all sides start from the same weights and the stage pays one init, not one per side: ours
    (build_ours) and transformers' Qwen2ForCausalLM with ours' weights loaded (the same names)."""

    def __init__(self, cfg, device, optimizer: str = "adamw"):
        self.cfg, self.device, self.optimizer_name = cfg, device, optimizer
        self._ours = self._hf = None

    def optimizer(self, params):
        """Every side's optimizer (harness.make_optimizer: AdamW, or SGD where AdamW does not fit)."""
        return H.make_optimizer(params, self.optimizer_name)

    def _base(self):
        if self._ours is None:
            self._ours = build_ours(self.cfg, self.device)
        return self._ours

    def ours(self, share_weights: bool = False):
        """A copy of our model; `share_weights`: its parameters are the pristine ones (LoRA sides,
        whose base weights stay frozen: one copy of a 0.5B base in memory, not one per side)."""
        return _copy(self._base(), share_weights)

    def hf(self, share_weights: bool = False):
        """(model, liger applied?, why not) for a transformers side (`share_weights` as in ours)."""
        if self._hf is None:
            self._hf = hf_model(self.cfg, self.device, self._base().state_dict())
        model, liger, why = self._hf
        return _copy(model, share_weights), liger, why


def _copy(model, share_weights: bool):
    return copy.deepcopy(model, {id(p): p for p in model.parameters()} if share_weights else None)


def ours_side(
    init: Initial,
    batches: list[dict],
    device,
    dtype,
    stage: str,
    reference: str | None = None,
    lora_rank: int = 16,
    layout: str = "",
) -> Side:
    """Our model + the stage's objective on packed micro-batches (a plain AdamW step). DPO with
    reference "precomputed": the side also carries `ref_step`, our reference scoring of a batch
    (what `bumblefast precompute-ref` runs), timed as its own side."""
    from bumblefast.config import DPOConfig
    from bumblefast.train.engine import apply_lora
    from bumblefast.train.objectives import DPOObjective, LMObjective
    from bumblefast.train.pref_losses import PrefLossConfig

    model = init.ours(share_weights=stage == "dpo")  # dpo sides are LoRA: the base stays frozen
    batches = [b.replace() for b in batches]  # our own copies: ref_step writes ref_logps
    extra = {}
    if stage == "dpo":
        torch.manual_seed(0)  # the same adapter init on every side
        lora = dict(
            lora_rank=lora_rank,
            lora_alpha=2 * lora_rank,
            lora_dropout=LORA_DROPOUT,
            lora_target_modules=list(LORA_TARGETS),
        )
        model = apply_lora(model, DPOConfig(finetuning_type="lora", **lora))
        obj = DPOObjective(model, PrefLossConfig(), "adapter")
        if reference == "precomputed":
            scorer = obj

            def ref_step(b):
                with autocast(device, dtype):
                    b.ref_logps = scorer.reference_logps(b)

            for b in batches:
                ref_step(b)
            extra["ref_step"] = ref_step
            obj = DPOObjective(model, PrefLossConfig(), "precomputed")
    else:
        obj = LMObjective(model)
    step = objective_step(model, obj, device, dtype, init.optimizer_name)

    tokens = sum(b.num_tokens for b in batches)
    prefix = [p for b in batches for p in b.kv_prefix.tolist()] if batches[0].kv_prefix is not None else None
    inner = model.get_base_model() if stage == "dpo" else model
    attn = inner.resolved_attn(device, dtype)  # the backend a forward in this compute dtype runs
    dpo = stage == "dpo"
    name = f"bumblefast packed{layout}, {reference} reference" if dpo else f"bumblefast packed ({attn} attention)"
    work = lora_work(lora_rank, reference, kv_prefix=prefix) if dpo else {}
    work["head_tokens"] = sum(b.num_target_tokens for b in batches)  # the rows the LM head must compute
    pairs = sum(DPOObjective.count(b) for b in batches) if dpo else None
    facts = dict(attn=attn, kernels=dict(inner.ops(device).backends), **extra)
    return side(name, step, batches, tokens, tokens, [n for b in batches for n in b.doc_lens], pairs, work, **facts)


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"[:300]


@functools.cache
def hf_liger(device_type: str) -> tuple[bool, str]:
    """Liger's Qwen2 patch for the transformers sides, applied once: (applied?, why not). Any
    failure (not only a missing package: a version mismatch raises at import or patch time)
    leaves the baseline on transformers' own modules and says why."""
    if device_type != "cuda":
        return False, "Liger needs CUDA"
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_qwen2

        apply_liger_kernel_to_qwen2()
    except Exception as e:  # noqa: BLE001 - the baseline runs without it, and the report says why
        why = f"apply_liger_kernel_to_qwen2() failed: {_first_line(e)}"
        print(f"transformers sides without Liger: {why}", flush=True)
        return False, why
    return True, ""


@functools.cache
def hf_attention(device_type: str) -> tuple[str, str]:
    """transformers' attention implementation for the baseline sides, the fastest that exists
    here for packed rows (per-document position_ids, DataCollatorWithFlattening / TRL's
    padding_free): (implementation, why no faster one). flash_attention_2 (varlen kernels, what
    transformers' padding-free guide relies on) when flash-attn imports on CUDA; else sdpa, which
    transformers runs on packed rows with a block-diagonal mask built from position_ids.
    Refused: flex_attention (transformers compiles it with dynamic=False, one cold compile
    per distinct row length: minutes that a 195 s step budget does not have) and hub kernels
    (kernels-community/*: downloaded, and the GPU machine is offline)."""
    if device_type != "cuda":
        return "sdpa", "CPU: flash-attn kernels need CUDA"
    try:
        import flash_attn  # noqa: F401
    except Exception as e:  # noqa: BLE001 - sdpa still runs; the report says why
        impl, why = (
            "sdpa",
            (
                f"flash_attention_2: flash_attn does not import ({_first_line(e)}); flex_attention: one "
                "torch.compile per row length (dynamic=False); hub kernels: offline"
            ),
        )
    else:
        impl, why = "flash_attention_2", ""
    print(f"transformers/TRL sides: attn_implementation={impl}" + (f" ({why})" if why else ""), flush=True)
    return impl, why


def hf_model(cfg, device, state: dict | None = None):
    """transformers' Qwen2ForCausalLM (+ Liger on CUDA) built on the device, with ``state``
    (ours' initial weights: the same names) loaded when given: (model, liger?, why not)."""
    from transformers import Qwen2ForCausalLM

    liger, why = hf_liger(device.type)
    torch.manual_seed(0)
    cfg = type(cfg).from_dict(cfg.to_dict())
    cfg._attn_implementation = hf_attention(device.type)[0]
    with torch.device(device):  # initialised where it runs (see build_ours)
        model = Qwen2ForCausalLM(cfg)
    if state is not None:
        model.load_state_dict(state)
    return model, liger, why


def padded_batches(samples, batch_size: int, pad_id: int, device) -> list[dict]:
    """HF-style micro-batches: `batch_size` samples padded to the longest, prompt labels -100."""
    batches = []
    for i in range(0, len(samples), batch_size):
        group = samples[i : i + batch_size]
        longest = max(len(ids) for ids, _ in group)
        ids = torch.full((len(group), longest), pad_id)
        labels = torch.full((len(group), longest), -100)
        attn = torch.zeros((len(group), longest), dtype=torch.long)
        for j, (x, m) in enumerate(group):
            ids[j, : len(x)] = x
            attn[j, : len(x)] = 1
            labels[j, : len(x)] = torch.where(m.bool(), x, torch.full_like(x, -100))
        batches.append(
            {
                "input_ids": ids.to(device),
                "attention_mask": attn.to(device),
                "labels": labels.to(device),
                "real": int(attn.sum()),
                "padded": ids.numel(),
                "lens": [len(x) for x, _ in group],
            }
        )
    return batches


def flattened_batches(sample_groups, device) -> list[dict]:
    """transformers' DataCollatorWithFlattening on each group of samples (the samples of one of
    our packed rows): one [1, T] row, per-document position_ids, labels -100 on prompts and on
    each document's first token; transformers separates the documents by their position_ids."""
    from transformers import DataCollatorWithFlattening

    collate = DataCollatorWithFlattening(return_position_ids=True)
    out = []
    for group in sample_groups:
        feats = [
            {"input_ids": x.tolist(), "labels": torch.where(m.bool(), x, torch.full_like(x, -100)).tolist()}
            for x, m in group
        ]
        b = collate(feats)
        n = b["input_ids"].numel()
        out.append(
            {
                "input_ids": b["input_ids"].to(device),
                "position_ids": b["position_ids"].to(device),
                "labels": b["labels"].to(device),
                "real": n,
                "padded": n,
                "lens": [len(x) for x, _ in group],
            }
        )
    return out


def hf_named(name: str, liger: bool, liger_why: str, device) -> tuple[str, dict]:
    """A transformers/TRL side's name with what it runs (its attention and Liger), and those facts."""
    impl, why = hf_attention(device.type)
    label = f"{name} ({impl}" + (" + Liger)" if liger else ")")
    return label, dict(liger=liger, liger_why=liger_why, attn=impl, attn_why=why)


def hf_side(name: str, init: Initial, batches: list[dict], device, dtype) -> Side:
    """transformers' Qwen2 (+ Liger on CUDA) on HF-style batches: input_ids, labels and either
    attention_mask (padded/blocks) or position_ids (packed, document-separated)."""
    model, liger, liger_why = init.hf()
    opt = init.optimizer(model.parameters())
    keys = ("input_ids", "attention_mask", "position_ids", "labels")

    def step(b):
        with autocast(device, dtype):
            out = model(**{k: b[k] for k in keys if k in b}, use_cache=False)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    label, facts = hf_named(name, liger, liger_why, device)
    real, padded = sum(b["real"] for b in batches), sum(b["padded"] for b in batches)
    return side(label, step, batches, real, padded, [n for b in batches for n in b["lens"]], **facts)


# The GPU machine has no TRL (benchmarks/gpu/run.sh installs only what the trainer needs): there
# the TRL peers are left out and the report says so; every other side still runs.
HAVE_TRL = importlib.util.find_spec("trl") is not None


def trl_args(config_cls, device, dtype, out: str, **kw):
    return config_cls(
        output_dir=out,
        per_device_train_batch_size=1,
        use_cpu=device.type == "cpu",
        bf16=dtype == torch.bfloat16,
        report_to=[],
        save_strategy="no",
        logging_steps=10**9,
        disable_tqdm=True,
        dataloader_num_workers=0,
        **kw,
    )


def trl_sft_side(init: Initial, samples, seq_len: int, device, dtype, tok, workdir: Path) -> Side:
    """TRL's SFTTrainer as its docs recommend for speed: packing=True with best-fit-decreasing
    (padding-free rows with per-document position_ids), completion-only loss, on the same
    tokenized samples (input_ids + completion_mask); timed: its training_step (TRL's loss with
    its token-accuracy/entropy metrics, backward) + the same AdamW step."""
    from trl import SFTConfig, SFTTrainer

    from datasets import Dataset

    model, liger, liger_why = init.hf()
    ds = Dataset.from_list([{"input_ids": x.tolist(), "completion_mask": m.tolist()} for x, m in samples])
    args = trl_args(
        SFTConfig,
        device,
        dtype,
        str(workdir / "trl_sft"),
        max_length=seq_len,
        packing=True,
        packing_strategy="bfd",
        padding_free=True,
        completion_only_loss=True,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train(); training_step reads it
    batches = list(trainer.get_train_dataloader())
    opt = init.optimizer(model.parameters())

    def step(b):
        trainer.training_step(trainer.model, b)
        opt.step()
        opt.zero_grad(set_to_none=True)

    real = sum(int(b["input_ids"].numel()) for b in batches)
    lens = (
        [n for b in batches for n in torch.diff(b["cu_seq_lens_q"]).tolist()]
        if "cu_seq_lens_q" in batches[0]
        else [int(b["input_ids"].shape[1]) for b in batches]
    )
    if sum(lens) != real or real != sum(len(x) for x, _ in samples):
        raise RuntimeError(f"TRL SFT packed {real} tokens, the samples hold {sum(len(x) for x, _ in samples)}")
    label, facts = hf_named("TRL SFTTrainer, packing=bfd + padding_free", liger, liger_why, device)
    return side(label, step, batches, real, real, lens, **facts)


def trl_pairs(pair_batches: list[list]) -> list[list[dict]]:
    """Our pairs (ids, loss mask of chosen and rejected) as TRL's pre-tokenized examples."""

    def split(x, m):  # (ids, loss mask) of one segment -> its prompt and completion
        first = int(m.nonzero()[0]) if m.any() else len(x)
        return x[:first].tolist(), x[first:].tolist()

    groups = []
    for pairs in pair_batches:
        group = []
        for (c, cm), (r, rm) in pairs:
            (p, ch), (_, rj) = split(c, cm), split(r, rm)
            group.append({"prompt_ids": p, "chosen_ids": ch, "rejected_ids": rj})
        groups.append(group)
    return groups


def trl_dpo_sides(
    init: Initial, pair_batches: list[list], device, dtype, tok, workdir: Path, lora_rank: int = 16
) -> list[Side]:
    """TRL's DPOTrainer (its collator: [chosen; rejected] padded, its fused-LM-head log-probs and
    loss; peft LoRA, the reference = the adapter disabled) on the same pairs, in the same
    micro-batches as ours: live reference (precompute_ref_log_probs=False) and precomputed
    (precompute_ref_log_probs=True; its reference pass, compute_ref_log_probs over the batches,
    is timed as its own side `ref_step`). Tokenization is skipped: the pairs are already tokens."""
    groups = trl_pairs(pair_batches)
    return [trl_dpo_side(init, groups, pre, device, dtype, tok, workdir, lora_rank) for pre in (False, True)]


def trl_dpo_side(init: Initial, groups: list[list[dict]], pre: bool, device, dtype, tok, workdir, lora_rank) -> Side:
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    from datasets import Dataset

    class PreTokenized(DPOTrainer):
        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset

    model, liger, liger_why = init.hf(share_weights=True)  # LoRA: the base stays frozen
    torch.manual_seed(0)  # the same adapter init as ours
    args = trl_args(
        DPOConfig, device, dtype, str(workdir / f"trl_dpo_{pre}"), max_length=None, precompute_ref_log_probs=pre
    )
    lora = LoraConfig(
        r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=LORA_DROPOUT, target_modules=list(LORA_TARGETS)
    )
    ds = Dataset.from_list([e for g in groups for e in g])
    trainer = PreTokenized(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=lora)
    trainer.current_gradient_accumulation_steps = 1
    batches = [trainer._prepare_inputs(trainer.data_collator([dict(e) for e in g])) for g in groups]
    extra = {}
    if pre:

        def ref_step(b):
            b["ref_chosen_logps"], b["ref_rejected_logps"] = trainer.compute_ref_log_probs(trainer.model, b)

        for b in batches:
            ref_step(b)
        extra["ref_step"] = ref_step
    opt = init.optimizer(trainer.model.parameters())

    def step(b):
        trainer.training_step(trainer.model, b)
        opt.step()
        opt.zero_grad(set_to_none=True)

    name = "TRL DPOTrainer, " + ("precompute_ref_log_probs=True" if pre else "live reference")
    label, facts = hf_named(name, liger, liger_why, device)
    real, computed = (
        sum(int(b["attention_mask"].sum()) for b in batches),
        sum(int(b["input_ids"].numel()) for b in batches),
    )
    lens = [int(n) for b in batches for n in b["attention_mask"].sum(1).tolist()]
    work = lora_work(lora_rank, "precomputed" if pre else "adapter")
    return side(label, step, batches, real, computed, lens, sum(len(g) for g in groups), work, **facts, **extra)


def samples_of(shards: Path, batches: list[dict]) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Per micro-batch, the samples inside its rows (as prep tokenized them)."""
    return [[s for row in unpack_rows(shards, b.sample_ids.tolist()) for s in row] for b in batches]


def shared_prompt_batches(groups: list[list], seq_len: int, device) -> list[dict]:
    """The pairs of each micro-batch again, in the shared-prompt layout (prep's share: one
    [prompt+chosen][rejected] group per pair, attending the prompt), as one row each."""
    import numpy as np

    from bumblefast.prep import share
    from bumblefast.shards.collate import collate_rows

    out = []
    for g in groups:
        row = {"input_ids": [], "loss_mask": [], "seq_lens": [], "prompt_lens": []}
        for chosen, rejected in zip(g[0::2], g[1::2], strict=True):
            c, r = ((ids.numpy(), mask.numpy()) for ids, mask in (chosen, rejected))
            p = share.prompt_len(c, r)
            for ids, mask in share.share(c, r, p):
                row["input_ids"].append(ids)
                row["loss_mask"].append(mask)
                row["seq_lens"].append(len(ids))
            row["prompt_lens"].append(p)
        row = {k: np.concatenate(v) if k in ("input_ids", "loss_mask") else np.asarray(v) for k, v in row.items()}
        b = collate_rows([{**row, "sample_id": 0}], "dpo", seq_len)
        out.append(b.to(device))
    return out


def summarize(sd: Side, cfg, peak: float | None, gemm: list[Side] | None = None) -> dict:
    """One table row: median of the rounds with the min-max range (real tokens/s; pairs/s for DPO);
    `gemm`: the GEMM ceiling's sides (harness.gemm_sides, CPU): the row's share of the machine's
    rate at the model's matmul shapes, in the row's own mix of layouts (flops.row_layout_shares)."""
    import benchlib as BL

    from bumblefast import flops

    secs = sd.round_seconds
    tok = BL.rounds(sd.name, sd.real_tokens, secs)
    out = {
        "name": sd.name,
        "rounds": len(secs),
        "steps_per_round": len(sd.batches),
        "round_seconds": secs,
        "seconds": tok["seconds"],
        "real_tokens": sd.real_tokens,
        "computed_tokens": sd.computed_tokens,
        "real_tokens_per_sec": tok["value"],
        "real_tokens_per_sec_range": tok["range"],
        "real_token_fraction": sd.real_tokens / sd.computed_tokens,
    }
    if sd.pairs:
        pairs = BL.rounds(sd.name, sd.pairs, secs, "pairs/s")
        out.update(pairs=sd.pairs, pairs_per_sec=pairs["value"], pairs_per_sec_range=pairs["range"])
    for key in ("attn", "attn_why", "liger", "liger_why", "step_peak_mb"):
        if sd.facts.get(key) not in (None, ""):
            out[key] = sd.facts[key]
    # FLOPs by what this row computes (its own LoRA, reference, kv_prefix; scoring: a forward)
    out["flops_per_round"] = flops.row_flops(cfg, sd.work)
    if peak:
        out["mfu"] = out["flops_per_round"] / tok["seconds"] / (peak * 1e12)
    if gemm:  # the ceiling of this row's own GEMM mix (a forward only, a frozen base, a full step)
        ceiling = H.gemm_rate(gemm, flops.row_layout_shares(cfg, sd.work))
        out["gemm_gflops"], out["gemm_gflops_range"] = ceiling["gflops"], ceiling["range"]
        out["gemm_fraction"] = out["flops_per_round"] / tok["seconds"] / (ceiling["gflops"] * 1e9)
    return out


# comparison id -> the ratio ours must reach, per target set (Settings.targets; each comparison names its id)
TARGETS = {
    "tiny": {  # issue 13; CPU, tiny preset, 2 cores
        "sft/transformers_packed": 1.4,
        "sft/trl_sft": 1.4,
        "dpo/policy_vs_trl": 1.5,
        "dpo/shared_policy_vs_trl": 1.5,
        "dpo/end_to_end_vs_trl_live": 1.5,
        "dpo/shared_prompt_policy": 1.3,  # issue 16: where prompts are >= 40% of pair tokens (dpo_zh_demo: 42%)
    },
    "real": {  # issue 29; CPU, the 0.5B shape at the 151,936-row vocabulary
        "sft/transformers_packed": 1.3,
        "sft/trl_sft": 1.3,
        "dpo/policy_vs_trl": 2.0,
        "dpo/shared_policy_vs_trl": 2.5,
    },
}
REAL_MEMORY_TARGET = 0.7  # issue 29: our SFT step's peak memory / transformers packed's, at most
REAL_GEMM_TARGET = 0.8  # issue 29: our step's useful FLOP/s / the machine's GEMM rate at the model's shapes


def measurement(row: dict, key: str) -> dict:
    """A summary row's rounds as benchlib's measurement (pairs/s or real tokens/s)."""
    import benchlib as BL

    unit, work = ("pairs/s", "pairs") if key == "pairs_per_sec" else ("tokens/s", "real_tokens")
    return BL.rounds(row["name"], row[work], row["round_seconds"], unit)


def compare(
    stage: str, view: str, ours: dict, base: dict, key: str, target: str | None = None, goals: dict | None = None
) -> dict:
    """Ours vs one baseline: median ratio, both ranges and the verdict (overlap = within noise);
    `target`: the comparison's id in `goals` (one of TARGETS)."""
    r = H.compare(view, measurement(ours, key), measurement(base, key))
    goal = (goals or TARGETS["tiny"]).get(target) if target else None
    return {
        "stage": stage,
        "view": view,
        "ours": ours["name"],
        "baseline": base["name"],
        "key": key,
        "ratio": r["value"],
        "verdict": r["verdict"],
        "target": goal,
        "target_id": target,
        "target_met": None if goal is None else bool(r["value"] >= goal),
    }


def stage_data(stage: str, s: Settings) -> Path:
    real, fallback = DATA[stage]
    if s.data and stage == s.stage:
        return Path(s.data)
    return next((d / real for d in (BENCHDATA, SHARED) if (d / real).is_file()), DEMO / fallback)


def stage_batches(stage: str, shards: Path, s: Settings, device) -> list:
    """The micro-batches every side runs once per round; DPO: enough that each side times >=
    min_pairs pairs over its rounds."""
    from bumblefast.train.objectives import DPOObjective

    steps = s.steps or (2 if s.quick else (8 if device.type == "cuda" else 4))
    if stage != "dpo":
        return load_batches(shards, s.rows, steps, device)
    batches, pairs = [], 0
    for b in load_batches(shards, s.rows, 10**6, device):
        if len(batches) >= steps and pairs * s.rounds >= s.min_pairs:
            break
        batches.append(b)
        pairs += DPOObjective.count(b)
    return batches


def sample_groups(stage: str, shards: Path, batches: list) -> list:
    """Per micro-batch, its samples (input_ids, loss mask); pretrain: its documents."""
    if stage != "pretrain":
        return samples_of(shards, batches)
    cuts = lambda b: zip(b.cu_seqlens[:-1].tolist(), b.cu_seqlens[1:].tolist())  # noqa: E731
    return [[(b.input_ids[a:e], torch.ones(e - a, dtype=torch.long)) for a, e in cuts(b)] for b in batches]


PARTIES = ("ours", "peers")
# each stage's sides in timing order, by role (lm_sides, dpo_sides)
ORDER = {
    "pretrain": ("ours", "packed", "blocks"),
    "sft": ("ours", "packed", "trl", "padded"),
    "dpo": ("pre", "shared", "trl_pre", "live", "trl_live", "ours_ref", "shared_ref", "trl_ref"),
}
GEMM = "gemm/"  # the ceiling's roles, one per layout: ours' party times them (under our allocator)


@dataclasses.dataclass
class Stage:
    """A stage's sides by role (built here, or a worker's as proxies) and its GEMM ceiling."""

    stage: str
    data: str
    seq_len: int
    cfg: Any
    role: dict
    ceiling: list

    @property
    def sides(self) -> list[Side]:
        return [self.role[k] for k in ORDER[self.stage] if k in self.role]

    def profiled(self) -> list[Side]:
        """The sides whose steps are profiled (dpo: the policy steps)."""
        keys = ("pre", "shared", "trl_pre") if self.stage == "dpo" else ORDER[self.stage]
        return [self.role[k] for k in keys if k in self.role]


def parties(s: Settings) -> tuple[str, ...]:
    return PARTIES if s.peers else ("ours",)


def build_stage(stage: str, s: Settings, device, dtype, preset: str, workdir: Path, parts=PARTIES) -> Stage:
    """The stage's data (prepped in `workdir`), its model config and the sides of `parts`."""
    from transformers import AutoTokenizer

    from bumblefast import flops

    data, seq_len = stage_data(stage, s), 256 if s.quick else s.seq_len
    t0 = time.perf_counter()
    tok_dir, shards = prepare(data, stage, seq_len, workdir, s.vocab, tokenizer=s.tokenizer)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    cfg = model_config(preset, len(tok))
    batches = stage_batches(stage, shards, s, device)
    print(
        f"[{stage}] data {data.name}: {len(batches)} micro-batches of {s.rows} row(s) <= {seq_len} tokens "
        f"per round, {s.rounds} rounds; preset {preset} ({flops.param_count(cfg) / 1e6:.1f}M params), {device}, "
        f"{dtype}; {'/'.join(parts)}; prep {time.perf_counter() - t0:.1f}s",
        flush=True,
    )
    groups, init = sample_groups(stage, shards, batches), Initial(cfg, device, s.optimizer)
    if stage == "dpo":
        role = dpo_sides(init, groups, batches, seq_len, device, dtype, tok, workdir, parts)
    else:
        role = lm_sides(stage, init, groups, batches, seq_len, s.baseline_batch, device, dtype, tok, workdir, parts)
    del init  # the pristine copies: every side holds its own
    # the peers' rows: the same samples, so the same rows with a target (flops.step_flops)
    head = sum(b.num_target_tokens for b in batches)
    for sd in role.values():
        sd.work.setdefault("head_tokens", head)
    # CPU: the machine's own ceiling at this model's shapes, timed in the same rounds (CUDA: MFU)
    gemm = s.gemm and "ours" in parts
    ceiling = H.gemm_sides(H.model_gemm_shapes(cfg, seq_len * s.rows), device, dtype) if gemm else []
    return Stage(stage, data.name, seq_len, cfg, role, ceiling)


def run_stage(stage: str, s: Settings, device, dtype, preset: str, peak) -> dict:
    """A stage's sides built and timed in this process (every side under this process's
    allocator), or with `s.split` on CPU each party in a process of its own (split_stage)."""
    if s.split and device.type == "cpu":
        return split_stage(stage, s, device, dtype, preset, peak)
    with tempfile.TemporaryDirectory() as tmp:
        st = build_stage(stage, s, device, dtype, preset, Path(tmp), parties(s))
        interleave(st.sides + st.ceiling, s.rounds, device=device, memory=s.memory)
        prof = lambda sd: stepprofile.profile_steps(sd.step, sd.batches[-2:], device)  # noqa: E731
        profiles = {sd.name: prof(sd) for sd in st.profiled()} if s.profile else {}
        return stage_result(st, s, peak, profiles)


def stage_result(st: Stage, s: Settings, peak, profiles: dict, processes: dict | None = None) -> dict:
    """The stage's rows (each side's rounds summarized), comparisons and profiles (by side name)."""
    gemm = H.gemm_summary(st.ceiling) if st.ceiling else None
    if gemm:
        each = ", ".join(f"{k} {v['gflops']:.1f}" for k, v in gemm["layouts"].items())
        print(f"  GEMM at the model's shapes: {gemm['gflops']:.1f} GFLOP/s ({each})", flush=True)
    sides = st.sides
    for sd in sides:
        print(f"  {sd.name}: rounds {', '.join(f'{x:.2f}' for x in sd.round_seconds)} s", flush=True)
    ceiling, goals = (st.ceiling or None), TARGETS[s.targets]
    rows = [summarize(sd, st.cfg, peak, ceiling) for sd in sides]
    if st.stage == "dpo":
        rows, comparisons = dpo_rows(rows, st.role, st.cfg, peak, ceiling, goals)
    else:
        comparisons = [
            compare(st.stage, "", rows[0], r, "real_tokens_per_sec", sd.target, goals)
            for r, sd in zip(rows[1:], sides[1:])
        ]
    by = {r["name"]: r for r in rows}
    for name, prof in profiles.items():  # every side (dpo: the policy steps): a missed target needs the peer's too
        by[name]["profile"] = prof
    out = {
        "stage": st.stage,
        "data": st.data,
        "seq_len": st.seq_len,
        "rounds": s.rounds,
        "results": rows,
        "comparisons": comparisons,
        "attention": sides[0].facts.get("attn") if st.stage != "dpo" else None,
        "optimizer": s.optimizer,
        "gemm": gemm,
        "peers_not_run": peers_not_run(s.peers),
    }
    if processes:
        out["processes"] = processes
    return out


# ---------------------------------------------------------------- each party in its own process

WORKER_TAG = "@@bench_train "


def split_stage(stage: str, s: Settings, device, dtype, preset: str, peak) -> dict:
    """The stage with each party's sides built and stepped in a worker process of its own
    (`python bench_train.py --worker`), so each runs under its own host allocator: ours as
    `bumblefast train` sets it (freed memory kept), the peers' as `s.split` says ("glibc": the
    default their users run; "kept": ours, given to them too). One process cannot do this
    (glibc's dynamic mmap threshold cannot be restored once set), and one heap for every side
    is near this machine's 24 GB at the 0.5B shape. The timing is the same as run_stage's: the
    warm-up steps, then interleaved rounds, each round one request to the side's worker. A worker
    whose heap was handed back to make room for another's step runs one untimed step before its
    next round or profile (`rewarm`), so neither pays the page faults the harness caused."""
    workers: dict[str, H.BenchServer] = {}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            proxies, meta = {}, {}
            for party in parties(s):  # built one after the other: their set-ups peak apart
                env = dict(os.environ, PYTHONUNBUFFERED="1")
                if party == "peers" and s.split == "glibc":
                    env["BUMBLEFAST_KEEP_FREED_MEMORY"] = "0"
                cmd = [sys.executable, str(Path(__file__).resolve()), "--worker"]
                log = Path(tmp) / f"{party}.log"
                w = workers[party] = H.BenchServer(cmd, env=env, log=log, tag=WORKER_TAG, name=party, echo=True)
                meta[party] = w.request({"stage": stage, "settings": dataclasses.asdict(s), "party": party})
                for key, d in meta[party]["sides"].items():
                    proxies[key] = Side(**{**d, "batches": [None] * d["batches"]}, step=None)
                    proxies[key].facts["worker"] = party
            key_of = {sd.name: k for k, sd in proxies.items()}
            ceiling = [proxies.pop(k) for k in list(proxies) if k.startswith(GEMM)]
            cfg = model_config(preset, meta[parties(s)[0]]["vocab"])
            st = Stage(stage, meta["ours"]["data"], meta["ours"]["seq_len"], cfg, proxies, ceiling)

            trims, rewarms, cold = dict.fromkeys(workers, 0), dict.fromkeys(workers, 0), set()

            def ask(sd: Side, op: str):
                # the idle workers hand their free heap back when this step might not fit beside
                # them (its warm-up's peak unknown yet, or above what the machine has free)
                own, need = sd.facts["worker"], sd.facts.get("step_peak_mb")
                if op == "warm" or need is None or available_mb() < 1.25 * need + 1024:
                    for party in workers.keys() - {own}:
                        workers[party].request({"op": "trim"})
                        trims[party] += op != "warm"
                        cold.add(party)
                if op != "warm" and own in cold:  # a handed-back heap is faulted in untimed (as
                    workers[own].request({"op": "rewarm", "role": key_of[sd.name]})  # a warm-up)
                    rewarms[own] += 1
                cold.discard(own)
                return workers[own].request({"op": op, "role": key_of[sd.name]})

            for sd in st.sides + st.ceiling:
                sd.facts.update(ask(sd, "warm"))
            interleave(st.sides + st.ceiling, s.rounds, run=lambda sd, r: sd.round_seconds.append(ask(sd, "round")))
            profiles = {sd.name: ask(sd, "profile") for sd in st.profiled()} if s.profile else {}
        finally:
            for w in workers.values():
                w.close()
    processes = {
        p: {"pid": m["pid"], "malloc": m["malloc"], "trims_between_rounds": trims[p], "rewarm_steps": rewarms[p]}
        for p, m in meta.items()
    }
    return stage_result(st, s, peak, profiles, processes)


def available_mb() -> float:
    """The machine's available memory (/proc/meminfo MemAvailable), MB."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("inf")


def worker() -> int:
    """split_stage's child: builds one party's sides of a stage (its first request), then
    answers "warm" (the warm-up step, with its peak memory), "rewarm" (an untimed step), "round"
    (seconds), "profile" for a side by role, and "trim", one tagged JSON line each, until its input ends."""
    from bumblefast.cpu_memory import keep_freed_memory, return_freed_memory

    def answer(obj) -> None:
        print(WORKER_TAG + json.dumps(obj), flush=True)

    first = json.loads(sys.stdin.readline())
    settings = first["settings"]
    s = Settings(**{**settings, "stages": tuple(settings["stages"])})
    device, dtype, preset, _ = device_setup(s.preset)
    with tempfile.TemporaryDirectory() as tmp:
        st = build_stage(first["stage"], s, device, dtype, preset, Path(tmp), (first["party"],))
        sides = {**st.role, **{GEMM + sd.work["layout"]: sd for sd in st.ceiling}}
        plain = lambda facts: {k: v for k, v in facts.items() if not callable(v)}  # noqa: E731
        described = {
            k: dict(
                name=sd.name,
                batches=len(sd.batches),
                real_tokens=sd.real_tokens,
                computed_tokens=sd.computed_tokens,
                pairs=sd.pairs,
                work=sd.work,
                facts=plain(sd.facts),
                target=sd.target,
            )
            for k, sd in sides.items()
        }
        info = dict(data=st.data, seq_len=st.seq_len, vocab=st.cfg.vocab_size, pid=os.getpid())
        answer({"sides": described, "malloc": keep_freed_memory(), **info})
        for line in sys.stdin:
            req = json.loads(line)
            if req["op"] == "trim":  # the parent's: another worker's step needs the memory
                return_freed_memory()
                answer({})
                continue
            sd = sides[req["role"]]
            if req["op"] == "warm":
                H.warm_up(sd, device, s.memory)
                answer({"step_peak_mb": sd.facts["step_peak_mb"]} if s.memory else {})
            elif req["op"] == "rewarm":  # its heap was handed back since its last step: untimed
                H.warm_up(sd, device)
                answer({})
            elif req["op"] == "round":
                answer(H.time_round(sd, device))
            else:
                answer(stepprofile.profile_steps(sd.step, sd.batches[-2:], device))
    return 0


def peers_not_run(peers: bool) -> list[str]:
    """The peers a stage left out, and why (the report names them)."""
    if not peers:
        return ["every peer"]
    return [] if HAVE_TRL else ["TRL (not installed)"]


def lm_sides(
    stage, init, groups, batches, seq_len: int, baseline_batch: int, device, dtype, tok, work, parties=PARTIES
) -> dict[str, Side]:
    """pretrain/sft, by role: ours, transformers packed (position_ids), then pretrain: transformers
    on blocks; sft: TRL's SFTTrainer and transformers padded (BumbleCore's micro-batches).
    `parties`: whose sides to build (ours, the peers' or both)."""
    role = {"ours": ours_side(init, batches, device, dtype, stage)} if "ours" in parties else {}
    if "peers" not in parties:
        return role
    name = "transformers packed, position_ids (DataCollatorWithFlattening)"
    role["packed"] = hf_side(name, init, flattened_batches(groups, device), device, dtype)
    if stage == "pretrain":  # HF's group_texts blocks = the same rows, no document masking
        name = "transformers blocks (cross-document attention)"
        role["blocks"] = hf_side(name, init, blocks_of(batches, seq_len), device, dtype)
        return role
    role["packed"] = role["packed"].with_(target="sft/transformers_packed")
    samples = [x for g in groups for x in g]
    if HAVE_TRL:
        role["trl"] = trl_sft_side(init, samples, seq_len, device, dtype, tok, work).with_(target="sft/trl_sft")
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(0)).tolist()
    padded = padded_batches([samples[i] for i in order], baseline_batch, tok.pad_token_id, device)
    role["padded"] = hf_side(f"transformers padded x{baseline_batch} (BumbleCore)", init, padded, device, dtype)
    return role


def blocks_of(batches: list, seq_len: int) -> list[dict]:
    """Our packed rows as HF blocks of seq_len: causal attention across documents."""
    out = []
    for b in batches:
        ids = b.input_ids.view(-1, seq_len)
        n = ids.numel()
        out.append(
            dict(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                labels=ids,
                real=n,
                padded=n,
                lens=[seq_len] * ids.shape[0],
            )
        )
    return out


def dpo_sides(init, groups, batches, seq_len: int, device, dtype, tok, work, parties=PARTIES) -> dict[str, Side]:
    """By role: ours (precomputed and live reference, shared prompt) and TRL's, with the
    reference scoring of each precomputed side as its own side (`parties` as in lm_sides)."""
    role = {}
    if "ours" in parties:
        role["live"] = ours_side(init, batches, device, dtype, "dpo", "adapter")
        role["pre"] = pre = ours_side(init, batches, device, dtype, "dpo", "precomputed")
        # the same pairs with each prompt computed once (issue 16): policy step and scoring
        shared_batches = shared_prompt_batches(groups, seq_len, device)
        shared = ours_side(init, shared_batches, device, dtype, "dpo", "precomputed", layout=", shared prompt")
        role["shared"], role["ours_ref"] = shared, ref_side("bumblefast reference scoring", pre)
        role["shared_ref"] = ref_side("bumblefast reference scoring, shared prompt", shared)
        if dtype == torch.float32:  # like for like: the same pairs give the same log-probs
            for a, b in zip(pre.batches, shared.batches, strict=True):
                torch.testing.assert_close(b.ref_logps, a.ref_logps, rtol=1e-4, atol=1e-3)
    if HAVE_TRL and "peers" in parties:
        pairs = [[(g[i], g[i + 1]) for i in range(0, len(g), 2)] for g in groups]
        role["trl_live"], role["trl_pre"] = trl_dpo_sides(init, pairs, device, dtype, tok, work)
        role["trl_ref"] = ref_side("TRL DPOTrainer reference scoring (compute_ref_log_probs)", role["trl_pre"])
    return role


def dpo_rows(rows: list[dict], role: dict, cfg, peak, gemm=None, goals=None) -> tuple[list[dict], list[dict]]:
    """DPO's rows (policy steps, end to end = scoring + policy, live reference, scoring) and its
    comparisons, pairs/s."""
    cmp = functools.partial(compare, goals=goals)
    by = {r["name"]: r for r in rows}
    row = lambda k: by[role[k].name]  # noqa: E731
    both = lambda name, scoring, policy: summarize(combined(name, role[scoring], role[policy]), cfg, peak, gemm)  # noqa: E731
    e2e_o = both("bumblefast precomputed reference, scoring + policy", "ours_ref", "pre")
    e2e_s = both("bumblefast shared prompt, precomputed reference, scoring + policy", "shared_ref", "shared")
    shared_rows, key = [row("shared"), e2e_s, row("shared_ref")], "pairs_per_sec"
    comparisons = [
        cmp("dpo", "shared prompt, policy step only", row("shared"), row("pre"), key, "dpo/shared_prompt_policy"),
        cmp("dpo", "shared prompt, end to end", e2e_s, e2e_o, key),
    ]
    if "trl_pre" not in role:  # ours only: no peer to compare with
        return [row("pre"), e2e_o, row("live"), row("ours_ref"), *shared_rows], comparisons
    e2e_t = both("TRL DPOTrainer precompute_ref_log_probs=True, scoring + policy", "trl_ref", "trl_pre")
    trl_pre, trl_live, e2e_vs_live = row("trl_pre"), row("trl_live"), "dpo/end_to_end_vs_trl_live"
    comparisons += [
        cmp("dpo", "policy step only", row("shared"), trl_pre, key, "dpo/shared_policy_vs_trl"),
        cmp("dpo", "end to end", e2e_s, trl_live, key, e2e_vs_live),
        cmp("dpo", "policy step only", row("pre"), trl_pre, key, "dpo/policy_vs_trl"),
        cmp("dpo", "end to end", e2e_o, trl_live, key, e2e_vs_live),
        cmp("dpo", "end to end", e2e_o, e2e_t, key),
        cmp("dpo", "end to end", row("live"), trl_live, key, e2e_vs_live),
        cmp("dpo", "reference scoring", row("ours_ref"), row("trl_ref"), key),
    ]
    rows = [row("pre"), trl_pre, e2e_o, e2e_t, row("live"), trl_live, row("ours_ref"), row("trl_ref"), *shared_rows]
    return rows, comparisons


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("torch", "transformers", "trl", "peft", "datasets", "liger-kernel"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def table(stages: list[dict], title: str) -> list[str]:
    """Markdown: every configuration (median, min-max over rounds) and every comparison."""
    memory = any("step_peak_mb" in r for st in stages for r in st["results"])
    lines = [
        title,
        "",
        "| stage | configuration | real tokens/s median (min-max) | pairs/s median (min-max) "
        "| real-token fraction | MFU (CPU: share of its GEMM rate) |" + (" step peak memory |" if memory else ""),
        "|---|---|---|---|---|---|" + ("---|" if memory else ""),
    ]
    for st in stages:
        for r in st["results"]:
            lo, hi = r["real_tokens_per_sec_range"]
            pairs = (
                f"{r['pairs_per_sec']:.2f} ({r['pairs_per_sec_range'][0]:.2f}-{r['pairs_per_sec_range'][1]:.2f})"
                if "pairs_per_sec" in r
                else "-"
            )
            mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "n/a (CPU)"
            if "gemm_fraction" in r:
                mfu = f"{100 * r['gemm_fraction']:.0f}% of {r['gemm_gflops']:.0f} GFLOP/s"
            mem = (f" {r['step_peak_mb']:,.0f} MB |" if "step_peak_mb" in r else " - |") if memory else ""
            lines.append(
                f"| {st['stage']} (seq {st['seq_len']}, {st['rounds']} rounds) | {r['name']} | "
                f"{r['real_tokens_per_sec']:,.0f} ({lo:,.0f}-{hi:,.0f}) | {pairs} | "
                f"{r['real_token_fraction']:.3f} | {mfu} |{mem}"
            )
    lines += [
        "",
        "| stage | view | ours | baseline | ratio (medians) | verdict | target |",
        "|---|---|---|---|---|---|---|",
    ]
    for st in stages:
        for c in st["comparisons"]:
            tgt = "-" if c["target"] is None else f">= {c['target']}x: {'met' if c['target_met'] else 'MISSED'}"
            lines.append(
                f"| {c['stage']} | {c['view'] or c['key'].replace('_per_sec', '/s')} | {c['ours']} | "
                f"{c['baseline']} | {c['ratio']:.2f}x | {c['verdict']} | {tgt} |"
            )
    lines += ["", "verdict: 'faster'/'slower' only when the min-max ranges of the rounds do not overlap."]
    return lines


@dataclasses.dataclass
class Settings:
    """One run's settings: the command line's flags (see main), or a size's (SIZES)."""

    stage: str = "sft"
    data: str | None = None
    preset: str | None = None
    seq_len: int = 2048
    rows: int = 1
    baseline_batch: int = 4
    steps: int | None = None
    rounds: int = 5
    min_pairs: int = 64
    vocab: int = 8192
    quick: bool = False
    profile: bool = False
    peak_tflops: float | None = None
    stages: tuple = ("pretrain", "sft", "dpo")  # for stage "all"
    tokenizer: str | None = None  # a tokenizer folder instead of one of `vocab` tokens trained on the data
    optimizer: str = "adamw"  # harness.OPTIMIZERS
    memory: bool = False  # each side's step peak memory (harness.PeakMemory)
    gemm: bool = False  # CPU: each row's share of the machine's GEMM rate at the model's shapes
    peers: bool = True  # False: our sides only (real-ours: our step under the trainer's own allocator)
    targets: str = "tiny"  # which of TARGETS the comparisons are held to
    # CPU: None, every side in this process under its allocator; "glibc" / "kept": each party in
    # a process of its own (split_stage), ours keeping freed memory, the peers' glibc's default / kept
    split: str | None = None


QWEN2_TOKENIZER = H.ROOT.parent / "shared" / "tokenizers" / "qwen2"  # 151k, Qwen2-compatible

SIZES = {  # per size: the settings of `bumblefast bench train` (steps = micro-batches per round)
    "min": Settings(stage="all", quick=True, rounds=2, min_pairs=0),
    # cpu: 2 micro-batches per side and round (>= ~1 s per round per side on the 2-core machine),
    # dpo >= 64 pairs per side over the rounds (7 micro-batches; the peer-benchmark issue's floor)
    "cpu": Settings(stage="all", seq_len=1024, steps=2, rounds=5, min_pairs=64),
    "gpu": Settings(stage="all", seq_len=4096, steps=8, rounds=5, min_pairs=64, preset="bumblebee-1.5b", profile=True),
    # real (issue 29): the 0.5B shape at the real 151,936-row vocabulary, SFT and DPO; plain SGD
    # on every side, since 4-5 sides' AdamW states (2 x 494M fp32 values each) do not fit in 24 GB
    "real": Settings(
        stage="all",
        stages=("sft", "dpo"),
        seq_len=1024,
        steps=2,
        rounds=3,
        min_pairs=0,
        preset="bumblebee-0.5b",
        tokenizer=str(QWEN2_TOKENIZER),
        optimizer="sgd",
        memory=True,
        gemm=True,
        profile=True,  # after the rounds: the profile a missed share of the GEMM rate needs
        targets="real",
    ),
}
# real-ours (issue 29): our sides alone at the real shape, in a process of their own, so the freed
# host memory is kept as `bumblefast train` keeps it (bumblefast/cpu_memory.py) without giving the
# peers' sides a heap they do not run with; the share of the GEMM rate of our step as users run it
SIZES["real-ours"] = dataclasses.replace(SIZES["real"], peers=False)
# real-split / real-split-kept: every side at the real shape, each party in its own process (split_stage):
# each under its users' host allocator (ours kept, the peers' glibc's default), or every side's kept
SIZES["real-split"] = dataclasses.replace(SIZES["real"], split="glibc")
SIZES["real-split-kept"] = dataclasses.replace(SIZES["real"], split="kept")


def bench(size: str, workdir: Path) -> dict:
    """`bumblefast bench train`: the section described in benchmarks/benchlib.py. Per stage, ours
    vs each peer in real tokens/s (dpo: pairs/s), median of interleaved rounds with min-max."""
    import benchlib as BL

    s = SIZES[size]
    if s.tokenizer and not Path(s.tokenizer).is_dir():
        raise FileNotFoundError(f"bench train --size {size}: tokenizer {s.tokenizer} not found")
    device, dtype, preset, peak = device_setup(s.preset)
    stages = []
    for stage in s.stages:  # a later stage's failure keeps the finished ones (suite writes them)
        try:
            stages.append(run_stage(stage, s, device, dtype, preset, peak))
        except (Exception, KeyboardInterrupt) as e:
            if not stages:
                raise
            raise BL.Interrupted(e, section(stages, s, size, device, dtype, preset, peak)) from e
    return section(stages, s, size, device, dtype, preset, peak)


def section(stages: list[dict], s: Settings, size: str, device, dtype, preset: str, peak) -> dict:
    """The train section of these stages' results: their ratios, points, config and notes."""
    import benchlib as BL

    ratios, points = [], []
    for st in stages:
        by = {r["name"]: r for r in st["results"]}
        points += [
            BL.point(f"{st['stage']}: {r['name']}", r["real_tokens_per_sec"], r.get("mfu")) for r in st["results"]
        ]
        for c in st["comparisons"]:
            o, b = by[c["ours"]], by[c["baseline"]]
            unit, view = (
                ("pairs/s" if c["key"] == "pairs_per_sec" else "tokens/s"),
                f"{c['view']}: " if c["view"] else "",
            )
            name = f"{st['stage']} (seq {st['seq_len']}) {view}{o['name']} vs {b['name']} ({unit})"
            ratios.append(H.compare(name, measurement(o, c["key"]), measurement(b, c["key"])))
            ratios[-1].update(target=c["target"], stage=st["stage"], view=c["view"])
            if b["real_token_fraction"] < 0.999 and c["key"] != "pairs_per_sec":
                fraction = lambda r: BL.fraction(r["name"], r["real_tokens"], r["computed_tokens"])  # noqa: E731
                name = f"{st['stage']} (seq {st['seq_len']}) {o['name']} vs {b['name']} (real-token fraction)"
                ratios.append(H.compare(name, fraction(o), fraction(b)))
    config = {
        "size": size,
        "preset": preset,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "peak_tflops": peak,
        "versions": versions(),
        **{k: v for k, v in dataclasses.asdict(s).items() if k not in ("data", "peak_tflops")},
    }
    notes = [] if peak else ["MFU is reported on CUDA only (no meaningful peak for a CPU)"]
    if size == "min":
        notes.append(f"size min: {s.rounds} rounds of {2} micro-batches (a smoke run, not a measurement)")
    return {
        "config": config,
        "results": {"stages": stages, "notes": notes, "versions": config["versions"]},
        "ratios": ratios,
        "points": points,
    }


def write_report(report: dict, stem: Path) -> str:
    """Write the JSON and the markdown table of the stages done so far; returns the table."""
    v = ", ".join(f"{k} {x}" for k, x in report["versions"].items() if x)
    lines = table(report["stages"], f"## bench_train ({report['date']}, {report['device']}, {report['preset']}; {v})")
    if "shared_prompt" in report:
        from bench_shared_prompt import shared_prompt_lines

        lines += shared_prompt_lines(report["shared_prompt"])
    for st in report["stages"]:
        for r in st["results"]:
            if r.get("profile"):
                lines += profile_lines(f"{st['stage']}: {r['name']}", r["profile"])
    if report.get("interrupted"):
        lines += ["", f"**Interrupted**: {report['interrupted']}."]
    text = "\n".join(lines)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(text + "\n")
    return text


def parse_args(argv=None) -> tuple[Settings, Path]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stage", default="sft", choices=("sft", "pretrain", "dpo", "all"))
    p.add_argument("--data", default=None, help="input file for --stage (default: ../shared/data sample, else demo)")
    p.add_argument("--preset", default=None, help="model preset (default: tiny on CPU, bumblebee-1.5b on CUDA)")
    p.add_argument("--seq_len", type=int, default=2048)
    p.add_argument("--rows", type=int, default=1, help="packed rows per micro-batch (ours)")
    p.add_argument("--baseline_batch", type=int, default=4, help="samples per padded micro-batch (sft seed row)")
    p.add_argument("--steps", type=int, default=None, help="micro-batches per round and side")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (median and min-max reported)")
    p.add_argument("--min_pairs", type=int, default=64, help="dpo: pairs each side times over all its rounds")
    p.add_argument("--vocab", type=int, default=8192, help="size of the tokenizer trained on the data")
    p.add_argument("--peak_tflops", type=float, default=None, help="dense bf16 peak for MFU (default: by GPU name)")
    p.add_argument("--out", default=str(H.RESULTS))
    p.add_argument("--quick", action="store_true", help="tiny sizes for CI")
    p.add_argument(
        "--profile",
        action="store_true",
        help="where 2 steps of each side spend their time (dpo: policy steps; stepprofile)",
    )
    p.add_argument("--tokenizer", default=None, help="a tokenizer folder (default: train one of --vocab tokens)")
    p.add_argument("--optimizer", default="adamw", choices=H.OPTIMIZERS, help="every side's optimizer")
    p.add_argument("--memory", action="store_true", help="each side's step peak memory")
    p.add_argument("--gemm", action="store_true", help="CPU: rows as a share of the GEMM rate at the model's shapes")
    args = vars(p.parse_args(argv))
    return Settings(**{k: v for k, v in args.items() if k != "out"}), Path(args["out"])


def main(argv=None) -> int:
    s, out = parse_args(argv)
    device, dtype, preset, peak = device_setup(s.preset, s.peak_tflops)
    cuda = device.type == "cuda"
    stages = ["pretrain", "sft", "dpo"] if s.stage == "all" else [s.stage]
    report = {
        "benchmark": "train",
        "date": date.today().isoformat(),
        "host": platform.node(),
        "device": torch.cuda.get_device_name(device) if cuda else f"cpu ({torch.get_num_threads()} threads)",
        "dtype": str(dtype).removeprefix("torch."),
        "preset": preset,
        "peak_tflops": peak,
        "versions": versions(),
        "stages": [],
    }
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"bench_train_{platform.node()}_{report['date']}"

    def stop(signum, frame):  # `timeout` sends SIGTERM: say in the JSON where it stopped
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    for stage in stages:  # each stage's results on disk as soon as it ends (a timeout keeps them)
        try:
            report["stages"].append(run_stage(stage, s, device, dtype, preset, peak))
        except SystemExit:
            report["interrupted"] = f"SIGTERM during stage {stage}: its results and later stages' are missing"
            print(report["interrupted"], flush=True)
            write_report(report, stem)
            raise
        write_report(report, stem)
    if s.stage == "dpo":  # its own epochs and rounds: not part of `--stage all`'s budget
        from bench_shared_prompt import bench_shared_prompt

        report["shared_prompt"] = bench_shared_prompt(s, device, dtype, preset)
    print("\n" + write_report(report, stem))
    print(f"wrote {stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(worker() if sys.argv[1:] == ["--worker"] else main())
