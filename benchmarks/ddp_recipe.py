"""A recipe trained data-parallel over an emulated link: N gloo processes per gradient mode, beside one process.

    sudo .venv/bin/python benchmarks/ddp_recipe.py [--recipe lenet_ssl_full] [--workers 4] [--rate 1gbit]
        [--grads fp32 fp16 powersgd terngrad] [--scaling 1 2 4] [--nodes 2] [--set KEY=VALUE ...] [--smoke]

Every run is `torchrun --standalone --nproc-per-node N -m torchslim train RECIPE --grad G` inside a fresh network
namespace whose loopback is capped at ``--rate`` (netlink.py), one thread per worker. Per mode: seconds per epoch
(median over the run's epochs), the compact model's test accuracy (perplexity for a word LM) and multiply-adds,
and the bytes that crossed ``lo`` per training step; the same recipe in one process (at ``--threads``) is the
reference. ``--scaling`` adds fp32 runs at those worker counts on an uncapped link. ``--nodes 2`` also trains
with two torchrun launches (``--nnodes 2``, c10d rendezvous on 127.0.0.1, one worker each) in the capped
namespace, as two machines would. Writes results/ddp_<recipe>.json (``ddp_<recipe>_smoke.json`` with ``--smoke``:
1024 images, one epoch a phase, 2 workers, every option exercised; a check that it runs, not a result).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from _common import RUNS, write
from netlink import exit_on_sigterm, launch_in, namespace

from torchslim import load_compact, profile
from torchslim.train.engine import example_inputs
from torchslim.train.recipes import load_recipe
from torchslim.train.tasks import is_text

TIMEOUT_S = 4 * 3600


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default="lenet_ssl_full", help="recipe to train (default: lenet_ssl_full)")
    p.add_argument("--workers", type=int, default=4, help="processes per run (default: 4)")
    p.add_argument("--rate", default="1gbit", help="loopback cap, a tc rate (default: 1gbit)")
    p.add_argument("--grads", nargs="+", default=["fp32", "fp16", "powersgd", "terngrad"],
                   help="gradient modes (default: fp32 fp16 powersgd terngrad)")
    p.add_argument("--scaling", nargs="*", type=int, default=[], metavar="N",
                   help="also fp32 at these worker counts, link uncapped (e.g. 1 2 4)")
    p.add_argument("--nodes", type=int, choices=(1, 2), default=1,
                   help="2: also two torchrun launches of one worker each, as two machines (default: 1)")
    p.add_argument("--threads", type=int, default=2, help="threads of the one-process reference (default: 2)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="recipe overrides for every run")
    p.add_argument("--smoke", action="store_true", help="tiny settings, every option: a quick check")
    return p


SMOKE = ["data.train_limit=1024", "data.test_limit=500", "baseline.epochs=1", "ssl.epochs=1", "finetune.epochs=1",
         "distributed.powersgd.warmup_steps=2"]


def main() -> None:
    args = _parser().parse_args()
    if args.smoke:
        args.overrides, args.workers, args.scaling, args.nodes = [*SMOKE, *args.overrides], 2, [1, 2], 2
    exit_on_sigterm()
    recipe = load_recipe(args.recipe, overrides=args.overrides)
    sets = [a for o in args.overrides for a in ("--set", o)]
    train = ["-m", "torchslim", "train", args.recipe, "--no-progress", "--overwrite", *sets]
    out = RUNS / f"ddp_{recipe.name}"
    rows = {"one process": _one_process(recipe, train, out / "one", args.threads)}
    with namespace(f"tsl-ddp-{os.getpid()}", rate=args.rate) as ns:
        for grad in args.grads:
            folder = out / f"{grad}_x{args.workers}"
            stderr, wall, lo = launch_in(ns, ["--standalone", "--nproc-per-node", str(args.workers)],
                                         [*train, "--grad", grad, "--out", str(folder)], TIMEOUT_S)
            rows[grad] = _row(recipe, folder, wall, lo.tx)
            print(grad, json.dumps(rows[grad]), flush=True)
        if args.nodes == 2:
            rows["terngrad, two launches of 1 worker"] = _two_launches(ns, recipe, train, out / "two_launches")
    scaling = {}
    with namespace(f"tsl-ddp-free-{os.getpid()}") as free:
        for n in args.scaling:
            folder = out / f"fp32_free_x{n}"
            stderr, wall, lo = launch_in(free, ["--standalone", "--nproc-per-node", str(n)],
                                         [*train, "--grad", "fp32", "--out", str(folder)], TIMEOUT_S)
            scaling[str(n)] = _row(recipe, folder, wall, lo.tx)
    write(f"ddp_{recipe.name}" + "_smoke" * args.smoke,
          {"recipe": recipe.to_dict(), "workers": args.workers, "rate": args.rate, "rows": rows, "scaling": scaling,
           "cores": os.cpu_count(), "smoke": args.smoke})


def _one_process(recipe, train: list[str], folder: Path, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    began = time.perf_counter()
    subprocess.run([sys.executable, *train, "--out", str(folder)], check=True, env=env)
    return _row(recipe, folder, time.perf_counter() - began, 0)


def _two_launches(ns, recipe, train: list[str], folder: Path) -> dict:
    """Two torchrun launches, node ranks 0 and 1, one worker each: two "machines" sharing the capped link."""
    rdzv = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:29517"]
    program = [*train, "--grad", "terngrad", "--out", str(folder)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    began = time.perf_counter()
    second = subprocess.Popen(ns.argv([str(Path(sys.executable).parent / "torchrun"), *rdzv, "--node-rank", "1",
                                       *program]), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True)
    _, _, lo = launch_in(ns, [*rdzv, "--node-rank", "0"], program, TIMEOUT_S)
    if second.wait(timeout=600) != 0:
        raise RuntimeError(f"node rank 1 failed:\n{second.stderr.read()[-4000:]}")
    return {**_row(recipe, folder, time.perf_counter() - began, lo.tx), "launches": 2}


def _row(recipe, folder: Path, wall: float, lo_bytes: int) -> dict:
    """What one run measured, from its results.json and compact.pt."""
    results = json.loads((folder / "results.json").read_text())
    epochs = [r["seconds"] for r in results["history"]]
    steps = len(epochs) * results["distributed"]["steps_per_epoch"] if results.get("distributed") else None
    small = load_compact(folder / "compact.pt")
    metric = "perplexity" if is_text(recipe) else "accuracy"
    return {
        "wall_s": wall, "epoch_s_median": statistics.median(epochs), "epochs": len(epochs),
        metric: results[metric], "compact_macs": profile(small, example_inputs(recipe, 1), latency=False).macs,
        "compact_params": results["params"]["compact"], "lo_bytes": lo_bytes,
        "lo_bytes_per_step": lo_bytes / steps if steps else None, "distributed": results.get("distributed"),
    }


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
