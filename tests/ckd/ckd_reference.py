"""Independent float64 reference computations of every loss term, and builders of test features.

Nothing here calls into `ckd.relations` or the terms' code paths: each formula is written out
directly (explicit difference vectors, explicit per-row softmax / KL, python loops over rows, sets,
heads and layers), from the formulas in the terms' docstrings and docs/the shared reference notes.
All references take tensors of any dtype and compute in float64; they return a float64 scalar tensor
and stay differentiable with respect to the student tensors (so gradients can be compared too).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ckd import Features, ModelShape

F64 = torch.float64


# ---------------------------------------------------------------------------------------------
# feature builders
# ---------------------------------------------------------------------------------------------


def make_mask(lengths: Sequence[int], n: int) -> Tensor:
    """(B, n) int mask with `lengths[b]` leading ones (right padding)."""
    mask = torch.zeros(len(lengths), n, dtype=torch.long)
    for b, length in enumerate(lengths):
        mask[b, :length] = 1
    return mask


def _softmax_rows_over_mask(scores: Tensor, mask: Tensor) -> Tensor:
    """Attention probabilities as a model produces them: softmax over valid keys."""
    keys = mask.to(torch.bool)[:, None, None, :]
    scores = scores.masked_fill(~keys, -1e9)
    return torch.softmax(scores, dim=-1)


def make_features(
    shape: ModelShape,
    mask: Tensor,
    *,
    num_labels: int = 3,
    dtype: torch.dtype = torch.float64,
    scale: float = 1.0,
    seed: int = 0,
    requires_grad: bool = False,
) -> Features:
    """Random features for every layer: hidden states, attention probabilities, Q/K/V, attention
    outputs and logits. Padded positions hold whatever the random draw gave (garbage)."""
    g = torch.Generator().manual_seed(seed)
    b, n = mask.shape
    d, h, L = shape.hidden_size, shape.num_heads, shape.num_layers

    def rnd(*size: int, s: float = scale) -> Tensor:
        t = (torch.randn(*size, generator=g, dtype=F64) * s).to(dtype)
        return t.requires_grad_(requires_grad)

    hidden = [rnd(b, n, d) for _ in range(L + 1)]
    attentions = {}
    for l in range(1, L + 1):
        probs = _softmax_rows_over_mask(torch.randn(b, h, n, n, generator=g, dtype=F64) * 2, mask)
        attentions[l] = probs.to(dtype).requires_grad_(requires_grad)
    return Features(
        hidden_states=tuple(hidden),
        attention_mask=mask,
        logits=rnd(b, num_labels, s=2.0),
        attentions=attentions,
        queries={l: rnd(b, n, d) for l in range(1, L + 1)},
        keys={l: rnd(b, n, d) for l in range(1, L + 1)},
        values={l: rnd(b, n, d) for l in range(1, L + 1)},
        attention_outputs={l: rnd(b, n, d) for l in range(1, L + 1)},
        num_heads=h,
    )


def feature_tensors(f: Features) -> list[Tensor]:
    """Every tensor of a Features record, in a fixed order (for gradients)."""
    out = list(f.hidden_states)
    if f.logits is not None:
        out.append(f.logits)
    for d in (f.attentions, f.queries, f.keys, f.values, f.attention_outputs):
        out.extend(d[k] for k in sorted(d))
    return out


def map_features(f: Features, fn) -> Features:
    """A copy of `f` with `fn` applied to every float tensor (hidden states, logits, dicts)."""
    return Features(
        hidden_states=tuple(fn(t) for t in f.hidden_states),
        attention_mask=f.attention_mask,
        logits=None if f.logits is None else fn(f.logits),
        attentions={k: fn(v) for k, v in f.attentions.items()},
        queries={k: fn(v) for k, v in f.queries.items()},
        keys={k: fn(v) for k, v in f.keys.items()},
        values={k: fn(v) for k, v in f.values.items()},
        attention_outputs={k: fn(v) for k, v in f.attention_outputs.items()},
        num_heads=f.num_heads,
    )


def adversarial_tensor(
    b: int,
    n: int,
    d: int,
    g: torch.Generator,
    *,
    norms: tuple[float, float] = (10.0, 50.0),
    offset: Tensor | None = None,
    rel_noise: Sequence[float] = (1e-3, 1e-4, 1e-5),
    exact_duplicates: int = 1,
    previous: Tensor | None = None,
    exact_copy: bool = True,
) -> Tensor:
    """(b, n, d) float64 token vectors with norms uniform in `norms`, near-duplicate tokens
    (r_j = r_i + noise of relative size rel_noise), exact duplicates, plus `offset` added to all.

    With `previous` (the state of the layer below, offset included), tokens 0 and 1 barely move
    (relative updates 1e-4 and 1e-3) and token 2 is copied exactly: near-duplicate layer vectors,
    which is what the layer relations see in a residual network.
    """
    x = torch.randn(b, n, d, generator=g, dtype=F64)
    lo, hi = norms
    x = x / x.norm(dim=-1, keepdim=True) * (lo + (hi - lo) * torch.rand(b, n, 1, generator=g, dtype=F64))
    for bi in range(b):
        pos = torch.randperm(n, generator=g).tolist()
        k = 0
        for rel in rel_noise:
            if k + 1 >= n:
                break
            i, j = pos[k], pos[k + 1]
            noise = torch.randn(d, generator=g, dtype=F64)
            x[bi, j] = x[bi, i] + rel * x[bi, i].norm() * noise / noise.norm()
            k += 2
        for _ in range(exact_duplicates):
            if k + 1 >= n:
                break
            x[bi, pos[k + 1]] = x[bi, pos[k]]
            k += 2
    if offset is not None:
        x = x + offset
    if previous is not None:
        prev = previous.to(F64)
        for bi in range(b):
            for tok, rel in ((0, 1e-4), (1, 1e-3)):
                if tok < n:
                    noise = torch.randn(d, generator=g, dtype=F64)
                    x[bi, tok] = prev[bi, tok] + rel * prev[bi, tok].norm() * noise / noise.norm()
            if n > 2 and exact_copy:
                x[bi, 2] = prev[bi, 2]
    return x


def adversarial_features(
    shape: ModelShape,
    mask: Tensor,
    *,
    dtype: torch.dtype,
    seed: int,
    norms: tuple[float, float] = (10.0, 50.0),
    offset_norm: float = 0.0,
    num_labels: int = 3,
    exact_duplicates: bool = True,
) -> Features:
    """Features whose every (B, n, d) tensor is adversarial (see `adversarial_tensor`): near-duplicate
    tokens, exact duplicates (unless exact_duplicates=False), one common offset of norm `offset_norm`
    per tensor family; hidden states of consecutive layers share near-duplicate and copied tokens."""
    g = torch.Generator().manual_seed(seed)
    b, n = mask.shape
    d, L = shape.hidden_size, shape.num_layers

    def offset() -> Tensor | None:
        if not offset_norm:
            return None
        o = torch.randn(d, generator=g, dtype=F64)
        return o / o.norm() * offset_norm

    common = offset()
    hidden = []
    for l in range(L + 1):
        prev = hidden[-1] if hidden else None
        hidden.append(
            adversarial_tensor(
                b, n, d, g, norms=norms, offset=common, previous=prev,
                exact_duplicates=int(exact_duplicates), exact_copy=exact_duplicates,
            )
        )

    def per_layer() -> dict[int, Tensor]:
        o = offset()
        return {
            l: adversarial_tensor(b, n, d, g, norms=norms, offset=o, exact_duplicates=int(exact_duplicates)).to(dtype)
            for l in range(1, L + 1)
        }

    base = make_features(shape, mask, num_labels=num_labels, dtype=dtype, seed=seed + 1)
    return Features(
        hidden_states=tuple(h.to(dtype) for h in hidden),
        attention_mask=mask,
        logits=base.logits,
        attentions=base.attentions,
        queries=per_layer(),
        keys=per_layer(),
        values=per_layer(),
        attention_outputs=per_layer(),
        num_heads=shape.num_heads,
    )


# ---------------------------------------------------------------------------------------------
# sets: which vectors a relation compares
# ---------------------------------------------------------------------------------------------


def word_sets(features: Features, layers: Sequence[int]):
    """(set, valid member indices) per (layer, sample): members are a sample's tokens."""
    mask = features.attention_mask.to(torch.bool)
    out = []
    for l in layers:
        h = features.hidden_states[l]
        for b in range(h.shape[0]):
            out.append((h[b], [i for i in range(h.shape[1]) if mask[b, i]]))
    return out


