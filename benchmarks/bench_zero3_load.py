"""Host memory per rank while a ZeRO-3 run loads a Hugging Face checkpoint (SFT/DPO start).

    .venv/bin/python benchmarks/bench_zero3_load.py [--size min|cpu] [--rounds 2] [--out benchmarks/results]

What runs: a random bumblebee-shaped model saved in HF format (safetensors), then, in fresh
`python -m torch.distributed.run --nproc_per_node 2` worlds (gloo, 1 thread per process), each
rank loads it and builds the ZeRO-3 engine (configs/deepspeed/ds_z3.json, torch AdamW) in one
of two ways:
  full         the former path: `Bumblebee.from_pretrained` (the whole fp32 model on every
               rank), then `deepspeed.initialize` partitions it;
  partitioned  the trainer's path now (bumblefast.train.build.load_partitioned): the model
               is built under `deepspeed.zero.Init` (each rank allocates its partition only) and
               the checkpoint is copied in one tensor at a time (rank 0 reads it memory-mapped,
               GatheredParameters hands each rank its part), transformers' way under ZeRO-3.
Rounds alternate the two (full, partitioned, full, ...).

Measured per rank with Linux's peak resident set (VmHWM, reset through /proc/self/clear_refs
just before the load, after imports and the process group): the peak growth during the load
(`load_peak_mb`) and through engine construction (`engine_peak_mb`), in MB over the resident
size before the load. The model's fp32 size is the reference: `full` needs at least one whole
copy per rank, `partitioned` about 1/world of it plus the largest tensor (rank 0 also maps the
file: its page cache counts once read). Median and min-max over rounds per mode and rank.

Writes `<out>/bench_zero3_load_<host>_<date>.json` and `.md` (`_<size>` for sizes other than cpu).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from harness import child_env, cli, interleave, launcher, median_range

ROOT = Path(__file__).resolve().parent.parent
SHAPE = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
)
SIZES = {  # Qwen2 shapes; the vocab is Qwen2's order of magnitude (its embedding is the largest tensor)
    "min": dict(zip(SHAPE, (256, 704, 4, 4, 2, 16384))),
    "cpu": dict(zip(SHAPE, (1024, 2816, 12, 16, 4, 32768))),
}
MODES = ("full", "partitioned")


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def worker(mode: str, model_dir: str, result: str) -> None:
    """One rank: load the checkpoint `mode`'s way, build the ZeRO-3 engine, report memory."""
    import deepspeed
    import torch
    from transformers import AutoConfig

    from bumblefast.config import TrainConfig
    from bumblefast.model import Bumblebee
    from bumblefast.train import distributed as D
    from bumblefast.train.build import load_partitioned
    from bumblefast.train.engine import deepspeed_config

    torch.set_num_threads(1)
    device = D.init()
    config = AutoConfig.from_pretrained(model_dir)
    cfg = TrainConfig(
        deepspeed_config_path=str(ROOT / "configs/deepspeed/ds_z3.json"),
        train_micro_batch_size_per_gpu=1,
        gradient_accumulation_steps=1,
    )
    ds = deepspeed_config(cfg, device, config.hidden_size)
    D.barrier()
    before = _status_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    kw = dict(attn_backend="sdpa", kernels="reference")
    if mode == "full":
        model = Bumblebee.from_pretrained(model_dir, torch_dtype=torch.float32, **kw)
    else:
        model = load_partitioned(Path(model_dir), config, ds, **kw)
    load_peak = _status_mb("VmHWM") - before
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    deepspeed.initialize(model=model, optimizer=opt, config=ds, dist_init_required=False)
    engine_peak = _status_mb("VmHWM") - before
    rows = D.all_gather_object(
        {
            "rank": D.rank(),
            "load_peak_mb": load_peak,
            "engine_peak_mb": engine_peak,
            "after_mb": _status_mb("VmRSS") - before,
        }
    )
    if D.is_main():
        Path(result).write_text(json.dumps(rows))


def save_model(size: str, out: Path) -> float:
    """A seeded random model of this size in HF format; returns its fp32 size in MB."""
    import torch
    from transformers import AutoConfig

    from bumblefast.model import Bumblebee

    config = AutoConfig.from_pretrained(ROOT / "configs" / "models" / "bumblebee-tiny")
    for key, value in SIZES[size].items():
        setattr(config, key, value)
    config.head_dim = config.hidden_size // config.num_attention_heads
    torch.manual_seed(0)
    model = Bumblebee(config, attn_backend="sdpa", kernels="reference").init_weights()
    model.save_pretrained(out)
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()) * 4 / 2**20


def launch(mode: str, model_dir: Path, work: Path, nproc: int) -> list[dict]:
    result = work / f"{mode}.json"
    cmd = launcher([__file__, "--worker", mode, str(model_dir), str(result)], nproc)
    res = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=1200)
    if res.returncode != 0:
        raise RuntimeError(f"{mode} failed:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}")
    return json.loads(result.read_text())


def bench(size: str, work: Path, rounds: int = 2, nproc: int = 2) -> dict:
    model_dir = work / "model"
    model_mb = save_model(size, model_dir)
    run = lambda mode, r: launch(mode, model_dir, work, nproc)  # noqa: E731
    runs = dict(zip(MODES, interleave(list(MODES), rounds, run, rotate=False)))  # full, partitioned, full, ...
    summary = {}
    for mode in MODES:
        for rank in range(nproc):
            for key in ("load_peak_mb", "engine_peak_mb"):
                med, lo, hi = median_range(r[rank][key] for r in runs[mode])
                summary[f"{mode}/rank{rank}/{key}"] = {"median": med, "min": lo, "max": hi}
    return {
        "size": size,
        "world": nproc,
        "rounds": rounds,
        "model_fp32_mb": model_mb,
        "shape": SIZES[size],
        "runs": runs,
        "summary": summary,
    }


def to_markdown(section: dict, host: str, day: str) -> str:
    lines = [
        f"# ZeRO-3 checkpoint load: host memory per rank ({host}, {day})",
        "",
        f"Model {section['model_fp32_mb']:.0f} MB in fp32 ({section['shape']}), world {section['world']}, "
        f"{section['rounds']} interleaved rounds; MB over the resident size before the load, median (min-max).",
        "",
        "| mode | rank | peak during load | peak through engine init |",
        "|---|---|---|---|",
    ]
    s = section["summary"]
    for mode in MODES:
        for rank in range(section["world"]):
            cells = []
            for key in ("load_peak_mb", "engine_peak_mb"):
                v = s[f"{mode}/rank{rank}/{key}"]
                cells.append(f"{v['median']:.0f} ({v['min']:.0f}-{v['max']:.0f})")
            lines.append(f"| {mode} | {rank} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:  # one rank, under torch.distributed.run
        sys.exit(worker(*sys.argv[2:5]) or 0)
    sys.exit(cli("zero3_load", __doc__, bench, to_markdown, SIZES, rounds=2))
