"""Serving benchmark: requests/s of `bumblefast serve` with concurrent clients, batched vs one at a time.

    .venv/bin/python benchmarks/bench_serve.py [--size min|cpu|gpu] [--out benchmarks/results]
    (or `bumblefast bench serve`, which writes it into the combined report)

What is measured:
- the model: the tiny preset (configs/models/bumblebee-tiny), seeded random weights, with a
  byte-level BPE (vocab 1024) trained on datasets/demo; the rows of the three ChatML specials
  are zeroed, so no reply ends before its max_tokens (every request does the same work; each
  reply's usage is checked);
- the servers: real `bumblefast serve` processes on 127.0.0.1, OMP_NUM_THREADS=1, all started
  before the first round and idle while another is measured:
  baseline `--max_batch 1` (the old server: one generation at a time, the others wait),
  ours with the default `--max_batch 8` and (more than 8 clients) `--max_batch` = the clients;
  `--max_queue` and `--request_timeout` large enough that nothing is refused (a 429 or 504
  raises here);
- the load: `clients` threads, each sending `per_client` greedy chat completions of
  `max_tokens` tokens one after the other (a closed loop, like chat users), keep-alive
  connections; requests/s = all requests / wall seconds from the first send to the last reply;
- rounds interleaved (baseline, ours, ours-wide, rotating which goes first); the median round
  of each server is reported (its own requests and seconds), with the min-max of all rounds.

The machine's load average is recorded before and after: on a shared machine the absolute
numbers are measured under load, the ratios (same run, interleaved) are the claim.
Sizes: min (CI smoke: 4 clients x 1 request x 8 tokens, 1 round), cpu (20 clients x 2
requests x 16 tokens, 3 rounds; ~40 s on the 2-core machine), gpu = cpu (the same load on the CUDA device, bf16).
Writes `<out>/bench_serve_<host>_<date>.json` and `.md` (`_min` appended for size min).
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from harness import cli, compare, free_port, interleave, median_range, ratio_lines

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "datasets" / "demo"
TINY = ROOT / "configs" / "models" / "bumblebee-tiny"
SIZES = {
    "min": dict(clients=4, per_client=1, max_tokens=8, rounds=1),
    "cpu": dict(clients=20, per_client=2, max_tokens=16, rounds=3),
}
SIZES["gpu"] = SIZES["cpu"]
PROMPTS = [
    "What is 2 + 3?",
    "Name a bird.",
    "Write a sentence about rivers.",
    "Count to five.",
    "hi",
]


def build_model(workdir: Path) -> Path:
    """The tiny preset with seeded random weights and the demo tokenizer, saved in HF format."""
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from bumblefast.model import Bumblebee
    from bumblefast.tokenizer import train_tokenizer

    tok_dir, out = workdir / "tokenizer", workdir / "model"
    train_tokenizer([DEMO / f for f in ("pretrain.json", "sft_alpaca.json", "sft_sharegpt.json")], 1024, tok_dir)
    torch.manual_seed(0)
    model = Bumblebee(AutoConfig.from_pretrained(TINY), attn_backend="sdpa", kernels="reference").init_weights()
    with torch.no_grad():
        model.lm_head.weight[:3] = 0  # (tied) the ChatML specials are never the argmax: full-length replies
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tok_dir).save_pretrained(out)
    return out


class Server:
    """A `bumblefast serve` process on 127.0.0.1."""

    def __init__(self, model: Path, max_batch: int, max_queue: int, log: Path):
        self.port = free_port()
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONUNBUFFERED="1")
        env.pop("BUMBLEFAST_API_KEY", None)
        self.log = open(log, "w")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bumblefast",
                "serve",
                "--model_path",
                str(model),
                "--port",
                str(self.port),
                "--max_batch",
                str(max_batch),
                "--max_queue",
                str(max_queue),
                "--max_tokens_cap",
                "256",
                "--request_timeout",  # a throughput run: the baseline's queue may be long; no 504s
                "36000",
            ],
            cwd=ROOT,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 1800) -> None:
        end = time.time() + timeout
        while True:
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                c.request("GET", "/health")
                if c.getresponse().status == 200:
                    return
            except OSError:
                pass
            if self.proc.poll() is not None or time.time() > end:
                self.log.flush()
                tail = Path(self.log.name).read_text()[-2000:]
                raise RuntimeError(f"bench serve: the server did not come up within {timeout:.0f} s: {tail}")
            time.sleep(0.3)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def drive(port: int, clients: int, per_client: int, max_tokens: int) -> tuple[int, int, float]:
    """`clients` threads x `per_client` requests in a closed loop; (requests, tokens, wall seconds)."""
    barrier = threading.Barrier(clients + 1)
    tokens, errors = [0] * clients, []

    def client(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        barrier.wait()
        try:
            for j in range(per_client):
                body = json.dumps(
                    {
                        "messages": [{"role": "user", "content": PROMPTS[(i + j) % len(PROMPTS)]}],
                        "max_tokens": max_tokens,
                        "temperature": 0,
                    }
                )
                conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
                r = conn.getresponse()
                reply = json.loads(r.read())
                if r.status != 200 or reply["usage"]["completion_tokens"] != max_tokens:
                    raise RuntimeError(f"bench serve: unexpected reply {r.status}: {str(reply)[:300]}")
                tokens[i] += reply["usage"]["completion_tokens"]
        except Exception as e:  # noqa: BLE001 - re-raised in the main thread
            errors.append(e)
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return clients * per_client, sum(tokens), seconds


def serve_rounds(model: Path, configs: dict[str, int], cfg: dict, workdir: Path) -> dict[str, list[dict]]:
    """Every server started (all before the first round, idle while another is measured), then
    `rounds` interleaved rounds: per server label, each round's requests/s measurement."""
    from benchlib import measured

    clients = cfg["clients"]
    servers = {label: Server(model, mb, clients * 2, workdir / f"serve_{mb}.log") for label, mb in configs.items()}
    try:
        for s in servers.values():
            s.wait_ready()
        for s in servers.values():  # warm-up: first-call costs (allocator, lazy init) stay out of the rounds
            drive(s.port, 2, 1, cfg["max_tokens"])

        def run(label: str, r: int) -> dict:
            n, toks, secs = drive(servers[label].port, clients, cfg["per_client"], cfg["max_tokens"])
            return measured(label, n, secs, unit="requests/s", tokens=toks, round=r)

        return dict(zip(configs, interleave(list(configs), cfg["rounds"], run)))
    finally:
        for s in servers.values():
            s.close()


ROUND_KEYS, ROUND_OF = ("requests", "tokens", "seconds", "requests_per_s"), ("work", "tokens", "seconds", "value")


def median_run(label: str, runs: list[dict]) -> dict:
    """The rounds as one measurement: the median round's rate and the min-max, so a ratio
    carries its spread and verdict (each round serves the same requests)."""
    from benchlib import rounds

    (n,) = {m["work"] for m in runs}
    tokens = median_range(m["tokens"] for m in runs)[0]
    return rounds(label, n, [m["seconds"] for m in runs], unit="requests/s", tokens=tokens)


def bench(size: str, workdir: Path) -> dict:
    import torch
    from benchlib import point

    cfg = SIZES[size]
    clients = cfg["clients"]
    model = build_model(workdir)
    configs = {"one at a time (--max_batch 1)": 1, "batched (--max_batch 8, default)": 8}
    if clients > 8:
        configs[f"batched (--max_batch {clients})"] = clients
    load_start = os.getloadavg()[0]
    runs = serve_rounds(model, configs, cfg, workdir)
    load_end = os.getloadavg()[0]
    med = {label: median_run(label, runs[label]) for label in configs}
    labels = list(configs)
    ratios = [
        compare(
            f"requests/s, {clients} clients x {cfg['max_tokens']} tokens: {label} vs one at a time",
            med[label],
            med[labels[0]],
        )
        for label in reversed(labels[1:])
    ]
    cpus = os.cpu_count() or 1
    notes = [
        f"load average {load_start:.1f} at start, {load_end:.1f} at end on {cpus} CPUs"
        + (": measured under load (a shared machine)" if max(load_start, load_end) > cpus else "")
    ]
    results = {
        "rounds": {label: [dict(zip(ROUND_KEYS, (m[k] for k in ROUND_OF))) for m in runs[label]] for label in configs},
        "median_requests_per_s": {label: med[label]["value"] for label in configs},
        "min_max_requests_per_s": {label: list(median_range(m["value"] for m in runs[label])[1:]) for label in configs},
        "load_average_at_start": load_start,
        "load_average_at_end": load_end,
        "notes": notes,
    }
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = {"size": size, **cfg, "device": device, "model": "bumblebee-tiny (random weights)"}
    return {
        "config": {**config, "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
        "results": results,
        "ratios": ratios,
        "points": [point(f"serve {label}", m["tokens"] / m["seconds"]) for label, m in med.items()],
    }


def to_markdown(section: dict, host: str, day: str) -> str:
    r, c = section["results"], section["config"]
    md = [
        f"# bench_serve ({host}, {os.cpu_count()} CPUs, {c['device']}, {day}, size {c['size']})",
        "",
        f"{c['clients']} clients x {c['per_client']} requests x {c['max_tokens']} tokens, greedy, {c['model']}; "
        f"median of {c['rounds']} interleaved round(s)",
        "",
    ]
    md += [f"note: {n}" for n in r["notes"]]
    md += ["", "| server | requests/s (median) | min-max |", "|---|---:|---:|"]
    for label, v in r["median_requests_per_s"].items():
        lo, hi = r["min_max_requests_per_s"][label]
        md.append(f"| {label} | {v:.2f} | {lo:.2f}-{hi:.2f} |")
    md += ["", *ratio_lines(section["ratios"], "{:.2f}", unit=False)]
    return "\n".join(md) + "\n"


if __name__ == "__main__":
    sys.exit(cli("serve", __doc__, bench, to_markdown, SIZES))
