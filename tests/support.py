"""Shared by the tests that need the real Fashion-MNIST files."""

import pytest

from torchslim.data import load_dataset
from torchslim.errors import DatasetNotFound


def have_fashion_mnist() -> bool:
    try:
        load_dataset("fashion-mnist", "test", limit=1)
    except DatasetNotFound:
        return False
    return True


needs_fashion_mnist = pytest.mark.skipif(not have_fashion_mnist(), reason="Fashion-MNIST is not installed (make data)")
