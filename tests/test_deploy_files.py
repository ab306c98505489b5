"""The container deployments, checked without a container engine or a cluster (there is none here):
deploy/compose/compose.yaml against the Compose Specification's JSON Schema (vendored, see
deploy/compose/README.md), every manifest under deploy/k8s/ against the Kubernetes API's JSON schemas in
strict mode (kubernetes-validate, offline), and the files against the code: every setting they pass is
a setting the services read and parses as one, probes point where the services answer, secrets come
from a Secret, the image installs what the services import. Nothing here starts a container."""

import ast
import copy
import json
import os
import re
import sys
from importlib import metadata

import kubernetes_validate
import pytest
import yaml
from jsonschema import Draft202012Validator
from packaging.requirements import Requirement
from packaging.utils import NormalizedName, canonicalize_name
from pydantic import SecretStr

from shared.settings import REPO_ROOT, Settings

DEPLOY = REPO_ROOT / "deploy"
COMPOSE_FILE = DEPLOY / "compose" / "compose.yaml"
COMPOSE_SCHEMA = DEPLOY / "compose" / "compose-spec.schema.json"
K8S_FILES = sorted((DEPLOY / "k8s").rglob("*.yaml"))
DOCKERFILE = DEPLOY / "Dockerfile"
# The oldest Kubernetes minor still commonly run, and the newest the schemas know.
KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
SERVICES = ("api", "processor", "notifier")
# Settings that hold credentials: in Kubernetes they must come from a Secret, never a ConfigMap or the manifest.
SECRET_SETTINGS = {"database_url"} | {
    name for name, field in Settings.model_fields.items() if SecretStr in getattr(field.annotation, "__args__", ())
}


def setting_names() -> dict[str, str]:
    """Every environment variable name the services read, mapped to its Settings field."""
    names = {}
    for field_name, field in Settings.model_fields.items():
        aliases = getattr(field.validation_alias, "choices", None) or [f"IMGPIPE_{field_name.upper()}"]
        names.update({alias: field_name for alias in aliases})
    return names


def settings_from(environment: dict[str, str], monkeypatch) -> Settings:
    """The Settings a container with exactly this environment gets (the test's own environment aside)."""
    for name in list(os.environ):
        if name in setting_names() or name.startswith("IMGPIPE_"):
            monkeypatch.delenv(name)
    for name, value in environment.items():
        monkeypatch.setenv(name, str(value))
    return Settings()


# --- Compose ------------------------------------------------------------------------------------------


def load_compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())  # resolves the file's anchors and << merges


def compose_errors(document: dict) -> list[str]:
    validator = Draft202012Validator(json.loads(COMPOSE_SCHEMA.read_text()))
    return [
        f"{'/'.join(map(str, error.absolute_path)) or '(top)'}: {error.message}"
        for error in validator.iter_errors(document)
    ]


def interpolated(value) -> str:
    """Compose's ${NAME:-default} with nothing set in the shell: the default."""
    return re.sub(r"\$\{[A-Z_][A-Z0-9_]*:-([^}]*)\}", r"\1", str(value))


def compose_environment(service: dict) -> dict[str, str]:
    environment = service.get("environment", {})
    assert isinstance(environment, dict), "environment as a mapping, so that the services' share can be merged"
    return {name: interpolated(value) for name, value in environment.items()}


def test_the_compose_file_follows_the_compose_specification():
    assert compose_errors(load_compose()) == []


@pytest.mark.parametrize(
    "breakage", ["a misspelled key", "a number where a mapping goes", "an unknown top-level section"]
)
def test_the_compose_check_refuses_a_broken_file(breakage):
    document = load_compose()
    processor = document["services"]["processor"]
    if breakage == "a misspelled key":
        processor["healtcheck"] = processor.pop("healthcheck")
    elif breakage == "a number where a mapping goes":
        processor["deploy"] = 2
    else:
        document["service"] = document.pop("services")
    assert compose_errors(document) != []


def test_the_compose_file_runs_kraft_postgres_and_the_three_services_with_health_checks():
    compose = load_compose()
    services = compose["services"]
    assert set(services) == {"kafka", "postgres", *SERVICES}
    for name, service in services.items():
        assert service.get("restart") in ("always", "unless-stopped", "on-failure"), name
        assert service.get("healthcheck", {}).get("test"), name
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on {dependency}, which is not a service"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert source.startswith((".", "/")) or source in compose["volumes"], f"{name}: {volume}"
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    assert "controller" in kafka["environment"]["KAFKA_PROCESS_ROLES"]
    assert not any("ZOOKEEPER" in name for name in kafka["environment"])
    # Scalable: replicas, and nothing that two replicas would fight over.
    processor = services["processor"]
    assert processor["deploy"]["replicas"] >= 2
    assert "container_name" not in processor and "ports" not in processor


