"""`bumblefast demo`: the whole recipe on the bundled demo data, on CPU, in minutes.

Each step is a plain function of the demo folder; the run prints one summary table at the
end. The steps are the ones a user runs by hand (README), so the demo doubles as the
smoke test of the user-facing commands.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bumblefast import config as C

ROOT = Path(__file__).resolve().parent.parent
DEMO_DATA = ROOT / "datasets" / "demo"
DEMO_CONFIGS = ROOT / "configs" / "demo"
# the tiny preset (configs/models/bumblebee-tiny) with untied embeddings and 8 heads of 32 (same
# parameters): tied, the digits' input embeddings collapse to one direction; with 4 heads of 64 the
# pretraining did not learn the sums on most seeds, so SFT had to, after a seed-dependent plateau
# (docs/LOG.md, issue 30)
DEMO_MODEL = DEMO_CONFIGS / "bumblebee-demo"
DEMO_VOCAB = 1024
DEMO_SEQ_LEN = 256
# One intra-op thread per training process: on 2 idle cores 2 threads pretrain 1.6x faster, but
# beside one other busy process they fall to 0.53x of 1 thread (each op waits on a descheduled
# sibling); benchmarks/bench_threads.py, docs/LOG.md.
DEFAULT_THREADS = 1


def torch_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def step_data(out: Path, seed: int) -> str:
    """The demo data ships in datasets/demo; regenerate it if a checkout lacks it."""
    if not (DEMO_DATA / "pretrain.json").is_file():
        import runpy

        runpy.run_path(str(ROOT / "datasets" / "make_demo.py"), run_name="make_demo")["write"](DEMO_DATA, seed)
    files = sorted(DEMO_DATA.glob("*.json"))
    return f"{len(files)} files in {DEMO_DATA.relative_to(ROOT)}"


def step_tokenizer(out: Path, seed: int) -> str:
    from bumblefast.tokenizer import train_tokenizer

    files = [DEMO_DATA / f for f in ("pretrain.json", "sft_alpaca.json", "sft_sharegpt.json", "dpo.json")]
    tok = train_tokenizer(files, DEMO_VOCAB, out / "tokenizer")
    return f"{len(tok)} tokens -> {out / 'tokenizer'}"


def step_configs(out: Path, seed: int) -> str:
    stages = []
    for path in sorted(DEMO_CONFIGS.glob("*.yaml")):
        cfg = C.load_train_config(yaml_path=str(path))
        stages.append(cfg.stage)
    return "resolved " + ", ".join(stages)


def step_prep(out: Path, seed: int) -> str:
    from bumblefast.prep.run import run_prep

    inputs = {
        "pretrain": ["pretrain.json"],
        "sft": ["sft_alpaca.json", "sft_sharegpt.json"],
        "dpo": ["dpo.json"],
        "pretrain_test": ["pretrain_test.json"],
    }
    done = []
    for name, files in inputs.items():
        stage = name.removesuffix("_test")
        cfg = C.PrepConfig(
            stage=stage,
            input=[str(DEMO_DATA / f) for f in files],
            tokenizer_name_or_path=str(out / "tokenizer"),
            seq_len=DEMO_SEQ_LEN // 2 if stage == "dpo" else DEMO_SEQ_LEN,  # dpo: per sequence, rows of 2x
            output_dir=str(out / "shards" / name),
            seed=seed,
            share_prompt=True,
        )  # dpo: each pair's prompt stored and computed once
        m = run_prep(cfg, progress=False)
        done.append(f"{name} {m['rows']} rows")
    return ", ".join(done)


def _train(out: Path, stage: str, extra: list[str]) -> dict:
    """`bumblefast train` as a user runs it; returns the run's summary numbers."""
    cmd = [
        sys.executable,
        "-m",
        "bumblefast",
        "train",
        "--yaml_config",
        str(DEMO_CONFIGS / f"{stage}.yaml"),
        "--output_dir",
        str(out / stage),
        "--dataset_path",
        str(out / "shards" / stage),
        "--seed",
        str(SETTINGS["seed"]),
        *extra,
    ]
    subprocess.run(cmd, check=True, env=_child_env())
    history = json.loads((out / stage / "training_metrics.json").read_text())
    speeds = [r["tokens_per_sec"] for r in history[1:]] or [history[-1]["tokens_per_sec"]]
    accs = [r["rewards/accuracies"] for r in history[-5:] if "rewards/accuracies" in r]
    return {
        "steps": history[-1]["step"],
        "tokens_per_sec": sum(speeds) / len(speeds),
        "loss": history[-1]["loss"],
        "accuracy": sum(accs) / len(accs) if accs else None,
    }  # dpo: rewards/accuracies, last 5 logs


