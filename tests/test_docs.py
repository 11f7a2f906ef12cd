"""The documentation builds, and every Python snippet in it runs as written.

Every fenced ```python block of ``docs/`` and ``README.md`` (indented ones in tabs
included, ``--8<--`` includes expanded as MkDocs expands them) is executed, each in a
namespace of its own, against one local OctoAI-compatible server and one SeaweedFS
for all of them:

- ``OCTOAI_BASE_URL`` and ``OCTOAI_TOKEN`` point at the server (it accepts any token, so
  a snippet's made-up one works); ``http://127.0.0.1:8000``, where ``dagster-octoai
  serve`` listens by default, is the server's address too;
- boto3's environment (``AWS_ENDPOINT_URL``, the keys) points at SeaweedFS, as does
  ``http://127.0.0.1:8333`` (``weed server -s3``'s default), and every bucket a snippet
  names (``bucket="..."``) exists;
- the working directory is a temporary one.

After a snippet has run, what it defines is exercised: ``defs`` (a ``Definitions``) has
every asset materialized, in dependency order, for each of its partitions (the first
only, when there are more than three; none, for a dynamic partition set still empty);
an ``assets`` list likewise, with the OctoAI resource; a ``test_*`` function is called
with the fixtures it names. A block preceded by ``<!-- snippet: skip (reason) -->`` is not run;
the reason is required.
"""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from dagster import AssetsDefinition, DagsterInstance, Definitions, materialize

from dagster_octoai.resources import OctoAIResource
from dagster_octoai.server import LocalOctoAIServer, ServerConfig
from dagster_octoai.testing.seaweedfs import SeaweedFS, seaweedfs

__all__ = ["seaweedfs"]  # fixtures used by this module

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
#: Where `dagster-octoai serve` listens by default: snippets name it as their base_url.
LOCAL_SERVER = "http://127.0.0.1:8000"
#: Where `weed server -s3` listens by default.
LOCAL_S3 = "http://127.0.0.1:8333"
#: Partitions materialized per asset, at most (beyond it, only the first).
ALL_PARTITIONS_UP_TO = 3
SNIPPET_TOKEN = "docs-token-5b1e"

_FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)\s*$")
_SKIP = re.compile(r"<!--\s*snippet:\s*skip\s*\((?P<reason>[^)]*)\)\s*-->")
_INCLUDE = re.compile(r'^--8<--\s+"(?P<path>[^":]+)(?::(?P<section>[\w-]+))?"\s*$')
_BUCKET = re.compile(r"""\b(?:bucket|Bucket)\s*=\s*["']([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])["']""")


@dataclass(frozen=True)
class Snippet:
    """One ```python block: where it is, its code, and why it is skipped (if it is)."""

    path: Path
    line: int
    code: str
    skip: str | None

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def _include(line: str) -> str:
    """An ``--8<-- "file:section"`` line as MkDocs' snippets extension expands it."""
    match = _INCLUDE.match(line.strip())
    if match is None:
        return line
    text = (ROOT / match["path"]).read_text()
    section = match["section"]
    if section is None:
        return text
    start = text.index(f"--8<-- [start:{section}]")
    body = text[text.index("\n", start) + 1 : text.index(f"--8<-- [end:{section}]")]
    return body.rsplit("\n", 1)[0] + "\n"


def _snippets(path: Path) -> list[Snippet]:
    lines = path.read_text().splitlines()
    out: list[Snippet] = []
    i = 0
    while i < len(lines):
        fence = _FENCE.match(lines[i])
        if fence is None:
            i += 1
            continue
        indent, lang, start = fence["indent"], fence["lang"], i
        i += 1
        body: list[str] = []
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i][len(indent) :] if lines[i].startswith(indent) else lines[i])
            i += 1
        i += 1
        if lang != "python":
            continue
        before = next((ln for ln in reversed(lines[:start]) if ln.strip()), "")
        skip = _SKIP.search(before)
        if skip is not None and not skip["reason"].strip():
            raise ValueError(f"{path}:{start + 1}: a skipped snippet needs its reason")
        code = "".join(
            _include(ln) + "\n" if _INCLUDE.match(ln.strip()) else ln + "\n" for ln in body
        )
        out.append(
            Snippet(path, start + 1, textwrap.dedent(code), skip["reason"] if skip else None)
        )
    return out


