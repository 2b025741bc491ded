"""Shared by the tests that need the real Fashion-MNIST files."""

import os
import signal
import subprocess

import pytest

from torchslim.data import load_dataset
from torchslim.errors import DatasetNotFound


def have_fashion_mnist() -> bool:
    try:
        load_dataset("fashion-mnist", "test", limit=1)
    except DatasetNotFound:
        return False
    return True


needs_fashion_mnist = pytest.mark.skipif(not have_fashion_mnist(), reason="Fashion-MNIST is not installed (make data)")


def finish(proc: subprocess.Popen, timeout_s: float, *, check: bool = True) -> subprocess.CompletedProcess:
    """Wait for ``proc`` (started with ``start_new_session=True``, output piped as text); past ``timeout_s`` kill
    its whole process group (torchrun and its workers) and fail the test. ``check``: its status must be 0."""
    cmd = " ".join(map(str, proc.args))
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"{cmd} did not finish in {timeout_s} s:\n{stderr[-4000:]}")
    if check:
        assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{stdout}\n{stderr[-4000:]}"
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
