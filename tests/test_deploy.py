"""``deploy/``: the compose file and the Kubernetes manifests stay valid and agree with the code.

- ``deploy/compose.yaml`` against the compose-spec JSON schema that check-jsonschema ships
  (``--builtin-schema vendor.compose-spec``, offline).
- ``deploy/k8s/*.yaml`` against the Kubernetes schemas that kubernetes-validate ships, in
  strict mode (an unknown field is an error), for the oldest and newest versions it bundles.
- KEDA's ``ScaledObject`` has no bundled schema: its fields are checked against what KEDA
  documents (keda.sh/docs/latest/scalers/redis-streams/ and the ScaledObject spec).
- Every ``aiotranscribe ...`` command line in them is parsed by the real CLI parser and put
  through the checks ``cli.main`` makes before it starts anything, so a renamed or removed
  flag fails here; the stream the ScaledObject watches is the one the workers' model reads.
"""

from __future__ import annotations

import argparse
import copy
import re
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import all_versions

from aiotranscribe import cli
from aiotranscribe.client import add_client_parser
from aiotranscribe.config import Settings, model_table
from aiotranscribe.remote import GROUP, queue_key
from aiotranscribe.remote_worker import add_worker_parser
from aiotranscribe.store import REDIS_SCHEMES, check_store

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
K8S = DEPLOY / "k8s"

# Kinds with no schema in kubernetes-validate: checked structurally below.
NOT_KUBERNETES = {"ScaledObject", "Kustomization"}

# KEDA's documented fields (ScaledObject spec; the redis-streams scaler's parameter list, as
# of KEDA 2.21). A trigger with consumerGroup and lagCount scales on the lag alone (KEDA's
# redisStreamsMetadata.Validate), so pending entries need a trigger of their own.
SCALED_OBJECT_SPEC = {
    "scaleTargetRef",
    "pollingInterval",
    "cooldownPeriod",
    "initialCooldownPeriod",
    "idleReplicaCount",
    "minReplicaCount",
    "maxReplicaCount",
    "fallback",
    "advanced",
    "triggers",
}
TRIGGER_FIELDS = {"type", "name", "metadata", "authenticationRef", "metricType", "useCachedMetrics"}
REDIS_STREAMS_METADATA = {
    "address",
    "host",
    "port",
    "usernameFromEnv",
    "passwordFromEnv",
    "stream",
    "consumerGroup",
    "pendingEntriesCount",
    "streamLength",
    "lagCount",
    "activationLagCount",
    "enableTLS",
    "unsafeSsl",
    "databaseIndex",
    "addressFromEnv",
    "hostFromEnv",
    "portFromEnv",
}


def load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def compose() -> dict[str, Any]:
    return load_all(COMPOSE)[0]


def manifests() -> dict[tuple[str, str], dict[str, Any]]:
    """Every Kubernetes object in deploy/k8s by (kind, name)."""
    found = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in load_all(path):
            key = (doc["kind"], doc.get("metadata", {}).get("name", path.name))
            assert key not in found, f"{key} twice"
            found[key] = doc
    return found


# -- the command lines ---------------------------------------------------------------------------


def cli_parser() -> argparse.ArgumentParser:
    """The parser ``cli.main`` builds: serve, transcribe, worker."""
    parser = argparse.ArgumentParser(prog="aiotranscribe")
    sub = parser.add_subparsers(dest="command", required=True)
    cli._serve_parser(sub)
    add_client_parser(sub)
    add_worker_parser(sub)
    return parser


def parse(argv: list[str]) -> argparse.Namespace:
    """``argv`` as ``aiotranscribe`` would take it, with the checks ``cli.main`` makes before it
    starts anything; a pytest failure (not SystemExit) when it would refuse it."""
    try:
        args = cli_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"aiotranscribe refuses {argv} (see its message above)")
    assert all(isinstance(a, str) for a in argv), f"non-string argument in {argv}"
    if args.command == "serve":
        settings = cli.settings_from_args(args)
        check_store(settings.store)
        assert not settings.no_workers or settings.store.startswith(REDIS_SCHEMES)
        model_table(settings)
    elif args.command == "worker":
        assert str(args.store or "").startswith(REDIS_SCHEMES), "worker needs --store redis://"
        check_store(args.store)
    return args


def model_name(args: argparse.Namespace) -> str:
    """The model's name, which names its stream q:slices:<name>."""
    models = tuple(m.strip() for m in str(args.model).split(",") if m.strip())
    return next(iter(model_table(Settings(models=models[:1]))))