def layer_sets(features: Features, layers: Sequence[int]):
    """(set, valid member indices) per valid (sample, token): members are the token's layers."""
    mask = features.attention_mask.to(torch.bool)
    b_size, n = mask.shape
    out = []
    for b in range(b_size):
        for i in range(n):
            if mask[b, i]:
                vecs = torch.stack([features.hidden_states[l][b, i] for l in layers])
                out.append((vecs, list(range(len(layers)))))
    return out


# ---------------------------------------------------------------------------------------------
# CKD relations
# ---------------------------------------------------------------------------------------------


def _cos_row(x: Tensor, i: int, others: list[int]) -> Tensor:
    """cos(r_i, r_j) for j in others: explicit dot products over explicit norms (0 for a zero vector)."""
    dots = (x[others] * x[i]).sum(-1)
    sq = (x[others] * x[others]).sum(-1) * (x[i] * x[i]).sum()
    positive = sq > 0
    norms = torch.sqrt(torch.where(positive, sq, torch.ones_like(sq)))
    return torch.where(positive, dots / norms, torch.zeros_like(dots))


def _log_softmax_1d(x: Tensor) -> Tensor:
    shifted = x - x.max().detach()
    return shifted - torch.log(torch.exp(shifted).sum())


def kl_rows_1d(teacher_scores: Tensor, student_scores: Tensor) -> Tensor:
    """KL(softmax(t) || softmax(s)) for one row, written out."""
    log_p = _log_softmax_1d(teacher_scores)
    log_q = _log_softmax_1d(student_scores)
    return (torch.exp(log_p) * (log_p - log_q)).sum()


