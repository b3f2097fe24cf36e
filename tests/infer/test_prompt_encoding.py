"""Weighted prompt encoding against the training conditioner and an independent formula."""
from __future__ import annotations

import pytest
import torch

from hcpdiff_like.infer.prompt_encoding import WeightedPromptEncoder
from hcpdiff_like.models.conditioning import TextConditioner
from hcpdiff_like.models.loading import load_model_bundle


@pytest.fixture(scope="module")
def sd1(tiny_sd1):
    return TextConditioner(load_model_bundle(str(tiny_sd1)), max_chunks=1)


def test_unweighted_prompts_equal_training_conditioning(sd1):
    prompts = ["a red circle", "two blue squares on grey"]
    hidden, pooled = WeightedPromptEncoder(sd1).encode(prompts)
    expected, _ = sd1(prompts)
    assert pooled is None and torch.equal(hidden, expected)


def test_weights_scale_only_the_weighted_tokens(sd1):
    encoder = WeightedPromptEncoder(sd1)
    base, _ = encoder.encode(["a red circle"])
    weighted, _ = encoder.encode(["a (red:1.5) circle"])
    start = 1 + len(sd1.text_to_ids("a ", 0))  # after BOS
    red = slice(start, start + len(sd1.text_to_ids("red", 0)))
    ratio = weighted / base  # = c x weight per token, with one rescaling constant c per prompt
    c = ratio[0, 0, 0]
    assert torch.allclose(ratio[0, red], torch.full_like(ratio[0, red], 1.5) * c, rtol=1e-4)
    others = torch.cat([ratio[0, :red.start], ratio[0, red.stop:]])
    assert torch.allclose(others, torch.full_like(others, 1.0) * c, rtol=1e-4)


@pytest.mark.parametrize("mean", [0.7, -0.3])
def test_rescaling_keeps_each_prompts_mean(mean):
    torch.manual_seed(0)
    hidden = torch.randn(2, 6, 4) * 0.1 + mean
    weights = torch.tensor([[1, 1, 2, 2, 1, 1], [1, 0.5, 1, 1, 1, 1]], dtype=torch.float32)
    out = WeightedPromptEncoder.apply_weights(hidden, weights)
    for row in range(2):  # independent formula, one prompt at a time
        scaled = hidden[row] * weights[row][:, None]
        assert torch.allclose(out[row], scaled * hidden[row].mean() / scaled.mean(), atol=1e-6)
        assert out[row].mean().item() == pytest.approx(hidden[row].mean().item(), rel=1e-5)


def test_long_prompts_get_more_chunks_and_the_negative_matches(sd1):
    encoder = WeightedPromptEncoder(sd1, min_chunks=1)
    kwargs = encoder.encode_pair(["x" * 100], [""])  # byte-level vocab: 100 tokens -> 2 chunks
    assert kwargs["prompt_embeds"].shape == kwargs["negative_prompt_embeds"].shape == (1, 2 * 77, 32)
    assert WeightedPromptEncoder(sd1, min_chunks=3).encode(["a"])[0].shape[1] == 3 * 77


def test_sdxl_weights_both_encoders_and_keeps_pooled(tiny_sdxl):
    conditioner = TextConditioner(load_model_bundle(str(tiny_sdxl)))
    encoder = WeightedPromptEncoder(conditioner)
    kwargs = encoder.encode_pair(["a (cat:1.4)"], ["a cat"])
    expected, added = conditioner(["a cat"], torch.zeros(1, 6))
    assert torch.allclose(kwargs["negative_prompt_embeds"], expected, atol=1e-6)
    assert torch.allclose(kwargs["pooled_prompt_embeds"], added["text_embeds"], atol=1e-6)  # pooled: not weighted
    assert not torch.allclose(kwargs["prompt_embeds"], expected)
