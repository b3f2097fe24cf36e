"""Sampler names (webui's, kohya's and short ones) -> diffusers schedulers built from the model's config.

The model's own scheduler config is kept (betas, prediction type, ...); the sampler only picks the
class and its solver options. `sampler_args` (e.g. `{timestep_spacing: trailing}`) are passed on.
"""
from __future__ import annotations

import re
from typing import Optional

# canonical name -> (diffusers class name, extra kwargs)
SAMPLERS: dict[str, tuple[str, dict]] = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "lms_karras": ("LMSDiscreteScheduler", {"use_karras_sigmas": True}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm2": ("KDPM2DiscreteScheduler", {}),
    "dpm2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "dpm++_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpm++_2m_karras": ("DPMSolverMultistepScheduler",
                        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    "dpm++_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "dpm++_2m_sde_karras": ("DPMSolverMultistepScheduler",
                            {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    "dpm_solver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver"}),
    "dpm_single": ("DPMSolverSinglestepScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
}

# spellings of webui ("Euler a", "DPM++ 2M Karras") and kohya ("k_euler_a", "dpmsolver++") -> canonical
ALIASES = {
    "eulera": "euler_a", "eulerancestral": "euler_a", "kdpm2": "dpm2", "kdpm2a": "dpm2_a", "dpm2a": "dpm2_a",
    "dpmsolver++": "dpm++_2m", "dpmsolver": "dpm_solver", "dpmsingle": "dpm_single", "dpm++2m": "dpm++_2m",
    "dpm++2mkarras": "dpm++_2m_karras", "dpm++2msde": "dpm++_2m_sde", "dpm++2msdekarras": "dpm++_2m_sde_karras",
    "lmskarras": "lms_karras", "plms": "pndm", "uni_pc": "unipc",
}


class SamplerError(ValueError):
    pass


def _squash(name: str) -> str:
    return re.sub(r"[\s_\-]", "", name.lower())


def canonical_sampler(name: str) -> str:
    """`Euler a` / `euler_a` / `k_euler_a` -> `euler_a`; an unknown name is an error listing the known ones."""
    squashed = _squash(name)
    if squashed.startswith("k") and squashed[1:] and _lookup(squashed[1:]):  # kohya's k_* variants
        squashed = squashed[1:]
    found = _lookup(squashed)
    if found is None:
        raise SamplerError(f"sampler {name!r} is not known; use one of: {', '.join(SAMPLERS)}")
    return found


def _lookup(squashed: str) -> Optional[str]:
    for canonical in SAMPLERS:
        if _squash(canonical) == squashed:
            return canonical
    return ALIASES.get(squashed)


def make_scheduler(name: str, base_config, sampler_args: Optional[dict] = None):
    """A fresh diffusers scheduler of the sampler `name`, configured like the model's own scheduler."""
    import diffusers

    class_name, kwargs = SAMPLERS[canonical_sampler(name)]
    kwargs = dict(kwargs, **(sampler_args or {}))
    return getattr(diffusers, class_name).from_config(base_config, **kwargs)
