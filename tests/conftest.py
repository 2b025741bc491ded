import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # tests/nets.py

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny batches gain nothing from threads, and threads collapse when other jobs share the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
