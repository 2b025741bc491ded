"""The layers torchslim emits besides torch.nn's: a convolution lowered to a column-gathered GEMM
(:class:`LoweredConv2d`, from shape sparsity), a layer split in two (:class:`LowRank`, from :func:`lowrank`)
a LayerNorm whose zero channels were cut (:class:`PaddedLayerNorm`, from channel compaction) and a
weight-standardized convolution whose zero input columns were cut (:class:`PaddedStdConv`, likewise).


SSL's shape-wise sparsity zeroes columns of the lowered weight matrix ``W: (N, C*kh*kw)`` (the
paper's ``LOWERED_CCNMM``). Where the zero columns are not whole kernel rows or columns (which
shrink an ordinary ``Conv2d``), this layer keeps only the ``K`` live columns: unfold, gather, matmul.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class LoweredConv2d(nn.Module):
    """``Conv2d`` computed as ``W[:, columns] @ unfold(x)[:, columns]``.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation: as ``nn.Conv2d``
            (``groups=1``, zero padding).
        columns: LongTensor ``(K,)``, the live columns of the lowered weight, indices into
            ``C * kh * kw`` in ``Conv2d.weight.flatten(1)`` order.
        bias: whether the layer has a bias.

    Shapes: ``weight (out_channels, K)``, input ``(B, C, H, W)``, output ``(B, out_channels, H', W')``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        columns: Tensor,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride)
        self.padding, self.dilation = _pair(padding), _pair(dilation)
        self.register_buffer("columns", torch.as_tensor(columns, dtype=torch.long).clone())
        self.weight = nn.Parameter(torch.empty(out_channels, len(self.columns)))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, columns: Tensor) -> "LoweredConv2d":
        """The lowered form of ``conv`` keeping ``columns`` of ``conv.weight.flatten(1)``."""
        layer = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, columns,
            conv.stride, conv.padding, conv.dilation, bias=conv.bias is not None,
        )
        with torch.no_grad():
            layer.weight.copy_(conv.weight.flatten(1)[:, layer.columns])
            if conv.bias is not None:
                layer.bias.copy_(conv.bias)
        return layer.to(conv.weight.device)

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
        h_out = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        w_out = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        cols = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)  # (B, C*kh*kw, L)
        cols = cols.index_select(1, self.columns)  # (B, K, L)
        y = torch.matmul(self.weight, cols)  # (B, N, L)
        if self.bias is not None:
            y = y + self.bias[:, None]
        return y.view(b, self.out_channels, h_out, w_out)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"columns={len(self.columns)}/{self.in_channels * self.kernel_size[0] * self.kernel_size[1]}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}"
        )


class LowRank(nn.Sequential):
    """``first`` (basis filters: C → r·g, the original kernel, no bias) then ``second`` (r·g → N, bias).

    A plain ``nn.Sequential`` forward, so tracing sees two standard layers and compact checkpoints
    describe it; its own class marks the intermediate channels as rank groups.
    """

    def __init__(self, first: nn.Module, second: nn.Module) -> None:
        super().__init__(first, second)

    @property
    def rank(self) -> int:
        """Components per group, ``r``."""
        second = self[1]
        return second.in_features if isinstance(second, nn.Linear) else second.in_channels // second.groups


def is_rank_family(model: nn.Module, producers: Sequence[str]) -> bool:
    """Whether channels produced by ``producers`` (module paths) are the ranks of :class:`LowRank` layers:
    every producer is the ``first`` child of a ``LowRank`` (or inside it, e.g. a cropped kernel)."""
    return bool(producers) and all(_in_first_of_lowrank(model, p) for p in producers)


def _in_first_of_lowrank(model: nn.Module, path: str) -> bool:
    parts = path.split(".")
    for i, part in enumerate(parts):
        if part == "0":
            try:
                if isinstance(model.get_submodule(".".join(parts[:i])), LowRank):
                    return True
            except AttributeError:  # an RNN producer "lstm.l0" is no module path
                return False
    return False


def padded_layer_norm(x: Tensor, full: int, weight: Tensor, bias: Tensor | None, eps: float, dim: int = -1) -> Tensor:
    """LayerNorm over ``dim`` of ``x`` as if it had ``full`` entries there, the missing ones exactly zero.

    With ``C = full`` and ``C'`` kept entries ``x_k`` (the cut ones were 0)::

        μ  = Σ_k x_k / C
        σ² = (Σ_k (x_k − μ)² + (C − C')·μ²) / C      each cut entry adds (0 − μ)²
        y_k = γ_k·(x_k − μ)/sqrt(σ² + ε) + β_k

    which is ``F.layer_norm`` over the ``C`` entries at the kept ones (two passes, as stable as it).

    Args:
        x: ``(*, C', *)`` with the normalized dim at ``dim``.
        full: ``C``, the entries the statistics are over.
        weight, bias: γ, β ``(C',)`` (``bias`` may be None).
        eps: ε of the original LayerNorm.
        dim: the normalized dimension (``-1``: features last; ``1``: channels of ``(B, C, H, W)``).
    Returns:
        ``y``, the shape of ``x``.
    """
    kept = x.shape[dim]
    mean = x.sum(dim, keepdim=True) / full
    centered = x - mean
    var = (centered.square().sum(dim, keepdim=True) + (full - kept) * mean.square()) / full
    y = centered * torch.rsqrt(var + eps)
    trailing = (1,) * (x.dim() - dim % x.dim() - 1)  # γ (C',) lined up with dim: (C', 1, 1) for channels first
    y = y * weight.reshape(kept, *trailing)
    return y if bias is None else y + bias.reshape(kept, *trailing)


