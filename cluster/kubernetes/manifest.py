"""Render a sweep as a KubeRay `ray.io/v1` RayJob, and check what we generate before it is sent.

The RayJob runs the sweep driver (its command line comes from the orchestrator) on a fresh Ray cluster:

- the head group hosts the Ray job driver and the Tune trial drivers: CPU and memory only, Ray told
  `num-gpus: "0"` so no GPU work is ever placed there;
- one worker group ("workers") carries the GPUs (`<gpu_resource_name>: gpus` limits, `num-gpus`);
- the sweep root is a PVC mounted at the same path in every Ray pod, or an object-store URI; KubeRay retries
  a failed job on a new cluster (`backoffLimit`), and the driver restores the sweep from `sweep_dir`;
- `authOptions: {mode: token}` (KubeRay v1.5.1+) makes KubeRay create a random token in a Secret and inject
  it into every Ray container, so no token is ever part of the manifest.

`check_manifest` is our own typed check of the fields we set (names, quantities, the head's zero GPUs);
`render_rayjob` runs it on every manifest, so a `*_pod_extra` that smuggles a GPU onto the head fails here.
The tests additionally validate every rendered manifest against KubeRay's official CRD schema.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Any

import yaml

from cluster.kubernetes.config import OWNED_POD_SPEC_KEYS, KubernetesClusterSpec
from cluster.kubernetes.names import (
    dns1035_label_error, dns1123_label_error, dns1123_subdomain_error, env_name_error, label_value_error,
    parse_quantity, qualified_name_error,
)  # fmt: skip

__all__ = [
    "API_VERSION", "GROUP", "HEAD_CONTAINER", "KIND", "MAX_RAYJOB_NAME", "ManifestError", "PLURAL", "VERSION",
    "WORKER_CONTAINER", "WORKER_GROUP", "check_manifest", "rayjob_name", "render_rayjob",
    "to_yaml",
]  # fmt: skip

GROUP, VERSION, KIND, PLURAL = "ray.io", "v1", "RayJob", "rayjobs"
API_VERSION = f"{GROUP}/{VERSION}"
# KubeRay names the cluster "<rayjob>-<5 chars>" and its services "<cluster>-serve-svc" (63 at most), so
# a RayJob name is a DNS-1035 label of at most 53 - 6 = 47 characters (utils.MaxRayJobNameLength).
MAX_RAYJOB_NAME = 47
HEAD_CONTAINER, WORKER_CONTAINER, WORKER_GROUP = "ray-head", "ray-worker", "workers"
APP_NAME = "ckd-orchestrate"
SWEEP_ID_ANNOTATION = "ckd-orchestrate/sweep-id"
# Environment variables forwarded from the job's runtime_env into the Ray containers, so every Ray process
# (not only those started under the job's runtime env) reaches the same MLflow server.
_PASSTHROUGH_ENV = ("MLFLOW_TRACKING_URI",)


class ManifestError(ValueError):
    """A generated manifest breaks a rule we check; `problems` lists (manifest path, message)."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("invalid RayJob manifest:\n" + "\n".join(f"  {p}: {m}" for p, m in problems))


# ------------------------------------------------------------------------------------------- naming


def rayjob_name(sweep_id: str) -> str:
    """The RayJob name for a sweep: a DNS-1035 label of at most 47 characters, the same for the same id.

    The id is lower-cased with every other run of characters turned into '-'; when that changed anything
    or had to be shortened, 8 hex digits of the id's SHA-256 keep distinct ids apart. A name must start
    with a letter, so ids starting with a digit get the prefix "ckd-".
    """
    if not sweep_id:
        raise ValueError("sweep_id must not be empty")
    base = re.sub(r"[^a-z0-9]+", "-", sweep_id.lower()).strip("-")
    if not base[:1].isalpha():
        base = f"ckd-{base}".rstrip("-")
    if base == sweep_id and len(base) <= MAX_RAYJOB_NAME:
        return base
    digest = hashlib.sha256(sweep_id.encode()).hexdigest()[:8]
    return f"{base[:MAX_RAYJOB_NAME - 9].rstrip('-')}-{digest}"


