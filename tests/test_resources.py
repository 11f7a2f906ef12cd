"""OctoAIResource against the local server: per-output usage, lifecycle, secrets, 429 handling."""

# No `from __future__ import annotations`: Dagster reads the assets' annotations.

import json
from collections.abc import Iterator
from typing import Any

import pytest
from _support import ephemeral_instance, octoai
from dagster import (
    AssetExecutionContext,
    AssetOut,
    DagsterEventType,
    DagsterInstance,
    EnvVar,
    MaterializeResult,
    Output,
    RetryRequested,
    asset,
    build_asset_context,
    build_init_resource_context,
    materialize,
    multi_asset,
)

from dagster_octoai.api.client import OctoAIClient
from dagster_octoai.api.errors import RateLimitError
from dagster_octoai.resources import OctoAIResource, OctoAISession

__all__ = ["ephemeral_instance", "octoai"]  # fixtures used by this module

SECRET = "tok-RECOGNISABLE-5f3a9c"


def _metadata(result: Any, key: str) -> dict[str, Any]:
    (mat,) = result.asset_materializations_for_node(key)
    return {k: v.value for k, v in mat.metadata.items()}


def test_two_assets_in_one_run_get_their_own_usage(octoai: OctoAIResource) -> None:
    @asset
    def few(context: AssetExecutionContext, octoai: OctoAIResource) -> None:
        with octoai.get_client(context) as client:
            client.generate({"prompt": "a", "engine": "sd", "num_images": 2, "steps": 10})

    @asset(deps=[few])
    def many(context: AssetExecutionContext, octoai: OctoAIResource) -> None:
        with octoai.get_client(context) as client:
            client.generate_many(
                [
                    {"prompt": "b", "engine": "sd", "steps": 20, "sampler": "HEUN"},
                    {"prompt": "c", "engine": "sd", "steps": 20, "num_images": 3},
                ]
            )

    result = materialize([few, many], resources={"octoai": octoai})
    assert result.success
    a, b = _metadata(result, "few"), _metadata(result, "many")
    assert (a["octoai/calls"], a["octoai/generated_images"], a["octoai/steps"]) == (1, 2, 20)
    assert a["octoai/premium_images"] == 0
    assert len(a["octoai/request_ids"]) == 1
    assert (b["octoai/calls"], b["octoai/generated_images"], b["octoai/steps"]) == (2, 4, 80)
    assert b["octoai/premium_images"] == 1
    assert len(b["octoai/request_ids"]) == 2
    assert not set(a["octoai/request_ids"]) & set(b["octoai/request_ids"])


def test_multi_asset_outputs_each_get_their_own_usage(octoai: OctoAIResource) -> None:
    @multi_asset(outs={"left": AssetOut(), "right": AssetOut()})
    def pair(context: AssetExecutionContext, octoai: OctoAIResource) -> Iterator[Output[int]]:
        with octoai.get_client(context, asset_key="left") as client:
            client.generate({"prompt": "l", "engine": "sd", "steps": 5})
        with octoai.get_client(context, asset_key="right") as client:
            client.generate({"prompt": "r", "engine": "sd", "steps": 7, "num_images": 2})
        yield Output(1, output_name="left")
        yield Output(2, output_name="right")

    result = materialize([pair], resources={"octoai": octoai})
    assert result.success
    mats = {
        e.asset_key.path[-1]: e.materialization.metadata
        for e in result.get_asset_materialization_events()
    }
    assert (
        mats["left"]["octoai/generated_images"].value == 1
        and mats["left"]["octoai/steps"].value == 5
    )
    assert (
        mats["right"]["octoai/generated_images"].value == 2
        and mats["right"]["octoai/steps"].value == 14
    )


def test_get_client_shares_one_pooled_client_and_never_rewraps_it(
    octoai: OctoAIResource,
) -> None:
    octoai.setup_for_execution(build_init_resource_context())
    try:
        shared = octoai.client
        ctx = build_asset_context()
        sessions = []
        for _ in range(3):
            with octoai.get_client(ctx) as session:
                sessions.append(session)
                session.generate({"prompt": "x", "engine": "sd", "steps": 2})
        assert octoai.client is shared
        # No instance attribute shadows the class's methods: nothing was wrapped.
        assert "generate" not in vars(shared)
        assert type(shared).generate is OctoAIClient.generate
        assert [s.usage.images for s in sessions] == [1, 1, 1]
        assert all(isinstance(s, OctoAISession) for s in sessions)
    finally:
        octoai.teardown_after_execution(build_init_resource_context())
    assert shared._http.is_closed  # closed by teardown
    assert octoai._client is None


