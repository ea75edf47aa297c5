"""Task data for distillation jobs: loading, tokenisation with an on-disk cache, and batching.

Every source ends up as a `datasets.DatasetDict` with a "train" split and the task's dev splits, each
holding the text field(s), "label" (int64, or float32 for regression) and "idx", the example's position
0..N-1 in its split after any row limit (CoDIR-style objectives key a memory bank on it).

Typical use::

    source = GlueSource("rte", glue_dir="/data/glue")
    task = source.task_info()
    raw = load_task_dataset(source, max_train_examples=1000, subset_seed=0)
    tok = tokenize_dataset(raw, tokenizer, task, max_length=128, cache_dir="/tmp/tok-cache")
    loader = make_dataloader(tok["train"], tokenizer, 32, shuffle=True, seed=0, rank=r, world_size=w)
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset, DatasetDict, Features, Value
from torch.utils.data import DataLoader, DistributedSampler

from jobs.glue import RawSplit, TaskInfo, get_glue_task, glue_task_key, read_glue_dir
from jobs.taskspec import FILE_FORMATS, TaskSpec

__all__ = [
    "CustomSource", "GlueSource", "PaddingCollator", "TaskInfo", "get_glue_task", "load_task_dataset",
    "make_dataloader", "model_inputs", "task_source", "tokenize_dataset", "tokenizer_fingerprint",
]  # fmt: skip

log = logging.getLogger(__name__)

# What tokenisation keeps of the tokenizer's output, and the collator pads: the encoder inputs a text
# yields (`jobs.models.ENCODER_INPUT_KEYS` is the wider set of inputs an encoder's forward() accepts).
TOKENIZER_OUTPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")
_CACHE_VERSION = 1  # bump when the tokenised layout changes so old cache files are never read


@dataclass(frozen=True)
class GlueSource:
    """A GLUE task, read from a local copy of the official distribution or from the Hub.

    Args:
        task: task name in any common spelling ("rte", "SST-2", "sts-b").
        glue_dir: directory holding the task folders (SST-2/, MRPC/, ...); None reads from the Hub.
        hub_id: Hub dataset id used when `glue_dir` is None.
        revision: Hub revision (commit) to pin, for reproducible sweeps.
    """

    task: str
    glue_dir: str | Path | None = None
    hub_id: str = "nyu-mll/glue"
    revision: str | None = None

    def __post_init__(self) -> None:
        glue_task_key(self.task)  # unknown names fail at config time, not when the job starts

    def task_info(self) -> TaskInfo:
        return get_glue_task(self.task)


@dataclass(frozen=True)
class CustomSource:
    """Any text classification/regression dataset: local files per split, or a Hub dataset.

    Exactly one of `data_files` and `hub_id` is set. Split "train" is required; every other split
    becomes a dev split, in the order given.

    Args:
        name: task name (used in cache keys and logs).
        text_fields: the one or two text columns.
        label_names: class names, index = label id. File labels may be these names or integer ids.
        label_field: the column holding the label; it is renamed to "label".
        is_regression: labels are float scores; `label_names` must be empty.
        metric_kind: "accuracy", "f1", "mcc" or "pearson_spearman"; defaults to "pearson_spearman"
            for regression and "accuracy" otherwise.
        data_files: split -> a .csv, .json (a list of records), .jsonl or .parquet file.
        hub_id, hub_config, revision: the Hub dataset to load.
        hub_splits: split name in the output -> split name on the Hub.
    """

    name: str
    text_fields: Sequence[str]
    label_names: Sequence[str] = ()
    label_field: str = "label"
    is_regression: bool = False
    metric_kind: str | None = None
    data_files: Mapping[str, str | Path] | None = None
    hub_id: str | None = None
    hub_config: str | None = None
    revision: str | None = None
    hub_splits: Mapping[str, str] = field(default_factory=lambda: {"train": "train", "validation": "validation"})

    def __post_init__(self) -> None:
        object.__setattr__(self, "text_fields", tuple(self.text_fields))
        object.__setattr__(self, "label_names", tuple(self.label_names))
        if (self.data_files is None) == (self.hub_id is None):
            raise ValueError(f"dataset {self.name!r}: set exactly one of data_files and hub_id")
        if "train" not in self._splits:
            raise ValueError(f"dataset {self.name!r}: no 'train' split among {list(self._splits)}")
        if self.label_field in self.text_fields:
            raise ValueError(f"dataset {self.name!r}: label_field {self.label_field!r} is also a text field")
        self.task_info()

    @property
    def _splits(self) -> Mapping[str, str | Path]:
        return self.data_files if self.data_files is not None else self.hub_splits

    def task_info(self) -> TaskInfo:
        kind = self.metric_kind or ("pearson_spearman" if self.is_regression else "accuracy")
        dev = tuple(s for s in self._splits if s != "train")
        return TaskInfo(self.name, self.text_fields, self.label_names, self.is_regression, kind, dev)


def task_source(task: TaskSpec) -> GlueSource | CustomSource:
    """The source that loads the data of a job spec's `task:` section."""
    if task.glue is not None:
        return GlueSource(task.glue, glue_dir=task.glue_dir)
    assert task.dataset is not None and task.text_fields is not None
    common: dict[str, Any] = dict(
        name=task.task_name, text_fields=task.text_fields, label_names=task.label_names or (),
        label_field=task.label_field, is_regression=task.regression, metric_kind=task.metric,
    )
    if task.dataset.files is not None:
        return CustomSource(data_files=dict(task.dataset.files), **common)
    extra = {"hub_splits": task.dataset.splits} if task.dataset.splits else {}
    return CustomSource(hub_id=task.dataset.hub, hub_config=task.dataset.config, revision=task.dataset.revision,
                        **common, **extra)


