"""Dagster Components: image generation assets, and the resources they need, in YAML.

Registered with ``dg`` through the ``dagster_dg_cli.registry_modules`` entry point (this
module), so ``dg list components`` shows them and
``dg scaffold defs dagster_octoai.components.OctoAIImageAssetComponent images/foxes``
writes a ``defs.yaml`` that loads and materializes as it is:

- :class:`OctoAIImageAssetComponent`: one generation asset, built by
  :func:`~dagster_octoai.octoai_image_asset`. Its ``request`` block is an
  :class:`~dagster_octoai.ImageGenerationRequest` template, judged by the same model as
  the client, the launchpad and the server, every bad field at once and pointed at its
  line in the YAML. The standard attributes work as for Dagster's own components: the
  asset's under ``asset:`` (key, group, partitions, owners, kinds, tags, metadata,
  automation condition, code version, deps), the step's under ``op:`` (pool, tags,
  backfill policy), plus ``retry_policy`` and ``checks`` (``true``, ``false`` or
  ``blocking``).
- :class:`OctoAIResourceComponent`: an :class:`~dagster_octoai.OctoAIResource`; the token
  is always read from an environment variable (``OCTOAI_TOKEN``), never written in YAML.
- :class:`S3ImageIOManagerComponent`, :class:`LocalImageIOManagerComponent`: the image IO
  managers; S3 credentials come from boto3's default chain.

Resource components with the same configuration share one resource object, so several
``defs.yaml`` files (each scaffolded with its own resources) can bind the same key.
"""

from __future__ import annotations

import copy
import json
import textwrap
from collections.abc import Callable, Mapping, Sequence
from functools import cached_property
from typing import Annotated, Any, Literal, TypeVar

from dagster import (
    AssetIn,
    AssetKey,
    AssetsDefinition,
    Backoff,
    ComponentLoadContext,
    DefaultSensorStatus,
    Definitions,
    EnvVar,
    Jitter,
    RetryPolicy,
)
from dagster.components import (
    Component,
    ComponentTypeSpec,
    Model,
    ResolutionContext,
    Resolvable,
    ResolvedAssetSpec,
    Resolver,
    Scaffolder,
    ScaffoldRequest,
    scaffold_with,
)
from dagster.components.resolved.core_models import OpSpec
from dagster.components.resolved.errors import ResolutionException
from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, create_model
from pydantic.fields import FieldInfo

from .api.errors import RequestValidationError
from .api.models import IMAGE_FIELDS, ImageGenerationRequest
from .assets import DEFAULT_POOL, AssetOptions, Checks, octoai_image_asset, octoai_image_batch_asset
from .async_assets import octoai_async_results_asset, octoai_async_submit_asset
from .io_managers import LocalImageIOManager, S3ImageIOManager
from .resources import HTTPRetryConfig, JobLedgerResource, OctoAIResource
from .sensors import octoai_async_sensor

__all__ = [
    "JobLedgerResourceComponent",
    "LocalImageIOManagerComponent",
    "OctoAIAsyncImagesComponent",
    "OctoAIImageAssetComponent",
    "OctoAIResourceComponent",
    "S3ImageIOManagerComponent",
]


# ---- the request block ----------------------------------------------------------------


