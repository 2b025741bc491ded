"""RESULTS.md sections for the TernGrad benchmarks: wire bytes, convergence, end-to-end speed, and recipes
trained data-parallel through the engine (``ddp_recipe.py``).

``make_results.py`` adds ``out += terngrad_sections(RESULTS)``; every number comes from the JSON files
that ``terngrad_wire.py``, ``terngrad_convergence.py`` and ``terngrad_speed.py`` write. A missing file
is skipped; a file marked ``"smoke": true`` (a quick check, not a result) is labelled as such.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from _report import DDPRecipe, TernGradConvergence, TernGradSpeed, TernGradWire, load, machine_line, table

__all__ = ["terngrad_sections"]

_NAMES = {"fp32": "fp32 all-reduce (no hook)", "fp16": "fp16 hook (PyTorch)", "terngrad-base3": "TernGrad base-3",
          "terngrad-2bit": "TernGrad 2-bit", "terngrad-base3-all": "TernGrad base-3, logits too",
          "terngrad": "TernGrad (clip 2.5σ)", "terngrad-noclip": "TernGrad, no clipping",
          "terngrad-twophase": "TernGrad two-phase", "terngrad-twophase-all": "TernGrad two-phase, logits too"}


def terngrad_sections(results_dir: str | Path) -> list[str]:
    """Markdown lines for the three TernGrad benchmarks whose JSON is in ``results_dir``."""
    results_dir = Path(results_dir)
    lines: list[str] = []
    for name, schema, section in (("terngrad_wire", TernGradWire, _wire_section),
                                  ("terngrad_convergence", TernGradConvergence, _convergence_section),
                                  ("terngrad_speed", TernGradSpeed, _speed_section)):
        path = results_dir / f"{name}.json"
        if path.exists():
            lines += section(load(path, schema))
    for path in sorted(results_dir.glob("ddp_*.json")):
        if not path.stem.endswith("_smoke"):
            lines += ddp_section(load(path, DDPRecipe))
    return lines


def ddp_section(d: dict[str, Any]) -> list[str]:
    """A recipe trained by N processes per gradient mode, beside one process: the timing pass over a capped link,
    the quality pass (full recipe) uncapped."""
    name, workers, rate = d["recipe"]["name"], d["workers"], d["rate"]
    t, q = d["timing"], d["quality"]
    metric = "perplexity" if "perplexity" in (q or t["rows"]).get("one process", {}) else "accuracy"

    def quality(row: dict[str, Any]) -> str:
        v = row[metric]["finetune"]
        return f"{v:.2f}" if metric == "perplexity" else f"{100 * v:.2f}%"

    lines = [f"### {name} data-parallel: {workers} processes, gradients compressed", ""]
    if q:
        one = q.get("one process")
        machines = sorted({machine_line(r) for r in q.values()})
        lines += [f"The full recipe, `torchrun --nproc-per-node {workers} -m torchslim train {name} --grad G` (gloo, "
                  "one thread per worker, link uncapped: it changes the time, not the result), beside one process. "
                  f"{'; '.join(machines)}.{' **Smoke run: not a result.**' * bool(d.get('smoke'))}", "",
                  *table(["run", f"compact {metric}", "vs one process", "compact MACs", "MACs vs one process"],
                         [[label, quality(row), _points(row, one, metric), f"{row['compact_macs']:,}",
                           f"{row['compact_macs'] / one['compact_macs']:.2f}" if one else ""]
                          for label, row in q.items()]), ""]
    if t:
        lines += [f"Speed, one sitting: every phase cut to one epoch ({', '.join(t['overrides'])}), {workers} workers "
                  f"in a network namespace whose loopback is capped at {rate}; one process at 2 threads. Seconds per "
                  "epoch: the training steps' (evaluation left out), median over the run's epochs; MB per step: all "
                  f"bytes that crossed the link over the training steps. {machine_line(t, sentence=True)}", "",
                  *table(["run", "s / epoch", "vs fp32", "MB / step on the link"],
                         [[label, f"{row['train_s_median']:.1f}",
                           f"{t['rows']['fp32']['train_s_median'] / row['train_s_median']:.2f}×"
                           if "fp32" in t["rows"] else "",
                           f"{row['lo_bytes_per_step'] / 1e6:.3f}" if row["lo_bytes_per_step"] else "-"]
                          for label, row in t["rows"].items()]), ""]
        if t.get("scaling"):
            most = max(map(int, t["scaling"]))
            over = f", so {most} workers oversubscribe them (and share one memory bus)" if most > d["cores"] else ""
            lines += [f"Scaling, fp32, link uncapped, one thread per worker: {d['cores']} cores{over}.", "",
                      *table(["workers", "s / epoch"],
                             [[n, f"{row['train_s_median']:.1f}"] for n, row in t["scaling"].items()]), ""]
        two = t.get("two_launches")
        if two:
            same = "the same" if two["matches_one_launch"] else "**not** the same"
            lines += [f"Two machines: two torchrun launches (`--nnodes 2`, c10d rendezvous on 127.0.0.1, one "
                      f"TernGrad worker each) over the {rate} link: {two['train_s_median']:.1f} s per epoch, and "
                      f"{same} model as one launch of 2 workers ({quality(two)} vs {quality(two['one_launch'])}).", ""]
    return lines


def _points(row: dict[str, Any], one: dict[str, Any] | None, metric: str) -> str:
    if one is None or row is one:
        return ""
    a, b = row[metric]["finetune"], one[metric]["finetune"]
    return f"{a - b:+.2f}" if metric == "perplexity" else f"{100 * (a - b):+.2f} points"


def _wire_section(d: dict[str, Any]) -> list[str]:
    steps = ", ".join(f"{m} {s[0]} and {s[1]}" for m, s in d["steps"].items())
    lines = ["### TernGrad: bytes per step on the wire", "",
             "Measured at `lo` inside a fresh network namespace (`/proc/net/dev`: TCP payload, headers and ACKs), "
             f"per worker and step, from the difference of two runs of `torchslim train lenet_terngrad` (one epoch of "
             f"{steps} steps) so start-up cancels. "
             "*Theory*: ring formulas (compression_anchors §8); *payload*: one worker's encoded gradient before the "
             "collective multiplies it "
             f"(an all-gather sends it N−1 times). Batch {d['batch_size']} per worker; "
             f"{machine_line(d, sentence=True)}", "",
             *table(["model", "workers", "gradients", "MB / step / worker", "bits / element on the wire", "theory",
                     "payload bits / element", "× fewer bytes than fp32"])]
    for r in d["rows"]:
        ratio = f"{r['wire_vs_fp32']:.1f}×" if r.get("wire_vs_fp32") else ""
        lines.append(f"| {r['model']} | {r['world_size']} | {_NAMES.get(r['variant'], r['variant'])} | "
                     f"{r['wire_bytes_per_step'] / 1e6:.3f} | {r['wire_bits_per_element']:.3f} | "
                     f"{r['theory_bits_per_element']:.3f} | "
                     f"{r['payload_bits_per_element']:.3f} | {ratio} |")
    lines += ["", "TernGrad's logits layer stays fp32 by default (as in the paper); *logits too* ternarizes it "
              "(`distributed.terngrad.quantize_last: true`). With 4 workers an all-gather of 1.6-bit codes costs "
              "(N−1)·1.6 = 4.8 bits per element against fp32's 2(N−1)/N·32 = 48, so the reduction is 10× at N = 4 "
              "and 20× at N = 2. *Two-phase* (`distributed.terngrad.reduce: twophase`: all-to-all of code shards, "
              "each worker re-ternarizes its shard's mean, all-gather) costs 2(N−1)/N·1.6 = 2.4 bits at N = 4, 20× "
              "fewer than fp32 at any N, for a second rounding (see convergence below); at N = 2 it is the "
              "all-gather.", ""]
    return lines


def _convergence_section(d: dict[str, Any]) -> list[str]:
    configs, recipe = d["configs"], d["recipe"]
    base = recipe["baseline"]
    lines = ["### TernGrad: convergence (LeNet, Fashion-MNIST)", "",
             f"`torchrun -m torchslim train {recipe['name']} --stop-after baseline --grad G`: {d['world_size']} "
             f"workers × batch {d['batch_size_per_worker']} (total {recipe['batch_size']}), SGD lr {base['lr']} "
             f"({base['lr_schedule']}), momentum {base['momentum']}, weight decay {base['weight_decay']}, "
             f"{base['epochs']} epochs, seeds {', '.join(map(str, d['seeds']))}; same data order and initial weights "
             f"for every run. Training time: the training steps' seconds. {machine_line(d, sentence=True)}", "",
             *table(["gradients", "test accuracy", "vs fp32 (points)", "training time (s)"])]
    for name, c in configs.items():
        spread = f" ± {c['test_accuracy_std']:.2%}" if c.get("test_accuracy_std") is not None else ""
        has_delta = c.get("delta_vs_fp32_points") is not None and name != "fp32"
        delta = f"{c['delta_vs_fp32_points']:+.2f}" if has_delta else ""
        seconds = sum(r["train_seconds"] for r in c["runs"]) / len(c["runs"])
        lines.append(f"| {_NAMES.get(name, name)} | {c['test_accuracy_mean']:.2%}{spread} | {delta} | {seconds:.0f} |")
    names = list(configs)
    steps = [p["step"] for p in configs[names[0]]["runs"][0]["curve"]]
    lines += ["", "Test accuracy after each epoch (first seed):", "",
              *table(["step", *(_NAMES.get(n, n) for n in names)])]
    for i, step in enumerate(steps):
        lines.append(f"| {step} | " + " | ".join(f"{configs[n]['runs'][0]['curve'][i]['test_accuracy']:.2%}"
                                                 for n in names) + " |")
    if d.get("plot"):
        lines += ["", f"![TernGrad convergence](benchmarks/results/{d['plot']})"]
    return lines + [""]


def _speed_section(d: dict[str, Any]) -> list[str]:
    variants = list(next(iter(d["rates"].values()))["runs"])
    lines = ["### TernGrad: end-to-end speed over slow links", "",
             f"`{d['model']}`, {d['world_size']} workers (one thread each on {d['cores']} cores), batch "
             f"{d['batch_size_per_worker']} per worker, `torchslim train` with {d['epochs']} epochs of "
             f"{d['steps_per_epoch']} steps; step time: median over the epochs after the first of the training "
             "seconds per step. The link is a tbf cap on a namespace's `lo`, **shared by all workers** (at 1 Gbit/s "
             f"the {d['world_size']} workers move 1 Gbit/s in total). {machine_line(d, sentence=True)}", "",
             *table(["link cap (measured)", *(f"{_NAMES.get(v, v)} steps/s" for v in variants)])]
    for rate, r in d["rates"].items():
        cells = []
        for v in variants:
            run = r["runs"].get(v)
            speedup = f" ({run['speedup_vs_fp32']:.2f}×)" if run and run.get("speedup_vs_fp32") and v != "fp32" else ""
            cells.append(f"{run['steps_per_second']:.3f}{speedup}" if run else "")
        lines.append(f"| {rate} ({r['link_gbps_measured']:.2f} Gbit/s) | " + " | ".join(cells) + " |")
    a = d["analytic"]
    if a is None:
        return lines + [""]
    lines += ["", "Model: step ≈ c + 8V/B, with V all workers' bytes per step (ring formulas), B the measured link "
              "rate and c the compute of a step (codec included), the unthrottled step less its transfer. "
              "Milliseconds, predicted / measured:", "",
              *table(["link", *(_NAMES.get(v, v) for v in variants)]),
              "| c (compute) | " + " | ".join(f"{a['compute_s'][v] * 1e3:.0f}" for v in variants) + " |"]
    for rate, per in a["predicted"].items():
        if rate == "none":
            continue  # c comes from these runs: predicted = measured
        lines.append(f"| {rate} | " + " | ".join(
            f"{per[v]['predicted_step_s'] * 1e3:.0f} / {per[v]['measured_step_s'] * 1e3:.0f}" if v in per else ""
            for v in variants) + " |")
    lines += ["", "Compression stops paying above the break-even bandwidth B*, where the codec's extra compute "
              f"equals the transfer time it saves (one core and one link per worker: c divided by N/C = "
              f"{a['cpu_share_N_over_C']:g}, one worker's bytes per link):", "",
              *table(["gradients", "B*: this machine, shared link (Gbit/s)",
                      "B*: one core and one link per worker (Gbit/s)"])]
    for v in variants:
        if v == "fp32":
            continue
        shared, own = a["break_even_gbps"].get(v), a["break_even_gbps_per_worker_link"].get(v)
        lines.append(f"| {_NAMES.get(v, v)} | {_gbps(shared)} | {_gbps(own)} |")
    return lines + [""]


def _gbps(value: float | None) -> str:
    return "never slower" if value is None else f"{value:.1f}"


if __name__ == "__main__":
    import sys

    print("\n".join(terngrad_sections(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "results")))
