"""Static checks of the deployment files: Dockerfile, docker-compose.yml, Kubernetes, Grafana.

No Docker engine or cluster is needed. Schemas come from packages that vendor them
(check-jsonschema's compose-spec, kubernetes-validate's Kubernetes schemas), so this runs offline.
"""

from __future__ import annotations

import copy
import fnmatch
import functools
import importlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import dockerfile as buildkit_dockerfile
import jsonschema
import kubernetes_validate
import pytest
import yaml
from needs import missing

from headforge.service import settings as service_settings

ROOT = Path(__file__).resolve().parents[1]
KUBE = ROOT / "deploy" / "kubernetes"
OVERLAYS = ("cpu", "gpu")
# Optional Kustomize components (deploy/kubernetes/components/<name>), added from an overlay of one's own.
COMPONENTS = ("flame",)
# Each overlay alone, and with every optional component.
RENDERINGS = [(overlay, ()) for overlay in OVERLAYS] + [(overlay, COMPONENTS) for overlay in OVERLAYS]
# The oldest Kubernetes minor release the manifests must validate against.
KUBERNETES_VERSION = "1.31.0"
KEDA_SCHEMA = KUBE / "schemas" / "keda-v1alpha1.json"
DASHBOARD = ROOT / "deploy" / "grafana" / "headforge-dashboard.json"
HARD_LIMIT_DEFAULT = service_settings.Settings(data_dir=Path("/nonexistent")).hard_time_limit


def _tool(name: str) -> str:
    """A console script from this venv, else from PATH. Without it the test skips, or fails under
    HEADFORGE_STRICT_TESTS=1 (CI), so the static checks cannot pass unseen."""
    candidate = Path(sys.executable).with_name(name)
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        missing(f"{name} not installed (pip install -e '.[dev]')")
    return found


def test_missing_tool_skips_or_fails_when_strict(monkeypatch: pytest.MonkeyPatch) -> None:
    """A missing validator must not let CI (HEADFORGE_STRICT_TESTS=1) pass these checks as skipped."""
    absent = "headforge-no-such-tool"
    monkeypatch.setenv("HEADFORGE_STRICT_TESTS", "1")
    with pytest.raises(pytest.fail.Exception, match=absent):
        _tool(absent)
    monkeypatch.setenv("HEADFORGE_STRICT_TESTS", "0")
    with pytest.raises(pytest.skip.Exception, match=absent):
        _tool(absent)
    assert _tool("kubectl").endswith("kubectl")


def _seconds(value: str | int) -> float:
    """Compose durations ('8m', '1m30s', '90s') or plain seconds to seconds."""
    if isinstance(value, int):
        return float(value)
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", value)
    assert parts and "".join(n + u for n, u in parts) == value, f"unparsable duration {value!r}"
    return sum(float(n) * units[u] for n, u in parts)


@functools.cache
def known_env_names() -> frozenset[str]:
    """Every HEADFORGE_* name the package's source mentions (settings, config, pipeline, ...)."""
    names: set[str] = set()
    for path in (ROOT / "headforge").rglob("*.py"):
        names.update(re.findall(r"HEADFORGE_[A-Z0-9_]+", path.read_text(encoding="utf-8")))
    return frozenset(names)


# Names used only by the deployment files themselves (compose interpolation, image metadata).
DEPLOY_ONLY_ENV = frozenset({"HEADFORGE_IMAGE", "HEADFORGE_VERSION", "HEADFORGE_PORT", "HEADFORGE_VARIANT"})


# ---------------------------------------------------------------------------------- Dockerfile


