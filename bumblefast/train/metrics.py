"""Observability on rank 0: tqdm bar, trackers (--report_to), training_metrics.json.

Every tracker gets the same scalars under the same names (BumbleCore's TensorBoard tags,
`TAGS`) at the same optimizer step, and the run config once, when its tracker run starts:

| tracker | where (settings) | config | on resume |
|---|---|---|---|
| tensorboard | output_dir/tensorboard | text `config` (YAML) | same folder; events after the checkpoint purged |
| wandb | output_dir/wandb (WANDB_PROJECT, WANDB_MODE) | run config | the same run (id in trackers.json) |
| mlflow | MLFLOW_TRACKING_URI (MLFLOW_EXPERIMENT_NAME) | run params | the same run |

wandb plots against a `step` metric (not its own `_step`), so a resume that rewinds to an
earlier checkpoint can log those steps again.

Throughput is measured over the optimizer steps since the last log; MFU divides the FLOPs
of the tokens actually trained (flops.train_flops on their document lengths) by the
device's dense bf16 peak times the world size. On CPU no peak is known: MFU is omitted
unless `peak_tflops` is set.
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from bumblefast import flops
from bumblefast.config import UserError

# TensorBoard tag of each metric key (BumbleCore's names where it had one).
TAGS = {
    "loss": "Train/Loss",
    "lr": "Train/LearningRate",
    "grad_norm": "Train/GradNorm",
    "skipped_steps": "Train/SkippedSteps",
    "tokens_per_sec": "Perf/TokensPerSec",
    "mfu": "Perf/MFU",
    "padding_fraction": "Perf/PaddingFraction",
    "rewards/chosen": "Rewards/chosen",
    "rewards/rejected": "Rewards/rejected",
    "rewards/margins": "Metrics/Margin",
    "rewards/accuracies": "Metrics/Accuracy",
    "logps/chosen": "LogPs/chosen",
    "logps/rejected": "LogPs/rejected",
    "logits/chosen": "Logits/chosen",
    "logits/rejected": "Logits/rejected",
}


def device_peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return float(override)
    if device.type == "cuda":
        return flops.peak_tflops(torch.cuda.get_device_name(device))
    return None


TRACKERS_STATE = "trackers.json"  # run ids of the wandb/mlflow runs, so a resumed run continues them
DEFAULT_PROJECT = "bumblefast"  # wandb project and mlflow experiment unless WANDB_PROJECT / MLFLOW_EXPERIMENT_NAME


class TensorBoardTracker:
    def __init__(self, output_dir: Path, start_step: int, run_name: str, config: dict, state: dict):
        import yaml
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(
            log_dir=str(output_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None
        )
        if not start_step:
            self.tb.add_text("config", "```yaml\n" + yaml.safe_dump(config, sort_keys=False) + "```", 0)

    def log(self, scalars: dict[str, float], step: int) -> None:
        for name, val in scalars.items():
            self.tb.add_scalar(name, val, step)
        self.tb.flush()

    def close(self) -> None:
        self.tb.close()


class WandbTracker:
    def __init__(self, output_dir: Path, start_step: int, run_name: str, config: dict, state: dict):
        import wandb

        resumed = "wandb" in state
        state.setdefault("wandb", uuid.uuid4().hex[:12])
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", DEFAULT_PROJECT),
            name=run_name,
            id=state["wandb"],
            resume="allow",
            dir=str(output_dir),
            config=None if resumed else config,
        )
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log({**scalars, "step": step})

    def close(self) -> None:
        self.run.finish()


class MlflowTracker:
    def __init__(self, output_dir: Path, start_step: int, run_name: str, config: dict, state: dict):
        from mlflow import get_tracking_uri as mlflow_uri
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        try:  # MLFLOW_TRACKING_URI, else mlflow's default (a sqlite file in the cwd, which needs full `mlflow`)
            self.client = MlflowClient()
        except Exception as e:  # MlflowException, or sqlalchemy missing under mlflow-skinny
            raise UserError(
                f"report_to mlflow: cannot open the tracking store {mlflow_uri()!r}: {e}\n"
                "Set MLFLOW_TRACKING_URI to a tracking server (http://...) or a file store (file:///path, with "
                "MLFLOW_ALLOW_FILE_STORE=true), or install the full `mlflow` package for its sqlite default."
            ) from e
        if "mlflow" in state:
            self.run_id = state["mlflow"]
            self.client.update_run(self.run_id, status="RUNNING")
            return
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_PROJECT)
        experiment = self.client.get_experiment_by_name(name)
        exp_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        self.run_id = state["mlflow"] = self.client.create_run(exp_id, run_name=run_name).info.run_id
        params = [Param(k, _param_value(v)) for k, v in config.items()]
        for i in range(0, len(params), 100):  # mlflow's per-call limit
            self.client.log_batch(self.run_id, params=params[i : i + 100])

    def log(self, scalars: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in scalars.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


TRACKERS = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "mlflow": MlflowTracker}


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 6000 else text[:5997] + "..."  # mlflow's value limit


def scalars_of(record: dict[str, Any]) -> dict[str, float]:
    """A log record as tracker scalars: TAGS names, finite numbers only, step dropped."""
    return {
        TAGS.get(k, k): float(v)
        for k, v in record.items()
        if k != "step" and isinstance(v, int | float) and math.isfinite(v)
    }


class MetricLogger:
    def __init__(
        self,
        *,
        output_dir: Path,
        total_steps: int,
        start_step: int,
        model_config,
        world: int,
        peak_tflops: float | None,
        report_to: list[str],
        enabled: bool,
        config: dict[str, Any] | None = None,
        run_name: str | None = None,
    ):
        self.enabled = enabled
        self.model_config = model_config
        self.peak = peak_tflops * 1e12 * world if peak_tflops else None
        self.history: list[dict] = []
        self.path = output_dir / "training_metrics.json"
        self._window_start = time.perf_counter()
        self._tokens = 0
        self._flops = 0.0
        self._capacity = 0
        if not enabled:
            return
        from tqdm.auto import tqdm

        if start_step and self.path.is_file():  # a resumed run keeps the history it had
            self.history = [r for r in json.loads(self.path.read_text()) if r["step"] <= start_step]
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)
        state_path = output_dir / TRACKERS_STATE
        state = json.loads(state_path.read_text()) if start_step and state_path.is_file() else {}
        name = run_name or output_dir.resolve().name
        self.trackers = [TRACKERS[t](output_dir, start_step, name, config or {}, state) for t in report_to]
        if state:
            state_path.write_text(json.dumps(state, indent=1))

    def count(self, num_tokens: float, row_capacity: float, train_flops: float) -> None:
        """Account one optimizer step's work, already summed over micro-batches and ranks."""
        self._tokens += num_tokens
        self._capacity += row_capacity
        self._flops += train_flops

    def step(self, step: int, values: dict[str, float], log: bool) -> None:
        if not self.enabled:
            return
        self.bar.update(1)
        if not log:
            return
        elapsed = max(time.perf_counter() - self._window_start, 1e-9)
        record = {"step": step, **values, "tokens_per_sec": self._tokens / elapsed}
        if self._capacity:
            record["padding_fraction"] = 1.0 - self._tokens / self._capacity
        if self.peak:
            record["mfu"] = self._flops / elapsed / self.peak
        self._window_start, self._tokens, self._flops, self._capacity = time.perf_counter(), 0, 0.0, 0
        self.history.append(record)
        scalars = scalars_of(record)
        for tracker in self.trackers:
            tracker.log(scalars, step)
        postfix = {
            "loss": f"{record.get('loss', float('nan')):.4f}",
            "lr": f"{record.get('lr', 0):.2e}",
            "tok/s": f"{record['tokens_per_sec']:.0f}",
        }
        if "rewards/accuracies" in record:
            postfix["acc"] = f"{record['rewards/accuracies']:.2f}"
        if "mfu" in record:
            postfix["mfu"] = f"{100 * record['mfu']:.1f}%"
        self.bar.set_postfix(postfix)
        self.save()

    def save(self) -> None:
        if self.enabled:
            tmp = self.path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(self.history, indent=1))
            tmp.replace(self.path)

    def close(self) -> None:
        if self.enabled:
            self.save()
            self.bar.close()
            for tracker in self.trackers:
                tracker.close()