def load_task_dataset(
    source: GlueSource | CustomSource,
    *,
    max_train_examples: int | None = None,
    max_eval_examples: int | None = None,
    subset_seed: int | None = None,
    hub_cache_dir: str | Path | None = None,
) -> DatasetDict:
    """Loads a task's train and dev splits into the common schema.

    Args:
        source: where the data lives.
        max_train_examples: keep at most this many training rows.
        max_eval_examples: keep at most this many rows of each dev split.
        subset_seed: None keeps the first N rows; an int keeps a seeded random N rows (in file order).
        hub_cache_dir: `datasets` download cache for Hub sources.

    Returns:
        DatasetDict with "train" then the dev splits; columns: text fields, "label", "idx".

    Raises:
        FileNotFoundError: a directory or file is missing (the message names the path).
        ValueError: a label is not in the label list, a text value is missing, a column is absent.
    """
    task = source.task_info()
    if isinstance(source, GlueSource):
        if source.glue_dir is not None:
            raw = read_glue_dir(source.glue_dir, task.name)
        else:
            splits = {s: s for s in ("train", *task.dev_splits)}
            raw = _read_hub(source.hub_id, task.name, source.revision, splits, task, "label", hub_cache_dir)
    elif source.data_files is not None:
        raw = _read_files(source.data_files, task, source.label_field)
    else:
        raw = _read_hub(
            source.hub_id,
            source.hub_config,
            source.revision,
            source.hub_splits,
            task,
            source.label_field,
            hub_cache_dir,
        )
    features = Features({f: Value("string") for f in task.text_fields})
    features["label"] = Value("float32" if task.is_regression else "int64")
    features["idx"] = Value("int64")
    out = DatasetDict()
    for split, r in raw.items():
        labels = task.encode_labels(r.labels, r.where)
        for name, values in r.texts.items():
            for i, v in enumerate(values):
                if not isinstance(v, str):
                    raise ValueError(f"{r.where(i)}: text field {name!r} is {v!r}, expected a string")
        limit = max_train_examples if split == "train" else max_eval_examples
        keep = _subset(len(labels), limit, subset_seed)
        columns = {name: [values[i] for i in keep] for name, values in r.texts.items()}
        columns["label"] = [labels[i] for i in keep]
        columns["idx"] = list(range(len(keep)))
        out[split] = Dataset.from_dict(columns, features=features)
    log.info("loaded %s: %s", task.name, {s: len(d) for s, d in out.items()})
    return out


def _subset(n: int, limit: int | None, seed: int | None) -> list[int]:
    if limit is not None and limit < 0:
        raise ValueError(f"row limits must be >= 0, got {limit}")
    if limit is None or limit >= n:
        return list(range(n))
    if seed is None:
        return list(range(limit))
    # Sorted so a sample keeps file order: the same seed and limit always give the same idx -> row map.
    return sorted(np.random.default_rng(seed).permutation(n)[:limit].tolist())


def _read_files(data_files: Mapping[str, str | Path], task: TaskInfo, label_field: str) -> dict[str, RawSplit]:
    paths = {split: Path(p) for split, p in data_files.items()}
    for split, path in paths.items():
        if path.suffix.lower() not in FILE_FORMATS:
            raise ValueError(f"split {split!r}: unsupported file {str(path)!r}; expected one of {FILE_FORMATS}")
        if not path.is_file():
            raise FileNotFoundError(f"split {split!r}: data file {str(path)!r} does not exist")
    raw = {}
    for split, path in paths.items():
        try:
            columns = _read_table(path)
        except UnicodeDecodeError as err:  # beyond the prefix validation reads (jobs.datacheck)
            raise ValueError(f"split {split!r}: data file {str(path)!r} is not UTF-8 text (byte "
                             f"0x{err.object[err.start]:02x}); save it as UTF-8") from None
        raw[split] = _pick_columns(columns, task, label_field, str(path), lambda i, p=path: f"{p}, row {i}")
    return raw


