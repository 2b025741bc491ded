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
from torchslim.data.text import Corpus, batchify, bptt_batches, load_corpus

__all__ = [
    "FASHION_MNIST_CLASSES",
    "Corpus",
    "IdxDataset",
    "batches",
    "batchify",
    "bptt_batches",
    "fashion_mnist",
    "load_corpus",
    "load_dataset",
    "load_idx",
    "mnist",
]
