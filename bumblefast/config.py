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
# --report_to: the trackers HF Trainer / TRL / LLaMA-Factory users pick; each but TensorBoard is an extra.
TRACKER_EXTRAS = {"wandb": ("wandb", "bumblefast[wandb]"), "mlflow": ("mlflow", "bumblefast[mlflow]")}


def key(default: Any = None, help: str = "", *, factory: Any = None) -> Any:
    """A config key: its default and a one-line meaning, the one home of `--help` and the docs."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


def key_help(f: dataclasses.Field) -> str:
    return f.metadata.get("help", "")


def key_default(f: dataclasses.Field) -> Any:
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]


def describe_keys(cls: type, names: list[str] | None = None) -> str:
    """`--key  type  default` and the key's meaning, one entry per key: --help and docs."""
    hints = typing.get_type_hints(cls)
    lines = []
    for f in dataclasses.fields(cls):
        if names is None or f.name in names:
            lines.append(f"  --{f.name:<32} {_type_name(hints[f.name]):<26} default {key_default(f)!r}")
            lines.append(f"      {key_help(f)}")
    return "\n".join(lines)


class UserError(ValueError):
    """Bad input a user must fix: the CLI prints the message (no traceback) and exits 1."""


class ConfigError(UserError):
    """A config problem; the message lists every problem found."""


@dataclass
class TrainConfig:
    """Keys shared by every training stage. Defaults follow BumbleCore's recipes."""

    stage: Literal["pretrain", "continue_pretrain", "sft", "dpo"] = key(
        "pretrain", "training stage: sets the objective (LM loss or preference loss) and defaults"
    )
    # model / data
    model_name_or_path: str | None = key(None, "preset folder or name for pretrain, HF folder otherwise")
    tokenizer_name_or_path: str | None = key(None, "default: the model folder")
    dataset_path: str | None = key(None, "shard folder or URL; raw json/jsonl/parquet is prepped once")
    eval_dataset_path: str | None = key(None, "held-out shards evaluated at the end of training (optional)")
    output_dir: str = key(
        "outputs/run", "run folder: final HF model at the root, checkpoints/, tensorboard/, training_metrics.json"
    )
    cutoff_len: int = key(
        2048, "tokens per packed row (prep's --seq_len); dpo: per sequence, a row holds a pair (2 x cutoff_len)"
    )
    vocab_size: int | None = key(
        None,
        "pretrain from a preset: embedding rows (default: the tokenizer's size rounded up "
        "to a multiple of 128, tile-aligned for tensor cores; the preset's own size is ignored)",
    )
    resize_vocab: bool = key(
        False,
        "fine-tuning trained weights with a larger (extended) tokenizer: grow the embedding "
        "and an untied lm_head to it, new rows = the mean of the trained rows",
    )
    # schedule
    num_epochs: int = key(1, "passes over the dataset")
    max_steps: int = key(-1, "> 0 overrides num_epochs")
    learning_rate: float = key(5e-5, "peak learning rate (AdamW)")
    lr_scheduler_type: str = key("cosine", "any transformers SchedulerType name")
    warmup_ratio: float = key(0.1, "fraction of the optimizer steps spent in linear warmup")
    warmup_steps: int = key(0, "> 0 overrides warmup_ratio")
    min_lr_ratio: float = key(0.0, "floor of the decay, as a fraction of the peak learning rate")
    weight_decay: float = key(0.01, "AdamW weight decay, applied to matrices only (not norms or biases)")
    adam_beta1: float = key(0.9, "AdamW beta1")
    adam_beta2: float = key(0.95, "AdamW beta2")
    adam_epsilon: float = key(1e-8, "AdamW epsilon")
    max_grad_norm: float = key(1.0, "clip the global gradient norm to this (0 disables clipping)")
    max_skipped_steps: int = key(
        3,
        "optimizer steps with a non-finite loss or gradient norm skipped (no update) before the run stops "
        "with the samples and the last good checkpoint; 0 stops at the first",
    )
    # batch
    train_micro_batch_size_per_gpu: int = key(4, "packed rows per forward pass on each rank")
    gradient_accumulation_steps: int = key(
        4, "micro-batches per optimizer step; the loss is normalised by the step's global target-token count"
    )
    # engine
    deepspeed_config_path: str = key(
        "configs/deepspeed/ds_z2.json",
        "DeepSpeed JSON (configs/deepspeed/ds_z{0,1,2,3}.json); its 'auto' values are filled from this config",
    )
    bf16: bool = key(True, "on CUDA; CPU always trains in fp32")
    gradient_checkpointing: bool = key(
        True, "recompute each layer's activations in backward (less memory, ~30% more compute)"
    )
    kernels: Literal["auto", "liger", "triton", "reference"] = key(
        "auto", "fused ops: auto (Liger/own Triton on CUDA, PyTorch on CPU), or force liger|triton|reference"
    )
    attn_backend: Literal["auto", "flash", "varlen", "sdpa", "sdpa_mask"] = key(
        "auto", "flash-attn, torch varlen_attn, per-document SDPA, masked-row SDPA"
    )
    # fine-tuning
    finetuning_type: Literal["full", "lora"] = key("full", "train all weights (full) or LoRA adapters only (lora)")
    lora_rank: int = key(64, "LoRA rank r")
    lora_alpha: int = key(128, "LoRA scaling alpha (the update is scaled by alpha / r)")
    lora_dropout: float = key(0.1, "dropout on the LoRA input")
    lora_target_modules: list[str] = key(
        help="module names that get LoRA adapters (comma-separated on the CLI)",
        factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
    )
    # checkpoints
    save_steps: int = key(500, "write a checkpoint every N optimizer steps")
    save_total_limit: int = key(3, "keep the newest N checkpoints (0 keeps all)")
    save_last: bool = key(True, "also checkpoint at the end of training")
    resume: str | None = key(None, "'auto' or a checkpoint folder")
    # logging
    logging_steps: int = key(10, "log metrics every N optimizer steps")
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "none"]] = key(
        help="trackers that get the metrics (comma-separated or a YAML list): tensorboard (output_dir/tensorboard), "
        "wandb (WANDB_PROJECT, default bumblefast; WANDB_MODE=offline works), mlflow (MLFLOW_TRACKING_URI, "
        "MLFLOW_EXPERIMENT_NAME), or none; every tracker gets the same names (Train/Loss, ...)",
        factory=lambda: ["tensorboard"],
    )
    run_name: str | None = key(None, "the wandb/mlflow run name (default: output_dir's folder name)")
    use_tensorboard: bool = key(True, "BumbleCore's switch: false drops tensorboard from report_to")
    peak_tflops: float | None = key(None, "overrides the per-device peak used for MFU")
    # data loading
    seed: int = key(42, "seed of the model init, shuffle and dropout")
    shuffle: bool = key(True, "shuffle the shards' rows each epoch (streaming's shuffle)")
    num_workers: int = key(0, "DataLoader worker processes per rank")

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
        errors.extend(_report_to_problems(self.report_to))
        if self.vocab_size is not None and self.vocab_size < 1:
            errors.append(f"vocab_size: must be >= 1, got {self.vocab_size}")
        if self.resize_vocab and self.finetuning_type == "lora":
            errors.append(
                "resize_vocab: needs finetuning_type full (LoRA would leave the new rows untrained, and "
                "the adapter would not load onto the original base model)"
            )
        if self.max_skipped_steps < 0:
            errors.append(f"max_skipped_steps: must be >= 0, got {self.max_skipped_steps}")
        if self.finetuning_type == "lora" and not self.lora_target_modules:
            errors.append("lora_target_modules: must name at least one module for LoRA")
        return errors


