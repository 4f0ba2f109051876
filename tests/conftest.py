"""Test isolation: a test that changes process-wide state (environment variables such as RANK / WORLD_SIZE set by
the single-process DeepSpeed set-up) must not change what the next test sees."""
import os

import pytest


@pytest.fixture(autouse=True)
def _restore_environment():
    saved = dict(os.environ)
    yield
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)
