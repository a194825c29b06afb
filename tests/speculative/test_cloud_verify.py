"""The cloud's side of a speculative step over a raw gRPC stream (split 0: token ids in): the draws equal the
plain steps' tokens, the next step rewinds past rejected rows, and malformed speculative steps get
INVALID_ARGUMENT / FAILED_PRECONDITION while the server keeps serving other streams."""

from __future__ import annotations

import grpc
import pytest
from seamline.protos import seamline_pb2 as pb
from seamline.protos import seamline_pb2_grpc
from seamline.testing.servers import ServerThread

from .conftest import cloud_config, edge_config, generate

PROMPT = [2000, 2010, 2020, 2030, 2040, 2050]


class Stream:
    def __init__(self, stub, model_hash: str, **sampling):
        self.call = stub.Generate()
        self.model_hash = model_hash
        self.sampling = sampling
        self.opened: pb.OpenReply | None = None

    async def open(self) -> Stream:
        await self.call.write(pb.GenerateRequest(open=pb.OpenRequest(
            model_hash=self.model_hash, split=0, sampling=pb.SamplingParams(**self.sampling))))
        reply = await self.call.read()
        assert reply.WhichOneof("kind") == "opened", reply
        self.opened = reply.opened
        return self

    async def step(self, start: int, ids: list[int], draft_rows: int = 0, sample: bool = True) -> pb.StepReply:
        req = pb.StepRequest(start_position=start, sample=sample, draft_rows=draft_rows)
        req.tokens.ids.extend(ids)
        try:
            await self.call.write(pb.GenerateRequest(step=req))
        except grpc.aio.AioRpcError:
            pass  # ended already: read() raises the status
        reply = await self.call.read()
        if reply is grpc.aio.EOF:
            raise AssertionError(f"stream ended: {await self.call.code()} {await self.call.details()}")
        return reply.step


@pytest.fixture
async def stub(spec_cloud):
    async with grpc.aio.insecure_channel(spec_cloud("llama").address) as channel:
        yield seamline_pb2_grpc.SeamlineStub(channel)


async def _plain(stub, model_hash: str, n: int, **sampling) -> list[int]:
    s = await Stream(stub, model_hash, **sampling).open()
    tokens = [(await s.step(0, PROMPT)).token_id]
    for _ in range(n - 1):
        tokens.append((await s.step(len(PROMPT) + len(tokens) - 1, tokens[-1:])).token_id)
    s.call.cancel()
    return tokens


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.9, "seed": 77}], ids=["greedy", "seeded"])
async def test_draws_are_the_plain_tokens_and_the_next_step_rewinds(stub, sampling):
    info = await stub.Info(pb.InfoRequest())
    assert info.max_draft_rows == 8  # --max-draft-tokens default
    x = await _plain(stub, info.model_hash, 6, **sampling)  # x[0] after the prompt, then x[1..5]
    s = await Stream(stub, info.model_hash, **sampling).open()
    assert s.opened.max_draft_rows == 8
    p = len(PROMPT)
    assert (await s.step(0, PROMPT)).token_id == x[0]
    wrong = (x[3] + 1) % info.vocab_size
    r = await s.step(p, [x[0], x[1], x[2], wrong, x[4]], draft_rows=4)  # drafts x1, x2, wrong, x4
    assert r.position == p + 5 and r.has_token
    assert list(r.drawn_ids[:3]) == x[1:4]  # x1, x2 confirmed; the draw after x2 is x3 (not `wrong`)
    assert len(r.drawn_ids) == len(r.drawn_logprobs) == 4
    # the edge accepted x1, x2 and takes x3: the next step starts at x3's position, before the cloud's
    r = await s.step(p + 3, [x[3]])
    assert r.position == p + 4 and r.token_id == x[4]
    r = await s.step(p + 4, [x[4], x[5]], draft_rows=1)  # every draft right: the token after them
    assert list(r.drawn_ids) == [x[5]] and r.position == p + 6
    s.call.cancel()


async def _expect_abort(stream: Stream, code: grpc.StatusCode, coro, *fragments: str) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await coro
    assert info.value.code() == code, info.value.details()
    for fragment in fragments:
        assert fragment in info.value.details()
    return info.value


async def test_malformed_speculative_steps_are_refused_and_others_keep_going(stub):
    info = await stub.Info(pb.InfoRequest())
    x = await _plain(stub, info.model_hash, 3)
    bystander = await Stream(stub, info.model_hash).open()
    assert (await bystander.step(0, PROMPT)).token_id == x[0]
    p = len(PROMPT)
    cases = [
        ({"ids": [x[0]] + [7] * 9, "draft_rows": 9}, grpc.StatusCode.INVALID_ARGUMENT, "--max-draft-tokens=8"),
        ({"ids": [x[0], 7], "draft_rows": 2}, grpc.StatusCode.INVALID_ARGUMENT, "cannot carry 2 drafted rows"),
        ({"ids": [x[0], 7], "draft_rows": 1, "sample": False}, grpc.StatusCode.INVALID_ARGUMENT, "sample = true"),
        ({"ids": [x[0], 7], "draft_rows": -1}, grpc.StatusCode.INVALID_ARGUMENT, "draft_rows must be >= 0"),
    ]
    for kwargs, code, fragment in cases:
        s = await Stream(stub, info.model_hash).open()
        await s.step(0, PROMPT)
        await _expect_abort(s, code, s.step(p, **kwargs), fragment)
    # rows that do not follow the session's position: FAILED_PRECONDITION
    s = await Stream(stub, info.model_hash).open()
    await s.step(0, PROMPT)
    await _expect_abort(s, grpc.StatusCode.FAILED_PRECONDITION, s.step(p + 2, [x[0], 7], draft_rows=1),
                        f"holds {p} positions")
    # the bystander's session is untouched, and it speculates fine
    r = await bystander.step(p, [x[0], x[1]], draft_rows=1)
    assert list(r.drawn_ids) == [x[1]] and r.token_id == x[2]
    bystander.call.cancel()


async def test_a_server_without_speculation_gets_plain_steps(spec_bundle, model_source):
    """--max-draft-tokens 0: the server refuses drafts, and an edge asked to speculate sends plain steps."""
    server = ServerThread(cloud_config(model_source("llama"), max_draft_tokens=0)).start()
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = seamline_pb2_grpc.SeamlineStub(channel)
            info = await stub.Info(pb.InfoRequest())
            assert info.max_draft_rows == 0
            s = await Stream(stub, info.model_hash).open()
            first = await s.step(0, PROMPT)
            await _expect_abort(s, grpc.StatusCode.INVALID_ARGUMENT, s.step(len(PROMPT), [first.token_id, 5],
                                                                             draft_rows=1), "verifies no drafts")
        config = edge_config(spec_bundle("llama"), [server.address])
        plain = await generate(config, PROMPT * 3, 12)
        spec = await generate(config, PROMPT * 3, 12, speculate="prompt-lookup")
    finally:
        server.stop()
    assert spec.token_ids == plain.token_ids and spec.stats.drafted_tokens == 0
