"""The measurement core of benchmarks/*.py: what every script times and compares the same way.

- `Side`: one configuration to time (its step, its batches, the work one round does);
- `interleave`: rounds in which every side runs once, in an order rotated per round (a busy
  moment or a cache effect hits each side alike);
- `compare`: ours vs a baseline, benchlib's ratio (its verdict: "within noise" when the two
  rounds' min-max ranges overlap) with the target it must reach, when it has one;
- `free_port`, `child_env`, `launcher` / `launch_train`: the processes the scripts start;
- `BenchServer`: a child that imports once and forks each timed run (bench_prep, bench_stream);
- the shared fixtures of bench_train and bench_shared_prompt (`prepare`, `model_config`, ...);
- `cli`: a script run on its own (`python benchmarks/bench_X.py --size ... --out ...`).

The report format (measured, rounds, ratio, verdict, check_section) is benchmarks/benchlib.py's:
`bumblefast bench` checks every section with it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from benchlib import median_range, ratio, timed_section

from bumblefast.train.distributed import free_port  # noqa: F401 (the scripts take it from here)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
SHARED = ROOT.parent / "shared" / "data"
DEMO = ROOT / "datasets" / "demo"

__all__ = ["median_range"]  # re-exported: the one median with its range (benchlib's)


@dataclasses.dataclass
class Side:
    """One configuration to time: its step, its batches (one round = all of them) and the work
    one round does (real tokens, tokens computed, pairs for DPO; ``work``: what its FLOPs are
    counted from, flops.row_flops: the document lengths plus the row's own LoRA rank,
    reference and shared-prompt kv_prefix). ``facts``: what the report says of it (attention,
    Liger, kernels) and helpers (``ref_step``); ``target``: the id of its target, if any."""

    name: str
    step: Callable | None
    batches: list
    real_tokens: int = 0
    computed_tokens: int = 0
    pairs: int | None = None
    work: dict = dataclasses.field(default_factory=dict)
    facts: dict = dataclasses.field(default_factory=dict)
    round_seconds: list = dataclasses.field(default_factory=list)
    target: str | None = None

    def with_(self, **changes: Any) -> Side:
        return dataclasses.replace(self, **changes)


def side(name, step, batches, real, computed, doc_lens, pairs=None, work=None, target=None, **facts) -> Side:
    """A Side whose FLOPs are a full training step over ``doc_lens`` (plus ``work``'s extras)."""
    return Side(name, step, batches, real, computed, pairs, {"doc_lens": doc_lens, **(work or {})}, facts, [], target)


def ref_side(name: str, policy: Side) -> Side:
    """The reference scoring of a precomputed-reference side, timed over the same batches: one
    forward of the base model per batch (no LoRA training, no backward)."""
    w = policy.work
    work = {"doc_lens": w["doc_lens"], "kv_prefix": w.get("kv_prefix"), "head_tokens": w.get("head_tokens")}
    work["forward_only"] = True
    # facts copied: its warm-up's step_peak_mb is its own, not written into the policy side's
    facts = dict(policy.facts)
    return policy.with_(name=name, step=policy.facts["ref_step"], work=work, facts=facts, target=None)


def combined(name: str, first: Side, then: Side) -> Side:
    """A side whose round is `first`'s round followed by `then`'s (reference scoring + policy
    steps over the same pairs: the end-to-end view of a precomputed reference); its FLOPs are
    both parts' (divided by both parts' time)."""
    secs = [a + b for a, b in zip(first.round_seconds, then.round_seconds)]
    return then.with_(name=name, round_seconds=secs, work={"parts": [first.work, then.work]}, target=None)


def sync(device) -> None:
    if device is not None and device.type == "cuda":
        import torch

        torch.cuda.synchronize()


def interleave(
    sides: list, rounds: int, run: Callable | None = None, device=None, rotate: bool = True, memory: bool = False
) -> list:
    """`rounds` rounds; in each, every side runs once, in an order rotated per round (`rotate`
    False: the same order every round). `run(side, r)` returns what a round of that side
    measured; returns one list per side (in `sides`' order). Without `run` (Side objects):
    one untimed warm-up step each (`memory`: its peak memory above the step's start, in
    side.facts["step_peak_mb"], see PeakMemory), then a round = all of a side's batches through
    its step, its seconds appended to side.round_seconds."""
    if run is None:
        for s in sides:
            warm_up(s, device, memory)
        sync(device)
        run = lambda s, r: s.round_seconds.append(time_round(s, device)) or s.round_seconds[-1]  # noqa: E731
    out: list[list] = [[] for _ in sides]
    for r in range(rounds):
        k = r % len(sides) if rotate else 0
        for i in list(range(k, len(sides))) + list(range(k)):
            out[i].append(run(sides[i], r))
    return out


def warm_up(s: Side, device=None, memory: bool = False) -> None:
    """A side's untimed warm-up step (its first batch); `memory`: that step's peak memory above
    its start in s.facts["step_peak_mb"] (PeakMemory). Clears the side's rounds."""
    with PeakMemory(device) if memory else contextlib.nullcontext() as peak:
        s.step(s.batches[0])
    if memory:
        s.facts["step_peak_mb"] = peak.mb
    s.round_seconds = []


class PeakMemory:
    """Peak memory of a block above its start, in MB: on CUDA max_memory_allocated (reset at
    the start); on CPU the process's resident set sampled every ms by a thread (RSS includes
    allocator caching: what the machine must hold, not only live tensors)."""

    def __init__(self, device=None):
        self.cuda = device is not None and device.type == "cuda"
        self.mb = 0.0

    def __enter__(self):
        import threading

        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
            return self
        # memory an earlier side freed goes back to the OS, so this side's growth shows in RSS
        # (without glibc it may hide in freed memory)
        from bumblefast.cpu_memory import return_freed_memory

        return_freed_memory()
        self._start = self._peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.001):
            self._peak = max(self._peak, _rss())

    def __exit__(self, *exc):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            self.mb = (torch.cuda.max_memory_allocated() - self._start) / 2**20
            return False
        self._stop.set()
        self._thread.join()
        self.mb = (max(self._peak, _rss()) - self._start) / 2**20
        return False


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


