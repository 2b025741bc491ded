"""Profile a model: parameters, multiply-accumulates per layer (:mod:`torchslim.macs`), and CPU latency."""

from __future__ import annotations

import logging
import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from torchslim._deprecate import renamed_kwargs
from torchslim._inputs import Inputs, as_tuple, eval_mode
from torchslim.errors import ConfigError, ShapeMismatch
from torchslim.macs import LayerProfile, MacCounter

logger = logging.getLogger(__name__)

__all__ = ["LayerProfile", "Profile", "compare", "machine_info", "profile"]


@dataclass(frozen=True)
class Profile:
    """What :func:`profile` measured; latencies are ``None`` when ``latency=False``."""

    params: int
    macs: int                       # per sample, sum over ``layers``
    layers: tuple[LayerProfile, ...]
    latency_ms: float | None        # median of the timed forward passes
    latency_p10_ms: float | None
    latency_p90_ms: float | None
    threads: int                    # torch intra-op threads during the measurement
    batch_size: int                 # dim ``batch_dim`` of the first input


def _sync(inputs: tuple[Tensor, ...]) -> None:
    if any(x.is_cuda for x in inputs):
        torch.cuda.synchronize()


def _time_forward(model: nn.Module, inputs: tuple[Tensor, ...], repeats: int, warmup: int) -> list[float]:
    """Wall-clock milliseconds of ``repeats`` forward passes after ``warmup`` untimed ones."""
    for _ in range(warmup):
        model(*inputs)
    times = []
    for _ in range(repeats):
        _sync(inputs)
        start = time.perf_counter()
        model(*inputs)
        _sync(inputs)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def _check_args(
    inputs: tuple[Tensor, ...], threads: int | None, repeats: int, warmup: int, batch_dim: int
) -> None:
    if not inputs or not -inputs[0].dim() <= batch_dim < inputs[0].dim():
        shape = tuple(inputs[0].shape) if inputs else None
        raise ShapeMismatch(f"profile needs an input tensor with a batch dimension {batch_dim}, got shape {shape}")
    if threads is not None and threads < 1:
        raise ConfigError(f"threads must be >= 1 or None (keep torch's setting), got {threads}")
    if repeats < 1 or warmup < 0:
        raise ConfigError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")


@renamed_kwargs(inputs="example_inputs")
def profile(
    model: nn.Module,
    example_inputs: Inputs,
    *,
    threads: int | None = 1,
    repeats: int = 20,
    warmup: int = 3,
    latency: bool = True,
    batch_dim: int = 0,
) -> Profile:
    """Count parameters and per-sample MACs of ``model`` on ``example_inputs`` and time its forward pass.

    Runs in eval mode under ``torch.inference_mode``; the model's training flags and torch's thread
    count are restored afterwards.

    Args:
        model: any module; called as ``model(*example_inputs)``.
        example_inputs: a tensor ``(B, ...)`` or a sequence of tensors; ``B`` (``batch_dim`` of the first) is
            the batch. (``inputs=`` is the deprecated name.)
        threads: intra-op threads during the measurement (``torch.set_num_threads``); ``None`` keeps
            the current setting. One thread gives the most repeatable CPU latencies.
        repeats: timed forward passes; the latency is their median.
        warmup: untimed forward passes before timing.
        latency: whether to time at all (MACs and parameters only when ``False``).
        batch_dim: the batch dimension of the first input (``1`` for a sequence-first ``(T, B, in)`` RNN).
    Returns:
        a :class:`Profile`; ``macs`` and every ``LayerProfile.macs`` are per sample.
    Raises:
        ConfigError: ``threads < 1``, ``repeats < 1`` or ``warmup < 0``.
        ShapeMismatch: no input tensor with a batch dimension.
    """
    inputs = as_tuple(example_inputs)
    _check_args(inputs, threads, repeats, warmup, batch_dim)
    batch_size = int(inputs[0].shape[batch_dim])
    previous_threads = torch.get_num_threads()
    counter = MacCounter(model)
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        used_threads = torch.get_num_threads()
        with eval_mode(model), torch.inference_mode():
            model(*inputs)
            counter.remove()
            times = _time_forward(model, inputs, repeats, warmup) if latency else []
    finally:
        counter.remove()
        torch.set_num_threads(previous_threads)
    layers = counter.layers(batch_size)
    p10, median, p90 = _percentiles(times)
    result = Profile(
        params=sum(p.numel() for p in model.parameters()),
        macs=sum(layer.macs for layer in layers),
        layers=layers,
        latency_ms=median,
        latency_p10_ms=p10,
        latency_p90_ms=p90,
        threads=used_threads,
        batch_size=batch_size,
    )
    logger.debug("profiled %s: %d params, %d MACs/sample, %s ms", type(model).__name__, result.params,
                 result.macs, median)
    return result


