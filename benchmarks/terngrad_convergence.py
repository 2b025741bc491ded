"""Does TernGrad train as well as fp32? LeNet on Fashion-MNIST, 4 workers, same epochs, data and seed.

    python benchmarks/terngrad_convergence.py [--epochs 13] [--seeds 0 1 2] [--smoke]

Runs of ``torchrun -m torchslim train lenet_terngrad --stop-after baseline`` with identical recipes but the
gradients: ``fp32`` (plain DDP all-reduce), ``terngrad`` (the paper's clipping, s = min(max|g|, 2.5σ)) and
``terngrad-noclip`` (``clip_sigma: inf``, s = max|g|), which shows what clipping buys, and
``terngrad-twophase`` (``reduce: twophase``: the fewest bytes, the average rounded to ternary again).
TernGrad keeps the last layer in fp32, as the paper's runs did. The recipe's global batch is 256 (64 per
worker) and SGD applies its learning rate to the averaged gradient; every run sees the same batches in the
same order (they depend on seed and epoch only). The curves are the run's own: every epoch ends with a
test evaluation, and the training loss is the epoch's mean over all workers' examples.

Runs in a fresh, unthrottled network namespace (netlink.py). Writes
``benchmarks/results/terngrad_convergence.json`` and ``.png`` (``*_smoke.*`` with ``--smoke``).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
from pathlib import Path

from _common import RESULTS, write
from matplotlib.figure import Figure
from netlink import exit_on_sigterm, namespace, train_in

from torchslim.train.recipes import load_recipe

RECIPE = "lenet_terngrad"
CONFIGS = {  # name: `torchslim train` arguments
    "fp32": ["--grad", "fp32"],
    "terngrad": ["--grad", "terngrad", "--set", "distributed.terngrad.clip_sigma=2.5"],
    "terngrad-noclip": ["--grad", "terngrad", "--set", "distributed.terngrad.clip_sigma=inf"],
    "terngrad-twophase": ["--grad", "terngrad", "--set", "distributed.terngrad.reduce=twophase"],
}
COLORS = {"fp32": "#333333", "terngrad": "#d62728", "terngrad-noclip": "#1f77b4", "terngrad-twophase": "#2ca02c"}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, help="epochs of every run (default: the recipe's, 13)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one run per config and seed")
    p.add_argument("--world-size", type=int, default=4)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="recipe overrides for every run (e.g. data.train_limit=10000)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds allowed per run")
    p.add_argument("--smoke", action="store_true", help="2 epochs of 1,024 examples, 2 workers: a quick check")
    return p


def main() -> None:
    args = _parser().parse_args()
    exit_on_sigterm()
    if args.smoke:
        args.epochs, args.world_size = args.epochs or 2, 2
        args.overrides = ["data.train_limit=1024", "data.test_limit=500", "batch_size=128", *args.overrides]
    if args.epochs:
        args.overrides.append(f"baseline.epochs={args.epochs}")
    recipe = load_recipe(RECIPE, overrides=args.overrides)
    configs = {}
    with namespace(f"tsl-conv-{os.getpid()}") as ns:
        for name in args.configs:
            runs = [_train(ns, name, seed, args) for seed in args.seeds]
            configs[name] = {"args": CONFIGS[name], "runs": runs, **_stats(runs)}
    _add_deltas(configs)
    stem = "terngrad_convergence_smoke" if args.smoke else "terngrad_convergence"
    plot = _plot(configs, RESULTS / f"{stem}.png", recipe, args)
    write(stem, {
        "smoke": args.smoke, "recipe": recipe.to_dict(), "world_size": args.world_size, "seeds": args.seeds,
        "batch_size_per_worker": recipe.batch_size // args.world_size, "plot": plot.name, "configs": configs,
    })


def _train(ns, name: str, seed: int, args: argparse.Namespace) -> dict:
    """One run of ``name``: its per-epoch test accuracy and training loss from results.json."""
    sets = [a for o in [*args.overrides, f"seed={seed}"] for a in ("--set", o)]
    run = train_in(ns, args.world_size, RECIPE, [*CONFIGS[name], "--stop-after", "baseline", *sets], args.timeout)
    history = run.results["history"]
    steps = run.results["distributed"]["steps_per_epoch"]
    curve = [{"epoch": h["epoch"], "step": h["epoch"] * steps, "test_accuracy": h["test_acc"],
              "test_loss": h["test_loss"], "train_loss": h["train_loss"]} for h in history]
    print(f"{name:18} seed {seed}: test accuracy {curve[-1]['test_accuracy']:.2%}", flush=True)
    return {"seed": seed, "test_accuracy": curve[-1]["test_accuracy"], "test_loss": curve[-1]["test_loss"],
            "curve": curve, "train_seconds": sum(h["train_seconds"] for h in history),
            "terngrad": _finite(run.results["recipe"]["distributed"]["terngrad"]),
            "failed_launches": list(run.failed_attempts)}


def _finite(value):
    """``value`` with non-finite floats (``clip_sigma=inf``) as strings, so the JSON stays strict."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return str(value) if isinstance(value, float) and not math.isfinite(value) else value


def _stats(runs: list[dict]) -> dict:
    accs = [r["test_accuracy"] for r in runs]
    return {"test_accuracy_mean": statistics.fmean(accs),
            "test_accuracy_std": statistics.stdev(accs) if len(accs) > 1 else None}


def _add_deltas(configs: dict) -> None:
    """``delta_vs_fp32_points``: mean accuracy minus fp32's, in percentage points."""
    base = configs.get("fp32", {}).get("test_accuracy_mean")
    for c in configs.values():
        c["delta_vs_fp32_points"] = 100 * (c["test_accuracy_mean"] - base) if base is not None else None


def _plot(configs: dict, path: Path, recipe, args: argparse.Namespace) -> Path:
    """Test accuracy and training loss (means over seeds) against the step."""
    fig = Figure(figsize=(10, 4))
    acc_ax, loss_ax = fig.subplots(1, 2)
    for name, c in configs.items():
        steps = [p["step"] for p in c["runs"][0]["curve"]]
        for ax, key, scale in ((acc_ax, "test_accuracy", 100), (loss_ax, "train_loss", 1)):
            mean = [statistics.fmean(r["curve"][i][key] for r in c["runs"]) for i in range(len(steps))]
            ax.plot(steps, [scale * m for m in mean], "o-", color=COLORS[name], label=name)
    acc_ax.set(xlabel="step", ylabel="test accuracy (%)", title=f"LeNet, Fashion-MNIST, {args.world_size} workers")
    loss_ax.set(xlabel="step", ylabel="training loss (epoch mean)",
                title=f"global batch {recipe.batch_size}, lr {recipe.baseline.lr} ({recipe.baseline.lr_schedule}), "
                      f"{len(args.seeds)} seeds")
    for ax in (acc_ax, loss_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    RESULTS.mkdir(exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


if __name__ == "__main__":
    main()
