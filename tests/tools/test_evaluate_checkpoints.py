"""evaluate_checkpoints on a fake two-checkpoint run with a tiny random CLIP saved to disk."""
from __future__ import annotations

import json

import pytest
import torch
import yaml
from PIL import Image

from hcpdiff_like.tools.evaluate_checkpoints import main


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from hcpdiff_like.models.tiny import write_byte_level_tokenizer

    folder = tmp_path_factory.mktemp("tiny_clip")
    text = dict(vocab_size=514, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, bos_token_id=512, eos_token_id=513, pad_token_id=513)
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)
    write_byte_level_tokenizer(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def two_step_run(tiny_sd1, tmp_path_factory):
    from hcpdiff_like.models.loading import load_model_bundle
    from hcpdiff_like.plugins.lora import attach_lora_blocks, lora_metadata, lora_state_dict
    from hcpdiff_like.training.checkpoints import save_safetensors

    exp = tmp_path_factory.mktemp("run")
    bundle = load_model_bundle(str(tiny_sd1))
    specs = attach_lora_blocks(bundle.unet, [{"layers": ["re:.*attn2$"], "rank": 2}], "unet")
    for step, std in ((2, 0.1), (4, 1.0)):
        torch.manual_seed(step)
        with torch.no_grad():
            for name, param in bundle.unet.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, std)
        save_safetensors(lora_state_dict(bundle.unet, specs), exp / "ckpts" / f"unet-{step}.safetensors",
                         lora_metadata(specs, "unet", "sd1"))
    (exp / "cfg.yaml").write_text(yaml.safe_dump({"model": {"pretrained_model_name_or_path": str(tiny_sd1)}}))
    return exp


def test_scores_every_checkpoint_and_plots(two_step_run, tiny_clip, demo_images, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a (red:1.2) circle at step {step} --d 3\n")
    out = tmp_path / "eval"
    report = main([str(two_step_run), "--clip_model", str(tiny_clip), "--prompts", str(prompts),
                   "--training_images", str(demo_images), "--baseline", "--out_dir", str(out), "--width", "16",
                   "--height", "16", "--num_inference_steps", "2", "--images_per_prompt", "2", "--dtype", "fp32", "--device", "cpu"])
    saved = json.loads((out / "scores.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert [r["step"] for r in saved["steps"]] == [0, 2, 4]
    assert saved["steps"][1]["prompts"][0] == "a (red:1.2) circle at step 2"
    with Image.open(out / "scores.png") as plot:
        assert plot.size[0] > 100
    # the scores, recomputed independently from the saved images with the same CLIP model
    from transformers import CLIPModel, CLIPProcessor

    model, processor = CLIPModel.from_pretrained(tiny_clip), CLIPProcessor.from_pretrained(tiny_clip)
    entry = saved["steps"][2]
    images = [Image.open(p).convert("RGB") for p in entry["images"]]
    training = [Image.open(p).convert("RGB") for p in sorted(demo_images.glob("*.png"))]
    with torch.no_grad():
        inputs = processor(text=["a red circle at step 4"] * 2, images=images + training,
                           return_tensors="pt", padding=True)
        output = model(**inputs)
    image_embeds, text_embeds = output.image_embeds, output.text_embeds  # unit length
    generated, train_embeds = image_embeds[:2], image_embeds[2:]
    expected_text = torch.nn.functional.cosine_similarity(generated, text_embeds).mean().item()
    expected_train = (generated @ train_embeds.T).mean().item()
    expected_diversity = 1 - torch.nn.functional.cosine_similarity(generated[:1], generated[1:]).item()
    assert entry["image_text_similarity"] == pytest.approx(expected_text, abs=1e-5)
    assert entry["training_image_similarity"] == pytest.approx(expected_train, abs=1e-5)
    assert entry["diversity"] == pytest.approx(expected_diversity, abs=1e-5)
    assert saved["steps"][0]["images"] != saved["steps"][2]["images"]


def test_bad_inputs_are_named(two_step_run, tiny_clip, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    with pytest.raises(SystemExit, match=r"--steps \[3\].*saved steps: \[2, 4\]"):
        main([str(two_step_run), "--clip_model", str(tiny_clip), "--prompts", str(prompts), "--steps", "3"])
    with pytest.raises(SystemExit, match="not a local CLIP model folder"):
        main([str(two_step_run), "--clip_model", str(tmp_path), "--prompts", str(prompts)])
