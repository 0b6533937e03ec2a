"""`bumblefast train`: the one loop every stage runs. Read it top to bottom.

setup (process group, tokenizer, shards, model, engine, resume) -> for each optimizer step:
fetch the step's micro-batches, count the step's loss terms over all ranks, forward/backward
each micro-batch with its loss divided by that global count, step, log, checkpoint ->
export the final model in Hugging Face format at the root of output_dir.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import sys
from pathlib import Path

import numpy as np
import torch

from bumblefast import flops
from bumblefast.config import TrainConfig, UserError, to_dict
from bumblefast.tokenizer import load_tokenizer
from bumblefast.train import checkpoint as ckpt
from bumblefast.train import distributed as D
from bumblefast.train.data import open_loader
from bumblefast.train.engine import compute_dtype, deepspeed_config, initialize, shard_reference
from bumblefast.train.export import export_model
from bumblefast.train.metrics import MetricLogger, device_peak_tflops
from bumblefast.train.modeling import (
    build_model,
    build_objective,
    load_model_config,
    resolve_reference,
    tokenizer_path,
)


class NonFiniteError(RuntimeError):
    pass


def log(msg: str) -> None:
    if D.is_main():
        print(msg, flush=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def step_batches(loader, accumulation: int):
    """Yield (loader state before the step, the step's micro-batches); a short tail is dropped."""
    it = iter(loader)
    while True:
        state = loader.state_dict()
        group = list(itertools.islice(it, accumulation))
        if len(group) < accumulation:
            return
        yield state, group


@torch.no_grad()
def grad_norm_of(module: torch.nn.Module) -> float:
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))) if grads else 0.0


