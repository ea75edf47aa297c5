"""Geometric invariances of the relation terms, and students whose width and head count differ from
the teacher's (no projection needed by the CKD terms)."""

from __future__ import annotations

import pytest
import torch

import ckd_reference as R
from ckd import Features, ModelShape
from ckd.terms import Targets

S, T = R.STUDENT, R.TEACHER  # student d=24 / 3 heads, teacher d=48 / 4 heads
MASK = R.make_mask([9, 6, 2, 1], 9)

RELATIONS = [
    pytest.param("wr_pair", {"mode": "cos_kl"}, id="wr_pair-cos_kl"),
    pytest.param("wr_pair", {"mode": "distance"}, id="wr_pair-distance"),
    pytest.param("wr_pair", {"mode": "distance", "squared": False, "distance_loss": "l1"}, id="wr_pair-distance-sqrt"),
    pytest.param("wr_angle", {"window": None}, id="wr_angle-full"),
    pytest.param("wr_angle", {"window": 3}, id="wr_angle-w3"),
    pytest.param("wr_angle", {"window": 21}, id="wr_angle-w21"),
    pytest.param("ltr_pair", {}, id="ltr_pair-cos_kl"),
    pytest.param("ltr_pair", {"mode": "distance"}, id="ltr_pair-distance"),
    pytest.param("ltr_angle", {}, id="ltr_angle"),
    pytest.param("mlkd_embedding", {}, id="mlkd_embedding"),
]


def _orthogonal(d: int, seed: int) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))  # Haar-distributed, det +-1


def _transform_hidden(f: Features, fn) -> Features:
    return Features(tuple(fn(h) for h in f.hidden_states), f.attention_mask, num_heads=f.num_heads)


def _pair(scale: float = 5.0):
    student = R.make_features(S, MASK, dtype=torch.float64, seed=91, scale=scale)
    teacher = R.make_features(T, MASK, dtype=torch.float64, seed=92, scale=scale)
    return _transform_hidden(student, lambda h: h), _transform_hidden(teacher, lambda h: h)


def _value(kind, options, student, teacher) -> float:
    return float(R.build_term(kind, options, S, T)(student, teacher, Targets()))


@pytest.mark.parametrize("rotate", ["student", "teacher", "both"])
@pytest.mark.parametrize("kind, options", RELATIONS)
def test_invariant_to_orthogonal_rotation_of_the_hidden_space(kind, options, rotate):
    # token-similarity softmaxes (MLKD) need unit-scale vectors to be far from one-hot
    student, teacher = _pair(0.3 if kind.startswith("mlkd") else 5.0)
    base = _value(kind, options, student, teacher)
    qs, qt = _orthogonal(S.hidden_size, 1), _orthogonal(T.hidden_size, 2)
    if rotate in ("student", "both"):
        student = _transform_hidden(student, lambda h: h @ qs)
    if rotate in ("teacher", "both"):
        teacher = _transform_hidden(teacher, lambda h: h @ qt)
    assert base > 0
    assert abs(_value(kind, options, student, teacher) - base) <= 1e-6 * base


@pytest.mark.parametrize("kind, options", [p for p in RELATIONS if "cos_kl" not in p.id and "mlkd" not in p.id])
def test_distance_and_angle_relations_are_invariant_to_a_common_offset(kind, options):
    """Distances and angles depend on differences only: a common offset of every vector (10x the
    vectors' norms) changes nothing, on either side."""
    student, teacher = _pair()
    base = _value(kind, options, student, teacher)
    g = torch.Generator().manual_seed(3)
    off_s = torch.randn(S.hidden_size, generator=g, dtype=torch.float64) * 50
    off_t = torch.randn(T.hidden_size, generator=g, dtype=torch.float64) * 50
    moved = _value(kind, options, _transform_hidden(student, lambda h: h + off_s), _transform_hidden(teacher, lambda h: h + off_t))
    assert abs(moved - base) <= 1e-6 * base


