"""``octoai_image_asset``: a configured generation asset from a request template.

One factory covers every generation mode of the API; the mode is the request:
text-to-image (``sdxl``, ``sd``), img2img (``init_image`` + ``strength``),
inpainting (``init_image`` + ``mask_image``), outpainting (``outpainting=True``),
photo merge (``transfer_images``) and ControlNet (``controlnet-sdxl`` /
``controlnet-sd15``, with the server's preprocessing or a local edge map).
Images and prompt parts can come from upstream assets; a partition per prompt makes
large batches restartable one partition at a time.
"""

# No `from __future__ import annotations`: Dagster reads the compute functions'
# annotations (the context type) at definition time.

import base64
import hashlib
import io
import os
import string
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypedDict, cast

from dagster import (
    AssetCheckResult,
    AssetExecutionContext,
    AssetIn,
    AssetKey,
    AssetsDefinition,
    AutomationCondition,
    BackfillPolicy,
    BetaWarning,
    CodeReferencesMetadataValue,
    Failure,
    LocalFileCodeReference,
    MultiPartitionKey,
    MultiPartitionsDefinition,
    Output,
    PartitionsDefinition,
    RetryPolicy,
    asset,
)
from dagster._core.definitions.metadata.source_code import CodeReference
from PIL import Image

from ._warnings import warnings_to_log
from .api.batch import ImageBatch, UnstorableValueError, images_of
from .api.edges import edge_map
from .api.errors import RequestValidationError
from .api.models import ImageGenerationRequest, ImageGenerationResponse, PromptTooLongWarning
from .checks import evaluate_image_checks, image_check_specs
from .config import ImageGenerationConfig
from .metadata import Usage, data_version_for, generation_metadata
from .resources import OctoAIResource

# dagster does not export its own alias of this.
CoercibleToAssetKey = AssetKey | str | Sequence[str]

__all__ = [
    "DEFAULT_POOL",
    "AssetOptions",
    "Checks",
    "PromptTemplate",
    "RequestSource",
    "asset_options",
    "code_reference_metadata",
    "octoai_image_asset",
]

#: The concurrency pool generation steps run in unless told otherwise. Its limit (set on
#: the Dagster instance) holds the endpoint's replica count across steps and runs.
DEFAULT_POOL = "octoai"
#: The built-in checks: off, on (a failure is reported), or blocking (a failure also
#: stops the assets downstream from being materialized in the same run).
Checks = bool | Literal["blocking"]

#: A prompt template: a ``str.format`` string or a function of (partition key, inputs).
PromptTemplate = str | Callable[[str | None, Mapping[str, Any]], str]
#: The requests of a streamed asset: a function of (partition key, inputs) returning
#: each request's fields over the template (dicts or ``ImageGenerationRequest``).
RequestSource = Callable[
    [str | None, Mapping[str, Any]], Iterable[Mapping[str, Any] | ImageGenerationRequest]
]

# Request fields that hold one image, and the prefix for photo-merge sample images.
_IMAGE_FIELDS = ("init_image", "mask_image", "controlnet_image")
_TRANSFER = "transfer_images."