def train(cfg: TrainConfig) -> Path:
    device = D.init()
    seed_everything(cfg.seed)
    out = Path(cfg.output_dir)
    if D.is_main():
        out.mkdir(parents=True, exist_ok=True)
    ckpt_root = out / "checkpoints"

    tokenizer = load_tokenizer(tokenizer_path(cfg))
    model_config = load_model_config(cfg, tokenizer)
    ds_config = deepspeed_config(cfg, device, model_config.hidden_size)
    zero_stage = ds_config["zero_optimization"].get("stage", 0)
    loader, data_meta, manifest = open_loader(cfg, tokenizer_path(cfg))
    reference = resolve_reference(cfg, manifest) if cfg.stage == "dpo" else None
    model, ref_model = build_model(cfg, model_config, ds_config, want_copy=reference == "copy")
    if ref_model is not None:  # in the policy's compute dtype: same precision and attention kernel, half the memory
        ref_model = shard_reference(ref_model.to(device=device, dtype=compute_dtype(ds_config)), ds_config)
    objective = build_objective(cfg, model, zero_stage, reference, ref_model)
    if reference:
        log(f"dpo: {cfg.pref_loss} loss, beta {cfg.pref_beta}, reference: {reference}")

    accumulation = cfg.gradient_accumulation_steps
    steps_per_epoch = len(loader) // accumulation
    if steps_per_epoch == 0:
        raise UserError(
            f"dataset_path: {cfg.dataset_path} has {len(loader)} micro-batches per rank, fewer than "
            f"gradient_accumulation_steps={accumulation}; lower it or the micro batch size"
        )
    total_steps = cfg.max_steps if cfg.max_steps > 0 else steps_per_epoch * cfg.num_epochs
    engine = initialize(objective, cfg, ds_config, total_steps, device)

    step, epoch = 0, 0
    resume_from = ckpt.find_resume(ckpt_root, cfg.resume, log=log)
    if resume_from is not None:
        state = ckpt.load(engine, resume_from)
        loader.load_state_dict(state["loader"])
        step, epoch = state["step"], state["epoch"]
        log(f"resumed from {resume_from} at step {step} (epoch {epoch})")

    logger = MetricLogger(out, total_steps, step, model_config, D.world_size(),
                          device_peak_tflops(device, cfg.peak_tflops), cfg.use_tensorboard, D.is_main())
    log(f"training {cfg.stage}: {total_steps} optimizer steps ({steps_per_epoch}/epoch), "
        f"micro batch {cfg.train_micro_batch_size_per_gpu} x accumulation {accumulation} x world {D.world_size()}")

    def save(loader_state: dict | None = None) -> Path:
        state = {"step": step, "epoch": epoch, "loader": loader_state or loader.state_dict(), "data": data_meta,
                 "config": to_dict(cfg)}
        return ckpt.save(engine, ckpt_root, step, state, cfg.save_total_limit)

    # ZeRO-0 in fp32 keeps plain .grad tensors and DeepSpeed does not report their norm: we
    # measure it ourselves, before the update, so a bad step never reaches the weights.
    plain_grads = zero_stage == 0 and not engine.bfloat16_enabled()
    trace = os.environ.get("BUMBLEFAST_SAMPLE_TRACE")  # tests: which samples each step trained on
    last_good = None
    lora = getattr(cfg, "finetuning_type", "full") == "lora"  # MFU by what is computed (flops.py)
    flop_kw = dict(lora_rank=cfg.lora_rank if lora else 0, lora_targets=cfg.lora_target_modules if lora else (),
                   reference=reference)
    while step < total_steps:
        for state_before, micro_batches in step_batches(loader, accumulation):
            micro_batches = [to_device(b, device) for b in micro_batches]
            local = [0.0, 0.0, 0.0, 0.0]
            for b in micro_batches:
                local[0] += objective.count(b)
                local[1] += float(b["num_tokens"])
                local[2] += float(b["row_capacity"])
                local[3] += flops.step_flops(model_config, torch.diff(b["cu_seqlens"]).tolist(), **flop_kw)
            n_global, tokens, capacity, step_flops = D.all_reduce_sum(local, device)
            # DeepSpeed divides by the accumulation steps and averages over ranks: undo both so
            # the update is (sum of all losses in the step) / (global count).
            scale = accumulation * D.world_size() / max(n_global, 1.0)
            sums: dict[str, float] = {}
            own_norm = None
            for i, b in enumerate(micro_batches):
                loss, metric_sums = engine(b)
                if not torch.isfinite(loss):  # weights are still the last good ones: keep them
                    saved = save(state_before)
                    raise NonFiniteError(f"non-finite loss at step {step + 1}; batch sample ids "
                                         f"{b['sample_ids'].tolist()}; last good state saved in {saved}")
                engine.backward(loss * scale)
                if i == accumulation - 1 and plain_grads:
                    own_norm = grad_norm_of(engine.module)
                    if not math.isfinite(own_norm):
                        saved = save(state_before)
                        raise NonFiniteError(f"non-finite gradient norm at step {step + 1}; batch sample ids "
                                             f"{[b['sample_ids'].tolist() for b in micro_batches]}; "
                                             f"last good state saved in {saved}")
                engine.step()
                for key, value in {"loss": loss, **metric_sums}.items():
                    sums[key] = sums.get(key, 0.0) + float(value.detach())
            step += 1
            if trace:
                with open(trace, "a") as f:
                    f.write(json.dumps({"step": step, "rank": D.rank(),
                                        "sample_ids": [i for b in micro_batches for i in b["sample_ids"].tolist()]}) + "\n")
            keys = sorted(sums)
            averages = dict(zip(keys, (v / max(n_global, 1.0) for v in D.all_reduce_sum([sums[k] for k in keys], device))))
            grad_norm = engine.get_global_grad_norm() if own_norm is None else own_norm
            grad_norm = float(grad_norm) if grad_norm is not None else None
            if grad_norm is not None and not math.isfinite(grad_norm):
                # the update is already applied: the last periodic checkpoint is the last good state
                raise NonFiniteError(f"non-finite gradient norm at step {step}; batch sample ids "
                                     f"{[b['sample_ids'].tolist() for b in micro_batches]}")
            logger.count(tokens, capacity, step_flops)
            values = {**averages, "lr": engine.get_lr()[0], "grad_norm": grad_norm, "epoch": epoch}
            logger.step(step, values, log=step % cfg.logging_steps == 0 or step == total_steps)
            if step % cfg.save_steps == 0 or (step == total_steps and cfg.save_last):
                last_good = save()
            if step >= total_steps:
                break
        else:
            epoch += 1
            continue
        break
    logger.close()
    if last_good is None and cfg.save_last:
        save()
    export_model(engine, objective, tokenizer, cfg, zero_stage, out)
    log(f"done: {step} steps; model in {out}")
    return out


def main(cfg: TrainConfig) -> int:
    try:
        train(cfg)
    except NonFiniteError as e:
        print(f"bumblefast train: {e}; the last checkpoint in {Path(cfg.output_dir) / 'checkpoints'} holds "
              "the last good state", file=sys.stderr)
        return 3
    return 0
