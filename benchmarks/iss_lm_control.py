"""Does the dense LM gain the same from the epochs that ISS's model trains on top of it?

    python benchmarks/iss_lm_control.py [--recipe kjv_lm_iss_650_keep] [--resume]

The ISS model of ``iss_lm.py`` trains the dense baseline's epochs, then the ISS epochs, then fine-tunes.
The control trains the same recipe with no ISS phase: the dense baseline, then the recipe's fine-tuning
schedule applied to the dense model itself, with the dense model's dropout (``runs/<recipe>_denseft``).
Its perplexity is what the fine-tuning epochs alone give; ISS's fine-tuned perplexity is compared with
both in RESULTS.md.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from _common import write
from torchslim.engine import run
from torchslim.recipes import apply_overrides, load_recipe, recipe_from_dict

ROOT = Path(__file__).resolve().parent.parent


def control_recipe(recipe):
    """``recipe`` without its ISS epochs; fine-tuning keeps the dense model's own dropout."""
    return recipe_from_dict(apply_overrides(recipe.to_dict(), [
        f"name={recipe.name}_denseft", "ssl.epochs=0", "ssl.strength=0",
        f"finetune.dropout={recipe.model.kwargs['dropout']}"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="kjv_lm_iss_650_keep")
    ap.add_argument("--resume", action="store_true", help="continue the run folder's last checkpoint")
    args = ap.parse_args()
    torch.manual_seed(0)
    recipe = control_recipe(load_recipe(args.recipe))
    result = run(recipe, run_dir=ROOT / "runs" / recipe.name, resume=args.resume, progress=False)
    ppl = {k: math.exp(v) for k, v in result.loss.items()}
    write(f"iss_{args.recipe}_control", {
        "recipe": recipe.to_dict(),
        "perplexity": ppl,
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
