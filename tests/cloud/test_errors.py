"""Every error path answers its documented status code, and the server keeps serving others."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from seamline.protos import codec
from seamline.protos import seamline_pb2 as pb
from seamline.testing.wait import async_wait_until

from .conftest import Client, EdgeSim, Stream, open_request, reference_greedy, step_request

PROMPT = [9, 8, 7, 6, 5]
K = 2


@pytest.fixture
async def client(servers):
    async with Client(servers["gpt2"].address) as c:
        yield c


async def assert_healthy(client: Client, models) -> None:
    """A fresh session on the same server still generates the reference tokens."""
    model, mhash = models["gpt2"]
    replies = await client.generate(model, mhash, K, PROMPT, 3)
    assert [r.token_id for r in replies] == reference_greedy(model, PROMPT, 3)[0]


async def expect(code: grpc.StatusCode, coro, *fragments: str) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await coro
    assert info.value.code() == code, info.value.details()
    for fragment in fragments:
        assert fragment in info.value.details()
    return info.value.details()


async def open_prefilled(client: Client, models, k: int = K) -> tuple[Stream, EdgeSim]:
    model, mhash = models["gpt2"]
    stream = await client.open(mhash, k)
    edge = EdgeSim(model, k)
    reply = await stream.step(step_request(0, k, PROMPT, None if k == 0 else edge.run(PROMPT)))
    assert reply.position == len(PROMPT)
    return stream, edge


async def active_sessions(client: Client) -> int:
    return (await client.info()).load.active_sessions


def fp32_tensor(x: np.ndarray) -> pb.Tensor:
    return pb.Tensor(shape=list(x.shape), codec=pb.FP32, payload=x.astype("<f4").tobytes())


BAD_TENSORS = {
    "short payload": lambda: pb.Tensor(shape=[1, 64], codec=pb.FP32, payload=b"\0" * 100),
    "nan": lambda: fp32_tensor(np.full((1, 64), np.nan, dtype=np.float32)),
    "wrong hidden size": lambda: fp32_tensor(np.zeros((1, 32), dtype=np.float32)),
    "3-d shape": lambda: pb.Tensor(shape=[1, 1, 64], codec=pb.FP32, payload=b"\0" * 256),
    "other codec": lambda: codec.encode(np.ones((1, 64), np.float32), codec.CodecConfig(codec="int8")),
    "unknown codec": lambda: pb.Tensor(shape=[1, 64], codec=77, payload=b"\0" * 256),
    "zero tokens": lambda: pb.Tensor(shape=[0, 64], codec=pb.FP32),
    "huge zstd claim": lambda: pb.Tensor(shape=[1, 64], codec=pb.FP32, compression=pb.ZSTD,
                                         uncompressed_size=2**40, payload=b"\x28\xb5\x2f\xfd" + b"\0" * 16),
}


@pytest.mark.parametrize("name", sorted(BAD_TENSORS))
async def test_bad_tensor_is_invalid_argument(client, models, name):
    stream, _ = await open_prefilled(client, models)
    req = pb.StepRequest(start_position=len(PROMPT), sample=True)
    req.hidden.CopyFrom(BAD_TENSORS[name]())
    await expect(grpc.StatusCode.INVALID_ARGUMENT, stream.step(req), "bad hidden-state tensor")
    assert await active_sessions(client) == 0  # the error ended the stream and freed its session
    await assert_healthy(client, models)


async def test_chunk_longer_than_max_chunk_tokens(client, models):
    stream, _ = await open_prefilled(client, models)
    req = pb.StepRequest(start_position=len(PROMPT))
    req.hidden.CopyFrom(pb.Tensor(shape=[300, 64], codec=pb.FP32))
    await expect(grpc.StatusCode.INVALID_ARGUMENT, stream.step(req), "max_chunk_tokens=256")
    await assert_healthy(client, models)


async def test_position_ahead_is_failed_precondition(client, models):
    """A chunk beyond the session's position: FAILED_PRECONDITION whose message names the position (for
    people; the edge replays from 0 on a new stream and reads no field of the error)."""
    stream, edge = await open_prefilled(client, models)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stream.step(step_request(len(PROMPT) + 3, K, hidden=edge.run([4])))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"resend from position {len(PROMPT)}" in info.value.details()
    await assert_healthy(client, models)


async def test_smaller_start_rewinds_the_cache(client, models):
    model, _ = models["gpt2"]
    stream, edge = await open_prefilled(client, models)
    await stream.step(step_request(5, K, hidden=edge.run([100, 101, 102])))
    edge.rewind(3)  # replay from position 3 with other tokens
    reply = await stream.step(step_request(3, K, hidden=edge.run([1, 2])))
    assert reply.position == 5
    assert reply.token_id == reference_greedy(model, PROMPT[:3] + [1, 2], 1)[0][0]
    await stream.close()


async def test_negative_start_position(client, models):
    stream, edge = await open_prefilled(client, models)
    await expect(grpc.StatusCode.INVALID_ARGUMENT, stream.step(step_request(-1, K, hidden=edge.run([4]))),
                 "start_position")


async def test_first_message_must_be_open(client, models):
    for first in (pb.GenerateRequest(step=step_request(0, K, hidden=np.zeros((1, 64), np.float32))),
                  pb.GenerateRequest(close=pb.CloseRequest()), pb.GenerateRequest()):
        call = client.raw()
        await call.write(first)
        await expect(grpc.StatusCode.INVALID_ARGUMENT, call.read(), "first message", "open")
    await assert_healthy(client, models)


async def test_second_open_ends_the_stream_and_frees_the_session(client, models):
    _, mhash = models["gpt2"]
    stream, _ = await open_prefilled(client, models)
    assert await active_sessions(client) == 1
    await stream.call.write(pb.GenerateRequest(open=open_request(mhash, K)))
    await expect(grpc.StatusCode.INVALID_ARGUMENT, stream.read(), "second `open`")
    assert await active_sessions(client) == 0
    await assert_healthy(client, models)


async def test_empty_message_after_open(client, models):
    stream, _ = await open_prefilled(client, models)
    await stream.call.write(pb.GenerateRequest())
    await expect(grpc.StatusCode.INVALID_ARGUMENT, stream.read(), "empty GenerateRequest")


async def test_stream_end_frees_the_session_at_once(client, models):
    """Half-close, an explicit close and a cancelled call each free the session's KV immediately."""
    stream, _ = await open_prefilled(client, models)
    assert (await client.info()).load.kv_bytes > 0
    await stream.done_writing()
    assert (await client.info()).load.active_sessions == 0
    stream, _ = await open_prefilled(client, models)
    closed = await stream.close()
    assert closed.freed_kv_bytes > 0 and (await client.info()).load.kv_bytes == 0
    stream, _ = await open_prefilled(client, models)
    stream.cancel()

    async def freed():
        return (await client.info()).load.kv_bytes == 0

    await async_wait_until(freed, timeout=20, message="the cancel reaches the server and frees the session")


