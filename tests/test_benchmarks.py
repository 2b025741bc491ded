"""The benchmark scripts stay importable: they reach into the library, and a renamed helper must fail here,
not hours into `make bench`."""

import importlib
import sys
from pathlib import Path

import pytest

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
    from torchslim.recipes import load_recipe

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
