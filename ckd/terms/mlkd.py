"""MLKD-BERT (2024) multi-level terms: embedding relation, attention-output relation over regrouped
heads, FFN hidden-state MSE through a projection, sample-similarity relation, supervised contrastive.

Written from secondary summaries of the paper (no public code); docs/objectives.md says what was
assumed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import relations as R
from ..catalog import LayeredOptions, SupConOptions
from ..features import Features, FeatureNeeds, Needs
from .base import Targets, Term, hidden_state_needs, masked_token_mean, register, relation_float, require


@register
class EmbeddingRelation(Term):
    """KL(softmax(E_T E_T^T / sqrt(d_T)) || softmax(E_S E_S^T / sqrt(d_S))) over the embedding output,
    rows and columns restricted to valid tokens, averaged over valid rows."""

    kind = "mlkd_embedding"

    def needs(self) -> Needs:
        return Needs(student=FeatureNeeds(hidden_states=frozenset({0})), teacher=FeatureNeeds(hidden_states=frozenset({0})))

    def forward(self, student: Features, teacher: Features, targets: Targets) -> Tensor:
        s, t = student.hidden_states[0], teacher.hidden_states[0]
        dtype = R.relation_dtype(s, t)
        return R.similarity_kl_mean(
            R.scaled_similarity(s, 1 / math.sqrt(s.shape[-1]), dtype),
            R.scaled_similarity(t, 1 / math.sqrt(t.shape[-1]), dtype),
            student.mask,
        ).float()


@register
class AttentionOutputRelation(Term):
    """MHA-split relation: the teacher's attention-output vectors (heads' context vectors, before the
    output projection) are cut into as many groups as the student has heads; per group, the token
    similarity softmax(A_g A_g^T / sqrt(d_g)) is matched with KL. Any student head count that divides
    the teacher's width works, whatever the teacher's own head count."""

    kind = "mlkd_attention"
    Options = LayeredOptions

    def __init__(self, options, student, teacher, task) -> None:
        super().__init__(options, student, teacher, task)
        self.layer_map = self.resolve(options.layers)
        require(all(s >= 1 and t >= 1 for s, t in self.layer_map), "layers", "attention outputs exist for layers >= 1 only (0 is the embedding output)")
        require(
            teacher.hidden_size % student.num_heads == 0,
            "layers",
            f"the teacher's width {teacher.hidden_size} must be divisible by the student's head count {student.num_heads}",
        )

    def needs(self) -> Needs:
        return Needs(
            student=FeatureNeeds(attention_outputs=frozenset(s for s, _ in self.layer_map)),
            teacher=FeatureNeeds(attention_outputs=frozenset(t for _, t in self.layer_map)),
        )

    def forward(self, student: Features, teacher: Features, targets: Targets) -> Tensor:
        groups = self.student_shape.num_heads
        total = 0.0
        for s_layer, t_layer in self.layer_map:
            s = R.split_heads(relation_float(student.attention_outputs[s_layer]), groups)
            t = R.split_heads(relation_float(teacher.attention_outputs[t_layer]), groups)
            dtype = R.relation_dtype(s, t)
            total = total + R.similarity_kl_mean(
                R.scaled_similarity(s, 1 / math.sqrt(s.shape[-1]), dtype),
                R.scaled_similarity(t, 1 / math.sqrt(t.shape[-1]), dtype),
                student.mask,
            )
        return (total / len(self.layer_map)).float()


class ProjectedHiddenMSE(Term):
    """MSE between W h_S (a learned projection of the student's layer output) and h_T over valid
    tokens, averaged over aligned layers. Shared by MLKD's FFN term and TinyBERT's hidden term."""

    Options = LayeredOptions

    def __init__(self, options, student, teacher, task) -> None:
        super().__init__(options, student, teacher, task)
        self.layer_map = self.resolve(options.layers)
        self.projection = nn.Linear(student.hidden_size, teacher.hidden_size)

    def needs(self) -> Needs:
        return hidden_state_needs(self.layer_map)

    def forward(self, student: Features, teacher: Features, targets: Targets) -> Tensor:
        return projected_mse(self.projection, student, teacher, self.layer_map)


@register
class FFNHiddenMSE(ProjectedHiddenMSE):
    """MLKD-BERT's FFN hidden-state term (see ProjectedHiddenMSE)."""

    kind = "mlkd_ffn"


def projected_mse(projection: nn.Module, student: Features, teacher: Features, layer_map) -> Tensor:
    """Mean over aligned layers of the per-element MSE of projection(h_S) vs h_T on valid tokens."""
    total = 0.0
    for s_layer, t_layer in layer_map:
        s = projection(relation_float(student.hidden_states[s_layer]))
        t = relation_float(teacher.hidden_states[t_layer]).detach().to(s.dtype)
        total = total + masked_token_mean((s - t).square().mean(-1), student.mask)
    return total / len(layer_map)


@register
class SampleRelation(Term):
    """KL between teacher and student row-softmaxes of the batch's [CLS] similarity
    softmax(C C^T / sqrt(d)) (last layer), averaged over samples."""

    kind = "mlkd_sample"

    def needs(self) -> Needs:
        return Needs(
            student=FeatureNeeds(hidden_states=frozenset({self.student_shape.num_layers})),
            teacher=FeatureNeeds(hidden_states=frozenset({self.teacher_shape.num_layers})),
        )

    def forward(self, student: Features, teacher: Features, targets: Targets) -> Tensor:
        s = student.hidden_states[-1][:, 0][None]
        t = teacher.hidden_states[-1][:, 0][None]
        dtype = R.relation_dtype(s, t)
        everyone = torch.ones(1, s.shape[1], dtype=torch.bool, device=s.device)
        return R.similarity_kl_mean(
            R.scaled_similarity(s, 1 / math.sqrt(s.shape[-1]), dtype),
            R.scaled_similarity(t, 1 / math.sqrt(t.shape[-1]), dtype),
            everyone,
        ).float()


@register
class SupervisedContrastive(Term):
    """Supervised contrastive loss (Khosla et al.) on the student's normalised last-layer [CLS]:
    for anchor i with same-label positives P(i), -1/|P(i)| sum_p log(exp(z_i.z_p/t) / sum_{a != i}
    exp(z_i.z_a/t)), averaged over anchors that have a positive."""

    kind = "supcon"
    Options = SupConOptions

    def __init__(self, options, student, teacher, task) -> None:
        super().__init__(options, student, teacher, task)
        require(not task.is_regression, "weight", "supcon needs class labels; this task is a regression")

    def needs(self) -> Needs:
        return Needs(student=FeatureNeeds(hidden_states=frozenset({self.student_shape.num_layers})))

    def forward(self, student: Features, teacher: Features, targets: Targets) -> Tensor:
        if targets.labels is None:
            raise ValueError("the 'supcon' term needs labels in the batch")
        z = F.normalize(relation_float(student.hidden_states[-1][:, 0]), dim=-1)
        labels = targets.labels.long()
        others = ~torch.eye(len(z), dtype=torch.bool, device=z.device)
        positives = (labels[:, None] == labels[None, :]) & others
        scores = (z @ z.T) / self.options.temperature
        log_prob = R.masked_log_softmax(scores, others)
        has_pos = positives.any(-1)
        per_anchor = -(torch.where(positives, log_prob, torch.zeros_like(log_prob))).sum(-1) / positives.sum(-1).clamp_min(1)
        return (per_anchor * has_pos).sum() / has_pos.sum().clamp_min(1)