SNIPPETS = [s for doc in DOCUMENTS for s in _snippets(doc)]


def test_there_are_snippets_and_few_are_skipped() -> None:
    skipped = [s for s in SNIPPETS if s.skip]
    assert len(SNIPPETS) >= 30
    # Skips are for what cannot run here (GPU weights, real AWS, a long-running server).
    assert len(skipped) <= 3, [(s.id, s.skip) for s in skipped]


# ---- the environment every snippet runs in --------------------------------------------------


@pytest.fixture(scope="module")
def docs_server() -> Iterator[LocalOctoAIServer]:
    """One server for every snippet; it accepts any bearer token."""
    with LocalOctoAIServer(ServerConfig(token=None, public=True)) as server:
        yield server


@pytest.fixture
def snippet_env(
    docs_server: LocalOctoAIServer,
    seaweedfs: SeaweedFS,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Path:
    monkeypatch.chdir(tmp_path)
    for name, value in {
        "OCTOAI_BASE_URL": docs_server.url,
        "OCTOAI_TOKEN": SNIPPET_TOKEN,
        "AWS_ENDPOINT_URL": seaweedfs.endpoint_url,
        "AWS_ACCESS_KEY_ID": seaweedfs.access_key,
        "AWS_SECRET_ACCESS_KEY": seaweedfs.secret_key,
        "AWS_REGION": seaweedfs.region,
        "AWS_DEFAULT_REGION": seaweedfs.region,
    }.items():
        monkeypatch.setenv(name, value)
    return tmp_path


def _create_buckets(code: str, s3: SeaweedFS) -> None:
    client = s3.client()
    existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    for bucket in sorted(set(_BUCKET.findall(code)) - existing):
        client.create_bucket(Bucket=bucket)


# ---- what a snippet defines, exercised ------------------------------------------------------


def _materialize_all(assets: list[Any], resources: dict[str, Any]) -> None:
    """Every asset, upstream first, each for its first partition, in one instance."""
    graph = Definitions(assets=assets, resources=resources).resolve_asset_graph()
    with DagsterInstance.ephemeral() as instance:
        for key in graph.toposorted_asset_keys:
            node = graph.get(key)
            if not node.is_materializable:
                continue
            keys: list[str | None] = [None]
            if node.partitions_def is not None:
                keys = list(
                    node.partitions_def.get_partition_keys(dynamic_partitions_store=instance)
                )
                if len(keys) > ALL_PARTITIONS_UP_TO:
                    keys = keys[:1]
            for partition in keys:
                result = materialize(
                    assets,
                    selection=[key],
                    resources=resources,
                    partition_key=partition,
                    instance=instance,
                )
                assert result.success, f"{key.to_user_string()} [{partition}] did not materialize"


class _Fixtures:
    """The pytest fixtures a snippet's ``test_*`` function may name, made here."""

    def __init__(self, docs_server: LocalOctoAIServer, tmp_path: Path) -> None:
        self._made: dict[str, Callable[[], Any]] = {
            "octoai_server": lambda: docs_server,
            "octoai_server_factory": lambda: self._factory,
            "tmp_path": lambda: tmp_path,
        }
        self._started: list[LocalOctoAIServer] = []

    def _factory(self, **fields: Any) -> LocalOctoAIServer:
        fields.setdefault("token", SNIPPET_TOKEN)
        server = LocalOctoAIServer(ServerConfig(**fields)).start()
        self._started.append(server)
        return server

    def call(self, function: Callable[..., Any]) -> None:
        names = inspect.signature(function).parameters
        function(**{name: self._made[name]() for name in names})

    def close(self) -> None:
        for server in self._started:
            server.stop()


def _exercise(namespace: dict[str, Any], docs_server: LocalOctoAIServer, tmp_path: Path) -> None:
    defs = namespace.get("defs")
    if isinstance(defs, Definitions):
        assets = [a for a in defs.assets or [] if isinstance(a, AssetsDefinition)]
        _materialize_all(assets, dict(defs.resources or {}))
    assets_list = namespace.get("assets")
    if isinstance(assets_list, list) and all(isinstance(a, AssetsDefinition) for a in assets_list):
        _materialize_all(assets_list, {"octoai": OctoAIResource()})
    fixtures = _Fixtures(docs_server, tmp_path)
    try:
        for name, value in list(namespace.items()):
            if name.startswith("test_") and callable(value):
                fixtures.call(value)
    finally:
        fixtures.close()


@pytest.mark.parametrize("snippet", SNIPPETS, ids=lambda s: s.id)
def test_snippet_runs_as_written(
    snippet: Snippet,
    snippet_env: Path,
    docs_server: LocalOctoAIServer,
    seaweedfs: SeaweedFS,
) -> None:
    if snippet.skip:
        pytest.skip(snippet.skip)
    code = snippet.code.replace(LOCAL_SERVER, docs_server.url).replace(
        LOCAL_S3, seaweedfs.endpoint_url
    )
    _create_buckets(code, seaweedfs)
    namespace: dict[str, Any] = {"__name__": "__docs_snippet__"}
    # dont_inherit: this module's `from __future__ import annotations` would turn the
    # snippet's annotations into strings, which Dagster's decorators do not read.
    exec(compile(code, snippet.id, "exec", dont_inherit=True), namespace)
    _exercise(namespace, docs_server, snippet_env)


def test_a_skipped_snippet_must_say_why(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("<!-- snippet: skip () -->\n```python\nprint(1)\n```\n")
    with pytest.raises(ValueError, match="needs its reason"):
        _snippets(page)
    page.write_text("<!-- snippet: skip (needs a GPU) -->\n```python\nprint(1)\n```\n")
    assert [s.skip for s in _snippets(page)] == ["needs a GPU"]


def test_mkdocs_build_strict(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "index.html").is_file()


def test_every_docs_page_the_package_names_exists_and_the_layout_is_where_it_says() -> None:
    import re

    named: dict[str, list[str]] = {}
    for path in (ROOT / "dagster_octoai").rglob("*.py"):
        for page in re.findall(r"docs/([\w./-]+\.md)(?!\w)", path.read_text(encoding="utf-8")):
            named.setdefault(page, []).append(str(path.relative_to(ROOT)))
    missing = {page: where for page, where in named.items() if not (ROOT / "docs" / page).is_file()}
    assert not missing, missing
    # A page the server names for the layout of a model directory must show that layout.
    for path in (ROOT / "dagster_octoai" / "server").rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        for found in re.finditer(r"docs/([\w./-]+\.md)", text):
            near = text[max(0, found.start() - 150) : found.end() + 150]
            if "layout" in near or "lay out" in near:
                page = (ROOT / "docs" / found.group(1)).read_text()
                assert "model_index.json" in page, (str(path), found.group(1))


def test_storage_docs_show_the_partition_uri_that_layout_v2_writes() -> None:
    from dagster_octoai.storage.layout import output_key

    key = output_key("octoai", ["foxes"], "2024-01-01")
    text = (ROOT / "docs" / "storage.md").read_text()
    assert f"`s3://images/{key}/`" in text


def test_the_local_backend_route_is_documented_as_the_control_route_it_is() -> None:
    text = (ROOT / "docs" / "diffusers-backend.md").read_text()
    line = next(li for li in text.split("\n\n") if "GET /_local/backend` lists" in li)
    assert "--control-routes" in line and "admin token" in line
