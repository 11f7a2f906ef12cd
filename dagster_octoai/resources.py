"""``OctoAIResource``: one pooled client per run, and usage recorded on each output.

The resource builds one :class:`~dagster_octoai.api.client.OctoAIClient` in
``setup_for_execution`` and closes it in ``teardown_after_execution``. Assets and
ops reach it through :meth:`OctoAIResource.get_client`, a context manager that
yields an :class:`OctoAISession`: a thin handle of its own that delegates to the
shared client and counts what *this* output used. The shared client is never
wrapped or changed, and nothing is kept in module globals, so two assets in one
run (or two outputs of a multi-asset) each get their own, correct numbers.
"""

# No `from __future__ import annotations`: Dagster reads the `ResourceDependency` annotation
# of `s3` when the class is made (a string would not be recognised as one).

import threading
import typing
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from dagster import (
    AssetExecutionContext,
    AssetKey,
    Config,
    ConfigurableResource,
    DagsterError,
    DagsterInvariantViolationError,
    EnvVar,
    InitResourceContext,
    MultiPartitionsDefinition,
    OpExecutionContext,
    ResourceDependency,
    RetryRequested,
)
from pydantic import Field, PrivateAttr, ValidationError, field_validator, model_validator

from ._warnings import warnings_to_log
from .api.batch import ImageBatch, UnstorableValueError
from .api.client import DEFAULT_BASE_URL, HTTPRetryPolicy, OctoAIClient
from .api.errors import RateLimitError
from .api.models import (
    AsyncJob,
    Engine,
    ImageGenerationRequest,
    ImageGenerationResponse,
    PollResult,
)
from .io_managers import S3ConnectionConfig, preflight_store, s3_resource_field
from .metadata import Usage
from .storage.backends import LocalBackend, StorageBackend
from .storage.ledger import JobLedger

__all__ = ["JobLedgerResource", "OctoAIResource", "OctoAISession"]

RequestLike = ImageGenerationRequest | Mapping[str, Any]
ExecutionContext = AssetExecutionContext | OpExecutionContext


class OctoAISession:
    """The handle :meth:`OctoAIResource.get_client` yields: the shared client, counted.

    Each call delegates to the run's pooled client and adds its answer to this
    session's :class:`~dagster_octoai.Usage`. Every answer carries the request that
    produced it (``answer.request``), so an asset can return it as it is for an image IO
    manager to store. Sessions are cheap, one per output, and safe to use from several
    threads.

    Examples:
        >>> from dagster_octoai.api.client import OctoAIClient
        >>> session = OctoAISession(OctoAIClient("t", base_url="http://127.0.0.1:9"))
        >>> session.usage.images
        0
    """

    def __init__(self, client: OctoAIClient) -> None:
        self._client = client
        self._usage = Usage()
        self._lock = threading.Lock()

    @property
    def usage(self) -> Usage:
        """A copy of what this session's calls have used so far."""
        with self._lock:
            copy = Usage()
            copy.merge(self._usage)
            return copy

    def _record(self, response: ImageGenerationResponse) -> ImageGenerationResponse:
        with self._lock:
            self._usage.add(response)
        return response

    def generate(
        self, request: RequestLike, *, engine: Engine | str | None = None
    ) -> ImageGenerationResponse:
        """Generate images and wait; see :meth:`OctoAIClient.generate`.

        Examples:
            .. code-block:: python

                @asset(io_manager_key="images")
                def fox(context: AssetExecutionContext, octoai: OctoAIResource) -> ImageGenerationResponse:
                    with octoai.get_client(context) as session:
                        return session.generate({"prompt": "a red fox", "seed": 7})
        """
        return self._record(self._client.generate(request, engine=engine))

    def iter_generate(
        self,
        requests: Iterable[RequestLike],
        *,
        engine: Engine | str | None = None,
        max_concurrency: int | None = None,
    ) -> Iterator[tuple[int, ImageGenerationResponse]]:
        """Generate a batch, yielding ``(input index, answer)`` as each completes.

        Requests are validated as they are pulled, so a bad one fails before it is sent,
        and at most ``max_concurrency`` answers are held: ``(a for _, a in ...)`` feeds a
        lazy :class:`ImageBatch` of any size.
        """
        validated = (ImageGenerationRequest.build(r, engine=engine) for r in requests)
        for index, response in self._client.iter_generate(
            validated, max_concurrency=max_concurrency
        ):
            yield index, self._record(response)

    def generate_many(
        self,
        requests: Iterable[RequestLike],
        *,
        engine: Engine | str | None = None,
        max_concurrency: int | None = None,
    ) -> list[ImageGenerationResponse]:
        """Generate a batch concurrently; answers in input order. A failure raises."""
        out = dict(self.iter_generate(requests, engine=engine, max_concurrency=max_concurrency))
        return [out[i] for i in range(len(out))]

    def submit(
        self,
        request: RequestLike,
        *,
        engine: Engine | str | None = None,
        idempotency_key: str | None = None,
    ) -> AsyncJob:
        """Start an async generation; its usage is counted when it is fetched.

        ``idempotency_key``: see :meth:`~dagster_octoai.OctoAIClient.submit`.
        """
        return self._client.submit(request, engine=engine, idempotency_key=idempotency_key)

    def poll(self, job: AsyncJob) -> PollResult:
        """Poll an async job once."""
        return self._client.poll(job)

    def cancel(self, job: AsyncJob) -> PollResult:
        """Cancel an async job; see :meth:`~dagster_octoai.OctoAIClient.cancel`."""
        return self._client.cancel(job)

    def fetch(self, job: AsyncJob) -> ImageGenerationResponse:
        """Fetch a completed async job's answer (and count it); it carries the job's request
        and ``response_id``."""
        return self._record(self._client.fetch(job))

    def wait(self, job: AsyncJob, timeout: float = 600.0) -> ImageGenerationResponse:
        """Poll until the job completes, then fetch it (and count it); see :meth:`fetch`."""
        return self._record(self._client.wait(job, timeout=timeout))

    def __repr__(self) -> str:
        return f"OctoAISession(client={self._client!r}, images={self._usage.images})"


