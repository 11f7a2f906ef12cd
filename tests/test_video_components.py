"""The video Components: a YAML project with an image asset and its turntable clips, into SeaweedFS."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from dagster import AssetKey, materialize
from dagster.components import load_defs

from dagster_octoai.server import LocalOctoAIServer
from dagster_octoai.testing.seaweedfs import SeaweedFS, s3_bucket, seaweedfs

__all__ = ["s3_bucket", "seaweedfs"]  # fixtures used by this module


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, str]]:
    name = f"videoproj_{uuid.uuid4().hex[:8]}"
    (tmp_path / name / "defs" / "catalogue").mkdir(parents=True)
    (tmp_path / name / "__init__.py").write_text("")
    (tmp_path / name / "defs" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path, name
    for module in [m for m in sys.modules if m.startswith(name)]:
        del sys.modules[module]


def test_yaml_video_asset_from_a_yaml_image_asset(
    project: tuple[Path, str],
    octoai_server: LocalOctoAIServer,
    seaweedfs: SeaweedFS,
    s3_bucket: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OCTOAI_BASE_URL", octoai_server.url)
    monkeypatch.setenv("OCTOAI_TOKEN", octoai_server.token or "")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweedfs.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweedfs.secret_key)
    root, name = project
    s3 = f"""
          bucket: {s3_bucket}
          endpoint_url: {seaweedfs.endpoint_url}
          region_name: {seaweedfs.region}
          addressing_style: path"""
    (root / name / "defs" / "catalogue" / "defs.yaml").write_text(
        textwrap.dedent(
            f"""
        type: dagster_octoai.components.OctoAIImageAssetComponent
        attributes:
          asset:
            key: shop/shot
            partitions_def: {{type: static, partition_keys: [mug, lamp]}}
          request: {{engine: sd, steps: 2, seed: 5}}
          prompt_template: "a {{partition_key}}"
          io_manager_key: images
        ---
        type: dagster_octoai.video_components.OctoAIVideoAssetComponent
        attributes:
          name: shop/turntable
          image: shop/shot
          template: {{seed: 9, fps: 4}}
          partition_keys: [mug, lamp]
        ---
        type: dagster_octoai.components.OctoAIResourceComponent
        attributes: {{timeout_s: 60}}
        ---
        type: dagster_octoai.components.S3ImageIOManagerComponent
        attributes:
          prefix: img{s3}
        ---
        type: dagster_octoai.video_components.S3VideoIOManagerComponent
        attributes:
          prefix: vid{s3}
        """
        ).lstrip()
    )
    defs = load_defs(importlib.import_module(f"{name}.defs"), project_root=root)
    shot = defs.resolve_assets_def(AssetKey(["shop", "shot"]))
    turntable = defs.resolve_assets_def(AssetKey(["shop", "turntable"]))
    result = materialize([shot, turntable], partition_key="lamp")
    assert result.success
    (mat,) = result.asset_materializations_for_node("shop__turntable")
    assert mat.metadata["seed"].value == 9 and mat.metadata["fps"].value == 4.0
    keys = [
        o["Key"]
        for o in seaweedfs.client()
        .list_objects_v2(Bucket=s3_bucket, Prefix="vid/")
        .get("Contents", [])
    ]
    assert "vid/shop/turntable/partition=lamp/manifest.json" in keys
    assert any(k.endswith("-seed9.mp4") for k in keys)


def test_a_bad_template_is_refused_naming_the_field(project: tuple[Path, str]) -> None:
    root, name = project
    (root / name / "defs" / "catalogue" / "defs.yaml").write_text(
        textwrap.dedent(
            """
        type: dagster_octoai.video_components.OctoAIVideoAssetComponent
        attributes: {name: clips, image: shots, template: {motion_scale: 3}}
        """
        ).lstrip()
    )
    with pytest.raises(Exception) as caught:
        load_defs(importlib.import_module(f"{name}.defs"), project_root=root)
    chain = []
    error: BaseException | None = caught.value
    while error is not None:
        chain.append(str(error))
        error = error.__cause__ or error.__context__
    assert any("motion_scale: 3 is out of range; allowed: >= 0 and <= 1" in text for text in chain)


def test_dg_list_components_shows_the_video_components(tmp_path: Path) -> None:
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    dg = Path(sys.executable).with_name("dg")
    env = {**os.environ, "DAGSTER_HOME": str(home), "DAGSTER_DISABLE_TELEMETRY": "1"}
    env["PATH"] = f"{dg.parent}{os.pathsep}{env.get('PATH', '')}"
    result = subprocess.run(
        [str(dg), "list", "components", "--json"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    keys = {item["key"] for item in json.loads(result.stdout)["items"]}
    for name in (
        "OctoAIVideoAssetComponent",
        "S3VideoIOManagerComponent",
        "LocalVideoIOManagerComponent",
    ):
        assert f"dagster_octoai.video_components.{name}" in keys
    assert "dagster_octoai.components.OctoAIImageAssetComponent" in keys
