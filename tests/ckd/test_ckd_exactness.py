"""Every term against an independent float64 computation of its formula (ckd_reference.py).

Relative error <= 1e-5 on random inputs and on adversarial ones: near-duplicate tokens (relative
distance 1e-3..1e-5) and exact duplicates at hidden-state scale 10-50, near-duplicate / copied layer
vectors, and a large common offset; with float32 inputs (what a model produces) and float64 inputs.
"""

from __future__ import annotations

import copy

import pytest
import torch

import ckd_reference as R
from ckd import Features, ModelShape, TaskShape
from ckd import relations as CR
from ckd.terms import Targets
from ckd.terms.codir import contrastive_loss

RTOL = 1e-5

# Student narrower and with fewer heads than the teacher (no projection in the CKD terms).
S = ModelShape(num_layers=3, hidden_size=24, num_heads=3)
T = ModelShape(num_layers=6, hidden_size=48, num_heads=4)
N = 14
LENGTHS = [14, 9, 2, 1]  # includes a sample with a single valid token
LABELS = torch.tensor([0, 2, 2, 1])
OFFSET = 300.0  # common offset, 6-30x the token norms (10-50)


def _ckd_features(inputs: str, dtype: torch.dtype, exact_duplicates: bool = True):
    mask = R.make_mask(LENGTHS, N)
    if inputs == "random":
        return (
            R.make_features(S, mask, dtype=dtype, seed=11),
            R.make_features(T, mask, dtype=dtype, seed=12),
        )
    offset = OFFSET if inputs == "offset" else 0.0
    kw = dict(dtype=dtype, offset_norm=offset, exact_duplicates=exact_duplicates)
    return (
        R.adversarial_features(S, mask, seed=21, **kw),
        R.adversarial_features(T, mask, seed=22, **kw),
    )


# name, kind, options, reference(term, student, teacher), exact duplicates allowed in the input
CKD_CASES = [
    ("wr_pair-cos_kl", "wr_pair", {"mode": "cos_kl"}, lambda t, s, f: R.wr_pair(s, f, t.layer_map), True),
    # normalised distance relations: exact duplicates are covered by their own test below
    ("wr_pair-distance", "wr_pair", {"mode": "distance"},
     lambda t, s, f: R.wr_pair(s, f, t.layer_map, mode="distance"), False),
    ("wr_pair-distance-l2", "wr_pair", {"mode": "distance", "squared": False, "distance_loss": "l2"},
     lambda t, s, f: R.wr_pair(s, f, t.layer_map, mode="distance", squared=False, loss="l2"), False),
    ("wr_pair-distance-raw-l1", "wr_pair",
     {"mode": "distance", "squared": False, "normalize": False, "distance_loss": "l1"},
     lambda t, s, f: R.wr_pair(s, f, t.layer_map, mode="distance", squared=False, normalize=False, loss="l1"), True),
    ("wr_angle-full", "wr_angle", {"window": None}, lambda t, s, f: R.wr_angle(s, f, t.layer_map, None), True),
    ("wr_angle-w3", "wr_angle", {"window": 3}, lambda t, s, f: R.wr_angle(s, f, t.layer_map, 3), True),
    ("wr_angle-w5", "wr_angle", {"window": 5}, lambda t, s, f: R.wr_angle(s, f, t.layer_map, 5), True),
    ("wr_angle-w21", "wr_angle", {"window": 21}, lambda t, s, f: R.wr_angle(s, f, t.layer_map, 21), True),
    ("ltr_pair-cos_kl", "ltr_pair", {}, lambda t, s, f: R.ltr_pair(s, f, t.layer_map), True),
    ("ltr_pair-distance", "ltr_pair", {"mode": "distance"},
     lambda t, s, f: R.ltr_pair(s, f, t.layer_map, mode="distance"), False),
    ("ltr_angle", "ltr_angle", {}, lambda t, s, f: R.ltr_angle(s, f, t.layer_map), True),
]



