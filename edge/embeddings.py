"""Sentence embeddings of an encoder bundle (``POST /v1/embeddings``): k blocks here, the rest in the cloud.

For each input the edge embeds the tokens and runs blocks [0, k) in ONNX Runtime (on the agent's one
compute thread), encodes every token's hidden state with the session codec of split k (the bundle's
calibration), and sends the sentences in ``Embed`` calls (``seamline.proto``) of at most the cloud's
``max_chunk_tokens`` tokens each; the cloud runs blocks [k, L) and the pooling (masked mean, L2 norm).
With k = 0 token ids travel instead (no privacy; the all-cloud baseline).

Endpoints are tried in the configured order; a broken link or a refusal moves on to the next one.
When none answers and the bundle holds every layer and the pooling head, the embedding is computed
on the device alone (``served_by: local``); otherwise the request fails with 503.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import grpc
import numpy as np
from seamline.protos import codec
from seamline.protos import seamline_pb2 as pb

from . import wire
from .errors import BadRequest, CloudRejected, CloudUnavailable, LinkError
from .messages import CloudInfo, SplitChoice
from .policy import codec_for

log = logging.getLogger("seamline.edge")


@dataclass
class EmbeddingStats:
    """What the ``seamline`` object of an embeddings reply reports."""

    split: int
    codec: str
    served_by: str = "cloud"             # cloud | local
    endpoint: str | None = None
    calls: int = 0                       # Embed calls made
    edge_ms: float = 0.0                 # tokenizer excluded: ONNX blocks + codec encoding (or all of it, local)
    network_ms: float = 0.0              # round trips minus the server's time
    cloud_queue_ms: float = 0.0
    cloud_compute_ms: float = 0.0
    bytes_sent: int = 0
    bytes_received: int = 0
    fallback_reason: str | None = None

    def to_dict(self) -> dict:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


@dataclass
class EmbeddingResult:
    vectors: np.ndarray                  # (N, C) float32, L2-normalised
    tokens: list[int] = field(default_factory=list)  # per input
    stats: EmbeddingStats | None = None


def check_encoder(engine) -> None:
    """BadRequest unless the engine's bundle is an encoder."""
    m = engine.manifest
    if m.causal:
        raise BadRequest(f"/v1/embeddings needs an encoder bundle (BERT family); this agent serves {m.model_id}, "
                         f"a causal language model ({m.family}): use /v1/completions or /v1/chat/completions, "
                         "or start an agent on a bundle cut from an encoder", "model")


def check_lengths(ids: list[list[int]], limit: int, what: str) -> None:
    for i, seq in enumerate(ids):
        if not seq:
            raise BadRequest(f"input {i} tokenizes to no tokens; send some text", "input")
        if len(seq) > limit:
            raise BadRequest(f"input {i} has {len(seq)} tokens; {what} takes at most {limit} per input: shorten "
                             "or split the text", "input")


def _calls(lengths: list[int], budget: int) -> list[list[int]]:
    """Consecutive input indices grouped into calls of at most ``budget`` tokens."""
    out: list[list[int]] = []
    total = 0
    for i, n in enumerate(lengths):
        if out and total + n <= budget:
            out[-1].append(i)
            total += n
        else:
            out.append([i])
            total = n
    return out


def _front(runtime, ids: list[list[int]], choice: SplitChoice) -> list[pb.EmbedInput]:
    """Worker thread: blocks [0, k) of each input and its encoding (token ids when k = 0)."""
    if choice.k == 0:
        return [pb.EmbedInput(tokens=pb.TokenIds(ids=seq)) for seq in ids]
    out = []
    for seq in ids:
        hidden = runtime.forward(seq, 0, choice.k, runtime.new_cache())  # (T, C)
        out.append(pb.EmbedInput(hidden=codec.encode(hidden, choice.codec)))
    return out


def _local(runtime, ids: list[list[int]]) -> np.ndarray:
    """Worker thread: every layer and the pooling head on the device."""
    return np.stack([runtime.sentence_embedding(seq) for seq in ids]).astype(np.float32)  # (N, C)


def split_choice(engine) -> SplitChoice:
    """The policy's current split and codec; the bundle's default split before an adaptive policy chose one."""
    choice = engine.policy.status().choice
    if choice is None or choice.local:
        k, c = engine.manifest.default_split, engine.config
        choice = SplitChoice(k, codec_for(engine.manifest, k, c.codec, c.zstd), reason="default")
    return choice