def _read_table(path: Path) -> dict[str, list[Any]]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pydict()
    if suffix == ".csv":
        with path.open(encoding="utf-8-sig", newline="") as f:
            records: list[Any] = list(csv.DictReader(f))
    elif suffix == ".jsonl":
        with path.open(encoding="utf-8-sig") as f:
            records = [json.loads(line) for line in f if line.strip()]
    else:
        records = json.loads(path.read_text(encoding="utf-8-sig"))
        if isinstance(records, dict) and all(isinstance(v, list) for v in records.values()):
            return records
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise ValueError(f"{str(path)!r}: expected a list of JSON objects (one per example)")
    keys = list(dict.fromkeys(k for r in records for k in r))
    return {k: [r.get(k) for r in records] for k in keys}


def _pick_columns(
    columns: Mapping[str, list[Any]], task: TaskInfo, label_field: str, origin: str, where: Callable[[int], str]
) -> RawSplit:
    missing = [c for c in (*task.text_fields, label_field) if c not in columns]
    if missing:
        raise ValueError(f"{origin}: missing column(s) {missing}; available: {list(columns)}")
    return RawSplit({f: list(columns[f]) for f in task.text_fields}, list(columns[label_field]), where)


def _read_hub(
    hub_id: str, config: str | None, revision: str | None, splits: Mapping[str, str], task: TaskInfo,
    label_field: str, cache_dir: str | Path | None,
) -> dict[str, RawSplit]:  # fmt: skip
    import datasets

    raw = {}
    for ours, theirs in splits.items():
        ds = datasets.load_dataset(
            hub_id, config, split=theirs, revision=revision, cache_dir=None if cache_dir is None else str(cache_dir)
        )
        origin = f"Hub dataset {hub_id!r} (config {config!r}, split {theirs!r})"
        needed = [c for c in (*task.text_fields, label_field) if c in ds.column_names]
        columns = ds.select_columns(needed).to_dict()
        raw[ours] = _pick_columns(columns, task, label_field, origin, lambda i, o=origin: f"{o}, row {i}")
    return raw


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of everything about a tokenizer that changes its output (vocab, normaliser, special tokens).

    The path it was loaded from is left out on purpose: the same tokenizer installed at a different
    location on another node must reuse the cache.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # The backend records the truncation/padding of its last call; that is per-call state, not identity.
        state = json.loads(backend.to_str())
        state.pop("truncation", None)
        state.pop("padding", None)
    else:
        state = sorted(tokenizer.get_vocab().items())
    state = json.dumps(state, sort_keys=True)
    extra = [type(tokenizer).__name__, getattr(tokenizer, "truncation_side", "right"), state]
    return hashlib.sha256("\0".join(extra).encode()).hexdigest()


def _content_hash(ds: Dataset) -> str:
    import pyarrow as pa

    # Hashing the rows themselves covers source, file contents, limits and subset seed at once.
    table = ds.with_format("arrow")[:].combine_chunks()
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()


