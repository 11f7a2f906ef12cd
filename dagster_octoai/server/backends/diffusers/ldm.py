"""A diffusers pipeline as one original-format (LDM) checkpoint file, the A1111 / civitai kind.

The inverse of diffusers' own single-file conversion (``loaders/single_file_utils``): the
UNet under ``model.diffusion_model.``, the VAE under ``first_stage_model.``, SD 1.5's CLIP
under ``cond_stage_model.transformer.``, SDXL's two text encoders under
``conditioner.embedders.0.transformer.`` (CLIP-L, Hugging Face keys) and
``conditioner.embedders.1.model.`` (OpenCLIP bigG: fused ``in_proj`` attention, a
transposed projection). ``tiny-models`` writes a checkpoint this way so that the
backend's ``from_single_file`` path runs on the same kind of file users download; a
test checks that the file and the folder it came from give the same bytes.
"""

from __future__ import annotations

import re
from typing import Any

import torch

__all__ = ["pipeline_to_ldm"]

_UNET_TOP = {
    "time_embedding.linear_1.weight": "time_embed.0.weight",
    "time_embedding.linear_1.bias": "time_embed.0.bias",
    "time_embedding.linear_2.weight": "time_embed.2.weight",
    "time_embedding.linear_2.bias": "time_embed.2.bias",
    "conv_in.weight": "input_blocks.0.0.weight",
    "conv_in.bias": "input_blocks.0.0.bias",
    "conv_norm_out.weight": "out.0.weight",
    "conv_norm_out.bias": "out.0.bias",
    "conv_out.weight": "out.2.weight",
    "conv_out.bias": "out.2.bias",
    "add_embedding.linear_1.weight": "label_emb.0.0.weight",
    "add_embedding.linear_1.bias": "label_emb.0.0.bias",
    "add_embedding.linear_2.weight": "label_emb.0.2.weight",
    "add_embedding.linear_2.bias": "label_emb.0.2.bias",
}
_RESNET = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
)
_VAE_TOP = {
    "encoder.conv_norm_out.weight": "encoder.norm_out.weight",
    "encoder.conv_norm_out.bias": "encoder.norm_out.bias",
    "decoder.conv_norm_out.weight": "decoder.norm_out.weight",
    "decoder.conv_norm_out.bias": "decoder.norm_out.bias",
}
_VAE_ATTENTION = (
    ("group_norm.", "norm."),
    ("to_q.", "q."),
    ("to_k.", "k."),
    ("to_v.", "v."),
    ("to_out.0.", "proj_out."),
)


def _resnet(rest: str) -> str:
    for new, old in _RESNET:
        if rest.startswith(new + "."):
            return old + rest[len(new) :]
    return rest


def _unet_key(key: str, layers: int, attention_blocks: set[int]) -> str:
    if key in _UNET_TOP:
        return _UNET_TOP[key]
    stride = layers + 1
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = block * stride + j + 1
        return f"input_blocks.{index}." + (
            f"0.{_resnet(rest)}" if kind == "resnets" else f"1.{rest}"
        )
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{(int(m[1]) + 1) * stride}.0.op.{m[2]}"
    if m := re.match(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
    if m := re.match(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = block * stride + j
        return f"output_blocks.{index}." + (
            f"0.{_resnet(rest)}" if kind == "resnets" else f"1.{rest}"
        )
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        block = int(m[1])
        slot = 2 if block in attention_blocks else 1
        return f"output_blocks.{block * stride + layers}.{slot}.conv.{m[2]}"
    raise KeyError(f"no LDM name for UNet key {key!r}")


def _unet(unet: Any) -> dict[str, torch.Tensor]:
    layers = int(unet.config.layers_per_block)
    attention_blocks = {
        i for i, name in enumerate(unet.config.up_block_types) if "CrossAttn" in name
    }
    return {
        "model.diffusion_model." + _unet_key(k, layers, attention_blocks): v
        for k, v in unet.state_dict().items()
    }


def _vae_key(key: str, blocks: int) -> str:
    if key in _VAE_TOP:
        return _VAE_TOP[key]
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        up = blocks - 1 - int(m[1])
        return f"decoder.up.{up}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        return f"decoder.up.{blocks - 1 - int(m[1])}.upsample.conv.{m[2]}"
    if m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", key):
        rest = m[2]
        for new, old in _VAE_ATTENTION:
            rest = rest.replace(new, old)
        return f"{m[1]}.mid.attn_1.{rest}"
    # conv_in, conv_out, quant_conv, post_quant_conv: the same names.
    return key


def _vae(vae: Any) -> dict[str, torch.Tensor]:
    blocks = len(vae.config.up_block_types)
    out = {}
    for key, value in vae.state_dict().items():
        ldm = _vae_key(key, blocks)
        # The original VAE's attention projections are 1x1 convolutions.
        if ".mid.attn_1." in ldm and ldm.endswith("weight") and value.dim() == 2:
            value = value[:, :, None, None]
        out["first_stage_model." + ldm] = value
    return out


def _open_clip(encoder: Any, prefix: str) -> dict[str, torch.Tensor]:
    """CLIPTextModelWithProjection as OpenCLIP keys (what SDXL checkpoints hold)."""
    sd = encoder.state_dict()
    out: dict[str, torch.Tensor] = {
        prefix + "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
        prefix + "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
        prefix + "ln_final.weight": sd["text_model.final_layer_norm.weight"],
        prefix + "ln_final.bias": sd["text_model.final_layer_norm.bias"],
        prefix + "text_projection": sd["text_projection.weight"].T.contiguous(),
    }
    for i in range(encoder.config.num_hidden_layers):
        src = f"text_model.encoder.layers.{i}."
        dst = f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(
                [sd[f"{src}self_attn.{p}_proj.{kind}"] for p in ("q", "k", "v")]
            )
            out[f"{dst}attn.out_proj.{kind}"] = sd[f"{src}self_attn.out_proj.{kind}"]
            out[f"{dst}ln_1.{kind}"] = sd[f"{src}layer_norm1.{kind}"]
            out[f"{dst}ln_2.{kind}"] = sd[f"{src}layer_norm2.{kind}"]
            out[f"{dst}mlp.c_fc.{kind}"] = sd[f"{src}mlp.fc1.{kind}"]
            out[f"{dst}mlp.c_proj.{kind}"] = sd[f"{src}mlp.fc2.{kind}"]
    return out


def pipeline_to_ldm(pipe: Any) -> dict[str, torch.Tensor]:
    """The state dict of one original-format checkpoint of an SD 1.5 or SDXL pipeline."""
    out = {**_unet(pipe.unet), **_vae(pipe.vae)}
    if getattr(pipe, "text_encoder_2", None) is not None:
        out.update(
            {
                "conditioner.embedders.0.transformer." + k: v
                for k, v in pipe.text_encoder.state_dict().items()
            }
        )
        out.update(_open_clip(pipe.text_encoder_2, "conditioner.embedders.1.model."))
    else:
        out.update(
            {
                "cond_stage_model.transformer." + k: v
                for k, v in pipe.text_encoder.state_dict().items()
            }
        )
    return {k: v.detach().contiguous() for k, v in out.items()}
