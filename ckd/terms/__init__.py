"""Loss terms. Importing this package registers every term kind."""

from . import baselines, ckd_relations, codir, logits, mlkd  # noqa: F401  (registration)
from .base import Options, Targets, Term, registry

__all__ = ["Options", "Targets", "Term", "registry"]
