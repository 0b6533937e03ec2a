"""The model a run trains: random init of a preset (pretrain) or a Hugging Face checkpoint
(every other stage), optionally with LoRA adapters, wrapped in the stage's objective."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from bumblefast.config import TrainConfig, UserError
from bumblefast.modelinfo import read_model_config
from bumblefast.train import distributed as D

if TYPE_CHECKING:
    from bumblefast.shards.manifest import Manifest
    from bumblefast.train.engine import EngineInfo

PRESETS = Path(__file__).resolve().parent.parent.parent / "configs" / "models"


def model_path(cfg: TrainConfig) -> Path:
    """A folder, or a preset name such as `bumblebee-tiny`."""
    if not cfg.model_name_or_path:
        raise UserError(
            "model_name_or_path: required (a preset such as configs/models/bumblebee-1.5b, or a checkpoint)"
        )
    path = Path(cfg.model_name_or_path)
    if not path.is_dir() and (PRESETS / cfg.model_name_or_path).is_dir():
        path = PRESETS / cfg.model_name_or_path
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model_name_or_path: no config.json in {path}")
    return path


def tokenizer_path(cfg: TrainConfig) -> str:
    return str(cfg.tokenizer_name_or_path or model_path(cfg))


def load_model_config(cfg: TrainConfig, tokenizer):
    """The config of the model a run builds. A fresh model (stage pretrain: random init of a
    preset) gets the tokenizer's vocabulary (bumblefast/vocab.py); trained weights keep theirs
    unless --resize_vocab grows it to a larger tokenizer."""
    from transformers import AutoConfig

    from bumblefast.vocab import fresh_vocab_size, padded_vocab_size

    config = AutoConfig.from_pretrained(model_path(cfg))
    check_family(cfg, config)
    n_tok = len(tokenizer)
    if cfg.stage == "pretrain":  # a fresh model takes its vocabulary and special ids from the tokenizer
        config.vocab_size = fresh_vocab_size(n_tok, cfg.vocab_size)
        config.eos_token_id = tokenizer.eos_token_id
        config.bos_token_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id
        return config
    if cfg.vocab_size is not None:
        raise UserError(
            f"vocab_size: only sizes a fresh model (stage pretrain); {cfg.model_name_or_path} has trained "
            "weights (use --resize_vocab to grow them to a larger tokenizer)"
        )
    if n_tok > config.vocab_size:
        if not cfg.resize_vocab:
            raise UserError(
                f"tokenizer_name_or_path: the tokenizer has {n_tok} tokens, more than the {config.vocab_size} "
                f"embedding rows of {cfg.model_name_or_path}; add --resize_vocab to grow the embedding (and an "
                "untied lm_head) with mean-initialised rows (an extended tokenizer), or use the model's own tokenizer"
            )
        config.vocab_size = padded_vocab_size(n_tok)
    return config


def check_family(cfg: TrainConfig, config) -> None:
    """Refuse, before any weight is loaded, what the model cannot train as asked: an unsupported
    family or RoPE type (model.py arch_of names the supported ones), rows longer than a sliding
    window (not implemented), LoRA on modules that are not the family's linear layers."""
    from bumblefast.model import LINEAR_MODULES, arch_of

    try:
        arch = arch_of(config)
    except UserError as e:
        raise UserError(f"model_name_or_path: {model_path(cfg)}: {e}") from None
    if arch.sliding_window is not None and cfg.cutoff_len > arch.sliding_window:
        raise UserError(
            f"cutoff_len: {cfg.cutoff_len} is longer than {model_path(cfg)}'s sliding_window "
            f"{arch.sliding_window}; sliding-window attention is not implemented, so rows must fit the window "
            f"(cutoff_len <= {arch.sliding_window}; prep with the same --seq_len)"
        )
    if cfg.finetuning_type == "lora":
        bad = [m for m in cfg.lora_target_modules if m not in LINEAR_MODULES]
        if bad:
            raise UserError(
                f"lora_target_modules: {bad} are not linear layers of {arch.model_type} "
                f"({arch.architecture}); LoRA targets: {', '.join(LINEAR_MODULES)}"
            )


