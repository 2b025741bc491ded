"""``torchrun -m torchslim.train.distributed``: two gloo workers, a few TernGrad steps, checkpoint and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from support import needs_fashion_mnist

RUN_TIMEOUT_S = 180
COMMON = ["--model", "lenet", "--grad", "terngrad", "--batch-size", "32", "--train-limit", "1000",
          "--test-limit", "500", "--checkpoint-every", "3", "--log-every", "1"]


pytestmark = needs_fashion_mnist


def _torchrun(tmp: Path, *args: str, max_restarts: int = 0) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--max-restarts", str(max_restarts), "-m", "torchslim.train.distributed", *COMMON,
           "--checkpoint", str(tmp / "ckpt.pt"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)                 # its own group: workers die with it
    try:
        stdout, stderr = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun did not finish in {RUN_TIMEOUT_S} s:\n{stderr[-4000:]}")
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{stdout}\n{stderr[-4000:]}"
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("ddp")
    _torchrun(tmp, "--steps", "6", "--out", str(tmp / "first.json"))
    return tmp, json.loads((tmp / "first.json").read_text())


def test_summary_reports_accuracy_speed_and_bytes(first_run):
    tmp, summary = first_run
    assert (summary["grad"], summary["world_size"], summary["backend"]) == ("terngrad", 2, "gloo")
    assert summary["steps"] == 6 and summary["resumed_from_step"] == 0
    assert 0.0 <= summary["test_accuracy"] <= 1.0 and summary["steps_per_second"] > 0
    assert summary["terngrad"]["step"] == 6
    assert summary["bytes_sent_per_step"] == summary["bytes_received_per_step"] > 0
    assert summary["bits_per_element"] < 4                        # 1.6-bit codes, fp32 logits layer
    assert (tmp / "ckpt.pt").is_file()


def test_restart_resumes_from_the_last_checkpoint(first_run):
    """Continue to 12 steps; crash once at step 10, after the step-9 checkpoint: torchrun restarts the
    workers, which resume at 9 and lose only step 9's work."""
    tmp, _ = first_run
    done = _torchrun(tmp, "--steps", "12", "--fail-at-step", "10", "--out", str(tmp / "second.json"),
                     max_restarts=1)
    summary = json.loads((tmp / "second.json").read_text())
    assert "simulated crash" in done.stderr and "resumed from" in done.stderr
    assert summary["steps"] == 12 and summary["resumed_from_step"] == 9
    assert summary["terngrad"]["step"] == 12                      # the hook's counter continued too
