"""Encoders (BERT family) in the cloud: the ``Embed`` RPC — blocks k..L and pooling, no session, no KV.

An encoder attends over the whole sequence at once, so a sentence crosses the link once: the edge
sends every token's hidden state after block k-1 (``EmbedRequest``, one ``EmbedInput`` per
sentence), the cloud runs blocks [k, L) and the family's head — masked mean over the tokens, then
L2 normalisation (``partitioner/families/bert.py``) — and answers one embedding per sentence. A
unary call, not the Generate stream: there is no state to keep between messages.

- :class:`EncoderExecutor`: the torch side, every call on one worker thread (as ``TorchExecutor``).
  The sentences of one call are sorted by length and cut into padded batches of at most
  ``max_chunk_tokens`` padded rows; the attention mask hides the padding, and the pooling mask too,
  so a sentence's embedding does not depend on its neighbours.
- :class:`Embedder`: validation (``INVALID_ARGUMENT`` for a bad tensor, NaN/Inf, a wrong width,
  no inputs, an input over ``max_positions`` tokens, more than ``max_chunk_tokens`` tokens in one
  call), the in-flight limit (``--max-sessions`` calls at once, then ``RESOURCE_EXHAUSTED``) and the
  reply. ``service.SeamlineService.Embed`` calls it after authentication.
- :func:`executor_for`: ``TorchExecutor`` for a causal LM, ``EncoderExecutor`` for an encoder.

``Info`` of an encoder reports per-layer and head latency of one 16-token sentence.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import torch
from seamline.partitioner.families import adapter_for
from seamline.protos import codec
from seamline.protos import seamline_pb2 as pb

from .config import CloudConfig
from .errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from .executor import ModelExecutor, TorchExecutor, median_ms
from .messages import ModelInfo
from .metrics import CloudMetrics

MEASURE_TOKENS = 16  # Info's layer_ms of an encoder: one sentence of this many tokens
THREAD_DECODE_BYTES = 64 * 1024  # decode requests larger than this off the event loop
SERVES_ENCODER = ("this server serves an encoder ({family}): it answers Embed (the edge's /v1/embeddings), not "
                  "Generate; point a chat bundle at a server of a causal LM")
SERVES_CAUSAL = ("this server serves a causal language model ({family}): it answers Generate, not Embed; "
                 "embeddings need a server of an encoder (BERT family) and a bundle cut from it")


def check_causal(model: ModelInfo) -> None:
    """FAILED_PRECONDITION for a Generate stream on an encoder."""
    if not model.shape.causal:
        raise FailedPrecondition(SERVES_ENCODER.format(family=model.shape.family))


def executor_for(model: torch.nn.Module, config: CloudConfig) -> TorchExecutor | EncoderExecutor:
    """The executor of ``model``: ``EncoderExecutor`` for an encoder, else ``TorchExecutor``."""
    if adapter_for(model).shape.causal:
        return TorchExecutor(model, config)
    return EncoderExecutor(model, config)


class EncoderExecutor(ModelExecutor):
    """Blocks k..L + pooling of an encoder, on one worker thread."""

    def __init__(self, model: torch.nn.Module, config: CloudConfig):
        super().__init__(model, config)
        self.max_padded = config.max_chunk_tokens

    def batches(self, lengths: list[int]) -> list[list[int]]:
        """Indices of the inputs, sorted by length, cut into batches of at most ``max_padded`` padded rows
        (a longer input alone)."""
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        out: list[list[int]] = []
        for i in order:
            if out and (len(out[-1]) + 1) * lengths[i] <= self.max_padded:
                out[-1].append(i)
            else:
                out.append([i])
        return out

    # ---------------------------------------------------------------- worker thread only below

    @torch.inference_mode()
    def embed(self, split: int, inputs: list[np.ndarray]) -> tuple[np.ndarray, float]:
        """Pooled embeddings (N, C) float32 of ``inputs``: hidden (T, C) after block ``split - 1``, or token ids
        (T,) when ``split`` is 0; returns (embeddings, ms)."""
        t0 = time.perf_counter()
        dev, s = self.device, self.shape
        out = np.empty((len(inputs), s.hidden_size), dtype=np.float32)
        for batch in self.batches([len(x) for x in inputs]):
            b, t = len(batch), max(len(inputs[i]) for i in batch)
            mask = torch.zeros(b, t, dtype=torch.long, device=dev)  # (B, T): 1 = a real token
            pos = torch.arange(t, device=dev).expand(b, t)  # (B, T)
            if split == 0:
                ids = torch.zeros(b, t, dtype=torch.long, device=dev)
                for r, i in enumerate(batch):
                    ids[r, :len(inputs[i])] = torch.from_numpy(inputs[i])
                    mask[r, :len(inputs[i])] = 1
                x = self.adapter.embed(ids, pos).to(self.dtype)  # (B, T, C)
            else:
                x = torch.zeros(b, t, s.hidden_size, dtype=self.dtype, device=dev)
                for r, i in enumerate(batch):
                    x[r, :len(inputs[i])] = torch.from_numpy(inputs[i]).to(dev, self.dtype)
                    mask[r, :len(inputs[i])] = 1
            for j in range(split, s.num_layers):
                x, _, _ = self.adapter.block(j, x, None, None, pos, mask)
            pooled = self.adapter.head(x, mask).float().cpu().numpy()  # (B, C)
            out[batch] = pooled
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return out, (time.perf_counter() - t0) * 1e3

    @torch.inference_mode()
    def measure_layer_ms(self, tokens: int = MEASURE_TOKENS, repeats: int = 5) -> tuple[list[float], float]:
        """Median ms of each block and of the pooling head for one sentence of ``tokens`` tokens."""
        s, dev = self.shape, self.device
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(1, tokens, s.hidden_size, generator=gen).to(dev, self.dtype)  # (1, T, C)
        pos = torch.arange(tokens, device=dev)[None]
        mask = torch.ones(1, tokens, dtype=torch.long, device=dev)

        layer_ms = [median_ms(lambda i=i: self.adapter.block(i, x, None, None, pos, mask), dev, repeats)
                    for i in range(s.num_layers)]
        return layer_ms, median_ms(lambda: self.adapter.head(x, mask), dev, repeats)


def embed_inputs(req: pb.EmbedRequest, model: ModelInfo) -> tuple[int, list[np.ndarray], float]:
    """Validate and decode one EmbedRequest -> (split, inputs, decode ms); CloudError when bad."""
    if req.model_hash != model.model_hash:
        raise FailedPrecondition(
            f"model hash mismatch: the client's bundle was cut from {req.model_hash[:16] or '(empty)'}... but "
            f"this server serves {model.model_id} ({model.model_hash[:16]}...); partition the served model "
            "again or connect to a server that serves the bundle's model")
    k = req.split
    if not model.min_split <= k <= model.max_split:
        raise FailedPrecondition(f"split {k} is outside the served range [{model.min_split}, {model.max_split}]; "
                                 "choose a split in that range (see Info)")
    s, budget = model.shape, model.max_chunk_tokens
    if not req.inputs:
        raise InvalidArgument("an EmbedRequest without inputs: send one EmbedInput per sentence")
    if k == 0 or not req.HasField("codec"):
        cfg = codec.CodecConfig()
    else:
        try:
            cfg = codec.CodecConfig.from_proto(req.codec, s.hidden_size)
        except codec.CodecError as e:
            raise InvalidArgument(f"codec: {e}") from None
    want = "tokens" if k == 0 else "hidden"
    expected = "token ids (EmbedInput.tokens)" if k == 0 else f"the hidden state after block {k - 1} (EmbedInput.hidden)"
    lengths = []
    for n, item in enumerate(req.inputs):
        kind = item.WhichOneof("input")
        if kind != want:
            raise InvalidArgument(f"input {n}: split {k} takes {expected}, got {kind or 'an empty EmbedInput'}")
        shape = list(item.hidden.shape) if kind == "hidden" else [len(item.tokens.ids)]
        t = shape[0] if shape else 0
        if not 1 <= t <= s.max_positions:
            raise InvalidArgument(f"input {n} has {t} tokens; the model takes 1 to {s.max_positions} (max_positions) "
                                  "per sentence: shorten or split the text")
        lengths.append(t)
    if sum(lengths) > budget:
        raise InvalidArgument(f"{len(lengths)} inputs of {sum(lengths)} tokens in all exceed max_chunk_tokens="
                              f"{budget} per Embed call; send fewer sentences per call (see Info)")
    t0 = time.perf_counter()
    limits = codec.DecodeLimits(s.hidden_size, max(1, min(s.max_positions, budget)))
    out = []
    for n, item in enumerate(req.inputs):
        if k == 0:
            ids = np.asarray(item.tokens.ids, dtype=np.int64)  # (T,)
            bad = ids[(ids < 0) | (ids >= s.vocab_size)]
            if bad.size:
                raise InvalidArgument(f"input {n}: token ids {bad[:5].tolist()} are outside the vocabulary "
                                      f"[0, {s.vocab_size})")
            out.append(ids)
            continue
        try:
            out.append(codec.decode(item.hidden, cfg, limits))  # (T, C)
        except codec.CodecError as e:
            raise InvalidArgument(f"input {n}: bad hidden-state tensor: {e}") from None
    return k, out, (time.perf_counter() - t0) * 1e3


class Embedder:
    """Answers Embed calls (after the service authenticated them)."""

    def __init__(self, config: CloudConfig, model: ModelInfo, executor, metrics: CloudMetrics):
        self.config = config
        self.model = model
        self.executor = executor
        self.metrics = metrics
        self.in_flight = 0

    async def embed(self, req: pb.EmbedRequest) -> pb.EmbedReply:
        if not isinstance(self.executor, EncoderExecutor):
            raise FailedPrecondition(SERVES_CAUSAL.format(family=self.model.shape.family))
        limit = self.config.max_sessions
        if self.in_flight >= limit:
            raise ResourceExhausted(f"{limit} Embed calls are in flight (--max-sessions); retry shortly or on "
                                    "another replica")
        self.in_flight += 1
        try:
            self.metrics.bytes_in.labels("Embed").inc(req.ByteSize())
            if req.ByteSize() > THREAD_DECODE_BYTES:
                k, inputs, decode_ms = await asyncio.to_thread(embed_inputs, req, self.model)
            else:
                k, inputs, decode_ms = embed_inputs(req, self.model)
            queued = time.perf_counter()
            vectors, compute_ms = await self.executor.run(self.executor.embed, k, inputs)
            queue_ms = max(0.0, (time.perf_counter() - queued) * 1e3 - compute_ms)
            self.metrics.observe_batch("embed", len(inputs), compute_ms)
            reply = pb.EmbedReply(
                embeddings=[pb.Embedding(values=v.tolist(), tokens=len(x)) for v, x in zip(vectors, inputs,
                                                                                             strict=True)],
                timings=pb.ServerTimings(queue_ms=queue_ms, compute_ms=compute_ms, decode_ms=decode_ms,
                                         batch_size=len(inputs)))
            self.metrics.bytes_out.labels("Embed").inc(reply.ByteSize())
            return reply
        finally:
            self.in_flight -= 1
