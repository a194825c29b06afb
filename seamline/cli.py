"""The ``seamline`` command (and ``partition``): one subcommand per role, imported lazily.

Lazy imports keep ``seamline edge`` and ``seamline generate`` free of torch on a device that
installed only ``seamline[edge]``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, add-arguments function, run function, one-line help)
COMMANDS: dict[str, tuple[str, str, str, str]] = {
    "partition": ("seamline.partitioner.cli", "add_partition_arguments", "run_partition",
                  "cut a model at a layer and export the edge half to ONNX (a bundle)"),
    "verify": ("seamline.partitioner.cli", "add_verify_arguments", "run_verify",
               "parity of a bundle's split model with the unsplit model"),
    "profile": ("seamline.partitioner.cli", "add_profile_arguments", "run_profile",
                "per-layer latency on this machine (edge: a bundle; cloud: --model)"),
    "privacy": ("seamline.partitioner.privacy_cli", "add_arguments", "run",
                "how many tokens the cloud can read back from the hidden state at each split (inversion attacks)"),
    "cloud": ("seamline.cloud.cli", "add_arguments", "run", "serve the back half over gRPC"),
    "edge": ("seamline.edge.cli", "add_edge_arguments", "run_edge",
             "the edge agent daemon: front half + local OpenAI-compatible HTTP API"),
    "generate": ("seamline.edge.cli", "add_generate_arguments", "run_generate",
                 "generate text through a running agent, or directly with --bundle/--cloud"),
    "demo": ("seamline.demo", "add_arguments", "run",
             "the whole path on the embedded demo model, on this machine"),
    "bench": ("seamline.bench.cli", "add_arguments", "run", "benchmarks side by side with baselines"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="seamline",
        description="Edge-cloud split inference for transformer language models: the device runs the first k "
                    "layers in ONNX Runtime, the cloud runs the rest in torch, compressed hidden states travel "
                    "over gRPC. `--model demo` (an embedded GPT-2 trained on Shakespeare) works offline.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, add_fn, _, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        try:
            getattr(importlib.import_module(module), add_fn)(p)
        except ImportError as e:
            p.set_defaults(_missing=f"`seamline {name}` is unavailable in this installation ({e}); "
                                    f"install the extra it needs, e.g. pip install 'seamline[all]'")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Build only the parser of the chosen command when one is named: `seamline edge` must not
    # import the partitioner (torch) just to print its help.
    if argv and argv[0] in COMMANDS:
        name = argv[0]
        module, add_fn, run_fn, help_text = COMMANDS[name]
        p = argparse.ArgumentParser(prog=f"seamline {name}", description=help_text,
                                    formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            print(f"seamline {name}: unavailable in this installation ({e}); install the extra it needs, "
                  "e.g. pip install 'seamline[all]'", file=sys.stderr)
            return 2
        getattr(mod, add_fn)(p)
        args = p.parse_args(argv[1:])
        return int(getattr(mod, run_fn)(args) or 0)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return 0


def partition_main(argv: list[str] | None = None) -> int:
    """The ``partition`` console script: the same as ``seamline partition``."""
    return main(["partition", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
