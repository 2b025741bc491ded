"""timm and Hugging Face models through ``structures`` + ``compact``, beside Torch-Pruning's MagnitudePruner.

    python benchmarks/zoo_timm_hf.py [--models N | NAME ...] [--fraction 0.3] [--timeout 120] [--smoke]

The models are the public list of ``zoo_models.py`` (random weights, eval mode, small inputs). For each:

- torchslim: ``structures(kinds=("channel", "neuron", "head", "embed"))`` (groups per kind, and the share of the conv/linear
  output rows some group holds), a seeded random ``--fraction`` of each family's groups zeroed (never a
  whole family), ``compact``, ``verify`` on a fresh input (``atol=1e-4``). *Exact*: the outputs match;
  *useful*: exact and the compact model keeps ≤ 85% of the parameters. A failure is a *clear error*
  (a ``TorchSlimError``: its type and first line) or a *crash* (any other exception: its type, message
  and the innermost frame). ``structures(strict=True)`` names the operation that stops the tracer.
- Torch-Pruning (optional: ``pip install torch-pruning``; the column is skipped without it): the documented
  ``MagnitudePruner`` with ``GroupMagnitudeImportance(p=2)``, ``pruning_ratio`` = ``--fraction``, the
  classifier / LM head ignored, one ``step()``; then whether the pruned model still runs and gives an
  output of the dense shape, its parameters as a ratio, seconds.

Torch-Pruning's column does not depend on torchslim: ``--torch-pruning-from OLD.json`` takes it from an earlier
run (this file's was measured at commit 7f001a7: ``git show 7f001a7:benchmarks/results/zoo_timm_hf.json``), and
``--update --models ...`` measures only those models and replaces their rows.

A model that takes longer than ``--timeout`` seconds in one tool is stopped there (``timeout``). One
thread. Writes ``benchmarks/results/zoo_timm_hf.json`` (``zoo_timm_hf_smoke.json`` with ``--smoke``).
"""

from __future__ import annotations

import argparse
import collections
import copy
import gc
import importlib.metadata
import json
import re
import signal
import subprocess
import time
import traceback
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from _common import RESULTS, write
from torch import nn
from zoo_models import MODELS, Zoo, build

import torchslim
from torchslim import compact, structures, verify
from torchslim.errors import TorchSlimError

USEFUL = 0.85  # a compact model keeping at most this share of the parameters is a useful compaction
KINDS = ("channel", "neuron", "head", "embed")


class Timeout(BaseException):
    """A model ran past its time limit (a BaseException, so that no ``except Exception`` swallows it)."""


@contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    def _raise(*_: Any) -> None:
        raise Timeout(f"over {seconds} s")

    previous = signal.signal(signal.SIGALRM, _raise)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _failure(e: BaseException, stage: str) -> dict[str, Any]:
    """``status`` (clear_error / crash / timeout), the stage, the error's type and message, and for a crash
    the innermost frame of the traceback (where the tracer or the surgery broke)."""
    if isinstance(e, Timeout):
        return {"status": "timeout", "stage": stage, "error": {"type": "Timeout", "message": str(e)}}
    clear = isinstance(e, TorchSlimError)
    message = str(e).strip()
    out = {"status": "clear_error" if clear else "crash", "stage": stage,
           "error": {"type": type(e).__name__, "message": (message.splitlines() or [""])[0][:300] if clear
                     else message[:400]}}
    if not clear:
        frames = traceback.extract_tb(e.__traceback__)
        ours = [f for f in frames if "torchslim" in f.filename]
        last = frames[-1] if frames else None
        out["where"] = [f"{f.filename.split('site-packages/')[-1].split('/src/')[-1]}:{f.lineno} in {f.name}"
                        for f in ([ours[-1]] if ours else []) + ([last] if last and last is not (ours or [None])[-1]
                                                                 else [])]
    return out