class HTTPRetryConfig(Config, HTTPRetryPolicy):
    """:class:`HTTPRetryPolicy` as Dagster config (``OctoAIResource(retry=...)``): its fields,
    bounds and defaults, written once in the client layer.

    Examples:
        >>> OctoAIResource(token="t", retry=HTTPRetryConfig(max_attempts=2)).retry_policy().max_attempts
        2
    """


class OctoAIResource(ConfigurableResource):  # type: ignore[type-arg]
    """OctoAI image generation for Dagster assets and ops.

    Supply the token with ``EnvVar("OCTOAI_TOKEN")`` (or leave it unset: the
    client then reads ``OCTOAI_TOKEN`` itself). The field is marked secret, so
    Dagster masks it in config it displays; but a literal string would still be
    stored in the resource's configured values, so never pass one. The server is
    ``base_url``, or the ``OCTOAI_BASE_URL`` environment variable when it is unset.

    A ``RateLimitError`` that survives the client's retries (quota exhausted)
    leaves :meth:`get_client` as Dagster's ``RetryRequested`` with the server's
    ``Retry-After``, so the step is retried later instead of failing.

    Examples:
        .. code-block:: python

            from dagster import AssetExecutionContext, Definitions, EnvVar, asset
            from dagster_octoai import ImageGenerationResponse, OctoAIResource, S3ImageIOManager

            @asset(io_manager_key="images")
            def fox(context: AssetExecutionContext, octoai: OctoAIResource) -> ImageGenerationResponse:
                with octoai.get_client(context) as session:
                    return session.generate({"prompt": "a red fox", "seed": 7})

            defs = Definitions(
                assets=[fox],
                resources={
                    "octoai": OctoAIResource(token=EnvVar("OCTOAI_TOKEN")),
                    "images": S3ImageIOManager(bucket="images"),
                },
            )
    """

    token: str | None = Field(
        default=None,
        repr=False,
        description=(
            "API token. Set it with EnvVar('OCTOAI_TOKEN'); unset, the client reads "
            "the OCTOAI_TOKEN environment variable."
        ),
        json_schema_extra={"dagster__is_secret": True},
    )
    base_url: str | None = Field(
        default=None,
        description=(
            "The OctoAI-compatible server's base URL. Unset: the OCTOAI_BASE_URL environment "
            f"variable, else {DEFAULT_BASE_URL} (where `dagster-octoai serve` listens)."
        ),
    )
    timeout_s: float = Field(
        default=120.0, gt=0, description="Timeout of one HTTP attempt, seconds."
    )
    retry: HTTPRetryConfig = Field(
        default_factory=lambda: HTTPRetryConfig(),
        description=(
            "How the client retries one HTTP call: max_attempts, initial_backoff_s, "
            "max_backoff_s, max_retry_after_s, deadline_s (HTTPRetryPolicy's fields and rules)."
        ),
    )
    # The flat spellings of `retry`'s fields from before it was nested, kept so existing
    # config goes on working; unset here, they are judged by the same policy.
    max_attempts: int | None = Field(default=None, description="Deprecated: retry.max_attempts.")
    initial_backoff_s: float | None = Field(
        default=None, description="Deprecated: retry.initial_backoff_s."
    )
    max_backoff_s: float | None = Field(
        default=None, description="Deprecated: retry.max_backoff_s."
    )
    max_retry_after_s: float | None = Field(
        default=None, description="Deprecated: retry.max_retry_after_s."
    )
    deadline_s: float | None = Field(default=None, description="Deprecated: retry.deadline_s.")
    max_concurrency: int = Field(
        default=4, ge=1, description="Generations in flight at once: the endpoint's replica count."
    )
    trusted_origins: list[str] = Field(
        default_factory=list,
        description=(
            "Origins (scheme://host[:port]) besides base_url's that the server's poll_url "
            "and response_url may point at; the token is never sent anywhere else."
        ),
    )
    rate_limit_step_retries: int = Field(
        default=3,
        ge=0,
        description="Step retries requested when the quota is exhausted (429 after the client's retries).",
    )
    rate_limit_default_wait_s: float = Field(
        default=60.0,
        ge=0,
        description="Wait before such a step retry when the server sent no Retry-After.",
    )
    prices: dict[str, float] = Field(
        default_factory=dict,
        description=(
            "Price of one image per engine (sdxl, sd, controlnet-sdxl, controlnet-sd15, ssd, sd3, "
            "flux-schnell, flux-dev; OctoAI's published ones: dagster_octoai.api.models."
            "LIST_PRICES), in "
            "your currency; an image made with a premium sampler costs twice that. An engine "
            "not listed counts 1.0, so without prices octoai/cost counts standard images."
        ),
    )

    @field_validator("prices")
    @classmethod
    def _check_prices(cls, value: dict[str, float]) -> dict[str, float]:
        engines = [e.value for e in Engine]
        for engine, price in value.items():
            if engine not in engines:
                raise ValueError(
                    f"prices: {engine!r} is not an engine; allowed: {', '.join(engines)}"
                )
            if not price >= 0:
                raise ValueError(f"prices[{engine!r}]: {price!r} must be a number >= 0")
        return value

    _client: OctoAIClient | None = PrivateAttr(None)

    @classmethod
    def _is_dagster_maintained(cls) -> bool:
        return False

    @model_validator(mode="after")
    def _check_retry(self) -> "OctoAIResource":
        self.retry_policy()  # a bad or doubly set retry field fails when the resource is built
        return self

    def retry_policy(self) -> HTTPRetryPolicy:
        """The client's retry policy: ``retry``, with any deprecated flat field set over it.

        Raises:
            ValueError: a field is set both in ``retry`` and flat, or breaks a rule of
                :class:`HTTPRetryPolicy` (named, with what is allowed).
        """
        flat = {name: getattr(self, name) for name in _FLAT_RETRY_FIELDS}
        flat = {name: value for name, value in flat.items() if value is not None}
        nested = self.retry.model_dump()
        if not flat:
            return HTTPRetryPolicy(**nested)
        both = sorted(set(flat) & set(self.retry.model_fields_set))
        if both:
            raise ValueError(
                f"OctoAIResource: {', '.join(both)} set both flat and in retry; set "
                f"retry.{both[0]} only (the flat fields are deprecated)"
            )
        try:
            return HTTPRetryPolicy(**{**nested, **flat})
        except ValidationError as exc:
            error = exc.errors()[0]
            raise ValueError(
                f"OctoAIResource: {error['loc'][0]}: {error['msg']} (as retry.{error['loc'][0]})"
            ) from None

    def _new_client(self) -> OctoAIClient:
        token = self.token
        # Outside a run (direct use, tests) Dagster has not resolved an EnvVar yet.
        if isinstance(token, EnvVar):
            token = token.get_value()
        return OctoAIClient(
            token,
            base_url=self.base_url,
            timeout=self.timeout_s,
            retry=self.retry_policy(),
            max_concurrency=self.max_concurrency,
            trusted_origins=self.trusted_origins,
        )

    def setup_for_execution(self, context: InitResourceContext) -> None:
        self._client = self._new_client()

    def teardown_after_execution(self, context: InitResourceContext) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    @property
    def client(self) -> OctoAIClient:
        """The run's pooled client (calls through it are not counted on any output)."""
        if self._client is None:
            # Direct use outside a run (e.g. a notebook): build lazily, once.
            self._client = self._new_client()
        return self._client

    @contextmanager
    def get_client(
        self,
        context: ExecutionContext,
        *,
        asset_key: AssetKey | str | None = None,
        output_name: str | None = None,
    ) -> Iterator[OctoAISession]:
        """A session whose usage is recorded as metadata on one output when the block ends.

        Before the block runs, the output is checked against its IO manager where that
        can be known without generating: an image IO manager's store must be usable
        (``preflight``), and an output annotated with a type it cannot store (``bytes``,
        ``PIL.Image.Image``...) is refused. Either way nothing has been paid for yet.

        Args:
            context: The asset's or op's context.
            asset_key: In a multi-asset, the asset whose output gets the usage.
            output_name: In a multi-output op, the output that gets the usage.

        Yields:
            An :class:`OctoAISession` for this output only.

        Raises:
            RetryRequested: the quota is exhausted (429 after the client's retries).
            UnstorableValueError: the output's image IO manager cannot store its type.
            StorageError: the output's image IO manager cannot store anything now.
        """
        _check_output(context, asset_key, output_name, lazy=False)
        session = OctoAISession(self.client)
        # A PromptTooLongWarning of a request made in the block goes to the event log.
        with warnings_to_log(context.log), self._failures(context, session, retry_on_quota=True):
            yield session
        _record_usage(
            context,
            session.usage,
            asset_key=asset_key,
            output_name=output_name,
            prices=self.prices,
        )

    def stream(
        self,
        context: ExecutionContext,
        requests: Iterable[RequestLike],
        *,
        engine: Engine | str | None = None,
        max_concurrency: int | None = None,
        expected_images: int | None = None,
    ) -> ImageBatch:
        """A lazy :class:`ImageBatch` generated while the image IO manager stores it.

        The way to make a large batch (hundreds of images) in one asset: return this
        from the asset. Nothing is sent until the IO manager iterates the batch; then
        requests go out ``max_concurrency`` at a time and each answer is uploaded as
        it arrives, so memory stays bounded whatever the batch's size. The usage
        (``octoai/images``, ``octoai/steps``...) is counted as the batch is generated
        and added to the output's metadata by the image IO manager once it is stored.
        Images are indexed in completion order; each manifest record holds its request.

        Validate the requests first if a bad one late in the batch would waste the
        ones before it: requests are checked as they are pulled.
        :func:`~dagster_octoai.octoai_image_asset` with ``requests=`` does that.

        Args:
            context: The asset's context (for the step log).
            requests: Requests or dicts, pulled lazily (a generator is fine).
            engine: Engine of requests that do not name one.
            max_concurrency: Requests in flight; the resource's ``max_concurrency``
                when unset.
            expected_images: Shown in the batch's repr; not enforced.

        Returns:
            A lazy batch for :class:`~dagster_octoai.S3ImageIOManager` or
            :class:`~dagster_octoai.LocalImageIOManager` (it can be iterated once).

        Raises:
            UnstorableValueError: the output is not stored by an image IO manager (no
                other can store a lazy batch); nothing was generated.
            StorageError: the image IO manager cannot store anything now.

        Examples:
            .. code-block:: python

                @asset(io_manager_key="images")
                def frames(context: AssetExecutionContext, octoai: OctoAIResource) -> ImageBatch:
                    requests = ({"prompt": f"frame {i}", "seed": i} for i in range(500))
                    return octoai.stream(context, requests, expected_images=500)
        """
        _check_output(context, None, None, lazy=True)
        session = OctoAISession(self.client)

        def results() -> Iterator[ImageGenerationResponse]:
            # Runs inside the IO manager's handle_output: a step retry cannot be asked
            # for from there, so an exhausted quota fails the step like any error.
            with self._failures(context, session, retry_on_quota=False):
                for _index, answer in session.iter_generate(
                    requests, engine=engine, max_concurrency=max_concurrency
                ):
                    yield answer

        return ImageBatch(
            results(),
            expected_images=expected_images,
            late_metadata=lambda: session.usage.to_metadata(prices=self.prices),
        )

    @contextmanager
    def _failures(
        self, context: ExecutionContext, session: OctoAISession, *, retry_on_quota: bool
    ) -> Iterator[None]:
        """Quota exhausted -> step retry (where Dagster allows it); any failure -> paid count."""
        try:
            yield
        except RateLimitError as exc:
            if not retry_on_quota:
                _warn_paid(context, session)
                raise
            wait = (
                exc.retry_after if exc.retry_after is not None else self.rate_limit_default_wait_s
            )
            context.log.warning(
                f"OctoAI quota exhausted ({exc.message}); asking Dagster to retry the step "
                f"in {wait:g} s"
            )
            raise RetryRequested(
                max_retries=self.rate_limit_step_retries, seconds_to_wait=wait
            ) from exc
        except BaseException:
            _warn_paid(context, session)
            raise


