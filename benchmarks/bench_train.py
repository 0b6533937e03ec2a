#!/usr/bin/env python3
"""Training throughput: BumbleFast's packed path vs the padded loop a user would otherwise run.

Both sides train on exactly the same samples (the SFT records as prep tokenized them, with
their loss masks), same model size, same optimizer, in one run:

  ours      packed rows from `bumblefast prep` (best-fit-decreasing into seq_len rows), our
            Bumblebee with per-document attention and the fused linear-CE (no [T, V] logits)
  baseline  transformers' Qwen2ForCausalLM (SDPA; + Liger kernels on CUDA), micro-batches of
            `--baseline_batch` samples padded to the longest, as BumbleCore / HF Trainer do

Reported per side: real tokens/s (tokens of the samples, padding excluded), real-token
fraction of what the model computed, and on CUDA MFU (bumblefast.flops on the actual document
lengths, dense bf16 peak). The ratio ours/baseline is the headline. CPU: tiny preset with a
tokenizer trained on the data; CUDA: the 1.5B preset (same tokenizer; the vocab of the
preset sets the LM-head cost).

  python benchmarks/bench_train.py                       # ../shared/data/alpaca_zh_demo.json
  python benchmarks/bench_train.py --quick               # CI-sized smoke run
  python benchmarks/bench_train.py --preset bumblebee-1.5b --seq_len 4096   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "alpaca_zh_demo.json"
FALLBACK_DATA = ROOT / "datasets" / "demo" / "sft_alpaca.json"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def prepare(data: Path, seq_len: int, workdir: Path, vocab: int):
    """Tokenizer trained on the data + sft shards; returns (tokenizer dir, shard dir, samples)."""
    from bumblefast.config import PrepConfig
    from bumblefast.prep.run import run_prep
    from bumblefast.tokenizer import train_tokenizer

    tok_dir = workdir / "tokenizer"
    train_tokenizer([data], vocab, tok_dir)
    shards = workdir / "sft"
    run_prep(PrepConfig(stage="sft", input=[str(data)], tokenizer_name_or_path=str(tok_dir), seq_len=seq_len,
                        output_dir=str(shards)), progress=False)
    return tok_dir, shards


def unpack_rows(shards: Path, row_ids: list[int]) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """The samples (input_ids, loss_mask) inside each of the given packed rows."""
    from streaming import StreamingDataset

    ds = StreamingDataset(local=str(shards), shuffle=False, batch_size=1)
    rows = []
    for i in row_ids:
        row = ds[i]
        ids = torch.from_numpy(row["input_ids"].astype("int64"))
        mask = torch.from_numpy(row["loss_mask"].astype("int64"))
        starts = [0, *torch.tensor(row["seq_lens"].astype("int64")).cumsum(0).tolist()]
        rows.append([(ids[a:b], mask[a:b]) for a, b in zip(starts[:-1], starts[1:])])
    return rows


def model_config(preset: str, vocab: int):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(ROOT / "configs" / "models" / preset)
    if preset.endswith("tiny"):
        cfg.vocab_size = max(cfg.vocab_size, -(-vocab // 64) * 64)
    return cfg


def timed_steps(step_fn, batches, warmup: int, device: torch.device) -> tuple[float, int]:
    """Run warmup steps untimed, then time the rest; returns (seconds, timed steps)."""
    for b in batches[:warmup]:
        step_fn(b)
    sync(device)
    t0 = time.perf_counter()
    for b in batches[warmup:]:
        step_fn(b)
    sync(device)
    return time.perf_counter() - t0, len(batches) - warmup


def bench_ours(cfg, shards: Path, rows_per_batch: int, steps: int, warmup: int, device, dtype) -> dict:
    from bumblefast.model import Bumblebee
    from bumblefast.shards.reader import build_loader
    from bumblefast.train.objectives import LMObjective

    torch.manual_seed(0)
    model = Bumblebee(cfg).init_weights().to(device)
    obj = LMObjective(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    # shuffled rows: the first rows of best-fit-decreasing hold the longest samples
    loader = build_loader(str(shards), batch_size=rows_per_batch, shuffle=True, seed=0)
    batches = []
    for b in loader:
        batches.append({k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()})
        if len(batches) == steps + warmup:
            break

    def step(b):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss, _ = obj(b)
        (loss / obj.count(b)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    seconds, n_steps = timed_steps(step, batches, warmup, device)
    timed = batches[warmup:]
    tokens = sum(int(b["num_tokens"]) for b in timed)
    computed = sum(int(b["row_capacity"]) for b in timed)  # what a fixed-shape kernel would see
    doc_lens = [n for b in timed for n in torch.diff(b["cu_seqlens"]).tolist()]
    return {"seconds": seconds, "steps": n_steps, "real_tokens": tokens, "computed_tokens": tokens,
            "row_capacity": computed, "doc_lens": doc_lens, "attn": model.resolved_attn(device),
            "kernels": dict(model.ops(device).backends),
            "warm_rows": [i for b in batches[:warmup] for i in b["sample_ids"].tolist()],
            "timed_rows": [i for b in timed for i in b["sample_ids"].tolist()]}


def padded_batches(samples, batch_size: int, pad_id: int, device) -> list[dict]:
    """HF-style micro-batches: `batch_size` samples padded to the longest, prompt labels -100."""
    batches = []
    for i in range(0, len(samples), batch_size):
        group = samples[i:i + batch_size]
        longest = max(len(ids) for ids, _ in group)
        ids = torch.full((len(group), longest), pad_id)
        labels = torch.full((len(group), longest), -100)
        attn = torch.zeros((len(group), longest), dtype=torch.long)
        for j, (x, m) in enumerate(group):
            ids[j, :len(x)] = x
            attn[j, :len(x)] = 1
            labels[j, :len(x)] = torch.where(m.bool(), x, torch.full_like(x, -100))
        batches.append({"input_ids": ids.to(device), "attention_mask": attn.to(device), "labels": labels.to(device),
                        "real": int(attn.sum()), "padded": ids.numel(), "lens": [len(x) for x, _ in group]})
    return batches


def bench_baseline(cfg, warm_samples, timed_samples, batch_size: int, device, dtype, pad_id: int) -> dict:
    """transformers' Qwen2 on padded micro-batches of the same samples, in random order (a
    shuffled sampler, as HF Trainer / BumbleCore use)."""
    from transformers import Qwen2ForCausalLM

    liger = False
    if device.type == "cuda":
        try:
            from liger_kernel.transformers import apply_liger_kernel_to_qwen2

            apply_liger_kernel_to_qwen2()
            liger = True
        except ImportError:
            pass
    torch.manual_seed(0)
    cfg = type(cfg).from_dict(cfg.to_dict())
    cfg._attn_implementation = "sdpa"
    model = Qwen2ForCausalLM(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    order = torch.randperm(len(timed_samples), generator=torch.Generator().manual_seed(0)).tolist()
    warm = padded_batches(warm_samples, batch_size, pad_id, device)
    batches = warm + padded_batches([timed_samples[i] for i in order], batch_size, pad_id, device)
    warmup = len(warm)

    def step(b):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"], use_cache=False)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    seconds, n_steps = timed_steps(step, batches, warmup, device)
    timed = batches[warmup:]
    return {"seconds": seconds, "steps": n_steps, "real_tokens": sum(b["real"] for b in timed),
            "computed_tokens": sum(b["padded"] for b in timed), "doc_lens": [n for b in timed for n in b["lens"]],
            "liger": liger}


def summarize(name: str, r: dict, cfg, peak: float | None) -> dict:
    from bumblefast import flops

    out = {
        "name": name,
        "steps": r["steps"],
        "seconds": round(r["seconds"], 3),
        "real_tokens_per_sec": r["real_tokens"] / r["seconds"],
        "real_token_fraction": r["real_tokens"] / r["computed_tokens"],
    }
    if peak:
        out["mfu"] = flops.train_flops(cfg, r["doc_lens"]) / r["seconds"] / (peak * 1e12)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None, help="Alpaca json (default: ../shared/data/alpaca_zh_demo.json)")
    p.add_argument("--preset", default=None, help="model preset (default: tiny on CPU, bumblebee-1.5b on CUDA)")
    p.add_argument("--seq_len", type=int, default=2048)
    p.add_argument("--rows", type=int, default=1, help="packed rows per micro-batch (ours)")
    p.add_argument("--baseline_batch", type=int, default=4, help="samples per padded micro-batch (baseline)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--vocab", type=int, default=8192, help="size of the tokenizer trained on the data")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--quick", action="store_true", help="tiny sizes for CI")
    args = p.parse_args()

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    preset = args.preset or ("bumblebee-1.5b" if cuda else "bumblebee-tiny")
    data = Path(args.data) if args.data else (DEFAULT_DATA if DEFAULT_DATA.is_file() else FALLBACK_DATA)
    if not args.data and data == FALLBACK_DATA:
        print(f"note: {DEFAULT_DATA} not present; using the demo data {FALLBACK_DATA}")
    seq_len = 256 if args.quick else args.seq_len
    steps = args.steps or (3 if args.quick else (20 if cuda else 12))
    warmup = 1 if args.quick else args.warmup

    from bumblefast import flops

    peak = flops.peak_tflops(torch.cuda.get_device_name(device)) if cuda else None
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        tok_dir, shards = prepare(data, seq_len, Path(tmp), args.vocab)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tok_dir)
        cfg = model_config(preset, len(tok))
        print(f"data {data.name}; preset {preset} ({flops.param_count(cfg) / 1e6:.1f}M params), {device}, {dtype}; "
              f"prep {time.perf_counter() - t0:.1f}s", flush=True)
        ours = bench_ours(cfg, shards, args.rows, steps, warmup, device, dtype)
        print(f"  ours done: {ours['seconds']:.1f}s over {len(ours['timed_rows'])} rows", flush=True)
        # the baseline trains on exactly the samples inside the rows ours trained on
        warm_samples = [s for r in unpack_rows(shards, ours["warm_rows"]) for s in r]
        timed_samples = [s for r in unpack_rows(shards, ours["timed_rows"]) for s in r]
        base = bench_baseline(cfg, warm_samples, timed_samples, args.baseline_batch, device, dtype, tok.pad_token_id)
        print(f"  baseline done: {base['seconds']:.1f}s", flush=True)

    results = [summarize("bumblefast packed", ours, cfg, peak),
               summarize(f"transformers padded x{args.baseline_batch}" + (" + Liger" if base["liger"] else ""), base, cfg, peak)]
    ratio = results[0]["real_tokens_per_sec"] / results[1]["real_tokens_per_sec"]
    report = {
        "benchmark": "train",
        "stage": "sft",
        "date": date.today().isoformat(),
        "host": platform.node(),
        "device": torch.cuda.get_device_name(device) if cuda else f"cpu ({torch.get_num_threads()} threads)",
        "dtype": str(dtype).removeprefix("torch."),
        "preset": preset,
        "seq_len": seq_len,
        "data": data.name,
        "attention": ours["attn"],
        "kernels": ours["kernels"],
        "results": results,
        "speedup_real_tokens_per_sec": ratio,
    }
    lines = [f"## bench_train ({report['date']}, {report['device']}, {preset}, sft, seq_len {seq_len})", "",
             "| configuration | real tokens/s | real-token fraction | MFU |", "|---|---|---|---|"]
    for r in results:
        mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "n/a (CPU)"
        lines.append(f"| {r['name']} | {r['real_tokens_per_sec']:.0f} | {r['real_token_fraction']:.3f} | {mfu} |")
    lines += ["", f"ours / baseline real tokens/s: **{ratio:.2f}x**"]
    table = "\n".join(lines)
    print("\n" + table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"bench_train_{platform.node()}_{report['date']}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(table + "\n")
    print(f"wrote {stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