def init_parameters(model: torch.nn.Module, std: float, seed: int, zero3: bool) -> None:
    """A fresh model's weights: model.py `init_parameters` (the init tests use too) from one
    generator seeded with `seed`; under ZeRO-3 each parameter is gathered and rank 0 writes it."""
    from bumblefast.model import init_parameters as init

    gather = None
    if zero3:
        import deepspeed

        def gather(p):
            return deepspeed.zero.GatheredParameters([p], modifier_rank=0)

    init(model, std, torch.Generator().manual_seed(seed), gather, write=not zero3 or D.is_main())


def model_fingerprint(path: str | Path) -> str:
    """Identity of a model folder: its config and the bytes of its weight files."""
    import hashlib

    path = Path(path)
    h = hashlib.sha256((path / "config.json").read_bytes())
    for f in sorted(path.glob("*.safetensors")):
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()[:16]


def resolve_reference(cfg, manifest: Manifest) -> str:
    """The DPO reference strategy a run uses (config key ref_model, `auto` resolved)."""
    from bumblefast.train.pref_losses import REFERENCE_FREE

    has_precomputed = manifest.has_ref_logps
    choice = cfg.ref_model
    if cfg.pref_loss in REFERENCE_FREE:
        if choice not in ("auto", "none"):
            raise UserError(f"ref_model: {cfg.pref_loss} is reference-free; use ref_model none or auto")
        return "none"
    if choice == "auto":
        choice = "precomputed" if has_precomputed else ("adapter" if cfg.finetuning_type == "lora" else "copy")
    if choice == "precomputed":
        if not has_precomputed:
            raise UserError(
                f"ref_model: precomputed, but {cfg.dataset_path} has no ref_logps column; "
                "run `bumblefast precompute-ref` on it first"
            )
        if cfg.ld_alpha is not None:
            raise UserError(
                "ld_alpha: needs a live reference (ref_model adapter or copy): precomputed "
                "log-probs are whole-segment sums"
            )
        check_precomputed(cfg, manifest)
    return choice


