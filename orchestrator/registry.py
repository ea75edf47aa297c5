"""The sweep's end: rank the trials, register the best student, and pull a registered student back.

Layout read (docs/architecture.md, "MLflow layout"): trials are child runs of the sweep's parent run (tag
``mlflow.parentRunId``) with final metrics ``best/<name>`` (the metrics of the exported student) and a
transformers-flavour LoggedModel named "student" (``jobs.tracking.log_student``). A Tune / grid metric
is named ``eval/<name>``; the trials are ranked by ``best/<name>``.

All functions take ``tracking_uri`` (default: MLflow's current one, i.e. ``mlflow.set_tracking_uri`` or
``$MLFLOW_TRACKING_URI``); the registry is the tracking store's (a database backend is needed).
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow
import yaml
from mlflow import MlflowClient
from mlflow.entities import LoggedModel, Run, RunTag, ViewType
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from jobs.tracking import STUDENT_MODEL_NAME, prepare_store

__all__ = [
    "ChampionError", "PullError", "best_metric_key", "best_trial_run", "child_runs", "client_for", "pull",
    "register_champion", "student_model",
]  # fmt: skip

PARENT_TAG = "mlflow.parentRunId"
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


class ChampionError(LookupError):
    """No trial qualifies as the champion (no child runs, none with the metric or a logged student)."""


class PullError(LookupError):
    """A model URI that does not resolve, or artifacts that are not a Hugging Face model."""


def client_for(tracking_uri: str | None) -> MlflowClient:
    """An MlflowClient on ``tracking_uri`` (tracking and registry), or on MLflow's current URI for None."""
    if tracking_uri is None:
        return MlflowClient()
    prepare_store(tracking_uri)
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


@contextlib.contextmanager
def _global_uris(tracking_uri: str | None) -> Iterator[None]:
    """MLflow's process-wide tracking and registry URIs set to ``tracking_uri`` for the block, then restored."""
    if tracking_uri is None:
        yield
        return
    before = (mlflow.get_tracking_uri(), mlflow.get_registry_uri())
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before[0])
        mlflow.set_registry_uri(before[1])


def _quoted(value: str) -> str:
    """A string literal for MLflow filter strings."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ValueError(f"{value!r} contains both quote characters; MLflow filters cannot express it")


def best_metric_key(metric: str) -> str:
    """``eval/accuracy`` (the Tune / grid metric), ``best/accuracy`` or ``accuracy`` -> ``best/accuracy``."""
    name = metric
    for prefix in ("eval/", "best/"):
        name = name.removeprefix(prefix)
    if not name:
        raise ValueError(f"empty metric name in {metric!r}")
    return f"best/{name}"


def _check_mode(mode: str) -> None:
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")


def _experiment_id(client: MlflowClient, experiment_id_or_name: str | None, parent: Run) -> str:
    if experiment_id_or_name is None:
        return parent.info.experiment_id
    by_name = client.get_experiment_by_name(str(experiment_id_or_name))
    if by_name is not None:
        return by_name.experiment_id
    try:
        return client.get_experiment(str(experiment_id_or_name)).experiment_id
    except MlflowException as err:
        raise ChampionError(f"no MLflow experiment named or with id {experiment_id_or_name!r}") from err


def child_runs(parent_run_id: str, experiment_id: str | None = None, *,
               tracking_uri: str | None = None) -> list[Run]:
    """The active child runs of ``parent_run_id`` (all pages), oldest first."""
    client = client_for(tracking_uri)
    if experiment_id is None:
        experiment_id = client.get_run(parent_run_id).info.experiment_id
    runs: list[Run] = []
    token = None
    while True:
        page = client.search_runs([experiment_id], filter_string=f"tags.`{PARENT_TAG}` = {_quoted(parent_run_id)}",
                                  run_view_type=ViewType.ACTIVE_ONLY, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            break
    return sorted(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id))


def student_model(run: Run, name: str = STUDENT_MODEL_NAME, *, tracking_uri: str | None = None) -> LoggedModel | None:
    """The run's READY LoggedModel called ``name`` (the latest one when the run logged several), or None."""
    client = client_for(tracking_uri)
    models: list[LoggedModel] = []
    token = None
    while True:
        page = client.search_logged_models(
            experiment_ids=[run.info.experiment_id],
            filter_string=f"source_run_id = {_quoted(run.info.run_id)} AND name = {_quoted(name)}",
            page_token=token)
        models.extend(page)
        token = page.token
        if not token:
            break
    ready = [m for m in models if str(getattr(m.status, "name", m.status)).upper().endswith("READY")]
    return max(ready, key=lambda m: (m.creation_timestamp or 0, m.model_id)) if ready else None


