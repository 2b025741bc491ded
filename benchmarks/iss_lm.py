"""ISS on a word-level LSTM language model (King James Bible): perplexity, hidden sizes, speed, direct design.

    python benchmarks/iss_lm.py [--recipe kjv_lm_iss] [--resume] [--from RECIPE]

1. Trains the recipe (dense baseline → ISS → compact → fine-tune; checkpoints in ``runs/<recipe>``); with
   ``--from``, only the steps it trains unlike ``RECIPE``'s run (say, a fine-tuning with a teacher).
2. "Direct design" (the ISS paper's baseline): the compact model's per-layer widths trained from
   scratch with the dense baseline's schedule (``runs/<recipe>_direct``), and the fine-tuning's
   dropout where the recipe lowers it for the compact model. A recipe that learns ISS from scratch (no
   dense epochs, as the paper's "learn ISS from scratch") has no dense schedule to copy: its dense model
   and direct design trained as long are ``iss_lm_control.py``'s controls, run after this.
3. Times the dense and the compact model on ``(35, B)`` token blocks, B = 1 and 20 (sequence length 35,
   as the paper), interleaved in one run, 1 and 2 threads: the whole model and the LSTM layers alone
   (the decoder's 10k-word softmax is untouched by ISS), beside their multiply-add ratios.
"""

from __future__ import annotations

import math

import torch
from _common import RESULTS, RUNS, interleaved_latency, recipe_run, train, train_seconds, write
from torch import nn

from torchslim.deploy.profile import profile
from torchslim.errors import ConfigError
from torchslim.train.checkpoint import load_checkpoint
from torchslim.train.engine import shared_steps
from torchslim.train.plots import plot_history
from torchslim.train.recipes import apply_overrides, recipe_from_dict


class _Stack(nn.Module):
    """A per-layer WordLM without its decoder: the embedding lookup and the LSTM layers ISS shrinks."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.encoder, self.layers = lm.encoder, lm.layers

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.encoder(tokens)  # (T, B, H)
        for layer in self.layers:
            x, _ = layer(x)
        return x


def _widths(model: nn.Module) -> list[int]:
    return [layer.hidden_size for layer in model.layers]


def _ppl(result, key: str, valid: bool = False) -> float:
    return math.exp((result.valid_loss if valid else result.loss)[key])


def _shares_baseline(run: str | None, recipe) -> bool:
    """Whether ``runs/<run>`` trained ``recipe``'s baseline alike, by the engine's own rule for ``--from``: a
    branch's direct design, where ISS reached the widths of the run it branched from, is that run's, reused."""
    path = RUNS / run / "checkpoint.pt" if run is not None else None
    if path is None or not path.is_file():
        return False
    try:
        return bool(shared_steps(load_checkpoint(path)["recipe"], recipe.to_dict()))
    except ConfigError:  # another model (ISS reached other widths), data or seed
        return False


def main() -> None:
    args, result = recipe_run("kjv_lm_iss")
    recipe = args.recipe
    dense, small = result.dense_model.eval(), result.compact_model.eval()
    widths = _widths(small)

    direct_design, seconds = None, train_seconds(result)
    if recipe.baseline.epochs:
        dropout = recipe.finetune.dropout  # a narrower model needs less: the same one ISS's fine-tuning uses
        direct_recipe = recipe_from_dict(apply_overrides(recipe.to_dict(), [
            f"name={recipe.name}_direct", f"model.kwargs.hidden_size={widths}", "ssl.epochs=0", "finetune.epochs=0",
            *([f"baseline.dropout={dropout}"] if dropout is not None else [])]))
        source = f"{args.branch}_direct" if args.branch is not None else None
        direct = train(direct_recipe, args.resume, source if _shares_baseline(source, direct_recipe) else None)
        direct_design = {"widths": widths, "perplexity": _ppl(direct, "baseline"),
                         "valid_perplexity": _ppl(direct, "baseline", valid=True),
                         "epochs": direct_recipe.baseline.epochs, "dropout": dropout}
        seconds += train_seconds(direct)

    speed = {}
    for threads in (1, 2):
        for batch in (1, 20):
            tokens = torch.randint(0, len(dense.decoder.weight), (35, batch), generator=torch.Generator().manual_seed(0))
            lat = interleaved_latency({"dense": dense, "compact": small}, tokens, threads=threads)
            stack = interleaved_latency({"dense": _Stack(dense), "compact": _Stack(small)}, tokens, threads=threads)
            speed[f"threads{threads}_batch{batch}"] = {
                **lat, "speedup": lat["dense"]["median_ms"] / lat["compact"]["median_ms"],
                "lstm_dense": stack["dense"], "lstm_compact": stack["compact"],
                "lstm_speedup": stack["dense"]["median_ms"] / stack["compact"]["median_ms"]}
    x = result.example[:, :1]  # (35, 1): profile's batch dim 0 makes every count per token
    p_dense, p_small = profile(dense, x, latency=False), profile(small, x, latency=False)
    lstm_macs = {name: sum(layer.macs for layer in p.layers if layer.type == "LSTM")
                 for name, p in (("dense", p_dense), ("compact", p_small))}
    data = {
        "recipe": recipe.to_dict(),
        "perplexity": {k: _ppl(result, k) for k in result.loss},
        "valid_perplexity": {k: _ppl(result, k, valid=True) for k in result.valid_loss},
        "direct_design": direct_design,
        "accuracy": result.accuracy,
        "widths": {"dense": _widths(dense), "compact": widths},
        "alive": result.history[-1 - recipe.finetune.epochs].alive if recipe.finetune.epochs else {},
        "params": {"dense": p_dense.params, "compact": p_small.params},
        "macs": {"dense": p_dense.macs, "compact": p_small.macs},
        "lstm_macs": lstm_macs,
        "flop_reduction": p_dense.macs / p_small.macs,
        "lstm_flop_reduction": lstm_macs["dense"] / lstm_macs["compact"],
        "speed": speed,
        "history_plot": plot_history(result.history, RESULTS / f"iss_{recipe.name}_history.png",
                                     title=f"{recipe.name}: next-word accuracy and ISS units alive per epoch").name,
        "train_seconds": seconds,
    }
    write(f"iss_{recipe.name}", data)


if __name__ == "__main__":
    main()
