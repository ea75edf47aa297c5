"""orchestrator.grid (+ space, grid_checks, tune): grid.yaml read strictly (file:line: key errors before
anything runs), the grid read back from a sweep's record without its checks, the Tune param space, trial
configs and labels, searchers and schedulers. No model or data is loaded; the teacher is the real packaged
MiniLM (its config.json only) and the task the local GLUE directory."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

from cluster import base as cluster_base
from cluster.base import BACKENDS, config_model
from cluster.ray.config import RayClusterSpec
from jobkit import GLUE_DIR, edit, line_of
from jobs.specbase import SpecError
from orchestrator import grid_checks
from orchestrator.grid import GridSpec, load_grid
from orchestrator.space import Domain, Sampled, apply_trial, trial_label
from orchestrator.tune import param_space, scheduler, search_algorithm, to_tune

# The real GLUE files beside the checkout, as tests/conftest.py finds them (its glue_dir fixture fails
# with a clear message when they are missing).
pytestmark = pytest.mark.usefixtures("glue_dir")

GOOD = f"""\
job:
  task: {{glue: rte, glue_dir: {GLUE_DIR}, max_train_examples: 64}}
  teacher: {{source: "package:all-MiniLM-L6-v2"}}
  student: {{from_teacher: {{layers: [0, 5]}}}}
  objective: {{preset: ckd-paper}}
  training: {{epochs: 3, batch_size: 8}}
sweep:
  space:
    training.learning_rate: {{loguniform: [1.0e-5, 1.0e-4]}}
    objective.preset: {{grid: [ckd-paper]}}
    student:
      grid:
        - {{from_teacher: {{layers: [0, 5]}}}}
        - {{from_teacher: {{layers: [0, 2, 5]}}}}
    training.seed: {{choice: [1, 2]}}
  samples: 2
  scheduler: {{kind: asha, grace_period: 1, reduction_factor: 2}}
  resources: {{workers: 2, cpus_per_worker: 0.5}}
