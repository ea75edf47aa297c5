"""Objective configuration: strict validation naming the key, presets, merging, weights, instances."""

from __future__ import annotations

import pytest

import ckd
import ckd.terms.base as registry_module
from ckd import ModelShape, ObjectiveConfigError, TaskShape, Term, build_objective, registry, resolve_terms
from ckd.catalog import catalog
from ckd.terms.base import register
from ckd.terms.ckd_relations import WordRelationAngle
from ckd.terms.logits import LogitKD

S = ModelShape(num_layers=3, hidden_size=24, num_heads=3)
T = ModelShape(num_layers=6, hidden_size=48, num_heads=4)
TASK = TaskShape(num_labels=3, num_examples=100)
REGRESSION = TaskShape(num_labels=1, is_regression=True, num_examples=100)

ALL_KINDS = {
    "wr_pair", "wr_angle", "ltr_pair", "ltr_angle", "logit_kd", "ce", "codir", "mlkd_embedding",
    "mlkd_attention", "mlkd_ffn", "mlkd_sample", "supcon", "tinybert_attention", "tinybert_hidden",
    "tinybert_embedding", "pkd", "minilm", "minilmv2",
}


def _error(config, student=S, teacher=T, task=TASK) -> ObjectiveConfigError:
    with pytest.raises(ObjectiveConfigError) as err:
        build_objective(config, student, teacher, task)
    return err.value


def test_registry_has_every_term_kind():
    assert set(registry()) == ALL_KINDS


def test_registry_and_catalog_agree():
    """Configs are checked against the torch-free catalog and built from the registry: same kinds, same options."""
    assert registry().keys() == catalog().keys()
    assert {kind: cls.Options for kind, cls in registry().items()} == catalog()


def test_a_term_that_disagrees_with_the_catalog_is_not_registered():
    class Stray(Term):
        kind = "no_such_kind"

    class WrongOptions(Term):
        kind = "logit_kd"

    with pytest.raises(RuntimeError, match="not in ckd.catalog.KINDS"):
        register(Stray)
    with pytest.raises(RuntimeError, match="registered twice"):
        register(WrongOptions)
    del registry_module._REGISTRY["logit_kd"]  # as if first: then its options are checked
    try:
        with pytest.raises(RuntimeError, match="has Options Options, ckd.catalog.KINDS says LogitKDOptions"):
            register(WrongOptions)
    finally:
        registry_module._REGISTRY["logit_kd"] = LogitKD


def test_every_public_name_loads_lazily():
    assert sorted(ckd.__all__) == sorted(set(ckd.__all__)) and set(ckd.__all__) <= set(dir(ckd))
    for name in ckd.__all__:
        assert getattr(ckd, name) is not None
    with pytest.raises(AttributeError):
        ckd.no_such_name  # noqa: B018


# --------------------------------------------------------------------------------------------
# structure and options: caught by resolve_terms, before any model is known
# --------------------------------------------------------------------------------------------

