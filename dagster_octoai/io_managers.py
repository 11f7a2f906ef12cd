"""Dagster IO managers that store generated images in S3 or a local directory.

Both are thin: the key layout, manifest and write order live in
:class:`dagster_octoai.storage.ImageStore`, so S3 and local outputs look the same.

``handle_output`` takes some images: an answer
(:class:`~dagster_octoai.api.models.ImageGenerationResponse`, which carries its request), a
list of answers, or an :class:`~dagster_octoai.api.batch.ImageBatch` (lazy ones are stored
as they are generated), and stores them with their lineage: the manifest, each object's
metadata and the output's data version. ``load_input`` gives back the stored images as
:class:`~dagster_octoai.api.models.GeneratedImage` objects that know their request, seed,
URI and partition:

- ``list[GeneratedImage]`` for an unpartitioned upstream, or for one upstream partition
  when the downstream run is itself for one partition;
- ``dict[partition_key, list[GeneratedImage]]`` when the input spans several upstream
  partitions, or the downstream is unpartitioned (so the partition of each image
  stays visible). An input annotated ``dict`` always gets the mapping; one annotated
  ``list`` always gets a flat list in partition order.
"""

# No `from __future__ import annotations`: Dagster reads the `ResourceDependency` annotation
# of `s3` when the class is made (a string would not be recognised as one).

import collections.abc
import inspect
import re
import threading
import types
import typing
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal, cast

from dagster import (
    AssetKey,
    AssetsDefinition,
    AssetSpec,
    Config,
    ConfigurableIOManager,
    DagsterInvariantViolationError,
    Definitions,
    EnvVar,
    InputContext,
    MetadataValue,
    MultiPartitionsDefinition,
    OutputContext,
    PreviewWarning,
    ResourceDependency,
)
from pydantic import Field, PrivateAttr, field_validator

from .api.batch import STORABLE, ImageBatch, UnstorableValueError, responses_of
from .api.models import GeneratedImage, ImageGenerationRequest, ImageGenerationResponse
from .metadata import DataVersionDigest, model_assets
from .storage import ImageStore, LocalBackend, S3Backend, StorageBackend, StorageError, WriteReport
from .storage.layout import normalize_prefix, output_key
from .storage.store import ConvertFormat, answer_request

__all__ = ["LocalImageIOManager", "S3ImageIOManager", "with_image_uris"]

# Output metadata lists at most this many URIs / seeds, so the event log stays small.
_METADATA_LIST_MAX = 100
# Request summaries listed in an output's metadata, at most (each is a few hundred bytes).
_REQUESTS_LISTED = 20


def s3_resource_field() -> Any:
    """The ``s3`` field of a resource that takes a :class:`S3ConnectionConfig`."""
    return Field(
        default=cast("Any", None),
        description=(
            "A dagster-aws S3Resource to reach the bucket with; the connection fields "
            "(endpoint_url, region_name, the keys, addressing_style, retry_mode, "
            "max_attempts) are then left unset (they are the fallback without one)."
        ),
    )


