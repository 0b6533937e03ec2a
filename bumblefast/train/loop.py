"""`bumblefast train`: the one loop every stage runs. Read it top to bottom.

`setup(cfg) -> Run` (process group, tokenizer, shards, model, engine, resume); `epochs(run)`
yields each optimizer step's micro-batches; `train_step(run, micro_batches)` runs one step and
returns its metrics; `finish(run)` checkpoints and exports the model in Hugging Face format at
the root of output_dir.

One optimizer step runs the same collectives in the same order on every rank, whatever its
data, and reads the device once:
1. the step's host facts (loss terms, tokens, FLOPs from the collator's host lengths) are
   summed over ranks on the device; each loss is divided by that global count;
2. forward/backward of each micro-batch; a non-finite loss turns its backward scale into NaN,
   so the gradients are non-finite too and no optimizer below can miss it;
3. one read of the step's device values (metric sums, finite flags, gradient norm): before
   DeepSpeed's step for ZeRO-0 fp32, where our own gradient check vetoes the update, after it
   otherwise, where DeepSpeed's ZeRO and bf16 optimizers skip a step whose norm is not finite;
4. a skipped step changes no weight and is counted; one more than `max_skipped_steps` stops
   the run with the step, the sample ids and a checkpoint of the last good weights.
"""

from __future__ import annotations

import itertools
import math
import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bumblefast import flops
from bumblefast.config import TrainConfig, UserError, to_dict, trackers
from bumblefast.cpu_memory import keep_freed_memory
from bumblefast.modelinfo import read_model_config
from bumblefast.shards.collate import PackedBatch
from bumblefast.tokenizer import load_tokenizer
from bumblefast.train import checkpoint as ckpt
from bumblefast.train import distributed as D
from bumblefast.train.build import (
    build_model,
    build_objective,
    load_model_config,
    model_path,
    resolve_reference,
    tokenizer_path,
)
from bumblefast.train.data import open_loader
from bumblefast.train.engine import (
    EngineInfo,
    deepspeed_config,
    initialize,
    shard_reference,
)
from bumblefast.train.export import export_model
from bumblefast.train.metrics import MetricLogger, device_peak_tflops
from bumblefast.train.objectives import FrozenReference


class NonFiniteError(RuntimeError):
    pass


class Callback:
    """Hooks into each step, for tooling and tests (tests/train_hooks.py: a per-step trace of
    sample ids, losses made NaN on chosen steps and ranks). The defaults do nothing."""

    def on_loss(self, run: Run, loss: torch.Tensor) -> torch.Tensor:
        """A micro-batch's summed loss, before its backward; return the loss to use."""
        return loss

    def on_step_end(self, run: Run, sample_ids: list[list[int]]) -> None:
        """After the optimizer step (run.step not yet advanced), with each micro-batch's sample ids."""


@dataclass(kw_only=True)
class Run:
    """Everything a training run holds between steps."""

    cfg: TrainConfig
    device: torch.device
    out: Path
    tokenizer: Any
    model_config: Any
    loader: Any
    data_meta: dict
    objective: Any
    engine: Any
    engine_info: EngineInfo
    total_steps: int
    steps_per_epoch: int
    logger: MetricLogger | None = None
    step: int = 0  # optimizer steps done, skipped ones included
    epoch: int = 0
    skipped: int = 0
    step_start: dict | None = None  # loader state before the current step
    last_saved: Path | None = None
    callbacks: list[Callback] = field(default_factory=list)

    @property
    def ckpt_root(self) -> Path:
        return self.out / "checkpoints"


@dataclass(kw_only=True)
class StepStats:
    """The step's values after its one device read; all but `local_bad` are global."""

    n_global: float
    tokens: float
    capacity: float
    flops: float
    averages: dict[str, float]
    n_bad: int  # micro-batches with a non-finite loss, all ranks
    local_bad: list[bool]  # this rank's micro-batches with a non-finite loss
    grad_norm: float | None

    @property
    def finite(self) -> bool:
        return self.n_bad == 0 and (self.grad_norm is None or math.isfinite(self.grad_norm))


