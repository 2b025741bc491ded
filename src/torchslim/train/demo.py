"""The table `torchslim demo` prints: accuracy, structure per layer, multiply-adds, parameters and CPU latency
of the dense, SSL and compact models, with one number format throughout (thousands separators, as
``torchslim profile``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from torchslim.deploy.profile import machine_info, profile
from torchslim.train.progress import duration

__all__ = ["Measured", "demo_table", "measure", "percent"]


@dataclass
class Measured:
    """Parameters, MACs and latency of the dense and compact models, as the demo table shows them."""

    threads: int
    params: dict[str, int]  # dense, ssl (non-zero), compact
    macs: dict[str, int]  # per image: dense, ssl (live rows x live columns), compact
    latency_ms: dict[int, tuple[float, float]]  # batch -> (dense, compact)
    cpu: str

    def as_dict(self) -> dict:
        return {"threads": self.threads, "params": self.params, "macs": self.macs, "cpu": self.cpu,
                "latency_ms": {str(b): {"dense": d, "compact": c} for b, (d, c) in self.latency_ms.items()}}


def measure(result, *, threads: int, batches: Sequence[int] = (1, 64)) -> Measured:
    dense, small = result.dense_model, result.compact_model
    latency = {}
    for b in batches:
        x = torch.randn(b, *result.example.shape[1:], generator=torch.Generator().manual_seed(b))
        repeats = 200 if b == 1 else 30
        d = profile(dense, x, threads=threads, repeats=repeats, warmup=5)
        c = profile(small, x, threads=threads, repeats=repeats, warmup=5)
        latency[b] = (d.latency_ms, c.latency_ms)
    x1 = result.example[:1]
    pd, pc = profile(dense, x1, latency=False), profile(small, x1, latency=False)
    with torch.no_grad():
        ssl_params = sum(int(torch.count_nonzero(p)) for p in result.sparse_model.parameters())
    return Measured(
        threads=threads, latency_ms=latency, cpu=machine_info()["cpu"],
        params={"dense": pd.params, "ssl": ssl_params, "compact": pc.params},
        macs={"dense": pd.macs, "ssl": result.report.macs_sparse, "compact": pc.macs},
    )


def _layer_weight(model: nn.Module, name: str) -> torch.Tensor | None:
    """The (lowered) weight that stands for layer ``name`` in a compact model: Conv2d, Linear or
    LoweredConv2d, possibly inside a ``Sequential(ZeroPad2d, conv)`` put in its place."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        return None
    if isinstance(module, nn.Sequential):
        module = module[-1]
    w = getattr(module, "weight", None)
    return w.detach() if isinstance(w, torch.Tensor) else None


def _structure_rows(result) -> list[tuple[str, str, str, str]]:
    rows = []
    for layer in result.report.layers:
        conv = layer.type == "Conv2d"
        w = _layer_weight(result.compact_model, layer.name)
        small = (w.shape[0], w.shape[1], w.flatten(1).shape[1]) if w is not None and w.dim() == 4 else \
            (w.shape[0], None, w.shape[1]) if w is not None else (None, None, None)
        if conv:
            rows.append((f"{layer.name} filters", _n(layer.filters_total), _n(layer.filters_alive), _n(small[0])))
            rows.append((f"{layer.name} channels", _n(layer.channels_total), _n(layer.channels_alive),
                         _n(small[1] if small[1] is not None else layer.channels_alive)))
            rows.append((f"{layer.name} filter size (C·kh·kw)", _n(layer.shape_total), _n(layer.shape_alive),
                         _n(small[2])))
        else:
            rows.append((f"{layer.name} neurons", _n(layer.filters_total), _n(layer.filters_alive), _n(small[0])))
            rows.append((f"{layer.name} inputs", _n(layer.channels_total), _n(layer.channels_alive), _n(small[2])))
    return rows


def demo_table(result, m: Measured) -> str:
    acc = result.accuracy
    epochs = {p: getattr(result.recipe, p).epochs for p in ("baseline", "ssl", "finetune")}
    header = ("", "dense", "SSL (zeros)", "compact+FT", "change")
    rows: list[tuple[str, ...]] = [header]
    rows.append(("test accuracy", percent(acc.get("baseline")), percent(acc.get("ssl")), percent(acc.get("finetune")),
                 _pts(acc.get("finetune"), acc.get("baseline"))))
    rows += [r + ("",) for r in _structure_rows(result)]
    rows.append(("MACs per image", _n(m.macs["dense"]), _n(m.macs["ssl"]), _n(m.macs["compact"]),
                 _ratio(m.macs["dense"], m.macs["compact"], "fewer")))
    rows.append(("parameters", _n(m.params["dense"]), _n(m.params["ssl"]) + " nz", _n(m.params["compact"]),
                 _ratio(m.params["dense"], m.params["compact"], "fewer")))
    for b, (d, c) in m.latency_ms.items():
        rows.append((f"CPU latency, batch {b}", _ms(d), "= dense", _ms(c), _ratio(d, c, "speedup")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    rule = "  ".join("-" * w for w in widths)
    lines = [
        f"torchslim demo: {result.recipe.model.name} on {result.recipe.data.name}, recipe {result.recipe.name} "
        f"(epochs: baseline {epochs['baseline']}, SSL {epochs['ssl']}, fine-tune {epochs['finetune']}), "
        f"took {duration(result.seconds)}",
        rule,
    ]
    for i, r in enumerate(rows):
        lines.append("  ".join([r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]))
        if i == 0:
            lines.append(rule)
    lines.append(rule)
    lines.append(
        "SSL: the model after group Lasso, before compaction: non-zero rows/columns of each layer (it still "
        "runs dense).\ncompact+FT: the physically smaller model after fine-tuning; compaction also cuts a "
        "filter whose channel the next layer no longer reads. A filter size can exceed SSL's count: the "
        "kernel is cropped to the smallest rectangle that holds every non-zero position, and zero positions "
        "inside it stay.\n"
        f"Accuracy of the compact model before fine-tuning: {percent(acc.get('compact'))}. Latency: median "
        f"forward time on {m.cpu}, {m.threads} thread{'s' if m.threads != 1 else ''}, torch {torch.__version__}."
    )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# small helpers


def _n(v: int | None) -> str:
    """An integer with thousands separators, as ``torchslim profile`` prints it."""
    return "-" if v is None else f"{v:,}"


def percent(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def _pts(new: float | None, old: float | None) -> str:
    return "" if new is None or old is None else f"{100 * (new - old):+.2f} pts"


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f} ms"


def _ratio(dense: float | None, small: float | None, word: str) -> str:
    if not dense or not small:
        return ""
    return "none removed" if word == "fewer" and dense == small else f"{dense / small:.2f}x {word}"