class S3ConnectionConfig(Config):
    """How to reach S3: one configuration for the image IO manager and the job ledger.

    Either a dagster-aws ``S3Resource`` (``s3=``: its endpoint, region, credentials,
    profile, session token and SSL settings, the configuration the rest of a project
    uses), or, without one, the fields below. :class:`S3ImageIOManager` and
    :class:`~dagster_octoai.JobLedgerResource` both take it, field for field. (Each
    declares ``s3`` itself, with :func:`s3_resource_field`: Dagster resolves a nested
    resource only on a resource class.)
    """

    endpoint_url: str | None = Field(
        default=None,
        description="S3 endpoint URL for S3-compatible stores (MinIO, R2, SeaweedFS); unset for AWS.",
    )
    region_name: str | None = Field(
        default=None, description="Region to sign requests for; unset uses boto3's default."
    )
    aws_access_key_id: str | None = Field(
        default=None,
        description="Access key id; unset uses boto3's default credential chain.",
    )
    aws_secret_access_key: str | None = Field(
        default=None,
        repr=False,
        description="Secret access key; pass it with EnvVar so it is never shown. Unset uses boto3's default chain.",
        json_schema_extra={"dagster__is_secret": True},
    )
    addressing_style: str = Field(
        default="auto",
        description="Bucket addressing: 'path' for most S3-compatible stores, 'virtual' or 'auto' for AWS.",
    )
    retry_mode: str = Field(
        default="adaptive",
        description="botocore retry mode; 'adaptive' also rate-limits the client when throttled.",
    )
    max_attempts: int = Field(
        default=5,
        ge=1,
        le=20,
        description=(
            "Attempts per S3 call, botocore's retries (SlowDown, 5xx, dropped connections) "
            "included; the only retries there are."
        ),
    )

    @field_validator("addressing_style", mode="before")
    @classmethod
    def _check_addressing_style(cls, value: str) -> str:
        if isinstance(value, EnvVar):
            return value  # checked when Dagster resolves it at run time
        return str(_one_of("addressing_style", value, ("auto", "path", "virtual")))

    @field_validator("retry_mode", mode="before")
    @classmethod
    def _check_retry_mode(cls, value: str) -> str:
        if isinstance(value, EnvVar):
            return value  # checked when Dagster resolves it at run time
        return str(_one_of("retry_mode", value, ("standard", "adaptive")))

    def s3_backend(self, bucket: str, *, max_pool_connections: int = 10) -> S3Backend:
        """A backend on ``bucket`` through this connection.

        Raises:
            ValueError: ``s3=`` is set together with a field it replaces.
        """
        # Declared by each resource class (s3_resource_field), resolved by Dagster there.
        s3 = getattr(self, "s3", None)
        if s3 is not None:
            _no_connection_fields_with(self, _S3_CONNECTION_FIELDS, type(self).__name__)
            return S3Backend(s3_resource_client(s3), bucket)
        return S3Backend.from_config(
            bucket,
            endpoint_url=self.endpoint_url,
            region_name=self.region_name,
            aws_access_key_id=self.aws_access_key_id,
            aws_secret_access_key=self.aws_secret_access_key,
            addressing_style=typing.cast(AddressingStyle, self.addressing_style),
            retry_mode=typing.cast(RetryMode, self.retry_mode),
            max_attempts=self.max_attempts,
            max_pool_connections=max_pool_connections,
        )