STRUCTURE_ERRORS = [
    pytest.param({"terms": {"ce": {}}, "termz": {}}, "termz", ["preset", "task", "terms"], id="unknown-top-level-key"),
    pytest.param({"terms": {"ce": {}}, "weights": 1}, "weights", ["terms"], id="unknown-top-level-key-2"),
    pytest.param({"terms": [["ce", {}]]}, "terms", [], id="terms-not-a-mapping"),
    pytest.param({"terms": {}}, "terms", [], id="no-terms"),
    pytest.param({}, "terms", [], id="empty-config"),
    pytest.param({"terms": {"ce": {"weight": 0}}}, "terms", [], id="only-zero-weights"),
    pytest.param({"terms": {"wr_pairs": {}}}, "terms.wr_pairs", sorted(ALL_KINDS), id="unknown-kind"),
    pytest.param({"terms": {"angle": {"kind": "wr_angels"}}}, "terms.angle.kind", sorted(ALL_KINDS), id="unknown-kind-via-kind"),
    pytest.param({"terms": {"wr_pair": 3}}, "terms.wr_pair", [], id="options-not-a-mapping"),
    pytest.param({"terms": {"wr_angle": {"windw": 3}}}, "terms.wr_angle.windw", ["weight", "layers", "window"], id="unknown-option"),
    pytest.param({"terms": {"wr_pair": {"mode": "cos_kl", "distance": "l2"}}}, "terms.wr_pair.distance",
                 ["distance_loss", "layers", "mode", "normalize", "squared", "weight"], id="unknown-option-2"),
    pytest.param({"terms": {"ltr_angle": {"window": 3}}}, "terms.ltr_angle.window", ["layers", "weight"], id="option-of-another-kind"),
    # the reference's misspelt keys that silently disabled LTR weights (hazard 5)
    pytest.param({"terms": {"ltr_pair": {"wieght": 5}}}, "terms.ltr_pair.wieght", ["weight"], id="misspelt-weight"),
    pytest.param({"terms": {"wr_pair": {"weight": "100"}}}, "terms.wr_pair.weight", ["float"], id="weight-string"),
    pytest.param({"terms": {"wr_pair": {"weight": True}}}, "terms.wr_pair.weight", [], id="weight-bool"),
    pytest.param({"terms": {"wr_angle": {"window": 4.5}}}, "terms.wr_angle.window", [], id="window-float"),
    pytest.param({"terms": {"wr_angle": {"window": "21"}}}, "terms.wr_angle.window", [], id="window-string"),
    pytest.param({"terms": {"wr_pair": {"mode": "cos"}}}, "terms.wr_pair.mode", ["cos_kl", "distance"], id="mode-literal"),
    pytest.param({"terms": {"wr_pair": {"squared": 1}}}, "terms.wr_pair.squared", [], id="squared-int"),
    pytest.param({"terms": {"wr_pair": {"distance_loss": "huber"}}}, "terms.wr_pair.distance_loss", [], id="loss-literal"),
    pytest.param({"terms": {"logit_kd": {"t_squared": "yes"}}}, "terms.logit_kd.t_squared", [], id="t_squared-string"),
    pytest.param({"terms": {"logit_kd": {"temperature": None}}}, "terms.logit_kd.temperature", [], id="temperature-null"),
    pytest.param({"terms": {"minilmv2": {"relation_heads": 4.0}}}, "terms.minilmv2.relation_heads", [], id="heads-float"),
    pytest.param({"terms": {"tinybert_attention": {"on": "logits"}}}, "terms.tinybert_attention.on", [], id="on-literal"),
    pytest.param({"terms": {"codir": {"sampling": "hard"}}}, "terms.codir.sampling", [], id="sampling-literal"),
    # impossible values
    pytest.param({"terms": {"wr_pair": {"weight": -1}}}, "terms.wr_pair.weight", [], id="negative-weight"),
    pytest.param({"terms": {"ce": {}, "x": {"kind": "ltr_angle", "weight": -0.5}}}, "terms.x.weight", [], id="negative-weight-instance"),
    pytest.param({"terms": {"logit_kd": {"temperature": 0}}}, "terms.logit_kd.temperature", [], id="temperature-zero"),
    pytest.param({"terms": {"logit_kd": {"temperature": -2.0}}}, "terms.logit_kd.temperature", [], id="temperature-negative"),
    pytest.param({"terms": {"supcon": {"temperature": 0.0}}}, "terms.supcon.temperature", [], id="supcon-temperature"),
    pytest.param({"terms": {"codir": {"temperature": 0}}}, "terms.codir.temperature", [], id="codir-temperature"),
    pytest.param({"terms": {"codir": {"negatives": 0}}}, "terms.codir.negatives", [], id="codir-negatives"),
    pytest.param({"terms": {"codir": {"dim": 0}}}, "terms.codir.dim", [], id="codir-dim"),
    pytest.param({"terms": {"codir": {"momentum": 1.0}}}, "terms.codir.momentum", [], id="codir-momentum"),
    pytest.param({"terms": {"wr_angle": {"window": 4}}}, "terms.wr_angle.window", ["odd"], id="even-window"),
    pytest.param({"terms": {"wr_angle": {"window": 1}}}, "terms.wr_angle.window", [], id="window-1"),
    pytest.param({"terms": {"wr_angle": {"window": -3}}}, "terms.wr_angle.window", [], id="window-negative"),
    pytest.param({"terms": {"minilm": {"teacher_layer": 0}}}, "terms.minilm.teacher_layer", [], id="teacher-layer-0"),
    pytest.param({"preset": "ckd-paper"}, "task", [], id="preset-without-task"),
    pytest.param({"preset": "ckd-paper", "task": "squad"}, "task", ["sst2", "mnli"], id="preset-unknown-task"),
    pytest.param({"preset": "ckd-papers", "task": "sst2"}, "preset", ["ckd-paper"], id="unknown-preset"),
    pytest.param({"preset": "ckd-paper", "task": "sst2", "terms": {"wr_angle": {"window": 20}}},
                 "terms.wr_angle.window", [], id="bad-override-of-preset"),
    pytest.param({"terms": {"ce": {}, "wr_angle": {"weight": 0, "windw": 3}}}, "terms.wr_angle.windw", [],
                 id="typo-in-a-dropped-term"),
]


