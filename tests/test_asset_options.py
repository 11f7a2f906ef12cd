"""The asset factory's Dagster options, and the errors and warnings a step reports.

- ``@asset`` arguments passed through (pool, retry policy, automation condition, code
  version, owners, kinds, op tags, backfill policy), ``code_version`` defaulting to a hash
  of the request template;
- a bad run config fails the step before anything is sent, naming every field with what
  is allowed, without pydantic's boilerplate, and the failure's metadata names the fields;
- a ``PromptTooLongWarning`` reaches the Dagster event log.
"""

# No `from __future__ import annotations`: Dagster reads the assets' annotations.

from typing import Any

import pytest
from _support import octoai
from dagster import (
    AssetExecutionContext,
    AssetKey,
    AutomationCondition,
    BackfillPolicy,
    DagsterEventType,
    DagsterInstance,
    RetryPolicy,
    StaticPartitionsDefinition,
    asset,
    materialize,
)
from dagster._utils.test.data_versions import get_stale_status_resolver

from dagster_octoai.assets import octoai_image_asset
from dagster_octoai.ops import octoai_generate_op
from dagster_octoai.resources import OctoAIResource

__all__ = ["octoai"]  # fixtures used by this module

LONG_PROMPT = " ".join(["a very detailed watercolour painting of a red fox"] * 12)


def test_asset_arguments_are_passed_through() -> None:
    retry = RetryPolicy(max_retries=2, delay=1)
    condition = AutomationCondition.on_cron("0 6 * * *")
    foxes = octoai_image_asset(
        "foxes",
        {"engine": "sd", "prompt": "a fox", "seed": 1},
        partitions_def=StaticPartitionsDefinition(["a", "b"]),
        pool="octoai-gpu",
        retry_policy=retry,
        automation_condition=condition,
        code_version="7",
        owners=["team:images", "ana@example.com"],
        kinds={"sd15"},
        op_tags={"team": "images"},
        backfill_policy=BackfillPolicy.multi_run(1),
    )
    spec = foxes.specs_by_key[AssetKey("foxes")]
    assert foxes.op.pool == "octoai-gpu"
    assert foxes.op.retry_policy == retry
    assert spec.automation_condition == condition
    assert spec.code_version == "7"
    assert list(spec.owners) == ["team:images", "ana@example.com"]
    assert spec.kinds == {"octoai", "sd15"}  # extended, not replaced
    assert foxes.op.tags["team"] == "images"
    assert foxes.backfill_policy == BackfillPolicy.multi_run(1)


def test_generation_steps_run_in_the_octoai_pool_by_default() -> None:
    fox = octoai_image_asset("fox", {"prompt": "a fox"})
    assert fox.op.pool == "octoai"
    assert octoai_generate_op("gen", {"prompt": "a fox"}).pool == "octoai"
    assert octoai_image_asset("free", {"prompt": "a fox"}, pool=None).op.pool is None


def test_code_version_is_a_hash_of_the_request_template() -> None:
    def version(request: dict[str, Any], **kwargs: Any) -> str | None:
        asset_def = octoai_image_asset("fox", request, **kwargs)
        return asset_def.specs_by_key[AssetKey("fox")].code_version

    base = version({"engine": "sdxl", "prompt": "a fox", "steps": 20})
    assert base is not None
    assert version({"engine": "sdxl", "prompt": "a fox", "steps": 20}) == base  # stable
    assert version({"engine": "sdxl", "prompt": "a fox", "steps": 21}) != base
    assert version({"engine": "sdxl", "steps": 20}, prompt_template="a {partition_key}") != (
        version({"engine": "sdxl", "steps": 20}, prompt_template="an old {partition_key}")
    )


def test_a_changed_template_is_flagged_stale(octoai: OctoAIResource) -> None:
    with DagsterInstance.ephemeral() as instance:
        first = octoai_image_asset("fox", {"engine": "sd", "prompt": "a fox", "seed": 1})
        assert materialize([first], resources={"octoai": octoai}, instance=instance).success
        changed = octoai_image_asset("fox", {"engine": "sd", "prompt": "a fox", "seed": 2})

        def status(asset_def: Any) -> str:
            # What the UI asks: is the last materialization stale for these definitions?
            resolver = get_stale_status_resolver(instance, [asset_def])
            return str(resolver.get_status(AssetKey("fox")).value)

        assert status(first) == "FRESH"
        assert status(changed) == "STALE"


