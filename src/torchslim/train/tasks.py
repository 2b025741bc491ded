"""What a recipe trains on: images to classify, or a word stream to model.

The engine runs the same phases (baseline → SSL → compact → fine-tune) for both; a task owns the data,
one training epoch, the evaluation and the example inputs that tracing and compaction see.

* :class:`ImageTask` (Fashion-MNIST, MNIST): shuffled minibatches; the metric is top-1 accuracy.
* :class:`TextTask` (the King James Bible, PTB): ``(T, B)`` token columns and truncated BPTT
  (:mod:`torchslim.train.lm`); the metric is next-word top-1 accuracy, and ``exp(loss)`` is the perplexity.

``evaluate(model, split)`` returns ``(mean cross-entropy, accuracy)`` for ``split`` in
``"train"``, ``"valid"``, ``"test"``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Protocol

import torch
from torch import Tensor, nn

from torchslim.data import batches, batchify, load_corpus, load_dataset
from torchslim.data.text import CORPORA
from torchslim.errors import ConfigError
from torchslim.train.lm import evaluate_lm_loss, train_lm_epoch
from torchslim.train.loop import NO_CHECKPOINTS, NO_REGULARIZERS, Checkpointing, Regularizers, evaluate, train_epoch
from torchslim.train.recipes import Recipe
from torchslim.train.world import SOLO, World

__all__ = ["ImageTask", "Task", "TextTask", "is_text", "load_task", "random_inputs"]

_IMAGE_SHAPES = {"fashion-mnist": (1, 28, 28), "mnist": (1, 28, 28)}


class Task(Protocol):
    example: Tensor  # a few test inputs, for tracing, compaction and reports
    has_valid: bool

    def steps_per_epoch(self) -> int:
        """Optimizer steps in one training epoch."""

    def train_epoch(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, lr: Callable[[int], float],
                    seed: int, regularizers: Regularizers = NO_REGULARIZERS, desc: str = "train",
                    progress: bool | None = None, world: World = SOLO,
                    checkpointing: Checkpointing = NO_CHECKPOINTS) -> tuple[float, float]:
        """One epoch of SGD (``lr(i)`` at step ``i``; ``seed`` orders its batches; ``regularizers`` act on every
        step, :func:`torchslim.train.loop.optimizer_step`; ``world``: this process's part of each batch, ``model``
        its DDP wrapper; ``checkpointing``: inside the epoch); ``(mean cross-entropy, accuracy)``."""

    def evaluate(self, model: nn.Module, split: str) -> tuple[float, float]:
        """``(mean cross-entropy, top-1 accuracy)`` on ``split`` ("train", "valid", "test"), eval mode."""


def is_text(recipe: Recipe) -> bool:
    """Whether the recipe's data is a word corpus (``"kjv"``, ``"ptb"``)."""
    return recipe.data.name in CORPORA


def random_inputs(recipe: Recipe, batch: int = 2) -> Tensor:
    """Seeded inputs of the recipe's shape: images ``(batch, C, H, W)`` or tokens ``(bptt, batch)``."""
    gen = torch.Generator().manual_seed(0)
    if is_text(recipe):
        vocab = int(recipe.model.kwargs.get("vocab_size", recipe.data.vocab_size + 2))
        return torch.randint(0, vocab, (recipe.data.bptt, batch), generator=gen)
    shape = _IMAGE_SHAPES.get(recipe.data.name)
    if shape is None:
        known = sorted([*_IMAGE_SHAPES, *CORPORA])
        raise ConfigError(f"no input shape known for dataset '{recipe.data.name}'; known: {known}")
    return torch.randn(batch, *shape, generator=gen)


def load_task(recipe: Recipe, data_dir: str | Path | None = None) -> Task:
    """The recipe's data, loaded and split.

    Raises:
        DatasetNotFound: the data is missing (the message says how to get it).
        ConfigError: a split left empty by the recipe's limits.
    """
    return TextTask.load(recipe, data_dir) if is_text(recipe) else ImageTask.load(recipe, data_dir)


