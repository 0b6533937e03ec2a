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
    return "\n\n".join([
        _config_epilog(C.TrainConfig),
        C.describe_keys(C.DPOConfig, ["learning_rate"]).replace("default", "default (dpo)"),
        "dpo-only keys:\n" + C.describe_keys(C.DPOConfig, dpo_only),
    ])


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


# ---------------------------------------------------------------- parser




def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bumblefast",
        description="Prep data into MDS shards, then pretrain -> SFT -> DPO on DeepSpeed.",
        allow_abbrev=False,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    raw = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser(
        "config",
        help="resolve a stage's config (defaults < YAML < CLI) and print it",
        epilog=_train_epilog(),
        formatter_class=raw,
        allow_abbrev=False,
    )
    p.add_argument("--stage", choices=C.STAGES, default=None)
    p.add_argument("--yaml_config", "--config", dest="yaml_config", default=None)
    p.set_defaults(func=cmd_config, free_keys=True)

    p = sub.add_parser(
        "train",
        help="train a stage (pretrain|continue_pretrain|sft|dpo) under any launcher",
        description="Train one stage. Runs as one process, or under `deepspeed --num_gpus N --module "
        "bumblefast train ...` / `torchrun --nproc_per_node N -m bumblefast train ...`.",
        epilog=_train_epilog(),
        formatter_class=raw,
        allow_abbrev=False,
    )
    p.add_argument("--stage", choices=C.STAGES, default=None)
    p.add_argument("--yaml_config", "--config", dest="yaml_config", default=None)
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by `deepspeed`
    p.set_defaults(func=cmd_train, free_keys=True)

    p = sub.add_parser("chat", help="chat with a model in the terminal (streamed, multi-turn, /reset, /exit)",
                       allow_abbrev=False)
    from bumblefast.chat import add_arguments as chat_arguments

    chat_arguments(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("serve", help="OpenAI-compatible API (/v1/chat/completions, streaming) and a web chat page",
                       allow_abbrev=False)
    from bumblefast.serve import add_arguments as serve_arguments

    serve_arguments(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "eval",
        help="held-out loss/perplexity (pretrain/sft shards), answer accuracy (Alpaca questions) or "
        "preference accuracy and margin (dpo shards or pairs); JSON out",
        allow_abbrev=False,
    )
    p.add_argument("--model_path", required=True, help="a Hugging Face model folder")
    p.add_argument("--dataset_path", required=True, help="prep shards, or a json/jsonl file of records")
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("plot", help="PNG curves (loss, lr, grad norm, rewards) from a run's TensorBoard logs")
    p.add_argument("output_dir", help="a training run's --output_dir")
    p.add_argument("--out", default=None, help="folder for the PNGs (default: OUTPUT_DIR/plots)")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("model", help="model presets and checkpoints")
    msub = p.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    q = msub.add_parser("info", help="parameter count and training FLOPs per token of a config folder")
    q.add_argument("path", help="model folder with config.json, e.g. configs/models/bumblebee-1.5b")
    q.add_argument("--seq_len", type=int, default=2048, help="document length for the attention FLOPs")
    q.add_argument("--tokenizer", default=None,
                   help="size the vocabulary as pretraining from this preset would: the tokenizer's size "
                        "rounded up to a multiple of 128")
    q.add_argument("--vocab_size", type=int, default=None, help="embedding rows, as train's --vocab_size")
    q.set_defaults(func=cmd_model_info)

    p = sub.add_parser("tokenizer", help="train tokenizers")
    tsub = p.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)
    q = tsub.add_parser("train", help="train a byte-level BPE with ChatML specials and chat template")
    q.add_argument("--input", nargs="+", required=True, help=".json/.jsonl/.txt files")
    q.add_argument("--vocab_size", type=int, required=True)
    q.add_argument("--output", required=True, help="folder to write (AutoTokenizer loads it)")
    q.add_argument("--system_prompt", default="You are a helpful assistant.")
    q.add_argument("--min_frequency", type=int, default=2)
    q.set_defaults(func=cmd_tokenizer_train)

    # prep owns its arguments (prep/cli.py): `prep`, `prep merge`, `prep inspect`.
    p = sub.add_parser(
        "prep", help="tokenize + pack raw data into MDS shards (also: prep merge, prep inspect)", add_help=False
    )
    p.set_defaults(func=cmd_prep, free_keys=True)

    p = sub.add_parser(
        "precompute-ref",
        help="score dpo shards with the reference model once; writes shards with a ref_logps column",
        description="Run under torchrun/deepspeed to use several GPUs (each rank scores a share of rows).",
        allow_abbrev=False,
    )
    p.add_argument("--model_name_or_path", required=True, help="the reference (usually the SFT model folder)")
    p.add_argument("--dataset_path", required=True, help="dpo shards from `bumblefast prep --stage dpo`")
    p.add_argument("--output_dir", required=True, help="new shard folder (the source stays unchanged)")
    p.add_argument("--batch_size", type=int, default=8, help="rows per forward")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_precompute_ref)

    p = sub.add_parser(
        "merge-lora",
        help="merge a LoRA adapter into its base model and save a plain HF model (safetensors)",
        allow_abbrev=False,
    )
    p.add_argument("--base_model_path", required=True, help="HF model folder the adapter was trained on")
    p.add_argument("--lora_model_path", required=True, help="PEFT adapter folder (adapter_config.json)")
    p.add_argument("--save_path", required=True, help="folder to write the merged model to")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="dtype of the saved weights (auto: the base's; the merge itself runs in fp32)")
    p.set_defaults(func=cmd_merge_lora)

    p = sub.add_parser(
        "bench",
        help="benchmark suite: prep, streaming, kernels, training (+ scaling); table, JSON and PNG",
        description="Runs benchmarks/*.py of the checkout side by side with their baselines and writes "
        "OUT/<date>-<host>.json, .md and .png. Sizes: min (seconds, CI smoke), cpu (the 2-core "
        "machine, under 15 minutes for all), gpu (one CUDA device, the 1.5B preset).",
        allow_abbrev=False,
    )
    from bumblefast.benchlib import SECTIONS, SIZES

    p.add_argument("what", nargs="?", default="all", choices=(*SECTIONS, "all", "report"),
                   help="a section, all, or report (regenerate the README/docs tables from RESULTS)")
    p.add_argument("results", nargs="?", default=None,
                   help="report: the results JSON to publish (default: the one the tables already name)")
    p.add_argument("--check", action="store_true", help="report: write nothing; fail if a table is stale")
    p.add_argument("--size", choices=SIZES, default=None, help="default: gpu with CUDA, else cpu")
    p.add_argument("--out", default="benchmarks/results", help="folder for the report (default benchmarks/results)")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", help="run the end-to-end demo on the bundled demo data")
    p.add_argument("--out", default="demo_out", help="folder for everything the demo writes")
    p.add_argument("--seed", type=int, default=0, help="seeds packing, init and shuffle of every stage")
    p.add_argument("--threads", type=int, default=1,
                   help="intra-op threads per training process (default 1: steady when other work shares the cores)")
    p.set_defaults(func=cmd_demo)
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
