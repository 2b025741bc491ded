"""Throughput of the TernGrad codec in GB/s of fp32 gradient (a 25M-element tensor, 100 MB).

    python benchmarks/codec_throughput.py [--numel N] [--repeats R]

Per scheme ("2bit", "base3"), on CPU with 1 and 2 threads and on CUDA when available, the median over
``--repeats`` runs of:

* ``encode``: ``pack(ternarize(g, s, gen), scheme)``, what each worker does per step (the scaler is
  timed apart: the hook computes it before the MAX all-reduce);
* ``decode``: ``unpack_sum(gathered, numel, scheme)`` for 4 workers, into a new int32 tensor, and
  ``decode_out``: the same into a preallocated float32 buffer (``out=``, as a DDP hook can use the bucket);
* the parts: ``scaler``, ``ternarize``, ``pack``, and ``torch.rand`` of the same size for comparison.

GB/s = 4·numel bytes / median seconds. CPU rows also give the median CPU time of the process, which is less
sensitive to other processes on the machine than wall time (summed over threads); the 1-minute load
average and ``OMP_WAIT_POLICY`` are recorded: on a machine with more busy processes than cores, spinning
OpenMP workers make 2-thread runs far slower than 1-thread ones unless ``OMP_WAIT_POLICY=PASSIVE``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable

import torch
from _common import write

from torchslim.comm import SCHEMES, pack, packed_numel, scaler, ternarize, unpack_sum

WORLD = 4


def _time(fn: Callable[[], object], repeats: int, sync: Callable[[], None]) -> dict[str, float]:
    """Median wall and process-CPU seconds of ``fn`` after one warm-up call."""
    fn()
    sync()
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        sync()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"wall_s": statistics.median(wall), "cpu_s": statistics.median(cpu)}


def _rows(device: str, threads: int | None, numel: int, repeats: int) -> list[dict[str, object]]:
    """One row per scheme (plus the scheme-free parts repeated in each) on ``device``."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    gen = torch.Generator(device=device).manual_seed(0)
    g = torch.randn(numel, generator=gen, device=device)
    s = scaler(g)
    parts = {
        "scaler": _time(lambda: scaler(g), repeats, sync),
        "ternarize": _time(lambda: ternarize(g, s, gen), repeats, sync),
        "torch_rand": _time(lambda: torch.rand(numel, generator=gen, device=device), repeats, sync),
    }
    codes = ternarize(g, s, gen)
    rows = []
    for scheme in SCHEMES:
        gathered = torch.stack([pack(ternarize(g, s, gen), scheme) for _ in range(WORLD)])  # (4, nbytes)
        out = torch.zeros(numel, device=device)
        timed = {
            **parts,
            "pack": _time(lambda: pack(codes, scheme), repeats, sync),
            "encode": _time(lambda: pack(ternarize(g, s, gen), scheme), repeats, sync),
            "decode": _time(lambda: unpack_sum(gathered, numel, scheme), repeats, sync),
            "decode_out": _time(lambda: unpack_sum(gathered, numel, scheme, out=out), repeats, sync),
        }
        gbps = {k: 4 * numel / v["wall_s"] / 1e9 for k, v in timed.items()}
        row: dict[str, object] = {
            "device": device, "threads": threads, "scheme": scheme,
            "packed_bytes": packed_numel(numel, scheme), "gbps": gbps,
            "wall_ms": {k: v["wall_s"] * 1e3 for k, v in timed.items()},
        }
        if device == "cpu":
            row["cpu_gbps"] = {k: 4 * numel / v["cpu_s"] / 1e9 for k, v in timed.items()}
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=25_000_000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    previous = torch.get_num_threads()
    rows = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            rows += _rows("cpu", threads, args.numel, args.repeats)
    finally:
        torch.set_num_threads(previous)
    if torch.cuda.is_available():
        rows += _rows("cuda", None, args.numel, args.repeats)
    print(f"GB/s of fp32 gradient, {args.numel:,} elements, median of {args.repeats}; "
          f"decode = unpack_sum of {WORLD} workers (new int32 / into a float32 out=)")
    print(f"{'device':<10}{'scheme':<7}{'encode':>8}{'decode':>8}{'dec out':>8}{'tern':>8}{'pack':>8}"
          f"{'scaler':>8}{'rand':>8}  encode (CPU time)")
    for r in rows:
        gb, name = r["gbps"], f"{r['device']}" + (f" x{r['threads']}" if r["threads"] else "")
        cpu = f"  {r['cpu_gbps']['encode']:.2f}" if "cpu_gbps" in r else ""
        print(f"{name:<10}{r['scheme']:<7}" + "".join(
            f"{gb[k]:8.2f}" for k in ("encode", "decode", "decode_out", "ternarize", "pack", "scaler", "torch_rand"))
            + cpu)
    write("codec_throughput", {
        "numel": args.numel, "world": WORLD, "repeats": args.repeats, "load_avg_1min": os.getloadavg()[0],
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "note": "gbps = 4*numel bytes of fp32 gradient / median wall time; cpu_gbps uses process CPU time",
        "rows": rows,
    })


if __name__ == "__main__":
    main()
