"""How much host memory this process has: /proc/meminfo (psutil where there is none), capped by the memory
cgroup it runs in (a container's limit). One reader for the learned merges' placement choice
(:mod:`divmerge_core.learned.memory`) and the worker's advertised capacity (``divmerge_worker.capacity``)."""

from __future__ import annotations

from pathlib import Path


def host_memory() -> tuple[int, int] | None:
    """(total, available) bytes: MemTotal and MemAvailable, each capped by the cgroup's limit and room;
    None when neither source can be read."""
    machine, cgroup = meminfo(), cgroup_memory()
    if machine is None or cgroup is None:
        return machine or cgroup
    return min(machine[0], cgroup[0]), min(machine[1], cgroup[1])


def meminfo() -> tuple[int, int] | None:
    """(MemTotal, MemAvailable) bytes of the machine (MemAvailable defaults to MemTotal)."""
    info: dict[str, int] = {}
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("MemTotal", "MemAvailable"):
                    info[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    if "MemTotal" in info:
        return info["MemTotal"], info.get("MemAvailable", info["MemTotal"])
    try:
        import psutil

        vm = psutil.virtual_memory()
        return int(vm.total), int(vm.available)
    except ImportError:
        return None


#: cgroup v1 writes "no limit" as a page-aligned 2^63 - 1
_V1_UNLIMITED = 1 << 62


def cgroup_memory(
    root: Path = Path("/sys/fs/cgroup"), self_cgroup: Path = Path("/proc/self/cgroup")
) -> tuple[int, int] | None:
    """(limit, available) bytes of the process's memory cgroup: available is the limit minus the usage, the
    reclaimable page cache (``inactive_file``) not counted as used, as ``docker stats`` counts it; None
    without a limit.

    cgroup v2 (``memory.max``) and v1 (``memory/memory.limit_in_bytes``), at the process's own cgroup path
    (from ``/proc/self/cgroup``) or at the mount root, which is the container's cgroup inside Docker."""
    paths: dict[str, str] = {}
    try:
        for line in self_cgroup.read_text(encoding="ascii").splitlines():
            _, controllers, path = line.split(":", 2)
            for c in controllers.split(",") if controllers else ["unified"]:
                paths[c] = path.lstrip("/")
    except (OSError, ValueError):
        pass
    v2 = [root / paths["unified"]] if "unified" in paths else []
    for d in (*v2, root):
        limit = _read_int(d / "memory.max")
        if limit is not None:
            return limit, max(0, limit - _used(d, "memory.current", "inactive_file"))
    v1 = [root / "memory" / paths["memory"]] if "memory" in paths else []
    for d in (*v1, root / "memory"):
        limit = _read_int(d / "memory.limit_in_bytes")
        if limit is not None and limit < _V1_UNLIMITED:
            return limit, max(0, limit - _used(d, "memory.usage_in_bytes", "total_inactive_file"))
    return None


def _read_int(path: Path) -> int | None:
    """The integer in a cgroup file; None when the file is missing, says ``max`` or is not a number."""
    try:
        return int(path.read_text(encoding="ascii").strip())
    except (OSError, ValueError):
        return None


def _used(d: Path, usage_file: str, inactive_key: str) -> int:
    used = _read_int(d / usage_file) or 0
    try:
        for line in (d / "memory.stat").read_text(encoding="ascii").splitlines():
            key, _, value = line.partition(" ")
            if key == inactive_key:
                return max(0, used - int(value))
    except (OSError, ValueError):
        pass
    return used
