"""Inversion attacks on split hidden states: what a cloud holding the weights can read back.

Every attack maps the hidden state of one position (the tensor the edge sends at split k) to a
ranking of the vocabulary; top-1 / top-5 recovery is the share of positions whose true token is
ranked first / in the first five.

- ``nn-embed``: nearest neighbour (L2) against the embedding table at the same position. Exact at
  k = 0; no training.
- ``nn-context-free``: nearest neighbour against every token pushed alone (no context) through
  blocks [0, k) at the same position; no training.
- ``linear``: a linear map of the standardised state, scored against the model's own embedding
  table, trained with cross-entropy on public text.
- ``mlp``: a small MLP over a window of positions (the cloud sees the whole prompt) scored the
  same way.

The learned attacks train on clean states; they are evaluated on held-out text, clean and after
each wire codec's encode/decode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

ATTACKS = ("nn-embed", "nn-context-free", "linear", "mlp")
LEARNED = ("linear", "mlp")


@dataclass
class TrainSettings:
    epochs: int = 3
    batch: int = 256
    lr: float = 2e-3
    hidden: int = 512  # MLP width
    context: int = 2  # MLP sees positions t-context .. t+context
    mlp_tokens: int = 8192  # the MLP trains on at most this many of the training tokens (the linear on all)
    seed: int = 0


@dataclass
class Hits:
    """Top-1 / top-5 hit counts of one (attack, k, codec)."""

    top1: int = 0
    top5: int = 0
    n: int = 0

    def add(self, ranked: torch.Tensor, target: torch.Tensor) -> None:
        """``ranked``: (N, >=5) token ids best first; ``target``: (N,) true ids."""
        self.top1 += int((ranked[:, 0] == target).sum())
        self.top5 += int((ranked[:, :5] == target[:, None]).any(1).sum())
        self.n += int(target.numel())

    def rates(self) -> tuple[float, float]:
        return (self.top1 / self.n, self.top5 / self.n) if self.n else (0.0, 0.0)


# ----------------------------------------------------------------------------------- model pieces


@torch.no_grad()
def embed_windows(adapter, windows: torch.Tensor) -> torch.Tensor:
    """(B, W) token ids at positions 0..W-1 -> (B, W, C) hidden after the embedding."""
    pos = torch.arange(windows.shape[1]).expand_as(windows)
    return adapter.embed(windows, pos).float()


@torch.no_grad()
def run_block(adapter, i: int, h: torch.Tensor, positions: torch.Tensor | None = None, chunk: int = 64
              ) -> torch.Tensor:
    """Block i on (B, T, C) states with no past, in batch chunks; positions (B, T) default 0..T-1."""
    out = []
    for s in range(0, h.shape[0], chunk):
        x = h[s:s + chunk]
        pos = (torch.arange(x.shape[1]).expand(x.shape[0], -1) if positions is None
               else positions[s:s + chunk])
        mask = None if adapter.shape.causal else torch.ones(x.shape[:2], dtype=torch.long)
        y, _, _ = adapter.block(i, x, None, None, pos, mask)
        out.append(y.float())
    return torch.cat(out)


@torch.no_grad()
def vocab_table(adapter, p: int = 0) -> torch.Tensor:
    """(V, C): every token embedded at position p."""
    V = adapter.shape.vocab_size
    return adapter.embed(torch.arange(V)[None], torch.full((1, V), p))[0].float()


class TokenTables:
    """The vocabulary at each position: embedded (``nn-embed``) and pushed alone through the blocks.

    ``positions`` is 1 when the embedding and a lone token's trip through the blocks do not depend
    on the position (rotary models: attention over one token ignores the rotation), else the
    window length W (learned absolute positions, GPT-2): one table per position.
    """

    def __init__(self, adapter, window: int, chunk: int = 2048):
        self.adapter, self.chunk = adapter, chunk
        probe = torch.arange(min(adapter.shape.vocab_size, 32))
        q = min(window - 1, 3)
        a, b = (adapter.embed(probe[None], torch.full((1, len(probe)), p))[0].float() for p in (0, q))
        a1 = run_block(adapter, 0, a[:, None], torch.zeros(len(probe), 1, dtype=torch.long))
        b1 = run_block(adapter, 0, b[:, None], torch.full((len(probe), 1), q))
        same = torch.allclose(a, b, atol=1e-6) and torch.allclose(a1, b1, atol=1e-5)
        self.positions = 1 if same else window
        self.embedded = torch.stack([vocab_table(adapter, p) for p in range(self.positions)])  # (P, V, C)
        self.pushed = self.embedded.clone()  # advanced block by block

    @torch.no_grad()
    def advance(self, i: int) -> None:
        """Push every token alone through block i (tables for split i+1)."""
        for p in range(self.positions):
            x = self.pushed[p][:, None]  # (V, 1, C): V one-token sequences
            pos = torch.full((x.shape[0], 1), p)
            self.pushed[p] = run_block(self.adapter, i, x, pos, chunk=self.chunk)[:, 0]


SCORE_BYTES = 1 << 27  # a (rows, vocabulary) float32 score block stays under 128 MiB (SmolLM2: 49,152 tokens)


def score_chunk(vocab: int) -> int:
    """Rows scored at once against a ``vocab``-token table."""
    return max(64, SCORE_BYTES // (4 * max(1, vocab)))


@torch.no_grad()
def nearest(states: torch.Tensor, tables: torch.Tensor, topk: int = 5, chunk: int | None = None) -> torch.Tensor:
    """states (B, W, C), tables (P, V, C) with P in {1, W} -> (B, W, topk) nearest token ids (L2)."""
    chunk = chunk or score_chunk(tables.shape[1])
    B, W, C = states.shape
    out = torch.empty(B, W, topk, dtype=torch.long)
    if tables.shape[0] == 1:
        flat = states.reshape(-1, C)
        t = tables[0]
        tn = (t * t).sum(1)
        res = []
        for s in range(0, flat.shape[0], chunk):
            x = flat[s:s + chunk]
            res.append((tn[None] - 2 * x @ t.T).topk(topk, largest=False).indices)
        return torch.cat(res).reshape(B, W, topk)
    for p in range(W):
        t = tables[p]
        d = (t * t).sum(1)[None] - 2 * states[:, p] @ t.T  # (B, V); |x|^2 is constant per row
        out[:, p] = d.topk(topk, largest=False).indices
    return out


# ------------------------------------------------------------------------------------- inverters


class Inverter(torch.nn.Module):
    """The MLP: standardised states -> a C-vector scored against the embedding table (+ a bias per token)."""

    def __init__(self, kind: str, hidden_size: int, table: torch.Tensor, settings: TrainSettings):
        super().__init__()
        C = hidden_size
        self.kind, self.context = kind, settings.context
        width = C * (2 * self.context + 1)
        self.net = torch.nn.Sequential(torch.nn.Linear(width, settings.hidden), torch.nn.GELU(),
                                       torch.nn.Linear(settings.hidden, settings.hidden), torch.nn.GELU(),
                                       torch.nn.Linear(settings.hidden, C))
        t = table - table.mean(0, keepdim=True)
        self.register_buffer("table", t / t.norm(dim=1).mean())  # (V, C), rows ~ unit norm
        self.scale = torch.nn.Parameter(torch.tensor(10.0))
        self.bias = torch.nn.Parameter(torch.zeros(table.shape[0]))

    def features(self, h: torch.Tensor) -> torch.Tensor:
        """(B, W, C) standardised states -> (B*W, C*(2c+1)): each position with its neighbours."""
        c = self.context
        if c == 0:
            return h.reshape(-1, h.shape[-1])
        hp = F.pad(h, (0, 0, c, c))  # zeros beyond the window's ends
        return torch.cat([hp[:, o:o + h.shape[1]] for o in range(2 * c + 1)], dim=-1).reshape(h.shape[0] * h.shape[1], -1)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.scale * self.net(feats) @ self.table.T + self.bias


class Standardizer:
    def __init__(self, h: torch.Tensor):
        flat = h.reshape(-1, h.shape[-1])
        self.mean, self.std = flat.mean(0), flat.std(0).clamp_min(1e-6)

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        return (h - self.mean) / self.std


class LinearInverter:
    """Ridge regression of the token's embedding from the standardised state (closed form, so it can use
    every training token); ranks the vocabulary by cosine similarity to the predicted embedding."""

    def __init__(self, train_h: torch.Tensor, train_ids: torch.Tensor, table: torch.Tensor, ridge: float = 1e-2):
        self.std = Standardizer(train_h)
        x = self.std(train_h).reshape(-1, train_h.shape[-1]).double()
        x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
        y = table.double()[train_ids.reshape(-1)]
        gram = x.T @ x + ridge * len(x) * torch.eye(x.shape[1], dtype=x.dtype)
        self.w = torch.linalg.solve(gram, x.T @ y).float()
        self.table = F.normalize(table.float(), dim=1)

    @torch.no_grad()
    def rank(self, h: torch.Tensor, topk: int = 5, chunk: int | None = None) -> torch.Tensor:
        chunk = chunk or score_chunk(self.table.shape[0])
        x = self.std(h).reshape(-1, h.shape[-1])
        x = torch.cat([x, torch.ones(len(x), 1)], 1)
        res = [(F.normalize(x[s:s + chunk] @ self.w, dim=1) @ self.table.T).topk(topk).indices
               for s in range(0, len(x), chunk)]
        return torch.cat(res).reshape(*h.shape[:2], topk)


class MLPInverter:
    """The windowed MLP with its standardiser, trained with cross-entropy over the vocabulary."""

    def __init__(self, train_h: torch.Tensor, train_ids: torch.Tensor, table: torch.Tensor, settings: TrainSettings):
        torch.manual_seed(settings.seed)
        rows = max(1, settings.mlp_tokens // train_h.shape[1])
        train_h, train_ids = train_h[:rows], train_ids[:rows]
        self.std = Standardizer(train_h)
        self.net = inv = Inverter("mlp", train_h.shape[-1], table, settings)
        feats = inv.features(self.std(train_h))
        target = train_ids.reshape(-1)
        opt = torch.optim.AdamW(inv.parameters(), lr=settings.lr, weight_decay=1e-4)
        steps = settings.epochs * max(1, -(-len(target) // settings.batch))
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=settings.lr, total_steps=steps, pct_start=0.1)
        gen = torch.Generator().manual_seed(settings.seed)
        inv.train()
        for _ in range(settings.epochs):
            perm = torch.randperm(len(target), generator=gen)
            for s in range(0, len(target), settings.batch):
                idx = perm[s:s + settings.batch]
                loss = F.cross_entropy(inv(feats[idx]), target[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        inv.eval()

    @torch.no_grad()
    def rank(self, h: torch.Tensor, topk: int = 5, chunk: int | None = None) -> torch.Tensor:
        chunk = chunk or score_chunk(self.net.table.shape[0])
        feats = self.net.features(self.std(h))
        res = [self.net(feats[s:s + chunk]).topk(topk).indices for s in range(0, feats.shape[0], chunk)]
        return torch.cat(res).reshape(*h.shape[:2], topk)


def train_inverter(kind: str, train_h: torch.Tensor, train_ids: torch.Tensor, table: torch.Tensor,
                   settings: TrainSettings) -> LinearInverter | MLPInverter:
    """Fit one inverter on clean training states (B, W, C) with their token ids (B, W)."""
    if kind == "linear":
        return LinearInverter(train_h, train_ids, table)
    return MLPInverter(train_h, train_ids, table, settings)
