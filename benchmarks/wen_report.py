"""RESULTS.md sections for force regularization + low rank (``ssl_recipe.py`` on the lowrank recipes)
and for ISS on the word LM (``iss_lm.py``). Every number comes from ``results/*.json``.
"""

from __future__ import annotations

import re
import statistics
from typing import Any

from _report import machine_line, table

__all__ = ["iss_alternatives_section", "iss_lm_overview", "iss_lm_section", "lowrank_sections", "rank_table_section",
           "readme_rows"]


def _ranks(d: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in d["lowrank"]}


def _speed(d: dict[str, Any], key: str) -> str:
    pt, ort = d["speed"].get(key), d.get("speed_onnxruntime", {}).get(key)
    return f"{pt['speedup']:.2f}×" + (f" / {ort['speedup']:.2f}×" if ort else "")


def _force_label(d: dict[str, Any]) -> str:
    """The baseline's force as the recipe gives it: kind, λ_s, adaptive, and for how many epochs."""
    f, epochs = d["recipe"]["baseline"]["force"], d["recipe"]["baseline"]["epochs"]
    label = f"force {f['kind']}{', adaptive' if f.get('adaptive') else ''}, λ_s {f['strength']:g}"
    if f.get("epochs") is not None and f["epochs"] < epochs:
        label += f" for epochs 1–{f['epochs']} of {epochs}"
    return label


def _force_layers(d: dict[str, Any]) -> str:
    """Which layers the baseline's force acts on, as the recipe says."""
    f = d["recipe"]["baseline"]["force"]
    mult = ", ".join(f"{k} ×{v:g}" for k, v in f["multipliers"].items()) or "none"
    return f"Layers excluded from the force: {', '.join(f['exclude']) or 'none'}; per-layer multipliers of λ_s: {mult}."


def lowrank_sections(plain: dict[str, Any] | None, force: dict[str, Any] | None,
                     ssl: dict[str, Any] | None, combined: dict[str, Any] | None,
                     seeds: dict[str, Any] | None = None) -> list[str]:
    """Ranks at 95% energy with and without the force (and over seeds); then SSL alone / low rank alone / both."""
    lines: list[str] = []
    runs = [(n, d) for n, d in (("no force", plain), ("force", force)) if d]
    if runs:
        d0 = runs[0][1]
        lines += ["### Force regularization and low rank: LeNet, Fashion-MNIST", "",
                  "Ranks at 95% PCA energy (the smallest r whose eigenvalues keep 95%, `torchslim.lowrank`) of the "
                  "dense model trained with and without the force (`ForceRegularizer`, λ_s chosen on the validation "
                  "split), then each layer decomposed where r saves multiply-adds, and fine-tuned. Speedups: dense vs "
                  f"decomposed, 1 thread, PyTorch / onnxruntime, median of 30 interleaved runs; "
                  f"{machine_line(d0)}.", ""]
        names = [r["name"] for r in d0["lowrank"]]
        shapes = [f"{n}: {_ranks(d0)[n]['out']}×{_ranks(d0)[n]['fan_in']}" for n in names]
        lines += table(["", *shapes, "valid / test accuracy (dense)", "decomposed", "fine-tuned", "MACs",
                        "speedup b64", "b1"])
        for label, d in runs:
            r = _ranks(d)
            cells = " | ".join(f"{r[n]['rank']}" + ("" if r[n]["decomposed"] else " (kept)") for n in names)
            what = label if label == "no force" else _force_label(d)
            acc, valid = d["accuracy"], d.get("valid_accuracy") or {}
            lines.append(f"| {what} | {cells} | {valid.get('baseline', float('nan')):.2%} / {acc['baseline']:.2%} "
                         f"| {acc['compact']:.2%} | {acc['finetune']:.2%} | {d['flop_reduction']:.2f}× fewer "
                         f"| {_speed(d, 'threads1_batch64')} | {_speed(d, 'threads1_batch1')} |")
        if plain and force:
            rp, rf = _ranks(plain), _ranks(force)
            ratio = sum(rp[n]["rank"] for n in names) / max(1, sum(rf[n]["rank"] for n in names))
            lines += ["", f"Summed ranks: {sum(rp[n]['rank'] for n in names)} without the force, "
                      f"{sum(rf[n]['rank'] for n in names)} with it ({ratio:.2f}× lower); per layer "
                      + ", ".join(f"{n} {rp[n]['rank'] / max(1, rf[n]['rank']):.2f}×" for n in names) + ".",
                      "", _force_layers(force)]
        lines.append("")
        lines += force_seeds_section(seeds)
    return lines + _combined_section(plain, ssl, force, combined)