def _percentiles(times: list[float]) -> tuple[float | None, float | None, float | None]:
    """``(p10, median, p90)`` of ``times``; all ``None`` when empty."""
    if not times:
        return None, None, None
    if len(times) == 1:
        return times[0], times[0], times[0]
    deciles = statistics.quantiles(times, n=10, method="inclusive")  # 9 cut points
    return deciles[0], statistics.median(times), deciles[-1]


def _match(name: str, dense_names: set[str]) -> str:
    """The dense layer a compact layer stands for: the longest prefix path of ``name`` among them.

    A conv replaced by ``Sequential(ZeroPad2d, Conv2d)`` at ``conv1`` appears as ``conv1.0`` and
    ``conv1.1``; both count towards ``conv1``. Unmatched names stand for themselves.
    """
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in dense_names:
            return prefix
    return name


def _fmt_ratio(num: float | None, den: float | None) -> str:
    return f"{num / den:.3f}" if num is not None and den else "-"


def _fmt_int(n: int | None) -> str:
    return f"{n:,}" if n is not None else "-"


def _fmt_ms(ms: float | None) -> str:
    return f"{ms:.3f}" if ms is not None else "-"


def compare(dense: Profile, compact: Profile) -> str:
    """A plain-text table of MACs per layer, then totals: params, MACs, latency and speedup.

    ``ratio`` is compact / dense (``0.250`` = a quarter of the work); ``speedup`` is dense latency /
    compact latency. Layers with zero MACs in both profiles are left out.
    """
    dense_macs = {layer.name: layer.macs for layer in dense.layers}
    compact_macs: dict[str, int] = {}
    for layer in compact.layers:
        key = _match(layer.name, set(dense_macs))
        compact_macs[key] = compact_macs.get(key, 0) + layer.macs
    names = list(dense_macs) + [n for n in compact_macs if n not in dense_macs]
    width = max([len("layer")] + [len(n) for n in names])
    rows = [f"{'layer':<{width}}  {'MACs dense':>14}  {'MACs compact':>14}  {'ratio':>7}"]
    for name in names:
        d, c = dense_macs.get(name), compact_macs.get(name, 0)
        if not d and not c:
            continue
        rows.append(f"{name:<{width}}  {_fmt_int(d):>14}  {_fmt_int(c):>14}  {_fmt_ratio(c, d):>7}")
    rows.append("")
    rows.append(f"{'total':<{width}}  {'dense':>14}  {'compact':>14}  {'ratio':>7}")
    totals = [
        ("params", dense.params, compact.params, _fmt_int),
        ("MACs", dense.macs, compact.macs, _fmt_int),
        ("latency ms", dense.latency_ms, compact.latency_ms, _fmt_ms),
    ]
    for label, d, c, fmt in totals:
        rows.append(f"{label:<{width}}  {fmt(d):>14}  {fmt(c):>14}  {_fmt_ratio(c, d):>7}")
    speedup = _fmt_ratio(dense.latency_ms, compact.latency_ms)
    rows.append(f"speedup {speedup}x (batch {compact.batch_size}, {compact.threads} thread(s))")
    if (dense.threads, dense.batch_size) != (compact.threads, compact.batch_size):
        rows.append(
            f"warning: measured under different settings (dense: batch {dense.batch_size}, "
            f"{dense.threads} thread(s)); the speedup is not like for like"
        )
    return "\n".join(rows)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """The machine a benchmark ran on: CPU model, core count, torch version and thread count."""
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