def _value(run: Run, key: str) -> float | None:
    value = run.data.metrics.get(key)
    return value if value is not None and math.isfinite(value) else None


def best_trial_run(experiment_id_or_name: str | None, parent_run_id: str, metric: str, mode: str, *,
                   require_model: bool = False, tracking_uri: str | None = None) -> Run:
    """The child run of ``parent_run_id`` with the best ``best/<name>`` (``metric`` is ``eval/<name>``).

    Runs without the metric (or, with ``require_model``, without a logged "student" model) are skipped.
    Ties go to the smaller student (``student/parameters``), then the faster (``student/latency_ms``),
    then the earlier run. ``experiment_id_or_name`` None means the parent run's experiment.

    Raises:
        ChampionError: the parent has no child runs, or none qualifies (says what the runs have).
    """
    _check_mode(mode)
    client = client_for(tracking_uri)
    parent = client.get_run(parent_run_id)
    experiment_id = _experiment_id(client, experiment_id_or_name, parent)
    key = best_metric_key(metric)
    children = child_runs(parent_run_id, experiment_id, tracking_uri=tracking_uri)
    if not children:
        raise ChampionError(f"parent run {parent_run_id} has no child runs in experiment {experiment_id}")
    scored = [run for run in children if _value(run, key) is not None]
    if not scored:
        seen = sorted({k for run in children for k in run.data.metrics if k.startswith("best/")})
        raise ChampionError(f"none of the {len(children)} child runs of {parent_run_id} has the metric {key!r} "
                            f"(best/* metrics found: {seen or 'none'}; did the trials finish?)")
    if require_model:
        with_model = [run for run in scored if student_model(run, tracking_uri=tracking_uri) is not None]
        if not with_model:
            raise ChampionError(f"none of the {len(scored)} child runs of {parent_run_id} with {key!r} has a "
                                f"logged {STUDENT_MODEL_NAME!r} model")
        scored = with_model
    sign = -1.0 if mode == "max" else 1.0

    def rank(run: Run) -> tuple:
        size = _value(run, "student/parameters")
        latency = _value(run, "student/latency_ms")
        return (sign * _value(run, key), math.inf if size is None else size,
                math.inf if latency is None else latency, run.info.start_time or 0, run.info.run_id)

    return min(scored, key=rank)


def _all_versions(client: MlflowClient, model_name: str) -> list[ModelVersion]:
    versions: list[ModelVersion] = []
    token = None
    while True:
        page = client.search_model_versions(f"name = {_quoted(model_name)}", page_token=token)
        versions.extend(page)
        token = page.token
        if not token:
            break
    return sorted(versions, key=lambda v: int(v.version))


def _ensure_registered_model(client: MlflowClient, model_name: str) -> None:
    try:
        client.get_registered_model(model_name)
    except MlflowException:
        try:
            client.create_registered_model(
                model_name, description="Students distilled by ckd-orchestrate; the alias marks the champion.")
        except MlflowException:  # created concurrently
            client.get_registered_model(model_name)