def test_bad_run_config_fails_naming_every_field_before_anything_is_sent(
    octoai: OctoAIResource, octoai_server: Any
) -> None:
    pics = octoai_image_asset("pics", {"engine": "sd", "prompt": "a fox"})
    before = octoai_server.stats()["generation_requests"]
    bad = {"steps": 500, "sampler": "FAST", "width": 1024, "height": 1024, "cfg_scale": 0}
    result = materialize(
        [pics],
        resources={"octoai": octoai},
        run_config={"ops": {"pics": {"config": bad}}},
        raise_on_error=False,
    )
    assert not result.success
    assert octoai_server.stats()["generation_requests"] == before  # nothing was sent
    (failure,) = [e for e in result.all_events if e.event_type == DagsterEventType.STEP_FAILURE]
    error = failure.step_failure_data.user_failure_data
    assert error is not None
    description = error.description or ""
    assert description.startswith("invalid run config for asset 'pics': ")
    # Every problem at once, each with what is allowed; none of pydantic's boilerplate.
    assert "steps: 500 is out of range; allowed: 1..200" in description
    assert "sampler: 'FAST' is not a sampler; allowed: DDIM, DDPM," in description
    assert "cfg_scale: 0.0 is out of range; allowed: > 0 and <= 50" in description
    assert "width: 1024x1024 (width x height) is not supported by engine 'sd'" in description
    assert "[type=" not in description and "pydantic.dev" not in description
    fields = error.metadata["fields"].value
    assert sorted(fields) == ["cfg_scale", "sampler", "steps", "width"]
    assert error.metadata["errors"].value["steps"] == "500 is out of range; allowed: 1..200"


def test_op_run_config_errors_are_the_same(octoai: OctoAIResource) -> None:
    from dagster import job

    gen = octoai_generate_op("gen", {"engine": "sd"})

    @job(resource_defs={"octoai": octoai})
    def images() -> None:
        gen()

    result = images.execute_in_process(
        run_config={"ops": {"gen": {"config": {"steps": 0}}}}, raise_on_error=False
    )
    assert not result.success
    (failure,) = [e for e in result.all_events if e.event_type == DagsterEventType.STEP_FAILURE]
    error = failure.step_failure_data.user_failure_data
    assert error is not None
    assert sorted(error.metadata["fields"].value) == ["prompt", "steps"]
    assert "prompt: required (what to draw)" in (error.description or "")


def test_prompt_too_long_warning_reaches_the_event_log(
    octoai: OctoAIResource, instance: DagsterInstance
) -> None:
    fox = octoai_image_asset("fox", {"engine": "sdxl", "seed": 3}, prompt_template=LONG_PROMPT)

    @asset
    def own(context: AssetExecutionContext, octoai: OctoAIResource) -> None:
        with octoai.get_client(context) as client:
            client.generate({"engine": "sd", "prompt": LONG_PROMPT * 3, "seed": 3})

    result = materialize([fox, own], resources={"octoai": octoai}, instance=instance)
    assert result.success
    records = instance.all_logs(result.run_id)
    messages = {
        (r.step_key, r.user_message)
        for r in records
        if r.level >= 30 and "PromptTooLongWarning" in r.user_message
    }
    assert {step for step, _ in messages} == {"fox", "own"}
    assert any("over the 77-token limit of engine 'sdxl'" in m for _, m in messages)
    assert any("over the 231-token limit of engine 'sd'" in m for _, m in messages)


@pytest.fixture
def instance() -> Any:
    with DagsterInstance.ephemeral() as inst:
        yield inst


# ---- the async factories ----------------------------------------------------------------


def test_async_factories_take_the_same_options() -> None:
    from dagster_octoai.async_assets import (
        octoai_async_blocking_asset,
        octoai_async_results_asset,
        octoai_async_submit_asset,
    )

    results = octoai_async_results_asset(
        "herons", owners=["team:images"], kinds={"sdxl"}, checks="blocking"
    )
    submit = octoai_async_submit_asset(
        "heron_jobs",
        [{"prompt": "a heron", "seed": 1}],
        results_asset=results,
        op_tags={"team": "images"},
        backfill_policy=BackfillPolicy.single_run(),
    )
    blocking = octoai_async_blocking_asset(
        "heron_now", [{"prompt": "a heron", "seed": 1}], retry_policy=RetryPolicy(max_retries=1)
    )
    results_spec = results.specs_by_key[AssetKey("herons")]
    assert list(results_spec.owners) == ["team:images"]
    assert results_spec.kinds == {"octoai", "sdxl"}
    # The results and the blocking assets carry the built-in checks now.
    assert {c.name for c in results.check_specs} == {
        "no_images_removed_for_safety",
        "image_sizes_as_requested",
        "images_decode",
    }
    assert all(c.blocking for c in results.check_specs)
    assert len(list(blocking.check_specs)) == 3
    assert submit.op.tags["team"] == "images"
    assert submit.backfill_policy == BackfillPolicy.single_run()
    assert blocking.op.retry_policy == RetryPolicy(max_retries=1)
    # Only the blocking asset holds replicas while it runs: it alone is in the pool.
    assert (submit.op.pool, results.op.pool, blocking.op.pool) == (None, None, "octoai")
    # A fixed list of requests gives a code version; a changed list another.
    version = submit.specs_by_key[AssetKey("heron_jobs")].code_version
    changed = octoai_async_submit_asset(
        "heron_jobs", [{"prompt": "a heron", "seed": 2}], results_asset=results
    )
    assert version and version != changed.specs_by_key[AssetKey("heron_jobs")].code_version


