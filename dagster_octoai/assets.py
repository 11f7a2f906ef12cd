"""``octoai_image_asset`` and ``octoai_image_batch_asset``: generation assets from a request template.

One factory covers every generation mode of the API; the mode is the request:
text-to-image (``sdxl``, ``sd``), img2img (``init_image`` + ``strength``),
inpainting (``init_image`` + ``mask_image``), outpainting (``outpainting=True``),
photo merge (``transfer_images``) and ControlNet (``controlnet-sdxl`` /
``controlnet-sd15``, with the server's preprocessing or a local edge map).
Images and prompt parts can come from upstream assets; a partition per prompt makes
large batches restartable one partition at a time.

As dagster-sling's ``sling_assets``: a pure builder (:func:`image_asset_plan`) turns the
template into the asset's specs, checks and run-config schema when the definitions
load; each factory is a short function over it; the options passed through to
``@asset`` are one :class:`AssetOptions`, written once for every factory of the package.
"""

# No `from __future__ import annotations`: Dagster reads the compute functions'
# annotations (the context type) at definition time.

import base64
import collections
import hashlib
import io
import os
import string
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypedDict, cast

from dagster import (
    AssetCheckSpec,
    AssetExecutionContext,
    AssetIn,
    AssetKey,
    AssetsDefinition,
    AutomationCondition,
    BackfillPolicy,
    BetaWarning,
    CodeReferencesMetadataValue,
    Failure,
    FreshnessPolicy,
    LocalFileCodeReference,
    MultiPartitionKey,
    MultiPartitionsDefinition,
    Output,
    PartitionsDefinition,
    RetryPolicy,
    UrlCodeReference,
    asset,
)
from PIL import Image
from typing_extensions import Unpack

from ._warnings import warnings_to_log
from .api.batch import ImageBatch, UnstorableValueError, images_of
from .api.edges import edge_map
from .api.errors import RequestValidationError
from .api.models import (
    IMAGE_FIELDS,
    ImageGenerationRequest,
    ImageGenerationResponse,
    PromptTooLongWarning,
)
from .checks import ImageCheckTally, evaluate_image_checks, image_check_specs
from .config import ImageGenerationConfig
from .metadata import Usage, data_version_for, generation_metadata
from .resources import OctoAIResource

# dagster does not export its own alias of this.
CoercibleToAssetKey = AssetKey | str | Sequence[str]
#: A code reference as ``dagster/code_references`` holds it.
CodeReference = LocalFileCodeReference | UrlCodeReference

__all__ = [
    "DEFAULT_POOL",
    "AssetOptions",
    "Checks",
    "ImageAssetPlan",
    "PromptTemplate",
    "RequestSource",
    "asset_arguments",
    "code_reference_metadata",
    "image_asset_plan",
    "octoai_image_asset",
    "octoai_image_batch_asset",
]

#: The concurrency pool generation steps run in unless told otherwise. Its limit (set on
#: the Dagster instance) holds the endpoint's replica count across steps and runs.
DEFAULT_POOL = "octoai"
#: The built-in checks: off, on (a failure is reported), or blocking (a failure also
#: stops the assets downstream from being materialized in the same run).
Checks = bool | Literal["blocking"]

#: A prompt template: a ``str.format`` string or a function of (partition key, inputs).
PromptTemplate = str | Callable[[str | None, Mapping[str, Any]], str]
#: The requests of a batch asset: a function of (partition key, inputs) returning
#: each request's fields over the template (dicts or ``ImageGenerationRequest``).
RequestSource = Callable[
    [str | None, Mapping[str, Any]], Iterable[Mapping[str, Any] | ImageGenerationRequest]
]

# The prefix for photo-merge sample images in ``image_inputs``.
_TRANSFER = "transfer_images."