@pytest.mark.parametrize("config, key, words", STRUCTURE_ERRORS)
def test_resolve_terms_rejects_without_shapes(config, key, words):
    with pytest.raises(ObjectiveConfigError) as err:
        resolve_terms(config)
    assert err.value.key == key
    for word in words:
        assert word in str(err.value)


@pytest.mark.parametrize("config, key, words", STRUCTURE_ERRORS)
def test_build_objective_rejects_the_same(config, key, words):
    assert _error(config).key == key


def test_config_must_be_a_mapping():
    with pytest.raises(ObjectiveConfigError) as err:
        resolve_terms(["ce"])
    assert err.value.key == ""


def test_unknown_kind_message_lists_every_known_kind():
    with pytest.raises(ObjectiveConfigError) as err:
        resolve_terms({"terms": {"ckd": {}}})
    message = str(err.value)
    assert "'ckd'" in message
    for kind in ALL_KINDS:
        assert kind in message


def test_unknown_option_message_lists_every_valid_option():
    with pytest.raises(ObjectiveConfigError) as err:
        resolve_terms({"terms": {"codir": {"layers": "all"}}})
    assert err.value.key == "terms.codir.layers"
    for option in ("weight", "student_layers", "teacher_layers", "dim", "temperature", "negatives", "momentum", "sampling"):
        assert option in str(err.value)


# --------------------------------------------------------------------------------------------
# shape-dependent problems: only build_objective can see them
# --------------------------------------------------------------------------------------------

SHAPE_ERRORS = [
    pytest.param({"minilmv2": {"relation_heads": 5}}, S, T, TASK, "terms.minilmv2.relation_heads", id="relation-heads-not-dividing"),
    pytest.param({"minilmv2": {"relation_heads": 0}}, S, T, TASK, "terms.minilmv2.relation_heads", id="relation-heads-zero"),
    pytest.param({"minilmv2": {"relation_heads": 16}}, S, T, TASK, "terms.minilmv2.relation_heads", id="relation-heads-student-only"),
    pytest.param({"minilm": {"teacher_layer": 7}}, ModelShape(3, 24, 4), T, TASK, "terms.minilm.teacher_layer", id="teacher-layer-too-deep"),
    pytest.param({"wr_pair": {"layers": [[4, 6]]}}, S, T, TASK, "terms.wr_pair.layers", id="layers-out-of-range"),
    pytest.param({"codir": {"student_layers": [0, 1]}}, S, T, TASK, "terms.codir.student_layers", id="codir-layer-0"),
    pytest.param({"codir": {"teacher_layers": [7]}}, S, T, TASK, "terms.codir.teacher_layers", id="codir-teacher-layer"),
    pytest.param({"codir": {"student_layers": "some"}}, S, T, TASK, "terms.codir.student_layers", id="codir-layer-spec"),
    pytest.param({"mlkd_attention": {}}, ModelShape(3, 25, 5), T, TASK, "terms.mlkd_attention.layers", id="mlkd-groups-not-dividing"),
]


