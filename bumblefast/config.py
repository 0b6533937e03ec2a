"""Typed configuration: one dataclass per stage, loaded from YAML with CLI overrides.

Precedence is CLI > YAML > defaults. Every key is a flat name (BumbleCore's flags stay
valid, e.g. ``--learning_rate 1e-4``). All problems in a config are collected and reported
at once, before anything heavy starts, each naming the key and the closest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

STAGES = ("pretrain", "continue_pretrain", "sft", "dpo")
KERNEL_CHOICES = ("auto", "liger", "triton", "reference")
ATTN_CHOICES = ("auto", "flash", "varlen", "sdpa", "sdpa_mask")


class UserError(ValueError):
    """Bad input a user must fix: the CLI prints the message (no traceback) and exits 1."""


class ConfigError(UserError):
    """A config problem; the message lists every problem found."""


@dataclass
class TrainConfig:
    """Keys shared by every training stage. Defaults follow BumbleCore's recipes."""

    stage: Literal["pretrain", "continue_pretrain", "sft", "dpo"] = "pretrain"
    # model / data
    model_name_or_path: str | None = None  # preset folder or name for pretrain, HF folder otherwise
    tokenizer_name_or_path: str | None = None  # default: the model folder
    dataset_path: str | None = None  # shard folder or URL; raw json/jsonl/parquet is prepped once
    eval_dataset_path: str | None = None
    output_dir: str = "outputs/run"
    cutoff_len: int = 2048  # tokens per packed row (prep's --seq_len)
    # schedule
    num_epochs: int = 1
    max_steps: int = -1  # > 0 overrides num_epochs
    learning_rate: float = 5e-5
    lr_scheduler_type: str = "cosine"  # any transformers SchedulerType name
    warmup_ratio: float = 0.1
    warmup_steps: int = 0  # > 0 overrides warmup_ratio
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    # batch
    train_micro_batch_size_per_gpu: int = 4
    gradient_accumulation_steps: int = 4
    # engine
    deepspeed_config_path: str = "configs/deepspeed/ds_z2.json"
    bf16: bool = True  # on CUDA; CPU always trains in fp32
    gradient_checkpointing: bool = True
    kernels: Literal["auto", "liger", "triton", "reference"] = "auto"
    attn_backend: Literal["auto", "flash", "varlen", "sdpa", "sdpa_mask"] = "auto"  # flash-attn, torch varlen_attn, per-document SDPA, masked-row SDPA
    # fine-tuning
    finetuning_type: Literal["full", "lora"] = "full"
    lora_rank: int = 64
    lora_alpha: int = 128
    lora_dropout: float = 0.1
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    # checkpoints
    save_steps: int = 500
    save_total_limit: int = 3
    save_last: bool = True
    resume: str | None = None  # "auto" or a checkpoint folder
    # logging
    logging_steps: int = 10
    use_tensorboard: bool = True
    peak_tflops: float | None = None  # overrides the per-device peak used for MFU
    # data loading
    seed: int = 42
    shuffle: bool = True
    num_workers: int = 0  # DataLoader worker processes per rank

    def validate(self) -> list[str]:
        """Value checks beyond types; returns problems as 'key: why' strings."""
        errors = []
        positive = [
            "cutoff_len",
            "num_epochs",
            "train_micro_batch_size_per_gpu",
            "gradient_accumulation_steps",
            "save_steps",
            "logging_steps",
            "lora_rank",
        ]
        for key in positive:
            if getattr(self, key) < 1:
                errors.append(f"{key}: must be >= 1, got {getattr(self, key)}")
        if self.learning_rate <= 0:
            errors.append(f"learning_rate: must be > 0, got {self.learning_rate}")
        if not 0 <= self.warmup_ratio < 1:
            errors.append(f"warmup_ratio: must be in [0, 1), got {self.warmup_ratio}")
        if not 0 <= self.lora_dropout < 1:
            errors.append(f"lora_dropout: must be in [0, 1), got {self.lora_dropout}")
        if not 0 <= self.min_lr_ratio <= 1:
            errors.append(f"min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        if self.save_total_limit < 0:
            errors.append(f"save_total_limit: must be >= 0, got {self.save_total_limit}")
        if self.finetuning_type == "lora" and not self.lora_target_modules:
            errors.append("lora_target_modules: must name at least one module for LoRA")
        return errors


@dataclass
class PretrainConfig(TrainConfig):
    """Pretraining from random init of a preset (or continued pretraining of a checkpoint)."""

    stage: Literal["pretrain", "continue_pretrain"] = "pretrain"
    model_name_or_path: str | None = "configs/models/bumblebee-1.5b"


@dataclass
class SFTConfig(TrainConfig):
    """Supervised fine-tuning: loss on assistant tokens only."""

    stage: Literal["sft"] = "sft"


@dataclass
class DPOConfig(TrainConfig):
    """Preference optimisation on packed [prompt+chosen][prompt+rejected] rows."""

    stage: Literal["dpo"] = "dpo"
    learning_rate: float = 5e-6
    pref_loss: Literal["sigmoid", "ipo", "hinge", "robust", "simpo", "orpo"] = "sigmoid"
    pref_beta: float = 0.1
    dpo_label_smoothing: float = 0.0  # cDPO / robust DPO noise rate
    simpo_gamma: float = 0.5
    ld_alpha: float | None = None  # length-desensitised DPO weight of tokens past the shorter reply
    sft_weight: float = 0.0  # adds the chosen replies' LM loss
    ref_model: Literal["auto", "adapter", "copy", "precomputed", "none"] = "auto"

    def validate(self) -> list[str]:
        errors = super().validate()
        if self.pref_beta <= 0:
            errors.append(f"pref_beta: must be > 0, got {self.pref_beta}")
        if not 0 <= self.dpo_label_smoothing < 0.5:
            errors.append(f"dpo_label_smoothing: must be in [0, 0.5), got {self.dpo_label_smoothing}")
        if self.ld_alpha is not None and not 0 <= self.ld_alpha <= 1:
            errors.append(f"ld_alpha: must be in [0, 1], got {self.ld_alpha}")
        if self.ref_model == "adapter" and self.finetuning_type != "lora":
            errors.append("ref_model: 'adapter' needs finetuning_type lora")
        return errors


@dataclass
class PrepConfig:
    """`bumblefast prep`: raw files -> packed MDS shards for one stage."""

    stage: Literal["pretrain", "sft", "dpo"] = "pretrain"
    input: list[str] = field(default_factory=list)  # files, globs or folders
    tokenizer_name_or_path: str | None = None
    seq_len: int = 2048
    output_dir: str | None = None  # local folder or remote URL (s3://...)
    text_key: str = "text"
    overlong: Literal["auto", "truncate", "drop"] = "auto"  # auto: truncate pretrain, drop sft/dpo
    on_error: Literal["skip", "fail"] = "skip"
    num_workers: int = 1
    node_rank: int = 0
    num_nodes: int = 1
    pack_window: int = 10000  # samples considered together by best-fit-decreasing
    compression: str | None = "zstd"
    shard_size_limit: str = "64mb"
    seed: int = 42

    def validate(self) -> list[str]:
        errors = []
        if not self.input:
            errors.append("input: give at least one file, glob or folder")
        if self.output_dir is None:
            errors.append("output_dir: required")
        if self.seq_len < 2:
            errors.append(f"seq_len: must be >= 2, got {self.seq_len}")
        if self.num_workers < 1:
            errors.append(f"num_workers: must be >= 1, got {self.num_workers}")
        if not 0 <= self.node_rank < max(self.num_nodes, 1):
            errors.append(
                f"node_rank: must be in [0, num_nodes={self.num_nodes}), got {self.node_rank}"
            )
        return errors


STAGE_CONFIGS: dict[str, type[TrainConfig]] = {
    "pretrain": PretrainConfig,
    "continue_pretrain": PretrainConfig,
    "sft": SFTConfig,
    "dpo": DPOConfig,
}

# Alternative spellings users bring from other trainers -> the canonical key.
ALIASES: dict[type, dict[str, str]] = {
    TrainConfig: {"seq_len": "cutoff_len", "model_path": "model_name_or_path"},
    PrepConfig: {"cutoff_len": "seq_len", "tokenizer": "tokenizer_name_or_path"},
}


def _aliases(cls: type) -> dict[str, str]:
    for base in cls.__mro__:
        if base in ALIASES:
            return ALIASES[base]
    return {}


def valid_keys(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _suggest(key: str, cls: type) -> str:
    keys = valid_keys(cls)
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    if close:
        return f"did you mean '{close[0]}'?"
    others = [name for name, c in STAGE_CONFIGS.items() if key in valid_keys(c)]
    if others:
        return f"it is a key of stage {'/'.join(others)} only"
    return "valid keys: " + ", ".join(sorted(keys))


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + "|".join(map(str, typing.get_args(tp)))
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


def _coerce(value: Any, tp: Any, from_cli: bool) -> Any:
    """Return value as type tp or raise TypeError/ValueError with a short reason."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (from_cli and str(value).lower() in ("none", "null")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], from_cli)
    if origin is Literal:
        if from_cli or isinstance(value, str):
            value = str(value)
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ValueError(f"must be {_type_name(tp)}, got '{value}'{hint}")
        return value
    if origin is list:
        (item_tp,) = args
        if from_cli and isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise TypeError(f"must be a list, got {type(value).__name__} '{value}'")
        return [_coerce(v, item_tp, from_cli) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if from_cli and str(value).lower() in ("true", "1", "yes", "on"):
            return True
        if from_cli and str(value).lower() in ("false", "0", "no", "off"):
            return False
        raise TypeError(f"must be true or false, got {type(value).__name__} '{value}'")
    if tp is int:
        if isinstance(value, bool):
            raise TypeError(f"must be an integer, got bool '{value}'")
        if isinstance(value, int):
            return value
        if from_cli or isinstance(value, str):
            try:
                return int(str(value))
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise TypeError(f"must be an integer, got {type(value).__name__} '{value}'")
    if tp is float:
        if isinstance(value, bool):
            raise TypeError(f"must be a number, got bool '{value}'")
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise TypeError(f"must be a number, got {type(value).__name__} '{value}'")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise TypeError(f"must be a string, got {type(value).__name__} '{value}'")
    return value


def parse_cli_overrides(argv: list[str], cls: type) -> dict[str, str | bool]:
    """`--key value`, `--key=value` and bare `--flag` (booleans) -> {key: raw string}."""
    hints = typing.get_type_hints(cls)
    out: dict[str, str | bool] = {}
    i = 0
    errors = []
    while i < len(argv):
        tok = argv[i]
        if not tok.startswith("--"):
            errors.append(f"unexpected argument '{tok}' (config keys are given as --key value)")
            i += 1
            continue
        key, eq, val = tok[2:].partition("=")
        key = key.replace("-", "_")
        if not eq:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if hints.get(_aliases(cls).get(key, key)) is bool and (
                nxt is None or nxt.startswith("--")
            ):
                val = "true"
            elif nxt is None:
                errors.append(f"--{key}: missing value")
                break
            else:
                val = nxt
                i += 1
        out[key] = val
        i += 1
    if errors:
        raise ConfigError("invalid command line:\n  " + "\n  ".join(errors))
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of key: value")
    return data


def build_config(
    cls: type,
    yaml_values: dict[str, Any] | None = None,
    cli_values: dict[str, Any] | None = None,
    source: str = "config",
):
    """Merge defaults < YAML < CLI into `cls`, collecting every problem into one ConfigError."""
    hints = typing.get_type_hints(cls)
    aliases = _aliases(cls)
    errors: list[str] = []
    values: dict[str, Any] = {}
    for origin, raw, from_cli in ((source, yaml_values or {}, False), ("CLI", cli_values or {}, True)):
        for key, val in raw.items():
            canon = aliases.get(key, key)
            if canon not in hints:
                where = f"--{key}" if from_cli else f"'{key}' in {origin}"
                errors.append(f"unknown key {where}: {_suggest(key, cls)}")
                continue
            try:
                values[canon] = _coerce(val, hints[canon], from_cli)
            except (TypeError, ValueError) as e:
                where = f"--{key}" if from_cli else f"'{key}' in {origin}"
                errors.append(f"{where}: {e}")
    cfg = None
    if not errors:
        cfg = cls(**values)
        errors.extend(cfg.validate())
    if errors:
        raise ConfigError(f"{len(errors)} problem(s) in the configuration:\n  " + "\n  ".join(errors))
    return cfg


def load_train_config(
    stage: str | None = None,
    yaml_path: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> TrainConfig:
    """The resolved config of a training run: stage from CLI, else YAML, else pretrain."""
    yaml_values = load_yaml(yaml_path) if yaml_path else {}
    overrides = dict(overrides or {})
    stage = stage or overrides.pop("stage", None) or yaml_values.get("stage") or "pretrain"
    if stage not in STAGE_CONFIGS:
        close = difflib.get_close_matches(str(stage), STAGES, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"stage: must be one of {'|'.join(STAGES)}, got '{stage}'{hint}")
    overrides["stage"] = stage
    yaml_values.pop("stage", None)  # the resolved stage wins over the file's
    return build_config(STAGE_CONFIGS[stage], yaml_values, overrides, source=str(yaml_path))


def to_dict(cfg) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_yaml(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)
