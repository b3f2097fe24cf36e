"""The create_embedding and embedding_convert command lines."""
from __future__ import annotations

import torch
from safetensors.torch import load_file

from hcpdiff_like.plugins.embedding_files import EmbeddingFile, read_embedding, write_embedding
from hcpdiff_like.tools import create_embedding, embedding_convert


def test_cli_writes_embs_word_pt_and_refuses_existing_tokens(tiny_sd1, tmp_path, capsys):
    root = tmp_path / "embs"
    assert create_embedding.main([str(tiny_sd1), "sks_dog", "4", "--init_text", "dog", "--root", str(root)]) == 0
    assert read_embedding(root / "sks_dog.pt").vectors[0].shape == (4, 32)
    assert create_embedding.main([str(tiny_sd1), "sks_dog", "4", "--root", str(root)]) == 2
    assert "--replace" in capsys.readouterr().err
    assert create_embedding.main([str(tiny_sd1), "d", "1", "--root", str(root)]) == 2
    assert "single token" in capsys.readouterr().err
    assert create_embedding.main([str(tmp_path / "no_model"), "sks_x", "1", "--root", str(root)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_convert_pt_to_kohya_safetensors_and_back(tmp_path, capsys):
    vectors = torch.randn(2, 32)
    write_embedding(EmbeddingFile("sks", [vectors]), tmp_path / "sks.pt")
    assert embedding_convert.main(["--src", str(tmp_path / "sks.pt"), "--dst", str(tmp_path / "sks.safetensors")]) == 0
    assert torch.equal(load_file(str(tmp_path / "sks.safetensors"))["emb_params"], vectors)
    assert embedding_convert.main(["--src", str(tmp_path / "sks.safetensors"), "--dst", str(tmp_path / "sks.pt")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert embedding_convert.main(["--src", str(tmp_path / "sks.safetensors"), "--dst", str(tmp_path / "b.pt"),
                                   "--name", "sks"]) == 0
    assert torch.equal(read_embedding(tmp_path / "b.pt").vectors[0], vectors)


def test_convert_splits_an_hcp_sdxl_word_for_webui(tmp_path):
    clip_l, clip_g = torch.randn(2, 768), torch.randn(2, 1280)
    torch.save({"string_to_param": {"*": torch.cat([clip_l, clip_g], 1)}, "name": "w"}, tmp_path / "w.pt")
    assert embedding_convert.main(["--src", str(tmp_path / "w.pt"), "--dst", str(tmp_path / "w_xl.safetensors"),
                                   "--sdxl_widths", "768,1280"]) == 0
    state = load_file(str(tmp_path / "w_xl.safetensors"))
    assert torch.equal(state["clip_l"], clip_l) and torch.equal(state["clip_g"], clip_g)


def test_cli_reads_a_single_file_checkpoint_with_its_tokenizer_folder(tiny_sd1, tmp_path):
    from hcpdiff_like.convert.sd_checkpoint import write_single_file
    from hcpdiff_like.models.loading import load_model_bundle

    single = write_single_file(load_model_bundle(str(tiny_sd1)), tmp_path / "tiny.safetensors")
    args = ["sks_one", "2", "--init_text", "ab", "--seed", "0"]
    assert create_embedding.main([str(single), *args, "--root", str(tmp_path / "a"),
                                  "--single_file_config", str(tiny_sd1)]) == 0
    assert create_embedding.main([str(tiny_sd1), *args, "--root", str(tmp_path / "b")]) == 0
    assert torch.equal(read_embedding(tmp_path / "a" / "sks_one.pt").vectors[0],
                       read_embedding(tmp_path / "b" / "sks_one.pt").vectors[0])
