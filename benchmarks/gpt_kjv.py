"""SSL on a small GPT (King James Bible, word level): heads, MLP neurons and width; perplexity, size, speed.

    python benchmarks/gpt_kjv.py [--recipe kjv_gpt_ssl] [--resume] [--from RECIPE]

1. Trains the recipe (dense baseline → SSL on ``head``/``neuron``/``embed`` groups → compact → fine-tune;
   checkpoints in ``runs/<recipe>``).
2. Controls at the same number of epochs as the SSL path (baseline + SSL + fine-tune), the baseline's
   optimizer and a cosine schedule over them: the dense GPT (``runs/<recipe>_dense_long``) and a direct design,
   a GPT with the compact model's width, heads and MLP neurons per block from scratch (``runs/<recipe>_direct``).
3. Speed, dense vs compact, timed in alternation in one run, 1 and 2 threads: ``(35, 20)`` token blocks
   (median latency) and greedy generation at batch 1 (tokens/s, 32 new tokens after a 16-token prompt).
"""

from __future__ import annotations

import math
import time

import torch
from _common import interleaved_latency, recipe_run, train, train_seconds, write
from torch import nn

from torchslim.train.recipes import apply_overrides, recipe_from_dict


def shape_of(model: nn.Module) -> dict[str, object]:
    """Width, heads and MLP neurons per block of a (compact) GPT."""
    return {"width": model.wte.embedding_dim,
            "n_head": [b.attn.q.out_features // b.attn.head_dim for b in model.blocks],
            "d_ff": [b.fc.out_features for b in model.blocks]}


def block_params(model: nn.Module) -> int:
    """Parameters of the blocks (attention and MLP, norms included): what SSL shrinks besides the width."""
    return sum(p.numel() for p in model.blocks.parameters())


def generation_speed(models: dict[str, nn.Module], threads: int, new: int = 32, repeats: int = 5) -> dict:
    """Greedy tokens/s at batch 1 (median of ``repeats``, models alternated)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    prompt = torch.randint(0, models["dense"].wte.num_embeddings, (16,), generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {k: [] for k in models}
    try:
        for _ in range(repeats + 1):
            for name, m in models.items():
                t0 = time.perf_counter()
                m.eval().generate(prompt, new)
                times[name].append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(previous)
    out = {k: new / sorted(v[1:])[len(v[1:]) // 2] for k, v in times.items()}  # the first round warms up
    return {"tokens_per_s": out, "speedup": out["compact"] / out["dense"]}


def _ppl(result, key: str, valid: bool = False) -> float:
    return math.exp((result.valid_loss if valid else result.loss)[key])


def main() -> None:
    args, result = recipe_run("kjv_gpt_ssl")
    recipe = args.recipe
    dense, small = result.dense_model.eval(), result.compact_model.eval()
    shape = shape_of(small)
    kwargs = [f"model.kwargs.width={shape['width']}", f"model.kwargs.n_head={shape['n_head']}",
              f"model.kwargs.d_ff={shape['d_ff']}"]
    epochs = recipe.baseline.epochs + recipe.ssl.epochs + recipe.finetune.epochs

    def dense_only(name: str, *overrides: str):
        return recipe_from_dict(apply_overrides(recipe.to_dict(), [f"name={recipe.name}_{name}", *overrides,
                                                                   f"baseline.epochs={epochs}", "ssl.epochs=0",
                                                                   "finetune.epochs=0"]))

    direct = train(dense_only("direct", *kwargs), args.resume)
    dense_long = train(dense_only("dense_long"), args.resume)

    speed = {}
    for threads in (1, 2):
        tokens = torch.randint(0, dense.wte.num_embeddings, (35, 20), generator=torch.Generator().manual_seed(0))
        lat = interleaved_latency({"dense": dense, "compact": small}, tokens, threads=threads)
        speed[f"threads{threads}_block35x20"] = {**lat, "speedup": lat["dense"]["median_ms"] / lat["compact"]["median_ms"]}
        speed[f"threads{threads}_generate"] = generation_speed({"dense": dense, "compact": small}, threads)
    data = {
        "recipe": recipe.to_dict(),
        "perplexity": {k: _ppl(result, k) for k in result.loss},
        "valid_perplexity": {k: _ppl(result, k, valid=True) for k in result.valid_loss},
        "control_epochs": epochs,
        "direct_design": {**shape, "perplexity": _ppl(direct, "baseline"),
                          "valid_perplexity": _ppl(direct, "baseline", valid=True)},
        "dense_long": {"perplexity": _ppl(dense_long, "baseline"),
                       "valid_perplexity": _ppl(dense_long, "baseline", valid=True)},
        "shape": {"dense": shape_of(dense), "compact": shape},
        "alive": result.history[-1 - recipe.finetune.epochs].alive if recipe.finetune.epochs else {},
        "block_params": {"dense": block_params(dense), "compact": block_params(small)},
        "params": {"dense": sum(p.numel() for p in dense.parameters()),
                   "compact": sum(p.numel() for p in small.parameters())},
        "speed": speed,
        "train_seconds": train_seconds(result) + train_seconds(direct) + train_seconds(dense_long),
    }
    data["block_reduction"] = data["block_params"]["dense"] / data["block_params"]["compact"]
    write(f"gpt_{recipe.name}", data)


if __name__ == "__main__":
    main()