def _combined_section(plain: dict[str, Any] | None, ssl: dict[str, Any] | None, force: dict[str, Any] | None,
                      combined: dict[str, Any] | None) -> list[str]:
    """SSL alone, force + low rank alone, and both: accuracy, multiply-adds and speed of each final model."""
    both = [(n, d) for n, d in (("SSL alone", ssl), ("force + low rank alone", force),
                                ("force + SSL + low rank", combined)) if d]
    if not (combined and len(both) > 1):
        return []
    plain_acc = plain["accuracy"]["baseline"] if plain else None

    def drop(d: dict[str, Any], ref: dict[str, Any] | None) -> str:
        """Final minus a dense model's accuracy, valid / test points (``ref`` None: the run's own dense)."""
        ref = ref or d
        pts = [f"{(d[k]['finetune'] - ref[k]['baseline']) * 100:+.2f}" for k in ("valid_accuracy", "accuracy")
               if d.get(k) and ref.get(k)]
        return " / ".join(pts)

    lines = ["### SSL, low rank, and both: LeNet, Fashion-MNIST", "",
             "Each row is a full recipe run (`benchmarks/ssl_recipe.py --recipe …`): test accuracy of its own dense "
             "baseline (trained with the force where the recipe has one) and of the final model; *Δ plain* is "
             "against the dense LeNet trained without any regularizer in `lenet_lowrank`"
             + (f" ({plain_acc:.2%})" if plain_acc is not None else "") + "; multiply-adds and parameters of the "
             "final model. The Δ columns give validation / test points; the recipes were chosen on validation.", "",
             *table(["method", "recipe", "its dense", "final", "Δ pts", "Δ plain", "MACs / sample", "fewer MACs",
                     "parameters", "speedup b64 (PyTorch / ORT)"])]
    for label, d in both:
        acc = d["accuracy"]
        vs_plain = drop(d, plain) if plain else ""
        lines.append(f"| {label} | `{d['recipe']['name']}` | {acc['baseline']:.2%} | {acc['finetune']:.2%} "
                     f"| {drop(d, None)} | {vs_plain} | {d['macs']['compact']:,} "
                     f"| {d['flop_reduction']:.1f}× | {d['params']['compact']:,} | {_speed(d, 'threads1_batch64')} |")
    return lines + [""]


