"""The ``diffusers`` backend: Stable Diffusion XL and 1.5 with PyTorch, behind the OctoAI API.

One :class:`_Device` per configured device holds that device's models: each family's
base checkpoint (loaded at start-up), other checkpoints (loaded on first use, a few
kept), the SDXL refiner, VAEs and ControlNets (cached). A request's mode pipeline
(img2img, inpainting, ControlNet ...) is derived from the loaded checkpoint with
``from_pipe``, which shares the weights, and gets a fresh scheduler for each call. The
server's replica queue lets one generation at a time onto each device.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image, ImageDraw

from ....api.edges import edge_map
from ....api.images import decode_base64_image
from ....api.models import Engine
from ...jobqueue import CURRENT_CONTROL, JobCancelled, JobControl
from .. import JPEG_QUALITY, BackendError, Problem, RenderedImage
from .flow import FLOW_PIPELINES, flow_call_kwargs
from .guards import denoising_steps, prompt_weight_problems, trigger_word_problems
from .library import FLOW_FAMILIES, XL_FAMILIES, Asset, Family, ModelLibrary, family_of
from .photo_merge import photo_merge
from .prompts import PromptEmbeddings, encode_prompt
from .samplers import build_scheduler
from .styles import apply_style

if TYPE_CHECKING:
    from ....api.models import ImageGenerationRequest
    from ...config import ServerConfig

__all__ = ["DiffusersBackend"]

logger = logging.getLogger("dagster_octoai.server")

# The API's defaults (the seed), where the request leaves a field unset.
DEFAULT_CFG_SCALE = 12.0
DEFAULT_STRENGTH = 0.8
DEFAULT_HIGH_NOISE_FRAC = 0.8
DEFAULT_INPAINT_PADDING = 32
#: Checkpoints other than the base kept loaded per device (least recently used goes).
CHECKPOINT_CACHE = 2


@dataclass(frozen=True)
class CacheSizes:
    """How many LoRAs (per checkpoint), VAEs and ControlNets (per device) stay loaded."""

    loras: int = 8
    vaes: int = 2
    controlnets: int = 2


_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

# (family, controlnet?, mode) -> diffusers pipeline class.
_PIPELINES: dict[tuple[Family, bool, str], str] = {
    ("sdxl", False, "txt2img"): "StableDiffusionXLPipeline",
    ("sdxl", False, "img2img"): "StableDiffusionXLImg2ImgPipeline",
    ("sdxl", False, "inpaint"): "StableDiffusionXLInpaintPipeline",
    ("sdxl", True, "txt2img"): "StableDiffusionXLControlNetPipeline",
    ("sdxl", True, "img2img"): "StableDiffusionXLControlNetImg2ImgPipeline",
    ("sdxl", True, "inpaint"): "StableDiffusionXLControlNetInpaintPipeline",
    ("sd15", False, "txt2img"): "StableDiffusionPipeline",
    ("sd15", False, "img2img"): "StableDiffusionImg2ImgPipeline",
    ("sd15", False, "inpaint"): "StableDiffusionInpaintPipeline",
    ("sd15", True, "txt2img"): "StableDiffusionControlNetPipeline",
    ("sd15", True, "img2img"): "StableDiffusionControlNetImg2ImgPipeline",
    ("sd15", True, "inpaint"): "StableDiffusionControlNetInpaintPipeline",
}
# SSD-1B is the SDXL architecture: the SDXL pipelines. FLUX and SD3: see .flow.
_PIPELINES.update({("ssd", cn, m): n for (f, cn, m), n in list(_PIPELINES.items()) if f == "sdxl"})
_PIPELINES.update({(f, False, m): n for (f, m), n in FLOW_PIPELINES.items()})  # type: ignore[misc]
# The modes whose base pipeline hands its latents to the refiner (denoising_end).
_REFINED_MODES = frozenset({(False, "txt2img"), (False, "img2img"), (True, "txt2img")})


def _pipeline_class(name: str) -> Any:
    import diffusers

    return getattr(diffusers, name)


def mode_of(request: ImageGenerationRequest) -> str:
    """``txt2img``, ``img2img`` or ``inpaint`` (inpainting and outpainting)."""
    if request.init_image is None:
        return "txt2img"
    if request.mask_image is not None or request.outpainting:
        return "inpaint"
    return "img2img"


def _quiet_libraries() -> None:
    """diffusers and transformers warn and draw progress bars per call; a server logs itself."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


