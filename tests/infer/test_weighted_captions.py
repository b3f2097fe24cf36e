"""model.weighted_captions: the training conditioner understands prompt weights, unchanged otherwise."""
from __future__ import annotations

import torch

from hcpdiff_like.infer.weighted_captions import WeightedTextConditioner, conditioner_class
from hcpdiff_like.models.conditioning import TextConditioner
from hcpdiff_like.models.loading import load_model_bundle


def test_unweighted_captions_match_the_plain_conditioner_and_weights_train(tiny_sd1):
    bundle = load_model_bundle(str(tiny_sd1))
    plain = TextConditioner(bundle, max_chunks=2)
    weighted = WeightedTextConditioner(bundle, max_chunks=2)
    captions = ["a red circle", "x" * 200]  # the long one is cut to 2 chunks, as in training
    expected, _ = plain(captions)
    hidden, added = weighted(captions)
    assert added is None and hidden.shape == expected.shape and torch.allclose(hidden, expected, atol=1e-6)
    out, _ = weighted(["a (red:1.4) circle"])
    assert not torch.allclose(out, expected[:1], atol=1e-4)
    out.sum().backward()  # differentiable: trained text-encoder parameters get gradients
    assert bundle.text_encoder.get_input_embeddings().weight.grad is not None


def test_sdxl_keeps_pooled_and_time_ids(tiny_sdxl):
    bundle = load_model_bundle(str(tiny_sdxl))
    size = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])
    expected, expected_added = TextConditioner(bundle)(["a cat"], size)
    hidden, added = WeightedTextConditioner(bundle)(["a cat"], size)
    assert torch.allclose(hidden, expected, atol=1e-6)
    assert torch.allclose(added["text_embeds"], expected_added["text_embeds"], atol=1e-6)
    assert torch.equal(added["time_ids"], size)


def test_opt_in():
    assert conditioner_class({}) is TextConditioner
    assert conditioner_class({"weighted_captions": True}) is WeightedTextConditioner