@pytest.mark.parametrize("kind, options", [p for p in RELATIONS if "mlkd" not in p.id])
def test_ckd_relations_are_invariant_to_a_global_scale(kind, options):
    """Cosines, angles and mean-normalised distances ignore the hidden states' scale; raw
    distances (normalize=False) would not, and are not in this list."""
    student, teacher = _pair()
    base = _value(kind, options, student, teacher)
    scaled = _value(kind, options, _transform_hidden(student, lambda h: h * 37.0), _transform_hidden(teacher, lambda h: h * 0.01))
    assert abs(scaled - base) <= 1e-6 * base


@pytest.mark.parametrize("kind, options", [p for p in RELATIONS if "mlkd" not in p.id])
def test_student_equal_to_teacher_gives_zero(kind, options):
    shape = ModelShape(3, 24, 3)
    teacher = R.make_features(shape, MASK, dtype=torch.float64, seed=93, scale=5.0)
    term = R.build_term(kind, options, shape, shape)
    # the same layers on both sides: layer map 3 -> 3 is the identity
    assert all(s == t for s, t in term.layer_map)
    assert abs(float(term(teacher, teacher, Targets()))) <= 1e-7


CKD_TERMS = ["wr_pair", "wr_angle", "ltr_pair", "ltr_angle"]


@pytest.mark.parametrize("kind", CKD_TERMS)
@pytest.mark.parametrize(
    "s_shape, t_shape",
    [
        (ModelShape(3, 24, 3), ModelShape(6, 48, 4)),
        (ModelShape(2, 20, 5), ModelShape(6, 48, 12)),  # a 12-head teacher, a 5-head student
        (ModelShape(6, 48, 4), ModelShape(6, 24, 3)),  # wider student than teacher
    ],
    ids=["24x3-vs-48x4", "20x5-vs-48x12", "48x4-vs-24x3"],
)
def test_ckd_terms_need_no_projection_for_other_widths_and_head_counts(kind, s_shape, t_shape):
    term = R.build_term(kind, {}, s_shape, t_shape)
    assert list(term.parameters()) == [] and list(term.buffers()) == []
    student = R.make_features(s_shape, MASK, dtype=torch.float64, seed=94, requires_grad=True)
    teacher = R.make_features(t_shape, MASK, dtype=torch.float64, seed=95)
    value = term(student, teacher, Targets())
    ref = {
        "wr_pair": lambda: R.wr_pair(student, teacher, term.layer_map),
        "wr_angle": lambda: R.wr_angle(student, teacher, term.layer_map, 21),
        "ltr_pair": lambda: R.ltr_pair(student, teacher, term.layer_map),
        "ltr_angle": lambda: R.ltr_angle(student, teacher, term.layer_map),
    }[kind]()
    assert R.rel_err(value, ref) <= 1e-5
    value.backward()
    for s_layer, _ in term.layer_map:
        assert student.hidden_states[s_layer].grad is not None


def test_mlkd_relations_work_across_head_counts():
    """MLKD's embedding / attention-output relations and MiniLMv2 compare (n x n) relations only."""
    s_shape, t_shape = ModelShape(3, 24, 3), ModelShape(6, 48, 4)
    student = R.make_features(s_shape, MASK, dtype=torch.float64, seed=96)
    teacher = R.make_features(t_shape, MASK, dtype=torch.float64, seed=97)
    for kind, options, ref in [
        ("mlkd_embedding", {}, lambda t: R.mlkd_embedding(student, teacher)),
        ("mlkd_attention", {}, lambda t: R.mlkd_attention(student, teacher, t.layer_map, 3)),
        ("minilmv2", {"relation_heads": 8}, lambda t: R.minilmv2(student, teacher, 3, 6, 8)),
    ]:
        term = R.build_term(kind, options, s_shape, t_shape)
        assert list(term.parameters()) == []
        assert R.rel_err(term(student, teacher, Targets()), ref(term)) <= 1e-5
