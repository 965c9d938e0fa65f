"""Mask tests run their tiny models on one torch thread."""

import pytest


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield
