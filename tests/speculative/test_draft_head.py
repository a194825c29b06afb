"""Shallow-exit draft heads: distillation on a tiny model (few steps), ONNX parity with the torch head, the
manifest field's round trip and checks, the acceptance the manifest records against the one the edge's
own ONNX path measures on held-out text, and the edge drafter's imports (no torch)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from seamline.protos.bundle import BundleError, Manifest, load_bundle

SPLITS = (1, 3)


@pytest.fixture(scope="module")
def headed(spec_bundle, tiny_checkpoint, calibration_file, tmp_path_factory):
    """A copy of the speculative tests' tiny Llama bundle (every layer) with draft heads at splits 1 and 3,
    trained for a few steps."""
    from seamline.partitioner.draft_head import DraftHeadOptions, add_draft_heads
    from seamline.partitioner.families import adapter_for
    from seamline.partitioner.loading import load_model

    out = tmp_path_factory.mktemp("draft") / "bundle"
    shutil.copytree(spec_bundle("llama"), out)
    manifest = load_bundle(out)
    model, _ = load_model(tiny_checkpoint("llama"))
    fa = adapter_for(model)
    opts = DraftHeadOptions(text=calibration_file, splits=",".join(map(str, SPLITS)), steps=12, batch=64,
                            train_tokens=512, heldout_tokens=256)
    results = add_draft_heads(out, manifest, opts, fa=fa)
    return out, fa, results


def test_manifest_records_heads_and_round_trips(headed):
    out, fa, _ = headed
    m = load_bundle(out)  # every sha256 checked, the draft files included
    assert sorted(m.draft_heads, key=int) == [str(k) for k in SPLITS]
    for k in SPLITS:
        d = m.draft_heads[str(k)]
        assert d.graph == f"draft_head_k{k}.onnx" and d.graph in m.files
        assert 0.0 <= d.acceptance <= 1.0 and d.heldout_tokens > 0
        assert d.train["steps"] == 12 and d.train["adapter_params"] > 0
        # the LM head lives once, outside the graphs (the tiny Llama's head is untied from its embedding)
        assert d.lm_head is not None and d.lm_head in m.files
        v, c = fa.shape.vocab_size, fa.shape.hidden_size
        assert d.train["graph_bytes"] < v * c * 4
    assert Manifest.from_json(m.to_json()) == m
    d = json.loads(m.to_json())
    d["draft_heads"]["1"]["acceptance"] = 1.5
    with pytest.raises(BundleError, match=r"draft_heads\.1\.acceptance"):
        Manifest.from_dict(d)
    d = json.loads(m.to_json())
    d["draft_heads"]["99"] = d["draft_heads"].pop("1")
    with pytest.raises(BundleError, match=r"draft_heads\.99"):
        Manifest.from_dict(d)
    d = json.loads(m.to_json())
    d["draft_heads"]["1"]["graph"] = "../elsewhere.onnx"
    with pytest.raises(BundleError, match="climbs out"):
        Manifest.from_dict(d)


def test_onnx_head_matches_torch(headed):
    import torch
    from seamline.edge.shallow_exit import ShallowExit
    from seamline.partitioner.draft_head import DraftHead

    out, fa, results = headed
    m = load_bundle(out, verify=False)
    h = torch.randn(7, fa.shape.hidden_size) * 2
    for k in SPLITS:
        head = ShallowExit.from_bundle(out, m, k)
        with torch.no_grad():
            want_logits, want_ids = DraftHead(fa, results[k]["adapter"])(h[None])
        got = head.logits(h.numpy())
        np.testing.assert_allclose(got, want_logits[0].numpy(), rtol=1e-4, atol=1e-4)
        assert head.next_ids(h.numpy()).tolist() == want_ids[0].tolist()
    with pytest.raises(LookupError, match="no shallow-exit draft head for split 2"):
        ShallowExit.from_bundle(out, m, 2)


def test_recorded_acceptance_matches_the_edge_path(headed, calibration_file):
    """The acceptance in the manifest is what the ONNX edge path (blocks [0, k) + ShallowExit) reaches on the
    held-out text against the full model's greedy token."""
    import torch
    from seamline.edge.runtime import EdgeRuntime
    from seamline.edge.shallow_exit import ShallowExit
    from seamline.partitioner.draft_head import draft_texts

    out, fa, _ = headed
    rt = EdgeRuntime(out, verify=False)
    _train, held, _src = draft_texts("x", calibration_file)
    ids = rt.encode_text(held)[:256]
    window = min(rt.manifest.max_positions, 256)  # the windows partition measured on
    windows = [ids[a:a + window] for a in range(0, len(ids), window) if len(ids[a:a + window]) >= 2]
    with torch.no_grad():
        full = np.concatenate([fa.model(torch.tensor([w])).logits[0].argmax(-1).numpy() for w in windows])
    for k in SPLITS:
        head = ShallowExit.from_bundle(out, rt.manifest, k)
        guess = np.concatenate([head.next_ids(rt.forward(w, 0, k, rt.new_cache())) for w in windows])  # ONNX
        measured = float(np.mean(guess == full))
        recorded = rt.manifest.draft_heads[str(k)].acceptance
        assert abs(measured - recorded) <= 0.02, (k, measured, recorded)
        assert recorded >= rt.manifest.draft_heads[str(k)].train["logit_lens_acceptance"]


