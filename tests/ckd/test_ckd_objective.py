"""The Objective: weighted total, parts, the features it needs, its own trainable / checkpointed state."""

from __future__ import annotations

import torch

import ckd_reference as R
from ckd import FeatureNeeds, Features, ModelShape, Needs, TaskShape, build_objective
from ckd.terms import Targets

S = ModelShape(num_layers=3, hidden_size=24, num_heads=3)
T = ModelShape(num_layers=6, hidden_size=48, num_heads=4)
S4 = ModelShape(num_layers=3, hidden_size=24, num_heads=4)
TASK = TaskShape(num_labels=3, num_examples=50)
MASK = R.make_mask([6, 4, 1, 3], 6)
LABELS = torch.tensor([0, 1, 2, 1])
IDS = torch.tensor([1, 5, 8, 13])

EVERYTHING = {
    "ce": {"weight": 0.5},
    "logit_kd": {"weight": 2.0, "temperature": 3.0},
    "wr_pair": {"weight": 100},
    "wr_angle": {"weight": 1000, "window": 3},
    "angle_full": {"kind": "wr_angle", "weight": 7, "window": None},
    "ltr_pair": {"weight": 1.5},
    "ltr_angle": {"weight": 3},
    "codir": {"weight": 0.1, "dim": 8, "negatives": 4},
    "mlkd_embedding": {"weight": 0.3},
    "mlkd_attention": {"weight": 0.7},
    "mlkd_ffn": {"weight": 0.2},
    "mlkd_sample": {"weight": 0.9},
    "supcon": {"weight": 0.4},
    "tinybert_hidden": {"weight": 1.1},
    "tinybert_embedding": {"weight": 1.2},
    "minilmv2": {"weight": 0.6, "relation_heads": 4},
}


def _features(student_shape=S, teacher_shape=T, requires_grad=True):
    return (
        R.make_features(student_shape, MASK, dtype=torch.float32, seed=101, requires_grad=requires_grad),
        R.make_features(teacher_shape, MASK, dtype=torch.float32, seed=102),
    )


def test_total_is_the_weighted_sum_of_the_parts():
    objective = build_objective({"terms": EVERYTHING}, S, T, TASK)
    student, teacher = _features()
    torch.manual_seed(0)
    total, parts = objective(student, teacher, labels=LABELS, example_ids=IDS)
    assert set(parts) == set(EVERYTHING)
    assert total.dim() == 0 and total.dtype == torch.float32 and torch.isfinite(total)
    expected = sum(EVERYTHING[name]["weight"] * parts[name].double() for name in parts)
    assert torch.allclose(total.double(), expected, rtol=1e-5)
    for name, value in parts.items():
        assert value.dim() == 0 and not value.requires_grad, name
        assert torch.isfinite(value), name
    # each part is the term's own value
    for name in ("wr_pair", "wr_angle", "angle_full", "ltr_angle", "mlkd_embedding"):
        own = objective.terms[name](student, teacher, Targets())
        assert torch.allclose(own.detach().float(), parts[name].float(), rtol=1e-6), name
    total.backward()
    assert all(h.grad is not None for h in student.hidden_states)


def test_total_matches_the_terms_built_alone():
    config = {"ce": {"weight": 0.5}, "wr_pair": {"weight": 100}, "ltr_angle": {"weight": 3}, "logit_kd": {"temperature": 2.0}}
    objective = build_objective({"terms": config}, S, T, TASK)
    student, teacher = _features(requires_grad=False)
    total, parts = objective(student, teacher, labels=LABELS)
    alone = {k: R.build_term(k, v, S, T, TASK)(student, teacher, Targets(labels=LABELS)) for k, v in config.items()}
    for k in config:
        assert torch.allclose(parts[k].float(), alone[k].float(), rtol=1e-6), k
    want = sum(config[k].get("weight", 1.0) * alone[k].double() for k in config)
    assert torch.allclose(total.double(), want, rtol=1e-5)


