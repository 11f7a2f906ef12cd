"""Photo merge (``transfer_images``) on IP-Adapter, for the SDXL-family engines.

OctoAI's photo merge maps trigger words in the prompt to 1-4 reference images each and
"operates exclusively with SDXL models". Here each trigger word gets an IP-Adapter of its
own (the same weights loaded once per word, diffusers' multi-adapter form), fed that
word's images: every image of a word adds its image tokens to the cross-attention, so
several words (each with several images) steer one generation at once. It composes with
everything the SDXL pipelines do (style presets, checkpoints, LoRAs, ControlNets): the
adapters live in the UNet's attention processors, loaded for the request and unloaded
after it, as textual inversions are.

The weights: ``<family>/ip_adapters/NAME/`` holding one ``.safetensors`` IP-Adapter file
(diffusers' ``image_proj.*`` / ``ip_adapter.*`` keys, as h94/IP-Adapter's ``sdxl_models``)
and its CLIP image encoder in ``image_encoder/`` (a diffusers/transformers folder).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["PHOTO_MERGE_SCALE", "photo_merge", "write_tiny_ip_adapter"]

#: Each trigger word's adapter scale: its images steer, the prompt still leads.
PHOTO_MERGE_SCALE = 0.8


def adapter_file(folder: Path) -> Path | None:
    """The IP-Adapter weights file of ``folder``, when it has one and an image encoder."""
    if not (folder / "image_encoder" / "config.json").is_file():
        return None
    files = sorted(folder.glob("*.safetensors"))
    return files[0] if len(files) == 1 else None


@contextlib.contextmanager
def photo_merge(
    pipe: Any, folder: Path | None, words: list[list[Image.Image]]
) -> Iterator[dict[str, Any]]:
    """Load one adapter per trigger word; yield the pipeline's IP-Adapter arguments.

    ``words``: each trigger word's reference images. Nothing is loaded without words.
    """
    if not words:
        yield {}
        return
    assert folder is not None
    weights = adapter_file(folder)
    assert weights is not None  # the backend checked before the request queued
    n = len(words)
    pipe.load_ip_adapter(
        [str(folder)] * n,
        subfolder=[""] * n,
        weight_name=[weights.name] * n,
        image_encoder_folder="image_encoder",
        local_files_only=True,
    )
    try:
        pipe.set_ip_adapter_scale([PHOTO_MERGE_SCALE] * n)
        yield {"ip_adapter_image": words}
    finally:
        pipe.unload_ip_adapter()


def write_tiny_ip_adapter(unet: Any, folder: Path, seed: int, tokens: int = 4) -> None:
    """A random IP-Adapter for ``unet`` with a tiny CLIP image encoder, in ``folder``.

    The attention keys follow diffusers' conversion (``_convert_ip_adapter_attn_to_diffusers``):
    one ``to_k_ip`` / ``to_v_ip`` pair per cross-attention processor, numbered 1, 3, 5 ...
    """
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    embed = 32
    encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=37,
            projection_dim=embed,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        )
    ).eval()
    folder.mkdir(parents=True)
    encoder.save_pretrained(str(folder / "image_encoder"))

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * scale).contiguous()

    cross = unet.config.cross_attention_dim
    tensors = {
        "image_proj.proj.weight": rand(cross * tokens, embed, scale=embed**-0.5),
        "image_proj.proj.bias": torch.zeros(cross * tokens),
        "image_proj.norm.weight": torch.ones(cross),
        "image_proj.norm.bias": torch.zeros(cross),
    }
    channels = list(unet.config.block_out_channels)
    key_id = 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        if name.startswith("mid_block"):
            hidden = channels[-1]
        elif name.startswith("up_blocks"):
            hidden = list(reversed(channels))[int(name[len("up_blocks.")])]
        else:
            hidden = channels[int(name[len("down_blocks.")])]
        for kind in ("to_k_ip", "to_v_ip"):
            tensors[f"ip_adapter.{key_id}.{kind}.weight"] = rand(hidden, cross, scale=cross**-0.5)
        key_id += 2
    save_file(tensors, str(folder / "ip-adapter.safetensors"))
