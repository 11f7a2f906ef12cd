"""The ``diffusers`` backend: real Stable Diffusion (SDXL, SD 1.5) with PyTorch.

- :mod:`.backend`: :class:`~.backend.DiffusersBackend`, the server's backend (imports torch).
- :mod:`.library`: the model directory's layout and asset names (no torch).
- :mod:`.tiny`: ``dagster-octoai tiny-models``, random-weight models built offline.
- :mod:`.prompts`, :mod:`.samplers`, :mod:`.styles`: prompt weighting and ``clip_skip``,
  the sampler names as schedulers, ``style_preset`` templates.

Needs the ``diffusion`` extra (torch, diffusers, transformers, accelerate, safetensors,
peft, torchsde, OpenCV). The server imports it only when ``backend="diffusers"``.
"""

import os

# transformers warns at import that torchvision is missing (it is not needed here): a
# server's log is no place for it. setdefault: a user's own TRANSFORMERS_VERBOSITY wins.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
