"""deploy/k8s: the base and both overlays render (kustomize_lite, compared with kubectl/kustomize
where installed), every built-in object validates offline against the Kubernetes OpenAPI schemas
(kubernetes-validate, strict: unknown fields fail), the Gateway API objects (CRDs, not in those
schemas) against a hand-written schema of the v1 fields used, and the objects agree with each
other and with the real `seamline cloud` CLI and config."""

from __future__ import annotations

import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
TARGETS = {"base": K8S / "base", "cpu": K8S / "overlays" / "cpu", "gpu": K8S / "overlays" / "gpu"}
KUBERNETES_VERSIONS = ("1.29", "1.33")  # oldest and newest we claim; GRPC probes are GA since 1.27
HEALTH_SERVICE = "seamline.v1.Seamline"

try:
    import kubernetes_validate
except ImportError:  # pragma: no cover - a dev dependency; fail with the fix rather than skip
    kubernetes_validate = None


@pytest.fixture(scope="module", params=list(TARGETS))
def rendered(request, kustomize_lite) -> tuple[str, list[dict]]:
    return request.param, kustomize_lite.build(TARGETS[request.param])


def _by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def _one(docs, kind):
    found = _by_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def _container(docs) -> dict:
    pod = _one(docs, "Deployment")["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == ["cloud"]
    return pod["containers"][0]


def _cloud_config(docs, tmp_path, deployment_args):
    """The CloudConfig the container would run with: ConfigMap file < container args."""
    from seamline.cloud.config import CloudConfig

    from_args = {k: getattr(deployment_args, k) for k in deployment_args.given if k != "log_level"}
    config_map = _one(docs, "ConfigMap")
    (name, text), = config_map["data"].items()
    path = tmp_path / name
    path.write_text(text)
    return CloudConfig.from_sources(path, **from_args), config_map, name


# ------------------------------------------------------------------ rendering

def test_renders_and_matches_kustomize(rendered, helpers):
    name, docs = rendered
    assert {d["kind"] for d in docs} >= {"ConfigMap", "Deployment", "Service", "HorizontalPodAutoscaler",
                                         "PodDisruptionBudget", "Gateway", "GRPCRoute"}
    command = helpers.kustomize_command()
    if command is None:
        pytest.skip("no kustomize or kubectl binary here: only kustomize_lite rendered the overlays")
    proc = subprocess.run(command + [str(TARGETS[name])], check=False, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    theirs = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(proc.stdout) if d}
    ours = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    assert ours.keys() == theirs.keys()
    for key, doc in ours.items():
        assert doc == theirs[key], f"{name}: kustomize_lite and kustomize disagree on {key}"


def test_renderer_refuses_what_it_does_not_implement(kustomize_lite, tmp_path):
    (tmp_path / "kustomization.yaml").write_text("resources: []\nnamePrefix: x-\n")
    with pytest.raises(kustomize_lite.Unsupported):
        kustomize_lite.build(tmp_path)
    with pytest.raises(kustomize_lite.Unsupported):  # a list without a known merge strategy
        kustomize_lite.strategic_merge({"spec": {"ports": [{"port": 1}]}}, {"spec": {"ports": [{"port": 2}]}})
    with pytest.raises(kustomize_lite.Unsupported):
        kustomize_lite.strategic_merge({"a": 1}, {"$patch": "replace"})


def test_strategic_merge_semantics(kustomize_lite):
    base = {"containers": [{"name": "a", "args": ["x"], "env": [{"name": "E", "value": "1"}],
                            "resources": {"requests": {"cpu": "1"}, "limits": {"memory": "1Gi"}}},
                           {"name": "b", "image": "b"}],
            "tolerations": [{"key": "k"}], "drop": 1}
    patch = {"containers": [{"name": "a", "args": ["y", "z"], "env": [{"name": "F", "value": "2"}],
                             "resources": {"requests": {"nvidia.com/gpu": "1"}}}],
             "tolerations": [{"key": "t"}], "drop": None}
    out = kustomize_lite.strategic_merge(base, patch)
    a = out["containers"][0]
    assert a["args"] == ["y", "z"]                                # atomic list: replaced
    assert [e["name"] for e in a["env"]] == ["E", "F"]            # keyed list: merged by name
    assert a["resources"] == {"requests": {"cpu": "1", "nvidia.com/gpu": "1"}, "limits": {"memory": "1Gi"}}
    assert out["containers"][1] == {"name": "b", "image": "b"}
    assert out["tolerations"] == [{"key": "t"}] and "drop" not in out
    assert base["containers"][0]["args"] == ["x"]                 # the input is left alone


# ------------------------------------------------------------------ schemas

def test_builtin_objects_validate_against_kubernetes_schemas(rendered):
    assert kubernetes_validate is not None, \
        "kubernetes-validate is missing: pip install 'kubernetes-validate>=1.30' (it is in the dev extra)"
    name, docs = rendered
    checked = 0
    for doc in docs:
        if doc["apiVersion"].startswith("gateway.networking.k8s.io/"):
            continue
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                path = ".".join(str(p) for p in e.path)
                pytest.fail(f"{name}: {doc['kind']}/{doc['metadata']['name']} invalid for Kubernetes "
                            f"{version} at {path}: {e.message}")
        checked += 1
    assert checked >= 5


def test_validator_catches_a_typo(rendered):
    """kubernetes-validate in strict mode really rejects an unknown field (guards the check above)."""
    assert kubernetes_validate is not None
    _, docs = rendered
    bad = yaml.safe_load(yaml.safe_dump(_one(docs, "Deployment")))
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["servce"] = "x"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBERNETES_VERSIONS[-1], strict=True)


