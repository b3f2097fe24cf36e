"""tools.merge: the saved diffusers folder / single file hold exactly the baked weights and reload with diffusers'
and our loaders; embeddings become tokens; wrong inputs fail before any work and nothing is overwritten."""
from __future__ import annotations

import pytest
import torch
from convert.lora_factory import make_lora_files

from hcpdiff_like.convert.merge import merge_lora_into_bundle
from hcpdiff_like.models.loading import load_model_bundle
from hcpdiff_like.plugins.embedding_files import EmbeddingFile, write_embedding
from hcpdiff_like.tools import merge


@pytest.fixture(scope="module")
def lora_files(tiny_sd1, tmp_path_factory):
    return make_lora_files(tiny_sd1, "sd1", tmp_path_factory.mktemp("merge_lora"))


@pytest.fixture(scope="module")
def expected(tiny_sd1, lora_files):
    bundle = load_model_bundle(str(tiny_sd1))
    merge_lora_into_bundle(bundle, [(lora_files["unet"], 0.8), (lora_files["text_encoder"], 0.5)])
    return bundle


def lora_args(lora_files):
    return ["--lora", str(lora_files["unet"]), "0.8", "--lora", str(lora_files["text_encoder"]), "0.5"]


def same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k].to(sa[k].dtype)) for k in sa)


def test_diffusers_folder_with_embedding(tiny_sd1, lora_files, expected, tmp_path):
    from diffusers import StableDiffusionPipeline

    word = EmbeddingFile("qwx_word", [torch.randn(2, 32)])
    emb = write_embedding(word, tmp_path / "qwx_word.pt")
    out = tmp_path / "merged"
    assert merge.main(["--model", str(tiny_sd1), *lora_args(lora_files), "--embedding", str(emb),
                       "--dump_path", str(out)]) == 0
    pipe = StableDiffusionPipeline.from_pretrained(str(out), local_files_only=True)
    assert same_state(pipe.unet, expected.unet)
    ids = pipe.tokenizer.convert_tokens_to_ids(["qwx_word", "qwx_word_1"])
    table = pipe.text_encoder.get_input_embeddings().weight
    assert torch.equal(table[ids], word.vectors[0])
    old_rows = expected.text_encoder.get_input_embeddings().weight
    assert torch.equal(table[:old_rows.shape[0]], old_rows)  # the baked text encoder, plus two new rows
    assert pipe.maybe_convert_prompt("qwx_word", pipe.tokenizer) == "qwx_word qwx_word_1"


def test_single_file_checkpoint(tiny_sd1, lora_files, expected, tmp_path):
    from hcpdiff_like.models.single_file import load_single_file_bundle

    out = tmp_path / "merged.safetensors"
    assert merge.main(["--model", str(tiny_sd1), *lora_args(lora_files), "--dump_path", str(out)]) == 0
    reloaded = load_single_file_bundle(out, family="sd1", config_dir=tiny_sd1)
    assert same_state(reloaded.unet, expected.unet) and same_state(reloaded.text_encoder, expected.text_encoder)


def test_help_and_wrong_inputs(tiny_sd1, tiny_sdxl, lora_files, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        merge.main(["--help"])
    assert exit_info.value.code == 0 and "--embedding" in capsys.readouterr().out
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("x")
    assert merge.main(["--model", str(tiny_sd1), *lora_args(lora_files), "--dump_path", str(taken)]) == 2
    assert "already exists" in capsys.readouterr().err and (taken / "keep.txt").exists()
    emb = write_embedding(EmbeddingFile("zzq_word", [torch.randn(1, 32)]), tmp_path / "zzq_word.pt")
    assert merge.main(["--model", str(tiny_sd1), "--embedding", str(emb), "--dump_path",
                       str(tmp_path / "m.safetensors")]) == 2
    assert "cannot be baked into a single-file" in capsys.readouterr().err
    assert merge.main(["--model", str(tiny_sd1), "--lora", str(lora_files["unet"]), "heavy",
                       "--dump_path", str(tmp_path / "m")]) == 2
    assert "must be a number" in capsys.readouterr().err
    assert merge.main(["--model", str(tiny_sdxl), "--lora", str(lora_files["unet"]),
                       "--dump_path", str(tmp_path / "m")]) == 2
    assert "LoRA for sd1, but the base model is sdxl" in capsys.readouterr().err
    assert not (tmp_path / "m").exists() and not (tmp_path / "m.safetensors").exists()
