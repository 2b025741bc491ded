"""The package explains itself: its version, license, type hints and changelog agree with pyproject."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

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