def compose_commands() -> dict[str, list[str]]:
    """Each compose service that runs aiotranscribe: its argv after ``aiotranscribe``."""
    found = {}
    for name, service in compose()["services"].items():
        entrypoint = service.get("entrypoint") or []
        if entrypoint[:1] == ["aiotranscribe"]:
            found[name] = entrypoint[1:] + service["command"]
        else:
            # The image's own entrypoint is `aiotranscribe serve`: say it, or run no server.
            assert "aiotranscribe" not in str(service.get("image")) or entrypoint, name
    return found


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc["spec"]["template"]["spec"]
    return list(spec.get("initContainers", [])) + list(spec["containers"])


def k8s_commands() -> dict[str, list[str]]:
    """Each container that runs aiotranscribe: its argv after ``aiotranscribe``."""
    found = {}
    for (kind, name), doc in manifests().items():
        if kind not in ("Deployment", "StatefulSet"):
            continue
        for container in containers(doc):
            command = container.get("command") or []
            if command[:1] == ["aiotranscribe"]:
                found[f"{name}/{container['name']}"] = command[1:] + container.get("args", [])
    return found


def roles(commands: dict[str, list[str]]) -> dict[str, list[argparse.Namespace]]:
    by_role: dict[str, list[argparse.Namespace]] = {"serve": [], "worker": []}
    for argv in commands.values():
        args = parse(argv)
        by_role[args.command].append(args)
    return by_role


ALL_COMMANDS = {f"compose:{k}": v for k, v in compose_commands().items()} | {
    f"k8s:{k}": v for k, v in k8s_commands().items()
}


@pytest.mark.parametrize("where", sorted(ALL_COMMANDS))
def test_command_line_parses_with_the_real_cli(where):
    args = parse(ALL_COMMANDS[where])
    if args.command == "serve":
        assert args.no_workers, f"{where}: an API replica runs no model here"


def test_a_renamed_flag_would_fail():
    """The check above is not vacuous: a flag the CLI does not know is refused."""
    argv = [*compose_commands()["api-1"], "--spool-directory", "/shared"]
    with pytest.raises(pytest.fail.Exception):
        parse(argv)
    with pytest.raises(pytest.fail.Exception):
        parse(["worker", "--store", "redis://redis:6379/0", "--gpu", "0"])


@pytest.mark.parametrize("source", ["compose", "k8s"])
def test_replicas_and_workers_agree(source):
    """Both roles name one Redis and one model (the stream), and replicas spool where workers
    can read: the workers read each slice by the path the replica names."""
    commands = compose_commands() if source == "compose" else k8s_commands()
    by_role = roles(commands)
    expected = (2, 2) if source == "compose" else (1, 1)
    assert (len(by_role["serve"]), len(by_role["worker"])) == expected
    everyone = by_role["serve"] + by_role["worker"]
    assert len({a.store for a in everyone}) == 1
    assert urlsplit(everyone[0].store).hostname == "redis"
    assert len({model_name(a) for a in everyone}) == 1
    assert {a.device for a in by_role["worker"]} == {"cuda:0"}, "one visible GPU per worker"
    (shared,) = shared_mounts(source)
    if getattr(by_role["serve"][0], "shared_dir", None):
        # --shared-dir: job audio is there, named relative to it; uploads stay in each
        # replica's own spool (a shared spool would be swept by every replica's janitor).
        for args in everyone:
            assert args.shared_dir == shared
        for args in by_role["serve"]:
            assert not Path(args.spool_dir).is_relative_to(shared), args.spool_dir
    else:
        # Workers read the path the replica names: the spool must be on the shared volume.
        for args in by_role["serve"]:
            assert Path(args.spool_dir).is_relative_to(shared), args.spool_dir


def shared_mounts(source: str) -> set[str]:
    """Where the shared volume is mounted, checked to be one path in every replica and worker."""
    paths: dict[str, set[str]] = {}
    if source == "compose":
        for name, service in compose()["services"].items():
            if name in compose_commands():
                paths[name] = {
                    v.split(":")[1] for v in service["volumes"] if v.startswith("shared:")
                }
    else:
        for (kind, name), doc in manifests().items():
            if kind != "Deployment":
                continue
            spec = doc["spec"]["template"]["spec"]
            claims = {
                v["name"]
                for v in spec["volumes"]
                if v.get("persistentVolumeClaim", {}).get("claimName") == "aiotranscribe-shared"
            }
            for c in spec["containers"]:
                paths[name] = {m["mountPath"] for m in c["volumeMounts"] if m["name"] in claims}
    assert paths and all(len(p) == 1 for p in paths.values()), paths
    assert len(set.union(*paths.values())) == 1, f"the shared volume is mounted apart: {paths}"
    return set.union(*paths.values())


# -- compose -------------------------------------------------------------------------------------


