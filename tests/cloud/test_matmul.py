"""The CPU matmul layouts (cloud/matmul.py): every layout computes the module's product, a row count without
a chosen layout runs the module's own, tuning covers the served modules only, and a live server serves the
unsplit model's tokens whichever layout its passes use."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
from seamline.cloud import matmul
from seamline.partitioner.families import adapter_for
from transformers.pytorch_utils import Conv1D

from .conftest import Client, reference_greedy

NEW = 5


def module(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "conv1d":
        return Conv1D(24, 16)  # GPT-2's: weight (in, out)
    return torch.nn.Linear(16, 24, bias=kind == "linear")


@pytest.mark.parametrize("layout", matmul.LAYOUTS)
@pytest.mark.parametrize("kind", ["linear", "linear-no-bias", "conv1d"])
def test_every_layout_computes_the_modules_product(kind, layout):
    m = module(kind)
    [tuned] = matmul.install([m])
    assert m.forward is tuned
    for shape in [(1, 1, 16), (1, 3, 16), (4, 1, 16), (2, 5, 16), (7, 16)]:
        x = torch.randn(*shape)
        expected = tuned.native(x)
        tuned.layout[x.numel() // 16] = layout
        got = m(x)
        assert got.shape == expected.shape == (*shape[:-1], 24)
        assert got.is_contiguous()
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_a_row_count_without_a_layout_runs_the_modules_own_product():
    m = module("linear")
    [tuned] = matmul.install([m])
    tuned.layout[3] = "left"
    x = torch.randn(2, 16)
    assert torch.equal(m(x), torch.nn.functional.linear(x, m.weight, m.bias))
    assert matmul.install([m]) == [tuned]  # installed once: a second install finds the same forward


def test_unused_copies_are_dropped():
    lin, conv = module("linear"), module("conv1d")
    t_lin, t_conv = matmul.install([lin, conv])
    for t in (t_lin, t_conv):
        for layout in matmul.LAYOUTS:
            t.prepare(layout)
    assert t_lin._copy is not None and t_conv._copy is not None
    t_lin.layout = {1: "left", 2: "native"}  # (out, in): the weight it holds
    t_conv.layout = {1: "right"}  # (in, out): the weight it holds
    t_lin.drop_unused()
    t_conv.drop_unused()
    assert t_lin._copy is None and t_conv._copy is None
    t_lin.layout = {1: "right"}  # needs the transposed copy again: made when used
    x = torch.randn(1, 16)
    torch.testing.assert_close(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias))
    t_lin.drop_unused()
    assert t_lin._copy is not None


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_tuning_picks_a_layout_per_row_count_for_the_served_modules_only(models, kind):
    model, _ = models[kind]
    model = type(model)(model.config).eval()  # a private copy: the session's models stay untouched
    adapter = adapter_for(model)
    first = 2
    result = matmul.tune(adapter, first, torch.float32, rows=(1, 2, 3), rounds=1)
    assert set(result.layouts) == {1, 2, 3}
    assert all(v in matmul.LAYOUTS for v in result.layouts.values())
    assert all(set(ms) == set(matmul.LAYOUTS) and min(ms.values()) > 0 for ms in result.pass_ms.values())
    served = {id(m) for top in matmul.served_modules(adapter, first) for m in top.modules()}
    for m in model.modules():
        tuned = isinstance(m.forward, matmul.TunedLinear)
        if isinstance(m, (torch.nn.Linear, Conv1D)):
            assert tuned == (id(m) in served), m
        if tuned:
            assert m.forward.layout == result.layouts
    assert isinstance(result.summary(), str)


@pytest.mark.parametrize("layout", ["left", "right"])
async def test_a_server_serves_the_unsplit_models_tokens_in_every_layout(start_server, models, layout):
    """Every pass of a live server in one layout (one-row decode, a batch of sessions, prefill chunks)."""
    server = start_server("gpt2")
    executor = server.running.executor
    tuned = [m.forward for m in executor.model.modules() if isinstance(m.forward, matmul.TunedLinear)]
    assert tuned, "the server did not install its matmul layouts"
    for t in tuned:
        t.layout = {r: layout for r in range(1, 65)}
    model, mhash = models["gpt2"]
    rng = np.random.default_rng(7)
    prompts = [rng.integers(3, 256, size=4 + i).tolist() for i in range(4)]
    expected = [reference_greedy(model, p, NEW)[0] for p in prompts]
    async with Client(server.address) as client:
        results = await asyncio.gather(*(client.generate(model, mhash, 2, p, NEW, chunk=3) for p in prompts))
    assert [[r.token_id for r in replies] for replies in results] == expected


def test_row_counts_past_the_time_budget_keep_the_modules_own_product(models):
    model, _ = models["gpt2"]
    model = type(model)(model.config).eval()
    result = matmul.tune(adapter_for(model), 1, torch.float32, rows=(1, 2, 3), rounds=1, budget_s=0.0)
    assert result.skipped == [1, 2, 3] and result.layouts == {}
    assert "not tuned within the time budget" in result.summary()
    tuned = [m.forward for m in model.modules() if isinstance(m.forward, matmul.TunedLinear)]
    assert tuned and all(t.layout == {} and t._copy is None for t in tuned)
