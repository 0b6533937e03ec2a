"""bumblefast.cpu_memory: a step's freed host memory is reused without page faults, and the user's own
allocator settings are left alone. Each measurement runs in a fresh process (the setting is
process-wide and cannot be undone)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bumblefast.cpu_memory import user_choice

PROBE = r"""
import json, resource, sys
import torch
from bumblefast.cpu_memory import keep_freed_memory
state = keep_freed_memory() if sys.argv[1] == "keep" else "default"
torch.manual_seed(0)
torch.set_num_threads(1)
# a training step's pattern: activations, their gradients and the weights' gradients, freed
# after each step; the [1024, 8192] fp32 output (32 MiB) is at glibc's largest mmap threshold
mlp = torch.nn.Sequential(torch.nn.Linear(512, 4096), torch.nn.SiLU(), torch.nn.Linear(4096, 8192))
x = torch.randn(1024, 512)
def faults_of_a_step():
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    mlp(x).logsumexp(-1).sum().backward()
    mlp.zero_grad(set_to_none=True)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
faults_of_a_step(); faults_of_a_step()  # first touches, and the heap growing to its size
print(json.dumps({"state": state, "faults": [faults_of_a_step() for _ in range(3)]}))
"""

PAGES_32MB = 32 * 2**20 // os.sysconf("SC_PAGE_SIZE")


def _probe(mode: str, **env) -> dict:
    ours = ("LD_PRELOAD", "GLIBC_TUNABLES", "BUMBLEFAST_KEEP_FREED_MEMORY")  # what user_choice reads
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k not in ours}
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], env={**clean, **env}, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_a_steps_freed_memory_is_reused_without_faulting_its_pages_again():
    default = _probe("default")
    kept = _probe("keep")
    assert kept["state"].startswith("freed memory kept"), kept
    # glibc's default maps the largest blocks afresh every step: at least the 32 MiB output and
    # its gradient fault in again each time
    assert min(default["faults"]) > 1.5 * PAGES_32MB, default
    assert sum(kept["faults"]) < 0.25 * sum(default["faults"]), (kept, default)


def test_users_allocator_settings_win():
    assert user_choice({}) is None
    assert user_choice({"MALLOC_ARENA_MAX": "2"}) == "MALLOC_ARENA_MAX is set"
    assert user_choice({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}) == "GLIBC_TUNABLES sets malloc"
    assert user_choice({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}) == "LD_PRELOAD has jemalloc"
    assert user_choice({"BUMBLEFAST_KEEP_FREED_MEMORY": "0"}) == "BUMBLEFAST_KEEP_FREED_MEMORY=0"
    assert user_choice({"GLIBC_TUNABLES": "glibc.pthread.rseq=0"}) is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_a_user_setting_leaves_malloc_unchanged():
    probe = _probe("keep", MALLOC_ARENA_MAX="4")
    assert probe["state"] == "malloc left as the user set it (MALLOC_ARENA_MAX is set)"
    assert min(probe["faults"]) > 1.5 * PAGES_32MB, probe