def cos_kl_sum(s_set: Tensor, t_set: Tensor, valid: list[int]) -> Tensor:
    """Sum over valid rows i (with >= 1 other valid member) of KL over valid j != i of cosine rows."""
    s_set, t_set = s_set.to(F64), t_set.to(F64)
    total = s_set.new_zeros(())
    for i in valid:
        others = [j for j in valid if j != i]
        if not others:
            continue
        s_row = _cos_row(s_set, i, others)
        t_row = _cos_row(t_set, i, others)
        total = total + kl_rows_1d(t_row.detach(), s_row)
    return total


def _distance_matrix(x: Tensor, valid: list[int], squared: bool, normalize: bool) -> dict:
    dist = {}
    for i in valid:
        for j in valid:
            if i == j:
                continue
            diff = x[i] - x[j]
            sq = (diff * diff).sum()
            if squared:
                dist[i, j] = sq
            else:
                dist[i, j] = torch.sqrt(sq) if float(sq.detach()) > 0 else sq * 0.0
    if normalize and dist:
        # RKD-style scale normalisation: the mean over the set's valid off-diagonal pairs (the
        # reference code clamps every off-diagonal distance to >= 1e-12 before counting "non-zero"
        # entries, so exact duplicates count as pairs too).
        mean = torch.stack(list(dist.values())).sum() / len(dist)
        if float(mean.detach()) > 0:
            dist = {k: v / mean for k, v in dist.items()}
    return dist


