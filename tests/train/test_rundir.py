"""The run folder: one run at a time (run.lock), no leftovers of interrupted writes, no results lost by a fresh run."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys

import pytest
from support import needs_fashion_mnist

import torchslim._files as files
from torchslim.errors import ConfigError
from torchslim.train import engine
from torchslim.train.recipes import load_recipe
from torchslim.train.rundir import LOCK_FILE, clear_run_dir, hold_run_dir

# holds the lock as a second process would, without importing torch: prints "locked", then waits
_HOLDER = """
import fcntl, json, os, socket, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": "then"}).encode())
print("locked", flush=True)
time.sleep(60)
"""


def _write_lock(folder, pid, host):
    (folder / LOCK_FILE).write_text(json.dumps({"pid": pid, "host": host, "since": "2026-01-01 00:00:00"}))


def test_a_second_run_in_a_held_folder_is_refused_and_the_lock_goes_at_the_end(tmp_path):
    with hold_run_dir(tmp_path):
        owner = json.loads((tmp_path / LOCK_FILE).read_text())
        assert (owner["pid"], owner["host"]) == (os.getpid(), socket.gethostname())
        with pytest.raises(ConfigError, match=rf"in use by another run \(process {os.getpid()} on host .*--out"):
            with hold_run_dir(tmp_path):
                pass
    assert not (tmp_path / LOCK_FILE).exists()
    with hold_run_dir(tmp_path):  # free again
        pass


def test_the_lock_is_released_on_an_exception(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with hold_run_dir(tmp_path):
            raise KeyboardInterrupt
    assert not (tmp_path / LOCK_FILE).exists()
    with hold_run_dir(tmp_path):
        pass


@pytest.mark.skipif(sys.platform == "win32", reason="flock is POSIX")
def test_another_process_holds_the_folder_until_it_dies_then_its_lock_is_taken_over(tmp_path, caplog):
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path / LOCK_FILE)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=rf"in use by another run \(process {holder.pid} on host"):
            with hold_run_dir(tmp_path):
                pass
    finally:
        holder.kill()  # as kill -9: its lock file stays, naming it
        holder.wait()
        holder.stdout.close()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == holder.pid
    with caplog.at_level(logging.WARNING, logger="torchslim.train.rundir"):
        with hold_run_dir(tmp_path):
            assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert f"taking over the lock of process {holder.pid}" in caplog.text


def test_a_stale_lock_of_a_dead_process_of_this_host_is_taken_over(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _write_lock(tmp_path, dead.pid, socket.gethostname())
    with caplog.at_level(logging.WARNING, logger="torchslim.train.rundir"):
        with hold_run_dir(tmp_path):
            pass
    assert f"taking over the lock of process {dead.pid}" in caplog.text
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_lock_from_another_host_is_refused_and_kept(tmp_path):
    _write_lock(tmp_path, 1234, "elsewhere.example")
    with pytest.raises(ConfigError, match=r"process 1234 on host elsewhere.example.*if that run has ended, delete"):
        with hold_run_dir(tmp_path):
            pass
    assert json.loads((tmp_path / LOCK_FILE).read_text())["host"] == "elsewhere.example"


def _temporary_name(monkeypatch, path) -> str:
    """The name atomic_write gives its temporary file for ``path`` (a write interrupted before its rename)."""
    seen = []

    def no_rename(src, dst):
        seen.append(os.path.basename(src))
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(files.os, "replace", no_rename)
        with pytest.raises(KeyboardInterrupt):
            files.atomic_write_text(path, "partial")
    return seen[0]


def test_leftover_temporary_files_are_removed_on_the_next_start(tmp_path, monkeypatch):
    names = [_temporary_name(monkeypatch, tmp_path / n) for n in ("checkpoint.pt", "results.json")]
    for name in names:  # a kill -9 between write and rename leaves them behind
        (tmp_path / name).write_bytes(b"partial")
    for name in ("notes.tmp", "checkpoint.pt"):  # not ours to remove
        (tmp_path / name).write_bytes(b"keep")
    with hold_run_dir(tmp_path):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "notes.tmp"]


def test_a_fresh_run_never_deletes_an_earlier_runs_results_without_overwrite(tmp_path):
    (tmp_path / "results.json").write_text("{}")
    (tmp_path / "compact.pt").write_bytes(b"model")
    with pytest.raises(ConfigError) as info:
        clear_run_dir(tmp_path)
    for way_out in ("compact.pt, results.json", "--resume", "--overwrite", "--out"):
        assert way_out in str(info.value)
    assert (tmp_path / "results.json").exists() and (tmp_path / "compact.pt").exists()
    clear_run_dir(tmp_path, overwrite=True)
    assert not (tmp_path / "results.json").exists() and not (tmp_path / "compact.pt").exists()


def _tiny():
    return load_recipe("lenet_ssl", overrides=["data.train_limit=64", "data.test_limit=64", "eval_batch_size=64",
                                               "baseline.epochs=0", "ssl.epochs=0", "finetune.epochs=0"])


@needs_fashion_mnist
def test_the_engine_refuses_a_fresh_run_over_results_and_a_held_folder(tmp_path):
    (tmp_path / "results.json").write_text('{"accuracy": {"finetune": 0.9}}')
    with pytest.raises(ConfigError, match="--overwrite"):
        engine.run(_tiny(), run_dir=tmp_path, progress=False)
    assert json.loads((tmp_path / "results.json").read_text()) == {"accuracy": {"finetune": 0.9}}
    assert not (tmp_path / LOCK_FILE).exists()  # released on the error
    with hold_run_dir(tmp_path):
        with pytest.raises(ConfigError, match="in use by another run"):
            engine.run(_tiny(), run_dir=tmp_path, progress=False, overwrite=True)
    result = engine.run(_tiny(), run_dir=tmp_path, progress=False, stop_after="baseline", overwrite=True)
    assert result.run_dir == tmp_path and not (tmp_path / LOCK_FILE).exists()


@pytest.mark.parametrize("name", ["../x", "/abs/path", "a/b", ".", "..", "", "a b", "x\\y"])
def test_a_recipe_name_that_is_not_one_safe_folder_name_is_refused_at_load(tmp_path, name):
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps({"name": name}))  # JSON is YAML
    with pytest.raises(ConfigError, match="'name' must be a single folder name.*--out"):
        load_recipe(path)
