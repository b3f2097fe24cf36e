"""Sampler names of webui, kohya and diffusers map to the right diffusers schedulers."""
from __future__ import annotations

import pytest

from hcpdiff_like.infer.samplers import SamplerError, canonical_sampler, make_scheduler


@pytest.mark.parametrize("name, canonical", [
    ("Euler a", "euler_a"), ("euler_a", "euler_a"), ("k_euler_a", "euler_a"), ("DDIM", "ddim"),
    ("DPM++ 2M", "dpm++_2m"), ("dpmsolver++", "dpm++_2m"), ("DPM++ 2M Karras", "dpm++_2m_karras"),
    ("k_dpm_2_a", "dpm2_a"), ("UniPC", "unipc"), ("k_lms", "lms"), ("plms", "pndm"),
])
def test_names(name, canonical):
    assert canonical_sampler(name) == canonical


def test_unknown_sampler_lists_the_known_ones():
    with pytest.raises(SamplerError, match="euler_a"):
        canonical_sampler("euler b")


def test_scheduler_keeps_the_model_config(tiny_sd2):
    from diffusers import DDPMScheduler, DPMSolverMultistepScheduler

    base = DDPMScheduler.from_pretrained(str(tiny_sd2), subfolder="scheduler")
    scheduler = make_scheduler("DPM++ 2M Karras", base.config, {"timestep_spacing": "trailing"})
    assert isinstance(scheduler, DPMSolverMultistepScheduler)
    assert scheduler.config.prediction_type == "v_prediction"  # SD2's v-prediction survives
    assert scheduler.config.use_karras_sigmas and scheduler.config.timestep_spacing == "trailing"
