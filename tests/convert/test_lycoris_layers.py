"""LoHa / LoKr in the kohya/LyCORIS file format, checked against two outside consumers: LyCORIS's own layer
loader (lycoris-lora), and the webui/ComfyUI formula written out here from their documented rules.
Both directions: our files -> webui, and files LyCORIS itself writes -> ours."""
from __future__ import annotations

import json

import pytest
import torch
from convert.lora_factory import randomize_lora

from hcpdiff_like.convert.kohya_lora import (EMBEDDED_KEY, LoraFormatError, kohya_to_ours, ours_to_kohya,
                                             parse_our_lora)
from hcpdiff_like.convert.kohya_names import module_to_kohya
from hcpdiff_like.convert.merge import merge_lora_into_bundle
from hcpdiff_like.models.loading import load_model_bundle
from hcpdiff_like.plugins.lora import attach_lora_blocks, load_lora_into, lora_metadata, lora_state_dict
from hcpdiff_like.training.checkpoints import save_safetensors

def lycoris():
    """LyCORIS's layer modules (the `lycoris-lora` test dependency)."""
    return pytest.importorskip("lycoris.modules")

# every shape case: LoHa on linears and 3x3 convs (plain and Tucker), LoKr with w2 decomposed or full,
# both factors decomposed, and a non-default factor; alphas that are not the rank
UNET_BLOCKS = [{"layers": [r"re:.*\.attn1$"], "rank": 2, "alpha": 1, "type": "loha"},
               {"layers": [r"re:down_blocks\.0\.resnets\.0$"], "rank": 2, "alpha": 3, "type": "lokr"},
               {"layers": [r"re:up_blocks\.1\.resnets\.0$"], "rank": 2, "alpha": 3, "type": "loha"},
               {"layers": [r"re:up_blocks\.1\.resnets\.1$"], "rank": 2, "alpha": 3, "type": "loha",
                "options": {"use_effective_conv2d": True}},
               {"layers": [r"re:.*\.attn2$"], "rank": 2, "alpha": 1, "type": "lokr",
                "options": {"decompose_both": True}},
               {"layers": [r"re:.*\.ff$"], "rank": 1, "alpha": 0.5, "type": "lokr", "options": {"decompose_factor": 4}}]
TE_BLOCKS = [{"layers": [r"re:.*self_attn$"], "rank": 2, "alpha": 4, "type": "loha"}]


