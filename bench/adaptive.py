"""``seamline bench adaptive``: the adaptive controller against every fixed (split, codec) and the oracle.

Set-up (all on loopback, every piece real):

- the cloud is ``seamline cloud`` in a subprocess on one torch thread;
- the edge is a worker subprocess (``python -m seamline.bench.adaptive --worker``) running the edge's
  ``GenerationEngine`` on the bundle, one ONNX Runtime thread, made a *weak device* by a CPU quota on its
  process (``bench/_weak.py``) **sized in the run so that the cloud is about 10x faster per layer than the
  device** (``SEAMLINE_GAP``, default 10; ``SEAMLINE_WEAK_CPU`` fixes the share instead): the cloud's
  per-layer decode ms from its ``Info``, the device's from back-to-back decode tokens under the quota; the
  summary records both and their ratio (``edge_vs_cloud_layer_ms``), and the same ratio from the run's own
  decode steps (``edge_vs_cloud_layer_ms_in_run``). Without a cgroup the device's ONNX Runtime calls are
  stretched by the factor instead, and the summary says so;
- between them a :class:`~seamline.testing.linkemu.LinkEmulator` (in this process) carries every byte.

The menu (:func:`menu_for`): the splits and codecs every fixed policy is drawn from, plus all-local; the
adaptive controller chooses from exactly the same menu (``AdaptivePolicy.from_manifest(splits=...,
codecs=...)``), and the oracle picks, per regime and with hindsight, the fixed policy with the least total
time there. ``--quick`` (demo): splits {1, L/2} x codecs {fp16, int4-rot} + local; the full run: splits
{1, L/2, L-1} x {fp16, int8, int4-rot} + local. The summary names it (``menu``).

The trace (:func:`scenario`): regimes applied by request index in consecutive blocks in proportion 2 : 1 : 3
(``--quick``: AABCCC), chosen so that different menu entries win in different regimes: A = 100 Mbit/s &
5 ms RTT (a fast link: the weak device hands almost every layer to the cloud), B = 0.5 Mbit/s & 300 ms (a
congestion episode: every layer on the device wins; its round trip grows to 2.5x the device's all-local token
time where that is longer, :func:`congested_for`, so that it does on a real model too), C = 4 Mbit/s & 8 ms (a narrow but responsive link: the
cloud again, with fewer bytes per row); the RTT is split evenly between the two directions' one-way delays.
The trace comes back from B, so the controller must find its way from the device back to the cloud.

Workload: 12 requests of 64-token prompts and 24 new tokens (``--quick``: 6 of 192 + 16), greedy. The quick run's
longer prompts (a chat turn with its system prompt; ``QUICK_PROMPT_TOKENS``) are what make its regimes differ on
the demo model: one remote decode step costs the device about as much CPU as one of the demo's all-local tokens
(gRPC, the event loop and a thread hop against six 192-wide blocks), so the split saves the device the prompt's
other blocks, not its decode; with 64-token prompts all-local stayed within 1.2-1.3x of split 1 in A and C
(``oracle_vs_best_fixed`` 0.82-0.86; the README's adaptive section has the figures). Requests are
interleaved: request i runs under its regime for every policy in turn (in a shuffled order, seeded by i), so
slow drifts of a shared machine hit every policy alike. Every policy, the adaptive ones too, gets one
uncounted warm-up request under the quota (ORT and the cloud's torch at every split; for the controller,
its first look at what this device costs). The adaptive controller keeps its state across its own requests;
its clock counts its own requests' time and, between two of them, ``THINK_S`` (5 s) of idle time, as if a
person read each answer before asking the next (the agent's ``preflight_after_s``, 2 s, then times the link
before each request; the regimes change between requests, as a phone's link changes while its user reads).
The totals count the requests' own time only.

Summary: ``adaptive_vs_oracle`` and ``adaptive_vs_best_fixed`` (total time ratios; targets <= 1.15 and
<= 0.85), ``oracle_vs_best_fixed`` (the most any per-regime choice could have gained here; the scenario
is meant to make it <= 0.8), ``edge_vs_cloud_layer_ms``. Outputs: a table, JSON (``--json OUT``) and a plot
of per-request latency per policy with the regimes shaded (``OUT`` with a ``.png`` suffix).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import queue
import random
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Self

CODECS = ("fp16", "int8", "int4-rot")
QUICK_CODECS = ("fp16", "int4-rot")
# The controller as `seamline edge --adaptive` runs it (the headline), and one variant in the full run: the
# regimes here last seconds of the policy's own time where real ones last minutes, and the default 30 s
# before an all-local device probes the link with a request is longer than that; the variant probes after 5 s.
ADAPTIVE = {"adaptive": {}, "adaptive-probe5s": {"probe_after_s": 5.0}}
QUICK_PROMPT_TOKENS = 192  # --quick's prompts (see the module's docstring: why longer than the full run's)
THINK_S = 5.0  # idle seconds on an adaptive policy's clock between two of its requests (a person reading)
WEAK_CPU_ENV = "SEAMLINE_WEAK_CPU"  # a fixed share of one core instead of the one sized for the gap
GAP_ENV = "SEAMLINE_GAP"  # the cloud this many times faster per layer than the device (default 10)


@dataclass(frozen=True)
class Regime:
    name: str
    bandwidth_bps: float
    rtt_ms: float

    @property
    def label(self) -> str:
        bw = self.bandwidth_bps
        return f"{self.name}: {bw / 1e6:g} Mbit/s, {self.rtt_ms:g} ms RTT"


REGIMES = (Regime("A", 100e6, 5.0), Regime("B", 0.5e6, 300.0), Regime("C", 4e6, 8.0))
CONGESTED_RTT_TOKENS = 2.5  # B's round trip: at least this many of the device's all-local tokens (congested_for)
WEIGHTS = (2, 1, 3)  # a fast link, a short congestion episode, a narrow link for the rest


@dataclass(frozen=True)
class Menu:
    """What the fixed policies, the oracle and the adaptive controller all choose from."""

    splits: tuple[int, ...]  # remote splits
    codecs: tuple[str, ...]
    local: bool  # all-local (every layer on the device) is on it

    def entries(self, num_layers: int) -> list[tuple[str, int, str]]:
        """(name, split, codec) of every fixed policy: each split x codec, plus all-local."""
        grid = [(f"{k}/{c}", k, c) for k in self.splits for c in self.codecs]
        return grid + ([("local", num_layers, "local")] if self.local else [])

    def controller_splits(self, num_layers: int) -> tuple[int, ...]:
        """The ``splits`` of the controller's constraints: the menu's, and L for all-local."""
        return (*self.splits, *((num_layers,) if self.local else ()))

    def describe(self, num_layers: int) -> str:
        return (f"splits {{{', '.join(map(str, self.splits))}}} x codecs {{{', '.join(self.codecs)}}}"
                + (f" + all-local (k = {num_layers})" if self.local else "") + "; the same for the fixed "
                "policies, the oracle and the adaptive controller")


def menu_for(num_layers: int, local_ok: bool, min_split: int = 1, quick: bool = False) -> Menu:
    """Splits {1, L/2, L-1} (quick: {1, L/2}) above the privacy floor, codecs CODECS (quick: QUICK_CODECS)."""
    L, lo = num_layers, max(1, min_split)
    wanted = (lo, L // 2) if quick else (lo, L // 2, L - 1)
    return Menu(tuple(sorted({k for k in wanted if lo <= k < L})), QUICK_CODECS if quick else CODECS, local_ok)


@dataclass(frozen=True)
class Scenario:
    regimes: tuple[Regime, ...]
    trace: tuple[int, ...]  # regime index of each request

    @property
    def requests(self) -> int:
        return len(self.trace)

    def regime(self, i: int) -> Regime:
        return self.regimes[self.trace[i]]

    def present(self) -> list[int]:
        return sorted(set(self.trace))


def congested_for(sc: Scenario, local_token_ms: float | None) -> Scenario:
    """B, the congestion episode, is one in which the device alone wins: its round trip at least
    ``CONGESTED_RTT_TOKENS`` times what this device takes for a token with every layer (measured by the
    controller's start-up calibration), rounded up to 100 ms, and never under B's own 300 ms. On the demo
    (a token in 35-60 ms) B stays 300 ms; on SmolLM2, whose tokens take ~0.5 s on the throttled device, a
    300 ms episode would still favour the cloud and no per-regime choice would differ."""
    if local_token_ms is None:
        return sc
    regimes = tuple(replace(r, rtt_ms=max(r.rtt_ms, 100.0 * math.ceil(CONGESTED_RTT_TOKENS * local_token_ms / 100.0)))
                    if r.name == "B" else r for r in sc.regimes)
    return replace(sc, regimes=regimes)


def scenario(n_requests: int, regimes: tuple[Regime, ...] = REGIMES,
             weights: tuple[float, ...] = WEIGHTS) -> Scenario:
    """The regimes in consecutive blocks of requests, in proportion to ``weights`` (largest remainders; every
    regime gets at least one request)."""
    if len(weights) != len(regimes):
        raise ValueError(f"{len(weights)} weights for {len(regimes)} regimes")
    if n_requests < len(regimes):
        raise ValueError(f"{n_requests} requests cannot visit {len(regimes)} regimes; give at least {len(regimes)}")
    total = sum(weights)
    share = [n_requests * w / total for w in weights]
    counts = [max(1, int(x)) for x in share]
    by_remainder = sorted(range(len(regimes)), key=lambda g: (-(share[g] - int(share[g])), g))
    i = 0
    while sum(counts) < n_requests:
        counts[by_remainder[i % len(regimes)]] += 1
        i += 1
    while sum(counts) > n_requests:  # the minimum of one pushed the sum over: take from the largest block
        counts[max(range(len(regimes)), key=lambda g: counts[g])] -= 1
    trace = [g for g in range(len(regimes)) for _ in range(counts[g])]
    return Scenario(tuple(regimes), tuple(trace))


# Public-domain verse (Shakespeare) for the prompts; 64-token windows are cut from it.
TEXT = """\
Friends, Romans, countrymen, lend me your ears; I come to bury Caesar, not to praise him. The evil that men
do lives after them; the good is oft interred with their bones; so let it be with Caesar. The noble Brutus
hath told you Caesar was ambitious: if it were so, it was a grievous fault, and grievously hath Caesar
answer'd it. Here, under leave of Brutus and the rest, for Brutus is an honourable man; so are they all,
all honourable men, come I to speak in Caesar's funeral. He was my friend, faithful and just to me: but
Brutus says he was ambitious; and Brutus is an honourable man. He hath brought many captives home to Rome,
whose ransoms did the general coffers fill: did this in Caesar seem ambitious? When that the poor have
cried, Caesar hath wept: ambition should be made of sterner stuff. To be, or not to be, that is the
question: whether 'tis nobler in the mind to suffer the slings and arrows of outrageous fortune, or to
take arms against a sea of troubles, and by opposing end them? To die: to sleep; no more; and by a sleep
to say we end the heart-ache and the thousand natural shocks that flesh is heir to, 'tis a consummation
devoutly to be wish'd. To die, to sleep; to sleep: perchance to dream: ay, there's the rub; for in that
sleep of death what dreams may come when we have shuffled off this mortal coil, must give us pause. Now
is the winter of our discontent made glorious summer by this sun of York; and all the clouds that lour'd
upon our house in the deep bosom of the ocean buried. Now are our brows bound with victorious wreaths; our
bruised arms hung up for monuments; our stern alarums changed to merry meetings, our dreadful marches to
delightful measures. All the world's a stage, and all the men and women merely players; they have their
exits and their entrances; and one man in his time plays many parts, his acts being seven ages. But, soft!
what light through yonder window breaks? It is the east, and Juliet is the sun. Arise, fair sun, and kill
the envious moon, who is already sick and pale with grief, that thou her maid art far more fair than she.
"""


def fixed_grid(num_layers: int, local_ok: bool, min_split: int = 1, quick: bool = False) -> list[tuple[str, int, str]]:
    """(name, split, codec) of every fixed policy of the menu (:func:`menu_for`)."""
    return menu_for(num_layers, local_ok, min_split, quick).entries(num_layers)


# =============================================================================================== worker
# Runs in the edge subprocess (the weak device): one GenerationEngine, policies swapped per request.


class ActiveClock:
    """Seconds spent inside this policy's own requests, plus ``think_s`` of idle time between two of them (a
    policy's controller sees its own time only, as if its requests came one after another from one user)."""

    def __init__(self, think_s: float = 0.0) -> None:
        self.base = 0.0
        self.since: float | None = None
        self.think_s = think_s
        self.started = False

    def __call__(self) -> float:
        return self.base + (0.0 if self.since is None else time.monotonic() - self.since)

    def start(self) -> None:
        if self.started:
            self.base += self.think_s
        self.since, self.started = time.monotonic(), True

    def stop(self) -> None:
        self.base, self.since = self(), None


class _Worker:
    def __init__(self) -> None:
        self.engine = None
        self.policies: dict[str, Any] = {}
        self.clocks: dict[str, ActiveClock] = {}

    async def handle(self, msg: dict) -> dict:
        return await getattr(self, "op_" + msg.pop("op"))(**msg)

    async def op_init(self, bundle: str, cloud: str, threads: int = 1, chunk_tokens: int = 64) -> dict:
        from seamline.edge.agent import build_engine
        from seamline.edge.config import EdgeConfig
        from seamline.protos.memory import settle_heap

        config = EdgeConfig(bundle=bundle, cloud=[cloud], listen="127.0.0.1:0", threads=threads,
                            chunk_tokens=chunk_tokens, step_timeout=120.0, reconnect_window=30.0,
                            log_level="WARNING")
        self.engine = build_engine(config)
        settle_heap()
        m = self.engine.manifest
        return {"num_layers": m.num_layers, "hidden_size": m.hidden_size, "local_ok": m.has_all_layers,
                "min_split": m.min_split, "model_id": m.model_id, "profiles": bool((m.plan or {}).get("profiles")),
                "pid": os.getpid(), "max_positions": m.max_positions}

    async def op_prompts(self, text: str, tokens: int, count: int) -> dict:
        ids = self.engine.encode_prompt(text)
        while len(ids) < tokens + count:
            ids = ids + ids
        step = max(1, (len(ids) - tokens) // max(1, count - 1))
        return {"prompts": [ids[i * step:i * step + tokens] for i in range(count)]}

    async def op_edge_layer_ms(self) -> dict:
        """The device's ms per block of one decode token (``_weak.edge_layer_ms``), where it stands now."""
        from ._weak import edge_layer_ms

        return {"ms": await asyncio.to_thread(edge_layer_ms, self.engine.runtime)}

    async def op_calibrate(self, policy: str, seconds: float) -> dict:
        """What the agent does at start-up with --adaptive (``GenerationEngine.calibrate``), for ``policy``: time
        this device's all-local tokens, where it stands now, and tell the controller."""
        self.engine.policy = self.policies[policy]
        return {"halves": await self.engine.calibrate(seconds)}

    async def op_cloud_layer_ms(self) -> dict:
        """The cloud's ms per block of one decode token, from its ``Info`` (measured at its start-up)."""
        link = self.engine.link
        info = await link.info(link.endpoints[0])
        return {"ms": sum(info.layer_ms) / max(1, len(info.layer_ms)), "layer_ms": list(info.layer_ms),
                "head_ms": info.head_ms}

    async def op_slowdown(self, factor: float) -> dict:
        """No cgroup: stretch every ONNX Runtime call of this device by ``factor`` (stated by the caller)."""
        from ._weak import Slowdown

        if not hasattr(self, "slowdown"):
            self.slowdown = Slowdown(self.engine.runtime)
        self.slowdown.set(factor)
        return {"factor": self.slowdown.factor}

    async def op_policy(self, name: str, kind: str, split: int | None = None, codec: str | None = None,
                        codecs: list[str] | None = None, config: dict | None = None,
                        splits: list[int] | None = None) -> dict:
        from seamline.edge.controller import ControllerConfig
        from seamline.edge.messages import SplitChoice
        from seamline.edge.policy import FixedPolicy

        m = self.engine.manifest
        if kind == "fixed":
            policy: Any = FixedPolicy.from_manifest(m, split, codec)
        elif kind == "local":
            policy = FixedPolicy(SplitChoice(m.num_layers, local=True, reason="all-local"))
        elif kind == "adaptive":
            clock = self.clocks[name] = ActiveClock(THINK_S)
            policy = _recording_policy_class().from_manifest(m, config=ControllerConfig(**(config or {})), clock=clock,
                                                             codecs=tuple(codecs) if codecs else None,
                                                             splits=tuple(splits) if splits else None)
            link = self.engine.link
            try:  # what the agent does at start-up: Info, timed (an RTT sample, the cloud's layer times)
                t0 = time.perf_counter()
                info = await link.info(link.endpoints[0])
                policy.observe_info(info, rtt_ms=(time.perf_counter() - t0) * 1e3)
            except Exception as e:  # noqa: BLE001 - the controller starts from its priors then
                print(f"worker: Info failed: {e}", file=sys.stderr)
        else:
            raise ValueError(f"unknown policy kind {kind!r}")
        self.policies[name] = policy
        return {"name": name}

    async def op_run(self, policy: str, prompt: list[int], max_tokens: int) -> dict:
        from seamline.edge.messages import GenerationRequest, SamplingParams

        pol = self.policies[policy]
        counting = self.engine.policy = _Counting(pol)
        clock = self.clocks.get(policy)
        log = getattr(pol, "log", None)
        mark = len(log) if log is not None else 0
        if clock:
            clock.start()
        c0, t0 = time.process_time(), time.perf_counter()
        try:
            r = await self.engine.run(GenerationRequest(tuple(prompt), int(max_tokens), SamplingParams()))
        finally:
            ms = (time.perf_counter() - t0) * 1e3
            cpu = (time.process_time() - c0) * 1e3
            if clock:
                clock.stop()
        s = r.stats
        out = {"ms": ms, "cpu_ms": cpu, "ttft_ms": s.ttft_ms, "tokens": list(r.token_ids), "split": s.split,
               "codec": s.codec, "resplits": s.resplits, "replays": s.replays, "served_by": dict(s.served_by),
               "edge_ms": s.edge_ms, "local_ms": s.local_ms, "network_ms": s.network_ms,
               "cloud_compute_ms": s.cloud_compute_ms, "bytes_sent": s.bytes_sent,
               "fallback_reason": s.fallback_reason, "observed": counting.observed,
               "decode_edge_ms": _median(counting.decode_edge_ms), "decode_cloud_ms": _median(counting.decode_cloud_ms)}
        if log is not None:
            out["decisions"] = [{"kind": d.kind, "split": d.k, "codec": d.codec_name, "reason": d.reason,
                                 "predicted_ms": d.predicted_ms} for d in log[mark:]]
            out["controller"] = _status_dict(pol)
            plan = pol.controller.last_plan
            if plan is not None:  # the planner's view at this request's choice: the best few and local
                top = list(plan.rows[:4]) + [r for r in plan.rows[4:] if r.codec == "local"]
                out["plan"] = [{"split": r.split, "codec": r.codec, "response_ms": round(r.response_ms, 1),
                                "prefill_ms": round(r.prefill_ms, 1), "decode_ms": round(r.decode_ms, 2)}
                               for r in top]
        return out

    async def op_metrics(self, policy: str) -> dict:
        pol = self.policies[policy]
        return _status_dict(pol)

    async def op_quit(self) -> dict:
        from seamline.edge.agent import close_engine

        if self.engine is not None:
            await close_engine(self.engine)
        return {"bye": True}


def _median(xs: list[float]) -> float | None:
    import statistics

    return statistics.median(xs) if xs else None


def _status_dict(policy: Any) -> dict:
    """A policy's ``status()`` as JSON: its current choice, counts and (adaptive) live estimates."""
    import dataclasses

    s = policy.status()
    return {"split": s.choice.k if s.choice else None, "codec": s.choice.codec_name if s.choice else None,
            "switches": s.switches, "decisions": s.decisions,
            **(dataclasses.asdict(s.estimates) if s.estimates else {})}


class _Counting:
    """Counts the steps the generation loop reports to ``policy`` (all-local ones apart)."""

    def __init__(self, policy: Any):
        self.policy = policy
        self.observed = {"local": 0, "remote": 0}
        self.decode_edge_ms: list[float] = []  # remote decode steps: the device's part, the cloud's compute
        self.decode_cloud_ms: list[float] = []

    def choose(self, request: Any) -> Any:
        return self.policy.choose(request)

    def observe(self, stats: Any) -> Any:
        self.observed["local" if stats.codec == "local" else "remote"] += 1
        if stats.codec != "local" and stats.kind == "decode":
            self.decode_edge_ms.append(stats.edge_ms)
            self.decode_cloud_ms.append(stats.compute_ms)
        return self.policy.observe(stats)

    def observe_info(self, info: Any, rtt_ms: float | None) -> None:
        self.policy.observe_info(info, rtt_ms)

    def breakeven_rtt_ms(self, request: Any) -> float | None:
        of = getattr(self.policy, "breakeven_rtt_ms", None)
        return None if of is None else of(request)

    def observe_silence(self, waited_ms: float) -> None:
        of = getattr(self.policy, "observe_silence", None)
        if of is not None:
            of(waited_ms)

    def observe_rtt(self, rtt_ms: float) -> None:
        of = getattr(self.policy, "observe_rtt", None)
        if of is not None:
            of(rtt_ms)

    def status(self) -> Any:
        return self.policy.status()


def _recording_policy_class():
    from seamline.edge.controller import AdaptivePolicy

    class _RecordingPolicy(AdaptivePolicy):
        """The agent's AdaptivePolicy, keeping every decision it hands to the generation loop."""

        def __init__(self, controller: Any):
            super().__init__(controller)
            self.log: list = []

        def choose(self, request: Any) -> Any:
            d = super().choose(request)
            self.log.append(d)
            return d

        def observe(self, step_stats: Any) -> Any:
            d = super().observe(step_stats)
            if d is not None:
                self.log.append(d)
            return d

    return _RecordingPolicy


def worker_main() -> int:
    """The edge worker: JSON commands on stdin, one JSON reply per line on stdout."""
    import logging

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if os.environ.get("SEAMLINE_BENCH_CONTROLLER_LOG"):
        logging.getLogger("seamline.edge.controller").setLevel(logging.INFO)
    out = sys.stdout
    sys.stdout = sys.stderr  # anything else printed must not corrupt the protocol
    worker = _Worker()

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                if worker.engine is not None:
                    await worker.op_quit()
                return
            msg = json.loads(line)
            op = msg.get("op")
            try:
                reply = await worker.handle(msg)
            except Exception as e:  # noqa: BLE001 - reported to the parent, which decides
                reply = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-3000:]}
            out.write(json.dumps(reply, default=float) + "\n")
            out.flush()
            if op == "quit":
                return

    asyncio.run(serve())
    return 0


