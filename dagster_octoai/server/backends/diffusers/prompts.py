"""Prompts as embeddings: OctoAI's prompt weighting, long prompts and ``clip_skip``.

The seed: "You can use prompt weighting, e.g. (A tall (beautiful:1.5) woman:1.0) ... The
weight will be the product of all brackets a token is a member of. The brackets, colons
and weights do not count towards the number of tokens." :func:`parse_weights` splits a
prompt into (text, weight) runs that way (a bracket without a weight multiplies by 1.1,
as in A1111; ``\\(`` is a literal bracket); :func:`encode_prompt` tokenizes each run,
encodes chunks of 75 tokens (SD 1.5 takes up to three: the 231-token limit, SDXL one)
and scales each token's embedding by its weight, keeping the embeddings' mean.

The backend always hands the pipelines embeddings, never text, so diffusers' own
``clip_skip`` code (which breaks on transformers >= 5.6's flattened ``CLIPTextModel``,
diffusers issue 14124) is never run; :func:`final_layer_norm` finds the layer in
either layout.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["PromptEmbeddings", "encode_prompt", "final_layer_norm", "parse_weights"]

#: A bracket without an explicit weight multiplies by this (A1111's convention).
BARE_BRACKET_WEIGHT = 1.1
CHUNK_TOKENS = 75  # 77 minus the start and end tokens

# A weight is any decimal number, exponents included: a huge one is refused, not text.
_TOKEN = re.compile(
    r"\\[()\\]|\(|\)|:\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*\)|[^\\():]+|:|\\"
)


def parse_weights(prompt: str) -> list[tuple[str, float]]:
    """(text, weight) runs of a prompt; weights multiply through nested brackets.

    Examples:
        >>> parse_weights("(A tall (beautiful:1.5) woman:1.0) (some other:0.8)")
        [('A tall ', 1.0), ('beautiful', 1.5), (' woman ', 1.0), ('some other', 0.8)]
        >>> parse_weights("a (red) fox, \\\\(not weighted\\\\)")
        [('a ', 1.0), ('red', 1.1), (' fox, (not weighted)', 1.0)]
    """
    runs: list[tuple[str, float]] = []
    # Each open bracket: the index in ``runs`` where its text starts.
    stack: list[int] = []

    def add(text: str) -> None:
        if not text:
            return
        runs.append((text, 1.0))

    for match in _TOKEN.finditer(prompt):
        tok = match.group(0)
        if tok.startswith("\\") and len(tok) == 2:
            add(tok[1])
        elif tok == "(":
            stack.append(len(runs))
        elif tok == ")" or match.group(1) is not None:
            if not stack:
                add(tok)  # an unmatched closing bracket is text
                continue
            start = stack.pop()
            weight = float(match.group(1)) if match.group(1) is not None else BARE_BRACKET_WEIGHT
            runs[start:] = [(text, w * weight) for text, w in runs[start:]]
        else:
            add(tok)
    # Unclosed brackets weigh like bare ones (A1111 does the same).
    for start in reversed(stack):
        runs[start:] = [(text, w * BARE_BRACKET_WEIGHT) for text, w in runs[start:]]
    merged: list[tuple[str, float]] = []
    for text, weight in runs:
        if merged and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + text, weight)
        else:
            merged.append((text, weight))
    return merged


def _weighted_ids(
    runs: list[tuple[str, float]], tokenizer: Any, max_tokens: int
) -> tuple[list[int], list[float]]:
    ids: list[int] = []
    weights: list[float] = []
    for text, weight in runs:
        tokens = tokenizer(text, add_special_tokens=False, truncation=False)["input_ids"]
        ids.extend(tokens)
        weights.extend([weight] * len(tokens))
    # The service ignores a prompt's tail past the engine's limit.
    return ids[:max_tokens], weights[:max_tokens]


def _chunks(
    ids: list[int], weights: list[float], tokenizer: Any, count: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, weights) of ``count`` 77-token chunks, each with its own start and end token."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    rows, wrows = [], []
    for i in range(count):
        part = ids[i * CHUNK_TOKENS : (i + 1) * CHUNK_TOKENS]
        wpart = weights[i * CHUNK_TOKENS : (i + 1) * CHUNK_TOKENS]
        filler = CHUNK_TOKENS - len(part)
        rows.append([bos, *part, eos] + [pad] * filler)
        wrows.append([1.0, *wpart, 1.0] + [1.0] * filler)
    return torch.tensor(rows), torch.tensor(wrows)


def final_layer_norm(text_encoder: Any) -> Any:
    """The CLIP text model's final LayerNorm, in transformers' nested or flattened layout.

    transformers 5.6 removed ``CLIPTextModel.text_model`` (its submodules moved up);
    ``CLIPTextModelWithProjection`` still has it.
    """
    inner = getattr(text_encoder, "text_model", text_encoder)
    return inner.final_layer_norm


@dataclass
class PromptEmbeddings:
    """What the pipelines take instead of text."""

    prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor | None = None
    negative_pooled_prompt_embeds: torch.Tensor | None = None

    def as_kwargs(self) -> dict[str, torch.Tensor]:
        out = {
            "prompt_embeds": self.prompt_embeds,
            "negative_prompt_embeds": self.negative_prompt_embeds,
        }
        if self.pooled_prompt_embeds is not None:
            assert self.negative_pooled_prompt_embeds is not None
            out["pooled_prompt_embeds"] = self.pooled_prompt_embeds
            out["negative_pooled_prompt_embeds"] = self.negative_pooled_prompt_embeds
        return out


def _encode_chunks(
    text_encoder: Any,
    ids: torch.Tensor,
    weights: torch.Tensor,
    *,
    hidden_layer: int | None,
    normalize: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weighted hidden states of all chunks side by side, the first chunk's pooled output).

    ``hidden_layer`` None: the last layer's (normalized) output; else ``hidden_states[i]``,
    re-normalized when ``normalize`` (SD 1.5's clip_skip), as diffusers does.
    """
    device = text_encoder.device
    out = text_encoder(ids.to(device), output_hidden_states=True)
    if hidden_layer is None:
        hidden = out[0]
    else:
        hidden = out.hidden_states[hidden_layer]
        if normalize:
            hidden = final_layer_norm(text_encoder)(hidden)
    hidden = hidden.to(torch.float32)
    w = weights.to(device=hidden.device, dtype=hidden.dtype)
    # Scale tokens by weight, then restore the original mean so that weighting shifts
    # emphasis rather than overall magnitude.
    before = hidden.mean()
    hidden = hidden * w.unsqueeze(-1)
    after = hidden.mean()
    if after.abs() > 1e-12:
        hidden = hidden * (before / after)
    # CLIPTextModelWithProjection (SDXL's second encoder) gives the pooled, projected output.
    text_embeds = getattr(out, "text_embeds", None)
    pooled = None if text_embeds is None else text_embeds[:1]
    joined = hidden.reshape(1, -1, hidden.shape[-1])
    return joined, pooled


