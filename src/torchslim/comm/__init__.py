"""Gradient compression for distributed training: the TernGrad codec and its DDP communication hook."""

from torchslim.comm.hooks import TernGradState, fp16_compress_hook, terngrad_hook
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
