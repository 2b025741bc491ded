"""Gradient compression for distributed training: the TernGrad codec, its DDP communication hook and its state."""

from torchslim.comm.hooks import fp16_compress_hook, terngrad_hook
from torchslim.comm.state import TernGradState
from torchslim.comm.ternary import SCHEMES, pack, packed_numel, scaler, ternarize, unpack, unpack_sum

__all__ = [
    "SCHEMES",
    "TernGradState",
    "fp16_compress_hook",
    "pack",
    "packed_numel",
    "scaler",
    "ternarize",
    "terngrad_hook",
    "unpack",
    "unpack_sum",
]
