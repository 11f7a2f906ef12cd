"""OctoAI's sampler names as diffusers schedulers, built from the checkpoint's own config.

Each call gets a fresh scheduler: schedulers keep per-run state (step index, sigmas,
the SDE's noise sampler), and ``from_pipe`` shares one scheduler object between every
pipeline derived from a checkpoint, so a scheduler reused across calls would leak one
request's state into the next. The names follow diffusers' own table of A1111 /
k-diffusion equivalents.
"""

from __future__ import annotations

from typing import Any

from ....api.models import Sampler

__all__ = ["SAMPLER_SCHEDULERS", "build_scheduler"]

#: sampler -> (diffusers scheduler class name, config overrides).
SAMPLER_SCHEDULERS: dict[Sampler, tuple[str, dict[str, Any]]] = {
    Sampler.DDIM: ("DDIMScheduler", {}),
    Sampler.DDPM: ("DDPMScheduler", {}),
    Sampler.DPM_PLUS_PLUS_2M_KARRAS: ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    Sampler.DPM_SINGLE: ("DPMSolverSinglestepScheduler", {}),
    Sampler.DPM_SOLVER_MULTISTEP: ("DPMSolverMultistepScheduler", {}),
    Sampler.K_EULER: ("EulerDiscreteScheduler", {}),
    Sampler.K_EULER_ANCESTRAL: ("EulerAncestralDiscreteScheduler", {}),
    Sampler.PNDM: ("PNDMScheduler", {"skip_prk_steps": True}),
    Sampler.UNI_PC: ("UniPCMultistepScheduler", {}),
    Sampler.DPM_2: ("KDPM2DiscreteScheduler", {}),
    Sampler.DPM_2_ANCESTRAL: ("KDPM2AncestralDiscreteScheduler", {}),
    Sampler.DPM_PLUS_PLUS_SDE_KARRAS: ("DPMSolverSDEScheduler", {"use_karras_sigmas": True}),
    Sampler.HEUN: ("HeunDiscreteScheduler", {}),
    # k-diffusion's "k_lms" is LMS; KLMS and LMS name the same sampler.
    Sampler.KLMS: ("LMSDiscreteScheduler", {}),
    Sampler.LMS: ("LMSDiscreteScheduler", {}),
    Sampler.K_HEUN: ("HeunDiscreteScheduler", {}),
    Sampler.DPM_PLUS_PLUS_2M_SDE: (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++"},
    ),
    Sampler.DPM_PLUS_PLUS_2M_SDE_KARRAS: (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
    ),
    Sampler.DPM_2_KARRAS: ("KDPM2DiscreteScheduler", {"use_karras_sigmas": True}),
    Sampler.DPM_2_ANCESTRAL_KARRAS: (
        "KDPM2AncestralDiscreteScheduler",
        {"use_karras_sigmas": True},
    ),
    Sampler.LCM: ("LCMScheduler", {}),
}

#: The API's default sampler (the seed: "Defaults to DDIM").
DEFAULT_SAMPLER = Sampler.DDIM


def build_scheduler(sampler: Sampler | None, base_config: Any, seeds: list[int]) -> Any:
    """A new scheduler for one call: the sampler's class over the checkpoint's config.

    ``seeds`` are the images' seeds: the SDE sampler draws its Brownian noise from them
    (one tree per image), so a seed gives the same image every time.
    """
    import diffusers

    name, overrides = SAMPLER_SCHEDULERS[sampler or DEFAULT_SAMPLER]
    cls = getattr(diffusers, name)
    config = dict(base_config)
    # A Karras schedule on a config that asked for none is the point of the override;
    # the other timestep options of the checkpoint (spacing, offset, betas) are kept.
    config.update(overrides)
    scheduler = cls.from_config(config)
    if name == "DPMSolverSDEScheduler":
        # Read when the noise sampler is made: an int seeds one tree, a list one per image.
        scheduler.noise_sampler_seed = seeds if len(seeds) > 1 else seeds[0]
    return scheduler
