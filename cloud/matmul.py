"""CPU matmul layouts for the cloud's linear layers, chosen by measurement when the server starts.

A decode pass multiplies a few rows (one per session of a batch, or the g + 1 rows of a speculative
verify) by every weight matrix of the back half and the head: the pass streams the weights from memory,
and on CPU how fast the BLAS streams them depends on the weight's layout and on which side of the
product it sits, differently for each row count. Measured on this project's build host (AMD EPYC, torch
2.13's MKL, one thread; ``seamline bench e2e``'s GPT-2-small back half of 6 blocks + head, 512 cached
positions): the head's ``F.linear`` took 12.9 ms for one row and 32.5 / 43.8 ms for 2 / 3 rows, while the
same product with the weight on the left (``W @ x.T``) took 8.2 / 12.2 ms for 2 / 3 rows, and a
(in, out) copy on the right 8.1 ms for one row: a verify of 3 rows cost 2.5x a one-row pass. So every
``nn.Linear`` and ``Conv1D`` (GPT-2) of the model gets a :class:`TunedLinear` forward with three layouts,

- ``native``: the module's own product (``nn.Linear``: ``x @ W.T`` with W (out, in); ``Conv1D``:
  ``x @ W`` with W (in, out));
- ``left``: ``(W_oi @ x.T).T`` with the (out, in) matrix on the left;
- ``right``: ``x @ W_io`` with an (in, out) matrix on the right,

and :func:`tune` times whole passes (every block from ``first_layer`` on, then the head) at each row count
of :data:`TUNED_ROWS` in every layout, alternating the layouts round by round, and keeps a layout only
where it beats ``native`` by :data:`MIN_GAIN`; other row counts (prefill chunks, big batches), and those not
reached within :data:`BUDGET_S` (a big model on a slow CPU), stay native.
A layout that needs the other orientation keeps a transposed copy of the weight: while tuning, every served
weight has one (memory: the served weights' size again, the start-up peak; tuning is skipped when
``/proc/meminfo``'s MemAvailable cannot hold them twice over), and afterwards only the copies a chosen layout reads
stay. A copy follows its weight: one changed in place, or moved to another dtype or device, is copied again.
The layout is chosen per row count for all the served modules at once (a whole pass is what is timed; a layout
per group of same-shaped modules was measured and not kept, see the README). The three compute the same sums
in a different order, so logits can differ in the last bits between layouts, as they already do between a
one-row and a batched pass. CUDA is left alone (not measured: no GPU was at hand).
``seamline cloud --no-tune-matmul`` turns it off.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass, field

import torch

log = logging.getLogger("seamline.cloud.matmul")

LAYOUTS = ("native", "left", "right")
TUNED_ROWS = tuple(range(1, 9))  # decode batches of up to 8 rows and speculative verifies of up to 7 drafts
MIN_GAIN = 0.05  # a layout replaces native only when its median pass is this much faster
ROUNDS = 5  # timed passes per (rows, layout), the layouts taking turns
BUDGET_S = 30.0  # tuning stops after this long (a big model on a slow CPU): the row counts left keep native
MEMORY_HEADROOM = 2.0  # tuning needs the copies' size times this in MemAvailable (the copies, and room to spare)


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a cloud dependency
        return None
    return Conv1D


class TunedLinear:
    """The forward of one ``nn.Linear`` or ``Conv1D`` module with a layout per row count (see the top)."""

    def __init__(self, module: torch.nn.Module, transposed: bool):
        # transposed: the module's weight is (in, out) (Conv1D); else (out, in) (nn.Linear)
        self.module, self.transposed = module, transposed
        self.native = module.forward
        self.layout: dict[int, str] = {}
        self._copy: torch.Tensor | None = None  # the weight in the orientation the module does not hold
        self._copy_of: tuple | None = None  # the weight's storage, version, dtype and device the copy was made from

    def _weight(self, orientation: str) -> torch.Tensor:
        w = self.module.weight.detach()
        held = "io" if self.transposed else "oi"
        if orientation == held:
            return w
        source = (w.data_ptr(), w._version, w.dtype, w.device)
        if self._copy is None or self._copy_of != source:  # a weight changed in place or moved: copy it again
            self._copy, self._copy_of = w.t().contiguous(), source
        return self._copy

    def copy_bytes(self) -> int:
        """What the transposed copy takes (made or not): the weight's size."""
        w = self.module.weight
        return w.numel() * w.element_size()

    def prepare(self, layout: str) -> None:
        """Make the copy ``layout`` needs (before timing it, so the timing does not include it)."""
        if layout == "left":
            self._weight("oi")
        elif layout == "right":
            self._weight("io")

    def drop_unused(self) -> None:
        """Free the transposed copy when no chosen layout reads it."""
        held = "right" if self.transposed else "left"
        if not any(v not in ("native", held) for v in self.layout.values()):
            self._copy = self._copy_of = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        layout = self.layout.get(rows)
        if layout is None or layout == "native":
            return self.native(x)
        bias = self.module.bias
        x2 = x.reshape(rows, x.shape[-1])
        if layout == "left":
            w = self._weight("oi")
            y = (torch.mm(w, x2.t()) if bias is None else torch.addmm(bias.detach()[:, None], w, x2.t())).t()
            y = y.contiguous()  # (rows, out) in the usual layout for the views and kernels that follow
        else:
            w = self._weight("io")
            y = torch.mm(x2, w) if bias is None else torch.addmm(bias.detach(), x2, w)
        return y.reshape(*x.shape[:-1], y.shape[-1])


