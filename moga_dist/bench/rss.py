"""Per-process resident memory on Linux: the current RSS and the peak since a reset, read from
/proc/self/status (VmRSS, VmHWM) and reset through /proc/self/clear_refs ("5" resets VmHWM).

What the memory tests and `python -m moga_dist.bench memory` measure with: the peak RSS a phase
(a save, a load, some steps) reaches above the RSS it started from. RSS counts the pages a process
touched and still holds, so a tensor allocated and freed inside the phase shows in the peak; glibc
may keep small freed blocks, which `MALLOC_MMAP_THRESHOLD_` (set before the process starts) avoids
for every block of 128 KiB and more (see `STEADY_MALLOC`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import re

# Environment for a child process whose RSS is measured: blocks of >= 128 KiB are mmap'd and so
# returned to the OS when freed (glibc's dynamic threshold would otherwise grow to 32 MiB and keep
# freed tensors resident, hiding what a later phase allocates).
STEADY_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field} (not Linux?)")
    return int(match.group(1)) * 1024


def rss() -> int:
    """Bytes resident now."""
    return _status("VmRSS")


def peak() -> int:
    """Bytes resident at the highest point since the last `reset_peak` (or the process start)."""
    return _status("VmHWM")


def reset_peak() -> None:
    """Start a new peak at the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


@dataclasses.dataclass
class Phase:
    """RSS around one phase: `start` (bytes resident when it began, after a gc) and `peak`."""
    start: int = 0
    peak: int = 0

    @property
    def rise(self) -> int:
        """Bytes the phase added at its highest point over where it began."""
        return self.peak - self.start


@contextlib.contextmanager
def measure():
    """`with measure() as phase: ...` fills phase.start / phase.peak for the block."""
    gc.collect()
    phase = Phase(start=rss())
    reset_peak()
    try:
        yield phase
    finally:
        phase.peak = max(peak(), phase.start)
