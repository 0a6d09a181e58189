"""What this machine offers the process: the cores it may run on."""

from __future__ import annotations

import os


def cpu_count() -> int:
    """The cores this process may run on (its affinity mask where the OS has one), at least 1."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1
