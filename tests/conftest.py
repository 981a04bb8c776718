import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED_DATA = os.path.join(ROOT, "..", "shared", "data")


@pytest.fixture
def shared_data():
    """Path of ../shared/data, the real stories260K artefacts; skips where it is absent."""
    if not os.path.isfile(os.path.join(SHARED_DATA, "stories260K.pt")):
        pytest.skip("../shared/data (real stories260K model) is not present beside this checkout")
    return SHARED_DATA


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The test models are tiny: a second thread buys nothing, and where the cores are shared
    (CI, parallel jobs) OpenMP threads waiting for a busy core make them many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a fault-tolerance test of a minute or more; runs by default, "
                                       "and in CI (deselect with -m 'not slow' for a quick local loop)")
