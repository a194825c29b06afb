"""``seamline cloud``: serve the back half of a model over gRPC until SIGINT / SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import signal
import sys

from .config import CloudConfig, ConfigError, parse_size

DESCRIPTION = """\
Serve layers k..L and the LM head of a model to seamline edges over gRPC (seamline.v1.Seamline,
plus grpc.health.v1 and reflection). Settings come from defaults < --config FILE < flags.
On SIGTERM the server drains: Open answers UNAVAILABLE, in-flight steps finish within --grace
seconds, then it exits."""

EPILOG = """\
examples:
  seamline cloud --model demo --port 0
  seamline cloud --model ./my-llama --host 0.0.0.0 --device cuda --kv-budget 8GiB --metrics-port 9100
  seamline cloud --config cloud.toml --auth-tokens tokens.txt --tls-cert srv.pem --tls-key srv.key

config file (TOML, or JSON with a .json suffix): the long flag names as keys, e.g.
  model = "demo"
  kv_budget = "2GiB"
  max_batch = 16
tokens file: one `TOKEN DEVICE_ID` per line, or a JSON object {"TOKEN": "DEVICE_ID"}."""


def _size(text: str) -> int:
    try:
        return parse_size(text, "--kv-budget")
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `seamline cloud` flags; every default is None so a config file can supply it."""
    d = CloudConfig()

    def a(*flags, **kw):  # SUPPRESS: absent unless given, and no "(default: None)" in --help
        parser.add_argument(*flags, default=argparse.SUPPRESS, **kw)

    a("--model", help=f"`demo` or a local Hugging Face checkpoint folder (default {d.model})")
    a("--config", metavar="FILE", help="TOML or JSON file of settings; flags override it")
    a("--host", help=f"address to listen on (default {d.host}; 0.0.0.0 for every interface)")
    a("--port", type=int, help=f"port to listen on, 0 = a free one (default {d.port})")
    a("--device", help=f"auto | cpu | cuda | cuda:N (default {d.device}: CUDA when available)")
    a("--dtype", choices=("auto", "fp32", "fp16", "bf16"),
      help="weights and KV dtype (default auto: bf16/fp16 on CUDA, fp32 on CPU)")
    a("--max-sessions", type=int, help=f"open sessions at most (default {d.max_sessions})")
    a("--max-sessions-per-device", type=int, metavar="N",
      help="open sessions one device (bearer token) may hold; 0 = no per-device limit (default 0)")
    a("--kv-budget", type=_size, metavar="SIZE",
      help="KV cache bytes held by all sessions together, e.g. 2GiB or 512MB (default 2GiB)")
    a("--session-ttl", type=float, metavar="SECONDS",
      help=f"evict sessions idle this long (default {d.session_ttl:g})")
    a("--max-batch", type=int, help=f"decode steps per forward pass (default {d.max_batch})")
    a("--batch-window-ms", type=float,
      help=f"how long a decode step waits for others to join its batch (default {d.batch_window_ms:g})")
    a("--max-chunk-tokens", type=int, help=f"tokens per step request (default {d.max_chunk_tokens})")
    a("--min-split", type=int, help="smallest split k served; 0 allows token ids in (default 0)")
    a("--auth-tokens", metavar="FILE", help="require bearer tokens; file of `TOKEN DEVICE_ID` lines or JSON")
    a("--tls-cert", metavar="PEM", help="serve TLS with this certificate chain (needs --tls-key)")
    a("--tls-key", metavar="PEM", help="private key of --tls-cert")
    a("--client-ca", metavar="PEM", help="require client certificates signed by this CA (mutual TLS)")
    a("--metrics-port", type=int, help="serve Prometheus /metrics on this port (0 = a free one; default off)")
    a("--metrics-host", help=f"address of the metrics server (default {d.metrics_host})")
    a("--grace", type=float, metavar="SECONDS",
      help=f"on SIGTERM, time to finish in-flight steps (default {d.grace:g})")
    a("--threads", type=int, metavar="N",
      help="torch intra-op threads on CPU (default 0: torch's default, every core). Set it when the host "
           "also runs other work, e.g. an edge agent in a demo: oversubscribed cores slow torch many times over")
    parser.add_argument("--log-level", default="INFO", help="DEBUG | INFO | WARNING")


def config_from_args(args: argparse.Namespace) -> CloudConfig:
    names = [f.name for f in dataclasses.fields(CloudConfig)]  # every setting has a flag of the same name
    return CloudConfig.from_sources(getattr(args, "config", None), **{n: getattr(args, n, None) for n in names})


def run(args: argparse.Namespace) -> int:
    level = str(getattr(args, "log_level", "INFO")).upper()
    logging.basicConfig(level=getattr(logging, level, logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # no "Loading weights" bar in a server's log
        return asyncio.run(_serve_until_signal(config))
    except (ConfigError, FileNotFoundError, ValueError) as e:  # ModelNotFound, UnsupportedModel are these
        print(f"seamline cloud: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


async def _serve_until_signal(config: CloudConfig) -> int:
    from .server import serve  # torch and grpc load here, after the flags were checked

    running = await serve(config)
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
