"""The seeds a request's images or videos get: fixed ones as asked, random ones for the rest."""

from __future__ import annotations

import random

from ..api.models import SEED_MAX as SEED_SPACE

__all__ = ["SEED_SPACE", "choose_seeds"]


def choose_seeds(seed: int | list[int | None] | None, count: int, rng: random.Random) -> list[int]:
    """The seed of each of ``count`` outputs: fixed ones as asked, ``rng`` for the unset ones.

    One int seed for several outputs gives consecutive seeds, the way the service derives
    the others from the first.

    Examples:
        >>> choose_seeds(7, 3, random.Random(0))
        [7, 8, 9]
        >>> choose_seeds([5, 1], 2, random.Random(0))
        [5, 1]
    """
    if isinstance(seed, list):
        return [s if s is not None else rng.randrange(SEED_SPACE) for s in seed]
    if seed is None:
        return [rng.randrange(SEED_SPACE) for _ in range(count)]
    return [(seed + i) % SEED_SPACE for i in range(count)]