@dataclass
class PretrainConfig(TrainConfig):
    """Pretraining from random init of a preset (or continued pretraining of a checkpoint)."""

    stage: Literal["pretrain", "continue_pretrain"] = key(
        "pretrain", "pretrain (random init from a preset) or continue_pretrain (from trained weights)"
    )
    model_name_or_path: str | None = key(
        "configs/models/bumblebee-1.5b", "model preset folder (random init) or a trained HF model folder"
    )


@dataclass
class SFTConfig(TrainConfig):
    """Supervised fine-tuning: loss on assistant tokens only."""

    stage: Literal["sft"] = key("sft", "supervised fine-tuning: loss on assistant tokens only")


@dataclass
class DPOConfig(TrainConfig):
    """Preference optimisation on packed [prompt+chosen][prompt+rejected] rows."""

    stage: Literal["dpo"] = key("dpo", "preference optimisation on packed chosen/rejected pairs")
    learning_rate: float = key(5e-6, "peak learning rate (AdamW); DPO wants a small one")
    pref_loss: Literal["sigmoid", "ipo", "hinge", "robust", "simpo", "orpo"] = key(
        "sigmoid", "preference loss: sigmoid (DPO), ipo, hinge, robust, simpo, orpo"
    )
    pref_beta: float = key(0.1, "beta: strength of the KL anchor to the reference")
    dpo_label_smoothing: float = key(0.0, "cDPO / robust DPO noise rate")
    simpo_gamma: float = key(0.5, "SimPO target reward margin")
    ld_alpha: float | None = key(None, "length-desensitised DPO weight of tokens past the shorter reply")
    sft_weight: float = key(0.0, "adds the chosen replies' LM loss")
    ref_model: Literal["auto", "adapter", "copy", "precomputed", "none"] = key(
        "auto",
        "reference log-probs: adapter (LoRA off), copy (frozen copy), precomputed (shard column), none; auto picks",
    )

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

    stage: Literal["pretrain", "sft", "dpo"] = key(
        "pretrain", "which shard schema to write: pretrain rows, sft packed rows, dpo packed pairs"
    )
    input: list[str] = key(
        help="files, globs or folders (.json, .jsonl[.gz|.zst], .parquet, .txt: a line per document); "
        "the format of each record is detected (Alpaca, ShareGPT, OpenAI messages, TRL)",
        factory=list,
    )
    dataset_info: str | None = key(
        None,
        "LLaMA-Factory dataset_info.json (or its folder): read the --dataset entries "
        "with their file_name, formatting, columns, tags and ranking",
    )
    dataset: list[str] = key(
        help="entries of --dataset_info to read (comma-separated), besides any --input", factory=list
    )
    tokenizer_name_or_path: str | None = key(None, "HF tokenizer folder (tokenizer.json + chat template)")
    seq_len: int = key(
        2048,
        "tokens per packed row (train's --cutoff_len); dpo: per sequence (prompt + reply, as LLaMA-Factory's "
        "cutoff_len and TRL's max_length), a row holds a pair (2 x seq_len)",
    )
    output_dir: str | None = key(None, "local folder or remote URL (s3://...)")
    text_key: str = key("text", "pretrain: the record key holding the document text")
    overlong: Literal["truncate", "drop"] = key(
        "truncate",
        "a record longer than seq_len: truncate (pretrain: split across rows; sft/dpo: replies cut "
        "first, a long prompt keeps its end; dpo: per sequence, one rule in both layouts) or drop (skip, counted as "
        "'overlong')",
    )
    on_error: Literal["skip", "fail"] = key(
        "skip", "skip: log bad records to errors.jsonl (file:line, reason) and count them; fail: stop at the first"
    )
    num_workers: int = key(1, "tokenizer processes on this node")
    tokenizer_backend: Literal["auto", "hf", "fastokens"] = key(
        "auto",
        "auto: fastokens if installed and verified identical to HF on a hard sample + the first records, "
        "else HF (with a warning); hf; fastokens (fail if it differs)",
    )
    node_rank: int = key(
        0, "this node's index in a multi-node prep (default: from Slurm/torchrun/Kubernetes env, else 0)"
    )
    num_nodes: int = key(
        1, "nodes sharing the tasks; join them with `bumblefast prep merge` (default: from the launcher's env, else 1)"
    )
    task_size: str = key(
        "32mb",
        "input bytes per task (the unit of work, resume and output layout: the shards depend on the input "
        "and this, never on workers or nodes)",
    )
    pack_window: int = key(10000, "samples considered together by best-fit-decreasing")
    compression: str | None = key("zstd", "MDS shard compression (zstd, or null for none)")
    shard_size_limit: str = key("64mb", "target size of one MDS shard file (e.g. 64mb)")
    seed: int = key(42, "seed of the packing order")
    share_prompt: bool = key(
        True,
        "dpo: store each pair's prompt once, [prompt+chosen][rejected] attending the prompt "
        "(false: [prompt+chosen][prompt+rejected])",
    )

    def validate(self) -> list[str]:
        errors = []
        if not self.input and not self.dataset:
            errors.append("input: give at least one file, glob or folder (or --dataset_info with --dataset)")
        if self.dataset and not self.dataset_info:
            errors.append("dataset: needs --dataset_info (the dataset_info.json that names it)")
        if self.dataset_info and not self.dataset:
            errors.append("dataset_info: name the entries to read with --dataset NAME[,NAME...]")
        if self.output_dir is None:
            errors.append("output_dir: required")
        if self.seq_len < 2:
            errors.append(f"seq_len: must be >= 2, got {self.seq_len}")
        if self.num_workers < 1:
            errors.append(f"num_workers: must be >= 1, got {self.num_workers}")
        if not 0 <= self.node_rank < max(self.num_nodes, 1):
            errors.append(f"node_rank: must be in [0, num_nodes={self.num_nodes}), got {self.node_rank}")
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


def trackers(cfg: TrainConfig) -> list[str]:
    """The trackers a run reports to: report_to without 'none', less tensorboard if use_tensorboard is false."""
    return [t for t in dict.fromkeys(cfg.report_to) if t != "none" and (cfg.use_tensorboard or t != "tensorboard")]


def _report_to_problems(report_to: list[str]) -> list[str]:
    import importlib.util

    if "none" in report_to and len(set(report_to)) > 1:
        return [f"report_to: 'none' cannot be combined with other trackers, got {','.join(report_to)}"]
    return [
        f"report_to: {name} needs the {module} package: pip install '{extra}'"
        for name, (module, extra) in TRACKER_EXTRAS.items()
        if name in report_to and importlib.util.find_spec(module) is None
    ]


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
            if hints.get(_aliases(cls).get(key, key)) is bool and (nxt is None or nxt.startswith("--")):
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