class AssetOptions(TypedDict, total=False):
    """The ``@asset`` options every factory of this package passes through, as for ``@asset``.

    Written once: each factory takes them as keyword arguments (``**options``), so the
    image, batch and async factories take the same options with the same meaning.

    - ``group_name``, ``description``, ``tags``, ``metadata``, ``owners``,
      ``automation_condition``, ``freshness_policy``, ``backfill_policy``, ``op_tags``:
      as for ``@asset``.
    - ``pool``: the Dagster concurrency pool of the step (each factory says its default;
      ``None``: no pool).
    - ``retry_policy``: Dagster's ``RetryPolicy`` for the step (the client's own retries
      of each HTTP call happen first).
    - ``code_version``: default a hash of the request template or the fixed requests, so
      a changed template shows as stale.
    - ``kinds``: added to ``octoai`` (e.g. ``{"sdxl"}``).
    - ``code_references``: the asset's ``dagster/code_references``; default the line that
      called the factory, so the UI's "view source" opens your definition.

    Examples:
        >>> options = AssetOptions(group_name="images", kinds={"sdxl"})
        >>> sorted(asset_arguments(options, description="foxes")["kinds"])
        ['octoai', 'sdxl']
    """

    group_name: str | None
    description: str | None
    tags: Mapping[str, str] | None
    metadata: Mapping[str, Any] | None
    pool: str | None
    retry_policy: RetryPolicy | None
    automation_condition: AutomationCondition[Any] | None
    freshness_policy: FreshnessPolicy | None
    code_version: str | None
    owners: Sequence[str] | None
    kinds: Iterable[str] | None
    op_tags: Mapping[str, Any] | None
    backfill_policy: BackfillPolicy | None
    code_references: Sequence[CodeReference] | None


