"""Kubernetes backend: the `cluster:` model, the RayJob we render, and submit/status/logs/cancel.

The oracle for what a real cluster would accept is KubeRay's own CRD (`../shared/kuberay/`, ray.io/v1
RayJob and RayCluster, v1.7): every manifest rendered here is validated against its openAPIV3Schema with
`jsonschema`. The CRD is a Kubernetes *structural* schema, so it is read the way the API server reads it
(`_k8s_to_jsonschema`):

- `x-kubernetes-int-or-string: true` -> `anyOf: [{type: integer}, {type: string, pattern: <the node's
  pattern>}]`: an integer, or a string that matches the pattern (the API server applies `pattern` to the
  string form only). Booleans and floats are refused.
- Objects with `properties` and neither `additionalProperties` nor `x-kubernetes-preserve-unknown-fields`
  get `additionalProperties: false`: `kubectl` (and our client, `fieldValidation=Strict`) ask the server
  to reject unknown fields instead of silently pruning them, so a misspelt field must fail here too.
- `format: int32/int64` -> the matching minimum/maximum; `nullable: true` -> null allowed.
- `x-kubernetes-list-type: map` with `x-kubernetes-list-map-keys` -> items must be unique on those keys
  (duplicate container or env names are refused by the server); `list-type: set` -> `uniqueItems`.
- `x-kubernetes-validations` (CEL rules, on 5 fields of the CRD, none of which we set) and `default` are not
  evaluated.
- The CRD leaves `metadata` as a bare object (the API server validates ObjectMeta itself); it is replaced
  by the ObjectMeta rules: name a DNS-1035 label of at most 47 characters (KubeRay's RayJob limit; 53 for
  a RayCluster), namespace a DNS-1123 label, label keys qualified names, label values valid. Pod template
  labels get the same label rules.

On top of the schema, `_kuberay_rules` re-states the checks KubeRay's controller runs on a RayJob
(ray-operator/controllers/ray/utils/validation.go), which the schema cannot express.

No Kubernetes API server can be installed on this machine from the package registries (PyPI, Debian,
npm carry kubectl and etcd, but no kube-apiserver, envtest assets, kwok or k3s), so `submit`, `status`,
`logs` and `cancel` run the real `kubernetes` client (ApiClient, REST layer, serialisation) against a small
HTTP server in a thread that answers like the API server for the few routes used, and itself rejects a
RayJob that fails the CRD schema with a 422 Status, as the real server would. The kubectl transport runs
against a fake `kubectl` script.
"""

from __future__ import annotations

import copy
import functools
import http.server
import json
import os
import re
import shlex
import sys
import threading
import urllib.parse
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.kubernetes import (
    ClusterSpecError, KubernetesClusterSpec, KubernetesUnavailableError, ManifestError, RayJobClient,
    RayJobNotFoundError, check_manifest, parse_quantity, rayjob_name, render_rayjob, to_yaml,
)  # fmt: skip
from cluster.kubernetes.client import KubernetesApiError, RayJobExistsError, job_state
from cluster.kubernetes.config import POD_SPEC_FIELDS

jsonschema = pytest.importorskip("jsonschema")

KUBERAY_DIR = Path(os.environ.get("CKD_KUBERAY_DIR", Path(__file__).resolve().parents[3] / "shared" / "kuberay"))
pytestmark = pytest.mark.skipif(not (KUBERAY_DIR / "ray.io_rayjobs.yaml").is_file(),
                                reason=f"KubeRay CRDs not found at {KUBERAY_DIR}")

# ------------------------------------------------------------------------------------------ the oracle

_DNS1123 = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_QUALIFIED = rf"^({_DNS1123}(\.{_DNS1123})*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{{0,61}}[A-Za-z0-9])?$"
_LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$"
_LABELS = {"type": "object", "propertyNames": {"pattern": _QUALIFIED},
           "additionalProperties": {"type": "string", "pattern": _LABEL_VALUE}}


def _object_meta(max_name: int) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["name"],
        "additionalProperties": False,
        "properties": {
            "name": {"type": "string", "maxLength": max_name, "pattern": r"^[a-z]([-a-z0-9]*[a-z0-9])?$"},
            "namespace": {"type": "string", "maxLength": 63, "pattern": f"^{_DNS1123}$"},
            "labels": _LABELS,
            "annotations": {"type": "object", "propertyNames": {"pattern": _QUALIFIED},
                            "additionalProperties": {"type": "string"}},
        },
    }


def _k8s_to_jsonschema(node: dict[str, Any]) -> dict[str, Any]:
    """A structural-schema node as JSON Schema, read the way the API server reads it (module docstring)."""
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {name: _k8s_to_jsonschema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = _k8s_to_jsonschema(value)
        elif key in ("anyOf", "allOf", "oneOf"):
            out[key] = [_k8s_to_jsonschema(sub) for sub in value]
        elif key in ("default", "description", "x-kubernetes-validations"):
            continue
        else:
            out[key] = value
    if node.get("x-kubernetes-int-or-string"):
        string = {"type": "string"}
        if "pattern" in out:
            string["pattern"] = out.pop("pattern")
        out.pop("anyOf", None)
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, string]
    if out.get("type") == "object" and "properties" in out and "additionalProperties" not in out \
            and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    if out.get("type") == "integer" and node.get("format") in ("int32", "int64"):
        bits = 32 if node["format"] == "int32" else 64
        out.setdefault("minimum", -(2 ** (bits - 1)))
        out.setdefault("maximum", 2 ** (bits - 1) - 1)
    if node.get("x-kubernetes-list-type") == "set":
        out["uniqueItems"] = True
    if node.get("nullable"):
        out = {"anyOf": [{"type": "null"}, out]}
    return out


def _list_map_keys(validator: Any, keys: list[str], instance: Any, schema: dict[str, Any]) -> Any:
    if not validator.is_type(instance, "array"):
        return
    seen: dict[tuple, int] = {}
    for i, item in enumerate(instance):
        if isinstance(item, dict):
            key = tuple(json.dumps(item.get(k), sort_keys=True) for k in keys)
            if key in seen:
                yield jsonschema.ValidationError(f"items {seen[key]} and {i} have the same {keys}: duplicate map key")
            seen[key] = i


def _set_pod_template_labels(schema: dict[str, Any], cluster_spec_path: list[str]) -> None:
    node = schema
    for part in cluster_spec_path:
        node = node["properties"][part]
    groups = [node["properties"]["headGroupSpec"], node["properties"]["workerGroupSpecs"]["items"]]
    for group in groups:
        group["properties"]["template"]["properties"]["metadata"]["properties"]["labels"] = _LABELS


@functools.cache
def _crd_schema(file: str) -> dict[str, Any]:
    """The v1 openAPIV3Schema of a CRD file, unmodified."""
    with open(KUBERAY_DIR / file) as f:
        crd = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


@functools.cache
def _crd_validator(file: str, max_name: int, cluster_spec_path: tuple[str, ...]) -> Any:
    # (no check_schema against the meta-schema: 4+ s for these 1.4 MB schemas; a malformed transform
    # shows up as failures of the good configs)
    schema = _k8s_to_jsonschema(_crd_schema(file))
    schema["properties"]["metadata"] = _object_meta(max_name)
    schema["required"] = ["apiVersion", "kind", "metadata", "spec"]
    _set_pod_template_labels(schema, list(cluster_spec_path))
    cls = jsonschema.validators.extend(jsonschema.Draft202012Validator, {"x-kubernetes-list-map-keys": _list_map_keys})
    return cls(schema)


