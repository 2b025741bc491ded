"""Proximal group Lasso vs the paper's subgradient + 1e-4 zero-out, same recipe, same budget.

    python benchmarks/prox_vs_subgradient.py [--recipe lenet_ssl]

Runs the recipe twice, changing only ``ssl.mode``, and records the accuracy (after SSL and after
fine-tuning), the zero groups per kind and the conv multiply-adds kept.
"""

from __future__ import annotations

import argparse

from _common import write

from torchslim.train.engine import run
from torchslim.train.recipes import load_recipe


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default="lenet_ssl")
    args = ap.parse_args()
    rows = {}
    for mode in ("prox", "subgradient"):
        recipe = load_recipe(args.recipe, [f"ssl.mode={mode}", f"name={args.recipe}_{mode}"])
        result = run(recipe, progress=False, overwrite=True)  # a re-run replaces the last
        rep = result.report
        last_ssl = [h for h in result.history if h.phase == "ssl"][-1]
        rows[mode] = {
            "accuracy": result.accuracy,
            "zero_groups": last_ssl.zero_fraction,
            "macs_kept": rep.macs_sparse / rep.macs_dense,
            "conv_macs_kept": sum(s.macs_sparse for s in rep.layers if s.type == "Conv2d")
            / sum(s.macs_dense for s in rep.layers if s.type == "Conv2d"),
            "layers": [{"name": s.name, "filters": [s.filters_alive, s.filters_total],
                        "shape": [s.shape_alive, s.shape_total]} for s in rep.layers],
        }
        print(mode, rows[mode]["accuracy"], rows[mode]["zero_groups"])
    write(f"prox_vs_subgradient_{args.recipe}", {"recipe": args.recipe, "modes": rows})


if __name__ == "__main__":
    main()
