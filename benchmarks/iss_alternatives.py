"""ISS against the paper's alternatives on the row LSTM: rows only, columns only, element-wise L1.

    python benchmarks/iss_alternatives.py                       # about 7 min at 1 thread (2-core machine)
    python benchmarks/iss_alternatives.py --smoke               # a few hundred images: a check that it runs

Sequential Fashion-MNIST (``rowlstm``, 2 layers; the ``rowlstm_iss`` recipe's data, batch, optimizer,
clipping and schedules, with a smaller budget). One dense baseline is trained; from it, each regularizer
trains the sparsity phase (proximal, momentum SGD, cosine) at each λ:

* ``hidden``: ISS, a hidden unit's gate rows, its recurrent column and its consumers' columns as one group;
* ``hidden_row``: only the gate rows that produce a unit (rows ``g·H + k`` of ``weight_ih``/``weight_hh``,
  both biases);
* ``hidden_col``: only the columns that read it (``weight_hh``, the next layer's ``weight_ih``, ``fc``);
* ``l1``: element-wise ``λ·Σ|w|`` (:class:`torchslim.regularize.lasso.L1`) on the same tensors as ISS;
* ``none`` (λ = 0): the same epochs without a regularizer, the accuracy the others lose against.

The group kinds use λ_g = λ·sqrt(|g|), so that one λ shrinks a weight about as much in every scheme
(a group of ``n`` weights of size ``a`` shrinks each by ``lr·λ·sqrt(n)·a/||w_g|| = lr·λ``, as L1 does).
Then :func:`torchslim.compact` cuts the removable units (exactly: its output is verified), and each
point records test accuracy (the compact model's, equal to the sparse one's), the fraction of weights
that are exactly zero, all-zero rows/columns, removable units per layer and the compact hidden size
(one ``nn.LSTM`` keeps one size: the larger per-layer count). No fine-tuning: the zeros are compared as
the regularizer leaves them. Writes ``benchmarks/results/iss_alternatives.json`` (``*_smoke.json``).
"""

from __future__ import annotations

import argparse
import copy
import time
from typing import Any

import torch
from _common import write
from torch import nn

from torchslim import compact, structures
from torchslim.regularize.lasso import L1, GroupLasso
from torchslim.train.engine import Regularizers, build_model, lr_at
from torchslim.train.recipes import load_recipe
from torchslim.train.tasks import load_task

KINDS = ("none", "hidden", "hidden_row", "hidden_col", "l1")  # none: the same epochs without a regularizer


def _sgd(model: nn.Module, spec: Any) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)


def _train(task: Any, model: nn.Module, spec: Any, seed: int, reg: Any = None) -> list[float]:
    """``spec.epochs`` epochs of the recipe's SGD with ``reg``'s proximal step; test accuracy per epoch."""
    optimizer, steps, accs = _sgd(model, spec), task.steps_per_epoch(), []
    for epoch in range(spec.epochs):
        task.train_epoch(model, optimizer, lr=lambda i, e=epoch: lr_at(spec, e * steps + i, spec.epochs * steps),
                         seed=seed + epoch, regularizers=Regularizers(lasso=reg, grad_clip=spec.grad_clip),
                         desc=f"epoch {epoch + 1}", progress=False)
        accs.append(task.evaluate(model, "test")[1])
    return accs


