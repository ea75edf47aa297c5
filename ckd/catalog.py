"""The catalog of loss-term kinds: every kind's name and options dataclass, without torch.

This is what a configuration is checked against (`ckd.config.resolve_terms`), so `plan` and spec
validation need no torch. The term classes that compute each kind (ckd/terms/, torch) name these
dataclasses as their `Options`; registering a term whose kind or options differ from this catalog
fails (ckd.terms.base.register), so the two cannot disagree.

A new loss term adds its kind here (with its options dataclass if it has options of its own) and its
Term class in ckd/terms/.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Union


@dataclass
class Options:
    """Options every term has. Subclasses add their own fields (all with defaults)."""

    weight: float = 1.0

    def __post_init__(self) -> None:
        if self.weight < 0:
            raise ValueError(f"weight: must be >= 0, got {self.weight}")


# ------------------------------------------------------------------------------------ logits (logits.py)


@dataclass
class LogitKDOptions(Options):
    temperature: float = 1.0
    # Hinton scales by T^2 to keep gradient magnitudes comparable across temperatures; the CKD
    # reference does not, so both are offered.
    t_squared: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.temperature <= 0:
            raise ValueError(f"temperature: must be > 0, got {self.temperature}")


# ----------------------------------------------------------------------------- CKD (ckd_relations.py)


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


# ------------------------------------------------------------------------------------- CoDIR (codir.py)


@dataclass
class CoDIROptions(Options):
    student_layers: Union[str, list] = "all"
    teacher_layers: Union[str, list] = "every_other"
    dim: int = 128
    temperature: float = 0.07
    negatives: int = 100
    momentum: float = 0.5
    sampling: Literal["different_label", "random"] = "different_label"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dim < 1:
            raise ValueError(f"dim: must be >= 1, got {self.dim}")
        if self.temperature <= 0:
            raise ValueError(f"temperature: must be > 0, got {self.temperature}")
        if self.negatives < 1:
            raise ValueError(f"negatives: must be >= 1, got {self.negatives}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum: must be in [0, 1), got {self.momentum}")


# ------------------------------------------------------------------------------------ MLKD-BERT (mlkd.py)


@dataclass
class LayeredOptions(Options):
    layers: Union[str, list] = "uniform"


@dataclass
class SupConOptions(Options):
    temperature: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.temperature <= 0:
            raise ValueError(f"temperature: must be > 0, got {self.temperature}")


# ---------------------------------------------------------------------------- baselines (baselines.py)


@dataclass
class TinyAttentionOptions(Options):
    layers: Union[str, list] = "uniform"
    # "scores": pre-softmax Q K^T / sqrt(d_h) as in TinyBERT (rebuilt from the captured Q and K);
    # "probs": attention probabilities (what eager attention returns).
    on: Literal["scores", "probs"] = "scores"


@dataclass
class MiniLMOptions(Options):
    teacher_layer: Union[int, None] = None  # None = the teacher's last layer

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.teacher_layer is not None and self.teacher_layer < 1:
            raise ValueError(f"teacher_layer: must be >= 1, got {self.teacher_layer}")


@dataclass
class MiniLMv2Options(MiniLMOptions):
    relation_heads: int = 12


# ---------------------------------------------------------------------------------------------- catalog

# kind -> its options dataclass. The registry of Term classes (ckd.terms.registry) has exactly these keys.
KINDS: dict[str, type[Options]] = {
    "ce": Options,
    "logit_kd": LogitKDOptions,
    "wr_pair": PairOptions,
    "wr_angle": WindowAngleOptions,
    "ltr_pair": PairOptions,
    "ltr_angle": AngleOptions,
    "codir": CoDIROptions,
    "mlkd_embedding": Options,
    "mlkd_attention": LayeredOptions,
    "mlkd_ffn": LayeredOptions,
    "mlkd_sample": Options,
    "supcon": SupConOptions,
    "tinybert_attention": TinyAttentionOptions,
    "tinybert_hidden": LayeredOptions,
    "tinybert_embedding": Options,
    "pkd": LayeredOptions,
    "minilm": MiniLMOptions,
    "minilmv2": MiniLMv2Options,
}


def catalog() -> dict[str, type[Options]]:
    """Every known term kind and its options dataclass (a copy)."""
    return dict(KINDS)