def _evaluate(model_dir: Path, run_dir: Path, steps: int, reference: dict | None = None) -> dict:
    """Held-out numbers of a stage's model; `reference`: the model DPO started from (its
    held-out margins give DPO's implicit rewards). Written to run_dir/heldout.json, where
    `bumblefast plot` puts them on the curves at the stage's last step."""
    from bumblefast.evaluate import (
        answer_accuracy,
        completion_accuracy,
        load_records,
        preference_accuracy,
        reward_margins,
    )

    qa = answer_accuracy(model_dir, load_records(DEMO_DATA / "sft_test.json"))
    text = completion_accuracy(model_dir, sums())
    pref = preference_accuracy(model_dir, load_records(DEMO_DATA / "dpo_test.json"))
    result = {
        "answer_accuracy": qa["accuracy"],
        "answer_nll": qa["answer_nll"],
        "preference_accuracy": pref["preference_accuracy"],
        "preference_margin": pref["mean_margin"],
        "sum_accuracy": text["accuracy"],
        "sum_nll": text["nll"],
        "example": qa["examples"][0] if qa["examples"] else None,
    }
    if reference is not None:
        beta = C.load_train_config(yaml_path=str(DEMO_CONFIGS / "dpo.yaml")).pref_beta
        result.update(reward_margins(pref, reference, beta))
    (run_dir / "heldout.json").write_text(json.dumps({"step": steps, **result}, indent=2, ensure_ascii=False))
    return {**result, "_margins": pref["margins"]}


# sums(): every fact in pretraining's own format, "a + b = " -> "c": whether a stage's model knows the sums
# (the demo's pretraining often does not, and SFT then learns them from its examples; docs/LOG.md)
def sums() -> list[tuple[str, str]]:
    import runpy

    n = runpy.run_path(str(ROOT / "datasets" / "make_demo.py"))["MAX_OPERAND"]
    return [(f"{a} + {b} = ", str(a + b)) for a in range(n + 1) for b in range(n + 1)]


RESULTS: dict[str, dict] = {}
SETTINGS: dict[str, int] = {"seed": 0, "threads": 1}


def _child_env() -> dict[str, str]:
    """Each training/chat process runs with the demo's thread count (see run_demo)."""
    return dict(os.environ, OMP_NUM_THREADS=str(SETTINGS["threads"]), TOKENIZERS_PARALLELISM="false")


CHAT: dict = {}  # the closing chat's question, reply and whether it is right
MARGINS: dict[str, list[float]] = {}  # each stage's held-out log-prob margins, pair by pair


def _stage(out: Path, stage: str, extra: list[str], reference: str | None = None) -> str:
    """Train a stage, then score its model (dpo: the merged LoRA) on the held-out files."""
    r = _train(out, stage, extra)
    model_dir = out / stage
    if stage == "dpo":
        from bumblefast.merge_lora import merge_lora

        model_dir = out / "dpo_merged"
        merge_lora(out / "sft", out / "dpo", model_dir)
    ref = {"margins": MARGINS[reference]} if reference else None
    held = _evaluate(model_dir, out / stage, r["steps"], ref)
    MARGINS[stage] = held.pop("_margins")
    RESULTS[stage] = {**r, **held}
    return _row_text(RESULTS[stage])


def step_pretrain(out: Path, seed: int) -> str:
    return _stage(
        out, "pretrain", ["--tokenizer_name_or_path", str(out / "tokenizer"), "--model_name_or_path", str(DEMO_MODEL)]
    )


def step_sft(out: Path, seed: int) -> str:
    return _stage(out, "sft", ["--model_name_or_path", str(out / "pretrain")])


def step_dpo(out: Path, seed: int) -> str:
    return _stage(out, "dpo", ["--model_name_or_path", str(out / "sft")], reference="sft")


def step_chat(out: Path, seed: int) -> str:
    """One question through `bumblefast chat --prompt`, as a user would ask it."""
    from bumblefast.evaluate import is_correct, load_records

    question = load_records(DEMO_DATA / "sft_test.json")[0]
    prompt = question["instruction"] + ("\n" + question["input"] if question.get("input") else "")
    cmd = [
        sys.executable,
        "-m",
        "bumblefast",
        "chat",
        "--model_path",
        str(out / "dpo_merged"),
        "--prompt",
        prompt,
        "--temperature",
        "0",
        "--max_new_tokens",
        "16",
    ]
    reply = subprocess.run(cmd, check=True, capture_output=True, text=True, env=_child_env()).stdout.strip()
    CHAT.update(question=prompt, answer=reply, expected=question["output"])
    CHAT["correct"] = is_correct(reply, question["output"])
    return f"Q: {prompt!r} -> A: {reply!r} (expected {question['output']!r}, a held-out question)"