def test_needs_lists_exactly_the_layers_used_emb_skip_6_to_2():
    objective = build_objective({"terms": {"wr_pair": {}}}, ModelShape(2, 24, 3), ModelShape(6, 48, 4), TASK)
    assert objective.needs == Needs(
        student=FeatureNeeds(hidden_states=frozenset({0, 1, 2})),
        teacher=FeatureNeeds(hidden_states=frozenset({0, 3, 6})),
    )


def test_needs_of_the_ckd_paper_preset_12_to_6():
    objective = build_objective({"preset": "ckd-paper", "task": "mrpc"}, ModelShape(6, 24, 3), ModelShape(12, 48, 4), TaskShape(2))
    assert objective.needs == Needs(
        student=FeatureNeeds(hidden_states=frozenset(range(7)), logits=True),
        teacher=FeatureNeeds(hidden_states=frozenset(range(0, 13, 2)), logits=True),
    )


def test_needs_is_the_union_over_terms_and_nothing_more():
    config = {
        "ce": {},
        "wr_angle": {"layers": [[1, 2], [3, 6]]},
        "tinybert_attention": {"layers": [[2, 4]]},
        "probs": {"kind": "tinybert_attention", "on": "probs", "layers": "last"},
        "minilm": {"teacher_layer": 5},
        "mlkd_attention": {"layers": [[1, 1]]},
        "minilmv2": {"relation_heads": 4},
        "pkd_like": {"kind": "mlkd_ffn", "layers": [[2, 3]]},
        "codir": {"student_layers": [2], "teacher_layers": [4, 6]},
    }
    objective = build_objective({"terms": config}, S4, T, TASK)
    assert objective.needs == Needs(
        student=FeatureNeeds(
            hidden_states=frozenset({1, 2, 3}),
            attentions=frozenset({3}),
            qkv=frozenset({2, 3}),
            attention_outputs=frozenset({1}),
            logits=True,
        ),
        teacher=FeatureNeeds(
            hidden_states=frozenset({2, 3, 4, 6}),
            attentions=frozenset({5, 6}),
            qkv=frozenset({4, 5, 6}),
            attention_outputs=frozenset({1}),
            logits=False,
        ),
    )


def test_per_term_needs():
    cases = {
        "logit_kd": (FeatureNeeds(logits=True), FeatureNeeds(logits=True)),
        "ce": (FeatureNeeds(logits=True), FeatureNeeds()),
        "mlkd_embedding": (FeatureNeeds(hidden_states=frozenset({0})), FeatureNeeds(hidden_states=frozenset({0}))),
        "tinybert_embedding": (FeatureNeeds(hidden_states=frozenset({0})), FeatureNeeds(hidden_states=frozenset({0}))),
        "mlkd_sample": (FeatureNeeds(hidden_states=frozenset({3})), FeatureNeeds(hidden_states=frozenset({6}))),
        "supcon": (FeatureNeeds(hidden_states=frozenset({3})), FeatureNeeds()),
        "ltr_angle": (FeatureNeeds(hidden_states=frozenset({0, 1, 2, 3})), FeatureNeeds(hidden_states=frozenset({0, 2, 4, 6}))),
        "tinybert_hidden": (FeatureNeeds(hidden_states=frozenset({1, 2, 3})), FeatureNeeds(hidden_states=frozenset({2, 4, 6}))),
        "codir": (FeatureNeeds(hidden_states=frozenset({1, 2, 3})), FeatureNeeds(hidden_states=frozenset({2, 4, 6}))),
        "minilmv2": (FeatureNeeds(qkv=frozenset({3})), FeatureNeeds(qkv=frozenset({6}))),
    }
    for kind, (student, teacher) in cases.items():
        options = {"relation_heads": 4} if kind == "minilmv2" else {}
        objective = build_objective({"terms": {kind: options}}, S, T, TASK)
        assert objective.needs == Needs(student=student, teacher=teacher), kind


