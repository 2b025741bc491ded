"""Write RESULTS.md and the README's results table from benchmarks/results/*.json.

    python benchmarks/make_results.py [--out DIR]

Nothing here is typed by hand: every number is read from a JSON file a benchmark script wrote.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from _report import (
    CaptureSpeed,
    Codec,
    FirstContact,
    ForceSeeds,
    GPTRun,
    ISSAlternatives,
    LMControl,
    LMRun,
    Magnitude,
    Modes,
    Overhead,
    SSLRun,
    TernGradConvergence,
    TernGradSpeed,
    TernGradWire,
    ZooExactness,
    ZooSpeed,
    ZooTimmHF,
    load,
    machine_line,
    table,
)
from terngrad_report import terngrad_sections
from transformer_report import capture_speed_section, gpt_section
from wen_report import (
    iss_alternatives_section,
    iss_lm_overview,
    iss_lm_section,
    lowrank_sections,
    rank_table_section,
    readme_rows,
)
from zoo_report import exactness_section, timm_hf_section, zoo_section

ROOT = Path(__file__).parent.parent
RESULTS = Path(__file__).parent / "results"
# the README row shows the last one measured
LM_RECIPES = ("kjv_lm_iss", "kjv_lm_iss_650", "kjv_lm_iss_650_keep", "kjv_lm_iss_650_scratch", "kjv_lm_iss_650_long",
              "kjv_lm_iss_650_long_kd")


def _load(name: str, schema: type = SSLRun) -> dict | None:
    """``results/<name>.json`` checked against ``schema``; None when it has not been measured."""
    path = RESULTS / f"{name}.json"
    return load(path, schema) if path.exists() else None


def _load_lm(name: str) -> dict | None:
    """``iss_<name>.json`` with the controls of ``iss_lm_control.py`` as ``"control"`` (dense) and
    ``"control_direct"`` (the compact widths from scratch), where measured."""
    if (d := _load(f"iss_{name}", LMRun)) is not None:
        d["control"] = _load(f"iss_{name}_denseft", LMControl)
        d["control_direct"] = _load(f"iss_{name}_direct_long", LMControl)
    return d


def _pts(a: float, b: float) -> str:
    return f"{(a - b) * 100:+.2f}"


def ssl_section(d: dict, title: str) -> list[str]:
    acc, valid = d["accuracy"], d.get("valid_accuracy") or {}
    rows = [["test accuracy", f"{acc['baseline']:.2%}", f"{acc['ssl']:.2%} ({_pts(acc['ssl'], acc['baseline'])} pts)",
             f"{acc['finetune']:.2%} ({_pts(acc['finetune'], acc['baseline'])} pts)"]]
    if valid:
        rows.append(["validation accuracy (λ chosen on it)", f"{valid['baseline']:.2%}", f"{valid['ssl']:.2%}",
                     f"{valid['finetune']:.2%}"])
    rows += [["parameters", f"{d['params']['dense']:,}", "", f"{d['params']['compact']:,}"],
             ["multiply-adds / sample", f"{d['macs']['dense']:,}", "",
              f"{d['macs']['compact']:,} ({d['flop_reduction']:.1f}× fewer)"]]
    if d["conv_macs"]["dense"]:
        rows.append(["conv multiply-adds / sample", f"{d['conv_macs']['dense']:,}", "",
                     f"{d['conv_macs']['compact']:,} ({d['conv_flop_reduction']:.1f}× fewer)"])
    if (branches := d.get("branches") or {}).get("total"):
        rows.append(["residual branches (depth groups)", branches["total"], "",
                     f"{branches['total'] - branches['removed']} ({branches['removed']} removed, "
                     f"{2 * branches['removed']} conv layers fewer)"])
    lines = [f"### {title}", "", f"Recipe `{d['recipe']['name']}`; machine: {machine_line(d)}.", "",
             *table(["", "dense", "SSL (sparse)", "compact + fine-tuned"], rows), "",
             *table(["layer", "filters / neurons", "input channels", "shape fibers", "multiply-adds kept"],
                    [[s["name"], f"{s['filters'][0]}/{s['filters'][1]}", f"{s['channels'][0]}/{s['channels'][1]}",
                      f"{s['shape'][0]}/{s['shape'][1]}", f"{s['macs_kept']:.1%}"] for s in d["layers"]])]
    if d.get("history_plot") and (RESULTS / d["history_plot"]).exists():
        lines += ["", f"![training history](benchmarks/results/{d['history_plot']})"]
    onnx = d.get("speed_onnxruntime", {})
    lines += ["", "CPU latency, median of 30 interleaved runs (dense, compact and lowered timed in turn), in PyTorch "
              "eager and in onnxruntime; *÷ MACs* is the speedup over the multiply-add reduction "
              f"({d['flop_reduction']:.1f}×):", "",
              *table(["threads", "batch", "dense ms", "compact ms", "speedup", "÷ MACs", "lowered ms",
                      "speedup (lowered)", "ORT dense ms", "ORT compact ms", "ORT speedup", "÷ MACs"])]
    for key, v in d["speed"].items():
        t, b = re.match(r"threads(\d+)_batch(\d+)", key).groups()
        row = (f"| {t} | {b} | {v['dense']['median_ms']:.3f} | {v['compact']['median_ms']:.3f} | "
               f"{v['speedup']:.2f}× | {v['speedup'] / d['flop_reduction']:.2f} | {v['lowered']['median_ms']:.3f} | "
               f"{v['speedup_lowered']:.2f}× |")
        o = onnx.get(key)
        row += (f" {o['dense']['median_ms']:.3f} | {o['compact']['median_ms']:.3f} | {o['speedup']:.2f}× | "
                f"{o['speedup'] / d['flop_reduction']:.2f} |" if o else " | | | |")
        lines.append(row)
    lines.append("")
    return lines


def overhead_section(d: dict) -> list[str]:
    o, ms = d["overhead"], d["step_ms"]
    return ["### GroupLasso's cost per training step", "",
            f"LeNet, batch {d['batch_size']}, {d['threads']} threads, {d['groups']} groups "
            f"(channels, neurons, shape fibers); median of {d['repeats']} interleaved steps; {machine_line(d)}.", "",
            *table(["", "ms", "vs a plain SGD step"],
                   [["plain SGD step", f"{ms['plain']:.2f}", ""],
                    ["proximal step alone (`lasso.step_`)", f"{ms['prox_alone']:.2f}", f"{o['prox_alone']:.1%}"],
                    ["step + prox", f"{ms['prox']:.2f}", f"{o['prox']:+.1%}"],
                    ["step with the penalty in the loss", f"{ms['penalty']:.2f}", f"{o['penalty']:+.1%}"]]), ""]


def modes_section(d: dict) -> list[str]:
    rows = [[mode, f"{r['accuracy']['ssl']:.2%}", f"{r['accuracy']['finetune']:.2%}",
             ", ".join(f"{k} {v:.0%}" for k, v in r["zero_groups"].items()), f"{r['conv_macs_kept']:.1%}"]
            for mode, r in d["modes"].items()]
    return ["### Proximal vs the paper's subgradient + zero-out (same recipe, same budget)", "",
            f"Recipe `{d['recipe']}`; {machine_line(d)}.", "",
            *table(["mode", "accuracy after SSL", "after fine-tuning", "zero groups", "conv multiply-adds kept"], rows),
            ""]


def _maybe_pct(v: float | None) -> str:
    return "–" if v is None else f"{v:.2%}"


def magnitude_section(d: dict) -> list[str]:
    """SSL vs one-shot magnitude pruning at matched multiply-adds (``benchmarks/ssl_vs_magnitude.py``)."""
    acc, valid, macs, params = d["accuracy"], d.get("valid_accuracy") or {}, d["macs"], d["params"]
    mag, ft = d["magnitude"], d["finetune"]
    lines = [f"### SSL vs one-shot magnitude pruning at matched multiply-adds: `{d['recipe']['name']}`", "",
             f"The SSL run's dense baseline, with its lowest-L2-norm {'/'.join(mag['kinds'])} groups removed "
             f"({mag['scope']} scope, `torchslim.magnitude_prune`) down to at most the SSL model's multiply-adds, "
             f"then fine-tuned as SSL's compact model was: {ft['epochs']} epochs, lr {ft['lr']} ({ft['lr_schedule']}), "
             f"batch {ft['batch_size']}; {machine_line(d)}.", "",
             *table(["", "dense", "SSL: compact + fine-tuned", "magnitude: pruned", "magnitude: + fine-tuned"]),
             f"| test accuracy | {acc['dense']:.2%} | {acc['ssl']:.2%} ({_pts(acc['ssl'], acc['dense'])} pts) "
             f"| {acc['magnitude_pruned']:.2%} | {acc['magnitude']:.2%} ({_pts(acc['magnitude'], acc['dense'])} pts) |"]
    if valid:
        lines.append(f"| validation accuracy | {_maybe_pct(valid['dense'])} | {_maybe_pct(valid['ssl'])} "
                     f"| {_maybe_pct(valid['magnitude_pruned'])} | {_maybe_pct(valid['magnitude'])} |")
    lines += [f"| multiply-adds / sample | {macs['dense']:,} | {macs['ssl']:,} "
              f"({macs['dense'] / macs['ssl']:.1f}× fewer) | {macs['magnitude']:,} "
              f"({macs['dense'] / macs['magnitude']:.1f}× fewer) | |",
              f"| parameters | {params['dense']:,} | {params['ssl']:,} | {params['magnitude']:,} | |", ""]
    kernel = lambda s: f" ({s['ssl_kernel'][0]}×{s['ssl_kernel'][1]})" if s["ssl_kernel"] else ""
    rows = [[s["name"], s["dense"], f"{s['ssl']}{kernel(s)}", s["magnitude"]] for s in d["layers"]]
    return lines + table(["layer", "output channels / neurons: dense", "SSL (kernel)", "magnitude"], rows) + [""]


def codec_section(d: dict) -> list[str]:
    lines = ["### TernGrad codec throughput", "",
             f"GB/s of fp32 gradient ({d['numel']:,} elements), median of {d['repeats']}; encode = ternarize + pack "
             f"(the scaler, timed apart, is one max/std pass), decode = unpack_sum of {d['world']} workers' codes "
             "(into a new int32 tensor / "
             f"into the float32 bucket with `out=`); {machine_line(d)}.", ""]
    rows = [[r["device"], r["threads"], r["scheme"],
             *(f"{r['gbps'][k]:.2f}" for k in ("encode", "decode", "decode_out"))] for r in d["rows"]]
    return lines + table(["device", "threads", "scheme", "encode", "decode", "decode into bucket"], rows) + [""]


def first_contact_section(d: dict) -> list[str]:
    demo, install = d["make_demo"], d["install"]
    acc = demo["accuracy"]
    return [
        "### First contact: `make demo` and the Install section on a fresh clone", "",
        f"`benchmarks/first_contact.py` on commit {d['commit']}: a `git clone`, then `make setup` and `make demo` "
        f"timed apart, then README's Install block run word for word in a fresh venv; {machine_line(d)}.", "",
        *table(["step", "wall time", "disk"], [
            ["`make setup` (venv, pinned torch, torchslim)", _minutes(demo["setup_seconds"]),
             f"{demo['venv_gb']:.1f} GB"],
            ["`make demo` (`torchslim demo`, data present)", _minutes(demo["demo_seconds"]), ""],
            ["Install section: " + "; ".join(f"`{c.split('#')[0].strip()}`" for c in install["commands"]),
             _minutes(install["seconds"]), f"{install['venv_gb']:.1f} GB"],
        ]), "",
        f"The demo reached {100 * acc['baseline']:.2f}% dense → {100 * acc['finetune']:.2f}% compact and "
        f"fine-tuned; `torchslim --version` printed `{install['version']}`.", "",
        "```", *demo["table"].splitlines(), "```", "",
    ]


def _minutes(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m} min {s:02d} s" if m else f"{s} s"


def demo_promise(d: dict) -> str:
    """The README's words for how long `make demo` takes, from the measurement (rounded up to a minute)."""
    demo = d["make_demo"]
    return (f"in about {-(-round(demo['demo_seconds']) // 60)} minutes on {d['cores']} cores after "
            f"{-(-round(demo['setup_seconds']) // 60)} minutes of setup")