class _ImageIOManager(ConfigurableIOManager):
    """What both image IO managers share: one store per instance, built on first use."""

    prefix: str = Field(
        default="dagster-octoai",
        description="Key prefix under which every output is stored ('' for none).",
    )
    max_concurrency: int = Field(
        default=8,
        ge=1,
        le=64,
        description="Uploads in flight at once; also about how many images are held in memory.",
    )
    convert_to: str | None = Field(
        default=None,
        description="Re-encode images to 'png', 'jpeg' or 'webp'; unset stores the bytes exactly as the API returned them.",
    )
    fingerprint_index: bool = Field(
        default=False,
        description=(
            "Also write {prefix}/_index/{request fingerprint}.json for every result whose "
            "seeds are explicit, so find_existing can reuse a result stored by another "
            "asset or partition. Costs one more PUT per result; re-runs of the same "
            "output reuse through its manifest without it."
        ),
    )

    _store: ImageStore | None = PrivateAttr(default=None)
    _preflighted: set[Any] = PrivateAttr(default_factory=set)
    _store_lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    @field_validator("convert_to", mode="before")
    @classmethod
    def _check_convert_to(cls, value: str | None) -> str | None:
        if isinstance(value, EnvVar):
            return value  # checked when Dagster resolves it at run time
        return _one_of("convert_to", value, (None, "png", "jpeg", "webp"))

    @field_validator("prefix", mode="before")
    @classmethod
    def _check_prefix(cls, value: str) -> str:
        if isinstance(value, EnvVar):
            return value  # checked when Dagster resolves it at run time
        return normalize_prefix(value)

    def _backend(self) -> StorageBackend:
        raise NotImplementedError

    @property
    def store(self) -> ImageStore:
        """The :class:`ImageStore` of this IO manager.

        Built on first use and kept for the instance's lifetime, so its S3 client (and
        connection pool) serves every ``handle_output``, ``load_input``,
        ``find_existing`` and ``preflight`` of the run.
        """
        with self._store_lock:
            if self._store is None:
                self._store = ImageStore(
                    self._backend(),
                    prefix=normalize_prefix(self.prefix),
                    max_concurrency=self.max_concurrency,
                    convert_to=typing.cast(ConvertFormat | None, self.convert_to),
                    fingerprint_index=self.fingerprint_index,
                )
            return self._store

    def preflight(
        self,
        asset_key: AssetKey | Sequence[str] | None = None,
        partition_key: str | None = None,
        *,
        any_partition: bool = False,
        partition_keys: Sequence[str] | None = None,
    ) -> None:
        """Check now that outputs can be stored, before anything is generated or paid for.

        The generation assets call this before sending any request, so what the store
        would refuse later fails the step first: a wrong bucket, refused credentials
        (read-only ones too: a probe object is written under ``{prefix}/_preflight/``
        and deleted), an unreachable endpoint, a store that ignores conditional writes,
        an unwritable directory, and, given the output's asset key and partition (or the
        ``partition_keys`` of a run over a range), a key longer than the store allows
        (S3: 1,024 bytes) or a commit point holding another output's manifest. The same
        check is made once per IO manager instance (Dagster makes one per run).

        Raises:
            StorageError: the store cannot be used; the message names the bucket or
                directory and what is wrong.

        Examples:
            >>> LocalImageIOManager(base_dir="/tmp/images").preflight(["fox"])
        """
        path = None if asset_key is None else _key_path(asset_key)
        keys = None if partition_keys is None else tuple(str(k) for k in partition_keys)
        memo = (tuple(path or ()), None if partition_key is None else str(partition_key), keys)
        with self._store_lock:
            if (memo, any_partition) in self._preflighted:
                return
        self.store.preflight(
            path, partition_key, any_partition=any_partition, partition_keys=partition_keys
        )
        with self._store_lock:
            self._preflighted.add((memo, any_partition))

    def location_uri(
        self, asset_key: AssetKey | Sequence[str], partition_key: str | None = None
    ) -> str | None:
        """Where an output's images go (its prefix, as its ``dagster/uri`` says), known
        without calling anything: ``None`` when the location is set from an ``EnvVar``,
        which only a run resolves.

        Examples:
            >>> LocalImageIOManager(base_dir="/tmp/images", prefix="octoai").location_uri(["fox"])
            'file:///tmp/images/octoai/fox'
            >>> S3ImageIOManager(bucket="images").location_uri(["fox"], "2024-01-01")
            's3://images/dagster-octoai/fox/2024-01-01/'
        """
        if isinstance(self.prefix, EnvVar):
            return None
        path = list(asset_key.path) if isinstance(asset_key, AssetKey) else list(asset_key)
        return self._uri_of(output_key(normalize_prefix(self.prefix), path, partition_key) + "/")

    def _uri_of(self, key: str) -> str | None:
        raise NotImplementedError

    # ---- Dagster interface -------------------------------------------------------------

    def check_output_type(self, annotation: Any, where: str) -> None:
        """Refuse, before anything is generated, an output annotated with a type this IO
        manager cannot store (``bytes``, ``PIL.Image.Image``, ``list[GeneratedImage]``...).

        :meth:`~dagster_octoai.OctoAIResource.get_client` calls this as its block starts,
        so an asset that would return what cannot be stored fails before paying. Types it
        cannot judge (none, ``Any``, a generator) pass.

        Raises:
            UnstorableValueError: the annotation is a type that is never some images.

        Examples:
            >>> LocalImageIOManager(base_dir="/tmp/images").check_output_type(bytes, "asset 'fox'")
            Traceback (most recent call last):
            ...
            dagster_octoai.api.batch.UnstorableValueError: asset 'fox' is annotated to return bytes, ...
        """
        if _storable_annotation(annotation) is False:
            raise UnstorableValueError(
                f"{where} is annotated to return {_type_name(annotation)}, which "
                f"{type(self).__name__} cannot store; nothing was generated or paid for. "
                f"Return {STORABLE}, and annotate it so (or not at all)"
            )

    def handle_output(self, context: OutputContext, obj: Any) -> None:
        if _covers_a_range(context):
            self._handle_range(context, obj)
            return
        seen: list[ImageGenerationResponse] = []
        try:
            responses = responses_of(obj)
            if not isinstance(obj, ImageBatch) or not obj.lazy:
                # Every answer checked before the first byte is written.
                for i, answer in enumerate(responses):
                    answer_request(answer, i)
        except UnstorableValueError as exc:
            raise self._refusal(context, obj, exc, seen) from None
        facts = _Facts()

        def observed() -> Iterator[ImageGenerationResponse]:
            for answer in responses:
                seen.append(answer)
                facts.add(answer)
                yield answer

        asset_key = _output_path(context)
        partition_key = context.partition_key if context.has_partition_key else None
        try:
            report = self.store.write(
                observed(), asset_key=asset_key, partition_key=partition_key, run_id=context.run_id
            )
        except UnstorableValueError as exc:
            raise self._refusal(context, obj, exc, seen) from None
        # A streamed batch knows its usage only now that it has been generated and stored.
        late = obj.late_metadata() if isinstance(obj, ImageBatch) else {}
        context.add_output_metadata({**_output_metadata(report, facts), **late})
        _set_data_version(context, facts.version)

    def _handle_range(self, context: OutputContext, obj: Any) -> None:
        """A run over a partition range: each partition stored as a run of its own would.

        The value maps each partition key of the range to its images (what
        :func:`~dagster_octoai.octoai_image_asset` returns in such a run); each is
        committed under its own partition, with its own materialization metadata.
        """
        keys = _range_keys(context)
        names = [str(k) for k in keys]
        given = list(obj) if isinstance(obj, Mapping) else None
        if given is None or sorted(map(str, given)) != sorted(names):
            raise UnstorableValueError(
                f"{type(self).__name__} cannot store the output of {_output_label(context)}: "
                f"this run covers {len(names)} partitions ({names[0]} to {names[-1]}), and "
                "each is stored under its own partition, so the output must map each "
                "partition key to its images ({partition_key: answer}); got "
                f"{_type_name(type(obj)) if given is None else 'keys ' + repr(sorted(map(str, given))[:5])}. "
                f"Nothing of this output was stored. {_paid_for(context, obj, [])}"
            )
        by_name = {str(k): v for k, v in obj.items()}
        totals = {"images": 0, "removed_for_safety": 0, "total_bytes": 0}
        for key in keys:
            value = by_name[str(key)]
            facts = _Facts()
            try:
                answers: Any = responses_of(value)
                if not isinstance(value, ImageBatch) or not value.lazy:
                    answers = list(answers)  # every answer checked before a byte is written
                    for i, answer in enumerate(answers):
                        answer_request(answer, i)
                report = self.store.write(
                    facts.observe(answers),
                    asset_key=_output_path(context),
                    partition_key=key,
                    run_id=context.run_id,
                )
            except UnstorableValueError as exc:
                raise self._refusal(context, value, exc, []) from None
            late = value.late_metadata() if isinstance(value, ImageBatch) else {}
            metadata = {**_output_metadata(report, facts), **late}
            _add_partition_metadata(context, str(key), metadata)
            totals["images"] += report.image_count + report.removed_count
            totals["removed_for_safety"] += report.removed_count
            totals["total_bytes"] += report.total_bytes
        context.add_output_metadata(
            {
                "partitions": MetadataValue.int(len(keys)),
                **{name: MetadataValue.int(value) for name, value in totals.items()},
            }
        )

    def _refusal(
        self,
        context: OutputContext,
        obj: Any,
        exc: UnstorableValueError,
        seen: Sequence[ImageGenerationResponse],
    ) -> UnstorableValueError:
        """The error for a value this IO manager cannot store: what to return, what was paid."""
        return UnstorableValueError(
            f"{type(self).__name__} cannot store the output of {_output_label(context)}: {exc}. "
            f"Return {STORABLE} instead. Nothing of this output was stored. "
            f"{_paid_for(context, obj, seen)}"
        )

    def load_input(
        self, context: InputContext
    ) -> list[GeneratedImage] | dict[str, list[GeneratedImage]]:
        asset_key = _input_path(context)
        if not context.has_asset_partitions:
            return self.store.read(asset_key, None)
        partitions_def = context.asset_partitions_def
        keys: list[str] = list(context.asset_partition_keys)
        if isinstance(partitions_def, MultiPartitionsDefinition):
            keys = [partitions_def.get_partition_key_from_str(k) for k in keys]
        by_partition = {str(k): self.store.read(asset_key, k) for k in keys}
        wanted = _annotation_kind(context)
        if wanted == "list" or (
            wanted is None and len(by_partition) == 1 and context.has_partition_key
        ):
            return [im for images in by_partition.values() for im in images]
        return by_partition

    # ---- idempotent generation -------------------------------------------------------

    def find_existing(
        self,
        request: ImageGenerationRequest,
        asset_key: AssetKey | Sequence[str] | str | None = None,
        partition_key: str | None = None,
    ) -> ImageGenerationResponse | None:
        """An already stored answer to an identical request, to reuse instead of paying again.

        Only requests with every seed explicit qualify. The output at ``asset_key`` /
        ``partition_key`` (pass ``context.partition_key`` as is: a multi-partition key
        keeps its dimensions) is checked first, then (with ``fingerprint_index``) the
        fingerprint index of the whole prefix. The returned answer carries its request
        and ``reused_from`` (the manifest URI); returning it from the asset stores it
        without uploading the bytes again.

        Examples:
            >>> io = LocalImageIOManager(base_dir="/tmp/images")
            >>> io.find_existing(ImageGenerationRequest(prompt="a fox"), ["fox"]) is None
            True
        """
        path = None if asset_key is None else _key_path(asset_key)
        return self.store.find_existing(request, path, partition_key)

    def existing_answers(
        self, asset_key: AssetKey | Sequence[str] | str, partition_key: str | None = None
    ) -> Callable[[ImageGenerationRequest], ImageGenerationResponse | None]:
        """A finder of answers to reuse from the output at ``asset_key``/``partition_key``.

        What :func:`~dagster_octoai.octoai_image_batch_asset` uses: the output's manifest
        is read once, then each request with explicit seeds finds its stored answer.

        Examples:
            >>> io = LocalImageIOManager(base_dir="/tmp/images")
            >>> io.existing_answers(["fox"])(ImageGenerationRequest(prompt="a fox", seed=1))
        """
        return self.store.existing_answers(_key_path(asset_key), partition_key)