def asset_arguments(
    options: AssetOptions,
    *,
    description: str,
    code_version: str | None = None,
    pool: str | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """``options`` as ``@asset`` keyword arguments, over a factory's own defaults.

    ``description``, ``code_version`` and ``pool`` are the factory's defaults (an option
    given, ``None`` included for ``pool``, wins); ``metadata`` is the factory's own, under
    the user's; ``kinds`` always include ``octoai``.

    Raises:
        TypeError: an option that is not one of :class:`AssetOptions`.
    """
    unknown = sorted(set(options) - set(AssetOptions.__annotations__))
    if unknown:
        hint = " (a batch: octoai_image_batch_asset)" if "requests" in unknown else ""
        raise TypeError(
            f"{', '.join(unknown)}: not an option of this factory{hint}; the @asset options "
            f"are {', '.join(AssetOptions.__annotations__)}"
        )
    return {
        "group_name": options.get("group_name"),
        "description": options.get("description") or description,
        "tags": options.get("tags"),
        "metadata": {
            **(metadata or {}),
            **(options.get("metadata") or {}),
            **code_reference_metadata(options.get("code_references")),
        },
        "pool": options.get("pool", pool),
        "retry_policy": options.get("retry_policy"),
        "automation_condition": options.get("automation_condition"),
        "freshness_policy": options.get("freshness_policy"),
        "code_version": options.get("code_version") or code_version,
        "owners": options.get("owners"),
        "kinds": {"octoai", *(options.get("kinds") or ())},
        "op_tags": options.get("op_tags"),
        "backfill_policy": options.get("backfill_policy"),
    }


def asset_with(**arguments: Any) -> Callable[[Callable[..., Any]], AssetsDefinition]:
    """``@asset`` with arguments assembled by :func:`asset_arguments` (typed as ``@asset``)."""
    return cast("Callable[[Callable[..., Any]], AssetsDefinition]", asset(**arguments))


@dataclass(frozen=True)
class ImageAssetPlan:
    """What the builder makes of a request template: the asset's key, specs, checks and config.

    Pure: built once when the definitions load, it sends nothing. At run time it makes
    each partition's request once (:meth:`request`), from the template, the run config,
    the prompt and the images of the upstream inputs.
    """

    name: str
    key: AssetKey
    template: dict[str, Any]
    config_cls: type[ImageGenerationConfig]
    check_specs: list[AssetCheckSpec] | None
    code_version: str
    description: str
    prompt_template: PromptTemplate | None = None
    image_map: Mapping[str, str] = field(default_factory=dict)
    local_edge_map: bool = False

    @property
    def checks(self) -> bool:
        """Whether the built-in checks are attached."""
        return bool(self.check_specs)

    def arguments(self, options: AssetOptions, *, pool: str | None) -> dict[str, Any]:
        """The ``@asset`` arguments of this plan, with the user's ``options``."""
        return {
            "name": self.name,
            "key_prefix": self.key.path[:-1] or None,
            "config_schema": cast("Any", self.config_cls.to_config_schema()),
            "check_specs": self.check_specs,
            **asset_arguments(
                options,
                description=self.description,
                code_version=self.code_version,
                pool=pool,
                metadata={"octoai/engine": str(self.template.get("engine", "sdxl"))},
            ),
        }

    def run_config(self, context: AssetExecutionContext) -> ImageGenerationConfig:
        """The step's run config, every bad field in one failure."""
        try:
            return self.config_cls.from_run_config(context.op_execution_context.op_config)
        except RequestValidationError as exc:
            raise _invalid(f"invalid run config for asset {self.name!r}: ", exc) from None

    def fill(
        self, context: AssetExecutionContext, partition_key: str | None, inputs: Mapping[str, Any]
    ) -> dict[str, Any]:
        """The fields of one partition that arrive at run time: prompt and upstream images."""
        fill: dict[str, Any] = {}
        if self.prompt_template is not None:
            fill["prompt"] = _fill_prompt(self.prompt_template, partition_key, context, inputs)
        transfer: dict[str, list[Any]] = {}
        for name, input_name in self.image_map.items():
            value = inputs[input_name]
            if name.startswith(_TRANSFER):
                transfer[name[len(_TRANSFER) :]] = _all_images(value, name)
            else:
                fill[name] = _first_image(value, name, partition_key)
        if transfer:
            fill["transfer_images"] = {**(self.template.get("transfer_images") or {}), **transfer}
        return fill

    def request(
        self,
        config: ImageGenerationConfig,
        fill: Mapping[str, Any],
        extra: Mapping[str, Any] | None = None,
        where: str = "",
    ) -> ImageGenerationRequest:
        """One request: template, then run config, then ``fill``, then ``extra``; built once.

        Raises:
            Failure: the request breaks a rule of the API; names every field (and ``where``).
        """
        try:
            req = config.to_request(self.template, **{**fill, **(extra or {})})
        except RequestValidationError as exc:
            raise _invalid(f"asset {self.name!r}: {where}", exc) from None
        if self.local_edge_map and req.controlnet_image is not None:
            # PNG, not the JPEG a PIL image would become: edges must stay crisp. The edge
            # map is a valid image of the request's size: a copy, not a second validation.
            buf = io.BytesIO()
            edge_map(req.controlnet_image, size=req.size).save(buf, format="PNG")
            edges = base64.b64encode(buf.getvalue()).decode("ascii")
            req = req.model_copy(update={"controlnet_image": edges, "controlnet_preprocess": False})
        return req


def image_asset_plan(
    name: str,
    request: ImageGenerationRequest | Mapping[str, Any],
    *,
    prompt_template: PromptTemplate | None = None,
    key_prefix: str | Sequence[str] | None = None,
    ins: Mapping[str, AssetIn] | None = None,
    image_inputs: Mapping[str, str] | None = None,
    local_edge_map: bool = False,
    checks: Checks = True,
    batch: bool = False,
) -> ImageAssetPlan:
    """The plan of an image asset: the template validated, its config, key and checks.

    Args:
        name: The asset's name.
        request: The request template.
        prompt_template: Fills ``prompt`` at run time. A format string sees
            ``{partition_key}``, each dimension of a multi-partition key by name, and
            each non-image input by name (an input that is a mapping holding the
            partition key gives that entry); or a function ``(partition_key, inputs) -> str``.
        key_prefix: Prefix of the asset key.
        ins: Upstream assets loaded as inputs (for the prompt or the images).
        image_inputs: Request image field -> input name: ``init_image``,
            ``mask_image``, ``controlnet_image``, or ``transfer_images.<trigger word>``
            (every image of the input). An input may be images as stored by the image
            IO managers, an ``ImageBatch``, a ``PIL.Image``, bytes, a path or base64.
        local_edge_map: For ControlNet: replace the control image with a local edge
            map (:func:`~dagster_octoai.api.edges.edge_map`) and send
            ``controlnet_preprocess=False``.
        checks: Attach the built-in asset checks (no image removed for safety, sizes
            as requested, every image decodes), evaluated on each materialization.
            ``"blocking"``: a failed check (of ERROR severity) also keeps the assets
            downstream of this one from materializing in the same run.
        batch: Each request of a batch may bring its own prompt.

    Raises:
        RequestValidationError: the template breaks a rule of the API, naming the field.
        ValueError: ``image_inputs`` names a field that holds no image, or no input.

    Examples:
        >>> plan = image_asset_plan("fox", {"prompt": "a fox", "seed": 7}, key_prefix="zoo")
        >>> plan.key.to_user_string(), [s.name for s in plan.check_specs][:1]
        ('zoo/fox', ['no_images_removed_for_safety'])
    """
    image_map = _image_map(image_inputs, ins)
    template = _template_dict(request)
    runtime = _runtime_fields(prompt_template, image_map, batch=batch)
    if local_edge_map:
        template["controlnet_preprocess"] = False
    # Fail at definition time, naming the field, when the template itself is wrong.
    validated = ImageGenerationRequest.build({**runtime, **template})
    key = _asset_key(name, key_prefix)
    return ImageAssetPlan(
        name=name,
        key=key,
        template=template,
        config_cls=type(
            f"{name}_config",
            (ImageGenerationConfig,),
            {"template": template, "runtime_fields": runtime, "__module__": __name__},
        ),
        check_specs=image_check_specs(key, blocking=checks == "blocking") if checks else None,
        # The fingerprint covers every field of the template and the prompt template's
        # text (it stands in for the prompt): change either and the asset shows stale.
        code_version=validated.fingerprint()[:16],
        description=_describe(template, prompt_template),
        prompt_template=prompt_template,
        image_map=image_map,
        local_edge_map=local_edge_map,
    )


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
    checks: Checks = True,
    **options: Unpack[AssetOptions],
) -> AssetsDefinition:
    """An asset that generates images from a request template and outputs an ``ImageBatch``.

    Each materialization (each partition, when partitioned) sends one request: the
    template, then the run config (an :class:`~dagster_octoai.ImageGenerationConfig`
    the launchpad validates), then the prompt and images filled in at run time. A run
    over a partition range sends one request per partition, each as a run of that
    partition alone would. Many requests per materialization, streamed: see
    :func:`octoai_image_batch_asset`. ``prompt_template``, ``key_prefix``, ``ins``,
    ``image_inputs``, ``local_edge_map`` and ``checks`` are the template's run-time parts
    and the built-in checks, as for :func:`image_asset_plan`.

    Args:
        name: The asset's name.
        request: The request template: an ``ImageGenerationRequest`` or a dict with
            its keys (images may be left out when ``image_inputs`` provides them).
        partitions_def: e.g. a static or dynamic partition per prompt.
        deps: Upstream assets this one depends on without loading them.
        resource_key: Key of the :class:`OctoAIResource`.
        io_manager_key: The IO manager storing the batch (e.g. an image IO manager).
        reuse_existing: Reuse an identical, already stored result instead of paying
            for it again (needs an IO manager with ``find_existing``). ``None``: on for
            requests whose seeds are all explicit (the only ones that can match).
        **options: The ``@asset`` options (:class:`AssetOptions`); ``pool`` defaults to
            ``"octoai"`` (a limit on the pool holds the endpoint's replica count across
            steps and runs), ``code_version`` to a hash of the request template (and the
            prompt template), ``code_references`` to the line that called this factory.

    Raises:
        RequestValidationError: the template breaks a rule of the API (raised when
            the definitions load, naming the field).
        TypeError: an option that is not one of :class:`AssetOptions` (``requests=``:
            use :func:`octoai_image_batch_asset`).

    Examples:
        >>> from dagster import StaticPartitionsDefinition
        >>> foxes = octoai_image_asset("foxes", {"engine": "sdxl", "steps": 20, "seed": 7},
        ...     prompt_template="a {partition_key} fox, watercolor",
        ...     partitions_def=StaticPartitionsDefinition(["red", "arctic"]))
        >>> foxes.key.path
        ['foxes']
    """
    plan = image_asset_plan(
        name, request, prompt_template=prompt_template, key_prefix=key_prefix, ins=ins,
        image_inputs=image_inputs, local_edge_map=local_edge_map, checks=checks,
    )  # fmt: skip

    @asset_with(
        ins=dict(ins or {}),
        deps=deps,
        partitions_def=partitions_def,
        required_resource_keys={resource_key, *([io_manager_key] if io_manager_key else [])},
        io_manager_key=io_manager_key,
        **plan.arguments(options, pool=DEFAULT_POOL),
    )
    def _generate(context: AssetExecutionContext, **inputs: Any) -> Iterator[Any]:
        # A PromptTooLongWarning (or any warning about the request) goes to the event log.
        with warnings_to_log(context.log):
            octoai: OctoAIResource = getattr(context.resources, resource_key)
            finder = _finder(context, io_manager_key, reuse_existing)
            yield from _generate_each(context, plan, inputs, octoai, finder)

    return _generate