DOCKERFILE_INSTRUCTIONS = frozenset(
    {
        "ADD",
        "ARG",
        "CMD",
        "COPY",
        "ENTRYPOINT",
        "ENV",
        "EXPOSE",
        "FROM",
        "HEALTHCHECK",
        "LABEL",
        "ONBUILD",
        "RUN",
        "SHELL",
        "STOPSIGNAL",
        "USER",
        "VOLUME",
        "WORKDIR",
    }
)


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs from BuildKit's own parser (the `dockerfile` package).

    Flags come first in the arguments; exec forms are JSON arrays; ENV/LABEL are `K=V` pairs;
    a heredoc's body follows its instruction's first line.
    """
    result: list[tuple[str, str]] = []
    for command in buildkit_dockerfile.parse_string(text):
        keyword = command.cmd.upper()
        assert keyword in DOCKERFILE_INSTRUCTIONS, f"line {command.start_line}: unknown instruction {keyword}"
        if command.json:
            args = json.dumps(list(command.value))
        elif keyword in ("ENV", "LABEL"):
            pairs = zip(command.value[::2], command.value[1::2], strict=True)
            args = " ".join(f"{key}={value}" for key, value in pairs)
        else:
            args = " ".join([*command.flags, *command.value])
        for heredoc in command.heredocs:
            args += "\n" + heredoc.content
        result.append((keyword, args))
    return result


def dockerfile_stages(text: str) -> tuple[list[tuple[str, str]], dict[str, list[tuple[str, str]]]]:
    """Instructions before the first FROM, and each stage's instructions by stage name."""
    preamble: list[tuple[str, str]] = []
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for keyword, args in dockerfile_instructions(text):
        if keyword == "FROM":
            match = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", args, flags=re.IGNORECASE)
            assert match, f"every stage is named: FROM {args}"
            current = stages.setdefault(match.group(2), [("FROM", match.group(1))])
        elif current is None:
            preamble.append((keyword, args))
        else:
            current.append((keyword, args))
    return preamble, stages


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text(encoding="utf-8")


def test_dockerfile_variant_arg_selects_base(dockerfile: str) -> None:
    preamble, stages = dockerfile_stages(dockerfile)
    assert ("ARG", "VARIANT=cpu") in preamble
    assert {"os-cpu", "os-cuda", "builder", "runtime"} <= stages.keys()
    assert stages["os-cpu"][0][1] == "${PYTHON_IMAGE}"
    assert ("ARG", "PYTHON_IMAGE=python:3.11-slim-bookworm") in preamble
    cuda_default = dict(a.split("=", 1) for k, a in preamble if k == "ARG" and "=" in a)["CUDA_IMAGE"]
    assert cuda_default.startswith("nvidia/cuda:") and "runtime" in cuda_default
    assert stages["builder"][0][1] == "os-${VARIANT}"
    assert stages["runtime"][0][1] == "os-${VARIANT}"
    assert list(stages)[-1] == "runtime", "the default build target is the runtime image"


def test_dockerfile_runtime_is_non_root_with_healthcheck(dockerfile: str) -> None:
    _, stages = dockerfile_stages(dockerfile)
    runtime = stages["runtime"]
    users = [args for keyword, args in runtime if keyword == "USER"]
    assert users, "runtime stage sets USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), "the container must not run as root"
    health = [args for keyword, args in runtime if keyword == "HEALTHCHECK"]
    assert len(health) == 1 and "CMD" in health[0] and "/healthz" in health[0]
    assert ("EXPOSE", "8000") in runtime
    entry = [json.loads(args) for keyword, args in runtime if keyword == "ENTRYPOINT"]
    assert entry and entry[-1][:2] == ["tini", "--"], "tini forwards SIGTERM for warm shutdowns"
    env = " ".join(args for keyword, args in runtime if keyword == "ENV")
    assert "HEADFORGE_HOME=/opt/headforge" in env and "HEADFORGE_DATA_DIR=/var/lib/headforge" in env


def test_dockerfile_dependencies_before_code(dockerfile: str) -> None:
    """A code change must not invalidate the dependency layers."""
    _, stages = dockerfile_stages(dockerfile)
    builder = stages["builder"]

    def index(predicate: Any, what: str) -> int:
        for position, (keyword, args) in enumerate(builder):
            if predicate(keyword, args):
                return position
        raise AssertionError(f"builder stage has no {what}")

    torch = index(lambda k, a: k == "RUN" and "torch==2.13.0" in a and "whl/cpu" in a, "CPU torch install")
    pyproject = index(lambda k, a: k == "COPY" and a.split()[0] == "pyproject.toml", "COPY pyproject.toml")
    deps = index(lambda k, a: k == "RUN" and "pip install -r" in a, "dependency install")
    code = index(lambda k, a: k == "COPY" and a.startswith("headforge/"), "COPY headforge/")
    package = index(lambda k, a: k == "RUN" and "--no-deps" in a and "pip install" in a, "package install")
    pull = index(lambda k, a: k == "RUN" and "headforge models pull" in a, "models pull")
    assert torch < pyproject < deps < code < package < pull
    # Nothing before the dependency install may copy source files.
    for keyword, args in builder[:deps]:
        if keyword == "COPY":
            assert args.split()[0] == "pyproject.toml", f"early COPY of {args!r} busts the dependency cache"
    cuda = builder[deps][1]
    assert "onnxruntime-gpu" in cuda and "tensorrt" in cuda and '"$VARIANT" = "cuda"' in cuda