def _check_output(
    context: ExecutionContext,
    asset_key: AssetKey | str | None,
    output_name: str | None,
    *,
    lazy: bool,
) -> None:
    """What can be known of storing an output before anything is generated for it.

    The output's IO manager is looked up as Dagster will use it. An image IO manager
    (one with ``check_output_type``) is asked whether the output's declared type can be
    stored and whether its store is usable (``preflight``). A lazy batch can only be
    stored by an image IO manager.
    """
    try:
        name = output_name or _output_name(context, asset_key)
        if name is None and len(context.op_def.output_defs) == 1:
            name = context.op_def.output_defs[0].name
        out = None if name is None else context.op_def.output_def_named(name)
    except DagsterError:
        return  # a context built for a test, bound to no definition
    if out is None:
        return
    io_manager = getattr(context.resources, out.io_manager_key, None)
    check = getattr(io_manager, "check_output_type", None)
    where = _output_label(context, name)
    if check is None:
        if lazy:
            raise UnstorableValueError(
                f"octoai.stream() makes a lazy ImageBatch, generated while an image IO manager "
                f"stores it, but {where} is stored by IO manager {out.io_manager_key!r} "
                f"({type(io_manager).__name__}), which cannot store it; give it "
                "io_manager_key= of an S3ImageIOManager or LocalImageIOManager. Nothing was "
                "generated or paid for."
            )
        return
    check(out.dagster_type.typing_type, where)
    asset = None
    if context.has_assets_def and name is not None:
        asset = context.assets_def.keys_by_output_name.get(name)
    if _runs_a_range(context):
        annotation = out.dagster_type.typing_type
        origin = typing.get_origin(annotation) or annotation
        if isinstance(origin, type) and issubclass(
            origin, (ImageGenerationResponse, ImageBatch, list)
        ):
            keys = context.partition_keys
            raise UnstorableValueError(
                f"{where} is annotated to return {getattr(origin, '__name__', origin)}, but this "
                f"run covers {len(keys)} partitions ({keys[0]} to {keys[-1]}), each stored "
                "under its own partition: return {partition_key: answer} (annotated "
                "dict[str, ImageGenerationResponse], or not at all). Nothing was generated or "
                "paid for."
            )
        # One check for every partition of the range, each stored under its own key.
        preflight_store(
            context.resources, out.io_manager_key, asset, partition_keys=_range_keys(context)
        )
        return
    partition = context.partition_key if context.has_partition_key else None
    preflight_store(context.resources, out.io_manager_key, asset, partition)