@dataclass
class _Checkpoint:
    """One checkpoint's pipeline on one device, and the LoRA adapters loaded into it.

    The adapters are a least-recently-used cache of ``lora_cache`` LoRAs: past it, the
    least recently used one not in the current request is deleted from the model (its
    weights freed).
    """

    name: str | None
    family: Family
    pipe: Any
    lora_cache: int = 8
    adapters: OrderedDict[Path, str] = field(default_factory=OrderedDict)
    loaded: int = 0  # adapters ever loaded: each gets a new name

    def use_loras(self, loras: list[tuple[Asset, float]]) -> None:
        """Activate exactly these LoRAs at these weights (loading new ones once)."""
        pipe = self.pipe
        if not loras:
            if self.adapters:
                pipe.disable_lora()
            return
        names, weights = [], []
        wanted = {asset.weights_file() for asset, _ in loras}
        for asset, weight in loras:
            path = asset.weights_file()
            adapter = self.adapters.get(path)
            if adapter is None:
                self._make_room(wanted)
                # PEFT adapter names are module keys: no dots or dashes from file names.
                adapter = f"lora{self.loaded}"
                self.loaded += 1
                pipe.load_lora_weights(
                    str(path.parent), weight_name=path.name, adapter_name=adapter
                )
                self.adapters[path] = adapter
            self.adapters.move_to_end(path)
            names.append(adapter)
            weights.append(weight)
        pipe.enable_lora()
        pipe.set_adapters(names, adapter_weights=weights)

    def _make_room(self, wanted: set[Path]) -> None:
        """Delete least recently used adapters until one more fits (never a wanted one)."""
        for path in list(self.adapters):
            if len(self.adapters) < self.lora_cache:
                return
            if path not in wanted:
                self.pipe.delete_adapters(self.adapters.pop(path))


