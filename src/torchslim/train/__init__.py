"""The training app on top of the library: recipes (YAML) → baseline → SSL/ISS → compact → fine-tune.

It stands on the core (``structure``, ``regularize``, ``surgery``, ``deploy``, ``comm``); nothing in
the core imports it.
"""

from torchslim.train.distill import distill_loss

__all__ = ["distill_loss"]