def test_dockerfile_requirement_extraction_matches_pyproject(dockerfile: str) -> None:
    """Run the Dockerfile's own heredoc against pyproject.toml: it must list every dependency."""
    _, stages = dockerfile_stages(dockerfile)
    heredocs = [args for keyword, args in stages["builder"] if keyword == "RUN" and "tomllib" in args]
    assert len(heredocs) == 1
    script = heredocs[0].split("\n", 1)[1]
    run = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True
    )
    listed = set(run.stdout.split())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert set(project["dependencies"]) <= listed
    assert any(line.startswith("torch") for line in listed)
    assert set(project["optional-dependencies"]["s3"]) <= listed


def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last pattern that matches a path (or one of its parents) decides."""
    excluded = False
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw[1:] if negate else raw
        pattern = pattern.strip("/")
        if pattern.startswith("**/"):
            hit = any(fnmatch.fnmatch(part, pattern[3:]) for part in parts)
        else:
            hit = any(fnmatch.fnmatch(prefix, pattern) for prefix in prefixes)
        if hit:
            excluded = not negate
    return excluded


def test_dockerignore_keeps_build_inputs_only(dockerfile: str) -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    _, stages = dockerfile_stages(dockerfile)
    sources = [
        args.split()[0].rstrip("/")
        for stage in stages.values()
        for keyword, args in stage
        if keyword == "COPY" and not args.startswith("--from")
    ]
    assert sources
    for source in sources:
        for path in [source, *[str(p.relative_to(ROOT)) for p in (ROOT / source).glob("*")]]:
            if "node_modules" in path or path.endswith("__pycache__"):
                continue
            assert not dockerignore_excludes(patterns, path), f".dockerignore drops {path}, which is COPYed"
    for unwanted in (
        ".venv/bin/python",
        ".git/HEAD",
        "tests/test_deploy.py",
        "web/node_modules/x.js",
        "out/a",
    ):
        assert dockerignore_excludes(patterns, unwanted), f"{unwanted} would be sent to the daemon"


# ---------------------------------------------------------------------------------- compose


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def _check_compose(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_compose_matches_compose_spec(tmp_path: Path) -> None:
    result = _check_compose(ROOT / "docker-compose.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    # The validator must be able to fail: a misspelt key is rejected.
    broken = (
        (ROOT / "docker-compose.yml").read_text(encoding="utf-8").replace("stop_grace_period", "stop_grace")
    )
    (tmp_path / "docker-compose.yml").write_text(broken, encoding="utf-8")
    assert _check_compose(tmp_path / "docker-compose.yml").returncode != 0


def test_compose_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"redis", "api", "worker-cpu", "worker-gpu"} <= services.keys()

    redis = services["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert redis["healthcheck"]["test"]
    assert any(volume.split(":")[1] == "/data" for volume in redis["volumes"])

    data_dir = "/var/lib/headforge"
    for name in ("api", "worker-cpu", "worker-gpu"):
        service = services[name]
        assert {"path": ".env", "required": False} in service["env_file"]
        mounts = {volume.split(":")[1]: volume.split(":")[0] for volume in service["volumes"]}
        assert mounts.get(data_dir) == "artifacts", f"{name} shares the artifact volume"
        assert service["environment"]["HEADFORGE_DATA_DIR"] == data_dir
        assert service["environment"]["HEADFORGE_REDIS_URL"].endswith("redis://redis:6379/0}")
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "artifacts" in compose["volumes"] and "redis-data" in compose["volumes"]
    assert services["api"]["command"][0] == "serve"
    assert any(port.endswith(":8000") for port in services["api"]["ports"])

    hard_limit = max(HARD_LIMIT_DEFAULT, int(read_env_example().get("HEADFORGE_TASK_TIME_LIMIT") or 0))
    for name, queue in (("worker-cpu", "cpu"), ("worker-gpu", "gpu")):
        service = services[name]
        assert service["command"] == ["worker", "--queue", queue, "--hostname", f"{queue}@%h"]
        assert service["environment"]["WORKER_QUEUE"] == queue
        check = " ".join(service["healthcheck"]["test"])
        assert "inspect ping" in check and "$${WORKER_QUEUE}@$${HOSTNAME}" in check
        app_module = re.search(r"celery -A (\S+)", check)
        assert app_module and importlib.util.find_spec(app_module.group(1)) is not None
        assert queue in service_settings.QUEUES
        assert _seconds(service["stop_grace_period"]) > hard_limit, f"{name} must outlive a job"
        assert service.get("stop_signal", "SIGTERM") == "SIGTERM"

    gpu = services["worker-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert "profiles" not in services["worker-cpu"] and "profiles" not in services["api"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert gpu["build"]["args"]["VARIANT"] == "cuda"
    assert services["api"]["build"]["args"]["VARIANT"] == "cpu"


# Where the deployment files mount the directory holding the imported FLAME asset (docs/deploy.md).
FLAME_MOUNT = PurePosixPath("/etc/headforge/flame")
# The commented-out FLAME lines of docker-compose.yml: the volume, and the variable pointing at the file.
COMPOSE_FLAME_LINE = re.compile(r"^(\s*)# ((?:- \./flame:|HEADFORGE_FLAME_ASSET: )\S.*)$", flags=re.MULTILINE)


def _flame_asset_env(monkeypatch: pytest.MonkeyPatch, value: str) -> PurePosixPath:
    """The file headforge reads with HEADFORGE_FLAME_ASSET=value: it must be the imported asset's name."""
    from headforge.models.flame_import import ASSET_FILE_NAME, flame_asset_path

    assert "HEADFORGE_FLAME_ASSET" in known_env_names()
    monkeypatch.setenv("HEADFORGE_FLAME_ASSET", value)
    path = PurePosixPath(flame_asset_path().as_posix())
    assert path == PurePosixPath(value) and path.name == ASSET_FILE_NAME
    return path


