"""Seeds per image, and generation with a VAE kept in another dtype than the UNet (model.vae_dtype)."""
from __future__ import annotations

import pytest
import torch

from hcpdiff_like.infer.generate import GenerationSettings, ImageGenerator, resolve_seeds


def test_seeds():
    assert resolve_seeds(5, 3) == [5, 6, 7]
    assert resolve_seeds([9, 1], 2) == [9, 1]
    with pytest.raises(ValueError, match="one per image"):
        resolve_seeds([1, 2, 3], 2)
    random_seeds = resolve_seeds(None, 4)
    assert len(set(random_seeds)) == 4 and all(0 <= s <= 2 ** 30 for s in random_seeds)


def test_vae_in_another_dtype_decodes(tiny_sd1):
    from hcpdiff_like.infer.model import load_inference_model

    model = load_inference_model(str(tiny_sd1), device="cpu", dtype="fp32")
    model.bundle.vae.to(torch.bfloat16)
    generator = ImageGenerator(model.bundle, model.conditioner, model.device, progress=False)
    images = generator.generate(["a"], [""], [1], GenerationSettings(width=16, height=16, num_inference_steps=1))
    assert images[0].size == (16, 16)
    assert not model.bundle.vae.decoder._forward_pre_hooks  # the dtype hooks are removed afterwards
