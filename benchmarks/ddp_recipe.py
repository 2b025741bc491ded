"""A recipe trained data-parallel over an emulated link: N gloo processes per gradient mode, beside one process.

    sudo .venv/bin/python benchmarks/ddp_recipe.py [--recipe lenet_ssl_full] [--workers 4] [--rate 1gbit]
        [--grads fp32 fp16 powersgd terngrad] [--scaling 1 2 4] [--nodes 2] [--passes timing quality]
        [--timing-epochs 1] [--set KEY=VALUE ...] [--fresh] [--smoke]

Every run is `torchrun --standalone --nproc-per-node N -m torchslim train RECIPE --grad G` inside a fresh network
namespace (netlink.py), one thread per worker; the reference is the same recipe in one process (at ``--threads``).
Two passes, because speed must be compared within one sitting on one machine while the full recipe of every mode
takes longer than one:

* **timing**: every phase cut to ``--timing-epochs`` epochs, the loopback capped at ``--rate``, all modes and the
  one-process reference in one go. Per mode: training seconds per epoch (median over the run's epochs; evaluation
  left out) and the bytes that crossed ``lo`` per training step. ``--scaling`` adds fp32 at those worker counts on
  an uncapped link; ``--nodes 2`` trains TernGrad with two torchrun launches (``--nnodes 2``, c10d rendezvous on
  127.0.0.1, one worker each) in the capped namespace, as two machines would, beside one launch of 2 workers.
* **quality**: the full recipe per mode, link uncapped (the link changes the time, not the result): the compact
  model's test accuracy (perplexity for a word LM) and multiply-adds. Each finished run is saved into the result
  file at once, with its machine, and a later invocation skips the runs already there (``--fresh`` redoes them),
  so the pass may span sittings.

Writes results/ddp_<recipe>.json (``ddp_<recipe>_smoke.json`` with ``--smoke``: 1024 images, one epoch a phase,
2 workers, every option exercised; a check that it runs, not a result).
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
from typing import Any, Callable

import torch
from _common import RESULTS, RUNS, write
from netlink import exit_on_sigterm, launch_in, namespace, train_in

from torchslim import load_compact, profile
from torchslim.deploy.profile import machine_info
from torchslim.train.engine import example_inputs
from torchslim.train.recipes import Recipe, load_recipe
from torchslim.train.tasks import is_text

TIMEOUT_S = 6 * 3600
PHASES = ("baseline", "ssl", "finetune")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default="lenet_ssl_full", help="recipe to train (default: lenet_ssl_full)")
    p.add_argument("--workers", type=int, default=4, help="processes per run (default: 4)")
    p.add_argument("--rate", default="1gbit", help="loopback cap of the timing pass, a tc rate (default: 1gbit)")
    p.add_argument("--grads", nargs="+", default=["fp32", "fp16", "powersgd", "terngrad"],
                   help="gradient modes (default: fp32 fp16 powersgd terngrad)")
    p.add_argument("--scaling", nargs="*", type=int, default=[], metavar="N",
                   help="timing pass: also fp32 at these worker counts, link uncapped (e.g. 1 2 4)")
    p.add_argument("--nodes", type=int, choices=(1, 2), default=1,
                   help="2: timing pass also trains with two torchrun launches of one worker each (default: 1)")
    p.add_argument("--passes", nargs="+", choices=("timing", "quality"), default=["timing", "quality"])
    p.add_argument("--timing-epochs", type=int, default=1, help="epochs of each phase in the timing pass")
    p.add_argument("--threads", type=int, default=2, help="threads of the one-process reference (default: 2)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="recipe overrides for every run")
    p.add_argument("--fresh", action="store_true", help="redo the quality runs a result file already holds")
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
    stem = f"ddp_{recipe.name}" + "_smoke" * args.smoke
    previous = _previous(RESULTS / f"{stem}.json", recipe, args)
    data: dict[str, Any] = {"recipe": recipe.to_dict(), "workers": args.workers, "rate": args.rate,
                            "cores": os.cpu_count(), "smoke": args.smoke, "timing": previous.get("timing"),
                            "quality": previous.get("quality") or {}}
    train = [args.recipe, *(a for o in args.overrides for a in ("--set", o))]  # `torchslim train` args, recipe first
    out = RUNS / stem
    if "timing" in args.passes:
        data["timing"] = _timing(recipe, train, out / "timing", args)
        write(stem, data)
    if "quality" in args.passes:
        labels = ["one process", *args.grads]
        for label in labels:
            if label in data["quality"]:
                print(f"quality: {label} kept from {data['quality'][label]['date']}", flush=True)
                continue
            if label == "one process":
                row = _one_process(recipe, train, out / "one", args.threads)
            else:
                with namespace(f"tsl-ddp-{os.getpid()}") as free:
                    row = _torchrun(free, recipe, train, out / f"{label}_x{args.workers}", args.workers, label)
            data["quality"][label] = {**_quality(recipe, row), "machine": machine_info(),
                                      "date": time.strftime("%Y-%m-%d")}
            print("quality", label, json.dumps(data["quality"][label]), flush=True)
            write(stem, data)  # a sitting that ends here keeps what it finished


def _previous(path: Path, recipe: Recipe, args: argparse.Namespace) -> dict[str, Any]:
    """What an earlier invocation measured for this very recipe and worker count (nothing with ``--fresh``)."""
    if args.fresh or not path.exists():
        return {}
    old = json.loads(path.read_text())
    if old.get("recipe") != recipe.to_dict() or old.get("workers") != args.workers:
        print(f"{path} holds another recipe or worker count: starting afresh", flush=True)
        return {}
    return old


def _timing(recipe: Recipe, train: list[str], out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Every mode over the capped link and the one-process reference, each phase cut to ``--timing-epochs``."""
    cut = [a for phase in PHASES if getattr(recipe, phase).epochs > 0
           for a in ("--set", f"{phase}.epochs={args.timing_epochs}")]
    train = [*train, *cut]
    rows = {"one process": _one_process(recipe, train, out / "one", args.threads)}
    with namespace(f"tsl-ddp-{os.getpid()}", rate=args.rate) as ns:
        for grad in args.grads:
            rows[grad] = _torchrun(ns, recipe, train, out / f"{grad}_x{args.workers}", args.workers, grad)
            print("timing", grad, json.dumps(rows[grad]), flush=True)
        two = None
        if args.nodes == 2:
            one_launch = _torchrun(ns, recipe, train, out / "terngrad_x2", 2, "terngrad")
            two = {**_two_launches(ns, recipe, train, out / "two_launches"), "one_launch": one_launch}
            two["matches_one_launch"] = _same_result(two, one_launch, recipe)
    scaling = {}
    with namespace(f"tsl-ddp-free-{os.getpid()}") as free:
        for n in args.scaling:
            scaling[str(n)] = _torchrun(free, recipe, train, out / f"fp32_free_x{n}", n, "fp32")
    return {"overrides": [c for c in cut if c != "--set"], "rows": rows, "scaling": scaling, "two_launches": two,
            "machine": machine_info(), "date": time.strftime("%Y-%m-%d")}