def octoai_image_asset(
    name: str,
    request: ImageGenerationRequest | Mapping[str, Any],
    *,
    prompt_template: PromptTemplate | None = None,
    key_prefix: str | Sequence[str] | None = None,
    partitions_def: PartitionsDefinition | None = None,
    ins: Mapping[str, AssetIn] | None = None,
    image_inputs: Mapping[str, str] | None = None,
    local_edge_map: bool = False,
    deps: Sequence[CoercibleToAssetKey | AssetsDefinition] | None = None,
    resource_key: str = "octoai",
    io_manager_key: str | None = None,
    reuse_existing: bool | None = None,
    requests: RequestSource | None = None,
    checks: Checks = True,
    group_name: str | None = None,
    description: str | None = None,
    tags: Mapping[str, str] | None = None,
    metadata: Mapping[str, Any] | None = None,
    pool: str | None = DEFAULT_POOL,
    retry_policy: RetryPolicy | None = None,
    automation_condition: AutomationCondition[Any] | None = None,
    code_version: str | None = None,
    owners: Sequence[str] | None = None,
    kinds: Iterable[str] | None = None,
    op_tags: Mapping[str, Any] | None = None,
    backfill_policy: BackfillPolicy | None = None,
    code_references: Sequence[CodeReference] | None = None,
) -> AssetsDefinition:
    """An asset that generates images from a request template and outputs an ``ImageBatch``.

    Each materialization (each partition, when partitioned) sends one request: the
    template, then the run config (an :class:`~dagster_octoai.ImageGenerationConfig`
    the launchpad validates), then the prompt and images filled in at run time.

    With ``requests=``, a materialization sends many requests and **streams** them:
    every request is validated first, then the output is a lazy ``ImageBatch`` that is
    generated while the image IO manager stores it, so a batch of hundreds of images
    uses bounded memory. The usage metadata (``octoai/images``...) is recorded by the
    IO manager as it stores the batch; the built-in checks are tallied as the images
    pass and reported after the output is stored.

    Args:
        name: The asset's name.
        request: The request template: an ``ImageGenerationRequest`` or a dict with
            its keys (images may be left out when ``image_inputs`` provides them).
        prompt_template: Fills ``prompt`` at run time. A format string sees
            ``{partition_key}``, each dimension of a multi-partition key by name, and
            each non-image input by name (an input that is a mapping holding the
            partition key gives that entry); or a function ``(partition_key, inputs) -> str``.
        key_prefix: Prefix of the asset key.
        partitions_def: e.g. a static or dynamic partition per prompt.
        ins: Upstream assets loaded as inputs (for the prompt or the images).
        image_inputs: Request image field -> input name: ``init_image``,
            ``mask_image``, ``controlnet_image``, or ``transfer_images.<trigger word>``
            (every image of the input). An input may be images as stored by the image
            IO managers, an ``ImageBatch``, a ``PIL.Image``, bytes, a path or base64.
        local_edge_map: For ControlNet: replace the control image with a local edge
            map (:func:`~dagster_octoai.api.edges.edge_map`) and send
            ``controlnet_preprocess=False``.
        deps: Upstream assets this one depends on without loading them.
        resource_key: Key of the :class:`OctoAIResource`.
        io_manager_key: The IO manager storing the batch (e.g. an image IO manager).
        reuse_existing: Reuse an identical, already stored result instead of paying
            for it again (needs an IO manager with ``find_existing``). ``None``: on for
            requests whose seeds are all explicit (the only ones that can match).
            Not available with ``requests=`` (a streamed batch always generates).
        requests: Stream a large batch: a function ``(partition_key, inputs)``
            returning each request's fields over the template, run config and
            prompt (e.g. ``[{"prompt": f"frame {i}", "seed": i} for i in range(300)]``).
            Needs an image IO manager (``io_manager_key``); the output has no data
            version (the seeds are known only once stored).
        checks: Attach the built-in asset checks (no image removed for safety, sizes
            as requested, every image decodes), evaluated on each materialization.
            ``"blocking"``: a failed check (of ERROR severity) also keeps the assets
            downstream of this one from materializing in the same run.
        group_name: As for ``@asset``.
        description: As for ``@asset``.
        tags: As for ``@asset``.
        metadata: As for ``@asset``.
        pool: The Dagster concurrency pool the generation step runs in (default
            ``"octoai"``); a limit on the pool holds the endpoint's replica count across
            steps and runs. ``None``: no pool.
        retry_policy: Dagster's ``RetryPolicy`` for the step (the client's own retries of
            each HTTP call happen first).
        automation_condition: As for ``@asset``.
        code_version: As for ``@asset``. Default: a hash of the request template (and
            the prompt template), so a changed template is shown as stale.
        owners: As for ``@asset``.
        kinds: Kinds added to ``octoai`` (e.g. ``{"sdxl"}``).
        op_tags: Tags of the step, as for ``@asset``.
        backfill_policy: As for ``@asset``.
        code_references: The asset's code references (``dagster/code_references``).
            Default: the line that called this factory, so the UI's "view source" opens
            your definition, not this package.

    Returns:
        The asset definition.

    Raises:
        RequestValidationError: the template breaks a rule of the API (raised when
            the definitions load, naming the field).

    Examples:
        >>> from dagster import StaticPartitionsDefinition
        >>> foxes = octoai_image_asset(
        ...     "foxes",
        ...     {"engine": "sdxl", "steps": 20, "seed": 7},
        ...     prompt_template="a {partition_key} fox, watercolor",
        ...     partitions_def=StaticPartitionsDefinition(["red", "arctic"]),
        ... )
        >>> foxes.key.path
        ['foxes']
    """
    if requests is not None and reuse_existing:
        raise ValueError("reuse_existing: not available with requests= (a streamed batch)")
    if requests is not None and io_manager_key is None:
        raise ValueError(
            "io_manager_key: requests= streams the batch into an image IO manager "
            "(S3ImageIOManager or LocalImageIOManager); name its resource key"
        )
    image_map = dict(image_inputs or {})
    in_map = dict(ins or {})
    for field, input_name in image_map.items():
        if field not in _IMAGE_FIELDS and not field.startswith(_TRANSFER):
            allowed = ", ".join((*_IMAGE_FIELDS, "transfer_images.<trigger word>"))
            raise ValueError(f"image_inputs: {field!r} is not an image field; allowed: {allowed}")
        if input_name not in in_map:
            raise ValueError(f"image_inputs[{field!r}]: {input_name!r} is not one of ins")
    template = _template_dict(request)
    runtime: dict[str, Any] = {}
    if prompt_template is not None:
        runtime["prompt"] = _example_prompt(prompt_template)
    elif requests is not None:
        # Each streamed request may bring its own prompt.
        runtime["prompt"] = "prompt"
    for field in image_map:
        if field.startswith(_TRANSFER):
            runtime.setdefault("transfer_images", {})[field[len(_TRANSFER) :]] = [_PLACEHOLDER]
        else:
            runtime[field] = _PLACEHOLDER
    if local_edge_map:
        template["controlnet_preprocess"] = False
    # Fail at definition time, naming the field, when the template itself is wrong.
    validated = ImageGenerationRequest.build({**runtime, **template})
    config_cls: type[ImageGenerationConfig] = type(
        f"{name}_config",
        (ImageGenerationConfig,),
        {"template": template, "runtime_fields": runtime, "__module__": __name__},
    )
    resource_keys = {resource_key}
    if io_manager_key is not None:
        resource_keys.add(io_manager_key)
    check_specs = (
        image_check_specs(_asset_key(name, key_prefix), blocking=checks == "blocking")
        if checks
        else None
    )
    options = asset_options(
        pool=pool,
        retry_policy=retry_policy,
        automation_condition=automation_condition,
        # The fingerprint covers every field of the template and the prompt template's
        # text (it stands in for the prompt): change either and the asset shows stale.
        code_version=code_version or validated.fingerprint()[:16],
        owners=owners,
        kinds=kinds,
        op_tags=op_tags,
        backfill_policy=backfill_policy,
    )

    @asset(
        name=name,
        key_prefix=key_prefix,
        ins=in_map,
        deps=deps,
        partitions_def=partitions_def,
        config_schema=cast("Any", config_cls.to_config_schema()),
        required_resource_keys=resource_keys,
        io_manager_key=io_manager_key,
        check_specs=check_specs,
        group_name=group_name,
        description=description or _describe(template, prompt_template),
        tags=tags,
        metadata={
            **(metadata or {}),
            "octoai/engine": str(template.get("engine", "sdxl")),
            **code_reference_metadata(code_references),
        },
        **options.asset_arguments(),
    )
    def _generate(context: AssetExecutionContext, **inputs: Any) -> Iterator[Any]:
        # A PromptTooLongWarning (or any warning about the requests) goes to the event log.
        with warnings_to_log(context.log):
            yield from _run(context, **inputs)

    def _run(context: AssetExecutionContext, **inputs: Any) -> Iterator[Any]:
        try:
            config = config_cls.from_run_config(context.op_execution_context.op_config)
        except RequestValidationError as exc:
            raise _invalid(f"invalid run config for asset {name!r}: ", exc) from None
        # One request per partition: a run over a range (a single-run backfill) makes
        # each partition's request as a run of that partition alone would.
        partitions = _run_partitions(context)
        ranged = _is_range(context)

        def builder(partition_key: str | None) -> Callable[..., ImageGenerationRequest]:
            fill: dict[str, Any] = {}
            if prompt_template is not None:
                fill["prompt"] = _fill_prompt(prompt_template, partition_key, context, inputs)
            transfer: dict[str, list[Any]] = {}
            for field, input_name in image_map.items():
                value = inputs[input_name]
                if field.startswith(_TRANSFER):
                    transfer[field[len(_TRANSFER) :]] = _all_images(value, field)
                else:
                    fill[field] = _first_image(value, field, partition_key)
            if transfer:
                fill["transfer_images"] = {**(template.get("transfer_images") or {}), **transfer}
            label = f"partition {str(partition_key)!r}: " if ranged else ""

            def build(extra: Mapping[str, Any], where: str = "") -> ImageGenerationRequest:
                try:
                    req = config.to_request(template, **{**fill, **extra})
                    if local_edge_map and req.controlnet_image is not None:
                        # PNG, not the JPEG a PIL image would become: edges must stay crisp.
                        buf = io.BytesIO()
                        edge_map(req.controlnet_image, size=req.size).save(buf, format="PNG")
                        req = ImageGenerationRequest.build(
                            req, controlnet_image=buf.getvalue(), controlnet_preprocess=False
                        )
                except RequestValidationError as exc:
                    raise _invalid(f"asset {name!r}: {label}{where}", exc) from None
                return req

            return build

        builds = {key: builder(key) for key in partitions}
        octoai: OctoAIResource = getattr(context.resources, resource_key)
        if requests is not None:
            plans: dict[str | None, tuple[list[dict[str, Any]], Any, int]] = {}
            for key, build in builds.items():
                items = [_fields(item) for item in requests(key, inputs)]
                # Every request (of every partition) checked before anything is sent;
                # rebuilt as it is streamed, so only the small field overrides are held.
                expected = sum(
                    build(item, f"requests[{i}]: ").image_count for i, item in enumerate(items)
                )
                plans[key] = (items, build, expected)
            # stream() checks the image IO manager's store before anything is generated.
            yield from _stream(context, octoai, plans, bool(checks), ranged)
            return
        built = {key: build({}) for key, build in builds.items()}
        # Usage is recorded on every materialization, a reuse included (as zero images).
        # get_client checks the IO manager's store first: a wrong bucket or refused
        # credentials fail before an image is paid for.
        answers: dict[str | None, ImageGenerationResponse] = {}
        with octoai.get_client(context) as client:
            for key, req in built.items():
                result = _reuse(context, io_manager_key, reuse_existing, req, key)
                if result is None:
                    result = client.generate(req)
                else:
                    context.log.info(f"reused {result.reused_from}: no generation paid for")
                answers[key] = result
        if not ranged:
            batch = ImageBatch(list(answers.values()))
            yield Output(
                batch,
                data_version=data_version_for(batch),
                metadata=generation_metadata(batch),
            )
        else:
            for key, result in answers.items():
                # The session's usage covers the whole run; each partition gets its own.
                usage = Usage()
                if result.reused_from is None:
                    usage.add(result)
                context.add_asset_metadata(
                    {**generation_metadata([result]), **usage.to_metadata()},
                    partition_key=key,
                )
            yield Output(
                {str(key): ImageBatch([result]) for key, result in answers.items()},
                metadata={"partitions": len(answers)},
            )
        if checks:
            yield from evaluate_image_checks(context.asset_key, list(answers.values()))

    return _generate


