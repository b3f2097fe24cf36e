"""Every shipped method example in cfgs/train/ composes, trains 2 steps on a tiny model, and writes a
checkpoint of its kind that reloads into a fresh model with identical outputs."""
from __future__ import annotations

import pytest
import torch

from hcpdiff_like.config.launcher import compose_config, shipped_cfg_dir
from hcpdiff_like.models.loading import load_model_bundle
from hcpdiff_like.plugins.lora import load_lora_into
from hcpdiff_like.training.checkpoints import BASE_PREFIX, load_safetensors
from hcpdiff_like.training.trainer import Trainer

SMALL_DATA = ["data.dataset1.resolution=64", "data.dataset1.batch_size=2"]

# name -> (overrides that swap in the tiny model, checkpoint files expected, a key pattern that must exist)
EXAMPLES = {
    "lora_sdxl": (["model=tiny_sdxl", "mixed_precision=no", "data.dataset1.enable_bucket=false"],
                  ["unet", "text_encoder", "text_encoder_2"], ".lora_A.weight"),
    "lora_sd2": (["model=tiny_sd2"], ["unet", "text_encoder"], ".lora_B.weight"),
    "locon": (["model=tiny_sd1"], ["unet"], "resnets.0.conv1.lora_A.weight"),
    "dora": (["model=tiny_sd1"], ["unet"], ".lora_magnitude_vector"),
    "loha": (["model=tiny_sd1"], ["unet"], ".hada_w1_a"),
    "lokr": (["model=tiny_sd1"], ["unet"], ".lokr_w1"),
    "fine_tuning": (["model=tiny_sd1"], ["unet"], "attn2.to_k.weight"),
    "dreambooth": (["model=tiny_sd1", "data.dataset1.batch_size=1", "data.dataset_class.batch_size=1"],
                   ["unet", "text_encoder"], ".lora_A.weight"),
}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from hcpdiff_like.data.demo import make_demo_dataset

    return make_demo_dataset(tmp_path_factory.mktemp("example_data"), count=4)


def test_every_method_example_is_covered():
    shipped = {p.stem for p in (shipped_cfg_dir() / "train").glob("*.yaml")}
    assert set(EXAMPLES) <= shipped
    for name in EXAMPLES:  # each opens with a comment that says when to use it and how to launch it
        text = (shipped_cfg_dir() / "train" / f"{name}.yaml").read_text()
        assert text.startswith("# @package _global_\n#") and f"cfg={name}" in text, name


def _unet_output(unet) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    width = unet.config.cross_attention_dim
    hidden = torch.randn(1, 77, width, generator=generator)
    added = None
    if unet.config.addition_embed_type == "text_time":
        added = {"text_embeds": torch.randn(1, 32, generator=generator), "time_ids": torch.tensor([[64.0] * 6])}
    with torch.no_grad():
        return unet(latents, torch.tensor([500]), hidden, added_cond_kwargs=added).sample


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_config_trains_and_saves(name, images, tmp_path, tiny_sd1, tiny_sd2, tiny_sdxl):
    model_overrides, expected_files, key_pattern = EXAMPLES[name]
    folders = [f"instance_dir={images}", f"class_dir={images}"] if name == "dreambooth" else [f"dataset_dir={images}"]
    overrides = [f"cfg={name}", *model_overrides, *SMALL_DATA, *folders, "train.train_steps=2", "train.save_step=1000",
                 "logger=[console]"]
    cfg = compose_config(overrides)
    trainer = Trainer(cfg, exp_dir=str(tmp_path / "exp")).setup()
    before = {target: {k: v.clone() for k, v in trainer.trained_state(target)[0].items()}
              for target in expected_files}
    trainer.train()
    trainer.cleanup()

    for target in expected_files:
        state, metadata = load_safetensors(trainer.exp.ckpt_dir / f"{target}-2.safetensors")
        assert any(key_pattern in key for key in state), (target, sorted(state)[:5])
        changed = [k for k in state if not torch.equal(state[k], before[target][k])]
        assert changed, f"{name}: nothing in {target} changed after 2 steps"

    # the UNet checkpoint rebuilds the trained UNet exactly in a fresh copy of the base model
    state, metadata = load_safetensors(trainer.exp.ckpt_dir / "unet-2.safetensors")
    fresh = load_model_bundle(trainer.bundle.source).unet
    if name == "fine_tuning":
        assert all(k.startswith(BASE_PREFIX) for k in state)
        missing, unexpected = fresh.load_state_dict({k[len(BASE_PREFIX):]: v for k, v in state.items()},
                                                    strict=False)
        assert not unexpected
    else:
        load_lora_into(fresh, state, metadata)
    trainer.bundle.unet.eval()
    assert torch.allclose(_unet_output(trainer.bundle.unet), _unet_output(fresh), atol=1e-5)

    if name == "dreambooth":  # prior preservation: a second dataset with the class prompt and its loss weight
        instance, prior = trainer.datasets
        assert prior.loss_weight == cfg.prior_loss_weight
        assert {r.caption for r in prior.dataset.records} == {"a photo of dog"}
        assert {r.caption for r in instance.dataset.records} == {"a photo of sks dog"}
    if name == "lora_sd2":
        assert trainer.objective.prediction_type == "v_prediction" and trainer.objective.min_snr_gamma == 5
