"""End-to-end training speed of an FC-heavy model over slow links: TernGrad vs fp32 vs the fp16 hook.

    python benchmarks/terngrad_speed.py [--rates none 1gbit 10gbit] [--steps 6] [--epochs 4] [--smoke]

``fcnet`` (AlexNet's 4096-4096 classifier, 20.0M parameters) trains with 4 workers
(``torchrun -m torchslim train lenet_terngrad --set model.name=fcnet``, batch 64 per worker) inside a network
namespace whose ``lo`` is capped by tbf at each ``--rates`` entry (``none``: unthrottled). Each run trains
``--epochs`` epochs of ``--steps`` steps; the step time is the median over the epochs after the first (DDP
builds its buckets in the first) of the epoch's training seconds over its steps (results.json's
``train_seconds``: evaluation and the replica check left out).

The cap is on ``lo``, which all workers share: at 1 Gbit/s the four workers together move 1 Gbit/s,
the volume a ring over 4 switched links of 250 Mbit/s moves (run ``4gbit`` for 1 Gbit/s per worker).

An analytic model explains the numbers. ``V`` is what all workers send per step (N times the ring formula
of terngrad_wire.py, which that benchmark checks against ``lo``); the compute of a step, codec included, is
the unthrottled step less its transfer, ``c = T(none) − 8V/B(none)``, and at link rate ``B``:

    T(B) ≈ c + 8V/B

TernGrad stops paying at the bandwidth ``B*`` where ``T_terngrad(B*) = T_fp32(B*)``:
``B* = 8(V_fp32 − V_terngrad) / (c_terngrad − c_fp32)``. With N one-thread workers on C cores a step computes
for ``(N/C)·t1``; the same rule with ``t1 = c·C/N`` and one worker's volume gives ``B*`` for a cluster with
one core and one link per worker.

Writes ``benchmarks/results/terngrad_speed.json`` (``terngrad_speed_smoke.json`` with ``--smoke``).
"""

from __future__ import annotations

import argparse
import os
import statistics

from _common import write
from netlink import exit_on_sigterm, link_bits_per_second, namespace, rate_bits, train_in
from terngrad_wire import RECIPE, VARIANTS, theory_bytes, train_args


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a torchslim.models name (default: fcnet; lenet with --smoke)")
    p.add_argument("--rates", nargs="+", default=["none", "1gbit", "10gbit"], help="tc rates; none = no cap")
    p.add_argument("--variants", nargs="+", default=["fp32", "fp16", "terngrad-base3"], choices=list(VARIANTS))
    p.add_argument("--world-size", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=64, help="examples per worker per step")
    p.add_argument("--steps", type=int, default=6, help="steps per epoch")
    p.add_argument("--epochs", type=int, default=4, help="epochs per run; all but the first are timed")
    p.add_argument("--timeout", type=float, default=1800, help="seconds allowed per torchrun launch")
    p.add_argument("--smoke", action="store_true", help="LeNet (unless --model), 2 epochs of 2 steps, no 10gbit")
    return p


def main() -> None:
    args = _parser().parse_args()
    exit_on_sigterm()
    args.model = args.model or ("lenet" if args.smoke else "fcnet")
    if args.smoke:
        args.steps, args.epochs = 2, 2
        args.rates = [r for r in args.rates if r != "10gbit"]
    rates = {}
    for rate in args.rates:
        cap = None if rate == "none" else rate
        with namespace(f"tsl-speed-{os.getpid()}", rate=cap) as ns:
            link = link_bits_per_second(ns, int(max(50e6, (rate_bits(cap) if cap else 16e9) / 16)))
            runs = {v: _timed_run(ns, v, args) for v in args.variants}
        rates[rate] = {"link_gbps_measured": link / 1e9, "runs": runs}
        for v, r in runs.items():
            print(f"{rate:7} {v:15} {r['steps_per_second']:.3f} steps/s ({r['median_step_s'] * 1e3:.0f} ms/step)",
                  flush=True)
    _add_speedups(rates)
    cores = os.cpu_count() or 1
    volume = {v: args.world_size * theory_bytes(args.model, args.world_size, v) for v in args.variants}
    write("terngrad_speed_smoke" if args.smoke else "terngrad_speed", {
        "smoke": args.smoke, "model": args.model, "recipe": RECIPE, "world_size": args.world_size, "cores": cores,
        "batch_size_per_worker": args.batch_size, "steps_per_epoch": args.steps, "epochs": args.epochs,
        "link": "tbf on the namespace's lo, shared by all workers (aggregate cap)",
        "rates": rates, "analytic": _analytic_model(volume, rates, args.world_size, cores) if "none" in rates else None,
    })