def register_champion(parent_run_id: str, metric: str, mode: str, model_name: str, alias: str = "champion",
                      extra_tags: Mapping[str, Any] | None = None, *,
                      tracking_uri: str | None = None) -> ModelVersion:
    """Register the best trial's student as a version of ``model_name`` and move ``alias`` to it.

    Version tags: ``ckd.sweep_id``, ``ckd.trial_id``, ``ckd.parent_run_id``, ``ckd.run_id``,
    ``ckd.model_id``, ``ckd.metric``, ``ckd.metric_value``, ``ckd.mode``, ``ckd.teacher`` (the trial's
    ``teacher.source`` param, else its ``ckd.teacher`` tag), ``ckd.student_parameters`` and
    ``ckd.student_latency_ms`` when logged, plus ``extra_tags``. The parent run gets ``ckd.champion_*``
    tags (model, version, alias, uri, run id, trial id, metric, value).

    Idempotent: when a version of ``model_name`` already holds this sweep's (parent run's) champion
    run and model, it is reused (tags refreshed, alias moved) instead of creating a duplicate.
    """
    _check_mode(mode)
    client = client_for(tracking_uri)
    parent = client.get_run(parent_run_id)
    best = best_trial_run(None, parent_run_id, metric, mode, require_model=True, tracking_uri=tracking_uri)
    model = student_model(best, tracking_uri=tracking_uri)
    assert model is not None  # require_model=True
    key = best_metric_key(metric)
    value = best.data.metrics[key]
    run_id = best.info.run_id
    tags: dict[str, str] = {
        "ckd.sweep_id": parent.data.tags.get("ckd.sweep_id") or best.data.tags.get("ckd.sweep_id", ""),
        "ckd.trial_id": best.data.tags.get("ckd.trial_id", ""),
        "ckd.parent_run_id": parent_run_id,
        "ckd.run_id": run_id,
        "ckd.run_name": best.info.run_name or "",
        "ckd.model_id": model.model_id,
        "ckd.metric": metric,
        "ckd.metric_value": repr(float(value)),
        "ckd.mode": mode,
    }
    teacher = best.data.params.get("teacher.source") or best.data.tags.get("ckd.teacher")
    if teacher:
        tags["ckd.teacher"] = teacher
    for name in ("student/parameters", "student/latency_ms"):
        if (v := _value(best, name)) is not None:
            tags[f"ckd.{name.replace('/', '_')}"] = repr(float(v))
    tags.update({str(k): str(v) for k, v in (extra_tags or {}).items()})

    _ensure_registered_model(client, model_name)
    existing = [v for v in _all_versions(client, model_name)
                if v.tags.get("ckd.parent_run_id") == parent_run_id and v.tags.get("ckd.run_id") == run_id
                and v.tags.get("ckd.model_id") == model.model_id and v.tags.get("ckd.sweep_id") == tags["ckd.sweep_id"]]
    if existing:
        version = existing[-1]
        for k, v in tags.items():
            if version.tags.get(k) != v:
                client.set_model_version_tag(model_name, version.version, k, v)
    else:
        version = client.create_model_version(model_name, source=model.model_uri, run_id=run_id, tags=tags,
                                              model_id=model.model_id)
        _link_logged_model(client, model, model_name, version.version)
    client.set_registered_model_alias(model_name, alias, version.version)
    client.log_batch(parent_run_id, tags=[RunTag(k, str(v)) for k, v in {
        "ckd.champion_model": model_name,
        "ckd.champion_version": version.version,
        "ckd.champion_alias": alias,
        "ckd.champion_uri": f"models:/{model_name}@{alias}",
        "ckd.champion_run_id": run_id,
        "ckd.champion_trial_id": tags["ckd.trial_id"],
        "ckd.champion_metric": metric,
        "ckd.champion_metric_value": tags["ckd.metric_value"],
    }.items()], synchronous=True)
    return client.get_model_version(model_name, version.version)


def _link_logged_model(client: MlflowClient, model: LoggedModel, model_name: str, version: str | int) -> None:
    """Record the version on the LoggedModel (as ``mlflow.register_model`` does), for the UI's link."""
    import json

    key = "mlflow.modelVersions"
    try:
        current = json.loads(client.get_logged_model(model.model_id).tags.get(key) or "[]")
        current.append({"name": model_name, "version": int(version)})
        client.set_logged_model_tags(model.model_id, {key: json.dumps(current)})
    except (MlflowException, ValueError):
        pass  # only a UI link; the version itself is registered


# --------------------------------------------------------------------------------------------- pull


def _check_model_uri(client: MlflowClient, uri: str) -> None:
    """Resolve a ``models:/`` URI against the registry, with errors that list what exists."""
    rest = uri.removeprefix("models:/")
    if not rest or rest.startswith("/"):
        raise PullError(f"malformed model URI {uri!r}; use models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN/PATH")
    if rest.startswith("m-") and "/" not in rest and "@" not in rest:
        try:
            client.get_logged_model(rest)
            return
        except MlflowException:
            pass  # maybe a registered model whose name starts with "m-"
    if "@" in rest:
        name, _, alias = rest.partition("@")
        version = None
    elif "/" in rest:
        name, _, version = rest.rpartition("/")
        alias = None
    else:
        name, alias, version = rest, None, None
    try:
        registered = client.get_registered_model(name)
    except MlflowException as err:
        names = sorted(m.name for m in client.search_registered_models(max_results=1000))
        raise PullError(f"no registered model named {name!r}; registered models: {names or 'none'}") from err
    versions = [v.version for v in _all_versions(client, name)]
    if alias is not None and alias not in registered.aliases:
        known = ", ".join(f"@{a} -> v{v}" for a, v in sorted(registered.aliases.items())) or "none"
        raise PullError(f"model {name!r} has no alias {alias!r}; aliases: {known}; versions: {versions}")
    if version is not None and version != "latest" and version not in {str(v) for v in versions}:
        raise PullError(f"model {name!r} has no version {version!r}; versions: {versions or 'none'}; "
                        f"aliases: {dict(registered.aliases) or 'none'}")
    if alias is None and version is None:
        raise PullError(f"{uri!r} names no version: use models:/{name}@ALIAS or models:/{name}/VERSION "
                        f"(aliases: {dict(registered.aliases) or 'none'}; versions: {versions})")


