"""Every torchvision classifier through ``structures`` + ``compact``: exact, and how much is removable.

    python benchmarks/zoo_exactness.py [--models resnet18 vit_b_16 ...] [--fraction 0.3]

For each model (weights=None, random BatchNorm statistics, eval mode): find the channel and neuron
groups (also with ``strict=True``, to name the operation that stops the tracer where one does), zero a
random ``--fraction`` of them, compact, and compare outputs on fresh random inputs. Inputs are 64×64
(224 for the transformers, 299 for Inception). Writes ``benchmarks/results/zoo_exactness.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch
import torchvision
from _common import write

from torchslim import compact, structures, verify
from torchslim.errors import TorchSlimError

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from nets import randomize_bn  # noqa: E402


def _size(name: str) -> int:
    if name.startswith("inception"):
        return 299
    return 224 if name.startswith(("vit", "swin", "maxvit")) else 64


def _row(name: str, fraction: float) -> dict:
    torch.manual_seed(0)
    model = randomize_bn(torchvision.models.get_model(name, weights=None)).eval()
    x = torch.randn(2, 3, _size(name), _size(name))
    t0 = time.perf_counter()
    groups = structures(model, x, kinds=("channel", "neuron"))
    t_structures = time.perf_counter() - t0
    try:
        structures(model, x, kinds=("channel", "neuron"), strict=True)
        stops = None
    except TorchSlimError as e:
        stops = str(e).split(". Its input")[0]
    outputs = sum(m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)) + \
        sum(m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))
    gen = torch.Generator().manual_seed(0)
    for i in torch.randperm(len(groups), generator=gen)[: int(fraction * len(groups))]:
        groups[i].zero_()
    t0 = time.perf_counter()
    small = compact(model, x)
    t_compact = time.perf_counter() - t0
    report = verify(model, small, torch.randn_like(x), atol=1e-4)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return {"model": name, "input": list(x.shape), "groups": len(groups), "layer_outputs": outputs,
            "strict_stops_at": stops, "params": [n(model), n(small)], "max_abs_diff": report.max_abs_diff,
            "output_scale": report.scale, "exact": report.ok, "structures_s": t_structures, "compact_s": t_compact}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=torchvision.models.list_models(module=torchvision.models))
    ap.add_argument("--fraction", type=float, default=0.3, help="share of the groups zeroed at random")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(1)
    rows = []
    for name in args.models:
        try:
            rows.append(_row(name, args.fraction))
        except Exception as e:  # a failure is a result here: record it and go on
            rows.append({"model": name, "error": f"{type(e).__name__}: {e}"[:400]})
        r = rows[-1]
        print(name, "ERROR " + r["error"] if "error" in r else
              f"groups {r['groups']}, exact {r['exact']}, params {r['params'][0]:,} -> {r['params'][1]:,}, "
              f"strict: {r['strict_stops_at'] or 'ok'}", flush=True)
    write("zoo_exactness", {"fraction_zeroed": args.fraction, "threads": 1, "rows": rows})


if __name__ == "__main__":
    main()
