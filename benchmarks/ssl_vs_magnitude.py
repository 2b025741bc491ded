"""SSL vs one-shot magnitude pruning at the same multiply-adds, fine-tuned alike.

    python benchmarks/ssl_vs_magnitude.py --recipe lenet_ssl_full
    python benchmarks/ssl_vs_magnitude.py --recipe resnet20_ssl
    python benchmarks/ssl_vs_magnitude.py --run-dir /tmp/run --smoke     # a few hundred images, 1 epoch

Reads a finished SSL run (``runs/<recipe>``: ``baseline.pt``, ``compact.pt``, ``results.json``, as
``torchslim.train.engine.run`` writes them; ``benchmarks/ssl_recipe.py`` makes one), measures the SSL compact
model's multiply-adds, prunes the run's dense baseline to at most as many with
:func:`torchslim.magnitude_prune` (the lowest-norm channels/neurons, then ``compact``), and fine-tunes it
as the run fine-tuned its SSL model: the recipe's finetune phase (epochs, lr, schedule, momentum, weight
decay, batch size, shuffling seeds) on the same training images, the same validation split held out.
Writes ``benchmarks/results/ssl_vs_magnitude_<recipe>.json`` (``*_smoke.json`` with ``--smoke``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch
from _common import write
from torch import nn

from torchslim import magnitude_prune
from torchslim.deploy.profile import profile
from torchslim.deploy.serialize import load_compact
from torchslim.train.engine import PHASES, Regularizers, load_phase_model, lr_at
from torchslim.train.recipes import Recipe, apply_overrides, recipe_from_dict
from torchslim.train.tasks import ImageTask, load_task


def smoke_recipe(recipe: Recipe) -> Recipe:
    """The recipe cut to a few hundred images and one fine-tuning epoch (a check that the script runs)."""
    limits = [f"data.train_limit={min(recipe.data.train_limit or 600, 600)}",
              f"data.test_limit={min(recipe.data.test_limit or 300, 300)}",
              f"data.valid_size={min(recipe.data.valid_size, 100)}", "finetune.epochs=1"]
    return recipe_from_dict(apply_overrides(recipe.to_dict(), limits), source=f"{recipe.name} (smoke)")


def _layer(model: nn.Module, name: str) -> nn.Module | None:
    """The layer ``name``, or None where depth removal took its block away; a conv that compaction
    cropped asymmetrically is ``Sequential(pad, conv)``."""
    try:
        layer = model.get_submodule(name)
    except AttributeError:
        return None
    return layer[-1] if isinstance(layer, nn.Sequential) else layer


def width(model: nn.Module, name: str) -> int:
    """Output channels/features of layer ``name`` (``weight: (N, ...)``); 0 for a removed layer."""
    layer = _layer(model, name)
    return 0 if layer is None else int(layer.weight.shape[0])


def kernel(model: nn.Module, name: str) -> list[int] | None:
    """The kernel of a conv after SSL's cropping; None for a Linear, a lowered or a removed conv."""
    layer = _layer(model, name)
    return list(layer.kernel_size) if isinstance(layer, nn.Conv2d) else None


def accuracies(model: nn.Module, task: ImageTask) -> tuple[float, float | None]:
    """``(test accuracy, validation accuracy or None)``."""
    test_acc = task.evaluate(model, "test")[1]
    return test_acc, task.evaluate(model, "valid")[1] if task.has_valid else None


def finetune(model: nn.Module, recipe: Recipe, task: ImageTask) -> list[dict[str, Any]]:
    """The engine's finetune phase on ``model`` (its batches, learning rates and seeds; no Lasso, nothing
    zero left to mask); per-epoch history."""
    spec = recipe.finetune
    optimizer = torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=spec.momentum,
                                weight_decay=spec.weight_decay)
    steps = task.steps_per_epoch()
    history = []
    for epoch in range(spec.epochs):
        start = time.perf_counter()
        loss, train_acc = task.train_epoch(
            model, optimizer, lr=lambda i, e=epoch: lr_at(spec, e * steps + i, spec.epochs * steps),
            seed=recipe.seed * 1_000_003 + PHASES.index("finetune") * 10_007 + epoch,
            regularizers=Regularizers(grad_clip=spec.grad_clip), desc=f"fine-tune {epoch + 1}/{spec.epochs}",
            progress=False,
        )
        test_acc, valid_acc = accuracies(model, task)
        history.append({"epoch": epoch + 1, "train_loss": loss, "train_acc": train_acc, "test_acc": test_acc,
                        "valid_acc": valid_acc, "seconds": time.perf_counter() - start})
        valid_text = f", valid {valid_acc:.2%}" if valid_acc is not None else ""
        print(f"fine-tune {epoch + 1}/{spec.epochs}: loss {loss:.4f}, test {test_acc:.2%}{valid_text}", flush=True)
    return history


