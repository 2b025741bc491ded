"""torchslim: learn structured sparsity, then cut it out; low rank after force regularization;
ternary gradients for DDP.

The public API is what this module exports; everything else is private. The library core lives in
``structure`` (groups, tracing), ``regularize`` (GroupLasso, force), ``surgery`` (compact, lowrank),
``deploy`` (save, export, profile) and ``comm`` (TernGrad); the training app in ``torchslim.train``.
"""

from __future__ import annotations

import warnings
from typing import Any

from torchslim.comm import TernGradState, terngrad_hook
from torchslim.deploy.hf import pretrained_config, save_pretrained
from torchslim.deploy.profile import Profile, profile
from torchslim.deploy.serialize import export_onnx, load_compact, save_compact
from torchslim.errors import (
    CheckpointError,
    ConfigError,
    DatasetNotFound,
    DivergenceError,
    NondeterministicModel,
    ShapeMismatch,
    TorchSlimError,
    UnknownOpWarning,
    UnsupportedOperation,
    VerificationError,
)
from torchslim.layers import LoweredConv2d, LowRank
from torchslim.regularize.budget import SizeBudget
from torchslim.regularize.force import ForceRegularizer
from torchslim.regularize.lasso import L1, GroupLasso
from torchslim.regularize.masking import ZeroMask
from torchslim.structure.groups import Group
from torchslim.structure.report import SparsityReport, sparsity_report
from torchslim.structure.rules import register_op
from torchslim.structure.tracing import structures
from torchslim.surgery.compact import compact
from torchslim.surgery.lowrank import LowRankResult, lowrank
from torchslim.surgery.magnitude import magnitude_prune
from torchslim.surgery.verify import VerifyReport, verify

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DatasetNotFound",
    "DivergenceError",
    "ForceRegularizer",
    "Group",
    "GroupLasso",
    "L1",
    "LowRank",
    "LowRankResult",
    "LoweredConv2d",
    "NondeterministicModel",
    "Profile",
    "ShapeMismatch",
    "SizeBudget",
    "SparsityReport",
    "TernGradState",
    "TorchSlimError",
    "UnknownOpWarning",
    "UnsupportedOperation",
    "VerificationError",
    "VerifyReport",
    "ZeroMask",
    "compact",
    "export_onnx",
    "load_compact",
    "lowrank",
    "magnitude_prune",
    "pretrained_config",
    "profile",
    "register_op",
    "save_compact",
    "save_pretrained",
    "sparsity_report",
    "structures",
    "terngrad_hook",
    "verify",
]

_MOVED = {"distill_loss": "torchslim.train"}  # kept for one release


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        import importlib

        warnings.warn(f"torchslim.{name} moved to {_MOVED[name]}.{name}; the old name goes in the next release",
                      DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module 'torchslim' has no attribute {name!r}")
