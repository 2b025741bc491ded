"""Does the dense LM gain the same from the epochs that ISS's model trains on top of it?

    python benchmarks/iss_lm_control.py [--recipe kjv_lm_iss_650_keep] [--resume]

The ISS model of ``iss_lm.py`` trains the dense baseline's epochs, then the ISS epochs, then fine-tunes.
The control trains the same recipe with no ISS phase: the dense baseline, then the recipe's fine-tuning
schedule applied to the dense model itself, with the dense model's dropout (``runs/<recipe>_denseft``,
``results/iss_<recipe>_denseft.json``).
Its perplexity is what the fine-tuning epochs alone give; ISS's fine-tuned perplexity is compared with
both in RESULTS.md.
"""

from __future__ import annotations

import math

from _common import recipe_run, write
from torchslim.recipes import apply_overrides, recipe_from_dict


def control_recipe(recipe):
    """``recipe`` without its ISS epochs; fine-tuning keeps the dense model's own dropout."""
    return recipe_from_dict(apply_overrides(recipe.to_dict(), [
        f"name={recipe.name}_denseft", "ssl.epochs=0", "ssl.strength=0",
        f"finetune.dropout={recipe.model.kwargs['dropout']}"]))


def main() -> None:
    recipe, result, _ = recipe_run("kjv_lm_iss_650_keep", __doc__.splitlines()[0], derive=control_recipe)
    write(f"iss_{recipe.name}", {
        "recipe": recipe.to_dict(),
        "perplexity": {k: math.exp(v) for k, v in result.loss.items()},
        "valid_perplexity": {k: math.exp(v) for k, v in result.valid_loss.items()},
        "finetune_history": [{"epoch": h.epoch, "perplexity": math.exp(h.test_loss),
                              "valid_perplexity": math.exp(h.valid_loss) if h.valid_loss is not None else None}
                             for h in result.history if h.phase == "finetune"],
        "epochs": {"baseline": recipe.baseline.epochs, "finetune": recipe.finetune.epochs},
        "dropout": recipe.finetune.dropout,
        "train_seconds": result.seconds,
    })


if __name__ == "__main__":
    main()