def _torchrun(ns, recipe: Recipe, train: list[str], folder: Path, workers: int, grad: str) -> dict[str, Any]:
    run = train_in(ns, workers, train[0], [*train[1:], "--grad", grad], TIMEOUT_S, out=folder)
    return _row(recipe, folder, run.wall_s, run.lo.tx)


def _program(train: list[str], folder: Path) -> list[str]:
    """``python -m torchslim train ...`` arguments writing to ``folder``, as :func:`netlink.train_in` builds them."""
    return ["-m", "torchslim", "train", *train, "--no-progress", "--overwrite", "--out", str(folder)]


def _one_process(recipe: Recipe, train: list[str], folder: Path, threads: int) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    began = time.perf_counter()
    subprocess.run([sys.executable, *_program(train, folder)], check=True, env=env)
    return _row(recipe, folder, time.perf_counter() - began, 0)


def _two_launches(ns, recipe: Recipe, train: list[str], folder: Path) -> dict[str, Any]:
    """Two torchrun launches, node ranks 0 and 1, one worker each: two "machines" sharing the capped link."""
    rdzv = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:29517"]
    program = [*_program(train, folder), "--grad", "terngrad"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    began = time.perf_counter()
    second = subprocess.Popen(ns.argv([str(Path(sys.executable).parent / "torchrun"), *rdzv, "--node-rank", "1",
                                       *program]), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True)
    _, _, lo = launch_in(ns, [*rdzv, "--node-rank", "0"], program, TIMEOUT_S)
    if second.wait(timeout=600) != 0:
        raise RuntimeError(f"node rank 1 failed:\n{second.stderr.read()[-4000:]}")
    return {**_row(recipe, folder, time.perf_counter() - began, lo.tx), "launches": 2}


def _same_result(a: dict[str, Any], b: dict[str, Any], recipe: Recipe) -> bool:
    """Whether two runs of the same recipe and processes ended with the same model: metric and sizes."""
    return all(a[k] == b[k] for k in (_metric(recipe), "compact_params", "compact_macs"))


def _metric(recipe: Recipe) -> str:
    return "perplexity" if is_text(recipe) else "accuracy"


def _row(recipe: Recipe, folder: Path, wall: float, lo_bytes: int) -> dict[str, Any]:
    """What one run measured, from its results.json and compact.pt."""
    results = json.loads((folder / "results.json").read_text())
    history = results["history"]
    steps = len(history) * results["distributed"]["steps_per_epoch"] if results.get("distributed") else None
    small = load_compact(folder / "compact.pt")
    median: Callable[[str], float] = lambda key: statistics.median(r[key] for r in history)  # noqa: E731
    return {
        "wall_s": wall, "epoch_s_median": median("seconds"), "train_s_median": median("train_seconds"),
        "epochs": len(history), _metric(recipe): results[_metric(recipe)],
        "compact_macs": profile(small, example_inputs(recipe, 1), latency=False).macs,
        "compact_params": results["params"]["compact"], "lo_bytes": lo_bytes,
        "lo_bytes_per_step": lo_bytes / steps if steps else None, "distributed": results.get("distributed"),
    }


def _quality(recipe: Recipe, row: dict[str, Any]) -> dict[str, Any]:
    keep = (_metric(recipe), "compact_macs", "compact_params", "epochs", "wall_s", "distributed")
    return {k: row[k] for k in keep}


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