@torch.no_grad()
def _measure(model: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """Zeros, all-zero rows/columns and removable units of a trained row LSTM."""
    lstm = model.lstm
    lstm_numel = sum(p.numel() for p in lstm.parameters())
    lstm_zero = sum(int((p == 0).sum()) for p in lstm.parameters())
    all_numel = sum(p.numel() for p in model.parameters())
    all_zero = sum(int((p == 0).sum()) for p in model.parameters())
    sides = structures(model, x, kinds=("hidden_row", "hidden_col"))
    layers: dict[str, dict[str, int]] = {}
    for g in sides:
        row = layers.setdefault(g.family.label, {"units": g.family.size, "zero_rows": 0, "zero_cols": 0})
        if g.is_zero():
            row["zero_rows" if g.kind == "hidden_row" else "zero_cols"] += 1
    removable = {}
    rows = {(g.family.label, g.index): g.is_zero() for g in sides if g.kind == "hidden_row"}
    cols = {(g.family.label, g.index): g.is_zero() for g in sides if g.kind == "hidden_col"}
    for label, row in layers.items():  # removable: either side zero (rowlstm starts from a zero state)
        row["removable"] = sum(rows[label, k] or cols[label, k] for k in range(row["units"]))
        row["both_zero"] = sum(rows[label, k] and cols[label, k] for k in range(row["units"]))
        removable[label] = row["removable"]
    small = compact(model, x, shapes="off")
    return {
        "zero_fraction_lstm": lstm_zero / lstm_numel,
        "zero_fraction_all": all_zero / all_numel,
        "lstm_params": lstm_numel,
        "layers": layers,
        "hidden_size_compact": small.lstm.hidden_size,
        "units_removed": lstm.hidden_size - small.lstm.hidden_size,
        "params_compact": sum(p.numel() for p in small.parameters()),
        "compact_model": small,
    }


def _regularizer(kind: str, model: nn.Module, x: torch.Tensor, lam: float, threshold: float) -> Any:
    if kind == "none":
        return None
    if kind == "l1":
        return L1(structures(model, x, kinds=("hidden",)), lam, threshold=threshold)
    return GroupLasso(structures(model, x, kinds=(kind,)), lam, weight_by_size=True, threshold=threshold)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--train-limit", type=int, default=30000)
    ap.add_argument("--baseline-epochs", type=int, default=5)
    ap.add_argument("--ssl-epochs", type=int, default=5)
    ap.add_argument("--lams", type=float, nargs="+", default=[2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2])
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    if args.smoke:
        args.train_limit, args.baseline_epochs, args.ssl_epochs, args.lams = 600, 1, 1, args.lams[:1]
    overrides = [f"data.train_limit={args.train_limit}", "data.valid_size=0", f"model.kwargs.hidden_size={args.hidden}",
                 f"baseline.epochs={args.baseline_epochs}", f"ssl.epochs={args.ssl_epochs}"]
    if args.smoke:
        overrides.append("data.test_limit=300")
    recipe = load_recipe("rowlstm_iss", overrides=overrides)
    task = load_task(recipe)
    x = task.example
    started = time.perf_counter()
    dense = build_model(recipe)
    baseline_curve = _train(task, dense, recipe.baseline, seed=1000)
    dense_numel = sum(p.numel() for p in dense.parameters())
    print(f"baseline: test acc {100 * baseline_curve[-1]:.2f}% ({time.perf_counter() - started:.0f} s)", flush=True)
    points = []
    for kind in args.kinds:
        for lam in [0.0] if kind == "none" else args.lams:
            t0 = time.perf_counter()
            model = copy.deepcopy(dense)
            reg = _regularizer(kind, model, x, lam, recipe.ssl.threshold)
            curve = _train(task, model, recipe.ssl, seed=2000, reg=reg)
            m = _measure(model, x)
            small = m.pop("compact_model")
            acc_compact = task.evaluate(small, "test")[1]
            point = {"kind": kind, "lam": lam, "test_acc": curve[-1], "test_acc_compact": acc_compact,
                     "test_acc_curve": curve, **m, "seconds": round(time.perf_counter() - t0, 1)}
            points.append(point)
            print(f"{kind:10s} λ={lam:.2g}: acc {100 * curve[-1]:.2f}%"
                  f" | zero weights {100 * m['zero_fraction_lstm']:.1f}%"
                  f" | removable {'/'.join(str(r['removable']) for r in m['layers'].values())}"
                  f" | hidden {args.hidden} → {m['hidden_size_compact']}"
                  f" ({point['seconds']:.0f} s)", flush=True)
    data = {
        "setup": {"model": f"rowlstm hidden {args.hidden}, 2 layers", "train_images": len(task.splits["train"][1]),
                  "test_images": len(task.splits["test"][1]), "baseline_epochs": args.baseline_epochs,
                  "ssl_epochs": args.ssl_epochs, "lams": args.lams, "weight_by_size": True, "mode": "prox",
                  "ssl_lr": recipe.ssl.lr, "baseline_lr": recipe.baseline.lr, "threads": 1, "finetune_epochs": 0},
        "dense": {"test_acc": baseline_curve[-1], "test_acc_curve": baseline_curve, "params": dense_numel,
                  "hidden_size": args.hidden},
        "points": points,
        "seconds": round(time.perf_counter() - started, 1),
    }
    write("iss_alternatives_smoke" if args.smoke else "iss_alternatives", data)


if __name__ == "__main__":
    main()
