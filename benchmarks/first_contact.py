"""What a new user meets, timed on this machine: `make demo` in a fresh clone, and README's Install section run
word for word in a fresh virtual environment.

    python benchmarks/first_contact.py [--keep]

1. `git clone` of this repository's HEAD into a temporary folder; `make setup` (the venv, pinned torch,
   torchslim) and then `make demo` (Fashion-MNIST from Debian's package where missing, then `torchslim demo`),
   each timed; the demo's table and results.json are kept.
2. The ```bash block under README's "## Install", run as written by `bash -e` in the clone, with a fresh
   `python -m venv` first on PATH (what "activate" does); its output and the disk the venv takes.

Writes benchmarks/results/first_contact.json; make_results.py puts it in RESULTS.md and the demo's time in
the README's promise. Needs the package index pip uses here and ~15 GB of free disk; about 10 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import write

ROOT = Path(__file__).resolve().parent.parent


def install_block(readme: str) -> str:
    """The ```bash block under the README heading "## Install"."""
    found = re.search(r"^## Install\n(?:(?!## )[^\n]*\n)*?```bash\n(.*?)```", readme, re.S | re.M)
    if not found:
        raise SystemExit("README.md has no ```bash block under '## Install'")
    return found.group(1)


def _timed(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> tuple[float, str]:
    print("$", " ".join(cmd), flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seconds = time.perf_counter() - start
    print(proc.stdout[-3000:], flush=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with status {proc.returncode} after {seconds:.0f} s")
    return seconds, proc.stdout


def _disk_gb(folder: Path) -> float:
    out = subprocess.run(["du", "-sb", str(folder)], stdout=subprocess.PIPE, text=True, check=True).stdout
    return int(out.split()[0]) / 1e9


def _clean_env() -> dict[str, str]:
    """This process's environment without a virtual environment's marks, as a new shell has it."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if "/.venv/" not in p + "/")
    return env


def make_demo(clone: Path) -> dict:
    env = _clean_env()
    setup_s, _ = _timed(["make", "setup"], clone, env)
    demo_s, output = _timed(["make", "demo"], clone, env)
    results = json.loads((clone / "runs" / "lenet_ssl" / "results.json").read_text())
    table = output[output.index("torchslim demo:"):].split("\nrun folder:")[0]
    return {"setup_seconds": setup_s, "demo_seconds": demo_s, "venv_gb": _disk_gb(clone / ".venv"),
            "accuracy": results["accuracy"], "table": table}


def install_section(clone: Path, block: str) -> dict:
    venv = clone / "fresh-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = _clean_env()
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env['PATH']}"
    env["VIRTUAL_ENV"] = str(venv)
    seconds, output = _timed(["bash", "-e", "-x", "-c", block], clone, env)
    version = subprocess.run([str(venv / "bin" / "torchslim"), "--version"], stdout=subprocess.PIPE, text=True,
                             check=True).stdout.strip()
    return {"commands": [line for line in block.splitlines() if line.strip()], "seconds": seconds,
            "version": version, "venv_gb": _disk_gb(venv), "output_tail": output[-2000:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", action="store_true", help="keep the temporary clone (its path is printed)")
    args = parser.parse_args()
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                          check=True).stdout.strip()
    tmp = Path(tempfile.mkdtemp(prefix="torchslim-first-contact-"))
    clone = tmp / "torchslim"
    try:
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        demo = make_demo(clone)
        install = install_section(clone, install_block((clone / "README.md").read_text()))
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    write("first_contact", {"commit": head, "cores": os.cpu_count(), "make_demo": demo, "install": install})


if __name__ == "__main__":
    main()