def log(msg: str) -> None:
    if D.is_main():
        print(msg, flush=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------- setup


def setup(cfg: TrainConfig, callbacks: list[Callback] | tuple = ()) -> Run:
    """Process group, tokenizer, shards, model, DeepSpeed engine, then resume if asked."""
    device = D.init()
    if device.type == "cpu":
        log(keep_freed_memory())
    seed_everything(cfg.seed)
    out = Path(cfg.output_dir)
    if D.is_main():
        out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(tokenizer_path(cfg))
    preset_vocab = read_model_config(model_path(cfg))["vocab_size"]
    model_config = load_model_config(cfg, tokenizer)
    if model_config.vocab_size != preset_vocab:
        how = "fresh model sized to" if cfg.stage == "pretrain" else "resize_vocab: mean-initialised rows added for"
        log(
            f"vocab: {preset_vocab} -> {model_config.vocab_size} embedding rows ({how} the tokenizer's "
            f"{len(tokenizer)} tokens)"
        )
    info = EngineInfo.of(deepspeed_config(cfg, device, model_config.hidden_size))
    loader, data_meta, manifest = open_loader(cfg, tokenizer_path(cfg))
    reference = resolve_reference(cfg, manifest) if cfg.stage == "dpo" else None
    model, ref_model = build_model(cfg, model_config, info, want_copy=reference == "copy")
    if ref_model is not None:  # in the policy's compute dtype: same precision and attention kernel, half the memory
        ref_model = FrozenReference(ref_model, cfg.ld_alpha, zero3=info.zero3)
        ref_model = shard_reference(ref_model if info.zero3 else ref_model.to(device=device, dtype=info.dtype), info)
    objective = build_objective(cfg, model, info, reference, ref_model)
    if reference:
        log(f"dpo: {cfg.pref_loss} loss, beta {cfg.pref_beta}, reference: {reference}")

    steps_per_epoch = len(loader) // cfg.gradient_accumulation_steps
    if steps_per_epoch == 0:
        raise UserError(
            f"dataset_path: {cfg.dataset_path} has {len(loader)} micro-batches per rank, fewer than "
            f"gradient_accumulation_steps={cfg.gradient_accumulation_steps}; lower it or the micro batch size"
        )
    total_steps = cfg.max_steps if cfg.max_steps > 0 else steps_per_epoch * cfg.num_epochs
    engine = initialize(objective, cfg, info, total_steps, device)
    if info.plain_gradients and not hasattr(engine.optimizer, "skip_next"):
        raise RuntimeError(f"ZeRO-0 fp32 expects the trainer's SkippableAdamW, got {type(engine.optimizer)}")
    run = Run(
        cfg=cfg,
        device=device,
        out=out,
        tokenizer=tokenizer,
        model_config=model_config,
        loader=loader,
        data_meta=data_meta,
        objective=objective,
        engine=engine,
        engine_info=info,
        total_steps=total_steps,
        steps_per_epoch=steps_per_epoch,
        callbacks=list(callbacks),
    )
    _resume(run)
    run.logger = MetricLogger(
        output_dir=out,
        total_steps=total_steps,
        start_step=run.step,
        model_config=model_config,
        world=D.world_size(),
        peak_tflops=device_peak_tflops(device, cfg.peak_tflops),
        report_to=trackers(cfg),
        enabled=D.is_main(),
        config=to_dict(cfg),
        run_name=cfg.run_name,
    )
    log(
        f"training {cfg.stage}: {total_steps} optimizer steps ({steps_per_epoch}/epoch), micro batch "
        f"{cfg.train_micro_batch_size_per_gpu} x accumulation {cfg.gradient_accumulation_steps} "
        f"x world {D.world_size()}"
    )
    return run


def _resume(run: Run) -> None:
    resume_from = ckpt.find_resume(run.ckpt_root, run.cfg.resume, log=log)
    if resume_from is None:
        return
    state = ckpt.load(run.engine, resume_from)
    run.loader.load_state_dict(state["loader"])
    run.step, run.epoch, run.skipped = state["step"], state["epoch"], state.get("skipped_steps", 0)
    log(f"resumed from {resume_from} at step {run.step} (epoch {run.epoch})")


def save(run: Run, loader_state: dict | None = None) -> Path:
    """Collective: checkpoint the engine, the loader position and the run's counters."""
    state = {
        "step": run.step,
        "epoch": run.epoch,
        "skipped_steps": run.skipped,
        "loader": loader_state or run.loader.state_dict(),
        "data": run.data_meta,
        "config": to_dict(run.cfg),
    }
    run.last_saved = ckpt.save(run.engine, run.ckpt_root, run.step, state, run.cfg.save_total_limit)
    return run.last_saved


# ---------------------------------------------------------------------------------- steps


def epochs(run: Run) -> Iterator[list[dict]]:
    """Each optimizer step's micro-batches (host tensors) until total_steps, epoch after epoch;
    an epoch's short tail is dropped. Sets run.step_start, the loader state before the step."""
    accumulation = run.cfg.gradient_accumulation_steps
    while run.step < run.total_steps:
        it = iter(run.loader)
        while True:
            state = run.loader.state_dict()
            group = list(itertools.islice(it, accumulation))
            if len(group) < accumulation:
                break
            run.step_start = state
            yield group
            if run.step >= run.total_steps:
                return
        run.epoch += 1


def host_facts(run: Run, micro_batches: list[PackedBatch]) -> tuple[list[float], list[list[int]]]:
    """From the collator's host tensors, never the device: the step's loss terms, tokens, row
    capacity and training FLOPs (from document lengths), and each micro-batch's sample ids."""
    cfg = run.cfg
    lora = cfg.finetuning_type == "lora"  # MFU by what is computed (flops.step_flops)
    flop_kw = dict(
        lora_rank=cfg.lora_rank if lora else 0,
        lora_targets=cfg.lora_target_modules if lora else (),
        reference=getattr(run.objective, "reference", None),
    )
    count = tokens = capacity = step_flops = 0.0
    for b in micro_batches:
        count += run.objective.count(b)
        tokens += b.num_tokens
        capacity += b.row_capacity
        prefix = b.kv_prefix.tolist() if b.kv_prefix is not None else None
        step_flops += flops.step_flops(
            run.model_config, b.doc_lens, kv_prefix=prefix, head_tokens=b.num_target_tokens, **flop_kw
        )
    return [count, tokens, capacity, step_flops], [b.sample_ids.tolist() for b in micro_batches]


def forward_backward(run: Run, micro_batches: list[PackedBatch], scale: torch.Tensor):
    """Forward and backward of each micro-batch, DeepSpeed's micro-step after all but the last.
    Returns the metric keys, their sums (float64) and each loss's finite flag, on the device."""
    engine, keys, sums, finite = run.engine, None, None, []
    for i, batch in enumerate(micro_batches):
        loss, metric_sums = engine(batch.to(run.device, non_blocking=True))
        for cb in run.callbacks:
            loss = cb.on_loss(run, loss)
        ok = torch.isfinite(loss)
        engine.backward(loss * torch.where(ok, scale.to(loss.dtype), torch.nan))
        if i < len(micro_batches) - 1:
            engine.step()
        keys = keys or ["loss", *sorted(metric_sums)]
        values = torch.stack([loss.detach().double(), *(metric_sums[k].detach().double() for k in keys[1:])])
        sums = values if sums is None else sums + values
        finite.append(ok)
    return keys, sums, torch.stack(finite)


@torch.no_grad()
def grad_norm_of(module: torch.nn.Module) -> torch.Tensor | None:
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])) if grads else None