def test_the_compose_services_get_valid_settings_and_are_checked_where_they_answer(monkeypatch):
    services = load_compose()["services"]
    for name in SERVICES:
        environment = compose_environment(services[name])
        unknown = [
            variable for variable in environment if variable.startswith("IMGPIPE_") and variable not in setting_names()
        ]
        assert unknown == [], f"{name}: not settings of shared/settings.py"
        settings = settings_from(environment, monkeypatch)
        port = settings.api_port if name == "api" else settings.health_port
        assert f"127.0.0.1:{port}/readyz" in " ".join(services[name]["healthcheck"]["test"]), name
        assert name == "api" or settings.health_host == "0.0.0.0", f"{name}'s /metrics must be reachable"


# --- Kubernetes ---------------------------------------------------------------------------------------


def load_manifests() -> list[dict]:
    return [document for path in K8S_FILES for document in yaml.safe_load_all(path.read_text()) if document]


def kubernetes_errors(document: dict) -> list[str]:
    where = f"{document.get('kind')}/{document.get('metadata', {}).get('name')}"
    errors = []
    for version in KUBERNETES_VERSIONS:
        try:
            kubernetes_validate.validate(document, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            errors.append(f"{where} (Kubernetes {version}) {'.'.join(map(str, error.path))}: {error.message}")
        except kubernetes_validate.SchemaNotFoundError as error:
            errors.append(f"{where}: {error.message}")
    return errors


def the(kind: str, name: str, manifests: list[dict]) -> dict:
    found = [d for d in manifests if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"one {kind} {name} in deploy/k8s/*.yaml, found {len(found)}"
    return found[0]


def container_environment(container: dict, manifests: list[dict]) -> dict[str, tuple[str, str]]:
    """name -> (where it comes from: ConfigMap, Secret or manifest, value)."""
    environment = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            data = the("ConfigMap", source["configMapRef"]["name"], manifests)["data"]
            environment.update({name: ("ConfigMap", value) for name, value in data.items()})
        else:
            data = the("Secret", source["secretRef"]["name"], manifests)["stringData"]
            environment.update({name: ("Secret", value) for name, value in data.items()})
    for variable in container.get("env", []):
        if "value" in variable:
            environment[variable["name"]] = ("manifest", variable["value"])
        else:
            reference = variable["valueFrom"]["secretKeyRef"]
            value = the("Secret", reference["name"], manifests)["stringData"][reference["key"]]
            environment[variable["name"]] = ("Secret", value)
    return environment


def test_every_manifest_follows_the_kubernetes_schemas():
    manifests = load_manifests()
    assert {d["kind"] for d in manifests} >= {"Deployment", "HorizontalPodAutoscaler", "Secret", "StatefulSet"}
    assert [error for document in manifests for error in kubernetes_errors(document)] == []


@pytest.mark.parametrize(
    "breakage", ["a misspelled field", "a string where a number goes", "a kind of the wrong API version"]
)
def test_the_kubernetes_check_refuses_a_broken_manifest(breakage):
    processor = copy.deepcopy(the("Deployment", "imgpipe-processor", load_manifests()))
    container = processor["spec"]["template"]["spec"]["containers"][0]
    if breakage == "a misspelled field":
        container["readynessProbe"] = container.pop("readinessProbe")
    elif breakage == "a string where a number goes":
        processor["spec"]["replicas"] = "six"
    else:
        processor["apiVersion"] = "extensions/v1beta1"
    assert kubernetes_errors(processor) != []


def test_the_services_get_valid_settings_with_secrets_from_a_secret_and_probes_where_they_answer(monkeypatch):
    manifests = load_manifests()
    for name in SERVICES:
        pod = the("Deployment", f"imgpipe-{name}", manifests)["spec"]["template"]["spec"]
        assert pod.get("restartPolicy", "Always") == "Always"
        container = pod["containers"][0]
        assert container["command"] == ["python", "-m", f"services.{name}"]
        environment = container_environment(container, manifests)
        unknown = [
            variable for variable in environment if variable.startswith("IMGPIPE_") and variable not in setting_names()
        ]
        assert unknown == [], f"imgpipe-{name}: not settings of shared/settings.py"
        misplaced = [
            variable
            for variable, (source, _) in environment.items()
            if setting_names().get(variable) in SECRET_SETTINGS and source != "Secret"
        ]
        assert misplaced == [], f"imgpipe-{name}: credentials outside a Secret"
        settings = settings_from({variable: value for variable, (_, value) in environment.items()}, monkeypatch)
        assert settings.storage != "local", "local disk does not span pods"

        ports = {port.get("name"): port["containerPort"] for port in container["ports"]}
        expected_port = settings.api_port if name == "api" else settings.health_port
        for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
            get = container[probe]["httpGet"]
            assert get["path"] == path, f"imgpipe-{name} {probe}"
            assert ports.get(get["port"], get["port"]) == expected_port, f"imgpipe-{name} {probe}"
        if name == "api":
            assert settings.api_host == "0.0.0.0"
        else:
            assert settings.health_host == "0.0.0.0", f"imgpipe-{name}: the kubelet probes the pod's address"


def test_the_processor_scales_within_its_partitions_on_a_cluster_that_survives_a_broker(monkeypatch):
    manifests = load_manifests()
    autoscalers = [d for d in manifests if d["kind"] == "HorizontalPodAutoscaler"]
    assert autoscalers and all(d["apiVersion"] == "autoscaling/v2" for d in autoscalers)
    processor = the("Deployment", "imgpipe-processor", manifests)
    container = processor["spec"]["template"]["spec"]["containers"][0]
    settings = settings_from({n: v for n, (_, v) in container_environment(container, manifests).items()}, monkeypatch)
    for autoscaler in autoscalers:
        target = autoscaler["spec"]["scaleTargetRef"]
        assert (target["kind"], target["name"]) == ("Deployment", "imgpipe-processor")
        assert {
            "type": "Resource",
            "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}},
        } in autoscaler["spec"]["metrics"]
        # A processor beyond the partition count gets no partition: idle, and never ready.
        assert autoscaler["spec"]["maxReplicas"] <= settings.topic_partitions
    # One compression worker per requested core (a pod's os.cpu_count() is the node's).
    assert settings.compress_processes == int(container["resources"]["requests"]["cpu"])

    kafka = the("StatefulSet", "kafka", manifests)
    kafka_environment = {v["name"]: v["value"] for v in kafka["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert "controller" in kafka_environment["KAFKA_PROCESS_ROLES"]
    voters = kafka_environment["KAFKA_CONTROLLER_QUORUM_VOTERS"].split(",")
    assert len(voters) == kafka["spec"]["replicas"] >= settings.kafka_replication_factor
    assert settings.kafka_replication_factor > settings.kafka_min_insync_replicas > 1
    for address in settings.kafka_bootstrap_servers.split(","):
        host = address.split(":")[0]
        assert re.fullmatch(rf"kafka-[0-{kafka['spec']['replicas'] - 1}]\.kafka", host), address


# --- The image ----------------------------------------------------------------------------------------


def runtime_requirements() -> list[Requirement]:
    """What the Dockerfile installs: requirements.txt above its "# Tests" section."""
    lines = (REPO_ROOT / "requirements.txt").read_text().split("# Tests")[0].splitlines()
    return [Requirement(line.split("#")[0]) for line in lines if line.split("#")[0].strip()]


def installed_with(requirements: list[Requirement]) -> set[NormalizedName]:
    """The distributions these requirements install, their dependencies included."""
    seen, queue = set(), [(r, frozenset(r.extras)) for r in requirements]
    while queue:
        requirement, extras = queue.pop()
        name = canonicalize_name(requirement.name)
        if name in seen:
            continue
        seen.add(name)
        for dependency in map(Requirement, metadata.requires(name) or []):
            if dependency.marker is None or any(dependency.marker.evaluate({"extra": e}) for e in extras or {""}):
                queue.append((dependency, frozenset(dependency.extras)))
    return seen


def imported_distributions() -> dict[str, str]:
    """Third-party distribution -> a module of services/ or shared/ that imports it."""
    local = {"services", "shared"}
    distributions = metadata.packages_distributions()
    found: dict[str, str] = {}
    for path in [*REPO_ROOT.glob("services/**/*.py"), *REPO_ROOT.glob("shared/**/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                assert node.module is not None  # an absolute `from` import names its module
                modules = [node.module]
            else:
                continue
            for module in (m.split(".")[0] for m in modules):
                if module not in sys.stdlib_module_names and module not in local:
                    for distribution in distributions.get(module, [module]):
                        found.setdefault(canonicalize_name(distribution), str(path.relative_to(REPO_ROOT)))
    return found


def test_the_image_has_what_the_services_import_and_the_files_it_copies():
    lines = DOCKERFILE.read_text().splitlines()
    for line in lines:
        if line.startswith("COPY "):
            source = line.split()[1]
            assert (REPO_ROOT / source).exists(), line
    assert "sed '/^# Tests/,$d' requirements.txt" in DOCKERFILE.read_text()
    installed = installed_with(runtime_requirements())
    missing = {
        distribution: importer
        for distribution, importer in imported_distributions().items()
        if distribution not in installed
    }
    assert missing == {}, "imported by the services but not installed by requirements.txt's runtime part"
    for name in SERVICES:
        assert (REPO_ROOT / "services" / name / "__main__.py").exists()