class S3ImageIOManager(_ImageIOManager, S3ConnectionConfig):
    """Stores generated images in S3 or an S3-compatible store (MinIO, R2, SeaweedFS).

    One object per image, written once under
    ``{prefix}/{asset key path}/[partition=<key>/]_objects/{write id}/{index:03d}-seed{seed}.{ext}``
    with the bytes exactly as the API returned them and S3 user metadata (seed, engine,
    sampler, steps, cfg scale, size, request fingerprint, run id, asset key, partition,
    index, response id); the output's ``manifest.json``, holding the full requests, is its
    commit point, written with a conditional PUT. See ``docs/storage.md`` for the layout,
    the manifest schema and the commit protocol.

    The connection comes from a dagster-aws ``S3Resource`` (``s3=``: its endpoint,
    region, credentials, profile, session token and SSL settings, the same configuration
    the rest of the project uses), or, without one, from the fields below.

    Examples:
        >>> from dagster import EnvVar
        >>> io_manager = S3ImageIOManager(
        ...     bucket="images",
        ...     prefix="octoai",
        ...     aws_access_key_id=EnvVar("AWS_ACCESS_KEY_ID"),
        ...     aws_secret_access_key=EnvVar("AWS_SECRET_ACCESS_KEY"),
        ... )

        With dagster-aws, one ``S3Resource`` for this, the job ledger and your own assets::

            s3 = S3Resource(region_name="eu-west-1", profile_name="images")
            resources = {
                "s3": s3,
                "images": S3ImageIOManager(bucket="images", s3=s3),
                "octoai_ledger": JobLedgerResource(bucket="images", s3=s3),
            }
    """

    bucket: str = Field(description="The S3 bucket images and manifests go to (must exist).")
    # Typed as Dagster reads a nested resource (an Optional[...] would not be); None: unset.
    s3: ResourceDependency[Any] = s3_resource_field()

    @field_validator("bucket", mode="before")
    @classmethod
    def _check_bucket(cls, value: str) -> str:
        if isinstance(value, EnvVar):
            return value  # checked when Dagster resolves it at run time
        if not _BUCKET.match(value):
            raise ValueError(
                f"bucket: {value!r} is not a bucket name (3-63 lowercase letters, digits, '.', '-')"
            )
        return value

    def _uri_of(self, key: str) -> str | None:
        return None if isinstance(self.bucket, EnvVar) else f"s3://{self.bucket}/{key}"

    def _backend(self) -> StorageBackend:
        return self.s3_backend(self.bucket, max_pool_connections=max(10, self.max_concurrency))


