"""The machine a figure or a timing was made on, as the docs name it."""

import os
import platform


def cpu_name():
    """`"2-core AMD EPYC 9B14 CPU"`: the cores Python sees and the CPU's model name."""
    try:
        with open("/proc/cpuinfo") as handle:
            name = next(line.split(":", 1)[1].strip()
                        for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor() or "unknown"
    return f"{os.cpu_count()}-core {name} CPU"
