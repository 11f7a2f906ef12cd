"""Suite-wide set-up.

- A throwaway Dagster home with telemetry off, before Dagster is imported.
- Every test's logs are captured at DEBUG and scanned for the suite's tokens: a test
  fails if any log record holds one, so "the token is never logged" is checked by the
  whole suite, not by a few tests. The scan is per test, so it holds in every worker of a
  parallel run (``make test`` runs pytest-xdist) as in a plain one.
- ``tiny_models``: the tiny random-weight diffusers models, written once per run and
  shared by every worker of it (the diffusion tests, the Ray test, the demo test).
- Under xdist, the slow tests are handed out first, so that no long test starts last, and
  the tests that share a costly fixture run in one worker (``XDIST_GROUPS``).
- On CPython before 3.11.8 / 3.12.2, ``ast.parse`` is serialised (see ``_serialise_ast_parse``).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dagster_octoai.testing.plugin import TEST_ADMIN_TOKEN, TEST_TOKEN
from devtools.secrets import TokenScanner


def _serialise_ast_parse() -> None:
    """One ``ast.parse`` at a time in this process, on CPythons with gh-106905.

    Before 3.11.8 and 3.12.2 the C code that builds an AST keeps its recursion depth in
    state shared by all threads: two threads parsing at once can fail with "SystemError:
    AST constructor recursion depth mismatch". pytest parses (assertion rewriting) every
    module it imports of a package that registers a plugin, dagster_octoai, schemathesis
    and hypothesis among them, so two threads importing such modules at once can hit it
    (seen under load: test_server_openapi's lazy schemathesis import). A lock around
    ``ast.parse`` (the rewriter's entry) makes the race impossible.
    """
    import ast

    if not (sys.version_info < (3, 11, 8) or (3, 12) <= sys.version_info < (3, 12, 2)):
        return
    parse, lock = ast.parse, threading.RLock()

    def parse_alone(*args: Any, **kwargs: Any) -> Any:
        with lock:
            return parse(*args, **kwargs)

    ast.parse = parse_alone


_serialise_ast_parse()

_home = Path(tempfile.mkdtemp(prefix="dagster-octoai-home-"))
(_home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
os.environ["DAGSTER_HOME"] = str(_home)
os.environ.setdefault("DAGSTER_DISABLE_TELEMETRY", "1")


@pytest.fixture(scope="session")
def suite_tokens() -> tuple[str, ...]:
    """Tokens no log may hold; a conftest deeper down may add its own."""
    return (TEST_TOKEN, TEST_ADMIN_TOKEN)


@pytest.fixture(autouse=True)
def _tokens_never_logged(
    caplog: pytest.LogCaptureFixture, suite_tokens: tuple[str, ...]
) -> Iterator[None]:
    caplog.set_level(logging.DEBUG)
    # botocore logs every signed S3 request at DEBUG (megabytes per batch); the OctoAI
    # token never reaches boto3, so INFO there keeps the capture small and loses nothing.
    for name in ("botocore", "boto3", "urllib3", "s3transfer"):
        caplog.set_level(logging.INFO, logger=name)
    yield
    leaks = []
    for scanner in (TokenScanner(token) for token in suite_tokens):
        leaks += scanner.scan_text(caplog.text, "captured log text")
        for record in caplog.records:
            leaks += scanner.scan_text(record.getMessage(), f"log record {record.name}")
            if record.exc_text:
                leaks += scanner.scan_text(record.exc_text, f"log record {record.name} traceback")
    assert leaks == [], f"a token leaked into the logs: {leaks}"


#: Tests that share an expensive module or session fixture: each group runs in one worker
#: of a parallel run, in file order, so that its fixture is set up once (not once per
#: worker, nor again each time the worker comes back to the group).
XDIST_GROUPS = {
    # FLUX, SD3, SSD: a server of their own, beside the other (the first prefix that matches)
    "tests/diffusion/engines/": "diffusers-engines",
    "tests/diffusion/": "diffusers",  # one diffusers server on the tiny models
    "tests/test_ray_serve.py": "ray",  # one Ray cluster and endpoint
    "tests/reliability/test_postgres.py": "postgres",  # one PostgreSQL cluster
}


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """xdist's load scheduling, with the groups of ``XDIST_GROUPS`` as units of their own.

    Not ``--dist loadgroup``: xdist 3.8 marks a group by renaming the test's node id, which
    pytest 9.2 no longer lets a plugin do, so its groups are silently spread over every
    worker. A unit of load scope scheduling is given whole to one worker, the largest first
    (the groups); every other test is a unit of its own, handed out as workers free up.
    """
    if config.getvalue("dist") not in ("load", "loadgroup"):
        return None
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            for prefix, group in XDIST_GROUPS.items():
                if nodeid.startswith(prefix):
                    return group
            return nodeid

    return GroupScheduling(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """In an xdist worker, move the ``slow`` tests to the front (keeping their order).

    The scheduler hands tests out in collection order, after the groups: a minutes-long
    test collected late would start when the others are done and run alone at the end.
    First, it runs while the other workers take the short ones. A plain run keeps the
    file order.
    """
    if os.environ.get("PYTEST_XDIST_WORKER"):
        items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model directory written by ``dagster-octoai tiny-models``, once per test run.

    The workers of an xdist run share their parent base temp directory: the first worker
    that asks writes the models there under a file lock (about a minute of CPU here); the
    others wait for it and reuse them. They are written into a scratch directory and
    renamed into place, so a worker never sees half a directory.
    ``DAGSTER_OCTOAI_TINY_MODELS=DIR`` reuses a directory the command wrote before (it
    saves a minute when re-running a few tests by hand; the suite never sets it).
    """
    reuse = os.environ.get("DAGSTER_OCTOAI_TINY_MODELS")
    if reuse:
        return Path(reuse)
    pytest.importorskip("diffusers", reason="the tiny models need the diffusion extra")
    from filelock import FileLock

    from dagster_octoai.server.cli import main

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # this run's directory, above every worker's own
    models, scratch = base / "tiny-models", base / "tiny-models.partial"
    with FileLock(str(base / "tiny-models.lock")):
        if not (models / "dagster-octoai-models.json").is_file():
            shutil.rmtree(scratch, ignore_errors=True)
            # The command itself, in this process (a child would import torch a second time).
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                assert main(["tiny-models", str(scratch)]) == 0
            assert "serve them: dagster-octoai serve --backend diffusers --models" in out.getvalue()
            scratch.rename(models)
    return models
