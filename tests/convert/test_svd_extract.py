"""convert.extract: a known low-rank delta on Linear, 1x1-conv and 3x3-conv layers comes back exactly (up to float
error) and reloads through load_lora_into; untouched layers are left out; other changes are reported."""
from __future__ import annotations

import pytest
import torch

from hcpdiff_like.convert.extract import ExtractError, extract_lora, low_rank_factors
from hcpdiff_like.models.loading import load_model_bundle
from hcpdiff_like.plugins.lora import load_lora_into

LINEAR = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
CONV_1X1 = "down_blocks.0.attentions.0.proj_in"
CONV_3X3 = "up_blocks.0.resnets.0.conv1"


def known_delta(weight: torch.Tensor, rank: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    out, rest = weight.shape[0], weight[0].numel()
    return (torch.randn(out, rank, generator=generator) @ torch.randn(rank, rest, generator=generator)
            ).reshape(weight.shape) * 0.1


def test_low_rank_factors_against_numpy_svd():
    delta = torch.randn(12, 5) @ torch.randn(5, 9)
    down, up, error = low_rank_factors(delta, 3)
    import numpy as np

    u, s, vh = np.linalg.svd(delta.numpy(), full_matrices=False)
    best = (u[:, :3] * s[:3]) @ vh[:3]  # Eckart-Young: the best rank-3 approximation
    assert np.allclose((up @ down).numpy(), best, atol=1e-4)
    assert error == pytest.approx(np.linalg.norm(delta.numpy() - best) / np.linalg.norm(delta.numpy()), rel=1e-3)


def test_extract_recovers_a_known_delta(tiny_sd1):
    base, tuned = load_model_bundle(str(tiny_sd1)), load_model_bundle(str(tiny_sd1))
    ranks = {LINEAR: 2, CONV_1X1: 3, CONV_3X3: 2}
    deltas = {}
    with torch.no_grad():
        for index, (name, rank) in enumerate(ranks.items()):
            layer = tuned.unet.get_submodule(name)
            deltas[name] = known_delta(layer.weight, rank, index)
            layer.weight += deltas[name]
        tuned.unet.conv_norm_out.weight += 0.5  # a change no LoRA can carry
    result = extract_lora(base.unet, tuned.unet, "unet", "sd1", rank=3, conv_rank=2)
    assert set(result.errors) == set(ranks)  # untouched layers are not in the file
    assert max(result.errors.values()) < 1e-4
    assert result.skipped_other == ["conv_norm_out.weight"]
    for name, delta in deltas.items():
        down, up = result.state[f"{name}.lora_A.weight"], result.state[f"{name}.lora_B.weight"]
        assert torch.allclose((up.flatten(1) @ down.flatten(1)).reshape(delta.shape), delta, atol=1e-5)
    assert result.state[f"{CONV_3X3}.lora_A.weight"].shape[2:] == (3, 3)

    load_lora_into(base.unet, result.state, result.metadata)
    sample, context = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 32)
    with torch.no_grad():
        tuned.unet.conv_norm_out.weight -= 0.5
        assert torch.allclose(base.unet(sample, 10, context).sample, tuned.unet(sample, 10, context).sample,
                              atol=1e-4)


def test_without_conv_rank_wide_convs_are_reported_and_architecture_checked(tiny_sd1, tiny_sdxl):
    base, tuned = load_model_bundle(str(tiny_sd1)), load_model_bundle(str(tiny_sd1))
    with torch.no_grad():
        tuned.unet.get_submodule(CONV_3X3).weight += 0.1
    result = extract_lora(base.unet, tuned.unet, "unet", "sd1", rank=4)
    assert not result.state and result.skipped_other == [f"{CONV_3X3}.weight"]
    with pytest.raises(ExtractError, match="architecture"):
        extract_lora(base.unet, load_model_bundle(str(tiny_sdxl)).unet, "unet", "sd1", rank=4)