def force_seeds_section(d: dict[str, Any] | None) -> list[str]:
    """Per-seed and mean ranks / accuracy of the dense model with and without the force."""
    if not d:
        return []
    plain, force = d["runs"][d["plain_recipe"]], d["runs"][d["force_recipe"]]
    lines = [f"#### Over {len(d['seeds'])} training seeds", "",
             f"`benchmarks/force_seeds.py`: the dense baselines of `{d['plain_recipe']}` and `{d['force_recipe']}` "
             f"trained with seeds {', '.join(map(str, d['seeds']))}; summed ranks at 95% energy; "
             f"{machine_line(d)}.", "",
             *table(["seed", "no force: valid / test", "ranks", "force: valid / test", "ranks", "Δ valid / test pts",
                     "lower"])]

    def cell(r: dict[str, Any]) -> str:
        return (f"{r['valid_acc']:.2%} / " if r.get("valid_acc") is not None else "") + f"{r['test_acc']:.2%}"

    def delta(a: dict[str, Any], b: dict[str, Any]) -> str:
        valid = f"{(b['valid_acc'] - a['valid_acc']) * 100:+.2f} / " if b.get("valid_acc") is not None else ""
        return valid + f"{(b['test_acc'] - a['test_acc']) * 100:+.2f}"

    for a, b in zip(plain, force):
        ra, rb = sum(a["ranks"].values()), sum(b["ranks"].values())
        lines.append(f"| {a['seed']} | {cell(a)} | {ra} | {cell(b)} | {rb} | {delta(a, b)} | {ra / rb:.2f}× |")
    mp, mf = d["mean"]["plain"], d["mean"]["force"]
    lines.append(f"| **mean** | {cell(mp)} | {mp['summed_rank']:.0f} | {cell(mf)} | {mf['summed_rank']:.0f} "
                 f"| {delta(mp, mf)} | {d['rank_ratio']:.2f}× |")

    def layer_means(rows: list[dict[str, Any]]) -> dict[str, float]:
        return {n: statistics.mean(r["ranks"][n] for r in rows) for n in rows[0]["ranks"]}

    lp, lf = layer_means(plain), layer_means(force)
    lines += ["", "Mean rank per layer, no force → force: "
              + ", ".join(f"{n} {lp[n]:.1f} → {lf[n]:.1f}" for n in lp if n in lf) + "."]
    return lines + [""]


def rank_table_section(plain: dict[str, Any] | None, force: dict[str, Any] | None, title: str) -> list[str]:
    """Ranks at 95% energy per layer, without and with the force (one row per layer: for deep models)."""
    if not (plain and force):
        return []
    rp, rf = _ranks(plain), _ranks(force)
    names = [r["name"] for r in plain["lowrank"] if r["rank"] is not None and r["name"] in rf]
    f = force["recipe"]["baseline"]["force"]
    lines = [f"### {title}", "",
             "Ranks at 95% PCA energy (`torchslim.lowrank`) of the dense model trained without and with the force "
             f"(`ForceRegularizer`; {_force_label(force)}; per-layer multipliers "
             f"{f['multipliers']}), then each layer decomposed where r saves multiply-adds, and fine-tuned "
             f"{force['recipe']['finetune']['epochs']} epochs. Speedups: dense vs decomposed, 1 thread, PyTorch / "
             f"onnxruntime, median of 30 interleaved runs; {machine_line(force)}.", "",
             *table(["layer", "N × d", "rank, no force", "rank, force", "lower"])]
    for n in names:
        a, b = rp[n], rf[n]
        kept = lambda r: f"{r['rank']}" + ("" if r["decomposed"] else " (kept)")
        lines.append(f"| {n} | {a['out']} × {a['fan_in']} | {kept(a)} | {kept(b)} | {a['rank'] / max(1, b['rank']):.2f}× |")
    total_p, total_f = sum(rp[n]["rank"] for n in names), sum(rf[n]["rank"] for n in names)
    lines += [f"| **sum** | | {total_p} | {total_f} | {total_p / max(1, total_f):.2f}× |", "",
              *table(["", "valid / test accuracy, dense", "decomposed", "fine-tuned", "fewer MACs", "speedup b64",
                      "b1"])]
    for label, d in (("no force", plain), ("force", force)):
        acc, valid = d["accuracy"], d.get("valid_accuracy") or {}
        lines.append(f"| {label} | {valid.get('baseline', float('nan')):.2%} / {acc['baseline']:.2%} "
                     f"| {acc['compact']:.2%} | {acc['finetune']:.2%} | {d['flop_reduction']:.2f}× "
                     f"| {_speed(d, 'threads1_batch64')} | {_speed(d, 'threads1_batch1')} |")
    return lines + [""]


