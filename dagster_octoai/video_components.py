"""Dagster Components for video: a video asset and the video IO managers, in YAML.

- :class:`OctoAIVideoAssetComponent`: one :func:`~dagster_octoai.video_assets.octoai_video_asset`;
  its ``template`` is a :class:`~dagster_octoai.api.video.VideoGenerationRequest` without
  ``image``, judged by the same model as the client and the server.
- :class:`S3VideoIOManagerComponent`, :class:`LocalVideoIOManagerComponent`: the video IO
  managers, with the image IO managers' settings (S3 credentials from boto3's chain).
"""

from __future__ import annotations

from typing import Any

from dagster import ComponentLoadContext, Definitions, StaticPartitionsDefinition
from dagster.components import Component, ComponentTypeSpec, Model, Resolvable
from pydantic import Field

from .components import _LocalFields, _S3Fields, _shared
from .video_assets import LocalVideoIOManager, S3VideoIOManager, octoai_video_asset

__all__ = [
    "LocalVideoIOManagerComponent",
    "OctoAIVideoAssetComponent",
    "S3VideoIOManagerComponent",
]


class OctoAIVideoAssetComponent(Component, Resolvable, Model):
    """A video asset: per partition, an upstream image asset's picture animated by SVD."""

    name: str = Field(description="The asset's key, segments joined by '/'.")
    image: str = Field(description="The upstream image asset's key, segments joined by '/'.")
    template: dict[str, Any] = Field(
        default_factory=dict,
        description="The request's fields but image (seed, fps, motion_scale, ...).",
    )
    partition_keys: list[str] | None = Field(
        default=None, description="Static partitions (the upstream asset's, one clip per item)."
    )
    io_manager_key: str = Field(default="video_io_manager", description="A video IO manager.")
    resource_key: str = Field(default="octoai", description="The OctoAIResource's key.")
    group_name: str | None = Field(default=None, description="The asset's group.")

    @classmethod
    def get_spec(cls) -> ComponentTypeSpec:
        """What ``dg list components`` shows."""
        return ComponentTypeSpec(
            description="A video asset (OctoAI /generate/svd) animating an upstream image asset.",
            tags=["octoai"],
            produces=["asset"],
        )

    def build_defs(self, context: ComponentLoadContext) -> Definitions:
        """The asset (its template validated now)."""
        *prefix, name = self.name.split("/")
        partitions = (
            StaticPartitionsDefinition(self.partition_keys) if self.partition_keys else None
        )
        asset = octoai_video_asset(
            name,
            image=self.image.split("/"),
            template=self.template,
            partitions_def=partitions,
            io_manager_key=self.io_manager_key,
            resource_key=self.resource_key,
            group_name=self.group_name,
            key_prefix=prefix or None,
        )
        return Definitions(assets=[asset])


class S3VideoIOManagerComponent(_S3Fields, Component, Resolvable):
    """Binds an :class:`~dagster_octoai.video_assets.S3VideoIOManager` under ``resource_key``."""

    resource_key: str = Field(default="video_io_manager", description="Key to bind it under.")

    @property
    def resource(self) -> S3VideoIOManager:
        settings = self.model_dump(exclude={"resource_key"}, exclude_none=True)
        return _shared("s3-videos", settings, lambda: S3VideoIOManager(**settings))

    @classmethod
    def get_spec(cls) -> ComponentTypeSpec:
        """What ``dg list components`` shows."""
        return ComponentTypeSpec(
            description="An S3VideoIOManager: generated videos and manifests in S3.",
            tags=["octoai"],
            produces=["resource"],
        )

    def build_defs(self, context: ComponentLoadContext) -> Definitions:
        """The IO manager, under ``resource_key``."""
        return Definitions(resources={self.resource_key: self.resource})


class LocalVideoIOManagerComponent(_LocalFields, Component, Resolvable):
    """Binds a :class:`~dagster_octoai.video_assets.LocalVideoIOManager` under ``resource_key``."""

    resource_key: str = Field(default="video_io_manager", description="Key to bind it under.")

    @property
    def resource(self) -> LocalVideoIOManager:
        settings = self.model_dump(exclude={"resource_key"}, exclude_none=True)
        return _shared("local-videos", settings, lambda: LocalVideoIOManager(**settings))

    @classmethod
    def get_spec(cls) -> ComponentTypeSpec:
        """What ``dg list components`` shows."""
        return ComponentTypeSpec(
            description="A LocalVideoIOManager: generated videos and manifests in a directory.",
            tags=["octoai"],
            produces=["resource"],
        )

    def build_defs(self, context: ComponentLoadContext) -> Definitions:
        """The IO manager, under ``resource_key``."""
        return Definitions(resources={self.resource_key: self.resource})
