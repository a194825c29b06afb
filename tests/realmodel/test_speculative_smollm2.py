"""Speculative decoding on the real SmolLM2-135M: greedy output is identical with prompt-lookup speculation on
and off (split SPLIT, fp32 codec), on an input-grounded prompt where drafts are accepted."""

from __future__ import annotations

from seamline.edge.agent import build_engine, close_engine
from seamline.edge.config import EdgeConfig
from seamline.edge.messages import GenerationRequest
from seamline.protos.sampling import SamplingParams

from .conftest import SPLIT

PROMPT = ("Copy the sentence.\nSentence: The quick brown fox jumps over the lazy dog near the old river bank.\n"
          "Copy: The quick brown fox")
N = 24


async def test_greedy_identical_with_prompt_lookup(smol_bundle, smol_cloud):
    config = EdgeConfig(bundle=str(smol_bundle), cloud=[smol_cloud.address], codec="fp32", split=SPLIT,
                        chunk_tokens=32, connect_timeout=10.0, step_timeout=60.0, verify=False,
                        log_level="WARNING")
    engine = build_engine(config)
    try:
        prompt = tuple(engine.encode_prompt(PROMPT))
        plain = await engine.run(GenerationRequest(prompt, N, SamplingParams()))
        spec = await engine.run(GenerationRequest(prompt, N, SamplingParams(), speculate="prompt-lookup",
                                                  draft_tokens=4, draft_policy="fixed"))
    finally:
        await close_engine(engine)
    assert spec.token_ids == plain.token_ids and spec.text == plain.text
    assert spec.stats.accepted_tokens > 0 and spec.stats.cloud_steps < plain.stats.cloud_steps