def _runs_a_range(context: ExecutionContext) -> bool:
    """Whether this step materializes a partition range (a single-run backfill)."""
    return (
        not context.has_partition_key
        and context.has_partition_key_range
        and len(context.partition_keys) > 1
    )


def _range_keys(context: ExecutionContext) -> list[str]:
    keys: list[str] = list(context.partition_keys)
    partitions_def = context.assets_def.partitions_def if context.has_assets_def else None
    if isinstance(partitions_def, MultiPartitionsDefinition):
        keys = [partitions_def.get_partition_key_from_str(k) for k in keys]
    return keys


def _output_label(context: ExecutionContext, output_name: str | None) -> str:
    if context.has_assets_def and output_name is not None:
        key = context.assets_def.keys_by_output_name.get(output_name)
        if key is not None:
            return f"asset {key.to_user_string()!r}"
    return f"output {output_name!r} of op {context.op_def.name!r}"


def _warn_paid(context: ExecutionContext, session: OctoAISession) -> None:
    usage = session.usage
    if usage.images:
        context.log.warning(
            f"OctoAI: {usage.images} images were generated (and paid for) before the step failed"
        )


def _record_usage(
    context: ExecutionContext,
    usage: Usage,
    *,
    asset_key: AssetKey | str | None,
    output_name: str | None,
    prices: Mapping[str, float],
) -> None:
    metadata = usage.to_metadata(prices=prices)
    try:
        if output_name is None:
            output_name = _output_name(context, asset_key)
        context.add_output_metadata(metadata, output_name=output_name)
    except DagsterInvariantViolationError:
        # The block ended after the output was yielded: a lazy ImageBatch generating
        # inside get_client while the IO manager stores it. Failing here would throw
        # away images already paid for and stored, so say what was used instead.
        context.log.warning(
            f"OctoAI usage of {usage.images} images in {usage.calls} calls could not be "
            "added to the output's metadata: get_client's block ended after the output "
            "was yielded. To stream a batch with its usage recorded, return "
            "octoai.stream(context, requests) instead."
        )
    except DagsterError:
        # A context built for a test and not bound to an invocation holds no outputs
        # (Dagster raises its invalid-property error, which it does not export).
        context.log.info(f"OctoAI usage: {usage.images} images in {usage.calls} calls")


