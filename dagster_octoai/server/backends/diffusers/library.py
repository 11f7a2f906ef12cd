"""The asset library on disk: which checkpoints, LoRAs, ... a model directory holds.

Layout (``dagster-octoai tiny-models`` writes it; real weights go in the same places)::

    DIR/<family>/base/                         the engines' default checkpoint (diffusers folder)
    DIR/sdxl/refiner/                          the SDXL refiner (diffusers folder, optional)
    DIR/<family>/checkpoints/NAME/ | NAME.safetensors
    DIR/<family>/controlnets/NAME/             ControlNets (diffusers folders)
    DIR/<family>/loras/NAME.safetensors | NAME/ (a folder with one .safetensors file)
    DIR/<family>/textual_inversions/NAME.safetensors | NAME.bin | NAME.pt
    DIR/<family>/vaes/NAME/ | NAME.safetensors
    DIR/flux/schnell/ DIR/flux/dev/            FLUX.1 [schnell] and [dev] (diffusers folders)
    DIR/flux/loras/NAME.safetensors            FLUX LoRAs, shared by both
    DIR/sdxl/ip_adapters/NAME/                 photo merge: an IP-Adapter file, image_encoder/

``<family>`` is ``sdxl`` (engines ``sdxl``, ``controlnet-sdxl``), ``sd15`` (``sd``,
``controlnet-sd15``), ``ssd`` (SSD-1B, the SDXL layout) or ``sd3``; FLUX's families
``flux-schnell`` and ``flux-dev`` live in ``flux/``. A request names an asset the way OctoAI's did: ``octoai:NAME`` (the
public library) and ``NAME`` (a private asset) both resolve to ``NAME`` here, since an
operator's directory is the only library this server has.

This module reads the file system only (no torch). A kind's listing is cached and read
again only when its folder changes (its modification time), so checking a request costs a
``stat`` per kind it names, whatever the number of names. No message of this module names
an absolute path: a caller learns names relative to the model directory, nothing of the
server's disk.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ....api.models import Engine, ImageGenerationRequest

__all__ = [
    "ASSET_KINDS",
    "FAMILIES",
    "FLOW_FAMILIES",
    "XL_FAMILIES",
    "AssetKind",
    "Family",
    "ModelLibrary",
    "family_of",
]

Family = Literal["sdxl", "sd15", "ssd", "sd3", "flux-schnell", "flux-dev"]
FAMILIES: tuple[Family, ...] = ("sdxl", "sd15", "ssd", "sd3", "flux-schnell", "flux-dev")
#: The families run by diffusers' SDXL pipelines (their text encoders, LoRAs, TIs).
XL_FAMILIES: frozenset[Family] = frozenset({"sdxl", "ssd"})
#: The flow-matching families (FLUX.1, SD3), served by :mod:`.flow`.
FLOW_FAMILIES: frozenset[Family] = frozenset({"sd3", "flux-schnell", "flux-dev"})
AssetKind = Literal["checkpoints", "controlnets", "loras", "textual_inversions", "vaes"]
ASSET_KINDS: tuple[AssetKind, ...] = (
    "checkpoints",
    "controlnets",
    "loras",
    "textual_inversions",
    "vaes",
)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".ckpt")
# The request field that names each kind of asset.
_FIELD: dict[AssetKind, str] = {
    "checkpoints": "checkpoint",
    "controlnets": "controlnet",
    "loras": "loras",
    "textual_inversions": "textual_inversions",
    "vaes": "vae",
}
#: A 422 lists at most this many of the library's names of a kind.
LISTED_NAMES = 50


def family_of(engine: Engine) -> Family:
    """The model family an engine runs (``sdxl``, ``sd15``, ``ssd``, ``sd3``, ``flux-*``)."""
    if engine is Engine.SSD:
        return "ssd"
    if engine is Engine.SD3:
        return "sd3"
    if engine is Engine.FLUX_SCHNELL:
        return "flux-schnell"
    if engine is Engine.FLUX_DEV:
        return "flux-dev"
    return "sdxl" if engine.is_sdxl else "sd15"


def asset_name(name: str) -> str:
    """The name in this directory: ``octoai:NAME`` and ``NAME`` are the same asset here."""
    return name.removeprefix("octoai:")


def _is_diffusers_folder(path: Path) -> bool:
    return path.is_dir() and (
        (path / "model_index.json").is_file() or (path / "config.json").is_file()
    )


@dataclass(frozen=True)
class Asset:
    """One asset on disk: a diffusers folder or a single weights file."""

    kind: AssetKind
    name: str
    path: Path

    @property
    def single_file(self) -> bool:
        return self.path.is_file()

    def weights_file(self) -> Path:
        """The one weights file of a LoRA / textual inversion (a file, or a folder holding one)."""
        if self.path.is_file():
            return self.path
        files = sorted(p for p in self.path.iterdir() if p.suffix in _WEIGHT_SUFFIXES)
        if len(files) != 1:
            raise FileNotFoundError(
                f"{self.kind} {self.name!r}: its folder should hold one weights file, "
                f"found {len(files)}"
            )
        return files[0]


class ModelLibrary:
    """What a model directory holds, by family and kind; re-read when a folder changes.

    Examples:
        >>> ModelLibrary("/nonexistent")
        Traceback (most recent call last):
        ...
        NotADirectoryError: /nonexistent is not a model directory: ...
    """

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise NotADirectoryError(
                f"{self.root} is not a model directory: make one with "
                "'dagster-octoai tiny-models DIR' or lay out real weights as "
                "docs/diffusers-backend.md shows"
            )
        families = [f for f in FAMILIES if self.base(f) is not None]
        if not families:
            raise FileNotFoundError(
                f"{self.root} has no base model (sdxl/base, sd15/base, ssd/base, sd3/base, "
                "flux/schnell or flux/dev: a diffusers folder with model_index.json); see "
                "docs/diffusers-backend.md for the layout"
            )
        self.families: tuple[Family, ...] = tuple(families)
        # (family, kind) -> (the folder's mtime_ns, its assets); threads share it.
        self._listings: dict[tuple[Family, AssetKind], tuple[int, dict[str, Asset]]] = {}
        self._lock = threading.Lock()

    def folder(self, family: Family) -> Path:
        """The family's folder: ``DIR/<family>``, FLUX's two in ``DIR/flux``."""
        return self.root / self.relative_folder(family)

    @staticmethod
    def relative_folder(family: Family) -> str:
        """The family's folder relative to the model directory (what answers may name)."""
        return "flux" if family.startswith("flux-") else family

    def base(self, family: Family) -> Path | None:
        """The family's default checkpoint folder, or None when the directory has none."""
        if family.startswith("flux-"):
            path = self.root / "flux" / family.removeprefix("flux-")
        else:
            path = self.root / family / "base"
        return path if (path / "model_index.json").is_file() else None

    def ip_adapter(self, family: Family) -> Path | None:
        """The folder of the family's IP-Adapter for photo merge (the first by name), or None."""
        from .photo_merge import adapter_file

        folder = self.folder(family) / "ip_adapters"
        if family not in XL_FAMILIES or not folder.is_dir():
            return None
        found = [p for p in sorted(folder.iterdir()) if p.is_dir() and adapter_file(p)]
        return found[0] if found else None

    @property
    def engines(self) -> tuple[Engine, ...]:
        """The engines this directory has a base model for."""
        return tuple(e for e in Engine if family_of(e) in self.families)

    def refiner(self) -> Path | None:
        """The SDXL refiner folder, or None."""
        path = self.root / "sdxl" / "refiner"
        return path if (path / "model_index.json").is_file() else None

    def assets(self, family: Family, kind: AssetKind) -> dict[str, Asset]:
        """Every asset of a kind, by name (a file's name without its suffix); cached."""
        folder = self.folder(family) / kind
        try:
            changed = folder.stat().st_mtime_ns
        except OSError:
            return {}
        with self._lock:
            cached = self._listings.get((family, kind))
        if cached is not None and cached[0] == changed:
            return cached[1]
        found = self._list(folder, kind)
        with self._lock:
            self._listings[(family, kind)] = (changed, found)
        return found

    @staticmethod
    def _list(folder: Path, kind: AssetKind) -> dict[str, Asset]:
        if not folder.is_dir():
            return {}
        found: dict[str, Asset] = {}
        for path in sorted(folder.iterdir()):
            if path.name.startswith("."):
                continue
            # ControlNet files need a config beside them that diffusers would otherwise
            # fetch from a hub: ControlNets are diffusers folders here.
            if path.is_file() and path.suffix in _WEIGHT_SUFFIXES and kind != "controlnets":
                found.setdefault(path.stem, Asset(kind, path.stem, path))
            elif path.is_dir() and (
                _is_diffusers_folder(path) or kind in ("loras", "textual_inversions")
            ):
                found.setdefault(path.name, Asset(kind, path.name, path))
        return found

    def find(self, family: Family, kind: AssetKind, name: str) -> Asset | None:
        """The asset ``name`` (``octoai:`` prefix allowed) of a kind, or None."""
        return self.assets(family, kind).get(asset_name(name))

    def controlnet_preprocessor(self, asset: Asset) -> str | None:
        """The preprocessing a ControlNet gets: ``canny`` or none this server can run.

        A ``dagster-octoai.json`` in the ControlNet's folder may say
        ``{"preprocessor": "canny"}`` (or ``"none"``: the image is used as sent); without
        one, a name containing ``canny`` means Canny, as OctoAI's ``canny_sdxl`` did.
        """
        sidecar = asset.path / "dagster-octoai.json" if asset.path.is_dir() else None
        if sidecar is not None and sidecar.is_file():
            value = json.loads(sidecar.read_text()).get("preprocessor")
            return None if value in (None, "none") else str(value)
        return "canny" if "canny" in asset.name.lower() else None

    def missing(self, request: ImageGenerationRequest) -> list[tuple[tuple[str | int, ...], str]]:
        """(loc, message) of every asset the request names that this directory lacks."""
        family = family_of(request.engine)
        problems: list[tuple[tuple[str | int, ...], str]] = []
        if family not in self.families:
            problems.append(
                (
                    (),
                    f"engine {request.engine.value!r}: this server has no {family} models; "
                    "it serves: " + ", ".join(e.value for e in self.engines),
                )
            )
            return problems
        listed: set[AssetKind] = set()
        singles: list[tuple[AssetKind, str | None]] = [
            ("checkpoints", request.checkpoint),
            ("vaes", request.vae),
            ("controlnets", request.controlnet),
        ]
        for kind, name in singles:
            if name is not None and self.find(family, kind, name) is None:
                problems.append(((_FIELD[kind],), self._unknown(family, kind, name, listed)))
        many: tuple[tuple[AssetKind, list[str]], ...] = (
            ("loras", list(request.loras or {})),
            ("textual_inversions", list(request.textual_inversions or {})),
        )
        for kind, names in many:
            for name in names:
                if self.find(family, kind, name) is None:
                    problems.append(
                        ((_FIELD[kind], name), self._unknown(family, kind, name, listed))
                    )
        return problems

    def _unknown(self, family: Family, kind: AssetKind, name: str, listed: set[AssetKind]) -> str:
        """The message for an unknown name; the library's names only in a kind's first."""
        unknown = f"{_FIELD[kind]}: {name!r} is not in this server's {family} library"
        if kind in listed:
            return f"{unknown} (its names are listed above)"
        listed.add(kind)
        have = sorted(self.assets(family, kind))
        listing = ", ".join(have[:LISTED_NAMES]) if have else "none"
        if len(have) > LISTED_NAMES:
            listing += f" and {len(have) - LISTED_NAMES} more"
        return (
            f"{unknown}; it has: {listing} (an operator adds it under "
            f"{self.relative_folder(family)}/{kind})"
        )

    def describe(self) -> dict[str, object]:
        """The directory's contents by family and kind, JSON-ready."""
        out: dict[str, object] = {}
        for family in self.families:
            entry: dict[str, object] = {"base": True}
            if family == "sdxl":
                entry["refiner"] = self.refiner() is not None
            if family in XL_FAMILIES:
                adapter = self.ip_adapter(family)
                entry["photo_merge"] = None if adapter is None else adapter.name
            entry.update({kind: sorted(self.assets(family, kind)) for kind in ASSET_KINDS})
            out[family] = entry
        return out