class AssetArguments(TypedDict):
    """``AssetOptions`` as the keyword arguments of ``@asset`` (typed, for ``**``)."""

    pool: str | None
    retry_policy: RetryPolicy | None
    automation_condition: AutomationCondition[Any] | None
    code_version: str | None
    owners: Sequence[str] | None
    kinds: set[str]
    op_tags: Mapping[str, Any] | None
    backfill_policy: BackfillPolicy | None


@dataclass(frozen=True)
class AssetOptions:
    """The ``@asset`` arguments every factory of this package passes through.

    ``kinds`` always include ``octoai``. One place, so the image and async factories take
    the same options with the same meaning.

    Examples:
        >>> sorted(AssetOptions(kinds=frozenset({"octoai", "sdxl"})).kinds)
        ['octoai', 'sdxl']
    """

    pool: str | None = None
    retry_policy: RetryPolicy | None = None
    automation_condition: AutomationCondition[Any] | None = None
    code_version: str | None = None
    owners: Sequence[str] | None = None
    kinds: frozenset[str] = frozenset({"octoai"})
    op_tags: Mapping[str, Any] | None = None
    backfill_policy: BackfillPolicy | None = None

    def asset_arguments(self) -> AssetArguments:
        """These options as ``@asset`` keyword arguments (``kinds`` as the set it takes)."""
        return {
            "pool": self.pool,
            "retry_policy": self.retry_policy,
            "automation_condition": self.automation_condition,
            "code_version": self.code_version,
            "owners": self.owners,
            "kinds": set(self.kinds),
            "op_tags": self.op_tags,
            "backfill_policy": self.backfill_policy,
        }


