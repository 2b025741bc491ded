"""RESULTS.md sections for ``zoo_speed.py`` (half-width torchvision models, and the tool's own speed),
``zoo_exactness.py`` (every torchvision classifier) and ``zoo_timm_hf.py`` (timm and Hugging Face models,
beside Torch-Pruning).

``make_results.py`` adds ``out += zoo_section(zoo)`` for ``results/zoo_speed.json`` and likewise for the
others; every number here comes from those files. A file marked ``"smoke": true`` (a quick check, not a
result) is labelled as such.
"""

from __future__ import annotations

import re
from typing import Any

from _report import machine_line, table

__all__ = ["exactness_section", "timm_hf_section", "zoo_section"]

_ENGINES = (("pytorch", "PyTorch"), ("channels_last", "channels_last"), ("onnxruntime", "ORT"))


def zoo_section(d: dict[str, Any]) -> list[str]:
    """Markdown lines: one latency table per model, then the tool-speed table."""
    s = d["settings"]
    lines = ["### Half of the channel groups removed: torchvision models on CPU", "",
             (f"Input {'×'.join(map(str, s['input']))}, `weights=None`, seed 0; the lowest-norm "
              f"{1 - s['keep']:.0%} of every channel family zeroed, then `compact`. Dense and compact timed in "
              f"alternation, median of {s['repeats']} rounds ({s['repeats_resnet50_batch8']} for resnet50 at batch 8), "
              f"in PyTorch eager, in PyTorch with channels_last model and input, and in onnxruntime "
              f"{s['onnxruntime']} (CPU). *MAC ratio* is dense / compact multiply-adds; *÷ MACs* is the speedup "
              f"divided by it (1.00 = the speedup the multiply-adds promise). {_machine(d)}"), ""]
    for name, m in d["models"].items():
        lines += _model_table(name, m)
    return lines + _tool_table(d["tool"])


def _machine(d: dict[str, Any]) -> str:
    """The machine line, with the load average at start and end when recorded."""
    load = d["settings"].get("loadavg_start"), d["settings"].get("loadavg_end")
    busy = f" Load average (1 min) at start / end: {load[0][0]:.1f} / {load[1][0]:.1f}." if all(load) else ""
    return machine_line(d, sentence=True, note=busy)


