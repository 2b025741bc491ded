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