def _ckd_params():
    for name, kind, options, ref, dups in CKD_CASES:
        for inputs in ("random", "adversarial", "offset"):
            for dtype in (torch.float32, torch.float64):
                yield pytest.param(
                    kind, options, ref, dups, inputs, dtype,
                    id=f"{name}-{inputs}-{str(dtype).split('.')[-1]}",
                )


@pytest.mark.parametrize("kind, options, ref, dups, inputs, dtype", list(_ckd_params()))
def test_ckd_relation_matches_direct_float64(kind, options, ref, dups, inputs, dtype):
    student, teacher = _ckd_features(inputs, dtype, exact_duplicates=dups)
    term = R.build_term(kind, options, S, T)
    value = term(student, teacher, Targets())
    assert value.dtype in (torch.float32, torch.float64)
    assert torch.isfinite(value)
    expected = ref(term, student, teacher)
    assert R.rel_err(value, expected) <= RTOL, (float(value), float(expected))


@pytest.mark.parametrize("inputs", ["random", "adversarial", "offset"])
@pytest.mark.parametrize(
    "kind, options, ref, dups", [pytest.param(*c[1:], id=c[0]) for c in CKD_CASES]
)
def test_ckd_relation_gradient_matches_direct_float64(kind, options, ref, dups, inputs):
    """The gradient w.r.t. the student's hidden states equals autograd through the direct formula.

    (Unsquared distances are differentiated away from exact duplicates: at a duplicate the gradient of
    ||r_i - r_j|| is undefined; test_ckd_robustness checks it is at least finite.)"""
    dups = dups and options.get("squared", True)
    student, teacher = _ckd_features(inputs, torch.float64, exact_duplicates=dups)
    student = R.map_features(student, lambda t: t.detach().requires_grad_(True))
    term = R.build_term(kind, options, S, T)
    used = sorted({s for s, _ in term.layer_map})
    inputs_ = [student.hidden_states[l] for l in used]
    got = torch.autograd.grad(term(student, teacher, Targets()), inputs_)
    want = torch.autograd.grad(ref(term, student, teacher), inputs_)
    for g, w in zip(got, want):
        scale = w.abs().max().item()
        assert torch.allclose(g, w, rtol=1e-5, atol=1e-6 * scale), (g - w).abs().max().item() / scale


def test_distance_mode_normaliser_counts_exact_duplicates_like_near_duplicates():
    """The normaliser of the distance relation is the mean over the set's valid off-diagonal pairs (the
    reference code clamps every distance to >= 1e-12 before counting), so the loss is continuous when
    a token moves onto another one."""
    exact = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]], dtype=torch.float64)
    near = exact.clone()
    near[0, 1, 1] = 1e-8
    teacher = torch.tensor([[[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]]], dtype=torch.float64)
    shape = ModelShape(1, 2, 1)
    term = R.build_term("wr_pair", {"mode": "distance", "layers": "last"}, shape, shape)
    mask = torch.ones(1, 3, dtype=torch.long)
    t_features = Features((teacher, teacher), mask)

    def value(s):
        return term(Features((s, s), mask), t_features, Targets())

    expected = R.wr_pair(Features((exact, exact), mask), t_features, term.layer_map, mode="distance")
    assert R.rel_err(value(near), expected) <= RTOL  # holds
    assert abs(float(value(exact)) - float(value(near))) <= 1e-6
    assert R.rel_err(value(exact), expected) <= RTOL


# --------------------------------------------------------------------------------------------
# the other terms
# --------------------------------------------------------------------------------------------

S4 = ModelShape(num_layers=3, hidden_size=24, num_heads=4)  # equal head counts (TinyBERT, MiniLM)
T4 = ModelShape(num_layers=6, hidden_size=48, num_heads=4)
SP = ModelShape(num_layers=3, hidden_size=32, num_heads=4)  # equal widths (PKD)
TP = ModelShape(num_layers=6, hidden_size=32, num_heads=4)
CLS = TaskShape(num_labels=3, num_examples=64)
REG = TaskShape(num_labels=1, is_regression=True)


