"""Ours <-> kohya/webui LoRA state dicts: bit-exact round trip, alpha folding keeps the effect, standard keys and
ss_* metadata, and clear errors for files that are not what a direction needs."""
from __future__ import annotations

import json

import pytest
import torch
from convert.lora_factory import make_lora_files

from hcpdiff_like.convert.kohya_lora import (EMBEDDED_KEY, LoraFormatError, kohya_to_ours, ours_to_kohya,
                                             read_kohya_lora, read_our_lora, safetensors_hashes)
from hcpdiff_like.convert.kohya_names import UnetLayout
from hcpdiff_like.models.loading import load_model_bundle
from hcpdiff_like.plugins.lora import METADATA_KEY
from hcpdiff_like.training.checkpoints import save_safetensors


@pytest.fixture(scope="module")
def sd1_files(tiny_sd1, tmp_path_factory):
    return make_lora_files(tiny_sd1, "sd1", tmp_path_factory.mktemp("sd1_lora"))


@pytest.fixture(scope="module")
def sdxl_files(tiny_sdxl, tmp_path_factory):
    return make_lora_files(tiny_sdxl, "sdxl", tmp_path_factory.mktemp("sdxl_lora"))


def deltas(loras):
    """{(target, module): alpha/rank * up @ down} of our parsed files."""
    out = {}
    for lora in loras:
        for block in lora.info["blocks"]:
            for module in block["modules"]:
                down, up = lora.state[f"{module}.lora_A.weight"], lora.state[f"{module}.lora_B.weight"]
                out[(lora.target, module)] = block["alpha"] / block["rank"] * (up.flatten(1) @ down.flatten(1))
    return out


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_round_trip_is_bit_exact(family, sd1_files, sdxl_files, tiny_sdxl):
    files = sd1_files if family == "sd1" else sdxl_files
    ours = [read_our_lora(p) for p in files.values()]
    layout = UnetLayout.from_config(load_model_bundle(str(tiny_sdxl)).unet.config) if family == "sdxl" else None
    kohya, metadata = ours_to_kohya(ours, sgm_layout=layout)
    prefixes = {"sd1": ("lora_unet_down_blocks_", "lora_te_text_model_"),
                "sdxl": ("lora_unet_input_blocks_", "lora_te1_text_model_", "lora_te2_text_model_")}[family]
    assert all(any(k.startswith(p) for k in kohya) for p in prefixes)
    assert {k.partition(".")[2] for k in kohya} == {"lora_down.weight", "lora_up.weight", "alpha"}
    back = kohya_to_ours(kohya, metadata)
    assert set(back) == set(files)
    for lora in ours:
        again = back[lora.target]
        assert again.state.keys() == lora.state.keys()
        assert all(torch.equal(again.state[k], v) and again.state[k].dtype == v.dtype for k, v in lora.state.items())
        assert json.loads(again.metadata[METADATA_KEY]) == lora.info  # the same blocks, rank, alpha, modules
    # without our embedded block info the blocks are regrouped by (rank, alpha): same per-module scales
    del metadata[EMBEDDED_KEY]
    regrouped = kohya_to_ours(kohya, metadata, sgm_layout=layout)
    assert deltas(regrouped.values()).keys() == deltas(ours).keys()
    assert all(torch.equal(deltas(regrouped.values())[k], v) for k, v in deltas(ours).items())


def test_auto_scale_alpha_moves_the_scale_into_the_tensors(sd1_files):
    ours = [read_our_lora(p) for p in sd1_files.values()]
    kohya, metadata = ours_to_kohya(ours, auto_scale_alpha=True)
    for key, tensor in kohya.items():
        if key.endswith(".alpha"):
            assert float(tensor) == kohya[key.replace(".alpha", ".lora_down.weight")].shape[0]
    folded = kohya_to_ours(kohya, metadata)
    expected, got = deltas(ours), deltas(folded.values())
    assert got.keys() == expected.keys()
    assert all(torch.allclose(got[k], v, atol=1e-6, rtol=1e-5) for k, v in expected.items())
    assert not torch.equal(folded["unet"].state[next(iter(folded["unet"].state))],
                           ours[0].state[next(iter(folded["unet"].state))])


def test_standard_metadata(sd1_files, sdxl_files):
    kohya, metadata = ours_to_kohya([read_our_lora(p) for p in sd1_files.values()])
    assert metadata["ss_network_module"] == "networks.lora" and metadata["ss_base_model_version"] == "sd_v1"
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "2"
    assert json.loads(metadata["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1"}  # the LoCon block
    assert metadata["ss_v2"] == "False" and metadata["ss_steps"] == "5"
    assert metadata["sshs_model_hash"] == safetensors_hashes(kohya)[0] and len(metadata["sshs_legacy_hash"]) == 8
    xl = ours_to_kohya([read_our_lora(p) for p in sdxl_files.values()])[1]
    assert xl["ss_base_model_version"] == "sdxl_base_v1-0"
    assert xl["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"


def test_wrong_inputs_fail_clearly(sd1_files, sdxl_files, tmp_path):
    unet = read_our_lora(sd1_files["unet"])
    kohya, metadata = ours_to_kohya([unet])
    webui = save_safetensors(kohya, tmp_path / "webui.safetensors", metadata)
    with pytest.raises(LoraFormatError, match="kohya/webui LoRA file, not one of ours"):
        read_our_lora(webui)
    with pytest.raises(LoraFormatError, match="not a kohya/webui LoRA file.*use --to_webui"):
        read_kohya_lora(sd1_files["unet"])
    with pytest.raises(LoraFormatError, match="must be .safetensors"):
        read_our_lora(tmp_path / "lora.pt")
    with pytest.raises(LoraFormatError, match="different model families"):
        ours_to_kohya([unet, read_our_lora(sdxl_files["text_encoder"])])
    broken = dict(kohya)
    broken.pop(next(k for k in kohya if k.endswith("lora_up.weight")))
    with pytest.raises(LoraFormatError, match="has no lora_up.weight"):
        kohya_to_ours(broken, {})
    oft = {"lora_unet_mid_block_attentions_0_proj_in.oft_blocks": torch.zeros(2, 2)}
    with pytest.raises(LoraFormatError, match="OFT layers are not supported"):
        kohya_to_ours(oft, {})
    with pytest.raises(LoraFormatError, match="SDXL LoRA, not for sd1"):
        kohya_to_ours(ours_to_kohya([read_our_lora(p) for p in sdxl_files.values()])[0], {}, family="sd1")
    with pytest.raises(LoraFormatError, match="does not have"):
        kohya_to_ours({"lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 4),
                       "lora_unet_down_blocks_9_attentions_0_proj_in.lora_up.weight": torch.zeros(4, 2)}, {},
                      known_modules={"unet": {"down_blocks.0.attentions.0.proj_in"}})
    flux = {"lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": torch.zeros(2, 4),
            "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": torch.zeros(4, 2)}
    with pytest.raises(LoraFormatError, match="no SD1/SD2/SDXL layer"):
        kohya_to_ours(flux, {})
    with_full = dict(unet.state, **{"base.conv_in.weight": torch.zeros(1)})
    with pytest.raises(LoraFormatError, match="fully trained weights"):
        ours_to_kohya([type(unet)(unet.target, unet.family, with_full, unet.metadata, unet.info, "x")])