def _terngrad_rows(wire: dict | None, speed: dict | None, conv: dict | None) -> list[str]:
    """README rows for TernGrad: bytes on the wire, speed over a 1 Gbit/s link, accuracy vs fp32."""
    rows = []
    if wire and not wire.get("smoke"):
        best = max((r for r in wire["rows"] if r["world_size"] == 4 and r.get("wire_vs_fp32")),
                   key=lambda r: r["wire_vs_fp32"], default=None)
        if best:
            rows.append(f"| TernGrad wire bytes, {best['model']}, 4 workers | | {best['wire_vs_fp32']:.1f}× fewer "
                        f"than fp32 ({best['variant']}, {best['wire_bits_per_element']:.2f} bits/element) | |")
    if speed and not speed.get("smoke") and "1gbit" in speed["rates"]:
        run = speed["rates"]["1gbit"]["runs"].get("terngrad-base3", {})
        if run.get("speedup_vs_fp32"):
            rows.append(f"| TernGrad steps/s, {speed['model']}, {speed['world_size']} workers, 1 Gbit/s | | | "
                        f"{run['speedup_vs_fp32']:.2f}× fp32 all-reduce |")
    if conv and not conv.get("smoke"):
        c, base = conv["configs"].get("terngrad"), conv["configs"].get("fp32")
        if c and base:
            rows.append(f"| TernGrad LeNet, 4 workers, {len(conv['seeds'])} seeds | {base['test_accuracy_mean']:.2%} "
                        f"(fp32) → {c['test_accuracy_mean']:.2%} | | |")
    return rows


