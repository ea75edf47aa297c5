"""Which student layer learns from which teacher layer.

A layer map is a value: a tuple of (student_layer, teacher_layer) pairs over hidden-state indices,
where 0 is the embedding output and L is the last layer. Strategies produce it from the two depths,
and every map is validated against both.
"""

from __future__ import annotations

from math import gcd
from typing import Union

LayerMap = tuple[tuple[int, int], ...]
LayerSpec = Union[str, list]

STRATEGIES = ("emb+skip", "uniform", "emb+uniform", "last")


def emb_skip(n_student: int, n_teacher: int) -> LayerMap:
    """CKD's reference alignment: every (N/g)-th layer on both sides, g = gcd(N_T, N_S).

    12 -> 6 gives teacher 0, 2, ..., 12 and student 0..6; 12 -> 5 gives only (0, 0) and (5, 12).
    """
    g = gcd(n_student, n_teacher)
    s_step, t_step = n_student // g, n_teacher // g
    return tuple((k * s_step, k * t_step) for k in range(g + 1))


def uniform(n_student: int, n_teacher: int, include_embedding: bool = False) -> LayerMap:
    """Student layer k <- teacher layer floor(k N_T / N_S) (TinyBERT's g(m) = m N / M); last -> last."""
    pairs = [(k, (k * n_teacher) // n_student) for k in range(1, n_student + 1)]
    return tuple(([(0, 0)] if include_embedding else []) + pairs)


def resolve_layers(spec: LayerSpec, n_student: int, n_teacher: int, key: str = "layers") -> LayerMap:
    """Turn a strategy name or an explicit [[s, t], ...] list into a validated layer map.

    Raises:
        ValueError: "key: message" naming what is wrong with the map for these depths.
    """
    if isinstance(spec, str):
        if spec == "emb+skip":
            pairs = emb_skip(n_student, n_teacher)
        elif spec == "uniform":
            pairs = uniform(n_student, n_teacher)
        elif spec == "emb+uniform":
            pairs = uniform(n_student, n_teacher, include_embedding=True)
        elif spec == "last":
            pairs = ((n_student, n_teacher),)
        else:
            raise ValueError(f"{key}: unknown strategy {spec!r}; expected one of {', '.join(STRATEGIES)} or a list of [student, teacher] pairs")
    else:
        pairs = []
        for item in spec:
            if not (isinstance(item, (list, tuple)) and len(item) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in item)):
                raise ValueError(f"{key}: expected a list of [student_layer, teacher_layer] integer pairs, got {item!r}")
            pairs.append((int(item[0]), int(item[1])))
        pairs = tuple(pairs)
    validate_layer_map(pairs, n_student, n_teacher, key)
    return pairs


def resolve_layer_list(spec: LayerSpec, depth: int, key: str) -> list[int]:
    """A list of one model's layers (1..depth): "all", "every_other" or explicit indices (CoDIR's options).

    Raises:
        ValueError: "key: message".
    """
    if spec == "all":
        return list(range(1, depth + 1))
    if spec == "every_other":
        return list(range(2, depth + 1, 2)) or [depth]
    if isinstance(spec, list) and spec and all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= depth
                                               for v in spec):
        return sorted(set(spec))
    raise ValueError(f"{key}: expected 'all', 'every_other' or a list of layer indices in 1..{depth}, got {spec!r}")


def validate_layer_map(pairs: LayerMap, n_student: int, n_teacher: int, key: str = "layers") -> None:
    if not pairs:
        raise ValueError(f"{key}: the layer map is empty")
    for s, t in pairs:
        if not 0 <= s <= n_student:
            raise ValueError(f"{key}: student layer {s} is out of range 0..{n_student} (0 = embeddings)")
        if not 0 <= t <= n_teacher:
            raise ValueError(f"{key}: teacher layer {t} is out of range 0..{n_teacher} (0 = embeddings)")
    students = [s for s, _ in pairs]
    teachers = [t for _, t in pairs]
    if students != sorted(set(students)) or teachers != sorted(set(teachers)):
        raise ValueError(f"{key}: student and teacher layers must each be strictly increasing, got {list(map(list, pairs))}")
