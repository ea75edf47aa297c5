"""Padding never changes a value: appending padded positions (mask 0, garbage in every padded slot)
leaves every term and its gradient w.r.t. the real positions unchanged."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ckd_reference as R
from ckd import Features, ModelShape
from ckd import relations as CR

LABELS = torch.tensor([0, 2, 2, 1])
IDS = torch.tensor([3, 9, 27, 40])


def pad_features(f: Features, extra: int, seed: int, scale: float = 100.0) -> Features:
    """`f` with `extra` padded positions appended to every sequence tensor; every padded slot holds
    garbage (large random values), the mask is 0 there. The real part keeps the same leaves."""
    g = torch.Generator().manual_seed(seed)

    def garbage(*size, like):
        return (torch.randn(*size, generator=g, dtype=torch.float64) * scale + scale / 2).to(like.dtype)

    def seq(t: torch.Tensor) -> torch.Tensor:  # (B, n, ...) -> (B, n + extra, ...)
        return torch.cat([t, garbage(t.shape[0], extra, *t.shape[2:], like=t)], dim=1)

    def square(t: torch.Tensor) -> torch.Tensor:  # (B, h, n, n) -> (B, h, n + extra, n + extra)
        b, h, n, _ = t.shape
        t = torch.cat([t, garbage(b, h, n, extra, like=t)], dim=3)
        return torch.cat([t, garbage(b, h, extra, n + extra, like=t)], dim=2)

    mask = torch.cat([f.attention_mask, torch.zeros(f.attention_mask.shape[0], extra, dtype=f.attention_mask.dtype)], 1)
    return Features(
        hidden_states=tuple(seq(h) for h in f.hidden_states),
        attention_mask=mask,
        logits=f.logits,
        attentions={k: square(v) for k, v in f.attentions.items()},
        queries={k: seq(v) for k, v in f.queries.items()},
        keys={k: seq(v) for k, v in f.keys.items()},
        values={k: seq(v) for k, v in f.values.items()},
        attention_outputs={k: seq(v) for k, v in f.attention_outputs.items()},
        num_heads=f.num_heads,
    )


def _value_and_grads(term, student, teacher, leaves, labels=LABELS, ids=IDS):
    value = R.run_term(term, student, teacher, labels, ids)
    grads = torch.autograd.grad(value, leaves, allow_unused=True)
    return value.detach(), grads


def _assert_same(v0, g0, v1, g1):
    assert torch.isfinite(v0)
    assert torch.allclose(v0.double(), v1.double(), rtol=1e-6, atol=1e-12), (float(v0), float(v1))
    for a, b in zip(g0, g1):
        if a is None or b is None:
            assert (a is None or not a.any()) and (b is None or not b.any())
            continue
        assert torch.isfinite(b).all()
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-9 * max(1.0, a.abs().max().item()))


@pytest.mark.parametrize("name, kind, options, s_shape, t_shape", [pytest.param(*c, id=c[0]) for c in R.ALL_TERMS])
def test_padding_changes_no_value_and_no_gradient(name, kind, options, s_shape, t_shape):
    mask = R.make_mask([7, 5, 2, 1], 7)
    student = R.make_features(s_shape, mask, dtype=torch.float64, seed=61, requires_grad=True)
    teacher = R.make_features(t_shape, mask, dtype=torch.float64, seed=62)
    term = R.build_term(kind, options, s_shape, t_shape).double()
    leaves = R.feature_tensors(student)

    v0, g0 = _value_and_grads(term, student, teacher, leaves)
    padded_s = pad_features(student, 5, seed=63)
    padded_t = pad_features(teacher, 5, seed=64)
    v1, g1 = _value_and_grads(term, padded_s, padded_t, leaves)
    _assert_same(v0, g0, v1, g1)
    assert any(g is not None and g.any() for g in g1), "the term reads no student tensor"


# --------------------------------------------------------------------------------------------
# property tests over random shapes and masks
# --------------------------------------------------------------------------------------------

CKD_KINDS = [
    ("wr_pair", {}),
    ("wr_pair", {"mode": "distance"}),
    ("wr_angle", {"window": None}),
    ("wr_angle", {"window": 3}),
    ("wr_angle", {"window": 5}),
    ("ltr_pair", {}),
    ("ltr_angle", {}),
]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    case=st.sampled_from(CKD_KINDS),
    lengths=st.lists(st.integers(0, 6), min_size=1, max_size=3),
    extra=st.integers(1, 4),
    s_width=st.sampled_from([4, 6]),
    t_width=st.sampled_from([4, 8]),
    student_layers=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_property_padding_invariance_ckd_terms(case, lengths, extra, s_width, t_width, student_layers, seed):
    kind, options = case
    n = max(max(lengths), 1)
    s_shape = ModelShape(student_layers, s_width, 2)
    t_shape = ModelShape(2 * student_layers, t_width, 2)
    mask = R.make_mask(lengths, n)
    student = R.make_features(s_shape, mask, dtype=torch.float64, seed=seed, requires_grad=True)
    teacher = R.make_features(t_shape, mask, dtype=torch.float64, seed=seed + 1)
    term = R.build_term(kind, options, s_shape, t_shape)
    leaves = list(student.hidden_states)
    v0, g0 = _value_and_grads(term, student, teacher, leaves, labels=None, ids=None)
    v1, g1 = _value_and_grads(term, pad_features(student, extra, seed + 2), pad_features(teacher, extra, seed + 3),
                              leaves, labels=None, ids=None)
    _assert_same(v0, g0, v1, g1)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    m=st.integers(1, 9),
    sets=st.integers(1, 3),
    d_s=st.integers(2, 6),
    d_t=st.integers(2, 6),
    window=st.sampled_from([None, 3, 5, 7]),
    mask_bits=st.lists(st.booleans(), min_size=27, max_size=27),
    near=st.sampled_from([0.0, 1e-3, 1e-5, 1e-7]),
    seed=st.integers(0, 2**16),
)
def test_property_angle_relation_exact_for_any_mask(m, sets, d_s, d_t, window, mask_bits, near, seed):
    """angle_relation_sse against the direct computation for arbitrary (also non-contiguous) masks,
    windows, widths and near-duplicate members (windows are over positions, masked members excluded)."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(sets, m, d_s, generator=g, dtype=torch.float64) * 20
    t = torch.randn(sets, m, d_t, generator=g, dtype=torch.float64) * 20
    if m >= 2 and near:
        s[:, 1] = s[:, 0] + near * 20 * torch.randn(sets, d_s, generator=g, dtype=torch.float64)
        t[:, m - 1] = t[:, m - 2] + near * 20 * torch.randn(sets, d_t, generator=g, dtype=torch.float64)
    valid = torch.tensor(mask_bits[: sets * m]).reshape(sets, m)  # sets * m <= 27
    sse, count = CR.angle_relation_sse(s, t, valid, window=window)
    want_sse, want_count = 0.0, 0
    for k in range(sets):
        members = [i for i in range(m) if valid[k, i]]
        e, c = R.angle_sse_count(s[k], t[k], members, window)
        want_sse += float(e)
        want_count += c
    assert float(count) == want_count
    assert abs(float(sse) - want_sse) <= 1e-9 * max(want_sse, 1e-12) + 1e-13
