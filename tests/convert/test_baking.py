"""convert.merge: baked weights equal base + w * alpha/rank * up @ down computed by hand (Linear, 1x1 and 3x3 conv),
kohya files bake like ours, fully trained weights interpolate, and embeddings become diffusers-style tokens."""
from __future__ import annotations

import pytest
import torch
from convert.lora_factory import make_lora_files

from hcpdiff_like.convert.kohya_lora import LoraFormatError, ours_to_kohya, read_our_lora
from hcpdiff_like.convert.merge import merge_embeddings_into_bundle, merge_lora_into_bundle
from hcpdiff_like.models.loading import load_model_bundle
from hcpdiff_like.plugins.embedding_files import EmbeddingFile, WordExistsError
from hcpdiff_like.plugins.lora import load_lora_into
from hcpdiff_like.training.checkpoints import load_safetensors, save_safetensors


@pytest.fixture(scope="module")
def lora_files(tiny_sd1, tmp_path_factory):
    return make_lora_files(tiny_sd1, "sd1", tmp_path_factory.mktemp("bake"))


def expected_weights(base_model, lora_file, weight):
    """base + weight * alpha/rank * up @ down, for every module of the file, by hand."""
    lora = read_our_lora(lora_file)
    expected = {}
    for block in lora.info["blocks"]:
        for module in block["modules"]:
            down, up = lora.state[f"{module}.lora_A.weight"], lora.state[f"{module}.lora_B.weight"]
            base = base_model.get_submodule(module).weight.detach()
            delta = (up.flatten(1) @ down.flatten(1)).reshape(base.shape)
            expected[module] = base + weight * block["alpha"] / block["rank"] * delta
    return expected


@pytest.mark.parametrize("weight", [0.7, -0.5])
def test_merge_equals_base_plus_weighted_delta(tiny_sd1, lora_files, weight):
    base, merged = load_model_bundle(str(tiny_sd1)), load_model_bundle(str(tiny_sd1))
    merge_lora_into_bundle(merged, [(lora_files["unet"], weight), (lora_files["text_encoder"], weight)])
    for target in ("unet", "text_encoder"):
        expected = expected_weights(getattr(base, target), lora_files[target], weight)
        kinds = {type(getattr(base, target).get_submodule(m)).__name__ for m in expected}
        assert kinds <= {"Linear", "Conv2d"} and (target == "text_encoder" or kinds == {"Linear", "Conv2d"})
        merged_state, base_state = getattr(merged, target).state_dict(), getattr(base, target).state_dict()
        assert merged_state.keys() == base_state.keys()  # plain layers again, no adapter left behind
        assert not hasattr(getattr(merged, target), "peft_config")
        for key, value in merged_state.items():
            module = key.rsplit(".", 1)[0]
            if module in expected and key.endswith(".weight"):
                assert torch.allclose(value, expected[module], atol=1e-5), key
            else:
                assert torch.equal(value, base_state[key]), key


def test_kohya_file_and_full_weights_bake(tiny_sd1, lora_files, tmp_path):
    kohya, metadata = ours_to_kohya([read_our_lora(lora_files["unet"])])
    webui = save_safetensors(kohya, tmp_path / "webui.safetensors", metadata)
    from_ours, from_kohya = load_model_bundle(str(tiny_sd1)), load_model_bundle(str(tiny_sd1))
    merge_lora_into_bundle(from_ours, [(lora_files["unet"], 0.5)])
    merge_lora_into_bundle(from_kohya, [(webui, 0.5)])
    for (key, a), b in zip(from_ours.unet.state_dict().items(), from_kohya.unet.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), key

    base = load_model_bundle(str(tiny_sd1))
    tuned = base.unet.conv_in.weight.detach() + 1.0
    full = save_safetensors({"base.conv_in.weight": tuned}, tmp_path / "unet-full.safetensors",
                            {"hcpdiff_like.family": "sd1", "hcpdiff_like.lora":
                             '{"version": 1, "target": "unet", "family": "sd1", "blocks": []}'})
    merged = load_model_bundle(str(tiny_sd1))
    merge_lora_into_bundle(merged, [(full, 0.25)])
    assert torch.allclose(merged.unet.conv_in.weight, base.unet.conv_in.weight + 0.25, atol=1e-6)


def test_wrong_family_is_refused(tiny_sdxl, lora_files):
    with pytest.raises(LoraFormatError, match="LoRA for sd1, but the base model is sdxl"):
        merge_lora_into_bundle(load_model_bundle(str(tiny_sdxl)), [(lora_files["unet"], 1.0)])


def test_embeddings_become_tokens(tiny_sdxl):
    from diffusers import StableDiffusionXLPipeline

    bundle = load_model_bundle(str(tiny_sdxl))
    word = EmbeddingFile("sks_word", [torch.randn(3, 32), torch.randn(3, 32)])
    merge_embeddings_into_bundle(bundle, [word])
    for tokenizer, encoder, vectors in zip(bundle.tokenizers, bundle.text_encoders, word.vectors):
        ids = tokenizer.convert_tokens_to_ids(["sks_word", "sks_word_1", "sks_word_2"])
        assert torch.equal(encoder.get_input_embeddings().weight[ids], vectors)
    # diffusers' textual-inversion convention: the pipeline expands the word to all its tokens itself
    pipe = StableDiffusionXLPipeline(vae=bundle.vae, text_encoder=bundle.text_encoder,
                                     text_encoder_2=bundle.text_encoder_2, tokenizer=bundle.tokenizer,
                                     tokenizer_2=bundle.tokenizer_2, unet=bundle.unet,
                                     scheduler=bundle.noise_scheduler)
    assert pipe.maybe_convert_prompt("a sks_word photo", bundle.tokenizer) == "a sks_word sks_word_1 sks_word_2 photo"
    with pytest.raises(WordExistsError):
        merge_embeddings_into_bundle(bundle, [EmbeddingFile("sks_word", [torch.randn(1, 32)] * 2)])


@pytest.mark.parametrize("kind", ["dora", "loha", "lokr"])
def test_other_adapter_types_bake_to_the_same_outputs(tiny_sd1, tmp_path, kind):
    blocks = {"text_encoder": [{"layers": [r"re:.*self_attn$"], "rank": 2, "alpha": 3, "type": kind}]}
    files = make_lora_files(tiny_sd1, "sd1", tmp_path, blocks=blocks, seed=4)
    with_adapter = load_model_bundle(str(tiny_sd1)).text_encoder
    state, metadata = load_safetensors(files["text_encoder"])
    load_lora_into(with_adapter, state, metadata)
    merged = load_model_bundle(str(tiny_sd1))
    merge_lora_into_bundle(merged, [(files["text_encoder"], 1.0)])
    ids = torch.tensor([[512, 70, 71, 513]])
    with torch.no_grad():
        expected = with_adapter(ids).last_hidden_state
        assert not torch.allclose(load_model_bundle(str(tiny_sd1)).text_encoder(ids).last_hidden_state, expected,
                                  atol=1e-3)
        assert torch.allclose(merged.text_encoder(ids).last_hidden_state, expected, atol=1e-5)
