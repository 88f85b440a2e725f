"""Shared fixtures: a fresh random tiny model (fast) and the shipped base, both on CPU."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tokenizer():
    from posttrain.models.tiny import build_tokenizer

    return build_tokenizer()


@pytest.fixture()
def tiny_model(tokenizer):
    """A fresh random tiny model (hidden 128, 4 layers)."""
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
