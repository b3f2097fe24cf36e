"""Sample images during training: prompt lists (YAML and kohya lines) and a grid per step in the exp dir."""
from __future__ import annotations

import pytest
import yaml
from PIL import Image

from hcpdiff_like.config.launcher import compose_config
from hcpdiff_like.infer.training_samples import (SamplePromptError, TrainingSampler, image_grid, parse_kohya_line,
                                                 read_prompt_entries)


@pytest.mark.parametrize("line, expected", [
    ("a photo of sks", {"prompt": "a photo of sks"}),
    ("a cat --n blurry, lowres --w 768 --h 512 --d 42 --l 7.5 --s 28",
     {"prompt": "a cat", "neg_prompt": "blurry, lowres", "width": 768, "height": 512, "seed": 42,
      "guidance_scale": 7.5, "num_inference_steps": 28}),
    ("(red:1.2) dog --s 5000 --ss euler_a --g 3.5", {"prompt": "(red:1.2) dog", "num_inference_steps": 1000,
                                                     "sampler": "euler_a"}),  # steps clamped; --g ignored
    ("well--known  --d 1", {"prompt": "well--known", "seed": 1}),  # `--` inside a word is text
])
def test_kohya_prompt_lines(line, expected):
    assert parse_kohya_line(line, "x") == expected


def test_prompt_files_and_errors(tmp_path):
    txt = tmp_path / "prompts.txt"
    txt.write_text("# comment\n\na red circle --w 64 --h 32\nblue square --d 9\n")
    assert [e["prompt"] for e in read_prompt_entries(str(txt))] == ["a red circle", "blue square"]
    listed = tmp_path / "prompts.yaml"
    listed.write_text(yaml.safe_dump(["one", {"prompt": "two", "seed": 3}]))
    assert read_prompt_entries(str(listed)) == [{"prompt": "one"}, {"prompt": "two", "seed": 3}]
    bad = tmp_path / "bad.txt"
    bad.write_text("ok\nnot ok --w wide\n")
    with pytest.raises(SamplePromptError, match=r"bad.txt:2: width='wide'"):
        read_prompt_entries(str(bad))
    with pytest.raises(SamplePromptError, match="does not exist"):
        read_prompt_entries(str(tmp_path / "missing.txt"))
    with pytest.raises(SamplePromptError, match=r"\[0\].*seeed"):
        read_prompt_entries([{"prompt": "x", "seeed": 1}])


def test_sampler_is_built_from_config_before_the_model(tmp_path):
    cfg = compose_config(["cfg=demo", "sample.every_n_steps=2", "sample.prompts=[a,b]", "sample.sampler=eulr"])
    with pytest.raises(SamplePromptError, match="eulr"):
        TrainingSampler.from_config(cfg, tmp_path)
    cfg = compose_config(["cfg=demo", "sample.every_n_steps=2", "sample.prompts=[a,b]"])
    sampler = TrainingSampler.from_config(cfg, tmp_path)
    assert [(p.seed, p.width) for p in sampler.prompts] == [(0, 64), (1, 64)]  # seed + i; the data resolution
    assert sampler.due(2) and sampler.due(4) and not sampler.due(3) and not sampler.due(0)
    assert not TrainingSampler.from_config(compose_config(["cfg=demo"]), tmp_path).enabled  # off by default


def test_grid_layout():
    images = [Image.new("RGB", (8, 8), c) for c in ("red", "green", "blue")] + [Image.new("RGB", (8, 16), "black")]
    grid = image_grid(images)
    assert grid.size == (16, 32)
    assert grid.getpixel((12, 4)) == (0, 128, 0) and grid.getpixel((12, 20)) == (0, 0, 0)


def test_tiny_run_writes_a_sample_grid_per_step(tmp_path, demo_images):
    from hcpdiff_like.infer.weighted_captions import WeightedTextConditioner
    from hcpdiff_like.training.trainer import Trainer

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle --w 16 --h 16 --s 2\n(blue:1.3) square --w 16 --h 16 --s 2 --d 5 --ss euler_a\n")
    cfg = compose_config(["cfg=demo", f"data.dataset1.sources.shapes.img_dir={demo_images}", "logger=[console]",
                          "train.train_steps=1", "scheduler=constant", "train.lr=0.01", "train.save_step=1000", "validation.every_n_steps=0",
                          "sample.every_n_steps=1", "sample.at_start=true", f"sample.prompts={prompts}", "model.weighted_captions=true"])
    trainer = Trainer(cfg, exp_dir=str(tmp_path / "exp")).setup()
    logged = []
    trainer.bundle.unet.train()
    trainer.loggers.image = lambda tag, image, step: logged.append((tag, image.size, step))
    try:
        trainer.train()
    finally:
        trainer.cleanup()
    grids = sorted((tmp_path / "exp" / "samples").glob("grid-*.png"))
    assert [g.name for g in grids] == ["grid-0.png", "grid-1.png"]  # at_start, then every step
    with Image.open(grids[0]) as grid:
        assert grid.size == (32, 16)  # two 16x16 samples side by side
        record = yaml.safe_load(grid.text["hcpdiff_like.samples"])
    assert record["step"] == 0 and [p["seed"] for p in record["prompts"]] == [0, 5]
    assert [entry for entry in logged if entry[0] == "samples"] == [("samples", (32, 16), 0), ("samples", (32, 16), 1)]
    assert [tag for tag, _, _ in logged if tag != "samples"] == ["loss_curve"]  # the end-of-run loss picture
    assert trainer.bundle.unet.training  # sampling ran in eval mode, then restored the mode
    assert isinstance(trainer.accelerator.unwrap_model(trainer.model).conditioner, WeightedTextConditioner)

    # the run's checkpoint, merged by the visualizer's loader at alpha 1, reproduces the trained UNet (not the base)
    import torch

    from hcpdiff_like.infer.model import load_inference_model

    merged = load_inference_model(cfg.model.pretrained_model_name_or_path, exp_dir=str(tmp_path / "exp"), step=1,
                                  merge_alpha=1.0, device="cpu", dtype="fp32")
    torch.manual_seed(0)
    latents, hidden = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 32)
    trainer.bundle.unet.eval()
    with torch.no_grad():
        expected = trainer.bundle.unet(latents, 300, encoder_hidden_states=hidden).sample
        got = merged.bundle.unet(latents, 300, encoder_hidden_states=hidden).sample
        base = load_inference_model(cfg.model.pretrained_model_name_or_path, device="cpu", dtype="fp32")
        untrained = base.bundle.unet(latents, 300, encoder_hidden_states=hidden).sample
    assert (expected - untrained).abs().max() > 100 * (got - expected).abs().max()