def check_compose(path: Path) -> subprocess.CompletedProcess[str]:
    """check-jsonschema with the compose-spec schema it ships (no network)."""
    schema = ["--builtin-schema", "vendor.compose-spec"]
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", *schema, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_compose_matches_the_compose_spec_schema():
    done = check_compose(COMPOSE)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_compose_schema_check_catches_a_mistake(tmp_path):
    broken = tmp_path / "compose.yaml"
    broken.write_text(COMPOSE.read_text().replace("stop_grace_period:", "stop_grace_perod:"))
    done = check_compose(broken)
    assert done.returncode != 0 and "stop_grace_perod" in done.stdout


def seconds(value: str) -> float:
    """A compose duration such as ``40s`` or ``2m``."""
    match = re.fullmatch(r"(\d+)([sm])", value)
    assert match, value
    return int(match[1]) * (60 if match[2] == "m" else 1)


def test_compose_redis_gpus_health_and_grace():
    services = compose()["services"]
    redis_durable(services["redis"]["image"], services["redis"]["command"][1:])
    by_name = {name: parse(argv) for name, argv in compose_commands().items()}
    gpus = []
    for name, args in by_name.items():
        service = services[name]
        if args.command == "serve":
            check = service["healthcheck"]["test"]
            assert check[0] == "CMD" and check[-1] == f"http://127.0.0.1:{args.port}/health"
            # The drain (--shutdown-timeout-s), then aiohttp's handler grace, before SIGKILL.
            assert seconds(service["stop_grace_period"]) > (
                float(args.shutdown_timeout_s) + cli.HANDLER_GRACE_S
            )
        else:
            # The image's HEALTHCHECK curls :8000/health, which a worker does not serve.
            assert service["healthcheck"] == {"disable": True}
            assert seconds(service["stop_grace_period"]) >= 60
            (device,) = service["deploy"]["resources"]["reservations"]["devices"]
            assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
            gpus += device["device_ids"]
    assert len(gpus) == len(set(gpus)) == 2, "one GPU per worker"
    assert set(compose()["volumes"]) >= {"shared", "redis-data"}


def redis_durable(image: str, argv: list[str]) -> None:
    """AOF on and fsynced, nothing evicted, Redis 7+ (KEDA's lagCount reads XINFO lag)."""
    flags = dict(zip(argv[::2], argv[1::2], strict=True))
    assert flags["--appendonly"] == "yes"
    assert flags["--appendfsync"] in ("always", "everysec")
    assert flags["--maxmemory-policy"] == "noeviction"
    match = re.fullmatch(r"redis:(\d+)[.\d]*-(bookworm|trixie)", image)
    assert match and int(match[1]) >= 7, image


# -- Kubernetes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("version", sorted({all_versions()[0], all_versions()[-1]}))
def test_k8s_manifests_match_the_kubernetes_schemas(version):
    for (kind, name), doc in manifests().items():
        if kind in NOT_KUBERNETES:
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{kind}/{name} on Kubernetes {version}: {exc.message} at {list(exc.path)}")


