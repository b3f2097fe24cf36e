"""kohya names <-> module paths: every adaptable layer of every family survives the trip, and the SGM (original
SDXL) names agree with the original-layout checkpoint keys written by convert.sd_checkpoint."""
from __future__ import annotations

import pytest
import torch

from hcpdiff_like.convert.kohya_names import (KohyaNameError, UnetLayout, diffusers_to_sgm, kohya_to_module,
                                              module_to_kohya, underscored_to_dotted)
from hcpdiff_like.convert.sd_checkpoint import unet_to_original
from hcpdiff_like.models.loading import load_model_bundle

ADAPTABLE = (torch.nn.Linear, torch.nn.Conv2d)


def layer_names(model):
    return [name for name, module in model.named_modules() if isinstance(module, ADAPTABLE)]


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_every_layer_name_round_trips(family, request):
    bundle = load_model_bundle(str(request.getfixturevalue(f"tiny_{family}")))
    layout = UnetLayout.from_config(bundle.unet.config)
    models = {"unet": bundle.unet, "text_encoder": bundle.text_encoder, "text_encoder_2": bundle.text_encoder_2}
    for target, model in models.items():
        if model is None:
            continue
        names = layer_names(model)
        for name in names:
            kohya = module_to_kohya(name, target, family)
            assert "." not in kohya and kohya_to_module(kohya, layout, set(names)) == (target, name)
            assert kohya_to_module(kohya, layout) == (target, name)  # no model at hand: same answer
            if target == "unet" and family == "sdxl":
                sgm = module_to_kohya(name, target, family, layout)
                assert kohya_to_module(sgm, layout) == (target, name)
    te_name = module_to_kohya(layer_names(bundle.text_encoder)[0], "text_encoder", family)
    assert te_name.startswith("lora_te1_text_model_encoder_layers_0_" if family == "sdxl"
                              else "lora_te_text_model_encoder_layers_0_")


def test_sgm_names_match_the_original_checkpoint_layout(tiny_sdxl):
    unet = load_model_bundle(str(tiny_sdxl)).unet
    layout = UnetLayout.from_config(unet.config)
    original = unet_to_original(unet)
    for name in layer_names(unet):
        key = f"model.diffusion_model.{diffusers_to_sgm(name, layout)}.weight"
        assert key in original, name
        assert torch.equal(original[key], unet.get_submodule(name).weight)


def test_published_sdxl_layout_names():
    """The real SDXL UNet (built on the meta device, no weights): kohya's names for known layers."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(
            block_out_channels=(320, 640, 1280), layers_per_block=2, cross_attention_dim=2048,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816)
    layout = UnetLayout.from_config(unet.config)
    assert layout == UnetLayout()  # the default is the published SDXL base
    names = layer_names(unet)
    assert UnetLayout.guess(names) == layout
    sgm = {name: module_to_kohya(name, "unet", "sdxl", layout) for name in names}
    assert sgm["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"] == \
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    assert sgm["mid_block.attentions.0.transformer_blocks.9.ff.net.2"] == \
        "lora_unet_middle_block_1_transformer_blocks_9_ff_net_2"
    assert sgm["up_blocks.0.attentions.2.proj_out"] == "lora_unet_output_blocks_2_1_proj_out"
    assert sgm["up_blocks.1.upsamplers.0.conv"] == "lora_unet_output_blocks_5_2_conv"
    assert sgm["down_blocks.0.downsamplers.0.conv"] == "lora_unet_input_blocks_3_0_op"
    assert sgm["up_blocks.2.resnets.0.conv_shortcut"] == "lora_unet_output_blocks_6_0_skip_connection"
    assert sgm["add_embedding.linear_2"] == "lora_unet_label_emb_0_2"
    assert all(kohya_to_module(k, layout) == ("unet", name) for name, k in sgm.items())
    assert len(set(sgm.values())) == len(sgm)


def test_ambiguous_words_and_bad_names():
    assert underscored_to_dotted("text_model_encoder_layers_11_self_attn_out_proj") == \
        "text_model.encoder.layers.11.self_attn.out_proj"
    assert underscored_to_dotted("conv_norm_out") == "conv_norm_out"
    with pytest.raises(KohyaNameError, match="lora_unet_"):
        kohya_to_module("lora_transformer_blocks_0_attn_to_q")
