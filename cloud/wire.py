"""The one place where protobuf meets the cloud's domain objects, both directions.

Requests are validated field by field here (never with ``assert``); a bad field raises a
CloudError whose message says what to fix.
"""

from __future__ import annotations

import time

import numpy as np
from seamline.protos import codec
from seamline.protos import seamline_pb2 as pb

from .errors import CloudError, FailedPrecondition, InvalidArgument
from .messages import Load, ModelInfo, OpenParams, StepInput, StepOutcome
from .sampling import SamplingParams, validate
from .sessions import Session


def open_params(req: pb.OpenRequest, model: ModelInfo) -> OpenParams:
    if req.model_hash != model.model_hash:
        raise FailedPrecondition(
            f"model hash mismatch: the client's bundle was cut from {req.model_hash[:16] or '(empty)'}... but "
            f"this server serves {model.model_id} ({model.model_hash[:16]}...); partition the served model "
            "again or connect to a server that serves the bundle's model")
    if not model.min_split <= req.split <= model.max_split:
        raise FailedPrecondition(
            f"split {req.split} is outside the served range [{model.min_split}, {model.max_split}]; "
            "choose a split in that range (see Info)")
    if req.split == 0 or not req.HasField("codec"):
        cfg = codec.CodecConfig()  # k = 0 sends token ids; an unset spec means fp32
    else:
        try:
            cfg = codec.CodecConfig.from_proto(req.codec, model.shape.hidden_size)
        except codec.CodecError as e:
            raise InvalidArgument(f"codec: {e}") from None
    s = req.sampling
    sampling = SamplingParams(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, seed=s.seed,
                              stop_token_ids=tuple(s.stop_token_ids), max_new_tokens=s.max_new_tokens,
                              top_logprobs=s.top_logprobs)
    validate(sampling, model.shape.vocab_size)
    return OpenParams(req.split, cfg, sampling)


def step_input(req: pb.StepRequest, session: Session, model: ModelInfo, dequantize: bool = True) -> StepInput:
    """Validate and decode one StepRequest for ``session`` (codec decoding happens here).

    ``dequantize=False`` (the service): every check of the tensor runs here, but ``hidden`` is left a
    ``codec.Checked`` whose values the executor dequantizes with the other rows of its batch in one call
    (``codec.decode_batch``); a bad value found there fails that row alone with INVALID_ARGUMENT.
    """
    if req.start_position < 0:
        raise InvalidArgument(f"start_position must be >= 0, got {req.start_position}")
    drafts = req.draft_rows
    if drafts:
        _check_drafts(req, model)
    kind = req.WhichOneof("input")
    limit = model.max_chunk_tokens
    hidden = token_ids = None
    t0 = time.perf_counter()
    if session.split == 0:
        if kind != "tokens":
            raise InvalidArgument("this session has split 0: send token ids (StepRequest.tokens), not hidden states")
        n = len(req.tokens.ids)
        if not 1 <= n <= limit:
            raise InvalidArgument(f"a chunk must carry 1 to {limit} tokens (max_chunk_tokens), got {n}; "
                                  f"split the prompt into chunks of at most {limit}")
        token_ids = np.asarray(req.tokens.ids, dtype=np.int64)  # (T,)
        vocab = model.shape.vocab_size
        bad = token_ids[(token_ids < 0) | (token_ids >= vocab)]
        if bad.size:
            raise InvalidArgument(f"token ids {bad[:5].tolist()} are outside the vocabulary [0, {vocab})")
    else:
        if kind != "hidden":
            raise InvalidArgument(f"this session has split {session.split}: send the hidden state after block "
                                  f"{session.split - 1} (StepRequest.hidden), not token ids")
        shape = list(req.hidden.shape)
        if len(shape) == 2 and shape[0] > limit:
            raise InvalidArgument(f"a chunk of {shape[0]} tokens exceeds max_chunk_tokens={limit}; split the "
                                  f"prefill into chunks of at most {limit}")
        try:
            hidden = codec.check(req.hidden, session.codec, codec.DecodeLimits(model.shape.hidden_size, limit))
            if dequantize:
                hidden = codec.dequantize(hidden)
        except codec.CodecError as e:
            raise InvalidArgument(f"bad hidden-state tensor: {e}") from None
    inp = StepInput(session.id, req.start_position, hidden, token_ids, req.sample, req.step_id,
                    decode_ms=(time.perf_counter() - t0) * 1e3, draft_rows=drafts)
    if drafts >= inp.tokens:
        raise InvalidArgument(f"a speculative step of {inp.tokens} rows cannot carry {drafts} drafted rows: the "
                              "row of the newest accepted token comes first, then at most rows - 1 drafts")
    return inp


