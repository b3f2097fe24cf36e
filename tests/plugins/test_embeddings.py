"""Trigger words in the text encoder(s): only their rows train, and they match diffusers' own loader."""
from __future__ import annotations

import pytest
import torch

from hcpdiff_like.models.conditioning import TextConditioner
from hcpdiff_like.models.loading import load_model_bundle
from hcpdiff_like.plugins.embedding_files import EmbeddingFile, EmbeddingFormatError, create_embedding, \
    write_embedding
from hcpdiff_like.plugins.embeddings import attach_embeddings, load_embedding_dir


@pytest.fixture()
def sd1_with_word(tiny_sd1, tmp_path):
    create_embedding(str(tiny_sd1), "sks_word", 3, init_text="*[0.5, 3]", out_dir=tmp_path / "embs", seed=0)
    bundle = load_model_bundle(str(tiny_sd1))
    conditioner = TextConditioner(bundle)
    groups = attach_embeddings(bundle, conditioner, load_embedding_dir(tmp_path / "embs"), train={"sks_word": 1e-3})
    return bundle, conditioner, groups, tmp_path / "embs" / "sks_word.pt"


def test_word_expands_to_its_vectors_and_other_text_is_unchanged(tiny_sd1, sd1_with_word):
    bundle, conditioner, groups, _ = sd1_with_word
    plain = TextConditioner(load_model_bundle(str(tiny_sd1)))
    ids = conditioner.text_to_ids("a sks_word b")
    base_vocab = bundle.text_encoder.config.vocab_size
    assert ids[1:4] == [base_vocab, base_vocab + 1, base_vocab + 2] and len(ids) == 5
    with torch.no_grad():
        assert torch.equal(conditioner(["a red circle"])[0], plain(["a red circle"])[0])
    assert groups[0]["lr"] == 1e-3 and groups[0]["params"][0].shape == (3, 32)


def test_caption_without_the_word_gives_it_exactly_zero_gradient(sd1_with_word):
    _, conditioner, groups, _ = sd1_with_word
    vectors = groups[0]["params"][0]
    conditioner(["a red circle"])[0].square().sum().backward()
    assert vectors.grad is not None and torch.count_nonzero(vectors.grad) == 0
    vectors.grad = None
    conditioner(["a sks_word circle"])[0].square().sum().backward()
    assert torch.count_nonzero(vectors.grad) > 0


def test_base_token_table_gets_no_gradient(sd1_with_word):
    bundle, conditioner, groups, _ = sd1_with_word
    word = groups[0]["params"][0]
    for parameter in bundle.text_encoder.parameters():  # the trainer freezes the base model first
        parameter.requires_grad_(parameter is word)
    conditioner(["a sks_word circle"])[0].sum().backward()
    assert all(p.grad is None for p in bundle.text_encoder.parameters() if p is not word)
    assert word.grad is not None
    names = [n for n, p in bundle.text_encoder.named_parameters() if p is word]
    assert names[0].endswith("token_embedding.words.0")


def test_matches_diffusers_load_textual_inversion(tiny_sd1, sd1_with_word):
    """The outside consumer: diffusers reads our .pt and encodes the prompt exactly as we do."""
    from diffusers import StableDiffusionPipeline

    _, conditioner, _, path = sd1_with_word
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd1), local_files_only=True, safety_checker=None)
    pipe.load_textual_inversion(str(path), token="sks_word")
    with torch.no_grad():
        theirs, _ = pipe.encode_prompt("a sks_word on a table", "cpu", 1, False)
        ours, _ = conditioner(["a sks_word on a table"])
    assert torch.equal(theirs, ours)


def test_sdxl_word_matches_diffusers_on_both_encoders(tiny_sdxl, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    path = create_embedding(str(tiny_sdxl), "sks_xl", 2, out_dir=tmp_path, seed=0, out_path=tmp_path / "sks_xl.safetensors")
    bundle = load_model_bundle(str(tiny_sdxl))
    conditioner = TextConditioner(bundle)
    attach_embeddings(bundle, conditioner, load_embedding_dir(tmp_path))
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl), local_files_only=True)
    from safetensors.torch import load_file

    state = load_file(str(path))
    pipe.load_textual_inversion(state["clip_l"], token="sks_xl", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(state["clip_g"], token="sks_xl", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    size_info = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])
    with torch.no_grad():
        theirs, _, pooled, _ = pipe.encode_prompt("a sks_xl cat", device="cpu", do_classifier_free_guidance=False)
        ours, added = conditioner(["a sks_xl cat"], size_info)
    assert torch.allclose(theirs, ours, atol=1e-6)
    assert torch.allclose(pooled, added["text_embeds"], atol=1e-6)


def test_trained_word_without_a_file_is_a_clear_error(tiny_sd1, tmp_path):
    bundle = load_model_bundle(str(tiny_sd1))
    write_embedding(EmbeddingFile("other_word", [torch.zeros(1, 32)]), tmp_path / "other_word.pt")
    with pytest.raises(EmbeddingFormatError, match="create_embedding"):
        attach_embeddings(bundle, TextConditioner(bundle), load_embedding_dir(tmp_path), train={"sks_word": None})
    with pytest.raises(EmbeddingFormatError, match="does not exist"):
        load_embedding_dir(tmp_path / "missing")