def step_plots(out: Path, seed: int) -> str:
    from bumblefast.plot import plot_run

    written = [p for stage in ("pretrain", "sft", "dpo") if (out / stage).is_dir() for p in plot_run(out / stage)]
    return f"{len(written)} PNGs in {out}/*/plots"


def _row_text(r: dict) -> str:
    text = (
        f"{r['steps']} steps, {r['tokens_per_sec']:.0f} tok/s, loss {r['loss']:.3f}, held-out answers "
        f"{r['answer_accuracy']:.0%} (NLL {r['answer_nll']:.3f}), held-out preferences "
        f"{r['preference_accuracy']:.0%} (margin {r['preference_margin']:.2f})"
    )
    if "reward_margin" in r:
        text += f", held-out reward margin {r['reward_margin']:.2f} (accuracy {r['reward_accuracy']:.0%})"
    return text


def step_model(out: Path, seed: int) -> str:
    from bumblefast import flops
    from bumblefast.modelinfo import read_model_config

    cfg = read_model_config(DEMO_MODEL)
    return (
        f"bumblebee-tiny, untied embeddings, {cfg['num_attention_heads']} heads: "
        f"{flops.param_count(cfg) / 1e6:.2f}M parameters"
    )


STEPS: list[tuple[str, Callable[[Path, int], str]]] = [
    ("demo data", step_data),
    ("tokenizer", step_tokenizer),
    ("configs", step_configs),
    ("model", step_model),
    ("prep", step_prep),
    ("pretrain", step_pretrain),
    ("sft", step_sft),
    ("dpo + merge", step_dpo),
    ("chat", step_chat),
    ("plots", step_plots),
]


def stage_table() -> str:
    head = (
        "stage",
        "steps",
        "tokens/s",
        "final loss",
        "answers",
        "answer NLL",
        "sums (text)",
        "preferences",
        "pref. margin",
        "reward margin (acc.)",
    )
    rows = [head] + [
        (
            name,
            str(r["steps"]),
            f"{r['tokens_per_sec']:.0f}",
            f"{r['loss']:.3f}",
            f"{r['answer_accuracy']:.0%}",
            f"{r['answer_nll']:.3f}",
            f"{r['sum_accuracy']:.0%}",
            f"{r['preference_accuracy']:.0%}",
            f"{r['preference_margin']:.2f}",
            f"{r['reward_margin']:.2f} ({r['reward_accuracy']:.0%})" if "reward_margin" in r else "-",
        )
        for name, r in RESULTS.items()
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows)


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (the training runs)."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def run_demo(out: str | Path = "demo_out", seed: int = 0, threads: int = DEFAULT_THREADS) -> int:
    """The whole recipe; `seed` seeds prep's packing and each stage's init/shuffle, `threads`
    is each training process's intra-op thread count (DEFAULT_THREADS says why)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    SETTINGS.update(seed=seed, threads=threads)
    torch_threads(threads)
    rows, t_start, cpu_start = [], time.perf_counter(), _cpu_seconds()
    for name, fn in STEPS:
        t0 = time.perf_counter()
        print(f"==> {name}", flush=True)
        result = fn(out, seed)
        rows.append((name, time.perf_counter() - t0, result))
        print(f"    {result}", flush=True)
    table = [("step", "time", "result")] + [(name, f"{t:.1f}s", result) for name, t, result in rows]
    widths = [max(len(r[i]) for r in table) for i in range(3)]
    print("\nsummary")
    for row in table:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)))
    if RESULTS:
        print(
            "\nstages, on held-out questions (never asked in SFT or DPO): answers right and the answer's"
            "\nNLL per token; preferences right and the mean log-prob margin chosen - rejected (nats);"
            "\nDPO's implicit reward margin beta * (margin - SFT's margin) and the pairs where it is > 0;"
            '\nsums (text): the 25 facts completed in pretraining\'s own format, "a + b = " -> the sum'
        )
        print(stage_table())
    run = {
        "seed": seed,
        "threads": threads,
        "wall_s": time.perf_counter() - t_start,
        "cpu_s": _cpu_seconds() - cpu_start,
        "step_seconds": {name: t for name, t, _ in rows},
    }
    (out / "summary.json").write_text(json.dumps({**RESULTS, "chat": CHAT, "run": run}, indent=2, ensure_ascii=False))
    print(f"\n{run['wall_s']:.0f} s ({run['cpu_s']:.0f} CPU-s); outputs in {out.resolve()}")
    return 0


def add_arguments(p) -> None:
    """`bumblefast demo`'s arguments."""
    p.add_argument("--out", default="demo_out", help="folder for everything the demo writes")
    p.add_argument("--seed", type=int, default=0, help="seeds packing, init and shuffle of every stage")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="intra-op threads per training process (default 1: steady when other work shares the cores)",
    )
