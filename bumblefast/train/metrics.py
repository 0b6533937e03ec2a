"""Observability on rank 0: tqdm bar, TensorBoard (BumbleCore's tags), training_metrics.json.

Throughput is measured over the optimizer steps since the last log; MFU divides the FLOPs
of the tokens actually trained (flops.train_flops on their document lengths) by the
device's dense bf16 peak times the world size. On CPU no peak is known: MFU is omitted
unless `peak_tflops` is set.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from bumblefast import flops

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


class MetricLogger:
    def __init__(
        self,
        output_dir: Path,
        total_steps: int,
        start_step: int,
        model_config,
        world: int,
        peak_tflops: float | None,
        use_tensorboard: bool,
        enabled: bool,
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
        self.tb = None
        if use_tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(
                log_dir=str(output_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None
            )

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
        if self.tb is not None:
            for key, val in record.items():
                if key != "step" and val is not None and math.isfinite(val):
                    self.tb.add_scalar(TAGS.get(key, key), val, step)
            self.tb.flush()
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
            if self.tb is not None:
                self.tb.close()