def output_rows(model: nn.Module) -> dict[str, tuple[int, int]]:
    """``{param name: (output dim, rows)}`` of every conv and linear weight (transformers' ``Conv1D`` keeps
    its outputs in dim 1)."""
    out = {}
    for name, m in model.named_modules():
        w = getattr(m, "weight", None)
        if not isinstance(w, torch.Tensor) or w.dim() < 2:
            continue
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
            dim = 1 if isinstance(m, nn.modules.conv._ConvTransposeNd) else 0
        elif type(m).__name__ == "Conv1D":
            dim = 1
        else:
            continue
        out[f"{name}.weight" if name else "weight"] = (dim, w.shape[dim])
    return out


def coverage(model: nn.Module, groups: list) -> dict[str, Any]:
    """Conv/linear output rows that some group holds, of all of them."""
    rows = output_rows(model)
    held = {(param, int(r)) for g in groups for param, dim, idx in g.slices
            if param in rows and dim == rows[param][0] for r in idx}
    total = sum(r for _, r in rows.values())
    return {"layers": len(rows), "output_rows": total, "rows_in_groups": len(held),
            "ratio": len(held) / total if total else 0.0}


def zero_random(groups: list, fraction: float, seed: int = 0) -> int:
    """Zero a seeded random ``fraction`` of each family's groups, never all of a family: the count zeroed."""
    families: dict[int, list] = collections.defaultdict(list)
    for g in groups:
        families[id(getattr(g, "family", g))].append(g)
    gen = torch.Generator().manual_seed(seed)
    zeroed = 0
    for members in families.values():
        k = min(round(fraction * len(members)), len(members) - 1)
        for i in torch.randperm(len(members), generator=gen)[:k].tolist():
            members[i].zero_()
            zeroed += 1
    return zeroed


def _slim(model: nn.Module, x: torch.Tensor, fresh, fraction: float, timeout: int, strict: bool) -> dict[str, Any]:
    row: dict[str, Any] = {}
    stage = "structures"
    try:
        with time_limit(timeout), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t0 = time.perf_counter()
            groups = structures(model, x, kinds=KINDS)
            row["structures_s"] = time.perf_counter() - t0
            row["groups"] = {k: sum(1 for g in groups if g.kind == k) for k in sorted({g.kind for g in groups})}
            row["families"] = len({id(getattr(g, "family", g)) for g in groups})
            row["coverage"] = coverage(model, groups)
            row["warnings"] = sorted({str(w.message).splitlines()[0][:200] for w in caught
                                      if "torchslim" in (w.filename or "")})[:5]
            if strict:
                stage = "strict"
                try:
                    structures(model, x, kinds=KINDS, strict=True)
                    row["strict_stops_at"] = None
                except TorchSlimError as e:
                    row["strict_stops_at"] = str(e).splitlines()[0][:300]
            stage = "zero"
            row["zeroed"] = zero_random(groups, fraction)
            stage = "compact"
            t0 = time.perf_counter()
            small = compact(model, x)
            row["compact_s"] = time.perf_counter() - t0
            stage = "verify"
            report = verify(model, small, fresh(), atol=1e-4)
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt):
            raise
        return {**row, **_failure(e, stage)}
    dense, kept = n_params(model), n_params(small)
    ratio = kept / dense
    return {**row, "status": "exact" if report.ok else "inexact", "stage": None, "error": None,
            "params": [dense, kept], "params_ratio": ratio, "useful": bool(report.ok and ratio <= USEFUL),
            "max_abs_diff": report.max_abs_diff, "output_scale": report.scale}


def _classifiers(model: nn.Module, out_width: int) -> list[nn.Module]:
    """The layers a user keeps whole: timm's classifier, and every linear/conv writing the output's width."""
    head = [model.get_classifier()] if hasattr(model, "get_classifier") else []
    head = [m for m in head if isinstance(m, nn.Module) and any(True for _ in m.parameters())]
    for m in model.modules():
        width = (m.out_features if isinstance(m, nn.Linear) else
                 m.out_channels if isinstance(m, nn.modules.conv._ConvNd) else None)
        if width == out_width and m not in head:
            head.append(m)
    return head


