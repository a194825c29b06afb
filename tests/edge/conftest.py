"""Edge fixtures: bundles of a tiny random GPT-2, real cloud processes, real agents on loopback.

- bundles are cut once per session with the partitioner (a full one with every layer, and a trimmed
  one with ``--max-edge-layers 2``);
- a cloud is ``seamline cloud`` in a subprocess (seamline.testing.procs.CloudProcess); ready when
  its health service answers SERVING;
- an agent is ``EdgeAgent`` on an event loop of its own thread; ready when ``start()`` returned and
  ``/healthz`` answers.
"""

from __future__ import annotations

import socket
from dataclasses import replace
from pathlib import Path

import pytest
from seamline.edge.config import EdgeConfig
from seamline.testing.procs import CloudProcess
from seamline.testing.servers import AgentThread, ServerThread

SPLIT = 2
PROMPT = ("First Citizen: Before we proceed any further, hear me speak. All: Speak, speak. First Citizen: You are "
          "all resolved rather to die than to famish? All: Resolved. resolved.")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cloud_process(model: Path) -> CloudProcess:
    """``seamline cloud`` in a subprocess (so that a test can freeze or kill it for real), one torch thread.
    Spawning does not wait: ``address`` does, so a fixture can cut a bundle while the cloud boots."""
    return CloudProcess(model, log_level="WARNING", grace=1)


class CloudThread(ServerThread):
    """``serve(config)`` on an event loop of its own thread, in this process (cheap: torch is loaded)."""

    def __init__(self, model: Path, **overrides):
        from seamline.cloud.config import CloudConfig

        super().__init__(CloudConfig(model=str(model), host="127.0.0.1", port=0, device="cpu", grace=1.0,
                                     **overrides))


@pytest.fixture(scope="session")
def edge_checkpoint(tiny_checkpoint) -> Path:
    return tiny_checkpoint("gpt2")


@pytest.fixture(scope="session")
def full_bundle(cut_bundle) -> Path:
    """The tiny GPT-2 (``edge_checkpoint``) cut at SPLIT with every layer (tests/conftest.py's cut_bundle:
    shared with the partitioner tests, cut once per session)."""
    return cut_bundle("gpt2", split=SPLIT).path


@pytest.fixture(scope="session")
def trimmed_bundle(cut_bundle) -> Path:
    """`partition --max-edge-layers 2`: blocks [0, 2) and no head, so no offline fallback."""
    return cut_bundle("gpt2", split=SPLIT, max_edge_layers=2).path


@pytest.fixture(scope="session")
def cloud(edge_checkpoint):
    """The cloud process most tests share (a restart test restarts it on the same address)."""
    c = cloud_process(edge_checkpoint)
    yield c
    c.stop()


@pytest.fixture(scope="module")
def spare_cloud(edge_checkpoint):
    """Factory: a second cloud process for fault tests, started again only when a test killed it."""
    current: list[CloudProcess] = []

    def get() -> CloudProcess:
        if not current or not current[-1].alive:
            current.append(cloud_process(edge_checkpoint))
        current[-1].thaw()
        return current[-1]

    yield get
    for c in current:
        c.stop()


def edge_config(bundle: Path, cloud: list[str], **kw) -> EdgeConfig:
    base = EdgeConfig(bundle=str(bundle), cloud=cloud, listen="127.0.0.1:0", codec="fp32", chunk_tokens=16,
                      connect_timeout=2.0, step_timeout=20.0, reconnect_window=20.0, grace=5.0, log_level="WARNING")
    return replace(base, **kw)


@pytest.fixture
def start_agent():
    """Factory: an agent thread for a config, stopped after the test."""
    started: list[AgentThread] = []

    def start(config: EdgeConfig, policy=None) -> AgentThread:
        a = AgentThread(config, policy).start()
        started.append(a)
        return a

    yield start
    for a in started:
        a.stop()


@pytest.fixture(scope="session")
def agent(cloud, full_bundle):  # cloud first: it boots while the bundle is cut
    """A shared agent on the full bundle, split 2, fp32, against the shared cloud."""
    a = AgentThread(edge_config(full_bundle, [cloud.address])).start()
    yield a
    a.stop()


@pytest.fixture(scope="session")
def reference(edge_checkpoint, full_bundle):
    """Greedy continuation of the unsplit torch model: prompt text -> (ids, text) for N new tokens."""
    import torch
    from seamline.edge.runtime import EdgeRuntime
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(edge_checkpoint).eval()
    runtime = EdgeRuntime(full_bundle, verify=False)
    eos = runtime.manifest.eos_token_id
    cache: dict[tuple[str, int], tuple[list[int], str]] = {}

    def greedy(prompt: str, new_tokens: int) -> tuple[list[int], str]:
        key = (prompt, new_tokens)
        if key not in cache:
            ids = runtime.encode_text(prompt)
            with torch.inference_mode():
                out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                     max_new_tokens=new_tokens, do_sample=False, eos_token_id=eos,
                                     pad_token_id=eos)
            new = out[0, len(ids):].tolist()
            if eos in new:
                new = new[:new.index(eos)]
            cache[key] = (new, runtime.decode_ids(new))
        return cache[key]

    return greedy
