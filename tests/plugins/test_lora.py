"""LoRA blocks land exactly where the patterns match, with their own rank/alpha/lr, and reload exactly."""
from __future__ import annotations

import json

import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from hcpdiff_like.models.loading import load_model_bundle
from hcpdiff_like.plugins.lora import (METADATA_KEY, LoraBlockError, attach_lora_blocks, load_lora_into, lora_metadata,
                                      lora_state_dict)
from hcpdiff_like.plugins.matching import match_module_names, select_layers


def adapted(model):
    return {name for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)}


def test_exact_and_regex_patterns(tiny_sd1):
    unet = load_model_bundle(str(tiny_sd1)).unet
    exact = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    assert match_module_names(unet, [exact]) == [exact]
    regex = match_module_names(unet, [r"re:.*\.attn2$"])
    assert regex and all(name.endswith("attn2") for name in regex)
    assert select_layers(unet, [exact]) == [f"{exact}.{leaf}" for leaf in ("to_q", "to_k", "to_v", "to_out.0")]


def test_lora_only_where_patterns_match(tiny_sd1):
    unet = load_model_bundle(str(tiny_sd1)).unet
    specs = attach_lora_blocks(unet, [{"layers": [r"re:.*\.attn1$"], "rank": 2},
                                      {"layers": [r"re:.*\.attn2$"], "rank": 3, "alpha": 6}], "unet")
    expected = set(select_layers(load_model_bundle(str(tiny_sd1)).unet, [r"re:.*\.attn1$", r"re:.*\.attn2$"]))
    assert adapted(unet) == expected
    layer = dict(unet.named_modules())[specs[1].modules[0]]
    assert layer.r[specs[1].adapter] == 3 and layer.scaling[specs[1].adapter] == pytest.approx(2.0)
    # every layer runs the adapter it holds (PEFT would otherwise activate only the last one injected)
    first = dict(unet.named_modules())[specs[0].modules[0]]
    assert first.active_adapters == [specs[0].adapter]


def test_overlapping_blocks_and_empty_matches_are_errors(tiny_sd1):
    unet = load_model_bundle(str(tiny_sd1)).unet
    with pytest.raises(LoraBlockError, match="match no"):
        attach_lora_blocks(unet, [{"layers": ["re:nothing_here"]}], "unet")
    with pytest.raises(LoraBlockError, match="already taken"):
        attach_lora_blocks(unet, [{"layers": [r"re:.*\.attn1$"]}, {"layers": [r"re:.*attn1\.to_q$"]}], "unet")


def test_block_options_reach_peft_and_typos_are_errors(tiny_sd1):
    unet = load_model_bundle(str(tiny_sd1)).unet
    specs = attach_lora_blocks(unet, [{"layers": [r"re:.*\.attn2$"], "rank": 1, "type": "lokr",
                                       "options": {"decompose_both": True, "decompose_factor": 4}},
                                      {"layers": [r"re:up_blocks\.1\.resnets\.1$"], "rank": 2, "type": "loha",
                                       "options": {"use_effective_conv2d": True}}], "unet")
    names = {name.rsplit(".", 1)[0] for name, _ in unet.named_parameters()}
    to_q = "mid_block.attentions.0.transformer_blocks.0.attn2.to_q"  # 32 wide: factor 4 -> w1 4x4, rank 1 < 4 / 2
    assert f"{to_q}.lokr_w1_a" in names and f"{to_q}.lokr_w1" not in names  # decompose_both
    w1 = dict(unet.named_parameters())[f"{to_q}.lokr_w1_a.{specs[0].adapter}"]
    assert w1.shape[0] == 4
    assert "up_blocks.1.resnets.1.conv1.hada_t1" in names  # Tucker conv (use_effective_conv2d)
    assert json.loads(lora_metadata(specs, "unet", "sd1")[METADATA_KEY])["blocks"][1]["options"] == {
        "use_effective_conv2d": True}
    fresh = load_model_bundle(str(tiny_sd1)).unet
    with pytest.raises(LoraBlockError, match=r"plugin.lora_unet\[0\].options.decompose_both: not an option of type "
                                             "loha"):
        attach_lora_blocks(fresh, [{"layers": [r"re:.*\.attn2$"], "type": "loha", "options": {"decompose_both": True}}],
                           "unet")
    with pytest.raises(LoraBlockError, match=r"options.decompose_factor: must be int, got '4'"):
        attach_lora_blocks(fresh, [{"layers": [r"re:.*\.attn2$"], "type": "lokr", "options": {"decompose_factor": "4"}}],
                           "unet")
    with pytest.raises(LoraBlockError, match=r"plugin.lora_unet\[0\].ranks: unknown LoRA block key"):
        attach_lora_blocks(fresh, [{"layers": [r"re:.*\.attn2$"], "ranks": 8}], "unet")


def test_text_encoder_lora_and_reload_gives_identical_outputs(tiny_sd1):
    bundle = load_model_bundle(str(tiny_sd1))
    encoder = bundle.text_encoder
    specs = attach_lora_blocks(encoder, [{"layers": [r"re:.*self_attn$"], "rank": 4, "alpha": 2}], "text_encoder")
    torch.manual_seed(0)
    for name, param in encoder.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    ids = torch.tensor([[512, 70, 71, 513] + [513] * 73])
    expected = encoder(ids).last_hidden_state
    state, metadata = lora_state_dict(encoder, specs), lora_metadata(specs, "text_encoder", "sd1")
    assert all(".lora_A." in k or ".lora_B." in k for k in state)

    fresh = load_model_bundle(str(tiny_sd1)).text_encoder
    assert not torch.allclose(fresh(ids).last_hidden_state, expected)
    load_lora_into(fresh, state, metadata)
    assert torch.allclose(fresh(ids).last_hidden_state, expected, atol=1e-6)