def test_compose_flame_volume(
    compose: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FLAME is off by default; uncommenting the documented lines mounts ./flame read-only where
    HEADFORGE_FLAME_ASSET points, in the API (which checks the asset on submit) and both workers."""
    services = ("api", "worker-cpu", "worker-gpu")
    for name in services:
        service = compose["services"][name]
        assert "HEADFORGE_FLAME_ASSET" not in service["environment"]
        assert all(str(FLAME_MOUNT) not in volume for volume in service["volumes"])

    text = (ROOT / "docker-compose.yml").read_text(encoding="utf-8")
    enabled, count = COMPOSE_FLAME_LINE.subn(r"\1\2", text)
    assert count == 3, "one variable, and one volume line each in x-headforge-common and worker-gpu"
    (tmp_path / "docker-compose.yml").write_text(enabled, encoding="utf-8")
    result = _check_compose(tmp_path / "docker-compose.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    data = yaml.safe_load(enabled)
    for name in services:
        service = data["services"][name]
        asset = _flame_asset_env(monkeypatch, service["environment"]["HEADFORGE_FLAME_ASSET"])
        volumes = {volume.split(":")[1]: volume.split(":") for volume in service["volumes"]}
        assert volumes[str(asset.parent)] == ["./flame", str(FLAME_MOUNT), "ro"], service["volumes"]
        # The other mounts are unchanged (worker-gpu lists its volumes itself).
        assert "/var/lib/headforge" in volumes

    # docs/deploy.md imports straight into the folder the volume mounts.
    deploy_doc = (ROOT / "docs" / "deploy.md").read_text(encoding="utf-8")
    assert "HEADFORGE_FLAME_ASSET=./flame/flame.npz headforge flame import" in deploy_doc


def read_env_example() -> dict[str, str]:
    values: dict[str, str] = {}
    for line in (ROOT / ".env.example").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, sep, value = line.partition("=")
            assert sep, f"not NAME=value: {line!r}"
            values[name.strip()] = value.strip()
    return values


def test_env_example_names_are_read_by_headforge() -> None:
    names = {name for name in read_env_example() if name.startswith("HEADFORGE_")}
    unknown = names - known_env_names() - DEPLOY_ONLY_ENV
    assert not unknown, f".env.example sets variables nothing reads: {sorted(unknown)}"
    for required in ("HEADFORGE_REDIS_URL", "HEADFORGE_API_KEYS", "HEADFORGE_WEBHOOK_SECRET"):
        assert required in names


# ---------------------------------------------------------------------------------- Kubernetes


@functools.cache
def rendered(overlay: str, components: tuple[str, ...] = ()) -> tuple[dict[str, Any], ...]:
    """`kubectl kustomize` output of an overlay, as documents. With `components`, of a kustomization
    that adds them to the overlay, as docs/deploy.md tells operators to write one."""
    with tempfile.TemporaryDirectory() as scratch:
        target = KUBE / "overlays" / overlay
        if components:
            # kustomize refuses absolute paths: refer to the repository relative to the scratch folder.
            relative = Path(os.path.relpath(KUBE, scratch))
            kustomization = {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [str(relative / "overlays" / overlay)],
                "components": [str(relative / "components" / name) for name in components],
            }
            target = Path(scratch)
            (target / "kustomization.yaml").write_text(yaml.safe_dump(kustomization), encoding="utf-8")
        result = subprocess.run(
            [_tool("kubectl"), "kustomize", str(target)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def find(docs: tuple[dict[str, Any], ...], kind: str, name: str) -> dict[str, Any]:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def workloads(docs: tuple[dict[str, Any], ...]) -> Iterator[dict[str, Any]]:
    yield from (d for d in docs if d["kind"] in ("Deployment", "StatefulSet"))


@pytest.fixture(scope="module")
def keda_validator() -> jsonschema.Draft202012Validator:
    schema = json.loads(KEDA_SCHEMA.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.mark.parametrize(("overlay", "components"), RENDERINGS)
def test_manifests_validate(
    overlay: str, components: tuple[str, ...], keda_validator: jsonschema.Draft202012Validator
) -> None:
    docs = rendered(overlay, components)
    keda = 0
    for doc in docs:
        assert doc["metadata"].get("namespace", "headforge") == "headforge"
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "headforge"
        if doc["apiVersion"].startswith("keda.sh/"):
            errors = [e.message for e in keda_validator.iter_errors(doc)]
            assert not errors, f"{doc['kind']}/{doc['metadata']['name']}: {errors}"
            keda += 1
            continue
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            where = ".".join(str(p) for p in error.path)
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {where}: {error.message}")
    assert keda == (3 if overlay == "gpu" else 2)


def test_validators_reject_mistakes(keda_validator: jsonschema.Draft202012Validator) -> None:
    docs = rendered("gpu")
    deployment = copy.deepcopy(find(docs, "Deployment", "headforge-worker-gpu"))
    deployment["spec"]["template"]["spec"]["containers"][0]["resource"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
    scaled = copy.deepcopy(find(docs, "ScaledObject", "headforge-worker-gpu"))
    scaled["spec"]["triggers"][0]["metadata"]["listname"] = scaled["spec"]["triggers"][0]["metadata"].pop(
        "listName"
    )
    assert list(keda_validator.iter_errors(scaled))
    scaled = copy.deepcopy(find(docs, "ScaledObject", "headforge-worker-gpu"))
    scaled["spec"]["minReplicas"] = 0
    assert list(keda_validator.iter_errors(scaled))


def _container(workload: dict[str, Any]) -> dict[str, Any]:
    containers = workload["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return dict(containers[0])


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {entry["name"]: entry for entry in container.get("env", [])}


@pytest.mark.parametrize(("overlay", "components"), RENDERINGS)
def test_references_resolve(overlay: str, components: tuple[str, ...]) -> None:
    """Every Secret/ConfigMap/PVC a pod uses exists, with the keys it reads; selectors match pods."""
    docs = rendered(overlay, components)
    secret = find(docs, "Secret", "headforge-secrets")
    config = find(docs, "ConfigMap", "headforge-config")
    keys = {
        ("Secret", "headforge-secrets"): set(secret.get("stringData", {})) | set(secret.get("data", {})),
        ("ConfigMap", "headforge-config"): set(config["data"]),
    }
    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    for workload in workloads(docs):
        pod = workload["spec"]["template"]
        assert workload["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
        for volume in pod["spec"].get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims
        for container in pod["spec"]["containers"]:
            for source in container.get("envFrom", []):
                if "secretRef" in source:
                    assert ("Secret", source["secretRef"]["name"]) in keys
                if "configMapRef" in source:
                    assert ("ConfigMap", source["configMapRef"]["name"]) in keys
            for entry in container.get("env", []):
                ref = entry.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in keys[("Secret", ref["name"])], entry
    for service in (d for d in docs if d["kind"] == "Service"):
        selector = service["spec"]["selector"]
        targets = [
            w
            for w in workloads(docs)
            if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(targets) == 1, f"Service {service['metadata']['name']} selects one workload"
        ports = {p["name"] for p in _container(targets[0]).get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports
    for budget in (d for d in docs if d["kind"] == "PodDisruptionBudget"):
        selector = budget["spec"]["selector"]["matchLabels"]
        assert any(
            selector.items() <= w["spec"]["template"]["metadata"]["labels"].items() for w in workloads(docs)
        )
    for name in set(config["data"]) | {
        n for n in keys[("Secret", "headforge-secrets")] if n.startswith("HEADFORGE_")
    }:
        if name.startswith("HEADFORGE_"):
            assert name in known_env_names(), f"{name} is not read by headforge"


def test_secret_and_config() -> None:
    docs = rendered("cpu")
    assert find(docs, "Namespace", "headforge")
    secret = find(docs, "Secret", "headforge-secrets")
    assert {"HEADFORGE_API_KEYS", "HEADFORGE_WEBHOOK_SECRET", "REDIS_PASSWORD"} <= set(secret["stringData"])
    config = find(docs, "ConfigMap", "headforge-config")["data"]
    assert config["HEADFORGE_DATA_DIR"] == "/var/lib/headforge"
    assert all(isinstance(value, str) for value in config.values())


def test_api_probes_service_ingress_and_metrics() -> None:
    docs = rendered("cpu")
    api = find(docs, "Deployment", "headforge-api")
    container = _container(api)
    assert container["args"][0] == "serve"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    (port,) = container["ports"]
    assert port["containerPort"] == 8000
    annotations = api["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(port["containerPort"])
    assert annotations["prometheus.io/path"] == "/metrics"
    assert api["spec"]["replicas"] >= 2
    budget = find(docs, "PodDisruptionBudget", "headforge-api")
    assert budget["spec"]["minAvailable"] < api["spec"]["replicas"]
    ingress = find(docs, "Ingress", "headforge-api")
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    service = find(docs, "Service", backend["name"])
    assert backend["port"]["name"] in {p["name"] for p in service["spec"]["ports"]}
    redis_url = _env(container)["HEADFORGE_REDIS_URL"]["value"]
    assert redis_url.startswith("redis://:$(REDIS_PASSWORD)@redis:6379/")
    assert list(_env(container)).index("REDIS_PASSWORD") < list(_env(container)).index("HEADFORGE_REDIS_URL")


def test_pods_are_hardened() -> None:
    for workload in workloads(rendered("gpu")):
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        for container in pod["containers"]:
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
            assert "memory" in container["resources"]["limits"]


def test_redis_statefulset_uses_aof() -> None:
    docs = rendered("cpu")
    redis = find(docs, "StatefulSet", "redis")
    args = _container(redis)["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    assert "$(REDIS_PASSWORD)" in args
    mounts = {m["mountPath"] for m in _container(redis)["volumeMounts"]}
    assert "/data" in mounts and redis["spec"]["volumeClaimTemplates"]
    assert find(docs, "Service", "redis")


def test_artifact_volume_is_shared() -> None:
    docs = rendered("gpu")
    claim = find(docs, "PersistentVolumeClaim", "headforge-artifacts")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    data_dir = find(docs, "ConfigMap", "headforge-config")["data"]["HEADFORGE_DATA_DIR"]
    for name in ("headforge-api", "headforge-worker-cpu", "headforge-worker-gpu"):
        workload = find(docs, "Deployment", name)
        volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in _container(workload)["volumeMounts"]}
        assert volumes[mounts[data_dir]]["persistentVolumeClaim"]["claimName"] == "headforge-artifacts"


@pytest.mark.parametrize(("overlay", "queue"), [("cpu", "cpu"), ("gpu", "cpu"), ("gpu", "gpu")])
def test_workers_scale_on_their_queue_and_stop_warm(overlay: str, queue: str) -> None:
    docs = rendered(overlay)
    name = f"headforge-worker-{queue}"
    worker = find(docs, "Deployment", name)
    container = _container(worker)
    # The Celery worker's name carries its queue (cpu@<pod>, gpu@<pod>), as in docker-compose.yml.
    assert container["args"] == ["worker", "--queue", queue, "--hostname", f"{queue}@%h"]
    assert queue in service_settings.QUEUES
    assert "replicas" not in worker["spec"], "KEDA owns the replica count"

    config = find(docs, "ConfigMap", "headforge-config")["data"]
    hard_limit = int(config.get("HEADFORGE_TASK_TIME_LIMIT") or HARD_LIMIT_DEFAULT)
    soft_limit = int(config.get("HEADFORGE_TASK_SOFT_TIME_LIMIT") or 0)
    assert soft_limit < hard_limit
    pod = worker["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > hard_limit
    pre_stop = " ".join(container["lifecycle"]["preStop"]["exec"]["command"])
    assert "kill -TERM 1" in pre_stop and "kill -0 1" in pre_stop, (
        "preStop asks for a warm shutdown and waits"
    )
    budget = find(docs, "PodDisruptionBudget", name)
    assert budget["spec"]["maxUnavailable"] == 1

    scaled = find(docs, "ScaledObject", name)
    spec = scaled["spec"]
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
    assert spec["minReplicaCount"] == 0 and spec["maxReplicaCount"] >= 1
    assert spec["cooldownPeriod"] >= hard_limit, "no scale-to-zero while a taken job may still run"
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "redis"
    metadata = trigger["metadata"]
    assert metadata["listName"] == queue, "Celery's Redis transport keeps one list per queue"
    host, port = metadata["address"].split(":")
    service, namespace = host.split(".")[:2]
    assert find(docs, "Service", service)["metadata"]["namespace"] == namespace
    assert int(port) in {p["port"] for p in find(docs, "Service", service)["spec"]["ports"]}
    redis_url = _env(container)["HEADFORGE_REDIS_URL"]["value"]
    assert redis_url.endswith(f"@{service}:{port}/{metadata['databaseIndex']}")
    auth = find(docs, "TriggerAuthentication", trigger["authenticationRef"]["name"])
    (target,) = auth["spec"]["secretTargetRef"]
    assert target["parameter"] == "password"
    assert target["key"] in find(docs, "Secret", target["name"])["stringData"]


def test_worker_threads_match_cpu_request() -> None:
    docs = rendered("gpu")
    for name in ("headforge-worker-cpu", "headforge-worker-gpu"):
        container = _container(find(docs, "Deployment", name))
        threads = int(_env(container)["HEADFORGE_THREADS"]["value"])
        assert threads == int(container["resources"]["requests"]["cpu"])
    assert "HEADFORGE_THREADS" in known_env_names()


def test_tensorrt_cache_is_writable(compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """TensorRT engines are cached under $HEADFORGE_HOME/trt_cache (export/tensorrt.py): GPU workers mount it."""
    from headforge.config import headforge_home

    monkeypatch.setenv("HEADFORGE_HOME", "/opt/headforge")
    cache = str(headforge_home() / "trt_cache")
    assert "trt_cache" in (ROOT / "headforge" / "export" / "tensorrt.py").read_text(encoding="utf-8")
    worker = find(rendered("gpu"), "Deployment", "headforge-worker-gpu")
    mounts = {m["mountPath"] for m in _container(worker)["volumeMounts"]}
    assert cache in mounts
    assert any(volume.endswith(":" + cache) for volume in compose["services"]["worker-gpu"]["volumes"])
    assert f"mkdir -p {cache} && chown headforge:headforge {cache}" in (ROOT / "Dockerfile").read_text(
        encoding="utf-8"
    )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_flame_component_mounts_the_asset(overlay: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """components/flame mounts the `headforge-flame` claim read-only in the API and every worker, with
    HEADFORGE_FLAME_ASSET pointing into it; without the component nothing refers to FLAME."""
    plain = rendered(overlay)
    assert not [d for d in plain if d["metadata"]["name"] == "headforge-flame"]
    for workload in workloads(plain):
        assert "HEADFORGE_FLAME_ASSET" not in _env(_container(workload))
    assert "HEADFORGE_FLAME_ASSET" not in find(plain, "ConfigMap", "headforge-config")["data"]

    docs = rendered(overlay, ("flame",))
    claim = find(docs, "PersistentVolumeClaim", "headforge-flame")
    assert claim["metadata"]["namespace"] == "headforge"
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"], "every API and worker pod mounts it"
    expected = {"headforge-api", "headforge-worker-cpu"} | (
        {"headforge-worker-gpu"} if overlay == "gpu" else set()
    )
    patched = set()
    for workload in workloads(docs):
        container = _container(workload)
        entry = _env(container).get("HEADFORGE_FLAME_ASSET")
        if entry is None:
            continue
        patched.add(workload["metadata"]["name"])
        asset = _flame_asset_env(monkeypatch, entry["value"])
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        mount = mounts[str(asset.parent)]
        assert asset.parent == FLAME_MOUNT and mount["readOnly"] is True
        volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}
        assert volumes[mount["name"]]["persistentVolumeClaim"] == {
            "claimName": "headforge-flame",
            "readOnly": True,
        }
        # The component adds to the pod; it replaces nothing.
        before = find(plain, workload["kind"], workload["metadata"]["name"])
        assert {m["mountPath"] for m in _container(before)["volumeMounts"]} | {str(FLAME_MOUNT)} == set(
            mounts
        )
        assert _env(_container(before)).keys() | {"HEADFORGE_FLAME_ASSET"} == _env(container).keys()
    assert patched == expected

    deploy_doc = (ROOT / "docs" / "deploy.md").read_text(encoding="utf-8")
    assert "deploy/kubernetes/components/flame" in deploy_doc and "headforge-flame" in deploy_doc


def test_commands_match_the_cli(dockerfile: str, compose: dict[str, Any]) -> None:
    """`headforge serve` / `headforge worker` accept the options the deployment files pass."""
    import typer

    from headforge.cli import app

    group: Any = typer.main.get_command(app)
    commands: list[list[str]] = [
        json.loads(args) for keyword, args in dockerfile_instructions(dockerfile) if keyword == "CMD"
    ]
    commands += [service["command"] for service in compose["services"].values() if "command" in service]
    commands = [c for c in commands if c and c[0] in ("serve", "worker")]
    for overlay in OVERLAYS:
        commands += [
            _container(w)["args"]
            for w in workloads(rendered(overlay))
            if w["metadata"]["name"].startswith("headforge")
        ]
    assert {c[0] for c in commands} == {"serve", "worker"}
    for argv in commands:
        command = group.get_command(None, argv[0])
        assert command is not None, argv
        command.make_context(argv[0], list(argv[1:]), resilient_parsing=False)


def test_gpu_worker_lands_on_gpu_nodes() -> None:
    docs = rendered("gpu")
    worker = find(docs, "Deployment", "headforge-worker-gpu")
    pod = worker["spec"]["template"]["spec"]
    container = _container(worker)
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert pod["nodeSelector"]
    assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in pod["tolerations"])
    assert container["image"].endswith("-cuda")
    cpu_images = {
        _container(find(docs, "Deployment", n))["image"] for n in ("headforge-api", "headforge-worker-cpu")
    }
    assert all(image.endswith("-cpu") for image in cpu_images)
    assert not [d for d in rendered("cpu") if d["metadata"]["name"] == "headforge-worker-gpu"]


# ---------------------------------------------------------------------------------- Grafana


def exported_series(tmp_path: Path) -> set[str]:
    """Series names the service's /metrics exports (its real registry over an empty embedded store)."""
    from headforge.service import metrics
    from headforge.service.jobs import JobStore, make_backend

    settings = service_settings.Settings(data_dir=tmp_path)
    registry, _requests, _latency = metrics.make_registry(JobStore(make_backend(settings), settings))
    suffixes = {
        "counter": ["_total", "_created"],
        "histogram": ["_bucket", "_sum", "_count", "_created"],
        "summary": ["", "_sum", "_count", "_created"],
        "info": ["_info"],
    }
    series: set[str] = set()
    for family in registry.collect():
        series.update(family.name + suffix for suffix in suffixes.get(family.type, [""]))
        series.update(sample.name for sample in family.samples)
    return series


PROMQL_WORDS = frozenset(
    {
        "sum",
        "min",
        "max",
        "avg",
        "count",
        "stddev",
        "topk",
        "bottomk",
        "quantile",
        "rate",
        "irate",
        "increase",
        "delta",
        "deriv",
        "histogram_quantile",
        "clamp_min",
        "clamp_max",
        "abs",
        "ceil",
        "floor",
        "round",
        "vector",
        "scalar",
        "time",
        "label_replace",
        "absent",
        "changes",
        "resets",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "and",
        "or",
        "unless",
        "offset",
    }
)


def promql_metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers left after removing label matchers,
    grouping clauses, ranges, strings, Grafana variables, numbers and PromQL keywords."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', " ", expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\$\{?\w+\}?", " ", text)
    names = set(re.findall(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)", text))
    return {name for name in names if name not in PROMQL_WORDS}


def test_promql_metric_names() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, stage) (rate(headforge_stage_seconds_bucket{stage=~"$stage"}'
        "[$__rate_interval]))) / on (queue) group_left max(kube_x)"
    )
    assert promql_metric_names(expr) == {"headforge_stage_seconds_bucket", "kube_x"}


# Series that come from standard exporters rather than from headforge itself.
EXTERNAL_SERIES = ("kube_", "keda_", "DCGM_", "redis_", "up")


def test_dashboard_queries_use_exported_metrics(tmp_path: Path) -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    panels = [p for p in dashboard["panels"] if p.get("type") != "row"]
    titles = " ".join(p["title"].lower() for p in panels)
    for topic in ("queue depth", "latency by stage", "fail", "gpu workers"):
        assert topic in titles, f"dashboard has a panel for {topic}"
    expressions = [t["expr"] for p in panels for t in p.get("targets", [])]
    assert expressions and all(expressions)
    used = set().union(*(promql_metric_names(expr) for expr in expressions))
    own = {name for name in used if name.startswith("headforge_")}
    assert own, "the dashboard charts headforge's own metrics"
    assert all(name.startswith(("headforge_", *EXTERNAL_SERIES)) for name in used), used
    missing = own - exported_series(tmp_path)
    assert not missing, f"dashboard queries series the service does not export: {sorted(missing)}"
