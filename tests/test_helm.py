"""The Helm chart (deploy/helm/ferry), rendered offline and validated.

helm-python-sdk renders it with Helm's own engine (no cluster, no `helm` binary);
kubernetes-validate checks every object against the Kubernetes API's schemas, strictly
(unknown fields are errors); the KEDA objects, which those schemas do not carry, are parsed
by cloudcoil's models generated from KEDA's CRDs and must come back unchanged (a field the
CRD lacks, or of the wrong type, would not).
"""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import psycopg
import pytest
import yaml
from cloudcoil.models.keda import v1alpha1 as keda
from pydantic import ValidationError

from cli.main import build_parser

CHART = Path(__file__).resolve().parents[1] / "deploy" / "helm" / "ferry"
MULTI_MODEL = CHART / "ci" / "multi-model-values.yaml"
# A recent Kubernetes: the newest release whose schemas kubernetes-validate ships.
KUBE_VERSION = kubernetes_validate.latest_version()
RELEASE = "ferry"

Obj = dict[str, Any]


def render(values: Obj | None = None) -> list[Obj]:
    """Every object the chart renders with these values (over its defaults)."""
    manifests = helm.Chart.load(CHART).render(
        values, name=RELEASE, namespace="ferry", is_install=True
    )
    objects = []
    for path, text in manifests.items():
        if path.endswith(".txt"):
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects


def multi_model_values() -> Obj:
    values: Obj = yaml.safe_load(MULTI_MODEL.read_text())
    return values


def validate(obj: Obj) -> None:
    """Raises if `obj` is not a valid object of its kind."""
    if obj["apiVersion"].startswith("keda.sh/"):
        model = getattr(keda, obj["kind"]).model_validate(obj)
        back = model.model_dump(by_alias=True, exclude_unset=True, mode="json")
        if back != obj:
            raise ValueError(f"{obj['kind']} has fields KEDA's CRD does not: {obj} != {back}")
    else:
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)


def of_kind(objects: list[Obj], kind: str) -> list[Obj]:
    return [o for o in objects if o["kind"] == kind]


def named(objects: list[Obj], kind: str, name: str) -> Obj:
    [obj] = [o for o in of_kind(objects, kind) if o["metadata"]["name"] == name]
    return obj


def container(obj: Obj) -> Obj:
    [first] = obj["spec"]["template"]["spec"]["containers"]
    return first


def env(obj: Obj) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(obj)["env"]}


def workers(objects: list[Obj]) -> list[Obj]:
    return [
        o
        for o in of_kind(objects, "Deployment")
        if o["metadata"]["labels"]["app.kubernetes.io/component"] == "worker"
    ]


@pytest.mark.parametrize("values", ["defaults", "multi-model"])
def test_every_rendered_object_is_valid(values: str) -> None:
    objects = render(None if values == "defaults" else multi_model_values())
    kinds = {o["kind"] for o in objects}
    assert {"Deployment", "Service", "Secret", "Job"} <= kinds
    for obj in objects:
        validate(obj)
    # Helm's own checks, warnings counted as errors.
    report = helm.lint(
        CHART,
        None if values == "defaults" else multi_model_values(),
        strict=True,
        kube_version=f"v{KUBE_VERSION}.0",
    )
    assert report["errors"] == [], report
    assert [m for m in report["messages"] if m["severity"] >= 2] == [], report


