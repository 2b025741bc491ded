"""Run ``torchrun -m torchslim train`` inside a private network namespace and count its bytes.

Shared by ``terngrad_wire.py``, ``terngrad_speed.py``, ``terngrad_convergence.py`` and ``ddp_recipe.py``::

    with namespace("tsl-wire", rate="1gbit") as ns:        # lo up, tbf at 1 Gbit/s, deleted on exit
        run = train_in(ns, 4, "lenet_terngrad", ["--grad", "fp16", "--stop-after", "baseline"], timeout=600)
        run.results["accuracy"], run.lo.tx                   # the run's results.json, bytes through lo

Inside a fresh namespace the only interface is ``lo`` and the only traffic on it is ours: the workers'
collectives, the gloo/torchrun stores and TCP's own headers and ACKs. On loopback every byte sent is also
received, so ``lo.tx == lo.rx`` and ``lo.tx`` is the sum over workers of the bytes each sent.

A ``tbf`` qdisc on ``lo`` caps the *total* rate of all flows: the workers share one link of that rate,
as if every worker sat behind one switch port of ``rate``/N in a switched network (ring collectives
keep all N links busy at once). Needs root and iproute2 (``ip``, ``tc``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

ROOT = Path(__file__).resolve().parent.parent
PYTHON = Path(sys.executable)
TORCHRUN = PYTHON.parent / "torchrun"


class NetnsUnavailable(RuntimeError):
    """Network namespaces cannot be made here (not root, or no iproute2)."""


@dataclass(frozen=True)
class LoBytes:
    """Byte counters of ``lo`` (from ``/proc/net/dev``), or a difference of two readings."""

    rx: int
    tx: int

    def __sub__(self, other: LoBytes) -> LoBytes:
        return LoBytes(self.rx - other.rx, self.tx - other.tx)


@dataclass(frozen=True)
class Netns:
    """A network namespace made by :func:`namespace`; ``rate`` is its ``lo`` cap (None: unthrottled)."""

    name: str
    rate: str | None

    def argv(self, command: Sequence[str]) -> list[str]:
        """``command`` prefixed so that it runs inside the namespace."""
        return ["ip", "netns", "exec", self.name, *command]

    def run(self, command: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess:
        """``subprocess.run`` of ``command`` inside the namespace (checked, text output captured)."""
        kwargs = {"check": True, "capture_output": True, "text": True, **kwargs}
        return subprocess.run(self.argv(command), **kwargs)

    def kill_all(self) -> None:
        """SIGKILL every process left inside the namespace (only this module starts processes there)."""
        pids = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True, text=True).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass

    def lo_bytes(self) -> LoBytes:
        """``lo``'s received and transmitted bytes so far, read from the namespace's ``/proc/net/dev``."""
        return parse_proc_net_dev(self.run(["cat", "/proc/net/dev"]).stdout, "lo")


def parse_proc_net_dev(text: str, interface: str) -> LoBytes:
    """The ``(rx, tx)`` byte counters of ``interface`` in a ``/proc/net/dev`` listing."""
    for line in text.splitlines():
        name, sep, counters = line.partition(":")
        if sep and name.strip() == interface:
            fields = counters.split()                 # rx: bytes packets errs drop fifo frame compressed multicast
            return LoBytes(rx=int(fields[0]), tx=int(fields[8]))
    raise RuntimeError(f"no interface {interface!r} in /proc/net/dev:\n{text}")


def _check_available() -> None:
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        raise NetnsUnavailable(f"{' and '.join(missing)} not found: install iproute2 (apt-get install iproute2)")
    if os.geteuid() != 0:
        raise NetnsUnavailable("network namespaces need root: run this benchmark as root (or with CAP_NET_ADMIN "
                               "and CAP_SYS_ADMIN), e.g. sudo -E .venv/bin/python benchmarks/<script>.py")


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise NetnsUnavailable(f"`ip {' '.join(args)}` failed ({done.returncode}): {done.stderr.strip()}")


@contextmanager
def namespace(name: str, rate: str | None = None, burst: str | None = None) -> Iterator[Netns]:
    """A new network namespace ``name`` with ``lo`` up, capped at ``rate`` by tbf; always deleted on exit.

    Args:
        name: a namespace name that must not exist yet (scripts add their pid to make it unique).
        rate: a tc rate (``"1gbit"``, ``"10gbit"``) for a ``tbf`` qdisc on ``lo``; None leaves lo unthrottled.
        burst: tbf bucket size; default 1 ms at ``rate``, at least 128 kB (a 10 Gbit/s bucket must hold
            more than two 64 kB loopback packets or tbf cannot reach its rate).
    Raises:
        NetnsUnavailable: not root, no iproute2, or ``ip``/``tc`` refused (e.g. the name exists).
    """
    _check_available()
    if name in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split():
        raise NetnsUnavailable(f"network namespace {name!r} already exists; remove it with `ip netns del {name}`")
    _ip("netns", "add", name)
    try:
        ns = Netns(name, rate)
        ns.run(["ip", "link", "set", "lo", "up"])
        if rate is not None:
            burst = burst or f"{max(128_000, rate_bits(rate) // 8 // 1000)}b"
            ns.run(["tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate", rate, "burst", burst,
                    "latency", "100ms"])
        yield ns
    finally:
        Netns(name, rate).kill_all()
        _ip("netns", "del", name)


def rate_bits(rate: str) -> int:
    """Bits per second of a tc rate string (``"1gbit"``, ``"500mbit"``, ``"10gbit"``)."""
    match = re.fullmatch(r"([\d.]+)\s*([kmg]?)bit", rate.strip().lower())
    if not match:
        raise ValueError(f"rate {rate!r}: use a tc rate in bits per second, e.g. '1gbit' or '500mbit'")
    return int(float(match.group(1)) * {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}[match.group(2)])


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train_in` measured: the run's ``results.json``, ``lo``'s byte delta, the launch's wall time."""

    results: dict[str, Any]
    lo: LoBytes
    wall_s: float
    stderr: str
    failed_attempts: tuple[str, ...] = ()   # the error of each launch that failed before this one

    def train_seconds(self, skip: int = 1) -> list[float]:
        """Seconds of the training steps of each epoch after the first ``skip`` (DDP's first step builds its
        buckets), evaluation and checkpoints left out."""
        return [r["train_seconds"] for r in self.results["history"][skip:]]


