"""Config: precedence CLI > YAML > defaults, every problem reported with a suggestion."""

from __future__ import annotations

import dataclasses
import json

import pytest
from helpers import ROOT

from bumblefast import config as C
from bumblefast.cli import main


def write_yaml(tmp_path, text: str) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


def test_precedence_cli_over_yaml_over_defaults(tmp_path):
    y = write_yaml(tmp_path, "stage: sft\nlearning_rate: 1.0e-4\nnum_epochs: 3\n")
    cfg = C.load_train_config(yaml_path=y, overrides={"num_epochs": "5"})
    assert isinstance(cfg, C.SFTConfig)
    assert cfg.learning_rate == 1e-4  # YAML over default 5e-5
    assert cfg.num_epochs == 5  # CLI over YAML
    assert cfg.cutoff_len == 2048  # default
    assert cfg.lora_target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]


def test_cli_stage_overrides_yaml_stage(tmp_path):
    y = write_yaml(tmp_path, "stage: sft\n")
    cfg = C.load_train_config(stage="dpo", yaml_path=y, overrides={"pref_beta": "0.2"})
    assert isinstance(cfg, C.DPOConfig) and cfg.pref_beta == 0.2


def test_unknown_keys_and_bad_types_all_reported_with_suggestions(tmp_path):
    y = write_yaml(tmp_path, "learning_rat: 0.1\ncutoff_len: long\n")
    with pytest.raises(C.ConfigError) as e:
        C.load_train_config(
            stage="sft",
            yaml_path=y,
            overrides={"gradient_acumulation_steps": "2", "pref_beta": "0.1", "finetuning_type": "lora2"},
        )
    msg = str(e.value)
    assert "5 problem(s)" in msg
    assert "'learning_rat'" in msg and "did you mean 'learning_rate'?" in msg
    assert "'cutoff_len'" in msg and "must be an integer" in msg
    assert "--gradient_acumulation_steps" in msg and "'gradient_accumulation_steps'" in msg
    assert "--pref_beta" in msg and "stage dpo only" in msg
    assert "did you mean 'lora'?" in msg


@pytest.mark.parametrize(
    ("key", "value", "why"),
    [
        ("learning_rate", "-1", "must be > 0"),
        ("warmup_ratio", "1.5", "must be in [0, 1)"),
        ("train_micro_batch_size_per_gpu", "0", "must be >= 1"),
        ("use_tensorboard", "maybe", "true or false"),
    ],
)
def test_value_checks(key, value, why):
    with pytest.raises(C.ConfigError, match=key) as e:
        C.load_train_config(stage="sft", overrides={key: value})
    assert why in str(e.value)


def test_yaml_types_are_checked_not_coerced(tmp_path):
    y = write_yaml(tmp_path, "num_epochs: true\nlora_target_modules: q_proj\n")
    with pytest.raises(C.ConfigError) as e:
        C.load_train_config(stage="sft", yaml_path=y)
    assert "got bool" in str(e.value) and "must be a list" in str(e.value)


def test_cli_parsing_forms():
    got = C.parse_cli_overrides(
        ["--use_tensorboard", "--lora_target_modules", "q_proj,v_proj", "--seed=7", "--cutoff-len", "128"],
        C.TrainConfig,
    )
    assert got == {"use_tensorboard": "true", "lora_target_modules": "q_proj,v_proj", "seed": "7", "cutoff_len": "128"}
    cfg = C.load_train_config(stage="sft", overrides=got)
    assert cfg.use_tensorboard is True and cfg.lora_target_modules == ["q_proj", "v_proj"]
    assert cfg.seed == 7 and cfg.cutoff_len == 128


def test_aliases():
    cfg = C.load_train_config(stage="pretrain", overrides={"seq_len": "512"})
    assert cfg.cutoff_len == 512
    prep = C.build_config(C.PrepConfig, {}, {"cutoff_len": "64", "input": "a.json,b.json", "output_dir": "x"})
    assert prep.seq_len == 64 and prep.input == ["a.json", "b.json"]


def test_bumblecore_flags_are_valid_keys():
    flags = """yaml_config model_name_or_path dataset_path output_dir num_epochs cutoff_len learning_rate
    train_micro_batch_size_per_gpu gradient_accumulation_steps finetuning_type lora_rank lora_alpha
    lora_dropout lora_target_modules pref_beta dpo_label_smoothing ld_alpha sft_weight save_steps
    save_total_limit deepspeed_config_path use_tensorboard max_steps seed logging_steps
    tokenizer_name_or_path""".split()
    keys = set(C.valid_keys(C.DPOConfig))
    missing = [f for f in flags if f not in keys and f != "yaml_config"]
    assert missing == []


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*/*.yaml")), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_yaml_loads(path):
    cfg = C.load_train_config(yaml_path=str(path))
    assert cfg.stage in C.STAGES
    assert (ROOT / cfg.deepspeed_config_path).is_file()


def test_bumblecore_defaults_in_shipped_yaml():
    for name in ("sft/sft_lora.yaml", "dpo/dpo_lora.yaml"):
        cfg = C.load_train_config(yaml_path=str(ROOT / "configs" / name))
        assert (cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout) == (64, 128, 0.1)
        assert cfg.lora_target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    cfg = C.load_train_config(yaml_path=str(ROOT / "configs/sft/sft_full.yaml"))
    assert (cfg.learning_rate, cfg.lr_scheduler_type, cfg.warmup_ratio) == (5e-5, "cosine", 0.1)
    assert (cfg.train_micro_batch_size_per_gpu, cfg.gradient_accumulation_steps, cfg.cutoff_len) == (4, 4, 2048)
    assert cfg.bf16 and cfg.gradient_checkpointing
    assert C.load_train_config(yaml_path=str(ROOT / "configs/dpo/dpo_full.yaml")).pref_beta == 0.1


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_configs(stage):
    ds = json.loads((ROOT / f"configs/deepspeed/ds_z{stage}.json").read_text())
    assert ds["zero_optimization"]["stage"] == stage
    # batch sizes and clipping come from our config, filled in by the trainer
    assert ds["train_micro_batch_size_per_gpu"] == "auto"


def test_cli_config_command_exit_codes(tmp_path, capsys):
    assert main(["config", "--stage", "sft", "--lora_rank", "8"]) == 0
    assert "lora_rank: 8" in capsys.readouterr().out
    y = write_yaml(tmp_path, "stage: dpo\n")
    assert main(["config", "--config", y, "--pref_bta", "1"]) == 2
    assert "did you mean 'pref_beta'?" in capsys.readouterr().err
    assert main(["config", "--yaml_config", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


@pytest.mark.parametrize("cls", [C.TrainConfig, C.PretrainConfig, C.SFTConfig, C.DPOConfig, C.PrepConfig])
def test_every_key_has_a_description(cls):
    """--help and the docs read each key's meaning from its one home, the field metadata."""
    missing = [f.name for f in dataclasses.fields(cls) if len(C.key_help(f).split()) < 2]
    assert not missing, f"{cls.__name__}: keys without a description: {missing}"