def _torch_pruning(model: nn.Module, x: torch.Tensor, fresh, fraction: float, timeout: int) -> dict[str, Any]:
    import torch_pruning as tp

    with torch.no_grad():
        shape = tuple(model(x).shape)
    dense = n_params(model)
    stage = "prune"
    try:
        with time_limit(timeout), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t0 = time.perf_counter()
            pruner = tp.pruner.MagnitudePruner(model, x, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                               pruning_ratio=fraction, ignored_layers=_classifiers(model, shape[-1]))
            pruner.step()
            seconds = time.perf_counter() - t0
            stage = "forward"
            with torch.no_grad():
                y = model(fresh())
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt):
            raise
        f = _failure(e, stage)
        status = "timeout" if f["status"] == "timeout" else "forward_failed" if stage == "forward" else "error"
        return {**f, "status": status}
    ok = tuple(y.shape) == shape and bool(torch.isfinite(y).all())
    kept = n_params(model)
    return {"status": "ok" if ok else "forward_failed", "stage": None if ok else "forward",
            "error": None if ok else {"type": "output", "message": f"output {tuple(y.shape)}, dense {shape}"},
            "seconds": seconds, "params": [dense, kept], "params_ratio": kept / dense,
            "useful": bool(ok and kept / dense <= USEFUL)}


def measure(spec: Zoo, fraction: float, timeout: int, strict: bool, with_tp: bool) -> dict[str, Any]:
    row: dict[str, Any] = {"model": spec.name, "family": spec.family, "source": spec.source}
    try:
        model, x, fresh = build(spec)
    except Exception as e:  # noqa: BLE001  (not a result of either tool: the model would not build here)
        return {**row, "build_error": f"{type(e).__name__}: {e}"[:300]}
    row["input"] = list(x.shape)
    row["params"] = n_params(model)
    tp_model = copy.deepcopy(model) if with_tp else None
    row["torchslim"] = _slim(model, x, fresh, fraction, timeout, strict)
    del model
    gc.collect()
    if with_tp:
        torch.manual_seed(1)
        row["torch_pruning"] = _torch_pruning(tp_model, x, fresh, fraction, timeout)
    return row


def summarize(rows: list[dict[str, Any]], with_tp: bool) -> dict[str, Any]:
    measured = [r for r in rows if "torchslim" in r]
    ts = [r["torchslim"] for r in measured]
    count = collections.Counter(t["status"] for t in ts)
    out: dict[str, Any] = {
        "models": len(measured), "build_errors": len(rows) - len(measured),
        "torchslim": {"traced": sum(1 for t in ts if sum(t.get("groups", {}).values())),
                      "exact": count["exact"], "useful": sum(1 for t in ts if t.get("useful")),
                      "inexact": count["inexact"], "clear_error": count["clear_error"], "crash": count["crash"],
                      "timeout": count["timeout"]},
        "by_family": {}}
    for fam in sorted({r["family"] for r in measured}):
        sub = [r["torchslim"] for r in measured if r["family"] == fam]
        out["by_family"][fam] = {"models": len(sub), "exact": sum(1 for t in sub if t["status"] == "exact"),
                                 "useful": sum(1 for t in sub if t.get("useful")),
                                 "with_heads": sum(1 for t in sub if t.get("groups", {}).get("head")),
                                 "with_width": sum(1 for t in sub if t.get("groups", {}).get("embed"))}
    if with_tp:
        tps = [r["torch_pruning"] for r in measured]
        c = collections.Counter(t["status"] for t in tps)
        out["torch_pruning"] = {"ran": len(tps) - c["error"] - c["timeout"], "forward_ok": c["ok"],
                                "useful": sum(1 for t in tps if t.get("useful")), "error": c["error"],
                                "forward_failed": c["forward_failed"], "timeout": c["timeout"]}
        for fam, d in out["by_family"].items():
            d["torch_pruning_ok"] = sum(1 for r in measured if r["family"] == fam
                                        and r["torch_pruning"]["status"] == "ok")
    out["failure_causes"] = collections.Counter(c for t in ts if (c := cause(t))).most_common()
    out["strict_stops"] = collections.Counter(op for t in ts if (op := stop_op(t.get("strict_stops_at")))).most_common()
    return out