# Gateway API v1 (standard channel): the fields of Gateway and GRPCRoute a manifest may set, written
# from the spec. additionalProperties: false makes a misspelt or misplaced field fail.
def _obj(required=(), **properties) -> dict:
    return {"type": "object", "required": list(required), "properties": properties,
            "additionalProperties": False}


def _array(items: dict, min_items: int = 0, max_items: int = 64) -> dict:
    return {"type": "array", "items": items, "minItems": min_items, "maxItems": max_items}


_STR = {"type": "string"}
_ANY_OBJECT = {"type": "object"}
_NAME = {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", "maxLength": 253}
_PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
_META = _obj(["name"], name=_NAME, namespace=_NAME, labels=_ANY_OBJECT, annotations=_ANY_OBJECT)
_LISTENER = _obj(
    ["name", "port", "protocol"], name=_NAME, hostname=_STR, port=_PORT,
    protocol={"enum": ["HTTP", "HTTPS", "TLS", "TCP", "UDP"]},
    tls=_obj(mode={"enum": ["Terminate", "Passthrough"]}, options=_ANY_OBJECT,
             certificateRefs=_array(_obj(["name"], group=_STR, kind=_STR, name=_NAME, namespace=_NAME))),
    allowedRoutes=_obj(namespaces=_obj(**{"from": {"enum": ["All", "Same", "Selector"]},
                                          "selector": _ANY_OBJECT}),
                       kinds=_array(_obj(["kind"], group=_STR, kind=_STR))))
_METHOD_MATCH = {**_obj(type={"enum": ["Exact", "RegularExpression"]}, service=_STR, method=_STR),
                 "anyOf": [{"required": ["service"]}, {"required": ["method"]}]}
_HEADER_MATCH = _obj(["name", "value"], type={"enum": ["Exact", "RegularExpression"]}, name=_STR, value=_STR)
_ROUTE_RULE = _obj(
    name=_NAME, filters={"type": "array"}, sessionPersistence=_ANY_OBJECT,
    matches=_array(_obj(method=_METHOD_MATCH, headers=_array(_HEADER_MATCH, max_items=16))),
    backendRefs=_array(_obj(["name"], group=_STR, kind=_STR, namespace=_NAME, name=_NAME, port=_PORT,
                            weight={"type": "integer", "minimum": 0, "maximum": 1000000},
                            filters={"type": "array"}), min_items=1))
GATEWAY_API_SCHEMAS = {
    "Gateway": _obj(
        ["apiVersion", "kind", "metadata", "spec"], apiVersion={"const": "gateway.networking.k8s.io/v1"},
        kind={"const": "Gateway"}, metadata=_META,
        spec=_obj(["gatewayClassName", "listeners"], gatewayClassName=_NAME, addresses={"type": "array"},
                  infrastructure=_ANY_OBJECT, listeners=_array(_LISTENER, min_items=1))),
    "GRPCRoute": _obj(
        ["apiVersion", "kind", "metadata", "spec"], apiVersion={"const": "gateway.networking.k8s.io/v1"},
        kind={"const": "GRPCRoute"}, metadata=_META,
        spec=_obj(parentRefs=_array(_obj(["name"], group=_STR, kind=_STR, namespace=_NAME, name=_NAME,
                                         sectionName=_NAME, port=_PORT), min_items=1, max_items=32),
                  hostnames=_array(_STR), rules=_array(_ROUTE_RULE, min_items=1, max_items=16))),
}


def test_gateway_api_objects_validate(rendered):
    import jsonschema

    _, docs = rendered
    for kind, schema in GATEWAY_API_SCHEMAS.items():
        for doc in _by_kind(docs, kind):
            jsonschema.validate(doc, schema)
    bad = yaml.safe_load(yaml.safe_dump(_one(docs, "GRPCRoute")))
    bad["spec"]["rules"][0]["backendRef"] = bad["spec"]["rules"][0].pop("backendRefs")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, GATEWAY_API_SCHEMAS["GRPCRoute"])


