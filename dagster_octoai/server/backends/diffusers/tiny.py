"""``dagster-octoai tiny-models DIR``: a random-weight model directory, built offline.

The directory has the layout a user's real weights use (see :mod:`.library`): diffusers
folders for the base models, the refiner, a second checkpoint and the ControlNets, and
single ``.safetensors`` files for the LoRAs, textual inversions, a VAE and the second
checkpoint once more (original LDM format, as civitai and A1111 files are: :mod:`.ldm`). The backend
loads them through the same ``from_pretrained`` / ``from_single_file`` /
``load_lora_weights`` / ``load_textual_inversion`` calls as real weights.

Everything comes from configs: no download. The CLIP tokenizer's vocabulary is
generated (byte-level BPE merges learned from a small built-in word list), so prompts
tokenize the way CLIP's do, only into more, shorter pieces.

The sizes keep the real latent scale factor (a four-block VAE, 8x) and the real engine
sizes (SDXL 1024x1024, SD 1.5 512x512) while staying small enough that one image takes
seconds on a 2-core CPU: few channels (2-8 in the VAE, 8-32 in the UNet), one layer per
block, attention only at the lowest resolution. ``scale="full"`` writes the real SDXL /
SD 1.5 architectures (random weights, gigabytes) to disk; the GPU benchmark builds its
full-size models in GPU memory instead (``benchmarks/gpu_models.py``). The images are noise either way.
"""

from __future__ import annotations

import copy
import itertools
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

__all__ = ["ModelScale", "write_models"]

ModelScale = Literal["tiny", "full"]

# The scheduler configs of the real checkpoints (their scheduler_config.json).
_SD15_SCHEDULER: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
    "trained_betas": None,
}
_SDXL_SCHEDULER: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "interpolation_type": "linear",
    "prediction_type": "epsilon",
    "use_karras_sigmas": False,
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "clip_sample": False,
}


@dataclass(frozen=True)
class _Sizes:
    """Architecture sizes of one scale; the SDXL/SD 1.5 structure is the same at both."""

    unet_channels: tuple[int, ...]
    unet_layers: int
    unet_heads: int | tuple[int, ...]
    unet_groups: int
    sd15_channels: tuple[int, ...]
    sd15_down: tuple[str, ...]
    sdxl_down: tuple[str, ...]
    sdxl_transformer_layers: int | tuple[int, ...]
    refiner_channels: tuple[int, ...]
    refiner_down: tuple[str, ...]
    refiner_heads: int | tuple[int, ...]
    refiner_transformer_layers: int
    time_embed_dim: int
    vae_channels: tuple[int, ...]
    vae_layers: int
    vae_groups: int
    vae_mid_attention: bool
    clip_l: dict[str, int] = field(default_factory=dict)
    clip_g: dict[str, int] = field(default_factory=dict)
    controlnet_embedding: tuple[int, ...] = (16, 32, 96, 256)
    vocab_size: int | None = None