cluster: {{backend: local}}
mlflow: {{alias: champion}}
"""


def write(directory: Path, text: str, name: str = "grid.yaml") -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text))
    return path


def errors(path: Path, overrides=()) -> SpecError:
    with pytest.raises(SpecError) as info:
        load_grid(path, overrides)
    return info.value


def issue(err: SpecError, key: str):
    found = [i for i in err.issues if i.key == key]
    assert found, f"no issue at {key!r}; got:\n{err}"
    return found[0]


# ---------------------------------------------------------------------------------------------- good


def test_good_grid_loads_with_defaults(tmp_path):
    grid = load_grid(write(tmp_path, GOOD, "rte_sweep.yaml"))
    assert grid.metric_name == "eval/accuracy" and grid.metric_mode == "max"
    assert grid.mlflow.experiment == "rte_sweep" and grid.mlflow.registered_model == "rte_sweep"
    assert grid.mlflow.alias == "champion"
    assert grid.root == tmp_path / "sweeps" / "rte_sweep"
    assert grid.tracking_uri({}) == f"sqlite:///{tmp_path / 'sweeps' / 'rte_sweep' / 'mlflow.db'}"
    assert grid.tracking_uri({"MLFLOW_TRACKING_URI": "http://mlflow:5000"}) == "http://mlflow:5000"
    assert grid.backend == "local"
    assert grid.total_trials() == 1 * 2 * 2  # grid objective x grid student x samples
    assert grid.base_job.student.from_teacher.layers == [0, 5]
    assert grid.evaluation_rounds() == 3
    # The base job's output is a placeholder under the root; the sweep sets each trial's.
    assert grid.job["output"]["dir"] == str(tmp_path / "sweeps" / "rte_sweep" / "trials")
    # The preset's task stays tied to task.glue (a swept task changes it).
    assert "task" not in grid.job["objective"]
    assert grid.concurrent_trials(cpus=2) == 1 and grid.concurrent_trials(cpus=16) == 4


def test_resolved_grid_round_trips(tmp_path):
    grid = load_grid(write(tmp_path, GOOD))
    data = json.loads(json.dumps(grid.to_dict()))
    assert data["cluster"] == {"backend": "local", "num_cpus": None, "num_gpus": None}
    assert data["sweep"]["space"]["training.learning_rate"] == {"loguniform": [1e-5, 1e-4]}
    again = GridSpec.from_mapping(data, base_dir=grid.base_dir, file=grid.file)
    assert again.to_dict() == grid.to_dict()
    record = GridSpec.from_record({"grid": data, "grid_file": grid.file})
    assert record.to_dict() == grid.to_dict() and record.base_dir == grid.base_dir and record.file == grid.file
    assert record.base_job.to_dict() == grid.base_job.to_dict()


def test_points_are_checked_once_per_submit(tmp_path, monkeypatch):
    """load_grid (plan, submit) checks every point; the driver reads the grid back from the sweep's record
    and its trials get a TrialContext: neither checks a point again."""
    import pickle
    from types import SimpleNamespace

    from jobs.spec import JobSpec
    from orchestrator.trial import TrialContext

    calls = {"check_points": 0, "validate_points": 0}

    def counted(name):
        original = getattr(grid_checks, name)

        def wrapper(*args, **kwargs):
            calls[name] += 1
            return original(*args, **kwargs)
        return wrapper

    for name in calls:
        monkeypatch.setattr(grid_checks, name, counted(name))
    grid = load_grid(write(tmp_path, GOOD))  # submit
    assert calls == {"check_points": 1, "validate_points": 1}

    record = json.loads(json.dumps({"grid": grid.to_dict(), "grid_file": grid.file}))  # sweep.json
    driver_grid = GridSpec.from_record(record)  # the driver
    sweep = SimpleNamespace(path=tmp_path / "sweeps" / "s1", sweep_id="s1")
    context = pickle.loads(pickle.dumps(TrialContext.for_sweep(sweep, driver_grid, "parent-run")))
    trial = {"training.learning_rate": 3e-5, "student": {"from_teacher": {"layers": [0, 2, 5]}}, "training.seed": 2}
    job = context.trial_job(trial, "trial_00001")  # a trial
    assert calls == {"check_points": 1, "validate_points": 1}

    assert job["output"] == {"dir": str(tmp_path / "sweeps" / "s1" / "trials" / "trial_00001"),
                             "mlflow": {"tracking_uri": grid.tracking_uri(), "experiment": "grid", "log_model": True}}
    spec = JobSpec.from_mapping(job, base_dir=context.base_dir)
    assert spec.training.learning_rate == 3e-5 and spec.student.from_teacher.layers == [0, 2, 5]
    expected = grid.job_spec_for(trial).to_dict()
    assert {k: v for k, v in spec.to_dict().items() if k != "output"} == \
        {k: v for k, v in expected.items() if k != "output"}
    assert (context.parent_run_id, context.workers, context.cpus_per_worker) == ("parent-run", 2, 0.5)


def test_job_from_a_file_with_overrides(tmp_path):
    (tmp_path / "jobs").mkdir()
    write(tmp_path / "jobs", textwrap.dedent(GOOD.split("sweep:")[0].removeprefix("job:\n")), "rte.yaml")
    text = "job: jobs/rte.yaml\n" + "sweep:" + GOOD.split("sweep:")[1]
    grid = load_grid(write(tmp_path, text), ["job.training.epochs=1", "sweep.samples=1"])
    assert grid.base_job.training.epochs == 1 and grid.sweep.samples == 1
    err = errors(tmp_path / "grid.yaml", ["job.training.epochs=0"])
    found = issue(err, "job.training.epochs")
    assert found.file == str(tmp_path / "jobs" / "rte.yaml") and "set by override 'job.training.epochs=0'" in str(err)


def test_inline_job_override_and_cluster_shorthand(tmp_path):
    text = edit(GOOD, "cluster: {backend: local}", "cluster: local")
    grid = load_grid(write(tmp_path, text), ["job.training.batch_size=16"])
    assert grid.base_job.training.batch_size == 16 and grid.backend == "local"


def test_space_overrides_replace_and_remove_domains(tmp_path):
    path = write(tmp_path, GOOD)
    grid = load_grid(path, ["sweep.space.training.learning_rate.grid=[1.0e-5, 3.0e-5]",
                            "sweep.space.training.seed=", "sweep.space.training.epochs={choice: [1, 2]}"])
    space = grid.sweep.space
    assert space["training.learning_rate"].values == [1e-5, 3e-5] and "training.seed" not in space
    assert space["training.epochs"].kind == "choice"
    err = errors(path, ["sweep.space.training.learning_rate.grid=[]"])
    assert "set by override" in str(issue(err, "sweep.space.training.learning_rate"))


# ----------------------------------------------------------------------------------------------- bad


@pytest.mark.parametrize(
    ("old", "new", "key", "needle", "fragments"),
    [
        # unknown key in sweep
        ("  samples: 2", "  sampels: 2", "sweep.sampels", "sampels", ("unknown key", "did you mean 'samples'")),
        ("  scheduler: {kind: asha, grace_period: 1, reduction_factor: 2}", "  scheduler: {kind: asha, grace: 1}",
         "sweep.scheduler.grace", "grace: 1", ("unknown key", "grace_period")),
        # bad domains
        ("{loguniform: [1.0e-5, 1.0e-4]}", "{loguniform: [0, 1.0e-4]}", "sweep.space.training.learning_rate",
         "training.learning_rate", ("must be > 0",)),
        ("{loguniform: [1.0e-5, 1.0e-4]}", "{uniform: [1.0e-4, 1.0e-5]}", "sweep.space.training.learning_rate",
         "training.learning_rate", ("low (0.0001) must be below high (1e-05)",)),
        ("{grid: [ckd-paper]}", "{grid: []}", "sweep.space.objective.preset", "objective.preset",
         ("non-empty list",)),
        ("{choice: [1, 2]}", "{choices: [1, 2]}", "sweep.space.training.seed", "training.seed",
         ("expected one domain", "choice")),
        ("{choice: [1, 2]}", "{choice: [1, 1]}", "sweep.space.training.seed", "training.seed", ("listed twice",)),
        ("{choice: [1, 2]}", "{randint: [1, 2.5]}", "sweep.space.training.seed", "training.seed", ("integer",)),
        ("{choice: [1, 2]}", "{quniform: [0.1, 1, 0.25]}", "sweep.space.training.seed", "training.seed",
         ("multiples of q",)),
        # space keys that are not job keys
        ("    training.seed: {choice: [1, 2]}", "    training.sed: {choice: [1, 2]}", "sweep.space.training.sed",
         "training.sed", ("not a job key", "did you mean 'seed'")),
        ("    training.seed: {choice: [1, 2]}", "    student.from_teacher.layers.first: {choice: [1, 2]}",
         "sweep.space.student.from_teacher.layers.first", "layers.first", ("is a value, not a section",)),
        ("    training.seed: {choice: [1, 2]}", "    output.dir: {choice: [a, b]}", "sweep.space.output.dir",
         "output.dir", ("set by the sweep",)),
        # metric
        ("  samples: 2", "  samples: 2\n  metric: eval/f1", "sweep.metric", "metric: eval/f1",
         ("'eval/f1' is not reported by task rte", "eval/accuracy, eval/loss")),
        ("  samples: 2", "  samples: 2\n  metric: accuracy", "sweep.metric", "metric: accuracy", ("eval/<name>",)),
        ("  samples: 2", "  samples: 2\n  mode: maximise", "sweep.mode", "mode: maximise", ("'max' or 'min'",)),
        # resources, retries, concurrency
        ("{workers: 2, cpus_per_worker: 0.5}", "{workers: 0}", "sweep.resources.workers", "resources:",
         ("greater than or equal to 1",)),
        ("{workers: 2, cpus_per_worker: 0.5}", "{cpus_per_worker: 0}", "sweep.resources.cpus_per_worker",
         "resources:", ("greater than 0",)),
        ("  samples: 2", "  samples: 2\n  max_concurrent_trials: 0", "sweep.max_concurrent_trials",
         "max_concurrent_trials", ("greater than or equal to 1",)),
        # scheduler
        ("{kind: asha, grace_period: 1, reduction_factor: 2}", "{kind: fifo, grace_period: 2}",
         "sweep.scheduler.grace_period", "scheduler:", ("only for kind: asha",)),
        ("{kind: asha, grace_period: 1, reduction_factor: 2}", "{kind: asha, grace_period: 4}",
         "sweep.scheduler.grace_period", "scheduler:", ("exceeds the 3 evaluation round(s)",)),
        ("{kind: asha, grace_period: 1, reduction_factor: 2}", "{kind: asha, grace_period: 2, max_t: 1}",
         "sweep.scheduler.grace_period", "scheduler:", ("exceeds max_t",)),
        ("{kind: asha, grace_period: 1, reduction_factor: 2}", "{kind: hyperband}", "sweep.scheduler.kind",
         "scheduler:", ("'fifo' or 'asha'",)),
        # cluster
        ("cluster: {backend: local}", "cluster: {backend: slurmm}", "cluster.backend", "cluster:",
         ("unknown backend 'slurmm'", "did you mean 'slurm'", ", ".join(BACKENDS))),
        ("cluster: {backend: local}", "cluster: {backend: ray}", "cluster.address", "cluster:",
         ("required key is missing",)),
        ("cluster: {backend: local}", "cluster:\n  backend: ray\n  address: head:8265", "cluster.address",
         "address: head", ("http(s)://host:port",)),
        ("cluster: {backend: local}", "cluster: {backend: local, num_cpus: 0}", "cluster.num_cpus", "cluster:",
         ("greater than or equal to 1",)),
        ("cluster: {backend: local}", "cluster: {backend: local, address: x}", "cluster.address", "cluster:",
         ("unknown key", "num_cpus")),
        ("cluster: {backend: local}", "cluster: {backend: local, num_cpus: 1}", "sweep.resources", "resources:",
         ("cluster.num_cpus is 1",)),
        # mlflow
        ("mlflow: {alias: champion}", "mlflow: {alias: v2}", "mlflow.alias", "mlflow:", ("reserved",)),
        ("mlflow: {alias: champion}", "mlflow: {registered_model: a/b}", "mlflow.registered_model", "mlflow:",
         ("no '/' or ':'",)),
        # the base job
        ("training: {epochs: 3, batch_size: 8}", "training: {epochs: 3, batch_size: 8, learning_rat: 1}",
         "job.training.learning_rat", "training:", ("unknown key", "learning_rate")),
        ("training: {epochs: 3, batch_size: 8}", "training: {epochs: 3, batch_size: 9}", "job.training.batch_size",
         "training:", ("does not split into 2 process(es)", "sweep.resources.workers = 2")),
        ("  samples: 2", "  samples: 2\n  search: {algorithm: optuna}", "sweep.space.student", "    student:",
         ("cannot enumerate a grid", "choice")),
        ("  samples: 2", "  samples: 2\n  search: {algorithm: bayes}", "sweep.search.algorithm", "search:",
         ("'grid', 'random' or 'optuna'",)),
    ],
)
def test_bad_grid_names_key_and_line(tmp_path, old, new, key, needle, fragments):
    text = edit(GOOD, old, new)
    err = errors(write(tmp_path, text))
    found = issue(err, key)
    assert found.file == str(tmp_path / "grid.yaml")
    assert found.line == line_of(text, needle), str(err)
    for fragment in fragments:
        assert fragment in found.message, str(err)


def test_grid_value_that_makes_an_invalid_job(tmp_path):
    text = edit(GOOD, "        - {from_teacher: {layers: [0, 2, 5]}}", "        - {from_teacher: {layers: [0, 2, 7]}}")
    err = errors(write(tmp_path, text))
    found = issue(err, "sweep.space.student")
    assert found.line == line_of(text, "layers: [0, 2, 7]")  # the offending item's own line
    assert '{"from_teacher": {"layers": [0, 2, 7]}}' in found.message
    assert "student.from_teacher.layers: layer 7 out of range for the 6-layer teacher" in found.message
    assert len(err.issues) == 1


def test_distribution_bounds_and_inner_point_are_checked(tmp_path):
    text = edit(GOOD, "{choice: [1, 2]}", "{choice: [1, 2]}\n    training.warmup_ratio: {uniform: [0.0, 1.5]}\n"
                                          "    training.epochs: {uniform: [1, 3]}")
    err = errors(write(tmp_path, text))
    warmup = issue(err, "sweep.space.training.warmup_ratio")
    assert "value 1.5 makes an invalid job: training.warmup_ratio" in warmup.message
    assert warmup.line == line_of(text, "warmup_ratio")
    epochs = issue(err, "sweep.space.training.epochs")  # a float domain over an integer key
    assert "training.epochs" in epochs.message and "integer" in epochs.message


def test_combinations_of_values_are_checked(tmp_path):
    text = edit(GOOD, "{choice: [1, 2]}", "{choice: [1, 2]}\n    training.batch_size: {grid: [8, 10]}\n"
                                          "    training.grad_accumulation: {grid: [1, 4]}")
    err = errors(write(tmp_path, text))
    found = issue(err, "sweep.space.training.batch_size")
    assert found.message.startswith("value 10 (with training.grad_accumulation=4) makes an invalid job: "
                                     "training.batch_size: batch_size 10 is not divisible by grad_accumulation 4")
    assert found.line == line_of(text, "training.batch_size")


def test_batch_must_split_into_the_workers(tmp_path):
    text = edit(GOOD, "{choice: [1, 2]}", "{choice: [1, 2]}\n    training.batch_size: {grid: [8, 9]}")
    found = issue(errors(write(tmp_path, text)), "sweep.space.training.batch_size")
    assert "value 9 makes an invalid job" in found.message and "sweep.resources.workers = 2" in found.message


def test_all_problems_reported_together(tmp_path):
    text = edit(GOOD, "  samples: 2", "  samples: 0\n  metric: accuracy")
    text = edit(text, "layers: [0, 2, 5]", "layers: [0, 9]")
    text = edit(text, "training: {epochs: 3, batch_size: 8}", "training: {epochs: 3, batch_size: 8, lr: 1}")
    text = edit(text, "cluster: {backend: local}", "cluster: {backend: ray}")
    err = errors(write(tmp_path, text))
    keys = {i.key for i in err.issues}
    assert {"sweep.samples", "sweep.metric", "job.training.lr", "cluster.address"} <= keys, str(err)
    # With the job fixed, the grid values are checked even though the grid has other problems.
    text = edit(text, ", lr: 1}", "}")
    keys = {i.key for i in errors(write(tmp_path, text)).issues}
    assert {"sweep.samples", "sweep.metric", "cluster.address", "sweep.space.student"} <= keys


def test_missing_job_and_job_file(tmp_path):
    err = errors(write(tmp_path, "sweep: {samples: 1}\n"))
    assert "required key is missing" in issue(err, "job").message
    err = errors(write(tmp_path, "job: nowhere.yaml\n"))
    assert "not found" in issue(err, "job").message and issue(err, "job").line == 1


def test_swept_task_metric_must_be_reported_by_every_task(tmp_path):
    text = edit(GOOD, "{choice: [1, 2]}", "{choice: [1, 2]}\n    task.glue: {grid: [rte, mrpc]}")
    grid = load_grid(write(tmp_path, text))
    assert grid.metric_name == "eval/accuracy"  # reported by both (mrpc: f1 and accuracy)
    mrpc = grid.job_spec_for({"task.glue": "mrpc"})
    assert mrpc.resolved_objective()["wr_pair"]["weight"] == 1.0  # the preset follows the swept task
    text = edit(text, "  samples: 2", "  samples: 2\n  metric: eval/f1")
    assert "not reported by task rte" in issue(errors(write(tmp_path, text)), "sweep.metric").message


def test_yaml_errors(tmp_path):
    err = errors(write(tmp_path, GOOD + "sweep: {}\n"))
    assert "duplicate key 'sweep'" in str(err)
    err = errors(write(tmp_path, "- a\n"))
    assert "expected a mapping" in str(err)


# --------------------------------------------------------------------------------------------- backends


def test_backend_hook(tmp_path, monkeypatch):
    package = tmp_path / "fakeclusters"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "k8s.py").write_text(textwrap.dedent("""\
        from typing import Literal
        from pydantic import Field
        from cluster.base import ClusterSpec
        class KubernetesClusterSpec(ClusterSpec):
            backend: Literal["kubernetes"]
            namespace: str = "default"
            image: str
            gpus: int = Field(0, ge=0)
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cluster_base.BACKENDS, "kubernetes", ("fakeclusters.k8s:KubernetesClusterSpec", "-"))
    monkeypatch.setitem(cluster_base.BACKENDS, "slurm", ("fakeclusters.not_there:SlurmClusterSpec", "-"))
    assert config_model("kubernetes").__name__ == "KubernetesClusterSpec"
    text = edit(GOOD, "cluster: {backend: local}", "cluster:\n  backend: kubernetes\n  image: ckd:1\n  gpus: 1")
    grid = load_grid(write(tmp_path, text))
    assert grid.backend == "kubernetes" and grid.cluster.image == "ckd:1"
    assert grid.to_dict()["cluster"] == {"backend": "kubernetes", "namespace": "default", "image": "ckd:1", "gpus": 1}
    assert GridSpec.from_mapping(grid.to_dict(), base_dir=tmp_path, file=grid.file).cluster.gpus == 1
    assert GridSpec.from_record({"grid": grid.to_dict(), "grid_file": grid.file}).cluster.gpus == 1

    text = edit(GOOD, "cluster: {backend: local}", "cluster:\n  backend: kubernetes\n  gpus: -1")
    err = errors(write(tmp_path, text))
    assert "required key is missing" in issue(err, "cluster.image").message
    assert issue(err, "cluster.gpus").line == line_of(text, "gpus: -1")

    text = edit(GOOD, "cluster: {backend: local}", "cluster: {backend: slurm}")
    found = issue(errors(write(tmp_path, text)), "cluster.backend")
    assert "the slurm backend cannot be used here" in found.message and "fakeclusters" in found.message