GEMM_LAYOUTS = ("forward", "input_grad", "weight_grad")  # a linear layer's three GEMMs in a step


class Gemm(NamedTuple):
    """A linear layer's GEMMs in a step: its [m, k] input and [n, k] weight, `count` times;
    `head`: the LM head's chunk, whose logits the fused head computes in its own layout."""

    m: int
    k: int
    n: int
    count: int
    head: bool = False


def gemm_sides(shapes: list[Gemm], device, dtype, reps: int = 1) -> list[Side]:
    """The machine's matmul rate at a model's own GEMMs, as one side per layout (GEMM_LAYOUTS:
    the forward x @ W.t(), the input gradient g @ W, the weight gradient g.t() @ x) timed in the
    same interleaved rounds as the training sides, so the ceiling is measured under the same
    conditions; gemm_rate reads the mix a row runs (a forward only, a frozen base's forward and
    input gradient, or all three). The head's chunk runs in the fused head's own layout
    (kernels.fused_linear.chunk_logits; its gradient has the logits' strides), so the ceiling is
    the product our step computes, not a slower layout of it. On CPU the ceiling a step's useful
    FLOPs are held against (on CUDA: MFU, the peak)."""
    import torch

    from bumblefast.kernels.fused_linear import chunk_logits

    def randn(*size):
        return torch.randn(*size, device=device, dtype=dtype)

    mats = []
    for s in shapes:
        x, w = randn(s.m, s.k), randn(s.n, s.k)
        g = torch.randn_like(chunk_logits(x, w, "torch")) if s.head else randn(s.m, s.n)
        mats.append((x, w, g, s.count, s.head))
    products = {
        "forward": lambda x, w, g, head: chunk_logits(x, w, "torch") if head else x @ w.t(),
        "input_grad": lambda x, w, g, head: g @ w,
        "weight_grad": lambda x, w, g, head: g.t() @ x,
    }
    flops = 2 * reps * sum(s.m * s.k * s.n * s.count for s in shapes)

    def side_of(layout: str) -> Side:
        product = products[layout]

        def step(_):
            for _ in range(reps):
                for x, w, g, count, head in mats:
                    for _ in range(count):
                        product(x, w, g, head)

        facts = {"shapes": [list(s) for s in shapes]}
        return Side(
            f"GEMM at the model's shapes, {layout}", step, [0], work={"flops": flops, "layout": layout}, facts=facts
        )

    return [side_of(layout) for layout in GEMM_LAYOUTS]