def distance_sum(
    s_set: Tensor, t_set: Tensor, valid: list[int], squared: bool, normalize: bool, loss: str
) -> Tensor:
    s = _distance_matrix(s_set.to(F64), valid, squared, normalize)
    t = _distance_matrix(t_set.to(F64).detach(), valid, squared, normalize)
    total = s_set.new_zeros((), dtype=F64)
    for key in s:
        x = s[key] - t[key]
        if loss == "smooth_l1":
            total = total + (0.5 * x * x if abs(float(x.detach())) < 1.0 else x.abs() - 0.5)
        elif loss == "l1":
            total = total + x.abs()
        else:
            total = total + x * x
    return total


def pair_relation(sets_s, sets_t, mode="cos_kl", squared=True, normalize=True, loss="smooth_l1") -> Tensor:
    """CKD pair relation: sum over sets / sum over sets of (#valid members)^2."""
    total, count = None, 0
    for (s, valid), (t, _) in zip(sets_s, sets_t):
        if mode == "cos_kl":
            v = cos_kl_sum(s, t, valid)
        else:
            v = distance_sum(s, t, valid, squared, normalize, loss)
        total = v if total is None else total + v
        count += len(valid) ** 2
    return total / max(count, 1)


def _unit_differences(x: Tensor, i: int, members: list[int]) -> Tensor:
    """Rows (r_j - r_i) / ||r_j - r_i|| for j in members, zero rows where r_j == r_i (incl. j == i)."""
    diff = x[members] - x[i]  # explicit difference vectors, one row per member
    sq = (diff * diff).sum(-1, keepdim=True)
    positive = sq > 0
    norm = torch.sqrt(torch.where(positive, sq, torch.ones_like(sq)))  # no sqrt(0) in the graph
    return torch.where(positive, diff / norm, torch.zeros_like(diff))


def angle_sse_count(s_set: Tensor, t_set: Tensor, valid: list[int], window: int | None):
    """Direct angle relation: per valid vertex i, explicit difference vectors to the valid members
    of its window (|j - i| <= (w - 1) / 2; every valid member when window is None), normalised, and
    all their inner products. Returns (sum of squared differences, normaliser): the number of valid
    (i, j, k) for the full relation; w^2 per valid vertex for a window (the reference code's
    `mask.sum()`: its mask is the vertex's bit repeated over the w x w block)."""
    s_set, t_set = s_set.to(F64), t_set.to(F64).detach()
    sse = s_set.new_zeros(())
    count = 0
    for i in valid:
        if window is None:
            members = list(valid)
        else:
            half = (window - 1) // 2
            members = [j for j in valid if abs(j - i) <= half]
        us = _unit_differences(s_set, i, members)
        ut = _unit_differences(t_set, i, members)
        psi_s = us @ us.T
        psi_t = ut @ ut.T
        sse = sse + ((psi_s - psi_t) ** 2).sum()
        count += len(members) ** 2 if window is None else window**2
    return sse, count


def angle_relation(sets_s, sets_t, window: int | None) -> Tensor:
    total, count = None, 0
    for (s, valid), (t, _) in zip(sets_s, sets_t):
        sse, c = angle_sse_count(s, t, valid, window)
        total = sse if total is None else total + sse
        count += c
    return total / max(count, 1)


def wr_pair(student, teacher, layer_map, **kw):
    return pair_relation(word_sets(student, [s for s, _ in layer_map]), word_sets_teacher(teacher, student, layer_map), **kw)


def word_sets_teacher(teacher: Features, student: Features, layer_map):
    """Teacher word sets with the student's mask (the terms use the student's mask for both)."""
    mask = student.attention_mask.to(torch.bool)
    out = []
    for _, l in layer_map:
        h = teacher.hidden_states[l]
        for b in range(h.shape[0]):
            out.append((h[b], [i for i in range(h.shape[1]) if mask[b, i]]))
    return out


def wr_angle(student, teacher, layer_map, window):
    return angle_relation(
        word_sets(student, [s for s, _ in layer_map]), word_sets_teacher(teacher, student, layer_map), window
    )


