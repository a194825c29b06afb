"""Container images, checked without a Docker engine: the Dockerfiles are read instruction by
instruction (non-root user, health check, entrypoint, what gets installed), the build context is
checked against .dockerignore, and the two health-check scripts run against real servers on
loopback. Building the images needs a Docker engine, which the test machines do not have."""

from __future__ import annotations

import asyncio
import http.server
import importlib.util
import json
import os
import re
import subprocess
import sys
import threading
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CLOUD = REPO / "deploy" / "cloud" / "Dockerfile"
EDGE = REPO / "deploy" / "edge" / "Dockerfile"


def _exec_form(args: str) -> list[str]:
    """JSON (exec) form of CMD / ENTRYPOINT / HEALTHCHECK CMD; shell form fails the test."""
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(w, str) for w in value), args
    return value


def _final(helpers, path):
    return helpers.final_stage(helpers.read_dockerfile(path))


def _one(stage, cmd):
    found = [i for i in stage if i.cmd == cmd]
    assert len(found) == 1, f"expected one {cmd} in the final stage, found {len(found)}"
    return found[0]


def _pip_installs(instructions):
    """The argument words of every `pip install` in RUN instructions."""
    out = []
    for ins in instructions:
        if ins.cmd != "RUN":
            continue
        for m in re.finditer(r"pip install ([^&;|]*)", ins.args):
            out.append(m.group(1).split())
    return out


def _extras(words: list[str], env: dict[str, str], helpers) -> list[set[str]]:
    """Extras of every local-project requirement (`.[a,b]`) among pip's words."""
    out = []
    for word in words:
        word = helpers.substitute(word.strip("\"'"), env)
        m = re.fullmatch(r"\.\[([^\]]*)\]", word)
        if m:
            out.append({e.strip() for e in m.group(1).split(",")})
        elif word == ".":
            out.append(set())
    return out


@pytest.mark.parametrize("path", [CLOUD, EDGE], ids=["cloud", "edge"])
def test_image_runs_as_non_root_with_a_health_check(helpers, path):
    stage = _final(helpers, path)
    user = _one(stage, "USER").args.split(":")[0]
    assert user not in ("root", "0") and user.isdigit(), \
        f"{path}: USER {user!r} must be numeric and not root (Kubernetes runAsNonRoot can only verify a UID)"
    health = _one(stage, "HEALTHCHECK").args
    assert "NONE" not in health.upper().split(), f"{path}: HEALTHCHECK {health}"
    command = _exec_form(re.search(r"\bCMD\s+(.*)", health).group(1))
    script = command[-1]
    copied = [i.args.split()[-1] for i in stage if i.cmd == "COPY"]
    assert script in copied, f"{path}: the health check runs {script}, which no COPY puts in the image"
    assert _one(stage, "STOPSIGNAL").args == "SIGTERM"


def test_cloud_image(helpers):
    instructions = helpers.read_dockerfile(CLOUD)
    env = helpers.arg_defaults(instructions)
    base = env["BASE_IMAGE"]
    assert re.fullmatch(r"nvidia/cuda:12\.\d+\.\d+-runtime-ubuntu\d\d\.04", base), \
        f"cloud image base {base!r}: expected a CUDA 12 *runtime* image"
    assert "24.04" in base, "Ubuntu 24.04 brings Python 3.12; 22.04's 3.10 cannot read TOML configs"
    stage = helpers.final_stage(instructions)
    assert _exec_form(_one(stage, "ENTRYPOINT").args) == ["seamline", "cloud"]
    exposed = {int(p.split("/")[0]) for i in stage if i.cmd == "EXPOSE" for p in i.args.split()}
    cmd = _exec_form(_one(stage, "CMD").args)
    args = helpers.cloud_parser().parse_args(cmd)
    assert {args.port, args.metrics_port} <= exposed, f"EXPOSE {exposed} misses the ports of CMD {cmd}"
    assert args.host == args.metrics_host == "0.0.0.0", "a container must listen on every interface"
    installs = _pip_installs(instructions)
    extras = [e for words in installs for e in _extras(words, env, helpers)]
    assert extras and all("cloud" in e for e in extras), f"the cloud image must install .[cloud]: {extras}"
    assert any("/models" in i.args for i in stage if i.cmd in ("VOLUME", "COPY")), "no /models in the image"
    envs = " ".join(i.args for i in stage if i.cmd == "ENV")
    assert "HF_HUB_OFFLINE=1" in envs, "the cloud must never fetch weights from a hub at run time"