def read_stats(counts: torch.Tensor, keys: list[str], sums: torch.Tensor, finite: torch.Tensor, grad_norm) -> StepStats:
    """Sum the metric sums and non-finite counts over ranks, then the step's one host read."""
    bad = (~finite).double()
    reduced = D.all_reduce_sum_(torch.cat([sums, bad.sum()[None]]))
    device_norm = torch.is_tensor(grad_norm)
    parts = [counts, reduced, bad] + ([grad_norm.detach().double().reshape(1).to(counts.device)] if device_norm else [])
    values = torch.cat(parts).tolist()  # the host sync of the step
    sizes = [len(counts), len(keys), 1, len(finite), int(device_norm)]
    ends = list(itertools.accumulate(sizes))
    facts, metric_sums, n_bad, local_bad, norm = (values[e - n : e] for n, e in zip(sizes, ends))
    n_global, tokens, capacity, step_flops = facts
    averages = {key: v / max(n_global, 1.0) for key, v in zip(keys, metric_sums)}
    if not device_norm:
        norm = [None if grad_norm is None else float(grad_norm)]
    flags = [v > 0 for v in local_bad]
    return StepStats(
        n_global=n_global,
        tokens=tokens,
        capacity=capacity,
        flops=step_flops,
        averages=averages,
        n_bad=int(n_bad[0]),
        local_bad=flags,
        grad_norm=norm[0],
    )


