"""Shared test fixtures."""
import pytest

from hvd_lb import rules


@pytest.fixture(autouse=True)
def _fresh_small_k_warning():
    """Each test sees the k < 8 warning afresh (``rules.check_samples`` warns once per process and k)."""
    rules._WARNED_K.clear()
    yield
    rules._WARNED_K.clear()
