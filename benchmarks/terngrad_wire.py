"""Bytes per training step on the wire: TernGrad vs fp32 all-reduce vs PyTorch's fp16 hook.

    python benchmarks/terngrad_wire.py [--models lenet fcnet] [--worlds 2 4] [--variants ...] [--smoke]

For every model, world size and gradient variant, ``torchrun -m torchslim.train.distributed`` trains inside a
fresh, unthrottled network namespace (netlink.py), whose ``lo`` carries only our traffic. Each
configuration runs twice, for S and S' > S steps; start-up (rendezvous, DDP's broadcast of the weights)
and tear-down are the same in both, so the bytes of one step, sent by one worker, are::

    wire = (lo.tx(S') - lo.tx(S)) / (S' - S) / N          # lo.tx sums every worker's sends

That is TCP payload plus TCP/IP headers and ACKs, i.e. what a NIC would carry. It is compared with

* ``accounted``: the hook's own ring-model counter (``TernGradState.bytes_sent``), or for fp32/fp16 the
  ring all-reduce volume ``2(N-1)/N · bytes`` that ``torchslim.train.distributed`` reports;
* ``theory``: compression_anchors §8 in bits per gradient element, ``2(N-1)/N · 32`` (fp32),
  ``2(N-1)/N · 16`` (fp16), and for TernGrad ``(N-1) · b`` for the ternarized share (an all-gather of
  b = 1.6 or 2-bit codes; ``2(N-1)/N · b`` two-phase) plus ``2(N-1)/N · 32`` for the layers kept in fp32
  (scalers left out: < 0.01 bit);
* ``payload``: the bits of one worker's own encoded gradient (b per ternarized element, 32 per fp one),
  which is the wire cost at N = 2 and what each of the N-1 hops of an all-gather carries.

Writes ``benchmarks/results/terngrad_wire.json`` (``terngrad_wire_smoke.json`` with ``--smoke``).
"""

from __future__ import annotations

import argparse
import os

from _common import write
from netlink import exit_on_sigterm, namespace, torchrun_in

from torchslim.comm import TernGradState
from torchslim.comm.ternary import packed_numel
from torchslim.models import create_model

VARIANTS = {  # name: torchslim.train.distributed arguments
    "fp32": ["--grad", "fp32"],
    "fp16": ["--grad", "fp16"],
    "terngrad-base3": ["--grad", "terngrad", "--scheme", "base3"],
    "terngrad-2bit": ["--grad", "terngrad", "--scheme", "2bit"],
    "terngrad-base3-all": ["--grad", "terngrad", "--scheme", "base3", "--quantize-last"],  # logits too
    "terngrad-twophase": ["--grad", "terngrad", "--scheme", "base3", "--reduce", "twophase"],
    "terngrad-twophase-all": ["--grad", "terngrad", "--scheme", "base3", "--reduce", "twophase", "--quantize-last"],
}
STEPS = {"lenet": (10, 30), "fcnet": (3, 9)}     # (S, S'): per-step bytes are the difference
SMOKE_STEPS = {"lenet": (1, 2), "fcnet": (1, 2)}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(STEPS), choices=list(STEPS))
    p.add_argument("--worlds", nargs="+", type=int, default=[2, 4])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--batch-size", type=int, default=64, help="examples per worker per step")
    p.add_argument("--timeout", type=float, default=1200, help="seconds allowed per torchrun launch")
    p.add_argument("--smoke", action="store_true", help="1 and 2 steps, LeNet only unless --models: a quick check")
    return p


def main() -> None:
    args = _parser().parse_args()
    exit_on_sigterm()
    steps = SMOKE_STEPS if args.smoke else STEPS
    rows = []
    with namespace(f"tsl-wire-{os.getpid()}") as ns:
        for model in args.models:
            for world in args.worlds:
                for variant in args.variants:
                    rows.append(_measure(ns, model, world, variant, steps[model], args))
                    _print_row(rows[-1])
    _add_ratios(rows)
    write("terngrad_wire_smoke" if args.smoke else "terngrad_wire", {
        "smoke": args.smoke, "steps": {m: steps[m] for m in args.models}, "batch_size": args.batch_size,
        "namespace": "fresh netns, lo unthrottled; lo.tx counts every worker's sends, TCP/IP headers and ACKs included",
        "rows": rows,
    })


