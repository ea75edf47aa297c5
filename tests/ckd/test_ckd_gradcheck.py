"""torch.autograd.gradcheck (float64, small sizes) for the CKD relations and some baselines,
including near-coincident tokens that take the direct "close pair" path of the angle relation."""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck

import ckd_reference as R
from ckd import Features, ModelShape
from ckd import relations as CR
from ckd.terms import Targets
from ckd.terms.codir import contrastive_loss

S = ModelShape(num_layers=2, hidden_size=4, num_heads=2)
T = ModelShape(num_layers=4, hidden_size=6, num_heads=2)
MASK = R.make_mask([4, 3, 1], 4)


def _sets(term, student: Features, teacher: Features):
    """The relation's sets, built here from the documented layout: word relations have one set per
    (aligned layer, sample) whose members are tokens; layer relations one set per (sample, token)
    whose members are the token's aligned-layer vectors. Validity follows the student's mask."""
    mask = student.attention_mask.to(torch.bool)
    if term.kind.startswith("wr"):
        s = torch.cat([student.hidden_states[i] for i, _ in term.layer_map])
        t = torch.cat([teacher.hidden_states[j] for _, j in term.layer_map])
        return s, t, mask.repeat(len(term.layer_map), 1)
    s = torch.stack([student.hidden_states[i] for i, _ in term.layer_map], dim=2).flatten(0, 1)
    t = torch.stack([teacher.hidden_states[j] for _, j in term.layer_map], dim=2).flatten(0, 1)
    return s, t, mask.reshape(-1, 1).expand(-1, len(term.layer_map))


def relation_value(term, student: Features, teacher: Features) -> torch.Tensor:
    """The CKD term's value in float64 from the public relation primitives, without the final cast of
    the term's result to float32 (which would quantise gradcheck's finite differences)."""
    s, t, valid = _sets(term, student, teacher)
    if term.kind.endswith("pair"):
        o = term.options
        if o.mode == "cos_kl":
            total = CR.cosine_kl_sum(s, t, valid)
        else:
            total = CR.distance_relation_sum(s, t, valid, o.squared, o.normalize, o.distance_loss)
        return total / CR.pair_count(valid).clamp_min(1.0)
    sse, count = CR.angle_relation_sse(s, t, valid, window=getattr(term.options, "window", None))
    return sse / count.clamp_min(1.0)


def _has_close_pair(x: torch.Tensor, valid: torch.Tensor) -> bool:
    """Whether some valid pair is "close" in the sense of relations.CLOSE_RELATIVE_DISTANCE: distance
    below that fraction of the members' norms after centring on the set's valid mean."""
    close = CR.CLOSE_RELATIVE_DISTANCE
    for k in range(x.shape[0]):
        members = [i for i in range(x.shape[1]) if valid[k, i]]
        c = x[k, members] - x[k, members].mean(0)
        for a in range(len(members)):
            for b in range(a + 1, len(members)):
                if (c[a] - c[b]).square().sum() <= close**2 * (c[a].square().sum() + c[b].square().sum()):
                    return True
    return False


def _features(near: float | None = None, seed: int = 0):
    student = R.make_features(S, MASK, dtype=torch.float64, seed=seed)
    teacher = R.make_features(T, MASK, dtype=torch.float64, seed=seed + 1)
    if near is not None:
        hidden = [h.clone() for h in student.hidden_states]
        for l, h in enumerate(hidden):
            # tokens 0 and 1 of sample 0 at relative distance `near` (word relations)
            noise = torch.randn(S.hidden_size, generator=torch.Generator().manual_seed(l), dtype=torch.float64)
            h[0, 1] = h[0, 0] + near * h[0, 0].norm() * noise / noise.norm()
            if l == 1:
                # token 2 of sample 0 barely moves from the embeddings to layer 1 (layer relations)
                h[0, 2] = hidden[l - 1][0, 2] + near * hidden[l - 1][0, 2].norm() * noise / noise.norm()
        student = Features(tuple(hidden), MASK)
    return student, teacher


CKD = [
    pytest.param("wr_pair", {}, id="wr_pair-cos_kl"),
    pytest.param("wr_pair", {"mode": "distance"}, id="wr_pair-distance"),
    pytest.param("wr_pair", {"mode": "distance", "squared": False, "distance_loss": "l2"}, id="wr_pair-distance-sqrt"),
    pytest.param("wr_angle", {"window": None}, id="wr_angle-full"),
    pytest.param("wr_angle", {"window": 3}, id="wr_angle-w3"),
    pytest.param("ltr_pair", {}, id="ltr_pair-cos_kl"),
    pytest.param("ltr_pair", {"mode": "distance"}, id="ltr_pair-distance"),
    pytest.param("ltr_angle", {}, id="ltr_angle"),
]