def test_defaults_are_a_trial_with_one_gpu_worker() -> None:
    objects = render()
    [worker] = workers(objects)
    assert container(worker)["command"] == [
        "ferry",
        "worker",
        "--model",
        "Qwen/Qwen2.5-0.5B-Instruct",
        "--engine",
        "vllm",
    ]
    assert container(worker)["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert worker["spec"]["replicas"] == 1
    # Probed by its heartbeat, through a command the image's `ferry` has.
    for probe in ("startupProbe", "livenessProbe"):
        command = container(worker)[probe]["exec"]["command"]
        assert command == ["ferry", "check-worker"]
        build_parser().parse_args(command[1:])
    # The in-chart PostgreSQL, Redis and MinIO, and the URLs that reach them.
    assert {s["metadata"]["name"] for s in of_kind(objects, "StatefulSet")} == {
        "ferry-postgresql",
        "ferry-redis",
        "ferry-minio",
    }
    secret = named(objects, "Secret", "ferry")["stringData"]
    assert secret["database-url"] == (
        "postgresql+asyncpg://ferry:ferry-trial@ferry-postgresql:5432/ferry"
    )
    assert (
        secret["keda-database-url"] == "postgresql://ferry:ferry-trial@ferry-postgresql:5432/ferry"
    )
    assert secret["redis-url"] == "redis://ferry-redis:6379/0"
    assert env(worker)["FERRY_S3_ENDPOINT_URL"] == "http://ferry-minio:9000"
    # KEDA is off unless asked for: its CRDs may not be installed.
    assert not of_kind(objects, "ScaledObject")
    assert not of_kind(objects, "Ingress")


def test_api_probes_and_settings() -> None:
    objects = render(multi_model_values())
    api = named(objects, "Deployment", "ferry-api")
    assert api["spec"]["replicas"] == 3
    main = container(api)
    assert main["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    # Traffic follows /health: /ready is 503 while a model is at zero workers.
    assert main["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert main["ports"] == [{"name": "http", "containerPort": 8000}]
    variables = env(api)
    assert variables["FERRY_MIGRATE_ON_START"] == "false"
    assert variables["FERRY_MODELS"] == (
        "Qwen/Qwen2.5-0.5B-Instruct,llama-70b,Qwen/Qwen2.5-VL-3B-Instruct"
    )
    assert variables["FERRY_SYNC_TIMEOUT_SECONDS"] == "300"
    service = named(objects, "Service", "ferry-api")
    assert (
        service["spec"]["selector"].items() <= api["spec"]["template"]["metadata"]["labels"].items()
    )
    ingress = named(objects, "Ingress", "ferry")
    [rule] = ingress["spec"]["rules"]
    assert rule["host"] == "ferry.example.com"
    assert rule["http"]["paths"][0]["backend"]["service"]["name"] == "ferry-api"


def test_one_worker_and_one_scaled_object_per_model() -> None:
    values = multi_model_values()
    objects = render(values)
    deployments = {d["metadata"]["name"]: d for d in workers(objects)}
    scaled = {s["metadata"]["name"]: s for s in of_kind(objects, "ScaledObject")}
    names = [f"ferry-worker-{m['name']}" for m in values["models"]]
    assert sorted(deployments) == sorted(names)
    assert sorted(scaled) == sorted(names)

    llama = deployments["ferry-worker-llama-70b"]
    assert container(llama)["command"] == [
        "ferry",
        "worker",
        "--model",
        "meta-llama/Llama-3.3-70B-Instruct",
        "--engine",
        "vllm",
        "--served-model-name",
        "llama-70b",
        "--tensor-parallel-size",
        "4",
        "--max-model-len",
        "32768",
    ]
    assert container(llama)["resources"]["limits"]["nvidia.com/gpu"] == 4
    pod = llama["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    # Per-model settings win over the workers' common ones.
    assert env(deployments["ferry-worker-qwen-vl"])["FERRY_CONCURRENCY"] == "32"
    assert env(deployments["ferry-worker-qwen-small"])["FERRY_CONCURRENCY"] == "128"

    for name, deployment in deployments.items():
        # KEDA owns the replica count: an upgrade must not reset it.
        assert "replicas" not in deployment["spec"]
        target = scaled[name]["spec"]
        assert target["scaleTargetRef"]["name"] == name
        [trigger] = target["triggers"]
        assert trigger["type"] == "postgresql"
        auth = named(objects, "TriggerAuthentication", trigger["authenticationRef"]["name"])
        assert auth["spec"]["secretTargetRef"][0]["parameter"] == "connection"
    assert scaled["ferry-worker-qwen-small"]["spec"]["minReplicaCount"] == 0
    assert scaled["ferry-worker-qwen-small"]["spec"]["maxReplicaCount"] == 8
    assert scaled["ferry-worker-llama-70b"]["spec"]["minReplicaCount"] == 1
    assert scaled["ferry-worker-llama-70b"]["spec"]["triggers"][0]["metadata"][
        "targetQueryValue"
    ] == ("256")


def test_keda_query_counts_the_models_unfinished_jobs(migrated_pg: str) -> None:
    """The scaler's query, run as KEDA runs it, on Ferry's own schema: it counts the
    model's queued and running jobs (scale from zero), not finished ones nor other models'."""
    values = multi_model_values()
    values["models"].append({"name": "quoted", "model": "it's-a-model"})
    objects = render(values)
    queries = {
        s["metadata"]["name"]: s["spec"]["triggers"][0]["metadata"]["query"]
        for s in of_kind(objects, "ScaledObject")
    }
    url = migrated_pg.replace("postgresql+asyncpg://", "postgresql://")
    rows = [
        ("llama-70b", "queued"),
        ("llama-70b", "queued"),
        ("llama-70b", "running"),
        ("llama-70b", "succeeded"),
        ("llama-70b", "expired"),
        ("meta-llama/Llama-3.3-70B-Instruct", "queued"),
        ("Qwen/Qwen2.5-0.5B-Instruct", "running"),
        ("it's-a-model", "queued"),
    ]
    owner = f"key_helm_{datetime.now(UTC).timestamp()}"
    with psycopg.connect(url) as conn:
        now = datetime.now(UTC)
        conn.execute(
            "INSERT INTO api_keys (id, key_hash, created_at) VALUES (%s, %s, %s)",
            (owner, owner, now),
        )
        for i, (model, status) in enumerate(rows):
            conn.execute(
                "INSERT INTO jobs (id, owner_id, model, kind, lane, status, priority, request,"
                " attempts, created_at) VALUES (%s, %s, %s, 'chat', 'interactive', %s, 0,"
                " %s, 0, %s)",
                (f"{owner}_{i}", owner, model, status, json.dumps({}), now),
            )
        counts = {
            name: conn.execute(query.encode()).fetchone()[0]  # type: ignore[index]
            for name, query in queries.items()
        }
        conn.rollback()
    assert counts == {
        "ferry-worker-llama-70b": 3,
        "ferry-worker-qwen-small": 1,
        "ferry-worker-qwen-vl": 0,
        "ferry-worker-quoted": 1,
    }


@pytest.mark.parametrize("database", ["in-chart", "external"])
def test_migrations_run_once_before_the_api(database: str) -> None:
    values = multi_model_values() if database == "external" else None
    objects = render(values)
    [job] = of_kind(objects, "Job")
    hook = job["metadata"]["annotations"]["helm.sh/hook"]
    assert container(job)["command"] == ["ferry", "migrate"]
    api = named(objects, "Deployment", "ferry-api")
    assert env(api)["FERRY_MIGRATE_ON_START"] == "false"
    init = api["spec"]["template"]["spec"].get("initContainers", [])
    if database == "external":
        # Migrated before anything of the release starts, on install and upgrade.
        assert hook == "pre-install,pre-upgrade"
        assert init == []
    else:
        # The in-chart PostgreSQL exists only once the release's objects do: a first
        # install migrates from the API pods' init container, upgrades from the hook.
        assert hook == "pre-upgrade"
        assert [c["command"] for c in init] == [["ferry", "migrate"]]
    # Hooks run before the release's own Secret exists on a first install: the Job reads
    # a hook Secret created just before it (a lower weight), holding the same URL.
    ref = env(job)["FERRY_DATABASE_URL"]["secretKeyRef"]
    secret = named(objects, "Secret", ref["name"])
    assert secret["metadata"]["annotations"]["helm.sh/hook"] == hook
    weights = [int(o["metadata"]["annotations"]["helm.sh/hook-weight"]) for o in (secret, job)]
    assert weights[0] < weights[1]
    assert (
        secret["stringData"]["database-url"]
        == (named(objects, "Secret", "ferry")["stringData"]["database-url"])
    )


def secret_refs(objects: list[Obj]) -> list[tuple[str, str, bool]]:
    """(secret, key, optional) for every Secret key a pod or KEDA reads."""
    refs = []
    for obj in objects:
        if obj["kind"] in {"Deployment", "StatefulSet", "Job"}:
            pod = obj["spec"]["template"]["spec"]
            for each in pod["containers"] + pod.get("initContainers", []):
                for variable in each.get("env", []):
                    ref = variable.get("valueFrom", {}).get("secretKeyRef")
                    if ref:
                        refs.append((ref["name"], ref["key"], ref.get("optional", False)))
        if obj["kind"] == "TriggerAuthentication":
            refs.extend((r["name"], r["key"], False) for r in obj["spec"]["secretTargetRef"])
    return refs


@pytest.mark.parametrize("values", ["defaults", "multi-model"])
def test_every_secret_read_is_rendered(values: str) -> None:
    objects = render(None if values == "defaults" else multi_model_values())
    secrets = {s["metadata"]["name"]: s["stringData"] for s in of_kind(objects, "Secret")}
    refs = secret_refs(objects)
    assert {key for _, key, _ in refs} >= {"database-url", "redis-url", "api-keys"}
    for name, key, optional in refs:
        assert name in secrets, name
        assert optional or key in secrets[name], (name, key)
    if values == "multi-model":
        assert secrets["ferry"]["admin-key"] == "sk-admin"
        assert secrets["ferry"]["keda-database-url"] == (
            "postgresql://ferry:secret@db.internal:5432/ferry"
        )


def test_an_existing_secret_replaces_the_charts() -> None:
    values = multi_model_values()
    values["secrets"] = {"existingSecret": "ferry-prod"}
    objects = render(values)
    assert not of_kind(objects, "Secret")
    refs = secret_refs(objects)
    assert refs
    assert {name for name, _, _ in refs} == {"ferry-prod"}


def test_invalid_values_fail_validation() -> None:
    """The checks above can fail: a misspelt field passed through to a pod, a wrong type,
    and a ScaledObject field KEDA does not know are each refused."""
    values = multi_model_values()
    values["api"]["securityContext"] = {"runAsUsr": 1000}
    api = named(render(values), "Deployment", "ferry-api")
    with pytest.raises(kubernetes_validate.ValidationError, match="runAsUsr"):
        validate(api)

    values = multi_model_values()
    values["api"]["livenessProbe"] = {"httpGet": {"path": "/health", "port": "http"}}
    values["api"]["livenessProbe"]["periodSeconds"] = "ten"
    api = named(render(values), "Deployment", "ferry-api")
    with pytest.raises(kubernetes_validate.ValidationError, match="ten"):
        validate(api)

    [scaled, *_] = of_kind(render(multi_model_values()), "ScaledObject")
    wrong_type = copy.deepcopy(scaled)
    wrong_type["spec"]["minReplicaCount"] = "zero"
    with pytest.raises(ValidationError, match="minReplicaCount"):
        validate(wrong_type)
    unknown = copy.deepcopy(scaled)
    unknown["spec"]["minReplicas"] = 0
    with pytest.raises(ValueError, match="fields KEDA's CRD does not"):
        validate(unknown)


def test_a_missing_database_is_a_render_error_naming_the_value() -> None:
    with pytest.raises(helm.HelmError, match=r"secrets\.databaseUrl"):
        render({"postgresql": {"enabled": False}})


@pytest.mark.parametrize(
    ("models", "message"),
    [
        ([{"name": "Qwen_Small", "model": "Qwen/Qwen2.5-0.5B-Instruct"}], "/models/0/name"),
        ([{"name": "qwen"}], "missing property 'model'"),
        ([{"name": "a", "model": "x"}, {"name": "a", "model": "y"}], "the name a is used twice"),
    ],
)
def test_bad_models_are_refused_by_name(models: list[Obj], message: str) -> None:
    with pytest.raises(helm.HelmError, match=message):
        render({"models": models})
