"""`bumblefast` command line: one entry, a subcommand per job.

Subcommands import their heavy dependencies (torch, transformers, deepspeed) only when
they run, so `bumblefast --help` and config errors come back at once.
Config-driven subcommands (`train`, `prep`, `config`) take any config key as `--key value`;
precedence is CLI > YAML (`--yaml_config` / `--config`) > defaults.
"""

from __future__ import annotations

import argparse
import sys

from bumblefast import config as C


def _config_epilog(cls: type, title: str = "config keys (give any as --key value):") -> str:
    return title + "\n" + C.describe_keys(cls)


def _train_epilog() -> str:
    dpo_only = [k for k in C.valid_keys(C.DPOConfig) if k not in C.valid_keys(C.TrainConfig)]
    return "\n\n".join(
        [
            _config_epilog(C.TrainConfig),
            C.describe_keys(C.DPOConfig, ["learning_rate"]).replace("default", "default (dpo)"),
            "dpo-only keys:\n" + C.describe_keys(C.DPOConfig, dpo_only),
        ]
    )


# ---------------------------------------------------------------- subcommand handlers


def cmd_config(args, rest: list[str]) -> int:
    """Resolve and print a stage's config: the check that runs before anything heavy."""
    cfg = C.load_train_config(args.stage, args.yaml_config, C.parse_cli_overrides(rest, C.DPOConfig))
    print(C.to_yaml(cfg), end="")
    return 0


def cmd_train(args, rest: list[str]) -> int:
    cfg = C.load_train_config(args.stage, args.yaml_config, C.parse_cli_overrides(rest, C.DPOConfig))
    from bumblefast.train.loop import main as train_main

    return train_main(cfg)


def cmd_plot(args, rest: list[str]) -> int:
    from bumblefast.plot import plot_run

    for path in plot_run(args.output_dir, args.out):
        print(f"wrote {path}")
    return 0


def cmd_precompute_ref(args, rest: list[str]) -> int:
    from bumblefast.train.precompute import cli_main

    return cli_main(args)


def cmd_chat(args, rest: list[str]) -> int:
    from bumblefast.chat import check, run

    check(args)
    return run(args)


def cmd_serve(args, rest: list[str]) -> int:
    from bumblefast.serve import run

    return run(args)


def cmd_eval(args, rest: list[str]) -> int:
    from bumblefast.evaluate import cli_main

    return cli_main(args)


def cmd_merge_lora(args, rest: list[str]) -> int:
    from bumblefast.merge_lora import cli_main

    return cli_main(args)


def cmd_model_info(args, rest: list[str]) -> int:
    from bumblefast.modelinfo import model_info

    print(model_info(args.path, seq_len=args.seq_len, tokenizer=args.tokenizer, vocab_size=args.vocab_size))
    return 0


def cmd_tokenizer_train(args, rest: list[str]) -> int:
    from bumblefast.tokenizer import train_tokenizer

    tok = train_tokenizer(args.input, args.vocab_size, args.output, args.system_prompt, args.min_frequency)
    print(f"trained a byte-level BPE of {len(tok)} tokens -> {args.output}")
    return 0


def cmd_prep(args, rest: list[str]) -> int:
    from bumblefast.prep.cli import main as prep_main

    return prep_main(rest)


def cmd_bench(args, rest: list[str]) -> int:
    from bumblefast.bench import cli_main

    return cli_main(args)


def cmd_demo(args, rest: list[str]) -> int:
    from bumblefast.demo import run_demo

    return run_demo(args.out, seed=args.seed, threads=args.threads)


# ---------------------------------------------------------------- arguments
# Each subcommand's arguments live with the module that implements it (`add_arguments(p)`);
# those of the modules that import torch when loaded (train, eval, precompute-ref) are here, so
# building the parser (`bumblefast --help`) imports no torch.


def _stage_arguments(p: argparse.ArgumentParser) -> None:
    """`config` and `train`: the stage and a YAML file; any config key follows as --key value."""
    p.add_argument("--stage", choices=C.STAGES, default=None)
    p.add_argument("--yaml_config", "--config", dest="yaml_config", default=None)
    p.set_defaults(free_keys=True)


def _train_arguments(p: argparse.ArgumentParser) -> None:
    _stage_arguments(p)
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by `deepspeed`


def _eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model_path", required=True, help="a Hugging Face model folder")
    p.add_argument("--dataset_path", required=True, help="prep shards, or a json/jsonl file of records")
    p.add_argument("--out", default=None, help="also write the JSON here")


def _precompute_ref_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model_name_or_path", required=True, help="the reference (usually the SFT model folder)")
    p.add_argument("--dataset_path", required=True, help="dpo shards from `bumblefast prep --stage dpo`")
    p.add_argument("--output_dir", required=True, help="new shard folder (the source stays unchanged)")
    p.add_argument("--batch_size", type=int, default=8, help="rows per forward")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)