def test_token_never_in_event_log_metadata_or_ui_config(
    octoai_server: Any, monkeypatch: pytest.MonkeyPatch, instance: DagsterInstance
) -> None:
    # A wrong, recognisable token: the run fails with a 401, the worst case for leaks.
    monkeypatch.setenv("OCTOAI_TOKEN", SECRET)
    resource = OctoAIResource(token=EnvVar("OCTOAI_TOKEN"), base_url=octoai_server.url)
    assert SECRET not in repr(resource)

    @asset
    def leaky(context: AssetExecutionContext, octoai: OctoAIResource) -> MaterializeResult:
        with octoai.get_client(context) as client:
            context.log.info(f"using {client!r} and {octoai!r}")
            client.generate({"prompt": "x", "engine": "sd", "steps": 2})
        return MaterializeResult()

    result = materialize(
        [leaky], resources={"octoai": resource}, instance=instance, raise_on_error=False
    )
    assert not result.success
    records = instance.all_logs(result.run_id)
    dumped = "\n".join(
        json.dumps(r.to_dict(), default=str) if hasattr(r, "to_dict") else repr(r) for r in records
    )
    assert "401" in dumped or "Invalid bearer token" in dumped
    assert SECRET not in dumped
    run = instance.get_run_by_id(result.run_id)
    assert run is not None and SECRET not in json.dumps(run.run_config, default=str)
    # What the UI shows of the resource's config: the env var's name, not its value.
    field = OctoAIResource.to_config_schema().as_field()
    assert field.config_type.fields["token"].is_secret  # type: ignore[attr-defined]


def _one_request_per_window(
    octoai_server_factory: Any, monkeypatch: pytest.MonkeyPatch, window_s: float
) -> tuple[Any, OctoAIResource]:
    """A server of the test's own that allows one request per ``window_s``, and its resource."""
    octoai_server = octoai_server_factory(rate_limit_requests=1, rate_limit_window_s=window_s)
    monkeypatch.setenv("OCTOAI_TOKEN", octoai_server.token)
    # The client gives up at once on a Retry-After: quota exhaustion, not a blip.
    resource = OctoAIResource(
        token=EnvVar("OCTOAI_TOKEN"), base_url=octoai_server.url, max_retry_after_s=0.0
    )
    return octoai_server, resource


