"""The benchmark scripts stay importable: they reach into the library, and a renamed helper must fail here,
not hours into `make bench`."""

import importlib
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPTS = sorted(p.stem for p in BENCHMARKS.glob("*.py"))


@pytest.mark.parametrize("name", SCRIPTS)
def test_benchmark_script_imports(name, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.setattr(sys, "argv", [name])
    module = importlib.import_module(name)
    assert module.__name__ == name


def test_run_all_lists_existing_scripts():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        run_all = importlib.import_module("run_all")
    finally:
        sys.path.remove(str(BENCHMARKS))
    missing = [step[0] for step in run_all.STEPS if not (BENCHMARKS / step[0]).is_file()]
    assert not missing


def test_lm_controls_keep_the_schedule_and_drop_iss(monkeypatch):
    from torchslim.train.recipes import load_recipe

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    control = importlib.import_module("iss_lm_control")
    recipe = load_recipe("kjv_lm_iss_650_keep")
    dense, direct = control.control_recipe(recipe), control.direct_recipe(recipe, [260, 250])
    for derived in (dense, direct):
        assert derived.ssl.epochs == 0
        assert (derived.baseline.epochs, derived.finetune.epochs) == (recipe.baseline.epochs, recipe.finetune.epochs)
        assert (derived.baseline.lr, derived.finetune.lr) == (recipe.baseline.lr, recipe.finetune.lr)
    assert dense.model.kwargs["hidden_size"] == recipe.model.kwargs["hidden_size"]
    assert dense.baseline.dropout is None and dense.finetune.dropout == recipe.model.kwargs["dropout"]
    assert direct.model.kwargs["hidden_size"] == [260, 250]
    assert direct.baseline.dropout == direct.finetune.dropout == recipe.finetune.dropout
    assert len({recipe.name, dense.name, direct.name}) == 3


def test_lm_controls_of_iss_from_scratch_train_its_iss_schedule_densely(monkeypatch):
    from torchslim.train.recipes import load_recipe

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    control = importlib.import_module("iss_lm_control")
    scratch = load_recipe("kjv_lm_iss_650_scratch")
    assert scratch.baseline.epochs == 0
    dense, direct = control.control_recipe(scratch), control.direct_recipe(scratch, [260, 260])
    for derived in (dense, direct):
        assert (derived.baseline.epochs, derived.baseline.lr) == (scratch.ssl.epochs, scratch.ssl.lr)
        assert (derived.ssl.epochs, derived.finetune.epochs) == (0, scratch.finetune.epochs)
    assert dense.baseline.dropout is None  # the dense model's own, not the ISS phase's
    # kjv_lm_iss_650_keep's controls train exactly these, so their measured results are reused
    assert control.measured(dense)["recipe"]["name"] == "kjv_lm_iss_650_keep_denseft"
    assert control.measured(direct)["recipe"]["name"] == "kjv_lm_iss_650_keep_direct_long"
    assert control.measured(control.direct_recipe(scratch, [260, 250])) is None


def test_lm_report_of_iss_from_scratch_compares_with_the_controls(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.setattr(sys, "argv", ["make_results"])
    make_results, wen_report = importlib.import_module("make_results"), importlib.import_module("wen_report")
    d = make_results._load_lm("kjv_lm_iss_650_keep")
    d["recipe"]["baseline"]["epochs"], d["direct_design"] = 0, None  # as if learned from scratch
    d["perplexity"]["baseline"] = 9000.0  # the untrained dense model: never the reference
    dense, direct = d["control"]["perplexity"]["finetune"], d["control_direct"]["perplexity"]["finetune"]
    row = next(line for line in wen_report.iss_lm_section(d) if line.startswith("| test perplexity"))
    assert row.split(" | ")[1] == f"{dense:.2f}" and f"| {direct:.2f} (" in row and "9000" not in row
    assert f"perplexity {dense:.1f} → {d['perplexity']['finetune']:.1f}" in wen_report.readme_rows(None, None, d)[0]


def test_lm_report_says_when_fine_tuning_was_distilled(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.setattr(sys, "argv", ["make_results"])
    make_results, wen_report = importlib.import_module("make_results"), importlib.import_module("wen_report")
    d = make_results._load_lm("kjv_lm_iss_650_keep")
    assert "distilled" not in wen_report._lm_budget(d)  # a results file from before distillation existed
    d["recipe"]["finetune"]["distill"] = {"alpha": 0.5, "temperature": 1.0, "teacher": None}
    assert "distilled from the dense model (α 0.5 on its outputs at temperature 1" in wen_report._lm_budget(d)
    assert "ISS, fine-tuned with the dense model as teacher |" in wen_report.readme_rows(None, None, d)[0]


def test_lm_readme_row_names_the_direct_design(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.setattr(sys, "argv", ["make_results"])
    make_results, wen_report = importlib.import_module("make_results"), importlib.import_module("wen_report")
    d = make_results._load_lm("kjv_lm_iss_650_keep")
    row = wen_report.readme_rows(None, None, d)[0]
    assert f"; direct design {d['direct_design']['perplexity']:.1f})" in row
    d["control"], d["direct_design"] = None, None
    assert f"{d['perplexity']['finetune']:.1f} |" in wen_report.readme_rows(None, None, d)[0]


def test_lm_direct_design_is_reused_only_where_the_engine_would_branch(monkeypatch, tmp_path):
    from torchslim.train.checkpoint import save_checkpoint
    from torchslim.train.recipes import load_recipe

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.setattr(sys, "argv", ["iss_lm"])
    iss_lm = importlib.import_module("iss_lm")
    monkeypatch.setattr(iss_lm, "RUNS", tmp_path)
    direct = load_recipe("kjv_lm_iss_650_long", overrides=["model.kwargs.hidden_size=[260,260]", "ssl.epochs=0",
                                                           "finetune.epochs=0", "baseline.dropout=0.3"])
    save_checkpoint(tmp_path / "source_direct" / "checkpoint.pt", {"recipe": direct.to_dict()})
    assert iss_lm._shares_baseline("source_direct", direct)
    assert not iss_lm._shares_baseline("missing_direct", direct)
    assert not iss_lm._shares_baseline(None, direct)
    for other in ("model.kwargs.hidden_size=[260,250]", "baseline.dropout=0.2"):  # other widths; other dropout
        changed = iss_lm.recipe_from_dict(iss_lm.apply_overrides(direct.to_dict(), [other]))
        assert not iss_lm._shares_baseline("source_direct", changed)


def test_zoo_timm_hf_smoke_writes_a_result_the_report_reads(monkeypatch, tmp_path):
    """Two models of the timm / Hugging Face zoo end to end, whatever the tracer makes of them: every model
    gets a status, the summary counts them, and the report renders the file."""
    pytest.importorskip("timm")
    pytest.importorskip("transformers")
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.setattr(importlib.import_module("_common"), "RESULTS", tmp_path)
    zoo, report = importlib.import_module("zoo_timm_hf"), importlib.import_module("_report")
    threads = torch.get_num_threads()
    try:
        zoo.main(["--models", "mobilenetv3_small_050", "llama", "--smoke", "--no-torch-pruning", "--timeout", "60"])
    finally:
        torch.set_num_threads(threads)
    d = report.load(tmp_path / "zoo_timm_hf_smoke.json", report.ZooTimmHF)
    assert d["smoke"] and [r["model"] for r in d["rows"]] == ["mobilenetv3_small_050", "llama"]
    statuses = [r["torchslim"]["status"] for r in d["rows"]]
    assert set(statuses) <= {"exact", "inexact", "clear_error", "crash", "timeout"}
    ts = d["summary"]["torchslim"]
    assert sum(ts[k] for k in ("exact", "inexact", "clear_error", "crash", "timeout")) == 2
    lines = importlib.import_module("zoo_report").timm_hf_section(d)
    assert any(line.startswith("| torchslim | 2 |") for line in lines)
    assert any(line.startswith("| llama | transformer |") for line in lines)
