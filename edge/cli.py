"""``seamline edge`` (the agent daemon) and ``seamline generate`` (one generation from the shell)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import urllib.error
import urllib.request

from seamline.protos.bundle import BundleError

from .config import DAEMON, ConfigError, EdgeConfig
from .openai_compat import read_sse

EDGE_DESCRIPTION = """\
Run the edge agent: the bundle's first k layers in ONNX Runtime, the rest on a seamline cloud over
gRPC, and a local OpenAI-compatible HTTP API (POST /v1/completions, /v1/chat/completions; GET
/v1/models, /healthz, /metrics). Settings come from defaults < --config FILE < environment
(SEAMLINE_EDGE_<NAME>, e.g. SEAMLINE_EDGE_THREADS=4; the token: SEAMLINE_TOKEN) < flags. When the cloud
is unreachable and the bundle holds every layer, generations finish on the device. SIGTERM drains:
in-flight requests finish, new ones are refused, then the agent exits."""

EDGE_EPILOG = """\
examples:
  seamline edge --bundle ./bundle --cloud 127.0.0.1:50051
  seamline edge --bundle ./bundle --cloud a.example:443,b.example:443 --tls-ca ca.pem --token T --split 3
  seamline edge --bundle ./bundle --cloud cloud.example:443 --tls-ca ca.pem --tls-cert dev.pem --tls-key dev.key
  curl -s localhost:8080/v1/completions -d '{"prompt": "ROMEO:", "max_tokens": 32, "temperature": 0}'

config file (TOML, or JSON with a .json suffix; optionally in an [edge] table; keys are the long flag
names):
  bundle = "bundle"
  cloud = ["127.0.0.1:50051"]
  codec = "int8"