def test_ray_backend():
    grid_text = {"backend": "ray", "address": "http://head.example:8265/"}
    assert RayClusterSpec.model_validate(grid_text).address == "http://head.example:8265"
    assert config_model("ray") is RayClusterSpec
    with pytest.raises(ValueError, match="RAY_AUTH_TOKEN must not be written in a grid"):
        RayClusterSpec.model_validate({**grid_text, "env_vars": {"RAY_AUTH_TOKEN": "x"}})


# ------------------------------------------------------------------------------ param space and trials


def test_tune_param_space(tmp_path):
    from ray.tune.search.sample import Categorical, Float, Integer

    text = edit(GOOD, "{choice: [1, 2]}", "{randint: [1, 3]}\n    training.weight_decay: {quniform: [0.0, 0.1, 0.05]}")
    space = param_space(load_grid(write(tmp_path, text)).sweep)
    assert space["objective.preset"] == {"grid_search": ["ckd-paper"]}
    assert space["student"] == {"grid_search": [{"from_teacher": {"layers": [0, 5]}},
                                                {"from_teacher": {"layers": [0, 2, 5]}}]}
    lr = space["training.learning_rate"]
    assert isinstance(lr, Float) and (lr.lower, lr.upper) == (1e-5, 1e-4)
    assert "LogUniform" in type(lr.get_sampler()).__name__
    seed = space["training.seed"]
    assert isinstance(seed, Integer) and (seed.lower, seed.upper) == (1, 4)  # both ends included
    assert space["training.weight_decay"].get_sampler().q == 0.05
    assert isinstance(to_tune(Domain.model_validate({"choice": [1, 2]})), Categorical)