def _proj(term):
    return term.projection.weight, term.projection.bias


OTHER_CASES = [
    # name, kind, options, student, teacher, task, reference(term, s, t, labels)
    ("logit_kd-T2", "logit_kd", {"temperature": 2.0}, S, T, CLS,
     lambda term, s, t, y: R.logit_kd(s.logits, t.logits, 2.0, False, False)),
    ("logit_kd-T4-tsq", "logit_kd", {"temperature": 4.0, "t_squared": True}, S, T, CLS,
     lambda term, s, t, y: R.logit_kd(s.logits, t.logits, 4.0, True, False)),
    ("logit_kd-regression", "logit_kd", {"temperature": 3.0}, S, T, REG,
     lambda term, s, t, y: R.logit_kd(s.logits, t.logits, 3.0, False, True)),
    ("ce", "ce", {}, S, T, CLS, lambda term, s, t, y: R.cross_entropy(s.logits, y, False)),
    ("ce-regression", "ce", {}, S, T, REG, lambda term, s, t, y: R.cross_entropy(s.logits, y, True)),
    ("mlkd_embedding", "mlkd_embedding", {}, S, T, CLS, lambda term, s, t, y: R.mlkd_embedding(s, t)),
    # teacher width 48 (4 heads) cut into the student's 3 head groups of 16
    ("mlkd_attention", "mlkd_attention", {}, S, T, CLS,
     lambda term, s, t, y: R.mlkd_attention(s, t, term.layer_map, S.num_heads)),
    ("mlkd_attention-explicit", "mlkd_attention", {"layers": [[1, 3], [3, 5]]}, S, T, CLS,
     lambda term, s, t, y: R.mlkd_attention(s, t, ((1, 3), (3, 5)), S.num_heads)),
    ("mlkd_ffn", "mlkd_ffn", {}, S, T, CLS,
     lambda term, s, t, y: R.projected_mse(*_proj(term), s, t, ((1, 2), (2, 4), (3, 6)))),
    ("mlkd_sample", "mlkd_sample", {}, S, T, CLS, lambda term, s, t, y: R.mlkd_sample(s, t)),
    ("supcon", "supcon", {"temperature": 0.2}, S, T, CLS, lambda term, s, t, y: R.supcon(s, y, 0.2)),
    ("tinybert_attention-scores", "tinybert_attention", {}, S4, T4, CLS,
     lambda term, s, t, y: R.tinybert_attention(s, t, ((1, 2), (2, 4), (3, 6)), "scores")),
    ("tinybert_attention-probs", "tinybert_attention", {"on": "probs"}, S4, T4, CLS,
     lambda term, s, t, y: R.tinybert_attention(s, t, ((1, 2), (2, 4), (3, 6)), "probs")),
    ("tinybert_hidden", "tinybert_hidden", {}, S, T, CLS,
     lambda term, s, t, y: R.projected_mse(*_proj(term), s, t, ((1, 2), (2, 4), (3, 6)))),
    ("tinybert_embedding", "tinybert_embedding", {}, S, T, CLS,
     lambda term, s, t, y: R.projected_mse(*_proj(term), s, t, ((0, 0),))),
    ("pkd", "pkd", {}, SP, TP, CLS, lambda term, s, t, y: R.pkd(s, t, ((1, 2), (2, 4), (3, 6)))),
    ("minilm", "minilm", {}, S4, T4, CLS, lambda term, s, t, y: R.minilm(s, t, 3, 6)),
    ("minilm-teacher_layer", "minilm", {"teacher_layer": 4}, S4, T4, CLS, lambda term, s, t, y: R.minilm(s, t, 3, 4)),
    ("minilmv2", "minilmv2", {"relation_heads": 4}, S, T, CLS, lambda term, s, t, y: R.minilmv2(s, t, 3, 6, 4)),
    ("minilmv2-a2-layer5", "minilmv2", {"relation_heads": 2, "teacher_layer": 5}, S, T, CLS,
     lambda term, s, t, y: R.minilmv2(s, t, 3, 5, 2)),
]


