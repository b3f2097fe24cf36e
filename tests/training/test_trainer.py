"""End-to-end training on the tiny model: frozen base, loss falls when overfitting, checkpoints reload."""
from __future__ import annotations

import pytest
import torch

from hcpdiff_like.config.launcher import compose_config
from hcpdiff_like.models.loading import load_model_bundle
from hcpdiff_like.plugins.lora import load_lora_into
from hcpdiff_like.training.checkpoints import load_safetensors
from hcpdiff_like.training.trainer import Trainer


def make_trainer(tmp_path, images, *overrides):
    cfg = compose_config(["cfg=demo", f"data.dataset1.sources.shapes.img_dir={images}", "logger=[console]",
                          "train.workers=0", *overrides])
    cfg.exp_dir = str(tmp_path / "exp")
    return Trainer(cfg, exp_dir=cfg.exp_dir).setup()


def fixed_eval_loss(trainer: Trainer) -> float:
    """Loss on every training image at fixed timesteps with fixed noise (independent of the global RNG)."""
    generator = torch.Generator().manual_seed(1234)
    losses = []
    with torch.no_grad():
        for batch in trainer.datasets[0].loader:
            latents = trainer.encode_latents_deterministic(batch)
            for t in (100, 400, 700):
                noise = torch.randn(latents.shape, generator=generator)
                timesteps = torch.full((latents.shape[0],), t, dtype=torch.long)
                noisy = trainer.bundle.noise_scheduler.add_noise(latents, noise, timesteps)
                prediction = trainer.model(noisy, timesteps, batch["captions"])
                losses.append(torch.nn.functional.mse_loss(prediction, noise).item())
    return sum(losses) / len(losses)


def test_frozen_base_and_falling_loss_and_exact_reload(tmp_path, demo_images):
    # 2 images, bigger lr: the tiny model overfits them in a few dozen steps
    for extra in sorted(demo_images.glob("000[2-9]*")):
        extra.unlink()
    trainer = make_trainer(tmp_path, demo_images, "train.train_steps=60", "train.save_step=30", "train.lr=5e-3",
                           "scheduler=constant", "plugin.rank=8")
    Trainer.encode_latents_deterministic = lambda self, batch: (
        self.bundle.vae.encode(batch["pixel_values"]).latent_dist.mean * self.bundle.vae.config.scaling_factor)
    base_before = {n: p.detach().clone() for n, p in trainer.bundle.unet.named_parameters()
                   if "lora_" not in n}
    loss_before = fixed_eval_loss(trainer)
    trainer.train()
    loss_after = fixed_eval_loss(trainer)
    assert loss_after < 0.8 * loss_before, (loss_before, loss_after)

    for name, param in trainer.bundle.unet.named_parameters():
        if "lora_" not in name:
            assert torch.equal(param, base_before[name]), f"frozen weight {name} changed"
    ckpts = trainer.exp.ckpt_dir
    assert sorted(p.name for p in ckpts.glob("unet-*.safetensors")) == ["unet-30.safetensors", "unet-60.safetensors"]

    # reload the final checkpoint into a fresh model: identical UNet outputs
    state, metadata = load_safetensors(ckpts / "unet-60.safetensors")
    fresh = load_model_bundle(trainer.bundle.source).unet
    load_lora_into(fresh, state, metadata)
    trainer.bundle.unet.eval()
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    hidden = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = trainer.bundle.unet(latents, torch.tensor([500]), hidden).sample
        got = fresh(latents, torch.tensor([500]), hidden).sample
    assert torch.allclose(expected, got, atol=1e-6)
    trainer.cleanup()


def test_nothing_to_train_is_an_error(tmp_path, demo_images):
    cfg = compose_config(["cfg=demo", f"data.dataset1.sources.shapes.img_dir={demo_images}", "logger=[console]",
                          "plugin.lora_unet=null"])
    with pytest.raises(ValueError, match="nothing to train"):
        Trainer(cfg, exp_dir=str(tmp_path / "exp")).setup()


def test_empty_dataset_stops_before_model_loads(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    import hcpdiff_like.training.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "load_model_bundle", lambda *a, **k: pytest.fail("model loaded"))
    cfg = compose_config(["cfg=demo", f"data.dataset1.sources.shapes.img_dir={empty}", "logger=[console]"])
    with pytest.raises(ValueError, match=str(empty)):
        Trainer(cfg, exp_dir=str(tmp_path / "exp")).setup()


def test_kohya_objective_options_reach_the_training_step(tmp_path, demo_images, monkeypatch):
    """The kohya-style objective keys validate, build, and the step makes x_t with the perturbed noise."""
    from hcpdiff_like.config.validation import validate_config
    from hcpdiff_like.training.objective import DiffusionObjective

    calls = []
    original = DiffusionObjective.training_input

    def spy(self, latents, noise, timesteps, generator=None):
        calls.append(self.ip_noise_gamma)
        return original(self, latents, noise, timesteps, generator)

    monkeypatch.setattr(DiffusionObjective, "training_input", spy)
    overrides = ["objective.ip_noise_gamma=0.1", "objective.ip_noise_gamma_random_strength=true",
                 "objective.debiased_estimation=true", "objective.loss_type=huber", "objective.huber_schedule=snr",
                 "objective.noise_offset=0.05", "objective.noise_offset_random_strength=true", "train.train_steps=2"]
    validate_config(compose_config(["cfg=demo", *overrides]))
    trainer = make_trainer(tmp_path, demo_images, *overrides)
    assert trainer.objective.debiased_estimation and trainer.objective.huber_schedule == "snr"
    summary = trainer.train()
    trainer.cleanup()
    assert calls == [0.1, 0.1] and summary["steps"] == 2 and summary["skipped_steps"] == 0