def octoai_image_batch_asset(
    name: str,
    request: ImageGenerationRequest | Mapping[str, Any],
    requests: RequestSource,
    *,
    io_manager_key: str,
    prompt_template: PromptTemplate | None = None,
    key_prefix: str | Sequence[str] | None = None,
    partitions_def: PartitionsDefinition | None = None,
    ins: Mapping[str, AssetIn] | None = None,
    image_inputs: Mapping[str, str] | None = None,
    local_edge_map: bool = False,
    deps: Sequence[CoercibleToAssetKey | AssetsDefinition] | None = None,
    resource_key: str = "octoai",
    reuse_existing: bool | None = None,
    checks: Checks = True,
    **options: Unpack[AssetOptions],
) -> AssetsDefinition:
    """An asset that generates a large batch per materialization, streamed into the IO manager.

    ``requests(partition_key, inputs)`` gives each request's fields over the template,
    run config and prompt (e.g. ``[{"prompt": f"frame {i}", "seed": i} for i in
    range(300)]``). Every request is validated first, naming the bad one; then the
    output is a lazy ``ImageBatch`` generated while the image IO manager stores it, so
    a batch of hundreds of images uses bounded memory. The usage metadata
    (``octoai/images``...) is recorded by the IO manager as it stores the batch; the
    built-in checks are tallied as the images pass and reported once it is stored. The
    output has no data version (the seeds are known only once stored).

    A request whose seeds are all explicit and whose answer the output already holds
    (a re-run of the same partition) is reused, not paid for again (``reuse_existing``:
    ``None`` or ``True``; ``False`` always generates). Only the output being replaced is
    looked at, once per partition.

    The other arguments are those of :func:`octoai_image_asset`; ``io_manager_key``
    (an :class:`~dagster_octoai.S3ImageIOManager` or
    :class:`~dagster_octoai.LocalImageIOManager`) is required.

    Examples:
        >>> frames = octoai_image_batch_asset(
        ...     "frames",
        ...     {"engine": "sdxl", "steps": 20},
        ...     lambda partition_key, inputs: [
        ...         {"prompt": f"frame {i}", "seed": i} for i in range(3)
        ...     ],
        ...     io_manager_key="images",
        ... )
        >>> frames.key.path
        ['frames']
    """
    plan = image_asset_plan(
        name, request, prompt_template=prompt_template, key_prefix=key_prefix, ins=ins,
        image_inputs=image_inputs, local_edge_map=local_edge_map, checks=checks, batch=True,
    )  # fmt: skip

    @asset_with(
        ins=dict(ins or {}),
        deps=deps,
        partitions_def=partitions_def,
        required_resource_keys={resource_key, io_manager_key},
        io_manager_key=io_manager_key,
        **plan.arguments(options, pool=DEFAULT_POOL),
    )
    def _batch(context: AssetExecutionContext, **inputs: Any) -> Iterator[Any]:
        with warnings_to_log(context.log):
            octoai: OctoAIResource = getattr(context.resources, resource_key)
            finder = _batch_finder(context, io_manager_key, reuse_existing)
            yield from _stream_each(context, plan, inputs, requests, octoai, finder)

    return _batch


