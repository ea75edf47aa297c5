"""What distillation reads from one model's forward pass.

The `jobs/` side fills these records with forward hooks; `ckd/` only reads them, so the loss core never
imports `transformers` and works with any encoder that can produce these tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of one encoder that an objective must know before it sees a batch.

    Args:
        num_layers: transformer layers (hidden_states has num_layers + 1 entries, index 0 = embeddings).
        hidden_size: width d of every hidden state.
        num_heads: attention heads per layer.
        intermediate_size: FFN width (informational; no term needs it today).
    """

    num_layers: int
    hidden_size: int
    num_heads: int
    intermediate_size: int | None = None

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "num_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelShape.{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"ModelShape.hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})"
            )

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class TaskShape:
    """What an objective must know about the task.

    Args:
        num_labels: classes (1 for regression).
        is_regression: labels are floats and logit terms use MSE.
        num_examples: training-set size (CoDIR's memory bank has one slot per example).
    """

    num_labels: int
    is_regression: bool = False
    num_examples: int | None = None

    def __post_init__(self) -> None:
        if self.num_labels < 1:
            raise ValueError(f"TaskShape.num_labels must be >= 1, got {self.num_labels}")
        if self.is_regression and self.num_labels != 1:
            raise ValueError("a regression task has num_labels == 1")


@dataclass
class Features:
    """Tensors captured from one model on one batch.

    Args:
        hidden_states: num_layers + 1 entries of shape (B, n, d); index 0 is the embedding output.
            Layers no term asked for may be None (the job captures only what is needed).
        attention_mask: (B, n), 1 for a token and 0 for padding.
        logits: (B, num_labels), or None when no term reads them.
        attentions: layer index (1-based) -> attention probabilities (B, h, n, n).
        queries, keys, values: layer index (1-based) -> (B, n, d) projections, heads concatenated.
        attention_outputs: layer index (1-based) -> (B, n, d) per-head context vectors concatenated,
            before the attention output projection.
        num_heads: attention heads per layer of this model.
    """

    hidden_states: tuple[Tensor | None, ...] | list[Tensor | None]
    attention_mask: Tensor
    logits: Tensor | None = None
    attentions: dict[int, Tensor] = field(default_factory=dict)
    queries: dict[int, Tensor] = field(default_factory=dict)
    keys: dict[int, Tensor] = field(default_factory=dict)
    values: dict[int, Tensor] = field(default_factory=dict)
    attention_outputs: dict[int, Tensor] = field(default_factory=dict)
    num_heads: int = 1

    @property
    def num_layers(self) -> int:
        return len(self.hidden_states) - 1

    @property
    def mask(self) -> Tensor:
        """The attention mask as a boolean (B, n) tensor."""
        return self.attention_mask.to(torch.bool)

    def detach(self) -> "Features":
        """A copy with every tensor detached (the teacher side carries no graph)."""

        def _d(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.detach()

        return Features(
            hidden_states=tuple(_d(h) for h in self.hidden_states),
            attention_mask=self.attention_mask,
            logits=_d(self.logits),
            attentions={k: v.detach() for k, v in self.attentions.items()},
            queries={k: v.detach() for k, v in self.queries.items()},
            keys={k: v.detach() for k, v in self.keys.items()},
            values={k: v.detach() for k, v in self.values.items()},
            attention_outputs={k: v.detach() for k, v in self.attention_outputs.items()},
            num_heads=self.num_heads,
        )


@dataclass(frozen=True)
class FeatureNeeds:
    """What one side of an objective reads, so a job computes only that.

    hidden_states: layer indices (0 = embeddings) whose hidden states are read.
    attentions / qkv / attention_outputs: 1-based layer indices.
    """

    hidden_states: frozenset[int] = frozenset()
    attentions: frozenset[int] = frozenset()
    qkv: frozenset[int] = frozenset()
    attention_outputs: frozenset[int] = frozenset()
    logits: bool = False

    def __or__(self, other: "FeatureNeeds") -> "FeatureNeeds":
        return FeatureNeeds(
            hidden_states=self.hidden_states | other.hidden_states,
            attentions=self.attentions | other.attentions,
            qkv=self.qkv | other.qkv,
            attention_outputs=self.attention_outputs | other.attention_outputs,
            logits=self.logits or other.logits,
        )


@dataclass(frozen=True)
class Needs:
    student: FeatureNeeds = FeatureNeeds()
    teacher: FeatureNeeds = FeatureNeeds()

    def __or__(self, other: "Needs") -> "Needs":
        return Needs(self.student | other.student, self.teacher | other.teacher)
