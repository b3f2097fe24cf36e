"""Speed/memory switches: model.attention, channels_last, compile, full_bf16, and allow_tf32."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from hcpdiff_like.config.launcher import compose_config
from hcpdiff_like.models.loading import load_model_bundle
from hcpdiff_like.training.speed import SpeedOptionError, apply_speed_options, check_speed_options


def unet_output(unet):
    generator = torch.Generator().manual_seed(0)
    latents, hidden = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 77, 32, generator=generator)
    with torch.no_grad():
        return unet(latents, torch.tensor([10, 900]), hidden).sample


def test_attention_processors_and_channels_last_keep_the_output(tiny_sd1):
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    unet = load_model_bundle(str(tiny_sd1)).unet
    assert apply_speed_options(unet, OmegaConf.create({"attention": "default"})) == ["attention=default"]
    assert all(type(p) is AttnProcessor for p in unet.attn_processors.values())
    plain = unet_output(unet)
    applied = apply_speed_options(unet, OmegaConf.create({"attention": "sdpa", "channels_last": True}))
    assert applied == ["attention=sdpa", "channels_last"]
    assert all(type(p) is AttnProcessor2_0 for p in unet.attn_processors.values())
    assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(unet_output(unet), plain, atol=1e-5, rtol=1e-4)


def test_compile_is_off_by_default_and_compiles_the_unet_in_place(monkeypatch, tiny_sd1):
    assert compose_config(["cfg=demo"]).model.compile is False
    calls = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: calls.append((type(self).__name__, kw)))
    unet = load_model_bundle(str(tiny_sd1)).unet
    names = [n for n, _ in unet.named_parameters()]
    apply_speed_options(unet, OmegaConf.create({"compile": "reduce-overhead"}))
    assert calls == [("UNet2DConditionModel", {"mode": "reduce-overhead"})]
    assert [n for n, _ in unet.named_parameters()] == names  # checkpoint keys are unaffected


def test_bad_options_fail_before_the_model_loads():
    with pytest.raises(SpeedOptionError, match="model.attention='xformers'"):
        check_speed_options(OmegaConf.create({"attention": "xformers"}), "no")
    with pytest.raises(SpeedOptionError, match="model.full_bf16=true needs mixed_precision=bf16"):
        check_speed_options(OmegaConf.create({"full_bf16": True}), "fp16")


@pytest.fixture()
def fresh_accelerator_state():
    """accelerate keeps one process-wide state; a run with another mixed_precision needs it reset around it."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_full_bf16_trains_bf16_weights(tmp_path, demo_images, tiny_sd1, fresh_accelerator_state):
    from hcpdiff_like.training.trainer import Trainer

    cfg = compose_config(["cfg=demo", f"data.dataset1.sources.shapes.img_dir={demo_images}", "logger=[console]",
                          "mixed_precision=bf16", "model.full_bf16=true", "train.train_steps=1",
                          "scheduler=constant"])
    trainer = Trainer(cfg, exp_dir=str(tmp_path / "exp")).setup()
    trained = trainer.trainable_parameters
    assert trained and all(p.dtype == torch.bfloat16 for p in trained)
    before = [p.detach().clone() for p in trained]
    loss = trainer.train_step([next(iter(trainer.datasets[0].forever()))])
    assert loss == loss
    assert any(not torch.equal(b, p) for b, p in zip(before, trained))
    trainer.cleanup()


def test_allow_tf32_sets_the_torch_switches_and_false_clears_them(tmp_path, demo_images):
    from hcpdiff_like.training.trainer import Trainer

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        for value in (True, False):
            cfg = compose_config(["cfg=demo", f"data.dataset1.sources.shapes.img_dir={demo_images}",
                                  "logger=[console]", f"allow_tf32={str(value).lower()}"])
            trainer = Trainer(cfg, exp_dir=str(tmp_path / f"exp-{value}")).setup()
            assert torch.backends.cuda.matmul.allow_tf32 is value and torch.backends.cudnn.allow_tf32 is value
            trainer.cleanup()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