class _Front:
    """The edge half of one request, computed once (on the first endpoint that gets that far)."""

    def __init__(self, engine, ids: list[list[int]], choice: SplitChoice, stats: EmbeddingStats):
        self.engine, self.ids, self.choice, self.stats = engine, ids, choice, stats
        self.inputs: list[pb.EmbedInput] | None = None

    async def get(self) -> list[pb.EmbedInput]:
        if self.inputs is None:
            self.inputs, self.stats.edge_ms = await self.engine.worker.run(_front, self.engine.runtime, self.ids,
                                                                           self.choice)
        return self.inputs


async def embed(engine, ids: list[list[int]]) -> EmbeddingResult:
    """Embeddings of token-id sequences (checked against the model's context already)."""
    m = engine.manifest
    choice = split_choice(engine)
    stats = EmbeddingStats(choice.k, choice.codec.codec if choice.k else "tokens")
    lengths = [len(seq) for seq in ids]
    errors: dict[str, str] = {}
    link = engine.link
    if link is not None:
        front = _Front(engine, ids, choice, stats)
        for endpoint in link.endpoints:
            try:
                return await _on_endpoint(engine, endpoint, front)
            except BadRequest:
                raise
            except LinkError as e:
                errors[endpoint] = e.message
                link.status[endpoint] = e.message
                link.infos.pop(endpoint, None)
                log.info("cloud endpoint %s (Embed): %s", endpoint, e.message)
    reason = "; ".join(f"{ep}: {msg}" for ep, msg in errors.items()) or "no cloud endpoint is configured"
    if not m.has_all_layers:
        raise CloudUnavailable(f"no cloud endpoint could embed ({reason}); check that `seamline cloud` serves the "
                               "bundle's model at --cloud HOST:PORT, or partition with every layer for offline use")
    vectors, ms = await engine.worker.run(_local, engine.runtime, ids)
    stats.served_by, stats.edge_ms, stats.fallback_reason = "local", ms, reason
    return EmbeddingResult(vectors, lengths, stats)


async def _info(engine, endpoint: str) -> CloudInfo:
    link = engine.link
    info = link.infos.get(endpoint) or await link.info(endpoint)
    m = engine.manifest
    if info.model_hash != m.source_model_hash:
        raise CloudRejected(f"{endpoint} serves {info.model_id} ({info.model_hash[:12]}...), but the bundle was cut "
                            f"from {m.source_model_hash[:12]}...; point --cloud at a server of the bundle's model")
    return info


async def _on_endpoint(engine, endpoint: str, front: _Front) -> EmbeddingResult:
    ids, choice, stats = front.ids, front.choice, front.stats
    info = await _info(engine, endpoint)
    k = choice.k
    if not info.min_split <= k <= info.max_split:
        raise CloudRejected(f"{endpoint} serves splits [{info.min_split}, {info.max_split}], not {k}; choose "
                            "--split in that range")
    budget = info.max_chunk_tokens or 256
    check_lengths(ids, min(budget, info.max_positions or budget),
                  f"the cloud at {endpoint} (its --max-chunk-tokens)")
    inputs = await front.get()
    link, m = engine.link, engine.manifest
    vectors = np.empty((len(ids), m.hidden_size), dtype=np.float32)
    spec = choice.codec.to_proto() if k > 0 else None
    for group in _calls([len(seq) for seq in ids], budget):
        req = pb.EmbedRequest(model_hash=m.source_model_hash, split=k, inputs=[inputs[i] for i in group])
        if spec is not None:
            req.codec.CopyFrom(spec)
        t0 = time.perf_counter()
        try:
            reply = await link.stub(endpoint).Embed(req, metadata=link.metadata, timeout=engine.config.step_timeout)
        except grpc.aio.AioRpcError as e:
            raise wire.link_error(e.code(), e.details(), endpoint, "Embed") from None
        rtt = (time.perf_counter() - t0) * 1e3
        if len(reply.embeddings) != len(group) or any(len(e.values) != m.hidden_size for e in reply.embeddings):
            raise CloudRejected(f"{endpoint} answered Embed with {len(reply.embeddings)} embeddings (of width "
                                f"{[len(e.values) for e in reply.embeddings][:3]}) for {len(group)} inputs of width "
                                f"{m.hidden_size}: the server is not a seamline cloud of this model")
        for i, e in zip(group, reply.embeddings, strict=True):
            vectors[i] = np.asarray(e.values, dtype=np.float32)
        t = reply.timings
        stats.calls += 1
        stats.bytes_sent += req.ByteSize()
        stats.bytes_received += reply.ByteSize()
        stats.cloud_queue_ms += t.queue_ms
        stats.cloud_compute_ms += t.compute_ms
        stats.network_ms += max(0.0, rtt - t.queue_ms - t.compute_ms - t.decode_ms)
    stats.endpoint = endpoint
    link.status[endpoint] = "ok"
    return EmbeddingResult(vectors, [len(seq) for seq in ids], stats)
