"""A tiny random-weight Stable Video Diffusion for ``dagster-octoai tiny-models``: ``svd/base``.

The architecture is SVD's (a spatio-temporal UNet, a VAE with a temporal decoder, a CLIP
image encoder, an EDM Euler scheduler), its sizes the smallest diffusers accepts (group
norms of 32), with attention only in the UNet's deepest block, and 2 frames a clip: a
1024x576 clip takes about half a minute on a busy 2-core CPU, nearly all of it
the temporal decoder at full size (its group norms need 32 channels). Shapes follow diffusers' own test components
(``tests/pipelines/stable_video_diffusion``, ``get_dummy_components``).
"""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["TINY_SVD_FRAMES", "write_tiny_svd"]

#: Frames per clip of the tiny model (SVD 1.1 makes 25): the UNet's ``num_frames``.
TINY_SVD_FRAMES = 2


def write_tiny_svd(directory: Path, *, seed: int = 0) -> Path:
    """Write a tiny SVD pipeline (diffusers folder) to ``directory``; returns it."""
    from diffusers import (
        AutoencoderKLTemporalDecoder,
        EulerDiscreteScheduler,
        StableVideoDiffusionPipeline,
        UNetSpatioTemporalConditionModel,
    )
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    unet = UNetSpatioTemporalConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        in_channels=8,
        out_channels=4,
        down_block_types=("DownBlockSpatioTemporal", "CrossAttnDownBlockSpatioTemporal"),
        up_block_types=("CrossAttnUpBlockSpatioTemporal", "UpBlockSpatioTemporal"),
        cross_attention_dim=32,
        num_attention_heads=(2, 4),
        # Three added time ids (fps, motion bucket, noise augmentation) of 8 each.
        projection_class_embeddings_input_dim=24,
        addition_time_embed_dim=8,
        num_frames=TINY_SVD_FRAMES,
    ).eval()
    # SVD's own scheduler settings (stabilityai/stable-video-diffusion-img2vid-xt-1-1).
    scheduler = EulerDiscreteScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        interpolation_type="linear",
        num_train_timesteps=1000,
        prediction_type="v_prediction",
        sigma_max=700.0,
        sigma_min=0.002,
        steps_offset=1,
        timestep_spacing="leading",
        timestep_type="continuous",
        use_karras_sigmas=True,
    )
    # Five blocks (the real VAE has four): latents at 1/16 of the output, so that the
    # attention of the VAE's middle block is over 36x64 positions, not 72x128.
    vae = AutoencoderKLTemporalDecoder(
        block_out_channels=(32,) * 5,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 5,
        latent_channels=4,
        layers_per_block=1,
    ).eval()
    encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=32,
            projection_dim=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=224,
            intermediate_size=37,
            patch_size=32,
        )
    ).eval()
    features = CLIPImageProcessor(crop_size=224, size=224)
    pipeline = StableVideoDiffusionPipeline(
        vae=vae,
        image_encoder=encoder,
        unet=unet,
        scheduler=scheduler,
        feature_extractor=features,
    )
    pipeline.save_pretrained(str(directory), safe_serialization=True)
    return directory