def _output_name(context: ExecutionContext, asset_key: AssetKey | str | None) -> str | None:
    """The output of ``asset_key`` (or of the only asset): asset checks are outputs too."""
    if not context.has_assets_def:
        return None
    assets_def = context.assets_def
    if asset_key is None:
        if len(assets_def.keys) != 1:
            return None
        key = assets_def.key
    else:
        key = AssetKey.from_coercible(asset_key)
    return assets_def.get_output_name_for_asset_key(key)


#: The retry fields OctoAIResource took flat before ``retry`` (deprecated spellings).
_FLAT_RETRY_FIELDS = (
    "max_attempts",
    "initial_backoff_s",
    "max_backoff_s",
    "max_retry_after_s",
    "deadline_s",
)


class JobLedgerResource(ConfigurableResource["JobLedgerResource"], S3ConnectionConfig):
    """The job ledger as a Dagster resource: a local directory or an S3 bucket and prefix.

    Set ``base_dir`` for a local directory, or ``bucket`` (with ``prefix``) for S3. The S3
    connection comes from a dagster-aws ``S3Resource`` (``s3=``, the same one the image
    IO manager takes: one S3 configuration for both), or, without one, from the fields
    below. Credentials come from ``EnvVar``\\ s or boto3's default chain and are never
    written to the ledger.

    Examples:
        >>> import tempfile
        >>> res = JobLedgerResource(base_dir=tempfile.mkdtemp())
        >>> res.get_ledger().list_open()
        []
    """

    base_dir: str | None = Field(
        default=None, description="Local directory of the ledger (development, single machine)."
    )
    bucket: str | None = Field(default=None, description="S3 bucket of the ledger.")
    prefix: str = Field(default="octoai-jobs", description="Key prefix inside the bucket.")
    fsync: bool = Field(
        default=True, description="Local directory only: flush each write to disk before going on."
    )
    # Typed as Dagster reads a nested resource (an Optional[...] would not be); None: unset.
    s3: ResourceDependency[Any] = s3_resource_field()

    _ledger: JobLedger | None = PrivateAttr(None)

    def get_ledger(self) -> JobLedger:
        """The ledger (built once per resource instance)."""
        if self._ledger is None:
            if self.base_dir is not None and self.bucket is None:
                self._ledger = JobLedger(LocalBackend(self.base_dir, fsync=self.fsync))
            else:
                self._ledger = JobLedger(self._s3_backend(), self.prefix)
        return self._ledger

    def _s3_backend(self) -> StorageBackend:
        if (self.base_dir is None) == (self.bucket is None):
            raise ValueError(
                "JobLedgerResource: set exactly one of base_dir (a local directory) "
                "or bucket (S3); got " + ("both" if self.base_dir is not None else "neither")
            )
        assert self.bucket is not None
        # A sensor's poll workers share the client.
        return self.s3_backend(self.bucket, max_pool_connections=64)
