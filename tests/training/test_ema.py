"""EMA of the trained weights: the average follows its decay formula, survives state_dict round trips,
and training writes ckpts/ema/<target>-<step>.safetensors in the live checkpoint's layout."""
from __future__ import annotations

import pytest
import torch

from hcpdiff_like.config.launcher import compose_config
from hcpdiff_like.models.loading import load_model_bundle
from hcpdiff_like.plugins.lora import load_lora_into
from hcpdiff_like.training.checkpoints import load_safetensors
from hcpdiff_like.training.ema import EMA


def test_average_follows_the_decay_formula():
    weight = torch.nn.Parameter(torch.zeros(3))
    ema = EMA([weight], decay=0.9, use_ema_warmup=True, inv_gamma=1.0, power=0.5)
    expected = torch.zeros(3)
    for update in range(1, 8):
        with torch.no_grad():
            weight.fill_(float(update))
        ema.update()
        n = update - 1  # diffusers counts from 0 and skips nothing with update_after_step=0
        decay = 0.0 if n == 0 else min(0.9, 1 - (1 + n / 1.0) ** -0.5)
        expected = decay * expected + (1 - decay) * weight.detach()
        assert ema.decay == pytest.approx(decay)
    with ema.applied():
        torch.testing.assert_close(weight.detach(), expected)
    assert torch.equal(weight.detach(), torch.full((3,), 7.0))  # live weights back after the block


def test_state_dict_round_trip_and_bad_keys():
    weight = torch.nn.Parameter(torch.ones(4))
    ema = EMA([weight], decay=0.5, min_decay=0)  # an int from YAML is accepted
    for value in (2.0, 4.0):
        with torch.no_grad():
            weight.fill_(value)
        ema.update()
    state = ema.state_dict()
    fresh_weight = torch.nn.Parameter(torch.zeros(4))
    fresh = EMA([fresh_weight], decay=0.5)
    fresh.load_state_dict(state)
    with fresh.applied():
        with ema.applied():
            torch.testing.assert_close(fresh_weight.detach(), weight.detach())
    with pytest.raises(ValueError, match="train.ema: decya"):
        EMA([weight], decya=0.9)


def test_training_saves_ema_checkpoints_that_load(tmp_path, demo_images, tiny_sd1):
    from hcpdiff_like.training.trainer import Trainer

    cfg = compose_config(["cfg=demo", f"data.dataset1.sources.shapes.img_dir={demo_images}", "logger=[console]",
                          "train.train_steps=3", "train.save_step=2", "scheduler=constant",
                          "train.ema={decay: 0.5}"])
    trainer = Trainer(cfg, exp_dir=str(tmp_path / "exp")).setup()
    assert trainer.ema is not None
    trainer.train()
    ckpts = trainer.exp.ckpt_dir
    assert sorted(p.name for p in (ckpts / "ema").glob("*.safetensors")) == ["unet-2.safetensors",
                                                                                "unet-3.safetensors"]
    live, live_meta = load_safetensors(ckpts / "unet-3.safetensors")
    averaged, ema_meta = load_safetensors(ckpts / "ema" / "unet-3.safetensors")
    assert live.keys() == averaged.keys() and live_meta == ema_meta
    assert any(not torch.equal(live[k], averaged[k]) for k in live)
    with trainer.ema.applied():  # the file holds the average
        current, _ = trainer.trained_state("unet")
        assert all(torch.equal(current[k], averaged[k]) for k in averaged)
    fresh = load_model_bundle(trainer.bundle.source).unet
    load_lora_into(fresh, averaged, ema_meta)  # the same loader reads it
    trainer.cleanup()


def test_trigger_words_are_averaged_too(tmp_path, demo_images, tiny_sd1):
    """Pivotal / TI runs: ckpts/ema/ holds the averaged word next to the averaged network, a matching set."""
    from hcpdiff_like.plugins.embedding_files import create_embedding, read_embedding
    from hcpdiff_like.plugins.embeddings import trained_word_files
    from hcpdiff_like.training.trainer import Trainer

    embs = tmp_path / "embs"
    create_embedding(str(tiny_sd1), "sks_shape", 2, out_dir=embs, seed=0)
    cfg = compose_config(["cfg=textual_inversion", "model=tiny_sd1", "logger=[console]", "word=sks_shape",
                          f"dataset_dir={demo_images}", f"embeddings.emb_dir={embs}", "data.dataset1.resolution=64",
                          "train.train_steps=3", "train.save_step=100", "embeddings.train.0.lr=1e-2",
                          "train.ema={decay: 0.5}"])
    trainer = Trainer(cfg, exp_dir=str(tmp_path / "exp")).setup()
    trainer.train()
    live = read_embedding(trainer.exp.ckpt_dir / "sks_shape-3.pt").vectors[0]
    averaged = read_embedding(trainer.exp.ckpt_dir / "ema" / "sks_shape-3.pt").vectors[0]
    assert not torch.equal(live, averaged)
    with trainer.ema.applied():
        assert torch.equal(trained_word_files(trainer.bundle, ["sks_shape"], 3)[0].vectors[0], averaged)
    assert torch.equal(trained_word_files(trainer.bundle, ["sks_shape"], 3)[0].vectors[0], live)  # restored
    trainer.cleanup()
