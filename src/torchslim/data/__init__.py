"""Datasets held whole in memory, and a minibatch iterator over in-memory tensors."""

from torchslim.data.mnist import (
    FASHION_MNIST_CLASSES,
    IdxDataset,
    batches,
    fashion_mnist,
    load_dataset,
    load_idx,
    mnist,
)

__all__ = [
    "FASHION_MNIST_CLASSES",
    "IdxDataset",
    "batches",
    "fashion_mnist",
    "load_dataset",
    "load_idx",
    "mnist",
]
