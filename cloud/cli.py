"""``seamline cloud``: serve the back half of a model over gRPC until SIGINT / SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys

from .config import CloudConfig, ConfigError

DESCRIPTION = """\
Serve layers k..L and the LM head of a model to seamline edges over gRPC (seamline.v1.Seamline,
plus grpc.health.v1 and reflection). Settings come from defaults < --config FILE < environment
(SEAMLINE_CLOUD_<NAME>, e.g. SEAMLINE_CLOUD_KV_BUDGET=8GiB) < flags.
On SIGTERM the server drains: new streams answer UNAVAILABLE, in-flight steps finish within --grace
seconds, then it exits."""

EPILOG = """\
examples:
  seamline cloud --model demo --port 0
  seamline cloud --model ./my-llama --host 0.0.0.0 --device cuda --kv-budget 8GiB --metrics-port 9100
  seamline cloud --config cloud.toml --auth-tokens tokens.txt --tls-cert srv.pem --tls-key srv.key

config file (TOML, or JSON with a .json suffix; optionally in a [cloud] table): the long flag names as
keys, e.g.
  model = "demo"
  kv_budget = "2GiB"
  max_batch = 16
tokens file: one `TOKEN DEVICE_ID` per line, or a JSON object {"TOKEN": "DEVICE_ID"}."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config FILE`` and one flag per ``CloudConfig`` setting (absent unless given)."""
    CloudConfig.add_flags(parser)


def config_from_args(args: argparse.Namespace) -> CloudConfig:
    return CloudConfig.from_args(args)


def run(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
        logging.basicConfig(level=getattr(logging, config.log_level),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # no "Loading weights" bar in a server's log
        return asyncio.run(_serve_until_signal(config))
    except (ConfigError, FileNotFoundError, ValueError) as e:  # ModelNotFound, UnsupportedModel are these
        print(f"seamline cloud: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


async def _serve_until_signal(config: CloudConfig) -> int:
    from seamline.protos import memory

    from .server import serve  # torch and grpc load here, after the flags were checked

    running = await serve(config)
    memory.settle_heap()  # a full collection over the start-up heap would stall every session (protos/memory.py)
    metrics = f", metrics on :{running.metrics_port}" if running.metrics_port is not None else ""
    print(f"seamline cloud listening on {running.address} (model {running.model.model_id}, "
          f"device {running.model.device}{metrics})", flush=True)
    loop = asyncio.get_running_loop()
    stopping: list[asyncio.Task] = []  # keeps a reference to the drain task

    def on_signal() -> None:
        if not stopping:
            _say("seamline cloud: draining")
            stopping.append(loop.create_task(running.stop()))

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    await running.wait_closed()
    _say("seamline cloud: stopped")
    return 0


def _say(line: str) -> None:
    """Print a status line; a parent that stopped reading stdout must not turn a clean exit into a crash."""
    with contextlib.suppress(OSError):
        print(line, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="seamline cloud", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
