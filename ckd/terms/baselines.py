"""Classic baselines users compare CKD against: TinyBERT, PKD, MiniLM and MiniLMv2."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import relations as R
from ..catalog import LayeredOptions, MiniLMOptions, MiniLMv2Options, TinyAttentionOptions
from ..features import Features, FeatureNeeds, Needs
from .base import Targets, Term, hidden_state_needs, register, relation_float, require
from .mlkd import ProjectedHiddenMSE, projected_mse


def attention_scores(q: Tensor, k: Tensor, heads: int) -> Tensor:
    """(B, h, n, n) scaled dot-product scores from concatenated-head projections."""
    q, k = R.split_heads(relation_float(q), heads), R.split_heads(relation_float(k), heads)
    return q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])


@register
class TinyBERTAttention(Term):
    """MSE between student and teacher attention matrices of mapped layers, over valid (i, j) and
    heads. Needs equal head counts (the matrices are compared head by head)."""

    kind = "tinybert_attention"
    Options = TinyAttentionOptions

    def __init__(self, options, student, teacher, task) -> None:
        super().__init__(options, student, teacher, task)
        require(student.num_heads == teacher.num_heads, "layers",
                f"TinyBERT compares attention head by head: the student has {student.num_heads} heads, the teacher {teacher.num_heads}")
        self.layer_map = self.resolve(options.layers)
        require(all(s >= 1 for s, _ in self.layer_map), "layers", "attention exists for layers >= 1 only")

    def needs(self) -> Needs:
        s_layers = frozenset(s for s, _ in self.layer_map)
        t_layers = frozenset(t for _, t in self.layer_map)
        if self.options.on == "scores":
            return Needs(student=FeatureNeeds(qkv=s_layers), teacher=FeatureNeeds(qkv=t_layers))
        return Needs(student=FeatureNeeds(attentions=s_layers), teacher=FeatureNeeds(attentions=t_layers))

    def _matrix(self, f: Features, layer: int) -> Tensor:
        if self.options.on == "scores":
            return attention_scores(f.queries[layer], f.keys[layer], f.num_heads)
        return relation_float(f.attentions[layer])

    def forward(self, student: Features, teacher: Features, targets: Targets) -> Tensor:
        mask = student.mask
        pairs = (mask[:, None, :, None] & mask[:, None, None, :]).expand(-1, student.num_heads, -1, -1)
        total = 0.0
        for s_layer, t_layer in self.layer_map:
            diff = self._matrix(student, s_layer) - self._matrix(teacher, t_layer).detach()
            total = total + torch.where(pairs, diff.square(), torch.zeros_like(diff)).sum() / pairs.sum().clamp_min(1)
        return total / len(self.layer_map)


@register
class TinyBERTHidden(ProjectedHiddenMSE):
    """TinyBERT's hidden-state term: MSE(W h_S, h_T) for mapped layers over valid tokens."""

    kind = "tinybert_hidden"


@register
class TinyBERTEmbedding(Term):
    """MSE(W_e e_S, e_T) on the embedding output over valid tokens, W_e a learned projection."""

    kind = "tinybert_embedding"

    def __init__(self, options, student, teacher, task) -> None:
        super().__init__(options, student, teacher, task)
        self.projection = nn.Linear(student.hidden_size, teacher.hidden_size)

    def needs(self) -> Needs:
        return Needs(student=FeatureNeeds(hidden_states=frozenset({0})), teacher=FeatureNeeds(hidden_states=frozenset({0})))

    def forward(self, student: Features, teacher: Features, targets: Targets) -> Tensor:
        return projected_mse(self.projection, student, teacher, ((0, 0),))


@register
class PKD(Term):
    """Patient KD: sum over mapped layers of the batch mean of ||c_S/|c_S| - c_T/|c_T|||^2 on the
    first-token vectors. Needs equal widths (no projection in PKD)."""

    kind = "pkd"
    Options = LayeredOptions

    def __init__(self, options, student, teacher, task) -> None:
        super().__init__(options, student, teacher, task)
        require(student.hidden_size == teacher.hidden_size, "layers",
                f"PKD compares [CLS] vectors directly: widths differ ({student.hidden_size} vs {teacher.hidden_size})")
        self.layer_map = self.resolve(options.layers)

    def needs(self) -> Needs:
        return hidden_state_needs(self.layer_map)

    def forward(self, student: Features, teacher: Features, targets: Targets) -> Tensor:
        total = 0.0
        for s_layer, t_layer in self.layer_map:
            s = F.normalize(relation_float(student.hidden_states[s_layer][:, 0]), dim=-1)
            t = F.normalize(relation_float(teacher.hidden_states[t_layer][:, 0]).detach(), dim=-1)
            total = total + (s - t.to(s.dtype)).square().sum(-1).mean()
        return total


