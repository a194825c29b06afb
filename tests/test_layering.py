"""The edge stays light: importing every edge and protos module (subpackages too) pulls in no torch or
transformers, and no test-support code (seamline.testing is not installed on a device)."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = r"""
import importlib, pkgutil, sys
import seamline.edge, seamline.protos
for pkg in (seamline.edge, seamline.protos):
    for mod in pkgutil.walk_packages(pkg.__path__, prefix=pkg.__name__ + "."):
        if mod.name == "seamline.protos.generate":  # protoc front end (dev tool), imports grpc_tools only
            continue
        importlib.import_module(mod.name)
heavy = sorted(m for m in sys.modules
               if m.split(".")[0] in ("torch", "transformers") or m.startswith("seamline.testing"))
print("HEAVY:" + ",".join(heavy))
"""


def test_edge_and_protos_import_without_torch():
    out = subprocess.run([sys.executable, "-c", SCRIPT], check=False, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("HEAVY:"))
    assert line == "HEAVY:", f"edge/protos imported heavy or test-support modules: {line[6:]}"


def test_edge_command_help_without_torch():
    code = ("import sys\nfrom seamline.cli import main\n"
            "try:\n    main(['edge', '--help'])\nexcept SystemExit:\n    pass\n"
            "print('HEAVY:' + ','.join(sorted(m for m in sys.modules if m.split('.')[0] in ('torch','transformers'))))")
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert "HEAVY:\n" in out.stdout or out.stdout.rstrip().endswith("HEAVY:"), out.stdout[-500:] + out.stderr[-2000:]
