import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED_DATA = os.path.join(ROOT, "..", "shared", "data")


@pytest.fixture
def shared_data():
    """Path of ../shared/data, the real stories260K artefacts; skips where it is absent."""
    if not os.path.isfile(os.path.join(SHARED_DATA, "stories260K.pt")):
        pytest.skip("../shared/data (real stories260K model) is not present beside this checkout")
    return SHARED_DATA