def test_runs_on_features_holding_only_what_it_needs():
    """A job fills only the layers `needs` names (others None / absent): same result."""
    config = {k: v for k, v in EVERYTHING.items() if k not in ("codir",)}
    objective = build_objective({"terms": config}, S, T, TASK)
    student, teacher = _features(requires_grad=False)
    total, _ = objective(student, teacher, labels=LABELS)
    needs = objective.needs

    def strip(f: Features, n: FeatureNeeds) -> Features:
        return Features(
            hidden_states=tuple(h if i in n.hidden_states else None for i, h in enumerate(f.hidden_states)),
            attention_mask=f.attention_mask,
            logits=f.logits if n.logits else None,
            attentions={k: v for k, v in f.attentions.items() if k in n.attentions},
            queries={k: v for k, v in f.queries.items() if k in n.qkv},
            keys={k: v for k, v in f.keys.items() if k in n.qkv},
            values={k: v for k, v in f.values.items() if k in n.qkv},
            attention_outputs={k: v for k, v in f.attention_outputs.items() if k in n.attention_outputs},
            num_heads=f.num_heads,
        )

    stripped_total, _ = objective(strip(student, needs.student), strip(teacher, needs.teacher), labels=LABELS)
    assert torch.allclose(stripped_total, total, rtol=1e-6)


def test_objective_state_holds_projections_and_codir_banks():
    config = {
        "wr_pair": {},
        "tinybert_hidden": {},
        "tinybert_embedding": {},
        "mlkd_ffn": {},
        "codir": {"dim": 8},
    }
    objective = build_objective({"terms": config}, S, T, TASK)
    params = dict(objective.named_parameters())
    expected = {
        "terms.tinybert_hidden.projection.weight": (48, 24),
        "terms.tinybert_hidden.projection.bias": (48,),
        "terms.tinybert_embedding.projection.weight": (48, 24),
        "terms.tinybert_embedding.projection.bias": (48,),
        "terms.mlkd_ffn.projection.weight": (48, 24),
        "terms.mlkd_ffn.projection.bias": (48,),
        "terms.codir.student_head.weight": (8, 24 * 3),
        "terms.codir.student_head.bias": (8,),
        "terms.codir.teacher_head.weight": (8, 48 * 3),
        "terms.codir.teacher_head.bias": (8,),
    }
    assert {k: tuple(v.shape) for k, v in params.items()} == expected
    assert all(p.requires_grad for p in params.values())
    assert set(objective.trainable_modules().parameters()) == set(objective.parameters())

    state = objective.state_dict()
    assert set(expected) <= set(state)
    assert tuple(state["terms.codir.student_bank"].shape) == (50, 8)
    assert tuple(state["terms.codir.teacher_bank"].shape) == (50, 8)
    assert tuple(state["terms.codir.bank_labels"].shape) == (50,)
    # unit rows
    assert torch.allclose(state["terms.codir.student_bank"].norm(dim=-1), torch.ones(50), atol=1e-5)

    # a checkpoint restores the banks into a fresh objective
    student, teacher = _features(requires_grad=False)
    objective(student, teacher, labels=LABELS, example_ids=IDS)  # training mode: banks updated
    fresh = build_objective({"terms": config}, S, T, TASK)
    fresh.load_state_dict(objective.state_dict())
    for key in ("student_bank", "teacher_bank", "bank_labels"):
        assert torch.equal(getattr(fresh.terms["codir"], key), getattr(objective.terms["codir"], key))
    assert fresh.terms["codir"].bank_labels[IDS].tolist() == LABELS.tolist()


def test_projections_receive_gradients():
    objective = build_objective({"terms": {"tinybert_hidden": {}, "mlkd_ffn": {}, "codir": {"dim": 8}}}, S, T, TASK)
    student, teacher = _features()
    total, _ = objective(student, teacher, labels=LABELS, example_ids=IDS)
    total.backward()
    for name, p in objective.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_ckd_only_objective_has_no_parameters_or_buffers():
    objective = build_objective({"preset": "ckd-paper", "task": "cola"}, S, T, TaskShape(2))
    assert list(objective.parameters()) == []
    assert objective.state_dict() == {}
