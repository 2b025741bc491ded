"""A recipe end to end (SSL, ISS, force + low rank): accuracy, structure, FLOPs, CPU speedup.

    python benchmarks/ssl_recipe.py --recipe lenet_ssl_full [--resume]
    python benchmarks/ssl_recipe.py --recipe mlp_ssl
    python benchmarks/ssl_recipe.py --recipe lenet_force_lowrank      # also writes the per-layer ranks

Trains baseline → SSL → compact → fine-tune with ``recipes/<recipe>.yaml`` (checkpoints in
``runs/<recipe>``, so ``--resume`` continues an interrupted run), then times the dense baseline and
the compacted model in alternation, at batch 1 and 64, with 1 and 2 threads, in PyTorch (eager) and
in onnxruntime.
"""

from __future__ import annotations

import torch
from _common import RESULTS, interleaved_latency, interleaved_onnx_latency, recipe_run, train_seconds, write

from torchslim import compact, structures
from torchslim.deploy.profile import profile
from torchslim.train.plots import plot_history


def conv_macs(model: torch.nn.Module, x: torch.Tensor) -> int:
    return sum(layer.macs for layer in profile(model, x, latency=False).layers if "Conv" in layer.type)


def main() -> None:
    args, result = recipe_run("lenet_ssl_full")
    recipe = args.recipe
    dense, small = result.dense_model.eval(), result.compact_model.eval()
    x1 = result.example[:1]
    lowered = compact(result.sparse_model, result.example, shapes="lowered")
    p_dense, p_small = profile(dense, x1, latency=False), profile(small, x1, latency=False)
    speed, speed_onnx = {}, {}
    for threads in (1, 2):
        for batch in (1, 64):
            x = torch.randn(batch, *x1.shape[1:])
            lat = interleaved_latency({"dense": dense, "compact": small, "lowered": lowered}, x, threads=threads)
            speed[f"threads{threads}_batch{batch}"] = {
                **lat, "speedup": lat["dense"]["median_ms"] / lat["compact"]["median_ms"],
                "speedup_lowered": lat["dense"]["median_ms"] / lat["lowered"]["median_ms"]}
            onnx = interleaved_onnx_latency({"dense": dense, "compact": small}, x, threads=threads)
            speed_onnx[f"threads{threads}_batch{batch}"] = {
                **onnx, "speedup": onnx["dense"]["median_ms"] / onnx["compact"]["median_ms"]}
    branches = structures(result.sparse_model, result.example, kinds=("depth",))  # residual branches (SSL depth)
    layers = [{"name": s.name, "filters": [s.filters_alive, s.filters_total],
               "channels": [s.channels_alive, s.channels_total], "shape": [s.shape_alive, s.shape_total],
               "macs_kept": s.macs_sparse / s.macs_dense} for s in result.report.layers]
    data = {
        "recipe": recipe.to_dict(),
        "accuracy": result.accuracy,
        "layers": layers,
        "compact_layers": [{"name": s.name, "type": s.type, "macs": s.macs} for s in p_small.layers if s.macs],
        "params": {"dense": p_dense.params, "compact": p_small.params},
        "macs": {"dense": p_dense.macs, "compact": p_small.macs},
        "conv_macs": {"dense": conv_macs(dense, x1), "compact": conv_macs(small, x1)},
        "flop_reduction": p_dense.macs / p_small.macs,
        "conv_flop_reduction": conv_macs(dense, x1) / max(1, conv_macs(small, x1)),
        "history_plot": plot_history(result.history, RESULTS / f"ssl_{recipe.name}_history.png",
                                     title=f"{recipe.name}: accuracy, sparsity and groups alive per epoch").name,
        "speed": speed,
        "speed_onnxruntime": speed_onnx,
        "valid_accuracy": result.valid_accuracy,
        "lowrank": result.lowrank,
        "branches": {"total": len(branches), "removed": sum(not bool(g.norm()) for g in branches)},
        "train_seconds": train_seconds(result),
    }
    write(f"ssl_{recipe.name}", data)


if __name__ == "__main__":
    main()
