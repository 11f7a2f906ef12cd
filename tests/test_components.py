"""Dagster Components: image assets (and their resources) defined in YAML.

- a YAML-defined asset loads as ``dg`` loads a project's defs folder and materializes into
  SeaweedFS over the local server;
- the standard attributes (partitions, pool, kinds, owners, automation condition, code
  version, checks, backfill policy, retry policy) reach the asset;
- a bad request block fails the load naming every field at its line;
- the real ``dg`` CLI lists the components and scaffolds a ``defs.yaml`` that works as it
  is (``DAGSTER_HOME`` a temporary one with telemetry off).
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dagster import (
    AssetKey,
    AssetsDefinition,
    AutomationCondition,
    BackfillPolicy,
    Definitions,
    materialize,
)
from dagster.components import load_defs
from dagster.components.resolved.errors import ResolutionException

from dagster_octoai.components import OctoAIImageAssetComponent
from dagster_octoai.server import LocalOctoAIServer
from dagster_octoai.testing.seaweedfs import SeaweedFS, s3_bucket, seaweedfs

__all__ = ["s3_bucket", "seaweedfs"]  # fixtures used by this module

DG = Path(sys.executable).with_name("dg")
DOCS_COMPONENTS = Path(__file__).resolve().parents[1] / "docs" / "components.md"
COMPONENT = "dagster_octoai.components.OctoAIImageAssetComponent"


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, str]]:
    """A package with an empty ``defs`` folder, importable under a name of its own."""
    name = f"yamlproj_{uuid.uuid4().hex[:8]}"
    (tmp_path / name / "defs").mkdir(parents=True)
    (tmp_path / name / "__init__.py").write_text("")
    (tmp_path / name / "defs" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path, name
    for module in [m for m in sys.modules if m.startswith(name)]:
        del sys.modules[module]


def _write(project: tuple[Path, str], folder: str, text: str) -> Path:
    root, name = project
    path = root / name / "defs" / folder / "defs.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def _load(project: tuple[Path, str]) -> Definitions:
    root, name = project
    return load_defs(importlib.import_module(f"{name}.defs"), project_root=root)


def _asset(defs: Definitions, key: str | list[str]) -> AssetsDefinition:
    """The asset as the component built it (no resources resolved)."""
    wanted = AssetKey(key)
    return next(a for a in defs.assets or [] if isinstance(a, AssetsDefinition) and a.key == wanted)


def _environment(monkeypatch: pytest.MonkeyPatch, server: LocalOctoAIServer, s3: SeaweedFS) -> None:
    monkeypatch.setenv("OCTOAI_BASE_URL", server.url)
    monkeypatch.setenv("OCTOAI_TOKEN", server.token or "")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.secret_key)


def test_a_yaml_asset_loads_as_dg_loads_it_and_materializes_into_s3(
    project: tuple[Path, str],
    octoai_server: LocalOctoAIServer,
    seaweedfs: SeaweedFS,
    s3_bucket: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _environment(monkeypatch, octoai_server, seaweedfs)
    yaml_path = _write(
        project,
        "foxes",
        f"""
        type: {COMPONENT}
        attributes:
          asset:
            key: wildlife/foxes
            group_name: wildlife
            partitions_def: {{type: static, partition_keys: [red, arctic]}}
          request: {{engine: sd, steps: 4, seed: 17, image_encoding: png}}
          prompt_template: "a {{partition_key}} fox"
          io_manager_key: images
        ---
        type: dagster_octoai.components.OctoAIResourceComponent
        attributes: {{max_concurrency: 2, timeout_s: 30}}
        ---
        type: dagster_octoai.components.S3ImageIOManagerComponent
        attributes:
          bucket: {s3_bucket}
          prefix: yaml
          endpoint_url: {seaweedfs.endpoint_url}
          region_name: {seaweedfs.region}
          addressing_style: path
        """,
    )
    defs = _load(project)
    key = AssetKey(["wildlife", "foxes"])
    # Resolved from the Definitions, the asset has the YAML's resources bound.
    foxes = defs.resolve_assets_def(key)
    before = octoai_server.stats()["paid_generations"]
    result = materialize([foxes], partition_key="arctic")
    assert result.success
    assert octoai_server.stats()["paid_generations"] == before + 1
    (mat,) = result.asset_materializations_for_node("wildlife__foxes")
    assert mat.metadata["seeds"].value == [17]
    objects = seaweedfs.client().list_objects_v2(Bucket=s3_bucket, Prefix="yaml/")
    stored = sorted(o["Key"] for o in objects.get("Contents", []))
    # The partition's manifest and its image, under the write that committed it.
    assert len(stored) == 2 and stored[1] == "yaml/wildlife/foxes/partition=arctic/manifest.json"
    assert re.fullmatch(
        r"yaml/wildlife/foxes/partition=arctic/_objects/[0-9TZ]+-[0-9a-f]+/000-seed17\.png",
        stored[0],
    ), stored
    # The request template came from YAML: the prompt was filled in at run time.
    manifest = json.loads(
        seaweedfs.client()
        .get_object(Bucket=s3_bucket, Key="yaml/wildlife/foxes/partition=arctic/manifest.json")[
            "Body"
        ]
        .read()
    )
    assert manifest["results"][0]["request"]["body"]["prompt"] == "a arctic fox"
    # Dagster points the asset's code reference at the user's YAML, not this package.
    references = foxes.specs_by_key[key].metadata["dagster/code_references"].code_references
    assert any(str(yaml_path) in getattr(r, "file_path", "") for r in references)


def test_standard_attributes_reach_the_asset(project: tuple[Path, str]) -> None:
    _write(
        project,
        "hero",
        f"""
        type: {COMPONENT}
        attributes:
          asset:
            key: marketing/hero
            owners: [team:marketing]
            kinds: [sdxl]
            tags: {{tier: gold}}
            code_version: v3
            automation_condition: "{{{{ dg.AutomationCondition.eager() }}}}"
            partitions_def: {{type: static, partition_keys: [mug, lamp]}}
          request: {{engine: sdxl, prompt: a mug, seed: 1}}
          checks: blocking
          op:
            pool: octoai-gpu
            tags: {{team: images}}
            backfill_policy: {{type: multi_run, max_partitions_per_run: 1}}
          retry_policy: {{max_retries: 2, delay: 5, backoff: exponential}}
        """,
    )
    hero = _asset(_load(project), ["marketing", "hero"])
    spec = hero.specs_by_key[AssetKey(["marketing", "hero"])]
    assert list(spec.owners) == ["team:marketing"]
    assert spec.kinds == {"octoai", "sdxl"}
    assert spec.tags["tier"] == "gold"
    assert spec.code_version == "v3"
    assert spec.automation_condition == AutomationCondition.eager()
    assert spec.partitions_def is not None
    assert list(spec.partitions_def.get_partition_keys()) == ["mug", "lamp"]
    assert hero.op.pool == "octoai-gpu"
    assert hero.op.tags["team"] == "images"
    assert hero.backfill_policy == BackfillPolicy.multi_run(1)
    assert hero.op.retry_policy is not None and hero.op.retry_policy.max_retries == 2
    assert {c.name for c in hero.check_specs} == {
        "no_images_removed_for_safety",
        "image_sizes_as_requested",
        "images_decode",
    }
    assert all(c.blocking for c in hero.check_specs)


def test_defaults_pool_and_code_version(project: tuple[Path, str]) -> None:
    _write(
        project,
        "plain",
        f"""
        type: {COMPONENT}
        attributes:
          asset: {{key: plain}}
          request: {{prompt: a fox}}
        """,
    )
    plain = _asset(_load(project), "plain")
    assert plain.op.pool == "octoai"
    # Unset: a hash of the request template, so a changed template reads as stale.
    assert plain.specs_by_key[AssetKey("plain")].code_version


def test_a_bad_request_block_names_every_field_at_its_line(project: tuple[Path, str]) -> None:
    path = _write(
        project,
        "bad",
        f"""
        type: {COMPONENT}
        attributes:
          asset: {{key: bad}}
          request:
            engine: sd
            width: 1024
            height: 1024
            steps: 500
            sampler: FAST
          prompt_template: "a fox"
        """,
    )
    with pytest.raises(Exception) as caught:
        _load(project)
    # dg wraps the component's error in one naming the component; ours is its cause.
    cause = caught.value.__cause__ or caught.value
    assert isinstance(cause, ResolutionException)
    message = str(cause)
    assert f"{path}:8 - attributes.request.steps" in message
    assert "steps: 500 is out of range; allowed: 1..200" in message
    assert f"{path}:9 - attributes.request.sampler" in message
    assert "sampler: 'FAST' is not a sampler; allowed: DDIM, DDPM" in message
    assert f"{path}:6 - attributes.request.width" in message
    assert "not supported by engine 'sd'; allowed: 512x512" in message
    assert "[type=" not in message and "pydantic.dev" not in message


def test_the_token_is_never_written_in_yaml(project: tuple[Path, str]) -> None:
    _write(
        project,
        "leaky",
        """
        type: dagster_octoai.components.OctoAIResourceComponent
        attributes: {token: sk-do-not-do-this}
        """,
    )
    with pytest.raises(Exception) as caught:
        _load(project)
    # No such field: the component refuses it rather than putting a secret in config.
    text = f"{caught.value}\n{caught.value.__cause__}"
    assert "token" in text and "Extra inputs are not permitted" in text


def test_resource_components_with_the_same_settings_share_one_resource(
    project: tuple[Path, str],
) -> None:
    for folder in ("first", "second"):
        _write(
            project,
            folder,
            f"""
            type: {COMPONENT}
            attributes:
              asset: {{key: {folder}}}
              request: {{prompt: a fox}}
            ---
            type: dagster_octoai.components.OctoAIResourceComponent
            attributes: {{max_concurrency: 3}}
            """,
        )
    defs = _load(project)
    assert (defs.resources or {})["octoai"].max_concurrency == 3
    _write(
        project,
        "third",
        """
        type: dagster_octoai.components.OctoAIResourceComponent
        attributes: {max_concurrency: 5}
        """,
    )
    with pytest.raises(Exception) as caught:
        _load(project)
    assert "different resources with same key 'octoai'" in str(caught.value.__cause__)


# ---- the dg CLI ------------------------------------------------------------------------------


def _dg_env(root: Path, **extra: str) -> dict[str, str]:
    home = root / "dagster_home"
    home.mkdir(exist_ok=True)
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    return {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "DAGSTER_DISABLE_TELEMETRY": "1",
        "COLUMNS": "200",
        "PYTHONPATH": str(root),
        "PATH": f"{DG.parent}{os.pathsep}{os.environ.get('PATH', '')}",
        **extra,
    }


def _dg(root: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(DG), *args],
        cwd=root,
        env=_dg_env(root, **env),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _docs_block(lang: str, after: str) -> str:
    """The first ```lang block of docs/components.md after the line holding ``after``."""
    text = DOCS_COMPONENTS.read_text()
    start = text.index(f"```{lang}\n", text.index(after)) + len(f"```{lang}\n")
    return text[start : text.index("```", start)]


