"""The edge stays light: importing every edge and protos module pulls in no torch or transformers."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = r"""
import importlib, pkgutil, sys
import seamline.edge, seamline.protos
for pkg in (seamline.edge, seamline.protos):
    for mod in pkgutil.iter_modules(pkg.__path__):
        if mod.name == "generate":  # protoc front end (dev tool), imports grpc_tools only
            continue
        importlib.import_module(f"{pkg.__name__}.{mod.name}")
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))
print("HEAVY:" + ",".join(heavy))
"""


def test_edge_and_protos_import_without_torch():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("HEAVY:")][0]
    assert line == "HEAVY:", f"edge/protos imported heavy modules: {line[6:]}"


def test_edge_command_help_without_torch():
    code = ("import sys\nfrom seamline.cli import main\n"
            "try:\n    main(['edge', '--help'])\nexcept SystemExit:\n    pass\n"
            "print('HEAVY:' + ','.join(sorted(m for m in sys.modules if m.split('.')[0] in ('torch','transformers'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "HEAVY:\n" in out.stdout or out.stdout.rstrip().endswith("HEAVY:"), out.stdout[-500:] + out.stderr[-2000:]
