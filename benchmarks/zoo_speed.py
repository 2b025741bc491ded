"""torchvision models at half width: dense vs compact CPU latency, and the speed of torchslim itself.

    python benchmarks/zoo_speed.py [--models resnet18 resnet50 mobilenet_v2]
    python benchmarks/zoo_speed.py --smoke    # resnet18 at 64×64, 3 repeats: results/zoo_speed_smoke.json

Each model (``weights=None``, ``torch.manual_seed(0)``, eval mode) loses the lowest-norm half of every
channel family that :func:`torchslim.structures` finds (``Group.zero_()``, a uniform width cut), and
:func:`torchslim.compact` cuts them out. Dense and compact are then timed in alternation with 1 and 2
threads at batch 1 and 8: in PyTorch eager (``torch.inference_mode``), in PyTorch with
``channels_last`` model and input, and in onnxruntime (CPU). The speedup is set beside the reduction
in multiply-adds (``profile().macs``, dense / compact).

The tool's own speed (``structures`` and ``compact`` on resnet50 at 224×224, batch 1) is measured in a
fresh subprocess: peak memory on the first call (after a tiny warm-up model that loads lazy imports),
then the median time of the following calls.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
import torchvision
from _common import interleaved_latency, interleaved_onnx_latency, write
from torch import nn

from torchslim import Group, compact, structures, verify
from torchslim.deploy.profile import profile

MODELS = ("resnet18", "resnet50", "mobilenet_v2")
THREADS = (1, 2)
BATCHES = (1, 8)
KEEP = 0.5  # fraction of each family's members kept


@dataclass(frozen=True)
class Settings:
    size: int               # input is (B, 3, size, size)
    repeats: int            # timed rounds per latency measurement
    slow_repeats: int       # resnet50 at batch 8, over half a second a call on one thread
    tool_model: str         # the model whose structures() + compact() are timed
    tool_repeats: int
    smoke: bool

    def repeats_for(self, name: str, batch: int) -> int:
        return self.slow_repeats if (name, batch) == ("resnet50", 8) else self.repeats


FULL = Settings(size=224, repeats=30, slow_repeats=20, tool_model="resnet50", tool_repeats=3, smoke=False)
SMOKE = Settings(size=64, repeats=3, slow_repeats=3, tool_model="resnet18", tool_repeats=2, smoke=True)


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return getattr(torchvision.models, name)(weights=None).eval()


def halve_(groups: list[Group]) -> int:
    """Zero the lowest-norm half of each family's members in place; returns how many were zeroed."""
    by_family: dict[int, list[Group]] = {}
    for g in groups:
        by_family.setdefault(id(g.family), []).append(g)
    zeroed = 0
    for members in by_family.values():
        norms = members[0].family.row_sq()  # (size,): every member's ||w_g||², before any is zeroed
        members.sort(key=lambda g: norms[g.index].item())
        for g in members[: len(members) - round(KEEP * len(members))]:
            g.zero_()
            zeroed += 1
    return zeroed