def test_plan_order_matches_tune(tmp_path):
    from ray.tune.search.basic_variant import BasicVariantGenerator

    text = edit(GOOD, "{choice: [1, 2]}", "{choice: [1, 2]}\n    training.batch_size: {grid: [8, 16]}")
    grid = load_grid(write(tmp_path, text))
    planned = grid.trial_configs_for_plan()
    assert len(planned) == grid.total_trials() == 2 * 2 * 2
    assert isinstance(planned[0]["training.learning_rate"], Sampled)
    assert str(planned[0]["training.learning_rate"]) == "loguniform(1e-05, 0.0001)"

    generator = BasicVariantGenerator(random_state=0)
    generator.add_configurations({"t": {"run": lambda config: None, "config": param_space(grid.sweep),
                                        "num_samples": grid.sweep.samples}})
    tuned = []
    while (trial := generator.next_trial()) is not None:
        tuned.append(trial.config)
    assert len(tuned) == len(planned)
    for plan, tune_config in zip(planned, tuned):
        assert {k: v for k, v in plan.items() if not isinstance(v, Sampled)} == \
            {k: v for k, v in tune_config.items() if not isinstance(plan[k], Sampled)}
        assert 1e-5 <= tune_config["training.learning_rate"] <= 1e-4 and tune_config["training.seed"] in (1, 2)
        grid.job_spec_for(tune_config)  # every generated trial is a valid job
    assert grid.trial_configs_for_plan(limit=3) == planned[:3]


