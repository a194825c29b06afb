"""The one place where protobuf meets the edge's domain objects, both directions.

Also maps gRPC status codes to the link errors that drive replay (DESIGN.md §2, §3), by code and by
the phase of the call, never by the message text: NOT_FOUND, and FAILED_PRECONDITION during a step (a
chunk that does not start at the session's position; at open it is a hash or split mismatch) ->
:class:`SessionLost` (a new stream resends everything from position 0);
UNAVAILABLE, DEADLINE_EXCEEDED, CANCELLED, UNKNOWN, INTERNAL, RESOURCE_EXHAUSTED -> :class:`LinkBroken`
(another attempt or replica may succeed); the rest -> :class:`CloudRejected`.
"""

from __future__ import annotations

import grpc
import numpy as np
from seamline.protos import codec
from seamline.protos import seamline_pb2 as pb

from .errors import CloudRefusedRequest, CloudRejected, LinkBroken, LinkError, SessionLost
from .messages import CloudInfo, OpenParams, OutgoingChunk, ServerTimings, StepResult

_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
              grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.RESOURCE_EXHAUSTED,
              grpc.StatusCode.ABORTED}


def info_from_reply(r: pb.InfoReply) -> CloudInfo:
    names = []
    for c in r.codecs:
        try:
            names.append(codec.codec_name(c))
        except codec.CodecError:
            continue  # a newer server's codec this edge does not know
    return CloudInfo(model_id=r.model_id, model_hash=r.model_hash, num_layers=r.num_layers,
                     hidden_size=r.hidden_size, max_positions=r.max_positions, min_split=r.min_split,
                     max_split=r.max_split, codecs=tuple(names), layer_ms=tuple(r.layer_ms), head_ms=r.head_ms,
                     max_chunk_tokens=r.max_chunk_tokens, device=r.device, max_draft_rows=r.max_draft_rows,
                     active_sessions=r.load.active_sessions, queue_depth=r.load.queue_depth,
                     queue_ms_p50=r.load.queue_ms_p50)


def open_request(params: OpenParams) -> pb.OpenRequest:
    s = params.sampling
    req = pb.OpenRequest(
        model_hash=params.model_hash, split=params.choice.k,
        sampling=pb.SamplingParams(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, seed=s.seed,
                                   stop_token_ids=list(s.stop_token_ids), top_logprobs=s.top_logprobs))
    if params.choice.k > 0:
        req.codec.CopyFrom(params.choice.codec.to_proto())
    return req


def encode_chunk(start: int, hidden: np.ndarray | None, ids: list[int] | None, cfg: codec.CodecConfig,
                 sample: bool, zstd_min_tokens: int) -> OutgoingChunk:
    """Rows [start, start + T) as a Step payload: the encoded hidden (T, C), or token ids when k = 0.

    zstd (when the session's codec enables it) applies to chunks of at least ``zstd_min_tokens``:
    a one-token decode step does not compress.
    """
    if hidden is None:
        return OutgoingChunk(start, start + len(ids), sample, pb.TokenIds(ids=list(ids)))
    t = hidden.shape[0]  # hidden: (T, C)
    if cfg.zstd and t < zstd_min_tokens:
        cfg = cfg.without_zstd
    return OutgoingChunk(start, start + t, sample, codec.encode(hidden, cfg))


def step_request(chunk: OutgoingChunk, step_id: int) -> pb.StepRequest:
    req = pb.StepRequest(start_position=chunk.start, sample=chunk.sample, step_id=step_id,
                         draft_rows=chunk.draft_rows)
    if isinstance(chunk.payload, pb.TokenIds):
        req.tokens.CopyFrom(chunk.payload)
    else:
        req.hidden.CopyFrom(chunk.payload)
    return req


def step_result(reply: pb.StepReply, bytes_sent: int, rtt_ms: float) -> StepResult:
    t = reply.timings
    timings = ServerTimings(t.queue_ms, t.compute_ms, t.decode_ms, t.batch_size)
    tops = [tuple((x.token_id, x.logprob) for x in e.entries) for e in reply.drawn_top_logprobs]
    drawn = tuple((i, lp, tops[j] if j < len(tops) else ())
                  for j, (i, lp) in enumerate(zip(reply.drawn_ids, reply.drawn_logprobs, strict=False)))
    return StepResult(position=reply.position, token_id=reply.token_id if reply.has_token else None,
                      logprob=reply.logprob,
                      top_logprobs=tuple((x.token_id, x.logprob) for x in reply.top_logprobs),
                      finished=reply.finished, timings=timings, bytes_sent=bytes_sent,
                      bytes_received=reply.ByteSize(), rtt_ms=rtt_ms,
                      network_ms=max(0.0, rtt_ms - timings.total_ms), drawn=drawn)


def link_error(code: grpc.StatusCode | None, details: str | None, endpoint: str, what: str) -> LinkError:
    """A gRPC status from ``endpoint`` during ``what`` ("Open", "Step", "Info", "Embed") -> the LinkError
    the generation loop handles. Since protocol v2 a replay resends from position 0 on a new stream, so
    nothing beyond the code is read."""
    details = details or ""
    text = f"{what} on {endpoint}: {code.name if code else 'stream ended'}: {details}".rstrip(": ")
    if code == grpc.StatusCode.NOT_FOUND:
        return SessionLost(text)
    if code == grpc.StatusCode.FAILED_PRECONDITION:  # a step: a position mismatch; else hash or split
        return SessionLost(text) if what == "Step" else CloudRejected(text)
    if code is None or code in _RETRYABLE:
        return LinkBroken(text)
    if code == grpc.StatusCode.INVALID_ARGUMENT and what == "Open":  # the caller's sampling values: HTTP 400
        return CloudRefusedRequest(f"the cloud refused the request: {details}")
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return CloudRejected(f"{text} — pass the device's token with --token (or `token` in the config file)")
    return CloudRejected(text)
