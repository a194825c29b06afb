"""The daemon and the commands: SIGTERM drains, bad bundles are refused, `seamline generate`, no torch."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading

import httpx
import pytest
from seamline.testing.procs import EDGE_READY, Child, seamline_command

from seamline.cli import main

from .conftest import PROMPT

IMPORTS = r"""
import importlib, pkgutil, sys
import seamline.edge
for mod in pkgutil.iter_modules(seamline.edge.__path__):
    importlib.import_module(f"seamline.edge.{mod.name}")
from seamline.cli import main
try:
    main(["edge", "--help"])
except SystemExit:
    pass
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))
print("HEAVY:" + ",".join(heavy))
"""


def test_edge_modules_import_no_torch_or_transformers():
    out = subprocess.run([sys.executable, "-c", IMPORTS], check=False, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "seamline edge" in out.stdout  # the help text was printed
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("HEAVY:"))
    assert line == "HEAVY:", f"seamline.edge pulled in: {line[6:]}"


def test_sigterm_drains_in_flight_requests(full_bundle, cloud):
    agent = Child("seamline edge", seamline_command("edge", "--bundle", str(full_bundle), "--cloud", cloud.address,
                                                    "--listen", "127.0.0.1:0", "--codec", "fp32", "--log-level",
                                                    "WARNING"), one_thread=False)
    try:
        url = agent.wait_for(EDGE_READY, 120).group(1)
        pieces, done = [], []
        with httpx.stream("POST", url + "/v1/completions", timeout=60,
                          json={"prompt": PROMPT, "max_tokens": 40, "temperature": 0, "stream": True}) as r:
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done.append(True)
                    break
                chunk = json.loads(line[6:])
                pieces.append(chunk)
                if len(pieces) == 1:
                    agent.proc.send_signal(signal.SIGTERM)  # drain: this stream must still finish
        assert done and pieces[-1]["choices"][0]["finish_reason"] in ("length", "stop")
        assert sum(pieces[-1]["seamline"]["served_by"].values()) == len(pieces) - 1
        assert agent.wait(30) == 0
        assert "draining" in agent.output and "stopped" in agent.output
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/healthz", timeout=5)
    finally:
        agent.stop()


def test_tampered_bundle_is_refused_with_the_fix(full_bundle, trimmed_bundle, tmp_path, capsys):
    copy = tmp_path / "bundle"
    shutil.copytree(full_bundle, copy)
    with open(copy / "block_01.onnx", "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert main(["edge", "--bundle", str(copy), "--listen", "127.0.0.1:0"]) == 2
    err = capsys.readouterr().err
    assert "block_01.onnx: sha256 mismatch" in err and "re-run `partition`" in err
    assert main(["edge", "--listen", "127.0.0.1:0"]) == 2
    assert "--bundle" in capsys.readouterr().err
    assert main(["edge", "--bundle", str(trimmed_bundle), "--listen", "127.0.0.1:0"]) == 2
    assert "cannot generate alone: pass --cloud" in capsys.readouterr().err


def test_generate_standalone_and_through_the_agent(full_bundle, cloud, agent, reference, capsys):
    _, expected = reference(PROMPT, 12)
    assert main(["generate", PROMPT, "--bundle", str(full_bundle), "--cloud", cloud.address, "--codec", "fp32",
                 "--max-tokens", "12"]) == 0
    out = capsys.readouterr()
    assert out.out == PROMPT + expected + "\n"
    assert "[seamline] 12 tokens" in out.err and "served by cloud 12, local 0" in out.err
    assert main(["generate", PROMPT, "--agent", agent.url, "--max-tokens", "12", "--stream"]) == 0
    out = capsys.readouterr()
    assert out.out == PROMPT + expected + "\n" and "split 2 codec fp32" in out.err
    assert main(["generate", "hi", "--agent", "http://127.0.0.1:9", "--max-tokens", "2"]) == 1
    assert "cannot reach the agent" in capsys.readouterr().err


def test_concurrent_requests_share_the_worker(agent, reference):
    _, expected = reference(PROMPT, 16)
    results: list[str] = []

    def one():
        r = httpx.post(agent.url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 16, "temperature": 0},
                       timeout=60)
        results.append(r.json()["choices"][0]["text"])

    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [expected] * 4


def test_demo_runs_the_whole_path(edge_checkpoint, full_bundle, tmp_path, monkeypatch, capsys):
    """`seamline demo` on the tiny checkpoint, its bundle already in the cache (no partitioning here)."""
    from seamline.partitioner.loading import model_hash

    monkeypatch.setenv("SEAMLINE_CACHE", str(tmp_path))
    shutil.copytree(full_bundle, tmp_path / f"bundle-{model_hash(edge_checkpoint)[:12]}")
    assert main(["demo", "--model", str(edge_checkpoint), "--prompt", "All: Speak, speak.", "--max-tokens", "8",
                 "--codec", "fp32"]) == 0
    out = capsys.readouterr()
    assert "where the time went" in out.out and "network (round trips - server time)" in out.out
    assert "using the cached bundle" in out.err and "stopped the edge agent and the cloud service" in out.err
