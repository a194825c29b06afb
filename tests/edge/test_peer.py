"""The on-device peer of ``seamline bench edge``: onnxruntime-genai, built by its own model builder from the
same checkpoint, and seamline's edge (every layer on the device, the agent's local path) generate the same
greedy tokens from the same prompt, each through the bench's own runner (``bench/_peer.py``), so the bench
compares like with like. (onnxruntime-genai is the extra ``seamline[peer]``, part of ``[dev]``.)"""

from __future__ import annotations


def test_genai_and_the_edge_generate_the_same_greedy_tokens(tiny_checkpoint, cut_bundle):
    from seamline.bench import _peer
    from seamline.bench.peer import genai_folder

    bundle = cut_bundle("llama")
    assert bundle.manifest.has_all_layers
    genai = genai_folder(tiny_checkpoint("llama"), "fp32", threads=1)
    prompt = list(range(100, 140))
    ours = _peer.run_seamline(str(bundle.path), "fp32", prompt, 16, threads=1)
    peer = _peer.run_genai(str(genai), prompt, 16, threads=1)
    assert len(ours["token_ids"]) == len(peer["token_ids"]) == 16  # no stop token ends either early
    assert ours["token_ids"] == peer["token_ids"]
    for run in (ours, peer):
        assert run["prefill_ms"] > 0 and run["decode_ms_per_token"] > 0
    assert 0 < _peer.peak_rss_mb() < 1e6
