"""Shared fixtures: a fresh random tiny model (fast) and the shipped base, both on CPU."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

torch.set_num_threads(2)
# Tests never read or write the user's cache.
os.environ["POSTTRAIN_CACHE"] = tempfile.mkdtemp(prefix="posttrain-test-cache-")


@pytest.fixture(scope="session")
def tokenizer():
    from posttrain.models.tiny import build_tokenizer

    return build_tokenizer()


@pytest.fixture()
def tiny_model(tokenizer):
    from posttrain.models.tiny import build_model

    return build_model(tokenizer, seed=0)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A random-init tiny model saved as a plain HF directory."""
    from posttrain.models.tiny import build_model

    path = tmp_path_factory.mktemp("tiny_model")
    model = build_model(tokenizer, seed=0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
