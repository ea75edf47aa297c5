"""Fixtures shared by the job, orchestrator and cluster tests: the real GLUE files beside the checkout,
a tiny BERT teacher built from a config (with the real MiniLM tokenizer, so GLUE text tokenises into
real word pieces); job helpers live in jobkit.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobkit import GLUE_DIR


@pytest.fixture(scope="session")
def glue_dir() -> Path:
    if not GLUE_DIR.is_dir():
        pytest.fail(f"the real GLUE files are expected at {GLUE_DIR} (../shared/glue); set CKD_GLUE_DIR")
    return GLUE_DIR


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-layer, 32-wide BERT classifier (random weights) with the MiniLM tokenizer, saved to a directory."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from jobs.models import resolve_source

    out = tmp_path_factory.mktemp("tiny-teacher")
    tokenizer = AutoTokenizer.from_pretrained(resolve_source("package:all-MiniLM-L6-v2"))
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128, num_labels=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        BertForSequenceClassification(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
