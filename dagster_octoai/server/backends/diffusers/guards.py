"""Degenerate but valid requests: what the backend does with them instead of failing.

- img2img and inpainting run ``int(steps x strength)`` denoising steps in diffusers; below
  one the pipeline fails. :func:`denoising_steps` runs at least one whenever
  ``strength > 0``: the schedule is lengthened (``ceil(1 / strength)`` steps, at most
  :data:`MAX_SCHEDULE_STEPS`) so that the same fraction of it is denoised.
- Prompt weights multiply through nested brackets; past :data:`PROMPT_WEIGHT_BOUND` the
  embeddings overflow into a black image: :func:`prompt_weight_problems` refuses them.
- A textual inversion's trigger word that is already a token of the tokenizer cannot be
  loaded (diffusers refuses it): :func:`trigger_word_problems` says so, naming the field.
"""

from __future__ import annotations

import math
from collections.abc import Collection

from ....api.models import ImageGenerationRequest
from .. import Problem
from .prompts import parse_weights

__all__ = [
    "MAX_SCHEDULE_STEPS",
    "PROMPT_WEIGHT_BOUND",
    "denoising_steps",
    "prompt_weight_problems",
    "trigger_word_problems",
]

#: A prompt's effective weights (the product of its brackets) lie within -BOUND..BOUND.
PROMPT_WEIGHT_BOUND = 10.0
#: The longest schedule :func:`denoising_steps` lengthens to (the API's most steps).
MAX_SCHEDULE_STEPS = 200
_PROMPTS = ("prompt", "prompt_2", "negative_prompt", "negative_prompt_2")


def denoising_steps(steps: int, strength: float) -> tuple[int, float]:
    """(steps, strength) for a pipeline that denoises ``int(steps * strength)`` steps.

    Examples:
        >>> denoising_steps(30, 0.8), denoising_steps(1, 0.5), denoising_steps(10, 0.05)
        ((30, 0.8), (2, 0.5), (20, 0.05))
        >>> denoising_steps(10, 0.001)  # past the longest schedule: one step of it
        (200, 0.005)
    """
    if strength <= 0 or int(steps * strength) >= 1:
        return steps, strength
    longer = min(max(steps, math.ceil(1 / strength)), MAX_SCHEDULE_STEPS)
    while longer < MAX_SCHEDULE_STEPS and int(longer * strength) < 1:
        longer += 1  # floating point: 1 / strength may round down
    if int(longer * strength) >= 1:
        return longer, strength
    return MAX_SCHEDULE_STEPS, 1 / MAX_SCHEDULE_STEPS


def prompt_weight_problems(request: ImageGenerationRequest) -> list[Problem]:
    """A 422 entry for each prompt field with a weight past :data:`PROMPT_WEIGHT_BOUND`."""
    problems: list[Problem] = []
    for name in _PROMPTS:
        text = getattr(request, name, None)
        if not text or "(" not in text:
            continue
        worst = max((abs(weight) for _, weight in parse_weights(text)), default=1.0)
        if not worst <= PROMPT_WEIGHT_BOUND:
            problems.append(
                (
                    (name,),
                    f"{name}: a weight of {worst:.3g} (brackets multiply) is out of range; "
                    f"allowed: -{PROMPT_WEIGHT_BOUND:g}..{PROMPT_WEIGHT_BOUND:g}",
                )
            )
    return problems


def trigger_word_problems(
    request: ImageGenerationRequest, vocabulary: Collection[str]
) -> list[Problem]:
    """A 422 entry for each trigger word the tokenizer already has, or given twice."""
    problems: list[Problem] = []
    seen: set[str] = set()
    for name, trigger in (request.textual_inversions or {}).items():
        if trigger in vocabulary:
            problems.append(
                (
                    ("textual_inversions", name),
                    f"textual_inversions: trigger word {trigger!r} of {name!r} is already a "
                    "word of the text encoder's vocabulary; choose a new word, e.g. "
                    f"'<{name}>'",
                )
            )
        elif trigger in seen:
            problems.append(
                (
                    ("textual_inversions", name),
                    f"textual_inversions: trigger word {trigger!r} is given to two textual "
                    "inversions; each needs its own",
                )
            )
        seen.add(trigger)
    return problems