def _lm_budget(d: dict[str, Any]) -> str:
    """The ISS settings beyond λ: the size budget, the dropouts that differ from the dense model's, distillation."""
    r = d["recipe"]
    ssl, dropout = r["ssl"], r["finetune"].get("dropout")
    out = f", with dropout {dropout} as the compact model's fine-tuning" if dropout is not None else ""
    if ssl.get("dropout") is not None:
        out += " and the ISS phase's"
    if ssl.get("keep") is not None:
        lam = ssl["strength"]
        lam = ", ".join(f"{v:g}" for v in lam.values()) if isinstance(lam, dict) else f"{lam:g}"
        out += f"; ISS ran at λ {lam} with the size budget keep {ssl['keep']} (each layer stops at that fraction"
        out += f", reached over the first {ssl['keep_ramp']:.0%} of the phase" if ssl.get("keep_ramp") else ""
        out += ", layers λ left above it cut to it by magnitude every step)" if ssl.get("keep_cut") == "step" else ")"
    if kd := _distill(d):
        out += (f"; the ISS model's fine-tuning is distilled from the dense model (α {kd['alpha']:g} on its outputs "
                f"at temperature {kd['temperature']:g}; the direct design has no teacher)")
    return out


def _distill(d: dict[str, Any]) -> dict[str, Any] | None:
    """The fine-tuning's distillation settings when it had a teacher (results from before it existed have none)."""
    kd = d["recipe"]["finetune"].get("distill")
    return kd if kd and kd["alpha"] else None


def _from_scratch(d: dict[str, Any]) -> bool:
    """ISS learned from scratch (the paper's other protocol): no dense epochs before the group Lasso."""
    return d["recipe"]["baseline"]["epochs"] == 0


def _lm_reference(d: dict[str, Any]) -> tuple[float, float, dict[str, Any]]:
    """The dense model's test and validation perplexity and the direct design the ISS model is compared with.
    Learned from scratch, both are ``iss_lm_control.py``'s controls, trained as long (NaN until measured)."""
    if not _from_scratch(d):
        v = d.get("valid_perplexity", {})
        return d["perplexity"]["baseline"], v.get("baseline", float("nan")), d["direct_design"]
    nan = float("nan")
    dense, direct = d.get("control") or {}, d.get("control_direct")
    direct = ({"widths": direct["widths"], "perplexity": direct["perplexity"]["finetune"],
               "valid_perplexity": direct["valid_perplexity"]["finetune"]} if direct else
              {"widths": d["widths"]["compact"], "perplexity": nan, "valid_perplexity": nan})
    return (dense.get("perplexity", {}).get("finetune", nan), dense.get("valid_perplexity", {}).get("finetune", nan),
            direct)


def _lm_control(d: dict[str, Any], epochs: int) -> list[str]:
    """The controls of ``iss_lm_control.py``, when measured: the recipe's schedule with no ISS phase. ``epochs``:
    all the ISS model trained."""
    dense, direct = d.get("control"), d.get("control_direct")
    if not dense:
        return ["", "Whether the dense model gains as much from those extra epochs is what `iss_lm_control.py` "
                    "measures; it has not been run for this recipe."]
    e, p, v = dense["epochs"], d["perplexity"], d.get("valid_perplexity", {})
    curve = lambda c: ", ".join(f"{h['perplexity']:.1f}" for h in c["finetune_history"])
    reused = {re.sub(r"_(denseft|direct_long)$", "", c["measured_as"])
              for c in (dense, direct) if c and c.get("measured_as")}
    reused = f"; the runs of `{'`, `'.join(sorted(reused))}`'s, which train the same" if reused else ""
    lines = ["", f"Controls (`iss_lm_control.py`{reused}): the same schedule with no ISS phase, {e['baseline']} epochs "
                 f"and then the {e['finetune']} fine-tuning epochs (learning rate restarted), on the model itself; test "
                 "perplexity after each fine-tuning epoch in the last column:", "",
             *table(["", "hidden sizes", "epochs", "dropout", "test perplexity", "validation perplexity",
                     "ISS model vs it", "per epoch"])]
    for label, c in (("dense, fine-tuned as long", dense), ("direct design, as long", direct)):
        if c:
            ft = c["perplexity"]["finetune"]
            lines.append(f"| {label} | {', '.join(map(str, c['widths']))} | {sum(c['epochs'].values())} | {c['dropout']} "
                         f"| {ft:.2f} | {c['valid_perplexity']['finetune']:.2f} | {(p['finetune'] / ft - 1) * 100:+.1f}% "
                         f"| {curve(c)} |")
    r = d["recipe"]
    first = r["ssl"].get("dropout") if _from_scratch(d) else None  # the dropout of the first phase that trains
    first = r["model"]["kwargs"]["dropout"] if first is None else first
    ft = r["finetune"].get("dropout")
    dropout = first if ft in (None, first) else f"{first}, fine-tuning {ft}"
    lines.append(f"| ISS (above) | {', '.join(map(str, d['widths']['compact']))} | {epochs} | {dropout} "
                 f"| {p['finetune']:.2f} | {v.get('finetune', float('nan')):.2f} | | |")
    if _from_scratch(d):
        return lines
    gain = (1 - dense["perplexity"]["finetune"] / dense["perplexity"]["baseline"]) * 100
    verdict = ("that baseline is undertrained, and the ISS model is judged fairly against the controls, not against it"
               if gain > 2 else "the baseline is near convergence, and a fair reference for the ISS model")
    return lines + ["", f"The fine-tuning epochs alone take the dense model {gain:.1f}% lower than its "
                        f"{e['baseline']}-epoch baseline: {verdict}."]


