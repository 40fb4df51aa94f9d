"""Fixtures shared by model-level tests (imported by name from test modules)."""

from __future__ import annotations

import pytest

from conftest import make_tiny_model


@pytest.fixture()
def tiny_llama(tiny_tokenizer):
    return make_tiny_model("llama", tiny_tokenizer)