def test_random_and_optuna_draw_samples(tmp_path):
    text = edit(GOOD, "    objective.preset: {grid: [ckd-paper]}\n", "")
    text = edit(text, "      grid:\n", "      choice:\n")
    grid = load_grid(write(tmp_path, edit(text, "  samples: 2", "  samples: 5\n  search: {algorithm: random}")))
    assert grid.total_trials() == 5 and all(isinstance(v, Sampled) for v in grid.trial_configs_for_plan()[0].values())
    assert type(search_algorithm(grid.sweep.search)).__name__ == "BasicVariantGenerator"
    text = edit(text, "  samples: 2", "  samples: 4\n  search: {algorithm: optuna, seed: 3}")
    optuna = load_grid(write(tmp_path, text))
    searcher = search_algorithm(optuna.sweep.search)
    assert type(searcher).__name__ == "OptunaSearch"
    searcher.set_search_properties(optuna.metric_name, optuna.metric_mode, param_space(optuna.sweep))
    suggestion = searcher.suggest("trial-1")
    assert suggestion["student"] in optuna.sweep.space["student"].values
    optuna.job_spec_for(suggestion)
    qlog = edit(text, "{loguniform: [1.0e-5, 1.0e-4]}", "{qloguniform: [1.0e-5, 1.0e-4, 1.0e-5]}")
    err = errors(write(tmp_path, qlog))
    assert "drops the quantisation" in issue(err, "sweep.space.training.learning_rate").message


