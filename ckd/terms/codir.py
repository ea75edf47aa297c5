"""CoDIR (Sun et al., EMNLP 2020): contrastive distillation on intermediate representations.

Each side's representation of an example is its first-token vectors of the chosen layers,
concatenated, projected to `dim` and L2-normalised. The student's representation must pick out the
teacher's representation of the same example among K negatives drawn from a memory bank, and vice
versa (symmetric). In fine-tuning the negatives are examples with a different label.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..alignment import resolve_layer_list
from ..catalog import CoDIROptions
from ..features import Features, FeatureNeeds, Needs
from .base import Targets, Term, cls_vectors, register


def contrastive_loss(anchor: Tensor, bank: Tensor, positive: Tensor, negatives: Tensor, temperature: float) -> Tensor:
    """Mean over anchors of -log softmax over [positive, negatives] of <anchor, bank row> / temperature.

    Args:
        anchor: (B, k) unit vectors. bank: (N, k) unit vectors. positive: (B,) bank rows.
        negatives: (B, K) bank rows.
    """
    candidates = torch.cat([positive[:, None], negatives], dim=1)
    scores = torch.einsum("bk,bck->bc", anchor, bank[candidates]) / temperature
    return -torch.log_softmax(scores, dim=-1)[:, 0].mean()


@register
class CoDIR(Term):
    """Symmetric InfoNCE over memory banks (CoDIR fine-tuning variant); see docs/objectives.md for
    how this differs from CRD's NCE approximation used in the reference code."""

    kind = "codir"
    Options = CoDIROptions

    def __init__(self, options, student, teacher, task) -> None:
        super().__init__(options, student, teacher, task)
        if task.num_examples is None or task.num_examples < 2:
            raise ValueError("the codir term needs the training-set size (num_examples >= 2) for its memory bank")
        self.student_layers = resolve_layer_list(options.student_layers, student.num_layers, "student_layers")
        self.teacher_layers = resolve_layer_list(options.teacher_layers, teacher.num_layers, "teacher_layers")
        self.student_head = nn.Linear(student.hidden_size * len(self.student_layers), options.dim)
        self.teacher_head = nn.Linear(teacher.hidden_size * len(self.teacher_layers), options.dim)
        n = task.num_examples
        self.register_buffer("student_bank", F.normalize(torch.randn(n, options.dim), dim=-1))
        self.register_buffer("teacher_bank", F.normalize(torch.randn(n, options.dim), dim=-1))
        # Labels are learnt as examples are seen; -1 = not seen yet.
        self.register_buffer("bank_labels", torch.full((n,), -1, dtype=torch.long))

    def needs(self) -> Needs:
        return Needs(
            student=FeatureNeeds(hidden_states=frozenset(self.student_layers)),
            teacher=FeatureNeeds(hidden_states=frozenset(self.teacher_layers)),
        )

    def sample_negatives(self, example_ids: Tensor, labels: Tensor | None) -> Tensor:
        """(B, K) bank rows: examples with a different (already seen) label, else any other example."""
        k, n = self.options.negatives, self.bank_labels.numel()
        rows = []
        for i, example in enumerate(example_ids.tolist()):
            pool = None
            if self.options.sampling == "different_label" and labels is not None and not self.task.is_regression:
                known = (self.bank_labels >= 0) & (self.bank_labels != int(labels[i]))
                if known.any():
                    pool = known.nonzero(as_tuple=True)[0]
            if pool is None:
                pool = torch.cat([torch.arange(0, example), torch.arange(example + 1, n)]).to(example_ids.device)
            rows.append(pool[torch.randint(len(pool), (k,), device=pool.device)])
        return torch.stack(rows)

    def forward(self, student: Features, teacher: Features, targets: Targets) -> Tensor:
        if targets.example_ids is None:
            raise ValueError("the 'codir' term needs example ids (the 'idx' column) in the batch")
        ids = targets.example_ids.long()
        s = F.normalize(self.student_head(cls_vectors(student, self.student_layers)), dim=-1)
        t = F.normalize(self.teacher_head(cls_vectors(teacher, self.teacher_layers).detach()), dim=-1)
        if targets.labels is not None and not self.task.is_regression:
            self.bank_labels[ids] = targets.labels.long()
        negatives = self.sample_negatives(ids, targets.labels)
        tau = self.options.temperature
        # Each anchor is compared with the other side's bank; the positive is this example's row,
        # refreshed with the current (detached) vector so the positive pair is never stale.
        student_bank = self.student_bank.clone()
        teacher_bank = self.teacher_bank.clone()
        student_bank[ids] = s.detach()
        teacher_bank[ids] = t.detach()
        loss = contrastive_loss(t, student_bank, ids, negatives, tau) + contrastive_loss(s, teacher_bank, ids, negatives, tau)
        if self.training:
            with torch.no_grad():
                m = self.options.momentum
                self.student_bank[ids] = F.normalize(m * self.student_bank[ids] + (1 - m) * s.detach(), dim=-1)
                self.teacher_bank[ids] = F.normalize(m * self.teacher_bank[ids] + (1 - m) * t.detach(), dim=-1)
        return loss