def _vs(a: float, b: float, what: str) -> str:
    """Perplexity ``a`` against ``b`` in words (lower is better)."""
    return f"{abs(a / b - 1) * 100:.1f}% {'below' if a < b else 'above'} {what} ({b:.2f})"


def _lm_story(d: dict[str, Any]) -> str:
    """One run in a sentence: what it tried (from its recipe) and where it landed against its references."""
    r, p = d["recipe"], d["perplexity"]
    ref, _, dd = _lm_reference(d)
    width = r["model"]["kwargs"]["hidden_size"]
    if _from_scratch(d):
        how = "learns ISS from scratch (the paper's other protocol) on the controls' schedule"
    else:
        how = f"starts ISS from a dense model trained {r['baseline']['epochs']} epochs"
    how += f", with the size budget `ssl.keep: {r['ssl']['keep']}`" if r["ssl"].get("keep") is not None else ""
    how += ", and fine-tunes with the dense model as teacher" if _distill(d) else ""
    found = (f"{', '.join(map(str, d['widths']['compact']))} units at test perplexity {p['finetune']:.2f}, "
             f"{_vs(p['finetune'], ref, 'the dense model trained as long' if _from_scratch(d) else 'its dense model')}")
    if dd["perplexity"] == dd["perplexity"]:  # NaN until the direct design is measured
        found += f" and {_vs(p['finetune'], dd['perplexity'], 'the direct design')}"
    c = d.get("control")
    if c and not _from_scratch(d) and c["perplexity"]["finetune"] < 0.98 * ref:
        found += (f"; but `iss_lm_control.py` shows that {r['baseline']['epochs']}-epoch baseline undertrained: "
                  f"trained as long without ISS, the dense model reaches {c['perplexity']['finetune']:.2f}")
        if cd := d.get("control_direct"):
            found += f" and the direct design {cd['perplexity']['finetune']:.2f}"
    return f"- `{r['name']}` (2×{width}) {how}: {found}."


def iss_lm_overview(runs: list[dict[str, Any]]) -> list[str]:
    """The word-LM runs in brief, in the order they were made: what each tried and what it found."""
    if not runs:
        return []
    return ["### ISS on a word-level LSTM language model: the runs in brief", "",
            "ISS (`hidden` groups) on a word LSTM over the King James Bible (`apt-get install bible-kjv`; or "
            "`data.name: ptb` with `--data-dir` at PTB's three files), `benchmarks/iss_lm.py`; the 2×650 runs take "
            "hours each on a CPU. The *direct design* trains the ISS model's widths from scratch; each run has its "
            "own section below.", "", *map(_lm_story, runs), ""]


