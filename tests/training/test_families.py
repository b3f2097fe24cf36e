"""SD1.x, SD2.x and SDXL end to end: detection (and forcing) of the family and prediction type, text
conditioning equal to diffusers' own pipelines, SDXL micro-conditioning from each image's size and crop, and
one training step per family that moves every trained tensor."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from hcpdiff_like.config.launcher import compose_config
from hcpdiff_like.models.conditioning import TextConditioner
from hcpdiff_like.models.loading import ModelLoadError, detect_family, load_model_bundle
from hcpdiff_like.training.objective import DiffusionObjective

FAMILIES = {"sd1": ("tiny_sd1", "epsilon"), "sd2": ("tiny_sd2", "v_prediction"), "sdxl": ("tiny_sdxl", "epsilon")}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_and_prediction_type_come_from_the_folder(request, family):
    folder = request.getfixturevalue(FAMILIES[family][0])
    assert detect_family(folder) == family
    bundle = load_model_bundle(str(folder))
    assert bundle.family == family and len(bundle.text_encoders) == (2 if family == "sdxl" else 1)
    assert DiffusionObjective(bundle.noise_scheduler).prediction_type == FAMILIES[family][1]


def test_sd2_epsilon_folder_and_forced_family(tiny_sd2, tmp_path):
    folder = tmp_path / "sd2-base"
    shutil.copytree(tiny_sd2, folder)
    config_file = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps(dict(config, prediction_type="epsilon")))  # like SD2.1-base (512)
    bundle = load_model_bundle(str(folder))
    assert bundle.family == "sd2" and DiffusionObjective(bundle.noise_scheduler).prediction_type == "epsilon"
    assert DiffusionObjective(bundle.noise_scheduler, prediction_type="v_prediction").prediction_type == "v_prediction"
    assert load_model_bundle(str(folder), family="sd1").family == "sd1"  # model.family forces
    with pytest.raises(ModelLoadError, match="model.family='sd3'"):
        load_model_bundle(str(folder), family="sd3")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_conditioning_equals_the_diffusers_pipeline(request, family):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    folder = request.getfixturevalue(FAMILIES[family][0])
    bundle = load_model_bundle(str(folder))
    conditioner = TextConditioner(bundle)
    pipeline_class = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    pipe = pipeline_class(**{k: v for k, v in dict(
        vae=bundle.vae, text_encoder=bundle.text_encoder, tokenizer=bundle.tokenizer, unet=bundle.unet,
        scheduler=bundle.noise_scheduler, text_encoder_2=bundle.text_encoder_2, tokenizer_2=bundle.tokenizer_2,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False).items()
        if k in pipeline_class.__init__.__code__.co_varnames})
    prompts = ["a red circle, simple background", "blue square"]
    with torch.no_grad():
        if family != "sdxl":
            expected, _ = pipe.encode_prompt(prompts, "cpu", 1, False)
            hidden, added = conditioner(prompts)
            assert added is None
        else:
            expected, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", num_images_per_prompt=1,
                                                        do_classifier_free_guidance=False)
            # per image: original (h, w), crop (top, left), target (h, w), as the data pipeline provides
            size_info = torch.tensor([[96.0, 80.0, 16.0, 8.0, 64.0, 64.0], [64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])
            hidden, added = conditioner(prompts, size_info)
            torch.testing.assert_close(added["text_embeds"], pooled)
            time_ids = pipe._get_add_time_ids((96, 80), (16, 8), (64, 64), dtype=torch.float32,
                                              text_encoder_projection_dim=bundle.text_encoder_2.config.projection_dim)
            torch.testing.assert_close(added["time_ids"][:1], time_ids)
    torch.testing.assert_close(hidden, expected)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_family_trains_a_step(request, family, demo_images, tmp_path):
    from hcpdiff_like.training.trainer import Trainer

    request.getfixturevalue(FAMILIES[family][0])
    cfg = compose_config(["cfg=demo", f"model={FAMILIES[family][0]}", "plugin=lora_unet_te", "logger=[console]",
                          f"data.dataset1.sources.shapes.img_dir={demo_images}", "train.train_steps=1",
                          "scheduler=constant", "train.text_encoder_lr=1e-3"])
    trainer = Trainer(cfg, exp_dir=str(tmp_path / "exp")).setup()
    assert trainer.bundle.family == family
    expected_targets = {"unet", "text_encoder"} | ({"text_encoder_2"} if family == "sdxl" else set())
    assert {name for name, target in trainer.targets.items() if target.trains} == expected_targets
    before = {name: {k: v.clone() for k, v in trainer.trained_state(name)[0].items()} for name in expected_targets}
    seen = []
    forward = trainer.model.forward
    trainer.model.forward = lambda noisy, t, captions, size_info=None: seen.append(size_info) or forward(
        noisy, t, captions, size_info)
    batch = next(iter(trainer.datasets[0].forever()))
    loss = trainer.train_step([batch])
    assert loss == loss and loss > 0
    for name in expected_targets:
        after = trainer.trained_state(name)[0]
        assert any(not torch.equal(after[k], before[name][k]) for k in after), f"{family}: {name} did not train"
    if family == "sdxl":  # micro-conditioning built from each image's original size and crop
        expected = torch.cat([batch["original_size"], batch["crop_top_left"], batch["target_size"]], 1).float()
        torch.testing.assert_close(seen[0], expected)
    else:
        assert seen == [None]
    # a per-image loss mask (pixel space, here all zero) reaches the loss through the latent-size mask
    masked = dict(batch, loss_mask=torch.zeros(batch["pixel_values"].shape[0], 1, 64, 64))
    assert trainer.diffusion_loss(masked).item() == 0.0
    trainer.cleanup()
