"""``seamline bench SCENARIO --json OUT``: each scenario prints a table and writes JSON with a summary.

Every scenario measures seamline against the alternative a user would pick instead, in the same
run, and reports ratios.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
import time
from pathlib import Path

# scenario -> (module, what it measures)
SCENARIOS: dict[str, tuple[str, str]] = {
    "codec": ("seamline.bench.codec", "bytes vs fidelity per codec and split (baseline: unsplit fp32)"),
    "edge": ("seamline.bench.edge", ("edge decode latency: ONNX Runtime fp32/int8 vs eager PyTorch; "
                                      "every layer vs onnxruntime-genai (the on-device peer)")),
    "overhead": ("seamline.bench.overhead", "framework overhead per decode step vs a bare gRPC ping-pong"),
    "e2e": ("seamline.bench.e2e", "TTFT and per-token latency over the link emulator vs the alternatives"),
    "throughput": ("seamline.bench.throughput", "cloud decode tokens/s at 1..64 concurrent sessions"),
    "adaptive": ("seamline.bench.adaptive", "adaptive controller vs every fixed split and the oracle"),
    "load": ("seamline.bench.load", "concurrent sessions: errors, p99 step, RSS (--replicas N: nginx vs one)"),
    "speculative": ("seamline.bench.speculative", "decode tokens/s with speculative decoding vs the plain split"),
}


def _splits(value: str) -> list[int]:
    try:
        ks = sorted({int(v) for v in value.split(",") if v.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"--splits takes split layers like 2,14,28, got {value!r}") from None
    if not ks or ks[0] < 1:
        raise argparse.ArgumentTypeError(f"--splits takes split layers >= 1 like 2,14,28, got {value!r}")
    return ks


def _codecs(value: str) -> list[str]:
    from seamline.protos.codec import CODEC_NAMES

    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in CODEC_NAMES]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"expected codec names from {', '.join(CODEC_NAMES)}; "
                                         f"got {', '.join(unknown) or repr(value)}")
    return list(dict.fromkeys(names))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = "Benchmarks side by side with baselines. Scenarios: " + "; ".join(
        f"{k}: {v[1]}" for k, v in SCENARIOS.items())
    p.add_argument("scenario", choices=sorted(SCENARIOS))
    p.add_argument("--json", type=Path, default=None, help="write the results (rows + summary) here")
    p.add_argument("--model", default="demo", help="model for the scenario: demo, gpt2-124m, smollm2-135m (real "
                   "weights, fetched once), a checkpoint folder, a hub id or a .gguf file")
    p.add_argument("--quick", action="store_true", help="sized for CI: fewer tokens, splits and repeats")
    p.add_argument("--splits", type=_splits, default=None, metavar="K,K,...",
                   help="codec: measure these splits only (default: every split; a 30-layer model takes an hour "
                   "on 2 cores)")
    p.add_argument("--codecs", type=_codecs, default=None, metavar="NAME,...",
                   help="codec: measure these codecs only (default: every registered codec), e.g. rice8,rice10")
    p.add_argument("--null-executor", action="store_true",
                   help="throughput: also the service with a zero-cost model vs a bare gRPC ping-pong, one CPU")
    p.add_argument("--replicas", type=int, default=None, metavar="N",
                   help="load: the same load through nginx over N cloud replicas vs one replica directly")


def run(args: argparse.Namespace) -> int:
    try:
        mod = importlib.import_module(SCENARIOS[args.scenario][0])
    except ImportError as e:
        print(f"bench {args.scenario}: not available in this build ({e})", file=sys.stderr)
        return 2
    t0 = time.time()
    result = mod.run(args)
    result["machine"] = f"{platform.machine()}, {platform.processor() or 'cpu'}, python {platform.python_version()}"
    result["wall_s"] = round(time.time() - t0, 1)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=float) + "\n")
        print(f"wrote {args.json}")
    return 0