def iss_lm_section(d: dict[str, Any]) -> list[str]:
    """Perplexity, widths, direct design and speed of ISS on the word LM."""
    p, v, w = d["perplexity"], d.get("valid_perplexity", {}), d["widths"]
    ref, ref_valid, dd = _lm_reference(d)
    k = d["recipe"]["model"]["kwargs"]
    epochs = [d["recipe"][phase]["epochs"] for phase in ("baseline", "ssl", "finetune")]
    if _from_scratch(d):
        how = (f"ISS is learned from scratch, as the paper's \"learn ISS from scratch\": no dense phase, {epochs[1]} "
               f"epochs under the group Lasso, then {epochs[2]} of fine-tuning{_lm_budget(d)}. The dense and "
               "direct-design columns are the controls below, trained as long.")
    else:
        how = (f"The direct design trains the compact widths from scratch for {dd['epochs']} epochs, the dense "
               f"baseline's schedule{_lm_budget(d)}; the ISS model has trained {sum(epochs)} "
               f"({' + '.join(map(str, epochs))}: dense, ISS, fine-tuning).")
    lines = [f"### ISS on a word-level LSTM language model: `{d['recipe']['name']}`", "",
             f"The King James Bible (10k words + `<unk>` + `<eos>`, split by books), a 2-layer LSTM, hidden = "
             f"embedding = {k['hidden_size']}, tied decoder, dropout {k['dropout']}, BPTT {d['recipe']['data']['bptt']}; "
             f"perplexity on the test books (λ chosen on the validation books); {machine_line(d)}.", "",
             *table(["", "dense", "ISS (sparse)", "compact", "compact + fine-tuned", "direct design"]),
             f"| hidden sizes | {', '.join(map(str, w['dense']))} | | {', '.join(map(str, w['compact']))} "
             f"| {', '.join(map(str, w['compact']))} | {', '.join(map(str, dd['widths']))} |",
             f"| test perplexity | {ref:.2f} | {p['ssl']:.2f} | {p['compact']:.2f} | {p['finetune']:.2f} "
             f"({(p['finetune'] / ref - 1) * 100:+.1f}%) | {dd['perplexity']:.2f} "
             f"({(dd['perplexity'] / ref - 1) * 100:+.1f}%) |"]
    if v:
        lines.append(f"| validation perplexity | {ref_valid:.2f} | {v['ssl']:.2f} | {v['compact']:.2f} "
                     f"| {v['finetune']:.2f} | {dd['valid_perplexity']:.2f} |")
    lines += [f"| parameters | {d['params']['dense']:,} | | {d['params']['compact']:,} | | |",
              f"| LSTM multiply-adds / token | {d['lstm_macs']['dense']:,} | | {d['lstm_macs']['compact']:,} "
              f"({d['lstm_flop_reduction']:.2f}× fewer) | | |",
              f"| all multiply-adds / token | {d['macs']['dense']:,} | | {d['macs']['compact']:,} "
              f"({d['flop_reduction']:.2f}× fewer) | | |", "", how, *_lm_control(d, sum(epochs)), "",
              "CPU latency on (35, B) token blocks, median of 30 interleaved runs; *LSTM* is the embedding and "
              "the LSTM layers without the 10k-word decoder, which ISS does not shrink:", "",
              *table(["threads", "batch", "dense ms", "compact ms", "speedup", "LSTM dense ms", "LSTM compact ms",
                      "LSTM speedup"])]
    for key, s in d["speed"].items():
        t, b = re.match(r"threads(\d+)_batch(\d+)", key).groups()
        lines.append(f"| {t} | {b} | {s['dense']['median_ms']:.2f} | {s['compact']['median_ms']:.2f} "
                     f"| {s['speedup']:.2f}× | {s['lstm_dense']['median_ms']:.2f} | {s['lstm_compact']['median_ms']:.2f} "
                     f"| {s['lstm_speedup']:.2f}× |")
    if d.get("history_plot"):
        lines += ["", f"![ISS units alive per epoch](benchmarks/results/{d['history_plot']})"]
    return lines + [""]


