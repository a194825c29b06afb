"""Speculative decoding fixtures: full bundles (every layer exported, every split allowed) of the demo
model, a tiny random Llama (grouped-query attention) and a tiny random Qwen2, each with an in-process
cloud on loopback; ``generate`` runs one generation through a real edge engine (ONNX Runtime, gRPC)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from seamline.cloud.config import CloudConfig
from seamline.edge.agent import build_engine, close_engine
from seamline.edge.config import EdgeConfig
from seamline.edge.messages import GenerationRequest, GenerationResult
from seamline.protos.sampling import SamplingParams
from seamline.testing.servers import ServerThread

MODELS = ("demo", "llama", "qwen2")


def cloud_config(model: str | Path, **kw) -> CloudConfig:
    return CloudConfig(model=str(model), host="127.0.0.1", port=0, device="cpu", grace=1.0, threads=1,
                       log_level="WARNING", **kw)


def edge_config(bundle: Path, cloud: list[str], **kw) -> EdgeConfig:
    base = EdgeConfig(bundle=str(bundle), cloud=cloud, listen="127.0.0.1:0", codec="fp32", chunk_tokens=16,
                      connect_timeout=2.0, step_timeout=20.0, reconnect_window=20.0, verify=False,
                      log_level="WARNING", draft_policy="fixed")  # every step drafts: the verify path is
    return replace(base, **kw)                                      # exercised (adaptive: test_draft_head)


async def generate(config: EdgeConfig, prompt: list[int], n: int, sampling: SamplingParams | None = None,
                   **request) -> GenerationResult:
    """One generation through a real engine (built and closed here)."""
    engine = build_engine(config)
    try:
        return await engine.run(GenerationRequest(tuple(prompt), n, sampling or SamplingParams(), **request))
    finally:
        await close_engine(engine)


@pytest.fixture(scope="session")
def model_source(tiny_checkpoint):
    """Family -> what `partition --model` and `seamline cloud --model` take."""
    return lambda family: "demo" if family == "demo" else tiny_checkpoint(family)


@pytest.fixture(scope="session")
def spec_bundle(model_source, calibration_file, tmp_path_factory):
    """Factory: family -> a full bundle (every layer + head, splits [0, L]), cut once per session."""
    from seamline.testing.bundles import cached_cut

    cache: dict[str, Path] = {}

    def make(family: str) -> Path:
        if family not in cache:
            calib = None if family == "demo" else calibration_file
            cache[family] = cached_cut(f"test-spec-{family}", model_source(family), split=2, calibration=calib,
                                       min_edge_layers=0)
        return cache[family]

    return make


@pytest.fixture(scope="session")
def spec_cloud(model_source):
    """Factory: family -> an in-process cloud serving it (started once per session)."""
    started: dict[str, ServerThread] = {}

    def get(family: str) -> ServerThread:
        if family not in started:
            started[family] = ServerThread(cloud_config(model_source(family))).start()
        return started[family]

    yield get
    for server in started.values():
        server.stop()
