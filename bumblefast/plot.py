"""`bumblefast plot OUTPUT_DIR`: PNG curves from a run's TensorBoard logs, like BumbleCore's
loss figures: loss, learning rate, grad norm, throughput; rewards, margins and accuracy for
dpo. A run folder with a `heldout.json` (`bumblefast demo` writes one per stage: held-out
numbers of the stage's final model) gets those numbers drawn as points at their step."""

from __future__ import annotations

from pathlib import Path

# figure name -> the TensorBoard tags drawn in it (absent tags are skipped)
FIGURES = {
    "loss.png": ["Train/Loss"],
    "learning_rate.png": ["Train/LearningRate"],
    "grad_norm.png": ["Train/GradNorm"],
    "throughput.png": ["Perf/TokensPerSec"],
    "rewards.png": ["Rewards/chosen", "Rewards/rejected", "Metrics/Margin"],
    "margins.png": ["Metrics/Margin"],
    "accuracy.png": ["Metrics/Accuracy"],
}
# figure name -> (heldout.json key, legend label) drawn as a point at heldout.json's "step"
HELDOUT_POINTS = {
    "loss.png": [("answer_nll", "held-out answer NLL per token")],
    "rewards.png": [("reward_margin", "held-out reward margin")],
    "margins.png": [("reward_margin", "held-out reward margin")],
    "accuracy.png": [
        ("reward_accuracy", "held-out reward accuracy"),
        ("preference_accuracy", "held-out preference accuracy"),
    ],
}


def read_heldout(run_dir: Path) -> dict:
    """The run's held-out numbers ({} when it has none); a bad file names itself."""
    import json

    path = run_dir / "heldout.json"
    if not path.is_file():
        return {}
    try:
        held = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from e
    if not isinstance(held, dict) or not isinstance(held.get("step"), int):
        raise ValueError(f"{path}: expected an object with an integer 'step'")
    return held


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logdir = run_dir / "tensorboard"
    if not logdir.is_dir():
        raise FileNotFoundError(f"no TensorBoard logs in {logdir} (was tensorboard left out of the run's --report_to?)")
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    scalars: dict[str, dict[int, float]] = {}
    for tag in acc.Tags()["scalars"]:
        # a resumed run appends to the same folder: the last value of a step wins
        scalars[tag] = {e.step: e.value for e in acc.Scalars(tag)}
    return {tag: sorted(points.items()) for tag, points in scalars.items()}


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir else run_dir / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    scalars = read_scalars(run_dir)
    held = read_heldout(run_dir)
    written = []
    for name, tags in FIGURES.items():
        present = [t for t in tags if scalars.get(t)]
        if not present:
            continue
        fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
        for tag in present:
            steps, values = zip(*scalars[tag])
            ax.plot(steps, values, label=tag, linewidth=1.5)
        points = [(key, label) for key, label in HELDOUT_POINTS.get(name, []) if key in held]
        for (key, label), marker in zip(points, "o*sD"):
            ax.plot([held["step"]], [held[key]], marker, markersize=9, label=f"{label}: {held[key]:.3g}")
        ax.set_xlabel("optimizer step")
        ax.set_title(f"{run_dir.name}: {', '.join(present)}")
        ax.grid(alpha=0.3)
        if len(present) + len(points) > 1:
            ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / name)
        plt.close(fig)
        written.append(out_dir / name)
    if not written:
        raise FileNotFoundError(
            f"{run_dir}: the TensorBoard logs hold none of {sorted({t for ts in FIGURES.values() for t in ts})}"
        )
    return written


def add_arguments(p) -> None:
    """`bumblefast plot`'s arguments."""
    p.add_argument("output_dir", help="a training run's --output_dir")
    p.add_argument("--out", default=None, help="folder for the PNGs (default: OUTPUT_DIR/plots)")