class LocalImageIOManager(_ImageIOManager):
    """Stores generated images as files: the S3 layout and manifest under a local directory.

    For development without S3. Writes are atomic (temp file + ``os.replace``); as
    files carry no metadata, the per-image metadata is in the manifest only. URIs
    are ``file://`` URIs.

    Examples:
        >>> io_manager = LocalImageIOManager(base_dir="/tmp/images", prefix="octoai")
        >>> io_manager.store.output_key(["fox"], None)
        'octoai/fox'
    """

    base_dir: str = Field(description="Directory under which the prefix and images are written.")

    def _uri_of(self, key: str) -> str | None:
        return None if isinstance(self.base_dir, EnvVar) else LocalBackend(self.base_dir).uri(key)

    def _backend(self) -> StorageBackend:
        return LocalBackend(self.base_dir)


# ---- S3Resource ---------------------------------------------------------------------------

# The fields a dagster-aws S3Resource replaces (addressing, retries: botocore's defaults).
_S3_CONNECTION_FIELDS = (
    "endpoint_url",
    "region_name",
    "aws_access_key_id",
    "aws_secret_access_key",
    "addressing_style",
    "retry_mode",
    "max_attempts",
)


def s3_resource_client(resource: Any) -> Any:
    """The boto3 S3 client of a dagster-aws ``S3Resource`` (``get_client()``), checked.

    Raises:
        TypeError: ``resource`` is not an S3Resource (has no ``get_client``).
    """
    get_client = getattr(resource, "get_client", None)
    if not callable(get_client):
        raise TypeError(
            f"s3: expected a dagster_aws.s3.S3Resource, got {type(resource).__name__}; "
            "pass S3Resource(...) (pip install dagster-aws), or leave s3 unset and set the "
            "connection fields"
        )
    return get_client()