@pytest.mark.parametrize("terms, student, teacher, task, key", SHAPE_ERRORS)
def test_shape_dependent_errors_name_the_key(terms, student, teacher, task, key):
    resolve_terms({"terms": terms})  # structurally fine
    assert _error({"terms": terms}, student, teacher, task).key == key


@pytest.mark.parametrize(
    "terms, student, teacher, task, prefix, words",
    [
        pytest.param({"tinybert_attention": {}}, S, T, TASK, "terms.tinybert_attention", ["heads"], id="tinybert-unequal-heads"),
        pytest.param({"minilm": {}}, S, T, TASK, "terms.minilm", ["heads"], id="minilm-unequal-heads"),
        pytest.param({"pkd": {}}, S, T, TASK, "terms.pkd", ["24", "48"], id="pkd-unequal-widths"),
        pytest.param({"codir": {}}, S, T, TaskShape(3), "terms.codir", ["num_examples"], id="codir-without-num-examples"),
        pytest.param({"supcon": {}}, S, T, REGRESSION, "terms.supcon", ["regression"], id="supcon-on-regression"),
        pytest.param({"teacher_attention": {"kind": "tinybert_attention"}}, S, T, TASK, "terms.teacher_attention", ["heads"],
                     id="instance-name-in-key"),
    ],
)
def test_incompatible_models_or_task_are_rejected_naming_the_term(terms, student, teacher, task, prefix, words):
    resolve_terms({"terms": terms})
    err = _error({"terms": terms}, student, teacher, task)
    assert err.key == prefix or err.key.startswith(prefix + ".")
    for word in words:
        assert word in err.message


def test_codir_without_num_examples_names_an_existing_key():
    err = _error({"terms": {"contrast": {"kind": "codir"}}}, task=TaskShape(3))
    assert err.key == "terms.contrast" or err.key.split(".")[-1] in {
        "weight", "student_layers", "teacher_layers", "dim", "temperature", "negatives", "momentum", "sampling",
    }, err.key


def test_equal_heads_and_widths_are_accepted():
    same_heads = ModelShape(3, 24, 4)
    build_objective({"terms": {"tinybert_attention": {}, "minilm": {}}}, same_heads, T, TASK)
    build_objective({"terms": {"pkd": {}}}, ModelShape(3, 48, 4), T, TASK)
    build_objective({"terms": {"supcon": {}}}, S, T, TASK)
    build_objective({"terms": {"codir": {}}}, S, T, TASK)


# --------------------------------------------------------------------------------------------
# presets, merging, weights, instances
# --------------------------------------------------------------------------------------------

# (temperature, wr_pair weight, wr_angle weight) per task, transcribed from the CKD reference README
CKD_PAPER = {
    "cola": (3, 1, 10), "sst2": (4, 100, 1000), "rte": (3, 1, 10), "qnli": (3, 10, 1),
    "mrpc": (4, 1, 1), "stsb": (1, 0.1, 0.1), "mnli": (4, 100, 1), "qqp": (2, 10, 10),
}