def _inline_refs(schema: dict[str, Any]) -> dict[str, Any]:
    """The JSON schema with its ``$defs`` inlined, so it can be nested in another schema."""
    defs = schema.pop("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return walk(copy.deepcopy(defs[ref.removeprefix("#/$defs/")]))
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    inlined: dict[str, Any] = walk(schema)
    return inlined


def _request_template_schema() -> dict[str, Any]:
    schema = _inline_refs(ImageGenerationRequest.model_json_schema())
    # The prompt may come from prompt_template, and images from upstream assets.
    schema.pop("required", None)
    schema["title"] = "ImageGenerationRequest template"
    schema["description"] = (
        "Fields of an OctoAI image generation request (engine, size, steps, seed, ...), "
        "checked by ImageGenerationRequest when the definitions load."
    )
    return schema


#: How a request template reads in YAML: a mapping of ``ImageGenerationRequest`` fields.
#: The schema is the request model's own (for editors and ``dg``); the rules are judged by
#: the model itself when the component loads, so the messages are the client's.
RequestTemplate = Annotated[dict[str, Any], WithJsonSchema(_request_template_schema())]


def _resolve_request(context: ResolutionContext, value: Any) -> dict[str, Any]:
    resolved = context.resolve_value(value)
    if not isinstance(resolved, Mapping):
        raise ResolutionException(
            _located(context, "must be a mapping of ImageGenerationRequest fields", [])
        )
    return dict(resolved)


def _resolve_requests(context: ResolutionContext, value: Any) -> list[dict[str, Any]] | None:
    if value is None:
        return None
    return [_resolve_request(context.at_path(i), v) for i, v in enumerate(value)]


class RetryPolicyModel(Model):
    """Dagster's ``RetryPolicy`` for the step, in YAML."""

    max_retries: int = Field(default=1, ge=0, description="Retries of the step after a failure.")
    delay: float | None = Field(default=None, ge=0, description="Seconds before a retry.")
    backoff: Literal["linear", "exponential"] | None = Field(
        default=None, description="How the delay grows from retry to retry."
    )
    jitter: Literal["full", "plus_minus"] | None = Field(
        default=None, description="Random change to the delay."
    )


def _resolve_retry_policy(context: ResolutionContext, value: Any) -> RetryPolicy | None:
    if value is None:
        return None
    model = value if isinstance(value, RetryPolicyModel) else RetryPolicyModel(**value)
    raw = context.resolve_value(model.model_dump())
    return RetryPolicy(
        max_retries=raw["max_retries"],
        delay=raw["delay"],
        backoff=Backoff(raw["backoff"].upper()) if raw["backoff"] else None,
        jitter=Jitter(raw["jitter"].upper()) if raw["jitter"] else None,
    )


# ---- the asset ------------------------------------------------------------------------


class OctoAIImageAssetScaffolder(Scaffolder[Any]):
    """Writes a ``defs.yaml`` that works as it is: the asset, its OctoAI resource and a
    local image store, against ``OCTOAI_BASE_URL`` (or the local server) and ``OCTOAI_TOKEN``."""

    def scaffold(self, request: ScaffoldRequest[Any]) -> None:
        """Write ``defs.yaml`` (three documents) into the component's folder."""
        folder = request.target_path
        folder.mkdir(parents=True, exist_ok=True)
        module = request.type_name.rsplit(".", 1)[0]
        name = folder.name.replace("-", "_")
        (folder / "defs.yaml").write_text(_SCAFFOLD.format(module=module, name=name).lstrip())


_SCAFFOLD = textwrap.dedent(
    """
    # One image asset, generated by an OctoAI-compatible server: OCTOAI_BASE_URL, or the
    # local server (`dagster-octoai serve`, http://127.0.0.1:8000); the token is read from
    # OCTOAI_TOKEN. `request` takes the fields of an ImageGenerationRequest, checked by the
    # same model as the client's when the definitions load.
    type: {module}.OctoAIImageAssetComponent
    attributes:
      asset:
        key: {name}
        group_name: images
        kinds: [sdxl]
        partitions_def:
          type: static
          partition_keys: [red, arctic]
      request:
        engine: sdxl
        width: 640
        height: 1536
        steps: 20
        seed: 7
        image_encoding: jpeg
      prompt_template: "a {{partition_key}} fox in the snow, watercolour"
      io_manager_key: octoai_images
      op:
        # Generation steps share this concurrency pool; set its limit on the instance
        # (dagster.yaml: concurrency: pools: ...) to the endpoint's replica count.
        pool: octoai
    ---
    type: {module}.OctoAIResourceComponent
    attributes:
      max_concurrency: 4
    ---
    type: {module}.LocalImageIOManagerComponent
    attributes:
      resource_key: octoai_images
      base_dir: "{{{{ context.project_root }}}}/generated-images"
    """
)


@scaffold_with(OctoAIImageAssetScaffolder)
class OctoAIImageAssetComponent(Component, Resolvable, Model):
    """An image generation asset from a request template, defined in YAML.

    Built by :func:`~dagster_octoai.octoai_image_asset`: each materialization (each
    partition) sends one request, or a streamed batch with ``requests``; the images go
    to the IO manager at ``io_manager_key``; the built-in checks run on each
    materialization. The request template is judged by ``ImageGenerationRequest`` when
    the component loads: every bad field is reported at once, pointing at its line.

    Examples:
        .. code-block:: yaml

            type: dagster_octoai.components.OctoAIImageAssetComponent
            attributes:
              asset:
                key: marketing/hero
                owners: [team:marketing]
                partitions_def: {type: static, partition_keys: [mug, lamp]}
              request: {engine: sdxl, steps: 20, seed: 7}
              prompt_template: "a {partition_key} on a walnut table, product photo"
              io_manager_key: images
              checks: blocking
              op: {pool: octoai}
    """

    asset: ResolvedAssetSpec = Field(
        description=(
            "The asset: key, group_name, description, partitions_def, owners, kinds "
            "(added to octoai), tags, metadata, automation_condition, code_version "
            "(default: a hash of the request template), deps."
        )
    )
    request: Annotated[
        dict[str, Any],
        Resolver(
            _resolve_request,
            model_field_type=RequestTemplate,
            description="The request template: ImageGenerationRequest fields.",
            examples=[{"engine": "sdxl", "width": 640, "height": 1536, "steps": 20, "seed": 7}],
        ),
    ] = Field(default_factory=dict)
    prompt_template: str | None = Field(
        default=None,
        description=(
            "Fills `prompt` at run time: a str.format string that sees {partition_key}, "
            "each dimension of a multi-partition key, and each input by name."
        ),
    )
    ins: dict[str, str] = Field(
        default_factory=dict,
        description="Upstream assets loaded as inputs: input name -> asset key ('a/b').",
    )
    image_inputs: dict[str, str] = Field(
        default_factory=dict,
        description=(
            f"Request image field -> input name: {', '.join(IMAGE_FIELDS)}, "
            "or transfer_images.<trigger word>."
        ),
    )
    local_edge_map: bool = Field(
        default=False,
        description="ControlNet: send a local edge map of the control image (no preprocessing).",
    )
    reuse_existing: bool | None = Field(
        default=None,
        description=(
            "Reuse an identical stored result instead of paying again; unset: on for "
            "requests whose seeds are all explicit."
        ),
    )
    requests: Annotated[
        list[dict[str, Any]] | None,
        Resolver(
            _resolve_requests,
            model_field_type=list[RequestTemplate] | None,
            description=(
                "Stream a batch: each entry's fields over the template (needs an image IO "
                "manager at io_manager_key)."
            ),
        ),
    ] = None
    checks: Checks = Field(
        default=True,
        description=(
            "The built-in checks (no image removed for safety, sizes as requested, images "
            "decode): true, false, or blocking (a failure stops the assets downstream)."
        ),
    )
    op: OpSpec | None = Field(
        default=None,
        description=(
            "The step: pool (default octoai), tags, backfill_policy. Its name is the asset's."
        ),
    )
    retry_policy: Annotated[
        RetryPolicy | None,
        Resolver(
            _resolve_retry_policy,
            model_field_type=RetryPolicyModel | None,
            description="Dagster's retry policy for the step.",
        ),
    ] = None
    resource_key: str = Field(default="octoai", description="Key of the OctoAIResource.")
    io_manager_key: str | None = Field(
        default=None, description="Key of the IO manager storing the images."
    )

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")

    @classmethod
    def get_spec(cls) -> ComponentTypeSpec:
        """What ``dg list components`` shows."""
        return ComponentTypeSpec(
            description=(
                "An image generation asset (OctoAI API) from a request template, with the "
                "built-in image checks; images stored by an image IO manager."
            ),
            tags=["octoai", "image-generation"],
            produces=["asset", "asset_check"],
        )

    @classmethod
    def resolve_from_model(cls, context: ResolutionContext, model: BaseModel) -> Any:
        """The component, its asset built now, so a bad template fails naming its YAML lines."""
        component = super().resolve_from_model(context, model)
        try:
            _ = component.assets_def
        except RequestValidationError as exc:
            lines = [
                _located(context, f"{e['field']}: {e['message']}", _request_path(e["field"]))
                for e in exc.errors
            ]
            raise ResolutionException(
                "invalid image generation request in `request`:\n" + "\n".join(lines)
            ) from None
        except ValueError as exc:
            field = str(exc).split(":", 1)[0]
            path = [field] if field in cls.model_fields else []
            raise ResolutionException(_located(context, str(exc), path)) from None
        return component

    @cached_property
    def assets_def(self) -> AssetsDefinition:
        """The asset, built by :func:`~dagster_octoai.octoai_image_asset`."""
        spec = self.asset
        op = self.op or OpSpec()
        if spec.skippable:
            raise ValueError("asset: skippable is not supported by image assets")
        key = spec.key
        options: AssetOptions = {
            "group_name": spec.group_name,
            "description": spec.description,
            "tags": {k: v for k, v in spec.tags.items() if not k.startswith("dagster/kind/")}
            or None,
            "metadata": spec.metadata or None,
            "pool": op.pool if op.pool is not None else DEFAULT_POOL,
            "retry_policy": self.retry_policy,
            "automation_condition": spec.automation_condition,
            "freshness_policy": spec.freshness_policy,
            "code_version": spec.code_version,
            "owners": list(spec.owners) or None,
            "kinds": spec.kinds - {"octoai"} or None,
            "op_tags": op.tags,
            "backfill_policy": op.backfill_policy,
            # Dagster points the asset at this component's YAML itself.
            "code_references": [],
        }
        common: dict[str, Any] = {
            "prompt_template": self.prompt_template,
            "key_prefix": list(key.path[:-1]) or None,
            "partitions_def": spec.partitions_def,
            "ins": {name: AssetIn(key=AssetKey.from_user_string(k)) for name, k in self.ins.items()}
            or None,
            "image_inputs": self.image_inputs or None,
            "local_edge_map": self.local_edge_map,
            "deps": [dep.asset_key for dep in spec.deps] or None,
            "resource_key": self.resource_key,
            "reuse_existing": self.reuse_existing,
            "checks": self.checks,
        }
        if self.requests is not None:
            if self.io_manager_key is None:
                raise ValueError(
                    "io_manager_key: requests streams the batch into an image IO manager "
                    "(S3ImageIOManager or LocalImageIOManager); name its resource key"
                )
            return octoai_image_batch_asset(
                key.path[-1],
                self.request,
                _static_requests(self.requests),
                io_manager_key=self.io_manager_key,
                **common,
                **options,
            )
        return octoai_image_asset(
            key.path[-1], self.request, io_manager_key=self.io_manager_key, **common, **options
        )

    def build_defs(self, context: ComponentLoadContext) -> Definitions:
        """The asset (and its built-in checks)."""
        return Definitions(assets=[self.assets_def])


def _static_requests(items: list[dict[str, Any]]) -> Any:
    frozen = [dict(i) for i in items]
    return lambda partition_key, inputs: frozen


def _request_path(field: str) -> list[str | int]:
    # Errors of nested values name them with dots (loras.<name>); runtime stand-ins (the
    # prompt a template fills) point at the request block itself.
    return ["request", *field.split(".")]


def _located(context: ResolutionContext, message: str, path: Sequence[str | int]) -> str:
    """``message`` with the file, line and snippet of ``path`` (under this component's
    attributes) when the component came from YAML."""
    tree = context.source_position_tree
    if tree is None:
        return message
    error = tree.source_error(
        yaml_path=[*context.path, *path], inline_error_message=message, value_error=True
    )
    return f"{error.file_name}:{error.start_line_no} - {error.location}\n{error.snippet}\n"


# ---- resources --------------------------------------------------------------------------


def _plain_fields(cls: type[BaseModel]) -> dict[str, Any]:
    return {
        name: (info.annotation, Field(default=info.default, description=info.description))
        for name, info in cls.model_fields.items()
    }


class _NestedModel(Model, Resolvable):
    """A nested block of a component's YAML (``retry`` of the OctoAI resource)."""


def _fields_of(cls: type[BaseModel], exclude: set[str]) -> dict[str, Any]:
    """A resource's fields (types, defaults, bounds, descriptions), for a component's schema.

    A nested config (``OctoAIResource.retry``) becomes a nested model of its own fields,
    unset (``None``) unless the YAML sets it.
    """
    fields: dict[str, Any] = {}
    for name, info in cls.model_fields.items():
        if name in exclude:
            continue
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            # Types and descriptions only: the values are judged by the config class
            # itself when the resource is built (one place for its rules).
            nested = create_model(
                f"{annotation.__name__}Model",
                __base__=_NestedModel,
                **_plain_fields(annotation),
            )
            fields[name] = (nested | None, Field(default=None, description=info.description))
        else:
            fields[name] = (annotation, FieldInfo.merge_field_infos(info))
    return fields


# One object per distinct configuration: Definitions refuses two different objects under
# one resource key, and several defs.yaml files may each declare the same resources.
_SHARED: dict[str, Any] = {}
_T = TypeVar("_T")


def _shared(kind: str, settings: Mapping[str, Any], make: Callable[[], _T]) -> _T:
    key = kind + json.dumps(settings, sort_keys=True, default=str)
    if key not in _SHARED:
        _SHARED[key] = make()
    shared: _T = _SHARED[key]
    return shared


_OctoAIFields = create_model(
    "_OctoAIFields", __base__=Model, **_fields_of(OctoAIResource, exclude={"token"})
)


class OctoAIResourceComponent(_OctoAIFields, Component, Resolvable):
    """Binds an OctoAIResource under resource_key (default octoai), its token from the environment.

    The :class:`~dagster_octoai.OctoAIResource`, bound under ``resource_key``.

    Every field of the resource but the token: the token is read at run time from the
    environment variable ``token_env_var`` (``EnvVar``), so it is never in YAML, run
    config or the UI. ``base_url`` unset reads ``OCTOAI_BASE_URL``, else the local server.
    """

    token_env_var: str = Field(
        default="OCTOAI_TOKEN", description="Environment variable holding the API token."
    )
    resource_key: str = Field(default="octoai", description="Key to bind the resource under.")

    @property
    def resource(self) -> OctoAIResource:
        """The configured resource (one object per distinct configuration)."""
        settings = self.model_dump(
            exclude={"token_env_var", "resource_key", "retry"}, exclude_none=True
        )
        retry = getattr(self, "retry", None)
        if retry is not None:
            # Only what the YAML sets: `deadline_s: null` (no deadline) is kept.
            settings["retry"] = HTTPRetryConfig(**retry.model_dump(exclude_unset=True))
        token_env_var = self.token_env_var
        return _shared(
            f"octoai:{token_env_var}",
            settings,
            lambda: OctoAIResource(token=EnvVar(token_env_var), **settings),
        )

    @classmethod
    def get_spec(cls) -> ComponentTypeSpec:
        """What ``dg list components`` shows."""
        return ComponentTypeSpec(
            description="An OctoAIResource (OctoAI-compatible image API); the token from an environment variable.",
            tags=["octoai"],
            produces=["resource"],
        )

    def build_defs(self, context: ComponentLoadContext) -> Definitions:
        """The resource, under ``resource_key``."""
        return Definitions(resources={self.resource_key: self.resource})


_S3Fields = create_model(
    "_S3Fields",
    __base__=Model,
    # Credentials come from boto3's chain; an S3Resource is a Python object, not YAML.
    **_fields_of(S3ImageIOManager, exclude={"aws_access_key_id", "aws_secret_access_key", "s3"}),
)


class S3ImageIOManagerComponent(_S3Fields, Component, Resolvable):
    """Binds an S3ImageIOManager under resource_key (default images): images and manifests in S3.

    The :class:`~dagster_octoai.S3ImageIOManager`, bound under ``resource_key``.

    Credentials come from boto3's default chain (``AWS_ACCESS_KEY_ID`` /
    ``AWS_SECRET_ACCESS_KEY``, a profile, an instance role), never from YAML.
    """

    resource_key: str = Field(default="images", description="Key to bind the IO manager under.")

    @property
    def resource(self) -> S3ImageIOManager:
        """The configured IO manager (one object per distinct configuration)."""
        settings = self.model_dump(exclude={"resource_key"}, exclude_none=True)
        return _shared("s3-images", settings, lambda: S3ImageIOManager(**settings))

    @classmethod
    def get_spec(cls) -> ComponentTypeSpec:
        """What ``dg list components`` shows."""
        return ComponentTypeSpec(
            description="An S3ImageIOManager: generated images and manifests in S3 or an S3-compatible store.",
            tags=["octoai"],
            produces=["resource"],
        )

    def build_defs(self, context: ComponentLoadContext) -> Definitions:
        """The IO manager, under ``resource_key``."""
        return Definitions(resources={self.resource_key: self.resource})


_LocalFields = create_model(
    "_LocalFields", __base__=Model, **_fields_of(LocalImageIOManager, exclude=set())
)


class LocalImageIOManagerComponent(_LocalFields, Component, Resolvable):
    """Binds a LocalImageIOManager under resource_key (default images): a local directory.

    The :class:`~dagster_octoai.LocalImageIOManager`, bound under ``resource_key``: the S3
    layout and manifests in a local directory, for development.
    """

    resource_key: str = Field(default="images", description="Key to bind the IO manager under.")

    @property
    def resource(self) -> LocalImageIOManager:
        """The configured IO manager (one object per distinct configuration)."""
        settings = self.model_dump(exclude={"resource_key"}, exclude_none=True)
        return _shared("local-images", settings, lambda: LocalImageIOManager(**settings))

    @classmethod
    def get_spec(cls) -> ComponentTypeSpec:
        """What ``dg list components`` shows."""
        return ComponentTypeSpec(
            description="A LocalImageIOManager: generated images and manifests in a local directory.",
            tags=["octoai"],
            produces=["resource"],
        )

    def build_defs(self, context: ComponentLoadContext) -> Definitions:
        """The IO manager, under ``resource_key``."""
        return Definitions(resources={self.resource_key: self.resource})


_LedgerFields = create_model(
    "_LedgerFields", __base__=Model, **_fields_of(JobLedgerResource, exclude={"s3"})
)


class JobLedgerResourceComponent(_LedgerFields, Component, Resolvable):
    """Binds a JobLedgerResource under resource_key (default octoai_ledger): the async job ledger.

    The :class:`~dagster_octoai.JobLedgerResource`: ``base_dir`` (a local directory) or
    ``bucket`` and ``prefix`` (S3, credentials from boto3's default chain).
    """

    resource_key: str = Field(default="octoai_ledger", description="Key to bind it under.")

    @property
    def resource(self) -> JobLedgerResource:
        """The configured ledger resource (one object per distinct configuration)."""
        settings = self.model_dump(exclude={"resource_key"}, exclude_none=True)
        return _shared("ledger", settings, lambda: JobLedgerResource(**settings))

    @classmethod
    def get_spec(cls) -> ComponentTypeSpec:
        """What ``dg list components`` shows."""
        return ComponentTypeSpec(
            description="A JobLedgerResource: the durable ledger of async jobs.",
            tags=["octoai"],
            produces=["resource"],
        )

    def build_defs(self, context: ComponentLoadContext) -> Definitions:
        """The ledger resource, under ``resource_key``."""
        return Definitions(resources={self.resource_key: self.resource})


class OctoAIAsyncImagesComponent(Component, Resolvable, Model):
    """Async image generation in YAML: a submit asset, the job sensor and the results asset.

    The sensor path of :mod:`dagster_octoai.async_assets`: the submit asset
    (``<key>_jobs``) records each request's async job in the ledger and submits it; the
    sensor polls the ledger's jobs and requests a run of the results asset (``key``, one
    dynamic partition per response id) for each completed one, which stores its images
    with the IO manager at ``io_manager_key``. Each request is judged by
    ``ImageGenerationRequest`` when the component loads.

    Examples:
        .. code-block:: yaml

            type: dagster_octoai.components.OctoAIAsyncImagesComponent
            attributes:
              key: fox_images
              requests:
                - {engine: sdxl, prompt: a red fox, seed: 7}
                - {engine: sdxl, prompt: an arctic fox, seed: 8}
              io_manager_key: images
    """

    key: str = Field(description="Name of the results asset (a partition per response id).")
    requests: list[dict[str, Any]] = Field(
        description="The requests the submit asset sends (ImageGenerationRequest fields)."
    )
    submit_key: str | None = Field(
        default=None, description="Name of the submit asset; default <key>_jobs."
    )
    io_manager_key: str = Field(
        default="images", description="The image IO manager the results are stored with."
    )
    resource_key: str = Field(default="octoai", description="Key of the OctoAI resource.")
    ledger_resource_key: str = Field(
        default="octoai_ledger", description="Key of the JobLedgerResource."
    )
    group_name: str | None = Field(default=None, description="Group of both assets.")
    checks: Checks = Field(default=True, description="The built-in image checks on the results.")
    minimum_interval_seconds: int = Field(default=30, ge=1, description="Seconds between ticks.")
    sensor_running: bool = Field(
        default=False, description="Whether the sensor runs as soon as it is deployed."
    )

    @classmethod
    def load(cls, attributes: Any, context: ComponentLoadContext) -> OctoAIAsyncImagesComponent:
        """The component, every request checked (each bad field named, at its request)."""
        component = super().load(attributes, context)
        for index, item in enumerate(component.requests):
            try:
                ImageGenerationRequest.build(item)
            except RequestValidationError as exc:
                raise ResolutionException(f"requests[{index}]: {exc.message}") from None
        return component

    def build_defs(self, context: ComponentLoadContext) -> Definitions:
        """The submit and results assets and the sensor between them."""
        options: AssetOptions = {"group_name": self.group_name, "code_references": []}
        results = octoai_async_results_asset(
            self.key,
            ledger_resource_key=self.ledger_resource_key,
            octoai_resource_key=self.resource_key,
            io_manager_key=self.io_manager_key,
            checks=self.checks,
            **options,
        )
        submit = octoai_async_submit_asset(
            self.submit_key or f"{self.key}_jobs",
            [dict(item) for item in self.requests],
            results_asset=results,
            ledger_resource_key=self.ledger_resource_key,
            octoai_resource_key=self.resource_key,
            **options,
        )
        sensor = octoai_async_sensor(
            asset=results,
            name=f"{self.key}_sensor",
            ledger_resource_key=self.ledger_resource_key,
            octoai_resource_key=self.resource_key,
            minimum_interval_seconds=self.minimum_interval_seconds,
            default_status=DefaultSensorStatus.RUNNING
            if self.sensor_running
            else DefaultSensorStatus.STOPPED,
        )
        return Definitions(assets=[submit, results], sensors=[sensor])
