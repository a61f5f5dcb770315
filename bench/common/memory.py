"""Whether a launch of N ranks fits in this machine's memory now, before it is started."""

from __future__ import annotations


def available_mib() -> float | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            info = dict(line.split(":", 1) for line in fh)
        return int(info["MemAvailable"].split()[0]) / 1024
    except (OSError, KeyError, ValueError):
        return None


def memory_shortfall(n: int, params: int, *, overhead_mib: float, bytes_per_param: float) -> str | None:
    """Why N ranks of ``params`` parameters, each taking ``overhead_mib`` plus ``bytes_per_param``
    per parameter (the benchmark's measured figures), would not fit in memory now, or None."""
    need = n * (overhead_mib + bytes_per_param * params / 2**20)
    have = available_mib()
    if have is not None and need > 0.9 * have:
        return f"{n} ranks of {params:,} parameters need about {need:,.0f} MiB, {have:,.0f} MiB available"
    return None
