"""Tiny random-weight FLUX.1 and Stable Diffusion 3 models, written by ``tiny-models``.

The flow-matching families beside :mod:`.tiny`'s SDXL / SD 1.5: a FLUX transformer
(schnell without, dev with the guidance embedding), an SD3 transformer, their 16-channel
VAEs (8x, as the real ones), CLIP text encoders and a T5 encoder whose tokenizer is
generated here (a Unigram vocabulary of prompt words and single characters), so that
nothing is downloaded. The sizes follow diffusers' own tests (``get_dummy_components``
of ``tests/pipelines/flux`` and ``stable_diffusion_3``), with the real latent packing
and patching so that the API's 1024x1024 works, in seconds per image on a 2-core CPU.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

__all__ = ["write_flow_models"]

# The real checkpoints' scheduler configs (scheduler/scheduler_config.json).
_FLUX_SCHNELL_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": False,
}
_FLUX_DEV_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
_SD3_SCHEDULER: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 3.0}

_T5_WIDTH = 64  # >= the two CLIPs' widths together: SD3 pads CLIP's embeddings to T5's


def _t5_tokenizer(words: list[str]) -> Any:
    """A T5 (Unigram) tokenizer: whole prompt words, then single characters as fallback."""
    from transformers import T5Tokenizer

    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    seen = {p for p, _ in pieces}
    for word in words:
        piece = "\u2581" + word
        if piece not in seen:
            seen.add(piece)
            pieces.append((piece, -2.0 - 0.01 * len(pieces)))
    chars = sorted({c for w in words for c in w} | set("0123456789.,:;!?()'\"-_/"))
    for char in ["\u2581", *chars]:
        for piece in (char, "\u2581" + char):
            if piece not in seen:
                seen.add(piece)
                pieces.append((piece, -10.0))
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


def _t5(vocab_size: int) -> Any:
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size,
        d_model=_T5_WIDTH,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5EncoderModel(config).eval()


def _flow_vae(shift: float, scaling: float) -> Any:
    """A 16-channel 8x VAE without quant convs, as FLUX's and SD3's."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(2, 4, 8, 8),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=2,
        sample_size=1024,
        scaling_factor=scaling,
        shift_factor=shift,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=False,
    ).eval()


def _flux(
    clip_sizes: dict[str, int], clip: Any, tokenizer: Any, t5_tokenizer: Any, dev: bool, seed: int
) -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 16 latent channels packed 2x2
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=_T5_WIDTH,
        pooled_projection_dim=clip_sizes["hidden_size"],
        guidance_embeds=dev,
        axes_dims_rope=(4, 4, 8),
    ).eval()
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(
            _FLUX_DEV_SCHEDULER if dev else _FLUX_SCHNELL_SCHEDULER
        ),
        vae=_flow_vae(0.1159, 0.3611),
        text_encoder=clip,
        tokenizer=tokenizer,
        text_encoder_2=_t5(len(t5_tokenizer)),
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
    )


def _sd3(
    clip_sizes: dict[str, int],
    make_clip: Any,
    tokenizer: Any,
    tokenizer_2: Any,
    t5_tokenizer: Any,
    seed: int,
) -> Any:
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    torch.manual_seed(seed)
    width = clip_sizes["hidden_size"]
    transformer = SD3Transformer2DModel(
        sample_size=128,
        patch_size=2,
        in_channels=16,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=_T5_WIDTH,
        caption_projection_dim=32,
        pooled_projection_dim=2 * width,  # the two CLIPs' pooled outputs together
        out_channels=16,
        pos_embed_max_size=96,
    ).eval()
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(_SD3_SCHEDULER),
        vae=_flow_vae(0.0609, 1.5305),
        text_encoder=make_clip(),
        tokenizer=tokenizer,
        text_encoder_2=make_clip(),
        tokenizer_2=tokenizer_2,
        text_encoder_3=_t5(len(t5_tokenizer)),
        tokenizer_3=t5_tokenizer,
    )


def _write_flux_lora(pipe: Any, path: Path, seed: int) -> None:
    """A transformer LoRA (rank 4 on the attention projections) in the diffusers format."""
    from diffusers import FluxPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    torch.manual_seed(seed)
    transformer = copy.deepcopy(pipe.transformer)
    # init_lora_weights=False: random A and B (PEFT's default B = 0 would change nothing).
    transformer.add_adapter(
        LoraConfig(
            r=4,
            lora_alpha=4,
            target_modules=["to_q", "to_k", "to_v", "to_out.0"],
            init_lora_weights=False,
        )
    )
    FluxPipeline.save_lora_weights(
        str(path.parent),
        transformer_lora_layers=get_peft_model_state_dict(transformer),
        weight_name=path.name,
    )


def write_flow_models(
    root: Path,
    *,
    words: list[str],
    clip_sizes: dict[str, int],
    make_tokenizer: Any,
    make_clip: Any,
    seed: int,
) -> None:
    """Write ``flux/schnell``, ``flux/dev``, ``flux/loras/`` and ``sd3/base`` under ``root``.

    ``make_tokenizer(pad)`` and ``make_clip(projection)`` are :mod:`.tiny`'s CLIP
    builders, so that every family tokenizes prompts alike.
    """
    save: dict[str, Any] = {"safe_serialization": True}
    t5_tokenizer = _t5_tokenizer(words)
    schnell = None
    for name, dev in (("schnell", False), ("dev", True)):
        torch.manual_seed(seed + (61 if dev else 60))
        pipe = _flux(
            clip_sizes,
            make_clip(False),
            make_tokenizer(None),
            t5_tokenizer,
            dev,
            seed + (63 if dev else 62),
        )
        pipe.save_pretrained(str(root / "flux" / name), **save)
        schnell = schnell or pipe
    assert schnell is not None
    loras = root / "flux" / "loras"
    loras.mkdir(parents=True)
    # The dev and schnell transformers share their architecture: one LoRA fits both.
    for i, lora in enumerate(("tiny-flux-crayon", "tiny-flux-ink")):
        _write_flux_lora(schnell, loras / f"{lora}.safetensors", seed + 70 + i)
    torch.manual_seed(seed + 80)
    sd3 = _sd3(
        clip_sizes,
        lambda: make_clip(True),
        make_tokenizer(None),
        make_tokenizer("!"),
        t5_tokenizer,
        seed + 81,
    )
    sd3.save_pretrained(str(root / "sd3" / "base"), **save)
