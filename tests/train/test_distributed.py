"""``torchrun -m torchslim.train.distributed``: two gloo workers, a few TernGrad steps, checkpoint and resume."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support import finish, needs_fashion_mnist

from torchslim.errors import CheckpointError, ConfigError
from torchslim.models import create_model
from torchslim.train import distributed
from torchslim.train.checkpoint import load_checkpoint, save_checkpoint

RUN_TIMEOUT_S = 180
ROOT = Path(__file__).parents[2]
# small buckets: DDP's rebuild after a (re)start's first step moves parameters between several buckets
COMMON = ["--model", "lenet", "--grad", "terngrad", "--batch-size", "32", "--train-limit", "1000",
          "--test-limit", "500", "--checkpoint-every", "3", "--log-every", "1", "--bucket-cap-mb", "0.05"]


def _torchrun(tmp: Path, *args: str, max_restarts: int = 0) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--max-restarts", str(max_restarts), "-m", "torchslim.train.distributed", *COMMON,
           "--checkpoint", str(tmp / "ckpt.pt"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)                 # its own group: workers die with it
    return finish(proc, RUN_TIMEOUT_S)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> tuple[Path, dict]:
    """8 uninterrupted steps."""
    tmp = tmp_path_factory.mktemp("ddp")
    _torchrun(tmp, "--steps", "8", "--out", str(tmp / "first.json"))
    return tmp, json.loads((tmp / "first.json").read_text())


@needs_fashion_mnist
def test_summary_reports_accuracy_speed_and_bytes(first_run):
    tmp, summary = first_run
    assert (summary["grad"], summary["world_size"], summary["backend"]) == ("terngrad", 2, "gloo")
    assert summary["steps"] == 8 and summary["resumed_from_step"] == 0
    assert 0.0 <= summary["test_accuracy"] <= 1.0 and summary["steps_per_second"] > 0
    assert summary["terngrad"]["step"] == 8
    assert summary["bytes_sent_per_step"] == summary["bytes_received_per_step"] > 0
    quoted = re.search(r"reports (\d\.\d+) bits per element", (ROOT / "README.md").read_text())
    assert summary["bits_per_element"] == pytest.approx(float(quoted[1]), abs=0.005)  # 1.6-bit codes, fp32 fc2
    assert summary["run_changes"] == []
    saved = load_checkpoint(tmp / "ckpt.pt")
    assert saved["run"]["lr"] == 0.01 and saved["run"]["world_size"] == 2 and saved["run"]["seed"] == 0


@needs_fashion_mnist
def test_restart_resumes_from_the_last_checkpoint_with_the_same_bits(first_run, tmp_path):
    """The same 8 steps, crashed once at step 7, after the step-6 checkpoint: torchrun restarts the
    workers, which resume at 6, lose only step 6's work, and end with the uninterrupted run's weights, bit
    for bit (TernGrad's codes do not depend on DDP's bucket layout, which a restart resets)."""
    whole, _ = first_run
    done = _torchrun(tmp_path, "--steps", "8", "--fail-at-step", "7", "--out", str(tmp_path / "second.json"),
                     max_restarts=1)
    summary = json.loads((tmp_path / "second.json").read_text())
    assert "simulated crash" in done.stderr and "resumed from" in done.stderr
    assert summary["steps"] == 8 and summary["resumed_from_step"] == 6
    assert summary["terngrad"]["step"] == 8                      # the hook's counter continued too
    expected, got = load_checkpoint(whole / "ckpt.pt")["model"], load_checkpoint(tmp_path / "ckpt.pt")["model"]
    for name, value in expected.items():
        assert torch.equal(got[name], value), f"{name} differs by {(got[name] - value).abs().max():.3g}"


# --- refused resumes: the checkpoint's run arguments, checked without a process group ----------------


def _args(*argv: str) -> argparse.Namespace:
    args = distributed._parser().parse_args(["--model", "lenet", *argv])
    distributed._check_args(args)
    return args


def _checkpoint(tmp_path: Path, args: argparse.Namespace, world: int = 2) -> Path:
    model = create_model("lenet")
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    path = tmp_path / "ckpt.pt"
    run = distributed._RunRecord(distributed._run_arguments(args, world))
    distributed._save(str(path), 3, model, optimizer, distributed._terngrad_state(args, model), run)
    return path


def _resume(path: Path, args: argparse.Namespace, world: int = 2) -> tuple[int, distributed._RunRecord]:
    model = create_model("lenet")
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    run = distributed._RunRecord(distributed._run_arguments(args, world))
    start = distributed._resume(str(path), model, optimizer, distributed._terngrad_state(args, model), run,
                                args.allow_changed)
    return start, run


def test_resume_with_the_same_arguments_continues(tmp_path):
    path = _checkpoint(tmp_path, _args("--lr", "0.05", "--seed", "3"))
    assert _resume(path, _args("--lr", "0.05", "--seed", "3", "--steps", "50"))[0] == 3     # --steps may grow


@pytest.mark.parametrize(("argv", "world", "names"), [
    (("--lr", "0.1"), 2, ["--lr 0.1 (checkpoint: --lr 0.01)"]),
    (("--seed", "1", "--batch-size", "16"), 2, ["--seed 1", "--batch-size 16"]),
    (("--grad", "fp32"), 2, ["--grad fp32 (checkpoint: --grad terngrad)"]),
    (("--scheme", "2bit"), 2, ["--scheme 2bit"]),
    ((), 4, ["4 workers (--nproc-per-node 4) (checkpoint: 2 workers"]),
])
def test_resume_with_other_arguments_is_refused_with_the_ways_out(tmp_path, argv, world, names):
    path = _checkpoint(tmp_path, _args())
    with pytest.raises(ConfigError) as info:
        _resume(path, _args(*argv), world)
    message = str(info.value)
    for name in names:
        assert name in message
    assert "--allow-changed" in message and "another --checkpoint" in message
    assert "--momentum" not in message                            # only what differs


def test_allow_changed_continues_and_records_the_change(tmp_path, caplog):
    path = _checkpoint(tmp_path, _args())
    with caplog.at_level(logging.WARNING):
        start, run = _resume(path, _args("--lr", "0.001", "--allow-changed", "lr"))
    assert start == 3 and "--lr 0.001 instead of --lr 0.01" in caplog.text
    assert run.changes == [{"step": 3, "name": "lr", "before": 0.01, "after": 0.001}]
    with pytest.raises(ConfigError, match="--allow-changed colour: not a run argument"):
        _args("--allow-changed", "colour")


def test_old_or_damaged_run_records(tmp_path, caplog):
    path = _checkpoint(tmp_path, _args())
    saved = load_checkpoint(path)
    save_checkpoint(path, {k: v for k, v in saved.items() if k not in ("run", "run_changes")})
    with caplog.at_level(logging.WARNING):
        assert _resume(path, _args("--lr", "0.3"))[0] == 3          # nothing to check against: a warning
    assert "does not record its run's arguments" in caplog.text
    save_checkpoint(path, {**saved, "run": [1, 2]})
    with pytest.raises(CheckpointError, match="'run' entry is damaged"):
        _resume(path, _args())


def test_help_is_plain_text_with_every_default(capsys):
    with pytest.raises(SystemExit):
        distributed.main(["--help"])
    out = capsys.readouterr().out
    assert "``" not in out and "::" not in out and ":class:" not in out  # no reST
    options = out.split("options:", 1)[1]
    blocks = [b for b in re.split(r"\n  (?=--)", options)[1:]]  # one block per option, -h excluded
    assert len(blocks) >= 20
    for block in blocks:
        assert "(default:" in " ".join(block.split()), block
