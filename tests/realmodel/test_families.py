"""Every Llama-family variant through the whole path: tiny random Qwen2 (q/k/v biases) and Mistral, partitioned to
ONNX, the edge half in ONNX Runtime inside the agent, the rest in the cloud, greedy text equal to
``transformers`` ``generate`` (fp32 codec)."""

from __future__ import annotations

import httpx
import pytest

SPLIT = 2
N = 16
PROMPT_IDS = [101, 2034, 6302, 1012, 2077, 2057, 10838, 2151, 2582, 1010, 2963, 2033, 3713, 1012, 2035, 1012]


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_greedy_through_onnx_edge_agent_and_cloud(family, tiny_checkpoint, cut_bundle):
    import torch
    from seamline.edge.config import EdgeConfig
    from seamline.testing.servers import AgentThread, ServerThread, cloud_config
    from transformers import AutoModelForCausalLM

    ckpt = tiny_checkpoint(family)
    manifest, _, bundle = cut_bundle(family, split=SPLIT)  # shared with tests/partitioner/test_parity.py
    assert manifest.model_type == family and manifest.family == "llama"

    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    eos = manifest.eos_token_id
    with torch.inference_mode():
        out = model.generate(torch.tensor([PROMPT_IDS]), attention_mask=torch.ones(1, len(PROMPT_IDS), dtype=torch.long),
                             max_new_tokens=N, do_sample=False, eos_token_id=eos, pad_token_id=eos,
                             output_scores=True, return_dict_in_generate=True)
    expected = out.sequences[0, len(PROMPT_IDS):].tolist()
    if eos in expected:
        expected = expected[:expected.index(eos)]
    assert expected, "the reference should generate some tokens before its end token"
    # the chosen tokens' logprobs: a near-constant greedy text (random weights) still checks every step's numbers
    expected_lp = [float(torch.log_softmax(scores[0].float(), -1)[t]) for scores, t in zip(out.scores, expected)]

    cloud = ServerThread(cloud_config(ckpt)).start()
    try:
        agent = AgentThread(EdgeConfig(bundle=str(bundle), cloud=[cloud.address], listen="127.0.0.1:0", codec="fp32",
                                       split=SPLIT, chunk_tokens=8, log_level="WARNING")).start()
        try:
            r = httpx.post(agent.url + "/v1/completions", json={"prompt": PROMPT_IDS, "max_tokens": N,
                                                                "temperature": 0, "logprobs": 1}, timeout=120)
        finally:
            agent.stop()
    finally:
        cloud.stop()
    assert r.status_code == 200, r.text
    body = r.json()
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(bundle / "tokenizer.json"))
    assert body["choices"][0]["text"] == tok.decode(expected)
    assert body["usage"]["completion_tokens"] == len(expected)
    got_lp = body["choices"][0]["logprobs"]["token_logprobs"]
    assert got_lp == pytest.approx(expected_lp, abs=1e-3)
    s = body["seamline"]
    assert s["split"] == SPLIT and s["codec"] == "fp32" and s["served_by"]["local"] == 0
