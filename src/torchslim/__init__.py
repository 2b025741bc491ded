"""torchslim: learn structured sparsity, then cut it out; low rank after force regularization;
ternary gradients for DDP.

The public API is what this module exports; everything else is private.
"""

from torchslim.errors import (
    CheckpointError,
    ConfigError,
    DatasetNotFound,
    ShapeMismatch,
    TorchSlimError,
    UnsupportedOperation,
    VerificationError,
)
from torchslim.comm import TernGradState, terngrad_hook
from torchslim.compaction import VerifyReport, compact, verify
from torchslim.distill import distill_loss
from torchslim.force import ForceRegularizer
from torchslim.groups import Group
from torchslim.lasso import L1, GroupLasso
from torchslim.layers import LoweredConv2d
from torchslim.lowrank import LowRank, LowRankResult, lowrank
from torchslim.magnitude import magnitude_prune
from torchslim.masking import ZeroMask
from torchslim.report import SparsityReport, sparsity_report
from torchslim.tracing import structures

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DatasetNotFound",
    "ForceRegularizer",
    "Group",
    "GroupLasso",
    "L1",
    "LowRank",
    "LowRankResult",
    "LoweredConv2d",
    "ShapeMismatch",
    "SparsityReport",
    "TernGradState",
    "TorchSlimError",
    "UnsupportedOperation",
    "VerificationError",
    "VerifyReport",
    "ZeroMask",
    "compact",
    "distill_loss",
    "lowrank",
    "magnitude_prune",
    "sparsity_report",
    "structures",
    "terngrad_hook",
    "verify",
]