def _other_features(s_shape, t_shape, task, inputs, dtype):
    mask = R.make_mask(LENGTHS, N)
    labels = torch.tensor([0.3, -1.2, 2.0, 0.7], dtype=dtype) if task.is_regression else LABELS
    if inputs == "random":
        fs = R.make_features(s_shape, mask, dtype=dtype, seed=31, num_labels=task.num_labels)
        ft = R.make_features(t_shape, mask, dtype=dtype, seed=32, num_labels=task.num_labels)
    else:
        # near-duplicate / duplicate tokens plus a common offset; norms kept where attention-style
        # scores a . b / sqrt(d) stay in a realistic range
        kw = dict(dtype=dtype, norms=(2.0, 6.0), offset_norm=10.0, num_labels=task.num_labels)
        fs = R.adversarial_features(s_shape, mask, seed=41, **kw)
        ft = R.adversarial_features(t_shape, mask, seed=42, **kw)
    return fs, ft, labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("inputs", ["random", "adversarial"])
@pytest.mark.parametrize(
    "kind, options, s_shape, t_shape, task, ref", [pytest.param(*c[1:], id=c[0]) for c in OTHER_CASES]
)
def test_term_matches_direct_float64(kind, options, s_shape, t_shape, task, ref, inputs, dtype):
    torch.manual_seed(0)
    student, teacher, labels = _other_features(s_shape, t_shape, task, inputs, dtype)
    term = R.build_term(kind, options, s_shape, t_shape, task).to(dtype)
    value = term(student, teacher, Targets(labels=labels))
    assert torch.isfinite(value)
    expected = ref(term, student, teacher, labels)
    assert R.rel_err(value, expected) <= RTOL, (float(value), float(expected))
    if dtype == torch.float64:
        # and the gradient w.r.t. every student tensor the term reads
        student = R.map_features(student, lambda t: t.detach().requires_grad_(True))
        leaves = R.feature_tensors(student)
        got = torch.autograd.grad(term(student, teacher, Targets(labels=labels)), leaves, allow_unused=True)
        want = torch.autograd.grad(ref(term, student, teacher, labels), leaves, allow_unused=True)
        for g, w in zip(got, want):
            if w is None:
                assert g is None or not g.any()
                continue
            assert torch.allclose(g, w, rtol=1e-6, atol=1e-9 * max(1.0, w.abs().max().item()))


# --------------------------------------------------------------------------------------------
# CoDIR
# --------------------------------------------------------------------------------------------


def test_contrastive_loss_matches_direct_float64():
    g = torch.Generator().manual_seed(5)
    anchor = torch.nn.functional.normalize(torch.randn(6, 8, generator=g, dtype=torch.float64), dim=-1)
    bank = torch.nn.functional.normalize(torch.randn(30, 8, generator=g, dtype=torch.float64), dim=-1)
    positive = torch.tensor([0, 4, 9, 13, 21, 29])
    negatives = torch.randint(30, (6, 7), generator=g)
    for tau in (0.07, 0.5, 2.0):
        value = contrastive_loss(anchor, bank, positive, negatives, tau)
        assert R.rel_err(value, R.contrastive(anchor, bank, positive, negatives, tau)) <= 1e-12
        # float32 inputs too
        value32 = contrastive_loss(anchor.float(), bank.float(), positive, negatives, tau)
        assert R.rel_err(value32, R.contrastive(anchor.float(), bank.float(), positive, negatives, tau)) <= RTOL


