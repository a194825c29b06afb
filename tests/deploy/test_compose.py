"""deploy/compose.yaml: it parses, every file and service it names exists, every command parses
with the real CLI it runs, and the wiring agrees (edge -> nginx -> both cloud replicas, Prometheus
targets, shared bundle volume, stop grace > drain grace). `docker compose config` runs too where the
compose plugin is installed (it needs no engine)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
GPU = DEPLOY / "compose.gpu.yaml"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
NGINX_CONF = DEPLOY / "nginx" / "nginx.conf"
REPLICAS = ("cloud", "cloud-2")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)?", str(value))
    assert m, f"cannot read duration {value!r}"
    return float(m.group(1)) * {"ms": 1e-3, "s": 1, "m": 60, None: 1}[m.group(2)]


def _mounts(service: dict) -> dict[str, tuple[str, bool]]:
    """container path -> (source, read_only) of the short-syntax volumes of a service."""
    out = {}
    for spec in service.get("volumes", []):
        parts = spec.split(":")
        out[parts[1]] = (parts[0], len(parts) > 2 and "ro" in parts[2].split(","))
    return out


def test_services_files_and_references_exist(compose):
    services = compose["services"]
    assert {"bundle", *REPLICAS, "balancer", "edge", "prometheus"} <= set(services)
    for name, svc in services.items():
        assert "image" in svc or "build" in svc, name
        if "build" in svc:
            context = (COMPOSE.parent / svc["build"]["context"]).resolve()
            assert context.is_dir(), f"{name}: build context {context}"
            assert (context / svc["build"]["dockerfile"]).is_file(), f"{name}: {svc['build']['dockerfile']}"
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown service {dep}"
        if isinstance(svc.get("depends_on"), dict):
            for dep, cond in svc["depends_on"].items():
                assert cond["condition"] in ("service_started", "service_healthy",
                                             "service_completed_successfully"), cond
        for target, (source, _) in _mounts(svc).items():
            if source.startswith((".", "/")):
                assert (COMPOSE.parent / source).exists(), f"{name}: bind mount {source} does not exist"
            else:
                assert source in compose.get("volumes", {}), f"{name}: volume {source} is not declared"
            assert target.startswith("/"), target
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name}: publish {port} on loopback only"


def test_cloud_command_parses_and_stops_after_its_drain(compose, helpers):
    cloud = compose["services"]["cloud"]
    args = helpers.cloud_parser().parse_args(cloud["command"])
    assert args.host == "0.0.0.0"
    assert _seconds(cloud["stop_grace_period"]) > args.grace, \
        "stop_grace_period must exceed --grace, or docker kills the server mid-drain"
    assert compose["services"]["cloud-2"] == cloud, "the two replicas differ"
    assert "ports" not in cloud, "the replicas are reached through the balancer only"
    published = {int(p.split(":")[-1]) for p in compose["services"]["balancer"]["ports"]}
    assert args.port in published
    assert "healthcheck" not in cloud or cloud["healthcheck"].get("disable") is not True, \
        "the edge waits for service_healthy: the image's HEALTHCHECK must stay on"


def test_edge_reaches_the_cloud_and_the_bundle(compose, helpers):
    edge = compose["services"]["edge"]
    args = helpers.edge_parser().parse_args(edge["command"])
    cloud = helpers.cloud_parser().parse_args(compose["services"]["cloud"]["command"])
    assert args.cloud == [f"balancer:{cloud.port}"], "the edge must dial the balancer on the cloud's --port"
    assert "balancer" in edge["depends_on"]
    for replica in REPLICAS:
        assert compose["services"]["balancer"]["depends_on"][replica]["condition"] == "service_healthy"
    assert edge["depends_on"]["bundle"]["condition"] == "service_completed_successfully"
    listen_port = int(args.listen.rsplit(":", 1)[1])
    assert args.listen.startswith("0.0.0.0:")
    assert any(p.endswith(f":{listen_port}") for p in edge["ports"])
    assert _seconds(edge["stop_grace_period"]) > (args.grace or 30)
    # the bundle service writes the bundle where the edge reads it, through the same volume
    bundle_svc = compose["services"]["bundle"]
    script = " ".join(bundle_svc["command"])
    out = re.search(r"seamline partition (.*?)(?:$|;|&&|\|\|)", script).group(1).split()
    partition = _partition_parser().parse_args(out)
    writer_mount = [(t, s) for t, (s, ro) in _mounts(bundle_svc).items() if not ro]
    reader_mount = [(t, s) for t, (s, ro) in _mounts(edge).items() if ro]
    assert writer_mount and reader_mount, "no bundle volume"
    assert writer_mount[0][1] == reader_mount[0][1], "the bundle and edge services share no volume"
    rel = Path(partition.out).relative_to(writer_mount[0][0])
    assert Path(args.bundle) == Path(reader_mount[0][0]) / rel, \
        f"edge --bundle {args.bundle} is not where the bundle service writes ({partition.out})"
    assert f"test -f {partition.out}/manifest.json" in script, "the bundle service must skip a bundle it has"


def _partition_parser():
    """A parser with the flags of `seamline partition`, read from partitioner/cli.py's source:
    importing it would import torch (seconds), and its flags are plain add_argument calls."""
    import argparse
    import ast

    tree = ast.parse((REPO / "partitioner" / "cli.py").read_text())
    function = next(n for n in ast.walk(tree)
                    if isinstance(n, ast.FunctionDef) and n.name == "add_partition_arguments")

    class Raising(argparse.ArgumentParser):
        def error(self, message):
            raise AssertionError(f"seamline partition rejects the compose command: {message}")

    parser = Raising(prog="partition", add_help=False, allow_abbrev=False)
    for call in ast.walk(function):
        if isinstance(call, ast.Call) and call.args and isinstance(call.args[0], ast.Constant) \
                and str(call.args[0].value).startswith("--"):
            flags = [a.value for a in call.args if isinstance(a, ast.Constant)]
            store_true = any(k.arg == "action" and getattr(k.value, "value", None) == "store_true"
                             for k in call.keywords)
            parser.add_argument(*flags, action="store_true" if store_true else "store")
    assert parser.parse_args(["--out", "x"]).out == "x", "no --out flag found in partitioner/cli.py"
    return parser


def test_images_share_one_build_for_cloud_and_bundle(compose):
    s = compose["services"]
    assert s["bundle"]["image"] == s["cloud"]["image"] and s["bundle"]["build"] == s["cloud"]["build"]
    assert "partitioner" in s["cloud"]["build"]["args"]["EXTRAS"], "the bundle service runs partition"
    assert "build" in s["edge"] and s["edge"]["build"]["dockerfile"] == "deploy/edge/Dockerfile"


def test_prometheus_scrapes_both(compose, helpers):
    prom = compose["services"]["prometheus"]
    mounts = _mounts(prom)
    config_path = next(t for t in mounts if t.endswith("prometheus.yml"))
    assert (COMPOSE.parent / mounts[config_path][0]).resolve() == PROMETHEUS
    assert f"--config.file={config_path}" in prom["command"]
    config = yaml.safe_load(PROMETHEUS.read_text())
    targets = {t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    cloud = helpers.cloud_parser().parse_args(compose["services"]["cloud"]["command"])
    assert cloud.metrics_port and cloud.metrics_host == "0.0.0.0"
    assert {f"{r}:{cloud.metrics_port}" for r in REPLICAS} <= targets
    edge = helpers.edge_parser().parse_args(compose["services"]["edge"]["command"])
    assert f"edge:{edge.listen.rsplit(':', 1)[1]}" in targets
    for job in config["scrape_configs"]:
        assert job.get("metrics_path", "/metrics") == "/metrics"


def test_gpu_override(compose, helpers):
    gpu = yaml.safe_load(GPU.read_text())
    assert set(gpu["services"]) <= set(compose["services"])
    cloud = gpu["services"]["cloud"]
    assert gpu["services"]["cloud-2"] == cloud
    args = helpers.cloud_parser().parse_args(cloud["command"])
    assert args.device == "cuda"
    devices = cloud["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]


def _nginx_blocks(text: str) -> tuple[list[str], str, str]:
    """(upstream server addresses, upstream name, the text after the upstream block) of the nginx config."""
    text = re.sub(r"#[^\n]*", "", text)
    upstream = re.search(r"upstream\s+(\S+)\s*\{(.*?)\}", text, re.DOTALL)
    servers = re.findall(r"^\s*server\s+(\S+?)[\s;]", upstream.group(2), re.MULTILINE)
    return servers, upstream.group(1), text[upstream.end():]


def test_nginx_balances_both_replicas_without_affinity(compose, helpers):
    """nginx speaks HTTP/2 on the published port and grpc_pass-es every call to an upstream of both
    replicas, round-robin (no ip_hash / hash / sticky: a generation is one stream)."""
    balancer = compose["services"]["balancer"]
    mounts = _mounts(balancer)
    assert (COMPOSE.parent / mounts["/etc/nginx/nginx.conf"][0]).resolve() == NGINX_CONF
    assert mounts["/etc/nginx/nginx.conf"][1], "mount the config read-only"
    cloud = helpers.cloud_parser().parse_args(compose["services"]["cloud"]["command"])
    servers, name, rest = _nginx_blocks(NGINX_CONF.read_text())
    assert servers == [f"{r}:{cloud.port}" for r in REPLICAS]
    assert re.search(rf"grpc_pass\s+grpc://{re.escape(name)}\s*;", rest)
    assert re.search(r"http2\s+on\s*;", rest), "HTTP/2 (h2c) from the edge: gRPC needs it end to end"
    listen = int(re.search(r"listen\s+(\d+)", rest).group(1))
    assert any(str(p).endswith(f":{listen}") for p in balancer["ports"])
    text = NGINX_CONF.read_text()
    for sticky in ("ip_hash", "hash ", "sticky"):
        assert sticky not in re.sub(r"#[^\n]*", "", text), f"no session affinity: drop {sticky}"
    assert re.search(r"client_max_body_size\s+0\s*;", rest), "a stream's body is a whole generation"


def test_nginx_accepts_the_config(tmp_path):
    """``nginx -t`` on the config, where nginx is installed (replica names -> loopback; nginx before 1.25
    spells HTTP/2 ``listen PORT http2``)."""
    nginx = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)
    if nginx is None:
        pytest.skip("nginx is not installed (CI: apt-get install -y nginx)")
    version = subprocess.run([nginx, "-v"], check=False, capture_output=True, text=True, timeout=30).stderr
    major_minor = tuple(int(x) for x in re.search(r"nginx/(\d+)\.(\d+)", version).groups())
    text = NGINX_CONF.read_text()
    for r in REPLICAS:
        text = text.replace(f"server {r}:", "server 127.0.0.1:")
    text = text.replace("listen 50051;", "listen 127.0.0.1:50051;")
    if major_minor < (1, 25):
        text = re.sub(r"listen\s+(\S+);\s*http2\s+on;", r"listen \1 http2;", text)
    text = text.replace("worker_processes 1;", f"worker_processes 1;\npid {tmp_path}/nginx.pid;\n"
                        f"error_log {tmp_path}/error.log;")
    text = text.replace("access_log off;", "access_log off;\n" + "".join(
        f"    {kind}_temp_path {tmp_path}/{kind};\n" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")))
    conf = tmp_path / "nginx.conf"
    conf.write_text(text)
    proc = subprocess.run([nginx, "-t", "-p", str(tmp_path), "-c", str(conf), "-e", str(tmp_path / "error.log")],
                          check=False, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


def _compose_cli() -> tuple[list[str], int] | None:
    """(command, major version) of `docker compose` (v2 plugin) or `docker-compose`, else None."""
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run([docker, "compose", "version"], check=False, capture_output=True, timeout=30)
        if probe.returncode == 0:
            return [docker, "compose"], 2
    legacy = shutil.which("docker-compose")
    if legacy:
        out = subprocess.run([legacy, "version", "--short"], check=False, capture_output=True, text=True,
                             timeout=30).stdout.strip()
        return [legacy], int(out.split(".")[0]) if out[:1].isdigit() else 1
    return None


def test_docker_compose_config(tmp_path):
    """The compose tool's own schema check of both files (merged); it needs no Docker engine."""
    files = [COMPOSE, GPU]
    found = _compose_cli()
    if found is None:
        pytest.skip("neither the docker compose plugin nor docker-compose is installed: "
                    "the structural checks above stand in for `docker compose config`")
    cli, major = found
    if major < 2:  # docker-compose 1.x predates the top-level `name:` of the Compose Specification
        data = yaml.safe_load(files[0].read_text())
        data.pop("name", None)
        files = [tmp_path / "compose.yaml", *files[1:]]
        files[0].write_text(yaml.safe_dump(data))
    argv = cli + ["--project-directory", str(DEPLOY)]
    argv += [a for f in files for a in ("-f", str(f))] + ["config", "--quiet"]
    proc = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
