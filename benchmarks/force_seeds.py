"""Ranks at 95% energy and accuracy with and without the force, over several training seeds.

    python benchmarks/force_seeds.py [--force lenet_force_lowrank] [--plain lenet_lowrank] [--seeds 0 1 2 3 4]

A single seed's accuracy difference is as large as the ±0.3-point band it is judged against, so this
trains each recipe's dense baseline (only: the force acts there) once per seed and reports the mean.
Runs live in ``runs/seeds/<recipe>_s<seed>`` and resume, so a re-run only trains what is missing
(a run whose baseline settings no longer match its recipe is trained again).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
from pathlib import Path
from typing import Any

import torch
from _common import write

from torchslim import lowrank
from torchslim.train.checkpoint import load_checkpoint
from torchslim.train.engine import run
from torchslim.train.recipes import load_recipe

RUNS = Path(__file__).resolve().parent.parent / "runs" / "seeds"


def _same_baseline(path: Path, recipe: dict[str, Any]) -> bool:
    """Whether ``path`` holds a baseline trained with these settings; an edited recipe starts afresh."""
    if not path.is_file():
        return False
    saved = load_checkpoint(path)["recipe"]
    return all(saved.get(k) == recipe.get(k) for k in ("seed", "model", "data", "batch_size", "baseline"))


def _one(name: str, seed: int) -> dict[str, Any]:
    """Train ``name``'s baseline with ``seed``; its valid/test accuracy and per-layer ranks at 95% energy."""
    recipe = load_recipe(name, overrides=[f"seed={seed}"])
    run_dir = RUNS / f"{name}_s{seed}"
    resume = _same_baseline(run_dir / "checkpoint.pt", recipe.to_dict())
    result = run(recipe, run_dir=run_dir, resume=resume, overwrite=not resume, progress=False, stop_after="baseline")
    model = result.dense_model.eval()
    ranks = lowrank(model, result.example, energy=recipe.lowrank.energy, method=recipe.lowrank.method,
                    exclude=list(recipe.lowrank.skip), require_saving=False).layers
    return {"seed": seed, "valid_acc": result.valid_accuracy.get("baseline"), "test_acc": result.accuracy["baseline"],
            "ranks": {r.name: r.rank for r in ranks if r.rank is not None}}


def _summary(rows: list[dict[str, Any]]) -> dict[str, float]:
    sums = [sum(r["ranks"].values()) for r in rows]
    out = {"summed_rank": statistics.mean(sums), "test_acc": statistics.mean(r["test_acc"] for r in rows)}
    if all(r["valid_acc"] is not None for r in rows):
        out["valid_acc"] = statistics.mean(r["valid_acc"] for r in rows)
    if len(rows) > 1:
        out["test_acc_std"] = statistics.stdev(r["test_acc"] for r in rows)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--force", default="lenet_force_lowrank", help="recipe whose baseline trains with the force")
    ap.add_argument("--plain", default="lenet_lowrank", help="the same recipe without the force")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    args = ap.parse_args()
    torch.set_num_threads(1)  # one thread: each seed's run is bit-reproducible
    runs = {name: [_one(name, s) for s in args.seeds] for name in (args.plain, args.force)}
    plain, force = (_summary(runs[n]) for n in (args.plain, args.force))
    write(f"force_seeds_{args.force}", {
        "plain_recipe": args.plain, "force_recipe": args.force, "seeds": args.seeds,
        "force": dataclasses.asdict(load_recipe(args.force).baseline.force), "runs": runs,
        "mean": {"plain": plain, "force": force},
        "rank_ratio": plain["summed_rank"] / force["summed_rank"],
    })


if __name__ == "__main__":
    main()