def test_grpc_route_spreads_seamline_calls_over_the_service(rendered):
    from seamline.protos import seamline_pb2

    _, docs = rendered
    gateway, route, service = _one(docs, "Gateway"), _one(docs, "GRPCRoute"), _one(docs, "Service")
    listeners = {listener["name"]: listener for listener in gateway["spec"]["listeners"]}
    for ref in route["spec"]["parentRefs"]:
        assert ref["name"] == gateway["metadata"]["name"]
        listener = listeners[ref["sectionName"]]
        assert listener["protocol"] in ("HTTP", "HTTPS")
        assert "GRPCRoute" in [k["kind"] for k in listener["allowedRoutes"]["kinds"]]
        if listener["protocol"] == "HTTPS":
            assert listener["tls"]["mode"] == "Terminate" and listener["tls"]["certificateRefs"]
    service_ports = {p["port"]: p for p in service["spec"]["ports"]}
    services = set()
    for rule in route["spec"]["rules"]:
        assert "sessionPersistence" not in rule, "sessions are soft state: no sticky routing"
        for ref in rule["backendRefs"]:
            assert ref["name"] == service["metadata"]["name"] and ref.get("kind", "Service") == "Service"
            port = service_ports[ref["port"]]
            assert port["appProtocol"] == "kubernetes.io/h2c", "the gateway must speak HTTP/2 to the pods"
            assert port["targetPort"] == "grpc"
        services |= {m["method"]["service"] for m in rule.get("matches", [])}
    seamline_service = seamline_pb2.DESCRIPTOR.services_by_name["Seamline"].full_name
    assert seamline_service in services, f"the route does not carry {seamline_service}"
    assert "grpc.reflection.v1alpha.ServerReflection" not in services


# ------------------------------------------------------------------ the objects agree