def coverage(model: nn.Module, groups: list[Group]) -> dict[str, int]:
    """Groups found against the conv output channels they could be: some are not groups yet.

    ``conv_channels_in_groups`` counts the conv output channels (rows of a conv weight) that some
    group holds; a coupled family (a residual chain) is one group per channel but covers a channel of
    every conv that produces it.
    """
    convs = {f"{n}.weight": m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    held = {(param, int(r)) for g in groups for param, dim, rows in g.slices
            if dim == 0 and param in convs for r in rows}
    return {"groups": len(groups), "families": len({id(g.family) for g in groups}), "convs": len(convs),
            "conv_output_channels": sum(convs.values()), "conv_channels_in_groups": len(held)}


def widths(model: nn.Module) -> dict[str, int]:
    return {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def _with_speedup(lat: dict[str, dict[str, float]]) -> dict[str, Any]:
    return {**lat, "speedup": lat["dense"]["median_ms"] / lat["compact"]["median_ms"]}


def latencies(name: str, dense: nn.Module, small: nn.Module, s: Settings) -> dict[str, dict[str, Any]]:
    """``{"threads{t}_batch{b}": {"repeats", "pytorch", "channels_last", "onnxruntime"}}``."""
    models = {"dense": dense, "compact": small}
    last = {k: copy.deepcopy(m).to(memory_format=torch.channels_last) for k, m in models.items()}
    rows = {}
    for threads in THREADS:
        for batch in BATCHES:
            x = torch.randn(batch, 3, s.size, s.size)
            reps = s.repeats_for(name, batch)
            row = {
                "pytorch": _with_speedup(interleaved_latency(models, x, threads=threads, repeats=reps)),
                "channels_last": _with_speedup(interleaved_latency(
                    last, x.contiguous(memory_format=torch.channels_last), threads=threads, repeats=reps)),
                "onnxruntime": _with_speedup(interleaved_onnx_latency(models, x, threads=threads, repeats=reps)),
            }
            print(f"{name} threads {threads} batch {batch}: "
                  + ", ".join(f"{k} {v['speedup']:.2f}x" for k, v in row.items()), flush=True)
            rows[f"threads{threads}_batch{batch}"] = {"repeats": reps, **row}
    return rows


def zoo_model(name: str, s: Settings) -> dict[str, Any]:
    """Halve one model, compact it, and measure both."""
    dense = build(name)
    x1 = torch.randn(1, 3, s.size, s.size)
    sparse = copy.deepcopy(dense)
    groups = structures(sparse, x1, kinds=("channel",))
    cover = coverage(sparse, groups)
    zeroed = halve_(groups)
    small = compact(sparse, x1)
    p_dense, p_small = profile(dense, x1, latency=False), profile(small, x1, latency=False)
    before, after = widths(dense), widths(small)
    return {
        "coverage": cover,
        "groups_zeroed": zeroed,
        "params": {"dense": p_dense.params, "compact": p_small.params},
        "macs": {"dense": p_dense.macs, "compact": p_small.macs},
        "mac_ratio": p_dense.macs / p_small.macs,        # dense / compact: 2.0 = half the multiply-adds
        "params_ratio": p_dense.params / p_small.params,
        "max_abs_diff": verify(sparse, small, x1).max_abs_diff,
        "widths": {n: [before[n], after.get(n)] for n in before},  # conv out channels, dense → compact
        "widths_not_multiple_of_8": sum(1 for w in after.values() if w % 8),
        "speed": latencies(name, dense, small, s),
    }


def tool_speed(s: Settings) -> dict[str, Any]:
    """Run :func:`_tool_child` in a fresh interpreter and return what it measured."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--tool-child", s.tool_model, "--size", str(s.size),
           "--tool-repeats", str(s.tool_repeats)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


def _status_mib(field: str) -> float | None:
    """``VmRSS`` (resident now) or ``VmHWM`` (peak resident) of this process, from /proc (Linux)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (``clear_refs`` 5, Linux ≥ 4.0); ru_maxrss cannot be reset."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _memory_of(fn: Callable[[], Any]) -> tuple[Any, dict[str, float | None]]:
    """Call ``fn()``; its Python-heap peak (tracemalloc) and how far RSS rose above the RSS before it."""
    rss_before, maxrss_before = _status_mib("VmRSS"), _maxrss_mib()
    hwm_reset = _reset_peak_rss()
    tracemalloc.start()
    try:
        out = fn()
        heap_peak = tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()
    hwm = _status_mib("VmHWM") if hwm_reset else None
    return out, {
        "python_heap_peak_mib": heap_peak,
        "rss_before_mib": rss_before,
        "rss_peak_growth_mib": hwm - rss_before if hwm is not None and rss_before is not None else None,
        "maxrss_before_mib": maxrss_before,
        "maxrss_after_mib": _maxrss_mib(),
    }


MEMORY_NOTE = (
    "Fresh process, started before the benchmark loads any model; first call on the model, after a tiny "
    "warm-up model that loads lazy imports. python_heap_peak_mib: tracemalloc peak during the call, Python "
    "objects only (tensor storage is not traced). rss_peak_growth_mib: peak resident memory during the call "
    "(VmHWM, reset just before it) minus the resident memory before it: tensors included. maxrss_*: "
    "getrusage(RUSAGE_SELF).ru_maxrss, the process's peak since it started (an exec'd child starts from its "
    "parent's peak, and importing torch alone takes ~0.7 GB). Times: median of the calls after the first.")


def _tool_child(name: str, size: int, repeats: int) -> dict[str, Any]:
    """Memory of the first ``structures`` + ``compact`` on ``name``, then their median times."""
    tiny = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3)).eval()
    t = torch.randn(1, 3, 8, 8)
    halve_(structures(tiny, t, kinds=("channel",)))
    compact(tiny, t)  # loads torch.fx and the verification path, at no memory to speak of
    model, x = build(name), torch.randn(1, 3, size, size)
    groups, memory_structures = _memory_of(lambda: structures(model, x, kinds=("channel",)))
    halve_(groups)
    _, memory_compact = _memory_of(lambda: compact(model, x))
    seconds: dict[str, list[float]] = {"structures": [], "compact": []}
    for _ in range(repeats):
        t0 = time.perf_counter()
        structures(model, x, kinds=("channel",))
        t1 = time.perf_counter()
        compact(model, x)
        seconds["structures"].append(t1 - t0)
        seconds["compact"].append(time.perf_counter() - t1)
    return {
        "model": name, "input": [1, 3, size, size], "threads": torch.get_num_threads(), "repeats": repeats,
        "seconds": {k: statistics.median(v) for k, v in seconds.items()}, "seconds_all": seconds,
        "memory": {"structures": memory_structures, "compact": memory_compact}, "memory_note": MEMORY_NOTE,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    ap.add_argument("--smoke", action="store_true", help="resnet18 only, 64×64 input, 3 repeats")
    ap.add_argument("--tool-child", help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, default=224, help=argparse.SUPPRESS)
    ap.add_argument("--tool-repeats", type=int, default=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.tool_child:
        print(json.dumps(_tool_child(args.tool_child, args.size, args.tool_repeats)))
        return
    s = SMOKE if args.smoke else FULL
    load_start = os.getloadavg()  # other jobs on the machine: 2-thread timings suffer first
    names = ["resnet18"] if args.smoke else args.models
    tool = tool_speed(s)  # first, while this process is small: its child inherits its ru_maxrss
    models = {name: zoo_model(name, s) for name in names}
    write("zoo_speed_smoke" if s.smoke else "zoo_speed", {
        "smoke": s.smoke,
        "settings": {"input": [3, s.size, s.size], "keep": KEEP, "threads": THREADS, "batches": BATCHES,
                     "repeats": s.repeats, "repeats_resnet50_batch8": s.slow_repeats,
                     "onnxruntime": version("onnxruntime"), "loadavg_start": load_start,
                     "loadavg_end": os.getloadavg()},
        "models": models,
        "tool": tool,
    })


if __name__ == "__main__":
    main()
