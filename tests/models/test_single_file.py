"""Loading single-file checkpoints: family detection, config folders, and clear refusals of wrong inputs."""
from __future__ import annotations

import argparse

import pytest
import torch
from safetensors.torch import load_file, save_file

from hcpdiff_like.convert.sd_checkpoint import write_single_file
from hcpdiff_like.models.loading import ModelLoadError, load_model_bundle
from hcpdiff_like.models.single_file import detect_single_file_family, load_single_file_bundle, read_checkpoint


@pytest.fixture(scope="module")
def files(tiny_sd1, tiny_sd2, tiny_sdxl, tmp_path_factory):
    root = tmp_path_factory.mktemp("sf")
    return {family: write_single_file(load_model_bundle(str(path)), root / f"{family}.safetensors")
            for family, path in (("sd1", tiny_sd1), ("sd2", tiny_sd2), ("sdxl", tiny_sdxl))}


def test_family_is_detected_from_keys(files):
    for family, path in files.items():
        assert detect_single_file_family(load_file(str(path)), path) == family
    # no text encoder keys: the UNet's cross-attention width decides (768 = SD1, 1024 = SD2, 2048 = SDXL)
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    unet_only = {key: torch.zeros(320, 1024)}
    assert detect_single_file_family(unet_only) == "sd2"


def test_load_model_bundle_accepts_a_file_with_single_file_config(files, tiny_sd2):
    bundle = load_model_bundle(str(files["sd2"]), single_file_config=str(tiny_sd2))
    assert bundle.family == "sd2" and bundle.noise_scheduler.config.prediction_type == "v_prediction"
    assert bundle.tokenizer("a cat").input_ids[0] == bundle.tokenizer.bos_token_id


def test_weights_only_ckpt_loads_and_pickled_objects_are_refused(files, tiny_sd1, tmp_path):
    state = load_file(str(files["sd1"]))
    plain = tmp_path / "plain.ckpt"
    torch.save({"state_dict": state}, plain)  # the ldm layout: tensors under "state_dict"
    bundle = load_single_file_bundle(plain, config_dir=tiny_sd1)
    assert torch.equal(bundle.unet.conv_in.weight, state["model.diffusion_model.input_blocks.0.0.weight"])

    unsafe = tmp_path / "unsafe.ckpt"
    torch.save({"state_dict": state, "callback": argparse.Namespace(run="code")}, unsafe)
    with pytest.raises(ModelLoadError, match="refusing to unpickle"):
        read_checkpoint(unsafe)


def test_wrong_inputs_fail_with_clear_messages(files, tiny_sd1, tiny_sd2, tmp_path):
    text = tmp_path / "notes.safetensors"
    text.write_text("not a checkpoint")
    with pytest.raises(ModelLoadError, match="not a readable .safetensors"):
        load_single_file_bundle(text, config_dir=tiny_sd1)
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(ModelLoadError, match="not a checkpoint file"):
        load_single_file_bundle(tmp_path / "x.txt")
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_single_file_bundle(tmp_path / "missing.safetensors")
    component = tmp_path / "unet.safetensors"
    save_file({"conv_in.weight": torch.zeros(2, 2)}, str(component))
    with pytest.raises(ModelLoadError, match="diffusers component"):
        load_single_file_bundle(component, config_dir=tiny_sd1)
    with pytest.raises(ModelLoadError, match="model.family=sdxl was forced"):
        load_single_file_bundle(files["sd1"], family="sdxl", config_dir=tiny_sd1)
    with pytest.raises(ModelLoadError, match="single_file_config"):
        load_single_file_bundle(files["sd1"])  # no tokenizer anywhere
    with pytest.raises(ModelLoadError, match="do not fit|no weights"):
        load_single_file_bundle(files["sd1"], family="sd1", config_dir=tiny_sd2)  # tiny SD2 shapes differ


def test_extract_ema_takes_the_ema_copy(files, tiny_sd1, tmp_path):
    """ldm files may hold `model_ema.<key without dots>` beside each UNet weight; default = the non-EMA ones."""
    state = load_file(str(files["sd1"]))
    unet_keys = [k for k in state if k.startswith("model.diffusion_model.")]
    for key in unet_keys:
        state["model_ema." + "".join(key.split(".")[1:])] = state[key] + 1.0
    save_file(state, str(tmp_path / "ema.safetensors"))
    plain = load_single_file_bundle(tmp_path / "ema.safetensors", config_dir=tiny_sd1)
    ema = load_single_file_bundle(tmp_path / "ema.safetensors", config_dir=tiny_sd1, extract_ema=True)
    weight = state["model.diffusion_model.out.2.weight"]
    assert torch.equal(plain.unet.conv_out.weight, weight)
    assert torch.equal(ema.unet.conv_out.weight, weight + 1.0)


def test_tokenizer_only_folder_falls_back_to_published_architecture(files, tiny_sd1, tmp_path):
    """A folder holding just tokenizer/ makes the published SD1.5 architecture apply: the tiny weights don't fit."""
    import shutil

    shutil.copytree(tiny_sd1 / "tokenizer", tmp_path / "only_tok" / "tokenizer")
    with pytest.raises(ModelLoadError, match="sd15"):
        load_single_file_bundle(files["sd1"], config_dir=tmp_path / "only_tok")


@pytest.mark.slow
def test_training_runs_from_a_single_file(files, tiny_sd1, run_train):
    results, runs = run_train("cfg=demo", f"model.pretrained_model_name_or_path={files['sd1']}",
                              f"model.single_file_config={tiny_sd1}", "train.train_steps=2", "train.save_step=2")
    assert runs and (runs[0] / "ckpts" / "unet-2.safetensors").is_file()