# ------------------------------------------------------------------------------------------- render


def render_rayjob(spec: KubernetesClusterSpec, *, sweep_id: str, sweep_dir: str, entrypoint: str,
                  runtime_env: Mapping[str, Any] | None = None,
                  labels: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The RayJob manifest (a plain dict, ready for the API or `to_yaml`) that runs one sweep.

    Args:
        spec: the validated `cluster:` block.
        sweep_id: the sweep's id; the RayJob name is derived from it (`rayjob_name`), the id itself is
            kept in the annotation ckd-orchestrate/sweep-id and in the Ray job's metadata.
        sweep_dir: the sweep directory as the pods see it, under `spec.storage.sweep_root`.
        entrypoint: the job's command (the sweep driver's command line, `shlex.join(launch.argv)`),
            unless `spec.entrypoint` replaces it.
        runtime_env: the Ray runtime environment of the job (runtimeEnvYAML); a MLFLOW_TRACKING_URI in its
            env_vars is also set on the Ray containers. Local working_dir/py_modules paths are refused:
            the image must contain the project.
        labels: extra labels for the RayJob and its pods.

    Raises:
        ValueError: a bad argument (sweep_dir outside the storage, a secret in runtime_env, ...).
        ManifestError: the rendered manifest breaks one of our rules (see `check_manifest`).
    """
    name = rayjob_name(sweep_id)
    problems: list[tuple[str, str]] = []
    if not spec.storage.contains(sweep_dir):
        problems.append(("sweep_dir", f"{sweep_dir!r} is not under the sweep root {spec.storage.sweep_root!r} "
                                      "(storage), so the pods and KubeRay's retries could not reach it"))
    runtime_env = dict(runtime_env or {})
    problems += _runtime_env_problems(runtime_env)
    all_labels = {**spec.labels, **dict(labels or {})}
    problems += [(f"labels.{k}", m) for k, v in all_labels.items()
                 if (m := qualified_name_error(k) or label_value_error(v))]
    env, env_problems = _container_env(spec, runtime_env)
    problems += env_problems
    if problems:
        raise ValueError("cannot render the RayJob:\n" + "\n".join(f"  {k}: {m}" for k, m in problems))

    pod_labels = {
        **all_labels,
        "app.kubernetes.io/name": APP_NAME,
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/component": "sweep",
        "app.kubernetes.io/managed-by": APP_NAME,
    }
    head_resources = {"cpu": spec.head.cpu, "memory": spec.head.memory}
    head_pod = _pod_template(spec, "head", HEAD_CONTAINER, env, pod_labels,
                             {"requests": dict(head_resources), "limits": dict(head_resources)})
    cluster: dict[str, Any] = {"rayVersion": spec.ray_version}
    if spec.auth == "token":
        cluster["authOptions"] = {"mode": "token"}
        if spec.auth_token_secret:
            cluster["authOptions"]["secretName"] = spec.auth_token_secret
    if spec.worker.autoscaling:
        cluster["enableInTreeAutoscaling"] = True
    cluster["headGroupSpec"] = {
        "rayStartParams": {"num-cpus": str(spec.head.ray_num_cpus), "num-gpus": "0"},
        "template": head_pod,
    }
    lo, hi = spec.worker.replica_bounds
    if hi > 0:
        worker_resources = {"cpu": spec.worker.cpu, "memory": spec.worker.memory}
        limits = dict(worker_resources)
        if spec.worker.gpus:
            limits[spec.worker.gpu_resource_name] = str(spec.worker.gpus)
        cluster["workerGroupSpecs"] = [{
            "groupName": WORKER_GROUP,
            "replicas": spec.worker.replicas,
            "minReplicas": lo,
            "maxReplicas": hi,
            "rayStartParams": {"num-cpus": str(spec.worker.ray_num_cpus), "num-gpus": str(spec.worker.gpus)},
            "template": _pod_template(spec, "worker", WORKER_CONTAINER, env, pod_labels,
                                      {"requests": dict(worker_resources), "limits": limits}),
        }]

    job: dict[str, Any] = {
        "entrypoint": spec.entrypoint or entrypoint,
        "metadata": {"sweep_id": sweep_id},
        "shutdownAfterJobFinishes": spec.shutdown_after_job_finishes,
        "backoffLimit": spec.backoff_limit,
        "submissionMode": spec.submission_mode,
    }
    if spec.ttl_seconds is not None:
        job["ttlSecondsAfterFinished"] = spec.ttl_seconds
    if spec.active_deadline_seconds is not None:
        job["activeDeadlineSeconds"] = spec.active_deadline_seconds
    if spec.submitter_backoff_limit is not None:
        job["submitterConfig"] = {"backoffLimit": spec.submitter_backoff_limit}
    if spec.entrypoint_num_cpus is not None:
        job["entrypointNumCpus"] = spec.entrypoint_num_cpus
    if runtime_env:
        job["runtimeEnvYAML"] = yaml.safe_dump(runtime_env, sort_keys=True, default_flow_style=False)
    job["rayClusterSpec"] = cluster

    manifest = {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {
            "name": name,
            "namespace": spec.namespace,
            "labels": dict(pod_labels),
            "annotations": {SWEEP_ID_ANNOTATION: sweep_id},
        },
        "spec": job,
    }
    check_manifest(manifest, gpu_resource_name=spec.worker.gpu_resource_name)
    return manifest


def _pod_template(spec: KubernetesClusterSpec, group: str, container_name: str, env: list[dict[str, Any]],
                  labels: Mapping[str, str], resources: dict[str, Any]) -> dict[str, Any]:
    container: dict[str, Any] = {"name": container_name, "image": spec.image}
    if spec.image_pull_policy:
        container["imagePullPolicy"] = spec.image_pull_policy
    container["resources"] = resources
    if env:
        container["env"] = [dict(e) for e in env]
    pod: dict[str, Any] = {"containers": [container]}
    if spec.storage.pvc is not None:
        container["volumeMounts"] = [{"name": "sweeps", "mountPath": spec.storage.mount_dir}]
        pod["volumes"] = [{"name": "sweeps", "persistentVolumeClaim": {"claimName": spec.storage.pvc}}]
    if spec.service_account:
        pod["serviceAccountName"] = spec.service_account
    if selector := spec.node_selector_for(group):  # type: ignore[arg-type]
        pod["nodeSelector"] = selector
    if tolerations := spec.tolerations_for(group):  # type: ignore[arg-type]
        pod["tolerations"] = tolerations
    extra = spec.head_pod_extra if group == "head" else spec.worker_pod_extra
    clash = sorted(set(extra) & (set(pod) | set(OWNED_POD_SPEC_KEYS)))
    if clash:  # the config model refuses these already; kept so a hand-built spec cannot slip through
        raise ValueError(f"{group}_pod_extra.{clash[0]}: set by ckd-orchestrate and cannot be overridden")
    pod.update(_deep_copy(extra))
    return {"metadata": {"labels": dict(labels)}, "spec": pod}


def _container_env(spec: KubernetesClusterSpec,
                   runtime_env: Mapping[str, Any]) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    env: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in spec.env.items()]
    env += [{"name": k, "valueFrom": {"secretKeyRef": {"name": ref.secret, "key": ref.key}}}
            for k, ref in spec.secret_env.items()]
    problems = []
    env_vars = runtime_env.get("env_vars") or {}
    for key in _PASSTHROUGH_ENV:
        if key not in env_vars:
            continue
        if key in spec.secret_env:
            problems.append((f"runtime_env.env_vars.{key}", "also set in cluster.secret_env; keep one"))
        elif key in spec.env and spec.env[key] != env_vars[key]:
            problems.append((f"runtime_env.env_vars.{key}", f"{env_vars[key]!r} differs from cluster.env.{key} "
                                                            f"({spec.env[key]!r}); keep one"))
        elif key not in spec.env:
            env.append({"name": key, "value": str(env_vars[key])})
    return env, problems


def _runtime_env_problems(runtime_env: Mapping[str, Any]) -> list[tuple[str, str]]:
    problems = []
    for key in ("working_dir", "py_modules"):
        values = runtime_env.get(key)
        for value in values if isinstance(values, list) else ([values] if values is not None else []):
            if not (isinstance(value, str) and "://" in value):
                problems.append((f"runtime_env.{key}", f"{value!r}: on Kubernetes only remote URIs work (KubeRay "
                                                       "submits from inside the cluster); build the project into "
                                                       "the image"))
    env_vars = runtime_env.get("env_vars") or {}
    if not isinstance(env_vars, Mapping):
        problems.append(("runtime_env.env_vars", f"expected a mapping of names to strings; got {env_vars!r}"))
        env_vars = {}
    for key, value in env_vars.items():
        if not isinstance(key, str) or (msg := env_name_error(key)):
            problems.append((f"runtime_env.env_vars.{key}", msg or "expected a string name"))
        elif key == "RAY_AUTH_TOKEN" or not isinstance(value, str):
            problems.append((f"runtime_env.env_vars.{key}", "a Ray token never goes into the manifest" if key ==
                             "RAY_AUTH_TOKEN" else f"expected a string value; got {value!r}"))
    try:
        yaml.safe_dump(dict(runtime_env))
    except yaml.YAMLError as err:
        problems.append(("runtime_env", f"not representable as YAML: {err}"))
    return problems


def _deep_copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


# -------------------------------------------------------------------------------------------- check


def check_manifest(manifest: Mapping[str, Any], *, gpu_resource_name: str = "nvidia.com/gpu") -> None:
    """Check the fields ckd-orchestrate sets in a RayJob: names, labels, quantities, GPU placement, the
    Ray start parameters and the job's limits. Fields we never set are left to Kubernetes.

    Raises:
        ManifestError: every broken rule, with its path in the manifest.
    """
    p: list[tuple[str, str]] = []
    _expect(p, manifest.get("apiVersion") == API_VERSION, "apiVersion", f"must be {API_VERSION}")
    _expect(p, manifest.get("kind") == KIND, "kind", f"must be {KIND}")
    meta = _mapping(p, manifest, "metadata", "metadata")
    name = meta.get("name")
    if not isinstance(name, str) or (msg := dns1035_label_error(name)):
        p.append(("metadata.name", msg if isinstance(name, str) else "missing"))
    elif len(name) > MAX_RAYJOB_NAME:
        p.append(("metadata.name", f"{name!r} is longer than {MAX_RAYJOB_NAME} characters (KubeRay's RayJob limit)"))
    namespace = meta.get("namespace")
    if not isinstance(namespace, str) or (msg := dns1123_label_error(namespace)):
        p.append(("metadata.namespace", msg if isinstance(namespace, str) else "missing"))
    _check_label_map(p, meta.get("labels") or {}, "metadata.labels")

    spec = _mapping(p, manifest, "spec", "spec")
    _expect(p, isinstance(spec.get("entrypoint"), str) and spec["entrypoint"].strip() != "", "spec.entrypoint",
            "must be a non-empty command")
    for key, low in (("backoffLimit", 0), ("ttlSecondsAfterFinished", 0), ("activeDeadlineSeconds", 1)):
        if key in spec:
            value = spec[key]
            _expect(p, _is_int(value) and low <= value <= 2**31 - 1, f"spec.{key}",
                    f"must be an integer in [{low}, 2^31-1]; got {value!r}")
    if not spec.get("shutdownAfterJobFinishes") and spec.get("ttlSecondsAfterFinished"):
        p.append(("spec.ttlSecondsAfterFinished", "needs shutdownAfterJobFinishes: true"))

    cluster = _mapping(p, spec, "rayClusterSpec", "spec.rayClusterSpec")
    auth = cluster.get("authOptions")
    if isinstance(auth, Mapping) and auth.get("mode") == "token":
        version = str(cluster.get("rayVersion", ""))
        _expect(p, bool(re.fullmatch(r"\d+\.\d+\.\d+.*", version)) and
                tuple(int(x) for x in re.findall(r"\d+", version)[:3]) >= (2, 52, 0),
                "spec.rayClusterSpec.rayVersion", f"token authentication needs rayVersion >= 2.52.0; got {version!r}")
        if "secretName" in auth:
            msg = dns1123_subdomain_error(str(auth["secretName"]))
            _expect(p, msg is None, "spec.rayClusterSpec.authOptions.secretName", msg or "")
    head = _mapping(p, cluster, "headGroupSpec", "spec.rayClusterSpec.headGroupSpec")
    head_path = "spec.rayClusterSpec.headGroupSpec"
    params = _check_start_params(p, head.get("rayStartParams"), f"{head_path}.rayStartParams")
    _expect(p, params.get("num-gpus") == "0", f"{head_path}.rayStartParams.num-gpus",
            "the head hosts the trial drivers and must advertise no GPU to Ray (\"0\")")
    head_pod = _check_pod(p, head.get("template"), f"{head_path}.template", gpu_resource_name)
    for where, resources in head_pod:
        for resource in resources:
            gpu = resource == gpu_resource_name or str(resource).endswith("/gpu")
            value = resources[resource]
            _expect(p, not gpu or (_safe_quantity(value) and _quantity_value(value) == 0), f"{where}.{resource}",
                    "the head pod must not request GPUs; give them to the worker group")

    groups = cluster.get("workerGroupSpecs", [])
    if not isinstance(groups, list):
        p.append(("spec.rayClusterSpec.workerGroupSpecs", "must be a list"))
        groups = []
    seen = set()
    for i, group in enumerate(groups):
        path = f"spec.rayClusterSpec.workerGroupSpecs[{i}]"
        if not isinstance(group, Mapping):
            p.append((path, "must be a mapping"))
            continue
        gname = group.get("groupName")
        _expect(p, isinstance(gname, str) and dns1123_label_error(gname) is None and gname not in seen,
                f"{path}.groupName", f"must be a unique DNS-1123 label; got {gname!r}")
        seen.add(gname)
        counts = [group.get(k) for k in ("minReplicas", "replicas", "maxReplicas")]
        _expect(p, all(_is_int(c) and 0 <= c <= 2**31 - 1 for c in counts) and counts == sorted(counts),
                f"{path}.replicas", f"need 0 <= minReplicas <= replicas <= maxReplicas; got {counts}")
        wparams = _check_start_params(p, group.get("rayStartParams"), f"{path}.rayStartParams")
        pod = _check_pod(p, group.get("template"), f"{path}.template", gpu_resource_name)
        gpus = sum(_quantity_value(res[gpu_resource_name]) for where, res in pod
                   if where.endswith(".limits") and _safe_quantity(res.get(gpu_resource_name)))
        if "num-gpus" in wparams:
            _expect(p, str(wparams["num-gpus"]) == str(int(gpus)), f"{path}.rayStartParams.num-gpus",
                    f"{wparams['num-gpus']!r} differs from the container's {gpu_resource_name} limit ({int(gpus)})")
    if p:
        raise ManifestError(p)


def _check_start_params(p: list[tuple[str, str]], params: Any, path: str) -> Mapping[str, Any]:
    if not isinstance(params, Mapping):
        p.append((path, "must be a mapping of strings"))
        return {}
    for key, value in params.items():
        _expect(p, isinstance(value, str), f"{path}.{key}", f"Ray start parameters are strings; got {value!r}")
    _expect(p, "labels" not in params, f"{path}.labels", "KubeRay refuses rayStartParams['labels']")
    if "num-cpus" in params and isinstance(params["num-cpus"], str):
        _expect(p, params["num-cpus"].isdigit() and int(params["num-cpus"]) >= 1, f"{path}.num-cpus",
                f"must be a whole number of CPUs >= 1; got {params['num-cpus']!r}")
    return params


def _check_pod(p: list[tuple[str, str]], template: Any, path: str,
               gpu_resource_name: str) -> list[tuple[str, Mapping[str, Any]]]:
    """Check a pod template's containers; return every (path, resources map) found (pod-level too)."""
    found: list[tuple[str, Mapping[str, Any]]] = []
    if not isinstance(template, Mapping) or not isinstance(template.get("spec"), Mapping):
        p.append((f"{path}.spec", "missing"))
        return found
    _check_label_map(p, (template.get("metadata") or {}).get("labels") or {}, f"{path}.metadata.labels")
    pod = template["spec"]
    containers = pod.get("containers")
    if not isinstance(containers, list) or not containers:
        p.append((f"{path}.spec.containers", "needs the Ray container"))
        containers = []
    for field in ("containers", "initContainers"):
        names = set()
        for i, c in enumerate(pod.get(field) or []):
            cpath = f"{path}.spec.{field}[{i}]"
            cname = c.get("name") if isinstance(c, Mapping) else None
            _expect(p, isinstance(cname, str) and dns1123_label_error(cname) is None and cname not in names,
                    f"{cpath}.name", f"must be a unique DNS-1123 label; got {cname!r}")
            names.add(cname)
            if field == "containers" and i == 0:
                _expect(p, isinstance(c.get("image"), str) and bool(c.get("image")), f"{cpath}.image", "missing")
            for kind, res in ((c.get("resources") or {}) if isinstance(c, Mapping) else {}).items():
                if kind in ("requests", "limits") and isinstance(res, Mapping):
                    found.append((f"{cpath}.resources.{kind}", res))
            for j, e in enumerate((c.get("env") or []) if isinstance(c, Mapping) else []):
                ename = e.get("name") if isinstance(e, Mapping) else None
                msg = env_name_error(ename) if isinstance(ename, str) else "missing"
                _expect(p, msg is None, f"{cpath}.env[{j}].name", msg or "")
    for kind, res in (pod.get("resources") or {}).items():
        if kind in ("requests", "limits") and isinstance(res, Mapping):
            found.append((f"{path}.spec.resources.{kind}", res))
    for where, res in found:
        for resource, value in res.items():
            msg = qualified_name_error(resource) if isinstance(resource, str) else "must be a string"
            _expect(p, msg is None, f"{where}.{resource}", msg or "")
            try:
                _expect(p, _quantity_value(value) >= 0, f"{where}.{resource}", "must not be negative")
            except ValueError as err:
                p.append((f"{where}.{resource}", str(err)))
        if where.endswith(".limits") and gpu_resource_name in res:
            value = _quantity_value(res[gpu_resource_name]) if _safe_quantity(res[gpu_resource_name]) else None
            _expect(p, value is None or value == int(value), f"{where}.{gpu_resource_name}",
                    "GPUs come in whole devices")
    return found


