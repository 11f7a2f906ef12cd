"""The package's layers, as the tree shows them and as the import contract enforces them.

``api`` (the client layer), ``storage`` and ``server`` never import Dagster; the server
never imports the Dagster layer. ``make lint`` runs the contract (``lint-imports``); these
tests prove it holds today and that breaking a rule fails it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import dagster_octoai

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint_imports(package_parent: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
        cwd=package_parent,
        env={"PYTHONPATH": str(package_parent), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_contract_holds() -> None:
    done = _lint_imports(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


@pytest.mark.parametrize(
    ("module", "line", "broken"),
    [
        ("api/models.py", "import dagster", "the client layer (api)"),
        ("storage/ledger.py", "from dagster_octoai import resources", "storage imports"),
        ("server/app.py", "from dagster_octoai.metadata import Usage", "the server imports"),
        ("api/batch.py", "from dagster_octoai import sensors", "nothing under server, api or"),
        (
            "storage/layout.py",
            "from dagster_octoai.server import cli",
            "nothing imports the command",
        ),
    ],
)
def test_breaking_a_layer_rule_fails_the_contract(
    tmp_path: Path, module: str, line: str, broken: str
) -> None:
    shutil.copytree(ROOT / "dagster_octoai", tmp_path / "dagster_octoai")
    target = tmp_path / "dagster_octoai" / module
    target.write_text(target.read_text() + f"\n{line}  # noqa\n")

    done = _lint_imports(tmp_path)

    assert done.returncode != 0
    assert f"{broken}" in done.stdout
    assert "BROKEN" in done.stdout


def test_every_public_name_resolves_and_all_is_the_surface() -> None:
    for name in dagster_octoai.__all__:
        assert getattr(dagster_octoai, name) is not None, name
    assert sorted(dagster_octoai.__all__) == dagster_octoai.__all__
    lazy = set(dagster_octoai._lazy_table())
    eager = {name for name in dagster_octoai.__all__ if name not in lazy and name != "__version__"}
    assert eager == set(dagster_octoai.api.errors.__all__)
    assert lazy <= set(dagster_octoai.__all__)


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="has no attribute 'Nope'"):
        dagster_octoai.Nope  # noqa: B018


def test_the_client_layer_and_server_load_no_dagster() -> None:
    code = (
        "import sys, dagster_octoai.api.client, dagster_octoai.api.models, "
        "dagster_octoai.storage, dagster_octoai.server.app; "
        "print(sorted(m for m in sys.modules if m == 'dagster' or m.startswith('dagster.')))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "[]"


def test_the_surface_exports_what_users_need_and_no_internals() -> None:
    surface = set(dagster_octoai.__all__)
    assert {"Usage", "ObjectNotFoundError", "StorageError", "HTTPRetryPolicy"} <= surface
    internals = {"AsyncSensorCursor", "JobState", "JobRecord", "JobLedger", "AsyncJobTicker"}
    assert not internals & surface
    for gone in ("GenerationResult", "StoredImage", "RetryPolicy"):
        assert gone not in surface
        with pytest.raises(AttributeError):
            getattr(dagster_octoai, gone)
    # The client's retry policy no longer shadows Dagster's step retry policy.
    import dagster

    assert dagster_octoai.HTTPRetryPolicy.__name__ != dagster.RetryPolicy.__name__
    # One exception hierarchy: the storage errors are OctoAIErrors, defined with the rest.
    from dagster_octoai import storage

    assert issubclass(dagster_octoai.ObjectNotFoundError, dagster_octoai.StorageError)
    assert issubclass(dagster_octoai.StorageError, dagster_octoai.OctoAIError)
    assert dagster_octoai.StorageError.__module__ == "dagster_octoai.api.errors"
    assert storage.StorageError is dagster_octoai.StorageError
    assert storage.ObjectNotFoundError is dagster_octoai.ObjectNotFoundError
