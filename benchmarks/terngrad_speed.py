"""End-to-end training speed of an FC-heavy model over slow links: TernGrad vs fp32 vs the fp16 hook.

    python benchmarks/terngrad_speed.py [--rates none 1gbit 10gbit] [--steps 20] [--smoke]

``fcnet`` (AlexNet's 4096-4096 classifier, 20.0M parameters) trains with 4 workers inside a network
namespace whose ``lo`` is capped by tbf at each ``--rates`` entry (``none``: unthrottled). Step time is
the median interval between rank 0's per-step log lines (``--log-every 1``, millisecond stamps) after
``--warmup`` steps, so process start-up, DDP's bucket rebuild and the final evaluation are left out.

The cap is on ``lo``, which all workers share: at 1 Gbit/s the four workers together move 1 Gbit/s,
the volume a ring over 4 switched links of 250 Mbit/s moves (run ``4gbit`` for 1 Gbit/s per worker).

An analytic model explains the numbers. ``t1`` is the step time of one worker alone (world 1, same
hook, so TernGrad's encode and decode are in it), measured here too; with N one-thread workers on C
cores each step computes for about ``(N/C)·t1``, and the link must carry every worker's bytes,
``V = N · bytes_sent_per_step`` (the hook's ring accounting, which terngrad_wire.py checks against lo):

    T(B) ≈ (N/C)·t1 + 8V / B

TernGrad stops paying at the bandwidth ``B*`` where ``T_terngrad(B*) = T_fp32(B*)``:
``B* = 8(V_fp32 − V_terngrad) / ((N/C)(t1_terngrad − t1_fp32))``. The same rule with ``N/C = 1`` and the
per-worker volume gives ``B*`` for a cluster with one core per worker and one link per worker.

Writes ``benchmarks/results/terngrad_speed.json`` (``terngrad_speed_smoke.json`` with ``--smoke``).
"""

from __future__ import annotations

import argparse
import os
import statistics

from _common import write
from netlink import exit_on_sigterm, link_bits_per_second, namespace, rate_bits, torchrun_in
from terngrad_wire import VARIANTS


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a torchslim.models name (default: fcnet; lenet with --smoke)")
    p.add_argument("--rates", nargs="+", default=["none", "1gbit", "10gbit"], help="tc rates; none = no cap")
    p.add_argument("--variants", nargs="+", default=["fp32", "fp16", "terngrad-base3"], choices=list(VARIANTS))
    p.add_argument("--world-size", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=64, help="examples per worker per step")
    p.add_argument("--steps", type=int, default=20, help="steps per run; intervals after --warmup are timed")
    p.add_argument("--warmup", type=int, default=4, help="step intervals left out at the start")
    p.add_argument("--compute-steps", type=int, default=20, help="steps of the world-1 runs (t1)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds allowed per torchrun launch")
    p.add_argument("--smoke", action="store_true", help="LeNet (unless --model), 4 steps, no 10gbit: a quick check")
    return p


def main() -> None:
    args = _parser().parse_args()
    exit_on_sigterm()
    args.model = args.model or ("lenet" if args.smoke else "fcnet")
    if args.smoke:
        args.steps, args.warmup, args.compute_steps = 4, 1, 4
        args.rates = [r for r in args.rates if r != "10gbit"]
    cores = os.cpu_count() or 1
    compute = {}
    with namespace(f"tsl-speed-c-{os.getpid()}") as ns:
        for variant in args.variants:
            compute[variant] = _timed_run(ns, 1, variant, args.compute_steps, args)
            print(f"world 1 {variant:15} t1 = {compute[variant]['median_step_s'] * 1e3:.0f} ms", flush=True)
    rates = {}
    for rate in args.rates:
        cap = None if rate == "none" else rate
        with namespace(f"tsl-speed-{os.getpid()}", rate=cap) as ns:
            link = link_bits_per_second(ns, int(max(50e6, (rate_bits(cap) if cap else 16e9) / 16)))
            runs = {v: _timed_run(ns, args.world_size, v, args.steps, args) for v in args.variants}
        rates[rate] = {"link_gbps_measured": link / 1e9, "runs": runs}
        for v, r in runs.items():
            print(f"{rate:7} {v:15} {r['steps_per_second']:.3f} steps/s ({r['median_step_s'] * 1e3:.0f} ms/step)",
                  flush=True)
    _add_speedups(rates)
    model = _analytic_model(compute, rates, args.world_size, cores)
    write("terngrad_speed_smoke" if args.smoke else "terngrad_speed", {
        "smoke": args.smoke, "model": args.model, "world_size": args.world_size, "cores": cores,
        "batch_size_per_worker": args.batch_size, "steps": args.steps, "warmup": args.warmup,
        "link": "tbf on the namespace's lo, shared by all workers (aggregate cap)",
        "compute_world1": compute, "rates": rates, "analytic": model,
    })


