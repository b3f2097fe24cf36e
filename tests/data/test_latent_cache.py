"""Latent cache: same latents as the pixel path, disk reuse, rebuilt when image / size / VAE change."""
from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL
from omegaconf import OmegaConf
from PIL import Image

from hcpdiff_like.data.builder import build_datasets
from hcpdiff_like.data.latent_cache import cache_latents


@pytest.fixture(scope="module")
def vae(tiny_sd1):
    return AutoencoderKL.from_pretrained(tiny_sd1 / "vae").eval()


def make_images(folder, count=4):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.effect_noise((48 + 16 * (i % 2), 48), 60 + i).convert("RGB").save(folder / f"{i}.png")
    return folder


def handles(folder, cache, resolution=32, cache_dir=None, flip=False):
    cfg = OmegaConf.create({"ds": {"batch_size": 2, "resolution": resolution, "cache_latents": cache,
                                   "latent_cache_dir": str(cache_dir) if cache_dir else None, "flip": flip,
                                   "sources": {"s": {"_target_": "hcpdiff_like.data.sources.ImageCaptionSource",
                                                     "img_dir": str(folder)}}}})
    return build_datasets(cfg, seed=1, show_progress=False)


def test_memory_cache_matches_vae_on_pixels(tmp_path, vae):
    folder = make_images(tmp_path / "imgs")
    pixel_handle = handles(folder, False)[0]
    cached = handles(folder, "memory", flip=True)
    stats = cache_latents(cached, vae, "cpu", show_progress=False)
    assert stats == {"encoded": 4, "reused": 0}
    store = cached[0].dataset.latent_store
    with torch.no_grad():
        for index in range(4):
            pixels = pixel_handle.dataset[index]["pixel_values"][None]
            expected = vae.encode(pixels).latent_dist.mean[0] * vae.config.scaling_factor
            assert torch.allclose(store.mean(index), expected, atol=1e-5)
            flipped = vae.encode(pixels.flip(-1)).latent_dist.mean[0] * vae.config.scaling_factor
            assert torch.allclose(store.mean(index, flip=True), flipped, atol=1e-5)
    batch = next(cached[0].forever())
    assert "pixel_values" not in batch and batch["latents"].shape == (2, *store.mean(0).shape)
    assert batch["original_size"].shape == (2, 2)


def test_disk_cache_reuse_and_invalidation(tmp_path, vae):
    folder, cache_dir = make_images(tmp_path / "imgs"), tmp_path / "cache"
    run = lambda **kw: cache_latents(handles(folder, "disk", cache_dir=cache_dir, **kw), vae, "cpu",
                                     show_progress=False)
    assert run() == {"encoded": 4, "reused": 0}
    assert len(list(cache_dir.glob("*.safetensors"))) == 4
    assert run() == {"encoded": 0, "reused": 4}
    Image.effect_noise((48, 48), 5).convert("RGB").save(folder / "0.png")  # one image changed
    assert run() == {"encoded": 1, "reused": 3}
    assert run(resolution=48) == {"encoded": 4, "reused": 0}  # size changed
    with torch.no_grad():
        vae.decoder.conv_out.bias.add_(0.01)  # the VAE changed (decoder weights count too)
    try:
        assert run() == {"encoded": 4, "reused": 0}
    finally:
        with torch.no_grad():
            vae.decoder.conv_out.bias.sub_(0.01)
    assert run() == {"encoded": 0, "reused": 4}


def test_trainer_runs_on_cached_latents(tmp_path, tiny_sd1, demo_images):
    from hcpdiff_like.config.launcher import compose_config
    from hcpdiff_like.training.trainer import Trainer

    cfg = compose_config(["cfg=demo", f"data.dataset1.sources.shapes.img_dir={demo_images}", "logger=[console]",
                          f"model.pretrained_model_name_or_path={tiny_sd1}", "train.train_steps=1",
                          "train.save_step=1", "+data.dataset1.cache_latents=memory"])
    trainer = Trainer(cfg, exp_dir=str(tmp_path / "exp")).setup()
    try:
        assert trainer.datasets[0].dataset.latent_store is not None
        summary = trainer.train()
        assert summary["steps"] == 1 and summary["final_loss"] == summary["final_loss"]
    finally:
        trainer.cleanup()
