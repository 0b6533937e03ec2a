"""Model + DeepSpeed engine construction: ZeRO 0-3 from the JSON, AdamW with decay on
matrices only, warmup + any transformers scheduler, optional LoRA via peft."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from bumblefast.config import TrainConfig, UserError
from bumblefast.train import distributed as D


def deepspeed_config(cfg: TrainConfig, device: torch.device, hidden_size: int) -> dict:
    """The run's DeepSpeed JSON with every "auto" filled from our config."""
    path = Path(cfg.deepspeed_config_path)
    if not path.is_file():
        raise FileNotFoundError(f"deepspeed_config_path: {path} not found (see configs/deepspeed/)")
    ds = json.loads(path.read_text())
    fill = {
        "train_micro_batch_size_per_gpu": cfg.train_micro_batch_size_per_gpu,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "gradient_clipping": cfg.max_grad_norm,
    }
    for key, value in fill.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
        elif ds[key] != value:
            raise UserError(f"{path}: '{key}' is {ds[key]} but the run's config says {value}; set it to \"auto\"")
    ds.pop("train_batch_size", None)
    bf16 = cfg.bf16 and device.type == "cuda"
    # check_grad_overflow: DeepSpeed's bf16 optimizers skip a step whose gradient norm is not finite
    ds["bf16"] = {"enabled": bf16, "check_grad_overflow": True} if bf16 else {"enabled": False}
    ds.pop("fp16", None)
    zero = ds.setdefault("zero_optimization", {"stage": 0})
    autos = {
        "reduce_bucket_size": hidden_size * hidden_size,
        "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
        "stage3_param_persistence_threshold": 10 * hidden_size,
    }
    for key, value in autos.items():
        if zero.get(key) == "auto":
            zero[key] = value
    return ds


@dataclass(frozen=True)
class EngineInfo:
    """What the run's DeepSpeed JSON decides, read once at setup and handed to what depends on
    it (model building, the objectives, the reference, export) instead of a threaded stage."""

    config: dict  # the filled JSON (deepspeed_config), as deepspeed.initialize takes it
    zero_stage: int
    bf16: bool

    @classmethod
    def of(cls, ds_config: dict) -> EngineInfo:
        return cls(ds_config, int(ds_config["zero_optimization"].get("stage", 0)), bool(ds_config["bf16"]["enabled"]))

    @property
    def zero3(self) -> bool:
        """Parameters partitioned: models are built inside zero.Init, whole weights gathered."""
        return self.zero_stage == 3

    @property
    def plain_gradients(self) -> bool:
        """ZeRO-0 in fp32: DeepSpeed keeps plain `.grad` tensors and neither reports their norm
        nor checks them, so the trainer does both."""
        return self.zero_stage == 0 and not self.bf16

    @property
    def dtype(self) -> torch.dtype:
        """The dtype DeepSpeed runs the policy's forward in (its module weights): bf16 or fp32."""
        return torch.bfloat16 if self.bf16 else torch.float32


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay on matrices (dim >= 2) only: no decay on biases and norm weights."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class SkippableAdamW(torch.optim.AdamW):
    """AdamW whose next update the trainer can veto. Used where DeepSpeed hands the step straight
    to the optimizer (ZeRO-0 in fp32) and has no overflow check of its own; `overflow` is the
    attribute DeepSpeed's engine reads after `step()`, so a vetoed step is counted in its
    `skipped_steps` and does not advance the learning-rate schedule, as DeepSpeed's own
    ZeRO and bf16 optimizers do when they skip a non-finite step."""

    overflow = False
    skip_next = False

    def step(self, closure=None):
        self.overflow, self.skip_next = self.skip_next, False
        if self.overflow:
            return None
        return super().step(closure)


def optimizer(cfg: TrainConfig, groups: list[dict], device: torch.device, skippable: bool = False):
    """AdamW; on CUDA torch's fused multi-tensor kernel (one launch per step, like DeepSpeed's
    FusedAdam, but with no JIT build that an offline node may not manage). ZeRO accepts only the
    exact AdamW class, so the skippable subclass is for ZeRO-0 fp32 alone."""
    kw = dict(lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon)
    return (SkippableAdamW if skippable else torch.optim.AdamW)(groups, fused=device.type == "cuda", **kw)


def scheduler(cfg: TrainConfig, opt, total_steps: int):
    from transformers import get_scheduler

    warmup = cfg.warmup_steps if cfg.warmup_steps > 0 else math.ceil(cfg.warmup_ratio * total_steps)
    name, kwargs = cfg.lr_scheduler_type, {}
    if name == "cosine" and cfg.min_lr_ratio > 0:
        name, kwargs = "cosine_with_min_lr", {"min_lr_rate": cfg.min_lr_ratio}
    try:
        return get_scheduler(
            name, opt, num_warmup_steps=warmup, num_training_steps=total_steps, scheduler_specific_kwargs=kwargs
        )
    except ValueError as e:
        raise UserError(f"lr_scheduler_type: {e}") from e


def apply_lora(model: torch.nn.Module, cfg: TrainConfig) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [m for m in cfg.lora_target_modules if m not in present]
    if missing:
        raise UserError(
            f"lora_target_modules: {missing} not in the model; linear layers are "
            "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"
        )
    lora = LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.lora_target_modules),
        bias="none",
    )
    return get_peft_model(model, lora)


def initialize(module: torch.nn.Module, cfg: TrainConfig, info: EngineInfo, total_steps: int, device: torch.device):
    import deepspeed

    opt = optimizer(cfg, param_groups(module, cfg.weight_decay), device, skippable=info.plain_gradients)
    scheduler(cfg, opt, 1)  # reject a bad scheduler name before DeepSpeed starts
    # A factory, so the scheduler drives the optimizer DeepSpeed wraps (ZeRO rebuilds its groups).
    engine, _, _, _ = deepspeed.initialize(
        model=module,
        optimizer=opt,
        config=info.config,
        dist_init_required=False,
        lr_scheduler=lambda wrapped: scheduler(cfg, wrapped, total_steps),
    )
    if D.is_main():
        n = sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters() if p.requires_grad)
        print(
            f"deepspeed: ZeRO-{info.zero_stage}, world {D.world_size()}, {n:,} trainable parameters, "
            f"{'bf16' if info.bf16 else 'fp32'}",
            flush=True,
        )
    return engine


def shard_reference(ref: torch.nn.Module, info: EngineInfo) -> torch.nn.Module:
    """Under ZeRO-3 the frozen DPO reference is partitioned like the policy (an engine with no
    optimizer, as TRL prepares its reference); other stages keep the plain module."""
    import deepspeed

    if not info.zero3:
        return ref
    ds_config = info.config
    cfg = {
        "train_micro_batch_size_per_gpu": ds_config["train_micro_batch_size_per_gpu"],
        "gradient_accumulation_steps": ds_config["gradient_accumulation_steps"],
        "zero_optimization": dict(ds_config["zero_optimization"]),
        "bf16": ds_config["bf16"],
    }
    engine, *_ = deepspeed.initialize(model=ref, config=cfg, dist_init_required=False)
    engine.eval()
    return engine.module