def encode_prompt(
    pipe: Any,
    prompt: str,
    negative_prompt: str | None,
    *,
    prompt_2: str | None = None,
    negative_prompt_2: str | None = None,
    clip_skip: int | None = None,
    max_tokens: int,
    dtype: torch.dtype,
) -> PromptEmbeddings:
    """Weighted embeddings of a prompt and its negative for an SD 1.5 or SDXL pipeline.

    ``max_tokens``: 231 (SD 1.5) or 77 (SDXL); more tokens are dropped, as the service does.
    ``clip_skip``: layers to skip from the end (1 = the penultimate layer on SD 1.5;
    SDXL already uses the penultimate layer, so 1 takes the one before it), as in diffusers.
    """
    is_xl = getattr(pipe, "text_encoder_2", None) is not None
    pairs: list[tuple[Any, Any]] = []
    if getattr(pipe, "text_encoder", None) is not None:
        pairs.append((pipe.tokenizer, pipe.text_encoder))
    if is_xl:
        pairs.append((pipe.tokenizer_2, pipe.text_encoder_2))
    if is_xl:
        # SDXL's prompt_2 goes to the second encoder; without it both read prompt. The
        # refiner has only the second encoder.
        texts = [prompt, prompt_2 or prompt][-len(pairs) :]
        negatives = [negative_prompt or "", negative_prompt_2 or negative_prompt or ""]
        negatives = negatives[-len(pairs) :]
    else:
        texts, negatives = [prompt], [negative_prompt or ""]
    token_limit = min(max_tokens, CHUNK_TOKENS * (1 if is_xl else 3))

    def runs_for(text: str, tokenizer: Any) -> tuple[list[int], list[float]]:
        # A textual inversion's trigger word becomes its vectors' tokens here.
        if hasattr(pipe, "maybe_convert_prompt"):
            text = pipe.maybe_convert_prompt(text, tokenizer)
        return _weighted_ids(parse_weights(text), tokenizer, token_limit)

    pos_tokens = [runs_for(t, tok) for t, (tok, _) in zip(texts, pairs, strict=True)]
    neg_tokens = [runs_for(t, tok) for t, (tok, _) in zip(negatives, pairs, strict=True)]
    # Prompt and negative take the same number of chunks (the pipeline concatenates them).
    count = max(1, *(-(-len(ids) // CHUNK_TOKENS) for ids, _ in pos_tokens + neg_tokens))

    hidden_layer: int | None
    if is_xl:
        hidden_layer = -2 if clip_skip is None else -(clip_skip + 2)
        normalize = False
    else:
        hidden_layer = None if clip_skip is None else -(clip_skip + 1)
        normalize = True

    def encode(tokens: list[tuple[list[int], list[float]]]) -> tuple[torch.Tensor, Any]:
        hidden_parts, pooled = [], None
        for (ids, weights), (tokenizer, encoder) in zip(tokens, pairs, strict=True):
            chunk_ids, chunk_weights = _chunks(ids, weights, tokenizer, count)
            hidden, pooled_here = _encode_chunks(
                encoder, chunk_ids, chunk_weights, hidden_layer=hidden_layer, normalize=normalize
            )
            hidden_parts.append(hidden)
            if pooled_here is not None and encoder is getattr(pipe, "text_encoder_2", None):
                pooled = pooled_here
        return torch.cat(hidden_parts, dim=-1).to(dtype), pooled

    with torch.no_grad():
        prompt_embeds, pooled = encode(pos_tokens)
        negative_embeds, negative_pooled = encode(neg_tokens)
    zero_negative = (
        is_xl
        and not (negative_prompt or negative_prompt_2)
        and bool(getattr(pipe.config, "force_zeros_for_empty_prompt", False))
    )
    if zero_negative:
        # SDXL's convention: no negative prompt means zero embeddings, not those of "".
        negative_embeds = torch.zeros_like(negative_embeds)
        negative_pooled = None if negative_pooled is None else torch.zeros_like(negative_pooled)
    if not is_xl:
        return PromptEmbeddings(prompt_embeds, negative_embeds)
    assert pooled is not None and negative_pooled is not None
    return PromptEmbeddings(
        prompt_embeds, negative_embeds, pooled.to(dtype), negative_pooled.to(dtype)
    )
