import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the scripts import each other by name
from helpers import TEST_DATA  # noqa: E402


@pytest.fixture
def shared_data():
    """Path of tests/data, the real stories260K artefacts (model, tokenizer, real stories)."""
    return TEST_DATA


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The test models are tiny: a second thread buys nothing, and where the cores are shared
    (CI, parallel jobs) OpenMP threads waiting for a busy core make them many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_configure(config):
    # slow tests still run in `make test` (and CI); `-m "not slow"` skips them while iterating
    config.addinivalue_line("markers", "slow: a fault-tolerance test that runs whole training processes")