def test_a_blocking_check_stops_the_downstream_asset() -> None:
    from _scripted_server import ok, scripted_server
    from dagster import AssetIn

    # The scripted server answers an 8x8 image to a 512x512 request: the size check fails.
    with scripted_server() as server:
        server.default = ok([5])
        resources = {"octoai": OctoAIResource(token="scripted", base_url=server.url)}

        def run(checks: Any) -> Any:
            shot = octoai_image_asset(
                "shot", {"engine": "sd", "prompt": "a mug", "seed": 5}, checks=checks
            )
            variant = octoai_image_asset(
                "variant",
                {"engine": "sd", "prompt": "a mug, watercolour", "seed": 6, "strength": 0.5},
                ins={"shot": AssetIn()},
                image_inputs={"init_image": "shot"},
                checks=False,
            )
            return materialize([shot, variant], resources=resources, raise_on_error=False)

        server.reset()
        server.default = ok([5])
        blocked = run("blocking")
        sent_when_blocked = len(server.requests)
        server.reset()
        server.default = ok([5])
        unblocked = run(True)
        sent_when_not = len(server.requests)
    failed = [e for e in blocked.get_asset_check_evaluations() if not e.passed]
    assert [e.check_name for e in failed] == ["image_sizes_as_requested"]
    assert blocked.asset_materializations_for_node("shot")
    # Blocking: the variant was never materialized, and never paid for.
    assert not blocked.asset_materializations_for_node("variant")
    assert sent_when_blocked == 1
    # Not blocking: the variant ran on the broken input.
    assert unblocked.asset_materializations_for_node("variant")
    assert sent_when_not == 2


def test_the_async_results_asset_runs_the_checks(octoai: OctoAIResource, tmp_path: Any) -> None:
    from dagster_octoai.async_assets import octoai_async_results_asset, octoai_async_submit_asset
    from dagster_octoai.io_managers import LocalImageIOManager
    from dagster_octoai.resources import JobLedgerResource

    results = octoai_async_results_asset("herons", io_manager_key="images", checks="blocking")
    submit = octoai_async_submit_asset(
        "heron_jobs", [{"engine": "sd", "prompt": "a heron", "seed": 3}], results_asset=results
    )
    resources = {
        "octoai": octoai,
        "octoai_ledger": JobLedgerResource(base_dir=str(tmp_path / "jobs")),
        "images": LocalImageIOManager(base_dir=str(tmp_path / "images")),
    }
    with DagsterInstance.ephemeral() as instance:
        assert materialize([submit], resources=resources, instance=instance).success
        ledger = resources["octoai_ledger"].get_ledger()
        (record,) = [ledger.get(ledger.job_id_of_marker(m)) for m in ledger.list_open()]
        assert record is not None and record.response_id is not None
        instance.add_dynamic_partitions("herons_jobs", [record.response_id])
        octoai.client.wait(record.async_job(), timeout=30)  # the local server is instant
        done = materialize(
            [results], partition_key=record.response_id, resources=resources, instance=instance
        )
    assert done.success
    evaluations = done.get_asset_check_evaluations()
    assert sorted(e.check_name for e in evaluations) == [
        "image_sizes_as_requested",
        "images_decode",
        "no_images_removed_for_safety",
    ]
    assert all(e.passed for e in evaluations)


def test_freshness_policy_reaches_every_factory_as_in_yaml() -> None:
    from datetime import timedelta

    from dagster import FreshnessPolicy

    from dagster_octoai.assets import octoai_image_batch_asset
    from dagster_octoai.async_assets import octoai_async_blocking_asset

    policy = FreshnessPolicy.time_window(fail_window=timedelta(hours=24))
    built = [
        octoai_image_asset("fox", {"prompt": "a fox"}, freshness_policy=policy),
        octoai_image_batch_asset(
            "foxes",
            {"prompt": "a fox"},
            lambda pk, i: [],
            io_manager_key="images",
            freshness_policy=policy,
        ),
        octoai_async_blocking_asset("late", [{"prompt": "a fox"}], freshness_policy=policy),
    ]
    for assets_def in built:
        (spec,) = assets_def.specs
        assert spec.freshness_policy == policy, assets_def.key
