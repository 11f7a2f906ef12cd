"""Run config backed by the request model: what the launchpad refuses, and what the step refuses."""

# No `from __future__ import annotations`: Dagster reads the assets' annotations.

import base64
import io
from pathlib import Path
from typing import Any

import pytest
from dagster import (
    DagsterInvalidConfigError,
    Definitions,
    JobDefinition,
    define_asset_job,
    validate_run_config,
)
from PIL import Image
from pydantic import ValidationError

from dagster_octoai.api.errors import RequestValidationError
from dagster_octoai.api.models import ImageGenerationRequest
from dagster_octoai.assets import octoai_image_asset
from dagster_octoai.config import ImageGenerationConfig
from dagster_octoai.resources import OctoAIResource


def _job(assets: list[Any], name: str = "job") -> JobDefinition:
    defs = Definitions(
        assets=assets,
        jobs=[define_asset_job(name, assets)],
        resources={"octoai": OctoAIResource(base_url="http://127.0.0.1:9")},
    )
    return defs.resolve_job_def(name)


def test_config_builds_the_same_request_as_the_model() -> None:
    cfg = ImageGenerationConfig(
        engine="sd", prompt="a fox", steps=20, num_images=2, seeds=[1, None], sampler="K_EULER"
    )
    assert cfg.to_request() == ImageGenerationRequest(
        engine="sd", prompt="a fox", steps=20, num_images=2, seed=[1, None], sampler="K_EULER"
    )


def test_image_fields_take_paths_and_file_uris(tmp_path: Path) -> None:
    path = tmp_path / "in.png"
    Image.new("RGB", (16, 16), "red").save(path)
    by_path = ImageGenerationConfig(prompt="x", init_image=str(path)).to_request()
    by_uri = ImageGenerationConfig(prompt="x", init_image=path.as_uri()).to_request()
    assert by_path.init_image == by_uri.init_image
    assert Image.open(io.BytesIO(base64.b64decode(by_uri.init_image))).size == (16, 16)


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"prompt": "x", "steps": 500}, "steps"),
        ({"prompt": "x", "engine": "sd", "width": 1024, "height": 1024}, "width"),
        ({"prompt": "x", "engine": "sd", "style_preset": "anime"}, "style_preset"),
        ({"prompt": "x", "seed": 1, "seeds": [1]}, "seeds"),
        ({"prompt": "x", "init_image": "/no/such/file.png"}, "init_image"),
        ({"steps": 20}, "prompt"),
    ],
)
def test_bad_config_is_refused_naming_the_field(fields: dict, named: str) -> None:
    with pytest.raises(ValidationError, match=named):
        ImageGenerationConfig(**fields)


def test_launchpad_refuses_bad_types_and_unknown_keys_before_a_run() -> None:
    pics = octoai_image_asset("pics", {"engine": "sd", "prompt": "x"})
    job = _job([pics])
    ok = validate_run_config(
        job, {"ops": {"pics": {"config": {"sampler": "K_EULER", "engine": "sd"}}}}
    )
    assert ok["ops"]["pics"]["config"]["sampler"] == "K_EULER"
    for bad, where in [({"steps": "many"}, "steps"), ({"stepz": 3}, "stepz")]:
        with pytest.raises(DagsterInvalidConfigError) as caught:
            validate_run_config(job, {"ops": {"pics": {"config": bad}}})
        assert where in str(caught.value)


def test_names_are_judged_by_the_request_model_listing_what_is_allowed() -> None:
    # Engine, sampler and encoding are strings to Dagster: a Dagster enum would refuse a
    # bad one without the allowed values, in a round of its own.
    with pytest.raises(RequestValidationError) as caught:
        ImageGenerationConfig.from_run_config(
            {"prompt": "x", "sampler": "FAST", "image_encoding": "gif", "steps": 0}
        )
    by_field = {e["field"]: e["message"] for e in caught.value.errors}
    assert by_field["sampler"].startswith("'FAST' is not a sampler; allowed: DDIM, DDPM,")
    assert by_field["image_encoding"] == "'gif' is not allowed; allowed: 'jpeg', 'png'"
    assert by_field["steps"] == "0 is out of range; allowed: 1..200"
    with pytest.raises(
        RequestValidationError, match=r"engine: 'sdxl-turbo' is not an engine; allowed: sdxl, sd"
    ):
        ImageGenerationConfig.from_run_config({"prompt": "x", "engine": "sdxl-turbo"})


def test_every_problem_of_a_run_config_in_one_error() -> None:
    with pytest.raises(RequestValidationError) as caught:
        ImageGenerationConfig.from_run_config(
            {"engine": "sd", "width": 1024, "height": 1024, "steps": 500, "seed": 1, "seeds": [1]}
        )
    err = caught.value
    assert [e["field"] for e in err.errors] == ["prompt", "seeds", "steps", "width"]
    assert str(err).startswith("invalid image generation request: prompt: required")
    assert "[type=" not in str(err) and "errors.pydantic.dev" not in str(err)


def test_template_config_is_validated_against_the_template() -> None:
    """A config that is fine alone but wrong for the asset's template is refused."""
    ImageGenerationConfig(prompt="x", width=1024, height=1024)  # fine for SDXL alone
    sd_template = type(
        "sd_template", (ImageGenerationConfig,), {"template": {"engine": "sd", "prompt": "x"}}
    )
    with pytest.raises(ValidationError, match="width"):
        sd_template(width=1024, height=1024)


def test_runtime_fields_stand_in_for_upstream_images() -> None:
    controlled = type(
        "c",
        (ImageGenerationConfig,),
        {
            "template": {"engine": "controlnet-sd15", "controlnet": "octoai:canny_sd15"},
            "runtime_fields": {"prompt": "p", "controlnet_image": _tiny()},
        },
    )
    assert controlled(steps=10).steps == 10
    with pytest.raises(ValidationError, match="strength"):
        controlled(strength=2.0)


def _tiny() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_several_ray_frontends_need_a_job_store_they_share() -> None:
    from dagster_octoai.server import ServerConfig
    from dagster_octoai.server.ray_config import RayEndpointConfig

    with pytest.raises(ValidationError, match="frontend_replicas: 2 frontends need one job store"):
        RayEndpointConfig(server=ServerConfig(), frontend_replicas=2)
    shared = ServerConfig(jobs_url="s3://jobs/endpoint")
    assert RayEndpointConfig(server=shared, frontend_replicas=2).frontend_replicas == 2
    assert RayEndpointConfig(server=ServerConfig(), frontend_replicas=1).frontend_replicas == 1