class ImageTask:
    """Image classification from in-memory tensors; valid is the last ``data.valid_size`` training images."""

    def __init__(self, recipe: Recipe, train: tuple[Tensor, Tensor], valid: tuple[Tensor, Tensor] | None,
                 test: tuple[Tensor, Tensor]) -> None:
        self.recipe, self.splits = recipe, {"train": train, "valid": valid, "test": test}
        self.example = test[0][:16]  # (16, C, H, W)
        self.has_valid = valid is not None

    @classmethod
    def load(cls, recipe: Recipe, data_dir: str | Path | None) -> "ImageTask":
        train = load_dataset(recipe.data.name, "train", data_dir=data_dir, limit=recipe.data.train_limit)
        test = load_dataset(recipe.data.name, "test", data_dir=data_dir, limit=recipe.data.test_limit)
        n_valid = recipe.data.valid_size
        if n_valid >= len(train.labels):
            raise ConfigError(f"data.valid_size={n_valid} leaves no training images out of {len(train.labels)}; "
                              f"lower it or raise data.train_limit")
        images, labels = train.images, train.labels
        cut = len(labels) - n_valid
        valid = (images[cut:], labels[cut:]) if n_valid else None
        return cls(recipe, (images[:cut], labels[:cut]), valid, (test.images, test.labels))

    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.splits["train"][1]) / self.recipe.batch_size)

    def train_epoch(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, lr: Callable[[int], float],
                    seed: int, regularizers: Regularizers = NO_REGULARIZERS, desc: str = "train",
                    progress: bool | None = None, world: World = SOLO,
                    checkpointing: Checkpointing = NO_CHECKPOINTS) -> tuple[float, float]:
        images, labels = self.splits["train"]
        gen = torch.Generator().manual_seed(seed)
        return train_epoch(
            model, optimizer, batches(images, labels, self.recipe.batch_size, shuffle=True, generator=gen),
            lr=lr, steps=self.steps_per_epoch(), regularizers=regularizers, desc=desc, progress=progress, world=world,
            checkpointing=checkpointing,
        )

    def evaluate(self, model: nn.Module, split: str) -> tuple[float, float]:
        return evaluate(model, *self.splits[split], batch_size=self.recipe.eval_batch_size)


class TextTask:
    """Word-level language modelling: ``batch_size`` (train) or ``eval_batch_size`` (valid, test) columns.

    ``data.train_limit``/``data.test_limit`` keep the first N tokens of train / of valid and test;
    the corpus's own validation split is used (``data.valid_size`` does not apply).
    """

    def __init__(self, recipe: Recipe, streams: dict[str, Tensor]) -> None:
        self.recipe = recipe
        self.columns = {
            split: batchify(ids, recipe.batch_size if split == "train" else min(recipe.eval_batch_size, len(ids)))
            for split, ids in streams.items()
        }  # split -> (T, B)
        self.example = self.columns["test"][: recipe.data.bptt, :4]  # (bptt, 4)
        self.has_valid = True

    @classmethod
    def load(cls, recipe: Recipe, data_dir: str | Path | None) -> "TextTask":
        corpus = load_corpus(recipe.data.name, data_dir, vocab_size=recipe.data.vocab_size)
        vocab = int(recipe.model.kwargs.get("vocab_size", len(corpus.vocab)))
        if vocab != len(corpus.vocab):
            raise ConfigError(
                f"model.kwargs.vocab_size is {vocab} but the {corpus.name} corpus has {len(corpus.vocab)} words "
                f"(data.vocab_size={recipe.data.vocab_size} plus <unk> and <eos>); set model.kwargs.vocab_size: "
                f"{len(corpus.vocab)}")
        limit, eval_limit = recipe.data.train_limit, recipe.data.test_limit
        streams = {"train": corpus.train[:limit], "valid": corpus.valid[:eval_limit], "test": corpus.test[:eval_limit]}
        for split, ids in streams.items():
            if len(ids) < 2 * max(recipe.batch_size if split == "train" else 1, 1):
                raise ConfigError(f"the {split} split has {len(ids)} tokens, too few for batch_size "
                                  f"{recipe.batch_size}; raise data.train_limit/test_limit or lower batch_size")
        return cls(recipe, streams)

    def steps_per_epoch(self) -> int:
        return math.ceil((len(self.columns["train"]) - 1) / self.recipe.data.bptt)

    def train_epoch(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, lr: Callable[[int], float],
                    seed: int, regularizers: Regularizers = NO_REGULARIZERS, desc: str = "train",
                    progress: bool | None = None, world: World = SOLO,
                    checkpointing: Checkpointing = NO_CHECKPOINTS) -> tuple[float, float]:
        return train_lm_epoch(model, optimizer, self.columns["train"], bptt=self.recipe.data.bptt, lr=lr,
                              regularizers=regularizers, desc=desc, progress=progress, world=world,
                              checkpointing=checkpointing)

    def evaluate(self, model: nn.Module, split: str) -> tuple[float, float]:
        return evaluate_lm_loss(model, self.columns[split], bptt=self.recipe.data.bptt)
