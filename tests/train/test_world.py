"""Recipes under torchrun: N real gloo processes train one run as one process would, whatever the gradient mode."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support import needs_fashion_mnist

from torchslim.train.rundir import load_phase_model
from torchslim.train.world import SOLO, World

RUN_TIMEOUT_S = 240
TINY = ["--set", "data.train_limit=256", "--set", "data.test_limit=128", "--set", "eval_batch_size=128",
        "--set", "baseline.epochs=1", "--set", "baseline.lr=0.05", "--set", "ssl.epochs=1", "--set", "ssl.lr=0.05",
        "--set", "ssl.lr_schedule=constant", "--set", "ssl.kinds=[channel, shape]",
        "--set", "ssl.strength={channel: 0.04, shape: 0.04}", "--set", "finetune.epochs=1", "--no-progress"]


def _train(out: Path, *args: str, processes: int = 2, check: bool = True) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node N -m torchslim train lenet_ssl`` (N = 1: plain ``python -m torchslim``)."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)] \
        if processes > 1 else [sys.executable]
    cmd = [*launch, "-m", "torchslim", "train", "lenet_ssl", "--out", str(out), *TINY, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)  # its own group: workers die with it
    try:
        stdout, stderr = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} did not finish in {RUN_TIMEOUT_S} s:\n{stderr[-4000:]}")
    if check:
        assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{stdout}\n{stderr[-4000:]}"
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def test_parts_of_a_batch_cover_it_once_and_weigh_to_its_mean():
    for size, n in [(2, 64), (3, 10), (4, 3)]:
        parts = [World(rank, size).part(n) for rank in range(size)]
        assert [i for p in parts for i in range(p.start, p.stop)] == list(range(n))
        weights = [World(rank, size).loss_weight(p.stop - p.start, n) for rank, p in enumerate(parts)]
        assert sum(weights) / size == pytest.approx(1.0)  # DDP's mean of the weighted means: the batch mean
    assert SOLO.part(7) == slice(0, 7) and SOLO.loss_weight(7, 7) == 1.0


@pytest.fixture(scope="module")
def one_and_two(tmp_path_factory) -> tuple[Path, Path]:
    """The same tiny SSL run in one process and in two (fp32 gradients)."""
    tmp = tmp_path_factory.mktemp("world")
    strong = ["--set", "ssl.strength={channel: 0.1, shape: 0.1}"]  # some groups zero, not all
    _train(tmp / "one", *strong, processes=1)
    _train(tmp / "two", "--grad", "fp32", *strong)
    return tmp / "one", tmp / "two"


@needs_fashion_mnist
def test_two_processes_train_what_one_does(one_and_two):
    one, two = one_and_two
    a, _ = load_phase_model(one / "sparse.pt")
    b, _ = load_phase_model(two / "sparse.pt")
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p, q, rtol=1e-4, atol=1e-5), name  # float summation order differs, nothing else
        assert torch.equal(p == 0, q == 0), name  # the same zeros
    assert sum(int((p == 0).sum()) for p in a.parameters()) > 1000  # SSL zeroed groups: the check compares them
    small_a, small_b = (torch.load(d / "compact.pt", weights_only=False) for d in (one, two))
    assert small_a["arch"] == small_b["arch"]  # the same compact widths
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (one, two))
    assert rb["distributed"] == {"processes": 2, "grad": "fp32", "replicas_agreed_epochs": 3}
    assert "distributed" not in ra
    for phase in ("baseline", "ssl", "finetune"):
        assert rb["accuracy"][phase] == pytest.approx(ra["accuracy"][phase], abs=1 / 128)


@needs_fashion_mnist
@pytest.mark.parametrize("grad", ["terngrad", "powersgd", "fp16", "bf16"])
def test_every_gradient_mode_trains_and_keeps_the_replicas_equal(grad, tmp_path):
    extra = ["--set", "distributed.powersgd.warmup_steps=2"] if grad == "powersgd" else []
    _train(tmp_path / grad, "--grad", grad, "--stop-after", "ssl", *extra)
    results = json.loads((tmp_path / grad / "results.json").read_text())
    assert results["distributed"]["grad"] == grad and results["distributed"]["replicas_agreed_epochs"] == 2
    assert results["accuracy"]["ssl"] > 0.3  # it learned (10 classes: 0.1 by chance)


@needs_fashion_mnist
def test_a_batch_the_processes_cannot_share_is_refused_before_training(tmp_path):
    done = _train(tmp_path / "odd", "--set", "batch_size=63", check=False)
    assert done.returncode != 0
    assert "batch_size 63 is the global batch, shared by 2 processes" in done.stderr
    assert not (tmp_path / "odd" / "checkpoint.pt").exists()
