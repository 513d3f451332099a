"""The deployment files, checked without Docker, Kubernetes, Helm or a network.

* ``docker/compose.yaml`` against the Compose Specification's JSON schema (the copy inside the
  check-jsonschema package), and the consistency of its services (health checks, dependencies,
  volumes, ports, the URLs the services use to find each other);
* every command our image runs (Compose services and probes, the Kubernetes manifests, the Helm
  chart's code server): its program is a console script of this installation, its subcommand
  exists and accepts the options given (``--help`` of that subcommand);
* ``docker/dagster.postgres.yaml`` with Dagster's own instance-config validation (and the same
  run queue, pools and monitoring as the repository's dagster.yaml), ``docker/workspace.yaml``
  with Dagster's workspace validation;
* ``deploy/kubernetes/*.yaml`` with kubernetes-validate (strict: misspelled fields fail);
* ``deploy/kubernetes/dagster-values.yaml``: only keys the Dagster Helm chart defines, the
  Kubernetes objects it copies into pods valid (kubernetes-validate), its instance settings valid.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from importlib import resources
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
COMPOSE = DOCKER / "compose.yaml"
DOCKERFILE = DOCKER / "Dockerfile"
K8S = REPO / "deploy" / "kubernetes"
MANIFESTS = [K8S / "mlflow.yaml", K8S / "serving.yaml"]
HELM_VALUES = K8S / "dagster-values.yaml"
BIN = Path(sys.executable).parent  # the console scripts of this installation
APP_DIR = "/app"  # the image's WORKDIR: the repository's files live there (docker/Dockerfile)
K8S_VERSION = "1.30"  # Kubernetes API version the manifests are checked against

ONE_SHOT = {"minio-buckets", "recsys-init"}
LONG_RUNNING = {"postgres", "minio", "mlflow", "dagster-code", "dagster-webserver", "dagster-daemon", "serving"}


def load_yaml(path: Path):
    return yaml.safe_load(path.read_text())  # resolves anchors and `<<` merge keys, as Compose does


@cache
def compose() -> dict:
    return load_yaml(COMPOSE)


def app_services() -> dict[str, dict]:
    """The Compose services built from our Dockerfile."""
    return {name: s for name, s in compose()["services"].items() if "build" in s}


def argv(command) -> list[str]:
    """A command as Compose or Kubernetes gives it: a list, or a string split like a shell."""
    return list(command) if isinstance(command, list) else shlex.split(command)


def probe_argv(healthcheck: dict) -> list[str]:
    test = healthcheck["test"]
    assert isinstance(test, list) and test[0] == "CMD", f"exec-form probes only: {test}"
    return test[1:]


# --- (a) the Compose Specification --------------------------------------------------------------


@cache
def compose_validator() -> jsonschema.protocols.Validator:
    schema_file = resources.files("check_jsonschema.builtin_schemas") / "vendor" / "compose-spec.json"
    schema = json.loads(schema_file.read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def test_compose_file_follows_the_compose_specification():
    doc = compose()
    compose_validator().validate(doc)
    assert "version" not in doc, "the Compose Specification has no top-level `version`"
    assert set(doc["services"]) == ONE_SHOT | LONG_RUNNING


@pytest.mark.parametrize("mutation", ["healthcheck interval as a list", "unknown top-level key",
                                      "misspelled service key", "depends_on condition"])
def test_the_compose_schema_rejects_a_broken_file(mutation):
    doc = copy.deepcopy(compose())
    if mutation == "healthcheck interval as a list":
        doc["services"]["mlflow"]["healthcheck"]["interval"] = [1]
    elif mutation == "unknown top-level key":
        doc["service"] = doc["services"]
    elif mutation == "misspelled service key":
        doc["services"]["serving"]["healtcheck"] = doc["services"]["serving"].pop("healthcheck")
    else:
        doc["services"]["mlflow"]["depends_on"]["postgres"]["condition"] = "service_ready"
    with pytest.raises(jsonschema.ValidationError):
        compose_validator().validate(doc)


def test_compose_services_are_wired_together():
    doc = compose()
    services = doc["services"]
    for name, service in services.items():
        if name in LONG_RUNNING:
            assert "healthcheck" in service, f"{name}: no health check"
            assert service.get("restart") == "unless-stopped", f"{name}: restart policy"
        else:
            assert service.get("restart") == "no", f"{name}: a one-shot service must not restart"
        for dependency, spec in service.get("depends_on", {}).items():
            assert dependency in services, f"{name} depends on unknown {dependency}"
            condition = spec["condition"]
            if condition == "service_healthy":
                assert "healthcheck" in services[dependency], f"{dependency} has no health check"
            else:
                assert condition == "service_completed_successfully" and dependency in ONE_SHOT, (name, dependency)
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert source in doc["volumes"], f"{name}: volume {source} is not declared"
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name}: {port} should bind to loopback only"
        for config in service.get("configs", []):
            assert config["source"] in doc["configs"]
    # Images we do not build are pinned (a tag, never an implied "latest"), and MinIO's two services run one image.
    pulled = {name: service["image"] for name, service in services.items() if "build" not in service}
    assert all(":" in image and not image.endswith(":latest") for image in pulled.values()), pulled
    assert pulled["minio"] == pulled["minio-buckets"]
    # Everything that runs the project's code shares DAGSTER_HOME and the local work folder.
    for name in ("recsys-init", "dagster-code", "dagster-webserver", "dagster-daemon", "serving"):
        assert "recsys-data:/data" in services[name]["volumes"], name
    # Passwords are interpolated with defaults, never only hard-coded.
    assert "${POSTGRES_PASSWORD:-" in COMPOSE.read_text() and "${MINIO_ROOT_PASSWORD:-" in COMPOSE.read_text()


def test_compose_services_find_each_other():
    services = compose()["services"]
    env = services["dagster-code"]["environment"]
    for name in ("dagster-code", "dagster-webserver", "dagster-daemon", "serving", "recsys-init"):
        assert services[name]["environment"] == env, f"{name}: not the shared environment"
    assert env["DAGSTER_HOME"].startswith("/data/")
    assert env["RECSYS_LANDING_ZONE"] == "s3://recsys/landing"
    # The lake in the same bucket, its writers locked in the compose PostgreSQL's dagster database.
    assert env["RECSYS_LAKE"] == "s3://recsys/lake"
    assert env["RECSYS_LAKE_LOCK"].startswith("postgresql+psycopg2://")
    assert env["RECSYS_LAKE_LOCK"].endswith(f"@postgres:5432/{env['DAGSTER_PG_DB']}")
    assert env["RECSYS_PSEUDONYM_KEY"].startswith("${RECSYS_PSEUDONYM_KEY:?")  # required: no published default
    assert "RECSYS_MLFLOW_ARTIFACTS" not in env  # the tracking server's mlflow-artifacts: root
    assert env["AWS_ENDPOINT_URL"] == env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"

    def port_of(service: str, flag: str) -> str:
        words = argv(services[service]["command"])
        return words[words.index(flag) + 1]

    assert env["MLFLOW_TRACKING_URI"] == f"http://mlflow:{port_of('mlflow', '--port')}"
    assert env["RECSYS_SERVE_URLS"] == f"http://serving:{port_of('serving', '--port')}"
    assert env["DAGSTER_PG_HOST"] == "postgres"
    assert env["DAGSTER_PG_DB"] == services["postgres"]["environment"]["POSTGRES_DB"]
    assert env["DAGSTER_PG_USER"] == services["postgres"]["environment"]["POSTGRES_USER"]
    mlflow_store = port_of("mlflow", "--backend-store-uri")
    assert mlflow_store.startswith("postgresql+psycopg2://") and "@postgres:5432/mlflow" in mlflow_store
    assert "CREATE DATABASE mlflow" in compose()["configs"]["postgres-init"]["content"]
    assert port_of("mlflow", "--artifacts-destination").startswith("s3://mlflow")
    # The buckets the one-shot creates are the ones in use.
    buckets = " ".join(argv(services["minio-buckets"]["command"]))
    assert "recsys/mlflow" in buckets and "recsys/recsys" in buckets


def test_health_probes_ask_the_right_endpoints():
    services = compose()["services"]
    expected = {"mlflow": "http://localhost:5000/health", "dagster-webserver": "http://localhost:3000/server_info",
                "serving": "http://localhost:5001/ping"}
    for name, url in expected.items():
        words = probe_argv(services[name]["healthcheck"])
        assert words[:2] == ["python", "-c"], name
        compile(words[2], f"{name} healthcheck", "exec")
        assert f"urlopen('{url}'" in words[2], name
    assert probe_argv(services["dagster-code"]["healthcheck"]) == ["dagster", "api", "grpc-health-check", "-p", "4000"]
    # /ping and /model (the Kubernetes readiness probe) are routes of `recsys serve`'s app.
    routes = set()
    for source in (REPO / "rec_pipelines" / "server").glob("*.py"):
        routes |= set(re.findall(r'Route\(\s*"(/[^"]*)"', source.read_text()))
    assert {"/ping", "/model"} <= routes


# --- (b) the commands our image runs --------------------------------------------------------------


def image_commands() -> dict[str, list[str]]:
    """Every command line run with our image: Compose commands and probes, the Kubernetes
    containers, and the Helm chart's code server (``dagster api grpc -h 0.0.0.0 -p PORT`` plus
    ``dagsterApiGrpcArgs``)."""
    commands = {}
    for name, service in app_services().items():
        commands[f"compose {name}"] = argv(service["command"])
        if "healthcheck" in service:
            commands[f"compose {name} healthcheck"] = probe_argv(service["healthcheck"])
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc["kind"] == "Deployment":
                for container in doc["spec"]["template"]["spec"]["containers"]:
                    commands[f"{path.name} {container['name']}"] = container["command"] + container.get("args", [])
    for deployment in load_yaml(HELM_VALUES)["dagster-user-deployments"]["deployments"]:
        commands[f"helm {deployment['name']}"] = ["dagster", "api", "grpc", "-h", "0.0.0.0", "-p",
                                                  str(deployment["port"]), *deployment["dagsterApiGrpcArgs"]]
    return commands


def split_subcommand(words: list[str]) -> tuple[str, tuple[str, ...], set[str]]:
    """(program, subcommand path, option names) of a command line."""
    program, rest = words[0], words[1:]
    path = []
    while rest and not rest[0].startswith("-"):
        path.append(rest.pop(0))
    options = {word.split("=", 1)[0] for word in rest if re.fullmatch(r"--?[A-Za-z][\w-]*(=.*)?", word)}
    return program, tuple(path), options


def clean_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RECSYS_", "DAGSTER_", "MLFLOW_"))}
    env.update(RECSYS_HOME=str(tmp_path / "home"), DAGSTER_HOME=str(tmp_path / "home" / "dagster_home"),
               HF_HUB_OFFLINE="1", PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    return env


def test_our_image_runs_only_commands_this_installation_provides(tmp_path):
    commands = image_commands()
    helps: dict[tuple[str, tuple[str, ...]], set[str]] = {}
    for source, words in commands.items():
        program = words[0]
        assert shutil.which(program, path=str(BIN)), f"{source}: {program} is not in {BIN}"
        if program == "python":
            assert words[1] == "-c", source
            compile(words[2], source, "exec")
            continue
        program, path, options = split_subcommand(words)
        helps.setdefault((program, path), set()).update(options)
    expected = {("mlflow", ("server",)), ("dagster", ("code-server", "start")), ("dagster", ("api", "grpc")),
                ("dagster", ("api", "grpc-health-check")), ("dagster-webserver", ()), ("dagster-daemon", ("run",)),
                ("dagster-daemon", ("liveness-check",)), ("recsys", ("serve",))}
    assert set(helps) == expected

    from rec_pipelines import cli

    for program, path in helps:
        if program == "recsys":
            assert path[0] in cli.DELEGATED or path[0] in {"demo", "ui"}, f"recsys {path[0]} is not a subcommand"

    env = clean_env(tmp_path)

    def help_text(key):
        program, path = key
        result = subprocess.run([str(BIN / program), *path, "--help"], capture_output=True, text=True, env=env,
                                timeout=300)
        return key, result

    with ThreadPoolExecutor(4) as pool:
        results = dict(pool.map(help_text, helps))
    for (program, path), result in results.items():
        line = " ".join([program, *path])
        assert result.returncode == 0, f"`{line} --help` failed:\n{result.stdout}\n{result.stderr}"
        for option in helps[(program, path)]:
            assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", result.stdout), \
                f"`{line}` has no option {option}"


def test_recsys_init_installs_the_postgres_instance_config(tmp_path):
    """The one-shot `recsys-init` service gives DAGSTER_HOME the instance config named by
    RECSYS_DAGSTER_CONFIG (the webserver, daemon and code server read it from there)."""
    service = compose()["services"]["recsys-init"]
    words = argv(service["command"])
    env = clean_env(tmp_path)
    for key, value in service["environment"].items():  # the service's environment, paths moved here
        value = str(value)
        if value.startswith(APP_DIR + "/"):
            value = str(REPO / value.removeprefix(APP_DIR + "/"))
        elif value == "/data" or value.startswith("/data/"):
            value = str(tmp_path / "data") + value.removeprefix("/data")
        env[key] = value
    result = subprocess.run([str(BIN / words[0]), *words[1:]], capture_output=True, text=True, env=env,
                            cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    installed = Path(env["DAGSTER_HOME"]) / "dagster.yaml"
    assert installed.read_bytes() == (DOCKER / "dagster.postgres.yaml").read_bytes()


def test_every_file_the_deployment_names_exists():
    for name, service in app_services().items():
        build = service["build"]
        context = (COMPOSE.parent / build["context"]).resolve()
        assert context == REPO, f"{name}: build context {context}"
        assert (context / build["dockerfile"]).is_file()
    # Paths inside the image: the Dockerfile copies the repository's files to /app.
    for path in set(re.findall(rf"{APP_DIR}/[\w./-]+", COMPOSE.read_text())):
        assert (REPO / path.removeprefix(APP_DIR + "/")).exists(), f"compose.yaml names {path}"
    workdir = re.search(r"^WORKDIR\s+(\S+)", DOCKERFILE.read_text(), re.M).group(1)
    assert workdir == APP_DIR
    copied = []
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("COPY "):
            copied += line.split()[1:-1]
    for source in copied:
        assert (REPO / source).exists(), f"Dockerfile copies missing {source}"
    assert {"docker", "rec_pipelines", "rec_models", "pyproject.toml"} <= set(copied)
    assert '-e ".[services]"' in DOCKERFILE.read_text()
    assert "download.pytorch.org/whl/cpu" in DOCKERFILE.read_text()
    assert not (DOCKER / "docker-compose.yml").exists(), "docker/compose.yaml replaces docker-compose.yml"


# --- (c) Dagster's instance and workspace files ---------------------------------------------------


PG_ENV = {"DAGSTER_PG_HOST": "db.internal", "DAGSTER_PG_PORT": "6543", "DAGSTER_PG_USER": "recsys",
          "DAGSTER_PG_PASSWORD": "p@ss word", "DAGSTER_PG_DB": "dagster"}


def instance_config(tmp_path: Path, config: dict | Path):
    """Dagster's own validation of an instance config (as `DagsterInstance` loads it)."""
    from dagster._core.instance.config import dagster_instance_config

    home = tmp_path / "dagster_home"
    home.mkdir(exist_ok=True)
    target = home / "dagster.yaml"
    if isinstance(config, Path):
        shutil.copyfile(config, target)
    else:
        target.write_text(yaml.safe_dump(config))
    return dagster_instance_config(str(home))[0]


