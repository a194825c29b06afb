"""``GenerationEngine``: what every generation shares — the runtime, its worker thread, the link, the policy.

``start(request)`` validates a request against the model and returns a :class:`Generation`
(``generation.py``), whose ``events()`` run the loop.

``tokenize(text)`` runs the tokenizer off the event loop (the tokenizers library releases the GIL
in ``encode_batch``), at most ``TOKENIZE_THREADS`` at a time, and checks the context first where
the text allows: a prompt far over the context is refused after tokenizing a prefix of it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time

import numpy as np
from seamline.protos.bundle import Manifest

from .chat import ChatFormat
from .config import EdgeConfig
from .errors import BadRequest
from .generation import Generation
from .link import CloudLink
from .messages import GenerationRequest, GenerationResult, SamplingParams, StepStats
from .openai_compat import RequestLimits
from .policy import SplitPolicy
from .runtime import EdgeRuntime
from .worker import ComputeWorker

TOKENIZE_THREADS = 2
log = logging.getLogger("seamline.edge")
CALIBRATION_CONTEXT = 16  # positions before the timed tokens of ``calibrate``
CALIBRATION_TOKENS = 256  # the most tokens ``calibrate`` generates, however fast the device
PREFIX_CHARS_PER_POSITION = 8  # the first prefix tried: 8 characters per context position
_MARGIN = 8  # tokens a prefix may count beyond the full text's (special tokens, a normalizer)


class GenerationEngine:
    """What every generation shares: the runtime, its worker thread, the cloud link and the policy."""

    def __init__(self, runtime: EdgeRuntime, worker: ComputeWorker, link: CloudLink | None,
                 policy: SplitPolicy, config: EdgeConfig):
        self.runtime = runtime
        self.manifest: Manifest = runtime.manifest
        self.worker = worker
        self.link = link
        self.policy = policy
        self.config = config
        self.chat = ChatFormat.for_runtime(runtime)  # the model's chat template, else the plain format
        self._tokenizing: asyncio.Semaphore | None = None

    def limits(self) -> RequestLimits:
        """What the API checks a request against (the agent's settings, the model's sizes)."""
        c, m = self.config, self.manifest
        return RequestLimits(default_max_tokens=c.default_max_tokens, deadline=c.deadline,
                             vocab_size=m.vocab_size, max_positions=m.max_positions,
                             max_prompt_chars=c.max_prompt_chars)

    async def calibrate(self, seconds: float) -> list[tuple[int, float]]:
        """Time ``seconds`` of a greedy generation with every layer on this device (a random prompt of
        ``CALIBRATION_CONTEXT`` ids) through the generation loop itself, whose local tokens reach the split
        policy as any local generation's do: the controller then starts from this device's speed rather than
        the bundle's profile, which was measured where ``partition --split auto`` ran. Sustained work through
        the same loop, as a request is: on a device held to a CPU quota a lone short call runs at full speed,
        and the loop's own work per token (picking, text, events) takes its share of the device (timing the
        model's calls alone read 50 ms per token on the demo at 4 % of a core where generations took 80).
        Returns (mean position, ms per token) of each half of the tokens; nothing without every layer here."""
        m = self.manifest
        if seconds <= 0 or not m.has_all_layers or m.max_positions < CALIBRATION_CONTEXT + 5:
            return []
        ids = tuple(int(x) for x in np.random.default_rng(0).integers(0, m.vocab_size, CALIBRATION_CONTEXT))
        # at most CALIBRATION_TOKENS: the edge cache is made for the whole request up front
        request = GenerationRequest(ids, min(m.max_positions - CALIBRATION_CONTEXT - 1, CALIBRATION_TOKENS),
                                    SamplingParams())
        gen = Generation(self, self.check(request), calibration=True)
        stamps: list[float] = []  # when each token arrived (the first one carries the prefill: not timed)
        events = gen.events()
        try:
            async for event in events:
                stamps.extend(time.perf_counter() for _ in event.tokens)
                if len(stamps) >= 5 and stamps[-1] - stamps[0] >= seconds:
                    break
        finally:
            await events.aclose()
        gaps = [(CALIBRATION_CONTEXT + i, (b - a) * 1e3) for i, (a, b) in enumerate(itertools.pairwise(stamps), 1)]
        halves = [gaps[: len(gaps) // 2], gaps[len(gaps) // 2:]]
        await self._time_edge_blocks(ids, seconds / 2)
        return [(sum(p for p, _ in h) // len(h), sum(ms for _, ms in h) / len(h)) for h in halves if h]

    async def _time_edge_blocks(self, ids: tuple[int, ...], seconds: float) -> float | None:
        """Every block the bundle has (embed + blocks [0, k)), back to back for ``seconds``, to the policy as a
        sustained figure: a request's steps time their blocks inside a burst that a CPU quota may run at full
        speed, then charge the wait to the link. Every block, not the smallest split's one: the figure is a floor
        for every block, and with one block a call the call's own cost dominates (timed at split 1 on SmolLM2 the
        floor priced an all-local request at 24.7 s; it took 7.7). ms per step, or None."""
        m, runtime = self.manifest, self.runtime
        k = m.edge_layers
        if k < 1:
            return None

        def run() -> tuple[int, float]:
            runtime.prepare(k)  # the graphs split k needs (a composed bundle cuts a segment the first time)
            cache = runtime.new_cache()
            try:
                runtime.forward(list(ids), 0, k, cache)
                pos, token, t0 = len(ids), ids[-1], time.perf_counter()
                while pos < m.max_positions - 1 and (pos - len(ids) < 3 or time.perf_counter() - t0 < seconds):
                    runtime.forward([token], pos, k, cache)
                    pos += 1
                return (len(ids) + pos) // 2, (time.perf_counter() - t0) * 1e3 / (pos - len(ids))
            finally:
                runtime.release(cache)

        (position, ms), _ = await self.worker.run(run)
        try:
            self.policy.observe(StepStats.sustained_edge(k, position, ms))
        except Exception:  # a failing controller must not stop the agent starting: it measures again later
            log.exception("the split policy failed to take the start-up calibration")
        return ms

    async def tokenize(self, text: str) -> list[int]:
        """``text`` -> token ids on a thread; BadRequest (before the full work when a prefix shows it) when
        the prompt cannot fit the context."""
        if self._tokenizing is None:
            self._tokenizing = asyncio.Semaphore(TOKENIZE_THREADS)
        async with self._tokenizing:
            return await asyncio.to_thread(self._tokenize_checked, text)

    def _tokenize_checked(self, text: str) -> list[int]:
        limit = self.manifest.max_positions
        window = limit * PREFIX_CHARS_PER_POSITION
        while window < len(text):  # prefixes cut at whitespace tokenize as the full text does up to the cut
            cut = max(text.rfind(" ", 0, window), text.rfind("\n", 0, window))
            if cut > window // 2:
                n = len(self.runtime.encode_batch([text[:cut]])[0])
                if n >= limit + _MARGIN:
                    raise BadRequest(f"the prompt has more than {n - _MARGIN} tokens; this model's context "
                                     f"holds {limit}, and at least one must be left for the answer: shorten "
                                     "the prompt", "prompt")
            window *= 4
        return self.runtime.encode_batch([text])[0]

    @property
    def can_run_locally(self) -> bool:
        return self.manifest.has_all_layers

    @property
    def eos_token_id(self) -> int | None:
        return self.manifest.eos_token_id

    def encode_prompt(self, text: str) -> list[int]:
        return self.runtime.encode_text(text)

    def token_text(self, token_id: int) -> str:
        return self.runtime.decode_ids([token_id])

    def check(self, request: GenerationRequest) -> GenerationRequest:
        """Validate against the model; BadRequest says what to change."""
        n, limit = len(request.prompt_ids), self.manifest.max_positions
        if n == 0:
            raise BadRequest("the prompt is empty (it tokenizes to no tokens); send some text", "prompt")
        if n >= limit:
            raise BadRequest(f"the prompt has {n} tokens; this model's context holds {limit}, and at least one "
                             "must be left for the answer: shorten the prompt", "prompt")
        vocab = self.manifest.vocab_size
        bad = [t for t in request.prompt_ids if not 0 <= t < vocab]
        if bad:
            raise BadRequest(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})", "prompt")
        if request.max_tokens < 1:
            raise BadRequest(f"max_tokens must be >= 1, got {request.max_tokens}", "max_tokens")
        return request

    def start(self, request: GenerationRequest) -> Generation:
        return Generation(self, self.check(request))

    async def run(self, request: GenerationRequest) -> GenerationResult:
        gen = self.start(request)
        async for _ in gen.events():
            pass
        return gen.result()
