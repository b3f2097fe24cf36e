"""Generate images with diffusers' SD / SDXL pipelines from a bundle + our (weighted) text conditioning.

Determinism: one CPU `torch.Generator` per image, seeded with that image's seed, so the initial noise
(and an ancestral sampler's noise) depend only on the seed, not on the device. A fixed seed, the same
settings and the same batch give bit-identical images on the same machine.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from ..models.conditioning import TextConditioner
from ..models.loading import ModelBundle
from .prompt_encoding import WeightedPromptEncoder
from .samplers import make_scheduler

MAX_SEED = 2 ** 30


@dataclass
class GenerationSettings:
    width: int = 512
    height: int = 512
    num_inference_steps: int = 30
    guidance_scale: float = 7.5
    sampler: str = "ddim"
    sampler_args: dict = field(default_factory=dict)
    n_repeats: int = 1  # minimum 75-token chunks per prompt
    extra: dict = field(default_factory=dict)  # other keyword arguments of the diffusers pipeline call


def random_seeds(count: int) -> list[int]:
    """Seeds for images without a fixed seed; they are written down beside each image."""
    source = random.SystemRandom()
    return [source.randint(0, MAX_SEED) for _ in range(count)]


def resolve_seeds(seed, count: int) -> list[int]:
    """`seed: int` -> seed, seed+1, ...; a list -> itself (length must match); null -> random seeds."""
    if seed is None:
        return random_seeds(count)
    if isinstance(seed, (list, tuple)) or hasattr(seed, "__len__") and not isinstance(seed, str):
        seeds = [int(s) for s in seed]
        if len(seeds) != count:
            raise ValueError(f"seed: a list of {len(seeds)} seeds for {count} images (num x bs); give one per "
                             "image, a single int, or null for random seeds")
        return seeds
    return [int(seed) + index for index in range(count)]


def build_pipeline(bundle: ModelBundle, scheduler, progress: bool = True):
    """A diffusers pipeline sharing the bundle's modules (nothing is copied), with the chosen sampler."""
    from ..models.loading import bundle_to_pipeline

    pipe = bundle_to_pipeline(bundle, scheduler)
    pipe.set_progress_bar_config(disable=not progress, leave=False)
    return pipe


def _cast_to_module_dtype(module, args):
    """Forward pre-hook: the VAE may be kept in another dtype than the UNet (training's `model.vae_dtype`)."""
    dtype = next(module.parameters()).dtype
    return tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def vae_input_dtype_hooks(vae) -> list:
    """Let the VAE decode latents of any float dtype; returns the hook handles (call .remove())."""
    return [module.register_forward_pre_hook(_cast_to_module_dtype)
            for module in (getattr(vae, "post_quant_conv", None), vae.decoder) if module is not None]


class ImageGenerator:
    """Prompts + seeds -> PIL images, for one model (the visualizer, training samples, evaluation)."""

    def __init__(self, bundle: ModelBundle, conditioner: TextConditioner, device: Optional[torch.device] = None,
                 progress: bool = True):
        self.bundle = bundle
        self.conditioner = conditioner
        self.device = device or bundle.unet.device
        self.progress = progress
        self._pipes: dict = {}

    def pipeline(self, settings: GenerationSettings):
        key = (settings.sampler, tuple(sorted((settings.sampler_args or {}).items())))
        if key not in self._pipes:
            scheduler = make_scheduler(settings.sampler, self.bundle.noise_scheduler.config, settings.sampler_args)
            self._pipes[key] = build_pipeline(self.bundle, scheduler, self.progress)
        return self._pipes[key]

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], negative_prompts: Sequence[str], seeds: Sequence[int],
                 settings: GenerationSettings) -> list:
        if not (len(prompts) == len(negative_prompts) == len(seeds)):
            raise ValueError("generate: one prompt, negative prompt and seed per image")
        if settings.width % 8 or settings.height % 8:
            raise ValueError(f"width and height must be multiples of 8 (got {settings.width}x{settings.height})")
        encoder = WeightedPromptEncoder(self.conditioner, min_chunks=settings.n_repeats)
        embeds = encoder.encode_pair(prompts, negative_prompts)
        embeds = {k: v.to(self.device) for k, v in embeds.items()}
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        pipe = self.pipeline(settings)
        hooks = vae_input_dtype_hooks(self.bundle.vae)
        try:
            output = pipe(**embeds, generator=generators, width=settings.width, height=settings.height,
                          num_inference_steps=settings.num_inference_steps, guidance_scale=settings.guidance_scale,
                          output_type="pil", **(settings.extra or {}))
        finally:
            for hook in hooks:
                hook.remove()
        return list(output.images)