def test_drafts_extend_every_returned_token(headed):
    """ShallowExit drafts gamma tokens, calling extend exactly for the tokens it returns, in order."""
    from seamline.edge.drafters import DraftContext
    from seamline.edge.runtime import EdgeRuntime
    from seamline.edge.shallow_exit import ShallowExit

    out, _fa, _ = headed
    rt = EdgeRuntime(out, verify=False)
    ids = rt.encode_text("the cat sat on the mat and the dog")
    cache = rt.new_cache()
    h = rt.forward(ids, 0, 3, cache)
    extended = []

    def extend(token):
        extended.append(token)
        return rt.forward([token], len(ids) + len(extended) - 1, 3, cache)[0]

    head = ShallowExit.from_bundle(out, rt.manifest, 3)
    drafts = head.draft(DraftContext(ids, h[-1], extend), 4)
    assert len(drafts) == 4 and drafts == extended
    assert drafts[0] == int(head.next_ids(h[-1:])[0])
    assert head.draft(DraftContext(ids, None, extend), 4) == []  # no layer-k state (split 0): no drafts


def test_edge_drafter_imports_no_torch():
    code = ("import sys; import seamline.edge.shallow_exit; "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
            "sys.exit(f'imported {bad}' if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).parent)
    assert r.returncode == 0, r.stderr + r.stdout


async def test_greedy_identical_with_shallow_exit(headed, spec_cloud):
    """Through a real edge engine and cloud: greedy output with the shallow-exit drafter equals the plain run's,
    at each split that has a head, and the drafts were really sent and verified."""
    from seamline.edge.agent import build_engine, close_engine
    from seamline.edge.messages import GenerationRequest
    from seamline.edge.policy import FixedPolicy
    from seamline.protos.sampling import SamplingParams

    from .conftest import edge_config

    out, _fa, _ = headed
    engine = build_engine(edge_config(out, [spec_cloud("llama").address]))
    prompt = tuple(engine.encode_prompt("the cat sat on the mat. the dog sat on the log. the cat"))
    try:
        for k in SPLITS:
            engine.policy = FixedPolicy.from_manifest(engine.manifest, k, "fp32", zstd=False)
            plain = await engine.run(GenerationRequest(prompt, 20, SamplingParams(), speculate="off"))
            spec = await engine.run(GenerationRequest(prompt, 20, SamplingParams(), speculate="shallow-exit",
                                                      draft_tokens=3))
            assert spec.token_ids == plain.token_ids, f"split {k}"
            assert spec.stats.drafted_tokens > 0 and spec.stats.cloud_steps <= plain.stats.cloud_steps
    finally:
        await close_engine(engine)


def test_partition_cli_and_split_choice(tmp_path):
    import argparse

    from seamline.partitioner.cli import add_partition_arguments
    from seamline.partitioner.draft_head import DraftHeadError, resolve_splits

    p = argparse.ArgumentParser()
    add_partition_arguments(p)
    assert "--draft-head" in p.format_help()
    a = p.parse_args(["--out", str(tmp_path), "--draft-head", "--draft-splits", "1,3", "--draft-steps", "5",
                      "--draft-text", "t.txt"])
    assert a.draft_head and a.draft_splits == "1,3" and a.draft_steps == 5 and a.draft_text == Path("t.txt")

    class M:  # the manifest fields resolve_splits reads
        min_split, max_split, default_split = 0, 4, 2

        def allowed_splits(self):
            return range(self.min_split, self.max_split + 1)

    assert resolve_splits("all", M()) == [1, 2, 3, 4]  # split 0 runs no edge layers: no head there
    assert resolve_splits("default", M()) == [2]
    assert resolve_splits("3,1", M()) == [1, 3]
    for bad in ("0", "5", "x", ""):
        with pytest.raises(DraftHeadError, match="--draft-splits"):
            resolve_splits(bad, M())


async def test_auto_drafts_with_the_head_where_lookup_finds_nothing(headed, spec_cloud):
    """``--speculate auto`` on a bundle with heads: prompt lookup first, the shallow-exit head where the text
    has no repeat to copy (a prompt of distinct tokens); greedy output still equals the plain run's, with
    every step drafting (fixed) and with the number of drafts chosen per step (adaptive)."""
    from seamline.edge.agent import build_engine, close_engine
    from seamline.edge.drafters import PromptLookup, auto_drafters
    from seamline.edge.messages import GenerationRequest
    from seamline.edge.policy import FixedPolicy
    from seamline.edge.shallow_exit import ShallowExit
    from seamline.protos.sampling import SamplingParams

    from .conftest import edge_config

    out, _fa, _ = headed
    engine = build_engine(edge_config(out, [spec_cloud("llama").address]))
    try:
        k = SPLITS[0]
        assert [type(x) for x in auto_drafters(engine.runtime, k)] == [PromptLookup, ShallowExit]
        prompt = tuple(range(5, 25))
        engine.policy = FixedPolicy.from_manifest(engine.manifest, k, "fp32", zstd=False)
        plain = await engine.run(GenerationRequest(prompt, 16, SamplingParams(), speculate="off"))
        spec = await engine.run(GenerationRequest(prompt, 16, SamplingParams(), speculate="auto", draft_tokens=3))
        assert spec.token_ids == plain.token_ids
        assert spec.stats.drafted_tokens > 0
        adaptive = await engine.run(GenerationRequest(prompt, 16, SamplingParams(), speculate="auto",
                                                      draft_tokens=3, draft_policy="adaptive"))
        assert adaptive.token_ids == plain.token_ids  # however many it drafted (a probe at least)
        assert adaptive.stats.drafted_tokens > 0
    finally:
        await close_engine(engine)