CODIR_TASK = TaskShape(num_labels=3, num_examples=20)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("sampling", ["different_label", "random"])
def test_codir_term_matches_direct_float64_with_its_negatives(dtype, sampling):
    """The full term against the direct formula, with the negatives the term itself draws: the RNG is
    seeded, the same draw is replayed through `sample_negatives` on a copy in the state the forward
    pass puts the term in (this batch's labels recorded), then the forward pass runs on that seed."""
    mask = R.make_mask(LENGTHS, N)
    student = R.make_features(S, mask, dtype=dtype, seed=51)
    teacher = R.make_features(T, mask, dtype=dtype, seed=52)
    options = {"dim": 8, "negatives": 6, "temperature": 0.07, "momentum": 0.5, "sampling": sampling}
    term = R.build_term("codir", options, S, T, CODIR_TASK).to(dtype)
    assert term.student_layers == [1, 2, 3] and term.teacher_layers == [2, 4, 6]
    term.bank_labels[:] = torch.arange(20) % 3  # labels already seen for every example
    ids = torch.tensor([3, 7, 11, 16])
    student_bank, teacher_bank = term.student_bank.clone(), term.teacher_bank.clone()

    replay = copy.deepcopy(term)
    replay.bank_labels[ids] = LABELS
    torch.manual_seed(1234)
    negatives = replay.sample_negatives(ids, LABELS)
    torch.manual_seed(1234)
    value = term(student, teacher, Targets(labels=LABELS, example_ids=ids))

    expected = R.codir(
        student, teacher, [1, 2, 3], [2, 4, 6],
        (term.student_head.weight, term.student_head.bias),
        (term.teacher_head.weight, term.teacher_head.bias),
        student_bank, teacher_bank, ids.tolist(), negatives, 0.07,
    )
    assert R.rel_err(value, expected) <= RTOL
    assert (term.bank_labels[ids] == LABELS).all()

    # momentum update of the banks (training mode): normalize(m * old + (1 - m) * current)
    with torch.no_grad():
        def rep(f, layers, head):
            x = torch.cat([f.hidden_states[l][:, 0].double() for l in layers], dim=-1)
            y = x @ head.weight.double().T + head.bias.double()
            return y / y.norm(dim=-1, keepdim=True)

        s_now = rep(student, [1, 2, 3], term.student_head)
        new = 0.5 * student_bank[ids].double() + 0.5 * s_now
        assert torch.allclose(term.student_bank[ids].double(), new / new.norm(dim=-1, keepdim=True), atol=1e-6)
        t_now = rep(teacher, [2, 4, 6], term.teacher_head)
        new = 0.5 * teacher_bank[ids].double() + 0.5 * t_now
        assert torch.allclose(term.teacher_bank[ids].double(), new / new.norm(dim=-1, keepdim=True), atol=1e-6)
        untouched = torch.ones(20, dtype=torch.bool)
        untouched[ids] = False
        assert torch.equal(term.student_bank[untouched], student_bank[untouched])


def test_codir_eval_mode_leaves_banks_alone():
    mask = R.make_mask(LENGTHS, N)
    student = R.make_features(S, mask, dtype=torch.float32, seed=53)
    teacher = R.make_features(T, mask, dtype=torch.float32, seed=54)
    term = R.build_term("codir", {"dim": 8, "negatives": 4}, S, T, CODIR_TASK).eval()
    banks = term.student_bank.clone(), term.teacher_bank.clone()
    term(student, teacher, Targets(labels=LABELS, example_ids=torch.tensor([0, 1, 2, 3])))
    assert torch.equal(term.student_bank, banks[0]) and torch.equal(term.teacher_bank, banks[1])


def _codir_term(sampling="different_label", task=CODIR_TASK, negatives=50):
    return R.build_term("codir", {"dim": 8, "negatives": negatives, "sampling": sampling}, S, T, task)


def test_codir_negatives_have_a_different_label_once_labels_are_known():
    term = _codir_term()
    term.bank_labels[:] = torch.arange(20) % 3
    ids = torch.tensor([0, 4, 8, 19])
    labels = torch.tensor([0, 1, 2, 1])
    torch.manual_seed(0)
    negatives = term.sample_negatives(ids, labels)
    assert negatives.shape == (4, 50)
    for b in range(4):
        assert (negatives[b] != ids[b]).all()
        assert (term.bank_labels[negatives[b]] != labels[b]).all()
        assert (term.bank_labels[negatives[b]] >= 0).all()


