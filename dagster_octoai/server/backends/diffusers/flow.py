"""FLUX.1 [schnell] / [dev] and Stable Diffusion 3: the flow-matching engines.

Their requests are simpler than SDXL's (OctoAI's OpenAPI refuses samplers, checkpoints,
VAEs, ControlNets, textual inversions and the SDXL-only fields on them), so a generation
is one call of diffusers' own pipeline with the prompts as text: no prompt weighting, no
style presets. How OctoAI's fields map onto the pipelines:

- ``cfg_scale`` is SD3's classifier-free guidance (default 12, as OctoAI's SD3 page), and
  on FLUX the guidance the model was distilled with (``guidance_scale`` of
  ``FluxPipeline``, an input of FLUX.1 [dev]'s transformer; default 3.5, the model card's).
  FLUX.1 [schnell] has no guidance input: its ``cfg_scale`` changes nothing.
- ``steps`` defaults to 4 on schnell, 30 elsewhere; ``negative_prompt`` is SD3's only.
- img2img on both, inpainting (``mask_image``, ``inpaint_full_res``) on FLUX.
- The prompt reaches T5 up to the engine's token limit (256; 512 on FLUX.1 [dev]).
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any

from PIL import Image

from ....api.images import decode_base64_image
from ....api.models import Engine

if TYPE_CHECKING:
    from ....api.models import ImageGenerationRequest

__all__ = ["FLOW_PIPELINES", "default_guidance", "flow_call_kwargs"]

# (family, mode) -> diffusers pipeline class.
FLOW_PIPELINES: dict[tuple[str, str], str] = {
    ("sd3", "txt2img"): "StableDiffusion3Pipeline",
    ("sd3", "img2img"): "StableDiffusion3Img2ImgPipeline",
    ("flux-schnell", "txt2img"): "FluxPipeline",
    ("flux-schnell", "img2img"): "FluxImg2ImgPipeline",
    ("flux-schnell", "inpaint"): "FluxInpaintPipeline",
    ("flux-dev", "txt2img"): "FluxPipeline",
    ("flux-dev", "img2img"): "FluxImg2ImgPipeline",
    ("flux-dev", "inpaint"): "FluxInpaintPipeline",
}
DEFAULT_STRENGTH = 0.8
DEFAULT_INPAINT_PADDING = 32


def default_guidance(engine: Engine) -> float:
    """``guidance_scale`` when the request sets no ``cfg_scale``."""
    if engine is Engine.FLUX_DEV:
        return 3.5
    if engine is Engine.FLUX_SCHNELL:
        return 0.0  # no guidance input: the value is not used
    return 12.0


# Copied from backend._open_image (backend imports this module).
def _image(b64: str, size: tuple[int, int], mode: str) -> Image.Image:
    with Image.open(io.BytesIO(decode_base64_image(b64))) as im:
        im.load()
        converted = im.convert(mode)
    if converted.size != size:
        converted = converted.resize(size, Image.Resampling.BILINEAR)
    return converted


def flow_call_kwargs(
    requests: list[tuple[ImageGenerationRequest, int]], mode: str
) -> dict[str, Any]:
    """The pipeline's keyword arguments for these requests (same settings), but ``generator``.

    ``requests`` pairs each request with its image count: one prompt per image, so
    requests batched together keep their own prompts. A test calls the pipeline with
    these same arguments to compare the server's image with diffusers' own.
    """
    request = requests[0][0]
    engine = request.engine
    width, height = request.size
    prompts = [r.prompt for r, n in requests for _ in range(n)]
    kwargs: dict[str, Any] = {
        "prompt": prompts,
        "num_inference_steps": request.steps or engine.default_steps,
        "guidance_scale": request.cfg_scale
        if request.cfg_scale is not None
        else default_guidance(engine),
        "num_images_per_prompt": 1,
        "width": width,
        "height": height,
        "max_sequence_length": engine.token_limit,
    }
    if engine is Engine.SD3:
        kwargs["negative_prompt"] = [r.negative_prompt or "" for r, n in requests for _ in range(n)]
    if mode == "img2img":
        assert request.init_image is not None
        kwargs["image"] = _image(request.init_image, (width, height), "RGB")
        kwargs["strength"] = request.strength or DEFAULT_STRENGTH
    elif mode == "inpaint":
        assert request.init_image is not None and request.mask_image is not None
        kwargs["image"] = _image(request.init_image, (width, height), "RGB")
        kwargs["mask_image"] = _image(request.mask_image, (width, height), "L")
        # Inpainting repaints the masked area from noise unless strength says less.
        kwargs["strength"] = request.strength or 1.0
        if request.inpaint_full_res:
            kwargs["padding_mask_crop"] = (
                request.inpaint_full_res_padding
                if request.inpaint_full_res_padding is not None
                else DEFAULT_INPAINT_PADDING
            )
    return kwargs
