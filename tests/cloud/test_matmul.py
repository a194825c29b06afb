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


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("layout", ["left", "right", "mixed"])
async def test_a_server_serves_the_unsplit_models_tokens_in_every_layout(start_server, models, kind, layout):
    """Every pass of a live server in one layout (one-row decode, a batch of sessions, prefill chunks)."""
    server = start_server(kind)
    executor = server.running.executor
    tuned = [m.forward for m in executor.model.modules() if isinstance(m.forward, matmul.TunedLinear)]
    assert tuned, "the server did not install its matmul layouts"
    for i, t in enumerate(tuned):  # mixed: neighbouring modules in different layouts
        chosen = matmul.LAYOUTS[i % 3] if layout == "mixed" else layout
        t.layout = {r: chosen for r in range(1, 65)}
    model, mhash = models[kind]
    rng = np.random.default_rng(7)
    prompts = [rng.integers(3, 256, size=4 + i).tolist() for i in range(4)]
    expected = [reference_greedy(model, p, NEW)[0] for p in prompts]
    async with Client(server.address) as client:
        results = await asyncio.gather(*(client.generate(model, mhash, 2, p, NEW, chunk=3) for p in prompts))
    assert [[r.token_id for r in replies] for replies in results] == expected


def test_row_counts_past_the_time_budget_keep_the_modules_own_product(models, monkeypatch):
    model, _ = models["gpt2"]
    model = type(model)(model.config).eval()
    prepared = []
    monkeypatch.setattr(matmul.TunedLinear, "prepare", lambda self, layout: prepared.append(layout))
    result = matmul.tune(adapter_for(model), 1, torch.float32, rows=(1, 2, 3), rounds=1, budget_s=0.0)
    assert prepared == []  # no time to time anything: no transposed copies made (and dropped) either
    assert result.skipped == [1, 2, 3] and result.layouts == {}
    assert "not tuned within the time budget" in result.summary()
    tuned = [m.forward for m in model.modules() if isinstance(m.forward, matmul.TunedLinear)]
    assert tuned and all(t.layout == {} and t._copy is None for t in tuned)


@pytest.mark.parametrize("pass_ms, expected", [
    ({"native": 10.0, "left": 9.0, "right": 9.6}, "left"),       # 10 % faster: kept
    ({"native": 10.0, "left": 9.6, "right": 9.7}, "native"),     # 4 % faster: below MIN_GAIN, native
    ({"native": 10.0, "left": 12.0, "right": 8.0}, "right"),
    ({"native": 8.0, "left": 9.0, "right": 10.0}, "native"),     # native fastest
    ({"native": 10.0, "left": 9.5, "right": 9.5}, "native"),     # exactly MIN_GAIN is not enough
])
def test_a_layout_replaces_native_only_when_it_is_min_gain_faster(pass_ms, expected):
    assert matmul.MIN_GAIN == 0.05
    assert matmul.choose(pass_ms) == expected


def test_a_weight_changed_in_place_or_cast_is_copied_again():
    m = module("linear")
    [tuned] = matmul.install([m])
    tuned.layout[1] = "right"  # reads the (in, out) copy of an (out, in) weight
    x = torch.randn(1, 16)
    m(x)
    with torch.no_grad():
        m.weight.mul_(2.0)  # in place: same storage, new version
    torch.testing.assert_close(m(x), torch.nn.functional.linear(x, m.weight, m.bias))
    m.to(torch.float64)  # a new dtype: a new tensor
    x64 = x.double()
    got = m(x64)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, torch.nn.functional.linear(x64, m.weight, m.bias))


def test_a_real_tuning_keeps_only_the_copies_its_layouts_read(models):
    model, _ = models["gpt2"]
    model = type(model)(model.config).eval()
    result = matmul.tune(adapter_for(model), 1, torch.float32, rows=(1, 2), rounds=1)
    tuned = [m.forward for m in model.modules() if isinstance(m.forward, matmul.TunedLinear)]
    for t in tuned:
        reads_copy = any(v == ("left" if t.transposed else "right") for v in t.layout.values())
        assert (t._copy is not None) == reads_copy
    kept = sum(t.copy_bytes() for t in tuned if t._copy is not None) / 2**20
    assert result.copies_mb == pytest.approx(kept)


def test_no_tuning_when_the_copies_would_not_fit_in_memory(models):
    model, _ = models["llama"]
    model = type(model)(model.config).eval()
    adapter = adapter_for(model)
    need = sum(t.copy_bytes() for t in matmul.install(matmul.served_modules(adapter, 1)))
    result = matmul.tune(adapter, 1, torch.float32, rows=(1, 2), rounds=1, available=int(need * 1.5))
    assert result.no_memory and result.layouts == {} and "available" in result.summary()
    tuned = [m.forward for m in model.modules() if isinstance(m.forward, matmul.TunedLinear)]
    assert tuned and all(t.layout == {} and t._copy is None for t in tuned)
    result = matmul.tune(adapter, 1, torch.float32, rows=(1,), rounds=1, available=need * 3)
    assert not result.no_memory and set(result.layouts) == {1}
