"""Fixtures shared by the worker tests."""

import pytest


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Where tiny models are built once per session (model.cache_dir)."""
    return str(tmp_path_factory.mktemp("v2drop-batch-cache"))