def _check_label_map(p: list[tuple[str, str]], labels: Any, path: str) -> None:
    if not isinstance(labels, Mapping):
        p.append((path, "must be a mapping"))
        return
    for key, value in labels.items():
        msg = qualified_name_error(key) if isinstance(key, str) else "keys must be strings"
        msg = msg or (label_value_error(value) if isinstance(value, str) else "values must be strings")
        _expect(p, msg is None, f"{path}.{key}", msg or "")


def _quantity_value(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError(f"expected a quantity; got {value!r}")
    if isinstance(value, int):
        return value
    return parse_quantity(value).value


def _safe_quantity(value: Any) -> bool:
    try:
        _quantity_value(value)
        return True
    except ValueError:
        return False


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _mapping(p: list[tuple[str, str]], parent: Mapping[str, Any], key: str, path: str) -> Mapping[str, Any]:
    value = parent.get(key) if isinstance(parent, Mapping) else None
    if not isinstance(value, Mapping):
        p.append((path, "missing or not a mapping"))
        return {}
    return value


def _expect(p: list[tuple[str, str]], ok: bool, path: str, message: str) -> None:
    if not ok:
        p.append((path, message))


# --------------------------------------------------------------------------------------------- yaml


class _Dumper(yaml.SafeDumper):
    """Block style; multi-line strings (runtimeEnvYAML) as literal blocks, so `plan` output reads well."""


def _str_representer(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str_representer)


def to_yaml(manifest: Mapping[str, Any]) -> str:
    """The manifest as YAML, keys in the order we generate them (what `plan` prints, `kubectl apply`
    takes). Strings that look like numbers or booleans stay quoted."""
    return yaml.dump(_deep_copy(manifest), Dumper=_Dumper, sort_keys=False, default_flow_style=False,
                     allow_unicode=True, width=120)
