"""Does the dense LM gain the same from the epochs that ISS's model trains on top of it?

    python benchmarks/iss_lm_control.py [--recipe kjv_lm_iss_650_keep] [--resume]

The ISS model of ``iss_lm.py`` trains the dense baseline's epochs, then the ISS epochs, then fine-tunes.
Two controls train the recipe with no ISS phase, on the same schedule: the dense baseline, then the
recipe's fine-tuning schedule applied to the model itself. A recipe that learns ISS from scratch (no dense
epochs) gives its ISS phase's schedule to the controls' first phase, so they train as long as the ISS model.

1. Dense (``runs/<recipe>_denseft``, ``results/iss_<recipe>_denseft.json``): the dense widths, with the dense
   model's dropout throughout.
2. Direct design as long (``runs/<recipe>_direct_long``, ``results/iss_<recipe>_direct_long.json``): the
   widths ISS reached (read from ``results/iss_<recipe>.json``, which ``iss_lm.py`` writes), from scratch,
   with the compact model's fine-tuning dropout throughout. Where that file is missing, only the first runs.

ISS's fine-tuned perplexity is compared with both in RESULTS.md. A control that another recipe's controls
already trained exactly (the same recipe but for its name, found in ``results/``) is reused, not retrained;
its JSON says ``measured_as``.
"""

from __future__ import annotations

import json
import math

from _common import RESULTS, recipe_args, train, train_seconds, write

from torchslim.train.recipes import apply_overrides, recipe_from_dict


def control_recipe(recipe):
    """``recipe`` without its ISS epochs; fine-tuning keeps the dense model's own dropout. Learned from scratch
    (no dense epochs), the ISS phase's schedule becomes the dense phase's."""
    d = recipe.to_dict()
    if recipe.baseline.epochs == 0:
        d["baseline"] = {k: d["ssl"][k] for k in d["baseline"]} | {"dropout": None}
    return recipe_from_dict(apply_overrides(d, [
        f"name={recipe.name}_denseft", "ssl.epochs=0", "ssl.strength=0",
        f"finetune.dropout={recipe.model.kwargs['dropout']}"]))


def direct_recipe(recipe, widths: list[int]):
    """The dense control's schedule at ISS's per-layer ``widths``, with the compact model's dropout."""
    dropout = recipe.finetune.dropout if recipe.finetune.dropout is not None else recipe.model.kwargs["dropout"]
    return recipe_from_dict(apply_overrides(control_recipe(recipe).to_dict(), [
        f"name={recipe.name}_direct_long", f"model.kwargs.hidden_size={widths}",
        f"baseline.dropout={dropout}", f"finetune.dropout={dropout}"]))


def _training(recipe) -> dict:
    """What a control trains, for comparing two: its recipe without the name and the ISS phase it skips."""
    return {k: v for k, v in recipe.to_dict().items() if k not in ("name", "ssl")}


def measured(recipe) -> dict | None:
    """The results of a control that trained exactly as ``recipe`` under another name, or None."""
    for path in sorted(RESULTS.glob("iss_*.json")):
        data = json.loads(path.read_text())
        other = data.get("recipe")
        if (other and other["name"] != recipe.name and other["ssl"]["epochs"] == 0
                and _training(recipe_from_dict(other)) == _training(recipe)):
            return data
    return None


def _run(recipe, resume: bool) -> None:
    if (same := measured(recipe)) is not None:
        print(f"{recipe.name} trains exactly as {same['recipe']['name']}, measured on {same['date']}: reused")
        data = {k: v for k, v in same.items() if k != "benchmark"}
        write(f"iss_{recipe.name}", data | {"recipe": recipe.to_dict(), "measured_as": same["recipe"]["name"]})
    else:
        write(f"iss_{recipe.name}", _summary(recipe, train(recipe, resume)))


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
        "train_seconds": train_seconds(result),
    }


def main() -> None:
    recipe, resume, _ = recipe_args("kjv_lm_iss_650_keep", __doc__.splitlines()[0])
    _run(control_recipe(recipe), resume)
    iss = RESULTS / f"iss_{recipe.name}.json"
    if not iss.exists():
        print(f"{iss} is missing: run benchmarks/iss_lm.py --recipe {recipe.name} first for the direct-design control")
        return
    _run(direct_recipe(recipe, json.loads(iss.read_text())["widths"]["compact"]), resume)


if __name__ == "__main__":
    main()