torch.fx.wrap("padded_layer_norm")  # one call in a traced graph, which the norm rules know


class PaddedLayerNorm(nn.Module):
    """A LayerNorm over ``kept`` entries whose statistics count ``full``: the ``full − kept`` cut ones were zero.

    What compaction puts in place of an ``nn.LayerNorm`` (or timm's ``LayerNorm``/``LayerNorm2d``) after
    cutting zero channels: a standard LayerNorm over the kept ones would change μ and σ. See
    :func:`padded_layer_norm` for the maths; standard ops only, so it exports to ONNX.

    Args:
        kept: ``C'``, the entries left; ``weight`` and ``bias`` are ``(C',)``.
        full: ``C``, the entries the original LayerNorm normalized.
        eps: its ε.
        bias: whether it has β.
        dim: the normalized dimension of the input (``-1``: ``(*, C')``; ``1``: ``(B, C', H, W)``).
    """

    def __init__(self, kept: int, full: int, eps: float = 1e-5, bias: bool = True, dim: int = -1) -> None:
        super().__init__()
        if not 0 < kept <= full:
            raise ValueError(f"PaddedLayerNorm needs 0 < kept <= full, got kept={kept}, full={full}")
        self.full, self.eps, self.dim = full, eps, dim
        self.weight = nn.Parameter(torch.ones(kept))
        self.bias = nn.Parameter(torch.zeros(kept)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return padded_layer_norm(x, self.full, self.weight, self.bias, self.eps, self.dim)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]} of {self.full}, eps={self.eps}, dim={self.dim}, bias={self.bias is not None}"


def padded_std_conv(x: Tensor, weight: Tensor, bias: Tensor | None, gain: Tensor | None, scale: float, full: int,
                    eps: float, stride: Any = 1, padding: Any = 0, dilation: Any = 1) -> Tensor:
    """A weight-standardized convolution whose filters are standardized over ``full`` inputs, the missing ones 0.

    Each filter ``w[o]`` (``n`` kept entries of an original fan-in ``N = full``; the cut ones were 0) becomes::

        μ_o  = Σ w[o] / N
        σ²_o = (Σ (w[o] − μ_o)² + (N − n)·μ_o²) / N
        ŵ[o] = g[o]·scale·(w[o] − μ_o)/sqrt(σ²_o + ε)

    which is timm's ``StdConv2d``/``ScaledStdConv2d`` standardization (``F.batch_norm`` over the filter) over
    the ``N`` entries, at the kept ones; then ``conv(x, ŵ, bias)``.

    Args:
        x: ``(B, C', *spatial)``.
        weight: ``(O, C', *k)``; bias ``(O,)`` or None; gain ``g``: ``O`` entries in any shape, or None.
        scale, eps: the gain's constant factor and ε of the original layer.
        full: ``N``, the fan-in the statistics are over.
    Returns:
        ``(B, O, *spatial')``.
    """
    flat = weight.flatten(1)
    mean = flat.sum(1, keepdim=True) / full
    centered = flat - mean
    var = (centered.square().sum(1, keepdim=True) + (full - flat.shape[1]) * mean.square()) / full
    w = centered * torch.rsqrt(var + eps)
    if gain is not None:
        w = w * gain.reshape(-1, 1)
    w = (w * scale).reshape(weight.shape)
    conv = (F.conv1d, F.conv2d, F.conv3d)[weight.dim() - 3]
    return conv(x, w, bias, stride, padding, dilation)


torch.fx.wrap("padded_std_conv")  # one call in a traced graph, which the conv rules know


class PaddedStdConv(nn.Module):
    """A weight-standardized conv (timm's ``StdConv2d``, ``ScaledStdConv2d``) after its zero input columns were cut.

    A standard layer over the kept columns would standardize each filter over fewer entries and change it;
    this one counts the original fan-in (:func:`padded_std_conv`). Standard ops only, so it exports to ONNX.

    Args:
        weight: the cut filters ``(O, C', *k)`` (the Parameter is kept); bias ``(O,)``, gain (``O`` entries):
            Parameters or None.
        scale, eps: the gain's constant factor and ε of the layer it replaces.
        full: the original fan-in ``C·Πk``.
        stride, padding, dilation: as the layer it replaces (``groups == 1``).
    """

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, gain: nn.Parameter | None, scale: float,
                 eps: float, full: int, stride: Any = 1, padding: Any = 0, dilation: Any = 1) -> None:
        super().__init__()
        if not 0 < weight[0].numel() <= full:
            raise ValueError(f"PaddedStdConv needs 0 < fan-in <= full, got {weight[0].numel()} of {full}")
        self.weight, self.bias, self.gain = weight, bias, gain
        self.scale, self.eps, self.full = float(scale), float(eps), int(full)
        self.stride, self.padding, self.dilation = stride, padding, dilation

    @property
    def in_channels(self) -> int:
        return int(self.weight.shape[1])

    @property
    def out_channels(self) -> int:
        return int(self.weight.shape[0])

    def forward(self, x: Tensor) -> Tensor:
        return padded_std_conv(x, self.weight, self.bias, self.gain, self.scale, self.full, self.eps, self.stride,
                               self.padding, self.dilation)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={tuple(self.weight.shape[2:])}, "
                f"fan-in {self.weight[0].numel()} of {self.full}, stride={self.stride}, padding={self.padding}, "
                f"eps={self.eps}, gain={self.gain is not None}")