def iss_alternatives_section(d: dict[str, Any]) -> list[str]:
    """ISS vs its alternatives (rows only, columns only, element-wise L1) on the row LSTM."""
    s = d["setup"]
    names = {"hidden": "ISS (`hidden`)", "hidden_row": "rows only", "hidden_col": "columns only", "l1": "element-wise L1"}
    lines = ["### ISS vs rows-only, columns-only and element-wise L1 (row LSTM)", "",
             f"{s['model']}, {s['train_images']:,} training and {s['test_images']:,} test images; {s['baseline_epochs']} "
             f"dense epochs ({d['dense']['test_acc']:.2%}), then {s['ssl_epochs']} epochs with each regularizer "
             f"(proximal, λ_g = λ·√|g|), no fine-tuning, one seed, test split (a comparison, not a tuned result); "
             f"{machine_line(d)}. Each cell: test accuracy / LSTM weights that are zero / hidden size after "
             f"`compact()` (of {d['dense']['hidden_size']}).", "",
             *table(["λ", *names.values()])]
    points = {(p["kind"], p["lam"]): p for p in d["points"]}
    for lam in s["lams"]:
        cells = []
        for kind in names:
            p = points.get((kind, lam))
            cells.append(f"{p['test_acc']:.2%} / {p['zero_fraction_lstm']:.0%} / {p['hidden_size_compact']}" if p else "")
        lines.append(f"| {lam:g} | " + " | ".join(cells) + " |")
    control = points.get(("none", 0.0)) or next((p for p in d["points"] if p["kind"] == "none"), None)
    if control:
        lines += ["", f"The same epochs without a regularizer: {control['test_acc']:.2%}. Element-wise L1 zeroes most "
                  "weights but leaves whole units in place, so `compact()` can cut little; ISS removes units."]
    return lines + [""]


def readme_rows(force: dict[str, Any] | None, combined: dict[str, Any] | None, lm: dict[str, Any] | None) -> list[str]:
    """README results rows: force + low rank and force + SSL + low rank on LeNet, ISS on the word LM."""
    rows = []
    for d, what in ((force, "LeNet, Fashion-MNIST, force + low rank"), (combined, "LeNet, force + SSL + low rank")):
        if d:
            acc, sp, so = d["accuracy"], d["speed"], d.get("speed_onnxruntime", {})
            ort = f"; {so['threads1_batch64']['speedup']:.2f}× / {so['threads1_batch1']['speedup']:.2f}×" if so else ""
            rows.append(f"| {what} | {acc['baseline']:.2%} → {acc['finetune']:.2%} | {d['flop_reduction']:.1f}× fewer "
                        f"FLOPs overall | {sp['threads1_batch64']['speedup']:.2f}× / "
                        f"{sp['threads1_batch1']['speedup']:.2f}×{ort} |")
    if lm:
        p, w, s = lm["perplexity"], lm["widths"], lm["speed"]["threads1_batch20"]
        c = lm.get("control")
        if _from_scratch(lm):
            ref, _, direct = _lm_reference(lm)
            what = "ISS from scratch"
            ppl = f"perplexity {ref:.1f} → {p['finetune']:.1f} (trained as long; direct design {direct['perplexity']:.1f})"
        else:
            notes = [f"dense fine-tuned as long: {c['perplexity']['finetune']:.1f}"] if c else []
            if direct := lm.get("direct_design"):
                notes.append(f"direct design {direct['perplexity']:.1f}")
            what, ppl = "ISS", f"perplexity {p['baseline']:.1f} → {p['finetune']:.1f}"
            ppl += f" ({'; '.join(notes)})" if notes else ""
        if _distill(lm):
            what += ", fine-tuned with the dense model as teacher"
        rows.append(f"| Word LSTM LM, King James Bible, {what} | {ppl} "
                    f"| hidden {'/'.join(map(str, w['dense']))} → {'/'.join(map(str, w['compact']))}, "
                    f"{lm['lstm_flop_reduction']:.1f}× fewer LSTM FLOPs | LSTM {s['lstm_speedup']:.2f}×, whole model "
                    f"{s['speedup']:.2f}× (batch 20, seq 35) |")
    return rows