def _timed_run(ns, world: int, variant: str, steps: int, args: argparse.Namespace) -> dict:
    """One launch; the median of rank 0's step intervals after the warm-up."""
    run = torchrun_in(ns, world, [
        "--model", args.model, *VARIANTS[variant], "--steps", str(steps), "--batch-size", str(args.batch_size),
        "--log-every", "1", "--train-limit", str(max(4096, 2 * world * args.batch_size)), "--test-limit", "500",
    ], args.timeout)
    times = [b.time - a.time for a, b in zip(run.steps, run.steps[1:])][args.warmup:]
    if not times:
        raise SystemExit(f"--steps {steps} leaves no step interval after --warmup {args.warmup}; raise --steps")
    median = statistics.median(times)
    ordered = sorted(times)
    return {
        "median_step_s": median, "steps_per_second": 1 / median, "timed_steps": len(times),
        "p10_step_s": ordered[len(ordered) // 10], "p90_step_s": ordered[(len(ordered) * 9) // 10],
        "summary_steps_per_second": run.summary["steps_per_second"],   # whole loop, step 0 included
        "bytes_sent_per_step": run.summary["bytes_sent_per_step"],     # per worker, ring accounting
        "lo_tx_bytes": run.lo.tx, "failed_launches": list(run.failed_attempts),
    }


def _add_speedups(rates: dict) -> None:
    """``speedup_vs_fp32``: steps/s over fp32's at the same rate."""
    for r in rates.values():
        base = r["runs"].get("fp32", {}).get("steps_per_second")
        for run in r["runs"].values():
            run["speedup_vs_fp32"] = run["steps_per_second"] / base if base else None


def _analytic_model(compute: dict, rates: dict, world: int, cores: int) -> dict:
    """``T(B) ≈ (N/C)·t1 + 8V/B`` against the measurements, and the break-even bandwidths ``B*``."""
    share = world / min(cores, world)                       # N/C: CPU time-sharing of one-thread workers
    volume = {v: world * c["bytes_sent_per_step"] for v, c in compute.items()}  # world-1 runs send 0
    for r in rates.values():
        for v, run in r["runs"].items():
            volume[v] = world * run["bytes_sent_per_step"]
    predicted = {}
    for rate, r in rates.items():
        bits = r["link_gbps_measured"] * 1e9
        predicted[rate] = {v: {"compute_s": share * compute[v]["median_step_s"], "link_s": 8 * volume[v] / bits,
                               "predicted_step_s": share * compute[v]["median_step_s"] + 8 * volume[v] / bits,
                               "measured_step_s": run["median_step_s"]}
                           for v, run in r["runs"].items() if v in compute}
    return {
        "formula": "T(B) = (N/C)*t1 + 8*V/B, V = N*bytes_sent_per_step (all workers share the link)",
        "cpu_share_N_over_C": share, "volume_bytes_per_step": volume, "predicted": predicted,
        "break_even_gbps": {v: _break_even(compute, volume, "fp32", v, share, 1.0) for v in compute if v != "fp32"},
        "break_even_gbps_per_worker_link": {v: _break_even(compute, volume, "fp32", v, 1.0, world)
                                            for v in compute if v != "fp32"},
    }


def _break_even(compute: dict, volume: dict, base: str, variant: str, share: float, links: float) -> float | None:
    """Bandwidth (Gbit/s per link) above which ``variant`` is slower than ``base``; None: never (or no base).

    ``links`` links carry the volume in parallel (1: the shared lo; N: one per worker).
    """
    if base not in compute:
        return None
    extra_compute = share * (compute[variant]["median_step_s"] - compute[base]["median_step_s"])
    saved_bits = 8 * (volume[base] - volume[variant]) / links
    if extra_compute <= 0:
        return None                                         # no compute overhead: compression always pays
    return saved_bits / extra_compute / 1e9


if __name__ == "__main__":
    main()
