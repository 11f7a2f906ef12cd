"""The asset library on disk: which checkpoints, LoRAs, ... a model directory holds.

Layout (``dagster-octoai tiny-models`` writes it; real weights go in the same places)::

    DIR/<family>/base/                         the engines' default checkpoint (diffusers folder)
    DIR/sdxl/refiner/                          the SDXL refiner (diffusers folder, optional)
    DIR/<family>/checkpoints/NAME/ | NAME.safetensors
    DIR/<family>/controlnets/NAME/             ControlNets (diffusers folders)
    DIR/<family>/loras/NAME.safetensors | NAME/ (a folder with one .safetensors file)
    DIR/<family>/textual_inversions/NAME.safetensors | NAME.bin | NAME.pt
    DIR/<family>/vaes/NAME/ | NAME.safetensors

``<family>`` is ``sdxl`` (engines ``sdxl``, ``controlnet-sdxl``) or ``sd15`` (``sd``,
``controlnet-sd15``). A request names an asset the way OctoAI's did: ``octoai:NAME`` (the
public library) and ``NAME`` (a private asset) both resolve to ``NAME`` here, since an
operator's directory is the only library this server has.

This module reads the file system only (no torch), so checking a request is cheap.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ....api.models import Engine, ImageGenerationRequest

__all__ = ["ASSET_KINDS", "AssetKind", "Family", "ModelLibrary", "family_of"]

Family = Literal["sdxl", "sd15"]
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


def family_of(engine: Engine) -> Family:
    """The model family an engine runs: ``sdxl`` or ``sd15``."""
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
                f"{self.kind} {self.name!r}: {self.path} should hold one weights file, "
                f"found {len(files)}"
            )
        return files[0]


class ModelLibrary:
    """What a model directory holds, by family and kind; re-read when a name is missing.

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
        families = [f for f in ("sdxl", "sd15") if self.base(f) is not None]
        if not families:
            raise FileNotFoundError(
                f"{self.root} has neither sdxl/base nor sd15/base (a diffusers folder with "
                "model_index.json); see docs/diffusers-backend.md for the layout"
            )
        self.families: tuple[Family, ...] = tuple(families)  # type: ignore[arg-type]

    def base(self, family: Family) -> Path | None:
        """The family's default checkpoint folder, or None when the directory has none."""
        path = self.root / family / "base"
        return path if (path / "model_index.json").is_file() else None

    def refiner(self) -> Path | None:
        """The SDXL refiner folder, or None."""
        path = self.root / "sdxl" / "refiner"
        return path if (path / "model_index.json").is_file() else None

    def assets(self, family: Family, kind: AssetKind) -> dict[str, Asset]:
        """Every asset of a kind, by name (a file's name without its suffix)."""
        folder = self.root / family / kind
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
                    f"engine {request.engine.value!r}: this server has no {family} models "
                    f"({self.root / family / 'base'} is missing); it serves: "
                    + ", ".join(e.value for e in Engine if family_of(e) in self.families),
                )
            )
            return problems
        singles: list[tuple[AssetKind, str | None]] = [
            ("checkpoints", request.checkpoint),
            ("vaes", request.vae),
            ("controlnets", request.controlnet),
        ]
        for kind, name in singles:
            if name is not None and self.find(family, kind, name) is None:
                problems.append(((_FIELD[kind],), self._unknown(family, kind, name)))
        many: tuple[tuple[AssetKind, list[str]], ...] = (
            ("loras", list(request.loras or {})),
            ("textual_inversions", list(request.textual_inversions or {})),
        )
        for kind, names in many:
            for name in names:
                if self.find(family, kind, name) is None:
                    problems.append(((_FIELD[kind], name), self._unknown(family, kind, name)))
        return problems

    def _unknown(self, family: Family, kind: AssetKind, name: str) -> str:
        have = sorted(self.assets(family, kind))
        listing = ", ".join(have) if have else "none"
        return (
            f"{_FIELD[kind]}: {name!r} is not in this server's {family} library; "
            f"it has: {listing} (add it under {self.root / family / kind})"
        )

    def describe(self) -> dict[str, object]:
        """The directory's contents by family and kind, JSON-ready."""
        out: dict[str, object] = {}
        for family in self.families:
            entry: dict[str, object] = {"base": True}
            if family == "sdxl":
                entry["refiner"] = self.refiner() is not None
            entry.update({kind: sorted(self.assets(family, kind)) for kind in ASSET_KINDS})
            out[family] = entry
        return out