def readme_table(lenet: dict | None, mlp: dict | None, overhead: dict | None, rowlstm: dict | None) -> str:
    rows = table(["experiment", "accuracy (dense → compact)", "reduction",
                  "CPU speedup, batch 64 / 1, 1 thread: PyTorch; onnxruntime"])
    for d, what in ((lenet, "LeNet, Fashion-MNIST, SSL"), (mlp, "MLP, Fashion-MNIST, SSL neurons"),
                    (rowlstm, "LSTM, sequential Fashion-MNIST, ISS"),
                    (_load("ssl_resnet20_depth"), "ResNet-20, Fashion-MNIST, SSL depth"),
                    (_load("ssl_resnet20_force_lowrank"), "ResNet-20, Fashion-MNIST, force + low rank"),
                    (_load("ssl_vit_ssl"), "ViT (4 blocks, width 128), Fashion-MNIST, SSL heads, neurons, width")):
        if d is None:
            continue
        acc, branches = d["accuracy"], d.get("branches") or {}
        red = f"{branches['removed']} of {branches['total']} residual branches removed, " if branches.get("removed") else ""
        red += f"{d['conv_flop_reduction']:.1f}× fewer conv FLOPs, " if d["conv_macs"]["dense"] else ""
        red += f"{d['flop_reduction']:.1f}× fewer FLOPs overall"
        sp, so = d["speed"], d.get("speed_onnxruntime")
        ort_speed = (f"; {so['threads1_batch64']['speedup']:.2f}× / {so['threads1_batch1']['speedup']:.2f}×"
                     if so else "")
        rows.append(f"| {what} | {acc['baseline']:.2%} → {acc['finetune']:.2%} | {red} | "
                    f"{sp['threads1_batch64']['speedup']:.2f}× / {sp['threads1_batch1']['speedup']:.2f}×{ort_speed} |")
    lm = next((d for name in reversed(LM_RECIPES) if (d := _load_lm(name)) is not None), None)
    rows += readme_rows(_load("ssl_lenet_force_lowrank"), _load("ssl_lenet_ssl_force_lowrank"), lm)
    rows += _terngrad_rows(_load("terngrad_wire", TernGradWire), _load("terngrad_speed", TernGradSpeed),
                           _load("terngrad_convergence", TernGradConvergence))
    if overhead:
        share = overhead["overhead"]["prox_alone"]
        rows.append(f"| GroupLasso prox step, LeNet | | {share:.1%} of a training step | |")
    return "\n".join(rows) + "\n\nDetails, per-layer structure and machine: [RESULTS.md](RESULTS.md)."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT, metavar="DIR",
                        help="folder to write RESULTS.md and README.md into (default: the repository root; the README "
                             "is always read from there)")
    args = parser.parse_args()
    lenet, mlp, rowlstm = _load("ssl_lenet_ssl_full"), _load("ssl_mlp_ssl"), _load("ssl_rowlstm_iss")
    overhead, modes = _load("lasso_overhead", Overhead), _load("prox_vs_subgradient_lenet_ssl", Modes)
    out = ["# Results", "", "Generated by `python benchmarks/make_results.py` from `benchmarks/results/*.json`; "
           "each JSON is written by the benchmark script named in it (`make bench` runs them all).", ""]
    if lenet:
        out += ssl_section(lenet, "SSL on LeNet, Fashion-MNIST (full recipe)")
    if mlp:
        out += ssl_section(mlp, "SSL on the MLP 784–500–300–10, Fashion-MNIST (neurons)")
    if rowlstm:
        out += ssl_section(rowlstm, "ISS on a 2-layer LSTM, sequential Fashion-MNIST (hidden units)")
    if (depth := _load("ssl_resnet20_depth")) is not None:
        out += ssl_section(depth, "Depth-wise SSL on ResNet-20, Fashion-MNIST (residual branches)")
    if (vit := _load("ssl_vit_ssl")) is not None:
        out += ssl_section(vit, "SSL on a small ViT, Fashion-MNIST (attention heads, MLP neurons, model width)")
    lms = [lm for name in LM_RECIPES if (lm := _load_lm(name)) is not None]
    out += iss_lm_overview(lms)
    for lm in lms:
        out += iss_lm_section(lm)
    if (alt := _load("iss_alternatives", ISSAlternatives)) is not None:
        out += iss_alternatives_section(alt)
    out += lowrank_sections(_load("ssl_lenet_lowrank"), _load("ssl_lenet_force_lowrank"), lenet,
                            _load("ssl_lenet_ssl_force_lowrank"), _load("force_seeds_lenet_force_lowrank", ForceSeeds))
    out += rank_table_section(_load("ssl_resnet20_lowrank"), _load("ssl_resnet20_force_lowrank"),
                              "Force regularization and low rank: ResNet-20, Fashion-MNIST")
    if overhead:
        out += overhead_section(overhead)
    if modes:
        out += modes_section(modes)
    for path in sorted(RESULTS.glob("ssl_vs_magnitude_*.json")):
        if not path.stem.endswith("_smoke"):
            out += magnitude_section(load(path, Magnitude))
    codec = _load("codec_throughput", Codec)
    if codec:
        out += codec_section(codec)
    out += terngrad_sections(RESULTS)
    out += zoo_section(zoo) if (zoo := _load("zoo_speed", ZooSpeed)) is not None else []
    out += exactness_section(exact) if (exact := _load("zoo_exactness", ZooExactness)) is not None else []
    out += timm_hf_section(timm_hf) if (timm_hf := _load("zoo_timm_hf", ZooTimmHF)) is not None else []
    out += capture_speed_section(speed) if (speed := _load("capture_speed", CaptureSpeed)) is not None else []
    for path in sorted(RESULTS.glob("gpt_*.json")):
        out += gpt_section(load(path, GPTRun))
    first = _load("first_contact", FirstContact)
    out += first_contact_section(first) if first is not None else []
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "RESULTS.md").write_text("\n".join(out))
    readme = (ROOT / "README.md").read_text()
    table = readme_table(lenet, mlp, overhead, rowlstm)
    readme = re.sub(r"<!-- results:start -->.*<!-- results:end -->",
                    lambda _: f"<!-- results:start -->\n{table}\n<!-- results:end -->", readme, flags=re.S)
    if first is not None:
        readme = re.sub(r"<!-- demo-time:start -->.*?<!-- demo-time:end -->",
                        lambda _: f"<!-- demo-time:start -->{demo_promise(first)}<!-- demo-time:end -->", readme,
                        flags=re.S)
    (args.out / "README.md").write_text(readme)
    print(f"wrote RESULTS.md and README.md's results table in {args.out}")


if __name__ == "__main__":
    main()
