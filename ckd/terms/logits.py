"""Supervised cross-entropy and Hinton's logit distillation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..catalog import LogitKDOptions
from ..features import Features, FeatureNeeds, Needs
from .base import Targets, Term, register, relation_float


@register
class CrossEntropy(Term):
    """Hard-label loss on the student: cross-entropy, or MSE for a regression task."""

    kind = "ce"

    def needs(self) -> Needs:
        return Needs(student=FeatureNeeds(logits=True))

    def forward(self, student: Features, teacher: Features, targets: Targets) -> Tensor:
        if targets.labels is None:
            raise ValueError("the 'ce' term needs labels in the batch")
        logits = relation_float(student.logits)
        if self.task.is_regression:
            return F.mse_loss(logits.view(-1), targets.labels.to(logits.dtype).view(-1))
        return F.cross_entropy(logits, targets.labels.long())


@register
class LogitKD(Term):
    """Logit distillation: KL(softmax(z_T / T) || softmax(z_S / T)) averaged over the batch (x T^2 if
    asked); for regression, MSE between student and teacher outputs.

    KL differs from the reference's soft cross-entropy only by the teacher's entropy, a constant, so
    gradients are identical; KL is reported because it is 0 when the student matches the teacher.
    """

    kind = "logit_kd"
    Options = LogitKDOptions

    def needs(self) -> Needs:
        return Needs(student=FeatureNeeds(logits=True), teacher=FeatureNeeds(logits=True))

    def forward(self, student: Features, teacher: Features, targets: Targets) -> Tensor:
        s = relation_float(student.logits)
        t = relation_float(teacher.logits).detach().to(s.dtype)
        if self.task.is_regression:
            return F.mse_loss(s, t)
        temp = self.options.temperature
        log_p_t = torch.log_softmax(t / temp, dim=-1)
        log_p_s = torch.log_softmax(s / temp, dim=-1)
        loss = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1).mean()
        return loss * temp**2 if self.options.t_squared else loss