def test_codir_negatives_skip_unseen_examples_and_never_pick_the_example_itself():
    term = _codir_term()
    # only examples 10..13 seen so far
    term.bank_labels[10:14] = torch.tensor([0, 1, 1, 2])
    ids = torch.tensor([10, 11])
    torch.manual_seed(1)
    negatives = term.sample_negatives(ids, torch.tensor([0, 1]))
    assert set(negatives[0].tolist()) <= {11, 12, 13}
    assert set(negatives[1].tolist()) <= {10, 13}
    # no label seen yet -> any other example, never the example itself
    fresh = _codir_term()
    for sampling_term in (fresh, _codir_term("random"), _codir_term(task=TaskShape(1, True, 20))):
        torch.manual_seed(2)
        ids = torch.tensor([0, 5, 19])
        negatives = sampling_term.sample_negatives(ids, torch.tensor([0, 1, 2]))
        for b in range(3):
            assert (negatives[b] != ids[b]).all()
            assert ((negatives[b] >= 0) & (negatives[b] < 20)).all()


def test_codir_forward_records_labels_so_in_batch_negatives_differ():
    mask = R.make_mask(LENGTHS, N)
    student = R.make_features(S, mask, dtype=torch.float32, seed=55)
    teacher = R.make_features(T, mask, dtype=torch.float32, seed=56)
    term = _codir_term(negatives=20)
    ids = torch.tensor([2, 3, 4, 5])
    torch.manual_seed(3)
    term(student, teacher, Targets(labels=LABELS, example_ids=ids))
    assert term.bank_labels[ids].tolist() == LABELS.tolist()
    torch.manual_seed(4)
    negatives = term.sample_negatives(ids, LABELS)
    for b in range(4):
        assert (term.bank_labels[negatives[b]] != LABELS[b]).all()
        assert (negatives[b] != ids[b]).all()


# --------------------------------------------------------------------------------------------
# the angle relation: nested scales and window edges
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("window", [None, 3, 5, 21])
def test_angle_relation_on_a_tight_cluster_with_a_nested_near_pair(window, dtype):
    """Every token of the sentence within 1e-1..1e-4 of the others (relative to a norm-170 common
    part), inside that cluster a pair 1e-3 of the cluster's spread apart, and an exact duplicate."""
    g = torch.Generator().manual_seed(17)
    sets_s, sets_t = [], []
    for spread in (1e-1, 1e-2, 1e-3, 1e-4):
        x = torch.randn(16, generator=g, dtype=torch.float64) * 30 + spread * 30 * torch.randn(12, 16, generator=g, dtype=torch.float64)
        x[1] = x[0] + 1e-3 * spread * 30 * torch.randn(16, generator=g, dtype=torch.float64)
        x[5] = x[4]
        sets_s.append(x)
        sets_t.append(torch.randn(12, 8, generator=g, dtype=torch.float64) * 20)
    s, t = torch.stack(sets_s).to(dtype), torch.stack(sets_t).to(dtype)
    valid = torch.ones(4, 12, dtype=torch.bool)
    valid[2, 9:] = False
    sse, count = CR.angle_relation_sse(s, t, valid, window=window)
    want_sse, want_count = 0.0, 0
    for k in range(4):
        e, c = R.angle_sse_count(s[k], t[k], [i for i in range(12) if valid[k, i]], window)
        want_sse, want_count = want_sse + float(e), want_count + c
    assert float(count) == want_count
    assert abs(float(sse) - want_sse) <= 1e-9 * want_sse


