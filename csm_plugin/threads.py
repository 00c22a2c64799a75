"""How many CPU threads torch should use: the cores this process may actually run on.

torch's default is one thread per core of the machine. In a container limited to 2 CPUs on a
64-core host, or on a small machine shared with other jobs, that oversubscribes the cores: every
op waits for threads that are not running, and a frame can take 10x longer. The default here is
the CPUs available to the process (its affinity mask, capped by a cgroup CPU quota when one is
set), unless told otherwise:

    --threads N  >  $CSM_THREADS  >  $OMP_NUM_THREADS  >  available_cpus()

`csm-plugin speak`, `demo`, `bench` and `serve` (`--threads`, alias `--torch-threads`) use
`configure_threads`; so do the examples.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path

from .errors import InputError

log = logging.getLogger(__name__)

ENV = "CSM_THREADS"


def _cgroup_quota(root: Path, self_cgroup: Path) -> float | None:
    """CPUs allowed by a cgroup quota (v2 cpu.max or v1 cfs quota/period), None if unlimited."""
    candidates: list[Path] = []
    try:
        for line in self_cgroup.read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            rel = path.lstrip("/")
            if controllers == "":  # cgroup v2
                candidates.append(root / rel / "cpu.max")
            elif "cpu" in controllers.split(","):  # cgroup v1
                for mount in ("cpu,cpuacct", "cpu", controllers):
                    candidates.append(root / mount / rel / "cpu.cfs_quota_us")
    except (OSError, ValueError):
        pass
    # Inside a container the process's cgroup is usually the namespace root.
    candidates += [root / "cpu.max", root / "cpu" / "cpu.cfs_quota_us", root / "cpu,cpuacct" / "cpu.cfs_quota_us"]
    for path in candidates:
        try:
            text = path.read_text().split()
        except OSError:
            continue
        try:
            if path.name == "cpu.max":
                if text[0] == "max":
                    return None
                return int(text[0]) / int(text[1])
            quota = int(text[0])
            if quota <= 0:
                return None
            period = int((path.parent / "cpu.cfs_period_us").read_text().split()[0])
            return quota / period
        except (OSError, ValueError, IndexError, ZeroDivisionError):
            continue
    return None


def available_cpus(*, cgroup_root: str | os.PathLike = "/sys/fs/cgroup", self_cgroup: str | os.PathLike = "/proc/self/cgroup") -> int:
    """The CPUs this process may use: its affinity mask (os.sched_getaffinity, else os.cpu_count),
    capped by the cgroup CPU quota when one is set (rounded up). At least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = _cgroup_quota(Path(cgroup_root), Path(self_cgroup))
    if quota is not None and quota > 0:
        cpus = min(cpus, math.ceil(quota))
    return max(1, cpus)


def _parse(value: str, source: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise InputError(f"{source} must be a whole number of threads, at least 1 (got {value!r})")
    return n


def default_threads(environ: Mapping[str, str] | None = None) -> int:
    """$CSM_THREADS, else $OMP_NUM_THREADS, else the CPUs available to this process."""
    environ = os.environ if environ is None else environ
    if environ.get(ENV, "").strip():
        return _parse(environ[ENV].strip(), ENV)
    if environ.get("OMP_NUM_THREADS", "").strip():
        return _parse(environ["OMP_NUM_THREADS"].strip(), "OMP_NUM_THREADS")
    return available_cpus()


def configure_threads(threads: int | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Set torch's intra-op thread count to `threads`, or to `default_threads()`; returns it."""
    import torch

    n = default_threads(environ) if threads is None else _parse(str(threads), "--threads")
    torch.set_num_threads(n)
    log.debug("torch uses %d CPU thread(s)", n)
    return n