def stop_op(message: str | None) -> str | None:
    """The operation a ``strict=True`` message names (``cannot follow channels through OP at 'node'``)."""
    if not message:
        return None
    m = re.search(r"through (.+?) at (?:module )?'", message)
    return re.sub(r"\[[^\]]*\]", "…", m.group(1)) if m else message[:80]


def cause(t: dict[str, Any]) -> str | None:
    """Why a model is not usefully compacted, in a form that counts alike across models (no node names)."""
    if t["status"] in ("exact", "inexact") and t.get("useful"):
        return None
    if t["status"] not in ("exact", "inexact"):
        message = re.sub(r"'[^']*'|\[[^\]]*\]|\d+", "…", t["error"]["message"])
        message = re.sub(r"could not trace \w+:", "could not trace the model:", message).split(". Make the")[0][:110]
        return f"{t['status']} in {t['stage']}: {t['error']['type']}: {message}"
    if t["status"] == "inexact":
        return "inexact"
    op = stop_op(t.get("strict_stops_at"))
    return f"kept > {USEFUL:.0%}" + (f"; strict stops at {op}" if op else "; no op stops the tracer")


def _line(r: dict[str, Any]) -> str:
    if "build_error" in r:
        return f"{r['model']}: BUILD {r['build_error']}"
    t = r["torchslim"]
    s = f"{r['model']}: {t['status']}"
    if "groups" in t:
        s += f", groups {t['groups']}, coverage {t['coverage']['ratio']:.0%}"
    if "params_ratio" in t:
        s += f", kept {t['params_ratio']:.2f}{' (useful)' if t['useful'] else ''}"
    if t.get("error"):
        s += f" [{t['stage']}: {t['error']['type']}: {t['error']['message'][:100]}]"
    if "torch_pruning" in r:
        p = r["torch_pruning"]
        s += f" | torch-pruning {p['status']}" + (f" kept {p['params_ratio']:.2f}" if "params_ratio" in p else "")
    return s


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def _commit() -> str | None:
    """The git commit of the torchslim imported (a worktree snapshot or the checkout), where it is in one."""
    try:
        return subprocess.run(["git", "-C", str(Path(torchslim.__file__).parent), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _resummarize(path: Path) -> dict[str, Any]:
    """Rewrite a results file's summary from its rows (after a change in how causes are read)."""
    data = json.loads(path.read_text())
    data["summary"] = summarize(data["rows"], data["settings"]["torch_pruning"] != "not installed (skipped)")
    path.write_text(json.dumps(data, indent=2) + "\n")
    return data


def _updated(path: Path, rows: list[dict[str, Any]], settings: dict[str, Any]) -> dict[str, Any]:
    """The results file at ``path`` with ``rows`` in place of its rows for the same models, summary recomputed."""
    data = json.loads(path.read_text())
    new = {r["model"]: r for r in rows}
    data["rows"] = [new.get(r["model"], r) for r in data["rows"]]
    data["settings"].setdefault("updated", []).append({"models": sorted(new), "commit": settings["torchslim_commit"]})
    data["summary"] = summarize(data["rows"], data["settings"]["torch_pruning"] != "not installed (skipped)")
    return {k: v for k, v in data.items() if k not in ("benchmark", "machine", "date")}


def _earlier_tp(path: Path, fraction: float) -> dict[str, Any]:
    """The Torch-Pruning rows of an earlier run of this script, by model, with where they come from."""
    data = json.loads(path.read_text())
    if data["settings"]["fraction_zeroed"] != fraction:
        raise SystemExit(f"{path} pruned {data['settings']['fraction_zeroed']}, not --fraction {fraction}")
    return {"rows": {r["model"]: r["torch_pruning"] for r in data["rows"] if "torch_pruning" in r},
            "version": data["settings"]["versions"].get("torch-pruning"),
            "source": {"file": path.name, "date": data["date"], "machine": data["machine"].get("cpu"),
                       "torchslim_commit": data["settings"].get("torchslim_commit")}}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=None,
                    help="model names of zoo_models.py, or one number N: the first N of the list (default: all)")
    ap.add_argument("--fraction", type=float, default=0.3, help="share of the groups zeroed / channels pruned")
    ap.add_argument("--timeout", type=int, default=120, help="seconds per model and tool")
    ap.add_argument("--no-strict", action="store_true", help="skip the strict=True trace (one trace fewer)")
    ap.add_argument("--no-torch-pruning", action="store_true", help="skip the Torch-Pruning column")
    ap.add_argument("--torch-pruning-from", type=Path, metavar="JSON",
                    help="take the Torch-Pruning column from an earlier results file instead of re-running it (it does "
                         "not depend on torchslim: same models, seeds and fraction); the file is named in the settings")
    ap.add_argument("--smoke", action="store_true", help="a quick check: written as zoo_timm_hf_smoke.json")
    ap.add_argument("--update", action="store_true",
                    help="measure only --models and replace their rows in results/zoo_timm_hf.json (the commit is noted)")
    ap.add_argument("--resummarize", action="store_true",
                    help="measure nothing: recompute the summary of results/zoo_timm_hf.json from its rows")
    args = ap.parse_args(argv)
    if args.resummarize:
        return _resummarize(RESULTS / "zoo_timm_hf.json")
    by_name = {s.name: s for s in MODELS}
    if args.models is None:
        specs = MODELS
    elif len(args.models) == 1 and args.models[0].isdigit():
        specs = MODELS[: int(args.models[0])]
    else:
        unknown = [n for n in args.models if n not in by_name]
        if unknown:
            ap.error(f"not in zoo_models.py: {', '.join(unknown)}")
        specs = [by_name[n] for n in args.models]
    earlier = _earlier_tp(args.torch_pruning_from, args.fraction) if args.torch_pruning_from else None
    with_tp = not args.no_torch_pruning and earlier is None and _version("torch-pruning") is not None
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(1)
    rows = []
    for spec in specs:
        rows.append(measure(spec, args.fraction, args.timeout, not args.no_strict, with_tp))
        if earlier is not None and spec.name in earlier["rows"]:
            rows[-1]["torch_pruning"] = earlier["rows"][spec.name]
        print(_line(rows[-1]), flush=True)
    with_tp = with_tp or (earlier is not None and all("torch_pruning" in r for r in rows if "torchslim" in r))
    summary = summarize(rows, with_tp)
    settings = {"fraction_zeroed": args.fraction, "kinds": list(KINDS), "useful_at_most": USEFUL,
                "timeout_s": args.timeout, "threads": 1, "atol": 1e-4,
                "versions": {p: _version(p) for p in ("timm", "transformers", "torch-pruning")},
                "torchslim_from": str(Path(torchslim.__file__).parent), "torchslim_commit": _commit(),
                "torch_pruning": ("MagnitudePruner, GroupMagnitudeImportance(p=2), classifier ignored, one step"
                                  if with_tp else "not installed (skipped)")}
    if earlier is not None:
        settings["torch_pruning_from"] = earlier["source"]
        settings["versions"]["torch-pruning"] = earlier["version"]
    data = {"settings": settings, "summary": summary, "rows": rows, **({"smoke": True} if args.smoke else {})}
    if args.update:
        data = _updated(RESULTS / "zoo_timm_hf.json", rows, settings)
    print({k: v for k, v in summary.items() if k != "failure_causes"})
    write("zoo_timm_hf_smoke" if args.smoke else "zoo_timm_hf", data)
    return data


if __name__ == "__main__":
    main()
