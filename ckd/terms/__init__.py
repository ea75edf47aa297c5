"""Loss terms. Importing this package registers every term kind (and checks that the registry and
ckd.catalog list the same kinds)."""

from . import baselines, ckd_relations, codir, logits, mlkd  # noqa: F401  (registration)
from .base import Options, Targets, Term, check_registry_complete, registry

check_registry_complete()

__all__ = ["Options", "Targets", "Term", "registry"]
