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

The period is short (10 ms by default, longer for shares under 10%: the kernel's smallest quota is
1 ms) so that throttling is spread evenly over the work instead of stalling the process for most of a
100 ms period. Groups are named ``seamline-weak-<pid>-<n>`` and removed by :meth:`close` (their processes
are moved back to the parent group first).

**A stated device/cloud gap** (:func:`calibrate_gap`): the benchmarks that compare edge and cloud placement
size the quota so that the cloud is about ``target`` (10) times faster per layer than the device, measured in
the same run: the cloud's per-layer decode ms from its ``Info`` (``layer_ms``, measured by the cloud at
start-up), the device's from back-to-back decode tokens through all its blocks against block 0 alone
(:func:`edge_layer_ms`), under the quota. The share is solved from a full-speed measurement, then corrected
from measurements under the quota (other jobs on the host make the first guess approximate). A CFS quota
is at least 1 ms per period, so at a share s the device runs in bursts of 1 ms every 1/s ms: work of
about a millisecond per token (the demo model) is slowed unevenly, and network waits shorter than the
throttled part of a period cost the device nothing. Without
a cgroup, :class:`Slowdown` stretches every ONNX Runtime call of the device by the factor instead (a sleep
standing in for compute, stated as such in the output).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Self

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
        self.base_period_us = int(period_us)
        self.cpu, self.period_us, self.quota_us = _quota(cpu, self.base_period_us)
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
    def set_cpu(self, cpu: float) -> None:
        """Change the share of one core, live (the processes stay in the group)."""
        self.cpu, self.period_us, self.quota_us = _quota(cpu, self.base_period_us)
        if self.kind == "cgroup-v2":
            (self.group / "cpu.max").write_text(f"{self.quota_us} {self.period_us}")
        elif self.kind == "cgroup-v1":
            (self.group / "cpu.cfs_quota_us").write_text("-1")  # the period may shrink below the old quota
            (self.group / "cpu.cfs_period_us").write_text(str(self.period_us))
            (self.group / "cpu.cfs_quota_us").write_text(str(self.quota_us))

    def remove(self, pid: int) -> None:
        """Take process ``pid`` out of the group again (back to full speed)."""
        if self.limited and self.group is not None:
            with contextlib.suppress(OSError):
                (self.group.parent / "cgroup.procs").write_text(str(pid))
        with contextlib.suppress(ValueError):
            self.pids.remove(pid)

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


def _quota(cpu: float, period_us: int) -> tuple[float, int, int]:
    """(share, period, quota) in us; the period grows for small shares (the kernel's smallest quota is 1 ms)."""
    if not 0.005 <= cpu <= 64:
        raise ValueError(f"cpu quota {cpu} out of range: give a share of one core, e.g. 0.25")
    period = max(int(period_us), math.ceil(1000 / cpu))
    return float(cpu), period, max(1000, round(cpu * period))


# ------------------------------------------------------------------------------- the stated speed gap

GAP_TARGET = 10.0  # the cloud this many times faster per layer than the device (a phone against a GPU server)
MIN_CPU = 0.01


def share_for_gap(cpu: float, edge_layer_ms: float, cloud_layer_ms: float, target: float = GAP_TARGET,
                  lo: float = MIN_CPU, hi: float = 1.0) -> float:
    """The share of one core that makes ``edge_layer_ms`` (measured at share ``cpu``) ``target`` times
    ``cloud_layer_ms``, assuming time scales as 1 / share; clamped to [lo, hi]."""
    if not (edge_layer_ms > 0 and cloud_layer_ms > 0 and cpu > 0):
        raise ValueError(f"layer times must be positive: edge {edge_layer_ms}, cloud {cloud_layer_ms}")
    return min(hi, max(lo, cpu * edge_layer_ms / (target * cloud_layer_ms)))


@dataclass
class SpeedGap:
    """What :func:`calibrate_gap` did and measured (goes into a benchmark's summary)."""

    target: float
    method: str  # how the device was slowed down
    limited: bool  # a CPU quota (True) or an explicit slowdown / nothing
    cpu_share: float | None  # the quota's share of one core
    slowdown: float | None  # the explicit factor when there is no quota
    edge_layer_ms_full: float  # before the quota
    edge_layer_ms: float  # under it
    cloud_layer_ms: float

    @property
    def ratio(self) -> float:
        return self.edge_layer_ms / self.cloud_layer_ms

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio}

    def describe(self) -> str:
        return (f"device {self.edge_layer_ms:.2f} ms/layer ({self.method}), cloud {self.cloud_layer_ms:.3f} ms/layer: "
                f"cloud {self.ratio:.1f}x faster per layer (target {self.target:g}x; device at full speed "
                f"{self.edge_layer_ms_full:.3f} ms/layer)")


