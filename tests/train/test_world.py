"""Recipes under torchrun: N real gloo processes train one run as one process would, whatever the gradient mode."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from support import finish, needs_fashion_mnist

from torchslim.train.checkpoint import load_checkpoint
from torchslim.train.rundir import load_phase_model
from torchslim.train.world import SOLO, World

RUN_TIMEOUT_S = 240
TINY = ["--set", "data.train_limit=256", "--set", "data.test_limit=128", "--set", "eval_batch_size=128",
        "--set", "baseline.epochs=1", "--set", "baseline.lr=0.05", "--set", "ssl.epochs=1", "--set", "ssl.lr=0.05",
        "--set", "ssl.lr_schedule=constant", "--set", "ssl.kinds=[channel, shape]",
        "--set", "ssl.strength={channel: 0.04, shape: 0.04}", "--set", "finetune.epochs=1", "--no-progress"]


def _launch(out: Path, *args: str, processes: int = 2, max_restarts: int = 0) -> subprocess.Popen:
    """``torchrun --nproc-per-node N -m torchslim train lenet_ssl`` (N = 1: plain ``python -m torchslim``)."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
              "--max-restarts", str(max_restarts)] if processes > 1 else [sys.executable]
    cmd = [*launch, "-m", "torchslim", "train", "lenet_ssl", "--out", str(out), *TINY, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)  # its own group: workers die with it


def _train(out: Path, *args: str, processes: int = 2, check: bool = True) -> subprocess.CompletedProcess:
    return finish(_launch(out, *args, processes=processes), RUN_TIMEOUT_S, check=check)


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
    assert rb["distributed"] == {"processes": 2, "grad": "fp32", "replicas_agreed_epochs": 3, "steps_per_epoch": 4}
    assert "distributed" not in ra
    for phase in ("baseline", "ssl", "finetune"):
        assert rb["accuracy"][phase] == pytest.approx(ra["accuracy"][phase], abs=1 / 128)


@needs_fashion_mnist
@pytest.mark.parametrize("grad", ["terngrad", "powersgd", "fp16", "bf16"])
def test_every_gradient_mode_trains_and_keeps_the_replicas_equal(grad, tmp_path):
    # PowerSGD: buckets smaller than LeNet's 1.7 MB gradients, which gloo cannot take (the engine makes one)
    extra = ["--set", "distributed.powersgd.warmup_steps=2", "--set", "distributed.bucket_cap_mb=0.5"] \
        if grad == "powersgd" else []
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


@needs_fashion_mnist
def test_a_worker_killed_inside_an_epoch_restarts_and_the_run_ends_as_if_never_stopped(tmp_path):
    args = ["--set", "data.train_limit=4096", "--set", "checkpoint_every_steps=4", "--stop-after", "ssl"]
    _train(tmp_path / "straight", *args)
    proc = _launch(tmp_path / "killed", *args, max_restarts=1)
    checkpoint, deadline = tmp_path / "killed" / "checkpoint.pt", time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:  # the first checkpoint inside the baseline's epoch
        if checkpoint.is_file() and (load_checkpoint(checkpoint).get("partial") or {}).get("phase") == "baseline":
            break
        time.sleep(0.05)
    workers = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    assert len(workers) == 2, workers
    os.kill(int(workers[-1]), signal.SIGKILL)
    done = finish(proc, RUN_TIMEOUT_S)
    assert "resuming lenet_ssl" in done.stderr  # torchrun restarted the workers, which took up the checkpoint
    straight, killed = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("straight", "killed"))
    for key in ("accuracy", "loss"):
        assert killed[key] == straight[key]
    assert [{k: v for k, v in r.items() if k not in ("seconds", "train_seconds")} for r in killed["history"]] == \
        [{k: v for k, v in r.items() if k not in ("seconds", "train_seconds")} for r in straight["history"]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ranks(out: Path, per_rank: list[list[str]], timeout_s: float = 90) -> list[subprocess.CompletedProcess]:
    """Two ranks started by hand (torchrun's environment, no agent to stop the others), each with its own
    arguments; every one must exit by itself within ``timeout_s``."""
    port, procs = _free_port(), []
    for rank, extra in enumerate(per_rank):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(len(per_rank))}
        cmd = [sys.executable, "-m", "torchslim", "train", "lenet_ssl", "--out", str(out), *TINY, *extra]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                      start_new_session=True))
    done, deadline = [], time.monotonic() + timeout_s
    for proc in procs:
        try:
            stdout, stderr = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for p in procs:
                os.killpg(p.pid, signal.SIGKILL)
            pytest.fail(f"rank {len(done)} still ran after {timeout_s} s: an error left it waiting")
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    return done


@needs_fashion_mnist
def test_data_missing_on_one_rank_stops_every_rank_with_its_message(tmp_path):
    ranks = _ranks(tmp_path / "run", [[], ["--data-dir", str(tmp_path / "nowhere")]])
    assert [r.returncode for r in ranks] == [2, 2]
    assert "error: rank 1: " in ranks[1].stderr and "fashion-mnist" in ranks[1].stderr.lower()
    assert "error: rank 0: rank 1 cannot start: DatasetNotFound" in ranks[0].stderr


@needs_fashion_mnist
def test_ranks_started_with_different_recipes_are_refused(tmp_path):
    ranks = _ranks(tmp_path / "run", [[], ["--set", "ssl.lr=0.02"]])
    assert [r.returncode for r in ranks] == [2, 2]
    for r in ranks:
        assert "were started with another recipe than rank 0" in r.stderr
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_a_word_lm_trains_on_two_processes_as_on_one(tmp_path):
    """Each process takes half the token columns with its own hidden state; the update is the one-process one."""
    from test_tasks import LM, _ptb

    data = _ptb(tmp_path / "ptb", lines=300)
    argv = ["train", "kjv_lm_iss", "--data-dir", str(data), "--no-progress", "--stop-after", "ssl",
            *[a for o in [*LM, "baseline.epochs=1", "ssl.epochs=1"] for a in ("--set", o)]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for n in (1, 2):
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"] \
            if n == 2 else [sys.executable]
        done = subprocess.run([*launch, "-m", "torchslim", *argv, "--out", str(tmp_path / str(n))], env=env,
                              capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
        assert done.returncode == 0, done.stderr[-4000:]
    one, two = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("1", "2"))
    assert two["distributed"]["processes"] == 2
    for phase in ("baseline", "ssl"):
        assert two["perplexity"][phase] == pytest.approx(one["perplexity"][phase], rel=1e-3)
    assert two["history"][-1]["alive"] == one["history"][-1]["alive"]  # the same hidden units left


@needs_fashion_mnist
def test_force_budget_low_rank_rank_lasso_and_distillation_train_on_two_processes_as_on_one(tmp_path):
    every = ["--set", "ssl.force.strength=1e-4", "--set", "ssl.keep=0.5", "--set", "lowrank.energy=0.9",
             "--set", "lowrank.lasso=1e-3", "--set", "finetune.distill.alpha=0.5"]
    _train(tmp_path / "one", *every, processes=1)
    _train(tmp_path / "two", *every)
    one, two = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert [r.get("rank_final") for r in two["lowrank"]] == [r.get("rank_final") for r in one["lowrank"]]
    assert two["params"] == one["params"]
    for phase in ("baseline", "ssl", "compact", "finetune"):
        assert two["accuracy"][phase] == pytest.approx(one["accuracy"][phase], abs=1 / 128)
