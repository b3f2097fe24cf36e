"""The visualizer end to end on tiny models: determinism, records that regenerate, merged run steps."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from hcpdiff_like.config.launcher import compose_config
from hcpdiff_like.infer.records import read_record
from hcpdiff_like.visualizer import CFG_GROUP, CONFIG_NAME, VisualizerConfigError, quote_free_text, run_visualizer

FAST = ["infer_args.width=16", "infer_args.height=16", "infer_args.num_inference_steps=2", "dtype=fp32",
        "device=cpu", "emb_dir=null"]


def visualize(*overrides: str) -> list[Path]:
    return run_visualizer(compose_config(quote_free_text(FAST + list(overrides)), config_name=CONFIG_NAME,
                                         cfg_group=CFG_GROUP))


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).copy()


@pytest.fixture(scope="module")
def run_dir(tiny_sd1, tmp_path_factory) -> Path:
    """A fake experiment dir: a UNet LoRA (non-zero) and a 2-vector trained word at step 5."""
    from hcpdiff_like.models.loading import load_model_bundle
    from hcpdiff_like.plugins.embedding_files import EmbeddingFile, write_embedding
    from hcpdiff_like.plugins.lora import attach_lora_blocks, lora_metadata, lora_state_dict
    from hcpdiff_like.training.checkpoints import save_safetensors

    exp = tmp_path_factory.mktemp("run")
    bundle = load_model_bundle(str(tiny_sd1))
    specs = attach_lora_blocks(bundle.unet, [{"layers": ["re:.*attn2$"], "rank": 4}], "unet")
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in bundle.unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    save_safetensors(lora_state_dict(bundle.unet, specs), exp / "ckpts" / "unet-5.safetensors",
                     lora_metadata(specs, "unet", "sd1"))
    write_embedding(EmbeddingFile("sks", [torch.randn(2, 32)]), exp / "ckpts" / "sks-5.pt")
    (exp / "cfg.yaml").write_text(yaml.safe_dump({"model": {"pretrained_model_name_or_path": str(tiny_sd1)}}))
    return exp


def test_fixed_seed_gives_bit_identical_images(tiny_sd1, tmp_path):
    common = [f"pretrained_model={tiny_sd1}", "prompt=a red circle, (blue:1.2)", "bs=2", "seed=7",
              "sampler=Euler a"]
    first = visualize(*common, f"output_dir={tmp_path / 'a'}")
    second = visualize(*common, f"output_dir={tmp_path / 'b'}")
    assert len(first) == 2 and [p.name for p in first] == [p.name for p in second]
    assert first[0].name.startswith("0001-7-") and first[1].name.startswith("0002-8-")  # seed, seed+1
    for a, b in zip(first, second):
        assert np.array_equal(pixels(a), pixels(b))
    assert not np.array_equal(pixels(first[0]), pixels(first[1]))  # different seeds, different images


def test_record_beside_image_regenerates_it(tiny_sd1, tmp_path):
    out = tmp_path / "out"
    written = visualize(f"pretrained_model={tiny_sd1}", "prompt=a cat, {fluffy:1.3}", "bs=2",
                        f"output_dir={out}", "sampler=dpm++_2m")  # seed: null -> random, written down
    record_path = written[1].with_suffix(".yaml")
    record = yaml.safe_load(record_path.read_text())
    assert record == read_record(written[1])  # the PNG text chunk holds the same record
    assert record["generated"]["index_in_batch"] == 1 and len(record["seed"]) == 2
    assert record["generated"]["seed"] == record["seed"][1] and record["prompt"] == "a cat, {fluffy:1.3}"
    with Image.open(written[1]) as image:
        assert f"Seed: {record['seed'][1]}" in image.text["parameters"]  # webui's PNG info
    again = run_visualizer(compose_config([f"cfg={record_path}"], config_name=CONFIG_NAME, cfg_group=CFG_GROUP))
    assert again[0].name.startswith("0003-")  # numbering continues in the folder
    assert np.array_equal(pixels(again[1]), pixels(written[1]))


def test_merged_lora_at_alpha_zero_equals_base_model(run_dir, tiny_sd1):
    from hcpdiff_like.infer.model import load_inference_model

    torch.manual_seed(0)
    latents, hidden = torch.randn(1, 4, 16, 16), torch.randn(1, 77, 32)

    def unet_output(**merge):
        model = load_inference_model(str(tiny_sd1), device="cpu", dtype="fp32", **merge)
        weight = model.bundle.unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q").weight
        with torch.no_grad():
            return model.bundle.unet(latents, 500, encoder_hidden_states=hidden).sample, weight, model.loaded

    base, base_weight, _ = unet_output()
    zero, _, _ = unet_output(exp_dir=str(run_dir), step=5, merge_alpha=0.0)
    full, full_weight, loaded = unet_output(exp_dir=str(run_dir), step=5, merge_alpha=1.0)
    _, half_weight, _ = unet_output(exp_dir=str(run_dir), step=5, merge_alpha=0.5)
    assert torch.equal(base, zero)
    assert not torch.allclose(base, full, atol=1e-4)
    # baked weights: W0 + alpha x scale x B @ A, so the change at alpha 0.5 is half the change at 1
    assert not torch.allclose(full_weight, base_weight)
    assert torch.allclose(half_weight - base_weight, (full_weight - base_weight) / 2, atol=1e-6)
    assert any(p.endswith("unet-5.safetensors") for p in loaded) and "word:sks-5" in loaded


def test_visualizer_takes_the_run_base_model_and_step(run_dir, tmp_path):
    written = visualize(f"exp_dir={run_dir}", "model_steps=5", "prompt={sks-5:1.2} on grey", "seed=1",
                        f"output_dir={tmp_path}")
    record = yaml.safe_load(written[0].with_suffix(".yaml").read_text())
    assert record["pretrained_model"] == yaml.safe_load((run_dir / "cfg.yaml").read_text())["model"][
        "pretrained_model_name_or_path"]
    assert "word:sks-5" in record["generated"]["loaded"] and record["merge"]["alpha"] == 0.85


def test_trained_word_of_the_step_is_usable_with_weights(run_dir, tiny_sd1):
    from hcpdiff_like.infer.model import load_inference_model
    from hcpdiff_like.infer.prompt_encoding import WeightedPromptEncoder

    model = load_inference_model(str(tiny_sd1), exp_dir=str(run_dir), step=5, device="cpu")
    ids, weights = WeightedPromptEncoder(model.conditioner).weighted_ids("{sks-5:1.2}")
    assert len(ids) == 2 and weights == pytest.approx([1.2, 1.2])  # the word expands to its 2 vectors


def test_bad_inputs_are_named_before_generation(run_dir, tiny_sd1, tmp_path):
    from hcpdiff_like.infer.model import InferenceModelError
    from hcpdiff_like.infer.samplers import SamplerError

    with pytest.raises(InferenceModelError, match=r"model_steps=7.*saved steps: \[5\]"):
        visualize(f"exp_dir={run_dir}", "model_steps=7", f"output_dir={tmp_path}")
    with pytest.raises(SamplerError, match="euler_a"):
        visualize(f"pretrained_model={tiny_sd1}", "sampler=eulr", f"output_dir={tmp_path}")
    with pytest.raises(VisualizerConfigError, match="merge.alpah"):
        visualize(f"pretrained_model={tiny_sd1}", "+merge.alpah=1", f"output_dir={tmp_path}")
    with pytest.raises(VisualizerConfigError, match="exp_dir"):
        run_visualizer(compose_config(["cfg=anime/text2img_anime_lora"], config_name=CONFIG_NAME,
                                      cfg_group=CFG_GROUP))


def test_cfg_picks_from_cfgs_infer_and_prompts_need_no_quoting():
    cfg = compose_config(quote_free_text(["cfg=anime/text2img_anime_lora", "exp_dir=/x",
                                          "prompt=masterpiece, 1girl, {surtr-1000:1.2}, (red:0.8)"]),
                         config_name=CONFIG_NAME, cfg_group=CFG_GROUP)
    assert cfg.prompt == "masterpiece, 1girl, {surtr-1000:1.2}, (red:0.8)"
    assert (cfg.merge.alpha, cfg.sampler, cfg.infer_args.height, cfg.N_repeats) == (0.85, "euler_a", 768, 2)
    with pytest.raises(SystemExit, match="cfgs/infer/.*text2img"):
        compose_config(["cfg=nope"], config_name=CONFIG_NAME, cfg_group=CFG_GROUP)
    for prompt in [r"a \(literal\) it's", "end\\", "q\\'", "a=b", ""]:  # survives Hydra's quoting rules
        composed = compose_config(quote_free_text([f"prompt={prompt}"]), config_name=CONFIG_NAME, cfg_group=CFG_GROUP)
        assert composed.prompt == prompt


def test_sdxl_generates_at_the_asked_size(tiny_sdxl, tmp_path):
    written = visualize(f"pretrained_model={tiny_sdxl}", "prompt=a (cat:1.3)", "seed=1", "infer_args.height=24",
                        "sampler=dpm++_2m_karras", f"output_dir={tmp_path}")
    with Image.open(written[0]) as image:
        assert image.size == (16, 24)
