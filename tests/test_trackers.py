"""--report_to: one tiny training run reports to TensorBoard, wandb (offline) and MLflow (a file
store), and each tracker's own reader gives back the same loss / lr / grad-norm series under
the same names, plus the run config logged once."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
from helpers import ROOT, TINY, subprocess_env, train_command

from bumblefast.config import ConfigError, TrainConfig, build_config, parse_cli_overrides, trackers

SERIES = ("Train/Loss", "Train/LearningRate", "Train/GradNorm")


def read_tensorboard(out: Path) -> tuple[dict[str, dict[int, float]], list[str]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    scalars = {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}
    texts = [e.tensor_proto.string_val[0].decode() for e in acc.Tensors("config/text_summary")]
    return scalars, texts


def read_wandb(out: Path) -> tuple[dict[str, dict[int, float]], dict]:
    """The offline run's transaction log (.wandb) through wandb's own reader, `wandb leet inspect --json`."""
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    cmd = [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_dir)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=subprocess_env(WANDB_SILENT="true"))
    assert res.returncode == 0, res.stderr
    series: dict[str, dict[int, float]] = {}
    config: dict = {}
    for line in res.stdout.splitlines():
        rec = json.loads(line)
        if rec["type"] == "history":
            row = rec["history"]["item"]
            for name, val in row.items():
                if not name.startswith("_") and name != "step":
                    series.setdefault(name, {})[row["step"]] = val
        elif rec["type"] in ("run", "config"):
            update = (rec["run"] if rec["type"] == "run" else rec).get("config", {}).get("update", {})
            update = {k: v for k, v in update.items() if not k.startswith("_")}  # wandb's own bookkeeping
            assert not set(update) & set(config), f"config keys logged twice: {set(update) & set(config)}"
            config.update(update)
    return series, config


def read_mlflow(store: Path) -> tuple[dict[str, dict[int, float]], dict[str, str]]:
    from mlflow.tracking import MlflowClient

    with mock.patch.dict(os.environ, {"MLFLOW_ALLOW_FILE_STORE": "true"}):
        client = MlflowClient(tracking_uri=store.as_uri())
        (run,) = client.search_runs([client.get_experiment_by_name("bumblefast").experiment_id])
        metrics = {name: client.get_metric_history(run.info.run_id, name) for name in run.data.metrics}
    return {name: {m.step: m.value for m in hist} for name, hist in metrics.items()}, run.data.params


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, demo_tokenizer_dir):
    """4 optimizer steps of the tiny model, logging every step to all three trackers."""
    from bumblefast.config import PrepConfig
    from bumblefast.prep.run import run_prep

    root = tmp_path_factory.mktemp("trackers")
    docs = json.loads((ROOT / "datasets/demo/pretrain.json").read_text())[:40]
    raw = root / "pretrain.jsonl"
    raw.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs))
    shards = root / "shards"
    prep = PrepConfig(stage="pretrain", input=[str(raw)], tokenizer_name_or_path=str(demo_tokenizer_dir), seq_len=64)
    run_prep(dataclasses.replace(prep, output_dir=str(shards)), progress=False)
    out, mlruns = root / "run", root / "mlruns"
    # a child process: wandb and mlflow start services and keep global state
    cmd = train_command(
        "pretrain",
        model_name_or_path=TINY,
        tokenizer_name_or_path=demo_tokenizer_dir,
        dataset_path=shards,
        output_dir=out,
        cutoff_len=64,
        train_micro_batch_size_per_gpu=2,
        gradient_accumulation_steps=1,
        max_steps=4,
        warmup_ratio=0.5,
        learning_rate=3e-3,
        report_to="tensorboard,wandb,mlflow",
        run_name="tracked",
    )
    env = subprocess_env(
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        WANDB_CACHE_DIR=root / "wc",
        MLFLOW_TRACKING_URI=mlruns.as_uri(),
        MLFLOW_ALLOW_FILE_STORE="true",  # mlflow 3.x keeps its file store only on request
    )
    env.pop("WANDB_PROJECT", None)
    env.pop("MLFLOW_EXPERIMENT_NAME", None)
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-5000:]
    logged = {r["step"]: r for r in json.loads((out / "training_metrics.json").read_text())}
    return out, mlruns, logged


def test_every_tracker_has_the_same_series(tracked_run):
    out, mlruns, logged = tracked_run
    tb, _ = read_tensorboard(out)
    wb, _ = read_wandb(out)
    ml, _ = read_mlflow(mlruns)
    key = {"Train/Loss": "loss", "Train/LearningRate": "lr", "Train/GradNorm": "grad_norm"}
    for name in SERIES:
        want = {step: r[key[name]] for step, r in logged.items()}
        assert sorted(want) == [1, 2, 3, 4]
        assert len(set(want.values())) > 1, f"{name}: a constant series would not show a mix-up"
        assert wb[name] == want, name  # float64 end to end
        assert ml[name] == want, name
        assert tb[name] == pytest.approx(want, rel=1e-6), name  # TensorBoard stores float32
    # the same names everywhere: every scalar TensorBoard has, wandb and mlflow have too
    assert set(tb) == set(wb) == set(ml)
    assert {"Train/Loss", "Perf/TokensPerSec"} <= set(tb)


def test_config_is_logged_once_per_tracker(tracked_run):
    out, mlruns, _ = tracked_run
    _, texts = read_tensorboard(out)
    assert len(texts) == 1 and "learning_rate: 0.003" in texts[0] and "run_name: tracked" in texts[0]
    _, wconfig = read_wandb(out)
    assert wconfig["learning_rate"] == 0.003 and wconfig["report_to"] == [
        "tensorboard",
        "wandb",
        "mlflow",
    ]
    _, params = read_mlflow(mlruns)
    assert params["learning_rate"] == "0.003" and params["stage"] == "pretrain"
    assert json.loads(params["report_to"]) == ["tensorboard", "wandb", "mlflow"]
    assert json.loads((out / "trackers.json").read_text()).keys() == {"wandb", "mlflow"}


def parse(*argv: str) -> TrainConfig:
    return build_config(TrainConfig, cli_values=parse_cli_overrides(list(argv), TrainConfig))


def test_report_to_keys():
    assert trackers(parse()) == ["tensorboard"]
    assert trackers(parse("--report_to", "wandb,mlflow")) == ["wandb", "mlflow"]
    assert trackers(parse("--report_to", "none")) == []
    assert trackers(parse("--report_to", "tensorboard,wandb", "--use_tensorboard", "false")) == ["wandb"]
    assert trackers(build_config(TrainConfig, {"report_to": ["mlflow", "tensorboard"]})) == ["mlflow", "tensorboard"]
    with pytest.raises(ConfigError, match=r"'none' cannot be combined"):
        parse("--report_to", "none,wandb")
    with pytest.raises(ConfigError, match=r"--report_to: must be one of tensorboard\|wandb\|mlflow\|none.*'wandb'"):
        parse("--report_to", "wanbd")


def test_report_to_a_missing_package_names_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(
        ConfigError, match=r"report_to: mlflow needs the mlflow package: pip install 'bumblefast\[mlflow\]'"
    ):
        parse("--report_to", "tensorboard,mlflow")


def test_mlflow_without_a_usable_store_says_what_to_set(tmp_path, monkeypatch):
    from bumblefast.config import UserError
    from bumblefast.train.metrics import MlflowTracker

    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises(
        UserError, match=r"(?s)report_to mlflow: cannot open the tracking store .*Set MLFLOW_TRACKING_URI"
    ):
        MlflowTracker(tmp_path, 0, "run", {}, {})
