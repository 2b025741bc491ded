"""The report generators' shared module: the results schema, the machine line and markdown tables."""

import importlib
import json
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent.parent / "benchmarks"
SAMPLE = {"benchmark": "lasso_overhead", "date": "2025-01-02", "batch_size": 64, "threads": 1, "groups": 10,
          "repeats": 5, "overhead": {}, "step_ms": {},
          "machine": {"cpu": "AMD EPYC", "cores": 2, "torch": "2.5.0", "threads": 2}}


@pytest.fixture
def report(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module("_report")


def _write(tmp_path: Path, d: dict) -> Path:
    path = tmp_path / "lasso_overhead.json"
    path.write_text(json.dumps(d))
    return path


def test_load_accepts_a_complete_record(report, tmp_path):
    assert report.load(_write(tmp_path, SAMPLE), report.Overhead) == SAMPLE


def test_load_names_the_file_the_missing_key_and_the_script(report, tmp_path):
    path = _write(tmp_path, {k: v for k, v in SAMPLE.items() if k != "date"})
    with pytest.raises(report.SchemaError) as err:
        report.load(path, report.Overhead)
    message = str(err.value)
    assert str(path) in message and "missing key 'date'" in message
    assert "re-run benchmarks/lasso_overhead.py" in message


def test_load_rejects_a_mistyped_key_nested_ones_too(report, tmp_path):
    bad = {**SAMPLE, "repeats": "5", "machine": {**SAMPLE["machine"], "cores": "two"}}
    with pytest.raises(report.SchemaError) as err:
        report.load(_write(tmp_path, bad), report.Overhead)
    assert "key 'repeats' is str '5', expected int" in str(err.value)
    assert "key 'machine.cores' is str 'two', expected int" in str(err.value)


def test_every_stored_result_matches_its_schema(report, monkeypatch):
    monkeypatch.setattr("sys.argv", ["make_results"])
    make_results = importlib.import_module("make_results")
    assert make_results._load("ssl_lenet_ssl_full") is not None  # loading validates
    for name in make_results.LM_RECIPES:
        make_results._load_lm(name)


def test_machine_line_formats_a_sample_record(report):
    assert report.machine_line(SAMPLE) == "AMD EPYC, 2 cores, torch 2.5.0, 2025-01-02"
    assert report.machine_line({"machine": {}, "date": "d"}) == "?, ? cores, torch ?, d"
    assert report.machine_line(SAMPLE, cores="1 thread") == "AMD EPYC, 1 thread, torch 2.5.0, 2025-01-02"
    smoke = {**SAMPLE, "smoke": True}
    assert report.machine_line(smoke, sentence=True, note=" Busy.") == (
        "AMD EPYC, 2 cores, torch 2.5.0, 2025-01-02. Busy. **Smoke run (tiny settings): not a result.**")


def test_table_writes_header_alignment_and_rows(report):
    assert report.table(["", "a", "b"], [["x", 1, ""], "| y | 2 |  |"]) == [
        "| | a | b |", "|---|---|---|", "| x | 1 | |", "| y | 2 |  |"]
