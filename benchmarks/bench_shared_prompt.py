#!/usr/bin/env python3
"""DPO with a shared prompt vs the unshared packed path: pairs/s on the same pairs.

Per data set, one tokenizer trained on it and the same pairs prepped twice: `pairs` layout
([prompt+chosen][prompt+rejected] segments) and `shared_prompt` ([prompt+chosen][rejected]
attending the prompt, see shards/schema.py). Each side is our model + LoRA, the DPO objective
with precomputed reference log-probs (the policy step; computed untimed) and AdamW, one
packed row per micro-batch, and runs every row of its shard set per round: a round is one
epoch over the same pairs, so pairs/s compares whole epochs. Rounds interleave the two sides
(alternating which goes first); reported: median pairs/s and min-max over rounds, "within
noise" when the ranges overlap, the fraction of pair tokens that are prompt tokens (as the
unshared layout counts them) and the tokens computed per pair on each side.

Data sets: dpo_zh_demo.json (../shared/data, else the demo's dpo.json) at --seq_len, and a
multi-turn set with long histories built from ShareGPT duolun_train.json: each conversation
of 4+ turns becomes a pair whose prompt is every turn before the last reply (its earlier
replies included), chosen = that reply, rejected = the last reply of the next such
conversation; and, from the same file, short-prompt pairs: each two-turn conversation (one
question, one long reply) paired the same way. Those two run at --long_seq_len (4096): a
small cutoff cuts the long histories first (11% prompt tokens left when the first measurement
ran at 1024). --seq_len is the dpo cutoff per sequence (rows of twice it, since 2026-12-02;
results recorded before then had rows of --seq_len): truncation is the same in both layouts.

  python benchmarks/bench_shared_prompt.py               # CPU, tiny preset
  python benchmarks/bench_shared_prompt.py --only short-prompt --append   # one more run, same file
  python benchmarks/bench_train.py --stage dpo           # also runs this after the dpo rows

The result file, benchmarks/results/bench_shared_prompt_<host>_<date>.json (`--json` names
another), holds a list of runs, each with its command, host, times, load and data sets; a run
replaces the file, and with `--append` joins the runs already in it (a data set measured again
takes the later run's figures in the tables: benchreport.shared_prompt_sets).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import sys
import tempfile
import time
from pathlib import Path

import harness as H
import torch
from harness import DEMO, SHARED, interleave, median_range, model_config, objective_step, prepare, run_prep, sync


def conversation_pairs(src: Path, out: Path, min_turns: int = 4, max_turns: int = 1 << 30) -> Path:
    """Preference pairs from a ShareGPT conversation file: each conversation of min_turns to
    max_turns turns, its last reply chosen, the next such conversation's last reply rejected."""
    convs = [c["conversations"] for c in json.loads(src.read_text(encoding="utf-8"))]
    convs = [c for c in convs if min_turns <= len(c) <= max_turns and c[-1]["from"] == "gpt"]
    pairs = [
        {"conversations": c[:-1], "chosen": c[-1], "rejected": convs[(i + 1) % len(convs)][-1]}
        for i, c in enumerate(convs)
    ]
    out.write_text(json.dumps(pairs, ensure_ascii=False), encoding="utf-8")
    return out


def data_sets(workdir: Path, seq_len: int, long_seq_len: int, shared: Path = SHARED) -> list[tuple[str, Path, int]]:
    """(name, pairs file, seq_len) per data set."""
    single = shared / "dpo_zh_demo.json" if (shared / "dpo_zh_demo.json").is_file() else DEMO / "dpo.json"
    sets = [(single.name, single, seq_len)]
    src = shared / "duolun_train.json"
    if src.is_file():
        long = conversation_pairs(src, workdir / "multi_turn_pairs.json", min_turns=4)
        short = conversation_pairs(src, workdir / "two_turn_pairs.json", min_turns=2, max_turns=2)
        sets.append(("duolun_train.json -> long-history multi-turn pairs", long, long_seq_len))
        sets.append(("duolun_train.json -> short-prompt two-turn pairs", short, long_seq_len))
    return sets


def _side(cfg, shards: Path, device, dtype, lora_rank: int = 16):
    """(step function, micro-batches with ref_logps) for one layout: model, LoRA, optimizer."""
    from bumblefast.config import DPOConfig
    from bumblefast.model import Bumblebee
    from bumblefast.shards.reader import build_loader
    from bumblefast.train.engine import apply_lora
    from bumblefast.train.objectives import DPOObjective
    from bumblefast.train.pref_losses import PrefLossConfig

    torch.manual_seed(0)
    model = Bumblebee(cfg).init_weights().to(device)
    model = apply_lora(model, DPOConfig(finetuning_type="lora", lora_rank=lora_rank, lora_alpha=2 * lora_rank))
    batches = [b.to(device) for b in build_loader(str(shards), batch_size=1, shuffle=False)]
    live = DPOObjective(model, PrefLossConfig(), "adapter")
    for b in batches:  # what `bumblefast precompute-ref` stores, made untimed
        b.ref_logps = live.reference_logps(b)
    obj = DPOObjective(model, PrefLossConfig(), "precomputed")
    step = objective_step(model, obj, device, dtype)

    return step, batches


