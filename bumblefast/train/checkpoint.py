"""Checkpoints: output_dir/checkpoints/step-N/, written whole or not at all.

Layout of one checkpoint (a DeepSpeed tag folder plus ours):
  step-N/                DeepSpeed model + optimizer + scheduler state (any ZeRO stage),
                         zero_to_fp32.py
  step-N/trainer.json    step, loader state, config, metrics (rank 0)
  step-N/rng-rankR.pt    RNG states of each rank
  step-N/COMPLETE        file list with sizes, written last by rank 0
A checkpoint is first written as `.tmp-step-N` and renamed once COMPLETE exists (an older
`step-N` is renamed aside first and deleted after: shards/manifest.py `replace_dir`); `latest`
is replaced (atomically) after the rename. A folder without a valid COMPLETE is damaged:
resume says so and falls back to the one before.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from bumblefast.shards.manifest import replace_dir
from bumblefast.train import distributed as D

COMPLETE = "COMPLETE"
STEP_RE = re.compile(r"^step-(\d+)$")


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _file_list(folder: Path) -> dict[str, int]:
    return {
        str(p.relative_to(folder)): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != COMPLETE
    }


def save(engine, ckpt_root: Path, step: int, trainer_state: dict, total_limit: int) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint folder."""
    tmp_tag, tag = f".tmp-step-{step}", f"step-{step}"
    final = ckpt_root / tag
    if D.is_main():
        ckpt_root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(ckpt_root / tmp_tag, ignore_errors=True)
    D.barrier()
    engine.save_checkpoint(str(ckpt_root), tag=tmp_tag, save_latest=False)
    folder = ckpt_root / tmp_tag
    torch.save(_rng_state(), folder / f"rng-rank{D.rank()}.pt")
    D.barrier()
    if D.is_main():
        (folder / "trainer.json").write_text(json.dumps(trainer_state, indent=1))
        (folder / COMPLETE).write_text(json.dumps(_file_list(folder), indent=0))
        replace_dir(folder, final)
        latest_tmp = ckpt_root / "latest.tmp"
        latest_tmp.write_text(tag)
        os.replace(latest_tmp, ckpt_root / "latest")
        prune(ckpt_root, total_limit)
    D.barrier()
    return final


def prune(ckpt_root: Path, total_limit: int) -> None:
    """Keep the newest `total_limit` complete checkpoints (0 keeps all)."""
    if total_limit <= 0:
        return
    for old in complete_checkpoints(ckpt_root)[:-total_limit]:
        shutil.rmtree(old, ignore_errors=True)


def is_complete(folder: Path) -> tuple[bool, str]:
    marker = folder / COMPLETE
    if not marker.is_file():
        return False, "no COMPLETE marker (the save was interrupted)"
    try:
        expected = json.loads(marker.read_text())
    except json.JSONDecodeError:
        return False, "COMPLETE marker is unreadable"
    for name, size in expected.items():
        p = folder / name
        if not p.is_file():
            return False, f"missing {name}"
        if p.stat().st_size != size:
            return False, f"{name} has {p.stat().st_size} bytes, expected {size}"
    return True, ""


def complete_checkpoints(ckpt_root: Path) -> list[Path]:
    found = []
    if ckpt_root.is_dir():
        for p in ckpt_root.iterdir():
            m = STEP_RE.match(p.name)
            if m and p.is_dir() and is_complete(p)[0]:
                found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def find_resume(ckpt_root: Path, resume: str | None, log=print) -> Path | None:
    """`auto`: the newest complete checkpoint (warning about any damaged newer one);
    a path: that checkpoint, which must be complete."""
    if not resume:
        return None
    if resume != "auto":
        folder = Path(resume)
        ok, why = is_complete(folder)
        if not ok:
            raise FileNotFoundError(f"cannot resume from {folder}: {why}")
        return folder
    if not ckpt_root.is_dir():
        return None
    candidates = sorted(
        ((int(m.group(1)), p) for p in ckpt_root.iterdir() if (m := STEP_RE.match(p.name)) and p.is_dir()),
        reverse=True,
    )
    for _, folder in candidates:
        ok, why = is_complete(folder)
        if ok:
            return folder
        log(f"warning: checkpoint {folder} is damaged ({why}); trying the one before")
    return None


def load(engine, folder: Path) -> dict:
    """Restore engine, RNG and return trainer.json's state (collective)."""
    engine.load_checkpoint(
        str(folder.parent), tag=folder.name, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    rng = folder / f"rng-rank{D.rank()}.pt"
    if rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=False))
    return json.loads((folder / "trainer.json").read_text())
