"""Test isolation: a test that changes process-wide state (environment variables such as RANK / WORLD_SIZE set by
the single-process DeepSpeed set-up) must not change what the next test sees."""
import os

import pytest
from hypothesis import settings

# Property tests draw the same examples on every run (a red CI must be reproducible); explore new ones with
# `MOSE_HYPOTHESIS_PROFILE=explore python -m pytest tests`.
settings.register_profile("deterministic", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("MOSE_HYPOTHESIS_PROFILE", "deterministic"))


@pytest.fixture(autouse=True)
def _restore_environment():
    saved = dict(os.environ)
    yield
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(scope="module")
def one_thread():
    """One torch intra-op thread for a module's tests: tiny matrices on a shared 2-core machine, where more threads
    only contend (steps ~10x slower). Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