def test_postgres_instance_config_is_valid_dagster_config(tmp_path, monkeypatch):
    from dagster._config import process_config
    from dagster._core.storage.config import pg_config
    from dagster_postgres.utils import pg_url_from_config

    for key, value in PG_ENV.items():
        monkeypatch.setenv(key, value)
    config = instance_config(tmp_path, DOCKER / "dagster.postgres.yaml")
    assert set(config["storage"]) == {"postgres"}
    resolved = process_config(pg_config(), config["storage"]["postgres"])  # the env: sources, resolved
    assert resolved.success, resolved.errors
    assert pg_url_from_config(resolved.value) == "postgresql+psycopg2://recsys:p%40ss%20word@db.internal:6543/dagster"
    # The compose file gives the code server, webserver and daemon every variable it reads.
    env = compose()["services"]["dagster-code"]["environment"]
    read = set(re.findall(r"env: (\w+)", (DOCKER / "dagster.postgres.yaml").read_text()))
    assert read == set(PG_ENV) and read <= set(env)


def test_postgres_instance_config_differs_from_dagster_yaml_only_in_storage():
    services = load_yaml(DOCKER / "dagster.postgres.yaml")
    local = load_yaml(REPO / "dagster.yaml")
    assert set(local["storage"]) == {"sqlite"}
    services.pop("storage"), local.pop("storage")
    assert services == local


def test_workspace_points_at_the_code_server():
    from dagster._core.workspace.config_schema import ensure_workspace_config

    workspace = ensure_workspace_config(load_yaml(DOCKER / "workspace.yaml"), str(DOCKER / "workspace.yaml"))
    [location] = workspace["load_from"]
    server = location["grpc_server"]
    assert server["location_name"] == "rec_pipelines"
    services = compose()["services"]
    code_server = argv(services[server["host"]]["command"])
    assert code_server[:3] == ["dagster", "code-server", "start"]
    assert code_server[code_server.index("-p") + 1] == str(server["port"])
    assert code_server[code_server.index("-m") + 1] == "rec_pipelines.definitions"
    for name in ("dagster-webserver", "dagster-daemon"):
        words = argv(services[name]["command"])
        assert words[words.index("-w") + 1] == f"{APP_DIR}/docker/workspace.yaml", name


# --- (d) Kubernetes manifests ----------------------------------------------------------------------


def manifests() -> list[dict]:
    return [doc for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text())]


def deployment(name: str) -> dict:
    return next(d for d in manifests() if d["kind"] == "Deployment" and d["metadata"]["name"] == name)


@pytest.mark.parametrize("doc", manifests(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_kubernetes_manifests_are_valid(doc):
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_kubernetes_validation_rejects_a_misspelled_field():
    doc = copy.deepcopy(deployment("recsys-serving"))
    container = doc["spec"]["template"]["spec"]["containers"][0]
    container["readynessProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    doc = copy.deepcopy(deployment("mlflow"))
    doc["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_kubernetes_probes_resources_and_services():
    serving = deployment("recsys-serving")["spec"]["template"]["spec"]["containers"][0]
    assert serving["readinessProbe"]["httpGet"] == {"path": "/model", "port": 5001}
    assert serving["livenessProbe"]["httpGet"]["path"] == "/ping"
    assert {"name": "MLFLOW_TRACKING_URI", "value": "http://mlflow:5000"} in serving["env"]
    mlflow = deployment("mlflow")["spec"]["template"]["spec"]["containers"][0]
    assert mlflow["readinessProbe"]["httpGet"]["path"] == mlflow["livenessProbe"]["httpGet"]["path"] == "/health"
    for doc in manifests():
        if doc["kind"] == "Deployment":
            spec = doc["spec"]
            assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
            for container in spec["template"]["spec"]["containers"]:
                assert {"cpu", "memory"} <= set(container["resources"]["requests"]), container["name"]
                assert container["envFrom"][0]["secretRef"]["name"], container["name"]
            claims = {v["persistentVolumeClaim"]["claimName"] for v in spec["template"]["spec"].get("volumes", [])
                      if "persistentVolumeClaim" in v}
            assert claims <= {d["metadata"]["name"] for d in manifests() if d["kind"] == "PersistentVolumeClaim"}
    services = {d["metadata"]["name"]: d for d in manifests() if d["kind"] == "Service"}
    assert services["mlflow"]["spec"]["ports"][0]["port"] == 5000
    assert services["recsys-serving"]["spec"]["ports"][0]["port"] == 5001


# --- (e) the Dagster Helm chart's values ------------------------------------------------------------
# The chart's schema is not vendored here (it is the dagster project's file). What is checked: every
# key we set is one the chart's values.yaml defines (the sets below, written from the chart's
# values.yaml and its dagster-user-deployments sub-chart), the Kubernetes objects the chart copies
# into its pods (env, volumes, mounts, resources) pass kubernetes-validate inside a Pod, and the
# instance settings pass Dagster's own validation.

CHART_KEYS = {
    "": {"global", "postgresql", "generatePostgresqlPasswordSecret", "dagster-user-deployments", "runLauncher",
         "dagsterDaemon", "dagsterWebserver", "telemetry", "additionalInstanceConfig", "computeLogManager",
         "pythonLogs", "ingress", "rbacEnabled", "serviceAccount", "imagePullSecrets", "scheduler", "concurrency",
         "redis", "rabbitmq", "flower", "busybox", "migrate", "retention", "nameOverride", "fullnameOverride"},
    "global": {"postgresqlSecretName", "dagsterHome", "serviceAccountName", "celeryConfigSecretName"},
    "postgresql": {"enabled", "image", "postgresqlHost", "postgresqlUsername", "postgresqlPassword",
                   "postgresqlDatabase", "postgresqlParams", "postgresqlScheme", "service"},
    "dagster-user-deployments": {"enabled", "enableSubchart", "imagePullSecrets", "deployments"},
    "deployments[]": {"name", "image", "dagsterApiGrpcArgs", "codeServerArgs", "includeConfigInLaunchedRuns",
                      "deploymentNamespace", "port", "env", "envConfigMaps", "envSecrets", "labels", "volumes",
                      "volumeMounts", "annotations", "nodeSelector", "affinity", "tolerations", "podSecurityContext",
                      "securityContext", "resources", "livenessProbe", "readinessProbe", "startupProbe",
                      "initContainers", "sidecarContainers", "service", "schedulerName", "replicaCount"},
    "runLauncher": {"type", "config"},
    "runLauncher.config.k8sRunLauncher": {"image", "imagePullPolicy", "jobNamespace", "loadInclusterConfig",
                                          "kubeconfigFile", "envConfigMaps", "envSecrets", "envVars", "volumeMounts",
                                          "volumes", "labels", "resources", "schedulerName", "securityContext",
                                          "runK8sConfig", "failPodOnRunFailure", "nodeSelector", "tolerations",
                                          "affinity", "podSecurityContext", "annotations"},
    "dagsterDaemon": {"enabled", "image", "heartbeatTolerance", "runCoordinator", "runMonitoring", "runRetries",
                      "sensors", "schedules", "env", "envConfigMaps", "envSecrets", "resources", "annotations",
                      "nodeSelector", "affinity", "tolerations", "podSecurityContext", "securityContext",
                      "livenessProbe", "readinessProbe", "startupProbe", "volumes", "volumeMounts", "labels"},
    "dagsterDaemon.runMonitoring": {"enabled", "startTimeoutSeconds", "pollIntervalSeconds", "maxResumeRunAttempts",
                                    "freeSlotsAfterRunEndSeconds", "cancelTimeoutSeconds", "maxRuntimeSeconds"},
}
LAUNCHERS = {"K8sRunLauncher", "CeleryK8sRunLauncher", "CustomRunLauncher"}


def chart_key_errors(values: dict) -> list[str]:
    """Keys of ``values`` the chart does not define (see CHART_KEYS), and an unknown launcher."""
    errors = [f"{key}" for key in values if key not in CHART_KEYS[""]]
    for path in ("global", "postgresql", "dagster-user-deployments", "runLauncher", "dagsterDaemon",
                 "dagsterDaemon.runMonitoring", "runLauncher.config.k8sRunLauncher"):
        node = values
        for part in path.split("."):
            node = node.get(part, {})
        errors += [f"{path}.{key}" for key in node if key not in CHART_KEYS[path]]
    for deployment_values in values.get("dagster-user-deployments", {}).get("deployments", []):
        errors += [f"deployments[].{k}" for k in deployment_values if k not in CHART_KEYS["deployments[]"]]
        errors += [f"deployments[].{k} missing" for k in ("name", "image", "port") if k not in deployment_values]
    if values.get("runLauncher", {}).get("type") not in LAUNCHERS:
        errors.append(f"runLauncher.type {values.get('runLauncher', {}).get('type')!r}")
    return errors


def chart_pod(values: dict) -> dict:
    """The Kubernetes parts the chart copies into the code server's and the runs' pods, as one Pod."""
    [code] = values["dagster-user-deployments"]["deployments"]
    launcher = values["runLauncher"]["config"]["k8sRunLauncher"]
    container = {"name": "code", "image": f"{code['image']['repository']}:{code['image']['tag']}",
                 "imagePullPolicy": code["image"]["pullPolicy"],
                 "env": [{"name": k, "value": v} for k, v in code["env"].items()],
                 "envFrom": [{"secretRef": s} for s in code["envSecrets"]],
                 "volumeMounts": code["volumeMounts"], "resources": code["resources"],
                 "ports": [{"containerPort": code["port"]}]}
    run = {"name": "run", "image": container["image"], "resources": launcher["resources"],
           "envFrom": [{"secretRef": s} for s in launcher["envSecrets"]]}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "chart-parts"},
            "spec": {"containers": [container, run], "volumes": code["volumes"]}}


def validate_helm_values(values: dict) -> None:
    errors = chart_key_errors(values)
    if errors:
        raise ValueError(f"keys the chart does not define: {errors}")
    kubernetes_validate.validate(chart_pod(values), K8S_VERSION, strict=True)


def test_helm_values_use_the_charts_keys_and_valid_kubernetes_objects():
    values = load_yaml(HELM_VALUES)
    validate_helm_values(values)
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    assert values["postgresql"]["enabled"] is False
    assert values["generatePostgresqlPasswordSecret"] is False
    [code] = values["dagster-user-deployments"]["deployments"]
    assert code["dagsterApiGrpcArgs"] == ["-m", "rec_pipelines.definitions"]
    assert code["includeConfigInLaunchedRuns"]["enabled"] is True
    assert {"name": "recsys-env"} in code["envSecrets"]
    # The code server finds MLflow and serving by the Kubernetes Services of mlflow.yaml / serving.yaml.
    services = {d["metadata"]["name"]: d["spec"]["ports"][0]["port"] for d in manifests() if d["kind"] == "Service"}
    assert code["env"]["MLFLOW_TRACKING_URI"] == f"http://mlflow:{services['mlflow']}"
    assert code["env"]["RECSYS_SERVE_URLS"] == f"http://recsys-serving:{services['recsys-serving']}"
    # The lake is in S3 and locked in PostgreSQL: no pod shares a volume (RWX storage not needed).
    assert code["env"]["RECSYS_LAKE"] == "s3://recsys/lake"
    assert all("emptyDir" in v for v in code["volumes"])


def test_helm_instance_config_matches_the_compose_instance(tmp_path):
    """The run queue and pools the chart's instance gets (additionalInstanceConfig, run monitoring)
    are docker/dagster.postgres.yaml's, and Dagster accepts them."""
    values = load_yaml(HELM_VALUES)
    extra = values["additionalInstanceConfig"]
    services = load_yaml(DOCKER / "dagster.postgres.yaml")
    assert extra["run_coordinator"] == services["run_coordinator"]
    assert extra["concurrency"] == services["concurrency"]
    assert values["dagsterDaemon"]["runCoordinator"]["enabled"] is False  # else two run-queue configs
    monitoring = values["dagsterDaemon"]["runMonitoring"]
    camel = {"start_timeout_seconds": "startTimeoutSeconds", "poll_interval_seconds": "pollIntervalSeconds",
             "free_slots_after_run_end_seconds": "freeSlotsAfterRunEndSeconds", "enabled": "enabled"}
    assert {key: monitoring[camel[key]] for key in services["run_monitoring"]} == services["run_monitoring"]
    assert values["telemetry"]["enabled"] is services["telemetry"]["enabled"] is False
    config = instance_config(tmp_path, {**extra, "run_monitoring": services["run_monitoring"]})
    assert config["concurrency"]["pools"]["default_limit"] == 1


@pytest.mark.parametrize("mutation", ["misspelled run launcher key", "unknown run launcher",
                                      "user deployment without image", "wrong type"])
def test_broken_helm_values_are_rejected(mutation):
    values = copy.deepcopy(load_yaml(HELM_VALUES))
    if mutation == "misspelled run launcher key":
        launcher = values["runLauncher"]["config"]["k8sRunLauncher"]
        launcher["envSecret"] = launcher.pop("envSecrets")
    elif mutation == "unknown run launcher":
        values["runLauncher"]["type"] = "K8sLauncher"
    elif mutation == "user deployment without image":
        del values["dagster-user-deployments"]["deployments"][0]["image"]
    else:
        values["dagster-user-deployments"]["deployments"][0]["resources"]["requests"]["memory"] = ["2Gi"]
    with pytest.raises((ValueError, kubernetes_validate.ValidationError)):
        validate_helm_values(values)
