"""A decode row the edge knows to be short (its last one at this split took under ``SHORT_JOB_MS``) runs on the
event loop while the compute worker is idle, saving the two thread hops around it; everything else runs on the
worker, and the output is the unsplit model's either way."""

from __future__ import annotations

import threading

import pytest
from seamline.edge import generation
from seamline.edge.agent import build_engine, close_engine
from seamline.edge.messages import GenerationRequest, SamplingParams

from .conftest import edge_config

SHORT = "First Citizen: Speak, speak."
N = 12


@pytest.mark.parametrize("short_ms", [1e9, 0.0], ids=["every-row-short", "none-short"])
async def test_short_decode_rows_run_on_the_loop_and_the_text_is_unchanged(full_bundle, cloud, reference,
                                                                          monkeypatch, short_ms):
    monkeypatch.setattr(generation, "SHORT_JOB_MS", short_ms)  # where rows run, not how fast this host is
    engine = build_engine(edge_config(full_bundle, [cloud.address]))
    loop_thread, runs = threading.current_thread(), []
    forward = engine.runtime.forward

    def recorded(ids, start, k, cache):
        runs.append((len(ids), threading.current_thread() is loop_thread))
        return forward(ids, start, k, cache)

    engine.runtime.forward = recorded
    try:
        result = await engine.run(GenerationRequest(tuple(engine.encode_prompt(SHORT)), N, SamplingParams()))
    finally:
        await close_engine(engine)
    assert result.text == reference(SHORT, N)[1]
    assert runs[0][0] > 1 and not runs[0][1]  # the prompt: on the worker
    rows = [on_loop for n, on_loop in runs[1:] if n == 1]
    assert len(rows) == N - 1
    # the split's first decode row on the worker (nothing known of its cost yet), the rest where short_ms says
    assert rows == [False] + [short_ms > 0] * (N - 2)
