"""`bumblefast plot OUTPUT_DIR`: PNG curves from a run's TensorBoard logs, like BumbleCore's
loss figures: loss, learning rate, grad norm, throughput; rewards and accuracy for dpo."""

from __future__ import annotations

from pathlib import Path

# figure name -> the TensorBoard tags drawn in it (absent tags are skipped)
FIGURES = {
    "loss.png": ["Train/Loss"],
    "learning_rate.png": ["Train/LearningRate"],
    "grad_norm.png": ["Train/GradNorm"],
    "throughput.png": ["Perf/TokensPerSec"],
    "rewards.png": ["Rewards/chosen", "Rewards/rejected", "Metrics/Margin"],
    "accuracy.png": ["Metrics/Accuracy"],
}


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logdir = run_dir / "tensorboard"
    if not logdir.is_dir():
        raise FileNotFoundError(f"no TensorBoard logs in {logdir} (was the run started with --use_tensorboard false?)")
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
    written = []
    for name, tags in FIGURES.items():
        present = [t for t in tags if scalars.get(t)]
        if not present:
            continue
        fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
        for tag in present:
            steps, values = zip(*scalars[tag])
            ax.plot(steps, values, label=tag, linewidth=1.5)
        ax.set_xlabel("optimizer step")
        ax.set_title(f"{run_dir.name}: {', '.join(present)}")
        ax.grid(alpha=0.3)
        if len(present) > 1:
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
