"""No NaN or inf in values or gradients on degenerate batches, and half-precision inputs are
computed in float32 or better."""

from __future__ import annotations

import pytest
import torch

import ckd_reference as R
from ckd import Features, ModelShape
from ckd import relations as CR
from ckd.terms import Targets

TERMS = [pytest.param(*c, id=c[0]) for c in R.ALL_TERMS]


def _labels(b: int) -> torch.Tensor:
    return torch.arange(b) % 3


def _ids(b: int) -> torch.Tensor:
    return torch.arange(b) * 2 + 1


def _dyadic_duplicates(shape: ModelShape, lengths: list[int], n: int, seed: int) -> Features:
    """Features full of exact duplicates, with small integer values and power-of-two lengths so that
    every mean, Gram entry and distance is computed exactly: duplicate distances are exactly 0.

    Sample 0: tokens pairwise duplicated (0=1, 2=3, ...); sample 1: all tokens identical; hidden
    state l == hidden state l - 1 for even l (a token's layer vectors coincide too)."""
    feats = R.make_features(shape, R.make_mask(lengths, n), dtype=torch.float64, seed=seed)
    g = torch.Generator().manual_seed(seed)

    def dup(t: torch.Tensor) -> torch.Tensor:
        x = torch.randint(-3, 4, t.shape, generator=g).to(torch.float64)
        x[0, 1::2] = x[0, 0::2][: x[0, 1::2].shape[0]]
        x[1, :] = x[1, 0]
        return x

    hidden = []
    for l, h in enumerate(feats.hidden_states):
        hidden.append(hidden[-1].clone() if l and l % 2 == 0 else dup(h))
    return Features(
        hidden_states=tuple(hidden),
        attention_mask=feats.attention_mask,
        logits=torch.zeros_like(feats.logits),
        attentions=feats.attentions,
        queries={k: dup(v) for k, v in feats.queries.items()},
        keys={k: dup(v) for k, v in feats.keys.items()},
        values={k: dup(v) for k, v in feats.values.items()},
        attention_outputs={k: dup(v) for k, v in feats.attention_outputs.items()},
        num_heads=feats.num_heads,
    )


def _check_finite(term, student: Features, teacher: Features):
    student = R.map_features(student, lambda t: t.detach().requires_grad_(True))
    b = student.attention_mask.shape[0]
    value = R.run_term(term, student, teacher, _labels(b), _ids(b))
    assert value.dtype in (torch.float32, torch.float64)
    assert torch.isfinite(value), float(value)
    leaves = R.feature_tensors(student)
    grads = torch.autograd.grad(value, leaves, allow_unused=True)
    for leaf, grad in zip(leaves, grads):
        if grad is not None:
            assert torch.isfinite(grad).all(), f"non-finite gradient for a tensor of shape {tuple(leaf.shape)}"
    return value




def _duplicate_params():
    for c in R.ALL_TERMS:
        yield pytest.param(*c, id=c[0])


@pytest.mark.parametrize("name, kind, options, s_shape, t_shape", list(_duplicate_params()))
def test_no_nan_with_exact_duplicate_tokens_and_layers(name, kind, options, s_shape, t_shape):
    lengths, n = [8, 4, 2, 1], 8
    student = _dyadic_duplicates(s_shape, lengths, n, seed=71)
    teacher = _dyadic_duplicates(t_shape, lengths, n, seed=72)
    term = R.build_term(kind, options, s_shape, t_shape).double()
    _check_finite(term, student, teacher)


@pytest.mark.parametrize("name, kind, options, s_shape, t_shape", TERMS)
@pytest.mark.parametrize(
    "lengths",
    [
        pytest.param([1, 1, 1], id="one-valid-token-per-row"),
        pytest.param([6, 0, 3], id="an-all-padding-sample"),
        pytest.param([6], id="batch-size-1"),
        pytest.param([1], id="batch-size-1-one-token"),
        pytest.param([5, 2, 1, 0], id="mixed"),
    ],
)
def test_no_nan_on_degenerate_batches(name, kind, options, s_shape, t_shape, lengths):
    n = max(lengths)
    mask = R.make_mask(lengths, n)
    student = R.make_features(s_shape, mask, dtype=torch.float32, seed=73, scale=20.0)
    teacher = R.make_features(t_shape, mask, dtype=torch.float32, seed=74, scale=20.0)
    term = R.build_term(kind, options, s_shape, t_shape)
    value = _check_finite(term, student, teacher)
    if kind in ("wr_pair", "wr_angle") and max(lengths) <= 1:
        assert float(value.detach()) == 0.0  # no sentence has two tokens: no word relation to compare