def _epoch(step, batches, device) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one epoch. On a shared CPU machine the
    CPU seconds (one thread) measure the work; wall time also counts waiting for a core."""
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    for b in batches:
        step(b)
    sync(device)
    return time.perf_counter() - t0, time.process_time() - c0


def same_pairs(data: Path, workdir: Path, args) -> tuple[Path, Path, Path]:
    """The pairs prepped unshared; then the pairs it kept, prepped again with a shared prompt
    (the shared layout admits pairs whose two copies would not fit a row: keep the same pairs).
    Returns (tokenizer, unshared shards, shared shards)."""
    records = json.loads(data.read_text(encoding="utf-8"))
    if args.pairs:  # a fixed subset keeps the CPU run short
        records = records[: args.pairs]
    subset = workdir / f"subset_{data.stem}.jsonl"  # one record a line: errors.jsonl names the line
    subset.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    tok_dir, plain = prepare(subset, "dpo", args.seq_len, workdir, args.vocab, share_prompt=False)
    skipped = {
        int(json.loads(line)["where"].rsplit(":", 1)[1])
        for line in (plain / "errors.jsonl").read_text(encoding="utf-8").splitlines()
        if line.strip()
    }
    same = workdir / f"same_pairs_{data.stem}.jsonl"
    kept = "".join(json.dumps(r, ensure_ascii=False) + "\n" for k, r in enumerate(records, 1) if k not in skipped)
    same.write_text(kept, encoding="utf-8")
    return tok_dir, plain, run_prep(same, "dpo", args.seq_len, tok_dir, workdir / "dpo_shared", share_prompt=True)


def bench_data_set(name: str, data: Path, seq_len: int, workdir: Path, args, device, dtype, preset: str) -> dict:
    import benchlib as BL
    from transformers import AutoTokenizer

    from bumblefast.shards.manifest import read_manifest

    tok_dir, plain, shared = same_pairs(data, workdir, argparse.Namespace(**{**vars(args), "seq_len": seq_len}))
    manifests = {"unshared": read_manifest(str(plain)), "shared prompt": read_manifest(str(shared))}
    cfg = model_config(preset, len(AutoTokenizer.from_pretrained(tok_dir)))
    sides = {"unshared": _side(cfg, plain, device, dtype), "shared prompt": _side(cfg, shared, device, dtype)}
    for step, batches in sides.values():  # warm-up: one step each, untimed
        step(batches[0])
    # rounds alternating which side goes first
    timed = dict(zip(sides, interleave(list(sides), args.rounds, lambda key, r: _epoch(*sides[key], device))))
    seconds = {k: [wall for wall, _ in v] for k, v in timed.items()}
    cpu_seconds = {k: [cpu for _, cpu in v] for k, v in timed.items()}
    n_pairs = manifests["unshared"]["records"]["written"]
    assert n_pairs == manifests["shared prompt"]["records"]["written"], "the two layouts hold different pairs"
    rows = []
    clock = "cpu" if device.type == "cpu" else "wall"
    for key, m in manifests.items():
        med, lo, hi = median_range(n_pairs / s for s in (cpu_seconds if clock == "cpu" else seconds)[key])
        rows.append(
            {
                "name": f"ours, {key}",
                "rows": m["rows"],
                "tokens_per_pair": m["tokens"]["real"] / n_pairs,
                "pairs_per_sec_median": med,
                "pairs_per_sec_min": lo,
                "pairs_per_sec_max": hi,
                "wall_seconds": seconds[key],
                "cpu_seconds": cpu_seconds[key],
                "pairs_per_wall_sec_median": median_range(n_pairs / s for s in seconds[key])[0],
            }
        )
    base, ours = rows
    rate = {k: BL.rounds(k, n_pairs, (cpu_seconds if clock == "cpu" else seconds)[k], "pairs/s") for k in sides}
    return {
        "data": name,
        "pairs": n_pairs,
        "truncated": {k: m["records"]["truncated"] for k, m in manifests.items()},
        "seq_len": seq_len,
        "rounds": args.rounds,
        "clock": clock,
        "prompt_fraction": manifests["unshared"]["dpo"]["prompt_fraction"],
        "skipped": manifests["unshared"]["records"]["skipped_by_reason"],
        "results": rows,
        "speedup_median": ours["pairs_per_sec_median"] / base["pairs_per_sec_median"],
        # benchlib's verdict: within noise when the rounds' ranges overlap
        "within_noise": H.compare(name, rate["shared prompt"], rate["unshared"])["verdict"] == "within noise",
        "load_average": list(os.getloadavg()),
    }


def bench_shared_prompt(args, device, dtype, preset: str) -> list[dict]:
    """Every data set; `args` needs seq_len, vocab (and optionally rounds, pairs)."""
    args = argparse.Namespace(
        **{"rounds": 5, "pairs": 64, "long_seq_len": 4096, "only": "", "data_dir": str(SHARED), **vars(args)}
    )
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        sets = data_sets(Path(tmp), args.seq_len, args.long_seq_len, Path(args.data_dir))
        sets = [st for st in sets if any(w in st[0] for w in args.only.split(","))]
        for i, (name, data, seq_len) in enumerate(sets):
            work = Path(tmp) / f"set{i}"
            work.mkdir()
            t0 = time.perf_counter()
            out.append(bench_data_set(name, data, seq_len, work, args, device, dtype, preset))
            print(f"[dpo shared prompt] {name}: {time.perf_counter() - t0:.0f}s", flush=True)
            print("\n".join(shared_prompt_lines(out[-1:])[-3:]), flush=True)
    return out


def shared_prompt_lines(results: list[dict]) -> list[str]:
    clock = results[0]["clock"] if results else "wall"
    unit = "pairs per CPU-second" if clock == "cpu" else "pairs/s"
    lines = [
        "",
        "### dpo: shared prompt vs unshared (same pairs, one epoch per round, interleaved rounds)",
        "",
        f"| data | prompt share of pair tokens | configuration | rows | tokens/pair | {unit} median (min-max) "
        "| ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for st in results:
        base = st["results"][0]["pairs_per_sec_median"]
        for r in st["results"]:
            ratio = r["pairs_per_sec_median"] / base
            note = " (within noise)" if st["within_noise"] and r is not st["results"][0] else ""
            cut = st.get("truncated", {}).get(r["name"].removeprefix("ours, "))
            cut = f", {cut} truncated" if cut else ""
            lines.append(
                f"| {st['data']} ({st['pairs']} pairs, seq {st['seq_len']}{cut}) | {st['prompt_fraction']:.0%} "
                f"| {r['name']} | {r['rows']} | {r['tokens_per_pair']:.0f} | {r['pairs_per_sec_median']:.2f} "
                f"({r['pairs_per_sec_min']:.2f}-{r['pairs_per_sec_max']:.2f}) | {ratio:.2f}x{note} |"
            )
    if clock == "cpu":
        lines += [
            "",
            "CPU: rates per CPU-second of the one-thread process (time.process_time), so a loaded "
            f"machine (load average {results[0]['load_average'][0]:.1f}) slows the wall clock, not the figure.",
        ]
    return lines


def record(path: Path, run: dict, append: bool) -> dict:
    """The result file's content with `run` in it: `run` alone, or (`append`) after the runs the
    file already holds. Refuses to append to a file of the earlier one-run format (no `runs`)."""
    result = {"benchmark": "shared_prompt", "runs": []}
    if append and path.is_file():
        result = json.loads(path.read_text())
        if "runs" not in result:
            raise SystemExit(f"{path}: not a multi-run result (no 'runs'); run without --append to start one")
    result["runs"].append(run)
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default=None)
    p.add_argument("--seq_len", type=int, default=1024)
    p.add_argument("--long_seq_len", type=int, default=4096, help="seq_len of the two duolun sets")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--pairs", type=int, default=64, help="pairs per data set (0: all)")
    p.add_argument(
        "--data_dir",
        default=str(SHARED),
        help="the shared sample data (dpo_zh_demo.json, duolun_train.json)",
    )
    p.add_argument("--only", default="", help="comma list: run the data sets whose name contains one")
    p.add_argument("--out", default=str(H.RESULTS), help="folder of the default result file")
    p.add_argument("--json", default=None, help="the result file (default: OUT/bench_shared_prompt_<host>_<date>.json)")
    p.add_argument("--append", action="store_true", help="add this run to the result file's runs instead of replacing")
    args = p.parse_args()
    device, dtype, preset, _ = H.device_setup(args.preset)
    if device.type == "cpu":
        torch.set_num_threads(1)  # CPU-seconds of one thread measure the work (no spin-waiting siblings)
    utc = lambda: time.strftime("%H:%M UTC", time.gmtime())  # noqa: E731
    started, load_start = utc(), list(os.getloadavg())
    results = bench_shared_prompt(args, device, dtype, preset)
    run = {
        "command": shlex.join(["python", "benchmarks/bench_shared_prompt.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "host": socket.gethostname(),
        "cpus": os.cpu_count(),
        "started": started,
        "ended": utc(),
        "load_average_at_start": load_start,
        "load_average_at_end": list(os.getloadavg()),
        "device": str(device),
        "preset": preset,
        "dtype": str(dtype),
        "threads": torch.get_num_threads(),
        "data_sets": results,
    }
    path = Path(args.json or Path(args.out) / f"bench_shared_prompt_{run['host']}_{run['date']}.json")
    result = record(path, run, args.append)
    from benchreport import shared_prompt_sets

    table = "\n".join(shared_prompt_lines(shared_prompt_sets(result)))  # every run's sets, the latest of each
    print(table)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    path.with_suffix(".md").write_text(table + "\n")
    print(f"wrote {path} and its .md ({len(result['runs'])} run(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