class _Device:
    """The models on one device; used by one generation at a time."""

    def __init__(
        self,
        device: str,
        dtype: torch.dtype,
        library: ModelLibrary,
        compile_unet: bool,
        flow_dtype: torch.dtype | None = None,
        offload: bool = False,
        caches: CacheSizes | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.offload = offload
        self.dtype = dtype
        #: FLUX and SD3 run in bf16 on a GPU unless the server's dtype is set (fp16 overflows).
        self.flow_dtype = flow_dtype or dtype
        self.library = library
        self.compile_unet = compile_unet
        self.caches = caches or CacheSizes()
        self.bases: dict[Family, _Checkpoint] = {}
        self.checkpoints: OrderedDict[tuple[Family, Path], _Checkpoint] = OrderedDict()
        self.vaes: OrderedDict[Path, Any] = OrderedDict()
        self.controlnets: OrderedDict[Path, Any] = OrderedDict()
        self.refiner: Any = None
        for family in library.families:
            base = library.base(family)
            assert base is not None
            self.bases[family] = _Checkpoint(
                None, family, self._load_pipeline(family, base), self.caches.loras
            )
        refiner = library.refiner()
        if refiner is not None and "sdxl" in self.bases:
            cls = _pipeline_class("StableDiffusionXLImg2ImgPipeline")
            self.refiner = self._prepare(
                cls.from_pretrained(str(refiner), dtype=dtype, local_files_only=True)
            )

    def _prepare(self, pipe: Any) -> Any:
        if self.offload:
            # Weights stay in CPU memory; each model moves to the GPU while it runs.
            pipe.enable_model_cpu_offload(device=self.device)
        else:
            pipe.to(self.device)
        pipe.set_progress_bar_config(disable=True)
        if self.compile_unet:
            # FLUX and SD3 have a transformer where SD has its UNet.
            (pipe.unet if hasattr(pipe, "unet") else pipe.transformer).compile()
        return pipe

    def _load_pipeline(self, family: Family, path: Path) -> Any:
        cls = _pipeline_class(_PIPELINES[family, False, "txt2img"])
        extra: dict[str, Any] = {}
        if family in FLOW_FAMILIES:
            return self._prepare(
                cls.from_pretrained(str(path), dtype=self.flow_dtype, local_files_only=True)
            )
        if family == "sd15":
            extra = {"safety_checker": None, "requires_safety_checker": False}
        if path.is_file():
            # A single checkpoint file carries weights only: its configs and tokenizers
            # come from the family's base folder (diffusers' `config=`), so nothing is
            # fetched from a hub.
            base = self.library.base(family)
            pipe = cls.from_single_file(
                str(path), config=str(base), local_files_only=True, torch_dtype=self.dtype, **extra
            )
        else:
            pipe = cls.from_pretrained(str(path), dtype=self.dtype, local_files_only=True, **extra)
        return self._prepare(pipe)

    def checkpoint(self, family: Family, asset: Asset | None) -> _Checkpoint:
        if asset is None:
            return self.bases[family]
        key = (family, asset.path)
        loaded = self.checkpoints.get(key)
        if loaded is None:
            loaded = _Checkpoint(
                asset.name, family, self._load_pipeline(family, asset.path), self.caches.loras
            )
            self.checkpoints[key] = loaded
            while len(self.checkpoints) > CHECKPOINT_CACHE:
                self.checkpoints.popitem(last=False)
        self.checkpoints.move_to_end(key)
        return loaded

    def vae(self, family: Family, asset: Asset) -> Any:
        vae = self.vaes.get(asset.path)
        if vae is None:
            from diffusers import AutoencoderKL

            if asset.single_file:
                vae = AutoencoderKL.from_single_file(
                    str(asset.path),
                    config=str(self.library.base(family)),
                    subfolder="vae",
                    local_files_only=True,
                    torch_dtype=self.dtype,
                )
            else:
                vae = AutoencoderKL.from_pretrained(
                    str(asset.path), dtype=self.dtype, local_files_only=True
                )
            vae = vae.to(self.device).eval()
            self.vaes[asset.path] = vae
            while len(self.vaes) > self.caches.vaes:
                self.vaes.popitem(last=False)
        self.vaes.move_to_end(asset.path)
        return vae

    def controlnet(self, asset: Asset) -> Any:
        model = self.controlnets.get(asset.path)
        if model is None:
            from diffusers import ControlNetModel

            model = ControlNetModel.from_pretrained(
                str(asset.path), dtype=self.dtype, local_files_only=True
            )
            model = model.to(self.device).eval()
            self.controlnets[asset.path] = model
            while len(self.controlnets) > self.caches.controlnets:
                self.controlnets.popitem(last=False)
        self.controlnets.move_to_end(asset.path)
        return model

    def generators(self, seeds: list[int]) -> list[torch.Generator]:
        # MPS has no generators of its own; CPU noise keeps a seed's image the same there.
        where = "cpu" if self.device.type == "mps" else self.device
        return [torch.Generator(device=where).manual_seed(seed) for seed in seeds]


@contextlib.contextmanager
def _textual_inversions(
    pipe: Any, library: ModelLibrary, family: Family, tis: dict[str, str]
) -> Iterator[None]:
    """Load the request's textual inversions under their trigger words, and unload them after.

    Loading changes the shared tokenizer and text encoder (new tokens, new rows), so they
    must not outlive the request.
    """
    if not tis:
        yield
        return
    from safetensors.torch import load_file

    loaded: list[tuple[str, Any, Any]] = []
    try:
        for name, trigger in tis.items():
            asset = library.find(family, "textual_inversions", name)
            assert asset is not None  # checked before the request queued
            path = asset.weights_file()
            if family in XL_FAMILIES:
                tensors = load_file(str(path))
                targets = [
                    (tensors["clip_l"], pipe.text_encoder, pipe.tokenizer),
                    (tensors["clip_g"], pipe.text_encoder_2, pipe.tokenizer_2),
                ]
                for embedding, encoder, tokenizer in targets:
                    pipe.load_textual_inversion(
                        embedding, token=trigger, text_encoder=encoder, tokenizer=tokenizer
                    )
                    loaded.append((trigger, encoder, tokenizer))
            else:
                pipe.load_textual_inversion(str(path), token=trigger)
                loaded.append((trigger, pipe.text_encoder, pipe.tokenizer))
        yield
    finally:
        for trigger, encoder, tokenizer in loaded:
            tokens = [
                t for t in tokenizer.get_vocab() if t == trigger or t.startswith(f"{trigger}_")
            ]
            pipe.unload_textual_inversion(tokens, tokenizer=tokenizer, text_encoder=encoder)


def _open_image(b64: str, size: tuple[int, int], mode: str) -> Image.Image:
    """A request image, converted and resized to the output size (as the API does)."""
    with Image.open(io.BytesIO(decode_base64_image(b64))) as im:
        im.load()
        converted = im.convert(mode)
    if converted.size != size:
        converted = converted.resize(size, Image.Resampling.BILINEAR)
    return converted


def _reference_image(b64: str) -> Image.Image:
    """A photo merge reference, as sent (the image encoder's processor resizes it)."""
    with Image.open(io.BytesIO(decode_base64_image(b64))) as im:
        im.load()
        return im.convert("RGB")


def _outpainting_inputs(
    request: ImageGenerationRequest, size: tuple[int, int]
) -> tuple[Image.Image, Image.Image]:
    """(picture with its unknown area filled in, mask: white where to paint).

    The area to paint is where ``init_image`` is transparent, else the white of
    ``mask_image``, else a frame an eighth of the size wide around an opaque picture.
    The unknown area is filled from its surroundings (OpenCV's Telea inpainting) so that
    the model starts from colours that continue the picture, not from black.
    """
    import cv2
    import numpy as np

    assert request.init_image is not None
    init = _open_image(request.init_image, size, "RGBA")
    alpha = np.asarray(init.getchannel("A"))
    if alpha.min() < 255:
        paint = alpha < 128
    elif request.mask_image is not None:
        paint = np.asarray(_open_image(request.mask_image, size, "L")) >= 128
    else:
        width, height = size
        frame = Image.new("L", size, 255)
        ImageDraw.Draw(frame).rectangle(
            (width // 8, height // 8, width - width // 8 - 1, height - height // 8 - 1), fill=0
        )
        paint = np.asarray(frame) >= 128
    mask = (paint * 255).astype(np.uint8)
    rgb = np.asarray(init.convert("RGB"))
    filled = cv2.inpaint(rgb, mask, 3, cv2.INPAINT_TELEA) if mask.any() else rgb
    return Image.fromarray(filled), Image.fromarray(mask)


def _encode(image: Image.Image, encoding: str | None) -> bytes:
    buf = io.BytesIO()
    if encoding == "png":
        image.save(buf, format="PNG", compress_level=1)
    else:
        image.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


#: The fields that may differ between requests batched together: what they ask for
#: per image. Everything else (engine, size, steps, sampler, images, assets ...) is equal.
_PER_REQUEST_FIELDS = frozenset(
    {"prompt", "prompt_2", "negative_prompt", "negative_prompt_2", "seed", "num_images"}
)


def batch_key(request: ImageGenerationRequest) -> str:
    """Requests with the same key can share one pipeline call."""
    settings = request.model_dump_json(exclude=set(_PER_REQUEST_FIELDS))
    return hashlib.sha256(settings.encode()).hexdigest()


@dataclass
class _Job:
    """One request waiting for, or on, a device."""

    request: ImageGenerationRequest
    seeds: list[int]
    key: str
    done: threading.Event = field(default_factory=threading.Event)
    images: list[Image.Image] | None = None
    error: BaseException | None = None
    #: The async job's control (cancel flag, progress); None for a plain request.
    control: JobControl | None = None


def _step_callback(batch: list[_Job], steps: int) -> Callable[..., dict[str, Any]]:
    """A diffusers ``callback_on_step_end``: each job's progress, and a stop once cancelled.

    A batch stops only when every job in it was cancelled (the others still want their
    images); the cancel surfaces as :class:`JobCancelled` from the pipeline call.
    """
    controls = [j.control for j in batch]

    def on_step_end(
        pipe: Any, step: int, timestep: Any, callback_kwargs: dict[str, Any]
    ) -> dict[str, Any]:
        cancelled = 0
        for control in controls:
            if control is None:
                continue
            try:
                control.on_step(step + 1, steps)
            except JobCancelled:
                cancelled += 1
        if cancelled and cancelled == len(controls):
            raise JobCancelled()
        return callback_kwargs

    return on_step_end


def _stack(parts: list[tuple[PromptEmbeddings, int]]) -> PromptEmbeddings | None:
    """One embedding row per image (each request's repeated for its images), or None
    when the requests' prompts encode to different lengths (SD 1.5 chunk counts)."""
    names = ["prompt_embeds", "negative_prompt_embeds"]
    if parts[0][0].pooled_prompt_embeds is not None:
        names += ["pooled_prompt_embeds", "negative_pooled_prompt_embeds"]
    stacked = {}
    for name in names:
        tensors = [getattr(embeds, name) for embeds, _ in parts]
        if len({t.shape[1:] for t in tensors}) != 1:
            return None
        stacked[name] = torch.cat(
            [t.repeat_interleave(n, dim=0) for t, (_, n) in zip(tensors, parts, strict=True)]
        )
    return PromptEmbeddings(**stacked)


class DiffusersBackend:
    """Stable Diffusion XL and 1.5 on PyTorch devices, from a model directory.

    Build it with :meth:`from_config`; the server calls :meth:`check` before a request
    queues and :meth:`render` on a worker thread once a replica (a device) is free.
    """

    name = "diffusers"

    def __init__(
        self,
        library: ModelLibrary,
        devices: list[str],
        dtype: torch.dtype,
        dtype_name: str,
        compile_unet: bool = False,
        batch_max_images: int = 1,
        flow_dtype: torch.dtype | None = None,
        offload: bool = False,
        caches: CacheSizes | None = None,
    ) -> None:
        _quiet_libraries()
        self.library = library
        self.dtype_name = dtype_name
        self.compile_unet = compile_unet
        self.device_names = devices
        self.batch_max_images = batch_max_images
        #: Pipeline calls made, and the requests they served (more requests: batching).
        self.calls = 0
        self.requests = 0
        self.offload = offload
        self._devices = [
            _Device(d, dtype, library, compile_unet, flow_dtype, offload, caches) for d in devices
        ]
        # One worker thread per device takes the oldest waiting request and, with
        # batching, the waiting requests of the same settings whose images still fit.
        self._pending: deque[_Job] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._workers = [
            threading.Thread(target=self._work, args=(d,), name=f"octoai-{d.device}", daemon=True)
            for d in self._devices
        ]
        for worker in self._workers:
            worker.start()
        first = self._devices[0]
        self._clip_layers = {
            family: ckpt.pipe.text_encoder.config.num_hidden_layers
            if ckpt.pipe.text_encoder is not None
            else ckpt.pipe.text_encoder_2.config.num_hidden_layers
            for family, ckpt in first.bases.items()
        }
        self.has_refiner = first.refiner is not None
        # Trigger words must be new words: each family's tokenizers' vocabulary.
        self._vocabulary: dict[Family, frozenset[str]] = {
            family: frozenset(
                word
                for tokenizer in (ckpt.pipe.tokenizer, getattr(ckpt.pipe, "tokenizer_2", None))
                if tokenizer is not None
                for word in tokenizer.get_vocab()
            )
            for family, ckpt in first.bases.items()
        }

    @classmethod
    def from_config(cls, config: ServerConfig) -> DiffusersBackend:
        """Load the base models of ``config.models`` onto ``config.device``.

        Raises:
            BackendError: the directory, a device or the dtype is wrong.
        """
        assert config.models is not None  # ServerConfig requires it for this backend
        try:
            library = ModelLibrary(config.models)
        except (NotADirectoryError, FileNotFoundError) as exc:
            raise BackendError(f"models: {exc}") from exc
        devices = list(config.device) or ["cuda:0" if torch.cuda.is_available() else "cpu"]
        for device in devices:
            if device.startswith("cuda"):
                if not torch.cuda.is_available():
                    raise BackendError(
                        f"device: {device!r}, but this torch build sees no CUDA GPU "
                        f"(torch {torch.__version__}; a CPU build, or no driver): use "
                        "--device cpu, or install the CUDA build of torch (docs/local-server.md)"
                    )
                index = int(device.partition(":")[2] or 0)
                if index >= torch.cuda.device_count():
                    raise BackendError(
                        f"device: {device!r}, but this machine has "
                        f"{torch.cuda.device_count()} CUDA GPU(s)"
                    )
            elif device == "mps" and not torch.backends.mps.is_available():
                raise BackendError("device: 'mps' is not available on this machine")
        on_gpu = any(d != "cpu" for d in devices)
        if config.offload and not all(d.startswith("cuda") for d in devices):
            raise BackendError(
                f"offload: model CPU offload moves models onto a CUDA GPU as they run; the "
                f"devices are {', '.join(devices)} (drop --offload, or serve on cuda devices)"
            )
        dtype_name = config.dtype or ("fp16" if on_gpu else "fp32")
        if on_gpu:
            # Same request, seed and device, same bytes: no autotuned kernel choice.
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True
        return cls(
            library,
            devices,
            _DTYPES[dtype_name],
            dtype_name,
            config.torch_compile,
            batch_max_images=config.batch_max_images,
            # FLUX and SD3 were trained in bf16; fp16 overflows in their activations.
            flow_dtype=torch.bfloat16 if on_gpu and config.dtype is None else None,
            offload=config.offload,
            caches=CacheSizes(config.lora_cache, config.vae_cache, config.controlnet_cache),
        )

    # ---- the Backend protocol --------------------------------------------------------

    @property
    def replicas(self) -> int | None:
        # With batching, a device's worth of requests must be able to wait here together.
        return len(self._devices) * self.batch_max_images

    @property
    def engines(self) -> tuple[Engine, ...]:
        """The engines this server has weights for; the others answer 404 as unknown."""
        return self.library.engines

    def describe(self) -> dict[str, object]:
        notes = [
            "no safety classifier: removed_for_safety is always false",
            "flux-dev: cfg_scale is FLUX's distilled guidance (default 3.5); flux-schnell "
            "has none, so cfg_scale changes nothing there",
            "the refiner refines text-to-image, img2img and ControlNet text-to-image; "
            "inpainting, outpainting and ControlNet img2img/inpainting do not use it",
        ]
        merging = [f for f in XL_FAMILIES if self.library.ip_adapter(f) is not None]
        if merging:
            notes.append(
                "transfer_images (photo merge): IP-Adapter, one adapter per trigger word, on "
                + ", ".join(sorted(merging))
            )
        else:
            notes.append(
                "transfer_images (photo merge) is not supported: no IP-Adapter "
                "(sdxl/ip_adapters in the model directory is empty or missing)"
            )
        if not self.has_refiner:
            notes.append(
                "no SDXL refiner (sdxl/refiner in the model directory): "
                "use_refiner and high_noise_frac are ignored"
            )
        return {
            "backend": self.name,
            "engines": [e.value for e in self.engines],
            "devices": self.device_names,
            "dtype": self.dtype_name,
            "torch_compile": self.compile_unet,
            "offload": self.offload,
            "batch_max_images": self.batch_max_images,
            "pipeline_calls": self.calls,
            "requests_served": self.requests,
            # The folder's name: no answer shows where the server's disk keeps it.
            "models": self.library.root.name,
            "library": self.library.describe(),
            "refiner": self.has_refiner,
            "loaded": self.loaded(),
            "notes": notes,
        }

    def loaded(self) -> dict[str, int]:
        """LoRA adapters, VAEs and ControlNets loaded now, over every device."""
        ckpts = [c for d in self._devices for c in (*d.bases.values(), *d.checkpoints.values())]
        return {
            "loras": sum(len(c.adapters) for c in ckpts),
            "vaes": sum(len(d.vaes) for d in self._devices),
            "controlnets": sum(len(d.controlnets) for d in self._devices),
        }

    def check(self, request: ImageGenerationRequest) -> list[Problem]:
        problems = self.library.missing(request)
        if problems:
            return problems
        family = family_of(request.engine)
        problems += prompt_weight_problems(request)
        problems += trigger_word_problems(request, self._vocabulary[family])
        if request.transfer_images:
            if family not in XL_FAMILIES:
                problems.append(
                    (
                        ("transfer_images",),
                        "transfer_images: photo merge works with the SDXL engines only "
                        f"(sdxl, controlnet-sdxl, ssd), not {request.engine.value!r}",
                    )
                )
            elif self.library.ip_adapter(family) is None:
                problems.append(
                    (
                        ("transfer_images",),
                        "transfer_images (photo merge) is not supported by this server: it "
                        f"has no IP-Adapter for {family} (add one under "
                        f"{self.library.relative_folder(family)}/ip_adapters/NAME/)",
                    )
                )
        if request.clip_skip is not None:
            layers = self._clip_layers[family]
            # SDXL already reads the penultimate layer, so it has one layer fewer to skip.
            most = layers if family == "sd15" else layers - 1
            if request.clip_skip > most:
                problems.append(
                    (
                        ("clip_skip",),
                        f"clip_skip: {request.clip_skip} is more layers than this server's "
                        f"{family} text encoder can skip; allowed: 1..{most}",
                    )
                )
        if request.controlnet is not None and request.controlnet_preprocess is not False:
            asset = self.library.find(family, "controlnets", request.controlnet)
            assert asset is not None
            if self.library.controlnet_preprocessor(asset) != "canny":
                problems.append(
                    (
                        ("controlnet_preprocess",),
                        f"controlnet_preprocess: ControlNet {request.controlnet!r} needs a "
                        "preprocessor with weights this server does not have (it runs Canny "
                        "only); send your own control map in controlnet_image with "
                        "controlnet_preprocess false",
                    )
                )
        return problems

    def render(
        self, request: ImageGenerationRequest, seeds: list[int], config: ServerConfig
    ) -> list[RenderedImage]:
        # Read here, on the caller's thread: the device worker has a context of its own.
        job = _Job(request, seeds, batch_key(request), control=CURRENT_CONTROL.get())
        with self._cond:
            if self._closed:
                raise RuntimeError("the diffusers backend is closed")
            self._pending.append(job)
            self._cond.notify()
        job.done.wait()
        if job.error is not None:
            raise job.error
        assert job.images is not None
        images = job.images
        return [
            RenderedImage(_encode(image, request.image_encoding), seed, False, 0.0)
            for image, seed in zip(images, seeds, strict=True)
        ]

    def close(self) -> None:
        with self._cond:
            self._closed = True
            # A request still waiting gets an error instead of waiting forever.
            while self._pending:
                job = self._pending.popleft()
                job.error = RuntimeError("the server stopped before this request ran")
                job.done.set()
            self._cond.notify_all()
        for worker in self._workers:
            worker.join(timeout=30)
        self._devices.clear()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ---- the device workers ------------------------------------------------------------

    def _take(self) -> list[_Job] | None:
        """The next batch: the oldest job and (batching) same-settings jobs that fit."""
        with self._cond:
            while not self._pending and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            first = self._pending.popleft()
            batch, room = [first], self.batch_max_images - len(first.seeds)
            for job in list(self._pending):
                if room <= 0:
                    break
                if job.key == first.key and len(job.seeds) <= room:
                    self._pending.remove(job)
                    batch.append(job)
                    room -= len(job.seeds)
            return batch

    def _work(self, device: _Device) -> None:
        while (batch := self._take()) is not None:
            try:
                self._run(device, batch)
            except BaseException as exc:  # every waiting request gets the error, not a hang
                for job in batch:
                    if not job.done.is_set():
                        job.error = exc
                        job.done.set()

    def _run(self, device: _Device, batch: list[_Job]) -> None:
        images = self._generate(device, batch)
        if images is None:  # prompts of different lengths: one call per request
            for job in batch:
                self._run(device, [job])
            return
        with self._cond:
            self.calls += 1
            self.requests += len(batch)
        start = 0
        for job in batch:
            job.images = images[start : start + len(job.seeds)]
            start += len(job.seeds)
            job.done.set()

    # ---- one generation --------------------------------------------------------------

    def _generate(self, device: _Device, batch: list[_Job]) -> list[Image.Image] | None:
        """The images of ``batch`` (same settings) from one pipeline call, in order.

        None when the requests' prompts encode to different lengths and cannot share a call.
        """
        request = batch[0].request
        seeds = [seed for job in batch for seed in job.seeds]
        family = family_of(request.engine)
        library = self.library

        def find(kind: Any, name: str | None) -> Asset | None:
            return None if name is None else library.find(family, kind, name)

        ckpt = device.checkpoint(family, find("checkpoints", request.checkpoint))
        if family in FLOW_FAMILIES:
            return self._generate_flow(device, batch, ckpt, seeds)
        mode = mode_of(request)
        controlled = request.engine.is_controlnet
        extra: dict[str, Any] = {}
        vae_asset = find("vaes", request.vae)
        if vae_asset is not None:
            extra["vae"] = device.vae(family, vae_asset)
        cn_asset = find("controlnets", request.controlnet)
        if cn_asset is not None:
            extra["controlnet"] = device.controlnet(cn_asset)
        cls = _pipeline_class(_PIPELINES[family, controlled, mode])
        scheduler = build_scheduler(request.sampler, ckpt.pipe.scheduler.config, seeds)
        pipe = cls.from_pipe(ckpt.pipe, scheduler=scheduler, **extra)
        pipe.set_progress_bar_config(disable=True)
        ckpt.use_loras(
            [(a, w) for n, w in (request.loras or {}).items() if (a := find("loras", n))]
        )

        width, height = request.size
        steps = request.steps or request.engine.default_steps
        kwargs: dict[str, Any] = {
            "num_inference_steps": steps,
            "guidance_scale": request.cfg_scale or DEFAULT_CFG_SCALE,
            # One embedding row per image (see _stack), so one image per "prompt".
            "num_images_per_prompt": 1,
            "generator": device.generators(seeds),
        }
        if any(j.control is not None for j in batch):
            kwargs["callback_on_step_end"] = _step_callback(batch, steps)
        if mode == "txt2img":
            kwargs.update(width=width, height=height)
        elif mode == "img2img":
            assert request.init_image is not None
            kwargs["image"] = _open_image(request.init_image, (width, height), "RGB")
            kwargs["num_inference_steps"], kwargs["strength"] = denoising_steps(
                steps, request.strength or DEFAULT_STRENGTH
            )
        else:
            assert request.init_image is not None
            if request.outpainting:
                image, mask = _outpainting_inputs(request, (width, height))
            else:
                assert request.mask_image is not None
                image = _open_image(request.init_image, (width, height), "RGB")
                mask = _open_image(request.mask_image, (width, height), "L")
            kwargs.update(image=image, mask_image=mask, width=width, height=height)
            # Inpainting repaints the masked area from noise unless strength says less.
            kwargs["num_inference_steps"], kwargs["strength"] = denoising_steps(
                steps, request.strength or 1.0
            )
            # An empty mask has no area to crop to: it paints nothing, at full size.
            if request.inpaint_full_res and mask.getbbox() is not None:
                kwargs["padding_mask_crop"] = (
                    request.inpaint_full_res_padding
                    if request.inpaint_full_res_padding is not None
                    else DEFAULT_INPAINT_PADDING
                )
        if controlled:
            kwargs.update(self._controlnet_kwargs(request, (width, height), mode, cn_asset))

        refine = (
            family == "sdxl"
            and device.refiner is not None
            and request.use_refiner is not False
            and (controlled, mode) in _REFINED_MODES
        )
        frac = (
            request.high_noise_frac
            if request.high_noise_frac is not None
            else DEFAULT_HIGH_NOISE_FRAC
        )
        if refine and frac >= 1.0:
            refine = False  # the base does every step; the refiner would have none

        words = [
            [_reference_image(b64) for b64 in images]
            for images in (request.transfer_images or {}).values()
        ]
        # Textual inversions add rows to the embedding tables: outside inference mode.
        with (
            _textual_inversions(pipe, library, family, request.textual_inversions or {}),
            photo_merge(pipe, library.ip_adapter(family), words) as merge,
            torch.inference_mode(),
        ):
            embeds = _stack([(self._embed(pipe, j.request, device), len(j.seeds)) for j in batch])
            if embeds is None:
                return None
            kwargs.update(merge)
            if not refine:
                return list(pipe(**kwargs, **embeds.as_kwargs()).images)
            latents = pipe(
                **kwargs, **embeds.as_kwargs(), denoising_end=frac, output_type="latent"
            ).images
            refiner = device.refiner
            refiner.scheduler = build_scheduler(request.sampler, refiner.scheduler.config, seeds)
            refiner_embeds = _stack(
                [(self._embed(refiner, j.request, device), len(j.seeds)) for j in batch]
            )
            assert refiner_embeds is not None  # one encoder, one chunk: always stackable
            out = refiner(
                image=latents,
                num_inference_steps=kwargs["num_inference_steps"],
                denoising_start=frac,
                guidance_scale=kwargs["guidance_scale"],
                generator=device.generators(seeds),
                **refiner_embeds.as_kwargs(),
            )
            return list(out.images)

    def _generate_flow(
        self, device: _Device, batch: list[_Job], ckpt: _Checkpoint, seeds: list[int]
    ) -> list[Image.Image]:
        """FLUX and SD3 (:mod:`.flow`): the pipeline called with the prompts as text."""
        request = batch[0].request
        mode = mode_of(request)
        base = ckpt.pipe
        # from_pipe shares the scheduler object: a fresh one per call.
        scheduler = type(base.scheduler).from_config(base.scheduler.config)
        pipe = _pipeline_class(FLOW_PIPELINES[ckpt.family, mode]).from_pipe(
            base, scheduler=scheduler
        )
        pipe.set_progress_bar_config(disable=True)
        library = self.library
        ckpt.use_loras(
            [
                (asset, weight)
                for name, weight in (request.loras or {}).items()
                if (asset := library.find(ckpt.family, "loras", name))
            ]
        )
        kwargs = flow_call_kwargs([(j.request, len(j.seeds)) for j in batch], mode)
        with torch.inference_mode():
            return list(pipe(**kwargs, generator=device.generators(seeds)).images)

    @staticmethod
    def _embed(pipe: Any, request: ImageGenerationRequest, device: _Device) -> PromptEmbeddings:
        prompt, negative = apply_style(
            request.style_preset, request.prompt, request.negative_prompt
        )
        return encode_prompt(
            pipe,
            prompt,
            negative,
            prompt_2=request.prompt_2,
            negative_prompt_2=request.negative_prompt_2,
            clip_skip=request.clip_skip,
            max_tokens=request.engine.token_limit,
            dtype=device.dtype,
        )

    def _controlnet_kwargs(
        self,
        request: ImageGenerationRequest,
        size: tuple[int, int],
        mode: str,
        asset: Asset | None,
    ) -> dict[str, Any]:
        assert request.controlnet_image is not None and asset is not None
        if request.controlnet_preprocess is not False:
            # The seed's recipe, the same function the client's local edge map uses.
            control = edge_map(request.controlnet_image, size=size).convert("RGB")
        else:
            control = _open_image(request.controlnet_image, size, "RGB")
        scale = (
            request.controlnet_conditioning_scale
            if request.controlnet_conditioning_scale is not None
            else 1.0
        )
        out: dict[str, Any] = {"controlnet_conditioning_scale": scale}
        if request.controlnet_early_stop is not None:
            if request.controlnet_early_stop <= 0:
                out["controlnet_conditioning_scale"] = 0.0  # stopped before the first step
            else:
                out["control_guidance_end"] = request.controlnet_early_stop
        out["image" if mode == "txt2img" else "control_image"] = control
        return out
