"""Does TernGrad train as well as fp32? LeNet on Fashion-MNIST, 4 workers, same steps, data and seed.

    python benchmarks/terngrad_convergence.py [--steps 3000] [--eval-every 500] [--seeds 0 1 2] [--smoke]

Runs of ``torchrun -m torchslim.train.distributed`` with identical options but the gradients:
``fp32`` (plain DDP all-reduce), ``terngrad`` (the paper's clipping, s = min(max|g|, 2.5σ)) and
``terngrad-noclip`` (``--clip-sigma inf``, s = max|g|), which shows what clipping buys, and
``terngrad-twophase`` (``--reduce twophase``: the fewest bytes, the average rounded to ternary
again). TernGrad keeps the
last layer in fp32, as the paper's runs did. Each worker draws a batch of ``--batch-size`` examples per
step (64: a total batch of 256) and SGD applies ``--lr`` to the averaged gradient (no scaling by N).

The test-accuracy curve comes from training in segments of ``--eval-every`` steps: every segment resumes
the previous one's checkpoint, which restores weights, momentum and the TernGrad step counter, and every
batch and random stream is a function of the step, so the segments train exactly the steps one long
run would, and rank 0 evaluates the whole test set at the end of each. The training-loss curve is rank
0's own minibatch loss, read from its ``--log-every`` log lines.

Runs in a fresh, unthrottled network namespace (netlink.py). Writes
``benchmarks/results/terngrad_convergence.json`` and ``.png`` (``*_smoke.*`` with ``--smoke``).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
from pathlib import Path

from _common import RESULTS, write
from matplotlib.figure import Figure
from netlink import exit_on_sigterm, namespace, torchrun_in

CONFIGS = {  # name: torchslim.train.distributed arguments
    "fp32": ["--grad", "fp32"],
    "terngrad": ["--grad", "terngrad", "--clip-sigma", "2.5"],
    "terngrad-noclip": ["--grad", "terngrad", "--clip-sigma", "inf"],
    "terngrad-twophase": ["--grad", "terngrad", "--clip-sigma", "2.5", "--reduce", "twophase"],
}
COLORS = {"fp32": "#333333", "terngrad": "#d62728", "terngrad-noclip": "#1f77b4", "terngrad-twophase": "#2ca02c"}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=3000, help="training steps of every run (default 3000)")
    p.add_argument("--eval-every", type=int, default=500, help="steps between test evaluations (segments)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one run per config and seed")
    p.add_argument("--world-size", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=64, help="examples per worker per step")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--log-every", type=int, default=25, help="steps between rank 0's loss log lines")
    p.add_argument("--train-limit", type=int, help="use only the first N training examples")
    p.add_argument("--test-limit", type=int, help="evaluate on only the first N test examples")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--timeout", type=float, default=3600, help="seconds allowed per segment")
    p.add_argument("--smoke", action="store_true", help="4 steps in 2 segments on 1,024 examples: a quick check")
    return p


def main() -> None:
    args = _parser().parse_args()
    exit_on_sigterm()
    if args.smoke:
        args.steps, args.eval_every, args.log_every = 4, 2, 1
        args.train_limit, args.test_limit = args.train_limit or 1024, args.test_limit or 500
    configs = {}
    with namespace(f"tsl-conv-{os.getpid()}") as ns:
        for name in args.configs:
            runs = [_train(ns, name, seed, args) for seed in args.seeds]
            configs[name] = {"args": CONFIGS[name], "runs": runs, **_stats(runs)}
    _add_deltas(configs)
    stem = "terngrad_convergence_smoke" if args.smoke else "terngrad_convergence"
    plot = _plot(configs, RESULTS / f"{stem}.png", args)
    write(stem, {
        "smoke": args.smoke, "model": "lenet", "dataset": "fashion-mnist", "world_size": args.world_size,
        "batch_size_per_worker": args.batch_size, "total_batch": args.batch_size * args.world_size,
        "lr": args.lr, "momentum": 0.9, "weight_decay": 5e-4, "steps": args.steps, "eval_every": args.eval_every,
        "seeds": args.seeds, "train_limit": args.train_limit, "test_limit": args.test_limit,
        "plot": plot.name, "configs": configs,
    })


def _train(ns, name: str, seed: int, args: argparse.Namespace) -> dict:
    """One run of ``name``, trained in segments that each end with a test evaluation."""
    common = ["--model", "lenet", *CONFIGS[name], "--seed", str(seed), "--batch-size", str(args.batch_size),
              "--lr", str(args.lr), "--log-every", str(args.log_every), "--checkpoint-every", str(args.eval_every)]
    common += ["--train-limit", str(args.train_limit)] if args.train_limit else []
    common += ["--test-limit", str(args.test_limit)] if args.test_limit else []
    ends = [*range(args.eval_every, args.steps, args.eval_every), args.steps]
    curve, losses, seconds, failures = [], [], 0.0, []
    with tempfile.TemporaryDirectory(prefix="tsl-conv-") as tmp:
        for end in ends:
            run = torchrun_in(ns, args.world_size, [*common, "--steps", str(end),
                                                    "--checkpoint", str(Path(tmp) / "ckpt.pt")], args.timeout)
            s = run.summary
            curve.append({"step": end, "test_accuracy": s["test_accuracy"], "test_loss": s["test_loss"]})
            losses += [[log.step, log.loss] for log in run.steps]
            seconds += s["seconds"]
            failures += run.failed_attempts
            print(f"{name:16} seed {seed} step {end:5d}: test accuracy {s['test_accuracy']:.2%}", flush=True)
    return {"seed": seed, "test_accuracy": curve[-1]["test_accuracy"], "test_loss": curve[-1]["test_loss"],
            "curve": curve, "train_loss_rank0": losses, "train_seconds": seconds,
            "terngrad": _finite(s["terngrad"]), "failed_launches": failures}


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


def _plot(configs: dict, path: Path, args: argparse.Namespace) -> Path:
    """Test accuracy (mean over seeds) and rank 0's smoothed training loss against the step."""
    fig = Figure(figsize=(10, 4))
    acc_ax, loss_ax = fig.subplots(1, 2)
    for name, c in configs.items():
        steps = [p["step"] for p in c["runs"][0]["curve"]]
        accs = [statistics.fmean(r["curve"][i]["test_accuracy"] for r in c["runs"]) for i in range(len(steps))]
        acc_ax.plot(steps, [100 * a for a in accs], "o-", color=COLORS[name], label=name)
        logged = c["runs"][0]["train_loss_rank0"]
        window = max(1, min(8, len(logged) // 10))
        smooth = [statistics.fmean(v for _, v in logged[max(0, i - window + 1):i + 1]) for i in range(len(logged))]
        loss_ax.plot([s for s, _ in logged], smooth, color=COLORS[name], label=name)
    acc_ax.set(xlabel="step", ylabel="test accuracy (%)", title=f"LeNet, Fashion-MNIST, {args.world_size} workers")
    loss_ax.set(xlabel="step", ylabel="training loss (rank 0 batch, smoothed)",
                title=f"batch {args.batch_size}/worker, lr {args.lr}, seed {args.seeds[0]}")
    for ax in (acc_ax, loss_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    RESULTS.mkdir(exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


if __name__ == "__main__":
    main()
