"""Teacher loading, student construction, export and cost measurement for BERT-family encoders.

Everything here goes through the ``Auto*`` classes so a BERT or RoBERTa checkpoint works alike; the
student builders rely only on the ``base_model.embeddings`` / ``base_model.encoder.layer`` layout that
both families share. Hub ids stay supported for users; tests use local directories.
"""

from __future__ import annotations

import copy
import os
import shutil
import statistics
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
from transformers import PretrainedConfig, PreTrainedModel

from ckd.features import ModelShape

from .packaged import PACKAGE_MODELS, resolve_source  # noqa: F401  (re-exported: jobs.models.resolve_source)

PROBLEM_TYPES = ("single_label_classification", "regression")
_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}
# Batch keys a Hugging Face encoder's forward() accepts as inputs; labels, example indices etc. stay out
# of forward calls. (`jobs.data.TOKENIZER_OUTPUT_KEYS` is the narrower set tokenisation produces.)
ENCODER_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside any nesting of DeepSpeed engines, DDP and ``torch.compile`` wrappers.

    Hooks, weights and the config live on the inner model, not on the wrapper.
    """
    while True:
        if isinstance(model, nn.Module) and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod  # torch.compile's OptimizedModule
        elif not isinstance(model, PreTrainedModel) and isinstance(getattr(model, "module", None), nn.Module):
            # DeepSpeedEngine, DistributedDataParallel. (A DeepSpeedEngine also has a `.config`: the DeepSpeed
            # one, so "has a config" cannot tell a wrapper from a model.)
            model = model.module
        else:
            return model


def _label_maps(label_names: Sequence[str], num_labels: int, problem_type: str) -> dict[str, Any]:
    if problem_type not in PROBLEM_TYPES:
        raise ValueError(f"problem_type must be one of {PROBLEM_TYPES}, got {problem_type!r}")
    if problem_type == "regression" and num_labels != 1:
        raise ValueError(f"a regression task has num_labels == 1, got {num_labels}")
    names = list(label_names)
    if len(names) != num_labels or len(set(names)) != len(names):
        raise ValueError(f"need {num_labels} distinct label names, got {names}")
    return {"num_labels": num_labels, "id2label": dict(enumerate(names)),
            "label2id": {n: i for i, n in enumerate(names)}, "problem_type": problem_type}


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)} or a torch.dtype")
    return _DTYPES[dtype]


def _config_of(model_or_config: nn.Module | PretrainedConfig) -> PretrainedConfig:
    if isinstance(model_or_config, PretrainedConfig):
        return model_or_config
    return unwrap_model(model_or_config).config


def load_tokenizer(source: str | os.PathLike):
    """Load the tokenizer of a Hub id, local directory or ``package:<alias>`` source."""
    return AutoTokenizer.from_pretrained(resolve_source(source))


def load_teacher(source: str | os.PathLike, num_labels: int, label_names: Sequence[str], problem_type: str,
                 dtype: torch.dtype | str | None = None, attn_implementation: str | None = None) -> nn.Module:
    """Load a frozen sequence-classification teacher.

    Args:
        source: Hub id, local directory or ``package:<alias>``.
        num_labels: classes (1 for regression).
        label_names: one name per class, in label-id order; stored as id2label / label2id.
        problem_type: "single_label_classification" or "regression".
        dtype: None keeps the checkpoint's dtype; "bf16" / torch.bfloat16 halves teacher memory.
        attn_implementation: e.g. "eager" when attention maps are distilled (sdpa cannot return them).

    Returns:
        The model in eval mode with ``requires_grad`` False on every parameter. A checkpoint without a
        classification head gets a freshly initialised classifier (transformers reports it as MISSING).

    Raises:
        ValueError: inconsistent labels, or a fine-tuned checkpoint whose label order differs from
            ``label_names`` (its logits would silently mean other classes).
    """
    path = resolve_source(source)
    labels = _label_maps(label_names, num_labels, problem_type)
    stored = AutoConfig.from_pretrained(path)
    stored_names = [stored.id2label[i] for i in sorted(stored.id2label)] if stored.id2label else []
    default_names = [f"LABEL_{i}" for i in range(len(stored_names))]
    if len(stored_names) == num_labels and stored_names != default_names and stored_names != list(label_names):
        raise ValueError(f"teacher {source!r} was trained with labels {stored_names}, not {list(label_names)}")
    config = AutoConfig.from_pretrained(path, **labels)
    kwargs = _load_kwargs(_as_dtype(dtype), attn_implementation)
    model = AutoModelForSequenceClassification.from_pretrained(path, config=config, **kwargs)
    return model.eval().requires_grad_(False)


def _load_kwargs(dtype: torch.dtype | None, attn: str | None) -> dict[str, Any]:
    # None means "the checkpoint's / config's own", so those are not passed at all.
    return {k: v for k, v in (("dtype", dtype), ("attn_implementation", attn)) if v is not None}


def _build(config: PretrainedConfig, seed: int | None, dtype: torch.dtype, attn: str | None) -> nn.Module:
    kwargs = _load_kwargs(dtype, attn)
    # fork_rng so a seeded build does not reset the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_config(config, **kwargs)
    return model.train()


def student_from_teacher(teacher: nn.Module, layers: Sequence[int] = (0, 5), copy_classifier: bool = True,
                         seed: int | None = None, dtype: torch.dtype = torch.float32,
                         attn_implementation: str | None = None) -> nn.Module:
    """A shallower copy of the teacher: its embeddings, the chosen encoder layers, pooler and head.

    Args:
        teacher: a sequence-classification model (possibly wrapped).
        layers: 0-based teacher layer indices, strictly increasing; student layer j copies teacher layer
            ``layers[j]``.
        copy_classifier: copy the teacher's classification head (right when the teacher is fine-tuned on
            the task). False keeps a freshly initialised head (common practice when the teacher is not
            task-fine-tuned, as its head would be random anyway).
        seed: seeds the initialisation of anything not copied (the head when not copied).
        dtype: parameter dtype of the student (fp32 by default even for a bf16 teacher, for training).
        attn_implementation: None inherits the teacher's.

    Returns:
        A trainable model of the teacher's class, in train mode.

    Raises:
        ValueError: empty, out-of-range or not strictly increasing ``layers``.
    """
    teacher = unwrap_model(teacher)
    num_teacher_layers = teacher.config.num_hidden_layers
    layers = list(layers)
    if not layers or any(isinstance(i, bool) or not isinstance(i, int) for i in layers):
        raise ValueError(f"layers must be a non-empty list of ints, got {layers!r}")
    if any(not 0 <= i < num_teacher_layers for i in layers):
        raise ValueError(f"layers {layers} out of range for a {num_teacher_layers}-layer teacher (0-based)")
    if any(b <= a for a, b in zip(layers, layers[1:])):
        raise ValueError(f"layers must be strictly increasing, got {layers}")
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(layers)
    student = _build(config, seed, dtype, attn_implementation)
    prefix = f"{student.base_model_prefix}."
    new_index = {str(t): str(s) for s, t in enumerate(layers)}
    layer_prefix = f"{prefix}encoder.layer."
    state = {}
    for key, value in teacher.state_dict().items():
        if key.startswith(layer_prefix):
            index, rest = key[len(layer_prefix):].split(".", 1)
            if index in new_index:
                state[f"{layer_prefix}{new_index[index]}.{rest}"] = value
        elif key.startswith(prefix) or copy_classifier:
            state[key] = value
    missing, unexpected = student.load_state_dict(state, strict=False)
    # Only the head may stay uninitialised (by choice); anything else means the layouts differ.
    bad_missing = [k for k in missing if k.startswith(prefix) or copy_classifier]
    if bad_missing or unexpected:
        raise RuntimeError(f"teacher/student layouts differ: missing {bad_missing}, unexpected {unexpected}")
    return student


def student_from_architecture(teacher_config: PretrainedConfig | nn.Module, num_layers: int, hidden_size: int,
                              num_heads: int, intermediate_size: int, seed: int,
                              dtype: torch.dtype = torch.float32,
                              attn_implementation: str | None = None) -> nn.Module:
    """A randomly initialised student sharing the teacher's vocabulary, positions, labels and activations.

    Args:
        teacher_config: the teacher's config (or the teacher); vocab_size, max_position_embeddings,
            type_vocab_size, pad_token_id and labels are inherited so the teacher's tokenizer serves both.
        num_layers, hidden_size, num_heads, intermediate_size: the student's shape.
        seed: initialisation seed (the caller's global RNG state is left untouched).
        dtype: parameter dtype.
        attn_implementation: None inherits the teacher config's.

    Raises:
        ValueError: a non-positive size or hidden_size not divisible by num_heads.
    """
    for name, value in (("num_layers", num_layers), ("hidden_size", hidden_size), ("num_heads", num_heads),
                        ("intermediate_size", intermediate_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
    config = copy.deepcopy(_config_of(teacher_config))
    config.update({"num_hidden_layers": num_layers, "hidden_size": hidden_size, "num_attention_heads": num_heads,
                   "intermediate_size": intermediate_size})
    return _build(config, seed, dtype, attn_implementation)


def student_from_pretrained(source: str | os.PathLike, teacher: PretrainedConfig | nn.Module,
                            teacher_tokenizer: Any = None, dtype: torch.dtype = torch.float32,
                            attn_implementation: str | None = None) -> nn.Module:
    """Load a pretrained student (Hub id, local directory or ``package:<alias>``) for the teacher's task.

    Args:
        source: the student checkpoint.
        teacher: the teacher (or its config); its num_labels, label names and problem_type are used.
        teacher_tokenizer: when given, the student's tokenizer vocabulary must equal it token for token.
        dtype: parameter dtype.
        attn_implementation: e.g. "eager" when the student's attention maps are distilled.

    Raises:
        ValueError: the vocabulary differs from the teacher's (CKD compares token positions, so both
            models must tokenise identically).
    """
    path = resolve_source(source)
    teacher_config = _config_of(teacher)
    stored = AutoConfig.from_pretrained(path)
    if stored.vocab_size != teacher_config.vocab_size:
        raise ValueError(f"student {source!r} has vocab_size {stored.vocab_size}, teacher has "
                         f"{teacher_config.vocab_size}: CKD needs both models on the same tokenisation")
    if teacher_tokenizer is not None and load_tokenizer(path).get_vocab() != teacher_tokenizer.get_vocab():
        raise ValueError(f"student {source!r} tokenizer vocabulary differs from the teacher's")
    names = [teacher_config.id2label[i] for i in sorted(teacher_config.id2label)]
    labels = _label_maps(names, teacher_config.num_labels, teacher_config.problem_type or PROBLEM_TYPES[0])
    config = AutoConfig.from_pretrained(path, **labels)
    kwargs = _load_kwargs(dtype, attn_implementation)
    return AutoModelForSequenceClassification.from_pretrained(path, config=config, **kwargs).train()


def model_shape(model_or_config: nn.Module | PretrainedConfig) -> ModelShape:
    """The ``ModelShape`` (layers, width, heads, FFN width) of a model or config."""
    config = _config_of(model_or_config)
    return ModelShape(num_layers=config.num_hidden_layers, hidden_size=config.hidden_size,
                      num_heads=config.num_attention_heads,
                      intermediate_size=getattr(config, "intermediate_size", None))


def export_student(model: nn.Module, tokenizer: Any, out_dir: str | os.PathLike, label_names: Sequence[str],
                   overwrite: bool = False) -> Path:
    """Save a student in Hugging Face format, atomically.

    Only the weights of a plain ``AutoModelForSequenceClassification`` of this config are written:
    modules a distillation objective attached to the student (projections and the like) are dropped, so
    ``from_pretrained(out_dir)`` loads cleanly. The export is assembled in a temporary sibling directory
    and renamed into place, so a crash leaves either no export or a complete one. Under ZeRO-3 pass a
    model whose parameters are gathered (e.g. rebuilt from the consolidated state dict).

    Args:
        model: the student (possibly wrapped).
        tokenizer: saved alongside (the teacher's tokenizer for architecture-built students).
        out_dir: the export directory, returned resolved.
        label_names: class names in label-id order; written to config.json as id2label / label2id.
        overwrite: replace an existing export (the old one is removed only after the new one is in place).
    """
    model = unwrap_model(model)
    out = Path(out_dir).resolve()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True to replace it")
    config = model.config
    labels = _label_maps(label_names, config.num_labels, config.problem_type or PROBLEM_TYPES[0])
    config.id2label, config.label2id = labels["id2label"], labels["label2id"]
    # Key names of a clean model, built on the meta device so it costs no memory.
    with torch.device("meta"):
        clean_keys = set(AutoModelForSequenceClassification.from_config(copy.deepcopy(config)).state_dict())
    state = {k: v for k, v in model.state_dict().items() if k in clean_keys}
    if missing := clean_keys - set(state):
        raise ValueError(f"model lacks weights of a plain {type(model).__name__}: {sorted(missing)[:5]}")
    out.parent.mkdir(parents=True, exist_ok=True)
    # Sibling paths, so the renames stay on one filesystem (atomic); mkdir (not mkdtemp, which makes a
    # 0700 directory) so the export gets the usual umask permissions.
    tmp, old = (out.parent / f".{out.name}.{tag}-{uuid.uuid4().hex[:8]}" for tag in ("tmp", "old"))
    tmp.mkdir()
    try:
        model.save_pretrained(tmp, state_dict=state)
        tokenizer.save_pretrained(tmp)
        for file in tmp.rglob("*"):
            if file.is_file():  # flush to disk before the rename makes the export visible
                with open(file, "rb") as handle:
                    os.fsync(handle.fileno())
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out.exists():
            os.replace(old, out)  # put the previous export back
        raise
    shutil.rmtree(old, ignore_errors=True)
    return out


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (each shared tensor counted once)."""
    params = {id(p): p for p in unwrap_model(model).parameters() if p.requires_grad or not trainable_only}
    return sum(p.numel() for p in params.values())


def latency_batch(tokenizer: Any, batch_size: int = 8, seq_len: int = 128) -> dict[str, torch.Tensor]:
    """A fixed, full-length batch: [CLS] + seeded random non-special tokens + [SEP], no padding."""
    if seq_len < 2 or batch_size < 1:
        raise ValueError(f"need seq_len >= 2 and batch_size >= 1, got {seq_len}, {batch_size}")
    special = set(tokenizer.all_special_ids)
    candidates = torch.tensor([i for i in range(tokenizer.vocab_size) if i not in special])
    generator = torch.Generator().manual_seed(0)
    body = candidates[torch.randint(len(candidates), (batch_size, seq_len - 2), generator=generator)]
    cls = torch.full((batch_size, 1), tokenizer.cls_token_id)
    sep = torch.full((batch_size, 1), tokenizer.sep_token_id)
    input_ids = torch.cat([cls, body, sep], dim=1)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "token_type_ids": torch.zeros_like(input_ids)}


