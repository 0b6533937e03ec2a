"""usage: bumblefast prep [--key value ...] | prep merge DIR... | prep inspect DIR

The prep command line (bumblefast/cli.py delegates here):

    bumblefast prep --stage sft --input a.json b.jsonl 'more/*.parquet' \\
        --tokenizer_name_or_path tok/ --seq_len 2048 --output_dir data/sft [--num_workers 8]
    bumblefast prep --stage dpo --dataset_info data/dataset_info.json --dataset dpo_en_demo \\
        --tokenizer_name_or_path tok/ --output_dir data/dpo      # LLaMA-Factory's data sets
    bumblefast prep merge DIR        # join the tasks of a multi-node prep
    bumblefast prep inspect DIR      # manifest + a few rows decoded, trained spans in [[...]]

Any PrepConfig key is accepted as `--key value` (CLI > YAML via --config/--yaml_config >
defaults); `--cutoff_len` is an alias of `--seq_len` (dpo: the cutoff per sequence, rows of
2x); `--input` and `--dataset` take several values. Record formats are detected per record:
Alpaca, ShareGPT, OpenAI `messages`, TRL `prompt`/`completion` and `prompt`/`chosen`/`rejected`
(standard or conversational, including chosen/rejected conversations that repeat the prompt);
`.txt` is a document per line.
"""

from __future__ import annotations

import argparse
import sys

from bumblefast.config import (
    PrepConfig,
    UserError,
    build_config,
    describe_keys,
    load_yaml,
    parse_cli_overrides,
)

USAGE = __doc__ or ""


def _help() -> str:
    return USAGE + "\nkeys (type, default, meaning):\n" + describe_keys(PrepConfig) + "\n"


def join_multi_values(argv: list[str], key: str = "input") -> list[str]:
    """`--input a b c` -> `--input a,b,c` (parse_cli_overrides takes one value per key)."""
    out, i = [], 0
    while i < len(argv):
        tok = argv[i]
        if tok == f"--{key}":
            vals = []
            i += 1
            while i < len(argv) and not argv[i].startswith("--"):
                vals.append(argv[i])
                i += 1
            out += [tok, ",".join(vals)] if vals else [tok]
            continue
        out.append(tok)
        i += 1
    return out


def parse_prep_args(argv: list[str]) -> PrepConfig:
    argv = join_multi_values(join_multi_values(argv), "dataset")
    values = parse_cli_overrides(argv, PrepConfig)
    yaml_path = values.pop("config", None) or values.pop("yaml_config", None)
    yaml_values = load_yaml(yaml_path) if yaml_path else {}
    cfg = build_config(PrepConfig, yaml_values, values, source=str(yaml_path or "config"))
    from bumblefast.prep.launch import apply_launcher_env

    cfg = apply_launcher_env(cfg, set(values) | set(yaml_values), log=lambda m: print(m, file=sys.stderr))
    errors = cfg.validate()
    if errors:
        raise UserError("invalid prep configuration:\n  " + "\n  ".join(errors))
    return cfg


def main(argv: list[str]) -> int:
    argv = list(argv)
    try:
        if argv and argv[0] == "merge":
            p = argparse.ArgumentParser(
                prog="bumblefast prep merge",
                description="join the tasks of a multi-node prep into one dataset (index + manifest)",
            )
            p.add_argument("dirs", nargs="+", help="output folders (local or s3://...) of a multi-node prep")
            args = p.parse_args(argv[1:])
            from bumblefast.prep.merge import merge_parts

            for d in args.dirs:
                m = merge_parts(d)
                n = m["prep"]["tasks"]
                print(f"merged {n} tasks into {d}: {m['rows']} rows, {m['records']['written']} records")
            return 0
        if argv and argv[0] == "inspect":
            p = argparse.ArgumentParser(
                prog="bumblefast prep inspect",
                description="print the manifest and decode a few rows, trained spans in [[...]]",
            )
            p.add_argument("dir", help="prep output folder or URL")
            p.add_argument("--rows", type=int, default=2, help="rows to decode (default 2)")
            p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the one in the manifest)")
            p.add_argument("--color", choices=["auto", "always", "never"], default="auto")
            args = p.parse_args(argv[1:])
            from bumblefast.prep.inspect_shards import inspect_output

            color = None if args.color == "auto" else args.color == "always"
            print(inspect_output(args.dir, rows=args.rows, tokenizer=args.tokenizer, color=color))
            return 0
        if not argv or argv[0] in ("-h", "--help", "help"):
            print(_help())
            return 0
        cfg = parse_prep_args(argv)
        from bumblefast.prep.run import run_prep

        run_prep(cfg)
        return 0
    except (UserError, FileNotFoundError) as e:
        print(f"bumblefast prep: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