def _dg_project(root: Path) -> Path:
    """The dg project docs/components.md makes from nothing, file for file as it says."""
    (root / "pyproject.toml").write_text(_docs_block("toml", "`pyproject.toml`:"))
    package = root / "imageproj"
    (package / "defs").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "defs" / "__init__.py").write_text("")
    definitions = _docs_block("py", "`imageproj/definitions.py`:")
    (package / "definitions.py").write_text(definitions)
    return package


@pytest.mark.slow
def test_dg_list_components_shows_them(tmp_path: Path) -> None:
    result = _dg(tmp_path, "list", "components", "--json")
    keys = {item["key"]: item["summary"] for item in json.loads(result.stdout)["items"]}
    for name in (
        "OctoAIImageAssetComponent",
        "OctoAIResourceComponent",
        "S3ImageIOManagerComponent",
        "LocalImageIOManagerComponent",
    ):
        assert f"dagster_octoai.components.{name}" in keys
    assert "image generation asset" in keys[COMPONENT]
    # Plain text, as dg shows it: no Sphinx roles or literals.
    for key, summary in keys.items():
        if key.startswith("dagster_octoai."):
            assert not re.search(r":(class|func|meth):|``", summary), (key, summary)
    # Telemetry stayed off: nothing was written under the temporary DAGSTER_HOME's siblings.
    assert not (tmp_path / "dagster_home" / ".telemetry").exists()