def _messages(validator: Any, instance: Any) -> list[str]:
    """Each error as "path: message", with the branches' reasons for anyOf (int-or-string) failures."""
    out = []
    for e in validator.iter_errors(instance):
        why = f" ({'; '.join(c.message for c in e.context)})" if e.context else ""
        out.append(f"{'.'.join(map(str, e.absolute_path))}: {e.message}{why}")
    return sorted(out)


def rayjob_schema_errors(manifest: dict[str, Any]) -> list[str]:
    """Every error of `manifest` against the RayJob CRD, as "path: message"."""
    return _messages(_crd_validator("ray.io_rayjobs.yaml", 47, ("spec", "rayClusterSpec")), manifest)


def raycluster_schema_errors(manifest: dict[str, Any]) -> list[str]:
    """The RayJob's cluster as the RayCluster KubeRay will create from it, against the RayCluster CRD."""
    cluster = {"apiVersion": "ray.io/v1", "kind": "RayCluster",
               "metadata": {"name": manifest["metadata"]["name"] + "-x7k2p",
                            "namespace": manifest["metadata"]["namespace"]},
               "spec": manifest["spec"]["rayClusterSpec"]}
    return _messages(_crd_validator("ray.io_rayclusters.yaml", 53, ("spec",)), cluster)


def _kuberay_rules(manifest: dict[str, Any]) -> list[str]:
    """The RayJob checks of KubeRay's controller (utils/validation.go), re-stated independently."""
    problems = []
    spec = manifest["spec"]
    cluster = spec["rayClusterSpec"]
    groups = [("head", cluster["headGroupSpec"])] + [(g["groupName"], g) for g in cluster.get("workerGroupSpecs", [])]
    for name, group in groups:
        if not group["template"]["spec"].get("containers"):
            problems.append(f"{name}: no container")
        params = group.get("rayStartParams", {})
        if any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")) and group.get("resources"):
            problems.append(f"{name}: resources in both rayStartParams and resources")
        if "labels" in params:
            problems.append(f"{name}: rayStartParams['labels']")
    if (cluster.get("authOptions") or {}).get("mode") == "token":
        version = tuple(int(x) for x in cluster.get("rayVersion", "0.0.0").split(".")[:3])
        if version < (2, 52, 0):
            problems.append("token auth needs rayVersion >= 2.52.0")
    if spec.get("suspend") and not spec.get("shutdownAfterJobFinishes"):
        problems.append("suspend without shutdownAfterJobFinishes")
    if spec.get("ttlSecondsAfterFinished", 0) < 0:
        problems.append("negative TTL")
    if not spec.get("shutdownAfterJobFinishes") and spec.get("ttlSecondsAfterFinished", 0) > 0:
        problems.append("TTL without shutdownAfterJobFinishes")
    if spec.get("activeDeadlineSeconds") is not None and spec["activeDeadlineSeconds"] <= 0:
        problems.append("activeDeadlineSeconds <= 0")
    if spec.get("backoffLimit") is not None and spec["backoffLimit"] < 0:
        problems.append("backoffLimit < 0")
    if spec.get("submissionMode") == "InteractiveMode" and spec.get("backoffLimit", 0) > 0:
        problems.append("backoffLimit with InteractiveMode")
    if spec.get("submissionMode") == "SidecarMode":
        if "submitterPodTemplate" in spec or "submitterConfig" in spec:
            problems.append("SidecarMode with a submitter template/config")
        if cluster["headGroupSpec"]["template"]["spec"].get("restartPolicy", "Never") != "Never":
            problems.append("SidecarMode needs head restartPolicy Never")
    if "runtimeEnvYAML" in spec and not isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict):
        problems.append("runtimeEnvYAML is not a YAML mapping")
    return problems


