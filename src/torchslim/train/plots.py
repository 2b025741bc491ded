"""Pictures of learned structure and of a run's history, as PNG files (matplotlib, Agg backend).

* :func:`plot_structure`: (a) per conv/linear layer, the fraction of all-zero filters (rows of the
  lowered weight ``W: (N, C·kh·kw)``), input channels (column blocks) and shape fibers (columns);
  (b) conv1's surviving filters as the SSL paper draws them: one ``kh × kw`` kernel per filter, on one
  symmetric colour scale with a colour bar, exact zeros grey.
* :func:`plot_history`: test accuracy and sparsity per epoch over the phases of a run.

Figures are drawn without pyplot (no global backend, no windows), so this works on headless machines.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib
import numpy as np
import torch
from matplotlib.figure import Figure  # no pyplot: no global backend state, no windows, Agg for PNGs
from matplotlib.patches import Rectangle
from torch import Tensor, nn

from torchslim.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["LayerZeros", "layer_zeros", "plot_history", "plot_structure", "removed_channels"]

_PHASE_COLORS = {"baseline": "#dddddd", "ssl": "#fde7c8", "finetune": "#d6ecd2"}


@dataclass(frozen=True)
class LayerZeros:
    """All-zero structures of one layer's weight, SSL's per-layer (uncoupled) view."""

    name: str
    filters: float  # fraction of all-zero rows W[n]
    channels: float  # fraction of all-zero input channels W[:, c]
    shapes: float | None  # fraction of all-zero shape fibers W[:, c, i, j]; None for Linear and 1×1


def _weight_4d(module: nn.Module) -> Tensor | None:
    """The layer's weight as ``(N, C, kh, kw)`` (Linear: ``(N, C, 1, 1)``), or None if not a layer."""
    if isinstance(module, nn.Conv2d) and module.groups == 1:
        return module.weight.detach()
    if isinstance(module, nn.Linear):
        return module.weight.detach()[:, :, None, None]
    return None


def layer_zeros(model: nn.Module) -> list[LayerZeros]:
    """:class:`LayerZeros` of every ``Conv2d`` (groups=1) and ``Linear`` in ``model``, in order."""
    out = []
    for name, module in model.named_modules():
        w = _weight_4d(module)
        if w is None:
            continue
        nz = w != 0  # (N, C, kh, kw)
        kernel = w.shape[2] * w.shape[3]
        out.append(LayerZeros(
            name=name,
            filters=float((~nz.flatten(1).any(1)).float().mean()),
            channels=float((~nz.any(0).flatten(1).any(1)).float().mean()),
            shapes=float((~nz.any(0)).float().mean()) if kernel > 1 else None,
        ))
    return out


def _first_conv(model: nn.Module) -> tuple[str, Tensor] | None:
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and module.kernel_size[0] * module.kernel_size[1] > 1:
            return name, module.weight.detach()
    return None


def _plot_zero_bars(ax: Any, zeros: Sequence[LayerZeros]) -> None:
    """Grouped bars per layer; every bar is labelled, "0" for none zero and "n/a" where a kind does not apply
    (shape fibers of Linear and 1×1 layers), so an absent bar is never ambiguous."""
    names = [z.name for z in zeros]
    x = np.arange(len(zeros))
    width = 0.27
    series = [
        ("filters / rows", [z.filters for z in zeros], "#4c72b0"),
        ("channels / columns", [z.channels for z in zeros], "#dd8452"),
        ("shape fibers", [z.shapes for z in zeros], "#55a868"),
    ]
    for i, (label, values, color) in enumerate(series):
        heights = [100 * v if v is not None else 0.0 for v in values]
        bars = ax.bar(x + (i - 1) * width, heights, width, label=label, color=color)
        for bar, v in zip(bars, values):
            text = "n/a" if v is None else f"{100 * v:.0f}"
            ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                        fontsize=7, color="#888888" if v is None else "black")
    ax.set_xticks(x, names, rotation=30 if len(names) > 6 else 0, ha="right" if len(names) > 6 else "center")
    ax.set_ylim(0, 112)  # room for the labels and the legend above 100 %
    ax.set_yticks(range(0, 101, 20))
    ax.set_ylabel("all-zero (%)")
    ax.set_title("(a) learned structured sparsity per layer (n/a: the kind does not apply)")
    ax.legend(loc="upper left", fontsize=8, ncols=3)
    ax.grid(axis="y", alpha=0.3)


def removed_channels(model: nn.Module, example_inputs: Tensor, layer: str) -> set[int]:
    """Output channels of ``layer`` that compaction removes: the coupled channel is unread (its
    consumers' columns are zero) or silent (its producers are zero and zero stays zero downstream)."""
    from torchslim.structure.groups import families_of
    from torchslim.structure.tracing import structures

    dead: set[int] = set()
    groups = structures(model, example_inputs, kinds=("channel", "neuron"))
    for fam, members in families_of(groups).items():
        if fam.label.split("+")[0] != layer:
            continue
        has_in = any(s.role == "in" for s in fam.stripes)
        unread = fam.row_sq("in")[members] == 0 if has_in else torch.zeros(len(members), dtype=torch.bool)
        silent = (fam.row_sq("out")[members] == 0) & fam.zero_preserving
        dead |= {int(m) for m in members[unread | silent]}
    return dead