def test_edge_image_installs_only_the_edge_extra(helpers):
    instructions = helpers.read_dockerfile(EDGE)
    env = helpers.arg_defaults(instructions)
    assert re.fullmatch(r"python:3\.1[1-9]-slim(-\w+)?", env["PYTHON_IMAGE"]), env["PYTHON_IMAGE"]
    for ins in instructions:  # the base images must be multi-architecture: no pinned platform
        if ins.cmd == "FROM":
            assert "--platform" not in ins.args, f"line {ins.line}: a pinned platform breaks arm64 builds"
    installs = _pip_installs(instructions)
    assert installs, "the edge image installs nothing?"
    for words in installs:
        extras = _extras(words, env, helpers)
        assert extras == [{"edge"}], f"edge image: pip install {' '.join(words)} must install exactly .[edge]"
        for word in words:
            assert not re.search(r"torch|transformers|requirements|\[.*(cloud|all|partitioner)", word), \
                f"edge image: `pip install {' '.join(words)}` pulls in {word}"
    guard = " ".join(i.args for i in instructions if i.cmd == "RUN")
    assert "find_spec" in guard and "'torch'" in guard, "the build must fail when torch gets into the image"
    stage = helpers.final_stage(instructions)
    assert _exec_form(_one(stage, "ENTRYPOINT").args) == ["seamline", "edge"]
    assert "8080" in _one(stage, "EXPOSE").args
    assert "/bundle" in _one(stage, "VOLUME").args


def test_edge_image_default_command_parses(helpers):
    parser = helpers.edge_parser()  # skips until edge/cli.py exists
    stage = _final(helpers, EDGE)
    cmd = _exec_form(_one(stage, "CMD").args)
    parser.parse_args(cmd)
    assert helpers.flag_value(cmd, "--listen").startswith("0.0.0.0:")


def test_edge_image_guard_rejects_torch(tmp_path):
    """The build-time guard of the edge image is real Python that fails when torch is importable."""
    run = next(i for i in EDGE.read_text().split("\n") if "find_spec" in i)
    code = re.search(r'python -c "(.*)"', run).group(1)
    fake = tmp_path / "site"
    (fake / "torch").mkdir(parents=True)
    (fake / "torch" / "__init__.py").write_text("")
    with_torch = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(fake)},
                                check=False, capture_output=True, text=True, timeout=60)
    assert with_torch.returncode != 0 and "torch" in with_torch.stderr
    without = subprocess.run([sys.executable, "-S", "-c", code], check=False, capture_output=True, text=True,
                             timeout=60)
    assert without.returncode == 0, without.stderr


@pytest.mark.parametrize("path", [CLOUD, EDGE], ids=["cloud", "edge"])
def test_build_context_has_what_the_image_copies(helpers, path):
    instructions = helpers.read_dockerfile(path)
    rules = helpers.dockerignore_rules(REPO / ".dockerignore")
    sources = helpers.copy_sources(instructions)
    for src in sources:
        assert (REPO / src).exists(), f"{path}: COPY {src}: no such file in the build context"
        assert not helpers.dockerignored(src, rules), f"{path}: COPY {src} is excluded by .dockerignore"
    # everything `pip install .` needs: pyproject.toml, the readme, every package folder
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    needed = {"pyproject.toml", project["project"]["readme"]}
    needed |= {d for d in project["tool"]["setuptools"]["package-dir"].values()}
    copied = {s.rstrip("/") for s in sources}
    assert needed <= copied, f"{path}: `pip install .` needs {sorted(needed - copied)} copied too"


