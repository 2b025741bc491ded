"""Shared by the benchmark scripts: interleaved timing, machine facts, JSON results."""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
from torch import nn

from torchslim.deploy.profile import machine_info

RESULTS = Path(__file__).parent / "results"
RUNS = Path(__file__).resolve().parent.parent / "runs"


def interleaved_latency(models: dict[str, nn.Module], x: torch.Tensor, *, threads: int, repeats: int = 30,
                        warmup: int = 5) -> dict[str, dict[str, float]]:
    """Median and p10/p90 latency (ms) of each model on ``x``, timed in alternation in one run.

    Alternating the models round by round spreads any drift of the machine (another process, clock
    changes) over all of them, so their ratio is fair.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            for m in models.values():
                m.eval()
            return _alternate({k: (lambda m=m: m(x)) for k, m in models.items()}, repeats, warmup)
    finally:
        torch.set_num_threads(previous)


def interleaved_onnx_latency(models: dict[str, nn.Module], x: torch.Tensor, *, threads: int, repeats: int = 30,
                             warmup: int = 5) -> dict[str, dict[str, float]]:
    """As :func:`interleaved_latency`, in onnxruntime (CPU): each model exported with ``export_onnx``."""
    import onnxruntime as ort

    from torchslim.deploy.serialize import export_onnx

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in models.items():
            path = Path(tmp) / f"{name}.onnx"
            export_onnx(model, x, path)
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            feed = {session.get_inputs()[0].name: x.numpy()}
            runs[name] = lambda s=session, f=feed: s.run(None, f)
        return _alternate(runs, repeats, warmup)


def _alternate(runs: dict[str, Callable[[], Any]], repeats: int, warmup: int) -> dict[str, dict[str, float]]:
    times: dict[str, list[float]] = {k: [] for k in runs}
    for fn in runs.values():
        for _ in range(warmup):
            fn()
    for _ in range(repeats):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {k: {"median_ms": statistics.median(v), "p10_ms": sorted(v)[len(v) // 10],
                "p90_ms": sorted(v)[(len(v) * 9) // 10]} for k, v in times.items()}


def write(name: str, data: dict[str, Any]) -> Path:
    """Write ``results/<name>.json`` with the machine it ran on."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    data = {"benchmark": name, "machine": machine_info(), "date": time.strftime("%Y-%m-%d"), **data}
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    print(f"wrote {path}")
    return path


class RecipeArgs(NamedTuple):
    recipe: Any  # torchslim.train.recipes.Recipe
    resume: bool
    branch: str | None  # the recipe whose run this one starts from (``--from``), or None


def recipe_args(default: str, description: str | None = None, *, branch: bool = False) -> RecipeArgs:
    """``--recipe NAME [--resume]`` (and ``[--from RECIPE]`` with ``branch``) from the command line. The engine's
    epoch lines go to stderr, so that an hours-long run shows where it is."""
    import argparse
    import logging

    from torchslim.train.recipes import load_recipe

    logging.basicConfig(format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("torchslim").setLevel(logging.INFO)
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--recipe", default=default)
    ap.add_argument("--resume", action="store_true", help="continue the run folder's last checkpoint")
    if branch:
        ap.add_argument("--from", dest="branch", metavar="RECIPE",
                        help="start after the steps that RECIPE's run (in runs/) trained alike")
    args = ap.parse_args()
    return RecipeArgs(load_recipe(args.recipe), args.resume, getattr(args, "branch", None))


def train(recipe, resume: bool, branch: str | None = None):
    """Train ``recipe`` in ``runs/<name>`` (seeded as every benchmark run), starting after the steps that
    ``runs/<branch>`` trained alike where given: its ``RunResult``. Without ``resume`` an earlier run there is
    replaced."""
    from torchslim.train.engine import run

    torch.manual_seed(0)
    return run(recipe, run_dir=RUNS / recipe.name, resume=resume, overwrite=not resume, progress=False,
               branch_from=RUNS / branch if branch is not None else None)


def train_seconds(result) -> float:
    """Seconds of every epoch of a ``RunResult``, evaluation included, resumed epochs too (``result.seconds``
    counts only the last call)."""
    return sum(h.seconds for h in result.history)


def recipe_run(default: str, description: str | None = None) -> tuple[RecipeArgs, Any]:
    """:func:`recipe_args` (with ``--from``), trained in ``runs/<name>``: ``(args, result)``."""
    args = recipe_args(default, description, branch=True)
    return args, train(args.recipe, args.resume, args.branch)