def test_window_counts_only_existing_valid_neighbours_once():
    """Hazard 3 of the reference: clamped edge indices counted twice and padded neighbours counted.
    Window w=5 over 4 valid tokens of 6: vertex 0 sees {0,1,2}, 1 sees {0..3}, 2 sees {0..3},
    3 sees {1,2,3}; only those members enter the sum, each once. The normaliser is the reference's:
    w^2 = 25 per valid vertex, 100 (not the 9 + 16 + 16 + 9 = 50 valid triples)."""
    g = torch.Generator().manual_seed(2)
    s = torch.randn(1, 6, 5, generator=g, dtype=torch.float64)
    t = torch.randn(1, 6, 7, generator=g, dtype=torch.float64)
    valid = torch.tensor([[1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    sse5, count = CR.angle_relation_sse(s, t, valid, window=5)
    assert float(count) == 100
    # Garbage in the padded members changes nothing.
    s2, t2 = s.clone(), t.clone()
    s2[0, 4:] = 1e3 * torch.randn(2, 5, generator=g, dtype=torch.float64)
    t2[0, 4:] = s2[0, 4:, :1].expand(2, 7)
    sse5b, _ = CR.angle_relation_sse(s2, t2, valid, window=5)
    assert torch.allclose(sse5, sse5b, rtol=1e-12)
    # A window covering the whole sentence has the full relation's sum (its normaliser is w^2 per vertex).
    full = CR.angle_relation_sse(s, t, valid, window=None)
    assert float(full[1]) == 4 * 16
    for w in (7, 11, 21):
        wide = CR.angle_relation_sse(s, t, valid, window=w)
        assert float(wide[1]) == 4 * w * w
        assert torch.allclose(wide[0], full[0], rtol=1e-12)
    # the term: windowed relation with garbage in padded neighbours equals the reference
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    shape_s, shape_t = ModelShape(1, 5, 1), ModelShape(1, 7, 1)
    student = Features((s, s), mask)
    teacher = Features((t, t), mask)
    term = R.build_term("wr_angle", {"window": 5, "layers": "last"}, shape_s, shape_t)
    assert R.rel_err(term(student, teacher, Targets()), R.wr_angle(student, teacher, ((1, 1),), 5)) <= RTOL


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("close_on", ["student", "teacher", "both"])
def test_angle_relation_blocks_checkpointing_and_close_pairs_on_either_side(window, close_on):
    """The value and the student's gradient are the direct float64 computation's whichever side has
    near-coincident members (the teacher's side is computed apart, without a graph), in one block or
    several, with the student's side checkpointed or not."""
    g = torch.Generator().manual_seed(23)
    s = torch.randn(5, 9, 6, generator=g, dtype=torch.float64)
    t = torch.randn(5, 9, 4, generator=g, dtype=torch.float64) * 3
    for x, side in ((s, "student"), (t, "teacher")):
        if close_on in (side, "both"):
            x[:, 2] = x[:, 1] + 1e-5 * torch.randn(5, x.shape[-1], generator=g, dtype=torch.float64)
            x[3, 7] = x[3, 6]
    valid = torch.ones(5, 9, dtype=torch.bool)
    valid[1, 6:] = False
    valid[4, 1:] = False
    want_sse = s.new_zeros(())
    leaf = s.clone().requires_grad_(True)
    for k in range(5):
        e, _ = R.angle_sse_count(leaf[k], t[k], [i for i in range(9) if valid[k, i]], window)
        want_sse = want_sse + e
    (want_grad,) = torch.autograd.grad(want_sse, leaf)
    for block_elements, checkpoint_above in ((1 << 20, 1 << 30), (1 << 20, 0), (1, 0), (1, 1 << 30)):
        leaf = s.clone().requires_grad_(True)
        sse, _ = CR.angle_relation_sse(leaf, t, valid, window=window, max_block_elements=block_elements,
                                       checkpoint_above_elements=checkpoint_above)
        (grad,) = torch.autograd.grad(sse, leaf)
        assert abs(float(sse.detach()) - float(want_sse.detach())) <= 1e-9 * float(want_sse.detach())
        assert torch.allclose(grad, want_grad, rtol=1e-7, atol=1e-9 * float(want_grad.abs().max()))
