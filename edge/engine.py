"""``GenerationEngine``: what every generation shares — the runtime, its worker thread, the link, the policy.

``start(request)`` validates a request against the model and returns a :class:`Generation`
(``generation.py``), whose ``events()`` run the loop.
"""

from __future__ import annotations

from seamline.protos.bundle import Manifest

from .config import EdgeConfig
from .errors import BadRequest
from .generation import Generation
from .link import CloudLink
from .messages import GenerationRequest, GenerationResult
from .policy import SplitPolicy
from .runtime import EdgeRuntime
from .worker import ComputeWorker


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