def train_in(ns: Netns, nproc: int, recipe: str, args: Sequence[str], timeout: float, *,
             threads: int = 1, attempts: int = 3, out: Path | None = None) -> TrainResult:
    """``torchrun --standalone --nproc-per-node nproc -m torchslim train recipe args`` inside ``ns``, in the run
    folder ``out`` (default: a temporary one; ``--out``, ``--no-progress`` and ``--overwrite`` are added).

    Workers get ``OMP_NUM_THREADS=threads`` (4 workers on a 2-core machine must not each spin 2 threads)
    and ``GLOO_SOCKET_IFNAME=lo``. A failed launch (rarely, with 4 workers on a loaded 2-core machine) is
    retried up to ``attempts`` launches in all; the failures are kept in ``failed_attempts``, and the byte
    counters cover the successful launch only.

    Raises:
        RuntimeError: the last attempt failed or ran past ``timeout`` seconds (its process group is
            killed); the message ends with its stderr.
    """
    failures: list[str] = []
    while True:
        try:
            with tempfile.TemporaryDirectory(prefix="torchslim-netlink-") as tmp:
                folder = Path(out or tmp)
                program = ["-m", "torchslim", "train", recipe, *args, "--no-progress", "--overwrite",
                           "--out", str(folder)]
                stderr, wall, lo = launch_in(ns, ["--standalone", "--nproc-per-node", str(nproc)], program,
                                             timeout, threads)
                results = json.loads((folder / "results.json").read_text())
            return TrainResult(results, lo, wall, stderr, tuple(failures))
        except RuntimeError as exc:
            failures.append(str(exc)[-2000:])
            if len(failures) >= attempts:
                raise
            print(f"torchrun failed, retrying ({len(failures)}/{attempts - 1}):\n{failures[-1][-600:]}",
                  file=sys.stderr, flush=True)


def launch_in(ns: Netns, torchrun_args: Sequence[str], program: Sequence[str], timeout: float,
              threads: int = 1) -> tuple[str, float, LoBytes]:
    """``torchrun torchrun_args program`` inside ``ns`` (``program``: ``-m module args``), workers at
    ``OMP_NUM_THREADS=threads`` on ``lo``; its stderr, wall seconds and ``lo``'s byte delta.

    Raises:
        RuntimeError: it failed or ran past ``timeout`` seconds (then it is stopped).
    """
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "GLOO_SOCKET_IFNAME": "lo",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    before, began = ns.lo_bytes(), time.perf_counter()
    stderr = _run_in(ns, ns.argv([str(TORCHRUN), *torchrun_args, *program]), env, timeout)
    return stderr, time.perf_counter() - began, ns.lo_bytes() - before


def _run_in(ns: Netns, command: list[str], env: dict[str, str], timeout: float) -> str:
    """Run ``command`` (already wrapped by ``ns.argv``); its stderr. On timeout or interrupt, stop it."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=ROOT, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop(proc, ns)
        _, stderr = proc.communicate()
        raise RuntimeError(f"{' '.join(command)} ran past {timeout:.0f} s; stopped. stderr:\n{stderr[-4000:]}")
    except BaseException:                                # Ctrl-C, SIGTERM (exit_on_sigterm): leave no workers
        _stop(proc, ns)
        raise
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({proc.returncode}). stderr:\n{stderr[-4000:]}")
    return stderr


def _stop(proc: subprocess.Popen, ns: Netns) -> None:
    """SIGTERM to torchrun, which passes it to its workers (each in its own session); then kill what is left."""
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    ns.kill_all()


def exit_on_sigterm() -> None:
    """Turn SIGTERM into ``SystemExit`` so ``finally`` blocks delete the namespace and stop the workers."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


_THROUGHPUT = """
import socket, sys, threading, time
n, chunk = int(sys.argv[1]), bytes(1 << 20)
srv = socket.create_server(("127.0.0.1", 0)); port = srv.getsockname()[1]
def sink():
    conn, _ = srv.accept(); got = 0
    while got < n:
        got += len(conn.recv(1 << 20))
    conn.sendall(b"k"); conn.close()
t = threading.Thread(target=sink); t.start()
c = socket.create_connection(("127.0.0.1", port)); t0 = time.perf_counter(); sent = 0
while sent < n:
    c.sendall(chunk[: min(len(chunk), n - sent)]); sent += min(len(chunk), n - sent)
c.recv(1); print(8 * n / (time.perf_counter() - t0)); t.join()
"""


def link_bits_per_second(ns: Netns, nbytes: int) -> float:
    """Achieved rate of one TCP flow sending ``nbytes`` over ``127.0.0.1`` inside ``ns`` (bits per second)."""
    return float(ns.run([str(PYTHON), "-c", _THROUGHPUT, str(nbytes)], timeout=600).stdout)