def gemm_rate(sides: list[Side], shares: dict[str, float]) -> dict:
    """GFLOP/s of the GEMM mix that puts `shares` of its FLOPs in each layout (a row's mix,
    layout -> fraction), from gemm_sides' rounds: per round the harmonic mix of the layouts'
    rates, then its median and range over the rounds."""
    by = {sd.work["layout"]: sd for sd in sides}
    per_round = [
        1 / sum(share * by[layout].round_seconds[i] / by[layout].work["flops"] for layout, share in shares.items())
        for i in range(len(sides[0].round_seconds))
    ]
    med, lo, hi = median_range(per_round)
    return {"gflops": med / 1e9, "range": [lo / 1e9, hi / 1e9]}


def gemm_summary(sides: list[Side]) -> dict:
    """The ceiling as the report keeps it: a full training step's mix (every layout alike),
    each layout's own rate, and the shapes."""
    every = gemm_rate(sides, dict.fromkeys(GEMM_LAYOUTS, 1 / len(GEMM_LAYOUTS)))
    layouts = {sd.work["layout"]: gemm_rate(sides, {sd.work["layout"]: 1.0}) for sd in sides}
    return {**every, "layouts": layouts, "shapes": sides[0].facts["shapes"]}


def model_gemm_shapes(cfg, tokens: int) -> list[Gemm]:
    """The linear layers of a step over `tokens` rows as (m, k, n, count): each decoder-layer
    linear of flops.linear_shapes once per layer, and the LM head in the CPU fused head's chunks
    of the full vocabulary (kernels.fused_linear.default_chunk_size)."""
    from bumblefast import flops
    from bumblefast.kernels.fused_linear import default_chunk_size

    h, layers, vocab = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    chunk = min(tokens, default_chunk_size(tokens, h, vocab, "cpu"))
    linears = [Gemm(tokens, i, o, layers) for i, o in flops.linear_shapes(cfg).values()]
    return linears + [Gemm(chunk, h, vocab, -(-tokens // chunk), head=True)]


def time_round(s: Side, device) -> float:
    """Seconds of one round: all of a side's batches through its step."""
    t0 = time.perf_counter()
    for b in s.batches:
        s.step(b)
    sync(device)
    return time.perf_counter() - t0


def compare(name: str, ours: dict, base: dict, target: float | None = None, **extra: Any) -> dict:
    """Ours vs one baseline (two measurements of this run): benchlib's ratio, its verdict
    ("within noise" when the rounds' min-max ranges overlap) and the target it must reach."""
    out = ratio(name, ours, base)
    if target is not None:
        out["target"] = target
    out.update(extra)
    return out


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo): the same host name has been an AMD EPYC and an Intel Xeon VM."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def child_env(**extra: str) -> dict:
    """A child process's environment: one thread, unbuffered output, DeepSpeed's compiled ops
    in the checkout's cache; `extra` set on top."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    return {**env, **extra}


def launcher(target: list[str], nproc: int = 1) -> list[str]:
    """`python TARGET...` (nproc 1), or torch.distributed.run with nproc processes on a free port."""
    if nproc <= 1:
        return [sys.executable, *target]
    run = ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(free_port())]
    return [sys.executable, *run, *target]


def launch_train(args: dict, nproc: int = 1) -> list[str]:
    """The command of `python -m bumblefast train --KEY VALUE ...` (torchrun for nproc > 1)."""
    return launcher(["-m", "bumblefast", "train"], nproc) + [x for k, v in args.items() for x in (f"--{k}", str(v))]


class BenchServer:
    """A child process that imports what the timed runs need once, then answers each JSON
    request written to its stdin with one JSON line on stdout, prefixed by `tag` (other output
    is ignored, or printed here with `echo`); bench_prep and bench_stream's children fork the
    timed runs themselves, so each starts fresh without paying the imports. Its stderr goes to
    `log`, whose tail is in the error when it dies."""

    def __init__(
        self, cmd: list[str], *, env: dict[str, str], log: Path, tag: str, name: str, cwd=None, echo: bool = False
    ):
        self.log, self.tag, self.name, self.echo = log, tag, name, echo
        self._err = log.open("w")
        pipe = subprocess.PIPE
        self.proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdin=pipe, stdout=pipe, stderr=self._err, text=True)

    def request(self, obj: Any) -> Any:
        """Send one request; the server's tagged answer."""
        self.proc.stdin.write(json.dumps(obj) + "\n")
        self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line.startswith(self.tag):
                return json.loads(line[len(self.tag) :])
            if self.echo:
                print(line, end="", flush=True)
        raise RuntimeError(f"{self.name} exited ({self.proc.wait()}):\n{self.log.read_text()[-3000:]}")

    def close(self) -> None:
        """End of input: the server exits (killed after 30 s)."""
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._err.close()


# ---------------------------------------------------------------- bench_train and bench_shared_prompt's fixtures


def prepare(
    data: Path, stage: str, seq_len: int, workdir: Path, vocab: int, share_prompt: bool = False, tokenizer=None
):
    """Tokenizer (`tokenizer`, a folder, or one of `vocab` tokens trained on the data) + the
    stage's shards; returns (tokenizer dir, shard dir). dpo: the unshared
    [prompt+chosen][prompt+rejected] layout unless share_prompt."""
    from bumblefast.tokenizer import train_tokenizer

    tok_dir = Path(tokenizer) if tokenizer else workdir / "tokenizer"
    if not tokenizer:
        train_tokenizer([data], vocab, tok_dir)
    return tok_dir, run_prep(data, stage, seq_len, tok_dir, workdir / stage, share_prompt)


def run_prep(data: Path, stage: str, seq_len: int, tok_dir: Path, out: Path, share_prompt: bool = False) -> Path:
    """`bumblefast prep` in process: the stage's shards of `data` in `out`."""
    from bumblefast.config import PrepConfig
    from bumblefast.prep.run import run_prep as prep

    cfg = PrepConfig(
        stage=stage,
        input=[str(data)],
        tokenizer_name_or_path=str(tok_dir),
        seq_len=seq_len,
        output_dir=str(out),
        share_prompt=share_prompt,
    )
    prep(cfg, progress=False)
    return out


def model_config(preset: str, vocab: int):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(ROOT / "configs" / "models" / preset)
    if preset.endswith("tiny"):
        cfg.vocab_size = max(cfg.vocab_size, -(-vocab // 64) * 64)
    return cfg


def autocast(device, dtype):
    import torch

    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


OPTIMIZERS = ("adamw", "sgd")


def make_optimizer(params, name: str = "adamw"):
    """Every side's optimizer, lr 1e-4: AdamW as users run it, or plain SGD where the sides'
    AdamW states do not fit in memory together (the 0.5B preset on a 24 GB CPU machine)."""
    import torch

    params = [p for p in params if p.requires_grad]
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")
    return torch.optim.AdamW(params, lr=1e-4) if name == "adamw" else torch.optim.SGD(params, lr=1e-4)


def objective_step(model, obj, device, dtype, optimizer: str = "adamw"):
    """The step of one of our sides: the objective's loss (under autocast for a low-precision
    dtype) over its global count, backward, the optimizer step over the trainable parameters."""
    opt = make_optimizer(model.parameters(), optimizer)

    def step(b):
        with autocast(device, dtype):
            loss, _ = obj(b)
        (loss / obj.count(b)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def device_setup(preset: str | None, peak_tflops: float | None = None):
    """(device, compute dtype, preset, dense bf16 peak TFLOPs or None): CUDA, bf16 and the 1.5B
    preset when there is a GPU, else CPU, fp32 and the tiny preset."""
    import torch

    from bumblefast import flops

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    preset = preset or ("bumblebee-1.5b" if cuda else "bumblebee-tiny")
    peak = flops.peak_tflops(torch.cuda.get_device_name(device), peak_tflops) if cuda else None
    if not cuda:  # as `bumblefast train` does on CPU; process-wide, so every side of a run gets it
        from bumblefast.cpu_memory import keep_freed_memory

        print(keep_freed_memory(), flush=True)
    if cuda and peak is None:
        print(
            f"MFU not reported: no dense bf16 peak for {torch.cuda.get_device_name(device)!r} in "
            "flops.PEAK_TFLOPS_BF16 (pass --peak_tflops; each row's flops_per_round is in the JSON)",
            flush=True,
        )
    return device, dtype, preset, peak


# ---------------------------------------------------------------- a script run on its own


def run_standalone(name: str, bench, to_markdown, size: str, out_dir: str) -> int:
    """A script run on its own: its section, then `<out>/bench_<name>_<host>_<date>
    [_<size>].json` and `.md` (the markdown also printed)."""
    import datetime
    import platform

    section = timed_section(name, bench, size)
    day, host = datetime.date.today().isoformat(), socket.gethostname()
    text = to_markdown(section, host, day)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"bench_{name}_{host}_{day}{'' if size == 'cpu' else '_' + size}"
    meta = {"date": day, "host": host, "python": platform.python_version()}
    stem.with_suffix(".json").write_text(json.dumps({**meta, **section}, indent=2, default=str) + "\n")
    stem.with_suffix(".md").write_text(text)
    print(text)
    print(f"written: {stem}.json, .md ({section['seconds']:.1f}s)")
    return 0


def ratio_lines(ratios: list[dict], fmt: str = "{:,.0f}", unit: bool = True, note: str = "verdict") -> list[str]:
    """A standalone report's table of ratios: ours, the baseline (their values as `fmt`, with
    their unit) and the ratio, with the ratio's `note` (its verdict or caveat) when it has one."""
    value = lambda m: fmt.format(m["value"]) + (f" {m['unit']}" if unit else "")  # noqa: E731
    lines = ["| ratio | ours | baseline | ratio |", "|---|---:|---:|---:|"]
    for x in ratios:
        extra = f" ({x[note]})" if x.get(note) else ""
        lines.append(f"| {x['name']} | {value(x['ours'])} | {value(x['baseline'])} | {x['value']:.2f}x{extra} |")
    return lines


def cli(name: str, doc: str, bench, to_markdown, sizes, argv=None, hidden: dict | None = None, **options) -> int:
    """`python benchmarks/bench_<name>.py [--size S] [--out DIR]`: run_standalone. `hidden`:
    a flag -> the function it runs instead (a script's own child processes: `--serve`);
    `options`: more flags, flag -> its default (an int), passed to `bench` by name."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--size", default="cpu", choices=sorted(sizes))
    for flag in hidden or {}:
        p.add_argument(f"--{flag}", action="store_true", help=argparse.SUPPRESS)
    for flag, default in options.items():
        p.add_argument(f"--{flag}", type=type(default), default=default)
    args = p.parse_args(argv)
    for flag, fn in (hidden or {}).items():
        if getattr(args, flag):
            return fn()
    kw = {flag: getattr(args, flag) for flag in options}
    return run_standalone(name, lambda size, work: bench(size, work, **kw), to_markdown, args.size, args.out)