class _LastLayerTerm(Term):
    Options = MiniLMOptions

    def __init__(self, options, student, teacher, task) -> None:
        super().__init__(options, student, teacher, task)
        self.t_layer = options.teacher_layer or teacher.num_layers
        require(self.t_layer <= teacher.num_layers, "teacher_layer", f"the teacher has {teacher.num_layers} layers")
        self.s_layer = student.num_layers


@register
class MiniLM(_LastLayerTerm):
    """MiniLM v1: KL of last-layer attention distributions plus KL of value relations
    softmax(V V^T / sqrt(d_h)), per head, averaged over valid rows. Needs equal head counts."""

    kind = "minilm"

    def __init__(self, options, student, teacher, task) -> None:
        super().__init__(options, student, teacher, task)
        require(student.num_heads == teacher.num_heads, "weight",
                f"MiniLM v1 matches attention head by head: {student.num_heads} vs {teacher.num_heads} heads (use minilmv2)")

    def needs(self) -> Needs:
        return Needs(
            student=FeatureNeeds(attentions=frozenset({self.s_layer}), qkv=frozenset({self.s_layer})),
            teacher=FeatureNeeds(attentions=frozenset({self.t_layer}), qkv=frozenset({self.t_layer})),
        )

    def forward(self, student: Features, teacher: Features, targets: Targets) -> Tensor:
        mask = student.mask
        heads = student.num_heads
        # Attention probabilities are already row-softmaxed over valid keys: compare their logs.
        s_att = relation_float(student.attentions[self.s_layer]).clamp_min(1e-30).log()
        t_att = relation_float(teacher.attentions[self.t_layer]).clamp_min(1e-30).log()
        attention = R.similarity_kl_mean(s_att, t_att, mask)
        s_v = R.split_heads(relation_float(student.values[self.s_layer]), heads)
        t_v = R.split_heads(relation_float(teacher.values[self.t_layer]), heads)
        dtype = R.relation_dtype(s_v, t_v)
        value = R.similarity_kl_mean(
            R.scaled_similarity(s_v, 1 / math.sqrt(s_v.shape[-1]), dtype),
            R.scaled_similarity(t_v, 1 / math.sqrt(t_v.shape[-1]), dtype),
            mask,
        )
        return (attention + value).float()


@register
class MiniLMv2(_LastLayerTerm):
    """MiniLMv2: Q-Q, K-K and V-V self-attention relations over A_r relation heads (each side's width
    split into A_r parts, R = softmax(A A^T / sqrt(d_r))), KL averaged over the three relations."""

    kind = "minilmv2"
    Options = MiniLMv2Options

    def __init__(self, options, student, teacher, task) -> None:
        super().__init__(options, student, teacher, task)
        a = options.relation_heads
        require(a >= 1 and student.hidden_size % a == 0 and teacher.hidden_size % a == 0, "relation_heads",
                f"must divide both widths ({student.hidden_size} and {teacher.hidden_size}), got {a}")

    def needs(self) -> Needs:
        return Needs(student=FeatureNeeds(qkv=frozenset({self.s_layer})), teacher=FeatureNeeds(qkv=frozenset({self.t_layer})))

    def forward(self, student: Features, teacher: Features, targets: Targets) -> Tensor:
        a = self.options.relation_heads
        total = 0.0
        for name in ("queries", "keys", "values"):
            s = R.split_heads(relation_float(getattr(student, name)[self.s_layer]), a)
            t = R.split_heads(relation_float(getattr(teacher, name)[self.t_layer]), a)
            dtype = R.relation_dtype(s, t)
            total = total + R.similarity_kl_mean(
                R.scaled_similarity(s, 1 / math.sqrt(s.shape[-1]), dtype),
                R.scaled_similarity(t, 1 / math.sqrt(t.shape[-1]), dtype),
                student.mask,
            )
        return (total / 3).float()
