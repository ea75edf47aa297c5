"""Mask-aware relation primitives shared by the objectives.

Everything here works on *sets* of vectors: a tensor (N, m, d) holds N independent sets of m vectors
with a boolean validity mask (N, m). Word Relation uses one set per (sample, layer) whose members are
tokens; Layer Transforming Relation uses one set per (sample, token) whose members are layers. Padding
never enters a value or a gradient: invalid members are removed with `torch.where` (never by adding
-inf and hoping), so fully padded sets and sets with a single member give exact zeros.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

_EPS = 1e-12

def relation_dtype(*tensors: Tensor) -> torch.dtype:
    """float32 for half-precision inputs, otherwise the widest input dtype (float64 stays float64)."""
    if any(t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


class _SelfGram(torch.autograd.Function):
    """x x^T, whose backward is one contiguous product (g + g^T) x.

    Autograd's own backward of `x @ x.transpose(-1, -2)` returns the transposed operand's gradient as a
    transposed (strided) view, and every elementwise op of the backward that follows it (the norm's
    division, the centring) then walks memory with a stride of a whole row (on CPU, the cosine
    relation's forward + backward took up to twice as long that way).
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return x @ x.transpose(-1, -2)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return (grad + grad.transpose(-1, -2)) @ x


def self_gram(x: Tensor) -> Tensor:
    """Gram matrix x x^T of each set's members: (N, m, d) -> (N, m, m)."""
    return _SelfGram.apply(x) if torch.is_grad_enabled() and x.requires_grad else x @ x.transpose(-1, -2)


def cosine_matrix(x: Tensor, dtype: torch.dtype) -> Tensor:
    """Pairwise cosine similarities (N, m, m) of the members of each set."""
    # Normalised after the Gram product, G_ij / (|x_i| |x_j|): the same values as normalising the rows
    # first, without the (N, m, d) elementwise work, which dominates the backward when m is small (LTR).
    gram = self_gram(x.to(dtype))
    inv_norm = gram.diagonal(dim1=-2, dim2=-1).clamp_min(_EPS * _EPS).rsqrt()
    return gram * inv_norm[..., :, None] * inv_norm[..., None, :]


def masked_log_softmax(scores: Tensor, allowed: Tensor) -> Tensor:
    """log_softmax over allowed columns; rows with no allowed column give zeros (not NaN)."""
    row_has_any = allowed.any(dim=-1, keepdim=True)
    scores = torch.where(allowed, scores, torch.full_like(scores, float("-inf")))
    scores = torch.where(row_has_any, scores, torch.zeros_like(scores))
    return torch.where(allowed, torch.log_softmax(scores, dim=-1), torch.zeros_like(scores))


def masked_row_kl(teacher_scores: Tensor, student_scores: Tensor, allowed: Tensor) -> Tensor:
    """Sum over rows of KL(softmax(teacher row) || softmax(student row)) restricted to `allowed`.

    Args:
        teacher_scores, student_scores: (..., m, m) row scores.
        allowed: (..., m, m) bool; each row's softmax runs over its allowed columns only.

    Returns:
        A scalar: the KL summed over every row that has at least one allowed column.
    """
    with torch.no_grad():
        log_p = masked_log_softmax(teacher_scores.detach(), allowed)
        p = torch.where(allowed, log_p.exp(), torch.zeros_like(log_p))
    if torch.is_grad_enabled() and student_scores.requires_grad:
        return _RowKL.apply(student_scores, log_p, p, allowed)
    return (p * (log_p - masked_log_softmax(student_scores, allowed))).sum()


class _RowKL(torch.autograd.Function):
    """sum KL(p || softmax_allowed(z)) for fixed teacher rows p, with the closed-form gradient
    q - p on allowed entries (every row of p with an allowed column sums to 1): one pass in backward
    instead of autograd's chain through the masks and the softmax."""

    @staticmethod
    def forward(ctx, scores: Tensor, log_p: Tensor, p: Tensor, allowed: Tensor) -> Tensor:
        log_q = torch.log_softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
        # Rows without an allowed column are all -inf (NaN after log_softmax); `where` drops them.
        kl = torch.where(allowed, p * (log_p - log_q), torch.zeros_like(log_q)).sum()
        ctx.save_for_backward(log_q, p, allowed)
        return kl

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:
        log_q, p, allowed = ctx.saved_tensors
        return torch.where(allowed, (log_q.exp() - p) * grad, torch.zeros_like(p)), None, None, None


def off_diagonal_pairs(valid: Tensor) -> Tensor:
    """(N, m, m) bool: both members valid and distinct."""
    m = valid.shape[-1]
    eye = torch.eye(m, dtype=torch.bool, device=valid.device)
    return valid[..., :, None] & valid[..., None, :] & ~eye


def window_pairs(m: int, window: int | None, device: torch.device) -> Tensor | None:
    """(m, m) bool band |i - j| <= (window - 1) / 2, or None for the full relation."""
    if window is None:
        return None
    half = (window - 1) // 2
    idx = torch.arange(m, device=device)
    return (idx[:, None] - idx[None, :]).abs() <= half


# Pairs closer than this fraction of their (centred) norms go through the direct path of the angle
# relation: the Gram expansion divides by the pair's distance twice per side, so its float64 rounding
# grows like CLOSE**-4 (1e-8 here), small enough to ignore; closer pairs are computed from explicit
# differences, which are exact.
CLOSE_RELATIVE_DISTANCE = 1e-2


class _AngleSide:
    """Per-set quantities of one model's side of the angle relation (float64).

    raw: the input members as given (only the rows the exact path needs are converted to float64),
    gram: Gram matrix of the members centred on the set's valid mean (angles depend only on
    differences, and centring keeps the Gram entries that cancel below as small as possible),
    inv_dist: 1 / ||r_j - r_i|| on allowed pairs (0 elsewhere, and 0 for exactly coincident members,
    whose direction is undefined), close: allowed pairs too close for the Gram identity.
    """

    def __init__(self, x: Tensor, valid: Tensor, allowed: Tensor) -> None:
        self.raw = x
        x64 = x.to(torch.float64)
        weights = valid.to(torch.float64)[..., None]
        mean = (x64 * weights).sum(-2, keepdim=True) / weights.sum(-2, keepdim=True).clamp_min(1.0)
        centred = (x64 - mean) * weights
        self.gram = self_gram(centred)
        diag = self.gram.diagonal(dim1=-2, dim2=-1)
        norms = diag[..., :, None] + diag[..., None, :]
        sq_dist = (norms - 2.0 * self.gram).clamp_min(0.0)
        self.close = allowed & (sq_dist <= CLOSE_RELATIVE_DISTANCE**2 * norms)
        far = allowed & ~self.close
        safe = torch.where(far, sq_dist, torch.ones_like(sq_dist))
        self.inv_dist = torch.where(far, safe.rsqrt(), torch.zeros_like(safe))


def _expansion_cross(x: _AngleSide, y: _AngleSide, weights: Tensor) -> Tensor:
    """sum_i sum_jk Px_ijk Py_ijk over pairs with nonzero weight, using only (m x m) matmuls.

    With E_ijk = G_jk - p_ij - p_ik (p_ij = G_ij - G_ii / 2) and C_ij = s^x_ij s^y_ij the product of
    inverse distances, sum_jk C_ij C_ik E^x_ijk E^y_ijk expands into four terms that are row sums of
    matrix products: O(m^3) per set instead of the O(m^3 d) of forming every difference vector.
    """
    gx, gy = x.gram, y.gram
    px = gx - 0.5 * gx.diagonal(dim1=-2, dim2=-1)[..., :, None]
    py = gy - 0.5 * gy.diagonal(dim1=-2, dim2=-1)[..., :, None]
    c = weights
    t1 = ((c @ (gx * gy)) * c).sum(-1)
    t2 = 2.0 * (c * py * (c @ gx)).sum(-1)
    t3 = 2.0 * (c * px * (c @ gy)).sum(-1)
    t4 = 2.0 * (c * px * py).sum(-1) * c.sum(-1) + 2.0 * (c * px).sum(-1) * (c * py).sum(-1)
    return (t1 - t2 - t3 + t4).sum()


def _direct_rows(side: _AngleSide, sets: Tensor, vertex: Tensor, member: Tensor, allowed: Tensor) -> Tensor:
    """psi[set, vertex, member, k] for all k, from explicit difference vectors (exact for close pairs).

    The difference of two float32 values is exact in float64, so r_j - r_i loses nothing however
    close the members are; the inner products with r_k - r_i then carry only ordinary rounding.
    """
    from_vertex = side.raw[sets].to(torch.float64) - side.raw[sets, vertex].to(torch.float64)[:, None, :]  # (P, m, d)
    diff = from_vertex.gather(1, member[:, None, None].expand(-1, 1, from_vertex.shape[-1]))[:, 0]  # r_j - r_i
    dist = diff.norm(dim=-1)
    inner = torch.einsum("pd,pmd->pm", diff, from_vertex)  # <r_j - r_i, r_k - r_i>
    # Distances from the vertex to every k: explicit differences for k that are close, Gram otherwise.
    inv_row = side.inv_dist[sets, vertex]
    close_row = side.close[sets, vertex]
    if close_row.any():
        row_dist = from_vertex.norm(dim=-1)
        positive = close_row & (row_dist > 0)
        inv_row = torch.where(positive, 1.0 / torch.where(positive, row_dist, torch.ones_like(row_dist)), inv_row)
    inv_j = torch.where(dist > 0, 1.0 / torch.where(dist > 0, dist, torch.ones_like(dist)), torch.zeros_like(dist))
    return inner * inv_j[:, None] * inv_row * allowed[sets, vertex].to(inner.dtype)


def _close_pairs_sse(student: _AngleSide, teacher: _AngleSide, allowed: Tensor, close: Tensor) -> Tensor:
    """Contribution of every triple (i, j, k) in which j or k is close to i, from exact rows."""
    sets, vertex, member = close.nonzero(as_tuple=True)
    if sets.numel() == 0:
        return student.gram.new_zeros(())
    with torch.no_grad():
        teacher_rows = _direct_rows(teacher, sets, vertex, member, allowed)
    delta = _direct_rows(student, sets, vertex, member, allowed) - teacher_rows
    # A triple with both j and k close appears once in the rows; one with only j close appears
    # here and again as (i, k, j), which no row holds: count it twice.
    far_k = allowed[sets, vertex] & ~close[sets, vertex]
    multiplicity = 1.0 + far_k.to(delta.dtype)
    return (delta.square() * multiplicity).sum()


def _window_members(m: int, window: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(m, w) member indices j = i - h .. i + h for each vertex i, and which of them exist."""
    half = (window - 1) // 2
    idx = torch.arange(m, device=device)[:, None] + torch.arange(-half, half + 1, device=device)[None, :]
    inside = (idx >= 0) & (idx < m)
    return idx.clamp(0, m - 1), inside


def _window_factors(side: _AngleSide, inv: Tensor, idx: Tensor, inside: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The pieces of psi_ijk = (G_jk - p_ij - p_ik) s_ij s_ik over each vertex's (w x w) window:
    G_jk (N, m, w, w), p_ij = G_ij - G_ii / 2 and s_ij = 1 / ||r_j - r_i|| (N, m, w each), s = 0 where
    a member is absent. Clamped indices at the edges point at real members, but their inverse
    distance is zeroed through `inside`, so no position is ever counted twice."""
    gram = side.gram
    rows = torch.arange(gram.shape[-1], device=gram.device)[:, None]
    g_jk = gram[:, idx[:, :, None], idx[:, None, :]]
    p = (gram - 0.5 * gram.diagonal(dim1=-2, dim2=-1)[..., :, None])[:, rows, idx]
    s = inv[:, rows, idx] * inside
    return g_jk, p, s


def _window_psi(g_jk: Tensor, p: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    """E_jk = G_jk - p_ij - p_ik and psi_ijk = E_jk s_ij s_ik over the window block (N, m, w, w); two
    tensors of the block's size, the other passes in place (not for autograd)."""
    e = g_jk - p[..., :, None]
    e -= p[..., None, :]
    psi = e * s[..., :, None]
    psi *= s[..., None, :]
    return e, psi


def _window_block(side: _AngleSide, inv: Tensor, idx: Tensor, inside: Tensor) -> Tensor:
    """psi_ijk for the (w x w) members of each vertex's window: (N, m, w, w), 0 where a member is absent."""
    return _window_psi(*_window_factors(side, inv, idx, inside))[1]


class _WindowSSE(torch.autograd.Function):
    """sum_ijk ((G_jk - p_ij - p_ik) s_ij s_ik - T_ijk)^2 with a hand-written backward.

    The (N, m, w, w) block is the largest tensor of the window angle, and autograd's chain of
    elementwise ops over it (about ten passes forward and twenty backward) cost more than the Gram
    products. Here the forward makes four passes and keeps the block's error and its E = G_jk - p_ij -
    p_ik, and the backward makes four more, using that both are symmetric in (j, k).
    """

    @staticmethod
    def forward(ctx, g_jk: Tensor, p: Tensor, s: Tensor, target: Tensor) -> Tensor:
        e, diff = _window_psi(g_jk, p, s)
        diff -= target
        ctx.save_for_backward(e, diff, s)
        flat = diff.reshape(-1)
        return torch.dot(flat, flat)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, Tensor, None]:
        e, diff, s = ctx.saved_tensors
        # d sse / d psi_jk = 2 diff_jk; psi_jk = E_jk s_j s_k.
        scaled = diff * (2.0 * grad)
        ds = 2.0 * (scaled * e).matmul(s[..., :, None])[..., 0] if ctx.needs_input_grad[2] else None
        scaled *= s[..., :, None]
        scaled *= s[..., None, :]  # d sse / d G_jk
        dp = -2.0 * scaled.sum(-1) if ctx.needs_input_grad[1] else None
        return scaled, dp, ds, None


class _TeacherAngles:
    """The teacher's side of one block, computed once and without a graph (the teacher is frozen):
    its Gram quantities and, for a window, its (N, m, w, w) relation block."""

    def __init__(self, t_raw: Tensor, valid: Tensor, allowed: Tensor, window: int | None) -> None:
        with torch.no_grad():
            self.side = _AngleSide(t_raw.detach(), valid, allowed)
            self.members = None
            self.block = None
            if window is not None:
                self.members = _window_members(valid.shape[-1], min(window, 2 * valid.shape[-1] - 1), valid.device)
                self.block = _window_block(self.side, self.side.inv_dist, *self.members)


def _angle_block_sse(s_raw: Tensor, valid: Tensor, allowed: Tensor, teacher: _TeacherAngles) -> Tensor:
    """The student's side of one block and its comparison with the precomputed teacher side."""
    student = _AngleSide(s_raw, valid, allowed)
    t_side = teacher.side
    # Pairs close on either side go through the exact rows; on the Gram path they get weight 0 on
    # both sides. Each side already zeroes its own close pairs, so only the other side's are masked.
    any_close = bool(student.close.any()) or bool(t_side.close.any())
    if any_close:
        close = student.close | t_side.close
        cs = torch.where(t_side.close, torch.zeros_like(student.inv_dist), student.inv_dist)
        ct = torch.where(student.close, torch.zeros_like(t_side.inv_dist), t_side.inv_dist)
    else:
        cs, ct = student.inv_dist, t_side.inv_dist
    if teacher.block is None:
        # The far part: sum over j, k both far of (Ps - Pt)^2 = Qss + Qtt - 2 Qst.
        with torch.no_grad():
            qtt = _expansion_cross(t_side, t_side, ct * ct)
        far_sse = _expansion_cross(student, student, cs * cs) + qtt - 2.0 * _expansion_cross(student, t_side, cs * ct)
    else:
        idx, inside = teacher.members
        t_block = teacher.block
        if any_close and bool(student.close.any()):
            rows = torch.arange(idx.shape[0], device=idx.device)[:, None]
            keep = (~student.close[:, rows, idx]).to(t_block.dtype)  # (N, m, w)
            t_block = t_block * keep[..., :, None] * keep[..., None, :]
        far_sse = _WindowSSE.apply(*_window_factors(student, cs, idx, inside), t_block)
    if not any_close:
        return far_sse
    return far_sse + _close_pairs_sse(student, t_side, allowed, close)


def angle_relation_sse(
    student: Tensor,
    teacher: Tensor,
    valid: Tensor,
    window: int | None = None,
    max_block_elements: int = 1 << 20,
    checkpoint_above_elements: int = 1 << 22,
) -> tuple[Tensor, Tensor]:
    """Sum of squared differences of the triple-wise angle relation, and its normaliser.

    For every set, vertex i and members j, k (all valid; j, k inside the window around i when a
    window is given): psi_ijk = cos of the angle between r_j - r_i and r_k - r_i, defined as 0 when
    j == i, k == i, or a member coincides exactly with the vertex. Student and teacher widths may
    differ: only (m x m) relations are compared, never the vectors.

    Cost is O(N (m^2 d + m^3)) with no (m, m, d) or (m, m, m) tensor: the sum over (j, k) is expanded
    into matrix products of Gram matrices (float64), and pairs too close for that expansion are
    computed from explicit differences. The teacher's side is computed once, without a graph. Sets
    are processed in blocks of about `max_block_elements` relation entries; when the relation
    tensors of the whole call would exceed `checkpoint_above_elements` entries, each block is
    checkpointed (its student side recomputed in backward), so peak memory stays bounded at any
    batch size while small calls (LTR, short sequences) pay no recomputation.

    Returns:
        (sse, count): sse = sum (psi_S - psi_T)^2 (float64); count = the reference's normaliser. Full
        relation: the number of valid (i, j, k), degenerate ones (j == i or k == i) included (its mean
        over the valid cube). Window: w^2 per valid vertex i, whatever the number of valid members
        inside its window (its mean over each vertex's w x w block, where members that are padded or
        outside the sequence contribute 0).
    """
    n_sets, m = valid.shape
    band = window_pairs(m, window, valid.device)
    if window is None:
        count = (valid.sum(-1).to(torch.float64) ** 3).sum()
    else:
        # Not the number of valid triples: the reference divides by w^2 per vertex, and its per-task
        # weights are tuned to that scale (valid triples would make short sentences weigh up to
        # (w / length)^2 more: 2.1x on average for SST-2 with w = 21).
        count = valid.sum().to(torch.float64) * float(window) ** 2

    relation = m * (m if window is None else min(window, 2 * m - 1) ** 2)
    block = max(1, max_block_elements // max(1, m * max(relation // m, student.shape[-1], teacher.shape[-1])))
    needs_grad = torch.is_grad_enabled() and student.requires_grad
    use_checkpoint = needs_grad and n_sets * relation > checkpoint_above_elements
    total = student.new_zeros((), dtype=torch.float64)
    # split, not slicing: the backward of split assembles the blocks' gradients once, where every slice
    # would write its block into a zero-filled gradient of the whole input.
    for s_part, t_raw, v_part in zip(student.split(block), teacher.split(block), valid.split(block)):
        allowed = off_diagonal_pairs(v_part)
        if band is not None:
            allowed = allowed & band
        t_part = _TeacherAngles(t_raw, v_part, allowed, window)
        if use_checkpoint:
            total = total + checkpoint(_angle_block_sse, s_part, v_part, allowed, t_part, use_reentrant=False)
        else:
            total = total + _angle_block_sse(s_part, v_part, allowed, t_part)
    return total, count


def pair_count(valid: Tensor) -> Tensor:
    """Number of valid (i, j) pairs, diagonal included, summed over sets (the reference's normaliser)."""
    return (valid.sum(-1).to(torch.float64) ** 2).sum()


def cosine_kl_sum(student: Tensor, teacher: Tensor, valid: Tensor) -> Tensor:
    """Sum over sets and rows i of KL(P^T_i || P^S_i), P_i = softmax_j cos(r_i, r_j) over valid j != i."""
    # float64: with a large common component all cosines crowd near 1 and float32 loses the KL.
    allowed = off_diagonal_pairs(valid)
    with torch.no_grad():
        t_scores = cosine_matrix(teacher, torch.float64)
    return masked_row_kl(t_scores, cosine_matrix(student, torch.float64), allowed)


def squared_distance_matrix(x: Tensor, valid: Tensor) -> Tensor:
    """||r_i - r_j||^2 (float64 from a centred Gram, so near-duplicates do not cancel away)."""
    x = x.to(torch.float64)
    weights = valid.to(torch.float64)[..., None]
    mean = (x * weights).sum(-2, keepdim=True) / weights.sum(-2, keepdim=True).clamp_min(1.0)
    centred = (x - mean) * weights
    gram = self_gram(centred)
    diag = gram.diagonal(dim1=-2, dim2=-1)
    return (diag[..., :, None] + diag[..., None, :] - 2.0 * gram).clamp_min(0.0)


def distance_relation(x: Tensor, valid: Tensor, squared: bool, normalize: bool) -> Tensor:
    """Pairwise (squared) distances on valid off-diagonal pairs, optionally divided by their mean
    over the set (RKD's scale normalisation); 0 elsewhere."""
    allowed = off_diagonal_pairs(valid)
    sq = squared_distance_matrix(x, valid)
    if squared:
        dist = sq
    else:
        # sqrt is not differentiable at 0 (exact duplicates): take it only where the distance is positive.
        positive = allowed & (sq > 0)
        dist = torch.where(positive, torch.where(positive, sq, torch.ones_like(sq)).sqrt(), torch.zeros_like(sq))
    dist = torch.where(allowed, dist, torch.zeros_like(dist))
    if normalize:
        mean = dist.sum((-1, -2), keepdim=True) / allowed.sum((-1, -2), keepdim=True).clamp_min(1)
        dist = dist / mean.clamp_min(_EPS)
    return dist


def distance_relation_sum(
    student: Tensor, teacher: Tensor, valid: Tensor, squared: bool, normalize: bool, loss: str
) -> Tensor:
    """Sum over valid off-diagonal pairs of smooth-L1 / L1 / squared error between distance relations."""
    s = distance_relation(student, valid, squared, normalize)
    with torch.no_grad():
        t = distance_relation(teacher, valid, squared, normalize)
    if loss == "smooth_l1":
        per_pair = torch.nn.functional.smooth_l1_loss(s, t, reduction="none")
    elif loss == "l1":
        per_pair = (s - t).abs()
    else:
        per_pair = (s - t).square()
    return torch.where(off_diagonal_pairs(valid), per_pair, torch.zeros_like(per_pair)).sum()


def scaled_similarity(x: Tensor, scale: float, dtype: torch.dtype) -> Tensor:
    """x x^T * scale (the attention-style token similarity)."""
    return self_gram(x.to(dtype)) * scale


def split_heads(x: Tensor, heads: int) -> Tensor:
    """(B, n, d) -> (B, heads, n, d / heads)."""
    b, n, d = x.shape
    return x.view(b, n, heads, d // heads).transpose(1, 2)


def similarity_kl_mean(student: Tensor, teacher: Tensor, valid: Tensor, include_self: bool = True) -> Tensor:
    """Mean over valid rows of KL(softmax(teacher row) || softmax(student row)) over valid columns.

    student, teacher: (..., n, n) scores; valid: (B, n), broadcast over leading group dimensions.
    """
    while valid.dim() < student.dim() - 1:
        valid = valid[:, None]
    pairs = valid[..., :, None] & valid[..., None, :]
    if not include_self:
        pairs = pairs & ~torch.eye(pairs.shape[-1], dtype=torch.bool, device=pairs.device)
    pairs = pairs.expand(student.shape)
    rows = pairs.any(-1)
    return masked_row_kl(teacher.detach(), student, pairs) / rows.sum().clamp_min(1)
