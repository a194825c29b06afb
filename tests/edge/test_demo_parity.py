"""The embedded demo model through the whole path: `seamline generate` via a running agent equals the
unsplit model's greedy output token for token (issue 7, done-when), with pipelined prefill."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

from .conftest import CloudThread, edge_config

PROMPT = "ROMEO.\nBut soft, what light through yonder window breaks?\n\nJULIET.\n"
N = 40


@pytest.fixture(scope="module")
def demo_bundle(cut_bundle):
    return cut_bundle("demo", split=2).path  # tests/conftest.py: cut once per session


@pytest.fixture(scope="module")
def demo_cloud():
    cloud = CloudThread("demo").start()
    yield cloud
    cloud.stop()


def _reference(bundle, n: int) -> str:
    import torch
    from seamline.edge.runtime import EdgeRuntime
    from seamline.partitioner.loading import DEMO_DIR
    from transformers import AutoModelForCausalLM

    rt = EdgeRuntime(bundle, verify=False)
    model = AutoModelForCausalLM.from_pretrained(DEMO_DIR).eval()
    ids = rt.encode_text(PROMPT)
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=n, do_sample=False, eos_token_id=rt.manifest.eos_token_id,
                             pad_token_id=rt.manifest.eos_token_id)
    return rt.decode_ids(out[0, len(ids):].tolist())


@pytest.mark.parametrize("codec", ["fp32", "fp16"])
def test_generate_through_agent_matches_unsplit(demo_bundle, demo_cloud, start_agent, codec):
    agent = start_agent(edge_config(demo_bundle, [demo_cloud.address], split=2, codec=codec, chunk_tokens=8))
    expected = _reference(demo_bundle, N)
    out = subprocess.run([sys.executable, "-m", "seamline", "generate", PROMPT, "--agent", agent.url,
                          "--max-tokens", str(N), "--temperature", "0"], capture_output=True, text=True, check=False, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout == PROMPT + expected + "\n"  # the prompt, then the continuation
    body = httpx.post(agent.url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": N, "temperature": 0},
                      timeout=60).json()
    assert body["choices"][0]["text"] == expected
    assert body["seamline"]["served_by"]["local"] == 0 and body["seamline"]["codec"] == codec