def _timed_run(ns, variant: str, args: argparse.Namespace) -> dict:
    """One launch; the median over its timed epochs of the seconds per training step."""
    run = train_in(ns, args.world_size, RECIPE, train_args(args.model, args.world_size, variant, args.steps,
                                                           args.batch_size, args.epochs), args.timeout)
    per_step = [t / args.steps for t in run.train_seconds(skip=1)]
    if not per_step:
        raise SystemExit(f"--epochs {args.epochs} leaves no timed epoch after the first; raise --epochs")
    median = statistics.median(per_step)
    return {"median_step_s": median, "steps_per_second": 1 / median, "epoch_step_s": per_step,
            "lo_tx_bytes": run.lo.tx, "failed_launches": list(run.failed_attempts)}


def _add_speedups(rates: dict) -> None:
    """``speedup_vs_fp32``: steps/s over fp32's at the same rate."""
    for r in rates.values():
        base = r["runs"].get("fp32", {}).get("steps_per_second")
        for run in r["runs"].values():
            run["speedup_vs_fp32"] = run["steps_per_second"] / base if base else None


def _analytic_model(volume: dict, rates: dict, world: int, cores: int) -> dict:
    """``T(B) ≈ c + 8V/B`` against the measurements, ``c`` from the unthrottled runs, and the break-even
    bandwidths ``B*``."""
    free = rates["none"]
    compute = {v: run["median_step_s"] - 8 * volume[v] / (free["link_gbps_measured"] * 1e9)
               for v, run in free["runs"].items()}
    share = world / min(cores, world)                       # N/C: CPU time-sharing of one-thread workers
    predicted = {rate: {v: {"compute_s": compute[v], "link_s": 8 * volume[v] / (r["link_gbps_measured"] * 1e9),
                            "predicted_step_s": compute[v] + 8 * volume[v] / (r["link_gbps_measured"] * 1e9),
                            "measured_step_s": run["median_step_s"]}
                        for v, run in r["runs"].items()}
                 for rate, r in rates.items()}
    return {
        "formula": "T(B) = c + 8*V/B, V = all workers' bytes per step (ring formulas), c = T(none) - 8V/B(none)",
        "cpu_share_N_over_C": share, "volume_bytes_per_step": volume, "compute_s": compute, "predicted": predicted,
        "break_even_gbps": {v: _break_even(compute, volume, "fp32", v, 1.0, 1.0) for v in compute if v != "fp32"},
        "break_even_gbps_per_worker_link": {v: _break_even(compute, volume, "fp32", v, share, world)
                                            for v in compute if v != "fp32"},
    }


def _break_even(compute: dict, volume: dict, base: str, variant: str, share: float, links: float) -> float | None:
    """Bandwidth (Gbit/s per link) above which ``variant`` is slower than ``base``; None: never (or no base).

    ``share`` divides the measured compute (N/C: one core per worker); ``links`` links carry the volume in
    parallel (1: the shared lo; N: one per worker).
    """
    if base not in compute:
        return None
    extra_compute = (compute[variant] - compute[base]) / share
    saved_bits = 8 * (volume[base] - volume[variant]) / links
    if extra_compute <= 0:
        return None                                         # no compute overhead: compression always pays
    return saved_bits / extra_compute / 1e9


if __name__ == "__main__":
    main()
