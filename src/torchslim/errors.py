"""The library's exception and warning types: every error a user can cause is one of these."""

from __future__ import annotations


class TorchSlimError(Exception):
    """Base class of every error torchslim raises on purpose."""


class UnsupportedOperation(TorchSlimError):
    """A layer or operation whose channel semantics torchslim cannot follow."""


class ShapeMismatch(TorchSlimError, ValueError):
    """Inputs, parameters or checkpoints whose shapes do not fit the model."""


class VerificationError(TorchSlimError):
    """A transformed model whose outputs differ from the original's."""


class NondeterministicModel(VerificationError):
    """A model whose outputs differ between two calls on the same input, so no transformation can be checked."""


class DatasetNotFound(TorchSlimError, FileNotFoundError):
    """A dataset that is not where it was looked for."""


class CheckpointError(TorchSlimError):
    """A checkpoint that is corrupt, truncated or written for another model."""


class ConfigError(TorchSlimError, ValueError):
    """A recipe or an argument with a bad value."""


class DivergenceError(TorchSlimError):
    """A loss or weights that are NaN or infinite: training diverged (or the model came from a run that had)."""


class UnknownOpWarning(UserWarning):
    """Operations no rule covers pinned channels: they stay out of every group (``torchslim.register_op``)."""