def _generate_each(
    context: AssetExecutionContext,
    plan: ImageAssetPlan,
    inputs: Mapping[str, Any],
    octoai: OctoAIResource,
    finder: "_Finder",
) -> Iterator[Any]:
    """One request per partition of the run, reused or generated, then the output and checks."""
    config = plan.run_config(context)
    ranged = _is_range(context)
    built: dict[str | None, ImageGenerationRequest] = {}
    for key in _run_partitions(context):
        where = f"partition {str(key)!r}: " if ranged else ""
        built[key] = plan.request(config, plan.fill(context, key, inputs), where=where)
    # Usage is recorded on every materialization, a reuse included (as zero images).
    # get_client checks the IO manager's store first: a wrong bucket or refused
    # credentials fail before an image is paid for.
    answers: dict[str | None, ImageGenerationResponse] = {}
    with octoai.get_client(context) as client:
        for key, req in built.items():
            result = finder(req, key)
            if result is None:
                result = client.generate(req)
            else:
                context.log.info(f"reused {result.reused_from}: no generation paid for")
            answers[key] = result
    if not ranged:
        batch = ImageBatch(list(answers.values()))
        yield Output(
            batch, data_version=data_version_for(batch), metadata=generation_metadata(batch)
        )
    else:
        for key, result in answers.items():
            # The session's usage covers the whole run; each partition gets its own.
            usage = Usage()
            if result.reused_from is None:
                usage.add(result)
            context.add_asset_metadata(
                {**generation_metadata([result]), **usage.to_metadata()}, partition_key=key
            )
        yield Output(
            {str(key): ImageBatch([result]) for key, result in answers.items()},
            metadata={"partitions": len(answers)},
        )
    if plan.checks:
        yield from evaluate_image_checks(context.asset_key, list(answers.values()))


