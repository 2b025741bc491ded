"""Does the dense LM gain the same from the epochs that ISS's model trains on top of it?

    python benchmarks/iss_lm_control.py [--recipe kjv_lm_iss_650_keep] [--resume]

The ISS model of ``iss_lm.py`` trains the dense baseline's epochs, then the ISS epochs, then fine-tunes.
Two controls train the recipe with no ISS phase, on the same schedule: the dense baseline, then the
recipe's fine-tuning schedule applied to the model itself.

1. Dense (``runs/<recipe>_denseft``, ``results/iss_<recipe>_denseft.json``): the dense widths, with the dense
   model's dropout throughout.
2. Direct design as long (``runs/<recipe>_direct_long``, ``results/iss_<recipe>_direct_long.json``): the
   widths ISS reached (read from ``results/iss_<recipe>.json``, which ``iss_lm.py`` writes), from scratch,
   with the compact model's fine-tuning dropout throughout. Where that file is missing, only the first runs.

ISS's fine-tuned perplexity is compared with both in RESULTS.md.
"""

from __future__ import annotations

import json
import math

from _common import RESULTS, recipe_args, train, write
from torchslim.recipes import apply_overrides, recipe_from_dict


def control_recipe(recipe):
    """``recipe`` without its ISS epochs; fine-tuning keeps the dense model's own dropout."""
    return recipe_from_dict(apply_overrides(recipe.to_dict(), [
        f"name={recipe.name}_denseft", "ssl.epochs=0", "ssl.strength=0",
        f"finetune.dropout={recipe.model.kwargs['dropout']}"]))


def direct_recipe(recipe, widths: list[int]):
    """The dense control's schedule at ISS's per-layer ``widths``, with the compact model's dropout."""
    dropout = recipe.finetune.dropout if recipe.finetune.dropout is not None else recipe.model.kwargs["dropout"]
    return recipe_from_dict(apply_overrides(control_recipe(recipe).to_dict(), [
        f"name={recipe.name}_direct_long", f"model.kwargs.hidden_size={widths}",
        f"baseline.dropout={dropout}", f"finetune.dropout={dropout}"]))


def _summary(recipe, result) -> dict:
    kw = recipe.model.kwargs
    widths = kw["hidden_size"] if isinstance(kw["hidden_size"], list) else [kw["hidden_size"]] * kw["num_layers"]
    return {
        "recipe": recipe.to_dict(),
        "perplexity": {k: math.exp(v) for k, v in result.loss.items()},
        "valid_perplexity": {k: math.exp(v) for k, v in result.valid_loss.items()},
        "finetune_history": [{"epoch": h.epoch, "perplexity": math.exp(h.test_loss),
                              "valid_perplexity": math.exp(h.valid_loss) if h.valid_loss is not None else None}
                             for h in result.history if h.phase == "finetune"],
        "epochs": {"baseline": recipe.baseline.epochs, "finetune": recipe.finetune.epochs},
        "widths": widths,
        "dropout": recipe.finetune.dropout,
        "train_seconds": result.seconds,
    }


def main() -> None:
    recipe, resume = recipe_args("kjv_lm_iss_650_keep", __doc__.splitlines()[0])
    dense = control_recipe(recipe)
    write(f"iss_{dense.name}", _summary(dense, train(dense, resume)))
    iss = RESULTS / f"iss_{recipe.name}.json"
    if not iss.exists():
        print(f"{iss} is missing: run benchmarks/iss_lm.py --recipe {recipe.name} first for the direct-design control")
        return
    direct = direct_recipe(recipe, json.loads(iss.read_text())["widths"]["compact"])
    write(f"iss_{direct.name}", _summary(direct, train(direct, resume)))


if __name__ == "__main__":
    main()