def _measure(ns, model: str, world: int, variant: str, steps: tuple[int, int], args) -> dict:
    """One configuration: two launches, S and S' steps; bytes per worker per step from their difference."""
    common = ["--model", model, *VARIANTS[variant], "--batch-size", str(args.batch_size),
              "--train-limit", str(max(4096, 2 * world * args.batch_size)), "--test-limit", "500",
              "--log-every", "1000000"]
    short, long = (torchrun_in(ns, world, [*common, "--steps", str(s)], args.timeout) for s in steps)
    numel = sum(p.numel() for p in create_model(model).parameters())
    wire = (long.lo.tx - short.lo.tx) / (steps[1] - steps[0]) / world
    accounted = long.summary["bytes_sent_per_step"]
    return {
        "model": model, "world_size": world, "variant": variant, "numel": numel,
        "wire_bytes_per_step": wire, "accounted_bytes_per_step": accounted,
        "wire_bits_per_element": 8 * wire / numel, "accounted_bits_per_element": 8 * accounted / numel,
        "theory_bits_per_element": _theory_bits(model, world, variant),
        "payload_bits_per_element": _payload_bits(model, variant),
        "wire_over_accounted": wire / accounted,
        "lo_tx_bytes": {"short": short.lo.tx, "long": long.lo.tx}, "lo_rx_equals_tx": long.lo.rx == long.lo.tx,
        "steps": list(steps), "failed_launches": [*short.failed_attempts, *long.failed_attempts],
    }


def _split(model: str, variant: str) -> tuple[int, int, float]:
    """``(ternarized elements, fp32 elements, code bits b)`` for ``variant`` on ``model`` (b = 32 for fp)."""
    net = create_model(model)
    numel = sum(p.numel() for p in net.parameters())
    if not variant.startswith("terngrad"):
        return 0, numel, 16.0 if variant == "fp16" else 32.0
    scheme = "2bit" if "2bit" in variant else "base3"       # two-phase shards pad < 20 codes per worker: ignored
    state = TernGradState.for_model(net, scheme=scheme, full_precision_last=not variant.endswith("-all"))
    params = dict(net.named_parameters())
    full = sum(params[n].numel() for n in state.full_precision_names())
    return numel - full, full, 8 * packed_numel(numel - full, scheme) / max(numel - full, 1)


def _theory_bits(model: str, world: int, variant: str) -> float:
    """Bits per gradient element one worker sends per step, by the ring formulas of compression_anchors §8."""
    ternary, full, bits = _split(model, variant)
    ring = 2 * (world - 1) / world
    if not variant.startswith("terngrad"):
        return ring * bits
    hops = ring if "twophase" in variant else world - 1
    return (hops * bits * ternary + ring * 32 * full) / (ternary + full)


def _payload_bits(model: str, variant: str) -> float:
    """Bits per element of one worker's encoded gradient, before any collective multiplies it."""
    ternary, full, bits = _split(model, variant)
    return (bits * ternary + 32 * full) / (ternary + full) if ternary else bits


def _add_ratios(rows: list[dict]) -> None:
    """``wire_vs_fp32``: how many times fewer bytes than fp32 on the same model and world size."""
    fp32 = {(r["model"], r["world_size"]): r["wire_bytes_per_step"] for r in rows if r["variant"] == "fp32"}
    for r in rows:
        base = fp32.get((r["model"], r["world_size"]))
        r["wire_vs_fp32"] = base / r["wire_bytes_per_step"] if base else None


def _print_row(r: dict) -> None:
    print(f"{r['model']:6} N={r['world_size']} {r['variant']:19} wire {r['wire_bytes_per_step'] / 1e6:9.3f} MB/step "
          f"({r['wire_bits_per_element']:.3f} bits/elt; theory {r['theory_bits_per_element']:.3f}, "
          f"accounted {r['accounted_bits_per_element']:.3f}, payload {r['payload_bits_per_element']:.3f})", flush=True)


if __name__ == "__main__":
    main()
