"""A weak device, for real: a CPU quota on the benchmark's edge process (no sleeps standing in for compute).

On this host the edge and the cloud share two cores, so a fast edge would make every split look alike.
:class:`WeakDevice` caps one process (and every thread it has or starts) at ``cpu`` of one core:

1. cgroup v2 (``cpu`` in ``cgroup.controllers`` of the unified hierarchy): a child group with
   ``cpu.max = "<quota> <period>"`` (``+cpu`` is enabled in the parent's ``cgroup.subtree_control`` if
   needed);
2. cgroup v1 (a mounted ``cpu`` controller, e.g. ``/sys/fs/cgroup/cpu``): ``cpu.cfs_quota_us`` /
   ``cpu.cfs_period_us``;
3. otherwise (not root, no cgroups): the process is pinned to one core with ``taskset`` and the caller
   runs ONNX Runtime on one thread: an edge of one full core, *not* weakened; :attr:`method` says so.

The period is short (10 ms by default) so that throttling is spread evenly over the work instead of
stalling the process for most of a 100 ms period. Groups are named ``seamline-weak-<pid>-<n>`` and
removed by :meth:`close` (their processes are moved back to the parent group first).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Self

CGROUP_ROOT = Path("/sys/fs/cgroup")
_counter = itertools.count()


def _read(p: Path) -> str:
    try:
        return p.read_text().strip()
    except OSError:
        return ""


def _v2_root() -> Path | None:
    for root in (CGROUP_ROOT, CGROUP_ROOT / "unified"):
        if "cpu" in _read(root / "cgroup.controllers").split():
            return root
    return None


def _v1_root() -> Path | None:
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None
    for line in mounts:
        parts = line.split()
        if len(parts) >= 4 and parts[2] == "cgroup" and "cpu" in parts[3].split(","):
            root = Path(parts[1])
            if (root / "cpu.cfs_quota_us").exists():
                return root
    return None


class WeakDevice:
    """A CPU quota of ``cpu`` cores (e.g. 0.25) for the processes :meth:`add` is given."""

    def __init__(self, cpu: float = 0.25, period_us: int = 10_000):
        if not 0.01 <= cpu <= 64:
            raise ValueError(f"cpu quota {cpu} out of range: give a share of one core, e.g. 0.25")
        self.cpu, self.period_us = float(cpu), int(period_us)
        self.quota_us = max(1000, round(self.cpu * self.period_us))
        self.group: Path | None = None
        self.kind = "none"
        self.pids: list[int] = []
        self._created = False
        self._enabled_cpu_in: Path | None = None
        self._setup()

    # -- set-up ----------------------------------------------------------------------------
    def _setup(self) -> None:
        name = f"seamline-weak-{os.getpid()}-{next(_counter)}"
        errors = []
        root = _v2_root()
        if root is not None:
            try:
                self._setup_v2(root, name)
                return
            except OSError as e:
                errors.append(f"cgroup v2 at {root}: {e}")
        root = _v1_root()
        if root is not None:
            try:
                self._setup_v1(root, name)
                return
            except OSError as e:
                errors.append(f"cgroup v1 at {root}: {e}")
        self.kind = "taskset" if shutil.which("taskset") else "none"
        self.error = "; ".join(errors) or "no cgroup cpu controller is mounted"

    def _setup_v2(self, root: Path, name: str) -> None:
        control = root / "cgroup.subtree_control"
        if "cpu" not in _read(control).split():
            control.write_text("+cpu")
            self._enabled_cpu_in = control
        group = root / name
        group.mkdir()
        self.group, self._created, self.kind = group, True, "cgroup-v2"
        (group / "cpu.max").write_text(f"{self.quota_us} {self.period_us}")

    def _setup_v1(self, root: Path, name: str) -> None:
        group = root / name
        group.mkdir()
        self.group, self._created, self.kind = group, True, "cgroup-v1"
        (group / "cpu.cfs_period_us").write_text(str(self.period_us))
        (group / "cpu.cfs_quota_us").write_text(str(self.quota_us))

    # -- use -------------------------------------------------------------------------------
    @property
    def limited(self) -> bool:
        """True when the processes really get only ``cpu`` of a core."""
        return self.kind.startswith("cgroup")

    @property
    def method(self) -> str:
        """One line for the benchmark output: how the device was made weak."""
        if self.kind == "cgroup-v2":
            return (f"cgroup v2 CPU quota: {self.group}/cpu.max = '{self.quota_us} {self.period_us}' "
                    f"({self.cpu:.0%} of one core)")
        if self.kind == "cgroup-v1":
            return (f"cgroup v1 CFS quota: {self.group} cpu.cfs_quota_us={self.quota_us} "
                    f"cpu.cfs_period_us={self.period_us} ({self.cpu:.0%} of one core)")
        if self.kind == "taskset":
            return (f"NOT weakened: no CPU quota available ({self.error}); the edge is pinned to one core "
                    "with taskset and runs ONNX Runtime on one thread")
        return f"NOT weakened: no CPU quota and no taskset ({self.error}); the edge runs on one ORT thread"

    def add(self, pid: int) -> None:
        """Put process ``pid`` (all its threads, and the ones it starts later) under the quota."""
        if self.limited:
            (self.group / "cgroup.procs").write_text(str(pid))
        elif self.kind == "taskset":
            subprocess.run(["taskset", "-a", "-p", "-c", "0", str(pid)], check=False, capture_output=True)
        self.pids.append(pid)

    def stats(self) -> dict[str, float]:
        """Throttling so far (``cpu.stat``): periods, throttled periods, seconds throttled, CPU seconds used."""
        if not self.limited:
            return {}
        out: dict[str, float] = {}
        for line in _read(self.group / "cpu.stat").splitlines():
            key, _, value = line.partition(" ")
            with contextlib.suppress(ValueError):
                out[key] = float(value)
        if self.kind == "cgroup-v1":
            usage = _read(self.group / "cpuacct.usage") or _read(
                Path(str(self.group).replace("/cpu/", "/cpuacct/")) / "cpuacct.usage")
            if usage:
                out["usage_s"] = float(usage) / 1e9
            if "throttled_time" in out:
                out["throttled_s"] = out.pop("throttled_time") / 1e9
        else:
            if "usage_usec" in out:
                out["usage_s"] = out.pop("usage_usec") / 1e6
            if "throttled_usec" in out:
                out["throttled_s"] = out.pop("throttled_usec") / 1e6
        return out

    def close(self) -> None:
        """Move any process still in the group back to the parent group, remove the group."""
        if self.group is None or not self._created:
            return
        parent = self.group.parent
        for pid in _read(self.group / "cgroup.procs").split():
            with contextlib.suppress(OSError):
                (parent / "cgroup.procs").write_text(pid)
        for _ in range(50):
            try:
                self.group.rmdir()
                break
            except OSError:
                time.sleep(0.05)
        self._created = False  # `+cpu` stays enabled in the parent: other groups may rely on it by now

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