def ltr_pair(student, teacher, layer_map, **kw):
    t = Features(hidden_states=teacher.hidden_states, attention_mask=student.attention_mask)
    return pair_relation(layer_sets(student, [s for s, _ in layer_map]), layer_sets(t, [t_ for _, t_ in layer_map]), **kw)


def ltr_angle(student, teacher, layer_map):
    t = Features(hidden_states=teacher.hidden_states, attention_mask=student.attention_mask)
    return angle_relation(
        layer_sets(student, [s for s, _ in layer_map]), layer_sets(t, [t_ for _, t_ in layer_map]), None
    )


# ---------------------------------------------------------------------------------------------
# logits
# ---------------------------------------------------------------------------------------------


def logit_kd(s_logits: Tensor, t_logits: Tensor, temperature: float, t_squared: bool, regression: bool) -> Tensor:
    s, t = s_logits.to(F64), t_logits.to(F64).detach()
    if regression:
        return ((s - t) ** 2).sum() / s.numel()
    total = s.new_zeros(())
    for b in range(s.shape[0]):
        total = total + kl_rows_1d(t[b] / temperature, s[b] / temperature)
    loss = total / s.shape[0]
    return loss * temperature**2 if t_squared else loss


def cross_entropy(logits: Tensor, labels: Tensor, regression: bool) -> Tensor:
    z = logits.to(F64)
    if regression:
        y = labels.to(F64).reshape(-1)
        return ((z.reshape(-1) - y) ** 2).sum() / y.numel()
    total = z.new_zeros(())
    for b in range(z.shape[0]):
        total = total - _log_softmax_1d(z[b])[int(labels[b])]
    return total / z.shape[0]


# ---------------------------------------------------------------------------------------------
# token-similarity KL relations (MiniLM, MiniLMv2, MLKD)
# ---------------------------------------------------------------------------------------------


def similarity_kl_groups(s_groups: list[Tensor], t_groups: list[Tensor], valid: list[int]) -> tuple[Tensor, int]:
    """For each group (n, d_g) pair: rows over valid tokens of softmax(a_i . a_j / sqrt(d_g)) over
    valid j (self included); returns (sum of row KLs, number of rows)."""
    total, rows = None, 0
    for s, t in zip(s_groups, t_groups):
        s, t = s.to(F64), t.to(F64).detach()
        for i in valid:
            s_row = (s[valid] * s[i]).sum(-1) / math.sqrt(s.shape[-1])
            t_row = (t[valid] * t[i]).sum(-1) / math.sqrt(t.shape[-1])
            v = kl_rows_1d(t_row, s_row)
            total = v if total is None else total + v
            rows += 1
    return total, rows


def split(x: Tensor, parts: int) -> list[Tensor]:
    """(n, d) -> parts tensors (n, d / parts), contiguous column blocks."""
    width = x.shape[-1] // parts
    return [x[:, g * width : (g + 1) * width] for g in range(parts)]


def valid_tokens(mask: Tensor, b: int) -> list[int]:
    return [i for i in range(mask.shape[1]) if mask[b, i]]


def grouped_similarity_kl(s: Tensor, t: Tensor, mask: Tensor, s_parts: int, t_parts: int) -> Tensor:
    """Mean over (sample, group, valid row) of the row KLs; s, t: (B, n, d)."""
    total, rows = None, 0
    for b in range(s.shape[0]):
        v, r = similarity_kl_groups(split(s[b], s_parts), split(t[b], t_parts), valid_tokens(mask, b))
        if r:
            total = v if total is None else total + v
            rows += r
    return total / rows


def mlkd_embedding(student: Features, teacher: Features) -> Tensor:
    return grouped_similarity_kl(student.hidden_states[0], teacher.hidden_states[0], student.attention_mask, 1, 1)