def test_quota_exhausted_becomes_retry_requested_with_servers_wait(
    octoai_server_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, resource = _one_request_per_window(octoai_server_factory, monkeypatch, window_s=30.0)
    try:
        resource.setup_for_execution(build_init_resource_context())
        ctx = build_asset_context()
        with pytest.raises(RetryRequested) as caught, resource.get_client(ctx) as client:
            client.generate({"prompt": "first", "engine": "sd", "steps": 2})
            client.generate({"prompt": "second", "engine": "sd", "steps": 2})
        cause = caught.value.__cause__
        assert isinstance(cause, RateLimitError) and cause.retry_after is not None
        assert 1 <= cause.retry_after <= 30
        assert caught.value.seconds_to_wait == cause.retry_after
        assert caught.value.max_retries == resource.rate_limit_step_retries
    finally:
        resource.teardown_after_execution(build_init_resource_context())


def test_retry_requested_makes_dagster_retry_the_step(
    octoai_server_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    octoai_server, resource = _one_request_per_window(
        octoai_server_factory, monkeypatch, window_s=5.0
    )

    @asset
    def first(context: AssetExecutionContext, octoai: OctoAIResource) -> None:
        with octoai.get_client(context) as client:
            client.generate({"prompt": "uses up the quota", "engine": "sd", "steps": 2})

    # Runs right after `first`, inside the 5 s window: 429, then a step retry.
    @asset(deps=[first])
    def throttled(context: AssetExecutionContext, octoai: OctoAIResource) -> None:
        with octoai.get_client(context) as client:
            client.generate({"prompt": "later", "engine": "sd", "steps": 2})

    result = materialize([first, throttled], resources={"octoai": resource})
    assert result.success
    retries = [e for e in result.all_events if e.event_type == DagsterEventType.STEP_UP_FOR_RETRY]
    assert [e.step_key for e in retries] == ["throttled"]
    wait = retries[0].event_specific_data.seconds_to_wait
    assert 1 <= wait <= 5  # the server's Retry-After, whole seconds
    assert octoai_server.stats()["rate_limited"] == 1


# ---- streaming a large batch ------------------------------------------------------------


def _images_io(tmp_path: Any) -> Any:
    from dagster_octoai.io_managers import LocalImageIOManager

    return LocalImageIOManager(base_dir=str(tmp_path / "images"), prefix="s")


def test_stream_generates_while_stored_and_the_io_manager_records_usage(
    octoai_server: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dagster_octoai.api.batch import ImageBatch
    from dagster_octoai.api.models import ImageGenerationResponse

    monkeypatch.setenv("OCTOAI_TOKEN", octoai_server.token or "any-token")
    octoai = OctoAIResource(
        token=EnvVar("OCTOAI_TOKEN"), base_url=octoai_server.url, max_concurrency=4
    )
    count = 24
    pulled: list[int] = []
    pulled_at_first_result: list[int] = []

    def requests() -> Iterator[dict[str, Any]]:
        for i in range(count):
            pulled.append(i)
            yield {"engine": "sd", "prompt": f"frame {i}", "seed": 500 + i, "steps": 2}

    @asset(io_manager_key="images")
    def frames(context: AssetExecutionContext, octoai: OctoAIResource) -> ImageBatch:
        streamed = octoai.stream(context, requests(), expected_images=count)
        assert pulled == []  # nothing is sent before the IO manager iterates the batch

        def watched() -> Iterator[ImageGenerationResponse]:
            for result in streamed:
                if not pulled_at_first_result:
                    pulled_at_first_result.append(len(pulled))
                yield result

        return ImageBatch(watched(), late_metadata=streamed.late_metadata)

    images = _images_io(tmp_path)
    before = octoai_server.stats()["paid_generations"]
    result = materialize([frames], resources={"octoai": octoai, "images": images})
    assert result.success
    # Requests were pulled as slots freed: the first answer was stored after 4, not all.
    assert pulled_at_first_result == [4]
    meta = _metadata(result, "frames")
    assert meta["octoai/generated_images"] == count and meta["octoai/calls"] == count
    assert meta["octoai/steps"] == 2 * count
    assert meta["images"] == count
    assert octoai_server.stats()["paid_generations"] - before == count
    stored = images.store.read(["frames"], None)
    assert sorted(im.seed for im in stored) == list(range(500, 500 + count))


def test_get_client_inside_a_lazy_batch_no_longer_fails_the_stored_output(
    octoai: OctoAIResource, tmp_path: Any, instance: DagsterInstance
) -> None:
    from dagster_octoai.api.batch import ImageBatch
    from dagster_octoai.api.models import ImageGenerationResponse

    @asset(io_manager_key="images")
    def lazy(context: AssetExecutionContext, octoai: OctoAIResource) -> ImageBatch:
        def results() -> Iterator[ImageGenerationResponse]:
            with octoai.get_client(context) as client:
                for _, answer in client.iter_generate(
                    [{"engine": "sd", "prompt": f"x {i}", "seed": i, "steps": 2} for i in range(3)]
                ):
                    yield answer

        return ImageBatch(results())

    images = _images_io(tmp_path)
    result = materialize([lazy], resources={"octoai": octoai, "images": images}, instance=instance)
    assert result.success
    assert len(images.store.read(["lazy"], None)) == 3
    warnings = [
        e.user_message
        for e in instance.all_logs(result.run_id)
        if e.level == 30 and "could not be added" in e.user_message
    ]
    assert len(warnings) == 1 and "octoai.stream(context, requests)" in warnings[0]


def test_the_retry_policy_is_nested_once_and_the_flat_fields_still_work(
    octoai_server: Any,
) -> None:
    from dagster import asset, materialize

    from dagster_octoai.resources import HTTPRetryConfig, JobLedgerResource

    # From run config, as a user's YAML would set it: one policy, HTTPRetryPolicy's rules.
    seen: list[Any] = []

    @asset
    def policy(octoai: OctoAIResource) -> None:
        seen.append(octoai.retry_policy())

    run_config = {
        "resources": {
            "octoai": {"config": {"token": "t", "retry": {"max_attempts": 2, "deadline_s": None}}}
        }
    }
    result = materialize(
        [policy], resources={"octoai": OctoAIResource.configure_at_launch()}, run_config=run_config
    )
    assert result.success
    assert (seen[0].max_attempts, seen[0].deadline_s) == (2, None)
    # The flat spelling of before keeps working, judged by the same rules (deadline_s > 0
    # used to be unchecked flat).
    assert OctoAIResource(token="t", max_attempts=1).retry_policy().max_attempts == 1
    with pytest.raises(ValueError, match=r"deadline_s: Input should be greater than 0"):
        OctoAIResource(token="t", deadline_s=0)
    with pytest.raises(ValueError, match=r"max_attempts set both flat and in retry"):
        OctoAIResource(token="t", max_attempts=2, retry=HTTPRetryConfig(max_attempts=3))
    # One S3 connection configuration: the ledger takes the IO manager's fields and rules.
    with pytest.raises(ValueError, match=r"retry_mode: 'eager' is not allowed"):
        JobLedgerResource(bucket="ledger", retry_mode="eager")
