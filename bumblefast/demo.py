"""`bumblefast demo`: the whole recipe on the bundled demo data, on CPU, in minutes.

Each step is a plain function of the demo folder; the run prints one summary table at the
end. The steps are the ones a user runs by hand (README), so the demo doubles as the
smoke test of the user-facing commands.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from bumblefast import config as C

ROOT = Path(__file__).resolve().parent.parent
DEMO_DATA = ROOT / "datasets" / "demo"
DEMO_CONFIGS = ROOT / "configs" / "demo"
TINY_PRESET = ROOT / "configs" / "models" / "bumblebee-tiny"
DEMO_VOCAB = 1024


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


def step_model(out: Path, seed: int) -> str:
    from bumblefast import flops
    from bumblefast.modelinfo import read_model_config

    cfg = read_model_config(TINY_PRESET)
    return f"bumblebee-tiny: {flops.param_count(cfg) / 1e6:.2f}M parameters"


STEPS: list[tuple[str, Callable[[Path, int], str]]] = [
    ("demo data", step_data),
    ("tokenizer", step_tokenizer),
    ("configs", step_configs),
    ("model", step_model),
]


def run_demo(out: str | Path = "demo_out", seed: int = 0) -> int:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, fn in STEPS:
        t0 = time.perf_counter()
        print(f"==> {name}", flush=True)
        result = fn(out, seed)
        rows.append((name, f"{time.perf_counter() - t0:.1f}s", result))
        print(f"    {result}", flush=True)
    widths = [max(len(r[i]) for r in rows + [("step", "time", "result")]) for i in range(3)]
    print("\nsummary")
    for row in [("step", "time", "result")] + rows:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)))
    print(f"\noutputs in {out.resolve()}")
    return 0