def mlkd_attention(student: Features, teacher: Features, layer_map, student_heads: int) -> Tensor:
    total = None
    for s_l, t_l in layer_map:
        v = grouped_similarity_kl(
            student.attention_outputs[s_l], teacher.attention_outputs[t_l], student.attention_mask,
            student_heads, student_heads,
        )
        total = v if total is None else total + v
    return total / len(layer_map)


def mlkd_sample(student: Features, teacher: Features) -> Tensor:
    s = student.hidden_states[-1][:, 0]
    t = teacher.hidden_states[-1][:, 0]
    v, rows = similarity_kl_groups([s], [t], list(range(s.shape[0])))
    return v / rows


def minilmv2(student: Features, teacher: Features, s_layer: int, t_layer: int, relation_heads: int) -> Tensor:
    total = None
    for name in ("queries", "keys", "values"):
        v = grouped_similarity_kl(
            getattr(student, name)[s_layer], getattr(teacher, name)[t_layer], student.attention_mask,
            relation_heads, relation_heads,
        )
        total = v if total is None else total + v
    return total / 3


def minilm(student: Features, teacher: Features, s_layer: int, t_layer: int) -> Tensor:
    """Attention-distribution KL (probabilities renormalised over valid keys) + value-relation KL,
    per head, each averaged over (sample, head, valid row)."""
    heads = student.num_heads
    mask = student.attention_mask
    s_att, t_att = student.attentions[s_layer].to(F64), teacher.attentions[t_layer].to(F64).detach()
    total, rows = None, 0
    for b in range(s_att.shape[0]):
        valid = valid_tokens(mask, b)
        for h in range(heads):
            for i in valid:
                p = torch.stack([t_att[b, h, i, j] for j in valid])
                q = torch.stack([s_att[b, h, i, j] for j in valid])
                p, q = p / p.sum(), q / q.sum()
                v = (p * (torch.log(p) - torch.log(q))).sum()
                total = v if total is None else total + v
                rows += 1
    attention = total / rows
    value = grouped_similarity_kl(student.values[s_layer], teacher.values[t_layer], mask, heads, heads)
    return attention + value


# ---------------------------------------------------------------------------------------------
# baselines
# ---------------------------------------------------------------------------------------------


def tinybert_attention(student: Features, teacher: Features, layer_map, on: str) -> Tensor:
    heads = student.num_heads
    mask = student.attention_mask
    total = None
    for s_l, t_l in layer_map:
        sse, count = None, 0
        for b in range(mask.shape[0]):
            valid = valid_tokens(mask, b)
            for h in range(heads):
                if on == "scores":
                    sq = split(student.queries[s_l][b].to(F64), heads)[h]
                    sk = split(student.keys[s_l][b].to(F64), heads)[h]
                    tq = split(teacher.queries[t_l][b].to(F64).detach(), heads)[h]
                    tk = split(teacher.keys[t_l][b].to(F64).detach(), heads)[h]
                for i in valid:
                    for j in valid:
                        if on == "scores":
                            a_s = (sq[i] * sk[j]).sum() / math.sqrt(sq.shape[-1])
                            a_t = (tq[i] * tk[j]).sum() / math.sqrt(tq.shape[-1])
                        else:
                            a_s = student.attentions[s_l][b, h, i, j].to(F64)
                            a_t = teacher.attentions[t_l][b, h, i, j].to(F64).detach()
                        e = (a_s - a_t) ** 2
                        sse = e if sse is None else sse + e
                        count += 1
        v = sse / count
        total = v if total is None else total + v
    return total / len(layer_map)


def projected_mse(weight: Tensor, bias: Tensor, student: Features, teacher: Features, layer_map) -> Tensor:
    """Mean over layers of sum over valid tokens of mean_k ((W h + b)_k - t_k)^2 / #valid tokens."""
    mask = student.attention_mask
    w, bias = weight.to(F64), bias.to(F64)
    total = None
    for s_l, t_l in layer_map:
        sse, count = None, 0
        for b in range(mask.shape[0]):
            for i in valid_tokens(mask, b):
                proj = w @ student.hidden_states[s_l][b, i].to(F64) + bias
                diff = proj - teacher.hidden_states[t_l][b, i].to(F64).detach()
                e = (diff * diff).sum() / diff.numel()
                sse = e if sse is None else sse + e
                count += 1
        v = sse / count
        total = v if total is None else total + v
    return total / len(layer_map)


