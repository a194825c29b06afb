"""``GenerationEngine``: what every generation shares — the runtime, its worker thread, the link, the policy.

``start(request)`` validates a request against the model and returns a :class:`Generation`
(``generation.py``), whose ``events()`` run the loop.

``tokenize(text)`` runs the tokenizer off the event loop (the tokenizers library releases the GIL
in ``encode_batch``), at most ``TOKENIZE_THREADS`` at a time, and checks the context first where
the text allows: a prompt far over the context is refused after tokenizing a prefix of it.
"""

from __future__ import annotations

import asyncio

from seamline.protos.bundle import Manifest

from .chat import ChatFormat
from .config import EdgeConfig
from .errors import BadRequest
from .generation import Generation
from .link import CloudLink
from .messages import GenerationRequest, GenerationResult
from .openai_compat import RequestLimits
from .policy import SplitPolicy
from .runtime import EdgeRuntime
from .worker import ComputeWorker

TOKENIZE_THREADS = 2
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