def _kinds(given: str | None, recipe: Recipe) -> tuple[str, ...]:
    """``--kinds``, or channels and neurons, with heads and width where the recipe's SSL learns them (a ViT)."""
    if given:
        return tuple(given.split(","))
    return ("channel", "neuron", *(k for k in ("head", "embed") if k in recipe.ssl.kinds))


def compare(
    run_dir: Path, recipe: Recipe, *, data_dir: str | None, scope: str, kinds: tuple[str, ...],
) -> dict[str, Any]:
    """Everything the results JSON holds; ``recipe`` sets the data and the fine-tuning."""
    done = json.loads((run_dir / "results.json").read_text())
    done_valid = done.get("valid_accuracy") or {}
    dense, _ = load_phase_model(run_dir / "baseline.pt")
    ssl = load_compact(run_dir / "compact.pt")
    task = load_task(recipe, data_dir)
    example = task.example  # as the engine's: MACs are per sample, so any batch gives the same count
    p_dense, p_ssl = profile(dense, example, latency=False), profile(ssl, example, latency=False)
    started = time.perf_counter()
    pruned = magnitude_prune(dense.eval(), example, target_macs=p_ssl.macs, kinds=kinds, scope=scope)
    prune_seconds = time.perf_counter() - started
    p_mag = profile(pruned, example, latency=False)
    before = accuracies(pruned, task)
    history = finetune(pruned, recipe, task)
    after = (history[-1]["test_acc"], history[-1]["valid_acc"]) if history else before
    here = {"dense": accuracies(dense, task), "ssl": accuracies(ssl, task)}
    names = [n for n, m in dense.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return {
        "recipe": recipe.to_dict(), "run_dir": str(run_dir), "run_finished": done.get("finished"),
        "magnitude": {"scope": scope, "kinds": list(kinds), "target_macs": p_ssl.macs, "seconds": prune_seconds},
        "accuracy": {"dense": done["accuracy"]["baseline"], "ssl_compact": done["accuracy"].get("compact"),
                     "ssl": done["accuracy"]["finetune"], "magnitude_pruned": before[0], "magnitude": after[0]},
        "valid_accuracy": {"dense": done_valid.get("baseline"), "ssl_compact": done_valid.get("compact"),
                           "ssl": done_valid.get("finetune"),
                           "magnitude_pruned": before[1], "magnitude": after[1]} if task.has_valid else {},
        "accuracy_here": {k: {"test": t, "valid": v} for k, (t, v) in here.items()},  # same data as magnitude
        "macs": {"dense": p_dense.macs, "ssl": p_ssl.macs, "magnitude": p_mag.macs},
        "params": {"dense": p_dense.params, "ssl": p_ssl.params, "magnitude": p_mag.params},
        "layers": [{"name": n, "dense": width(dense, n), "ssl": width(ssl, n), "magnitude": width(pruned, n),
                    "ssl_kernel": kernel(ssl, n)} for n in names],
        "finetune": {**dataclasses.asdict(recipe.finetune), "batch_size": recipe.batch_size, "history": history},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", default="lenet_ssl_full",
                    help="the SSL run's recipe name (lenet_ssl_full, resnet20_ssl)")
    ap.add_argument("--run-dir", type=Path, help="the finished run folder (default runs/<recipe>)")
    ap.add_argument("--data-dir", help="where Fashion-MNIST lies (default: $TORCHSLIM_DATA, then the system folder)")
    ap.add_argument("--epochs", type=int, help="fine-tuning epochs instead of the recipe's")
    ap.add_argument("--scope", choices=("layer", "global"), default="layer",
                    help="magnitude ranking per layer or global")
    ap.add_argument("--kinds", default=None, help="group kinds to prune, comma-separated (default: channel,neuron, and "
                    "head, embed where the recipe's SSL uses them)")
    ap.add_argument("--smoke", action="store_true", help="a few hundred images, 1 epoch: checks that it runs")
    args = ap.parse_args()
    torch.manual_seed(0)
    run_dir = args.run_dir or Path(__file__).resolve().parent.parent / "runs" / args.recipe
    if not (run_dir / "compact.pt").is_file():
        raise SystemExit(f"{run_dir} holds no finished SSL run (compact.pt); run "
                         f"`python benchmarks/ssl_recipe.py --recipe {args.recipe}` first, or pass --run-dir")
    _, recipe = load_phase_model(run_dir / "baseline.pt")  # the recipe the run trained with
    if args.smoke:
        recipe = smoke_recipe(recipe)
    if args.epochs is not None:
        recipe = recipe_from_dict(apply_overrides(recipe.to_dict(), [f"finetune.epochs={args.epochs}"]))
    data = compare(run_dir, recipe, data_dir=args.data_dir, scope=args.scope, kinds=_kinds(args.kinds, recipe))
    data["smoke"] = args.smoke
    write(f"ssl_vs_magnitude_{recipe.name}" + ("_smoke" if args.smoke else ""), data)


if __name__ == "__main__":
    main()