def _no_connection_fields_with(resource: Any, names: Sequence[str], owner: str) -> None:
    """One S3 configuration: with ``s3=`` set, the fields it replaces must be left unset."""
    fields = type(resource).model_fields
    set_here = [n for n in names if getattr(resource, n) != fields[n].get_default()]
    if set_here:
        raise ValueError(
            f"{owner}: {', '.join(set_here)} cannot be set with s3=S3Resource(...); "
            "configure the connection once, on the S3Resource"
        )


# ---- definitions ----------------------------------------------------------------------


def with_image_uris(defs: Definitions) -> Definitions:
    """``defs`` with ``dagster/uri`` on every asset that one of its image IO managers stores.

    The URI is known before anything runs: an unpartitioned asset's output prefix, or a
    partitioned asset's prefix (each materialization's ``dagster/uri`` adds its
    partition). An IO manager whose bucket, directory or prefix comes from an ``EnvVar``
    is left out: only a run knows where it writes.

    Examples:
        >>> from dagster_octoai import OctoAIResource, octoai_image_asset
        >>> fox = octoai_image_asset("fox", {"prompt": "a fox"}, io_manager_key="images")
        >>> defs = with_image_uris(Definitions(
        ...     assets=[fox],
        ...     resources={"octoai": OctoAIResource(), "images": S3ImageIOManager(bucket="img")}))
        >>> defs.resolve_assets_def("fox").specs_by_key[fox.key].metadata["dagster/uri"]
        's3://img/dagster-octoai/fox/'
    """
    resources = defs.resources or {}
    uris: dict[AssetKey, str] = {}
    for assets_def in defs.assets or []:
        if not isinstance(assets_def, AssetsDefinition):
            continue
        for key in assets_def.keys:
            manager = resources.get(assets_def.get_io_manager_key_for_asset_key(key))
            if isinstance(manager, _ImageIOManager):
                uri = manager.location_uri(key)
                if uri is not None:
                    uris[key] = uri
    if not uris:
        return defs

    def add(spec: AssetSpec) -> AssetSpec:
        if spec.key not in uris:
            return spec
        return spec.replace_attributes(metadata={**spec.metadata, "dagster/uri": uris[spec.key]})

    with warnings.catch_warnings():
        # Dagster marks map_asset_specs as preview; it is what Definitions offer for this.
        warnings.simplefilter("ignore", PreviewWarning)
        return defs.map_asset_specs(func=add)


# ---- helpers ---------------------------------------------------------------------------


def preflight_store(
    resources: Any,
    io_manager_key: str | None,
    asset_key: AssetKey | Sequence[str] | None = None,
    partition_key: str | None = None,
    *,
    any_partition: bool = False,
    partition_keys: Sequence[str] | None = None,
) -> None:
    """Run ``preflight()`` of the IO manager at ``io_manager_key``, if it has one.

    What the generation assets call before paying for anything, with the key and
    partition of the output the IO manager will store. IO managers without
    ``preflight`` (Dagster's own) are left alone.

    Raises:
        StorageError: the image store cannot be used; nothing was generated yet.
    """
    if io_manager_key is None:
        return
    io_manager = getattr(resources, io_manager_key, None)
    check: Callable[..., None] | None = getattr(io_manager, "preflight", None)
    if check is None:
        return
    try:
        if partition_keys is None:
            check(asset_key, partition_key, any_partition=any_partition)
        else:
            check(asset_key, partition_key, partition_keys=partition_keys)
    except StorageError as exc:
        raise StorageError(
            f"IO manager {io_manager_key!r} cannot store images, so nothing was generated "
            f"or paid for: {exc.message}",
            status_code=exc.status_code,
        ) from None


def _key_path(asset_key: AssetKey | Sequence[str] | str) -> list[str]:
    if isinstance(asset_key, AssetKey):
        return list(asset_key.path)
    if isinstance(asset_key, str):
        return list(AssetKey.from_user_string(asset_key).path)
    return list(asset_key)


AddressingStyle = Literal["auto", "path", "virtual"]
RetryMode = Literal["standard", "adaptive"]
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def _one_of(field: str, value: str | None, allowed: tuple[str | None, ...]) -> str | None:
    if value not in allowed:
        names = ", ".join(repr(a) for a in allowed if a is not None)
        unset = " (or unset)" if None in allowed else ""
        raise ValueError(f"{field}: {value!r} is not allowed; use one of {names}{unset}")
    return value