@pytest.mark.parametrize("near", [None, 1e-3], ids=["random", "near-pair-1e-3"])
@pytest.mark.parametrize("kind, options", CKD)
def test_gradcheck_ckd_relations(kind, options, near):
    student, teacher = _features(near)
    term = R.build_term(kind, options, S, T)
    # the float64 path is the term's computation
    assert R.rel_err(term(student, teacher, Targets()), relation_value(term, student, teacher)) <= 1e-6

    if near is not None and kind.endswith("angle"):
        # the near pair really goes through the direct ("close") path
        s, _, valid = _sets(term, student, teacher)
        assert _has_close_pair(s, valid)

    def f(*hidden):
        return relation_value(term, Features(hidden, MASK), teacher)

    inputs = tuple(h.detach().clone().requires_grad_(True) for h in student.hidden_states)
    assert gradcheck(f, inputs)


@pytest.mark.parametrize("kind, options", [("wr_pair", {}), ("wr_angle", {"window": None})])
def test_gradcheck_through_the_term_with_float64_inputs(kind, options):
    student, teacher = _features()
    term = R.build_term(kind, options, S, T)

    def f(*hidden):
        return term(Features(hidden, MASK), teacher, Targets())

    assert gradcheck(f, tuple(h.detach().clone().requires_grad_(True) for h in student.hidden_states))


def test_gradcheck_angle_relation_exact_duplicate_and_padding():
    """Exact duplicates (psi defined as 0) and padded members: gradient still matches finite differences."""
    g = torch.Generator().manual_seed(3)
    s = torch.randn(2, 5, 3, generator=g, dtype=torch.float64)
    t = torch.randn(2, 5, 4, generator=g, dtype=torch.float64)
    s[0, 3] = s[0, 1] + 2e-3  # close pair
    t[1, 2] = t[1, 0]  # exact duplicate on the teacher side
    valid = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]], dtype=torch.bool)
    for window in (None, 3):
        assert gradcheck(lambda x: CR.angle_relation_sse(x, t, valid, window=window)[0], (s.clone().requires_grad_(True),))


BASELINES = [
    pytest.param("tinybert_attention", {}, ModelShape(2, 4, 2), ("queries", "keys"), id="tinybert_attention"),
    pytest.param("tinybert_hidden", {}, S, ("hidden_states",), id="tinybert_hidden"),
    pytest.param("pkd", {}, ModelShape(2, 6, 2), ("hidden_states",), id="pkd"),
    pytest.param("logit_kd", {"temperature": 2.0, "t_squared": True}, S, ("logits",), id="logit_kd"),
    pytest.param("supcon", {"temperature": 0.5}, S, ("hidden_states",), id="supcon"),
    pytest.param("mlkd_ffn", {}, S, ("hidden_states",), id="mlkd_ffn"),
]


@pytest.mark.parametrize("kind, options, s_shape, fields", BASELINES)
def test_gradcheck_baselines(kind, options, s_shape, fields):
    student = R.make_features(s_shape, MASK, dtype=torch.float64, seed=5)
    teacher = R.make_features(T, MASK, dtype=torch.float64, seed=6)
    term = R.build_term(kind, options, s_shape, T).double()
    labels = torch.tensor([0, 1, 0])
    base = {
        "hidden_states": list(student.hidden_states),
        "logits": [student.logits],
        "queries": [student.queries[k] for k in sorted(student.queries)],
        "keys": [student.keys[k] for k in sorted(student.keys)],
    }
    inputs, slices = [], {}
    for name in fields:
        slices[name] = (len(inputs), len(inputs) + len(base[name]))
        inputs.extend(x.detach().clone().requires_grad_(True) for x in base[name])

    def f(*xs):
        def part(name):
            a, b = slices[name]
            return xs[a:b]

        feats = Features(
            hidden_states=tuple(part("hidden_states")) if "hidden_states" in slices else student.hidden_states,
            attention_mask=MASK,
            logits=part("logits")[0] if "logits" in slices else student.logits,
            queries=dict(zip(sorted(student.queries), part("queries"))) if "queries" in slices else student.queries,
            keys=dict(zip(sorted(student.keys), part("keys"))) if "keys" in slices else student.keys,
            num_heads=s_shape.num_heads,
        )
        return term(feats, teacher, Targets(labels=labels))

    assert f(*inputs).dtype == torch.float64
    assert gradcheck(f, tuple(inputs))


def test_gradcheck_contrastive_loss():
    g = torch.Generator().manual_seed(7)
    anchor = torch.nn.functional.normalize(torch.randn(3, 4, generator=g, dtype=torch.float64), dim=-1)
    bank = torch.nn.functional.normalize(torch.randn(10, 4, generator=g, dtype=torch.float64), dim=-1)
    positive = torch.tensor([1, 5, 7])
    negatives = torch.randint(10, (3, 4), generator=g)
    assert gradcheck(
        lambda a: contrastive_loss(a, bank, positive, negatives, 0.5), (anchor.clone().requires_grad_(True),)
    )