def _stream_each(
    context: AssetExecutionContext,
    plan: ImageAssetPlan,
    inputs: Mapping[str, Any],
    requests: RequestSource,
    octoai: OctoAIResource,
    finder: "_Finder",
) -> Iterator[Any]:
    """Lazy batches the IO manager generates as it stores them, then the checks.

    One batch for the run's partition, or one per partition of a range (a mapping of
    partition key to batch, each stored under its own partition). Every request (of every
    partition) is checked before anything is sent; each is rebuilt as it is streamed, so
    only the small field overrides are held, not the requests and their images.
    """
    config = plan.run_config(context)
    ranged = _is_range(context)
    tally = ImageCheckTally(context.asset_key)
    batches: dict[str | None, ImageBatch] = {}
    total = 0
    for key in _run_partitions(context):
        fill = plan.fill(context, key, inputs)
        label = f"partition {str(key)!r}: " if ranged else ""
        items = [_fields(item) for item in requests(key, inputs)]
        expected = sum(
            plan.request(config, fill, item, f"{label}requests[{i}]: ").image_count
            for i, item in enumerate(items)
        )
        total += expected
        pending = (plan.request(config, fill, item) for item in items)
        answers = _reuse_or_stream(context, octoai, pending, finder, key, expected)
        batches[key] = ImageBatch(
            _observed(answers, tally if plan.checks else None),
            expected_images=expected,
            late_metadata=answers.late_metadata,
        )
    # stream() checked the image IO manager's store before anything is generated.
    if ranged:
        yield Output(
            {str(key): batch for key, batch in batches.items()},
            metadata={"streamed": True, "expected_images": total, "partitions": len(batches)},
        )
    else:
        (batch,) = batches.values()
        yield Output(batch, metadata={"streamed": True, "expected_images": total})
    # Dagster resumes here once the IO manager has stored (and so generated) the batch.
    if plan.checks:
        yield from tally.results()


def _reuse_or_stream(
    context: AssetExecutionContext,
    octoai: OctoAIResource,
    pending: Iterator[ImageGenerationRequest],
    finder: "_Finder",
    partition_key: str | None,
    expected: int,
) -> ImageBatch:
    """A lazy batch of every answer: stored ones reused, the others streamed from the service.

    Reused answers are found as the stream pulls its requests and yielded between the
    generated ones, so neither is held for long.
    """
    reused: collections.deque[ImageGenerationResponse] = collections.deque()

    def to_generate() -> Iterator[ImageGenerationRequest]:
        for req in pending:
            found = finder(req, partition_key)
            if found is None:
                yield req
            else:
                reused.append(found)

    streamed = octoai.stream(context, to_generate(), expected_images=expected)

    def answers() -> Iterator[ImageGenerationResponse]:
        for result in streamed:
            while reused:
                yield reused.popleft()
            yield result
        while reused:
            yield reused.popleft()
        count = finder.reused
        if count:
            context.log.info(f"reused {count} stored answer(s): no generation paid for them")

    return ImageBatch(answers(), expected_images=expected, late_metadata=streamed.late_metadata)


