"""Progress on stderr: lines every HEARTBEAT_SECONDS when it is not a terminal, nothing when switched off."""

from __future__ import annotations

import re

from support import needs_fashion_mnist

from torchslim.cli import main
from torchslim.train import progress
from torchslim.train.progress import progress_bar

LINE = re.compile(r"^(?P<desc>.+): step (?P<step>\d+)/(?P<total>\d+)(?P<values>.*), elapsed \d+s, ETA \d+s$")


def _run(items, **kwargs):
    bar = progress_bar(items, **kwargs)
    for i, _ in enumerate(bar):
        bar.set_postfix(loss=f"{1 / (i + 1):.3f}")


def test_lines_when_stderr_is_not_a_terminal(monkeypatch, capsys):
    monkeypatch.setattr(progress, "HEARTBEAT_SECONDS", 0.0)
    _run(range(5), total=5, desc="ssl 2/3", unit="batch", progress=None)
    lines = capsys.readouterr().err.splitlines()
    parsed = [LINE.match(line) for line in lines]
    assert all(parsed), lines
    assert [(m["desc"], int(m["step"]), int(m["total"])) for m in parsed] == [("ssl 2/3", s, 5) for s in (1, 2, 3, 4)]
    assert parsed[1]["values"] == ", loss 0.500"  # the postfix set after step 2


def test_no_line_before_the_interval(capsys):
    _run(range(50), total=50, desc="baseline 1/1", unit="batch", progress=None)
    assert capsys.readouterr().err == ""


def test_off_is_silent(monkeypatch, capsys):
    monkeypatch.setattr(progress, "HEARTBEAT_SECONDS", 0.0)
    _run(range(5), total=5, desc="x", unit="batch", progress=False)
    assert capsys.readouterr().err == ""


@needs_fashion_mnist
def test_torchslim_train_prints_lines_to_a_pipe(monkeypatch, capsys, tmp_path):
    from test_cli import TINY

    monkeypatch.setattr(progress, "HEARTBEAT_SECONDS", 0.0)
    argv = ["train", "lenet_ssl", "--out", str(tmp_path / "run"), "--stop-after", "baseline", *TINY[:-1]]
    assert main(argv) == 0
    lines = [m for m in map(LINE.match, capsys.readouterr().err.splitlines()) if m]
    assert lines and {m["desc"] for m in lines} == {"baseline 1/1"}
    assert "loss" in lines[0]["values"] and int(lines[0]["total"]) == 256 // 64
