"""Diffusers -> original single-file layout: key names, tensor values, and diffusers' own loader as the consumer."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hcpdiff_like.convert.sd_checkpoint import (ConversionError, bundle_to_original_state_dict, unet_to_original,
                                                vae_to_original, write_single_file)
from hcpdiff_like.models.loading import load_model_bundle
from hcpdiff_like.models.single_file import load_single_file_bundle


@pytest.fixture(scope="module")
def bundles(tiny_sd1, tiny_sd2, tiny_sdxl):
    return {family: load_model_bundle(str(path)) for family, path in
            (("sd1", tiny_sd1), ("sd2", tiny_sd2), ("sdxl", tiny_sdxl))}


@pytest.fixture(scope="module")
def folders(tiny_sd1, tiny_sd2, tiny_sdxl):
    return {"sd1": tiny_sd1, "sd2": tiny_sd2, "sdxl": tiny_sdxl}


@pytest.fixture(scope="module")
def single_files(bundles, tmp_path_factory):
    root = tmp_path_factory.mktemp("single_files")
    return {family: write_single_file(bundle, root / f"{family}.safetensors") for family, bundle in bundles.items()}


def _assert_same_weights(module_a, module_b, what):
    state_a, state_b = module_a.state_dict(), module_b.state_dict()
    assert state_a.keys() == state_b.keys(), what
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), f"{what}: {key} differs"


def test_original_key_names_and_text_encoder_layouts(bundles):
    sd1 = bundle_to_original_state_dict(bundles["sd1"])
    # the tiny UNet: 2 levels, 1 layer each -> input_blocks 0..3 (2 = downsampler), output_blocks 0..3
    assert "model.diffusion_model.input_blocks.0.0.weight" in sd1
    assert "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight" in sd1
    assert "model.diffusion_model.input_blocks.2.0.op.weight" in sd1
    assert "model.diffusion_model.middle_block.1.proj_in.weight" in sd1
    assert "model.diffusion_model.output_blocks.1.1.conv.weight" in sd1  # upsampler of an attention-free level
    assert "model.diffusion_model.output_blocks.3.1.transformer_blocks.0.attn1.to_q.weight" in sd1
    assert "model.diffusion_model.out.2.weight" in sd1 and "model.diffusion_model.time_embed.2.bias" in sd1
    assert sd1["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4  # ldm keeps 1x1 convolutions
    assert "first_stage_model.decoder.up.1.upsample.conv.weight" in sd1  # decoder levels count upward
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in sd1

    te = bundles["sd2"].text_encoder.state_dict()
    sd2 = bundle_to_original_state_dict(bundles["sd2"])
    fused = sd2["cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight"]
    by_hand = torch.cat([te[f"encoder.layers.1.self_attn.{p}_proj.weight"] for p in "qkv"])
    assert torch.equal(fused, by_hand)
    assert torch.equal(sd2["cond_stage_model.model.positional_embedding"], te["embeddings.position_embedding.weight"])

    xl = bundle_to_original_state_dict(bundles["sdxl"])
    projection = bundles["sdxl"].text_encoder_2.text_projection.weight
    assert torch.equal(xl["conditioner.embedders.1.model.text_projection"], projection.T)
    assert "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight" in xl
    assert "model.diffusion_model.label_emb.0.2.weight" in xl
    assert not any(k.startswith("cond_stage_model.") for k in xl)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_single_file_round_trip_gives_identical_tensors(family, bundles, folders, single_files):
    loaded = load_single_file_bundle(single_files[family], config_dir=folders[family])
    assert loaded.family == family
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if getattr(bundles[family], name) is not None:
            _assert_same_weights(getattr(bundles[family], name), getattr(loaded, name), f"{family} {name}")
    assert loaded.noise_scheduler.config.prediction_type == bundles[family].noise_scheduler.config.prediction_type


def _images(pipe):
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(num_inference_steps=2, height=32, width=32, output_type="np", guidance_scale=1.0)
    return pipe("a red square", generator=torch.Generator().manual_seed(0), **kwargs).images


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_diffusers_from_single_file_reads_our_file(family, folders, single_files):
    from diffusers import StableDiffusionPipeline

    reference = StableDiffusionPipeline.from_pretrained(folders[family], local_files_only=True)
    loaded = StableDiffusionPipeline.from_single_file(str(single_files[family]), config=str(folders[family]),
                                                      local_files_only=True)
    for name in ("unet", "vae", "text_encoder"):
        _assert_same_weights(getattr(reference, name), getattr(loaded, name), name)
    np.testing.assert_array_equal(_images(reference), _images(loaded))


def _sdxl_with_distinct_encoder_widths(path):
    """Diffusers tells SDXL's two encoders apart by width; the shared tiny SDXL has both 32 wide, so this
    variant widens the second to 48 (UNet context 32+48, pooled 48)."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    from hcpdiff_like.models.tiny import _text_encoder_config, build_tiny_components, write_byte_level_tokenizer

    components = build_tiny_components("sdxl", seed=1)
    unet_config = dict(components["unet"].config)
    unet_config.update(cross_attention_dim=80, projection_class_embeddings_input_dim=48 + 6 * 8)
    components["unet"] = UNet2DConditionModel.from_config(unet_config)
    components["text_encoder_2"] = CLIPTextModelWithProjection(_text_encoder_config(48, "gelu", 48))
    tokenizer = CLIPTokenizer.from_pretrained(write_byte_level_tokenizer(path.parent / "tok"), model_max_length=77)
    StableDiffusionXLPipeline(tokenizer=tokenizer, tokenizer_2=tokenizer, **components).save_pretrained(path)
    return path