def pkd(student: Features, teacher: Features, layer_map) -> Tensor:
    total = None
    for s_l, t_l in layer_map:
        s = student.hidden_states[s_l][:, 0].to(F64)
        t = teacher.hidden_states[t_l][:, 0].to(F64).detach()
        acc = None
        for b in range(s.shape[0]):
            diff = s[b] / torch.sqrt((s[b] ** 2).sum()) - t[b] / torch.sqrt((t[b] ** 2).sum())
            e = (diff * diff).sum()
            acc = e if acc is None else acc + e
        v = acc / s.shape[0]
        total = v if total is None else total + v
    return total


def supcon(student: Features, labels: Tensor, temperature: float) -> Tensor:
    c = student.hidden_states[-1][:, 0].to(F64)
    z = [c[b] / torch.sqrt((c[b] ** 2).sum()) for b in range(c.shape[0])]
    total, anchors = None, 0
    for i in range(len(z)):
        positives = [p for p in range(len(z)) if p != i and int(labels[p]) == int(labels[i])]
        if not positives:
            continue
        others = [a for a in range(len(z)) if a != i]
        scores = torch.stack([(z[i] * z[a]).sum() / temperature for a in others])
        log_den = torch.log(torch.exp(scores - scores.max().detach()).sum()) + scores.max().detach()
        acc = None
        for p in positives:
            v = (z[i] * z[p]).sum() / temperature - log_den
            acc = v if acc is None else acc + v
        v = -acc / len(positives)
        total = v if total is None else total + v
        anchors += 1
    return total / anchors


def codir(
    student: Features,
    teacher: Features,
    student_layers: Sequence[int],
    teacher_layers: Sequence[int],
    student_head: tuple[Tensor, Tensor],
    teacher_head: tuple[Tensor, Tensor],
    student_bank: Tensor,
    teacher_bank: Tensor,
    ids: Sequence[int],
    negatives: Tensor,
    temperature: float,
) -> Tensor:
    """Symmetric InfoNCE: teacher anchor vs the student bank and student anchor vs the teacher bank;
    each bank has this batch's rows replaced with the current (detached) vectors."""

    def rep(f: Features, layers, head):
        w, bias = head[0].to(F64), head[1].to(F64)
        out = []
        for b in range(f.hidden_states[0].shape[0]):
            x = torch.cat([f.hidden_states[l][b, 0].to(F64) for l in layers])
            y = w @ x + bias
            out.append(y / torch.sqrt((y * y).sum()))
        return out

    s = rep(student, student_layers, student_head)
    t = [v.detach() for v in rep(teacher, teacher_layers, teacher_head)]
    s_bank = student_bank.to(F64).clone()
    t_bank = teacher_bank.to(F64).clone()
    for b, row in enumerate(ids):
        s_bank[row] = s[b].detach()
        t_bank[row] = t[b]

    def one_side(anchors, bank):
        total = None
        for b, row in enumerate(ids):
            cands = [row] + [int(c) for c in negatives[b]]
            scores = torch.stack([(anchors[b] * bank[c]).sum() / temperature for c in cands])
            v = -_log_softmax_1d(scores)[0]
            total = v if total is None else total + v
        return total / len(ids)

    return one_side(t, s_bank) + one_side(s, t_bank)