def tokenize_dataset(
    data: DatasetDict, tokenizer: Any, task: TaskInfo, *, max_length: int, cache_dir: str | Path | None = None
) -> DatasetDict:
    """Tokenises every split (truncation to `max_length`, no padding: batches are padded dynamically).

    With `cache_dir`, each split is stored as `<task>-<split>-<key>.arrow` where the key hashes the
    tokenizer (`tokenizer_fingerprint`), `max_length`, the task definition and the split's rows; a
    later call with the same inputs memory-maps that file instead of tokenising again. Files are
    written under a temporary name and renamed, so concurrent trials never read a partial file.

    Returns:
        DatasetDict with columns input_ids, attention_mask, token_type_ids (if the tokenizer makes
        them), label, idx.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    missing = [f for f in (*task.text_fields, "label", "idx") if f not in data[next(iter(data))].column_names]
    if missing:
        raise ValueError(f"dataset lacks column(s) {missing} needed for task {task.name!r}")
    tok_id = tokenizer_fingerprint(tokenizer)

    def encode(batch: dict[str, list[Any]]) -> dict[str, Any]:
        enc = tokenizer(*(batch[f] for f in task.text_fields), truncation=True, max_length=max_length)
        return {k: enc[k] for k in TOKENIZER_OUTPUT_KEYS if k in enc}

    out = DatasetDict()
    for split, ds in data.items():
        kwargs: dict[str, Any] = dict(batched=True, remove_columns=list(task.text_fields), desc=f"tokenise {split}")
        if cache_dir is None:
            out[split] = ds.map(encode, keep_in_memory=True, **kwargs)
            continue
        spec = dict(version=_CACHE_VERSION, tokenizer=tok_id, max_length=max_length, task=asdict(task), split=split)
        spec.update(rows=len(ds), content=_content_hash(ds))
        key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]
        final = Path(cache_dir) / f"{task.name}-{split}-{key}.arrow"
        if final.is_file():
            log.info("tokenised %s/%s: cache hit %s", task.name, split, final)
        else:
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = final.with_name(f"{final.name}.{os.getpid()}-{uuid.uuid4().hex}.tmp")
            try:
                ds.map(encode, cache_file_name=str(tmp), load_from_cache_file=False, **kwargs)
                os.replace(tmp, final)
            finally:
                tmp.unlink(missing_ok=True)
            # A human-readable record of what the file holds; never read back.
            spec["tokenizer_name"] = str(getattr(tokenizer, "name_or_path", ""))
            final.with_suffix(".json").write_text(json.dumps(spec, indent=1))
            log.info("tokenised %s/%s: wrote %s", task.name, split, final)
        out[split] = Dataset.from_file(str(final))
    return out


@dataclass
class PaddingCollator:
    """Pads a list of tokenised examples to the longest one in the batch.

    "label" becomes a float32 tensor for regression and int64 otherwise; "idx" an int64 tensor. Keys
    other than the model inputs, label and idx are rejected so a wrong dataset fails loudly.

    Args:
        pad_token_id: id written into padded input_ids positions.
        pad_token_type_id: id written into padded token_type_ids positions.
        padding_side: "right" or "left".
        pad_to_multiple_of: round the padded length up to a multiple of this (tensor-core friendly).
        is_regression: None infers from the label values' Python type.
    """

    pad_token_id: int
    pad_token_type_id: int = 0
    padding_side: str = "right"
    pad_to_multiple_of: int | None = None
    is_regression: bool | None = None

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, **kwargs: Any) -> PaddingCollator:
        if tokenizer.pad_token_id is None:
            raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', tokenizer)!r} has no pad token")
        type_id, side = getattr(tokenizer, "pad_token_type_id", 0), getattr(tokenizer, "padding_side", "right")
        return cls(tokenizer.pad_token_id, type_id, side, **kwargs)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("cannot collate an empty batch")
        unknown = set(features[0]) - {*TOKENIZER_OUTPUT_KEYS, "label", "idx"}
        if unknown or "input_ids" not in features[0]:
            raise ValueError(
                f"collate expects tokenised examples with input_ids, attention_mask, token_type_ids, label, idx; "
                f"got keys {sorted(features[0])}"
            )
        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        pad_values = {"input_ids": self.pad_token_id, "attention_mask": 0, "token_type_ids": self.pad_token_type_id}
        batch: dict[str, torch.Tensor] = {}
        for key, pad in pad_values.items():
            if key not in features[0] and key != "attention_mask":
                continue
            rows = []
            for f in features:
                values = f[key] if key in f else [1] * len(f["input_ids"])
                fill = [pad] * (longest - len(values))
                rows.append(values + fill if self.padding_side == "right" else fill + values)
            batch[key] = torch.tensor(rows, dtype=torch.long)
        if "label" in features[0]:
            labels = [f["label"] for f in features]
            regression = self.is_regression if self.is_regression is not None else isinstance(labels[0], float)
            batch["label"] = torch.tensor(labels, dtype=torch.float32 if regression else torch.long)
        if "idx" in features[0]:
            batch["idx"] = torch.tensor([f["idx"] for f in features], dtype=torch.long)
        return batch


def make_dataloader(
    dataset: Dataset,
    tokenizer: Any,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = False,
    num_workers: int = 0,
    pad_to_multiple_of: int | None = None,
) -> DataLoader:
    """A DataLoader over a tokenised split with dynamic padding and a `DistributedSampler`.

    The sampler is used even for one process so every loader has `loader.sampler.set_epoch(epoch)`,
    which must be called each epoch for a new (seeded, rank-consistent) shuffle. Each rank sees a
    disjoint shard; when the split does not divide evenly the sampler repeats a few examples to
    even the shards, so distributed evaluation should de-duplicate by "idx".
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    label = dataset.features.get("label")
    regression = None if label is None else str(getattr(label, "dtype", "")).startswith("float")
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed)
    collate = PaddingCollator.for_tokenizer(tokenizer, pad_to_multiple_of=pad_to_multiple_of, is_regression=regression)
    # Its own generator: creating an iterator draws a base seed, which would otherwise come from the global
    # RNG and shift the dropout stream (a resumed job must replay exactly the draws of an uninterrupted one).
    return DataLoader(
        dataset, batch_size, sampler=sampler, collate_fn=collate, drop_last=drop_last, num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
    )


def model_inputs(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The part of a collated batch that a Hugging Face encoder's forward() accepts."""
    return {k: batch[k] for k in TOKENIZER_OUTPUT_KEYS if k in batch}