# ========================================================================================= parent side


class WorkerError(RuntimeError):
    pass


class EdgeWorker:
    """The edge worker subprocess, driven by JSON lines; ``weak`` puts it under the CPU quota."""

    def __init__(self, env: dict[str, str] | None = None):
        fd, name = tempfile.mkstemp(prefix="seamline-edge-worker-", suffix=".log")
        self.log = os.fdopen(fd, "w+")
        self.log_path = Path(name)
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen([sys.executable, "-m", "seamline.bench.adaptive", "--worker"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env=full_env)
        self.replies: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.replies.put(line)
        self.replies.put("")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text()[-n:]
        except OSError:
            return ""

    def call(self, op: str, timeout: float = 300.0, **kw: Any) -> dict:
        if self.proc.poll() is not None:
            raise WorkerError(f"the edge worker exited ({self.proc.returncode}): {self.stderr_tail()}")
        self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.proc.stdin.flush()
        try:
            line = self.replies.get(timeout=timeout)
        except queue.Empty:
            raise WorkerError(f"the edge worker did not answer {op!r} within {timeout:g}s: "
                              f"{self.stderr_tail()}") from None
        if not line:
            raise WorkerError(f"the edge worker exited during {op!r}: {self.stderr_tail()}")
        reply = json.loads(line)
        if "error" in reply:
            raise WorkerError(f"edge worker, {op}: {reply['error']}\n{reply.get('trace', '')}")
        return reply

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.call("quit", timeout=30)
            except (WorkerError, OSError, ValueError):
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        with_log = os.environ.get("SEAMLINE_BENCH_KEEP_LOGS")
        if not with_log:
            self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def cloud_args(threads: int = 1) -> tuple[str, ...]:
    """Flags for ``cloud_process``: ``threads`` torch threads (the edge and the cloud share two cores), quiet."""
    return ("--threads", str(threads), "--log-level", "WARNING")


# Random-weight GPT-2s sized between the demo (6 x 192: its compute is smaller than the per-step overhead
# of a remote step, so all-local always wins on a weak edge) and gpt2-124m (the 1-thread CPU cloud is as
# slow per token as a quarter-core edge minus the link, so the cloud always wins): here a quarter-core edge
# and the CPU cloud trade places as the link changes. Demo tokenizer and vocabulary.
SYNTHETIC = {"gpt2-8x512": {"n_layer": 8, "n_embd": 512, "n_head": 8, "vocab_size": 4096, "n_positions": 256}}


def synthetic_checkpoint(name: str) -> str:
    from seamline.partitioner.loading import DEMO_DIR
    from seamline.testing.models import random_checkpoint

    from .models import cache_dir

    out = cache_dir() / name
    if not (out / "model.safetensors").exists():
        demo = json.loads((DEMO_DIR / "config.json").read_text())
        random_checkpoint("gpt2", out, seed=0, tokenizer=DEMO_DIR / "tokenizer.json", config={
            "bos_token_id": demo.get("bos_token_id"), "eos_token_id": demo.get("eos_token_id"), **SYNTHETIC[name]})
    return str(out)


def planned_bundle(name: str, console: Any = None) -> tuple[str, Path]:
    """(checkpoint, bundle) of a benchmark model, the bundle planned by ``partition --split auto`` (so that
    the controller starts from measured profiles, as a deployment would), cached next to the plain one."""
    import shutil
    from types import SimpleNamespace

    from rich.console import Console
    from seamline.partitioner.auto_split import choose_split
    from seamline.protos.bundle import load_bundle

    from .models import bundle, cache_dir, checkpoint, is_current, stamp_current

    if (Path(name) / "manifest.json").exists():  # a bundle folder: its source checkpoint serves the cloud
        plain = Path(name).resolve()
        src = json.loads((plain / "manifest.json").read_text())["model_source"]
    elif name not in SYNTHETIC:
        src, plain = checkpoint(name), bundle(name)
    else:  # a synthetic model: partition it into the cache under its hash
        from seamline.partitioner.loading import model_hash, resolve_model
        from seamline.partitioner.partition import PartitionOptions, partition

        src = synthetic_checkpoint(name)
        plain = cache_dir() / f"bundle-{model_hash(resolve_model(src))[:16]}"
        if not is_current(plain):
            partition(PartitionOptions(model=src, out=plain, force=True, quantize_edge="int8", keep_fp32=True))
            stamp_current(plain)
    src_hash = json.loads((plain / "manifest.json").read_text()).get("source_model_hash") or ""
    planned = cache_dir() / f"bundle-planned-{src_hash[:16]}"
    if is_current(planned, lambda m: m.get("source_model_hash") == src_hash and bool((m.get("plan") or {}).get(
            "profiles"))):
        return src, planned
    if planned.exists():
        shutil.rmtree(planned)
    shutil.copytree(plain, planned)
    manifest = load_bundle(planned, verify=False)
    args = SimpleNamespace(out=planned, bandwidth="20mbit", rtt="30ms", edge_profile=None, cloud_profile=None,
                           deadline_ms=None, min_agreement=None, prompt_tokens=64, new_tokens=32)
    choose_split(args, manifest, console or Console(quiet=True))
    return src, stamp_current(planned)


def _summarize(rows: list[dict], names: list[str], fixed: list[str], sc: Scenario) -> dict:
    """Totals per policy and regime, the oracle (per regime, the fixed policy of the menu with the least total
    there) and the ratios. ``fixed`` is the menu's policies: the oracle never picks anything else."""
    by = {p: [r for r in rows if r["policy"] == p] for p in names}
    present = sc.present()
    per_regime = {p: {g: sum(r["ms"] for r in by[p] if r["regime"] == g) for g in present} for p in names}
    total = {p: sum(per_regime[p].values()) for p in names}
    oracle_pick = {g: min(fixed, key=lambda p: per_regime[p][g]) for g in present}
    oracle_total = sum(per_regime[oracle_pick[g]][g] for g in present)
    best_fixed = min(fixed, key=lambda p: total[p])
    adaptive = total["adaptive"]
    variants = {p: {"vs_oracle": total[p] / oracle_total, "vs_best_fixed": total[p] / total[best_fixed],
                    "config": ADAPTIVE[p]} for p in names if p in ADAPTIVE and p != "adaptive"}
    name = {g: sc.regimes[g].name for g in present}
    return {
        "adaptive_vs_oracle": adaptive / oracle_total,
        "adaptive_vs_best_fixed": adaptive / total[best_fixed],
        "oracle_vs_best_fixed": oracle_total / total[best_fixed],
        "adaptive_total_s": adaptive / 1e3, "oracle_total_s": oracle_total / 1e3,
        "best_fixed": best_fixed, "best_fixed_total_s": total[best_fixed] / 1e3,
        "oracle_choice": {name[g]: oracle_pick[g] for g in present},
        "per_regime_s": {p: {name[g]: per_regime[p][g] / 1e3 for g in present} for p in names},
        "total_s": {p: total[p] / 1e3 for p in names},
        "variants": variants,
        "targets": {"oracle_vs_best_fixed<=0.8": oracle_total / total[best_fixed] <= 0.8,
                    "adaptive_vs_oracle<=1.15": adaptive / oracle_total <= 1.15,
                    "adaptive_vs_best_fixed<=0.85": adaptive / total[best_fixed] <= 0.85},
    }


def layer_gap_in_run(rows: list[dict], fixed: list[tuple[str, int, str]]) -> dict | None:
    """Per-layer decode ms of the device and of the cloud from the run's own remote decode steps: between the
    smallest and the largest split of the menu (same codec), the device's part grows by the device's layers
    and the cloud's compute shrinks by the cloud's. Medians over the measured requests."""
    import statistics

    remote = [(n, k, c) for n, k, c in fixed if c != "local"]
    splits = sorted({k for _, k, _ in remote})
    if len(splits) < 2:
        return None
    lo, hi = splits[0], splits[-1]
    edge, cloud = [], []
    for codec in sorted({c for _, _, c in remote}):
        a = [r for r in rows if r["policy"] == f"{lo}/{codec}" and r.get("decode_edge_ms") is not None]
        b = [r for r in rows if r["policy"] == f"{hi}/{codec}" and r.get("decode_edge_ms") is not None]
        if a and b:
            edge.append((statistics.median(r["decode_edge_ms"] for r in b)
                         - statistics.median(r["decode_edge_ms"] for r in a)) / (hi - lo))
            cloud.append((statistics.median(r["decode_cloud_ms"] for r in a)
                          - statistics.median(r["decode_cloud_ms"] for r in b)) / (hi - lo))
    if not edge:
        return None
    e, c = statistics.median(edge), statistics.median(cloud)
    return {"edge_layer_ms": e, "cloud_layer_ms": c, "ratio": e / c if c > 0 else None,
            "from": f"median remote decode step, split {hi} minus split {lo}, per layer, per codec, median",
            "note": "timed inside the steps: under a CFS quota the device computes at full speed within its 1 ms "
                    "burst and the throttling falls between the timed parts, so this is not the gap the quota sets"}


def _plot(rows: list[dict], names: list[str], summary: dict, sc: Scenario, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = sc.requests
    fig, ax = plt.subplots(figsize=(11, 5.5))
    xs = list(range(n))
    series = {p: [next(r["ms"] for r in rows if r["policy"] == p and r["request"] == i) / 1e3 for i in xs]
              for p in names}
    colors = ("#dbe9f6", "#fde0dd", "#e5f5e0", "#fff7bc")
    for g, reg in enumerate(sc.regimes):
        idx = [i for i in xs if sc.trace[i] == g]
        if idx:
            ax.axvspan(idx[0] - 0.5, idx[-1] + 0.5, color=colors[g % len(colors)], zorder=0)
            ax.text((idx[0] + idx[-1]) / 2, 1.0, reg.label, transform=ax.get_xaxis_transform(), ha="center",
                    va="bottom", fontsize=9)
    best = summary["best_fixed"]
    for p in names:
        if p in ADAPTIVE or p in (best, "local"):
            continue
        ax.plot(xs, series[p], color="grey", alpha=0.45, lw=0.9, marker=".", ms=3)
    ax.plot([], [], color="grey", alpha=0.6, lw=0.9, label="fixed k/codec (each)")
    if "local" in series and best != "local":
        ax.plot(xs, series["local"], color="tab:blue", lw=1.2, marker=".", label="local (all layers on edge)")
    ax.plot(xs, series[best], color="tab:orange", lw=1.6, marker="s", ms=4, label=f"best fixed: {best}")
    oracle = [series[summary["oracle_choice"][sc.regime(i).name]][i] for i in xs]
    ax.plot(xs, oracle, color="black", ls="--", lw=1.4, label="oracle (best fixed per regime)")
    for p in names:
        if p in ADAPTIVE and p != "adaptive":
            ax.plot(xs, series[p], color="tab:purple", lw=1.4, ls=":", marker="^", ms=4,
                    label=f"{p} ({', '.join(f'{k}={v:g}' for k, v in ADAPTIVE[p].items())})")
    ax.plot(xs, series["adaptive"], color="tab:red", lw=2.2, marker="o", ms=5, label="adaptive (defaults)")
    ax.set_yscale("log")
    ax.set_xlabel("request")
    ax.set_ylabel("latency per request, s (log)")
    ax.set_xticks(xs)
    ax.set_xlim(-0.5, n - 0.5)
    ax.set_title(title, fontsize=10, pad=18)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run(args: Any) -> dict:
    from rich.console import Console
    from rich.table import Table
    from seamline.testing.linkemu import LinkEmulator

    from ._harness import cloud_process, load_average
    from ._weak import GAP_TARGET, SpeedGap, WeakDevice, calibrate_gap

    console = Console()
    if not console.is_terminal:
        console = Console(width=150)
    quick = bool(getattr(args, "quick", False))
    name = getattr(args, "model", None) or "demo"
    n_requests, prompt_tokens, new_tokens = (6, QUICK_PROMPT_TOKENS, 16) if quick else (12, 64, 24)
    sc = scenario(n_requests)
    adaptive_cfg = {"adaptive": {}} if quick else ADAPTIVE  # quick: the headline controller only
    fixed_cpu = os.environ.get(WEAK_CPU_ENV)
    target = float(os.environ.get(GAP_ENV, GAP_TARGET))

    console.print(f"[bold]bench adaptive[/bold]: model {name}, {n_requests} requests x ({prompt_tokens} prompt + "
                  f"{new_tokens} new tokens), regimes " + "; ".join(r.label for r in sc.regimes)
                  + f", trace {''.join(sc.regimes[g].name for g in sc.trace)}")
    src, bundle_dir = planned_bundle(name)
    rows: list[dict] = []
    t_start, load_before = time.time(), load_average()
    with WeakDevice(float(fixed_cpu or 1.0)) as weak, cloud_process(src, *cloud_args(1)) as (_, cloud_addr):
        host, port = cloud_addr.rsplit(":", 1)
        with LinkEmulator(host, int(port)) as emu, EdgeWorker() as worker:
            info = worker.call("init", timeout=300, bundle=str(bundle_dir), cloud=emu.address)
            L = info["num_layers"]
            if prompt_tokens + new_tokens > info["max_positions"]:
                raise SystemExit(f"{name} holds {info['max_positions']} positions: too few for {prompt_tokens} prompt + "
                                 f"{new_tokens} new tokens; use a model with a longer context")
            menu = menu_for(L, info["local_ok"], info["min_split"], quick)
            grid = menu.entries(L)
            fixed = [g[0] for g in grid]
            names = [*adaptive_cfg, *fixed]
            # Prompts whose all-local greedy continuation runs the full length (no early EOS), measured at
            # full speed before the quota: they are also the reference tokens for the fidelity column.
            cands = worker.call("prompts", text=TEXT, tokens=prompt_tokens, count=2 * n_requests)["prompts"]
            if info["local_ok"]:
                worker.call("policy", name="reference", kind="local")
            prompts, reference = [], []
            for ids in cands:
                if len(prompts) == n_requests:
                    break
                if not info["local_ok"]:
                    prompts.append(ids)
                    reference.append(None)
                    continue
                r = worker.call("run", policy="reference", prompt=ids, max_tokens=new_tokens)
                if len(r["tokens"]) == new_tokens:
                    prompts.append(ids)
                    reference.append(r["tokens"])
            if len(prompts) < n_requests:
                raise RuntimeError(f"only {len(prompts)} of {2 * n_requests} prompts continue for {new_tokens} "
                                   "tokens without EOS; use another model or text")
            for pname, k, codec in grid:
                kind = "local" if codec == "local" else "fixed"
                worker.call("policy", name=pname, kind=kind, split=k, codec=codec)
            for pname, config in adaptive_cfg.items():
                worker.call("policy", name=pname, kind="adaptive", codecs=list(menu.codecs),
                            splits=list(menu.controller_splits(L)), config=config)
            # The gap: the cloud `target` x faster per layer than this device, measured here and now.
            emu.set(bandwidth_bps=None, delay_ms=0)
            cloud = worker.call("cloud_layer_ms")
            edge_ms = lambda: worker.call("edge_layer_ms", timeout=300)["ms"]
            if fixed_cpu:
                full = edge_ms()
                weak.add(worker.pid)
                gap = SpeedGap(target, weak.method + f" (fixed by {WEAK_CPU_ENV})", weak.limited,
                               weak.cpu if weak.limited else None, None, full, edge_ms(), cloud["ms"])
            else:
                gap = calibrate_gap(weak, worker.pid, edge_ms, cloud["ms"], target,
                                    slow_down=lambda f: worker.call("slowdown", factor=f))
            console.print(f"speed gap: {gap.describe()}")
            from seamline.edge.config import EdgeConfig

            local_token_ms = None
            for pname in adaptive_cfg:  # the agent's start-up on this device: its own speed, under the gap
                halves = worker.call("calibrate", timeout=120, policy=pname, seconds=EdgeConfig.calibrate_s)["halves"]
                if halves and local_token_ms is None:
                    local_token_ms = sum(ms for _, ms in halves) / len(halves)
            sc = congested_for(sc, local_token_ms)
            console.print("regimes: " + "; ".join(r.label for r in sc.regimes)
                          + ("" if local_token_ms is None else f" (the device alone: {local_token_ms:.0f} ms a token)"))
            # Warm-up under the gap (ORT and the cloud's torch at every split; the controllers' first look at
            # this device), not counted.
            for pname in names:
                worker.call("run", timeout=600, policy=pname, prompt=prompts[0][:16], max_tokens=4)
            throttle0 = weak.stats()
            console.print(f"edge worker pid {worker.pid}; {len(names)} policies; menu {menu.describe(L)}; "
                          f"controller {'from measured profiles' if info['profiles'] else 'from size-based priors'}")
            for i, ids in enumerate(prompts):
                g = sc.trace[i]
                reg = sc.regimes[g]
                emu.set(bandwidth_bps=reg.bandwidth_bps, delay_ms=reg.rtt_ms / 2)
                order = random.Random(i).sample(names, len(names))  # no policy always follows the same one
                for pname in order:
                    r = worker.call("run", timeout=600, policy=pname, prompt=ids, max_tokens=new_tokens)
                    ref = reference[i]
                    r.update(policy=pname, request=i, regime=g, regime_name=reg.name,
                             matches_local=None if ref is None else r["tokens"] == ref,
                             tokens_agree=None if ref is None else _prefix(r["tokens"], ref) / max(1, len(ref)))
                    rows.append(r)
                mine = [r for r in rows if r["request"] == i]
                ad = next(r for r in mine if r["policy"] == "adaptive")
                fastest = min((r for r in mine if r["policy"] not in ADAPTIVE), key=lambda r: r["ms"])
                console.print(f"  request {i:2d} ({reg.name}): adaptive {ad['ms'] / 1e3:6.2f} s [{_picks(ad)}], "
                              f"fastest fixed {fastest['policy']} {fastest['ms'] / 1e3:.2f} s")
            throttle = weak.stats()
            emu_stats = emu.stats()

    summary = _summarize(rows, names, fixed, sc)
    ctl = next(r for r in reversed(rows) if r["policy"] == "adaptive").get("controller", {})
    decisions = [{"request": r["request"], "regime": r["regime_name"], **d}
                 for r in rows if r["policy"] == "adaptive" for d in r.get("decisions", [])]
    match = {p: _mean([r["matches_local"] for r in rows if r["policy"] == p]) for p in names}
    in_run = layer_gap_in_run(rows, grid)
    summary.update({
        "model": name, "num_layers": L, "menu": menu.describe(L),
        "menu_entries": fixed, "think_s": THINK_S,
        "edge_vs_cloud_layer_ms": gap.ratio, "speed_gap": gap.to_dict(),
        "edge_vs_cloud_layer_ms_in_run": None if in_run is None else in_run["ratio"], "speed_gap_in_run": in_run,
        "weak_device": gap.method, "weak_device_limited": gap.limited, "weak_cpu_share": gap.cpu_share,
        "edge_throttled_s": (throttle.get("throttled_s", 0.0) - throttle0.get("throttled_s", 0.0)) if throttle else None,
        "workload": {"requests": n_requests, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
                     "greedy": True},
        "regimes": [asdict(r) | {"requests": [i for i in range(n_requests) if sc.trace[i] == g]}
                    for g, r in enumerate(sc.regimes)],
        "trace": "".join(sc.regimes[g].name for g in sc.trace),
        "adaptive_switches": ctl.get("switches"), "adaptive_decisions": len(decisions),
        "adaptive_resplits": sum(r["resplits"] for r in rows if r["policy"] == "adaptive"),
        "adaptive_probes": sum(d["kind"] == "probe" for d in decisions),
        # Does the generation loop report all-local steps to the policy? Without them the controller cannot
        # learn what running locally costs on this device (it keeps the profile's full-speed figure).
        "local_steps_observed": any(r["observed"]["local"] for r in rows if r["policy"] == "local"),
        "greedy_match_vs_local": match,
        "controller": "AdaptivePolicy.from_manifest defaults (seamline edge --adaptive) on the menu above; "
                      + ("profiles from partition --split auto" if info["profiles"] else "size-based priors")
                      + "; one uncounted warm-up request like every policy",
        "cloud": "seamline cloud, CPU, 1 torch thread (subprocess)",
        "link": "LinkEmulator on loopback, regimes applied per request index; RTT split into two one-way delays",
        "load_average_before_after": [load_before, load_average()],
        "bench_wall_s": round(time.time() - t_start, 1),
    })

    edge_desc = (f"{gap.cpu_share:.1%} of a core" if gap.limited else
                 f"slowed {gap.slowdown:.1f}x" if gap.slowdown else "NOT weakened")
    edge_desc += f", cloud {gap.ratio:.1f}x faster per layer"
    table = Table(title=f"bench adaptive: {name}, {n_requests} x ({prompt_tokens} + {new_tokens} tokens); "
                        f"edge: {edge_desc}")
    table.add_column("policy")
    for g in sc.present():
        table.add_column(f"{sc.regimes[g].name} s", justify="right")
    for col in ("total s", "vs oracle", "greedy = local", "note"):
        table.add_column(col, justify="right")
    oracle_total = summary["oracle_total_s"]
    for p in sorted(names, key=lambda p: summary["total_s"][p]):
        note = []
        if p == summary["best_fixed"]:
            note.append("best fixed")
        note += [f"oracle in {g}" for g, q in summary["oracle_choice"].items() if q == p]
        m = match.get(p)
        table.add_row(f"[bold red]{p}[/]" if p in ADAPTIVE else p,
                      *[f"{summary['per_regime_s'][p][g]:.2f}" for g in summary["oracle_choice"]],
                      f"{summary['total_s'][p]:.2f}", f"{summary['total_s'][p] / oracle_total:.2f}x",
                      "-" if m is None else f"{m:.0%}", ", ".join(note))
    table.add_row("oracle", *[f"{summary['per_regime_s'][q][g]:.2f}" for g, q in summary["oracle_choice"].items()],
                  f"{oracle_total:.2f}", "1.00x", "", " / ".join(summary["oracle_choice"].values()))
    console.print(table)
    if not summary["local_steps_observed"]:
        console.print("[yellow]note: the generation loop reported no all-local step to the split policy, so the "
                      "controller predicts local from the profile (full speed), not from this device[/yellow]")
    dt = Table(title="adaptive decisions per request (*resplit = mid-generation move, *probe = a remote request "
                     "to measure the link)")
    for col in ("request", "regime", *(f"{p} decisions" for p in adaptive_cfg), *(f"{p} s" for p in adaptive_cfg),
                "oracle s"):
        dt.add_column(col, justify="right")
    for i in range(n_requests):
        ads = [next(r for r in rows if r["policy"] == p and r["request"] == i) for p in adaptive_cfg]
        g = sc.regime(i).name
        orc = next(r for r in rows if r["policy"] == summary["oracle_choice"][g] and r["request"] == i)
        dt.add_row(str(i), g, *(_picks(a) for a in ads), *(f"{a['ms'] / 1e3:.2f}" for a in ads),
                   f"{orc['ms'] / 1e3:.2f}")
    console.print(dt)
    short = {k: summary[k] for k in ("adaptive_vs_oracle", "adaptive_vs_best_fixed", "oracle_vs_best_fixed",
                                     "edge_vs_cloud_layer_ms", "edge_vs_cloud_layer_ms_in_run", "best_fixed",
                                     "oracle_choice", "adaptive_switches", "adaptive_resplits", "variants",
                                     "targets", "menu", "weak_device", "load_average_before_after")}
    console.print(short)
    json_path = getattr(args, "json", None)
    if json_path:
        png = Path(json_path).with_suffix(".png")
        png.parent.mkdir(parents=True, exist_ok=True)
        title = (f"seamline bench adaptive: {name}; edge {edge_desc}"
                 f", cloud CPU 1 thread; adaptive/oracle {summary['adaptive_vs_oracle']:.2f}, "
                 f"adaptive/best fixed ({summary['best_fixed']}) {summary['adaptive_vs_best_fixed']:.2f}")
        summary["plot"] = str(_plot(rows, names, summary, sc, png, title))
        console.print(f"plot: {png}")
    return {"scenario": "adaptive", "rows": rows, "summary": summary, "adaptive_decisions": decisions,
            "link_emulator": emu_stats, "edge_cpu_stat": throttle}


def _picks(row: dict) -> str:
    """The adaptive policy's decisions in one request: ``1/int8 -> 6/local*`` (* = resplit or probe)."""
    return " -> ".join(f"{d['split']}/{d['codec']}" + ("" if d["kind"] == "request" else f"*{d['kind'][:5]}")
                       for d in row.get("decisions", []))


def _prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _mean(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


if __name__ == "__main__":
    if "--worker" in sys.argv[1:]:
        raise SystemExit(worker_main())
    print("run `seamline bench adaptive --json OUT [--quick] [--model demo|gpt2-124m|DIR]`", file=sys.stderr)
    raise SystemExit(2)
