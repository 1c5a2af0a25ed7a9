"""What every benchmark here does before measuring (docs/benchmarking.md): glibc malloc settings that
stop large buffers from page-faulting on every step, and one core per rank."""

from __future__ import annotations

import os
import sys

MALLOC = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "17179869184"}


def reexec_with_malloc_env() -> None:
    """glibc reads these at process start: set them, then restart so this process and every
    process it starts run with them."""
    if all(os.environ.get(k) == v for k, v in MALLOC.items()):
        return
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC})


def pin_to_core(rank: int) -> int:
    """Pin this process to one core (returned); call it before creating a process group, so gloo's
    threads inherit the pinning."""
    cpus = sorted(os.sched_getaffinity(0))
    cpu = cpus[rank % len(cpus)]
    os.sched_setaffinity(0, {cpu})
    return cpu
