"""`bumblefast plot` draws a run's held-out numbers (heldout.json, written per demo stage) as
points on its curves, at the step they were measured."""

from __future__ import annotations

import json

import pytest


@pytest.fixture
def dpo_run(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(str(tmp_path / "tensorboard"))
    for step in range(1, 11):
        w.add_scalar("Train/Loss", 1.0 / step, step)
        w.add_scalar("Metrics/Margin", 0.1 * step, step)
        w.add_scalar("Metrics/Accuracy", 0.5 + 0.04 * step, step)
    w.close()
    return tmp_path


def drawn(monkeypatch):
    """Each saved figure's lines as {file name: [(label, xs, ys)]}."""
    from matplotlib.figure import Figure

    figures = {}

    def savefig(self, path, *a, **k):
        figures[path.name] = [(ln.get_label(), list(ln.get_xdata()), list(ln.get_ydata())) for ln in self.axes[0].lines]

    monkeypatch.setattr(Figure, "savefig", savefig)
    return figures


def test_heldout_points_on_the_curves(dpo_run, monkeypatch):
    from bumblefast.plot import plot_run

    held = {"step": 10, "answer_nll": 0.25, "reward_margin": 1.5, "reward_accuracy": 0.9, "preference_accuracy": 0.95}
    (dpo_run / "heldout.json").write_text(json.dumps(held))
    figures = drawn(monkeypatch)
    plot_run(dpo_run)
    points = {
        name: {(label.split(":")[0], x[0], y[0]) for label, x, y in lines if len(x) == 1}
        for name, lines in figures.items()
    }
    assert points["loss.png"] == {("held-out answer NLL per token", 10, 0.25)}
    assert points["margins.png"] == {("held-out reward margin", 10, 1.5)}
    assert points["accuracy.png"] == {("held-out reward accuracy", 10, 0.9), ("held-out preference accuracy", 10, 0.95)}
    curve = [ys for label, xs, ys in figures["margins.png"] if label == "Metrics/Margin"]
    assert curve and curve[0] == pytest.approx([0.1 * s for s in range(1, 11)])


def test_without_heldout_only_curves(dpo_run, monkeypatch):
    from bumblefast.plot import plot_run

    figures = drawn(monkeypatch)
    plot_run(dpo_run)
    assert all(len(x) == 10 for lines in figures.values() for _, x, _ in lines)


def test_bad_heldout_file_names_itself(dpo_run):
    from bumblefast.plot import plot_run

    (dpo_run / "heldout.json").write_text('{"step": "ten"}')
    with pytest.raises(ValueError, match="heldout.json.*integer 'step'"):
        plot_run(dpo_run)
