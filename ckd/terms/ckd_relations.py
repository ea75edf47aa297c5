"""Contextual Knowledge Distillation (Park, Kim, Yang, EMNLP 2021): Word Relation and Layer
Transforming Relation, pair-wise and triple-wise.

Both relations compare structures of the same size on each side ((n x n) among tokens, (L' x L')
among layers), so the student's width and head count may differ from the teacher's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Union

import torch
from torch import Tensor

from .. import relations as R
from ..features import Features, FeatureNeeds, Needs
from .base import Options, Targets, Term, register


@dataclass
class PairOptions(Options):
    layers: Union[str, list] = "emb+skip"
    # "cos_kl": row-softmax of cosine similarities compared with KL (the paper's default);
    # "distance": (squared) Euclidean distances compared with smooth-L1 / L1 / L2 (RKD-style).
    mode: Literal["cos_kl", "distance"] = "cos_kl"
    squared: bool = True
    normalize: bool = True
    distance_loss: Literal["smooth_l1", "l1", "l2"] = "smooth_l1"


@dataclass
class AngleOptions(Options):
    layers: Union[str, list] = "emb+skip"


@dataclass
class WindowAngleOptions(AngleOptions):
    # Neighbours j, k of token i with |j - i| <= (window - 1) / 2; null = every token (full angle).
    window: Union[int, None] = 21

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window is not None and (self.window < 3 or self.window % 2 == 0):
            raise ValueError(f"window: must be an odd integer >= 3 (or null for the full relation), got {self.window}")


class _CKDTerm(Term):
    def __init__(self, options, student, teacher, task) -> None:
        super().__init__(options, student, teacher, task)
        self.layer_map = self.resolve(options.layers)

    def needs(self) -> Needs:
        return Needs(
            student=FeatureNeeds(hidden_states=frozenset(s for s, _ in self.layer_map)),
            teacher=FeatureNeeds(hidden_states=frozenset(t for _, t in self.layer_map)),
        )

    def _word_sets(self, student: Features, teacher: Features) -> tuple[Tensor, Tensor, Tensor]:
        """One set per (layer, sample) whose members are tokens: (L' B, n, d)."""
        s = torch.cat([student.hidden_states[i] for i, _ in self.layer_map])
        t = torch.cat([teacher.hidden_states[j] for _, j in self.layer_map])
        valid = student.mask.repeat(len(self.layer_map), 1)
        return s, t, valid

    def _layer_sets(self, student: Features, teacher: Features) -> tuple[Tensor, Tensor, Tensor]:
        """One set per (sample, token) whose members are the token's aligned layers: (B n, L', d)."""
        s = torch.stack([student.hidden_states[i] for i, _ in self.layer_map], dim=2)
        t = torch.stack([teacher.hidden_states[j] for _, j in self.layer_map], dim=2)
        b, n, layers, _ = s.shape
        valid = student.mask.reshape(b * n, 1).expand(b * n, layers)
        return s.flatten(0, 1), t.flatten(0, 1), valid


class _PairTerm(_CKDTerm):
    Options = PairOptions

    def _pair_loss(self, s: Tensor, t: Tensor, valid: Tensor) -> Tensor:
        o = self.options
        if o.mode == "cos_kl":
            total = R.cosine_kl_sum(s, t, valid)
        else:
            total = R.distance_relation_sum(s, t, valid, o.squared, o.normalize, o.distance_loss)
        return (total / R.pair_count(valid).clamp_min(1.0)).to(torch.float32)


class _AngleTerm(_CKDTerm):
    def _angle_loss(self, s: Tensor, t: Tensor, valid: Tensor, window: int | None) -> Tensor:
        sse, count = R.angle_relation_sse(s, t, valid, window=window)
        return (sse / count.clamp_min(1.0)).to(torch.float32)


@register
class WordRelationPair(_PairTerm):
    """WR pair-wise: for every aligned layer and sample, each token's relation to the other tokens.

    cos_kl: sum_{l,b,i} KL(P^T_i || P^S_i), P_i = softmax_{j != i, j valid} cos(r_i, r_j), divided by
    the number of valid (i, j) pairs (diagonal included) summed over layers and samples.
    """

    kind = "wr_pair"

    def forward(self, student: Features, teacher: Features, targets: Targets) -> Tensor:
        return self._pair_loss(*self._word_sets(student, teacher))


@register
class WordRelationAngle(_AngleTerm):
    """WR triple-wise: psi_ijk = cos angle(r_j - r_i, r_k - r_i) among tokens of one layer, MSE over
    valid triples (j, k within the window around i when a window is set)."""

    kind = "wr_angle"
    Options = WindowAngleOptions

    def forward(self, student: Features, teacher: Features, targets: Targets) -> Tensor:
        return self._angle_loss(*self._word_sets(student, teacher), window=self.options.window)


@register
class LayerRelationPair(_PairTerm):
    """LTR pair-wise: for every valid token, the relation among its vectors in the aligned layers."""

    kind = "ltr_pair"

    def forward(self, student: Features, teacher: Features, targets: Targets) -> Tensor:
        return self._pair_loss(*self._layer_sets(student, teacher))


@register
class LayerRelationAngle(_AngleTerm):
    """LTR triple-wise: angles among a token's aligned-layer vectors, MSE over valid tokens."""

    kind = "ltr_angle"
    Options = AngleOptions

    def forward(self, student: Features, teacher: Features, targets: Targets) -> Tensor:
        return self._angle_loss(*self._layer_sets(student, teacher), window=None)