def test_ckd_relations_of_an_all_padding_batch_are_zero():
    mask = R.make_mask([0, 0], 4)
    for name, kind, options, s_shape, t_shape in R.ALL_TERMS[:9]:
        student = R.make_features(s_shape, mask, seed=75, requires_grad=True)
        teacher = R.make_features(t_shape, mask, seed=76)
        value = R.build_term(kind, options, s_shape, t_shape)(student, teacher, Targets())
        assert float(value.detach()) == 0.0, name
        grads = torch.autograd.grad(value, list(student.hidden_states), allow_unused=True)
        assert all(g is None or not g.any() for g in grads), name


@pytest.mark.parametrize("kind, options", [
    ("wr_pair", {}), ("wr_pair", {"mode": "distance"}), ("wr_angle", {"window": None}), ("wr_angle", {"window": 3}),
    ("ltr_pair", {}), ("ltr_pair", {"mode": "distance"}), ("ltr_angle", {}),
])
def test_single_aligned_layer(kind, options):
    s_shape, t_shape = R.STUDENT, R.TEACHER
    mask = R.make_mask([6, 4, 1], 6)
    student = R.make_features(s_shape, mask, seed=77, scale=20.0, requires_grad=True)
    teacher = R.make_features(t_shape, mask, seed=78, scale=20.0)
    term = R.build_term(kind, {**options, "layers": [[2, 6]]}, s_shape, t_shape)
    assert term.layer_map == ((2, 6),)
    value = term(student, teacher, Targets())
    assert torch.isfinite(value)
    grads = torch.autograd.grad(value, list(student.hidden_states), allow_unused=True)
    assert all(g is None or torch.isfinite(g).all() for g in grads)
    if kind.startswith("ltr"):
        # one layer per token: no pair of layers to relate
        assert float(value.detach()) == 0.0
    else:
        ref = R.wr_pair(student, teacher, ((2, 6),), **({"mode": "distance"} if options.get("mode") else {})) \
            if kind == "wr_pair" else R.wr_angle(student, teacher, ((2, 6),), options["window"])
        assert R.rel_err(value, ref) <= 1e-5
        assert grads[2] is not None and grads[2].any()
        assert all(g is None for i, g in enumerate(grads) if i != 2)


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name, kind, options, s_shape, t_shape", TERMS)
def test_half_precision_inputs_are_computed_in_float32_or_better(name, kind, options, s_shape, t_shape, half):
    mask = R.make_mask([7, 5, 2, 1], 7)
    student = R.map_features(R.make_features(s_shape, mask, dtype=torch.float32, seed=79, scale=3.0), lambda t: t.to(half))
    teacher = R.map_features(R.make_features(t_shape, mask, dtype=torch.float32, seed=80, scale=3.0), lambda t: t.to(half))
    term = R.build_term(kind, options, s_shape, t_shape)

    value = _check_finite(term, student, teacher)
    assert value.dtype in (torch.float32, torch.float64)
    # the same (exactly representable) values given as float32
    as_float = R.run_term(term, R.map_features(student, lambda t: t.float()), R.map_features(teacher, lambda t: t.float()),
                          _labels(4), _ids(4))
    assert R.rel_err(value, as_float) <= 1e-5, (float(value), float(as_float))


def test_angle_relation_blocks_and_checkpointing_change_nothing():
    """Small max_block_elements forces the blocked, checkpointed path: same value, same gradient."""
    g = torch.Generator().manual_seed(81)
    s = (torch.randn(7, 6, 5, generator=g, dtype=torch.float64) * 10).requires_grad_(True)
    t = torch.randn(7, 6, 9, generator=g, dtype=torch.float64) * 10
    s.data[:, 1] = s.data[:, 0] + 1e-4
    valid = torch.ones(7, 6, dtype=torch.bool)
    valid[3, 4:] = False
    for window in (None, 3):
        whole, count = CR.angle_relation_sse(s, t, valid, window=window)
        (grad_whole,) = torch.autograd.grad(whole, s)
        blocked, count_b = CR.angle_relation_sse(s, t, valid, window=window, max_block_elements=40)
        (grad_blocked,) = torch.autograd.grad(blocked, s)
        assert float(count) == float(count_b)
        assert torch.allclose(whole, blocked, rtol=1e-12)
        assert torch.allclose(grad_whole, grad_blocked, rtol=1e-10, atol=1e-14)


def test_teacher_gets_no_gradient():
    mask = R.make_mask([5, 3], 5)
    for name, kind, options, s_shape, t_shape in R.ALL_TERMS:
        student = R.make_features(s_shape, mask, seed=82, requires_grad=True)
        teacher = R.make_features(t_shape, mask, seed=83, requires_grad=True)
        term = R.build_term(kind, options, s_shape, t_shape).double()
        value = R.run_term(term, student, teacher, _labels(2), _ids(2))
        grads = torch.autograd.grad(value, R.feature_tensors(teacher), allow_unused=True)
        assert all(g is None or not g.any() for g in grads), name