@torch.inference_mode()
def measure_latency(model: nn.Module, tokenizer_or_batch: Any, batch_size: int = 8, seq_len: int = 128,
                    repeats: int = 20, warmup: int = 3) -> dict[str, float]:
    """Forward-pass latency on a deterministic batch, for logging.

    Args:
        model: the model (eval mode is used during the measurement, then the previous mode restored).
        tokenizer_or_batch: a tokenizer (a ``latency_batch`` is built) or a ready batch mapping.
        batch_size, seq_len: shape of the built batch (ignored for a ready batch).
        repeats: timed forward passes.
        warmup: untimed passes first (allocator, kernels, caches).

    Returns:
        {"median_ms", "p90_ms"} per batch, plus "batch_size" and "seq_len" of the batch used.
    """
    model = unwrap_model(model)
    is_batch = isinstance(tokenizer_or_batch, Mapping)
    batch = tokenizer_or_batch if is_batch else latency_batch(tokenizer_or_batch, batch_size, seq_len)
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items() if k in ENCODER_INPUT_KEYS}

    def sync() -> None:  # CUDA kernels run asynchronously: time their completion, not their launch
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    was_training = model.training
    model.eval()
    times = []
    try:
        for _ in range(warmup):
            model(**batch)
        sync()
        for _ in range(max(1, repeats)):
            start = time.perf_counter()
            model(**batch)
            sync()
            times.append((time.perf_counter() - start) * 1000.0)
    finally:
        model.train(was_training)
    times.sort()
    p90 = times[min(len(times) - 1, int(round(0.9 * (len(times) - 1))))]
    shape = batch["input_ids"].shape
    return {"median_ms": statistics.median(times), "p90_ms": p90,
            "batch_size": float(shape[0]), "seq_len": float(shape[1])}
