"""Shared fixtures: K2-format checkpoints built once per test session (no downloads)."""

from __future__ import annotations

import os

import pytest
import torch

from k2mini.testing import build_fixture

# Two cores: keep torch from oversubscribing when numba and torch both spawn threads.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_fixture(tmp_path_factory):
    """Edge-block shapes, dense first layer, 3 shards, a scale in another shard, n_group 1."""
    return build_fixture(tmp_path_factory.mktemp("tiny") / "src", "tiny", keep_model=True)


@pytest.fixture(scope="session")
def aligned_fixture(tmp_path_factory):
    """Every FP8 dimension a multiple of 128."""
    return build_fixture(tmp_path_factory.mktemp("aligned") / "src", "aligned", keep_model=True)


@pytest.fixture(scope="session")
def grouped_fixture(tmp_path_factory):
    """DeepSeek-V3-style grouped routing: n_group 4, topk_group 2."""
    return build_fixture(tmp_path_factory.mktemp("grouped") / "src", "grouped", keep_model=True)
