"""jobs.capture against real (tiny, randomly initialised) BERT models: every captured tensor is checked
against an independent computation from the model's own weights and output_hidden_states."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, RobertaConfig, RobertaForSequenceClassification

from ckd.features import FeatureNeeds
from jobs.capture import FeatureCapture, capture, ensure_eager_attention

LAYERS = 3
HEADS = 4
HIDDEN = 32
ALL = FeatureNeeds(
    hidden_states=frozenset(range(LAYERS + 1)),
    attentions=frozenset(range(1, LAYERS + 1)),
    qkv=frozenset(range(1, LAYERS + 1)),
    attention_outputs=frozenset(range(1, LAYERS + 1)),
    logits=True,
)


def tiny_config(attn: str = "eager", dropout: float = 0.0) -> BertConfig:
    config = BertConfig(
        vocab_size=100, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=64, max_position_embeddings=64, num_labels=3,
        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
    )
    config._attn_implementation = attn
    return config


def tiny_bert(attn: str = "eager", dropout: float = 0.0, seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    return BertForSequenceClassification(tiny_config(attn, dropout)).eval()


@pytest.fixture
def batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(5, 100, (3, 10), generator=generator)
    mask = torch.ones_like(input_ids)
    mask[1, 6:] = 0  # padding, so the mask term of the attention check matters
    mask[2, 3:] = 0
    input_ids[mask == 0] = 0
    return {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(input_ids),
            "labels": torch.tensor([0, 1, 2]), "idx": torch.arange(3)}


def split_heads(x: torch.Tensor) -> torch.Tensor:
    b, n, d = x.shape
    return x.view(b, n, HEADS, d // HEADS).transpose(1, 2)


def count_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@torch.no_grad()
def test_captured_features_match_independent_computation(batch):
    model = tiny_bert()
    reference = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")},
                      output_hidden_states=True)
    outputs, feats = capture(model, ALL, batch)
    torch.testing.assert_close(outputs.logits, reference.logits, rtol=0, atol=0)
    torch.testing.assert_close(feats.logits, reference.logits, rtol=0, atol=0)
    assert feats.num_layers == LAYERS and feats.num_heads == HEADS
    assert torch.equal(feats.attention_mask, batch["attention_mask"])
    assert len(feats.hidden_states) == LAYERS + 1
    for i in range(LAYERS + 1):
        torch.testing.assert_close(feats.hidden_states[i], reference.hidden_states[i], rtol=0, atol=0)

    additive = (1.0 - batch["attention_mask"][:, None, None, :].float()) * torch.finfo(torch.float32).min
    for i in range(1, LAYERS + 1):
        layer_input = reference.hidden_states[i - 1]
        self_attn = model.bert.encoder.layer[i - 1].attention.self
        q, k, v = self_attn.query(layer_input), self_attn.key(layer_input), self_attn.value(layer_input)
        torch.testing.assert_close(feats.queries[i], q)
        torch.testing.assert_close(feats.keys[i], k)
        torch.testing.assert_close(feats.values[i], v)
        assert feats.queries[i].shape == (3, 10, HIDDEN)

        scores = split_heads(q) @ split_heads(k).transpose(-1, -2) / math.sqrt(HIDDEN // HEADS) + additive
        probs = scores.softmax(dim=-1)
        torch.testing.assert_close(feats.attentions[i], probs)
        assert feats.attentions[i].shape == (3, HEADS, 10, 10)
        assert feats.attentions[i][1, :, :, 6:].abs().max() == 0  # padded keys get no attention

        context = (probs @ split_heads(v)).transpose(1, 2).reshape(3, 10, HIDDEN)
        torch.testing.assert_close(feats.attention_outputs[i], context)


def test_only_requested_hooks_are_registered(batch):
    model = tiny_bert()
    baseline = count_hooks(model)
    needs = FeatureNeeds(hidden_states=frozenset({0, 2}), attentions=frozenset({1}), qkv=frozenset({2}),
                         attention_outputs=frozenset({3}))
    cap = FeatureCapture(model, needs, grad=False)
    assert cap.num_hooks == 2 + 1 + 3 + 1
    assert count_hooks(model) == baseline + cap.num_hooks
    layers = model.bert.encoder.layer
    assert len(layers[1].attention.self.query._forward_hooks) == 1
    assert len(layers[0].attention.self.query._forward_hooks) == 0
    assert len(layers[2].attention.output.dense._forward_pre_hooks) == 1
    assert len(model.bert.embeddings._forward_hooks) == 1

    _, feats = cap(batch)
    assert feats.hidden_states[1] is None and feats.hidden_states[3] is None
    assert feats.hidden_states[0] is not None and feats.hidden_states[2] is not None
    assert set(feats.attentions) == {1} and set(feats.queries) == {2} and set(feats.attention_outputs) == {3}
    assert feats.logits is None
    cap.close()
    assert cap.num_hooks == 0 and count_hooks(model) == baseline
    with pytest.raises(RuntimeError, match="closed"):
        cap(batch)

    with FeatureCapture(model, FeatureNeeds(logits=True)) as logits_only:
        assert logits_only.num_hooks == 0
        _, feats = logits_only(batch)
        assert feats.logits.shape == (3, 3) and all(h is None for h in feats.hidden_states)


def test_each_call_starts_empty_and_outside_calls_store_nothing(batch):
    model = tiny_bert()
    with FeatureCapture(model, ALL, grad=False) as cap:
        _, first = cap(batch)
        model(input_ids=batch["input_ids"][:1])  # an unrelated forward pass while hooks are in place
        short = {k: v[:, :4] for k, v in batch.items() if v.dim() == 2}
        _, second = cap(short)
    assert first.queries[1].shape[1] == 10 and second.queries[1].shape[1] == 4
    assert first.attentions[1].shape[0] == 3


def test_student_features_carry_gradients_teacher_features_do_not(batch):
    student = tiny_bert().train()
    _, feats = capture(student, ALL, batch)
    layer0 = student.bert.encoder.layer[0].attention.self
    checks = [
        (feats.hidden_states[0], student.bert.embeddings.word_embeddings.weight),
        (feats.hidden_states[LAYERS], student.bert.encoder.layer[LAYERS - 1].output.dense.weight),
        (feats.attentions[1], layer0.query.weight),
        (feats.queries[1], layer0.query.weight),
        (feats.keys[1], layer0.key.weight),
        (feats.values[1], layer0.value.weight),
        (feats.attention_outputs[1], layer0.value.weight),
        (feats.logits, student.classifier.weight),
    ]
    for tensor, param in checks:
        assert tensor.requires_grad
        # A weighted sum: the plain sum of softmax rows is constant, so its gradient would be zero.
        weights = torch.linspace(-1, 1, tensor.numel()).view_as(tensor)
        (grad,) = torch.autograd.grad((tensor * weights).sum(), param, retain_graph=True)
        assert grad.abs().sum() > 0

    teacher = tiny_bert(seed=1)  # parameters still require grad: grad=False alone must cut the graph
    _, t_feats = capture(teacher, ALL, batch, grad=False)
    assert not any(t.requires_grad for t in t_feats.hidden_states)
    assert not t_feats.attentions[1].requires_grad and not t_feats.logits.requires_grad


def test_gradient_checkpointing_recompute_does_not_disturb_capture(batch):
    student = tiny_bert().train()
    # transformers 5.x renamed gradient_checkpointing_enable (now deprecated) to activation_checkpointing_enable.
    getattr(student, "activation_checkpointing_enable", student.gradient_checkpointing_enable)()
    calls = []
    student.bert.encoder.layer[1].attention.self.query.register_forward_hook(lambda *_: calls.append(1))
    with FeatureCapture(student, ALL) as cap:
        _, feats = cap(batch)
        before = feats.queries[2].detach().clone()
        loss = sum(h.pow(2).mean() for h in feats.hidden_states) + feats.attentions[2].pow(2).mean()
        loss.backward()  # recomputes layers, firing the hooks again outside a capture call
    assert len(calls) == 2  # the recomputation really ran the hooked module again
    assert torch.equal(feats.queries[2], before)
    assert student.bert.encoder.layer[0].attention.self.query.weight.grad is not None


def test_attention_maps_need_eager_attention(batch):
    model = tiny_bert(attn="sdpa")
    with pytest.raises(ValueError, match="eager"):
        FeatureCapture(model, FeatureNeeds(attentions=frozenset({1})))
    # Q/K/V, context vectors and hidden states come from module hooks, so sdpa serves them.
    needs = FeatureNeeds(hidden_states=frozenset({1}), qkv=frozenset({1}), attention_outputs=frozenset({2}))
    _, sdpa = capture(model, needs, batch, grad=False)
    ensure_eager_attention(model)
    _, eager = capture(model, needs | FeatureNeeds(attentions=frozenset({1})), batch, grad=False)
    torch.testing.assert_close(sdpa.queries[1], eager.queries[1])
    valid = batch["attention_mask"].bool()  # sdpa and eager may differ on padded query rows only
    torch.testing.assert_close(sdpa.attention_outputs[2][valid], eager.attention_outputs[2][valid])


def test_bad_needs_and_batches_are_rejected(batch):
    model = tiny_bert()
    for needs in (FeatureNeeds(hidden_states=frozenset({LAYERS + 1})), FeatureNeeds(qkv=frozenset({0})),
                  FeatureNeeds(attentions=frozenset({LAYERS + 1}))):
        with pytest.raises(ValueError, match="layers"):
            FeatureCapture(model, needs)
    with pytest.raises(KeyError, match="input_ids"):
        capture(model, ALL, {"attention_mask": batch["attention_mask"]})
    with pytest.raises(TypeError, match="layout"):
        FeatureCapture(nn.Linear(2, 2), ALL)


def test_post_dropout_attention_warning(batch):
    model = BertForSequenceClassification(tiny_config(dropout=0.1)).train()
    with FeatureCapture(model, FeatureNeeds(attentions=frozenset({1}))) as cap:
        with pytest.warns(RuntimeWarning, match="after dropout"):
            cap(batch)


def test_missing_attention_mask_defaults_to_all_ones(batch):
    _, feats = capture(tiny_bert(), FeatureNeeds(hidden_states=frozenset({0})), {"input_ids": batch["input_ids"]})
    assert feats.attention_mask.shape == (3, 10) and bool(feats.attention_mask.all())


def test_ddp_wrapped_model(batch, tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        model = tiny_bert()
        wrapped = nn.parallel.DistributedDataParallel(model)
        needs = FeatureNeeds(hidden_states=frozenset({2}), qkv=frozenset({1}), logits=True)
        with FeatureCapture(wrapped, needs, grad=False) as cap:
            assert len(model.bert.encoder.layer[0].attention.self.query._forward_hooks) == 1
            _, via_ddp = cap(batch)
        _, direct = capture(model, needs, batch, grad=False)
        torch.testing.assert_close(via_ddp.hidden_states[2], direct.hidden_states[2])
        torch.testing.assert_close(via_ddp.logits, direct.logits)
    finally:
        dist.destroy_process_group()


@torch.no_grad()
def test_roberta_layout(batch):
    torch.manual_seed(0)
    config = RobertaConfig(vocab_size=100, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=HEADS,
                           intermediate_size=64, max_position_embeddings=70, num_labels=2, pad_token_id=1)
    config._attn_implementation = "eager"
    model = RobertaForSequenceClassification(config).eval()
    inputs = {"input_ids": batch["input_ids"] + 2, "attention_mask": batch["attention_mask"]}
    reference = model(**inputs, output_hidden_states=True)
    needs = FeatureNeeds(hidden_states=frozenset({0, 2}), attentions=frozenset({2}), qkv=frozenset({2}))
    _, feats = capture(model, needs, inputs)
    torch.testing.assert_close(feats.hidden_states[2], reference.hidden_states[2], rtol=0, atol=0)
    q = model.roberta.encoder.layer[1].attention.self.query(reference.hidden_states[1])
    torch.testing.assert_close(feats.queries[2], q)
    assert feats.attentions[2].shape == (3, HEADS, 10, 10)
