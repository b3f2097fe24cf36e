"""Text conditioning per family: chunking of long prompts, clip_skip, SDXL pooled + time ids."""
from __future__ import annotations

import torch

from hcpdiff_like.models.conditioning import TextConditioner
from hcpdiff_like.models.loading import load_model_bundle


def test_chunks_carry_bos_eos_and_long_prompts_are_not_truncated(tiny_sd1):
    bundle = load_model_bundle(str(tiny_sd1))
    conditioner = TextConditioner(bundle, max_chunks=2)
    tokenizer = bundle.tokenizer
    ids = conditioner.tokenize(["x" * 100], tokenizer)  # byte-level vocab: 100 tokens
    assert ids.shape == (1, 2, 77)
    assert (ids[:, :, 0] == tokenizer.bos_token_id).all()
    assert int((ids[0, 1] != tokenizer.eos_token_id).sum()) == 1 + 25  # BOS + the 25 tokens past 75


def test_clip_skip_uses_an_earlier_layer(tiny_sd1):
    bundle = load_model_bundle(str(tiny_sd1))
    last, _ = TextConditioner(bundle, clip_skip=0)(["a red circle"])
    skipped, _ = TextConditioner(bundle, clip_skip=1)(["a red circle"])
    encoder = bundle.text_encoder
    ids = TextConditioner(bundle).tokenize(["a red circle"], bundle.tokenizer)[:, 0]
    hidden = encoder(ids, output_hidden_states=True).hidden_states[-2]
    expected = getattr(encoder, "text_model", encoder).final_layer_norm(hidden)
    assert torch.allclose(skipped, expected, atol=1e-6)
    assert not torch.allclose(last, skipped)


def test_sdxl_conditioning_concatenates_both_encoders(tiny_sdxl):
    bundle = load_model_bundle(str(tiny_sdxl))
    conditioner = TextConditioner(bundle)
    size_info = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])
    hidden, added = conditioner(["a cat"], size_info)
    widths = [e.config.hidden_size for e in bundle.text_encoders]
    assert hidden.shape == (1, 77, sum(widths))
    assert added["text_embeds"].shape == (1, bundle.text_encoder_2.config.projection_dim)
    assert torch.equal(added["time_ids"], size_info)