def contrastive(anchor: Tensor, bank: Tensor, positive: Tensor, negatives: Tensor, temperature: float) -> Tensor:
    anchor, bank = anchor.to(F64), bank.to(F64)
    total = None
    for b in range(anchor.shape[0]):
        cands = [int(positive[b])] + [int(c) for c in negatives[b]]
        scores = torch.stack([(anchor[b] * bank[c]).sum() / temperature for c in cands])
        v = -_log_softmax_1d(scores)[0]
        total = v if total is None else total + v
    return total / anchor.shape[0]


def rel_err(value: Tensor, reference: Tensor) -> float:
    v, r = float(value.detach()), float(reference.detach())
    return abs(v - r) / max(abs(r), 1e-300)


# ---------------------------------------------------------------------------------------------
# building terms
# ---------------------------------------------------------------------------------------------


def build_term(kind: str, options: dict | None, student: ModelShape, teacher: ModelShape, task=None):
    """The single term of an objective built from {kind: options}."""
    from ckd import TaskShape, build_objective

    task = task or TaskShape(num_labels=3, num_examples=64)
    objective = build_objective({"terms": {kind: dict(options or {})}}, student, teacher, task)
    return objective.terms[kind]


# ---------------------------------------------------------------------------------------------
# every term kind, with shapes it accepts (for the tests that run over all terms)
# ---------------------------------------------------------------------------------------------

STUDENT = ModelShape(num_layers=3, hidden_size=24, num_heads=3)
TEACHER = ModelShape(num_layers=6, hidden_size=48, num_heads=4)
STUDENT_4H = ModelShape(num_layers=3, hidden_size=24, num_heads=4)  # equal heads: TinyBERT, MiniLM
STUDENT_48 = ModelShape(num_layers=3, hidden_size=48, num_heads=4)  # equal widths: PKD


def _case(name, kind, options=None, student=STUDENT, teacher=TEACHER):
    return (name, kind, dict(options or {}), student, teacher)


ALL_TERMS = [
    _case("wr_pair", "wr_pair"),
    _case("wr_pair-distance", "wr_pair", {"mode": "distance"}),
    _case("wr_pair-distance-sqrt-l1", "wr_pair", {"mode": "distance", "squared": False, "distance_loss": "l1"}),
    _case("wr_angle-full", "wr_angle", {"window": None}),
    _case("wr_angle-w3", "wr_angle", {"window": 3}),
    _case("wr_angle-w21", "wr_angle", {"window": 21}),
    _case("ltr_pair", "ltr_pair"),
    _case("ltr_pair-distance", "ltr_pair", {"mode": "distance", "distance_loss": "l2"}),
    _case("ltr_angle", "ltr_angle"),
    _case("logit_kd", "logit_kd", {"temperature": 4.0, "t_squared": True}),
    _case("ce", "ce"),
    _case("codir", "codir", {"dim": 8, "negatives": 5}),
    _case("mlkd_embedding", "mlkd_embedding"),
    _case("mlkd_attention", "mlkd_attention"),
    _case("mlkd_ffn", "mlkd_ffn"),
    _case("mlkd_sample", "mlkd_sample"),
    _case("supcon", "supcon"),
    _case("tinybert_attention", "tinybert_attention", {}, STUDENT_4H),
    _case("tinybert_attention-probs", "tinybert_attention", {"on": "probs"}, STUDENT_4H),
    _case("tinybert_hidden", "tinybert_hidden"),
    _case("tinybert_embedding", "tinybert_embedding"),
    _case("pkd", "pkd", {}, STUDENT_48, TEACHER),
    _case("minilm", "minilm", {}, STUDENT_4H),
    _case("minilmv2", "minilmv2", {"relation_heads": 4}),
]


def run_term(term, student: Features, teacher: Features, labels: Tensor, example_ids: Tensor, seed: int = 0):
    """One forward pass with the RNG seeded (CoDIR samples negatives) on a copy of the term (CoDIR
    updates its memory banks), so repeated calls see the same state."""
    import copy

    from ckd.terms import Targets

    term = copy.deepcopy(term)
    torch.manual_seed(seed)
    return term(student, teacher, Targets(labels=labels, example_ids=example_ids))