def test_diffusers_from_single_file_reads_our_sdxl_file(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    folder = _sdxl_with_distinct_encoder_widths(tmp_path / "xl")
    file = write_single_file(load_model_bundle(str(folder)), tmp_path / "xl.safetensors")
    reference = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    loaded = StableDiffusionXLPipeline.from_single_file(str(file), config=str(folder), local_files_only=True)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        _assert_same_weights(getattr(reference, name), getattr(loaded, name), name)
    np.testing.assert_array_equal(_images(reference), _images(loaded))


@pytest.mark.parametrize("name", ["sd15", "sd21", "sdxl"])
def test_full_size_layouts_map_back_through_diffusers(name):
    """Full published UNet/VAE on the meta device: every key lands where diffusers' converter looks for it."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    from hcpdiff_like.models.configs import published_config_dir

    folder = published_config_dir(name)
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
    original = unet_to_original(unet)
    assert len(original) == len(unet.state_dict())
    if name == "sdxl":  # 3 levels: 9 input blocks; the two upper levels have attention
        assert "model.diffusion_model.input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight" in original
        assert not any(k.startswith("model.diffusion_model.input_blocks.9.") for k in original)
        assert "model.diffusion_model.output_blocks.5.2.conv.weight" in original
    else:  # 4 levels: 12 input blocks, the last output block level has attention, the first does not
        assert "model.diffusion_model.input_blocks.11.0.out_layers.3.weight" in original
        assert "model.diffusion_model.output_blocks.2.1.conv.weight" in original
        assert "model.diffusion_model.output_blocks.8.2.conv.weight" in original
    back = convert_ldm_unet_checkpoint(original, unet.config)
    assert set(back) == set(unet.state_dict())
    assert all(back[k].shape == v.shape for k, v in unet.state_dict().items())
    vae_back = convert_ldm_vae_checkpoint(vae_to_original(vae), vae.config)
    assert set(vae_back) == set(vae.state_dict())
    assert all(vae_back[k].shape == v.shape for k, v in vae.state_dict().items())


def test_write_refuses_other_suffix_existing_file_and_lora_wrapped_unet(bundles, tmp_path):
    with pytest.raises(ConversionError, match=r"\.safetensors"):
        write_single_file(bundles["sd1"], tmp_path / "model.ckpt")
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="overwrite"):
        write_single_file(bundles["sd1"], target, overwrite=False)
    assert target.read_bytes() == b"keep me"

    import copy

    from peft import LoraConfig, inject_adapter_in_model

    unet = copy.deepcopy(bundles["sd1"].unet)
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["to_q"]), unet)
    with pytest.raises(ConversionError, match="merged first"):
        unet_to_original(unet)


def test_dtype_option_writes_half_precision(bundles, tmp_path):
    from safetensors import safe_open

    path = write_single_file(bundles["sd1"], tmp_path / "half.safetensors", dtype="fp16")
    with safe_open(str(path), framework="pt") as handle:
        assert handle.get_tensor("model.diffusion_model.out.2.weight").dtype == torch.float16
        assert handle.metadata()["hcpdiff_like.family"] == "sd1"
    with pytest.raises(ConversionError, match="dtype"):
        write_single_file(bundles["sd1"], tmp_path / "x.safetensors", dtype="int3")