def test_schedulers(tmp_path):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    grid = load_grid(write(tmp_path, GOOD))
    asha = scheduler(grid.sweep.scheduler)
    assert isinstance(asha, ASHAScheduler)
    assert asha._time_attr == "training_iteration" and asha._reduction_factor == 2
    assert grid.sweep.scheduler.grace_period == 1 and grid.sweep.scheduler.max_t is None
    fifo = load_grid(write(tmp_path, edit(GOOD, "{kind: asha, grace_period: 1, reduction_factor: 2}", "{kind: fifo}")))
    assert isinstance(scheduler(fifo.sweep.scheduler), FIFOScheduler)
    assert fifo.evaluation_rounds() == 3


def test_job_spec_for_reports_space_keys(tmp_path):
    grid = load_grid(write(tmp_path, GOOD))
    spec = grid.job_spec_for({"training.learning_rate": 3e-5, "student": {"from_teacher": {"layers": [0, 3]}}})
    assert spec.training.learning_rate == 3e-5 and spec.student.from_teacher.layers == [0, 3]
    with pytest.raises(SpecError) as info:
        grid.job_spec_for({"training.learning_rate": -1.0, "training.seed": 1})
    assert [i.key for i in info.value.issues] == ["sweep.space.training.learning_rate"]


def test_apply_trial():
    base = {"student": {"from_teacher": {"layers": [0, 5], "copy_classifier": True}},
            "training": {"learning_rate": 5e-5, "epochs": 3}, "objective": {"preset": "ckd-paper"}}
    trial = {"student.from_teacher.copy_classifier": False, "training.learning_rate": 3e-5,
             "student": {"architecture": {"num_layers": 2}}, "teacher.finetune.epochs": 1}
    out = apply_trial(base, trial)
    assert out == {"student": {"architecture": {"num_layers": 2}, "from_teacher": {"copy_classifier": False}},
                   "training": {"learning_rate": 3e-5, "epochs": 3}, "objective": {"preset": "ckd-paper"},
                   "teacher": {"finetune": {"epochs": 1}}}
    assert base["training"]["learning_rate"] == 5e-5  # pure
    with pytest.raises(ValueError, match="objective.preset is 'ckd-paper', not a mapping"):
        apply_trial(base, {"objective.preset.x": 1})