def calibrate_gap(weak: WeakDevice, pid: int | None, measure_edge: Callable[[], float], cloud_layer_ms: float,
                  target: float = GAP_TARGET, slow_down: Callable[[float], None] | None = None,
                  rounds: int = 4, tolerance: float = 0.2) -> SpeedGap:
    """Put ``pid`` under a quota sized so that ``measure_edge()`` (device ms per layer) is ``target`` times
    ``cloud_layer_ms``: solved from a full-speed measurement, then corrected under the quota (at most
    ``rounds`` times, until within ``tolerance`` of the target or at the smallest share).

    Without a cgroup, ``slow_down(factor)`` (e.g. :meth:`Slowdown.set`) stretches the device's compute by
    the factor instead; without either, the gap is what it is, and the result says so."""
    full = measure_edge()
    if weak.limited and pid is not None:
        cpu = share_for_gap(1.0, full, cloud_layer_ms, target)
        weak.set_cpu(cpu)
        weak.add(pid)
        edge = measure_edge()
        for _ in range(rounds):  # other jobs on the host: time does not scale as 1 / share, so correct
            if abs(edge / cloud_layer_ms / target - 1) <= tolerance or (cpu <= MIN_CPU and edge < target * cloud_layer_ms):
                break
            cpu = share_for_gap(cpu, edge, cloud_layer_ms, target)
            weak.set_cpu(cpu)
            edge = measure_edge()
        return SpeedGap(target, weak.method, True, weak.cpu, None, full, edge, cloud_layer_ms)
    if slow_down is not None:
        factor = max(1.0, target * cloud_layer_ms / full)
        slow_down(factor)
        edge = measure_edge()
        return SpeedGap(target, f"explicit slowdown: every ONNX Runtime call of the device sleeps {factor - 1:.1f}x "
                        f"its own duration after it (no CPU quota: {weak.method})", False, None, factor,
                        full, edge, cloud_layer_ms)
    return SpeedGap(target, weak.method, False, None, None, full, full, cloud_layer_ms)


class Slowdown:
    """The fallback without a cgroup: ``runtime.forward`` and ``runtime.logits`` sleep ``factor - 1`` times
    their own duration after each call (a sleep standing in for compute: stated wherever it is used)."""

    def __init__(self, runtime: Any):
        self.factor = 1.0
        for name in ("forward", "logits", "continue_from"):
            inner = getattr(runtime, name, None)
            if inner is not None:
                setattr(runtime, name, self._wrap(inner))

    def set(self, factor: float) -> None:
        self.factor = max(1.0, float(factor))

    def _wrap(self, fn: Callable) -> Callable:
        def slowed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            if self.factor > 1.0:
                time.sleep((time.perf_counter() - t0) * (self.factor - 1.0))
            return out
        return slowed


def edge_layer_ms(runtime: Any, seconds: float = 0.75, context: int = 16, min_tokens: int = 4) -> float:
    """The device's ms per block of one decode token: back-to-back tokens through every block it has against
    block 0 alone (the difference, per block), after ``context`` positions. Sustained work, as in a generation
    on the device: a run through every block lasts ``seconds`` (at least ``min_tokens`` tokens, at most the
    positions left), twice, then block 0 alone as long, twice. Under a CFS quota a call
    either fits in the period's budget or waits out the period, so one call's time says little; a run of many
    periods averages that out (24 interleaved tokens, as this used to measure, read 1.5-4.8 ms per layer at 5 %
    of a core for 2.5 on average, and under 0 at 2 %)."""
    import numpy as np

    k = runtime.num_edge_layers
    if k < 2:
        raise ValueError("measuring the device's per-layer time needs a bundle with at least 2 edge layers")
    room = runtime.manifest.max_positions - context
    if room < min_tokens:
        raise ValueError(f"measuring the device's per-layer time needs {context + min_tokens} positions")
    ids = [int(x) for x in np.random.default_rng(0).integers(1, 1000, context + room)]

    def run(n: int, tokens: int | None) -> tuple[float, int]:
        """(seconds, tokens) of back-to-back tokens through blocks [0, n): ``tokens`` of them, or for ``seconds``."""
        cache = runtime.new_cache()
        runtime.forward(ids[:context], 0, n, cache)
        t0, i = time.perf_counter(), context
        while i < context + (room if tokens is None else tokens) and (
                tokens is not None or i - context < min_tokens or time.perf_counter() - t0 < seconds):
            runtime.forward(ids[i:i + 1], i, n, cache)
            i += 1
        return time.perf_counter() - t0, i - context

    # Two runs through every block, then two through block 0, each long enough to span many periods of a
    # quota. Four calls at 5 % of a core on the demo bundle read 3.1-3.6 ms per layer in one set and 3.9-7.0
    # in one 40 minutes later; alternating the runs read 4.3-5.5, and block 0 over only as many tokens as the
    # run before it (too few periods) 5.7-7.2: no order was clearly steadier, and this one is what the
    # README's adaptive figures of 2026-12-02 used.
    every = sum(t / n for t, n in (run(k, None), run(k, None)))
    one = sum(t / n for t, n in (run(1, None), run(1, None)))
    return max(1e-6, (every - one) / 2 * 1e3 / (k - 1))

