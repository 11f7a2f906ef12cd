"""The package version is one value, and the changelog knows it."""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

import tomllib

import dagster_octoai

ROOT = Path(__file__).resolve().parents[1]


def test_installed_version_matches_package() -> None:
    assert version("dagster-octoai") == dagster_octoai.__version__


def test_pyproject_reads_version_from_package() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["tool"]["hatch"]["version"]["path"] == "dagster_octoai/version.py"


def test_changelog_has_unreleased_or_current_version() -> None:
    text = (ROOT / "CHANGELOG.md").read_text()
    assert "## [Unreleased]" in text or f"## [{dagster_octoai.__version__}]" in text
