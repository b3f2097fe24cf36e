"""Fine-tune groups: `re:` patterns select base weights, each group has its own lr, LoRA tensors in a
matched module stay with their block, and overlapping groups are a clear error."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from hcpdiff_like.models.loading import load_model_bundle
from hcpdiff_like.plugins.attach import attach_plugins


@pytest.fixture()
def bundle(tiny_sd1):
    return load_model_bundle(str(tiny_sd1))


def test_finetune_groups_select_base_weights_with_their_own_lr(bundle):
    plugin = OmegaConf.create({"finetune_unet": [{"layers": [r"re:.*\.attn2$"], "lr": 2e-6},
                                                 {"layers": [r"re:.*\.ff$"]}],
                               "finetune_text_encoder": [{"layers": ["re:encoder.layers.1.mlp$"], "lr": 3e-6}]})
    targets = attach_plugins(bundle, plugin, lr=1e-4, text_encoder_lr=1e-5)
    unet = targets["unet"]
    attn2 = {n for n, _ in bundle.unet.named_parameters() if ".attn2." in n}
    assert attn2 and attn2 <= set(unet.finetuned)
    assert [(g["name"], g["lr"]) for g in unet.param_groups] == [("finetune_unet[0]", 2e-6),
                                                                  ("finetune_unet[1]", 1e-4)]
    trained = {n for n, p in bundle.unet.named_parameters() if p.requires_grad}
    assert trained == set(unet.finetuned) and all((".attn2." in n or ".ff." in n) for n in trained)
    text = targets["text_encoder"]
    assert text.param_groups[0]["lr"] == 3e-6 and all(n.startswith("encoder.layers.1.mlp.") for n in text.finetuned)
    assert not any(p.requires_grad for p in bundle.vae.parameters())


def test_overlapping_finetune_groups_are_an_error(bundle):
    plugin = OmegaConf.create({"finetune_unet": [{"layers": [r"re:.*\.attn2$"]}, {"layers": [r"re:.*\.to_k$"]}]})
    with pytest.raises(ValueError, match=r"finetune_unet\[1\] selects .*attn2\.to_k\.weight, already trained by "
                                         r"finetune_unet\[0\]"):
        attach_plugins(bundle, plugin, lr=1e-4, text_encoder_lr=1e-5)


def test_lora_and_finetune_on_the_same_module_keep_separate_groups(bundle):
    plugin = OmegaConf.create({"rank": 2, "lora_unet": [{"layers": [r"re:.*\.attn2$"]}],
                               "finetune_unet": [{"layers": [r"re:.*\.attn2$"], "lr": 1e-6}]})
    targets = attach_plugins(bundle, plugin, lr=1e-4, text_encoder_lr=1e-5)
    groups = targets["unet"].param_groups
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))  # one optimizer group per tensor
    assert all("lora_" not in n for n in targets["unet"].finetuned)
    assert any("base_layer.weight" in n for n in targets["unet"].finetuned)
    torch.optim.AdamW(groups)  # torch accepts the groups