def _prep_arguments(p: argparse.ArgumentParser) -> None:
    """prep parses its own arguments (prep/cli.py): `prep`, `prep merge`, `prep inspect`."""
    p.set_defaults(free_keys=True)


def _module_arguments(module: str):
    """The `add_arguments` of a module that is light to import."""

    def add(p: argparse.ArgumentParser) -> None:
        import importlib

        importlib.import_module(module).add_arguments(p)

    return add


RAW = {"formatter_class": argparse.RawDescriptionHelpFormatter}
STRICT = {"allow_abbrev": False}

# name -> (handler, arguments, add_parser keywords); in `bumblefast --help` order
COMMANDS = {
    "config": (
        cmd_config,
        _stage_arguments,
        {"help": "resolve a stage's config (defaults < YAML < CLI) and print it", **RAW, **STRICT},
    ),
    "train": (
        cmd_train,
        _train_arguments,
        {
            "help": "train a stage (pretrain|continue_pretrain|sft|dpo) under any launcher",
            "description": "Train one stage. Runs as one process, or under `deepspeed --num_gpus N --module "
            "bumblefast train ...` / `torchrun --nproc_per_node N -m bumblefast train ...`.",
            **RAW,
            **STRICT,
        },
    ),
    "chat": (
        cmd_chat,
        _module_arguments("bumblefast.chat"),
        {"help": "chat with a model in the terminal (streamed, multi-turn, /reset, /exit)", **STRICT},
    ),
    "serve": (
        cmd_serve,
        _module_arguments("bumblefast.serve"),
        {"help": "OpenAI-compatible API (/v1/chat/completions, streaming) and a web chat page", **STRICT},
    ),
    "eval": (
        cmd_eval,
        _eval_arguments,
        {
            "help": "held-out loss/perplexity (pretrain/sft shards), answer accuracy (Alpaca questions) or "
            "preference accuracy and margin (dpo shards or pairs); JSON out",
            **STRICT,
        },
    ),
    "plot": (
        cmd_plot,
        _module_arguments("bumblefast.plot"),
        {"help": "PNG curves (loss, lr, grad norm, rewards) from a run's TensorBoard logs"},
    ),
    "model": (cmd_model_info, _module_arguments("bumblefast.modelinfo"), {"help": "model presets and checkpoints"}),
    "tokenizer": (cmd_tokenizer_train, _module_arguments("bumblefast.tokenizer"), {"help": "train tokenizers"}),
    "prep": (
        cmd_prep,
        _prep_arguments,
        {"help": "tokenize + pack raw data into MDS shards (also: prep merge, prep inspect)", "add_help": False},
    ),
    "precompute-ref": (
        cmd_precompute_ref,
        _precompute_ref_arguments,
        {
            "help": "score dpo shards with the reference model once; writes shards with a ref_logps column",
            "description": "Run under torchrun/deepspeed to use several GPUs (each rank scores a share of rows).",
            **STRICT,
        },
    ),
    "merge-lora": (
        cmd_merge_lora,
        _module_arguments("bumblefast.merge_lora"),
        {"help": "merge a LoRA adapter into its base model and save a plain HF model (safetensors)", **STRICT},
    ),
    "bench": (
        cmd_bench,
        _module_arguments("bumblefast.bench"),
        {
            "help": "benchmark suite: prep, streaming, kernels, training (+ scaling); table, JSON and PNG",
            "description": "Runs benchmarks/*.py of the checkout side by side with their baselines and writes "
            "OUT/<date>-<host>.json, .md and .png. Sizes: min (seconds, CI smoke), cpu (the 2-core "
            "machine, under 15 minutes for all), gpu (one CUDA device, the 1.5B preset).",
            **STRICT,
        },
    ),
    "demo": (
        cmd_demo,
        _module_arguments("bumblefast.demo"),
        {"help": "run the end-to-end demo on the bundled demo data"},
    ),
}
EPILOGS = {"config": _train_epilog, "train": _train_epilog}  # built when the parser is


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bumblefast",
        description="Prep data into MDS shards, then pretrain -> SFT -> DPO on DeepSpeed.",
        allow_abbrev=False,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (handler, add_arguments, keywords) in COMMANDS.items():
        epilog = EPILOGS.get(name)
        p = sub.add_parser(name, **keywords, **({"epilog": epilog()} if epilog else {}))
        add_arguments(p)
        p.set_defaults(func=handler)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if rest and not getattr(args, "free_keys", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return args.func(args, rest) or 0
    except C.ConfigError as e:
        print(f"bumblefast {args.command}: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, C.UserError) as e:
        print(f"bumblefast {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
