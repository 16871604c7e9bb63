"""The steady C heap (``glinthawk.heap``): pinned glibc thresholds, and when they are not.

Each case runs in a fresh interpreter: the thresholds are process-wide and
:func:`~glinthawk_dask.heap.steady_heap` acts once per process.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                           reason="the thresholds are glibc's")

# A step's worth of activations: 24 tensors of 4 MiB live together, written, then freed.
# The steady heap serves them from the heap and keeps its 96 MiB free top for the next
# step.  glibc's adaptive thresholds (mmap: the largest mapping freed so far, trim: twice
# that; at most 32 and 64 MiB) give that top back to the kernel at the end of every step
# when it is the heap's top, so every step faults its pages in again: 490,880 faults in
# 20 steps, in about half the interpreters here.  Whether the freed blocks end the heap
# depends on where the interpreter's small allocations fell, so that count is not asserted.
_CHURN = """
import json, resource, sys, torch
from glinthawk_dask.heap import steady_heap
pinned = steady_heap()
again = steady_heap()
def cycle():
    live = [torch.empty(2**20) for _ in range(24)]
    for t in live:
        t.fill_(1.0)
    del live
for _ in range(3):
    cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    cycle()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"pinned": pinned, "again": again, "faults": faults}))
"""


def _churn(**env: str) -> dict:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES" and k != "DASK_GLINTHAWK__HEAP"}
    out = subprocess.run([sys.executable, "-c", _CHURN], env={**clean, **env}, capture_output=True, text=True,
                         timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc
def test_a_steady_heap_keeps_a_steps_freed_memory_for_the_next():
    steady = _churn()
    adaptive = _churn(DASK_GLINTHAWK__HEAP="glibc")
    assert steady["pinned"] and steady["again"]
    assert not adaptive["pinned"] and not adaptive["again"]
    assert steady["faults"] < 200  # 20 steps of 96 MiB: 24,544 pages each, were they mapped anew


@glibc
@pytest.mark.parametrize("env", [{"MALLOC_TRIM_THRESHOLD_": "1000000"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"}])
def test_the_environments_own_malloc_tunables_win(env):
    assert not _churn(**env)["pinned"]


def test_an_unknown_heap_mode_is_refused_with_the_choices():
    code = ("from glinthawk_dask.heap import steady_heap\n"
            "try:\n    steady_heap()\nexcept ValueError as e:\n    print(e)\n")
    env = {**os.environ, "DASK_GLINTHAWK__HEAP": "jemalloc"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         check=True)
    assert "glinthawk.heap must be one of steady, glibc, not 'jemalloc'" in out.stdout