def _storable_annotation(annotation: Any) -> bool | None:
    """Whether values of an output type can be some images: ``None`` when it cannot tell."""
    if annotation is Any or annotation is object or annotation is None:
        return None
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Union or origin is types.UnionType:
        verdicts = {_storable_annotation(a) for a in args if a is not type(None)}
        return True if True in verdicts else (None if None in verdicts else False)
    if origin in (list, tuple, collections.abc.Sequence):
        if not args or args[0] is Any:
            return None
        item = args[0]
        if inspect.isclass(item):
            return issubclass(item, ImageGenerationResponse)
        return None
    if origin in (dict, set, frozenset, collections.abc.Mapping, collections.abc.Set):
        return False
    if origin is not None or not inspect.isclass(annotation):
        return None  # generators, Output[...], forward references: not for us to judge
    if issubclass(annotation, ImageGenerationResponse | ImageBatch):
        return True
    if annotation in (list, tuple):
        return None  # of what, it does not say
    if annotation.__module__.startswith("dagster."):
        return None  # MaterializeResult, Nothing and the like
    return False


def _type_name(annotation: Any) -> str:
    if inspect.isclass(annotation) and typing.get_origin(annotation) is None:
        return annotation.__qualname__
    return repr(annotation).replace("typing.", "")


def _covers_a_range(context: OutputContext) -> bool:
    """Whether the output is a partitioned asset's over more than one partition (a range)."""
    return (
        context.has_asset_key
        and context.has_asset_partitions
        and not context.has_partition_key
        and len(context.asset_partition_keys) > 1
    )


def _range_keys(context: OutputContext) -> list[Any]:
    """The partition keys of a range output (multi-partition keys keep their dimensions)."""
    keys: list[Any] = list(context.asset_partition_keys)
    partitions_def = context.asset_partitions_def
    if isinstance(partitions_def, MultiPartitionsDefinition):
        keys = [partitions_def.get_partition_key_from_str(k) for k in keys]
    return keys


def _add_partition_metadata(context: OutputContext, partition: str, metadata: Any) -> None:
    """Metadata on the materialization of one partition of a range output."""
    try:
        step = context.step_context
    except DagsterInvariantViolationError:
        return  # an OutputContext built for a test: no materializations to add to
    step.add_asset_metadata(metadata, asset_key=context.asset_key, partition_key=partition)


def _output_label(context: OutputContext) -> str:
    if context.has_asset_key:
        return f"asset {context.asset_key.to_user_string()!r}"
    return f"output {context.name!r} of step {context.step_key!r}"


def _paid_for(context: OutputContext, obj: Any, seen: Sequence[ImageGenerationResponse]) -> str:
    """What was already generated (and paid for) for this output, as far as can be told.

    From the OctoAI session's usage on the output (``octoai/images``, ``octoai/request_ids``)
    and from the answers found in the value: request ids and seeds, never the token.
    """
    answers = [*seen, *(a for a in _answers_in(obj) if all(a is not s for s in seen))]
    seeds = [im.seed for a in answers for im in a.images]
    request_ids = [rid for a in answers for rid in a.call_info.request_ids]
    usage = context.output_metadata
    images = _metadata_value(usage.get("octoai/images"))
    for rid in _metadata_value(usage.get("octoai/request_ids")) or []:
        if rid not in request_ids:
            request_ids.append(rid)
    count = images if isinstance(images, int) else len(seeds)
    if not count and not request_ids:
        return (
            "If images were generated for it, they were already paid for and are not stored: "
            "re-running the asset generates (and pays for) them again."
        )
    parts = [f"{count} image(s)"]
    if seeds:
        parts.append(f"seeds {seeds[:_METADATA_LIST_MAX]}")
    if request_ids:
        parts.append(f"request ids {request_ids[:_METADATA_LIST_MAX]}")
    return (
        f"The generation was already paid for and is not stored: {'; '.join(parts)}. "
        "Re-running the asset generates (and pays for) it again."
    )


def _answers_in(value: Any, depth: int = 0) -> Iterator[ImageGenerationResponse]:
    """The answers somewhere in a refused value (an image names its seed only)."""
    if depth > 3:
        return
    if isinstance(value, ImageGenerationResponse):
        yield value
    elif isinstance(value, ImageBatch) and not value.lazy:
        yield from value.responses
    elif isinstance(value, GeneratedImage):
        yield ImageGenerationResponse(images=[value])
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _answers_in(v, depth + 1)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _answers_in(v, depth + 1)


def _metadata_value(value: Any) -> Any:
    return getattr(value, "value", value)


