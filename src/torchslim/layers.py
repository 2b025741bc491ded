"""The layers torchslim emits besides torch.nn's: a convolution lowered to a column-gathered GEMM
(:class:`LoweredConv2d`, from shape sparsity), a layer split in two (:class:`LowRank`, from :func:`lowrank`)
a LayerNorm whose zero channels were cut (:class:`PaddedLayerNorm`, from channel compaction), a
weight-standardized convolution whose zero input columns were cut (:class:`PaddedStdConv`, likewise) and an
``nn.MultiheadAttention`` whose heads or width were cut (:class:`NarrowMultiheadAttention`).


SSL's shape-wise sparsity zeroes columns of the lowered weight matrix ``W: (N, C*kh*kw)`` (the
paper's ``LOWERED_CCNMM``). Where the zero columns are not whole kernel rows or columns (which
shrink an ordinary ``Conv2d``), this layer keeps only the ``K`` live columns: unfold, gather, matmul.
"""

from __future__ import annotations

import math
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


class NarrowMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` (self- or cross-attention, packed ``in_proj``) whose ``num_heads · head_dim`` need
    not equal ``embed_dim``: what compaction puts in place of one whose heads or width were cut.

    The same parameters (``in_proj_weight (3·H·D, E)``, ``in_proj_bias (3·H·D,)``, ``out_proj: Linear(H·D, E)``),
    the same call (``query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights,
    is_causal``; boolean masks are True where attention is *not* allowed, float masks are added) and the same
    returns (``(output, weights or None)``), computed with standard ops (``F.scaled_dot_product_attention``
    where the weights are not asked for).

    Args:
        embed_dim: ``E``, the width of the inputs and of the output.
        num_heads, head_dim: ``H`` and ``D``.
        bias, batch_first, dropout: as ``nn.MultiheadAttention``'s.
    """

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, bias: bool = True, batch_first: bool = False,
                 dropout: float = 0.0) -> None:
        super().__init__()
        inner = num_heads * head_dim
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.batch_first, self.dropout = batch_first, dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * inner, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * inner)) if bias else None
        self.out_proj = nn.Linear(inner, embed_dim, bias=bias)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = (t.unsqueeze(0 if self.batch_first else 1) for t in (query, key, value))
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        (b, n, _), s, h, d = query.shape, key.shape[1], self.num_heads, self.head_dim
        w, bias = self.in_proj_weight.chunk(3), (None,) * 3 if self.in_proj_bias is None else self.in_proj_bias.chunk(3)
        q, k, v = (F.linear(t, w[i], bias[i]).view(b, -1, h, d).transpose(1, 2) for i, t in enumerate((query, key,
                                                                                                          value)))
        mask = _attention_mask(attn_mask, key_padding_mask, b, h, n, s, q.dtype, is_causal)
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = q @ k.transpose(-2, -1) / math.sqrt(d)
            attn = torch.softmax(scores if mask is None else scores + mask, dim=-1)
            out = F.dropout(attn, p) @ v
            weights = attn.mean(1) if average_attn_weights else attn
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        out = self.out_proj(out.transpose(1, 2).reshape(b, n, h * d))
        if not self.batch_first:
            out = out.transpose(0, 1)
        if unbatched:
            out = out.squeeze(0 if self.batch_first else 1)
            weights = None if weights is None else weights.squeeze(0)
        return out, weights

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
                f"batch_first={self.batch_first}, bias={self.in_proj_bias is not None}")


def _attention_mask(attn_mask: Tensor | None, key_padding_mask: Tensor | None, b: int, h: int, n: int, s: int,
                    dtype: torch.dtype, is_causal: bool) -> Tensor | None:
    """``nn.MultiheadAttention``'s masks as one additive float mask ``(b or 1, h or 1, n, s)``, or None.

    ``attn_mask``: ``(n, s)`` or ``(b·h, n, s)``; ``key_padding_mask``: ``(b, s)``; boolean ones are True where
    attention is not allowed. ``is_causal`` without ``attn_mask``: a causal mask.
    """
    def additive(m: Tensor) -> Tensor:
        return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, float("-inf")) \
            if m.dtype == torch.bool else m.to(dtype)

    mask = None
    if attn_mask is not None:
        mask = additive(attn_mask)
        mask = mask.view(b, h, n, s) if mask.dim() == 3 else mask.view(1, 1, n, s)
    elif is_causal:
        mask = additive(torch.ones(n, s, dtype=torch.bool).triu(1)).view(1, 1, n, s)
    if key_padding_mask is not None:
        pad = additive(key_padding_mask).view(b, 1, 1, s)
        mask = pad if mask is None else mask + pad
    return mask