def test_the_kubernetes_schema_check_catches_a_mistake():
    api = manifests()[("Deployment", "aiotranscribe-api")]
    broken = copy.deepcopy(api)
    container = broken["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, all_versions()[-1], strict=True)


def test_k8s_api_probes_grace_and_service():
    found = manifests()
    api = found[("Deployment", "aiotranscribe-api")]
    assert api["spec"]["replicas"] == 2
    spec = api["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    args = parse(k8s_commands()["aiotranscribe-api/api"])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == args.port
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert spec["terminationGracePeriodSeconds"] > (
        float(args.shutdown_timeout_s) + cli.HANDLER_GRACE_S
    )
    service = found[("Service", "aiotranscribe-api")]
    assert service["spec"]["selector"] == api["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"][0]["targetPort"] == "http"


def test_k8s_worker_gpu_and_grace():
    worker = manifests()[("Deployment", "aiotranscribe-worker")]
    spec = worker["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert str(container["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    # Above the longest batch (worker.yaml says why); a cut batch is only computed again.
    assert spec["terminationGracePeriodSeconds"] >= 60
    assert "readinessProbe" not in container and "livenessProbe" not in container


def test_k8s_redis_shared_volume_and_kustomization():
    found = manifests()
    redis = found[("StatefulSet", "redis")]
    (container,) = redis["spec"]["template"]["spec"]["containers"]
    argv = container["args"]
    redis_durable(container["image"], argv[: argv.index("--dir")])
    assert redis["spec"]["volumeClaimTemplates"][0]["spec"]["accessModes"] == ["ReadWriteOnce"]
    service = found[("Service", "redis")]
    store = urlsplit(parse(k8s_commands()["aiotranscribe-api/api"]).store)
    assert service["spec"]["ports"][0]["port"] == store.port
    pvc = found[("PersistentVolumeClaim", "aiotranscribe-shared")]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    kustomization = found[("Kustomization", "kustomization.yaml")]
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files
    assert ("Namespace", kustomization["namespace"]) in found


# -- KEDA ----------------------------------------------------------------------------------------


def scaled_object_problems(so: dict[str, Any]) -> list[str]:
    """What is wrong with the workers' ScaledObject, by KEDA's documentation and our code."""
    problems = []
    found = manifests()
    if (so["apiVersion"], so["kind"]) != ("keda.sh/v1alpha1", "ScaledObject"):
        problems.append("not a keda.sh/v1alpha1 ScaledObject")
    spec = so["spec"]
    problems += [f"unknown spec field {f}" for f in set(spec) - SCALED_OBJECT_SPEC]
    target = spec["scaleTargetRef"]
    if target.get("kind", "Deployment") != "Deployment" or ("Deployment", target["name"]) not in (
        found
    ):
        problems.append(f"scaleTargetRef {target} is not a Deployment here")
    worker = parse(k8s_commands()[f"{target['name']}/worker"])
    api = parse(k8s_commands()["aiotranscribe-api/api"])
    api_replicas = found[("Deployment", "aiotranscribe-api")]["spec"]["replicas"]
    # With no worker, no replica is ready, so no job could arrive to scale one up.
    if spec.get("minReplicaCount", 0) < 1:
        problems.append("minReplicaCount must be at least 1")
    # The stream holds at most replicas x --workers batches: more workers would idle.
    if spec["maxReplicaCount"] > api_replicas * int(api.workers):
        problems.append("maxReplicaCount above the batches the replicas send at once")
    store = urlsplit(worker.store)
    namespace = found[("Kustomization", "kustomization.yaml")]["namespace"]
    address = f"{store.hostname}.{namespace}.svc.cluster.local:{store.port}"
    measures = []
    for trigger in spec["triggers"]:
        problems += [f"unknown trigger field {f}" for f in set(trigger) - TRIGGER_FIELDS]
        meta = trigger["metadata"]
        if trigger["type"] != "redis-streams":
            problems.append(f"trigger type {trigger['type']}")
        problems += [f"unknown metadata {k}" for k in set(meta) - REDIS_STREAMS_METADATA]
        # The CRD types metadata as a map of strings.
        problems += [f"metadata {k} is not a string" for k, v in meta.items() if type(v) is not str]
        if meta.get("stream") != queue_key(model_name(worker)):
            problems.append(f"stream {meta.get('stream')} is not the workers' model's")
        if meta.get("consumerGroup") != GROUP:
            problems.append(f"consumerGroup {meta.get('consumerGroup')} is not {GROUP}")
        if meta.get("address") != address:
            problems.append(f"address {meta.get('address')} is not {address}")
        if meta.get("databaseIndex", "0") != store.path.strip("/"):
            problems.append("databaseIndex is not the store's")
        for key in ("lagCount", "activationLagCount", "pendingEntriesCount"):
            if key in meta and not str(meta[key]).isdigit():
                problems.append(f"{key} is not a whole number")
        if "lagCount" in meta:
            measures.append("lag")
            # Required before KEDA 2.17 (a trigger without it was refused).
            if "activationLagCount" not in meta:
                problems.append("lagCount without activationLagCount")
            if "pendingEntriesCount" in meta:
                problems.append("pendingEntriesCount is ignored beside lagCount")
        elif "pendingEntriesCount" in meta:
            measures.append("pending")
    if sorted(measures) != ["lag", "pending"]:
        problems.append(f"triggers measure {measures}, not lag and pending entries")
    return problems


def test_keda_scaled_object_follows_keda_and_the_code():
    so = manifests()[("ScaledObject", "aiotranscribe-worker")]
    assert scaled_object_problems(so) == []
    # KEDA hands `behavior` to the HPA as it is: check it against autoscaling/v2's schema.
    behavior = so["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    hpa = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "keda-hpa"},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "w"},
            "maxReplicas": so["spec"]["maxReplicaCount"],
            "behavior": behavior,
        },
    }
    kubernetes_validate.validate(hpa, all_versions()[-1], strict=True)


def test_the_keda_check_catches_mistakes():
    so = manifests()[("ScaledObject", "aiotranscribe-worker")]
    merged = copy.deepcopy(so)
    merged["spec"]["triggers"][0]["metadata"]["pendingEntriesCount"] = "8"
    del merged["spec"]["triggers"][1]
    wrong = copy.deepcopy(so)
    wrong["spec"]["triggers"][1]["metadata"]["stream"] = "q:slices:other"
    wrong["spec"]["triggers"][1]["metadata"]["lagcount"] = 8
    assert "pendingEntriesCount is ignored beside lagCount" in scaled_object_problems(merged)
    problems = scaled_object_problems(wrong)
    assert "unknown metadata lagcount" in problems
    assert "metadata lagcount is not a string" in problems
    assert any(p.startswith("stream q:slices:other") for p in problems)