def train_step(run: Run, micro_batches: list[PackedBatch]) -> dict:
    """One optimizer step over this rank's micro-batches; returns the step's metrics (host
    floats). One host synchronisation: `read_stats`."""
    engine = run.engine
    facts, sample_ids = host_facts(run, micro_batches)
    counts = D.all_reduce_sum_(D.to_device_f64(facts, run.device))
    # DeepSpeed divides by the accumulation steps and averages over ranks: undo both so the
    # update is (sum of all losses in the step) / (global count).
    scale = len(micro_batches) * D.world_size() / counts[0].clamp(min=1.0)
    keys, sums, finite = forward_backward(run, micro_batches, scale)
    if run.engine_info.plain_gradients:  # ZeRO-0 fp32: the loop checks the gradients, vetoes the update
        stats = read_stats(counts, keys, sums, finite, grad_norm_of(engine.module))
        engine.optimizer.skip_next = not stats.finite
        engine.step()
    else:
        engine.step()
        stats = read_stats(counts, keys, sums, finite, engine.get_global_grad_norm())
        if not stats.finite and engine.was_step_applied():
            raise NonFiniteError(
                f"non-finite loss at step {run.step + 1} and DeepSpeed applied the update "
                "(is bf16.check_grad_overflow off?); the last periodic checkpoint is the last good state"
            )
    for cb in run.callbacks:
        cb.on_step_end(run, sample_ids)
    if not stats.finite:
        skip_step(run, stats, sample_ids)
    run.step += 1
    run.logger.count(stats.tokens, stats.capacity, stats.flops)
    values = {
        **stats.averages,
        "lr": engine.get_lr()[0],
        "grad_norm": stats.grad_norm,
        "epoch": run.epoch,
    }
    if run.skipped:
        values["skipped_steps"] = run.skipped
    run.logger.step(run.step, values, log=run.step % run.cfg.logging_steps == 0 or run.step == run.total_steps)
    return values


def skip_step(run: Run, stats: StepStats, sample_ids: list[list[int]]) -> None:
    """The step's update was not applied (every rank knows it: the flags are global). Name the
    samples, count the step, and stop once more than max_skipped_steps were skipped."""
    mine = [i for ids, bad in zip(sample_ids, stats.local_bad) if bad for i in ids]
    if stats.n_bad == 0:  # the losses were finite, the gradients were not: the whole step
        mine = sum(sample_ids, [])
    per_rank = D.all_gather_object(mine)
    what = "loss" if stats.n_bad else "gradient norm"
    where = "; ".join(f"sample ids {ids} on rank {r}" for r, ids in enumerate(per_rank) if ids)
    msg = f"non-finite {what} at step {run.step + 1}; batch {where}"
    limit = run.cfg.max_skipped_steps
    if run.skipped + 1 > limit:
        # Weights and optimizer are those before this step; the loader resumes at this step.
        done = run.ckpt_root / f"step-{run.step}"
        saved = done if run.last_saved == done else save(run, run.step_start)
        raise NonFiniteError(
            f"{msg}; the update was skipped, and {run.skipped + 1} non-finite steps exceed "
            f"max_skipped_steps={limit}; last good state saved in {saved}"
        )
    run.skipped += 1
    if D.is_main():
        print(
            f"warning: {msg}: update skipped ({run.skipped} of max_skipped_steps={limit})",
            file=sys.stderr,
            flush=True,
        )


# ---------------------------------------------------------------------------------- run


def finish(run: Run) -> Path:
    run.logger.close()
    if run.last_saved is None and run.cfg.save_last:
        save(run)
    export_model(run.engine, run.objective, run.tokenizer, run.cfg, zero3=run.engine_info.zero3, out=run.out)
    log(f"done: {run.step} steps; model in {run.out}")
    return run.out


def train(cfg: TrainConfig, callbacks: list[Callback] | tuple = ()) -> Path:
    run = setup(cfg, callbacks)
    try:
        for micro_batches in epochs(run):
            train_step(run, micro_batches)
            if run.step % cfg.save_steps == 0 or (run.step == run.total_steps and cfg.save_last):
                save(run)
        return finish(run)
    finally:
        run.loader.close()


def main(cfg: TrainConfig, callbacks: list[Callback] | tuple = ()) -> int:
    try:
        train(cfg, callbacks)
    except NonFiniteError as e:
        if D.is_main():
            print(f"bumblefast train: {e}", file=sys.stderr, flush=True)
        return 3
    return 0
