"""Textual inversion and pivotal tuning through the real config + trainer, on the tiny SD1.x model."""
from __future__ import annotations

import torch

from hcpdiff_like.config.launcher import compose_config
from hcpdiff_like.config.validation import validate_config
from hcpdiff_like.models.conditioning import TextConditioner
from hcpdiff_like.models.loading import load_model_bundle
from hcpdiff_like.plugins.embedding_files import create_embedding, read_embedding
from hcpdiff_like.plugins.embeddings import attach_embeddings, load_embedding_dir
from hcpdiff_like.plugins.lora import load_lora_into
from hcpdiff_like.training.checkpoints import load_safetensors
from hcpdiff_like.training.trainer import Trainer


def _trainer(tmp_path, cfg_name, overrides):
    cfg = compose_config([f"cfg={cfg_name}", "model=tiny_sd1", "logger=[console]", "data.dataset1.batch_size=2",
                          "data.dataset1.resolution=64", *overrides])
    validate_config(cfg)
    return Trainer(cfg, exp_dir=str(tmp_path / "exp")).setup()


def _state(module):
    return {n: p.detach().clone() for n, p in module.named_parameters() if "token_embedding.words" not in n}


def test_textual_inversion_changes_only_the_word(tiny_sd1, demo_images, tmp_path):
    embs = tmp_path / "embs"
    initial = read_embedding(create_embedding(str(tiny_sd1), "sks_shape", 2, out_dir=embs, seed=0)).vectors[0]
    trainer = _trainer(tmp_path, "textual_inversion", ["word=sks_shape", f"dataset_dir={demo_images}",
                                                       f"embeddings.emb_dir={embs}", "train.train_steps=3",
                                                       "train.save_step=2", "embeddings.train.0.lr=1e-2"])
    unet_before, te_before = _state(trainer.bundle.unet), _state(trainer.bundle.text_encoder)
    trainer.train()
    trainer.cleanup()
    assert all(torch.equal(p, unet_before[n]) for n, p in _state(trainer.bundle.unet).items())
    assert all(torch.equal(p, te_before[n]) for n, p in _state(trainer.bundle.text_encoder).items())
    ckpts = sorted(p.name for p in trainer.exp.ckpt_dir.iterdir())
    assert ckpts == ["sks_shape-2.pt", "sks_shape-3.pt"]  # no empty network files for a pure TI run
    trained = read_embedding(trainer.exp.ckpt_dir / "sks_shape-3.pt")
    assert trained.step == 3 and not torch.equal(trained.vectors[0], initial)


def test_caption_without_the_word_leaves_the_word_unchanged(tiny_sd1, demo_images, tmp_path):
    embs = tmp_path / "embs"
    initial = read_embedding(create_embedding(str(tiny_sd1), "sks_shape", 2, out_dir=embs, seed=0)).vectors[0]
    trainer = _trainer(tmp_path, "textual_inversion", ["word=sks_shape", f"dataset_dir={demo_images}",
                                                       f"embeddings.emb_dir={embs}", "train.train_steps=2",
                                                       "optimizer_emb.weight_decay=0",
                                                       "data.dataset1.sources.source1.prompt_template='{caption}'"])
    trainer.train()
    trainer.cleanup()
    assert torch.equal(read_embedding(trainer.exp.ckpt_dir / "sks_shape-2.pt").vectors[0], initial)


def test_pivotal_trains_word_and_lora_and_the_saved_files_reproduce_the_text_encoder(tiny_sd1, demo_images,
                                                                                      tmp_path):
    embs = tmp_path / "embs"
    initial = read_embedding(create_embedding(str(tiny_sd1), "surtr_arknights", 3, out_dir=embs, seed=0)).vectors[0]
    trainer = _trainer(tmp_path, "lora_anime_character", [
        "character_name=surtr_arknights", f"dataset_dir={demo_images}", f"embeddings.emb_dir={embs}",
        "train.train_steps=3", "train.save_step=100", "train.text_encoder_lr=1e-2", "train.lr=1e-2"])
    assert len(trainer.optimizers) == 2 and len(trainer.lr_schedulers) == 2  # network + word, each its own
    assert trainer.optimizers[1].param_groups[0]["initial_lr"] == 3e-3  # the word's own lr (warm-up starts at 0)
    trainer.train()
    trainer.cleanup()
    ckpt = trainer.exp.ckpt_dir
    assert {p.name for p in ckpt.iterdir()} == {"unet-3.safetensors", "text_encoder-3.safetensors",
                                                "surtr_arknights-3.pt"}
    word = read_embedding(ckpt / "surtr_arknights-3.pt")
    assert not torch.equal(word.vectors[0], initial)
    te_state, _ = load_safetensors(ckpt / "text_encoder-3.safetensors")
    assert any(v.abs().sum() > 0 for k, v in te_state.items() if "lora_B" in k)  # lora_B starts at zero

    # A fresh model + the saved LoRA + the saved word = the trained text encoder, exactly.
    prompt = ["surtr_arknights, red circle, simple background"]
    with torch.no_grad():
        expected, _ = trainer.model.conditioner(prompt)
    bundle = load_model_bundle(str(tiny_sd1))
    state, metadata = load_safetensors(ckpt / "text_encoder-3.safetensors")
    load_lora_into(bundle.text_encoder, state, metadata)
    conditioner = TextConditioner(bundle, clip_skip=trainer.cfg.model.clip_skip)
    attach_embeddings(bundle, conditioner, load_embedding_dir(ckpt))
    with torch.no_grad():
        got, _ = conditioner(["surtr_arknights-3, red circle, simple background"])
    assert torch.equal(got, expected)


def test_shipped_pivotal_config_fills_the_trigger_word_into_captions(tmp_path):
    cfg = compose_config(["cfg=lora_anime_character", "character_name=surtr_arknights", f"dataset_dir={tmp_path}",
                          "model.pretrained_model_name_or_path=/models/animefull"])
    validate_config(cfg)
    assert cfg.embeddings.train[0].name == "surtr_arknights"
    source = cfg.data.dataset1.sources.source1
    assert source.word_names.name == "surtr_arknights" and source.img_dir == str(tmp_path)
    assert cfg.plugin.rank == 8 and cfg.plugin.lora_text_encoder[0].rank == 4 and cfg.model.clip_skip == 1


def test_sdxl_word_trains_one_tensor_per_text_encoder(tiny_sdxl, demo_images, tmp_path):
    embs = tmp_path / "embs"
    initial = read_embedding(create_embedding(str(tiny_sdxl), "sks_xl", 2, out_dir=embs, seed=0)).vectors
    cfg = compose_config(["cfg=textual_inversion", "model=tiny_sdxl", "logger=[console]", "word=sks_xl",
                          f"dataset_dir={demo_images}", f"embeddings.emb_dir={embs}", "data.dataset1.batch_size=2",
                          "data.dataset1.resolution=64", "train.train_steps=2", "embeddings.train.0.lr=1e-2"])
    trainer = Trainer(cfg, exp_dir=str(tmp_path / "exp")).setup()
    trainer.train()
    trainer.cleanup()
    saved = torch.load(trainer.exp.ckpt_dir / "sks_xl-2.pt", weights_only=True)
    assert set(saved) >= {"clip_l", "clip_g"}  # A1111's SDXL layout
    for before, after in zip(initial, (saved["clip_l"], saved["clip_g"])):
        assert after.shape == before.shape and not torch.equal(after, before)
