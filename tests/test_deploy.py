"""Kubernetes manifests: valid for k8s 1.30 and 1.37 (strict, offline schemas) and true to the server."""
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from engine.cli import _parser

K8S = Path(__file__).resolve().parents[1] / "deploy" / "k8s"
DOCS = [doc for path in sorted(K8S.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc]


@pytest.mark.parametrize("version", ["1.30.0", "1.37.0"])
def test_manifests_validate_strictly(version):
    for doc in DOCS:
        kubernetes_validate.validate(doc, version, strict=True)


def _container():
    deployment = next(d for d in DOCS if d["kind"] == "Deployment")
    return deployment, deployment["spec"]["template"]["spec"]["containers"][0]


def test_probes_ports_and_grace_match_the_server():
    deployment, container = _container()
    grpc_port = next(p["containerPort"] for p in container["ports"] if p["name"] == "grpc")
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["grpc"]["port"] == grpc_port
    assert container["readinessProbe"]["grpc"]["service"] == "adapterserve.v1.InferenceService"
    args = _parser().parse_args(["serve", *[a for a in container["args"] if "$(" not in a]])
    assert args.port == grpc_port
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= pre_stop + args.grace_seconds


def test_services_speak_h2c_and_select_the_pods():
    deployment, _ = _container()
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    for service in (d for d in DOCS if d["kind"] == "Service"):
        assert service["spec"]["selector"].items() <= pod_labels.items()
        grpc_port = next(p for p in service["spec"]["ports"] if p["name"] == "grpc")
        assert grpc_port["appProtocol"] == "kubernetes.io/h2c"


def test_the_envoy_fragment_routes_by_adapter_to_ready_pods_without_cutting_calls():
    envoy = yaml.safe_load((K8S.parent / "envoy" / "adapter-affinity.yaml").read_text())
    route = envoy["route_config"]["virtual_hosts"][0]["routes"][0]
    assert route["match"]["prefix"] == "/adapterserve.v1.InferenceService/"  # no admin call is sent again
    action = route["route"]
    assert action["hash_policy"] == [{"header": {"header_name": "x-adapter-id"}}]  # what engine.client sends
    assert action["timeout"] == "0s" and action["max_stream_duration"] == {"grpc_timeout_header_max": "0s"}
    assert {"unavailable", "cancelled"} <= set(action["retry_policy"]["retry_on"].split(","))
    cluster = envoy["clusters"][0]
    _, container = _container()
    assert cluster["health_checks"][0]["grpc_health_check"]["service_name"] == container["readinessProbe"]["grpc"][
        "service"]
    port = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    assert port["address"].startswith("adapterserve-headless.") and port["port_value"] == 50051
