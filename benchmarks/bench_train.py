#!/usr/bin/env python3
"""Training throughput: BumbleFast's packed path vs the loop a user would otherwise run.

Every side trains on exactly the same samples (as prep tokenized them, with their loss
masks), same model size, same optimizer, in one run. Per stage:

  sft       ours: packed rows (best-fit-decreasing into seq_len rows), our Bumblebee with
            per-document attention and the fused linear-CE (no [T, V] logits)
            baseline: transformers' Qwen2ForCausalLM (SDPA; + Liger kernels on CUDA),
            micro-batches of `--baseline_batch` samples padded to the longest (BumbleCore / HF)
  pretrain  ours: the same rows with document-masked attention
            baseline: transformers on the same [rows, seq_len] blocks (HF's group_texts)
  dpo       ours with the LoRA adapter as live reference, ours with precomputed reference
            log-probs (no reference forward), and a TRL-style baseline: transformers + peft
            LoRA, chosen and rejected padded to the longest of the batch, full logits, live
            reference forward with the adapter disabled

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
SHARED = ROOT.parent / "shared" / "data"
# the same files copied into the checkout (`make gpu-wheels`), so a GPU run, which gets the
# checkout alone, benches the same data as the CPU runs
BENCHDATA = ROOT / ".benchdata"
DEMO = ROOT / "datasets" / "demo"
# stage -> (real sample file in ../shared/data, the project's own demo file as fallback)
DATA = {
    "sft": ("alpaca_zh_demo.json", "sft_alpaca.json"),
    "pretrain": ("pretrain_zh_demo.json", "pretrain.json"),
    "dpo": ("dpo_zh_demo.json", "dpo.json"),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def prepare(data: Path, stage: str, seq_len: int, workdir: Path, vocab: int):
    """Tokenizer trained on the data + the stage's shards; returns (tokenizer dir, shard dir)."""
    from bumblefast.config import PrepConfig
    from bumblefast.prep.run import run_prep
    from bumblefast.tokenizer import train_tokenizer

    tok_dir = workdir / "tokenizer"
    train_tokenizer([data], vocab, tok_dir)
    shards = workdir / stage
    run_prep(PrepConfig(stage=stage, input=[str(data)], tokenizer_name_or_path=str(tok_dir), seq_len=seq_len,
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


def load_batches(shards: Path, rows_per_batch: int, n: int, device) -> list[dict]:
    """The first n micro-batches of shuffled rows (a representative sample: best-fit-decreasing
    puts the longest samples in the first rows)."""
    from bumblefast.shards.reader import build_loader

    batches = []
    for b in build_loader(str(shards), batch_size=rows_per_batch, shuffle=True, seed=0):
        batches.append({k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()})
        if len(batches) == n:
            break
    return batches


def autocast(device, dtype):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def profile_steps(step, batches: list[dict], device, top: int = 15) -> dict:
    """torch.profiler over a few steps: where the time goes (what holds MFU back). Ops by self
    time on the device (CPU when there is none), with the share of matmuls and attention."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for b in batches:
            step(b)
        sync(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, key, 0) > 0]
    total = sum(getattr(e, key) for e in events) or 1.0

    def share(*needles: str) -> float:
        return sum(getattr(e, key) for e in events if any(n in e.key.lower() for n in needles)) / total

    events.sort(key=lambda e: getattr(e, key), reverse=True)
    return {
        "steps": len(batches),
        "time_basis": key,
        "total_ms": total / 1e3,
        "share_matmul": share("mm", "gemm", "linear", "matmul", "cutlass", "sm90_xmma", "nvjet"),
        "share_attention": share("flash", "attention", "sdpa", "fmha"),
        "top_ops": [{"op": e.key, "self_ms": getattr(e, key) / 1e3, "share": getattr(e, key) / total,
                     "calls": e.count} for e in events[:top]],
    }


def profile_lines(title: str, prof: dict, top: int = 10) -> list[str]:
    lines = ["", f"### profile of {prof['steps']} steps, {title} ({prof['time_basis']}, {prof['total_ms']:.1f} ms): "
             f"matmul {prof['share_matmul']:.0%}, attention {prof['share_attention']:.0%}", "",
             "| op | self ms | share | calls |", "|---|---:|---:|---:|"]
    lines += [f"| `{o['op'][:60]}` | {o['self_ms']:.1f} | {o['share']:.1%} | {o['calls']} |" for o in prof["top_ops"][:top]]
    return lines


def build_ours(cfg, device):
    """Our model built on the device (meta init, then to_empty + init there): a 1.5B fp32 random
    fill takes ~30 s single-threaded on a CPU and well under a second on a GPU."""
    from bumblefast.model import Bumblebee

    torch.manual_seed(0)
    model = Bumblebee.from_config(cfg, device="meta").to_empty(device=device)
    return model.init_weights()


def bench_ours(cfg, batches: list[dict], warmup: int, device, dtype, stage: str, reference: str | None = None,
               lora_rank: int = 16, profile: bool = False) -> dict:
    """Our model + the stage's objective on packed micro-batches (a plain AdamW step)."""
    from bumblefast.config import DPOConfig
    from bumblefast.train.engine import apply_lora
    from bumblefast.train.objectives import DPOObjective, LMObjective
    from bumblefast.train.pref_losses import PrefLossConfig

    model = build_ours(cfg, device)
    if stage == "dpo":
        model = apply_lora(model, DPOConfig(finetuning_type="lora", lora_rank=lora_rank, lora_alpha=2 * lora_rank,
                                                  lora_target_modules=list(LORA_TARGETS)))
        obj = DPOObjective(model, PrefLossConfig(), "adapter")
        if reference == "precomputed":  # what `bumblefast precompute-ref` stores, made untimed
            for b in batches:
                b["ref_logps"] = obj.reference_logps(b)
            obj = DPOObjective(model, PrefLossConfig(), "precomputed")
    else:
        obj = LMObjective(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(b):
        with autocast(device, dtype):
            loss, _ = obj(b)
        (loss / obj.count(b)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    seconds, n_steps = timed_steps(step, batches, warmup, device)
    timed = batches[warmup:]
    tokens = sum(int(b["num_tokens"]) for b in timed)
    inner = model.get_base_model() if stage == "dpo" else model
    prof = profile_steps(step, batches[-2:], device) if profile else None
    return {"profile": prof, "seconds": seconds, "steps": n_steps, "real_tokens": tokens, "computed_tokens": tokens,
            "pairs": sum(DPOObjective.count(b) for b in timed) if stage == "dpo" else None,
            "doc_lens": [n for b in timed for n in torch.diff(b["cu_seqlens"]).tolist()],
            "attn": inner.last_attn_backend, "kernels": dict(inner.ops(device).backends),
            "lora_rank": lora_rank if stage == "dpo" else 0, "reference": reference}


def hf_model(cfg, device):
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
    with torch.device(device):  # initialised where it runs (see build_ours)
        return Qwen2ForCausalLM(cfg), liger


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


def padded_result(step, batches: list[dict], warmup: int, device, **extra) -> dict:
    """Time `step` over padded batches; count real (unpadded) and computed tokens."""
    seconds, n_steps = timed_steps(step, batches, warmup, device)
    timed = batches[warmup:]
    return {"seconds": seconds, "steps": n_steps, "real_tokens": sum(b["real"] for b in timed),
            "computed_tokens": sum(b["padded"] for b in timed), "doc_lens": [n for b in timed for n in b["lens"]],
            **extra}


def bench_hf_lm(cfg, batches: list[dict], warmup: int, device, dtype) -> dict:
    """transformers' Qwen2 (+ Liger on CUDA) on HF-style batches (input_ids/attention_mask/labels)."""
    model, liger = hf_model(cfg, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(b):
        with autocast(device, dtype):
            out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"], use_cache=False)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return padded_result(step, batches, warmup, device, liger=liger)


def bench_trl_dpo(cfg, pair_batches: list[list], warmup: int, device, dtype, pad_id: int, lora_rank: int = 16) -> dict:
    """TRL-style DPO: [chosen; rejected] padded to the longest, full logits, live reference
    forward with the LoRA adapter disabled (DPOTrainer's concatenated_forward)."""
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model

    base, liger = hf_model(cfg, device)
    model = get_peft_model(base, LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0,
                                            target_modules=list(LORA_TARGETS)))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    prepared = []
    for pairs in pair_batches:  # pairs: [(chosen ids, chosen mask), (rejected ids, rejected mask)] * P
        seqs = [s for pair in pairs for s in pair]
        b = padded_batches(seqs[0::2] + seqs[1::2], len(seqs), pad_id, device)[0]
        prepared.append(b)

    def logps(m, b):
        logits = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits[:, :-1].float()
        labels = b["labels"][:, 1:]
        mask = labels != -100
        lp = torch.gather(F.log_softmax(logits, -1), 2, labels.clamp(min=0)[..., None]).squeeze(-1)
        return (lp * mask).sum(-1)

    def step(b):
        with autocast(device, dtype):
            with torch.no_grad(), model.disable_adapter():
                ref = logps(model, b)
            pol = logps(model, b)
        n = pol.shape[0] // 2
        z = (pol[:n] - pol[n:]) - (ref[:n] - ref[n:])
        (-F.logsigmoid(0.1 * z).mean()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    result = padded_result(step, prepared, warmup, device, liger=liger, lora_rank=lora_rank, reference="adapter")
    result["pairs"] = sum(len(b["lens"]) // 2 for b in prepared[warmup:])
    return result


def samples_of(shards: Path, batches: list[dict]) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Per micro-batch, the samples inside its rows (as prep tokenized them)."""
    return [[s for row in unpack_rows(shards, b["sample_ids"].tolist()) for s in row] for b in batches]


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")  # ours (DPOConfig's default) and the TRL-style peer


def summarize(name: str, r: dict, cfg, peak: float | None) -> dict:
    from bumblefast import flops

    out = {
        "name": name,
        "steps": r["steps"],
        "seconds": r["seconds"],
        "real_tokens": r["real_tokens"],
        "computed_tokens": r["computed_tokens"],
        "real_tokens_per_sec": r["real_tokens"] / r["seconds"],
        "real_token_fraction": r["real_tokens"] / r["computed_tokens"],
    }
    if r.get("pairs"):
        out["pairs"] = r["pairs"]
        out["pairs_per_sec"] = r["pairs"] / r["seconds"]
    if peak:  # by what is computed: LoRA trains the adapters only; a precomputed reference costs 0
        lora = r.get("lora_rank") or 0
        work = flops.step_flops(cfg, r["doc_lens"], lora_rank=lora, lora_targets=LORA_TARGETS if lora else (),
                                reference=r.get("reference"))
        out["mfu"] = work / r["seconds"] / (peak * 1e12)
    return out


def run_stage(stage: str, args, device, dtype, preset: str, peak) -> dict:
    from transformers import AutoTokenizer

    from bumblefast import flops

    real, fallback = DATA[stage]
    data = Path(args.data) if args.data and stage == args.stage else next(
        (d / real for d in (BENCHDATA, SHARED) if (d / real).is_file()), DEMO / fallback)
    seq_len = 256 if args.quick else args.seq_len
    steps = args.steps or (3 if args.quick else (20 if device.type == "cuda" else 12))
    warmup = 1 if args.quick else args.warmup
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        tok_dir, shards = prepare(data, stage, seq_len, Path(tmp), args.vocab)
        tok = AutoTokenizer.from_pretrained(tok_dir)
        cfg = model_config(preset, len(tok))
        batches = load_batches(shards, args.rows, warmup + steps, device)
        warmup = min(warmup, max(len(batches) - 1, 0))
        print(f"[{stage}] data {data.name}: {len(batches)} micro-batches of {args.rows} row(s) <= {seq_len} tokens; "
              f"preset {preset} ({flops.param_count(cfg) / 1e6:.1f}M params), {device}, {dtype}; "
              f"prep {time.perf_counter() - t0:.1f}s", flush=True)
        results = []
        if stage == "dpo":
            for ref in ("adapter", "precomputed"):
                r = bench_ours(cfg, [dict(b) for b in batches], warmup, device, dtype, "dpo", ref)
                results.append(summarize(f"bumblefast packed, {ref} reference", r, cfg, peak))
                print(f"  ours ({ref}) {r['seconds']:.1f}s", flush=True)
            pairs = [[(s[i], s[i + 1]) for i in range(0, len(s), 2)] for s in samples_of(shards, batches)]
            base = bench_trl_dpo(cfg, pairs, warmup, device, dtype, tok.pad_token_id)
            results.append(summarize("TRL-style padded, live reference" + (" + Liger" if base["liger"] else ""),
                                     base, cfg, peak))
        else:
            ours = bench_ours(cfg, batches, warmup, device, dtype, stage, profile=getattr(args, "profile", False))
            results.append(summarize(f"bumblefast packed ({ours['attn']} attention)", ours, cfg, peak))
            if ours["profile"]:
                results[-1]["profile"] = ours["profile"]
            print(f"  ours {ours['seconds']:.1f}s", flush=True)
            if stage == "sft":  # the same samples, shuffled, padded per micro-batch of 4
                samples = [s for group in samples_of(shards, batches) for s in group]
                n_warm = sum(len(g) for g in samples_of(shards, batches[:warmup]))
                order = torch.randperm(len(samples) - n_warm, generator=torch.Generator().manual_seed(0)).tolist()
                timed = [samples[n_warm + i] for i in order]
                hf_batches = padded_batches(samples[:n_warm], args.baseline_batch, tok.pad_token_id, device)
                hf_warm = len(hf_batches)
                hf_batches += padded_batches(timed, args.baseline_batch, tok.pad_token_id, device)
                label = f"transformers padded x{args.baseline_batch}"
            else:  # pretrain: HF's group_texts blocks = the same rows, no document masking
                hf_batches, hf_warm = [], warmup
                for b in batches:
                    ids = b["input_ids"].view(-1, seq_len)
                    hf_batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids,
                                       "real": ids.numel(), "padded": ids.numel(), "lens": [seq_len] * ids.shape[0]})
                label = "transformers blocks (cross-document attention)"
            base = bench_hf_lm(cfg, hf_batches, hf_warm, device, dtype)
            results.append(summarize(label + (" + Liger" if base["liger"] else ""), base, cfg, peak))
        print(f"  baseline {base['seconds']:.1f}s", flush=True)
    key = "pairs_per_sec" if stage == "dpo" else "real_tokens_per_sec"
    return {"stage": stage, "data": data.name, "seq_len": seq_len, "results": results,
            "attention": ours["attn"] if stage != "dpo" else None,
            f"speedup_{key}": results[0][key] / results[-1][key]}


SIZES = {  # per size: the arguments of one run_stage call
    "min": dict(quick=True),
    "cpu": dict(quick=False, seq_len=1024, steps=8, warmup=1),
    "gpu": dict(quick=False, seq_len=4096, steps=8, warmup=2, preset="bumblebee-1.5b", profile=True),
}


def device_setup(preset: str | None):
    from bumblefast import flops

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    preset = preset or ("bumblebee-1.5b" if cuda else "bumblebee-tiny")
    peak = flops.peak_tflops(torch.cuda.get_device_name(device)) if cuda else None
    return device, dtype, preset, peak


def bench(size: str, workdir: Path) -> dict:
    """`bumblefast bench train`: the section described in bumblefast/benchlib.py. Per stage, ours
    vs the baseline in real tokens/s (dpo: pairs/s) and real-token fraction; MFU on CUDA."""
    from bumblefast import benchlib as BL

    z = dict(SIZES[size])
    args = argparse.Namespace(stage="all", data=None, preset=z.pop("preset", None), seq_len=z.get("seq_len", 2048),
                              rows=1, baseline_batch=4, steps=z.get("steps"), warmup=z.get("warmup", 2), vocab=8192,
                              quick=z["quick"], profile=z.get("profile", False))
    device, dtype, preset, peak = device_setup(args.preset)
    stages = [run_stage(st, args, device, dtype, preset, peak) for st in ("pretrain", "sft", "dpo")]
    ratios, points = [], []
    for st in stages:
        rs, base = st["results"], st["results"][-1]
        unit, key = ("pairs/s", "pairs") if st["stage"] == "dpo" else ("tokens/s", "real_tokens")
        for r in rs:
            points.append(BL.point(f"{st['stage']}: {r['name']}", r["real_tokens_per_sec"], r.get("mfu")))
        for r in rs[:-1]:
            name = f"{st['stage']} (seq {st['seq_len']}): {r['name']} vs {base['name']}"
            ratios.append(BL.ratio(name + f" ({unit})", BL.measured(r["name"], r[key], r["seconds"], unit),
                                   BL.measured(base["name"], base[key], base["seconds"], unit)))
            ratios.append(BL.ratio(name + " (real-token fraction)",
                                   BL.fraction(r["name"], r["real_tokens"], r["computed_tokens"]),
                                   BL.fraction(base["name"], base["real_tokens"], base["computed_tokens"])))
    config = {"size": size, "preset": preset, "device": str(device), "dtype": str(dtype).removeprefix("torch."),
              "peak_tflops": peak, **{k: v for k, v in vars(args).items() if k != "data"}}
    notes = [] if peak else ["MFU is reported on CUDA only (no meaningful peak for a CPU)"]
    return {"config": config, "results": {"stages": stages, "notes": notes}, "ratios": ratios, "points": points}


def write_report(report: dict, stem: Path) -> str:
    """Write the JSON and the markdown table of the stages done so far; returns the table."""
    lines = [f"## bench_train ({report['date']}, {report['device']}, {report['preset']})", "",
             "| stage | configuration | real tokens/s | pairs/s | real-token fraction | MFU | ratio |",
             "|---|---|---|---|---|---|---|"]
    for st in report["stages"]:
        key = "pairs_per_sec" if st["stage"] == "dpo" else "real_tokens_per_sec"
        for r in st["results"]:
            mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "n/a (CPU)"
            pairs = f"{r['pairs_per_sec']:.1f}" if "pairs_per_sec" in r else "-"
            ratio = f"{r[key] / st['results'][-1][key]:.2f}x"
            lines.append(f"| {st['stage']} (seq {st['seq_len']}) | {r['name']} | {r['real_tokens_per_sec']:.0f} | {pairs} "
                         f"| {r['real_token_fraction']:.3f} | {mfu} | {ratio} |")
    lines += ["", "ratio: against the last row of the stage (the baseline); dpo compares pairs/s.",
              "MFU: FLOPs by what is computed (bumblefast/flops.py step_flops) over the dense bf16 peak."]
    for st in report["stages"]:
        for r in st["results"]:
            if r.get("profile"):
                lines += profile_lines(f"{st['stage']}: {r['name']}", r["profile"])
    table = "\n".join(lines)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(table + "\n")
    return table


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stage", default="sft", choices=("sft", "pretrain", "dpo", "all"))
    p.add_argument("--data", default=None, help="input file for --stage (default: ../shared/data sample, else demo)")
    p.add_argument("--preset", default=None, help="model preset (default: tiny on CPU, bumblebee-1.5b on CUDA)")
    p.add_argument("--seq_len", type=int, default=2048)
    p.add_argument("--rows", type=int, default=1, help="packed rows per micro-batch (ours)")
    p.add_argument("--baseline_batch", type=int, default=4, help="samples per padded micro-batch (sft baseline)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--vocab", type=int, default=8192, help="size of the tokenizer trained on the data")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--quick", action="store_true", help="tiny sizes for CI")
    p.add_argument("--profile", action="store_true", help="torch.profiler summary of 2 steps of ours (pretrain/sft)")
    args = p.parse_args()

    device, dtype, preset, peak = device_setup(args.preset)
    cuda = device.type == "cuda"
    stages = ["pretrain", "sft", "dpo"] if args.stage == "all" else [args.stage]
    report = {
        "benchmark": "train",
        "date": date.today().isoformat(),
        "host": platform.node(),
        "device": torch.cuda.get_device_name(device) if cuda else f"cpu ({torch.get_num_threads()} threads)",
        "dtype": str(dtype).removeprefix("torch."),
        "preset": preset,
        "peak_tflops": peak,
        "stages": [],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"bench_train_{platform.node()}_{report['date']}"
    for stage in stages:  # each stage's results on disk as soon as it ends (a timeout keeps them)
        report["stages"].append(run_stage(stage, args, device, dtype, preset, peak))
        table = write_report(report, stem)
        print(f"wrote {stem}.json and .md ({len(report['stages'])}/{len(stages)} stages)", flush=True)
    print("\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