def check_precomputed(cfg, manifest: Manifest) -> None:
    """Refuse log-probs made by another model or on other data (bumblefast precompute-ref
    writes both fingerprints into the manifest)."""
    from bumblefast.shards.manifest import ref_fingerprint

    info = manifest.ref_logps
    expected_model = model_fingerprint(model_path(cfg))
    if info is None or info.model_fingerprint != expected_model:
        raise UserError(
            f"dataset_path: its ref_logps come from model {info and info.model_name_or_path} "
            f"(fingerprint {info and info.model_fingerprint}), not from {cfg.model_name_or_path} "
            f"({expected_model}); rerun `bumblefast precompute-ref` with this model"
        )
    if manifest.fingerprint != ref_fingerprint(info.source_fingerprint, expected_model):
        raise UserError(
            f"dataset_path: the ref_logps were computed on another dataset (source fingerprint "
            f"{info.source_fingerprint} does not match this shard set); rerun "
            "`bumblefast precompute-ref`"
        )


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of a Hugging Face model folder (model_io.py), the error naming the key."""
    from bumblefast.model_io import checkpoint_files as files

    try:
        return files(path)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"model_name_or_path: {e}") from None


@torch.no_grad()
def load_partitioned(path: Path, config, ds_config: dict, **kw):
    """ZeRO-3: build under `deepspeed.zero.Init`, so each rank allocates only its partition, then
    copy the checkpoint in one tensor at a time: rank 0 reads it from the memory-mapped
    safetensors file and `GatheredParameters` hands each rank its part. Host memory per rank:
    its partition plus the largest tensor, never a whole model (transformers' way under ZeRO-3)."""
    import deepspeed
    from safetensors import safe_open

    from bumblefast.model import Bumblebee

    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = Bumblebee(config, **kw)
    params = dict(model.named_parameters())  # a tied lm_head is embed_tokens, listed once
    loaded = set()
    for file in checkpoint_files(path):
        with safe_open(str(file), framework="pt") as f:
            for key in sorted(f.keys()):  # the same order on every rank: each gather is collective
                if key.endswith("rotary_emb.inv_freq") or (key not in params and key == "lm_head.weight"):
                    continue
                if key not in params:
                    raise ValueError(f"checkpoint {file}: {key} is not a parameter of the model")
                with deepspeed.zero.GatheredParameters([params[key]], modifier_rank=0):
                    if D.is_main():
                        params[key].copy_(f.get_tensor(key))
                loaded.add(key)
    missing = sorted(set(params) - loaded)
    if missing:
        raise ValueError(f"checkpoint {path} does not match the config: missing {missing}")
    return model


def build_model(cfg: TrainConfig, config, info: EngineInfo | None = None, want_copy: bool = False):
    """Our Bumblebee (any family in model.py FAMILIES), fp32 master weights (DeepSpeed casts for
    bf16); with want_copy also a frozen copy of the starting weights (the DPO reference of full
    fine-tuning). Under ZeRO-3 every model is partitioned as it is built, never whole on a rank."""
    from bumblefast.model import Bumblebee

    zero3 = info is not None and info.zero3
    kw = dict(attn_backend=cfg.attn_backend, kernels=cfg.kernels)

    if cfg.stage == "pretrain":
        if zero3:
            import deepspeed

            with deepspeed.zero.Init(config_dict_or_path=info.config):
                model = Bumblebee(config, **kw)
        else:
            model = Bumblebee(config, **kw)
        init_parameters(model, config.initializer_range, cfg.seed, zero3)
    else:
        model = load_trained(cfg, config, kw, info)
    ref = None
    if want_copy:
        ref = load_trained(cfg, config, kw, info)
        ref.requires_grad_(False).eval()
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if cfg.finetuning_type == "lora":
        from bumblefast.train.engine import apply_lora

        model = apply_lora(model, cfg)
        model.peft_config["default"].base_model_name_or_path = str(model_path(cfg))
    return model, ref


def load_trained(cfg: TrainConfig, config, kw: dict, info: EngineInfo | None = None):
    """A trained HF model folder as our Bumblebee (fp32), grown to `config.vocab_size` rows
    when load_model_config decided on --resize_vocab; under ZeRO-3 partitioned as it loads."""
    from bumblefast.model import Bumblebee
    from bumblefast.vocab import grow_embeddings

    if info is not None and info.zero3:
        if read_model_config(model_path(cfg))["vocab_size"] != config.vocab_size:
            raise UserError(
                "resize_vocab: not under ZeRO-3 (the weights load partitioned); resize with ZeRO 0-2 "
                "(e.g. one short run or `--deepspeed_config_path configs/deepspeed/ds_z2.json`) first"
            )
        return load_partitioned(model_path(cfg), config, info.config, **kw)
    model = Bumblebee.from_pretrained(model_path(cfg), torch_dtype=torch.float32, **kw)
    if model.config.vocab_size < config.vocab_size:
        grow_embeddings(model, config.vocab_size)
    return model


def build_objective(cfg: TrainConfig, model, info: EngineInfo, reference: str | None = None, ref_model=None):
    from bumblefast.train.objectives import DPOObjective, LMObjective
    from bumblefast.train.pref_losses import PrefLossConfig

    if cfg.stage == "dpo":
        loss = PrefLossConfig.from_dpo_config(cfg)
        return DPOObjective(model, loss, reference, ld_alpha=cfg.ld_alpha, ref_model=ref_model, zero3=info.zero3)
    return LMObjective(model, zero3=info.zero3)