_TINY = _Sizes(
    unet_channels=(8, 16, 32),
    unet_layers=1,
    unet_heads=8,
    unet_groups=4,
    sd15_channels=(8, 16, 32),
    sd15_down=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
    sdxl_down=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
    sdxl_transformer_layers=1,
    refiner_channels=(8, 16, 32),
    refiner_down=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
    refiner_heads=8,
    refiner_transformer_layers=1,
    time_embed_dim=8,
    # Two channels at full resolution: the 1024x1024 decode is most of a tiny SDXL
    # image's time (0.62 s here against 1.05 s with four, one thread).
    vae_channels=(2, 4, 8, 8),
    vae_layers=1,
    vae_groups=2,
    # Attention over 128x128 latents is most of a 1024x1024 decode; the real VAEs have it.
    vae_mid_attention=False,
    # 12 layers like CLIP-L, so every clip_skip (1..12) of the API has a layer to take.
    clip_l={"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "layers": 12},
    # Wider than CLIP-L, as bigG is: diffusers' single-file loader tells SDXL's two text
    # encoders apart by their width.
    clip_g={"hidden_size": 48, "intermediate_size": 53, "num_attention_heads": 4, "layers": 12},
    controlnet_embedding=(4, 8, 8, 16),
)
_FULL = _Sizes(
    unet_channels=(320, 640, 1280),
    unet_layers=2,
    unet_heads=(5, 10, 20),
    unet_groups=32,
    sd15_channels=(320, 640, 1280, 1280),
    sd15_down=(
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    sdxl_down=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    sdxl_transformer_layers=(1, 2, 10),
    refiner_channels=(384, 768, 1536, 1536),
    refiner_down=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    refiner_heads=(6, 12, 24, 24),
    refiner_transformer_layers=4,
    time_embed_dim=256,
    vae_channels=(128, 256, 512, 512),
    vae_layers=2,
    vae_groups=32,
    vae_mid_attention=True,
    clip_l={"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "layers": 12},
    clip_g={
        "hidden_size": 1280,
        "intermediate_size": 5120,
        "num_attention_heads": 20,
        "layers": 32,
    },
    vocab_size=49408,
)

_UP = {"CrossAttnDownBlock2D": "CrossAttnUpBlock2D", "DownBlock2D": "UpBlock2D"}

# Words the generated BPE learns its merges from: prompt vocabulary, so that common prompt
# words become a few tokens each. Any text still tokenizes (byte-level fallback).
_CORPUS = [
    "a",
    "an",
    "the",
    "of",
    "and",
    "with",
    "in",
    "on",
    "at",
    "to",
    "for",
    "from",
    "by",
    "photo",
    "photograph",
    "portrait",
    "picture",
    "image",
    "painting",
    "drawing",
    "illustration",
    "render",
    "art",
    "style",
    "shot",
    "close",
    "up",
    "wide",
    "angle",
    "light",
    "lighting",
    "dark",
    "bright",
    "soft",
    "sharp",
    "detailed",
    "high",
    "quality",
    "low",
    "resolution",
    "blurry",
    "bad",
    "hands",
    "face",
    "eyes",
    "hair",
    "woman",
    "man",
    "girl",
    "boy",
    "child",
    "cat",
    "dog",
    "fox",
    "bird",
    "horse",
    "dragon",
    "robot",
    "astronaut",
    "castle",
    "city",
    "street",
    "forest",
    "mountain",
    "river",
    "sea",
    "ocean",
    "lake",
    "sky",
    "cloud",
    "sunset",
    "sunrise",
    "night",
    "day",
    "dusk",
    "dawn",
    "winter",
    "summer",
    "spring",
    "autumn",
    "rain",
    "snow",
    "fog",
    "red",
    "orange",
    "yellow",
    "green",
    "blue",
    "purple",
    "pink",
    "black",
    "white",
    "gray",
    "gold",
    "silver",
    "colorful",
    "background",
    "foreground",
    "product",
    "bottle",
    "shoe",
    "chair",
    "table",
    "lamp",
    "car",
    "bicycle",
    "house",
    "tree",
    "flower",
    "cup",
    "cinematic",
    "photographic",
    "anime",
    "digital",
    "watercolor",
    "oil",
    "sketch",
    "pencil",
    "neon",
    "cyberpunk",
    "fantasy",
    "realistic",
    "hyperrealistic",
    "masterpiece",
    "best",
    "trending",
    "concept",
    "splash",
    "dramatic",
    "studio",
    "3d",
    "model",
    "tall",
    "beautiful",
    "cute",
    "small",
    "large",
    "old",
    "young",
    "happy",
    "sad",
    "lighthouse",
    "tiger",
    "space",
    "golden",
    "throne",
]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def _generated_vocabulary(merge_count: int = 600) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP-style vocabulary and merges learned from :data:`_CORPUS` (plain BPE)."""
    byte_chars = list(_bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars]
    words = Counter(_CORPUS)
    splits = {w: [*w[:-1], w[-1] + "</w>"] for w in words}
    merges: list[tuple[str, str]] = []
    for _ in range(merge_count):
        pairs: Counter[tuple[str, str]] = Counter()
        for word, parts in splits.items():
            for a, b in itertools.pairwise(parts):
                pairs[a, b] += words[word]
        if not pairs:
            break
        (a, b), _count = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        merges.append((a, b))
        tokens.append(a + b)
        for word, parts in splits.items():
            merged: list[str] = []
            i = 0
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == a and parts[i + 1] == b:
                    merged.append(a + b)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            splits[word] = merged
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    return vocab, merges


def _tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]], pad: str | None = None) -> Any:
    from transformers import CLIPTokenizer

    kwargs = {} if pad is None else {"pad_token": pad}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77, **kwargs)


def _clip(sizes: dict[str, int], vocab_size: int, act: str, projection: bool) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        hidden_size=sizes["hidden_size"],
        intermediate_size=sizes["intermediate_size"],
        num_attention_heads=sizes["num_attention_heads"],
        num_hidden_layers=sizes["layers"],
        projection_dim=sizes["hidden_size"],
        vocab_size=vocab_size,
        max_position_embeddings=77,
        hidden_act=act,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=1,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def _vae(s: _Sizes, scaling: float, sample: int, force_upcast: bool) -> Any:
    from diffusers import AutoencoderKL

    blocks = len(s.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=s.vae_channels,
        layers_per_block=s.vae_layers,
        latent_channels=4,
        norm_num_groups=s.vae_groups,
        sample_size=sample,
        scaling_factor=scaling,
        force_upcast=force_upcast,
        mid_block_add_attention=s.vae_mid_attention,
    ).eval()


def _unet(
    channels: tuple[int, ...],
    down: tuple[str, ...],
    s: _Sizes,
    *,
    heads: int | tuple[int, ...],
    cross: int,
    sample: int,
    xl: dict[str, Any] | None = None,
) -> Any:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=sample,
        in_channels=4,
        out_channels=4,
        block_out_channels=channels,
        layers_per_block=s.unet_layers,
        down_block_types=down,
        up_block_types=tuple(_UP[b] for b in reversed(down)),
        attention_head_dim=heads,
        cross_attention_dim=cross,
        norm_num_groups=s.unet_groups,
        **(xl or {}),
    ).eval()


def _randomize_zero_layers(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Give zero-initialised layers (ControlNet's zero convolutions) random weights.

    A freshly made ControlNet adds exactly nothing; random weights must show an effect.
    """
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1 and not param.any():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)


@dataclass
class _Family:
    pipeline: Any
    unet: Any
    text_encoders: list[Any]


def _sd15(s: _Sizes, vocab: dict[str, int], merges: list[tuple[str, str]], seed: int) -> _Family:
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    torch.manual_seed(seed)
    vocab_size = s.vocab_size or len(vocab)
    text_encoder = _clip(s.clip_l, vocab_size, "quick_gelu", projection=False)
    unet = _unet(
        s.sd15_channels,
        s.sd15_down,
        s,
        heads=8,
        cross=s.clip_l["hidden_size"],
        sample=64,
    )
    pipe = StableDiffusionPipeline(
        vae=_vae(s, 0.18215, 512, force_upcast=False),
        text_encoder=text_encoder,
        tokenizer=_tokenizer(vocab, merges),
        unet=unet,
        scheduler=PNDMScheduler.from_config(_SD15_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return _Family(pipe, unet, [text_encoder])


def _sdxl_unet_extras(s: _Sizes, projection: int, time_ids: int) -> dict[str, Any]:
    return {
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": s.time_embed_dim,
        "projection_class_embeddings_input_dim": time_ids * s.time_embed_dim + projection,
        "use_linear_projection": True,
    }


def _sdxl(s: _Sizes, vocab: dict[str, int], merges: list[tuple[str, str]], seed: int) -> _Family:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    torch.manual_seed(seed)
    vocab_size = s.vocab_size or len(vocab)
    text_encoder = _clip(s.clip_l, vocab_size, "quick_gelu", projection=False)
    text_encoder_2 = _clip(s.clip_g, vocab_size, "gelu", projection=True)
    unet = _unet(
        s.unet_channels,
        s.sdxl_down,
        s,
        heads=s.unet_heads,
        cross=s.clip_l["hidden_size"] + s.clip_g["hidden_size"],
        sample=128,
        xl={
            **_sdxl_unet_extras(s, s.clip_g["hidden_size"], 6),
            "transformer_layers_per_block": s.sdxl_transformer_layers,
        },
    )
    pipe = StableDiffusionXLPipeline(
        vae=_vae(s, 0.13025, 1024, force_upcast=True),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=_tokenizer(vocab, merges),
        tokenizer_2=_tokenizer(vocab, merges, pad="!"),
        unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(_SDXL_SCHEDULER),
        force_zeros_for_empty_prompt=True,
    )
    return _Family(pipe, unet, [text_encoder, text_encoder_2])


def _refiner(s: _Sizes, base: _Family, seed: int) -> Any:
    """An SDXL refiner sharing the base's second text encoder and VAE, as the real one does."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline

    torch.manual_seed(seed)
    unet = _unet(
        s.refiner_channels,
        s.refiner_down,
        s,
        heads=s.refiner_heads,
        cross=s.clip_g["hidden_size"],
        sample=128,
        xl={
            # The refiner's time ids carry an aesthetic score instead of the target size.
            **_sdxl_unet_extras(s, s.clip_g["hidden_size"], 5),
            "transformer_layers_per_block": s.refiner_transformer_layers,
        },
    )
    pipe = base.pipeline
    return StableDiffusionXLImg2ImgPipeline(
        vae=pipe.vae,
        text_encoder=None,
        text_encoder_2=pipe.text_encoder_2,
        tokenizer=None,
        tokenizer_2=pipe.tokenizer_2,
        unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(_SDXL_SCHEDULER),
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
    )


def _controlnet(s: _Sizes, family: _Family, seed: int) -> Any:
    from diffusers import ControlNetModel

    generator = torch.Generator().manual_seed(seed)
    controlnet = ControlNetModel.from_unet(
        family.unet, conditioning_embedding_out_channels=s.controlnet_embedding
    )
    _randomize_zero_layers(controlnet, generator)
    return controlnet.eval()


def _write_lora(family: _Family, pipeline_cls: Any, path: Path, seed: int) -> None:
    """A UNet LoRA (rank 4 on the attention projections) in the diffusers/PEFT file format."""
    from peft import LoraConfig, get_peft_model_state_dict

    torch.manual_seed(seed)
    unet = copy.deepcopy(family.unet)
    # init_lora_weights=False: random A and B (PEFT's default B = 0 would change nothing).
    unet.add_adapter(
        LoraConfig(
            r=4,
            lora_alpha=4,
            target_modules=["to_q", "to_k", "to_v", "to_out.0"],
            init_lora_weights=False,
        )
    )
    pipeline_cls.save_lora_weights(
        str(path.parent), unet_lora_layers=get_peft_model_state_dict(unet), weight_name=path.name
    )


def _write_textual_inversion(family: _Family, path: Path, seed: int, vectors: int = 2) -> None:
    """A textual inversion file: one tensor per text encoder, as A1111 / civitai files have."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    names = ["emb_params"] if len(family.text_encoders) == 1 else ["clip_l", "clip_g"]
    for name, encoder in zip(names, family.text_encoders, strict=True):
        table = encoder.get_input_embeddings().weight
        tensors[name] = (
            torch.randn(vectors, table.shape[1], generator=generator) * 3.0 * table.std()
        ).contiguous()
    save_file(tensors, str(path))


def _write_vae_file(
    s: _Sizes, scaling: float, sample: int, xl: bool, path: Path, seed: int
) -> None:
    """A VAE as one ``.safetensors`` file (diffusers keys), beside the base's ``vae/`` config."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    vae = _vae(s, scaling, sample, force_upcast=xl)
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(path))


_README = """\
A dagster-octoai model directory (written by `dagster-octoai tiny-models`).

Random weights: every image these models make is noise. The layout is the one the
diffusers backend reads for real weights too (docs/diffusers-backend.md):

  <family>/base/                  the engine's default checkpoint (diffusers folder)
  sdxl/refiner/                   the SDXL refiner (diffusers folder; optional)
  <family>/checkpoints/NAME/      more checkpoints: diffusers folders or NAME.safetensors
  <family>/controlnets/NAME/      ControlNets (diffusers folders); a name with "canny"
                                  gets the server's Canny preprocessing
  <family>/loras/NAME.safetensors             LoRAs (diffusers / kohya files)
  <family>/textual_inversions/NAME.safetensors textual inversions
  <family>/vaes/NAME/ or NAME.safetensors     VAEs
  sdxl/ip_adapters/NAME/          photo merge: an IP-Adapter .safetensors and image_encoder/
  svd/base/                       Stable Video Diffusion (POST /generate/svd; optional)

Families: sdxl (engines sdxl, controlnet-sdxl) and sd15 (engines sd, controlnet-sd15);
ssd/base (engine ssd, SDXL's layout), sd3/base (engine sd3), flux/schnell and flux/dev
(engines flux-schnell, flux-dev) with flux/loras/ shared by both.
"""


def _write_new_families(
    root: Path, s: _Sizes, vocab: dict[str, int], merges: list[tuple[str, str]], seed: int
) -> None:
    """SSD-1B (the SDXL architecture, its own base and LoRA), FLUX.1 and SD3 (:mod:`.tiny_flow`)."""
    from diffusers import StableDiffusionXLPipeline

    from .tiny_flow import write_flow_models

    ssd = _sdxl(s, vocab, merges, seed + 90)
    ssd.pipeline.save_pretrained(str(root / "ssd" / "base"), safe_serialization=True)
    (root / "ssd" / "loras").mkdir()
    _write_lora(
        ssd, StableDiffusionXLPipeline, root / "ssd" / "loras" / "tiny-ssd.safetensors", seed + 91
    )
    vocab_size = s.vocab_size or len(vocab)
    write_flow_models(
        root,
        words=_CORPUS,
        clip_sizes=s.clip_l,
        make_tokenizer=lambda pad: _tokenizer(vocab, merges, pad=pad),
        make_clip=lambda projection: _clip(s.clip_l, vocab_size, "gelu", projection=projection),
        seed=seed,
    )


def write_models(directory: Path | str, *, scale: ModelScale = "tiny", seed: int = 0) -> Path:
    """Write the model directory under ``directory`` (created; must be empty or absent).

    ``scale="tiny"`` (seconds to write, a few MB) is what tests and the demo use;
    ``scale="full"`` writes the real SDXL and SD 1.5 architectures in fp16 (about 10 GB)
    (the GPU benchmark builds its full-size models in GPU memory instead).

    Examples:
        >>> import tempfile
        >>> root = write_models(tempfile.mkdtemp())  # doctest: +SKIP
        >>> sorted(p.name for p in (root / "sdxl").iterdir())  # doctest: +SKIP
        ['base', 'checkpoints', 'controlnets', 'loras', 'refiner', 'textual_inversions', 'vaes']
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from safetensors.torch import save_file

    from .backend import _quiet_libraries
    from .ldm import pipeline_to_ldm

    _quiet_libraries()
    root = Path(directory)
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty; tiny-models writes into an empty directory")
    sizes = _TINY if scale == "tiny" else _FULL
    save: dict[str, Any] = {"safe_serialization": True}
    vocab, merges = _generated_vocabulary()
    dtype = torch.float32 if scale == "tiny" else torch.float16

    for name, build, pipeline_cls, canny, other in (
        ("sd15", _sd15, StableDiffusionPipeline, "canny_sd15", "lineart_sd15"),
        ("sdxl", _sdxl, StableDiffusionXLPipeline, "canny_sdxl", "depth_sdxl"),
    ):
        fam_dir = root / name
        for sub in ("checkpoints", "controlnets", "loras", "textual_inversions", "vaes"):
            (fam_dir / sub).mkdir(parents=True)
        family = build(sizes, vocab, merges, seed)
        if dtype != torch.float32:
            family.pipeline.to(dtype)
        family.pipeline.save_pretrained(str(fam_dir / "base"), **save)
        if name == "sdxl":
            refiner = _refiner(sizes, family, seed + 1)
            if dtype != torch.float32:
                refiner.to(dtype)
            refiner.save_pretrained(str(fam_dir / "refiner"), **save)
        if scale == "full":
            continue  # the benchmark needs the engines, not the asset library
        alt = build(sizes, vocab, merges, seed + 10).pipeline
        alt.save_pretrained(str(fam_dir / "checkpoints" / f"tiny-{name}-alt"), **save)
        # The same weights as one original-format file, the kind civitai and A1111 use.
        save_file(
            pipeline_to_ldm(alt),
            str(fam_dir / "checkpoints" / f"tiny-{name}-alt-file.safetensors"),
        )
        _controlnet(sizes, family, seed + 20).save_pretrained(str(fam_dir / "controlnets" / canny))
        _controlnet(sizes, family, seed + 21).save_pretrained(str(fam_dir / "controlnets" / other))
        for i, lora in enumerate(("tiny-crayon", "tiny-ink")):
            _write_lora(
                family, pipeline_cls, fam_dir / "loras" / f"{lora}.safetensors", seed + 30 + i
            )
        _write_textual_inversion(
            family, fam_dir / "textual_inversions" / "tiny-negative.safetensors", seed + 40
        )
        xl = name == "sdxl"
        if xl:
            from .photo_merge import write_tiny_ip_adapter

            write_tiny_ip_adapter(
                family.unet, fam_dir / "ip_adapters" / "tiny-photo-merge", seed + 60
            )
        _write_vae_file(
            sizes,
            0.13025 if xl else 0.18215,
            1024 if xl else 512,
            xl,
            fam_dir / "vaes" / f"tiny-vae-{name}.safetensors",
            seed + 50,
        )
    if scale == "tiny":
        _write_new_families(root, sizes, vocab, merges, seed)
        from .tiny_svd import write_tiny_svd

        write_tiny_svd(root / "svd" / "base", seed=seed + 100)
    (root / "README.txt").write_text(_README)
    (root / "dagster-octoai-models.json").write_text(
        json.dumps({"format": 1, "scale": scale, "random_weights": True}, indent=2) + "\n"
    )
    return root
