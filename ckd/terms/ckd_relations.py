"""Contextual Knowledge Distillation (Park, Kim, Yang, EMNLP 2021): Word Relation and Layer
Transforming Relation, pair-wise and triple-wise.

Both relations compare structures of the same size on each side ((n x n) among tokens, (L' x L')
among layers), so the student's width and head count may differ from the teacher's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import relations as R
from ..catalog import AngleOptions, PairOptions, WindowAngleOptions
from ..features import Features, Needs
from .base import Targets, Term, hidden_state_needs, register


def _result(value: Tensor, dtype: torch.dtype) -> Tensor:
    """Relations run in float64; the term answers in float32, or float64 for float64 inputs."""
    return value.to(torch.float64 if dtype == torch.float64 else torch.float32)


class _CKDTerm(Term):
    def __init__(self, options, student, teacher, task) -> None:
        super().__init__(options, student, teacher, task)
        self.layer_map = self.resolve(options.layers)

    def needs(self) -> Needs:
        return hidden_state_needs(self.layer_map)

    def _word_sets(self, student: Features, teacher: Features):
        """Per aligned layer, one set per sample whose members are tokens: (B, n, d) each.

        Layers are yielded one at a time rather than concatenated, so no copy of every aligned
        layer's hidden states is made.
        """
        for i, j in self.layer_map:
            yield student.hidden_states[i], teacher.hidden_states[j], student.mask

    def _layer_sets(self, student: Features, teacher: Features, max_elements: int = 1 << 22):
        """One set per (sample, token) whose members are the token's aligned layers: (b n, L', d),
        stacked as many samples at a time as keep the stacked copy under `max_elements` entries.

        Few large chunks rather than many small ones: each chunk pays a fixed cost (the stacking,
        and in backward a write into each aligned layer's gradient for the whole batch), and 4M
        entries (32 MiB in float64) is small next to the models' own activations.
        """
        batch, length = student.attention_mask.shape
        width = max(student.hidden_states[self.layer_map[0][0]].shape[-1], teacher.hidden_states[self.layer_map[0][1]].shape[-1])
        samples_per_chunk = max(1, max_elements // (length * len(self.layer_map) * width))
        # split, not slices: each slice's backward would fill a zero gradient of the whole layer.
        s_chunks = zip(*(student.hidden_states[i].split(samples_per_chunk) for i, _ in self.layer_map))
        t_chunks = zip(*(teacher.hidden_states[j].split(samples_per_chunk) for _, j in self.layer_map))
        for s_layers, t_layers, mask in zip(s_chunks, t_chunks, student.mask.split(samples_per_chunk)):
            s = torch.stack(s_layers, dim=2)
            t = torch.stack(t_layers, dim=2)
            b, n, layers, _ = s.shape
            valid = mask.reshape(b * n, 1).expand(b * n, layers)
            yield s.flatten(0, 1), t.flatten(0, 1), valid


class _PairTerm(_CKDTerm):
    Options = PairOptions

    def _pair_loss(self, sets) -> Tensor:
        o = self.options
        total, count = 0.0, 0.0
        for s, t, valid in sets:
            dtype = s.dtype
            if o.mode == "cos_kl":
                total = total + R.cosine_kl_sum(s, t, valid)
            else:
                total = total + R.distance_relation_sum(s, t, valid, o.squared, o.normalize, o.distance_loss)
            count = count + R.pair_count(valid)
        return _result(total / count.clamp_min(1.0), dtype)


class _AngleTerm(_CKDTerm):
    def _angle_loss(self, sets, window: int | None) -> Tensor:
        total, count = 0.0, 0.0
        for s, t, valid in sets:
            dtype = s.dtype
            sse, n_triples = R.angle_relation_sse(s, t, valid, window=window)
            total, count = total + sse, count + n_triples
        return _result(total / count.clamp_min(1.0), dtype)


@register
class WordRelationPair(_PairTerm):
    """WR pair-wise: for every aligned layer and sample, each token's relation to the other tokens.

    cos_kl: sum_{l,b,i} KL(P^T_i || P^S_i), P_i = softmax_{j != i, j valid} cos(r_i, r_j), divided by
    the number of valid (i, j) pairs (diagonal included) summed over layers and samples.
    """

    kind = "wr_pair"

    def forward(self, student: Features, teacher: Features, targets: Targets) -> Tensor:
        return self._pair_loss(self._word_sets(student, teacher))


@register
class WordRelationAngle(_AngleTerm):
    """WR triple-wise: psi_ijk = cos angle(r_j - r_i, r_k - r_i) among tokens of one layer, MSE over
    valid triples (j, k within the window around i when a window is set)."""

    kind = "wr_angle"
    Options = WindowAngleOptions

    def forward(self, student: Features, teacher: Features, targets: Targets) -> Tensor:
        return self._angle_loss(self._word_sets(student, teacher), window=self.options.window)


@register
class LayerRelationPair(_PairTerm):
    """LTR pair-wise: for every valid token, the relation among its vectors in the aligned layers."""

    kind = "ltr_pair"

    def forward(self, student: Features, teacher: Features, targets: Targets) -> Tensor:
        return self._pair_loss(self._layer_sets(student, teacher))


@register
class LayerRelationAngle(_AngleTerm):
    """LTR triple-wise: angles among a token's aligned-layer vectors, MSE over valid tokens."""

    kind = "ltr_angle"
    Options = AngleOptions

    def forward(self, student: Features, teacher: Features, targets: Targets) -> Tensor:
        return self._angle_loss(self._layer_sets(student, teacher), window=None)