Pass the token in the environment variable SEAMLINE_TOKEN: it stays out of `ps` and of config files."""


def add_edge_arguments(p: argparse.ArgumentParser) -> None:
    p.description = EDGE_DESCRIPTION
    p.epilog = EDGE_EPILOG
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    EdgeConfig.add_flags(p)


def _config(args: argparse.Namespace, **extra: object) -> EdgeConfig:
    return EdgeConfig.from_args(args, **extra)


def _logging(level: str | None) -> None:
    logging.basicConfig(level=getattr(logging, str(level or "INFO").upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def run_edge(args: argparse.Namespace) -> int:
    try:
        config = _config(args)
        _logging(config.log_level)
        from .agent import EdgeAgent

        agent = EdgeAgent(config)
        return asyncio.run(agent.run_until_signal())
    except (ConfigError, BundleError, FileNotFoundError) as e:
        print(f"seamline edge: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


# ------------------------------------------------------------------------------------------ generate

GENERATE_DESCRIPTION = """\
Generate text from a prompt and print it, followed by a timing line on stderr (edge, network and
cloud milliseconds, bytes, split, codec, and which path served the tokens). Through a running agent
(--agent, the default) or standalone in this process (--bundle, with --cloud or fully local)."""


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    p.description = GENERATE_DESCRIPTION
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = ("examples:\n  seamline generate \"ROMEO:\" --max-tokens 48\n"
                "  seamline generate \"ROMEO:\" --bundle ./bundle --cloud 127.0.0.1:50051 --stream")
    a = p.add_argument
    a("prompt", help="the prompt text")
    a("--agent", metavar="URL", help="base URL of a running agent (default http://127.0.0.1:8080 unless --bundle)")
    a("--max-tokens", type=int, default=64, help="tokens to generate at most (default 64)")
    a("--temperature", type=float, default=0.0, help="0 = greedy (default 0)")
    a("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1 = off)")
    a("--seed", type=int, default=0, help="sampling seed (default 0)")
    a("--stop", action="append", default=None, metavar="TEXT", help="stop string (repeatable)")
    a("--chat", action="store_true", help="send the prompt as one user message to /v1/chat/completions")
    a("--stream", action="store_true", help="print tokens as they arrive")
    a("--json", action="store_true", help="print the whole response (and its timings) as JSON instead of the text")
    a("--log-level", default="WARNING", help="standalone log level (default WARNING)")
    # --bundle runs standalone, with the agent's settings (those of its HTTP API aside)
    EdgeConfig.add_flags(p, skip_groups=(DAEMON,))


def timing_line(s: dict, usage: dict | None = None) -> str:
    served = s.get("served_by", {})
    toks = (usage or {}).get("completion_tokens", sum(served.values()))
    line = (f"[seamline] {toks} tokens in {s.get('total_ms', 0) / 1e3:.2f}s ({s.get('tokens_per_s', 0):.1f} tok/s, "
            f"first after {s.get('ttft_ms', 0):.0f} ms) | split {s.get('split')} codec {s.get('codec')} | "
            f"edge {s.get('edge_ms', 0):.1f} ms, network {s.get('network_ms', 0):.1f} ms, cloud queue "
            f"{s.get('cloud_queue_ms', 0):.1f} ms, cloud compute {s.get('cloud_compute_ms', 0):.1f} ms, local "
            f"{s.get('local_ms', 0):.1f} ms | sent {s.get('bytes_sent', 0) / 1e3:.1f} kB, received "
            f"{s.get('bytes_received', 0) / 1e3:.1f} kB | served by cloud {served.get('cloud', 0)}, local "
            f"{served.get('local', 0)} | replays {s.get('replays', 0)}")
    if s.get("fallback_reason"):
        line += f" | fallback: {s['fallback_reason']}"
    return line


def _body(args: argparse.Namespace) -> tuple[str, dict]:
    body = {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p,
            "seed": args.seed, "stream": bool(args.stream)}
    if args.stop:
        body["stop"] = args.stop
    if args.chat:
        body["messages"] = [{"role": "user", "content": args.prompt}]
        return "/v1/chat/completions", body
    body["prompt"] = args.prompt
    return "/v1/completions", body


def _choice_text(choice: dict) -> str:
    if "text" in choice:
        return choice["text"] or ""
    return (choice.get("delta") or choice.get("message") or {}).get("content") or ""


def _through_agent(args: argparse.Namespace) -> int:
    base = (args.agent or "http://127.0.0.1:8080").rstrip("/")
    path, body = _body(args)
    req = urllib.request.Request(base + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        resp = urllib.request.urlopen(req, timeout=600)
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read()).get("error", {}).get("message", "")
        except ValueError:
            message = e.reason
        print(f"seamline generate: the agent answered {e.code}: {message}", file=sys.stderr)
        return 1
    except urllib.error.URLError as e:
        print(f"seamline generate: cannot reach the agent at {base} ({e.reason}); start it with `seamline edge "
              "--bundle DIR --cloud HOST:PORT`, pass --agent URL, or run standalone with --bundle",
              file=sys.stderr)
        return 1
    with resp:
        if not args.stream:
            data = json.loads(resp.read())
            if args.json:
                print(json.dumps(data, indent=2))
            else:
                print(args.prompt + _choice_text(data["choices"][0]) if not args.chat
                      else _choice_text(data["choices"][0]))
            print(timing_line(data.get("seamline", {}), data.get("usage")), file=sys.stderr)
            return 0
        if not args.chat:
            sys.stdout.write(args.prompt)
        stats: dict = {}
        for data in read_sse(resp):
            if "error" in data:
                print(f"\nseamline generate: {data['error'].get('message')}", file=sys.stderr)
                return 1
            if data.get("choices"):
                sys.stdout.write(_choice_text(data["choices"][0]))
                sys.stdout.flush()
            stats = data.get("seamline") or stats
        print()
        print(timing_line(stats), file=sys.stderr)
    return 0


async def _standalone(args: argparse.Namespace) -> int:
    from .agent import build_engine, close_engine
    from .errors import EdgeError
    from .openai_compat import parse_chat, parse_completion

    config = _config(args, listen="127.0.0.1:0")
    engine = build_engine(config)
    try:
        _, body = _body(args)
        if args.chat:
            api_req = parse_chat(body, engine.encode_prompt, config.default_max_tokens, config.deadline, engine.chat)
        else:
            api_req = parse_completion(body, engine.encode_prompt, config.default_max_tokens, config.deadline)
        gen = engine.start(api_req.generation)
        if not args.chat and not args.json:
            sys.stdout.write(args.prompt)
        async for event in gen.events():
            if args.stream and not args.json:
                sys.stdout.write(event.text)
                sys.stdout.flush()
        result = gen.result()
        if args.json:
            print(json.dumps({"text": result.text, "token_ids": result.token_ids,
                              "finish_reason": result.finish_reason, "seamline": result.stats.to_dict()}, indent=2))
            return 0
        if not args.stream:
            sys.stdout.write(result.text)
        print()
        print(timing_line(result.stats.to_dict()), file=sys.stderr)
        return 0
    except EdgeError as e:
        print(f"\nseamline generate: {e.message}", file=sys.stderr)
        return 1
    finally:
        await close_engine(engine)


def run_generate(args: argparse.Namespace) -> int:
    standalone = getattr(args, "bundle", None) is not None  # a setting flag: absent unless given
    if standalone and args.agent:
        print("seamline generate: pass either --agent URL or --bundle DIR, not both", file=sys.stderr)
        return 2
    if not standalone:
        return _through_agent(args)
    _logging(args.log_level)
    try:
        return asyncio.run(_standalone(args))
    except (ConfigError, BundleError, FileNotFoundError) as e:
        print(f"seamline generate: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
