"""Embedding files: every format users bring reads, the written ones match webui's layout, words are new."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from hcpdiff_like.plugins.embedding_files import (EmbeddingFile, EmbeddingFormatError, WordExistsError,
                                                  create_embedding, read_embedding, split_for_encoders,
                                                  write_embedding)


def test_sd1_pt_is_the_a1111_layout(tmp_path):
    vectors = torch.randn(3, 32)
    path = write_embedding(EmbeddingFile("sks_cat", [vectors], step=7), tmp_path / "sks_cat.pt")
    raw = torch.load(path, weights_only=True)
    assert set(raw) >= {"string_to_param", "string_to_token", "name", "step"}
    assert torch.equal(raw["string_to_param"]["*"], vectors) and raw["name"] == "sks_cat" and raw["step"] == 7
    back = read_embedding(path)
    assert back.name == "sks_cat" and back.step == 7 and torch.equal(back.vectors[0], vectors)


def test_sdxl_files_hold_clip_l_and_clip_g(tmp_path):
    clip_l, clip_g = torch.randn(2, 32), torch.randn(2, 48)
    emb = EmbeddingFile("sks_dog", [clip_l, clip_g])
    for suffix in (".pt", ".safetensors"):
        path = write_embedding(emb, tmp_path / f"sks_dog{suffix}")
        raw = load_file(path) if suffix == ".safetensors" else torch.load(path, weights_only=True)
        assert torch.equal(raw["clip_l"], clip_l) and torch.equal(raw["clip_g"], clip_g)
        back = read_embedding(path)
        assert [v.shape for v in back.vectors] == [(2, 32), (2, 48)]


def test_foreign_layouts_read(tmp_path):
    tensor = torch.randn(4, 32)
    save_file({"emb_params": tensor}, str(tmp_path / "kohya.safetensors"))
    torch.save({"<concept>": tensor}, tmp_path / "concept.bin")
    torch.save({"emb_params": tensor, "name": "hcp_legacy"}, tmp_path / "legacy.pt")
    for name in ("kohya.safetensors", "concept.bin", "legacy.pt"):
        assert torch.equal(read_embedding(tmp_path / name).vectors[0], tensor), name


def test_hcp_concatenated_sdxl_word_is_split_by_encoder_width():
    clip_l, clip_g = torch.randn(2, 32), torch.randn(2, 48)
    emb = EmbeddingFile("w", [torch.cat([clip_l, clip_g], dim=1)])
    parts = split_for_encoders(emb, [32, 48])
    assert torch.equal(parts[0], clip_l) and torch.equal(parts[1], clip_g)
    with pytest.raises(EmbeddingFormatError, match="another model family"):
        split_for_encoders(EmbeddingFile("w", [clip_l]), [768])


def test_pickled_code_and_garbage_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("ran code",))

    torch.save({"string_to_param": {"*": Evil()}}, tmp_path / "evil.pt")
    with pytest.raises(EmbeddingFormatError, match="evil.pt"):
        read_embedding(tmp_path / "evil.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(EmbeddingFormatError, match="junk.pt"):
        read_embedding(tmp_path / "junk.pt")


def test_create_embedding_inits_from_text_and_random_parts(tiny_sd1, tmp_path):
    from hcpdiff_like.models.loading import load_text_components

    path = create_embedding(str(tiny_sd1), "sks_shape", 4, init_text="ab, *[0.5, 1]", out_dir=tmp_path, seed=0)
    assert path == tmp_path / "sks_shape.pt"
    vectors = read_embedding(path).vectors[0]
    tokenizers, encoders = load_text_components(str(tiny_sd1))
    ids = tokenizers[0]("ab", add_special_tokens=False)["input_ids"]  # byte-level vocab: 2 tokens
    table = encoders[0].get_input_embeddings().weight
    assert torch.equal(vectors[:2], table[ids].detach())
    assert vectors.shape == (4, 32) and not torch.equal(vectors[2], vectors[3])
    with pytest.raises(FileExistsError, match="--replace"):
        create_embedding(str(tiny_sd1), "sks_shape", 4, out_dir=tmp_path)


def test_create_embedding_refuses_an_existing_token(tiny_sd1, tmp_path):
    with pytest.raises(WordExistsError, match="single token"):
        create_embedding(str(tiny_sd1), "a", 2, out_dir=tmp_path)  # one byte = one token of the tiny vocab


def test_sdxl_word_gets_one_tensor_per_text_encoder(tiny_sdxl, tmp_path):
    path = create_embedding(str(tiny_sdxl), "sks_xl", 2, out_dir=tmp_path, seed=1)
    emb = read_embedding(path)
    assert len(emb.vectors) == 2 and all(v.shape == (2, 32) for v in emb.vectors)
