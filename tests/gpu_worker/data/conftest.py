"""Fixtures for the data tests: the built-in tokenizer (and a copy whose pad token is its EOS)."""

from __future__ import annotations

import pytest

from gpu_worker.builtin import TINY


@pytest.fixture(scope="module")
def tok(builtin_data_dir):
    from gpu_worker.loading import load_tokenizer

    return load_tokenizer(TINY, data_dir=builtin_data_dir)


@pytest.fixture(scope="module")
def tiny_dir(builtin_data_dir):
    from gpu_worker.builtin import builtin_path

    return builtin_path(TINY, builtin_data_dir)