async def test_wrong_model_hash(client, models):
    await expect(grpc.StatusCode.FAILED_PRECONDITION, client.open("f" * 64, K), "model hash mismatch")
    await expect(grpc.StatusCode.FAILED_PRECONDITION, client.open("", K), "model hash mismatch")
    await assert_healthy(client, models)


@pytest.mark.parametrize("split", [-1, 5, 1000])
async def test_split_out_of_range(client, models, split):
    _, mhash = models["gpt2"]
    await expect(grpc.StatusCode.FAILED_PRECONDITION, client.open(mhash, split), "[0, 4]")
    await assert_healthy(client, models)


@pytest.mark.parametrize("sampling", [{"temperature": -1.0}, {"temperature": float("nan")}, {"top_p": 1.5},
                                      {"top_k": -3}, {"top_logprobs": 21}, {"max_new_tokens": -1},
                                      {"stop_token_ids": [256]}])
async def test_bad_sampling_params(client, models, sampling):
    _, mhash = models["gpt2"]
    await expect(grpc.StatusCode.INVALID_ARGUMENT, client.open(mhash, K, **sampling), "sampling.")


async def test_bad_codec_spec(client, models):
    _, mhash = models["gpt2"]
    req = pb.OpenRequest(model_hash=mhash, split=K, codec=pb.CodecSpec(codec=pb.INT4, group_size=48))
    await expect(grpc.StatusCode.INVALID_ARGUMENT, client.open_with(req), "codec")
    req = pb.OpenRequest(model_hash=mhash, split=K, codec=pb.CodecSpec(codec=pb.INT8_OUTLIER,
                                                                       outlier_channels=[64]))
    await expect(grpc.StatusCode.INVALID_ARGUMENT, client.open_with(req), "outlier")


@pytest.mark.parametrize("ids", [[256], [-1], [3, 2**30]])
async def test_bad_token_ids(client, models, ids):
    stream, _ = await open_prefilled(client, models, k=0)
    await expect(grpc.StatusCode.INVALID_ARGUMENT, stream.step(step_request(len(PROMPT), 0, ids)),
                 "outside the vocabulary")
    await assert_healthy(client, models)


async def test_wrong_input_kind(client, models):
    tokens_stream, _ = await open_prefilled(client, models, k=0)
    req = step_request(len(PROMPT), 1, hidden=np.zeros((1, 64), np.float32))
    await expect(grpc.StatusCode.INVALID_ARGUMENT, tokens_stream.step(req), "token ids")
    hidden_stream, _ = await open_prefilled(client, models)
    await expect(grpc.StatusCode.INVALID_ARGUMENT, hidden_stream.step(step_request(len(PROMPT), 0, [4])),
                 "hidden state")
    hidden_stream, _ = await open_prefilled(client, models)
    await expect(grpc.StatusCode.INVALID_ARGUMENT, hidden_stream.step(pb.StepRequest(start_position=len(PROMPT))))


async def test_context_full_is_resource_exhausted(client, models):
    model, mhash = models["gpt2"]
    long = [3] * 126
    stream, edge = await client.open(mhash, K), EdgeSim(model, K)
    await stream.step(step_request(0, K, hidden=edge.run(long), sample=False))
    req = step_request(126, K, hidden=np.zeros((3, 64), np.float32))
    await expect(grpc.StatusCode.RESOURCE_EXHAUSTED, stream.step(req), "max_positions=128")
    stream, edge = await client.open(mhash, K), EdgeSim(model, K)
    await stream.step(step_request(0, K, hidden=edge.run(long), sample=False))
    reply = await stream.step(step_request(126, K, hidden=edge.run([1, 2])))
    assert reply.position == 128 and reply.finished  # the context is full: the generation ends
    await stream.close()
    await assert_healthy(client, models)


async def test_stream_errors_do_not_disturb_a_concurrent_stream(client, models):
    model, mhash = models["gpt2"]
    expected = reference_greedy(model, PROMPT, 5)[0]
    good, edge = await client.open(mhash, K), EdgeSim(model, K)
    tokens = [(await good.step(step_request(0, K, hidden=edge.run(PROMPT)))).token_id]
    for _ in range(4):
        bad = await client.open(mhash, K)
        await expect(grpc.StatusCode.INVALID_ARGUMENT, bad.step(step_request(0, K, hidden=np.ones((1, 3), np.float32))))
        tokens.append((await good.step(step_request(edge.position, K, hidden=edge.run([tokens[-1]])))).token_id)
    await good.close()
    assert tokens == expected