def _filter_images(w: Tensor, removed: set[int] = frozenset()) -> tuple[list[np.ndarray], list[int]]:
    """Kernels of the remaining filters, ``(kh, kw)`` each (channels > 1: the channel of largest norm)."""
    images, kept = [], []
    for n in range(w.shape[0]):
        f = w[n]  # (C, kh, kw)
        if n in removed or not bool(f.any()):
            continue
        c = int(f.flatten(1).norm(dim=1).argmax()) if f.shape[0] > 1 else 0
        images.append(f[c].float().numpy())
        kept.append(n)
    return images, kept


def _mosaic(images: Sequence[np.ndarray], cols: int, gap: int = 1) -> np.ndarray:
    """The kernels tiled ``cols`` per row with ``gap`` NaN pixels between them."""
    kh, kw = images[0].shape
    rows = math.ceil(len(images) / cols)
    out = np.full((rows * (kh + gap) - gap, cols * (kw + gap) - gap), np.nan)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        out[r * (kh + gap):r * (kh + gap) + kh, c * (kw + gap):c * (kw + gap) + kw] = im
    return out


_ZERO_COLOR = "#7f7f7f"  # exact zeros: grey, apart from the near-white of small weights


def _plot_filters(fig: Figure, ax: Any, name: str, w: Tensor, removed: set[int]) -> None:
    """conv1's remaining filters as a mosaic of kernels on one symmetric colour scale with a colour bar;
    exact zeros grey, gaps white."""
    images, kept = _filter_images(w, removed)
    unread = sum(1 for n in removed if bool(w[n].any()))  # non-zero filters whose channel nothing reads
    gone = f" (incl. {unread} non-zero: nothing reads their channel)" if unread else ""
    title = f"(b) {name}: {len(kept)} of {w.shape[0]} filters remain, {w.shape[0] - len(kept)} cut{gone}"
    if w.shape[1] > 1:
        title += f"; strongest of {w.shape[1]} input channels shown"
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    for side in ax.spines.values():
        side.set_visible(False)
    if not images:
        ax.text(0.5, 0.5, "all filters are zero", ha="center", va="center", transform=ax.transAxes)
        return
    kh, kw = images[0].shape
    cols = min(len(images), _MOSAIC_COLS)
    mosaic = _mosaic(images, cols)
    vmax = float(np.nanmax(np.abs(mosaic))) or 1.0
    gaps = ~np.isfinite(mosaic)
    ax.imshow(np.where(gaps, 1.0, 0.0), cmap=matplotlib.colors.ListedColormap(["white", "white"]),
              interpolation="nearest")
    ax.imshow(np.ma.masked_where(gaps | (mosaic != 0), np.zeros_like(mosaic)),
              cmap=matplotlib.colors.ListedColormap([_ZERO_COLOR]), interpolation="nearest")
    shown = ax.imshow(np.ma.masked_where(gaps | (mosaic == 0), mosaic), cmap="RdBu_r", vmin=-vmax, vmax=vmax,
                      interpolation="nearest")
    height, width = mosaic.shape
    # the colour bar and the zero swatch sit right of the kernels, inside this panel, so the panel above
    # keeps the full width
    bar = fig.colorbar(shown, cax=ax.inset_axes((width + 1, -0.5, 0.8, height), transform=ax.transData))
    bar.set_label("weight", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    ax.add_patch(Rectangle((width + 6, -0.5), 1, 1, color=_ZERO_COLOR, clip_on=False))
    ax.text(width + 7.5, 0, "exactly 0", va="center", fontsize=7)
    for i, n in enumerate(kept):
        r, c = divmod(i, cols)
        x0, y0 = c * (kw + 1) - 0.5, r * (kh + 1) - 0.5
        ax.add_patch(Rectangle((x0, y0), kw, kh, fill=False, lw=0.8, ec="#666666"))
        ax.text(x0 + kw / 2, y0 + kh + 0.05, f"#{n}", ha="center", va="top", fontsize=7)
    ax.set_xlim(-1, width + 14)  # a margin so the outer frames are not clipped; the colour bar's room
    ax.set_ylim(height + 0.8, -1)  # image rows downwards, room for the labels


_MOSAIC_COLS = 10


def plot_structure(
    model: nn.Module, path: str | Path, *, title: str | None = None, example_inputs: Tensor | None = None
) -> Path:
    """Write a PNG of ``model``'s learned structure: zero filters/channels/shapes per layer and conv1.

    Args:
        model: a model after SSL (the same architecture as the dense one, with learned zeros).
        path: the PNG to write; missing folders are created.
        title: a line above both panels.
        example_inputs: a batch the model accepts; with it, conv1's filters whose coupled channel
            compaction removes (e.g. because conv2 no longer reads it) are left out of panel (b) too.
    Returns:
        ``path``.
    Raises:
        ConfigError: ``model`` has no Conv2d or Linear layer.
    """
    return _save(_structure_figure(model, title, example_inputs), path)


def _structure_figure(model: nn.Module, title: str | None, example_inputs: Tensor | None) -> Figure:
    zeros = layer_zeros(model)
    if not zeros:
        raise ConfigError(f"{type(model).__name__} has no Conv2d or Linear layer to plot")
    conv = _first_conv(model)
    width = min(14.0, max(8.0, 0.5 * len(zeros) + 4))
    if conv is None:
        fig = Figure(figsize=(width, 4.5), layout="constrained")
        _plot_zero_bars(fig.subplots(), zeros)
    else:
        removed = removed_channels(model, example_inputs, conv[0]) if example_inputs is not None else set()
        shown = max(1, len(_filter_images(conv[1], removed)[0]))
        kh, kw = conv[1].shape[2:]
        rows, cols = math.ceil(shown / _MOSAIC_COLS), min(shown, _MOSAIC_COLS)
        # the mosaic's own aspect sizes its panel, so no band of empty figure is left below it
        mosaic_h = min(0.8 * width * rows * (kh + 1.4) / (cols * (kw + 1) + 15), 0.45 * width) + 0.5
        fig = Figure(figsize=(width, 4.2 + mosaic_h), layout="constrained")
        bar_ax, filter_ax = fig.subplots(2, 1, height_ratios=[4.2, mosaic_h])
        _plot_zero_bars(bar_ax, zeros)
        _plot_filters(fig, filter_ax, conv[0], conv[1], removed)
    if title:
        fig.suptitle(title)
    return fig


def _records(history: Sequence[Any]) -> list[Mapping[str, Any]]:
    return [dataclasses.asdict(r) if dataclasses.is_dataclass(r) else dict(r) for r in history]


def _shade_phases(ax: Any, records: Sequence[Mapping[str, Any]]) -> None:
    """Background bands with the phase names, one per run of equal ``phase``."""
    start = 0
    for i in range(1, len(records) + 1):
        if i == len(records) or records[i]["phase"] != records[start]["phase"]:
            phase = records[start]["phase"]
            ax.axvspan(start + 0.5, i + 0.5, color=_PHASE_COLORS.get(phase, "#eeeeee"), alpha=0.6, lw=0)
            ax.text((start + i + 1) / 2, 1.01, phase, transform=ax.get_xaxis_transform(),
                    ha="center", va="bottom", fontsize=8)
            start = i


def plot_history(history: Sequence[Any], path: str | Path, *, title: str | None = None) -> Path:
    """Write a PNG of test accuracy, sparsity and, when recorded, groups alive per layer, per epoch.

    Args:
        history: :class:`torchslim.train.engine.EpochRecord` s or their dicts, in training order; each has
            ``phase``, ``test_acc``, ``train_acc``, ``density`` and ``zero_fraction`` (kind → fraction),
            and may have ``alive`` ("layer:kind" → non-zero groups; ISS's components alive per layer).
        path: the PNG to write.
    Raises:
        ConfigError: an empty history.
    """
    records = _records(history)
    if not records:
        raise ConfigError("the history is empty: train at least one epoch before plotting it")
    x = np.arange(1, len(records) + 1)
    families = sorted({k for r in records for k in r.get("alive") or {}})
    fig = Figure(figsize=(16 if families else 11, 4), layout="constrained")
    axes = fig.subplots(1, 3 if families else 2)
    acc_ax, sp_ax = axes[0], axes[1]
    for ax in axes:
        _shade_phases(ax, records)
        ax.set_xlabel("epoch (all phases)")
        ax.set_xlim(0.5, len(records) + 0.5)
        ax.grid(alpha=0.3)
    acc_ax.plot(x, [100 * r["test_acc"] for r in records], "o-", label="test")
    acc_ax.plot(x, [100 * r["train_acc"] for r in records], "s--", alpha=0.7, label="train")
    acc_ax.set_ylabel("accuracy (%)")
    acc_ax.legend(loc="lower right", fontsize=8)
    sp_ax.plot(x, [100 * (1 - r["density"]) for r in records], "o-", color="black",
               label="zero weights (% of dense)")
    kinds = sorted({k for r in records for k in r.get("zero_fraction", {})})
    for kind in kinds:
        ys = [100 * r["zero_fraction"][kind] if kind in r.get("zero_fraction", {}) else np.nan for r in records]
        sp_ax.plot(x, ys, ".-", label=f"all-zero {kind} groups")
    sp_ax.set_ylabel("%")
    sp_ax.set_ylim(-2, 102)
    sp_ax.legend(loc="upper left", fontsize=8)
    if families:
        alive_ax = axes[2]
        for fam in families:
            alive_ax.plot(x, [(r.get("alive") or {}).get(fam, np.nan) for r in records], ".-", label=fam)
        alive_ax.set_ylabel("groups alive (not all zero)")
        alive_ax.legend(loc="upper right", fontsize=7)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    log.info("wrote %s", path)
    return path
