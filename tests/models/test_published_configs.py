"""The shipped SD1.5 / SD2.1 / SDXL architecture configs build the published models (meta device, no memory)."""
from __future__ import annotations

import pytest

from hcpdiff_like.models.configs import published_config_dir

# Published parameter counts (model cards / widely reported numbers for the released checkpoints).
EXPECTED = {
    ("sd15", "unet"): 859_520_964,
    ("sd15", "vae"): 83_653_863,
    ("sd15", "text_encoder"): 123_060_480,
    ("sd21", "unet"): 865_910_724,
    ("sd21", "vae"): 83_653_863,
    ("sdxl", "unet"): 2_567_463_684,
    ("sdxl", "vae"): 83_653_863,
    ("sdxl", "text_encoder"): 123_060_480,
    ("sdxl", "text_encoder_2"): 694_659_840,
}


def _build_on_meta(folder, component):
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with init_empty_weights():
        if component == "unet":
            return UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        if component == "vae":
            return AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        config = CLIPTextConfig.from_pretrained(folder / component)
        model_class = CLIPTextModelWithProjection if component == "text_encoder_2" else CLIPTextModel
        return model_class(config)


@pytest.mark.parametrize("name,component", sorted(EXPECTED))
def test_published_parameter_counts(name, component):
    model = _build_on_meta(published_config_dir(name), component)
    assert all(p.device.type == "meta" for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == EXPECTED[(name, component)]


def test_sd21_is_768_v_prediction_and_schedulers_load():
    from diffusers import DDPMScheduler

    sd21 = published_config_dir("sd21")
    scheduler = DDPMScheduler.from_pretrained(str(sd21), subfolder="scheduler", local_files_only=True)
    assert scheduler.config.prediction_type == "v_prediction"
    assert _build_on_meta(sd21, "unet").config.sample_size * 8 == 768
    te = _build_on_meta(sd21, "text_encoder")  # OpenCLIP-H without its last layer (diffusers' SD2 layout)
    assert te.config.num_hidden_layers == 23 and te.config.hidden_size == 1024
    for name in ("sd15", "sdxl"):
        config = DDPMScheduler.load_config(str(published_config_dir(name)), subfolder="scheduler")
        assert config["prediction_type"] == "epsilon"


def test_family_names_and_unknown_names():
    assert published_config_dir("sd1") == published_config_dir("sd15")
    assert (published_config_dir("sdxl") / "text_encoder_2" / "config.json").is_file()
    with pytest.raises(ValueError, match="sd15, sd21, sdxl"):
        published_config_dir("sd3")
