"""Random-weight pipelines built directly in device memory for ``python -m benchmarks.gpu``.

A model directory written by ``dagster-octoai tiny-models`` gives each family its layout,
tokenizers (generated offline) and scheduler; :func:`build_in_memory` makes every model of
a family's pipeline (UNet or transformer, VAE, text encoders) again from a config, under
``torch.device(device)`` and the run's default dtype, so that the weights are created where
they run: nothing is written to disk or downloaded. Speed does not depend on the weights'
values, only on the architecture, which :data:`PUBLISHED` takes from the real models'
``config.json`` files. The quick run builds the directory's own (tiny) configs through the
same code.

The tokenizers stay generated: a prompt becomes more, shorter pieces than with the real
vocabularies, but every encoder pads to its fixed length (CLIP 77, T5 the engine's
``max_sequence_length``), so the work per prompt is the real one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["PUBLISHED", "build_in_memory", "free"]

# The real models' configs (their config.json), the keys that set the architecture.
_CLIP_L = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "projection_dim": 768,
    "vocab_size": 49408,
}
_CLIP_G = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "projection_dim": 1280,
    "vocab_size": 49408,
}
# google/t5-v1_1-xxl's encoder, FLUX.1's and SD3's text_encoder_2 / text_encoder_3.
_T5_XXL = {
    "d_model": 4096,
    "d_ff": 10240,
    "d_kv": 64,
    "num_heads": 64,
    "num_layers": 24,
    "relative_attention_num_buckets": 32,
    "vocab_size": 32128,
}
# The SD/SDXL VAE and FLUX/SD3's (the latter with 16 latent channels, from the directory).
_VAE = {
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "mid_block_add_attention": True,
}
_SDXL_UNET = {
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "attention_head_dim": [5, 10, 20],
    "transformer_layers_per_block": [1, 2, 10],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "cross_attention_dim": 2048,
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "norm_num_groups": 32,
}
# black-forest-labs/FLUX.1-{schnell,dev} transformer/config.json (guidance_embeds: dev only,
# kept from the directory).
_FLUX = {
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "axes_dims_rope": [16, 56, 56],
}

# stabilityai/stable-video-diffusion-img2vid-xt-1-1: the spatio-temporal UNet, the VAE
# with its temporal decoder and the CLIP ViT-H/14 image encoder.
_SVD_UNET = {
    "sample_size": 96,
    "in_channels": 8,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlockSpatioTemporal"] * 3 + ["DownBlockSpatioTemporal"],
    "up_block_types": ["UpBlockSpatioTemporal"] + ["CrossAttnUpBlockSpatioTemporal"] * 3,
    "block_out_channels": [320, 640, 1280, 1280],
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 768,
    "layers_per_block": 2,
    "cross_attention_dim": 1024,
    "transformer_layers_per_block": 1,
    "num_attention_heads": [5, 10, 20, 20],
    "num_frames": 25,
}
_SVD_VAE = {
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "layers_per_block": 2,
    "latent_channels": 4,
}
_CLIP_VIT_H = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 16,
    "num_hidden_layers": 32,
    "patch_size": 14,
    "image_size": 224,
    "projection_dim": 1024,
}

#: Per family, per pipeline component: the published architecture.
PUBLISHED: dict[str, dict[str, dict[str, Any]]] = {
    "sdxl": {
        "unet": _SDXL_UNET,
        "vae": _VAE,
        "text_encoder": _CLIP_L,
        "text_encoder_2": _CLIP_G,
    },
    # segmind/SSD-1B: SDXL's UNet with fewer transformer layers (1.3 B parameters); the
    # layer counts are from its model card's description, not a copy of its config.json.
    "ssd": {
        "unet": {**_SDXL_UNET, "transformer_layers_per_block": [1, 2, 4]},
        "vae": _VAE,
        "text_encoder": _CLIP_L,
        "text_encoder_2": _CLIP_G,
    },
    "sd15": {
        "unet": {
            "block_out_channels": [320, 640, 1280, 1280],
            "layers_per_block": 2,
            "attention_head_dim": 8,
            "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
            "cross_attention_dim": 768,
            "norm_num_groups": 32,
        },
        "vae": _VAE,
        "text_encoder": _CLIP_L,
    },
    # stabilityai/stable-diffusion-3-medium-diffusers.
    "sd3": {
        "transformer": {
            "sample_size": 128,
            "num_layers": 24,
            "attention_head_dim": 64,
            "num_attention_heads": 24,
            "joint_attention_dim": 4096,
            "caption_projection_dim": 1536,
            "pooled_projection_dim": 2048,
            "pos_embed_max_size": 192,
        },
        "vae": _VAE,
        "text_encoder": _CLIP_L,
        "text_encoder_2": _CLIP_G,
        "text_encoder_3": _T5_XXL,
    },
    "svd": {"unet": _SVD_UNET, "vae": _SVD_VAE, "image_encoder": _CLIP_VIT_H},
    "flux-schnell": {"transformer": _FLUX, "vae": _VAE, "text_encoder": _CLIP_L},
    "flux-dev": {"transformer": _FLUX, "vae": _VAE, "text_encoder": _CLIP_L},
}
for _family in ("flux-schnell", "flux-dev"):
    PUBLISHED[_family]["text_encoder_2"] = _T5_XXL


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _rebuild(module: Any, overrides: dict[str, Any], dtype: torch.dtype) -> Any:
    """The same class as ``module``, from its config with ``overrides``, fresh random weights."""
    config = module.config
    if hasattr(config, "to_dict"):  # transformers
        # transformers makes a model in its config's dtype (the directory's float32), not
        # the default one: set it, so that a T5-XXL is not made in fp32 first (19 GB).
        values = {**config.to_dict(), **overrides, "dtype": str(dtype).removeprefix("torch.")}
        built = type(module)(type(config).from_dict(values)).to(dtype)
    else:  # diffusers
        built = type(module).from_config({**dict(config), **overrides})
    return built.eval().requires_grad_(False)


def build_in_memory(
    pipe: Any, family: str, device: str, dtype: torch.dtype, *, published: bool
) -> Any:
    """A pipeline like ``pipe`` whose models are made anew, on ``device`` in ``dtype``.

    ``published=True`` uses the real architectures (:data:`PUBLISHED`); ``False`` the
    directory's own configs (the quick run). Tokenizers and scheduler are ``pipe``'s.
    """
    components = dict(pipe.components)
    torch.manual_seed(0)
    with torch.device(device), _default_dtype(dtype), torch.no_grad():
        for name, module in pipe.components.items():
            if isinstance(module, torch.nn.Module):
                overrides = PUBLISHED[family].get(name, {}) if published else {}
                # .to(device): a few parameters (SVD's AlphaBlender mix factors) are made
                # with the legacy torch.Tensor(), which ignores the default device.
                components[name] = _rebuild(module, overrides, dtype).to(device)
    built = type(pipe)(**components)
    built.set_progress_bar_config(disable=True)
    return built


def parameters(pipe: Any) -> int:
    """The parameters of every model of ``pipe``."""
    return sum(
        p.numel()
        for m in pipe.components.values()
        if isinstance(m, torch.nn.Module)
        for p in m.parameters()
    )


def free(device: str) -> None:
    """Return the device memory of pipelines no longer referenced."""
    import gc

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
