"""The package explains itself: its version, license, type hints and changelog agree with pyproject."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import tomllib
from support import needs_fashion_mnist

import torchslim

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_version_flag_prints_the_package_version():
    out = subprocess.run([sys.executable, "-m", "torchslim", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"torchslim {torchslim.__version__}" == f"torchslim {PYPROJECT['project']['version']}"


def test_license_file_is_the_license_pyproject_names():
    assert PYPROJECT["project"]["license"]["text"] == "Apache-2.0"
    assert "Apache License" in (ROOT / "LICENSE").read_text() and "Version 2.0" in (ROOT / "LICENSE").read_text()


def test_type_hints_ship_with_the_package():
    assert (Path(torchslim.__file__).parent / "py.typed").is_file()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["torchslim"]


def test_changelog_names_the_current_version():
    assert f"## {torchslim.__version__}" in (ROOT / "CHANGELOG.md").read_text()


def test_architecture_doc_points_only_inside_the_repository():
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    assert "../" not in text and "/work/" not in text


@needs_fashion_mnist
def test_the_wheel_ships_the_recipes_and_trains_from_another_folder(tmp_path):
    """``pip install`` of a wheel (not editable): recipes found by name from any folder, one short run."""
    src = tmp_path / "source"
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", str(src), "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist")],
                   check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("torchslim-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(tmp_path / "site"), str(wheel)], check=True,
                   capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}

    def torchslim_cli(*args: str) -> str:
        out = subprocess.run([sys.executable, "-m", "torchslim", *args], cwd=elsewhere, env=env, capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout + out.stderr

    where = subprocess.run([sys.executable, "-c", "import torchslim; print(torchslim.__file__)"], cwd=elsewhere,
                           env=env, capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(tmp_path / "site"))  # the installed wheel, not the repository
    assert "--stop-after" in torchslim_cli("train", "lenet_ssl", "--help")
    torchslim_cli("-q", "train", "lenet_ssl", "--stop-after", "baseline", "--no-progress", "--out", "run",
                  "--set", "baseline.epochs=1", "--set", "data.train_limit=256", "--set", "data.test_limit=256")
    assert (elsewhere / "run" / "baseline.pt").is_file()
