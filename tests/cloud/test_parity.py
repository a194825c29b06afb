"""The split model over a live server generates what the unsplit model generates."""

from __future__ import annotations

import pytest
import torch
from seamline.protos import codec

from .conftest import Client, reference_greedy

PROMPT = [5, 17, 42, 99, 3, 250, 7, 64, 128, 11, 31]
NEW = 8


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2"])
@pytest.mark.parametrize("k", [0, 2, 4])
async def test_greedy_parity_with_unsplit_model(servers, models, kind, k):
    model, mhash = models[kind]
    expected, _ = reference_greedy(model, PROMPT, NEW)
    async with Client(servers[kind].address) as client:
        replies = await client.generate(model, mhash, k, PROMPT, NEW, chunk=4, top_logprobs=3)
    assert [r.token_id for r in replies] == expected
    assert [r.position for r in replies] == list(range(len(PROMPT), len(PROMPT) + NEW))
    assert all(r.has_token and len(r.top_logprobs) == 3 for r in replies)
    assert replies[0].top_logprobs[0].token_id == expected[0]  # greedy = the most likely token


async def test_logprobs_match_unsplit_model(servers, models):
    model, mhash = models["llama"]
    _expected, logits = reference_greedy(model, PROMPT, NEW)
    async with Client(servers["llama"].address) as client:
        replies = await client.generate(model, mhash, 1, PROMPT, NEW, top_logprobs=5)
    for reply, row in zip(replies, logits, strict=True):
        ref = torch.log_softmax(row, -1)
        assert reply.logprob == pytest.approx(float(ref[reply.token_id]), abs=1e-4)
        top = torch.topk(ref, 5)
        assert [t.token_id for t in reply.top_logprobs] == top.indices.tolist()


async def test_hf_generate_agrees(servers, models):
    model, mhash = models["gpt2"]
    out = model.generate(torch.tensor([PROMPT]), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                         pad_token_id=0)
    async with Client(servers["gpt2"].address) as client:
        replies = await client.generate(model, mhash, 3, PROMPT, NEW)
    assert [r.token_id for r in replies] == out[0, len(PROMPT):].tolist()


@pytest.mark.parametrize("name", ["fp16", "int8"])
async def test_lossy_codecs_run_and_stay_close(servers, models, name):
    model, mhash = models["qwen2"]
    expected, _ = reference_greedy(model, PROMPT, 4)
    cfg = codec.CodecConfig(codec=name, zstd=True)
    async with Client(servers["qwen2"].address) as client:
        replies = await client.generate(model, mhash, 2, PROMPT, 4, chunk=11, cfg=cfg)
    assert len(replies) == 4
    if name == "fp16":  # fp16 of a tiny model's hidden state does not move the argmax
        assert [r.token_id for r in replies] == expected


async def test_stop_token_and_max_new_tokens(servers, models):
    model, mhash = models["gpt2"]
    expected, _ = reference_greedy(model, PROMPT, NEW)
    async with Client(servers["gpt2"].address) as client:
        capped = await client.generate(model, mhash, 2, PROMPT, NEW, max_new_tokens=3)
        stopped = await client.generate(model, mhash, 2, PROMPT, NEW, stop_token_ids=[expected[4]])
    assert [r.token_id for r in capped] == expected[:3] and capped[-1].finished
    assert not any(r.finished for r in capped[:-1])
    first_stop = expected.index(expected[4])
    assert [r.token_id for r in stopped] == expected[:first_stop + 1] and stopped[-1].finished


async def test_seeded_sampling_is_reproducible(servers, models):
    model, mhash = models["llama"]
    params = {"temperature": 0.9, "top_k": 50, "top_p": 0.95, "seed": 1234}
    async with Client(servers["llama"].address) as client:
        a = await client.generate(model, mhash, 2, PROMPT, NEW, **params)
        b = await client.generate(model, mhash, 2, PROMPT, NEW, **params)
        c = await client.generate(model, mhash, 2, PROMPT, NEW, **{**params, "seed": 99})
    assert [r.token_id for r in a] == [r.token_id for r in b]
    assert [r.token_id for r in a] != [r.token_id for r in c]