def test_trial_label():
    config = {"training.learning_rate": 3e-5, "objective.preset": "ckd-paper",
              "student": {"from_teacher": {"layers": [0, 5]}}}
    assert trial_label(config) == "lr=3e-05,preset=ckd-paper,student=L[0,5]"
    assert trial_label({"training.seed": 1, "teacher.finetune.seed": 2}) == "training.seed=1,finetune.seed=2"
    assert trial_label({"objective": {"terms": {"ce": {}, "logit_kd": {"temperature": 4}}}}) == "objective=ce+logit_kd"
    assert trial_label({"student": {"architecture": {"num_layers": 4, "hidden_size": 312}}}) == "student=4x312"
    assert trial_label({"training.learning_rate": Sampled(Domain.model_validate({"loguniform": [1e-5, 1e-4]}))}) \
        == "lr=loguniform(1e-05, 0.0001)"


def test_loss_metric_defaults_to_min(tmp_path):
    grid = load_grid(write(tmp_path, GOOD), ["sweep.metric=eval/loss"])
    assert grid.metric_name == "eval/loss" and grid.metric_mode == "min"


def test_loading_does_not_import_ray(tmp_path):
    import subprocess

    path = write(tmp_path, GOOD)
    code = (f"import sys; from orchestrator.grid import load_grid; load_grid({str(path)!r}); "
            f"print('ray' in sys.modules, 'sklearn' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.split() == ["False", "False"]
