"""Peak memory of this process, resettable so that one phase (a v* batch, a benchmark cell) can be measured alone.

On CUDA: the allocator's peak. On Linux CPUs: the resident-set high-water mark (VmHWM), which writing "5" to
/proc/self/clear_refs resets to the current resident size. Elsewhere ru_maxrss, the whole process's peak (not
resettable).
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory in MiB since the last ``reset_peak_memory`` (or since the process started)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024 if sys.platform != "darwin" else rss / 2**20


def reset_peak_memory(device: torch.device) -> bool:
    """Start a new peak measurement; False where the platform cannot (the peak then stays the process's)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False