@dataclass
class Tuning:
    """What :func:`tune` chose: a layout per row count, and the median pass ms of each layout at each."""

    layouts: dict[int, str] = field(default_factory=dict)
    pass_ms: dict[int, dict[str, float]] = field(default_factory=dict)
    copies_mb: float = 0.0  # transposed copies kept
    skipped: list[int] = field(default_factory=list)  # row counts past the time budget (native)
    no_memory: str = ""  # why tuning did not run: the copies would not fit (everything native)

    def summary(self) -> str:
        if self.no_memory:
            return f"not tuned (native): {self.no_memory}"
        changed = {r: v for r, v in self.layouts.items() if v != "native"}
        parts = [f"{r} row{'s' if r > 1 else ''}: {v} {self.pass_ms[r][v]:.1f} ms against native "
                 f"{self.pass_ms[r]['native']:.1f}" for r, v in sorted(changed.items())]
        text = "; ".join(parts) + f" (transposed copies {self.copies_mb:.0f} MiB)" if parts else "native everywhere"
        if self.skipped:
            text += f"; not tuned within the time budget (native): {', '.join(map(str, self.skipped))} rows"
        return text


def choose(pass_ms: dict[str, float], min_gain: float = MIN_GAIN) -> str:
    """The layout kept for one row count: the fastest median pass, if it beats native by ``min_gain``."""
    best = min(pass_ms, key=pass_ms.get)
    return best if pass_ms[best] < pass_ms["native"] * (1 - min_gain) else "native"


def available_bytes() -> int | None:
    """MemAvailable from ``/proc/meminfo`` (Linux), or None where there is none."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def served_modules(adapter, first_layer: int) -> list[torch.nn.Module]:
    """The modules a cloud pass runs: blocks ``[first_layer, L)`` and the model's output head."""
    mods = [adapter.block_module(i) for i in range(first_layer, adapter.shape.num_layers)]
    head = adapter.model.get_output_embeddings() if hasattr(adapter.model, "get_output_embeddings") else None
    return mods + ([head] if head is not None else [])


def install(modules: list[torch.nn.Module]) -> list[TunedLinear]:
    """Give every ``nn.Linear`` / ``Conv1D`` in ``modules`` a :class:`TunedLinear` forward (native until tuned)."""
    conv1d = _conv1d_type()
    tuned = []
    for m in (sub for top in modules for sub in top.modules()):
        if isinstance(m.forward, TunedLinear):
            tuned.append(m.forward)
        elif isinstance(m, torch.nn.Linear):
            tuned.append(TunedLinear(m, transposed=False))
        elif conv1d is not None and isinstance(m, conv1d):
            tuned.append(TunedLinear(m, transposed=True))
        else:
            continue
        m.forward = tuned[-1]
    return tuned


@torch.inference_mode()
def tune(adapter, first_layer: int, dtype: torch.dtype, rows: tuple[int, ...] = TUNED_ROWS,
         rounds: int = ROUNDS, budget_s: float = BUDGET_S, available: int | None = None) -> Tuning:
    """Install :class:`TunedLinear` on the adapter's model and choose a layout per row count by timing passes of
    blocks ``[first_layer, L)`` and the head over that many rows (CPU; see the top). Row counts not finished
    within ``budget_s`` keep native (``Tuning.skipped``); when ``available`` bytes (None: MemAvailable)
    cannot hold the transposed copies :data:`MEMORY_HEADROOM` times over, nothing is tuned (``Tuning.no_memory``)."""
    linears = install(served_modules(adapter, first_layer))
    s = adapter.shape
    gen = torch.Generator().manual_seed(0)
    result = Tuning()
    if not linears:
        return result
    need = sum(t.copy_bytes() for t in linears)
    available = available_bytes() if available is None else available
    if available is not None and need * MEMORY_HEADROOM > available:
        result.no_memory = (f"the transposed copies ({need / 2**20:.0f} MiB) need {MEMORY_HEADROOM:g}x that in "
                            f"available memory, {available / 2**20:.0f} MiB is available")
        return result
    if budget_s <= 0:  # nothing can be timed: no copies either
        result.skipped = list(rows)
        return result
    deadline = time.perf_counter() + budget_s
    for t in linears:  # the copies made once, before any timing
        for layout in LAYOUTS:
            t.prepare(layout)

    def set_layout(r: int, layout: str) -> None:
        for t in linears:
            t.layout[r] = layout

    for r in rows:
        if time.perf_counter() > deadline:
            result.skipped.append(r)
            continue
        x = (torch.randn(1, r, s.hidden_size, generator=gen) * 0.5).to(dtype)
        pos = torch.arange(r)[None]

        def one_pass(x=x, pos=pos):  # a decode pass of r rows: blocks and head see r rows each
            h = x
            for i in range(first_layer, s.num_layers):
                h, _, _ = adapter.block(i, h, None, None, pos)
            adapter.head(h)

        times: dict[str, list[float]] = {v: [] for v in LAYOUTS}
        for layout in LAYOUTS:  # every layout warmed up before any timing
            set_layout(r, layout)
            one_pass()
        done = 0
        while done < rounds and time.perf_counter() <= deadline:
            for layout in LAYOUTS:
                set_layout(r, layout)
                t0 = time.perf_counter()
                one_pass()
                times[layout].append((time.perf_counter() - t0) * 1e3)
            done += 1
        if done < rounds:  # cut short by the budget: too few timings to choose on, the module's own product
            for t in linears:
                t.layout.pop(r, None)
            result.skipped.append(r)
            continue
        med = {v: statistics.median(ts) for v, ts in times.items()}
        choice = choose(med)
        set_layout(r, choice)
        result.layouts[r], result.pass_ms[r] = choice, med
    for t in linears:
        t.drop_unused()
    result.copies_mb = sum(t.copy_bytes() for t in linears if t._copy is not None) / 2**20
    return result