@pytest.mark.parametrize("task", sorted(CKD_PAPER))
def test_ckd_paper_preset_expands_to_the_reference_weights(task):
    temperature, wr_pair, wr_angle = CKD_PAPER[task]
    resolved = resolve_terms({"preset": "ckd-paper", "task": task})
    assert resolved == {
        "ce": {"kind": "ce", "weight": 1.0},
        "logit_kd": {"kind": "logit_kd", "weight": 1.0, "temperature": temperature, "t_squared": False},
        "wr_pair": {"kind": "wr_pair", "weight": wr_pair, "layers": "emb+skip", "mode": "cos_kl"},
        "wr_angle": {"kind": "wr_angle", "weight": wr_angle, "layers": "emb+skip", "window": 21},
        "ltr_pair": {"kind": "ltr_pair", "weight": 1.0, "layers": "emb+skip", "mode": "cos_kl"},
        "ltr_angle": {"kind": "ltr_angle", "weight": 1.0, "layers": "emb+skip"},
    }


def test_ckd_paper_sst2_builds_with_reference_settings():
    objective = build_objective({"preset": "ckd-paper", "task": "SST-2"}, ModelShape(6, 24, 3), ModelShape(12, 48, 4), TaskShape(2))
    t = objective.terms
    assert set(t) == {"ce", "logit_kd", "wr_pair", "wr_angle", "ltr_pair", "ltr_angle"}
    assert t["logit_kd"].options.temperature == 4 and t["logit_kd"].options.t_squared is False
    assert t["wr_pair"].weight == 100 and t["wr_angle"].weight == 1000
    assert t["wr_angle"].options.window == 21
    assert t["ltr_pair"].weight == 1 and t["ltr_angle"].weight == 1
    assert t["wr_pair"].layer_map == tuple((k, 2 * k) for k in range(7))


def test_user_overrides_merge_per_key_into_the_preset():
    resolved = resolve_terms({
        "preset": "ckd-paper",
        "task": "sst2",
        "terms": {
            "wr_angle": {"window": 5},  # weight 1000 and layers kept
            "logit_kd": {"temperature": 2},  # t_squared False kept
            "ltr_angle": {"weight": 0},  # dropped
            "tinybert_hidden": {"weight": 0.5},  # added
        },
    })
    assert resolved["wr_angle"] == {"kind": "wr_angle", "weight": 1000.0, "layers": "emb+skip", "window": 5}
    assert resolved["logit_kd"] == {"kind": "logit_kd", "weight": 1.0, "temperature": 2, "t_squared": False}
    assert "ltr_angle" not in resolved
    assert resolved["tinybert_hidden"] == {"kind": "tinybert_hidden", "weight": 0.5}
    assert resolved["wr_pair"]["weight"] == 100.0


def test_weight_zero_drops_a_term():
    objective = build_objective({"terms": {"ce": {}, "wr_pair": {"weight": 0}, "wr_angle": {"weight": 0.0}}}, S, T, TASK)
    assert set(objective.terms) == {"ce"}


def test_kind_allows_two_instances_of_one_kind():
    config = {"terms": {
        "wr_angle": {"window": 21},
        "wr_angle_full": {"kind": "wr_angle", "window": None, "weight": 2.5, "layers": "last"},
    }}
    resolved = resolve_terms(config)
    assert resolved["wr_angle_full"] == {"kind": "wr_angle", "window": None, "weight": 2.5, "layers": "last"}
    objective = build_objective(config, S, T, TASK)
    a, b = objective.terms["wr_angle"], objective.terms["wr_angle_full"]
    assert isinstance(a, WordRelationAngle) and isinstance(b, WordRelationAngle)
    assert a.options.window == 21 and b.options.window is None
    assert b.weight == 2.5 and b.layer_map == ((3, 6),)


def test_integer_values_are_accepted_for_float_options():
    objective = build_objective({"terms": {"logit_kd": {"weight": 3, "temperature": 2}}}, S, T, TASK)
    assert objective.terms["logit_kd"].weight == 3


def test_resolve_terms_does_not_mutate_the_config():
    config = {"preset": "ckd-paper", "task": "sst2", "terms": {"wr_angle": {"window": 5}, "x": {"kind": "ce"}}}
    snapshot = repr(config)
    resolve_terms(config)
    build_objective(config, S, T, TASK)
    assert repr(config) == snapshot