def test_dockerignore_keeps_the_context_small_and_the_package_whole(helpers):
    rules = helpers.dockerignore_rules(REPO / ".dockerignore")
    for path in (".venv/bin/python", ".git/HEAD", "bench-results/codec.json", "tests/conftest.py",
                 "edge/__pycache__/x.pyc", ".pytest_cache/v", "seamline.egg-info/PKG-INFO",
                 "deploy/compose.yaml"):
        assert helpers.dockerignored(path, rules), f".dockerignore should exclude {path}"
    tracked = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                             capture_output=True, text=True, check=True, timeout=60).stdout.split()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    package_dirs = tuple(f"{d}/" for d in project["tool"]["setuptools"]["package-dir"].values())
    package_files = [f for f in tracked if f.startswith(package_dirs)]
    assert package_files
    dropped = [f for f in package_files if helpers.dockerignored(f, rules)]
    assert not dropped, f".dockerignore drops package files: {dropped[:10]}"
    for keep in ("deploy/cloud/healthcheck.py", "deploy/edge/healthcheck.py",
                 "deploy/cloud/models/README.md"):
        assert not helpers.dockerignored(keep, rules), keep


def test_dockerignore_matcher_follows_docker_rules(helpers, tmp_path):
    ignore = tmp_path / ".dockerignore"
    ignore.write_text("deploy\n!deploy/keep.py\n**/*.pyc\n/build\n")
    rules = helpers.dockerignore_rules(ignore)
    assert helpers.dockerignored("deploy/x.yaml", rules)
    assert not helpers.dockerignored("deploy/keep.py", rules)
    assert helpers.dockerignored("a/b/c.pyc", rules) and helpers.dockerignored("c.pyc", rules)
    assert helpers.dockerignored("build/lib/x.py", rules) and not helpers.dockerignored("src/build.py", rules)


def _load_script(path: Path):
    spec = importlib.util.spec_from_file_location(f"hc_{path.parent.name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cloud_healthcheck_script_against_a_real_health_service():
    grpc = pytest.importorskip("grpc")
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    script = REPO / "deploy" / "cloud" / "healthcheck.py"
    module = _load_script(script)
    loop = asyncio.new_event_loop()
    state: dict = {}

    async def start():
        server = grpc.aio.server()
        servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        await servicer.set("seamline.v1.Seamline", health_pb2.HealthCheckResponse.SERVING)
        state.update(server=server, servicer=servicer, port=port)

    loop.run_until_complete(start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        env = {"SEAMLINE_HEALTH_ADDR": f"127.0.0.1:{state['port']}"}
        # as docker runs it: a process whose exit status is the verdict
        proc = subprocess.run([sys.executable, str(script)], env={**os.environ, **env},
                              check=False, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and "SERVING" in proc.stdout, proc.stdout + proc.stderr
        ok, message = module.check({**env, "SEAMLINE_HEALTH_SERVICE": "no.such.Service"})
        assert not ok and "NOT_FOUND" in message
        asyncio.run_coroutine_threadsafe(
            state["servicer"].enter_graceful_shutdown(), loop).result(10)  # what a draining server does
        ok, message = module.check(env)
        assert not ok and "NOT_SERVING" in message
    finally:
        asyncio.run_coroutine_threadsafe(state["server"].stop(0), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
    ok, message = module.check({**env, "SEAMLINE_HEALTH_TIMEOUT": "1"})
    assert not ok and ("UNAVAILABLE" in message or "DEADLINE_EXCEEDED" in message), message


def test_edge_healthcheck_script_against_a_real_http_server():
    module = _load_script(REPO / "deploy" / "edge" / "healthcheck.py")
    status = {"code": 200}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(status["code"] if self.path == "/healthz" else 404)
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    env = {"SEAMLINE_HEALTH_URL": f"http://127.0.0.1:{server.server_port}/healthz"}
    try:
        assert module.check(env) == (True, f"{env['SEAMLINE_HEALTH_URL']}: HTTP 200")
        status["code"] = 503
        assert module.check(env)[0] is False
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
    assert module.check({**env, "SEAMLINE_HEALTH_TIMEOUT": "1"})[0] is False  # nothing listening
