"""tools.lora_convert: the webui file, loaded by diffusers' own `load_lora_weights`, gives the same UNet / text
encoder outputs and the same images as our merge of the original files (SD1 and SDXL, LoCon convs included);
ours -> webui -> ours is bit-exact; wrong inputs give clear errors and nothing is overwritten."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from convert.lora_factory import make_lora_files

from hcpdiff_like.convert.merge import merge_lora_into_bundle
from hcpdiff_like.models.loading import bundle_to_pipeline
from hcpdiff_like.models.loading import load_model_bundle
from hcpdiff_like.tools import lora_convert
from hcpdiff_like.training.checkpoints import load_safetensors

FLAGS = {"unet": "--lora_path", "text_encoder": "--lora_path_TE", "text_encoder_2": "--lora_path_TE2"}


def to_webui(files, dump, *extra):
    argv = ["--to_webui", "--dump_path", str(dump), *extra]
    for target, path in files.items():
        argv += [FLAGS[target], str(path)]
    return lora_convert.main(argv)


@pytest.fixture(scope="module")
def converted(tiny_sd1, tiny_sdxl, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_convert")
    out = {}
    for family, model in (("sd1", tiny_sd1), ("sdxl", tiny_sdxl)):
        files = make_lora_files(model, family, root / family)
        webui = root / f"{family}-webui.safetensors"
        extra = ["--model", str(model)] if family == "sdxl" else []  # the tiny SDXL is not SDXL-base shaped
        assert to_webui(files, webui, *extra) == 0
        out[family] = (model, files, webui)
    return out


def unet_inputs(unet, family):
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=generator)
    context = torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator)
    extra = {}
    if family == "sdxl":
        extra["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 32, generator=generator),
                                      "time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]] * 2)}
    return sample, torch.tensor([10, 700]), context, extra


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_diffusers_load_lora_weights_matches_our_merge(family, converted):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    model, files, webui = converted[family]
    pipeline_class = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    theirs = pipeline_class.from_pretrained(str(model), local_files_only=True)
    theirs.load_lora_weights(str(webui))
    ours = load_model_bundle(str(model))
    merge_lora_into_bundle(ours, [(path, 1.0) for path in files.values()])
    base = load_model_bundle(str(model))
    webui_state = load_safetensors(webui)[0]
    assert any(v.ndim == 4 and v.shape[-1] == 3 for k, v in webui_state.items() if k.endswith("lora_down.weight"))

    with torch.no_grad():
        ids = torch.tensor([[512, 70, 71, 72, 73] + [513] * 72])
        their_encoders = [theirs.text_encoder] + ([theirs.text_encoder_2] if family == "sdxl" else [])
        for mine, their, plain in zip(ours.text_encoders, their_encoders, base.text_encoders):
            expected = mine(ids).last_hidden_state
            assert not torch.allclose(plain(ids).last_hidden_state, expected, atol=1e-3)  # the LoRA does something
            assert torch.allclose(their(ids).last_hidden_state, expected, atol=1e-5)
        sample, timesteps, context, extra = unet_inputs(ours.unet, family)
        expected = ours.unet(sample, timesteps, context, **extra).sample
        assert not torch.allclose(base.unet(sample, timesteps, context, **extra).sample, expected, atol=1e-3)
        assert torch.allclose(theirs.unet(sample, timesteps, context, **extra).sample, expected, atol=1e-5)

    def image(pipe):
        return pipe("a red fox", num_inference_steps=2, generator=torch.Generator().manual_seed(3),
                    output_type="np").images[0]

    our_pipe = bundle_to_pipeline(ours)
    our_pipe.set_progress_bar_config(disable=True)
    theirs.set_progress_bar_config(disable=True)
    assert np.allclose(image(theirs), image(our_pipe), atol=1e-4)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_round_trip_through_the_cli_is_bit_exact(family, converted, tmp_path):
    model, files, webui = converted[family]
    assert lora_convert.main(["--from_webui", "--lora_path", str(webui), "--dump_path", str(tmp_path)]) == 0
    for target, path in files.items():
        state, metadata = load_safetensors(path)
        back_state, back_metadata = load_safetensors(tmp_path / f"{target}-{webui.name}")
        assert back_state.keys() == state.keys()
        assert all(torch.equal(back_state[k], v) for k, v in state.items())
        assert back_metadata["hcpdiff_like.lora"] == metadata["hcpdiff_like.lora"]


def test_help_and_wrong_inputs(converted, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        lora_convert.main(["--help"])
    assert exit_info.value.code == 0 and "--auto_scale_alpha" in capsys.readouterr().out
    model, files, webui = converted["sd1"]
    before = webui.stat().st_mtime_ns
    assert to_webui(files, webui) == 2 and "already exists" in capsys.readouterr().err
    assert webui.stat().st_mtime_ns == before
    swapped = {"unet": files["text_encoder"]}
    assert to_webui(swapped, tmp_path / "x.safetensors") == 2
    assert "holds the text_encoder LoRA" in capsys.readouterr().err
    assert to_webui(files, tmp_path / "x.safetensors", "--sdxl") == 2 and "sd1 LoRA" in capsys.readouterr().err
    assert lora_convert.main(["--from_webui", "--lora_path", str(files["unet"]), "--dump_path", str(tmp_path)]) == 2
    assert "not a kohya/webui LoRA file" in capsys.readouterr().err
    sdxl_webui = converted["sdxl"][2]
    assert lora_convert.main(["--from_webui", "--lora_path", str(sdxl_webui), "--dump_path", str(tmp_path),
                              "--model", str(model)]) == 2
    assert "is sd1, but" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_sdxl_loha_and_lokr_through_the_cli(tiny_sdxl, tmp_path):
    """LyCORIS layers in kohya's SGM names for SDXL, both text encoders; back to ours, baked the same."""
    blocks = {"unet": [{"layers": [r"re:.*\.attn1$"], "rank": 2, "alpha": 1, "type": "loha"},
                       {"layers": [r"re:.*\.attn2$"], "rank": 2, "alpha": 3, "type": "lokr"}],
              "text_encoder": [{"layers": [r"re:.*self_attn$"], "rank": 2, "alpha": 1, "type": "loha"}],
              "text_encoder_2": [{"layers": [r"re:.*mlp$"], "rank": 1, "alpha": 2, "type": "lokr"}]}
    files = make_lora_files(tiny_sdxl, "sdxl", tmp_path / "ours", blocks=blocks)
    webui = tmp_path / "lycoris.safetensors"
    assert to_webui(files, webui, "--model", str(tiny_sdxl)) == 0
    state, metadata = load_safetensors(webui)
    assert metadata["ss_network_module"] == "lycoris.kohya"
    assert any(k.startswith("lora_unet_input_blocks_") and k.endswith(".hada_w1_a") for k in state)
    assert any(k.startswith("lora_te2_text_model_") and ".lokr_w" in k for k in state)
    ours, theirs, base = (load_model_bundle(str(tiny_sdxl)) for _ in range(3))
    merge_lora_into_bundle(ours, [(path, 1.0) for path in files.values()])
    merge_lora_into_bundle(theirs, [(webui, 1.0)])
    with torch.no_grad():
        ids = torch.tensor([[512, 70, 71, 72, 73] + [513] * 72])
        for mine, their, plain in zip(ours.text_encoders, theirs.text_encoders, base.text_encoders):
            expected = mine(ids).last_hidden_state
            assert not torch.allclose(plain(ids).last_hidden_state, expected, atol=1e-3)
            assert torch.allclose(their(ids).last_hidden_state, expected, atol=1e-5)
        sample, timesteps, context, extra = unet_inputs(ours.unet, "sdxl")
        expected = ours.unet(sample, timesteps, context, **extra).sample
        assert not torch.allclose(base.unet(sample, timesteps, context, **extra).sample, expected, atol=1e-3)
        assert torch.allclose(theirs.unet(sample, timesteps, context, **extra).sample, expected, atol=1e-5)
    back = tmp_path / "back"
    assert lora_convert.main(["--from_webui", "--lora_path", str(webui), "--dump_path", str(back),
                              "--model", str(tiny_sdxl)]) == 0
    for target, path in files.items():
        again = load_safetensors(back / f"{target}-{webui.name}")
        assert again[0].keys() == load_safetensors(path)[0].keys()