def asset_options(
    *,
    pool: str | None,
    retry_policy: RetryPolicy | None,
    automation_condition: AutomationCondition[Any] | None,
    code_version: str | None,
    owners: Sequence[str] | None,
    kinds: Iterable[str] | None,
    op_tags: Mapping[str, Any] | None,
    backfill_policy: BackfillPolicy | None,
) -> AssetOptions:
    """The options of a factory call, ``kinds`` added to ``octoai``."""
    return AssetOptions(
        pool=pool,
        retry_policy=retry_policy,
        automation_condition=automation_condition,
        code_version=code_version,
        owners=owners,
        kinds=frozenset({"octoai", *(kinds or ())}),
        op_tags=op_tags,
        backfill_policy=backfill_policy,
    )


def code_reference_metadata(references: Sequence[CodeReference] | None) -> dict[str, Any]:
    """``dagster/code_references`` metadata: ``references``, or where the factory was called.

    A factory's compute function lives in this package; Dagster would point the asset's
    source at it. The first frame of the call stack outside this package and Dagster is
    the user's definition.
    """
    if references is None:
        found = _caller_reference()
        references = [found] if found is not None else []
    if not references:
        return {}
    with warnings.catch_warnings():
        # Dagster marks code references beta; the note is for Dagster's users, not ours.
        warnings.simplefilter("ignore", BetaWarning)
        value = CodeReferencesMetadataValue(code_references=list(references))
    return {"dagster/code_references": value}


