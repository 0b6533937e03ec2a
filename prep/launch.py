"""`--num_nodes/--node_rank` from the launcher's environment, when the command line does not set them.

Checked in this order; the first that is set wins, and prep says which on one line:
- Slurm job array: `SLURM_ARRAY_TASK_COUNT` nodes, rank `SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN`
  (an array need not start at 0), e.g. `sbatch --array=0-7 prep.sh`;
- Slurm tasks of one job: `SLURM_NTASKS`, `SLURM_PROCID` (`srun -N 8 --ntasks-per-node 1`);
- torchrun: `WORLD_SIZE`, `RANK`;
- Kubernetes indexed Job: rank `JOB_COMPLETION_INDEX`; Kubernetes sets no count, so the count
  is `BUMBLEFAST_NUM_NODES` (set it in the pod template to the Job's `completions`) or
  `--num_nodes`; with neither, prep stops and says so.
An explicit `--num_nodes`/`--node_rank` (command line or YAML) always wins over the environment.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

from bumblefast.config import PrepConfig, UserError


def nodes_from_env(env: Mapping[str, str], num_nodes: int | None = None) -> tuple[int, int, str] | None:
    """(num_nodes, node_rank, which variables) from a launcher's environment, or None.
    `num_nodes`: the count the user gave (Kubernetes sets only the index)."""

    def num(name: str) -> int:
        try:
            return int(env[name])
        except ValueError:
            raise UserError(f"environment: {name}={env[name]!r} is not an integer") from None

    if "SLURM_ARRAY_TASK_COUNT" in env and "SLURM_ARRAY_TASK_ID" in env:
        low = num("SLURM_ARRAY_TASK_MIN") if "SLURM_ARRAY_TASK_MIN" in env else 0
        return (
            num("SLURM_ARRAY_TASK_COUNT"),
            num("SLURM_ARRAY_TASK_ID") - low,
            "Slurm job array (SLURM_ARRAY_TASK_COUNT, SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN)",
        )
    if "SLURM_NTASKS" in env and "SLURM_PROCID" in env:
        return num("SLURM_NTASKS"), num("SLURM_PROCID"), "Slurm tasks (SLURM_NTASKS, SLURM_PROCID)"
    if "WORLD_SIZE" in env and "RANK" in env:
        return num("WORLD_SIZE"), num("RANK"), "torchrun (WORLD_SIZE, RANK)"
    if "JOB_COMPLETION_INDEX" in env:
        if "BUMBLEFAST_NUM_NODES" not in env and num_nodes is not None:
            return num_nodes, num("JOB_COMPLETION_INDEX"), "Kubernetes indexed Job (--num_nodes, JOB_COMPLETION_INDEX)"
        if "BUMBLEFAST_NUM_NODES" not in env:
            raise UserError(
                "environment: JOB_COMPLETION_INDEX is set (a Kubernetes indexed Job) but the node count is not: "
                "set BUMBLEFAST_NUM_NODES to the Job's completions, or pass --num_nodes"
            )
        return (
            num("BUMBLEFAST_NUM_NODES"),
            num("JOB_COMPLETION_INDEX"),
            "Kubernetes indexed Job (BUMBLEFAST_NUM_NODES, JOB_COMPLETION_INDEX)",
        )
    return None


def apply_launcher_env(cfg: PrepConfig, given: set[str], env: Mapping[str, str] | None = None, log=print) -> PrepConfig:
    """`cfg` with num_nodes/node_rank from the environment unless the user set node_rank (`given`:
    the keys set on the command line or in YAML); a given num_nodes is kept (Kubernetes: the
    count). Logs one line saying where they came from."""
    env = os.environ if env is None else env
    if "node_rank" in given:
        return cfg
    found = nodes_from_env(env, cfg.num_nodes if "num_nodes" in given else None)
    if found is None:
        return cfg
    count, rank, source = found
    if "num_nodes" in given and count != cfg.num_nodes:
        raise UserError(f"num_nodes: {cfg.num_nodes} given, but the environment says {count} ({source})")
    log(f"prep: node {rank} of {count} (from {source})")
    return dataclasses.replace(cfg, num_nodes=count, node_rank=rank)
