"""GroupLasso's cost per training step, as a ratio to the step itself (LeNet, batch 64, CPU).

    python benchmarks/lasso_overhead.py

Times, in one run and interleaved, a plain SGD step and the same step plus (a) the proximal step
``lasso.step_(lr)`` and (b) the penalty in the loss (subgradient mode), with the groups of the demo
recipe (coupled channels, neurons and shape fibers).
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from _common import write

from torchslim import GroupLasso, structures
from torchslim.models import create_model

THREADS, BATCH, REPEATS = 2, 64, 60


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(THREADS)
    model = create_model("lenet")
    x, y = torch.randn(BATCH, 1, 28, 28), torch.randint(0, 10, (BATCH,))
    groups = structures(model, x, kinds=("channel", "neuron", "shape"))
    prox = GroupLasso(groups, 1e-6, weight_by_size=True)
    sub = GroupLasso(groups, 1e-6, weight_by_size=True, mode="subgradient", threshold=0.0)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def step(variant: str) -> None:
        loss = F.cross_entropy(model(x), y)
        if variant == "penalty":
            loss = loss + sub.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if variant == "prox":
            prox.step_(1e-4)

    times = {v: [] for v in ("plain", "prox", "penalty")}
    for _ in range(5):
        for v in times:
            step(v)
    for _ in range(REPEATS):
        for v in times:
            t0 = time.perf_counter()
            step(v)
            times[v].append(time.perf_counter() - t0)
    prox_alone = []
    for _ in range(REPEATS):  # the prox step by itself: the differential above is within noise
        t0 = time.perf_counter()
        prox.step_(1e-4)
        prox_alone.append(time.perf_counter() - t0)
    med = {v: statistics.median(t) * 1e3 for v, t in times.items()}
    med["prox_alone"] = statistics.median(prox_alone) * 1e3
    overhead = {v: (med[v] - med["plain"]) / med["plain"] for v in ("prox", "penalty")}
    overhead["prox_alone"] = med["prox_alone"] / med["plain"]
    print(f"step {med['plain']:.2f} ms; prox alone {overhead['prox_alone']:.1%} of a step "
          f"(differential {overhead['prox']:+.1%}); penalty {overhead['penalty']:+.1%}")
    write("lasso_overhead", {
        "model": "lenet", "batch_size": BATCH, "threads": THREADS, "repeats": REPEATS,
        "groups": len(groups), "step_ms": med, "overhead": overhead,
    })


if __name__ == "__main__":
    main()
