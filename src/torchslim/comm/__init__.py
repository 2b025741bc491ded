"""Gradient compression for distributed training: the TernGrad codec (ternarize, pack, decode)."""

from torchslim.comm.ternary import SCHEMES, pack, packed_numel, scaler, ternarize, unpack, unpack_sum

__all__ = ["SCHEMES", "pack", "packed_numel", "scaler", "ternarize", "unpack", "unpack_sum"]