def head_gpu_requests(manifest: dict[str, Any]) -> list[str]:
    """Every place the head pod asks for a GPU (an independent walk, not our check_manifest)."""
    pod = manifest["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    found = []
    resources = [pod.get("resources") or {}] + [c.get("resources") or {} for c in
                                                 pod.get("containers", []) + pod.get("initContainers", [])]
    for res in resources:
        for kind in ("requests", "limits"):
            found += [k for k, v in (res.get(kind) or {}).items() if "gpu" in k and str(v) not in ("0", "")]
    return found


def assert_valid(manifest: dict[str, Any]) -> None:
    assert rayjob_schema_errors(manifest) == []
    assert raycluster_schema_errors(manifest) == []
    assert _kuberay_rules(manifest) == []
    assert head_gpu_requests(manifest) == []
    assert manifest["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"


# --------------------------------------------------------------------------------------------- configs

BASE: dict[str, Any] = {
    "backend": "kubernetes",
    "namespace": "ml-sweeps",
    "image": "registry.example.com/ckd-orchestrate:0.1.0",
    "head": {"cpu": "4", "memory": "16Gi"},
    "worker": {"replicas": 2, "cpu": "8", "memory": "64Gi", "gpus": 1},
    "storage": {"pvc": "ckd-sweeps"},
}
SWEEP_ID = "quickstart-20261121-0001"
SWEEP_DIR = "/sweeps/quickstart/" + SWEEP_ID


def config(**changes: Any) -> dict[str, Any]:
    """BASE with dotted-key changes (a value of None deletes the key)."""
    data = copy.deepcopy(BASE)
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    return data


def render(data: dict[str, Any], sweep_dir: str = SWEEP_DIR, **kwargs: Any) -> dict[str, Any]:
    """The RayJob of `data` for SWEEP_ID; its entrypoint the sweep driver on `sweep_dir` unless given."""
    kwargs.setdefault("entrypoint", shlex.join(["python", "-m", "orchestrator.driver", sweep_dir]))
    return render_rayjob(KubernetesClusterSpec.from_mapping(data), sweep_id=SWEEP_ID, sweep_dir=sweep_dir, **kwargs)


GOOD_CONFIGS = {
    "cpu-only": config(worker={"replicas": 3, "cpu": "2", "memory": "4Gi"}),
    "gpus": config(worker__gpus=4, worker__cpu="32", worker__memory="256Gi"),
    "pvc-storage": config(storage={"pvc": "team.sweeps", "mount_path": "/mnt/sweeps/"}),
    "uri-storage": config(storage={"uri": "s3://ml-bucket/ckd/sweeps"}),
    "gs-storage": config(storage={"uri": "gs://ml-bucket/ckd"}, auth_token_secret="ray-token"),
    "tolerations": config(
        tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        node_selector={"cloud.google.com/gke-nodepool": "ml"},
        worker__tolerations=[{"key": "dedicated", "value": "gpu", "effect": "NoExecute", "tolerationSeconds": 300}],
        worker__node_selector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
        head__tolerations=[{"operator": "Exists"}],
    ),
    "extra-pod-fields": config(
        head_pod_extra={"priorityClassName": "high", "imagePullSecrets": [{"name": "regcred"}],
                        "securityContext": {"runAsNonRoot": True, "fsGroup": 1000}},
        worker_pod_extra={"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["h100"]}]}]}}},
            "terminationGracePeriodSeconds": 120, "runtimeClassName": "nvidia",
            "initContainers": [{"name": "warm", "image": "busybox:1.36", "command": ["true"]}]},
    ),
    "everything": config(
        image_pull_policy="Always", service_account="ckd-sweeps", labels={"team": "nlp", "example.com/cost": "a-1"},
        env={"MLFLOW_TRACKING_URI": "http://mlflow.ml-sweeps:5000", "HF_HUB_OFFLINE": "1"},
        secret_env={"MLFLOW_TRACKING_TOKEN": {"secret": "mlflow-auth", "key": "token"}},
        ttl_seconds_after_finished=600, backoff_limit=5, active_deadline_seconds=86400,
        submitter_backoff_limit=3, entrypoint_num_cpus=0.5,
        worker={"replicas": 2, "min_replicas": 1, "max_replicas": 8, "cpu": "7500m", "memory": "60000Mi", "gpus": 2,
                "gpu_resource_name": "amd.com/gpu"},
        head={"cpu": 0.5, "memory": "8G"},
    ),
    "head-only": config(worker={"replicas": 0, "cpu": "1", "memory": "1Gi"}, auth="disabled"),
    "no-shutdown": config(shutdown_after_job_finishes=False),
    "sidecar": config(submission_mode="SidecarMode", head_pod_extra={"restartPolicy": "Never"}),
    "http-mode": config(submission_mode="HTTPMode", ray_version="2.52.0"),
}


def _sweep_dir_for(data: dict[str, Any]) -> str:
    storage = data["storage"]
    root = storage.get("uri") or storage.get("mount_path", "/sweeps").rstrip("/")
    return f"{root}/quickstart/{SWEEP_ID}"


@pytest.mark.parametrize("name", sorted(GOOD_CONFIGS))
def test_good_configs_render_schema_valid_rayjobs(name):
    data = GOOD_CONFIGS[name]
    manifest = render(data, sweep_dir=_sweep_dir_for(data),
                      runtime_env={"env_vars": {"MLFLOW_EXPERIMENT_NAME": "quickstart"}})
    assert_valid(manifest)
    # what a `plan` prints is the same object
    assert yaml.safe_load(to_yaml(manifest)) == manifest
    assert rayjob_schema_errors(yaml.safe_load(to_yaml(manifest))) == []


@pytest.mark.parametrize("name", sorted(GOOD_CONFIGS))
def test_a_dumped_spec_validates_again_and_renders_the_same(name):
    """The grid saves the resolved spec (model_dump) in sweep.json and reads it back."""
    spec = KubernetesClusterSpec.from_mapping(GOOD_CONFIGS[name])
    again = KubernetesClusterSpec.from_mapping(json.loads(json.dumps(spec.model_dump(mode="json"))))
    assert again == spec
    sweep_dir = _sweep_dir_for(GOOD_CONFIGS[name])
    entrypoint = f"python -m orchestrator.driver {sweep_dir}"
    assert render_rayjob(again, sweep_id=SWEEP_ID, sweep_dir=sweep_dir, entrypoint=entrypoint) == \
        render_rayjob(spec, sweep_id=SWEEP_ID, sweep_dir=sweep_dir, entrypoint=entrypoint)


def test_gpu_config_puts_gpus_on_workers_only():
    manifest = render(GOOD_CONFIGS["gpus"])
    cluster = manifest["spec"]["rayClusterSpec"]
    (group,) = cluster["workerGroupSpecs"]
    container = group["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert "nvidia.com/gpu" not in container["resources"]["requests"]  # extended resources: limits imply requests
    assert group["rayStartParams"] == {"num-cpus": "32", "num-gpus": "4"}
    assert cluster["headGroupSpec"]["rayStartParams"] == {"num-cpus": "4", "num-gpus": "0"}
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["resources"] == {"requests": {"cpu": "4", "memory": "16Gi"}, "limits": {"cpu": "4", "memory": "16Gi"}}
    assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == (2, 2, 2)
    assert "enableInTreeAutoscaling" not in cluster


def test_defaults_job_settings_and_entrypoint():
    manifest = render(BASE)
    spec = manifest["spec"]
    assert spec["entrypoint"] == f"python -m orchestrator.driver {SWEEP_DIR}"
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] == 3600
    assert spec["backoffLimit"] == 2
    assert "activeDeadlineSeconds" not in spec
    assert spec["submissionMode"] == "K8sJobMode"
    assert spec["rayClusterSpec"]["authOptions"] == {"mode": "token"}
    assert manifest["metadata"]["name"] == SWEEP_ID
    assert manifest["metadata"]["annotations"]["ckd-orchestrate/sweep-id"] == SWEEP_ID
    assert manifest["metadata"]["labels"]["app.kubernetes.io/instance"] == SWEEP_ID
    text = to_yaml(manifest)
    assert "num-gpus: '0'" in text and "num-cpus: '4'" in text  # strings stay strings in YAML


def test_pvc_is_mounted_in_every_ray_pod():
    manifest = render(GOOD_CONFIGS["pvc-storage"], sweep_dir="/mnt/sweeps/q/" + SWEEP_ID)
    cluster = manifest["spec"]["rayClusterSpec"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        pod = group["template"]["spec"]
        assert pod["volumes"] == [{"name": "sweeps", "persistentVolumeClaim": {"claimName": "team.sweeps"}}]
        assert pod["containers"][0]["volumeMounts"] == [{"name": "sweeps", "mountPath": "/mnt/sweeps"}]
    assert manifest["spec"]["entrypoint"].endswith("/mnt/sweeps/q/" + SWEEP_ID)


def test_uri_storage_has_no_volume_and_sweep_dir_must_be_inside_the_storage():
    data = GOOD_CONFIGS["uri-storage"]
    manifest = render(data, sweep_dir="s3://ml-bucket/ckd/sweeps/q/" + SWEEP_ID)
    pod = manifest["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert "volumes" not in pod and "volumeMounts" not in pod["containers"][0]
    assert manifest["spec"]["entrypoint"] == f"python -m orchestrator.driver s3://ml-bucket/ckd/sweeps/q/{SWEEP_ID}"
    with pytest.raises(ValueError, match="sweep_dir"):
        render(data, sweep_dir="/tmp/sweeps/" + SWEEP_ID)
    with pytest.raises(ValueError, match="sweep_dir"):
        render(BASE, sweep_dir="/sweepsX/" + SWEEP_ID)  # a sibling of the mount is not under it


def test_scheduling_keys_merge_per_group():
    manifest = render(GOOD_CONFIGS["tolerations"])
    cluster = manifest["spec"]["rayClusterSpec"]
    head = cluster["headGroupSpec"]["template"]["spec"]
    worker = cluster["workerGroupSpecs"][0]["template"]["spec"]
    assert head["nodeSelector"] == {"cloud.google.com/gke-nodepool": "ml"}
    assert worker["nodeSelector"] == {"cloud.google.com/gke-nodepool": "ml",
                                      "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert head["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                                   {"operator": "Exists"}]
    assert worker["tolerations"][1] == {"key": "dedicated", "operator": "Equal", "value": "gpu",
                                        "effect": "NoExecute", "tolerationSeconds": 300}


def test_extra_pod_fields_are_merged_and_ours_kept():
    manifest = render(GOOD_CONFIGS["extra-pod-fields"])
    head = manifest["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    worker = manifest["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
    assert head["priorityClassName"] == "high" and head["imagePullSecrets"] == [{"name": "regcred"}]
    assert worker["runtimeClassName"] == "nvidia" and worker["initContainers"][0]["name"] == "warm"
    assert head["containers"][0]["name"] == "ray-head" and worker["containers"][0]["name"] == "ray-worker"


def test_everything_config_details():
    manifest = render(GOOD_CONFIGS["everything"], runtime_env={
        "env_vars": {"MLFLOW_TRACKING_URI": "http://mlflow.ml-sweeps:5000"}, "pip": ["rich"]})
    spec = manifest["spec"]
    cluster = spec["rayClusterSpec"]
    assert cluster["enableInTreeAutoscaling"] is True
    group = cluster["workerGroupSpecs"][0]
    assert (group["minReplicas"], group["replicas"], group["maxReplicas"]) == (1, 2, 8)
    assert group["template"]["spec"]["containers"][0]["resources"]["limits"]["amd.com/gpu"] == "2"
    assert group["rayStartParams"]["num-cpus"] == "8"  # 7500m rounded up, as KubeRay does
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "1"  # 0.5 CPU -> 1
    assert spec["activeDeadlineSeconds"] == 86400 and spec["backoffLimit"] == 5
    assert spec["submitterConfig"] == {"backoffLimit": 3} and spec["entrypointNumCpus"] == 0.5
    assert yaml.safe_load(spec["runtimeEnvYAML"]) == {
        "env_vars": {"MLFLOW_TRACKING_URI": "http://mlflow.ml-sweeps:5000"}, "pip": ["rich"]}
    env = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    assert env == [{"name": "MLFLOW_TRACKING_URI", "value": "http://mlflow.ml-sweeps:5000"},
                   {"name": "HF_HUB_OFFLINE", "value": "1"},
                   {"name": "MLFLOW_TRACKING_TOKEN",
                    "valueFrom": {"secretKeyRef": {"name": "mlflow-auth", "key": "token"}}}]
    assert manifest["metadata"]["labels"]["team"] == "nlp"
    assert cluster["headGroupSpec"]["template"]["spec"]["serviceAccountName"] == "ckd-sweeps"


def test_head_only_and_no_shutdown_and_auth_choices():
    head_only = render(GOOD_CONFIGS["head-only"])
    assert "workerGroupSpecs" not in head_only["spec"]["rayClusterSpec"]
    assert "authOptions" not in head_only["spec"]["rayClusterSpec"]
    kept = render(GOOD_CONFIGS["no-shutdown"])
    assert kept["spec"]["shutdownAfterJobFinishes"] is False and "ttlSecondsAfterFinished" not in kept["spec"]
    secret = render(GOOD_CONFIGS["gs-storage"], sweep_dir="gs://ml-bucket/ckd/" + SWEEP_ID)
    assert secret["spec"]["rayClusterSpec"]["authOptions"] == {"mode": "token", "secretName": "ray-token"}


def test_mlflow_tracking_uri_passes_from_runtime_env_to_the_containers():
    manifest = render(BASE, runtime_env={"env_vars": {"MLFLOW_TRACKING_URI": "http://mlflow:5000", "OTHER": "x"}})
    cluster = manifest["spec"]["rayClusterSpec"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        env = group["template"]["spec"]["containers"][0]["env"]
        assert env == [{"name": "MLFLOW_TRACKING_URI", "value": "http://mlflow:5000"}]
    with pytest.raises(ValueError, match="runtime_env.env_vars.MLFLOW_TRACKING_URI"):
        render(config(env={"MLFLOW_TRACKING_URI": "http://a:5000"}),
               runtime_env={"env_vars": {"MLFLOW_TRACKING_URI": "http://b:5000"}})


@pytest.mark.parametrize("runtime_env, key", [
    ({"working_dir": "."}, "runtime_env.working_dir"),
    ({"py_modules": ["s3://b/m.zip", "./local"]}, "runtime_env.py_modules"),
    ({"env_vars": {"RAY_AUTH_TOKEN": "abc"}}, "runtime_env.env_vars.RAY_AUTH_TOKEN"),
    ({"env_vars": {"N": 3}}, "runtime_env.env_vars.N"),
])
def test_bad_runtime_env_is_refused(runtime_env, key):
    with pytest.raises(ValueError, match=re.escape(key)) as err:
        render(BASE, runtime_env=runtime_env)
    assert "abc" not in str(err.value)  # a token is never echoed


# ---------------------------------------------------------------------------------------- bad configs

BAD_CONFIGS = {
    "bad namespace": (config(namespace="ML_Sweeps"), "namespace"),
    "long namespace": (config(namespace="a" * 64), "namespace"),
    "quantity with words": (config(head__cpu="2 cores"), "head.cpu"),
    "uppercase K": (config(worker__memory="64K"), "worker.memory"),
    "milli-bytes": (config(head__memory="512m"), "head.memory"),
    "zero cpu": (config(worker__cpu="0"), "worker.cpu"),
    "boolean cpu": (config(head__cpu=True), "head.cpu"),
    "negative gpus": (config(worker__gpus=-1), "worker.gpus"),
    "fractional gpus": (config(worker__gpus=0.5), "worker.gpus"),
    "gpu resource without vendor": (config(worker__gpu_resource_name="gpu"), "worker.gpu_resource_name"),
    "replicas below min": (config(worker__min_replicas=3), "worker.min_replicas"),
    "replicas above max": (config(worker__max_replicas=1), "worker.max_replicas"),
    "extra overrides containers": (config(head_pod_extra={"containers": [{"name": "x", "image": "y"}]}),
                                   "head_pod_extra.containers"),
    "extra overrides tolerations": (config(worker_pod_extra={"tolerations": []}), "worker_pod_extra.tolerations"),
    "extra overrides service account": (config(worker_pod_extra={"serviceAccountName": "x"}),
                                        "worker_pod_extra.serviceAccountName"),
    "extra not a pod field": (config(head_pod_extra={"priorityClasName": "high"}), "head_pod_extra.priorityClasName"),
    "pvc and uri": (config(storage={"pvc": "a", "uri": "s3://b/c"}), "storage"),
    "no storage kind": (config(storage={"mount_path": "/x"}), "storage"),
    "mount path with uri": (config(storage={"uri": "s3://b/c", "mount_path": "/x"}), "storage.mount_path"),
    "http uri": (config(storage={"uri": "https://b/c"}), "storage.uri"),
    "relative mount path": (config(storage={"pvc": "a", "mount_path": "sweeps"}), "storage.mount_path"),
    "bad pvc name": (config(storage={"pvc": "My_PVC"}), "storage.pvc"),
    "toleration value with Exists": (config(tolerations=[{"key": "k", "operator": "Exists", "value": "v"}]),
                                     "tolerations[0].value"),
    "toleration unknown key": (config(tolerations=[{"key": "k", "effects": "NoSchedule"}]), "tolerations[0].effects"),
    "toleration seconds without NoExecute": (config(worker__tolerations=[{"key": "k", "tolerationSeconds": 5}]),
                                             "worker.tolerations[0].tolerationSeconds"),
    "toleration bad effect": (config(tolerations=[{"key": "k", "effect": "NoScheduling"}]), "tolerations[0].effect"),
    "node selector bad key": (config(node_selector={"bad key": "x"}), "node_selector.bad key"),
    "ray token in env": (config(env={"RAY_AUTH_TOKEN": "s3cr3t"}), "env.RAY_AUTH_TOKEN"),
    "bad env name": (config(env={"1BAD": "x"}), "env.1BAD"),
    "env and secret_env": (config(env={"A": "1"}, secret_env={"A": {"secret": "s", "key": "k"}}), "secret_env.A"),
    "old ray with token auth": (config(ray_version="2.51.0"), "ray_version"),
    "ray version not a release": (config(ray_version="latest"), "ray_version"),
    "secret with auth disabled": (config(auth="disabled", auth_token_secret="tok"), "auth_token_secret"),
    "ttl without shutdown": (config(shutdown_after_job_finishes=False, ttl_seconds_after_finished=60),
                             "ttl_seconds_after_finished"),
    "negative backoff": (config(backoff_limit=-1), "backoff_limit"),
    "zero deadline": (config(active_deadline_seconds=0), "active_deadline_seconds"),
    "submitter limit in http mode": (config(submission_mode="HTTPMode", submitter_backoff_limit=1),
                                     "submitter_backoff_limit"),
    "interactive mode": (config(submission_mode="InteractiveMode"), "submission_mode"),
    "sidecar with restart policy": (config(submission_mode="SidecarMode", head_pod_extra={"restartPolicy": "Always"}),
                                    "head_pod_extra.restartPolicy"),
    "bad service account": (config(service_account="Bad Name"), "service_account"),
    "app label": (config(labels={"app.kubernetes.io/name": "x"}), "labels.app.kubernetes.io/name"),
    "image with spaces": (config(image="my image"), "image"),
    "missing image": (config(image=None), "image"),
    "missing head": (config(head=None), "head"),
    "unknown key with hint": (config(worker__gpu=1), "worker.gpu"),
    "other backend": (config(backend="slurm"), "backend"),
}


@pytest.mark.parametrize("name", sorted(BAD_CONFIGS))
def test_bad_configs_fail_with_the_right_key(name):
    data, key = BAD_CONFIGS[name]
    with pytest.raises(ClusterSpecError) as err:
        KubernetesClusterSpec.from_mapping(data)
    keys = [k for k, _ in err.value.issues]
    assert key in keys, err.value
    assert "s3cr3t" not in str(err.value)


def test_all_problems_are_reported_at_once_with_hints():
    data = config(namespace="Bad", head__cpu="2 cores", worker__gpus=-1, worker__gpu=1,
                  storage={"pvc": "a", "uri": "s3://b/c"})
    with pytest.raises(ClusterSpecError) as err:
        KubernetesClusterSpec.from_mapping(data)
    messages = dict(err.value.issues)
    assert {"namespace", "head.cpu", "worker.gpus", "worker.gpu", "storage"} <= set(messages)
    assert "did you mean 'gpus'" in messages["worker.gpu"]
    assert "unknown suffix ' cores'" in messages["head.cpu"]


def test_keys_when_the_model_is_embedded_in_a_grid_model():
    from pydantic import BaseModel, ValidationError

    from cluster.kubernetes.config import issues_from_validation_error

    class Grid(BaseModel):
        cluster: KubernetesClusterSpec

    with pytest.raises(ValidationError) as err:
        Grid.model_validate({"cluster": config(storage={"pvc": "a", "uri": "s3://b/c"}, worker__gpux=1)})
    issues = dict(issues_from_validation_error(err.value, prefix=("cluster",)))
    assert set(issues) == {"storage", "worker.gpux"}
    assert "valid keys here: cpu, gpu_resource_name, gpus" in issues["worker.gpux"]


# ----------------------------------------------------------------------------------- the oracle bites


def _corrupt(path: str, value: Any) -> dict[str, Any]:
    manifest = render(BASE)
    node: Any = manifest
    parts = [int(p) if p.isdigit() else p.replace("~1", "/") for p in path.split("/")]  # JSON-pointer escape
    for part in parts[:-1]:
        node = node[part]
    node[parts[-1]] = value
    return manifest


HEAD = "spec/rayClusterSpec/headGroupSpec"
WORKER = "spec/rayClusterSpec/workerGroupSpecs/0"


@pytest.mark.parametrize("path, value, error", [
    (f"{HEAD}/rayStartParams/num-cpus", 4, "is not of type 'string'"),
    (f"{HEAD}/rayStartParam", {"num-cpus": "4"}, "Additional properties are not allowed"),
    (f"{WORKER}/replicas", "2", "is not of type 'integer'"),
    (f"{WORKER}/maxReplicas", 2**31, "is greater than the maximum"),
    (f"{WORKER}/template/spec/containers/0/resources/limits/cpu", "2 cores", "does not match"),
    (f"{WORKER}/template/spec/containers/0/resources/limits/cpu", True, "is not valid under any of the given schemas"),
    (f"{HEAD}/template/spec/containers/0/env", [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}], "duplicate"),
    ("spec/rayClusterSpec/authOptions/mode", "Token", "is not one of"),
    ("spec/shutdownAfterJobFinishes", "true", "is not of type 'boolean'"),
    ("metadata/name", "a" * 48, "is too long"),
    ("metadata/name", "1-sweep", "does not match"),
    ("metadata/labels/bad key", "x", "does not match"),
    (f"{HEAD}/template/metadata/labels/team", "not a valid value!", "does not match"),
])
def test_corrupted_manifests_fail_the_crd_schema(path, value, error):
    manifest = _corrupt(path, value)
    errors = rayjob_schema_errors(manifest)
    assert any(error in e for e in errors), errors


def test_int_or_string_quantities_accept_integers():
    manifest = _corrupt(f"{WORKER}/template/spec/containers/0/resources/limits/nvidia.com~1gpu", 1)
    assert rayjob_schema_errors(manifest) == []
    manifest = _corrupt(f"{WORKER}/template/spec/containers/0/resources/limits/memory", 68719476736)
    assert rayjob_schema_errors(manifest) == []


def test_our_check_catches_what_we_set_wrong():
    manifest = _corrupt(f"{HEAD}/rayStartParams/num-cpus", 4)
    with pytest.raises(ManifestError, match="rayStartParams.num-cpus"):
        check_manifest(manifest)
    manifest = _corrupt(f"{HEAD}/rayStartParams/num-gpus", "1")
    with pytest.raises(ManifestError, match="num-gpus"):
        check_manifest(manifest)
    manifest = _corrupt(f"{HEAD}/template/spec/containers/0/resources/limits/nvidia.com~1gpu", "1")
    with pytest.raises(ManifestError, match="must not request GPUs"):
        check_manifest(manifest)
    manifest = _corrupt(f"{WORKER}/template/spec/containers/0/resources/limits/memory", "16 gigs")
    with pytest.raises(ManifestError, match="memory"):
        check_manifest(manifest)
    manifest = _corrupt("metadata/name", "a" * 48)
    with pytest.raises(ManifestError, match="47"):
        check_manifest(manifest)


def test_a_gpu_smuggled_onto_the_head_through_extra_fields_is_refused():
    data = config(head_pod_extra={"resources": {"limits": {"nvidia.com/gpu": "1", "cpu": "4", "memory": "16Gi"}}})
    with pytest.raises(ManifestError, match="must not request GPUs"):
        render(data)


def test_pod_spec_fields_match_the_crd():
    template = _crd_schema("ray.io_rayjobs.yaml")["properties"]["spec"]["properties"]["rayClusterSpec"][
        "properties"]["headGroupSpec"]["properties"]["template"]
    assert set(template["properties"]["spec"]["properties"]) == POD_SPEC_FIELDS


# -------------------------------------------------------------------------------------- quantities

# The pattern the CRD puts on every quantity (copied from ray.io_rayjobs.yaml)
CRD_QUANTITY = re.compile(r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
                          r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$")


@pytest.mark.parametrize("text, value", [
    ("500m", Decimal("0.5")), ("4", 4), ("1.5", Decimal("1.5")), ("16Gi", 16 * 2**30), ("1e3", 1000),
    ("+2k", 2000), (".5", Decimal("0.5")), ("5.", 5), ("1E-3", Decimal("0.001")), ("100n", Decimal("1e-7")),
    ("3Ei", 3 * 2**60), ("-1", -1), ("64M", 64 * 10**6), ("0.5Mi", 2**19),
])
def test_quantity_values(text, value):
    assert parse_quantity(text).value == value
    assert CRD_QUANTITY.match(text)


@pytest.mark.parametrize("text", ["2 cores", "", "Gi", "1.2.3", "1K", "1e1.5", "0x10", "1 Gi", "-", "+", "1gi", "1Gb",
                                  " 1", "1e", "1ki", "١"])
def test_bad_quantities(text):
    with pytest.raises(ValueError):
        parse_quantity(text)


_SUFFIXES = ["", "n", "u", "m", "k", "M", "G", "T", "P", "E", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei", "e3", "E-2", "e+1"]


@given(st.from_regex(r"\A[+-]?([0-9]{1,6}(\.[0-9]{0,4})?|\.[0-9]{1,4})\Z"), st.sampled_from(_SUFFIXES))
@settings(max_examples=300, deadline=None)
def test_quantity_grammar_agrees_with_a_float_reference(number, suffix):
    text = number + suffix
    scale = {"": 1, "n": 1e-9, "u": 1e-6, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
             "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
             "e3": 1e3, "E-2": 1e-2, "e+1": 10}[suffix]
    assert float(parse_quantity(text).value) == pytest.approx(float(number) * scale, rel=1e-12, abs=1e-30)
    assert CRD_QUANTITY.match(text)


@given(st.text(alphabet="0123456789.+-eEkKMGTPinum x", max_size=8))
@settings(max_examples=500, deadline=None)
def test_every_accepted_quantity_matches_the_crd_pattern(text):
    try:
        parse_quantity(text)
    except ValueError:
        return
    assert CRD_QUANTITY.match(text), text


# --------------------------------------------------------------------------------------------- names


def test_rayjob_names():
    assert rayjob_name("quickstart-20261121-0001") == "quickstart-20261121-0001"
    assert rayjob_name("Quickstart_2026") != rayjob_name("quickstart-2026")
    assert rayjob_name("2026-11-21T10:00") .startswith("ckd-2026-11-21t10-00-")
    long = rayjob_name("x" * 200)
    assert len(long) == 47 and long == rayjob_name("x" * 200)
    assert rayjob_name("x" * 200) != rayjob_name("x" * 201)


@given(st.text(min_size=1, max_size=120))
@settings(max_examples=300, deadline=None)
def test_every_sweep_id_gives_a_valid_rayjob_name(sweep_id):
    name = rayjob_name(sweep_id)
    assert len(name) <= 47 and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name), name


# --------------------------------------------------------------------------------- the client, on HTTP


def _selector_matches(selector: str, labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in (term.split("=", 1) for term in selector.split(",") if term))


class FakeApiServer:
    """Answers the API server routes the backend uses, from memory, recording every request.

    A RayJob that fails the CRD schema is refused with 422 Invalid, an existing one with 409 AlreadyExists,
    a missing one with 404 NotFound (each a metav1.Status body, as the real server sends).
    """

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self.rayjobs: dict[str, dict[str, Any]] = {}
        self.pods: list[dict[str, Any]] = []
        self.logs: dict[tuple[str, str | None], str] = {}
        self.requests: list[dict[str, Any]] = []
        self.forbidden = False
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                query = dict(urllib.parse.parse_qsl(url.query))
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                server.requests.append({"method": self.command, "path": url.path, "query": query, "body": body,
                                        "content_type": self.headers.get("Content-Type")})
                code, payload = server.route(self.command, url.path, query, body)
                data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "text/plain" if isinstance(payload, str) else "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = _handle

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.host = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> FakeApiServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)

    @staticmethod
    def status(code: int, reason: str, message: str) -> tuple[int, dict[str, Any]]:
        return code, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                      "message": message, "reason": reason, "code": code}

    def route(self, method: str, path: str, query: dict[str, str], body: Any) -> tuple[int, Any]:
        if self.forbidden:
            return self.status(403, "Forbidden", f'rayjobs.ray.io is forbidden: User "alice" cannot {method.lower()}')
        jobs = f"/apis/ray.io/v1/namespaces/{self.namespace}/rayjobs"
        pods = f"/api/v1/namespaces/{self.namespace}/pods"
        if method == "POST" and path == jobs:
            errors = rayjob_schema_errors(body)
            if errors:
                message = f'RayJob.ray.io "{body["metadata"]["name"]}" is invalid: ' + "; ".join(errors)
                return self.status(422, "Invalid", message)
            name = body["metadata"]["name"]
            if name in self.rayjobs:
                return self.status(409, "AlreadyExists", f'rayjobs.ray.io "{name}" already exists')
            created = copy.deepcopy(body)
            created["metadata"].update(uid="0b0e4a6e-1", creationTimestamp="2026-11-21T10:00:00Z", generation=1)
            if query.get("dryRun") != "All":
                self.rayjobs[name] = created
            return 201, created
        if path.startswith(jobs + "/"):
            name = path.rsplit("/", 1)[1]
            if name not in self.rayjobs:
                return self.status(404, "NotFound", f'rayjobs.ray.io "{name}" not found')
            if method == "GET":
                return 200, self.rayjobs[name]
            if method == "DELETE":
                del self.rayjobs[name]
                return 200, {"kind": "Status", "apiVersion": "v1", "status": "Success", "details": {"name": name}}
        if method == "GET" and path == pods:
            items = [p for p in self.pods if _selector_matches(query.get("labelSelector", ""), p["metadata"]["labels"])]
            return 200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items}
        if method == "GET" and path.startswith(pods + "/") and path.endswith("/log"):
            pod = path.split("/")[-2]
            text = self.logs.get((pod, query.get("container")))
            if text is None:
                return self.status(404, "NotFound", f'pods "{pod}" not found')
            lines = text.splitlines(keepends=True)
            return 200, "".join(lines[-int(query["tailLines"]):] if "tailLines" in query else lines)
        return self.status(404, "NotFound", f"no route {method} {path}")

    def add_pod(self, name: str, labels: dict[str, str], created: str) -> None:
        self.pods.append({"metadata": {"name": name, "namespace": self.namespace, "labels": labels,
                                       "creationTimestamp": created}, "status": {"phase": "Running"}})


@pytest.fixture
def api():
    pytest.importorskip("kubernetes")
    with FakeApiServer(BASE["namespace"]) as server:
        yield server


def _backend(server: FakeApiServer, data: dict[str, Any] | None = None) -> RayJobClient:
    from kubernetes import client

    configuration = client.Configuration(host=server.host)
    return RayJobClient(KubernetesClusterSpec.from_mapping(data or BASE),
                        api_client=client.ApiClient(configuration), timeout=10)


def test_submit_status_logs_cancel_through_the_kubernetes_client(api):
    backend = _backend(api)
    manifest = render(BASE, runtime_env={"env_vars": {"MLFLOW_TRACKING_URI": "http://mlflow:5000"}})

    name = backend.submit(manifest)
    assert name == SWEEP_ID
    (post,) = api.requests
    assert post["method"] == "POST" and post["path"] == "/apis/ray.io/v1/namespaces/ml-sweeps/rayjobs"
    assert post["query"].get("fieldValidation") == "Strict"
    # kubernetes-client 37 sends no Content-Type; the API server then reads JSON, its first media type
    assert (post["content_type"] or "application/json").startswith("application/json")
    assert post["body"] == manifest  # what went over the wire is exactly what we rendered ...
    assert rayjob_schema_errors(post["body"]) == []  # ... and the CRD accepts it

    assert backend.status(name).state == "pending"  # no status yet: KubeRay has not reconciled it
    api.rayjobs[name]["status"] = {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING",
                                   "rayClusterName": f"{name}-x7k2p", "dashboardURL": "10.0.0.1:8265"}
    status = backend.status(name)
    assert (status.state, status.job_status, status.ray_cluster_name) == ("running", "RUNNING", f"{name}-x7k2p")
    assert not status.terminal

    api.add_pod(f"{name}-old", {"job-name": name}, "2026-11-21T10:01:00Z")
    api.add_pod(f"{name}-new", {"job-name": name}, "2026-11-21T10:05:00Z")
    api.add_pod("unrelated", {"job-name": "other"}, "2026-11-21T10:09:00Z")
    api.logs[(f"{name}-new", None)] = "a\nb\nc\n"
    assert backend.logs(name) == "a\nb\nc\n"
    assert backend.logs(name, tail_lines=1) == "c\n"

    api.rayjobs[name]["status"].update(jobDeploymentStatus="Complete", jobStatus="SUCCEEDED")
    assert backend.status(name).state == "finished" and backend.status(name).terminal

    backend.cancel(name)
    assert api.requests[-1]["method"] == "DELETE"
    assert api.requests[-1]["query"].get("propagationPolicy") == "Background"
    with pytest.raises(RayJobNotFoundError, match="not found"):
        backend.status(name)
    with pytest.raises(RayJobNotFoundError):
        backend.cancel(name)


def test_logs_fall_back_to_the_head_pod(api):
    data = config(submission_mode="SidecarMode")
    backend = _backend(api, data)
    name = backend.submit(render(data))
    assert backend.logs(name) == ""  # no cluster yet
    api.rayjobs[name]["status"] = {"jobDeploymentStatus": "Running", "rayClusterName": "c1"}
    api.add_pod("c1-head", {"ray.io/cluster": "c1", "ray.io/node-type": "head"}, "2026-11-21T10:00:00Z")
    api.logs[("c1-head", "ray-job-submitter")] = "job output\n"
    assert backend.logs(name) == "job output\n"


def test_submit_twice_dry_run_and_server_side_refusals(api):
    backend = _backend(api)
    manifest = render(BASE)
    assert backend.submit(manifest, dry_run=True) == SWEEP_ID
    assert api.requests[-1]["query"].get("dryRun") == "All" and api.rayjobs == {}
    backend.submit(manifest)
    with pytest.raises(RayJobExistsError, match="submitted before"):
        backend.submit(manifest)
    # passes our checks (we never look at fields we do not set) but not the CRD: the server says why
    unknown = copy.deepcopy(manifest)
    unknown["metadata"]["name"] = "other"
    unknown["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resource"] = {}
    with pytest.raises(KubernetesApiError, match="Additional properties") as err:
        backend.submit(unknown)
    assert err.value.status == 422
    api.forbidden = True
    with pytest.raises(KubernetesApiError, match="rayjobs.ray.io create/get/delete") as err:
        backend.status(SWEEP_ID)
    assert err.value.status == 403


def test_submit_checks_the_manifest_before_sending(api):
    backend = _backend(api)
    bad = _corrupt(f"{HEAD}/rayStartParams/num-gpus", "1")
    with pytest.raises(ManifestError):
        backend.submit(bad)
    other_ns = render(config(namespace="elsewhere"))
    with pytest.raises(ValueError, match="namespace"):
        backend.submit(other_ns)
    assert api.requests == []


@pytest.mark.parametrize("deployment, job, state", [
    ("", "", "pending"), ("Initializing", "", "pending"), ("Waiting", "", "pending"), ("Suspended", "", "pending"),
    ("Running", "PENDING", "running"), ("Retrying", "FAILED", "running"), ("Complete", "SUCCEEDED", "finished"),
    ("Complete", "STOPPED", "cancelled"), ("Complete", "FAILED", "failed"), ("Failed", "", "failed"),
    ("ValidationFailed", "", "failed"), ("SomethingNew", "RUNNING", "running"),
])
def test_job_states(deployment, job, state):
    assert job_state(deployment, job) == state


def test_missing_kubernetes_package_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "kubernetes", None)
    backend = RayJobClient(KubernetesClusterSpec.from_mapping(BASE))
    with pytest.raises(KubernetesUnavailableError, match=r"ckd-orchestrate\[kubernetes\]"):
        backend.status("x")


# ------------------------------------------------------------------------------------ the kubectl path

FAKE_KUBECTL = r'''#!{python}
import json, sys, pathlib
log = pathlib.Path({log!r})
calls = json.loads(log.read_text()) if log.exists() else []
stdin = sys.stdin.read() if "-f" in sys.argv else None
calls.append({{"argv": sys.argv[1:], "stdin": stdin}})
log.write_text(json.dumps(calls))
args = sys.argv[1:]
verb = next(a for a in args if a in ("create", "get", "delete", "logs"))
if verb == "create":
    import yaml
    print(json.dumps(yaml.safe_load(stdin)))
elif verb == "get" and "rayjobs.ray.io" in args:
    name = args[args.index("rayjobs.ray.io") + 1]
    if name == "missing":
        sys.stderr.write('Error from server (NotFound): rayjobs.ray.io "missing" not found\n')
        sys.exit(1)
    status = {{"jobDeploymentStatus": "Complete", "jobStatus": "STOPPED"}}
    print(json.dumps({{"metadata": {{"name": name}}, "status": status}}))
elif verb == "get":
    pod = {{"metadata": {{"name": "submitter-1", "creationTimestamp": "2026-11-21T10:00:00Z"}}}}
    print(json.dumps({{"items": [pod]}}))
elif verb == "logs":
    print("driver says hi")
'''


def test_kubectl_transport(tmp_path):
    log = tmp_path / "calls.json"
    kubectl = tmp_path / "kubectl"
    kubectl.write_text(FAKE_KUBECTL.format(python=sys.executable, log=str(log)))
    kubectl.chmod(0o755)
    data = config(use_kubectl=True, kube_context="lab")
    backend = RayJobClient(KubernetesClusterSpec.from_mapping(data), kubectl=str(kubectl))
    manifest = render(data)

    assert backend.submit(manifest) == SWEEP_ID
    assert backend.status(SWEEP_ID).state == "cancelled"
    assert backend.logs(SWEEP_ID, tail_lines=5) == "driver says hi\n"
    backend.cancel(SWEEP_ID)
    with pytest.raises(RayJobNotFoundError):
        backend.status("missing")

    calls = json.loads(log.read_text())
    create = calls[0]
    assert create["argv"][:4] == ["--context", "lab", "--namespace", "ml-sweeps"]
    assert create["argv"][4:] == ["create", "--validate=strict", "-f", "-", "-o", "json"]
    sent = yaml.safe_load(create["stdin"])
    assert sent == manifest and rayjob_schema_errors(sent) == []
    argvs = [c["argv"][4:] for c in calls[1:]]
    assert ["get", "rayjobs.ray.io", SWEEP_ID, "-o", "json"] in argvs
    assert ["get", "pods", "-l", f"job-name={SWEEP_ID}", "-o", "json"] in argvs
    assert ["logs", "submitter-1", "--tail=5"] in argvs
    assert ["delete", "rayjobs.ray.io", SWEEP_ID, "--wait=false"] in argvs


def test_kubectl_missing_is_a_clear_error():
    data = config(use_kubectl=True)
    backend = RayJobClient(KubernetesClusterSpec.from_mapping(data), kubectl="/nonexistent/kubectl")
    with pytest.raises(KubernetesUnavailableError, match="not found"):
        backend.status("x")


# ------------------------------------------------------------------------ `submit` of a grid (KubernetesBackend)


def k8s_grid(tmp_path: Path, glue_dir: Path, teacher: Path, tracking_uri: str | None, **cluster: Any) -> Path:
    """A 2-trial tiny grid (the RTE job of jobkit) with BASE as its cluster block (plus `cluster` changes)."""
    from jobkit import tiny_job, write_yaml

    job = tiny_job(glue_dir, teacher, tmp_path / "unused")
    del job["output"]
    grid = {"job": job, "sweep": {"space": {"training.learning_rate": {"grid": [1e-4, 3e-4]}}},
            "cluster": {**copy.deepcopy(BASE), **cluster},
            "mlflow": {"experiment": "k8s", "registered_model": "k8s-student",
                       **({"tracking_uri": tracking_uri} if tracking_uri else {})},
            "root": str(tmp_path / "sweeps")}
    return write_yaml(tmp_path / "k8s.yaml", grid)


def _closed_port_uri() -> str:
    from jobs.distributed import free_port

    return f"http://127.0.0.1:{free_port()}"  # nothing listens: `status` must not wait on it


def test_submit_of_a_grid_ships_the_sweep_and_follows_the_rayjob(api, tmp_path, glue_dir, tiny_teacher):
    from kubernetes import client

    from cluster.kubernetes.backend import KubernetesBackend
    from orchestrator.control import create_sweep, refresh_status, start_driver
    from orchestrator.grid import GridSpec
    from orchestrator.grid import load_grid
    from orchestrator.launch import bootstrap_sweep
    from orchestrator.state import SweepDir

    uri = _closed_port_uri()
    grid_file = k8s_grid(tmp_path, glue_dir, tiny_teacher, uri)
    grid = load_grid(grid_file)
    sweep = create_sweep(grid, grid_file)
    backend = KubernetesBackend(grid.cluster, api_client=client.ApiClient(client.Configuration(host=api.host)))

    job = start_driver(sweep, grid, backend)
    name = job["job_id"]
    assert name == rayjob_name(sweep.sweep_id)
    (post,) = api.requests
    body = post["body"]
    assert_valid(body)  # the CRD schema and KubeRay's rules accept what was sent
    target = f"/sweeps/{sweep.sweep_id}"
    assert body["spec"]["entrypoint"] == f"python -m orchestrator.driver {target} --bootstrap-env CKD_SWEEP_RECORD"
    env_vars = yaml.safe_load(body["spec"]["runtimeEnvYAML"])["env_vars"]
    assert env_vars["MLFLOW_TRACKING_URI"] == uri and env_vars["CKD_CACHE_DIR"] == f"{target}/cache"
    state = sweep.state()
    assert state["backend"] == {"backend": "kubernetes", "job_id": name, "namespace": "ml-sweeps",
                                "sweep_dir": target}
    assert (state["tracking_uri"], state["experiment"]) == (uri, "k8s")

    # What the pods' driver builds from the manifest alone is the submitted sweep, and reads the same grid.
    pvc = SweepDir(tmp_path / "pvc" / sweep.sweep_id)
    assert bootstrap_sweep(pvc, env_vars["CKD_SWEEP_RECORD"]) is True
    assert pvc.record() == sweep.record()
    assert (pvc.path / "grid.yaml").read_text() == grid_file.read_text()
    assert GridSpec.from_record(pvc.record()).to_dict() == grid.to_dict()

    with pytest.raises(RayJobExistsError, match="submitted before"):
        start_driver(sweep, grid, backend)

    state, reported = refresh_status(sweep, backend)
    assert reported.line == f"RayJob {name} in namespace ml-sweeps: New" and state["status"] == "pending"
    api.rayjobs[name]["status"] = {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING",
                                   "rayClusterName": f"{name}-x7k2p"}
    state, reported = refresh_status(sweep, backend)
    assert reported.line == f"RayJob {name} in namespace ml-sweeps: Running/RUNNING"
    assert state["status"] == sweep.state()["status"] == "running"  # the driver's own state.json is on the PVC
    api.rayjobs[name]["status"] = {"jobDeploymentStatus": "Failed", "jobStatus": "FAILED", "failed": 3,
                                   "reason": "DeadlineExceeded", "message": "activeDeadlineSeconds passed"}
    state, reported = refresh_status(sweep, backend)
    assert state["status"] == sweep.state()["status"] == "failed"
    assert reported.line == (f"RayJob {name} in namespace ml-sweeps: Failed/FAILED, 3 failed attempt(s) "
                             "(DeadlineExceeded activeDeadlineSeconds passed)")

    job = sweep.state()["backend"]
    api.add_pod(f"{name}-submitter", {"job-name": name}, "2026-11-21T10:05:00Z")
    api.logs[(f"{name}-submitter", None)] = "one\ntwo\nthree\n"
    assert backend.logs(job, 2) == "two\nthree\n"

    backend.cancel(job, timeout_s=10)
    assert api.requests[-2]["method"] == "DELETE" and api.rayjobs == {}
    gone = backend.status(job)
    assert gone.line == f"RayJob {name} in namespace ml-sweeps: gone (cancelled, or removed after its TTL)"
    assert gone.state is None
    backend.cancel(job, timeout_s=10)  # nothing left to delete: not an error


def test_a_grid_the_pods_cannot_run_is_refused_with_its_key(tmp_path, glue_dir, tiny_teacher):
    from cluster.kubernetes.backend import KubernetesBackend
    from orchestrator.grid import load_grid
    from orchestrator.launch import plan_launch
    from orchestrator.plan import trial_shape

    def backend_and_launch(grid_file: Path) -> tuple[KubernetesBackend, Any, Any]:
        grid = load_grid(grid_file)
        backend = KubernetesBackend(grid.cluster)
        return backend, plan_launch(grid, backend), trial_shape(grid)

    backend, launch, trial = backend_and_launch(k8s_grid(tmp_path, glue_dir, tiny_teacher, None))  # local SQLite
    (problem,) = backend.plan_problems(trial, launch)
    assert problem.startswith("mlflow.tracking_uri: the pods cannot reach sqlite:///")
    with pytest.raises(ValueError, match="mlflow.tracking_uri: the pods cannot reach"):
        backend.manifest(launch)
    # ... fine once the containers carry the store's address themselves, which then stays out of runtimeEnvYAML
    backend, launch, trial = backend_and_launch(k8s_grid(tmp_path, glue_dir, tiny_teacher, None,
                                                         env={"MLFLOW_TRACKING_URI": "http://mlflow.ml-sweeps:5000"}))
    assert backend.plan_problems(trial, launch) == []
    manifest = backend.manifest(launch)
    assert_valid(manifest)
    assert "MLFLOW_TRACKING_URI" not in yaml.safe_load(manifest["spec"]["runtimeEnvYAML"])["env_vars"]
    assert [("RayJob manifest", to_yaml(manifest))] == backend.plan_text(launch)
    backend, launch, trial = backend_and_launch(k8s_grid(tmp_path, glue_dir, tiny_teacher, "http://mlflow:5000",
                                                         storage={"uri": "s3://bucket/sweeps"}))
    assert [p.split(":")[0] for p in backend.plan_problems(trial, launch)] == ["cluster.storage.uri"]


def test_plan_prints_the_rayjob_that_submit_applies(tmp_path, glue_dir, tiny_teacher):
    from jobkit import cli

    grid_file = k8s_grid(tmp_path, glue_dir, tiny_teacher, None,
                         env={"MLFLOW_TRACKING_URI": "http://mlflow.ml-sweeps:5000"})
    out = cli("plan", str(grid_file), timeout=300).stdout
    text = out.split("RayJob manifest:\n", 1)[1].split("\nplan OK", 1)[0]
    manifest = yaml.safe_load(text)
    assert_valid(manifest)
    assert manifest["spec"]["entrypoint"].endswith("--bootstrap-env CKD_SWEEP_RECORD")
    assert "CKD_SWEEP_RECORD" in yaml.safe_load(manifest["spec"]["runtimeEnvYAML"])["env_vars"]
