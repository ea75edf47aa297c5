"""Layer alignment: CKD's emb+skip exactly as the reference computes it, uniform, last, explicit
lists; invalid maps rejected with the offending key named."""

from __future__ import annotations

from math import gcd

import pytest

import ckd_reference as R
from ckd import ModelShape, ObjectiveConfigError, TaskShape, build_objective, emb_skip, resolve_layers, uniform


def reference_emb_skip(n_student: int, n_teacher: int):
    """The reference: g = gcd(N_T, N_S); teacher 0, N_T/g, ..., N_T; student 0, N_S/g, ..., N_S."""
    g = gcd(n_teacher, n_student)
    teacher = list(range(0, n_teacher + 1, n_teacher // g))
    student = list(range(0, n_student + 1, n_student // g))
    return tuple(zip(student, teacher))


@pytest.mark.parametrize(
    "n_student, n_teacher, expected",
    [
        (6, 12, tuple((k, 2 * k) for k in range(7))),
        (4, 12, ((0, 0), (1, 3), (2, 6), (3, 9), (4, 12))),
        (5, 12, ((0, 0), (5, 12))),
        (2, 6, ((0, 0), (1, 3), (2, 6))),
        (3, 12, ((0, 0), (1, 4), (2, 8), (3, 12))),
        (4, 6, ((0, 0), (2, 3), (4, 6))),
        (12, 12, tuple((k, k) for k in range(13))),
        (1, 12, ((0, 0), (1, 12))),
        (8, 12, ((0, 0), (2, 3), (4, 6), (6, 9), (8, 12))),
    ],
)
def test_emb_skip_is_the_reference_alignment(n_student, n_teacher, expected):
    assert emb_skip(n_student, n_teacher) == expected
    assert resolve_layers("emb+skip", n_student, n_teacher) == expected


def test_emb_skip_matches_reference_formula_for_all_depths():
    for n_student in range(1, 13):
        for n_teacher in range(1, 25):
            assert emb_skip(n_student, n_teacher) == reference_emb_skip(n_student, n_teacher), (n_student, n_teacher)
            assert uniform(n_student, n_teacher)[-1] == (n_student, n_teacher)  # last -> last


@pytest.mark.parametrize(
    "n_student, n_teacher, expected",
    [
        (6, 12, tuple((k, 2 * k) for k in range(1, 7))),
        (4, 12, ((1, 3), (2, 6), (3, 9), (4, 12))),
        (5, 12, ((1, 2), (2, 4), (3, 7), (4, 9), (5, 12))),  # floor(k * 12 / 5)
        (3, 3, ((1, 1), (2, 2), (3, 3))),
    ],
)
def test_uniform_alignment(n_student, n_teacher, expected):
    assert uniform(n_student, n_teacher) == expected
    assert resolve_layers("uniform", n_student, n_teacher) == expected
    assert resolve_layers("emb+uniform", n_student, n_teacher) == ((0, 0),) + expected


def test_last_and_explicit_alignment():
    assert resolve_layers("last", 4, 12) == ((4, 12),)
    assert resolve_layers([[1, 3], [2, 6], [4, 12]], 4, 12) == ((1, 3), (2, 6), (4, 12))
    assert resolve_layers([(0, 0)], 4, 12) == ((0, 0),)


S6, T12 = ModelShape(6, 24, 3), ModelShape(12, 48, 4)
TASK = TaskShape(num_labels=2, num_examples=10)


def _build(terms, student=S6, teacher=T12):
    return build_objective({"terms": terms}, student, teacher, TASK)


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("emb+skip", tuple((k, 2 * k) for k in range(7))),
        ("uniform", tuple((k, 2 * k) for k in range(1, 7))),
        ("emb+uniform", tuple((k, 2 * k) for k in range(7))),
        ("last", ((6, 12),)),
        ([[0, 0], [3, 5], [6, 12]], ((0, 0), (3, 5), (6, 12))),
    ],
)
@pytest.mark.parametrize("kind", ["wr_pair", "wr_angle", "ltr_pair", "ltr_angle", "tinybert_hidden", "mlkd_ffn", "pkd"])
def test_every_layered_term_takes_every_strategy(kind, spec, expected):
    teacher = ModelShape(12, 24, 3) if kind == "pkd" else T12
    term = _build({kind: {"layers": spec}}, S6, teacher).terms[kind]
    assert term.layer_map == expected


def test_default_layer_maps():
    objective = _build({k: {} for k in ["wr_pair", "wr_angle", "ltr_pair", "ltr_angle", "tinybert_hidden", "mlkd_attention"]})
    t = objective.terms
    assert t["wr_pair"].layer_map == t["wr_angle"].layer_map == t["ltr_pair"].layer_map == t["ltr_angle"].layer_map
    assert t["wr_pair"].layer_map == emb_skip(6, 12)
    assert t["tinybert_hidden"].layer_map == uniform(6, 12)
    assert t["mlkd_attention"].layer_map == uniform(6, 12)


INVALID_MAPS = [
    pytest.param([[7, 12]], "student layer", id="student-out-of-range"),
    pytest.param([[-1, 0]], "student layer", id="student-negative"),
    pytest.param([[1, 13]], "teacher layer", id="teacher-out-of-range"),
    pytest.param([[1, -2]], "teacher layer", id="teacher-negative"),
    pytest.param([[2, 4], [1, 6]], "increasing", id="student-decreasing"),
    pytest.param([[1, 6], [2, 4]], "increasing", id="teacher-decreasing"),
    pytest.param([[1, 2], [1, 4]], "increasing", id="student-repeated"),
    pytest.param([[1, 4], [2, 4]], "increasing", id="teacher-repeated"),
    pytest.param([], "empty", id="empty"),
    pytest.param([[1, 2, 3]], "pairs", id="triple"),
    pytest.param([1, 2], "pairs", id="flat-list"),
    pytest.param([[1]], "pairs", id="single"),
    pytest.param([[1.0, 2]], "pairs", id="float-index"),
    pytest.param([["1", 2]], "pairs", id="string-index"),
    pytest.param([[True, 2]], "pairs", id="bool-index"),
    pytest.param("skip", "strategy", id="unknown-strategy"),
]


@pytest.mark.parametrize("spec, words", INVALID_MAPS)
@pytest.mark.parametrize("kind", ["wr_pair", "wr_angle", "ltr_pair", "ltr_angle", "tinybert_hidden", "tinybert_attention", "mlkd_ffn", "mlkd_attention"])
def test_invalid_layer_maps_are_rejected_naming_the_key(kind, spec, words):
    student = ModelShape(6, 24, 4) if kind == "tinybert_attention" else S6
    with pytest.raises(ObjectiveConfigError) as err:
        _build({kind: {"layers": spec}}, student)
    assert err.value.key == f"terms.{kind}.layers"
    assert words in str(err.value)


def test_invalid_layer_map_of_a_named_instance_names_the_instance():
    with pytest.raises(ObjectiveConfigError) as err:
        _build({"wr_angle": {}, "deep_angle": {"kind": "wr_angle", "layers": [[6, 13]]}})
    assert err.value.key == "terms.deep_angle.layers"


def test_layer_map_of_wrong_type_is_rejected():
    with pytest.raises(ObjectiveConfigError) as err:
        _build({"wr_pair": {"layers": 5}})
    assert err.value.key == "terms.wr_pair.layers"


@pytest.mark.parametrize("kind", ["tinybert_attention", "mlkd_attention"])
def test_attention_terms_reject_the_embedding_layer(kind):
    student = ModelShape(6, 24, 4)
    with pytest.raises(ObjectiveConfigError) as err:
        _build({kind: {"layers": [[0, 0], [6, 12]]}}, student)
    assert err.value.key == f"terms.{kind}.layers"


def test_layer_maps_are_checked_against_both_depths():
    # valid for a 12-layer student, not for a 6-layer one
    ok = _build({"wr_pair": {"layers": [[6, 12]]}})
    assert ok.terms["wr_pair"].layer_map == ((6, 12),)
    with pytest.raises(ObjectiveConfigError):
        _build({"wr_pair": {"layers": [[12, 12]]}})
    with pytest.raises(ObjectiveConfigError):
        _build({"wr_pair": {"layers": [[6, 12]]}}, S6, ModelShape(8, 48, 4))
    assert R.build_term("wr_pair", {"layers": [[6, 8]]}, S6, ModelShape(8, 48, 4)).layer_map == ((6, 8),)