def _hf_files(root: Path) -> list[Path]:
    """The directories whose files, put together, make the Hugging Face model directory."""
    mlmodel = root / "MLmodel"
    if mlmodel.is_file():
        flavors = (yaml.safe_load(mlmodel.read_text()) or {}).get("flavors", {})
        conf = flavors.get("transformers")
        if conf is None:
            raise PullError(f"the model is not a transformers-flavour model (flavours: {sorted(flavors)})")
        # mlflow.transformers keeps the weights + config in <model_binary>/ (default "model") and each
        # pipeline component (tokenizer, ...) in components/<name>/.
        model_dir = root / conf.get("model_binary", "model")
        if not model_dir.is_dir():
            raise PullError(f"the transformers model was logged without its weights (save_pretrained=False; "
                            f"it refers to {conf.get('source_model_name')!r}); cannot pull it as a directory")
        return [model_dir] + [root / "components" / c for c in conf.get("components", [])
                              if (root / "components" / c).is_dir()]
    if (root / "config.json").is_file():  # a plain Hugging Face directory logged as artifacts
        return [root]
    found = sorted(p.name for p in root.iterdir()) if root.is_dir() else [root.name]
    raise PullError(f"the artifacts are neither an MLflow model (MLmodel) nor a Hugging Face directory "
                    f"(config.json); found: {found}")


def pull(model_uri: str, dest: str | os.PathLike, *, tracking_uri: str | None = None) -> Path:
    """Download a logged or registered student as a plain Hugging Face directory at ``dest``.

    ``model_uri``: ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``models:/<model_id>`` or
    ``runs:/<run_id>/<path>`` (a logged model or a Hugging Face directory logged as artifacts). ``dest``
    must not exist or be an empty directory; it is filled atomically (assembled in a sibling directory,
    then renamed) with config.json, the weights and the tokenizer files, ready for
    ``AutoModelForSequenceClassification.from_pretrained(dest)`` / ``AutoTokenizer.from_pretrained(dest)``.

    Raises:
        PullError: unknown model / alias / version (the message lists what exists), or artifacts that
            are not a Hugging Face model.
        FileExistsError: ``dest`` exists and is not an empty directory.
    """
    import mlflow.artifacts

    dest = Path(dest).expanduser().resolve()
    if dest.exists() and not dest.is_dir():
        raise FileExistsError(f"destination {dest} exists and is not a directory; choose a new directory")
    if dest.exists() and any(dest.iterdir()):
        raise FileExistsError(f"destination {dest} exists and is not empty; choose a new directory")
    # The URI's shape first: a malformed one never reaches the store.
    if model_uri.startswith("models:"):
        if not model_uri.startswith("models:/"):
            raise PullError(f"malformed model URI {model_uri!r}; use models:/NAME@ALIAS or models:/NAME/VERSION")
    elif not model_uri.startswith("runs:/") or len(model_uri.removeprefix("runs:/").strip("/")) == 0:
        raise PullError(f"unsupported model URI {model_uri!r}; use models:/NAME@ALIAS, models:/NAME/VERSION, "
                        "models:/<model_id> or runs:/<run_id>/<path>")
    client = client_for(tracking_uri)
    if model_uri.startswith("models:"):
        _check_model_uri(client, model_uri)
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = dest.parent / f".{dest.name}.pull-{uuid.uuid4().hex[:8]}"
    download, out = work / "download", work / "model"
    try:
        download.mkdir(parents=True)
        try:
            with _global_uris(tracking_uri):  # models:/ URIs are resolved through the global registry URI
                local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(download),
                                                                 tracking_uri=tracking_uri,
                                                                 registry_uri=tracking_uri))
        except MlflowException as err:
            raise PullError(f"cannot download {model_uri!r}: {err.message}") from err
        out.mkdir()
        for source in _hf_files(local):
            for item in source.iterdir():
                target = out / item.name
                if target.exists():
                    raise PullError(f"{item.name} exists in two parts of the logged model; cannot merge them")
                shutil.move(str(item), target)
        if not (out / "config.json").is_file() or not any((out / w).is_file() for w in _WEIGHT_FILES):
            raise PullError(f"{model_uri!r} has no config.json and weights ({', '.join(_WEIGHT_FILES)}); "
                            f"found: {sorted(p.name for p in out.iterdir())}")
        if dest.exists():
            dest.rmdir()  # empty (checked above); a rename cannot replace it on every platform
        os.replace(out, dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dest