def _observed(
    answers: Iterable[ImageGenerationResponse], tally: ImageCheckTally | None
) -> Iterator[ImageGenerationResponse]:
    for result in answers:
        if tally is not None:
            tally.add(result)
        yield result


class _Finder:
    """Finds a stored answer to reuse for a request with explicit seeds, or ``None``."""

    reused = 0

    def __call__(
        self, request: ImageGenerationRequest, partition_key: str | None
    ) -> ImageGenerationResponse | None:
        return None


class _IOManagerFinder(_Finder):
    def __init__(self, context: AssetExecutionContext, find: Callable[..., Any]) -> None:
        self._key = context.asset_key
        self._find = find

    def __call__(
        self, request: ImageGenerationRequest, partition_key: str | None
    ) -> ImageGenerationResponse | None:
        if request.explicit_seeds is None:
            return None
        found: ImageGenerationResponse | None = self._find(request, self._key, partition_key)
        if found is not None:
            self.reused += 1
        return found


def _finder(
    context: AssetExecutionContext, io_manager_key: str | None, reuse_existing: bool | None
) -> _Finder:
    """The IO manager's ``find_existing``, when reuse is on and it has one."""
    if reuse_existing is False or io_manager_key is None:
        return _Finder()
    find = getattr(getattr(context.resources, io_manager_key), "find_existing", None)
    if find is None:
        if reuse_existing:
            context.log.warning(
                f"reuse_existing: IO manager {io_manager_key!r} cannot find stored results"
            )
        return _Finder()
    return _IOManagerFinder(context, find)


def _batch_finder(
    context: AssetExecutionContext, io_manager_key: str, reuse_existing: bool | None
) -> _Finder:
    """For a batch: the answers of the output being replaced, its manifest read once."""
    if reuse_existing is False:
        return _Finder()
    io_manager = getattr(context.resources, io_manager_key)
    existing = getattr(io_manager, "existing_answers", None)
    if existing is None:
        if reuse_existing:
            context.log.warning(
                f"reuse_existing: IO manager {io_manager_key!r} cannot find stored results"
            )
        return _Finder()
    outputs: dict[str | None, Callable[..., Any]] = {}

    def find(
        request: ImageGenerationRequest, asset_key: AssetKey, partition_key: str | None
    ) -> ImageGenerationResponse | None:
        if partition_key not in outputs:
            outputs[partition_key] = existing(asset_key, partition_key)
        found: ImageGenerationResponse | None = outputs[partition_key](request)
        return found

    return _IOManagerFinder(context, find)


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


def _image_map(
    image_inputs: Mapping[str, str] | None, ins: Mapping[str, AssetIn] | None
) -> dict[str, str]:
    """``image_inputs`` checked: each names an image field and one of ``ins``."""
    image_map = dict(image_inputs or {})
    for name, input_name in image_map.items():
        if name not in IMAGE_FIELDS and not name.startswith(_TRANSFER):
            allowed = ", ".join((*IMAGE_FIELDS, "transfer_images.<trigger word>"))
            raise ValueError(f"image_inputs: {name!r} is not an image field; allowed: {allowed}")
        if input_name not in (ins or {}):
            raise ValueError(f"image_inputs[{name!r}]: {input_name!r} is not one of ins")
    return image_map


def _runtime_fields(
    prompt_template: PromptTemplate | None, image_map: Mapping[str, str], *, batch: bool
) -> dict[str, Any]:
    """Stand-ins for the fields that arrive at run time, to validate the rest at load time."""
    runtime: dict[str, Any] = {}
    if prompt_template is not None:
        runtime["prompt"] = _example_prompt(prompt_template)
    elif batch:
        # Each request of a batch may bring its own prompt.
        runtime["prompt"] = "prompt"
    for name in image_map:
        if name.startswith(_TRANSFER):
            runtime.setdefault("transfer_images", {})[name[len(_TRANSFER) :]] = [_PLACEHOLDER]
        else:
            runtime[name] = _PLACEHOLDER
    return runtime


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