def _check_drafts(req: pb.StepRequest, model: ModelInfo) -> None:
    """A speculative step's own fields (its rows are checked with the tensor)."""
    drafts, cap = req.draft_rows, model.max_draft_rows
    if drafts < 0:
        raise InvalidArgument(f"draft_rows must be >= 0, got {drafts}")
    if drafts > cap:
        raise InvalidArgument(f"a speculative step of {drafts} drafted rows exceeds --max-draft-tokens={cap} of "
                              f"this server; draft at most {cap} tokens per step" if cap else
                              "this server verifies no drafts (--max-draft-tokens=0); send plain steps "
                              "(draft_rows = 0) or raise --max-draft-tokens")
    if not req.sample:
        raise InvalidArgument("a speculative step (draft_rows > 0) must set sample = true: its drafts are "
                              "verified by the tokens drawn after them")


def first_error(hidden, error: CloudError) -> CloudError:
    """On an error path: INVALID_ARGUMENT when a deferred hidden state (``step_input(dequantize=False)``) has
    bad values, else ``error`` — a malformed tensor is reported before any resource or session error, as
    when every tensor was dequantized on arrival."""
    if isinstance(hidden, codec.Checked):
        try:
            codec.dequantize(hidden)
        except codec.CodecError as e:
            return InvalidArgument(f"bad hidden-state tensor: {e}")
    return error


def step_reply(inp: StepInput, outcome: StepOutcome, reply: pb.StepReply) -> None:
    """Write the answer to ``outcome`` into ``reply`` (the service passes the ``step`` field of the GenerateReply
    it sends, so the message is built once, not built and then copied in)."""
    reply.SetInParent()  # the oneof is set even when every field keeps its default
    reply.step_id, reply.position, reply.finished = inp.step_id, outcome.position, outcome.finished
    timings = reply.timings
    timings.queue_ms, timings.compute_ms = outcome.queue_ms, outcome.compute_ms
    timings.decode_ms, timings.batch_size = inp.decode_ms, outcome.batch_size
    if outcome.sample is not None:
        reply.has_token = True
        reply.token_id = outcome.sample.token_id
        reply.logprob = outcome.sample.logprob
        reply.top_logprobs.extend(pb.TopLogprob(token_id=t, logprob=lp) for t, lp in outcome.sample.top)
        for s in getattr(outcome.sample, "drawn", ()):  # a speculative step's Verdict
            reply.drawn_ids.append(s.token_id)
            reply.drawn_logprobs.append(s.logprob)
            if s.top:
                reply.drawn_top_logprobs.add().entries.extend(pb.TopLogprob(token_id=t, logprob=lp)
                                                              for t, lp in s.top)


def open_reply(session: Session, model: ModelInfo) -> pb.OpenReply:
    return pb.OpenReply(session_id=session.id, hidden_size=model.shape.hidden_size,
                        max_chunk_tokens=model.max_chunk_tokens, max_positions=model.shape.max_positions,
                        max_draft_rows=model.max_draft_rows)


def info_reply(model: ModelInfo, load: Load) -> pb.InfoReply:
    s = model.shape
    return pb.InfoReply(
        model_id=model.model_id, model_hash=model.model_hash, family=s.family, num_layers=s.num_layers,
        hidden_size=s.hidden_size, vocab_size=s.vocab_size, max_positions=s.max_positions,
        min_split=model.min_split, max_split=model.max_split,
        codecs=[codec.codec_enum(c) for c in model.codecs], layer_ms=list(model.layer_ms),
        head_ms=model.head_ms, max_chunk_tokens=model.max_chunk_tokens, device=model.device,
        max_draft_rows=model.max_draft_rows,
        load=pb.LoadReport(active_sessions=load.active_sessions, max_sessions=load.max_sessions,
                           kv_bytes=load.kv_bytes, kv_budget_bytes=load.kv_budget_bytes,
                           queue_depth=load.queue_depth, queue_ms_p50=load.queue_ms_p50))