def _model_table(name: str, m: dict[str, Any]) -> list[str]:
    c, ratio = m["coverage"], m["mac_ratio"]
    head = ["threads", "batch", "MAC ratio"]
    for _, label in _ENGINES:
        head += [f"{label} dense ms", f"{label} compact ms", f"{label} speedup", "÷ MACs"]
    lines = [f"#### {name}", "",
             (f"{c['groups']:,} channel groups in {c['families']} families cover {c['conv_channels_in_groups']:,} of "
              f"{c['conv_output_channels']:,} conv output channels ({c['convs']} convs); {m['groups_zeroed']:,} groups "
              f"zeroed. Parameters {m['params']['dense']:,} → {m['params']['compact']:,} "
              f"({m['params_ratio']:.2f}× fewer), multiply-adds / sample {m['macs']['dense']:,} → "
              f"{m['macs']['compact']:,} ({ratio:.2f}× fewer); max |dense − compact| "
              f"= {m['max_abs_diff']:.1e}; compact convs whose width is not a multiple of 8: "
              f"{m.get('widths_not_multiple_of_8', '?')}."), "",
             *table(head)]
    for key, row in m["speed"].items():
        threads, batch = re.match(r"threads(\d+)_batch(\d+)", key).groups()
        cells = [threads, batch, f"{ratio:.2f}"]
        for engine, _ in _ENGINES:
            v = row[engine]
            cells += [f"{v['dense']['median_ms']:.2f}", f"{v['compact']['median_ms']:.2f}",
                      f"{v['speedup']:.2f}×", f"{v['speedup'] / ratio:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def _tool_table(t: dict[str, Any]) -> list[str]:
    lines = [f"#### The tool's speed: `structures` + `compact` on {t['model']}", "",
             (f"Input {'×'.join(map(str, t['input']))}, {t['threads']} thread(s); seconds: median of {t['repeats']} "
              "calls after a first one, in a fresh process. Memory, of that first call: the peak of Python "
              "allocations (tracemalloc; tensor storage not included), and how far the peak resident memory "
              "(VmHWM, reset before the call) rose above the resident memory before it (tensors included)."), "",
             *table(["step", "seconds", "Python heap peak MiB", "RSS peak growth MiB"])]
    for step in ("structures", "compact"):
        mem = t["memory"][step]
        growth = mem["rss_peak_growth_mib"]
        lines.append(f"| `{step}` | {t['seconds'][step]:.3f} | {mem['python_heap_peak_mib']:.1f} "
                     f"| {'-' if growth is None else f'{growth:.0f}'} |")
    total = sum(t["seconds"].values())
    return lines + [f"| total | {total:.3f} | | |", ""]


def exactness_section(d: dict[str, Any]) -> list[str]:
    """Markdown lines for ``zoo_exactness.py``: every torchvision classifier, groups found, exactness."""
    rows = d["rows"]
    ok = sum(1 for r in rows if r.get("exact"))
    lines = ["### Compaction across the torchvision classifiers", "",
             f"Every classification model of torchvision (`weights=None`, random BatchNorm statistics, eval mode): "
             f"`structures(kinds=(\"channel\", \"neuron\"))`, {d['fraction_zeroed']:.0%} of the groups zeroed "
             "at random, "
             f"`compact`, outputs compared on fresh random inputs. **{ok} of {len(rows)} exact** "
             f"(max |difference| ≤ 1e-4 × output scale). *Strict* names the operation that stops the tracer "
             f"where some channels stay unremovable (`strict=True` raises there). "
             f"{machine_line(d, cores='1 thread')}.", "",
             *table(["model", "groups", "conv/linear outputs", "parameters: dense → compact", "max abs diff",
                     "structures s", "compact s", "strict"])]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | | | | | | | error: {r['error'][:80]} |")
            continue
        stop = re.sub(r"^cannot follow channels through ", "", r["strict_stops_at"] or "ok")
        lines.append(f"| {r['model']} | {r['groups']:,} | {r['layer_outputs']:,} | {r['params'][0] / 1e6:.1f}M → "
                     f"{r['params'][1] / 1e6:.1f}M | {r['max_abs_diff']:.1e} | {r['structures_s']:.2f} | "
                     f"{r['compact_s']:.2f} | {stop[:70]} |")
    return lines + [""]


_TS_STATUS = {"exact": "exact", "inexact": "**not exact**", "clear_error": "clear error", "crash": "**crash**",
              "timeout": "timeout"}


def timm_hf_section(d: dict[str, Any]) -> list[str]:
    """Markdown lines for ``zoo_timm_hf.py``: the summary beside Torch-Pruning, per family, then per model."""
    s, sm, rows = d["settings"], d["summary"], [r for r in d["rows"] if "torchslim" in r]
    ts, tp = sm["torchslim"], sm.get("torch_pruning")
    n = sm["models"]
    lines = ["### timm and Hugging Face models: torchslim beside Torch-Pruning", "",
             (f"{n} models of `benchmarks/zoo_models.py` (timm {s['versions'].get('timm')}, transformers "
              f"{s['versions'].get('transformers')}; random weights and BatchNorm statistics, eval mode, small "
              f"inputs). torchslim: `structures(kinds={tuple(s['kinds'])})`, a seeded random "
              f"{s['fraction_zeroed']:.0%} of each family's groups zeroed, `compact`, outputs compared on a fresh "
              f"input (atol {s['atol']:g}); *useful*: exact and at most {s['useful_at_most']:.0%} of the parameters "
              f"kept. Torch-Pruning: {s['torch_pruning']}, ratio {s['fraction_zeroed']:g}; *forward works*: the "
              f"pruned model runs and gives the dense output's shape. *Coverage*: conv/linear output rows held by "
              f"some group. {s['timeout_s']} s per model and tool. {machine_line(d, cores='1 thread', sentence=True)}"
              + _provenance(s)),
             "", *table(["", "models", "traced (≥ 1 group)", "exact", "useful (≤ "
                         f"{s['useful_at_most']:.0%} kept)", "clear library error", "crash", "not exact", "timeout"]),
             (f"| torchslim | {n} | {ts['traced']} | {ts['exact']} | {ts['useful']} | {ts['clear_error']} | "
              f"{ts['crash']} | {ts['inexact']} | {ts['timeout']} |")]
    if tp:
        lines.append(f"| Torch-Pruning | {n} | {tp['ran']} ran | {tp['forward_ok']} forward works | {tp['useful']} | "
                     f"| {tp['error']} pruning error, {tp['forward_failed']} forward fails | | {tp['timeout']} |")
    lines += ["", *table(["family", "models", "torchslim exact", "torchslim useful", "with head groups",
                          "with width groups", "Torch-Pruning forward works"],
                         [[fam, f["models"], f["exact"], f["useful"], f.get("with_heads", "–"), f.get("with_width", "–"),
                           f.get("torch_pruning_ok", "–")] for fam, f in sm["by_family"].items()])]
    if sm["failure_causes"]:
        lines += ["", "Why models are not usefully compacted (torchslim), most common first:", "",
                  *table(["models", "cause"], [[k, f"`{c}`"] for c, k in sm["failure_causes"]])]
    if sm.get("strict_stops"):
        lines += ["", "Where `strict=True` stops the tracer (the operation, in how many models): " +
                  ", ".join(f"`{op}` {k}" for op, k in sm["strict_stops"]) + "."]
    lines += ["", *table(["model", "family", "groups (channel / neuron / head / width)", "coverage", "parameters kept",
                          "torchslim", "structures s", "compact s", "strict stops at / error",
                          "Torch-Pruning", "TP kept", "TP s"])]
    for r in rows:
        lines.append(_timm_hf_row(r))
    return lines + [""]


def _provenance(s: dict[str, Any]) -> str:
    """Where parts of the file come from other runs: Torch-Pruning's column, rows measured again."""
    out = ""
    if (tp := s.get("torch_pruning_from")) is not None:
        out += (f" Torch-Pruning's column is the run of {tp['date']} (torchslim {tp['torchslim_commit']}, "
                f"{tp['machine']}): it does not depend on torchslim.")
    for u in s.get("updated", []):
        out += f" Measured again at torchslim {u['commit']}: {', '.join(u['models'])}."
    return out


def _timm_hf_row(r: dict[str, Any]) -> str:
    t, p = r["torchslim"], r.get("torch_pruning") or {}
    g = t.get("groups")
    groups = " / ".join(f"{g.get(k, 0):,}" for k in ("channel", "neuron", "head", "embed")) if g is not None else ""
    cover = f"{t['coverage']['ratio']:.0%}" if "coverage" in t else ""
    kept = f"{t['params_ratio']:.2f}" + (" ✓" if t.get("useful") else "") if "params_ratio" in t else ""
    secs = lambda k: f"{t[k]:.2f}" if k in t else ""  # noqa: E731
    note = (f"{t['stage']}: {t['error']['type']}: {t['error']['message']}" if t.get("error")
            else re.sub(r"^cannot follow channels through (.+?)\. Its input.*", r"\1", t.get("strict_stops_at") or ""))
    note = note.replace("|", "\\|")[:90]
    tp_status = {"ok": "forward works", "forward_failed": "forward fails", "error": "pruning error",
                 "timeout": "timeout"}.get(p.get("status", ""), "")
    tp_kept = f"{p['params_ratio']:.2f}" if "params_ratio" in p else ""
    tp_s = f"{p['seconds']:.2f}" if "seconds" in p else ""
    return (f"| {r['model']} | {r['family']} | {groups} | {cover} | {kept} | {_TS_STATUS[t['status']]} | "
            f"{secs('structures_s')} | {secs('compact_s')} | {note} | {tp_status} | {tp_kept} | {tp_s} |")