def unet_output(unet) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, unet.config.in_channels, 8, 8, generator=generator)
    hidden = torch.randn(1, 7, unet.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        return unet(sample, torch.tensor([10]), hidden).sample


def te_output(text_encoder) -> torch.Tensor:
    with torch.no_grad():
        return text_encoder(torch.tensor([[0, 5, 17, 2, 1]])).last_hidden_state


def our_lora(model, blocks, target, seed):
    specs = attach_lora_blocks(model, blocks, target)
    randomize_lora(model, seed)
    metadata = dict(lora_metadata(specs, target, "sd1"), **{"hcpdiff_like.family": "sd1"})
    return parse_our_lora(lora_state_dict(model, specs), metadata, f"{target}.safetensors")


@pytest.fixture(scope="module")
def trained(tiny_sd1):
    """Our LoHa/LoKr files for the UNet and the text encoder, and the outputs of the adapted models."""
    bundle = load_model_bundle(str(tiny_sd1))
    loras = [our_lora(bundle.unet, UNET_BLOCKS, "unet", 0), our_lora(bundle.text_encoder, TE_BLOCKS, "text_encoder", 1)]
    return loras, unet_output(bundle.unet), te_output(bundle.text_encoder)


def apply_with_lycoris(model, kohya: dict, target: str) -> int:
    """Load every layer of the kohya file the way LyCORIS does (its per-layer loader) and merge it in."""
    names = {key.partition(".")[0] for key in kohya}
    applied = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        kohya_name = module_to_kohya(name, target, "sd1")
        if kohya_name in names:
            kind, params = lycoris().get_module(kohya, kohya_name)
            lycoris().make_module(kind, params, kohya_name, module).merge_to(1.0)
            applied += 1
    return applied


def webui_delta(parts: dict, shape: torch.Size) -> torch.Tensor:
    """The weight change A1111 webui / ComfyUI compute for one LoHa/LoKr layer (their network_hada /
    network_lokr rules): scale = alpha / dim, dim = the rank of the decomposed factor, 1 without one."""
    def cp(t, wa, wb):  # Tucker: t (r, r, kh, kw), wa (r, out), wb (r, in) -> (out, in, kh, kw)
        return torch.einsum("ijkl,ip,jr->prkl", t, wa, wb)

    if "hada_w1_a" in parts:
        if "hada_t1" in parts:
            delta = cp(parts["hada_t1"], parts["hada_w1_a"], parts["hada_w1_b"]) * cp(
                parts["hada_t2"], parts["hada_w2_a"], parts["hada_w2_b"])
        else:
            delta = (parts["hada_w1_a"] @ parts["hada_w1_b"]) * (parts["hada_w2_a"] @ parts["hada_w2_b"])
        dim = parts["hada_w1_b"].shape[0]
    else:
        w1 = parts["lokr_w1"] if "lokr_w1" in parts else parts["lokr_w1_a"] @ parts["lokr_w1_b"]
        if "lokr_w2" in parts:
            w2 = parts["lokr_w2"]
        elif "lokr_t2" in parts:
            w2 = cp(parts["lokr_t2"], parts["lokr_w2_a"], parts["lokr_w2_b"])
        else:
            w2 = parts["lokr_w2_a"] @ parts["lokr_w2_b"]
        dim = parts["lokr_w2_b"].shape[0] if "lokr_w2_b" in parts else (
            parts["lokr_w1_b"].shape[0] if "lokr_w1_b" in parts else None)
        if len(shape) == 4:
            w1 = w1[:, :, None, None]
            w2 = w2.reshape(w2.shape[0], -1, *shape[2:])
        delta = torch.kron(w1, w2)
    alpha = float(parts["alpha"]) if "alpha" in parts else None
    scale = alpha / dim if (alpha and dim) else 1.0
    return delta.reshape(shape) * scale


def apply_with_webui_formula(model, kohya: dict, target: str) -> None:
    layers: dict[str, dict] = {}
    for key, tensor in kohya.items():
        name, _, suffix = key.partition(".")
        layers.setdefault(name, {})[suffix] = tensor
    with torch.no_grad():
        for name, module in model.named_modules():
            parts = layers.get(module_to_kohya(name, target, "sd1")) if hasattr(module, "weight") else None
            if parts:
                module.weight += webui_delta(parts, module.weight.shape)


@pytest.mark.parametrize("consumer", ["lycoris", "webui_formula"])
def test_our_loha_and_lokr_files_load_in_lycoris_and_by_the_webui_rules(consumer, trained, tiny_sd1):
    loras, adapted_unet, adapted_te = trained
    kohya, metadata = ours_to_kohya(loras)
    assert metadata["ss_network_module"] == "lycoris.kohya"
    assert {k.partition(".")[2] for k in kohya} >= {"hada_w1_a", "hada_t1", "lokr_w1", "lokr_w1_a", "lokr_w2_b",
                                                     "alpha"}
    apply = apply_with_lycoris if consumer == "lycoris" else apply_with_webui_formula
    fresh = load_model_bundle(str(tiny_sd1))
    base = unet_output(fresh.unet)
    apply(fresh.unet, kohya, "unet")
    apply(fresh.text_encoder, kohya, "text_encoder")
    assert (adapted_unet - base).abs().max() > 1e-2  # the LoRA changes the output, so the check can fail
    torch.testing.assert_close(unet_output(fresh.unet), adapted_unet, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(te_output(fresh.text_encoder), adapted_te, atol=2e-5, rtol=1e-4)


def test_round_trip_restores_the_blocks_and_the_model(trained, tiny_sd1):
    loras, adapted_unet, _ = trained
    kohya, metadata = ours_to_kohya(loras)
    back = kohya_to_ours(kohya, metadata)
    for lora in loras:
        again = back[lora.target]
        # the same blocks (types, modules, PEFT options); the scale now lives in the tensors: alpha = rank
        assert again.info["blocks"] == [dict(b, alpha=float(b["rank"])) for b in lora.info["blocks"]]
    without_blocks = dict(metadata)
    del without_blocks[EMBEDDED_KEY]  # a file from elsewhere: blocks rebuilt from the shapes alone
    for meta in (metadata, without_blocks):
        unet = load_model_bundle(str(tiny_sd1)).unet
        again = kohya_to_ours(kohya, meta)["unet"]
        load_lora_into(unet, again.state, again.metadata)
        torch.testing.assert_close(unet_output(unet), adapted_unet, atol=2e-5, rtol=1e-4)


def lycoris_file(unet, alpha_of_rank: float) -> dict:
    """A kohya file as LyCORIS itself writes it: its own LoHa / LoKr modules, random weights."""
    named = dict(unet.named_modules())
    layers = {"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": ("loha", {}),
              "down_blocks.0.resnets.0.conv1": ("loha", {"use_tucker": True}),
              "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2": ("lokr", {"factor": 4}),
              "mid_block.attentions.0.transformer_blocks.0.attn2.to_k": ("lokr", {"decompose_both": True, "factor": -1}),
              "up_blocks.1.resnets.0.conv2": ("lokr", {"factor": -1})}
    generator = torch.Generator().manual_seed(3)
    state = {}
    for module, (kind, options) in layers.items():
        cls = lycoris().LohaModule if kind == "loha" else lycoris().LokrModule
        name = module_to_kohya(module, "unet", "sd1")
        layer = cls(name, named[module], 1.0, 2, 2 * alpha_of_rank, **options)
        for key, tensor in layer.custom_state_dict().items():
            value = tensor.detach().clone() if key == "alpha" else torch.randn(tensor.shape, generator=generator) * 0.3
            state[f"{name}.{key}"] = value.contiguous()
    return state


def test_files_lycoris_writes_convert_to_ours_and_bake(tiny_sd1, tmp_path):
    reference = load_model_bundle(str(tiny_sd1))
    foreign = lycoris_file(reference.unet, alpha_of_rank=1.0)  # scale 1: LyCORIS 4 squares other scales
    assert apply_with_lycoris(reference.unet, foreign, "unet") == 5
    expected = unet_output(reference.unet)
    ours = kohya_to_ours(foreign, {})["unet"]
    kinds = {(b["type"], json.dumps(b.get("options", {}), sort_keys=True)) for b in ours.info["blocks"]}
    assert ("loha", '{"use_effective_conv2d": true}') in kinds and ("lokr", '{"decompose_both": true}') in kinds
    unet = load_model_bundle(str(tiny_sd1)).unet
    load_lora_into(unet, ours.state, ours.metadata)
    torch.testing.assert_close(unet_output(unet), expected, atol=2e-5, rtol=1e-4)
    # any other alpha: ours follows the webui rule (alpha / dim, once)
    halved = lycoris_file(load_model_bundle(str(tiny_sd1)).unet, alpha_of_rank=0.5)
    by_webui = load_model_bundle(str(tiny_sd1)).unet
    apply_with_webui_formula(by_webui, halved, "unet")
    # tools.merge reads the webui file straight away and bakes it
    path = save_safetensors(halved, tmp_path / "lycoris.safetensors", {"ss_network_module": "lycoris.kohya"})
    merged = load_model_bundle(str(tiny_sd1))
    merge_lora_into_bundle(merged, [(str(path), 1.0)])
    torch.testing.assert_close(unet_output(merged.unet), unet_output(by_webui), atol=2e-5, rtol=1e-4)


def test_layers_that_cannot_convert_fail_clearly(trained):
    prefix = "lora_unet_mid_block_attentions_0_proj_in"
    with pytest.raises(LoraFormatError, match="loha layer lacks hada_w1_b, hada_w2_a, hada_w2_b"):
        kohya_to_ours({f"{prefix}.hada_w1_a": torch.zeros(2, 2)}, {})
    with pytest.raises(LoraFormatError, match="DoRA"):
        kohya_to_ours({f"{prefix}.lora_down.weight": torch.zeros(2, 4), f"{prefix}.lora_up.weight": torch.zeros(4, 2),
                       f"{prefix}.dora_scale": torch.ones(4, 1)}, {})
    with pytest.raises(LoraFormatError, match="mixes lokr and lora"):
        kohya_to_ours({f"{prefix}.lora_down.weight": torch.zeros(2, 4), f"{prefix}.lokr_w1": torch.zeros(2, 2)}, {})
    with pytest.raises(LoraFormatError, match="match no PEFT decompose_factor"):
        kohya_to_ours({f"{prefix}.lokr_w1": torch.zeros(1, 4), f"{prefix}.lokr_w2": torch.zeros(6, 2)}, {})
    unet = trained[0][0]
    missing = dict(unet.state)
    missing.pop(next(k for k in missing if k.endswith("lokr_w2_b")))
    with pytest.raises(LoraFormatError, match="unet.safetensors: block unet_g1: .*lokr layer lacks lokr_w2"):
        ours_to_kohya([type(unet)(unet.target, unet.family, missing, unet.metadata, unet.info, unet.source)])