@pytest.mark.slow
def test_dg_scaffold_defs_writes_a_working_example(
    tmp_path: Path, octoai_server: LocalOctoAIServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = _dg_project(tmp_path)
    _dg(tmp_path, "scaffold", "defs", COMPONENT, "arctic_foxes")
    scaffolded = package / "defs" / "arctic_foxes" / "defs.yaml"
    assert scaffolded.is_file()
    assert "OctoAIResourceComponent" in scaffolded.read_text()
    # dg itself finds the asset, its checks and its resources in what it wrote.
    listed = json.loads(_dg(tmp_path, "list", "defs", "--json").stdout)
    assert [a["asset_key"] for a in listed["assets"]] == ["arctic_foxes"]
    assert {r["name"] for r in listed["resources"]} == {"octoai", "octoai_images"}
    assert listed["assets"][0]["source"].endswith("defs/arctic_foxes/defs.yaml:5")

    # And it materializes as written, against the server named by OCTOAI_BASE_URL.
    monkeypatch.setenv("OCTOAI_BASE_URL", octoai_server.url)
    monkeypatch.setenv("OCTOAI_TOKEN", octoai_server.token or "")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        defs = load_defs(importlib.import_module("imageproj.defs"), project_root=tmp_path)
        asset = defs.resolve_assets_def("arctic_foxes")
        result = materialize([asset], partition_key="red")
    finally:
        for module in [m for m in sys.modules if m.startswith("imageproj")]:
            del sys.modules[module]
    assert result.success
    assert all(e.passed for e in result.get_asset_check_evaluations())
    stored = sorted(p.name for p in (tmp_path / "generated-images").rglob("*") if p.is_file())
    assert stored == ["000-seed7.jpg", "manifest.json"]


def test_from_python_the_same_component_builds_the_same_asset() -> None:
    component: Any = OctoAIImageAssetComponent.from_attributes_dict(
        attributes={"asset": {"key": "fox"}, "request": {"prompt": "a fox", "seed": 3}}
    )
    assert component.assets_def.key == AssetKey("fox")


def test_the_resource_component_takes_the_nested_retry_policy() -> None:
    from dagster_octoai.components import OctoAIResourceComponent

    component = OctoAIResourceComponent.resolve_from_yaml(
        "retry: {max_attempts: 2, deadline_s: null}\nbase_url: http://127.0.0.1:9\n"
    )
    policy = component.resource.retry_policy()
    assert (policy.max_attempts, policy.deadline_s) == (2, None)


def test_the_async_component_from_yaml_submits_senses_and_stores_end_to_end(
    project: tuple[Path, str],
    octoai_server: LocalOctoAIServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import time

    from dagster import DagsterInstance, build_sensor_context

    monkeypatch.setenv("OCTOAI_BASE_URL", octoai_server.url)
    monkeypatch.setenv("OCTOAI_TOKEN", octoai_server.token or "")
    _write(
        project,
        "async_foxes",
        f"""
        type: dagster_octoai.components.OctoAIAsyncImagesComponent
        attributes:
          key: async_foxes
          requests:
            - {{engine: sd, prompt: a red fox, seed: 11, steps: 3}}
            - {{engine: sd, prompt: an arctic fox, seed: 12, steps: 3}}
          io_manager_key: images
          minimum_interval_seconds: 1
        ---
        type: dagster_octoai.components.OctoAIResourceComponent
        attributes: {{timeout_s: 30}}
        ---
        type: dagster_octoai.components.LocalImageIOManagerComponent
        attributes: {{base_dir: "{tmp_path / "images"}"}}
        ---
        type: dagster_octoai.components.JobLedgerResourceComponent
        attributes: {{base_dir: "{tmp_path / "ledger"}", fsync: false}}
        """,
    )
    defs = _load(project)
    submit = defs.resolve_assets_def("async_foxes_jobs")
    results = defs.resolve_assets_def("async_foxes")
    sensor = defs.resolve_sensor_def("async_foxes_sensor")
    resources = defs.resources or {}
    (tmp_path / "home").mkdir()
    with DagsterInstance.local_temp(str(tmp_path / "home")) as instance:
        assert materialize([submit], instance=instance).success
        stored: dict[str, Any] = {}
        cursor = None
        for _ in range(50):
            with build_sensor_context(
                instance=instance,
                instance_ref=instance.get_ref(),
                cursor=cursor,
                definitions=defs,
                resources={k: resources[k] for k in ("octoai", "octoai_ledger")},
            ) as context:
                data = sensor.evaluate_tick(context)
            for added in data.dynamic_partitions_requests or []:
                instance.add_dynamic_partitions(
                    added.partitions_def_name, list(added.partition_keys)
                )
            cursor = data.cursor
            for request in data.run_requests:
                assert request.partition_key is not None
                run = materialize(
                    [results],
                    instance=instance,
                    partition_key=request.partition_key,
                    tags=dict(request.tags),
                )
                assert run.success
                stored[request.partition_key] = run
            if len(stored) == 2:
                break
            time.sleep(0.2)
    assert len(stored) == 2
    io_manager = resources["images"]
    seeds = sorted(im.seed for key in stored for im in io_manager.store.read(["async_foxes"], key))
    assert seeds == [11, 12]
