"""Bytes per training step on the wire: TernGrad vs fp32 all-reduce vs PyTorch's fp16 hook.

    python benchmarks/terngrad_wire.py [--models lenet fcnet] [--worlds 2 4] [--variants ...] [--smoke]

For every model, world size and gradient variant, ``torchrun -m torchslim train lenet_terngrad --stop-after
baseline`` (``--set model.name=fcnet`` for fcnet) trains inside a fresh, unthrottled network namespace
(netlink.py), whose ``lo`` carries only our traffic. Each configuration runs twice, one epoch of S and of
S' > S steps; start-up (rendezvous, DDP's broadcast of the weights), the end-of-epoch replica check and
tear-down are the same in both, so the bytes of one step, sent by one worker, are::

    wire = (lo.tx(S') - lo.tx(S)) / (S' - S) / N          # lo.tx sums every worker's sends

That is TCP payload plus TCP/IP headers and ACKs, i.e. what a NIC would carry. It is compared with

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
from netlink import exit_on_sigterm, namespace, train_in

from torchslim.comm import TernGradState
from torchslim.comm.ternary import packed_numel
from torchslim.models import create_model

RECIPE = "lenet_terngrad"


def _terngrad(**keys: str) -> list[str]:
    return ["--grad", "terngrad", *(a for k, v in keys.items() for a in ("--set", f"distributed.terngrad.{k}={v}"))]


VARIANTS = {  # name: `torchslim train` arguments
    "fp32": ["--grad", "fp32"],
    "fp16": ["--grad", "fp16"],
    "terngrad-base3": _terngrad(scheme="base3"),
    "terngrad-2bit": _terngrad(scheme="2bit"),
    "terngrad-base3-all": _terngrad(quantize_last="true"),  # logits too
    "terngrad-twophase": _terngrad(reduce="twophase"),
    "terngrad-twophase-all": _terngrad(reduce="twophase", quantize_last="true"),
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


def train_args(model: str, world: int, variant: str, steps: int, batch_size: int, epochs: int = 1) -> list[str]:
    """`torchslim train RECIPE` arguments: ``epochs`` epochs of ``steps`` steps of ``batch_size`` per worker."""
    sets = [f"model.name={model}", f"batch_size={batch_size * world}", f"baseline.epochs={epochs}",
            f"data.train_limit={steps * batch_size * world}", "data.test_limit=500"]
    return [*VARIANTS[variant], "--stop-after", "baseline", *(a for s in sets for a in ("--set", s))]


def _measure(ns, model: str, world: int, variant: str, steps: tuple[int, int], args) -> dict:
    """One configuration: two launches, S and S' steps; bytes per worker per step from their difference."""
    short, long = (train_in(ns, world, RECIPE, train_args(model, world, variant, s, args.batch_size), args.timeout)
                   for s in steps)
    numel = sum(p.numel() for p in create_model(model).parameters())
    wire = (long.lo.tx - short.lo.tx) / (steps[1] - steps[0]) / world
    theory = _theory_bits(model, world, variant)
    return {
        "model": model, "world_size": world, "variant": variant, "numel": numel,
        "wire_bytes_per_step": wire, "wire_bits_per_element": 8 * wire / numel,
        "theory_bits_per_element": theory, "theory_bytes_per_step": theory * numel / 8,
        "payload_bits_per_element": _payload_bits(model, variant),
        "wire_over_theory": 8 * wire / numel / theory,
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


def theory_bytes(model: str, world: int, variant: str) -> float:
    """Bytes one worker sends per step by the ring formulas (:func:`_theory_bits`)."""
    return _theory_bits(model, world, variant) * sum(p.numel() for p in create_model(model).parameters()) / 8


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
          f"payload {r['payload_bits_per_element']:.3f})", flush=True)


if __name__ == "__main__":
    main()
