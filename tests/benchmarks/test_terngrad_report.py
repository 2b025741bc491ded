"""The data-parallel section of RESULTS.md: a quality pass that spans sittings, a timing pass in one."""

import importlib
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent.parent / "benchmarks"
MACHINE = {"cpu": "AMD EPYC", "cores": 2, "torch": "2.14.1"}


@pytest.fixture
def report(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module("terngrad_report")


def _row(acc: float, macs: int, train_s: float = 10.0, per_step: float | None = 1e6) -> dict:
    return {"accuracy": {"finetune": acc}, "compact_macs": macs, "compact_params": macs // 10,
            "train_s_median": train_s, "lo_bytes_per_step": per_step, "machine": MACHINE, "date": "2026-12-08"}


def _record(quality: dict, timing: dict | None) -> dict:
    return {"recipe": {"name": "lenet_ssl_full"}, "workers": 4, "rate": "1gbit", "cores": 2, "smoke": False,
            "machine": MACHINE, "date": "2026-12-08", "quality": quality, "timing": timing}


def test_a_quality_pass_with_modes_still_to_train_shows_what_is_done(report):
    lines = report.ddp_section(_record({"one process": _row(0.86, 700_000), "terngrad": _row(0.855, 770_000)}, None))
    text = "\n".join(lines)
    assert "| terngrad | 85.50% | -0.50 points | 770,000 | 1.10 |" in text
    assert "Speed" not in text  # no timing pass yet


def test_the_timing_pass_gives_speed_against_fp32_and_whether_two_launches_match(report):
    rows = {"one process": _row(0.86, 1, 5.0, None), "fp32": _row(0.86, 1, 100.0), "terngrad": _row(0.86, 1, 50.0)}
    two = {**_row(0.86, 1, 60.0), "one_launch": _row(0.86, 1), "matches_one_launch": True}
    timing = {"overrides": ["baseline.epochs=1"], "rows": rows, "scaling": {"1": _row(0.86, 1, 30.0)},
              "two_launches": two, "machine": MACHINE, "date": "2026-12-08"}
    text = "\n".join(report.ddp_section(_record({}, timing)))
    assert "| terngrad | 50.0 | 2.00× | 1.000 |" in text
    assert "| one process | 5.0 | 20.00× | - |" in text
    assert "60.0 s per epoch, and the same model as one launch of 2 workers (86.00% vs 86.00%)" in text