def _caller_reference() -> LocalFileCodeReference | None:
    frame = sys._getframe(1)
    while frame is not None:
        package = str(frame.f_globals.get("__name__", "")).split(".", 1)[0]
        if package != "dagster_octoai" and not package.startswith("dagster"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", BetaWarning)
                return LocalFileCodeReference(
                    file_path=os.path.abspath(frame.f_code.co_filename),
                    line_number=frame.f_lineno,
                )
        frame = frame.f_back  # type: ignore[assignment]
    return None


def requests_code_version(requests: Iterable[Any] | Callable[..., Any]) -> str | None:
    """A code version for a fixed list of requests: a hash of their fingerprints.

    ``None`` for requests made at run time (a function), or a list with a bad request
    (reported, naming it, when the asset runs).

    Examples:
        >>> requests_code_version([{"prompt": "a fox", "seed": 1}]) == requests_code_version(
        ...     [{"prompt": "a fox", "seed": 1}])
        True
        >>> requests_code_version(lambda context: []) is None
        True
    """
    if callable(requests):
        return None
    digest = hashlib.sha256()
    with warnings.catch_warnings():
        # A prompt too long is said in the event log when the asset runs, not at import.
        warnings.simplefilter("ignore", PromptTooLongWarning)
        try:
            for item in requests:
                digest.update(ImageGenerationRequest.build(item).fingerprint().encode())
        except RequestValidationError:
            return None
    return digest.hexdigest()[:16]


def _stream(
    context: AssetExecutionContext,
    octoai: OctoAIResource,
    plans: Mapping[str | None, tuple[list[dict[str, Any]], Any, int]],
    checks: bool,
    ranged: bool,
) -> Iterator[Any]:
    """Yield lazy batches that the IO manager generates as it stores, then the checks.

    One batch for the run's partition, or one per partition of a range (a mapping of
    partition key to batch, each stored under its own partition).
    """
    tally = _CheckTally(context.asset_key)
    batches: dict[str | None, ImageBatch] = {}
    for key, (items, build, expected) in plans.items():
        streamed = octoai.stream(context, (build(i) for i in items), expected_images=expected)

        def observed(streamed: ImageBatch = streamed) -> Iterator[ImageGenerationResponse]:
            for result in streamed:
                if checks:
                    tally.add(result)
                yield result

        batches[key] = ImageBatch(
            observed(), expected_images=expected, late_metadata=streamed.late_metadata
        )
    total = sum(expected for _, _, expected in plans.values())
    if ranged:
        yield Output(
            {str(key): batch for key, batch in batches.items()},
            metadata={"streamed": True, "expected_images": total, "partitions": len(batches)},
        )
    else:
        (batch,) = batches.values()
        yield Output(batch, metadata={"streamed": True, "expected_images": total})
    # Dagster resumes here once the IO manager has stored (and so generated) the batch.
    if checks:
        yield from tally.results()


class _CheckTally:
    """The built-in checks over a streamed batch, one result at a time, in bounded memory."""

    def __init__(self, asset_key: AssetKey) -> None:
        self._key = asset_key
        self._passed: dict[str, bool] = {}
        self._severity: dict[str, Any] = {}
        self._metadata: dict[str, dict[str, Any]] = {}

    def add(self, result: ImageGenerationResponse) -> None:
        for check in evaluate_image_checks(self._key, [result]):
            name = str(check.check_name)
            self._passed[name] = self._passed.get(name, True) and check.passed
            self._severity[name] = check.severity
            merged = self._metadata.setdefault(name, {})
            for key, value in check.metadata.items():
                raw = getattr(value, "value", value)
                if isinstance(raw, list):
                    merged[key] = (merged.get(key, []) + raw)[:_CHECK_LIST_MAX]
                elif isinstance(raw, int):
                    merged[key] = merged.get(key, 0) + raw

    def results(self) -> Iterator[AssetCheckResult]:
        for name, passed in self._passed.items():
            yield AssetCheckResult(
                asset_key=self._key,
                check_name=name,
                passed=passed,
                severity=self._severity[name],
                metadata=self._metadata[name],
            )


# The built-in checks list at most this many problems (as checks.py does).
_CHECK_LIST_MAX = 20


def _invalid(where: str, exc: RequestValidationError) -> Failure:
    """The step's failure for a bad request or run config: every field, and what is allowed."""
    return Failure(
        description=f"{where}{exc.message}",
        metadata={
            "fields": [e["field"] for e in exc.errors],
            "errors": {e["field"]: e["message"] for e in exc.errors},
        },
    )


def _fields(item: Mapping[str, Any] | ImageGenerationRequest) -> dict[str, Any]:
    if isinstance(item, ImageGenerationRequest):
        return item.model_dump(exclude_none=True)
    return dict(item)


def _asset_key(name: str, key_prefix: str | Sequence[str] | None) -> AssetKey:
    prefix = [key_prefix] if isinstance(key_prefix, str) else list(key_prefix or [])
    return AssetKey([*prefix, name])


def _template_dict(request: ImageGenerationRequest | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(request, ImageGenerationRequest):
        return request.model_dump(exclude_none=True)
    return dict(request)


def _describe(template: Mapping[str, Any], prompt_template: PromptTemplate | None) -> str:
    engine = template.get("engine", "sdxl")
    prompt = prompt_template if isinstance(prompt_template, str) else template.get("prompt", "")
    return f"OctoAI {engine} images: {prompt}".strip()


def _is_range(context: AssetExecutionContext) -> bool:
    """Whether this run materializes several partitions at once (a single-run backfill)."""
    return (
        not context.has_partition_key
        and context.has_partition_key_range
        and len(context.partition_keys) > 1
    )


def _run_partitions(context: AssetExecutionContext) -> list[str | None]:
    """The partitions this run materializes: ``[None]`` unpartitioned, else each key in order."""
    if context.has_partition_key:
        return [context.partition_key]
    if not context.has_partition_key_range:
        return [None]
    keys: list[str | None] = list(context.partition_keys)
    partitions_def = context.assets_def.partitions_def
    if isinstance(partitions_def, MultiPartitionsDefinition):
        keys = [partitions_def.get_partition_key_from_str(str(k)) for k in keys]
    return keys


def _fill_prompt(
    template: PromptTemplate,
    partition_key: str | None,
    context: AssetExecutionContext,
    inputs: Mapping[str, Any],
) -> str:
    if not isinstance(template, str):
        return template(partition_key, inputs)
    values: dict[str, Any] = {"partition_key": partition_key}
    if isinstance(partition_key, MultiPartitionKey):
        values.update(partition_key.keys_by_dimension)
    for input_name, value in inputs.items():
        if isinstance(value, Mapping) and partition_key in value:
            value = value[partition_key]
        values[input_name] = value
    try:
        return template.format(**values)
    except (KeyError, IndexError) as exc:
        raise Failure(
            description=f"prompt_template {template!r} names {exc} which is not "
            f"available; available: {', '.join(sorted(values))}"
        ) from None


def _example_prompt(template: PromptTemplate) -> str:
    """A prompt to validate the template with before run time: the template's own text."""
    if not isinstance(template, str):
        return "prompt"
    fields = [f for _, f, _, _ in string.Formatter().parse(template) if f]
    text = template
    for f in fields:
        text = text.replace("{" + f + "}", f)
    return text.strip() or "prompt"


def _tiny_png() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


# Stands in for an image that arrives from an upstream asset at run time, so the
# rest of the template can be validated when the definitions load.
_PLACEHOLDER = _tiny_png()


def _images_of(value: Any, partition_key: str | None = None) -> list[Any]:
    """Every image in an input value, in order, as something ``to_base64`` takes.

    Generated or stored images (answers, batches, what the image IO managers load, maps
    by partition) give their bytes; anything else (a ``PIL.Image``, bytes, a path) is
    one image as it is.
    """
    try:
        return [im.data for im in images_of(value, partition_key) if im.available]
    except UnstorableValueError:
        pass
    if isinstance(value, Mapping):
        if partition_key is not None and partition_key in value:
            return _images_of(value[partition_key])
        return [im for v in value.values() for im in _images_of(v)]
    if isinstance(value, list | tuple):
        return [im for v in value for im in _images_of(v)]
    return [value]


def _first_image(value: Any, field: str, partition_key: str | None) -> Any:
    images = _images_of(value, partition_key)
    if not images:
        raise Failure(description=f"{field}: the upstream input holds no usable image")
    return images[0]


def _all_images(value: Any, field: str) -> list[Any]:
    images = _images_of(value)
    if not images:
        raise Failure(description=f"{field}: the upstream input holds no usable image")
    return images


def _reuse(
    context: AssetExecutionContext,
    io_manager_key: str | None,
    reuse_existing: bool | None,
    request: ImageGenerationRequest,
    partition_key: str | None,
) -> ImageGenerationResponse | None:
    explicit = request.explicit_seeds is not None
    if reuse_existing is False or not explicit or io_manager_key is None:
        return None
    io_manager = getattr(context.resources, io_manager_key)
    find: Callable[..., ImageGenerationResponse | None] | None = getattr(
        io_manager, "find_existing", None
    )
    if find is None:
        if reuse_existing:
            context.log.warning(
                f"reuse_existing: IO manager {io_manager_key!r} cannot find stored results"
            )
        return None
    return find(request, context.asset_key, partition_key)
