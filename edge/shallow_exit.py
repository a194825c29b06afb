"""ShallowExit: a drafter that reads the edge's own layer-k state (issue 20). ONNX Runtime only, no torch.

``partition --draft-head`` ships, per split k, a small head over the hidden state after block k-1
(a trained residual adapter + the model's own final norm and LM head; ``partitioner/draft_head.py``).
Drafting γ tokens: the argmax of the head on the newest token's layer-k row is the first draft; the
edge's k layers run on it (``ctx.extend``, rows the speculative step sends anyway), and the head on
that new row gives the next draft, γ times. Every extended token is returned, as the ``Drafter``
contract of ``drafters.py`` asks. The manifest records each head's acceptance measured on held-out
text (top-1 agreement with the full model's greedy token), which the controller may use as a prior.
"""

from __future__ import annotations

import threading
import weakref
from pathlib import Path

import numpy as np
from seamline.protos.bundle import BundleError, Manifest, bundle_file

from .drafters import DraftContext

NAME = "shallow-exit"


class ShallowExit:
    """Greedy drafts from the draft head of one split."""

    name = NAME
    uses_hidden = True  # the loop computes ``hidden_last`` (the newest token's layer-k row) for it

    def __init__(self, graph_path: Path, k: int, acceptance: float | None = None, threads: int = 1,
                 shown: Path | None = None):
        from .runtime import _Graph

        self.k = k
        self.acceptance = acceptance  # measured at partition time on held-out text (None: unknown)
        self.graph = _Graph(graph_path, threads, shown or graph_path, need=("hidden",), outputs=2)
        names = [o.name for o in self.graph.session.get_outputs()]
        if "draft_ids" not in names:
            raise BundleError(f"{shown or graph_path}: a draft head graph has the output `draft_ids` (it has "
                              f"{names}); re-run `partition --draft-head`")
        self._out = ["draft_ids"]

    @classmethod
    def from_bundle(cls, bundle_dir: Path | str, manifest: Manifest, k: int, threads: int = 1) -> ShallowExit:
        """The draft head of split ``k``; LookupError when the bundle ships none for it."""
        entry = manifest.draft_heads.get(str(k))
        if entry is None:
            shipped = ", ".join(sorted(manifest.draft_heads, key=int)) or "none"
            raise LookupError(f"the bundle has no shallow-exit draft head for split {k} (it has: {shipped}); "
                              f"re-run `partition --draft-head --draft-splits all` (or include {k}), or use "
                              "--speculate prompt-lookup")
        shown = Path(bundle_dir) / entry.graph
        return cls(bundle_file(bundle_dir, entry.graph), k, entry.acceptance, threads, shown)

    def next_ids(self, hidden: np.ndarray) -> np.ndarray:
        """Layer-k rows (T, C) -> the head's greedy next token after each row, (T,) int64."""
        h = np.ascontiguousarray(hidden, dtype=np.float32).reshape(1, -1, hidden.shape[-1])  # (1, T, C)
        (ids,) = self.graph.session.run(self._out, {"hidden": h})
        return ids[0]

    def logits(self, hidden: np.ndarray) -> np.ndarray:
        """Layer-k rows (T, C) -> the head's logits (T, V)."""
        h = np.ascontiguousarray(hidden, dtype=np.float32).reshape(1, -1, hidden.shape[-1])
        (logits,) = self.graph.session.run(["logits"], {"hidden": h})
        return logits[0]

    def draft(self, ctx: DraftContext, gamma: int) -> list[int]:
        if gamma <= 0 or ctx.hidden_last is None:
            return []
        h = ctx.hidden_last
        out: list[int] = []
        for _ in range(gamma):
            d = int(self.next_ids(h)[0])
            out.append(d)
            h = ctx.extend(d)  # (C,) row of the drafted token: the head's next input, and the step's row
        return out


_loaded: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # runtime -> {k: ShallowExit}
_lock = threading.Lock()


def drafter_for(runtime, k: int) -> ShallowExit:
    """The ShallowExit drafter of ``runtime``'s bundle at split ``k`` (registered in ``drafters.DRAFTERS``;
    loaded once per runtime and split, it keeps no per-generation state); LookupError when there is none."""
    with _lock:
        per = _loaded.setdefault(runtime, {})
        if k not in per:
            try:
                per[k] = ShallowExit.from_bundle(runtime.bundle_dir, runtime.manifest, k)
            except BundleError as e:
                raise LookupError(str(e)) from None
        return per[k]
