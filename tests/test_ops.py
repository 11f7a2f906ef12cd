"""The op factory in op-based jobs, against the local server over real HTTP."""

# No `from __future__ import annotations`: Dagster reads the ops' annotations.

from typing import Any

import pytest
from dagster import EnvVar, build_op_context, job

from dagster_octoai.api.batch import ImageBatch
from dagster_octoai.ops import octoai_generate_op
from dagster_octoai.resources import OctoAIResource


@pytest.fixture
def octoai(octoai_server: Any, monkeypatch: pytest.MonkeyPatch) -> OctoAIResource:
    monkeypatch.setenv("OCTOAI_TOKEN", octoai_server.token)
    return OctoAIResource(token=EnvVar("OCTOAI_TOKEN"), base_url=octoai_server.url)


def test_op_job_generates_from_run_config_and_records_usage(
    octoai: OctoAIResource, octoai_server: Any
) -> None:
    generate = octoai_generate_op("generate", {"engine": "sd", "steps": 3})

    @job(resource_defs={"octoai": octoai})
    def images() -> None:
        generate()

    before = octoai_server.stats()["paid_generations"]
    result = images.execute_in_process(
        run_config={
            "ops": {"generate": {"config": {"prompt": "a kite", "num_images": 2, "seed": 8}}}
        }
    )
    assert result.success
    assert octoai_server.stats()["paid_generations"] - before == 2
    batch = result.output_for_node("generate")
    assert isinstance(batch, ImageBatch) and batch.image_count == 2
    assert batch.responses[0].request.steps == 3  # from the template
    (event,) = [e for e in result.all_events if e.event_type_value == "HANDLED_OUTPUT"]
    outputs = [e for e in result.all_events if e.event_type_value == "STEP_OUTPUT"]
    md = outputs[0].step_output_data.metadata
    assert md["octoai/images"].value == 2 and md["octoai/steps"].value == 6
    assert md["seeds"].value == batch.responses[0].seeds
    assert event is not None


def test_op_without_prompt_fails_naming_prompt(octoai: OctoAIResource) -> None:
    generate = octoai_generate_op("bare")

    @job(resource_defs={"octoai": octoai})
    def bare_job() -> None:
        generate()

    result = bare_job.execute_in_process(
        run_config={"ops": {"bare": {"config": {"steps": 3}}}}, raise_on_error=False
    )
    assert not result.success
    (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert "prompt" in failure.step_failure_data.error.message


def test_op_invoked_directly_with_build_op_context(octoai: OctoAIResource) -> None:
    generate = octoai_generate_op("direct", {"engine": "sd", "steps": 2})
    with build_op_context(resources={"octoai": octoai}, op_config={"prompt": "a bird"}) as ctx:
        (output,) = list(generate(ctx))
    assert output.value.image_count == 1
    assert output.metadata["engine"].value == "sd"