def test_deployment_wiring(rendered, helpers, tmp_path):
    _, docs = rendered
    deployment, service = _one(docs, "Deployment"), _one(docs, "Service")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()
    assert service["spec"]["selector"].items() <= pod_labels.items()
    for kind in ("PodDisruptionBudget",):
        assert _one(docs, kind)["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    hpa = _one(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    assert hpa["spec"]["minReplicas"] >= 2, "one replica is no failover"
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    pdb = _one(docs, "PodDisruptionBudget")["spec"]
    assert pdb.get("maxUnavailable", 0) >= 1 or pdb["minAvailable"] < hpa["spec"]["minReplicas"]

    container = _container(docs)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for port in service["spec"]["ports"]:
        assert port["targetPort"] in ports
    args = helpers.cloud_parser().parse_args(container["args"])
    config, config_map, key = _cloud_config(docs, tmp_path, args)
    assert config.host == "0.0.0.0" and config.port == ports["grpc"]
    assert config.metrics_port == ports["metrics"] and config.metrics_host == "0.0.0.0"
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(config.metrics_port)
    # the --config file is the ConfigMap's key, mounted where the args say
    pod = deployment["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mount = next(m for m in container["volumeMounts"]
                 if volumes[m["name"]].get("configMap", {}).get("name") == config_map["metadata"]["name"])
    assert args.config == f"{mount['mountPath']}/{key}"

    # probes: native gRPC health checks on the gRPC port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == ports["grpc"], probe
    assert container["readinessProbe"]["grpc"]["service"] == HEALTH_SERVICE
    assert container["startupProbe"]["grpc"]["service"] == HEALTH_SERVICE
    # graceful termination: preStop sleep + the server's drain grace fit in the pod's grace period
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] > float(pre_stop[1]) + config.grace, \
        "terminationGracePeriodSeconds must exceed preStop + cloud grace, or the kubelet kills mid-drain"
    liveness = container["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > pod["terminationGracePeriodSeconds"], \
        "the server reports NOT_SERVING while draining: liveness must not fail within the grace period"
    # hardening
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"]
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert any(m["mountPath"] == "/tmp" for m in container["volumeMounts"]), "a read-only root needs /tmp"
    assert container["resources"]["requests"]["cpu"] and container["resources"]["requests"]["memory"]


def test_overlays(helpers, kustomize_lite, tmp_path):
    cpu, gpu = kustomize_lite.build(TARGETS["cpu"]), kustomize_lite.build(TARGETS["gpu"])
    cpu_c, gpu_c = _container(cpu), _container(gpu)
    cpu_args = helpers.cloud_parser().parse_args(cpu_c["args"])
    gpu_args = helpers.cloud_parser().parse_args(gpu_c["args"])
    assert cpu_args.device == "cpu" and gpu_args.device == "cuda"
    assert "nvidia.com/gpu" not in str(cpu_c["resources"])
    resources = gpu_c["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == "1"
    pod = _one(gpu, "Deployment")["spec"]["template"]["spec"]
    assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in pod["tolerations"])
    assert pod["nodeSelector"]
    assert cpu_c["image"] != gpu_c["image"] and cpu_c["image"].endswith("-cpu")
    gpu_config, _, _ = _cloud_config(gpu, tmp_path, gpu_args)
    cpu_config, _, _ = _cloud_config(cpu, tmp_path, cpu_args)
    assert gpu_config.kv_budget > cpu_config.kv_budget
    # the GPU overlay rewrites the whole config file: it must keep what the base wiring needs
    base_config, _, _ = _cloud_config(kustomize_lite.build(TARGETS["base"]), tmp_path,
                                      helpers.cloud_parser().parse_args(_container(gpu)["args"]))
    for field in ("host", "port", "metrics_host", "metrics_port", "grace", "model"):
        assert getattr(gpu_config, field) == getattr(base_config, field), field


def test_every_manifest_file_is_used(kustomize_lite):
    """Every YAML under deploy/k8s is a kustomization, a resource or a patch of one."""
    used = set()
    for folder in [K8S / "base", *(p for p in (K8S / "overlays").iterdir() if p.is_dir())]:
        spec = yaml.safe_load((folder / "kustomization.yaml").read_text())
        used.add(folder / "kustomization.yaml")
        used |= {(folder / r).resolve() for r in spec.get("resources", [])}
        used |= {(folder / p["path"]).resolve() for p in spec.get("patches", [])}
    files = {p.resolve() for p in K8S.rglob("*.yaml")}
    assert files - {u.resolve() for u in used} == set()


def test_config_map_is_a_cloud_toml(rendered):
    """Each rendered target's ConfigMap holds one TOML file with a [cloud] table that names the model and
    the gRPC port (a broken TOML, a file of another name or a missing table fails here)."""
    name, docs = rendered
    (key, text), = _one(docs, "ConfigMap")["data"].items()
    assert key.endswith(".toml"), f"{name}: the ConfigMap's file {key!r} is not TOML"
    table = tomllib.loads(text)
    assert list(table) == ["cloud"], f"{name}: {key} has tables {list(table)}, expected only [cloud]"
    assert table["cloud"]["model"] and isinstance(table["cloud"]["port"], int), table["cloud"]