def _set_data_version(context: OutputContext, version: DataVersionDigest) -> None:
    """The output's data version from what was stored, unless the asset gave one itself.

    An asset that returns an answer (or a streamed batch, whose seeds are known only now)
    gets the same version :func:`~dagster_octoai.data_version_for` gives: same request,
    same seeds, same version.
    """
    if not context.has_asset_key:
        return
    try:
        step = context.step_context
    except DagsterInvariantViolationError:
        return  # an OutputContext built for a test has no step
    if not step.has_data_version(context.asset_key):
        step.set_data_version(context.asset_key, version.version())


def _output_path(context: OutputContext) -> list[str]:
    if context.has_asset_key:
        return list(context.asset_key.path)
    # An op output: its run, step and output name.
    return ["_ops", *context.get_identifier()]


def _input_path(context: InputContext) -> list[str]:
    if context.has_asset_key:
        return list(context.asset_key.path)
    upstream = context.upstream_output
    if upstream is None:
        raise TypeError("an image IO manager loads inputs that an upstream output stored")
    return _output_path(upstream)


def _annotation_kind(context: InputContext) -> Literal["list", "dict"] | None:
    annotation = context.dagster_type.typing_type
    origin = typing.get_origin(annotation) or annotation
    if origin in (dict, Mapping):
        return "dict"
    if origin in (list, Sequence):
        return "list"
    return None


class _Facts:
    """The one tally over the stored answers: what they say beyond the write report.

    Engines, server time, seeds, the requests (so an output of your own ``@asset`` has
    its ``request`` metadata as a factory's has) and the data version.
    """

    def __init__(self) -> None:
        self.engines: set[str] = set()
        self.prediction_time_ms = 0.0
        self.seeds: list[int] = []  # every image's, removed ones included (as generation's)
        self.requests: list[ImageGenerationRequest] = []  # the first few
        self.request_count = 0
        self.version = DataVersionDigest()

    def add(self, answer: ImageGenerationResponse) -> None:
        if answer.request is not None:
            self.engines.add(answer.request.engine.value)
            self.request_count += 1
            if len(self.requests) < _REQUESTS_LISTED:
                self.requests.append(answer.request)
        self.prediction_time_ms += answer.prediction_time_ms
        if len(self.seeds) < _METADATA_LIST_MAX:
            self.seeds.extend(answer.seeds[: _METADATA_LIST_MAX - len(self.seeds)])
        self.version.add(answer)

    def request_metadata(self) -> dict[str, Any]:
        """``request`` (one request) or the first ``requests``, as the factories record them."""
        if self.request_count == 1:
            (request,) = self.requests
            width, height = request.size
            return {
                "request": MetadataValue.json(request.summary()),
                "request_fingerprint": MetadataValue.text(request.fingerprint()),
                "model_assets": MetadataValue.json(model_assets(request)),
                "size": MetadataValue.text(f"{width}x{height}"),
            }
        if self.request_count > 1:
            return {"requests": MetadataValue.json([q.summary() for q in self.requests])}
        return {}

    def observe(
        self, answers: Iterable[ImageGenerationResponse]
    ) -> Iterator[ImageGenerationResponse]:
        """``answers`` as they are, each one added as it passes (for lazy batches too)."""
        for answer in answers:
            self.add(answer)
            yield answer


def _output_metadata(report: WriteReport, facts: _Facts) -> dict[str, Any]:
    """One key per fact, named as the generation metadata names it (so none is said twice
    under two names when both are recorded): ``dagster/uri`` is the output's prefix, with
    its partition."""
    metadata: dict[str, Any] = {
        "dagster/uri": MetadataValue.path(report.uri),
        "manifest_uri": MetadataValue.path(report.manifest_uri),
        "images": MetadataValue.int(report.image_count + report.removed_count),
        "removed_for_safety": MetadataValue.int(report.removed_count),
        "seeds": MetadataValue.json(facts.seeds),
        "image_uris": MetadataValue.json(report.image_uris[:_METADATA_LIST_MAX]),
        "total_bytes": MetadataValue.int(report.total_bytes),
        "reused": MetadataValue.int(report.reused_count),
        "engine": MetadataValue.text(", ".join(sorted(facts.engines))),
        "prediction_time_ms": MetadataValue.float(facts.prediction_time_ms),
        **facts.request_metadata(),
    }
    if report.thumbnail is not None and report.image_uris:
        first, seed = report.image_uris[0], report.seeds[0]
        # One small JPEG (a few KB), captioned as the generation metadata captions them.
        metadata["thumbnail"] = MetadataValue.md(
            f"![seed {seed}]({report.thumbnail}) seed {seed}\n\n"
            f"First of {report.image_count}: `{first}`\n\nAll images: `{report.uri}`"
        )
    return metadata
